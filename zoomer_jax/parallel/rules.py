"""Logical axis names -> mesh axes.

Parameters carry logical names (`embed`, `mlp`, `q_heads`, ...) in their `axes` metadata, and activations are
constrained by logical names too (`constrain(x, ("activation_batch", "activation_length", "activation_embed"),
rules)`, MaxText's `with_logical_constraint`), so the layout XLA picks is the one meant. A rules table, part of
the run config (`cfg.mesh.rules`), maps each name to a mesh axis, a tuple of mesh axes, or None (replicated).
The first rule naming a logical axis wins; a mesh axis is used at most once per array.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
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
    ("vision_pieces", None),  # a row's images cut into pieces at frame boundaries (`vision_layout.split_frames`)
    ("layers", None),  # the stacked axis of scanned layers: every chip holds its slice of every layer
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_norm_length", None),  # the residual stream's length (sequence parallelism: "tensor")
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # the KV cache [layers, batch, kv_heads, ...]
    ("cache_batch", ("data", "fsdp")),
    ("cache_kv_heads", "tensor"),
)

# Context parallelism over the `tensor` mesh axis (put first in a rules table): the decoder's and the head's
# weights sharded over fsdp x tensor (FSDP over every chip), activations split along the sequence over tensor,
# heads, MLP width and vocabulary whole. Attention gathers keys and values over tensor (`attention.splash`). The
# vision tower splits the same way: each of a row's chips encodes its piece of the row's frames (attention stays
# inside a frame, so nothing moves between them) with the tower's weights gathered per block; splitting its heads
# and MLP width instead would all-reduce every patch's activations twice per block.
CONTEXT_PARALLEL: Rules = (
    ("embed", ("fsdp", "tensor")),
    ("vocab", None), ("mlp", None), ("q_heads", None), ("kv_heads", None),
    ("vision_embed", ("fsdp", "tensor")), ("vision_merged", ("fsdp", "tensor")),
    ("vision_mlp", None), ("vision_heads", None), ("vision_merged_out", None), ("vision_pieces", "tensor"),
    ("activation_length", "tensor"), ("activation_norm_length", "tensor"),
    ("activation_heads", None), ("activation_kv_heads", None), ("activation_mlp", None), ("activation_vocab", None),
)


def vision_pieces(mesh: Mesh | None, rules: Rules) -> int:
  """How many pieces a row's images are cut into: the number of chips `vision_pieces` maps to on `mesh` (1
  without a mesh or a rule)."""
  if mesh is None:
    return 1
  return axes_size(mesh, logical_to_spec(("vision_pieces",), rules, mesh)[0])


def spec_axes(axes) -> tuple[str, ...]:
  """A partition spec entry's mesh axes as a tuple (None: none; one name: that one)."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def axes_size(mesh, axes) -> int:
  """How many chips a partition spec entry spans: the product of its mesh axes' sizes (1 for None)."""
  n = 1
  for a in spec_axes(axes):
    n *= mesh.shape[a]
  return n


def check_rules(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """`rules` as a hashable tuple of (logical name, target) pairs; a malformed entry raises naming it."""
  out = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"rule {i} {rule!r} is not a (logical name, mesh axes) pair")
    name, target = rule
    if isinstance(target, list):
      target = tuple(target)
    if not (target is None or isinstance(target, str)
            or isinstance(target, tuple) and all(isinstance(t, str) for t in target)):
      raise ValueError(f"rule for {name!r}: target {target!r} is not a mesh axis name, a tuple of them, or None")
    out.append((name, target))
  return tuple(out)


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
      if t in used or mesh is not None and t not in mesh.shape:
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



def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules) -> jax.Array:
  """`x` constrained to the layout its logical `axes` map to on the mesh in context (`jax.set_mesh`); `x`
  itself when no mesh is set (single device, eager use). Axes that do not divide fall back to replication."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"logical axes {tuple(axes)} do not match an array of rank {x.ndim}")
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh, x.shape))


def stages(spec: PartitionSpec) -> tuple[PartitionSpec, ...]:
  """The layouts a gradient passes through on its way to `spec` when it is reduced over one mesh axis at a time:
  each entry naming several axes gains them one by one ((fsdp, tensor): first fsdp, then fsdp x tensor); () when
  no entry names more than one (nothing to stage)."""
  entries = [spec_axes(e) for e in spec]
  depth = max((len(e) for e in entries), default=0)
  if depth < 2:
    return ()
  out = []
  for k in range(1, depth + 1):
    cut = [e[:k] for e in entries]
    out.append(PartitionSpec(*(None if not e else (e[0] if len(e) == 1 else e) for e in cut)))
  return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _relaid(x, layout, gradient_layouts):
  """`x` (constrained to `layout` unless None); its gradient constrained to `gradient_layouts` in turn."""
  del gradient_layouts
  return x if layout is None else jax.lax.with_sharding_constraint(x, layout)


def _relaid_fwd(x, layout, gradient_layouts):
  return _relaid(x, layout, gradient_layouts), None


def _relaid_bwd(layout, gradient_layouts, _, g):
  del layout
  for each in gradient_layouts:
    g = jax.lax.with_sharding_constraint(g, each)
  return (g,)


_relaid.defvjp(_relaid_fwd, _relaid_bwd)


def reduce_in_stages(x: jax.Array, axes: Sequence[str | None], rules: Rules) -> jax.Array:
  """`x` itself; its gradient is laid out by `stages` of its own layout, so the compiler reduces it over one mesh
  axis at a time (a reduce-scatter over fsdp, then one over tensor) instead of all-reducing the whole gradient
  over every chip and keeping a slice, which XLA's TPU compiler does for a weight split over a 2-D group of v6e
  chips (bench/probe_fsdp_gradient.py). Applied to a layer's weights where the layer uses them; `x` unchanged
  when no mesh is set or the layout names no axis pair."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  layouts = stages(logical_to_spec(axes, rules, mesh, x.shape))
  if not layouts:
    return x
  return _relaid(x, None, layouts)


def gather_for_use(x: jax.Array, axes: Sequence[str | None], rules: Rules) -> jax.Array:
  """`x` gathered over the batch-sharding axes (what the partitioner does before a layer uses an FSDP weight, made
  explicit so that the gathered value can be named and kept for the backward): an entry naming an axis the rules
  split rows over (`activation_batch`: data, fsdp), or several axes (fsdp x tensor under context parallelism), is
  gathered; a tensor-parallel entry stays split. Its gradient goes straight to `x`'s layout in `stages` (a gradient
  constrained to the gathered layout would be all-reduced first)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(axes, rules, mesh, x.shape)
  batch = spec_axes(logical_to_spec(("activation_batch",), rules, mesh)[0])  # the axes rows are split over
  kept = [e if isinstance(e, str) and e not in batch else None for e in spec]
  kept += [None] * (x.ndim - len(kept))
  return _relaid(x, PartitionSpec(*kept), stages(spec) or (spec,))

