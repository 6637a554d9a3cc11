"""Which collective XLA's TPU compiler gives an FSDP weight gradient: one matmul whose weight is split over every
chip (a 1-D mesh) and whose batch is split the same way, differentiated, the gradient kept in the weight's
layout. Compiled for TPU topologies on this host (no TPU needed).

    PYTHONPATH=. python bench/probe_fsdp_gradient.py --topology v6e:8x8 --topology v5p:2x2x1

A reduce-scatter would move (n - 1) / n of the gradient per chip; an all-reduce whose result is then sliced to
the chip's shard moves 2 (n - 1) / n (the report counts collectives by what the optimized HLO names them,
`aot/hlo.py`). The 7B programs' decoder weight gradients show the all-reduce form (docs/tpu.md); this tells
whether the program or the compiler chooses it: beside the autodiff gradient it compiles an explicit reduce-scatter
of the same gradient (`psum_scatter` under `shard_map`), which the compiler may keep, run as an all-reduce-scatter
fusion (both priced as a reduce-scatter) or turn into an all-reduce. Prints each topology's collectives and a
BENCH_JSON line.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomer_jax.aot.hlo import Hlo
from zoomer_jax.aot.target import tpu_target


def probe(topology: str, d: int, f: int, tokens: int, dtype) -> dict:
  target = tpu_target(topology)
  n = len(target.devices)
  mesh = Mesh(np.asarray(target.devices).reshape(n), ("fsdp",))
  w = jax.ShapeDtypeStruct((d, f), dtype, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None)))
  x = jax.ShapeDtypeStruct((n, tokens, d), dtype, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None, None)))

  def loss(w, x):
    return jnp.sum(jnp.einsum("btd,df->btf", x, w).astype(jnp.float32) ** 2)

  def explicit(w, x):
    def local(w, x):  # this chip's rows' whole-weight gradient, reduced and scattered by hand
      full = jax.lax.all_gather(w, "fsdp", axis=0, tiled=True)
      return jax.lax.psum_scatter(jax.grad(loss)(full, x), "fsdp", scatter_dimension=0, tiled=True)
    spec = PartitionSpec("fsdp")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(w, x)

  out = dict(topology=topology, chips=n)
  with jax.set_mesh(mesh):
    for name, f in (("collectives", jax.grad(loss)), ("explicit_collectives", explicit)):
      compiled = jax.jit(f, out_shardings=w.sharding).lower(w, x).compile()
      found = Hlo(compiled.as_text()).collectives(n, by_shape=True)
      out[name] = {k: dict(count=v["count"], moved=v["moved"]) for k, v in found.items()}
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", action="append", help="e.g. v6e:8x8 (repeatable; default v6e:8x8 and v5p:2x2x1)")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--shape", default="1024,4096,4096", help="weight rows, columns, tokens per chip")
  args = ap.parse_args()
  d, f, tokens = (int(x) for x in args.shape.split(","))
  out = []
  for topology in args.topology or ["v6e:8x8", "v5p:2x2x1"]:
    r = probe(topology, d, f, tokens, jnp.dtype(args.dtype))
    out.append(r)
    for key, what in (("collectives", "autodiff"), ("explicit_collectives", "psum_scatter under shard_map")):
      print(f"{topology} ({r['chips']} chips), gradient of a [{d}, {f}] {args.dtype} weight split over every chip, "
            f"{what}:")
      for name, c in r[key].items():
        print(f"  {name:<48} {c['count']:>3} x  {c['moved'] / 1e6:9.2f} MB moved per chip")
      kinds = {name.split()[0] for name in r[key]}
      print(f"  reduce-scatter emitted: {'yes' if 'reduce-scatter' in kinds else 'no'}")
  print("BENCH_JSON " + json.dumps(dict(bench="probe_fsdp_gradient", dtype=args.dtype, shape=[d, f, tokens],
                                        results=out)))


if __name__ == "__main__":
  main()
