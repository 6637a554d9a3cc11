"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries logical axis names in its `axes` metadata; `zoomer_jax.parallel` maps them
to mesh axes through the config's rules table, so a change of mesh never touches this code.
Matmuls accumulate in float32 (`preferred_element_type`) and round once to the activation dtype,
as a bf16 GEMM with fp32 accumulation does on GPU/TPU (and as AMX does on this CPU).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zoomer_jax.parallel.rules import constrain

Axes = tuple[str | None, ...]


def precision_for(dtype) -> jax.lax.Precision:
  """fp32 runs ask for full fp32 matmuls (TPU/GPU default to bf16/TF32 passes otherwise)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def normal_init(rngs: nnx.Rngs, shape, dtype, std: float) -> jax.Array:
  """N(0, std^2) parameters. Outside tracing, drawn with numpy from the jax key: eager
  `jax.random.normal` compiles once per shape, which made building even a tiny model take seconds."""
  key = rngs.params()
  if isinstance(key, jax.core.Tracer):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
  seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()
  host = np.random.default_rng(seed).standard_normal(shape, np.float32) * np.float32(std)
  return jnp.asarray(host.astype(dtype))


def pads_single_row(rows: int, dtype) -> bool:
  """Whether a 1-row product may need the CPU's 2-row form (`on_cpu_pad_row`): bf16 products of one row."""
  return rows == 1 and jnp.dtype(dtype) == jnp.bfloat16


def on_cpu_pad_row(product, x_rd: jax.Array) -> jax.Array:
  """`product(x_rd)` for a 1-row x, computed as 2 rows when the program is compiled for CPU: XLA:CPU sends
  1-row bf16 products to a matrix-vector path about 8x slower than its GEMM kernel, which made bf16 decode at
  batch 1 crawl. Other platforms (and fp32) are fast as they are."""
  def cpu(x):
    return product(jnp.broadcast_to(x, (2,) + x.shape[1:]))[:1]
  return jax.lax.platform_dependent(x_rd, cpu=cpu, default=product)


def platform_of(tree) -> str | None:
  """The platform of the devices the arrays (or ShapeDtypeStructs with shardings) of `tree` are laid out on:
  what a program over them is compiled for; None when nothing in `tree` says."""
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
      return next(iter(sharding.device_set)).platform
  return None


# Products with at most this many activation rows (decode steps) can run, on CPU in fp32, with the weight
# as the GEMM's row operand: W [out, in] x x^T -> [out, rows], transposed after. XLA:CPU then streams the
# weight once (20-24 GB/s of a [4864, 896] kernel at 8 rows here) where x [rows, in] x W [in, out] runs at
# 14-17 GB/s. That needs the kernel stored outputs first; a transposed *view* of a [in, out] kernel is
# slower still (5-6 GB/s), so the sampler keeps its own outputs-first copy (`outputs_first`), as serving
# engines keep their own weight layout next to the trainer's. The barrier keeps XLA from folding the final
# transpose back into the product's output layout, which would bring the slow kernel back.
FEW_ROWS = 64


def outputs_first_helps(dtype, platform: str | None) -> bool:
  """Whether an outputs-first kernel speeds few-row products up on `platform` (fp32 on CPU; bf16 gains
  nothing)."""
  return jnp.dtype(dtype) == jnp.float32 and platform == "cpu"


_transpose = jax.jit(jnp.transpose, static_argnums=1)


class Linear(nnx.Module):
  """y = x @ kernel + bias over the last `len(in_shape)` dims of x; kernel [*in_shape, *out_shape].

  `outputs_first(layer)` turns a layer's kernel into [*out_shape, *in_shape] (same function, another
  memory layout) for the sampler; checkpoints and training always see [*in, *out].
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, axes: Axes,
               use_bias: bool, dtype, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    if len(axes) != len(self.in_shape) + len(self.out_shape):
      raise ValueError(f"axes {axes} do not match kernel rank {len(in_shape) + len(out_shape)}")
    self.dtype = jnp.dtype(dtype)
    self.precision = precision_for(dtype)
    self.kernel_outputs_first = False
    fan_in = math.prod(self.in_shape)
    self.kernel = nnx.Param(normal_init(rngs, self.in_shape + self.out_shape, dtype, fan_in**-0.5), axes=axes)
    self.bias = (nnx.Param(jnp.zeros(self.out_shape, dtype), axes=axes[len(self.in_shape):])
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    x = x.astype(self.dtype)
    lead = x.shape[:x.ndim - n_in]
    rows = math.prod(lead)
    x_in = tuple(range(x.ndim - n_in, x.ndim))
    w = self.kernel[...]
    if self.kernel_outputs_first and rows <= FEW_ROWS:
      x_r = x.reshape((rows,) + self.in_shape)
      y_or = jax.lax.dot_general(w, x_r, ((tuple(range(n_out, n_out + n_in)), tuple(range(1, 1 + n_in))),
                                          ((), ())),
                                 precision=self.precision, preferred_element_type=jnp.float32)
      y = jnp.moveaxis(jax.lax.optimization_barrier(y_or), -1, 0).reshape(lead + self.out_shape)
    else:
      w_in = tuple(range(n_out, n_out + n_in)) if self.kernel_outputs_first else tuple(range(n_in))
      if pads_single_row(rows, self.dtype):
        def product(x_r):
          return jax.lax.dot_general(x_r, w, ((tuple(range(1, 1 + n_in)), w_in), ((), ())),
                                     precision=self.precision, preferred_element_type=jnp.float32)
        y = on_cpu_pad_row(product, x.reshape((1,) + self.in_shape)).reshape(lead + self.out_shape)
      elif self.bias is None and self.dtype != jnp.float32:
        # On TPU the product comes out in the compute dtype (the matrix unit accumulates in fp32 and rounds once),
        # as MaxText's bf16 matmuls do: a product whose contraction is split over chips (the weight gradient under
        # FSDP, a row-parallel layer under tensor parallelism) is then summed across chips in bf16, half the
        # bytes (a reduce-scatter of fp32 partial sums is not narrowed to bf16 as an all-reduce is). CPU: fp32.
        dims = ((x_in, w_in), ((), ()))
        y = jax.lax.platform_dependent(
            x, w, tpu=lambda x, w: jax.lax.dot_general(x, w, dims, precision=self.precision,
                                                       preferred_element_type=self.dtype),
            default=lambda x, w: jax.lax.dot_general(x, w, dims, precision=self.precision,
                                                     preferred_element_type=jnp.float32).astype(self.dtype))
      else:
        y = jax.lax.dot_general(x, w, ((x_in, w_in), ((), ())),
                                precision=self.precision, preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def outputs_first(layer: Linear) -> None:
  """Stores `layer`'s kernel as [*out_shape, *in_shape] in place (its `axes` metadata permuted to match).

  The layer computes the same function; products of at most `FEW_ROWS` rows then read the kernel as the
  GEMM's row operand. Apply it to a copy (`nnx.merge(*nnx.split(model))`): the original keeps its layout.
  """
  if layer.kernel_outputs_first:
    return
  n_in, n_out = len(layer.in_shape), len(layer.out_shape)
  perm = tuple(range(n_in, n_in + n_out)) + tuple(range(n_in))
  axes = layer.kernel.get_metadata()["axes"]  # every Linear kernel has them (checked in __init__)
  layer.kernel = nnx.Param(_transpose(layer.kernel[...], perm), axes=tuple(axes[i] for i in perm))
  layer.kernel_outputs_first = True


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * weight; statistics in fp32, cast back before the weight (HF)."""

  def __init__(self, dim: int, *, eps: float, axis_name: str, dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * y.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); [..., d] -> [..., d]."""

  def __init__(self, dim: int, hidden: int, *, use_bias: bool, embed_axis: str, mlp_axis: str,
               dtype, rngs: nnx.Rngs, rules=None, up_name: str | None = None):
    # when given, the hidden activations are constrained to ("activation_batch", ..., "activation_mlp")
    self.rules = rules
    self.up_name = up_name  # the up projection's `checkpoint_name` (a remat policy may keep it)
    kw = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.gate_proj = Linear((dim,), (hidden,), axes=(embed_axis, mlp_axis), **kw)
    self.up_proj = Linear((dim,), (hidden,), axes=(embed_axis, mlp_axis), **kw)
    self.down_proj = Linear((hidden,), (dim,), axes=(mlp_axis, embed_axis), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    up = self.up_proj(x)
    if self.up_name is not None:
      up = checkpoint_name(up, self.up_name)
    hidden = jax.nn.silu(self.gate_proj(x)) * up
    if self.rules is not None:
      hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"), self.rules)
    return self.down_proj(hidden)


def rotate_half(x: jax.Array) -> jax.Array:
  """NeoX-style rotation: dim j pairs with j + d/2."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rotate_half_by_matmul(x: jax.Array, precision=None) -> jax.Array:
  """`rotate_half(x)` in fp32, as a product with a signed permutation: exact (one +-1 term per output) and, on TPU,
  no lane-unaligned halves to move (the vision tower's head_dim 80: its rotary's slices and concatenation
  otherwise cost about as much HBM traffic as a vision block's MLP)."""
  d = x.shape[-1]
  j = jnp.arange(d)
  src, sign = (j + d // 2) % d, jnp.where(j < d // 2, -1, 1)
  turn = ((j[:, None] == src[None, :]) * sign[None, :]).astype(x.dtype)  # out[j] = sign[j] * x[src[j]]
  return jnp.einsum("...h,hj->...j", x, turn, precision=precision, preferred_element_type=jnp.float32)


def attention_weights(scores: jax.Array, allowed: jax.Array, dtype) -> jax.Array:
  """Softmax in fp32 over the last axis where `allowed`; fully masked rows get zeros, not NaN."""
  scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.where(allowed, probs, 0.0).astype(dtype)


@jax.custom_vjp
def permute_rows(a_rn: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """`a[r, index[r]]` along axis 1 ([R, N, ...]) where each row of `index` ([R, N], or [N]: the same for every
  row) is a permutation and `inverse` its inverse. The gradient is the gather by `inverse`: autodiff's transpose of
  a gather is a scatter-add, which XLA's TPU compiler lowers to a sort of the indices and a scatter (slower to run
  and to compile)."""
  return _take_rows(a_rn, index)


def _take_rows(a, index):
  if index.ndim == 1:
    return jnp.take(a, index, axis=1)
  return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


permute_rows.defvjp(lambda a, index, inverse: (_take_rows(a, index), inverse),
                    lambda inverse, g: (_take_rows(g, inverse), None, None))
