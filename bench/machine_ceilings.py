"""The machine's ceilings, measured in the benchmark's own run: matmul TFLOP/s and memory bandwidth.

Benchmarks relate what they achieve to these: a prefill forward is matmul-bound (achieved FLOP/s over the
matmul ceiling of its dtype), a decode step is bound by streaming the weights (achieved GB/s over the
memory-bandwidth ceiling). Each figure is the best of `repeats` timed calls, for both JAX (XLA:CPU) and torch;
the ceiling is the higher of the two, since either library's kernel shows what the machine can do.

  PYTHONPATH=. python bench/machine_ceilings.py
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _best_s(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def matmul_tflops(n: int = 2048, repeats: int = 5) -> dict:
  """n x n x n matmul TFLOP/s: fp32 (full fp32 precision) and bf16 inputs with fp32 accumulation."""
  import torch  # noqa: PLC0415 (the benchmarks use torch anyway; keep the module importable without)
  rng = np.random.default_rng(0)
  a32, b32 = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))
  a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
  f32 = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
  bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  flops = 2 * n**3
  out = {"jax_fp32": flops / _best_s(lambda: f32(a32, b32).block_until_ready(), repeats) / 1e12,
         "jax_bf16_fp32acc": flops / _best_s(lambda: bf16(a16, b16).block_until_ready(), repeats) / 1e12}
  t32 = torch.from_numpy(np.array(a32)), torch.from_numpy(np.array(b32))
  t16 = tuple(t.to(torch.bfloat16) for t in t32)
  with torch.inference_mode():  # torch's CPU bf16 GEMM accumulates in fp32 (oneDNN / mkldnn kernels)
    out["torch_fp32"] = flops / _best_s(lambda: torch.mm(*t32), repeats) / 1e12
    out["torch_bf16_fp32acc"] = flops / _best_s(lambda: torch.mm(*t16), repeats) / 1e12
  out["fp32"] = max(out["jax_fp32"], out["torch_fp32"])
  out["bf16_fp32acc"] = max(out["jax_bf16_fp32acc"], out["torch_bf16_fp32acc"])
  return out


def memory_gbps(mib: int = 1024, repeats: int = 5) -> dict:
  """Read bandwidth (GB/s): a sum over a `mib` MiB fp32 array, far larger than the caches."""
  import torch  # noqa: PLC0415
  n = mib * 2**20 // 4
  x = jnp.ones((n,), jnp.float32)
  total = jax.jit(lambda v: jnp.sum(v))
  out = {"jax_read": n * 4 / _best_s(lambda: total(x).block_until_ready(), repeats) / 1e9}
  t = torch.ones(n, dtype=torch.float32)
  with torch.inference_mode():
    out["torch_read"] = n * 4 / _best_s(lambda: t.sum(), repeats) / 1e9
  del x, t
  out["read"] = max(out["jax_read"], out["torch_read"])
  return out


def measure(repeats: int = 5) -> dict:
  """{'matmul_tflops': {...}, 'memory_gbps': {...}} measured now."""
  return {"matmul_tflops": matmul_tflops(repeats=repeats), "memory_gbps": memory_gbps(repeats=repeats)}


def describe(ceil: dict) -> str:
  m, b = ceil["matmul_tflops"], ceil["memory_gbps"]
  return (f"machine ceilings (best of jax/torch, measured in this run): matmul fp32 {m['fp32']:.3f} TFLOP/s "
          f"(jax {m['jax_fp32']:.3f}, torch {m['torch_fp32']:.3f}), bf16 with fp32 accumulation "
          f"{m['bf16_fp32acc']:.3f} TFLOP/s (jax {m['jax_bf16_fp32acc']:.3f}, torch {m['torch_bf16_fp32acc']:.3f}); "
          f"memory read {b['read']:.1f} GB/s (jax {b['jax_read']:.1f}, torch {b['torch_read']:.1f})")


if __name__ == "__main__":
  import torch
  import os
  torch.set_num_threads(os.cpu_count() or 1)
  c = measure()
  print(describe(c))
  print("BENCH_JSON " + json.dumps(c))
