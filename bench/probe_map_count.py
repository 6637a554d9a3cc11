"""Memory mappings an XLA:CPU-compiled program holds until JAX's caches release it (why tests/conftest.py clears
them after each test module: the kernel caps a process at vm.max_map_count mappings, and XLA's compiler crashes
past it). Linux only (reads /proc/self/maps).

  PYTHONPATH=. python bench/probe_map_count.py [--programs 300]
"""

import argparse
import gc
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def maps() -> int:
  with open("/proc/self/maps") as f:
    return sum(1 for _ in f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--programs", type=int, default=300)
  n = ap.parse_args().programs
  start = maps()
  fns = []
  for i in range(n):  # distinct programs: each jit compiles its own
    f = jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x @ x.T).sum())
    f(jnp.ones((8 + i % 7, 8))).block_until_ready()
    fns.append(f)
  held = maps()
  del fns
  jax.clear_caches()
  gc.collect()
  after = maps()
  with open("/proc/sys/vm/max_map_count") as f:
    cap = int(f.read())
  per = (held - start) / n
  print(f"{n} programs: {start} -> {held} mappings ({per:.1f} each); after jax.clear_caches(): {after}; "
        f"vm.max_map_count {cap} (~{int((cap - start) / per)} programs held at once)")
  print("BENCH_JSON " + json.dumps(dict(bench="map_count", programs=n, start=start, held=held, after_clear=after,
                                        per_program=round(per, 2), max_map_count=cap)))


if __name__ == "__main__":
  main()
