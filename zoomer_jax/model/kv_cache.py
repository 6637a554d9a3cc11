"""The decoder's key/value cache.

Slots are physical: tokens are written at `length, length+1, ...` for every sequence of the batch,
and `valid` records which slots hold real tokens (padding never becomes valid). A query attends to a
slot when the slot is valid and not later than the query's own slot, so left padding, padding inside
an extend chunk and per-sequence lengths all reduce to the same mask. Positions (M-RoPE) are
explicit per token and independent of slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from zoomer_jax.model.config import TextConfig


@struct.dataclass
class KVCache:
  k: jax.Array  # [layers, B, S, kv_heads, head_dim]
  v: jax.Array  # [layers, B, S, kv_heads, head_dim]
  valid: jax.Array  # [B, S] bool: slot holds a real token
  length: jax.Array  # int32 []: slots written so far (the next write starts here)

  @classmethod
  def init(cls, cfg: TextConfig, batch: int, size: int, dtype) -> "KVCache":
    shape = (cfg.num_hidden_layers, batch, size, cfg.num_key_value_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               valid=jnp.zeros((batch, size), bool), length=jnp.zeros((), jnp.int32))

  @property
  def size(self) -> int:
    return self.k.shape[2]


def attention_mask(token_mask_bt: jax.Array, cache: KVCache | None) -> tuple[jax.Array, jax.Array]:
  """Returns (allowed [B, T, S], valid [B, S] after writing these T tokens).

  Without a cache the keys are the T tokens themselves (S = T).
  """
  t = token_mask_bt.shape[1]
  if cache is None:
    valid_bs, q_slot, k_slot = token_mask_bt, jnp.arange(t), jnp.arange(t)
  else:
    valid_bs = jax.lax.dynamic_update_slice(cache.valid, token_mask_bt, (0, cache.length))
    q_slot, k_slot = cache.length + jnp.arange(t), jnp.arange(cache.size)
  causal_ts = k_slot[None, :] <= q_slot[:, None]
  return causal_ts[None] & valid_bs[:, None, :], valid_bs
