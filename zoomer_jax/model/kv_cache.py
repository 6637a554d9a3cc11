"""The decoder's key/value cache.

Slots are physical: tokens are written at `length, length+1, ...` for every sequence of the batch,
and `valid` records which slots hold real tokens (padding never becomes valid). A query attends to a
slot when the slot is valid and not later than the query's own slot, so left padding, padding inside
an extend chunk and per-sequence lengths all reduce to the same mask (`attention.AttentionMask`).
Positions (M-RoPE) are explicit per token and independent of slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from zoomer_jax.model.config import TextConfig

K_AXES = ("layers", "cache_batch", "cache_kv_heads", None, None)  # logical axes of a stacked key array


def cache_shardings(cache: "KVCache", mesh, rules) -> "KVCache":
  """NamedShardings of a (possibly abstract) cache laid out by the logical rules on `mesh`: rows over the data
  axes, kv heads over tensor, the layers' stack unsplit. The one layout the sampler creates caches in and the
  compiled rollout programs take."""
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from zoomer_jax.parallel.rules import logical_to_spec  # noqa: PLC0415 (rules imports the model package)
  spec = lambda names, x: NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape))
  axes = K_AXES if not isinstance(cache.k, (tuple, list)) else K_AXES[1:]
  return cache.replace(k=jax.tree.map(lambda x: spec(axes, x), cache.k),
                       v=jax.tree.map(lambda x: spec(axes, x), cache.v),
                       valid=spec(("cache_batch", None), cache.valid), length=spec((), cache.length))


@struct.dataclass
class KVCache:
  """Keys are stored transposed, [B, kv_heads, head_dim, S], and values as [B, kv_heads, S, head_dim]: the two
  attention products then read the cache as plain GEMM operands (a [B, S, kv_heads, head_dim] buffer cost XLA:CPU
  a transposing copy of every layer's keys and values at every decode step). An unrolled model keeps one array
  per layer (`k`, `v` tuples); a scanned model (`ModelOptions.scan_layers`) one stacked array [layers, ...] that
  the layer scan reads and writes layer by layer."""

  k: tuple[jax.Array, ...] | jax.Array  # per layer [B, kv_heads, head_dim, S], or stacked [L, B, ...]
  v: tuple[jax.Array, ...] | jax.Array  # per layer [B, kv_heads, S, head_dim], or stacked
  valid: jax.Array  # [B, S] bool: slot holds a real token
  length: jax.Array  # int32 []: slots written so far (the next write starts here)

  @classmethod
  def init(cls, cfg: TextConfig, batch: int, size: int, dtype, *, stacked: bool = False) -> "KVCache":
    kh, h, n = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    if stacked:
      k, v = jnp.zeros((n, batch, kh, h, size), dtype), jnp.zeros((n, batch, kh, size, h), dtype)
    else:
      k = tuple(jnp.zeros((batch, kh, h, size), dtype) for _ in range(n))
      v = tuple(jnp.zeros((batch, kh, size, h), dtype) for _ in range(n))
    return cls(k=k, v=v, valid=jnp.zeros((batch, size), bool), length=jnp.zeros((), jnp.int32))

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, tuple)

  @property
  def size(self) -> int:
    return self.valid.shape[1]

  def after_write(self, token_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(valid [B, S] once a chunk with this token mask is written at `length`, the new length)."""
    valid = jax.lax.dynamic_update_slice(self.valid, token_mask_bt.astype(bool), (0, self.length))
    return valid, self.length + token_mask_bt.shape[1]


def write_kv(k_bkhs: jax.Array, v_bksh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
             start: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One layer's cache arrays with new keys and values [B, T, kv_heads, head_dim] written at slots start, ..."""
  k = jax.lax.dynamic_update_slice(k_bkhs, k_btkh.transpose(0, 2, 3, 1).astype(k_bkhs.dtype), (0, 0, 0, start))
  v = jax.lax.dynamic_update_slice(v_bksh, v_btkh.transpose(0, 2, 1, 3).astype(v_bksh.dtype), (0, 0, start, 0))
  return k, v
