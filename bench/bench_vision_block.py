"""XLA's TPU estimate of one trainable vision block at a GRPO config's shapes: its attention through the splash
kernel (`attention.segment_splash`, the model's path with `impl.attention="flash"` on TPU) against the windows
and frames packed into padded segments and attended densely (the baseline, the CPU path), in the same run.
Compiled for the config's topology on this host (no TPU needed).

    PYTHONPATH=. python bench/bench_vision_block.py                      # grpo_7b_v6e64, v6e:8x8
    PYTHONPATH=. python bench/bench_vision_block.py --config grpo_7b_v5p64

The tower alone (its output's squared sum, differentiated in every weight) is compiled at one windowed block,
two windowed blocks, and one windowed plus one full-attention block, loops unrolled, with the config's remat
policy, micro-batch and worst-case frames; the differences are one block of each kind: XLA's FLOPs, bytes and
time, plus the splash kernels' time (their FLOPs at XLA's rate for one attention tile, as the compile report
times them). Prints both variants, the time ratio and a BENCH_JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from zoomer_jax.aot import programs as P
from zoomer_jax.aot import report as R
from zoomer_jax.aot.target import topology_for, tpu_target
from zoomer_jax.config_loader import load
from zoomer_jax.model import vision
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.stack import unrolled_loops
from zoomer_jax.parallel.rules import vision_pieces


def block_costs(cfg, mesh, rate_of) -> dict[str, R.Cost]:
  full = ModelConfig.from_config_dict(cfg.model.to_dict())
  r, a = cfg.rollout, cfg.actor
  grid = P.frame_grid(*P.WORST_FRAME, r.max_pixels, r.min_pixels)
  costs = {}
  for depths in ((1, 1, 0), (1, 2, 0), (1, 1, 1)):
    with unrolled_loops():
      mc = P.reduced(full, *depths)
      ab = P.abstract_job(cfg, mesh, mc)
      batch = P.train_batch(mc, mesh, rows=a.ppo_micro_batch_size, length=a.token_bucket,
                            images=r.max_total_frames, grid=grid, image_bucket=a.image_bucket,
                            pieces=vision_pieces(mesh, ab.rules))

      def loss(params, images):
        model = nnx.merge(ab.graphdef, params, ab.rest)
        out = model.visual(images.pixels, images.layout, remat_policy=a.remat)
        return jnp.sum(out.astype(jnp.float32) ** 2)

      with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss)).lower(ab.params, batch.images).compile(
            compiler_options=R.PROBE_OPTIONS)
      costs[depths] = R._cost_of(compiled, rate_of=rate_of)
  return {"windowed": costs[1, 2, 0] - costs[1, 1, 0], "full": costs[1, 1, 1] - costs[1, 1, 0]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="grpo_7b_v6e64")
  args = ap.parse_args()
  cfg = load(args.config, [])
  cfg.impl.scan_layers = False
  cfg.impl.attention = "flash"
  target = tpu_target(topology_for(cfg.accelerator_type))
  mesh, _ = P.meshes(cfg, list(target.devices))
  v = ModelConfig.from_config_dict(cfg.model.to_dict()).vision
  rate_of = R.kernel_rates(cfg, mesh, target)
  model_fits = vision.segment_splash_fits
  out = {}
  for name, fits in (("packed", lambda *a, **k: False), ("splash", model_fits)):
    vision.segment_splash_fits = fits
    t0 = time.perf_counter()
    try:
      costs = block_costs(cfg, mesh, rate_of)
    finally:
      vision.segment_splash_fits = model_fits
    out[name] = {kind: dict(ms=(c.xla_s + c.kernel_s) * 1e3, xla_ms=c.xla_s * 1e3, kernel_ms=c.kernel_s * 1e3,
                            gb=c.bytes / 1e9, tflop=(c.flops + c.kernel_flops) / 1e12)
                 for kind, c in costs.items()}
    for kind, c in out[name].items():
      print(f"{name:6s} one {kind:8s} vision block (forward + backward): {c['ms']:.2f} ms (XLA {c['xla_ms']:.2f} + "
            f"kernels {c['kernel_ms']:.2f}), {c['gb']:.2f} GB, {c['tflop']:.3f} TFLOP per chip", flush=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
  depth = len(v.fullatt_block_indexes)
  tower = {name: (v.depth - depth) * o["windowed"]["ms"] + depth * o["full"]["ms"] for name, o in out.items()}
  ratio = tower["packed"] / tower["splash"]
  print(f"the tower's {v.depth} blocks: packed {tower['packed']:.1f} ms, splash {tower['splash']:.1f} ms: "
        f"{ratio:.3f}x faster by XLA's estimate")
  print("BENCH_JSON " + json.dumps(dict(bench="vision_block", config=args.config, topology=target.name,
                                        baseline="packed", results=out, tower_ms=tower, ratio=ratio)))


if __name__ == "__main__":
  main()
