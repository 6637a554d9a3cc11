"""Logical axis names -> mesh axes.

Parameters carry logical names (`embed`, `mlp`, `q_heads`, ...) in their `axes` metadata. A rules
table, part of the run config, maps each name to a mesh axis, a tuple of mesh axes, or None
(replicated). The first rule naming a logical axis wins; a mesh axis is used at most once per array.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP over `embed`-like dims, tensor parallelism over heads and MLP width (MaxText-style defaults).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vision_patch", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_merged", "fsdp"),
    ("vision_merged_out", "tensor"),
)


def logical_to_spec(axes: Iterable[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes.

  With `mesh` and `shape`, a mesh axis that does not divide the dimension (or is already used by an
  earlier dimension) is dropped, so an odd size falls back to replication instead of failing.
  """
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  used, spec = set(), []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    keep = []
    size = None if shape is None else shape[i]
    for t in targets:
      if t in used:
        continue
      if mesh is not None:
        n = mesh.shape[t]
        prod = 1
        for k in keep:
          prod *= mesh.shape[k]
        if size is not None and size % (prod * n):
          continue
      keep.append(t)
      used.add(t)
    spec.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
  return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
  """NamedSharding for one NNX variable from its `axes` metadata (replicated if it has none)."""
  axes = var.get_metadata().get("axes")
  value = var.get_value()
  if axes is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, value.shape))

