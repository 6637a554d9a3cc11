"""XLA's TPU estimate of one trainable vision block at a GRPO config's shapes, its rotary's rotate_half as a signed
permutation product (the model's, `layers.rotate_half_by_matmul`) against the slicing form (the baseline), in the
same run. Compiled for the config's topology on this host (no TPU needed).

    PYTHONPATH=. python bench/bench_vision_block.py                      # grpo_7b_v6e64, v6e:8x8
    PYTHONPATH=. python bench/bench_vision_block.py --config grpo_7b_v5p64

The tower alone (its output's squared sum, differentiated in every weight) is compiled at one and two windowed
blocks, loops unrolled, with the config's remat policy, micro-batch and worst-case frames; the difference is one
block's FLOPs, bytes and time by XLA's cost analysis. Prints both variants, their time ratio and a BENCH_JSON
line.
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
from zoomer_jax.model.layers import rotate_half
from zoomer_jax.model.stack import unrolled_loops
from zoomer_jax.parallel.rules import vision_pieces


def sliced(x, precision=None):  # the baseline: rotate_half's halves and concatenation, in fp32
  del precision
  return rotate_half(x.astype(jnp.float32))


def block_cost(cfg, mesh) -> R.Cost:
  full = ModelConfig.from_config_dict(cfg.model.to_dict())
  r, a = cfg.rollout, cfg.actor
  grid = P.frame_grid(*P.WORST_FRAME, r.max_pixels, r.min_pixels)
  costs = []
  for depth in (1, 2):
    with unrolled_loops():
      mc = P.reduced(full, 1, depth, 0)
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
      costs.append(R._cost_of(compiled))
  return costs[1] - costs[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="grpo_7b_v6e64")
  args = ap.parse_args()
  cfg = load(args.config, [])
  cfg.impl.scan_layers = False
  target = tpu_target(topology_for(cfg.accelerator_type))
  mesh, _ = P.meshes(cfg, list(target.devices))
  model_rotation = vision.rotate_half_by_matmul
  out = {}
  for name, fn in (("sliced", sliced), ("matmul", model_rotation)):
    vision.rotate_half_by_matmul = fn
    t0 = time.perf_counter()
    try:
      c = block_cost(cfg, mesh)
    finally:
      vision.rotate_half_by_matmul = model_rotation
    out[name] = dict(ms=c.xla_s * 1e3, gb=c.bytes / 1e9, tflop=c.flops / 1e12)
    print(f"{name:7s} one windowed vision block (forward + backward): {out[name]['ms']:.2f} ms, "
          f"{out[name]['gb']:.2f} GB, {out[name]['tflop']:.3f} TFLOP per chip ({time.perf_counter() - t0:.0f} s)",
          flush=True)
  ratio = out["sliced"]["ms"] / out["matmul"]["ms"]
  print(f"matmul rotation vs sliced: {ratio:.3f}x faster by XLA's estimate")
  print("BENCH_JSON " + json.dumps(dict(bench="vision_block", config=args.config, topology=target.name,
                                        baseline="sliced", results=out, ratio=ratio)))


if __name__ == "__main__":
  main()
