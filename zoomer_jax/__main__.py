"""Command line: `python -m zoomer_jax forward [--checkpoint DIR] [--config NAME] [--frames N]`.

`forward` runs one forward pass of Qwen2.5-VL on a clip generated on the spot (a moving square whose
colour encodes the frame index), with the built-in tiny random model unless `--checkpoint` names an
HF directory, and prints what went in, what came out and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def synthetic_clip(n_frames: int, height: int = 224, width: int = 320):
  """uint8 RGB frames [T, H, W, 3]: a square moving left to right, brightness = frame index."""
  import numpy as np
  frames = np.zeros((n_frames, height, width, 3), np.uint8)
  for i in range(n_frames):
    x = int((width - 48) * i / max(1, n_frames - 1))
    frames[i, 88:136, x:x + 48] = (255, 255 * i // max(1, n_frames - 1), 64)
    frames[i, :8, :, :] = i % 256
  return frames


def forward(args) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  import zoomer_jax
  from zoomer_jax.config_loader import load
  from zoomer_jax.video.preprocess import patchify, resize, smart_resize

  t0 = time.perf_counter()
  if args.checkpoint:
    model = zoomer_jax.load_hf(args.checkpoint, dtype=args.dtype)
    source = args.checkpoint
  else:
    cfg = load(args.config, args.override)
    model = zoomer_jax.Qwen25VL(zoomer_jax.ModelConfig.from_config_dict(cfg.model.to_dict()),
                                dtype=args.dtype, rngs=nnx.Rngs(cfg.get("seed", 0)))
    source = f"{args.config} (random weights)"
  load_s = time.perf_counter() - t0
  mc = model.config

  frames = synthetic_clip(args.frames)
  h, w = smart_resize(*frames.shape[1:3], min_pixels=128 * 28 * 28 // 4, max_pixels=128 * 28 * 28)
  pixels, grid = patchify(resize(frames, h, w))
  n_video = int(np.prod(grid)) // mc.vision.spatial_merge_size**2
  rng = np.random.default_rng(0)
  text = lambda n: list(rng.integers(3, min(mc.text.vocab_size, 500), n))
  ids = text(8) + [mc.vision_start_token_id] + [mc.video_token_id] * n_video + [mc.vision_end_token_id] + text(12)
  ids = np.array([ids])

  timings = []
  for _ in range(2):  # the first call compiles
    t0 = time.perf_counter()
    logits = model(ids, pixel_values_videos=pixels, video_grid_thw=grid[None], second_per_grid_ts=[1.0])
    logits.block_until_ready()
    timings.append(time.perf_counter() - t0)
  top = np.asarray(logits[0, -1]).argsort()[-5:][::-1].tolist()
  report = dict(model=source, dtype=args.dtype, devices=len(jax.devices()), frames=args.frames,
                frame_size=[h, w], video_grid_thw=grid.tolist(), video_tokens=n_video, sequence_length=ids.shape[1],
                logits_shape=list(logits.shape), logits_finite=bool(np.isfinite(np.asarray(logits)).all()),
                next_token_top5=top, load_s=round(load_s, 3), compile_and_run_s=round(timings[0], 3),
                run_s=round(timings[1], 3))
  for k, v in report.items():
    print(f"{k:>20}: {v}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "forward.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m zoomer_jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  fw = sub.add_parser("forward", help="one forward pass on a generated clip")
  fw.add_argument("--checkpoint", help="HF Qwen2.5-VL directory (default: the built-in tiny random model)")
  fw.add_argument("--config", default="qwen25vl_tiny", help="model config when no checkpoint is given")
  fw.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. model.text.num_hidden_layers=4 (repeatable)")
  fw.add_argument("--frames", type=int, default=16)
  fw.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  fw.add_argument("--out", default="out", help="directory for forward.json ('' to skip)")
  args = parser.parse_args(argv)
  try:
    if args.command == "forward":
      forward(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
