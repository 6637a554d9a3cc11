"""Compile a job's programs for a TPU topology and account for each: memory, FLOPs, time, collectives.

Per program (`programs.job_programs`):

  * memory: XLA's `memory_analysis()` of the compiled program as the job runs it (scanned layers): argument,
    output, alias and temporary bytes per chip, against the chip's HBM as XLA states it (the "available HBM" of
    its out-of-memory error, `xla_hbm_bytes`); a program that does not fit reports what it needs;
  * FLOPs, bytes accessed and XLA's time estimate (`cost_analysis()`): XLA's cost analysis counts a loop's body
    once whatever its trip count, so a scanned program under-reports by the depth. The figures are instead taken
    from cost probes: the same program at reduced depth (1 and 2 decoder layers or the program's `probe_layers`,
    1 and 2 windowed vision blocks, 1 full-attention block), with every loop unrolled
    (`model.stack.unrolled_loops`) and log-probs in one token block, then extrapolated linearly to the model's
    depths (costs are linear in the number of layers). On TPU, XLA prices a `ConcatBitcast` custom call at
    -1 s; those seconds are given back;
  * Pallas kernels (splash attention) are custom calls XLA gives no cost: their FLOPs are counted from the kernels
    the probe runs (the decoder's causal block pairs; the vision tower's band of key tiles, read from the grid of
    the kernel's mask-info tables) and timed at XLA's own estimated rate for one attention tile's matmuls on the
    chip, at the kernel's tile and head_dim (`kernel_rate`, `impl.attention_block`);
  * collectives by kind from the optimized HLO (loop bodies times their trip count) with the bytes each chip moves
    (ring algorithm over the op's group); XLA's estimate leaves them out, so they are timed at the chip's ICI
    receive bandwidth and added (no overlap assumed: an upper bound).

  * the paged attention kernel (the continuous engine's programs, `engine_programs`) is a custom call XLA prices
    at nothing, bytes included: its HBM bytes and FLOPs are counted from the shapes and timed at the bound of the
    two (HBM bandwidth, `kernel_rate`).

The program's estimated time = XLA's (probes) + kernels + collectives; a job step is the sum over programs of
that times how often the step runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomer_jax.aot import programs as P
from zoomer_jax.aot.hlo import Hlo
from zoomer_jax.aot.target import Target
from zoomer_jax.model.attention import SPLASH_BLOCK
from zoomer_jax.model.stack import unrolled_loops

GiB = 2**30
SPLASH = "splash_mha"
# Cost probes compile without XLA's windowed einsums: they turn an FSDP all-gather (or reduce-scatter) into a loop
# of partial matmuls over collective-permutes, whose body cost analysis would count once. Only the probes' cost
# figures change; the job's programs compile as XLA chooses.
PROBE_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                 "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\).*available HBM \(([\d.]+)([KMGT]?)\)", re.S)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  bytes: float = 0.0
  xla_s: float = 0.0
  kernel_flops: float = 0.0
  kernel_s: float = 0.0  # the splash kernels' FLOPs, each kernel's at the rate for its tile (`kernel_rate`)

  def __add__(self, o):
    return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o))))

  def __sub__(self, o):
    return Cost(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o))))

  def __mul__(self, k: float):
    return Cost(*(a * k for a in dataclasses.astuple(self)))


@dataclasses.dataclass
class Result:
  name: str
  per_step: float
  note: str
  model_flops: float = 0.0  # per call, per chip
  loop_steps: int = 1
  resident: float = 0.0  # bytes per chip live beside the program (optimizer state, reference weights)
  fits: bool = False
  memory: dict = dataclasses.field(default_factory=dict)  # argument/output/alias/temp/total bytes per chip
  required: float = 0.0  # bytes per chip (what XLA asked for when it did not fit)
  compile_s: float = 0.0  # tracing, lowering and XLA's compile
  lower_s: float = 0.0  # of which tracing and lowering (Python)
  raw: dict = dataclasses.field(default_factory=dict)  # XLA's cost analysis of the scanned program (loop-once)
  cost: Cost | None = None  # probe-extrapolated
  collectives: dict = dataclasses.field(default_factory=dict)
  collective_ops: dict = dataclasses.field(default_factory=dict)  # by kind, group and shape (`Hlo.collectives`)
  kernel_s: float = 0.0
  collective_s: float = 0.0
  error: str = ""
  kernel_bytes: float = 0.0  # per chip per call: a Pallas kernel's work XLA's cost analysis leaves out
  kernel_flops: float = 0.0
  traffic: dict = dataclasses.field(default_factory=dict)  # the bytes a step must move (programs.Program.traffic)

  @property
  def estimated_s(self) -> float:
    return (self.cost.xla_s if self.cost else 0.0) + self.kernel_s + self.collective_s

  @property
  def collective_bytes(self) -> float:
    return float(sum(c["moved"] for c in self.collectives.values()))


def xla_hbm_bytes(target: Target) -> float:
  """The HBM per chip XLA compiles against: read from the error of a program that cannot fit (the chip spec's
  figure if the message does not say)."""
  dev = np.asarray(target.devices[:1])
  mesh = Mesh(dev.reshape(1), ("x",))
  big = jax.ShapeDtypeStruct((1 << 20, 1 << 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  try:
    jax.jit(lambda x: jnp.exp(x) + jnp.exp(x).T.sum()).lower(big).compile()
  except Exception as e:  # noqa: BLE001 (XLA raises its own runtime error type)
    m = _OOM.search(str(e))
    if m:
      return float(m.group(3)) * _UNIT[m.group(4)]
  return float(target.chip.hbm_bytes)


def kernel_rate(target: Target, heads: int, block: int = 512, head_dim: int = 128) -> float:
  """XLA's estimated FLOP/s for one attention block's two matmuls ([heads, block, h] x [heads, block, h]^T, then
  the probabilities times values) on one chip: what a Pallas attention kernel's work is timed at."""
  mesh = Mesh(np.asarray(target.devices[:1]).reshape(1), ("x",))
  rep = NamedSharding(mesh, PartitionSpec())
  q = jax.ShapeDtypeStruct((heads, block, head_dim), jnp.bfloat16, sharding=rep)

  def block_attention(q, k, v):
    s = jnp.einsum("hqd,hkd->hqk", q, k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("hqk,hkd->hqd", p, v, preferred_element_type=jnp.float32)

  ca = jax.jit(block_attention).lower(q, q, q).compile().cost_analysis()
  return 4 * heads * block * block * head_dim / float(ca["optimal_seconds"])


def kernel_rates(cfg, mesh: Mesh, target: Target):
  """`rate_of(tile, head_dim=128)`: the FLOP/s a splash kernel's tiles are timed at (`kernel_rate`, cached), at the
  decoder's heads per chip (the vision tower's kernels too: the rate is per FLOP of a tile)."""
  heads = cfg.model.text.num_attention_heads // max(1, int(mesh.shape.get("tensor", 1)))
  return functools.cache(lambda tile, head_dim=128: kernel_rate(target, heads, block=tile, head_dim=head_dim))


def splash_flops(hlo: Hlo, block: int = SPLASH_BLOCK) -> float:
  """FLOPs of the splash kernels a program runs, 2 x heads x head_dim x the (query, key) pairs of the tiles they
  visit per matmul: the forward kernel's two (scores, values); the backward's seven, counted at its dq kernel
  (scores, dP, dQ) whose output [..., heads, T, h] names the query heads, the dkv kernel's four (scores, dP, dV,
  dK) with it. A causal kernel visits the causal tile pairs. One whose queries are a shard of the keys' sequence
  (context parallelism) reads, in `balanced_order`, its two chunks' causal blocks and every earlier key; without
  it (a sequence that does not split so), counted at the slowest shard, the last. A kernel whose grid the mask
  shrank (a band, as the vision tower's segments: `attention.segment_splash`) visits its grid: each query tile
  the few key tiles its mask-info tables hold (a band that reaches every key tile of a short sequence leaves the
  grid whole and is counted as causal: short pieces only, not the 7B configs'). `block`: the model's tile
  (`ModelOptions.attention_block`), capped as the kernel caps it."""
  return sum(flops for flops, _ in splash_kernels(hlo, block))


def splash_seconds(hlo: Hlo, block: int, rate_of) -> float:
  """The splash kernels' time: each kernel's FLOPs at `rate_of(tile, head_dim)` FLOP/s."""
  return sum(flops / rate_of(*tile) for flops, tile in splash_kernels(hlo, block))


def splash_kernels(hlo: Hlo, block: int = SPLASH_BLOCK):
  """(FLOPs, (tile, head_dim)) of each splash kernel call (`splash_flops`)."""
  from zoomer_jax.model.attention import balanced_order  # noqa: PLC0415
  for name, operands, shapes, count in hlo.kernels(SPLASH):
    if "dkv" in name:
      continue
    floats = [d for dtype, d in operands if dtype in ("bf16", "f32") and len(d) >= 3]
    if not floats:
      continue
    q = floats[0]  # the kernel's first array operand: the queries [..., heads, T, h]
    t, h = q[-2], q[-1]
    # The keys' length (operands [kv heads, T_kv, h]): t, or the whole sequence of a query shard.
    t_kv = max([t] + [d[-2] for d in floats if d[-1] == h])
    heads = int(np.prod(q[:-2]))
    # The mask-info tables (integers [1 or heads, query tiles, key steps]) give the kernel's grid.
    grid = next((d for dtype, d in operands if dtype[0] in "su" and len(d) == 3), None)
    shards = t_kv // t
    if grid is not None and grid[2] < -(-t_kv // (t // grid[1])):  # a shrunk grid: a band of key tiles
      blk = t // grid[1]
      pairs = blk * blk * grid[1] * grid[2]
    elif shards > 1 and balanced_order(t_kv, shards, block) is not None:
      blk = min(block, t // 2)
      m = t // 2 // blk  # blocks per chunk; chunks i and 2 shards - 1 - i read 2 shards - 1 chunks of earlier keys
      pairs = blk * blk * ((2 * shards - 1) * m * m + m * (m + 1))
    else:
      blk = min(block, t)
      nb = -(-t // blk)
      pairs = blk * blk * (nb * (nb + 1) / 2 + nb * (-(-t_kv // blk) - nb))
    yield count * (14 if "dq" in name else 4) * heads * h * pairs, (blk, h)


def _cost_of(compiled, loops: int = 0, block: int = SPLASH_BLOCK, rate_of=None) -> Cost:
  """XLA's cost analysis of a probe that runs `loops` while loops of its own (the decode loop, costed per step);
  its splash kernels (tiles of `block`) timed at `rate_of(tile, head_dim)` FLOP/s when given."""
  ca = compiled.cost_analysis() or {}
  hlo = Hlo(compiled.as_text())
  found = hlo.count_ops("while")
  if found > loops:
    raise RuntimeError(f"a cost probe has {found} while loops ({loops} expected), whose bodies XLA's cost analysis "
                       "counts once")
  # XLA's TPU cost model prices a ConcatBitcast at -1 s, a loop body's once (as it counts the body): give them back
  fix = hlo.custom_calls("ConcatBitcast", trips=False)
  kernels = list(splash_kernels(hlo, block))  # parsed once for both sums
  return Cost(flops=float(ca.get("flops", 0.0)), bytes=float(ca.get("bytes accessed", 0.0)),
              xla_s=float(ca.get("optimal_seconds", 0.0)) + fix, kernel_flops=sum(f for f, _ in kernels),
              kernel_s=sum(f / rate_of(*tile) for f, tile in kernels) if rate_of else 0.0)


def probe_costs(cfg, mesh: Mesh, rollout_mesh, log=print, only=(), rate_of=None) -> dict[str, Cost]:
  """Extrapolated costs of every program (or those named in `only`; module docstring): four probe compiles per
  program. A program whose probe does not fit HBM even in the config's token blocks gets no cost (reported).
  `rate_of(tile, head_dim)`: the FLOP/s its splash kernels are timed at."""
  from zoomer_jax.model.config import ModelConfig  # noqa: PLC0415
  full = ModelConfig.from_config_dict(cfg.model.to_dict())
  t, w, f = P.block_counts(full)
  probe_cfg = cfg.copy_and_resolve_references()
  probe_cfg.impl.scan_layers = False
  variants = {"1,1,0": (1, 1, 0), "2,1,0": (2, 1, 0), "1,2,0": (1, 2, 0)}
  if f:
    variants["1,0,1"] = (1, 0, 1)
  # Programs whose one-layer probe is no step of the line (the paged step: XLA handles a one-layer pool
  # differently) take the decoder's per-layer cost between deeper probes (`Program.probe_layers`).
  deep = {p.name: p.probe_layers for p in P.job_programs(probe_cfg, mesh, model_cfg=P.reduced(full, 1, 1, 0),
                                                         token_chunk=None, rollout_mesh=rollout_mesh)
          if p.probe_layers != (1, 2) and (not only or p.name in only)}
  extra = {f"{d},1,0" for pair in deep.values() for d in pair} - set(variants)
  for key in sorted(extra):
    variants[key] = (int(key.split(",")[0]), 1, 0)
  costs: dict[str, dict[str, Cost]] = {}
  failed: dict[str, str] = {}
  for key, depths in variants.items():
    t0 = time.perf_counter()
    with unrolled_loops():
      model_cfg = P.reduced(full, *depths)
      progs = P.job_programs(probe_cfg, mesh, model_cfg=model_cfg, token_chunk=None, rollout_mesh=rollout_mesh)
      blocked = None
      for p in progs:
        if (only and p.name not in only) or p.name in failed or (
            key in extra and key not in {f"{d},1,0" for d in deep.get(p.name, ())}):
          continue
        try:
          compiled = p.lower().compile(compiler_options=PROBE_OPTIONS)
        except Exception as e:  # noqa: BLE001 (XLA raises its own runtime error type)
          if not _OOM.search(str(e)):
            raise
          # The log-probs in one token block can outgrow HBM where the program's own blocks fit (v6e): the
          # program's token blocks, unrolled here, cost the same FLOPs.
          log(f"  probe {p.name} ({key}) does not fit in one token block; compiling it in the config's blocks")
          if blocked is None:
            blocked = {q.name: q for q in P.job_programs(probe_cfg, mesh, model_cfg=model_cfg,
                                                         rollout_mesh=rollout_mesh)}
          try:
            compiled = blocked[p.name].lower().compile(compiler_options=PROBE_OPTIONS)
          except Exception as e2:  # noqa: BLE001
            m = _OOM.search(str(e2))
            if not m:
              raise
            failed[p.name] = f"its {key} probe needs {m.group(1)}{m.group(2)} of temporaries"
            log(f"  probe {p.name} ({key}) does not fit HBM ({failed[p.name]}): no cost for {p.name}")
            continue
        costs.setdefault(p.name, {})[key] = _cost_of(compiled, loops=int(p.loop_steps > 1),
                                                     block=cfg.impl.attention_block, rate_of=rate_of)
    log(f"  cost probe (text layers, window blocks, full blocks) = ({key}): {time.perf_counter() - t0:.0f} s")
  out = {}
  for name, c in costs.items():
    if name in failed:
      continue
    cw = c["1,2,0"] - c["1,1,0"]
    cf = (c["1,0,1"] - c["1,1,0"] + cw) if f else Cost()  # (1,0,1) trades a windowed block for a full one
    if name in deep:
      a, b = deep[name]
      ct = (c[f"{b},1,0"] - c[f"{a},1,0"]) * (1 / (b - a))
      c0 = c[f"{a},1,0"] - ct * a - cw
    else:
      ct = c["2,1,0"] - c["1,1,0"]
      c0 = c["1,1,0"] - ct - cw
    out[name] = c0 + ct * t + cw * w + cf * f
    part = lambda c, n: f"{c.xla_s * 1e3:.2f} ms {c.bytes / 1e9:.2f} GB {c.flops / 1e12:.2f} TFLOP x {n}"  # noqa: E731
    log(f"  {name} by XLA's estimate: outside the stacks {part(c0, 1)}; per decoder layer {part(ct, t)}; "
        f"per windowed vision block {part(cw, w)}" + (f"; per full-attention block {part(cf, f)}" if f else ""))
  return out


def compile_program(p: P.Program, hbm: float, headroom: float) -> tuple[Result, Any]:
  r = Result(p.name, p.per_step, p.note, p.model_flops / len(p.mesh.devices.flat), p.loop_steps, p.resident,
             kernel_bytes=p.kernel_bytes, kernel_flops=p.kernel_flops, traffic=p.traffic)
  t0 = time.perf_counter()
  lowered = p.lower()
  r.lower_s = time.perf_counter() - t0
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 (XLA raises its own runtime error type)
    r.compile_s = time.perf_counter() - t0
    m = _OOM.search(str(e))
    if not m:
      raise
    r.required = float(m.group(1)) * _UNIT[m.group(2)] + r.resident
    r.error = str(e).splitlines()[0][:300]
    return r, None
  r.compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  mem = dict(argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes, alias=ma.alias_size_in_bytes,
             temp=ma.temp_size_in_bytes, code=ma.generated_code_size_in_bytes)
  mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
  r.memory, r.required = mem, mem["total"] + r.resident
  r.fits = r.required <= (1 - headroom) * hbm
  ca = compiled.cost_analysis() or {}
  r.raw = {k: float(ca[k]) for k in ("flops", "bytes accessed", "optimal_seconds") if k in ca}
  return r, compiled


def compile_job(cfg, target: Target, *, probes: bool = True, headroom: float = 0.1, only=(),
                log=print) -> dict:
  """Compiles every program of `cfg` for `target` (see the module docstring); returns the report dict."""
  mesh, rollout_mesh = P.meshes(cfg, list(target.devices))
  hbm = xla_hbm_bytes(target)
  progs = P.job_programs(cfg, mesh, rollout_mesh=rollout_mesh)
  if only:
    progs = [p for p in progs if p.name in only]
  log(f"{cfg.job} on {target.name} ({target.chips} chips, {hbm / GiB:.2f} GiB HBM each as XLA states it); mesh "
      f"{dict(mesh.shape)}" + (f", rollout mesh {dict(rollout_mesh.shape)}" if rollout_mesh else ""))
  results = []
  for p in progs:
    r, compiled = compile_program(p, hbm, headroom)
    if compiled is not None:
      hlo = Hlo(compiled.as_text())
      r.collectives = hlo.collectives(target.chips)
      r.collective_ops = hlo.collectives(target.chips, by_shape=True)
      r.collective_s = r.collective_bytes / target.chip.ici_in_bw
    log(f"  {p.name}: compiled in {r.compile_s:.0f} s (traced and lowered in {r.lower_s:.0f}), "
        f"{r.required / GiB:.2f} GiB per chip" + ("" if r.fits else "  (does not fit)"))
    results.append(r)
  if probes:
    rate_of = kernel_rates(cfg, mesh, target)

    costs = probe_costs(cfg, mesh, rollout_mesh, log=log, only=only, rate_of=rate_of)
    for r in results:
      r.cost = costs.get(r.name)
      if r.cost is not None:  # a while loop (decode) is costed once per iteration
        r.cost = r.cost * r.loop_steps
        r.kernel_s = r.cost.kernel_s
      if r.cost is not None and (r.kernel_bytes or r.kernel_flops):  # the paged kernel: bound by HBM or FLOPs
        r.kernel_s += max(r.kernel_bytes / target.chip.hbm_bw, r.kernel_flops / rate_of(SPLASH_BLOCK))
  return dict(config=cfg, target=target, hbm=hbm, headroom=headroom, mesh=dict(mesh.shape),
              rollout_mesh=dict(rollout_mesh.shape) if rollout_mesh else None, results=results)
