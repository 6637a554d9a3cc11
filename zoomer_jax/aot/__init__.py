"""Ahead-of-time compilation of a job's programs for a TPU topology, on a machine without TPUs.

    python -m zoomer_jax compile --config=grpo_7b_v5p64                 # topology from cfg.accelerator_type
    python -m zoomer_jax compile --config=sft_7b --topology v6e:8x8 --config.mesh.ici='(1,16,4)'

Every program the job runs is lowered and compiled with XLA's TPU compiler (libtpu, the `[tpu]` extra) at the
config's shapes; the report gives each program's per-chip memory against HBM, FLOPs, bytes, time and collectives
(`report`, docs/tpu.md), the step's time and MFU, and a `BENCH_JSON {...}` line.
"""

from __future__ import annotations

import json

from zoomer_jax.aot.report import GiB, compile_job
from zoomer_jax.aot.target import topology_for, tpu_target

__all__ = ["compile_job", "run", "summary"]


ROLLOUT_PREFIXES = {"lockstep": "rollout/", "continuous": "engine/"}  # each engine's programs


def summary(rep: dict) -> dict:
  """Step totals: the step time (programs x how often a step runs them), MFU over the training programs and the
  whole step (model FLOPs / (chips x peak bf16 x time)), the collectives' share of the time. The whole step with
  either rollout engine ("lockstep": the dense-cache programs, "continuous": the paged engine's, both after the
  weights' reshard); "step" is the one the config runs (`rollout.engine`)."""
  target, results = rep["target"], rep["results"]
  peak = target.chip.bf16_flops * target.chips
  train = [r for r in results if not r.name.startswith(tuple(ROLLOUT_PREFIXES.values()))]
  groups = {"train": train}
  if len(train) < len(results):
    reshard = [r for r in results if r.name == "rollout/reshard"]
    for engine, prefix in ROLLOUT_PREFIXES.items():
      groups[engine] = train + [r for r in results if r.name.startswith(prefix) and r.name != "rollout/reshard"]
      groups[engine] += reshard
    groups["step"] = groups[rep["config"].rollout.engine]
  else:
    groups["step"] = results
  out = {}
  for name, rs in groups.items():
    time_s = sum(r.estimated_s * r.per_step for r in rs)
    coll_s = sum(r.collective_s * r.per_step for r in rs)
    flops = sum(r.model_flops * r.per_step * target.chips for r in rs)
    out[name] = dict(time_s=time_s, collective_s=coll_s, model_flops=flops,
                     mfu=flops / (peak * time_s) if time_s > 0 else 0.0,
                     collective_share=coll_s / time_s if time_s > 0 else 0.0,
                     missing=[r.name for r in rs if r.cost is None])  # no estimate: the figures leave them out
  return out


def decode_bandwidth(rep: dict, name: str = "engine/decode") -> dict | None:
  """The decode step's use of HBM bandwidth, per chip: the bytes it must move (the weights it reads, the keys
  and values its kernel reads at the mean and at the longest context) over (its time x the chip's HBM
  bandwidth). Its time is XLA's estimate (cost probes) plus the kernel's KV bytes at that bandwidth (XLA prices
  the kernel at nothing); `with_collectives` adds its collectives. "xla_bytes": XLA's own bytes accessed (plus
  the kernel's) in place of the minimum. A burst (`engine/burst`) is taken per iteration: its figures over its K
  steps."""
  r = next((r for r in rep["results"] if r.name == name), None)
  if r is None or r.cost is None or not r.traffic:
    return None
  bw, tr, k = rep["target"].chip.hbm_bw, r.traffic, max(1, r.loop_steps)
  xla_s, xla_bytes, coll_s = r.cost.xla_s / k, r.cost.bytes / k, r.collective_s / k
  out = dict(name=name, weights=tr["weights"], xla_bytes=xla_bytes, xla_s=xla_s, collective_s=coll_s,
             sequences=tr["sequences"], hbm_bw=bw, steps_per_call=k)
  for at in ("mean", "max"):
    kv = tr[f"kv_{at}"]
    t = xla_s + kv / bw
    out[at] = dict(context=tr[f"{at}_context"], kv=kv, min_bytes=tr["weights"] + kv, time_s=t,
                   fraction=(tr["weights"] + kv) / (t * bw), xla_bytes_fraction=(xla_bytes + kv) / (t * bw),
                   with_collectives=(tr["weights"] + kv) / ((t + coll_s) * bw),
                   tokens_per_s=tr["sequences"] / (t + coll_s))  # one engine's
  return out


def decode_table(d: dict) -> str:
  gb = lambda x: f"{x / 1e9:.2f} GB"
  per = f", per step of {d['steps_per_call']}" if d["steps_per_call"] > 1 else ""
  out = [f"\n{d['name']}: HBM bandwidth, per chip{per} ({d['sequences']} sequences; weights read {gb(d['weights'])}; "
         f"XLA: {gb(d['xla_bytes'])} accessed, {d['xla_s'] * 1e3:.2f} ms; the kernel's KV bytes at "
         f"{d['hbm_bw'] / 1e9:.0f} GB/s; collectives {d['collective_s'] * 1e3:.2f} ms):"]
  for at in ("mean", "max"):
    e = d[at]
    out.append(f"  {at:4s} context {e['context']:6d}: KV {gb(e['kv'])}, minimum {gb(e['min_bytes'])} in "
               f"{e['time_s'] * 1e3:.2f} ms -> {e['fraction']:.1%} of HBM bandwidth ({e['with_collectives']:.1%} with "
               f"collectives; XLA's bytes accessed {e['xla_bytes_fraction']:.1%})")
  return "\n".join(out)


def _gib(x: float) -> str:
  return f"{x / GiB:.2f}"


def table(rep: dict) -> str:
  hbm, headroom = rep["hbm"], rep["headroom"]
  rows = [["program", "x/step", "arg", "out", "alias", "temp", "resident", "total GiB", f"of {_gib(hbm)}", "fits",
           "TFLOP", "GB acc", "xla ms", "kern ms", "coll ms", "est ms", "compile s"]]
  for r in rep["results"]:
    m = r.memory
    c = r.cost
    rows.append([
        r.name, f"{r.per_step:g}", *(_gib(m[k]) if m else "-" for k in ("argument", "output", "alias", "temp")),
        _gib(r.resident), _gib(r.required), f"{r.required / hbm:.0%}", "yes" if r.fits else "NO",
        f"{c.flops / 1e12:.2f}" if c else "-", f"{c.bytes / 1e9:.1f}" if c else "-",
        f"{c.xla_s * 1e3:.1f}" if c else "-", f"{r.kernel_s * 1e3:.1f}", f"{r.collective_s * 1e3:.1f}",
        f"{r.estimated_s * 1e3:.1f}", f"{r.compile_s:.0f}"])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
  line = "-" * len(fmt(rows[0]))
  out = [line, fmt(rows[0]), line] + [fmt(r) for r in rows[1:]] + [line]
  out.append(f"per chip; total = argument + output - alias + temp + resident (the optimizer state and reference "
             f"weights the job keeps live beside the program); fits = total <= {1 - headroom:.0%} of HBM; "
             "FLOPs, bytes and xla ms are XLA's cost analysis "
             "of depth probes extrapolated to the model (loops counted by trip count); kern = Pallas kernels at "
             "XLA's rate for their block matmuls; coll = collective bytes moved / ICI receive bandwidth")
  out.append("\ncollectives per program call (count, GB moved per chip):")
  for r in rep["results"]:
    if r.collectives:
      parts = [f"{k} {v['count']} x, {v['moved'] / 1e9:.2f} GB" for k, v in r.collectives.items()]
      out.append(f"  {r.name}: " + "; ".join(parts))
  return "\n".join(out)


def collective_ops_table(rep: dict, n: int) -> str:
  """Each program's `n` largest collectives by kind, group size and shape (loops counted by trip count)."""
  out = ["\nlargest collectives per program call (GB moved per chip, count, kind, group size g, shapes):"]
  for r in rep["results"]:
    if r.collective_ops:
      out.append(f"  {r.name}:")
      top = sorted(r.collective_ops.items(), key=lambda kv: -kv[1]["moved"])[:n]
      out += [f"    {v['moved'] / 1e9:8.2f} GB  {v['count']:6d} x  {k}" for k, v in top]
  return "\n".join(out)


def check_table(chk: dict) -> str:
  out = ["\nthe account (zoomer_jax.cost) beside XLA, per chip:"]
  for name, acc, xla, ratio in chk["flops"]:
    out.append(f"  {name:16s} FLOPs  account {acc / 1e12:9.2f} T   XLA {xla / 1e12:9.2f} T   "
               f"XLA / account {ratio:5.2f}")
  for phase, acc, xla, ratio in chk["memory"]:
    out.append(f"  {phase:16s} memory account {acc / GiB:8.2f} GiB XLA {xla / GiB:8.2f} GiB XLA / account {ratio:5.2f}")
  if "estimate" in chk:
    e = chk["estimate"]
    out.append(f"  the account's own estimate of the whole step: {e['step_s']:.1f} s, MFU {e['mfu']:.1%}")
  return "\n".join(out)


def bench_json(rep: dict, summ: dict) -> str:
  entries = [dict(name=r.name, fits=r.fits, bytes_per_chip=r.required, hbm_bytes=rep["hbm"],
                  flops=r.cost.flops if r.cost else None, bytes_accessed=r.cost.bytes if r.cost else None,
                  collective_bytes=r.collective_bytes, estimated_s=r.estimated_s if r.cost else None,
                  kernel_s=r.kernel_s, collective_s=r.collective_s, per_step=r.per_step,
                  model_flops=r.model_flops, compile_s=round(r.compile_s, 1), lower_s=round(r.lower_s, 1),
                  error=r.error or None)
             for r in rep["results"]]
  cfg = rep["config"]
  return "BENCH_JSON " + json.dumps(dict(bench="compile", job=cfg.job, topology=rep["target"].name,
                                         chips=rep["target"].chips, mesh=rep["mesh"], rollout_mesh=rep["rollout_mesh"],
                                         programs=entries, summary=summ, account_check=rep.get("account_check")),
                                    default=float)


def run(cfg, topology: str | None = None, *, probes: bool = True, only=(), collective_ops: int = 0,
        log=print) -> dict:
  """Compiles `cfg`'s programs for `topology` (default: `cfg.accelerator_type`'s), prints the report (with each
  program's `collective_ops` largest collectives by shape), returns it with its summary."""
  topology = topology_for(topology or cfg.accelerator_type or "")
  rep = compile_job(cfg, tpu_target(topology), probes=probes, only=only, log=log)
  summ = summary(rep) if probes else {}
  log(table(rep))
  if collective_ops:
    log(collective_ops_table(rep, collective_ops))
  if probes:
    from zoomer_jax.aot.account_check import check  # noqa: PLC0415
    rep["account_check"] = check(cfg, rep)
    log(check_table(rep["account_check"]))
  if summ:
    for name, key in (("engine/decode", "decode_bandwidth"), ("engine/burst", "burst_bandwidth")):
      bw = decode_bandwidth(rep, name)
      if bw:
        summ[key] = bw
        log(decode_table(bw))
    t, s = summ["train"], summ["step"]
    log(f"\ntraining programs: {t['time_s']:.1f} s per step, MFU {t['mfu']:.1%}, "
        f"collectives {t['collective_share']:.1%} of the time")
    for engine in ROLLOUT_PREFIXES:
      if engine in summ:
        e = summ[engine]
        log(f"whole step with the {engine} engine: {e['time_s']:.1f} s (rollout {e['time_s'] - t['time_s']:.1f} s), "
            f"MFU {e['mfu']:.1%}, collectives {e['collective_share']:.1%}")
    log(f"whole step ({cfg.rollout.engine if 'lockstep' in summ else cfg.job}): {s['time_s']:.1f} s, MFU "
        f"{s['mfu']:.1%}, collectives {s['collective_share']:.1%}")
    for part in summ:
      if isinstance(summ[part], dict) and summ[part].get("missing"):
        log(f"NOTE: the {part} figures are incomplete: no cost estimate for {summ[part]['missing']}")
  rep["summary"] = summ
  log(bench_json(rep, summ))
  return rep
