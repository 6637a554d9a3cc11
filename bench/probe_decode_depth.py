"""XLA's cost of the engine's decode step (`engine/decode`) per decoder layer, at several probe depths, and the
optimized HLO's operand and result bytes split by memory space (HBM vs VMEM, `S(1)`), compiled for a TPU (no TPU
needed).

    PYTHONPATH=. python bench/probe_decode_depth.py --config=grpo_7b_v6e64 --depths 2,3,4,5 \
        [--config.rollout.batch_size=512]

The report's cost probes (`aot/report.probe_costs`) take the decoder's per-layer cost between 2 and 3 unrolled
layers; this prints every depth's bytes accessed and time (XLA's `optimal_seconds`, its ConcatBitcast calls'
-1 s given back) and each step's increment, so a depth pair that is no step of the line shows. The memory-space
split counts each top-level instruction's operands and results once (async copy / slice starts: source and
destination), leaving out the pool's in-place updates and the kernel: a rough split, not XLA's own accounting.
Prints a table and a BENCH_JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from zoomer_jax.aot import programs as P
from zoomer_jax.aot.hlo import Hlo, shape_bytes
from zoomer_jax.aot.report import PROBE_OPTIONS
from zoomer_jax.aot.target import topology_for, tpu_target
from zoomer_jax.config_loader import load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.stack import unrolled_loops

_SKIP = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast", "copy-done", "slice-done")
_ARRAY = re.compile(r"([a-z0-9]+\[[0-9,]*\])(\{[^}]*\})?")


def memory_split(text: str) -> tuple[float, float]:
  """(HBM bytes, VMEM bytes) of the ENTRY computation's instructions' operands and results (module docstring)."""
  hlo = Hlo(text)
  types = {i.name: i.type for comp in hlo.comps.values() for i in comp}
  hbm = vmem = 0.0
  for ins in hlo.comps[hlo.entry]:
    if ins.op in _SKIP or ins.name.startswith(("ragged_paged_attention", "scatter_fusion")):
      continue
    if ins.name == "gather_fusion" or "tpu_custom_call" in ins.rest:
      continue
    out = ins.type
    if ins.op in ("copy-start", "slice-start"):  # (destination, source, context): the source is an operand
      first = _ARRAY.search(ins.type)
      out = first.group(0) if first else ""
    operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])
    for text_ in [types.get(o, "") for o in operands] + [out]:
      for m in _ARRAY.finditer(text_):
        b = sum(shape_bytes(m.group(1)))
        if m.group(2) and "S(1)" in m.group(2):
          vmem += b
        else:
          hbm += b
  return hbm, vmem


def probe(cfg, layers: int) -> dict:
  """Compiles `engine/decode` at `layers` unrolled decoder layers (one vision block, unused by the step)."""
  target = tpu_target(topology_for(cfg.accelerator_type))
  mesh, rmesh = P.meshes(cfg, list(target.devices))
  full = ModelConfig.from_config_dict(cfg.model.to_dict())
  pc = cfg.copy_and_resolve_references()
  pc.impl.scan_layers = False
  with unrolled_loops():
    progs = P.job_programs(pc, mesh, model_cfg=P.reduced(full, layers, 1, 0), token_chunk=None, rollout_mesh=rmesh)
    prog = next(p for p in progs if p.name == "engine/decode")
    compiled = prog.lower().compile(compiler_options=PROBE_OPTIONS)
  ca = compiled.cost_analysis()
  text = compiled.as_text()
  hbm, vmem = memory_split(text)
  seconds = float(ca["optimal_seconds"]) + Hlo(text).custom_calls("ConcatBitcast")
  return dict(layers=layers, bytes=float(ca["bytes accessed"]), seconds=seconds, hbm=hbm, vmem=vmem)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--depths", default="2,3,4,5", help="comma-separated decoder depths")
  args, overrides = ap.parse_known_args(argv)
  cfg = load(args.config, overrides)
  rows = [probe(cfg, int(d)) for d in args.depths.split(",")]
  print(f"{'layers':>6} {'XLA GB':>8} {'XLA ms':>8} {'+GB':>7} {'+ms':>7} {'HBM GB':>8} {'VMEM GB':>8} "
        f"{'+HBM':>7} {'+VMEM':>7}")
  prev = None
  for r in rows:
    d = (lambda k: (r[k] - prev[k]) / (r["layers"] - prev["layers"])) if prev else (lambda k: float("nan"))
    print(f"{r['layers']:>6} {r['bytes'] / 1e9:8.3f} {r['seconds'] * 1e3:8.3f} {d('bytes') / 1e9:7.3f} "
          f"{d('seconds') * 1e3:7.3f} {r['hbm'] / 1e9:8.3f} {r['vmem'] / 1e9:8.3f} {d('hbm') / 1e9:7.3f} "
          f"{d('vmem') / 1e9:7.3f}")
    prev = r
  print("BENCH_JSON " + json.dumps(dict(bench="probe_decode_depth", config=args.config, overrides=overrides,
                                        rows=rows)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
