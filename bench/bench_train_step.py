"""Measured training steps on one accelerator: the SFT step and the GRPO update step of a job config, with random
weights, timed as the job runs them (`train.trainer.Engine`: gradient micro-step, then the optimizer step), and the
measured MFU beside what the cost account (`zoomer_jax.cost`) expects for the same shapes on that chip.

  PYTHONPATH=. python bench/bench_train_step.py --model qwen25vl_3b --tokens 8192 --images 32 --attention cudnn
  PYTHONPATH=. python bench/bench_train_step.py --model qwen25vl_tiny --tokens 512 --images 4 --steps 2   # CPU smoke

Baseline: the account's expectation (its matmul efficiency x model / hardware FLOPs of this step: remat recompute,
frozen or trained vision tower). MFU = model FLOPs (causal attention pairs, no recompute) / (time x the chip's peak
dense bf16 FLOP/s, `zoomer_jax.cost.chips`). Ends with a `BENCH_JSON {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from zoomer_jax.aot.programs import train_flops  # noqa: E402
from zoomer_jax.config_loader import apply_overrides, load  # noqa: E402
from zoomer_jax.cost.account import Efficiency, Trainer, _update_flops  # noqa: E402
from zoomer_jax.cost.chips import CHIPS  # noqa: E402
from zoomer_jax.cost.workload import TrajectoryCounts, frame_grid, job_from_config  # noqa: E402
from zoomer_jax.model.config import ModelConfig  # noqa: E402
from zoomer_jax.train.batch import Example, make_batch  # noqa: E402


def chip_of(device) -> str | None:
  kind = device.device_kind.lower()
  for name in ("h200", "h100", "v6", "v5p", "v5", "v4"):
    if name in kind:
      return {"v6": "v6e", "v5": "v5e"}.get(name, name)
  return None


def job_config(job: str, args):
  """The job config at one device's size: the model of `args.model`, one-device mesh, `rows` x `tokens`."""
  cfg = load("sft_7b" if job == "sft" else "grpo_7b")
  model = load(args.model)
  cfg.model, cfg.impl = model.model, model.impl
  overrides = [f"impl.attention={args.attention}", "impl.scan_layers=True", "mesh.ici=(1,1,1)",
               f"init.dtype={args.dtype}", f"workdir={tempfile.mkdtemp(prefix='bench_train_step_')}"]
  if job == "sft":
    overrides += [f"data.batch_size={args.rows}", f"data.micro_batch_size={args.rows}",
                  f"data.cutoff_len={args.tokens}", f"train.remat={args.remat}"]
  else:
    overrides += [f"actor.ppo_micro_batch_size={args.rows}", f"actor.max_token_len={args.tokens}",
                  f"actor.remat={args.remat}", "rollout.mesh.ici=()"]
  apply_overrides(cfg, overrides + list(args.set))
  return cfg


def example(mc: ModelConfig, tokens: int, images: int, grid, rng: np.random.Generator, grpo: bool) -> Example:
  """A row of `tokens` ids holding `images` image pad runs of `grid` (random pixels), the rest random text."""
  per_image = int(np.prod(grid)) // mc.vision.spatial_merge_size**2
  text_vocab = min(mc.text.vocab_size, mc.image_token_id) - 1
  ids = []
  for _ in range(images):
    ids += [int(rng.integers(text_vocab)), mc.vision_start_token_id] + [mc.image_token_id] * per_image + [
        mc.vision_end_token_id]
  if len(ids) > tokens:
    raise ValueError(f"{images} images of {per_image} tokens do not fit {tokens} tokens")
  ids += rng.integers(text_vocab, size=tokens - len(ids)).tolist()
  ids = np.asarray(ids, np.int32)
  loss_mask = (ids != mc.image_token_id).astype(np.float32)
  pixels = rng.standard_normal((images * int(np.prod(grid)), mc.vision.patch_dim)).astype(np.float32)
  kw = {}
  if grpo:
    logp = np.log(rng.uniform(0.05, 1.0, tokens)).astype(np.float32)
    kw = dict(token_values={"sampler_logp": logp, "old_logp": logp, "ref_logp": logp},
              seq_values={"advantage": float(rng.standard_normal())})
  return Example(ids=ids, loss_mask=loss_mask, pixel_values=pixels, image_grid_thw=np.asarray([grid] * images),
                 **kw)


def measure(job: str, args) -> dict:
  from zoomer_jax.train.grpo import grpo_loss_fns  # noqa: PLC0415
  from zoomer_jax.train.sft import sft_loss_fn  # noqa: PLC0415
  from zoomer_jax.train.trainer import Engine  # noqa: PLC0415
  cfg = job_config(job, args)
  if job == "sft":
    loss, optim, freeze = sft_loss_fn(cfg), cfg.optim, cfg.train.freeze_vision_tower
  else:
    loss, optim, freeze = grpo_loss_fns(cfg)[0], cfg.actor.optim, cfg.actor.freeze_vision_tower
  t0 = time.perf_counter()
  engine = Engine(cfg, loss, total_steps=100, optim=optim, freeze_vision=freeze, save_freq=0, max_to_keep=1)
  build_s = time.perf_counter() - t0
  mc = engine.model_config
  data = cfg.data if job == "sft" else cfg.rollout
  grid = frame_grid(*args.frame, data.max_pixels, data.min_pixels)
  rng = np.random.default_rng(0)
  rows = [example(mc, args.tokens, args.images, grid, rng, job == "grpo") for _ in range(args.rows)]
  batch = engine.put(make_batch(mc, rows, rows=args.rows, pad_id=0))

  def step():
    engine.accumulate(batch)
    return engine.apply()

  t0 = time.perf_counter()
  stats = step()  # compiles the gradient and optimizer programs
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    stats = step()
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  device = jax.devices()[0]
  chip = chip_of(device)
  freeze_vision = bool(freeze)
  model_flops = train_flops(mc, args.rows, args.tokens, args.images, grid, backward=True,
                            freeze_vision=freeze_vision)
  out = dict(job=job, model=args.model, device=device.device_kind, chip=chip, rows=args.rows, tokens=args.tokens,
             images=args.images, grid=list(grid), attention=args.attention, remat=args.remat, dtype=args.dtype,
             build_s=build_s, compile_s=compile_s, step_s=t, steps_s=times, model_flops=model_flops,
             loss=float(stats["loss"]), grad_norm=float(stats["grad_norm"]))
  if chip:
    peak = CHIPS[chip].bf16_flops
    acc_cfg = job_config(job, args)
    acc_cfg.accelerator_type = f"{chip}-1"
    acc_job = job_from_config(acc_cfg)
    per_image = int(np.prod(grid)) // mc.vision.spatial_merge_size**2
    tc = TrajectoryCounts(grid=tuple(grid), tokens_per_image=per_image, prompt_tokens=args.tokens,
                          observation_tokens=0, zoom_calls=0, gen_tokens_per_turn=0, overview_frames=args.images,
                          frames_per_call=0, total_tokens=args.tokens)
    m, hw = _update_flops(acc_job, Trainer(padding=1.0), tc)
    expected_s = args.rows * sum(hw.values()) / (peak * Efficiency().matmul)
    out.update(peak_flops=peak, mfu=model_flops / (t * peak), account_step_s=expected_s,
               account_mfu=model_flops / (expected_s * peak), measured_over_account=expected_s / t)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="qwen25vl_3b", help="model config (configs/qwen25vl_*.py)")
  ap.add_argument("--jobs", default="sft,grpo")
  ap.add_argument("--rows", type=int, default=1)
  ap.add_argument("--tokens", type=int, default=8192)
  ap.add_argument("--images", type=int, default=32)
  ap.add_argument("--frame", type=int, nargs=2, default=(480, 640), help="source frame size (pixel budget applies)")
  ap.add_argument("--attention", default="cudnn", choices=("dot_product", "flash", "cudnn"))
  ap.add_argument("--remat", default="full")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job config override")
  args = ap.parse_args(argv)
  results = []
  for job in args.jobs.split(","):
    r = measure(job, args)
    results.append(r)
    line = (f"{job}: {r['rows']} x {r['tokens']} tokens, {r['images']} images {tuple(r['grid'])}, {r['model']} on "
            f"{r['device']}: step {r['step_s']:.3f} s (median of {len(r['steps_s'])}; compile {r['compile_s']:.0f} s)")
    if "mfu" in r:
      line += (f", MFU {r['mfu']:.1%} measured vs {r['account_mfu']:.1%} expected by the account "
               f"(step {r['account_step_s']:.3f} s; measured / expected time {1 / r['measured_over_account']:.2f})")
    print(line, flush=True)
  print("BENCH_JSON " + json.dumps(dict(bench="train_step", results=results), default=float))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
