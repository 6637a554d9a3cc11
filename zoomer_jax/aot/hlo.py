"""What a compiled program does, read from its optimized HLO text (`compiled.as_text()`).

    hlo = Hlo(text)
    hlo.collectives()          # {"all-gather": (count, bytes per chip), ...}, loop bodies times their trip count
    hlo.kernels("splash_mha")  # [(instruction name, operand shapes, output shapes, multiplicity)] of Pallas kernels
    hlo.custom_calls("ConcatBitcast")

Loops: a `while` multiplies what its body does by its trip count: the `known_trip_count` of its backend config, or
the bound its condition compares the induction variable with (`i < N`: a `lax.scan`'s length, or a decode loop's
token limit, an upper bound when it stops early). Conditionals count their costliest branch.

Reduce-scatters: TPU compilers may emit one as a fusion that calls an `all-reduce-scatter` computation (an
all-reduce of the whole operand and a slice of the chip's shard, run by a reduce-scatter emitter); it is counted as
the reduce-scatter it runs, not as the all-reduce inside it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_HEAD = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_OPERAND_LAYOUTS = re.compile(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}")  # shapes' layouts nest
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_REDUCE_SCATTER_FUSION = re.compile(r"\bcalls=%(all-reduce-scatter[\w.\-]*)")


def shape_bytes(text: str) -> list[int]:
  """Bytes of every array shape in a type string, in order ("(bf16[2,3], f32[4])" -> [12, 16])."""
  return [DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _SHAPE.findall(text)]


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  op: str
  rest: str


class Hlo:
  def __init__(self, text: str):
    self.comps: dict[str, list[Instr]] = {}
    self.entry = None
    current = None
    for line in text.splitlines():
      head = _HEAD.match(line)
      if head and "=" not in line.split("->")[0].split("(")[0]:
        current = head.group(1)
        self.comps[current] = []
        if line.lstrip().startswith("ENTRY"):
          self.entry = current
        continue
      m = _INSTR.match(line)
      if m and current is not None:
        self.comps[current].append(Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
    if self.entry is None:
      raise ValueError("no ENTRY computation in the HLO text")

  def _children(self, ins: Instr) -> list[tuple[list[str], int]]:
    """(alternative computations, multiplicity) called by one instruction."""
    if ins.op == "while":
      trip = _TRIP.search(ins.rest)
      body = re.search(r"\bbody=%([\w.\-]+)", ins.rest)
      cond = re.search(r"\bcondition=%([\w.\-]+)", ins.rest)
      n = int(trip.group(1)) if trip else (self._bound(cond.group(1)) if cond else 1)
      return [([body.group(1)], n)] + ([([cond.group(1)], n)] if cond else [])
    branches = _BRANCHES.search(ins.rest)
    if branches:
      return [([b.strip().lstrip("%") for b in branches.group(1).split(",") if b.strip()], 1)]
    if ins.op in ("reduce", "reduce-window", "scatter", "select-and-scatter", "sort", "map", "all-reduce",
                  "all-reduce-start", "reduce-scatter"):
      return []  # to_apply is a scalar reduction, not work of its own
    if ins.op == "fusion" and _REDUCE_SCATTER_FUSION.search(ins.rest):
      return []  # counted as the reduce-scatter it is (`collectives`)
    return [([c], 1) for c in _CALLS.findall(ins.rest)]

  def _bound(self, cond: str) -> int:
    """N of a loop condition `i < N` (or `i <= N - 1`) on a constant; 1 when the condition has no such bound."""
    consts = {}
    for ins in self.comps.get(cond, []):
      m = re.match(r"constant\((-?\d+)\)", ins.op + "(" + ins.rest) if ins.op == "constant" else None
      if m and ins.type.startswith(("s32", "s64", "u32")):
        consts[ins.name] = int(m.group(1))
    for ins in self.comps.get(cond, []):
      if ins.op != "compare":
        continue
      args = re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])
      direction = re.search(r"direction=(\w+)", ins.rest)
      if len(args) == 2 and args[1] in consts and direction and direction.group(1) in ("LT", "LE"):
        return consts[args[1]] + (direction.group(1) == "LE")
    return 1

  def _walk(self, comp: str, visit, memo: dict | None = None, trips: bool = True) -> collections.Counter:
    """Sum over the instructions reachable from `comp` of visit(instr) -> Counter, with multiplicities (a loop's
    body once when not `trips`, as XLA's cost analysis counts it). The memo lives for one walk: keyed by
    `id(visit)` across walks, a new closure could reuse a dead one's id and read its counts."""
    memo = {} if memo is None else memo
    if comp in memo:
      return memo[comp]
    total = collections.Counter()
    for ins in self.comps.get(comp, []):
      total.update(visit(ins))
      for alts, n in self._children(ins):
        best = max((self._walk(c, visit, memo, trips) for c in alts), key=lambda c: sum(c.values()),
                   default=collections.Counter())
        for k, v in best.items():
          total[k] += v * (n if trips else 1)
    memo[comp] = total
    return total

  def collectives(self, devices: int, by_shape: bool = False) -> dict[str, dict]:
    """{kind: {"count", "bytes" (the op's payload per chip), "moved" (bytes each chip sends or receives, by the
    ring algorithm over its group)}} over the whole program; with `by_shape`, keyed by "kind g<group size>
    <result type>" instead (which op moves what)."""
    def visit(ins: Instr):
      found = self._collective(ins, devices)
      if found is None:
        return collections.Counter()
      kind, p, payload = found
      factor = {"all-reduce": 2 * (p - 1) / p, "collective-permute": 1.0}.get(kind, (p - 1) / p)
      key = (f"{kind} g{p} " + " ".join(f"{d}[{dims}]" for d, dims in _SHAPE.findall(ins.type))) if by_shape else kind
      return collections.Counter({f"{key}/count": 1, f"{key}/bytes": payload, f"{key}/moved": payload * factor})

    c = self._walk(self.entry, visit)
    kinds = sorted({k.rsplit("/", 1)[0] for k in c})
    return {k: {"count": c[f"{k}/count"], "bytes": c[f"{k}/bytes"], "moved": c[f"{k}/moved"]} for k in kinds}

  def _collective(self, ins: Instr, devices: int) -> tuple[str, int, int] | None:
    """(kind, group size, payload bytes per chip) of a collective instruction; None for anything else. The payload
    is what the ring algorithm's factor applies to: an all-gather's gathered result, a reduce-scatter's (or an
    all-reduce-scatter fusion's) whole operand, an all-reduce's buffer, a permute's one message."""
    fused = _REDUCE_SCATTER_FUSION.search(ins.rest) if ins.op == "fusion" else None
    if fused:
      inner = [i for i in self.comps.get(fused.group(1), []) if i.op == "all-reduce"]
      if not inner:
        return None
      return "reduce-scatter", _group_size(inner[0].rest, devices), max(shape_bytes(inner[0].type))
    kind = ins.op.removesuffix("-start")
    sizes = shape_bytes(ins.type)
    if kind not in COLLECTIVES or ins.op.endswith("-done") or not sizes:
      return None
    p = _group_size(ins.rest, devices)
    if kind == "all-gather":
      return kind, p, sizes[-1]  # the gathered result (a -start op returns (operand, result))
    if kind == "collective-permute":
      return kind, p, sizes[0]
    if kind == "reduce-scatter":
      return kind, p, max(sizes) * p  # its result is one chip's shard of the operand it reduces
    return kind, p, max(sizes)

  def kernels(self, prefix: str) -> list[tuple[str, list[int], list[tuple[str, tuple[int, ...]]], int]]:
    """Pallas kernels (custom calls whose instruction name starts with `prefix`): (name, operand shapes, output
    shapes, multiplicity), shapes as [(dtype, dims)] (operands from the call's layout constraints)."""
    out = []

    def shapes_in(text: str):
      return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(text)]

    def visit(ins: Instr):
      if ins.op == "custom-call" and ins.name.startswith(prefix):
        m = _OPERAND_LAYOUTS.search(ins.rest)
        out.append((ins.name, shapes_in(m.group(1)) if m else [], shapes_in(ins.type)))
        return collections.Counter({ins.name: 1})
      return collections.Counter()

    counts = self._walk(self.entry, visit)
    seen = {}
    for name, operands, shapes in out:
      seen[name] = (name, operands, shapes, counts[name])
    return list(seen.values())

  def count_ops(self, op: str) -> int:
    """How many instructions of opcode `op` the program holds (each once, whatever loops they are in)."""
    return sum(1 for instrs in self.comps.values() for ins in instrs if ins.op == op)

  def custom_calls(self, target: str, trips: bool = True) -> int:
    """How many custom calls to `target` run (loop bodies times their trip count; once if not `trips`)."""
    def visit(ins: Instr):
      hit = ins.op == "custom-call" and f'custom_call_target="{target}"' in ins.rest
      return collections.Counter({"n": 1}) if hit else collections.Counter()
    return self._walk(self.entry, visit, trips=trips)["n"]


def _group_size(rest: str, devices: int) -> int:
  m = _GROUPS_MESH.search(rest)
  if m:  # replica_groups=mesh['a'=1,'b'=4] {'b'}: the product of the named axes
    sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    return int(np.prod([sizes[a] for a in re.findall(r"'(\w+)'", m.group(2))]))
  m = _GROUPS_IOTA.search(rest)
  if m:
    return int(m.group(2))
  m = _GROUPS_LIST.search(rest)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  if "source_target_pairs" in rest:
    return 2
  return devices
