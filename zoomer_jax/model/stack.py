"""Stacked layers: N identical modules stored as one module whose parameters are [N, ...], run by `lax.scan`.

    layers = stack_modules([DecoderLayer(cfg, ...) for _ in range(n)])   # params [n, ...], axes ("layers", ...)
    x, ys = scan_modules(lambda layer, x, xs: ..., layers, x, xs, remat="full")

The stacked module is built from the per-layer modules themselves, so a scanned model holds exactly the values
the unrolled one draws from the same seed. `scan` is `lax.scan` unless `unrolled_loops()` is active: the cost
analysis of a compiled program counts a loop body once (XLA's `HloCostAnalysis` ignores trip counts), so
`zoomer_jax.compile` unrolls every loop of its small cost probes (see docs/tpu.md).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from zoomer_jax.parallel.rules import gather_for_use, reduce_in_stages

LAYERS_AXIS = "layers"
ATTENTION_RESIDUALS = "attention_residuals"  # `checkpoint_name` of what the attention kernel's backward reads
DECODER_MLP_UP = "decoder_mlp_up"  # `checkpoint_name` of a decoder layer's MLP up projection output
# `checkpoint_name` of a decoder layer's MLP weights as gathered for its forward (`impl.staged_gradients`)
DECODER_MLP_WEIGHTS = "decoder_mlp_weights"

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    # Keep the attention kernel's inputs, output and log-sum-exp (splash names them), recompute the rest: the
    # backward then runs no attention forward again, for about a quarter of save_dots' memory.
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS),
    # ... and each decoder layer's MLP up projection: the backward then recomputes the gate projection only, one
    # of the layer's two widest matmuls, for [tokens, intermediate] more per layer.
    "save_attention_up": jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS, DECODER_MLP_UP),
    # ... or, with `impl.staged_gradients`, each decoder layer's MLP weights as its forward gathered them: the
    # backward (its recomputation and its own products) then gathers only the attention's weights again, for the
    # MLP's weights whole on every chip, per layer.
    "save_attention_mlp_weights": jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS,
                                                                                DECODER_MLP_WEIGHTS),
}

_LOCAL = threading.local()


@contextlib.contextmanager
def unrolled_loops():
  """Within this context every `scan` of the model unrolls into straight-line code (cost probes only)."""
  before = getattr(_LOCAL, "unroll", False)
  _LOCAL.unroll = True
  try:
    yield
  finally:
    _LOCAL.unroll = before


def loops_unrolled() -> bool:
  return getattr(_LOCAL, "unroll", False)


def scan(f: Callable, init, xs, length: int | None = None):
  """`lax.scan(f, init, xs, length)`, or the same loop in Python under `unrolled_loops()`."""
  if not loops_unrolled():
    return jax.lax.scan(f, init, xs, length=length)
  n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
  carry, ys = init, []
  for i in range(n):
    carry, y = f(carry, jax.tree.map(lambda a, i=i: a[i], xs))
    ys.append(y)
  if not ys or ys[0] is None:
    return carry, None
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def remat(fn: Callable, policy: str) -> Callable:
  """`fn` rematerialised in the backward pass by the named policy (`REMAT_POLICIES`)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat {policy!r} is not one of {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module of `modules[0]`'s structure whose every variable is the stack of theirs ([N, ...]); a
  Param's `axes` metadata gains the leading "layers" axis."""
  graphdef, _ = nnx.split(modules[0])
  flats = [dict(nnx.to_flat_state(nnx.split(m)[1])) for m in modules]
  stacked = {}
  for path, var in flats[0].items():
    value = jnp.stack([f[path].get_value() for f in flats])
    axes = var.get_metadata().get("axes")
    stacked[path] = var.replace(value) if axes is None else var.replace(value, axes=(LAYERS_AXIS,) + tuple(axes))
  return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def scan_modules(fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], stacked: nnx.Module, carry, xs=None, *,
                 remat_policy: str = "none", staged_rules=None):
  """Runs `fn(layer, carry, x) -> (carry, y)` over the stacked layers (and `xs`, stacked alike); returns
  (carry, ys). Each step sees one layer's slice of the parameters as a module; `remat_policy` rematerialises
  each step in the backward pass. With `staged_rules` (a rules table) each layer's parameter gradients are
  reduced one mesh axis at a time (`parallel.rules.reduce_in_stages`)."""
  graphdef, state = nnx.split(stacked)

  def step(c, inputs):
    layer_state, x = inputs
    if staged_rules is not None:
      layer_state = jax.tree.map(lambda v: _staged(v, staged_rules), layer_state,
                                 is_leaf=lambda v: isinstance(v, nnx.Variable))
    return fn(nnx.merge(graphdef, layer_state), c, x)

  return scan(remat(step, remat_policy), carry, (state, xs))


def _staged(var, rules):
  """A layer's slice of a stacked parameter, its gradient reduced in stages by its logical axes (the stacked
  axis dropped). A decoder MLP weight (logical axis "mlp") is gathered here, explicitly, and named
  `DECODER_MLP_WEIGHTS`, so that a remat policy can keep it for the backward."""
  axes = var.get_metadata().get("axes") if isinstance(var, nnx.Param) else None
  if axes is None:
    return var
  value = var.get_value()
  axes = tuple(axes)[1:] if len(axes) == value.ndim + 1 and axes[0] == LAYERS_AXIS else tuple(axes)
  if "mlp" in axes:
    return var.replace(checkpoint_name(gather_for_use(value, axes, rules), DECODER_MLP_WEIGHTS))
  return var.replace(reduce_in_stages(value, axes, rules))


def num_stacked(stacked: nnx.Module) -> int:
  return jax.tree.leaves(nnx.split(stacked)[1])[0].shape[0]
