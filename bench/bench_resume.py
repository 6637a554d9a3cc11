"""Resuming after a zoom call: `extend` (the new tokens only) vs prefilling the whole context again.

A prompt of overview frames is prefilled, some tokens are decoded, then a tool observation (text and new
frames) arrives. Resuming appends it to the existing cache with `zoomer_jax.sampling.extend`; the baseline
prefills prompt + generated + observation into a fresh cache of the same size. Both return the logits of
the last token; both are compiled before timing, and calls are interleaved. The issue's target:
resume time <= 1.1 x (new tokens / all tokens) x re-prefill time.

  PYTHONPATH=. python bench/bench_resume.py --config bench-small --repeats 3
  PYTHONPATH=. python bench/bench_resume.py --config tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, REPO)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from bench_forward import bench_config  # noqa: E402
from zoomer_jax.model.config import ModelConfig  # noqa: E402
from zoomer_jax.model.qwen25vl import Qwen25VL  # noqa: E402
from zoomer_jax.sampling import SamplingParams, StopCriteria, decode, extend, prefill  # noqa: E402


def _segment(rng, ids, frames, grid, text):
  n = int(np.prod(grid)) // 4
  row = []
  for _ in range(frames):
    row += list(rng.integers(3, ids["text_max"], text)) + [ids["vstart"]] + [ids["image"]] * n + [ids["vend"]]
  row += list(rng.integers(3, ids["text_max"], text))
  grids = np.tile(np.asarray(grid, np.int64), (frames, 1))
  pixels = rng.standard_normal((int(grids.prod(-1).sum()), 1176)).astype(np.float32)
  return np.asarray(row, np.int32), pixels, grids


def _time(fn, repeats):
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="bench-small", choices=["tiny", "bench-small"])
  p.add_argument("--prompt-frames", type=int, default=24)
  p.add_argument("--zoom-frames", type=int, default=8)
  p.add_argument("--grid", default="1,16,16", help="t,h,w patches per frame (1,16,16 = 224x224)")
  p.add_argument("--generated", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = p.parse_args(argv)

  hf_cfg, ids = bench_config(args.config)
  cfg = ModelConfig.from_hf_dict(hf_cfg)
  model = Qwen25VL(cfg, dtype=args.dtype, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  grid = tuple(int(x) for x in args.grid.split(","))
  prompt, p_pix, p_grid = _segment(rng, ids, args.prompt_frames, grid, 12)
  chunk, c_pix, c_grid = _segment(rng, ids, args.zoom_frames, grid, 10)
  total = len(prompt) + args.generated + len(chunk)
  size = int(-(-total // 256) * 256)

  # The rollout state just before the resume: prompt prefilled, `generated` tokens decoded.
  logits, cache, pos = prefill(model, prompt[None], cache_size=size, pixel_values=p_pix, image_grid_thw=p_grid)
  out = decode(model, cache, logits, pos, np.ones(1, bool), jax.random.key(0), StopCriteria.build(),
               SamplingParams(temperature=0.0, max_new_tokens=args.generated))
  generated = np.asarray(out.tokens[0])
  full = np.concatenate([prompt, generated, chunk])[None]
  all_pix, all_grid = np.concatenate([p_pix, c_pix]), np.concatenate([p_grid, c_grid])

  resume = lambda: extend(model, out.cache, chunk[None], np.ones((1, len(chunk)), np.int32), out.next_position,
                          out.last_logits, pixel_values=c_pix, image_grid_thw=c_grid)[0]
  reprefill = lambda: prefill(model, full, cache_size=size, pixel_values=all_pix, image_grid_thw=all_grid)[0]
  a, b = np.asarray(resume()), np.asarray(reprefill())  # compile both; they must agree
  diff = float(np.abs(a - b).max())
  t_resume, t_full = [], []
  for _ in range(args.repeats):
    t_resume += _time(resume, 1)
    t_full += _time(reprefill, 1)
  r, f = statistics.median(t_resume), statistics.median(t_full)
  fraction = len(chunk) / total
  result = dict(config=args.config, dtype=args.dtype, all_tokens=total, new_tokens=len(chunk), cache_size=size,
                resume_s=round(r, 4), reprefill_s=round(f, 4), resume_over_reprefill=round(r / f, 4),
                new_over_all=round(fraction, 4), target=round(1.1 * fraction, 4), meets_target=r <= 1.1 * fraction * f,
                max_abs_logit_diff=diff, devices=jax.device_count())
  print(f"{args.config} {args.dtype}: {total} tokens, {len(chunk)} new (fraction {fraction:.3f}), cache {size}")
  print(f"  resume (extend)   {r:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in t_resume)})")
  print(f"  re-prefill        {f:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in t_full)})")
  print(f"  resume / re-prefill = {r / f:.3f}; target <= 1.1 x {fraction:.3f} = {1.1 * fraction:.3f}: "
        f"{'met' if result['meets_target'] else 'NOT met'}; last-token logits agree to {diff:.2e}")
  print("BENCH_JSON " + json.dumps(result))
  return result


if __name__ == "__main__":
  main()
