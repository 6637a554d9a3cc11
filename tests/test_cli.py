"""The `forward` command (README: one forward pass of the built-in tiny model; the main job is `demo`)."""

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


def test_infer_runs_the_agent_on_a_video(tmp_path, capsys):
  import media
  video = media.write_video(str(tmp_path / "v.mp4"), 60, 10.0, (64, 80))
  assert main(["infer", "--video", video, "--question", "<image>\nWhat colour? A. red B. blue",
               "--max-new-tokens", "8", "--max-generation-round", "2", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "--- assistant turn ---" in out and "answer:" in out and "60 frames at 10.00 fps" in out
  report = json.loads((tmp_path / "infer.json").read_text())
  assert report["frames"] == 3 and 1 <= report["rounds"] <= 2 and report["tokens"] > 0
  for turn in report["turns"]:  # streamed as sampled, each turn's pieces add up to its text
    assert f"--- assistant turn ---\n{turn}\n" in out


def test_infer_unreadable_video_and_bad_checkpoint_are_clear_errors(tmp_path, capsys):
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video at all")
  assert main(["infer", "--video", str(bad), "--question", "Q?"]) == 2
  assert "bad.mp4" in capsys.readouterr().err
  import media
  video = media.write_video(str(tmp_path / "v.mp4"), 20, 10.0, (64, 80))
  assert main(["infer", "--video", video, "--question", "Q?", "--checkpoint", str(tmp_path / "nope")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_frames_shows_what_the_agent_sees(tmp_path, capsys):
  """`frames` prints true times of the overview and a zoom (a VFR file: not index / fps), writes the contact
  sheet and the npz of frames as decoded, the same the rollout's reader returns."""
  import numpy as np

  import media
  from zoomer_jax.video import VideoReader, sample_overview, sample_zoom
  video = media.write_video(str(tmp_path / "phone.mp4"), 150, 30.0, (64, 80), "h264", gop=30, vfr=True)
  npz, sheet = tmp_path / "f.npz", tmp_path / "sheet.png"
  assert main(["frames", video, "--zoom", "3", "4", "8", "--save-npz", str(npz), "--sheet", str(sheet)]) == 0
  out = capsys.readouterr().out
  meta = VideoReader(video).meta
  ov, ov_ts = sample_overview(meta)
  zi, zts = sample_zoom(meta, 3, 4, 8)
  assert f"overview ({len(ov)} frames)" in out and "zoom [3, 4] s at 8 fps" in out
  assert all(f"#{i}@{t:.2f}s" in out for i, t in zip(zi, zts))
  data = np.load(npz)
  assert data["frames"].dtype == np.uint8 and data["frames"].shape == (len(ov) + 8, 64, 80, 3)
  np.testing.assert_allclose(data["timestamps"], np.r_[ov_ts, zts])
  assert [media.frame_index(f) for f in data["frames"]] == np.r_[ov, zi].tolist()
  assert np.all((zts >= 3) & (zts <= 4)) and sheet.stat().st_size > 1000
  # A call the model could not make is refused with the model's error; a missing file is a clear error.
  assert main(["frames", video, "--zoom", "0", "4", "8", "--sheet", ""]) == 2
  assert "exceeds the maximum allowed" in capsys.readouterr().err
  assert main(["frames", str(tmp_path / "nope.mp4")]) == 2
  assert "nope.mp4" in capsys.readouterr().err
