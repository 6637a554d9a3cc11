"""The main job from README: `python -m zoomer_jax forward` on the built-in tiny model."""

import json
import subprocess
import sys

from zoomer_jax.__main__ import main, synthetic_clip


def test_forward_on_generated_clip(tmp_path, capsys):
  assert main(["forward", "--frames", "6", "--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / "forward.json").read_text())
  assert report["video_grid_thw"][0] == 3 and report["logits_finite"]
  assert report["logits_shape"] == [1, report["sequence_length"], 600]
  assert "video_tokens" in capsys.readouterr().out


def test_synthetic_clip_encodes_the_frame_index():
  frames = synthetic_clip(5)
  assert [int(f[0, 0, 0]) for f in frames] == [0, 1, 2, 3, 4]


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "zoomer_jax", "forward", "--checkpoint", str(tmp_path / "nope")],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "does not exist" in proc.stderr
