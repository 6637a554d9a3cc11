"""The Qwen2 text decoder with M-RoPE (`model.*` in HF checkpoints)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoomer_jax.model.config import TextConfig
from zoomer_jax.model.kv_cache import KVCache, attention_mask
from zoomer_jax.model.layers import (Linear, RMSNorm, SwiGLU, attention_weights, normal_init, precision_for,
                                     rotate_half)
from zoomer_jax.model.mrope import mrope_cos_sin


class Embed(nnx.Module):
  """Token embedding table [vocab, d]; ids [B, T] -> [B, T, d]."""

  def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(normal_init(rngs, (vocab, dim), dtype, 0.02), axes=("vocab", "embed"))

  def __call__(self, ids_bt: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids_bt, axis=0)


class Attention(nnx.Module):
  """GQA self-attention with q/k/v biases and M-RoPE; [B, T, d] -> [B, T, d]."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.dtype = jnp.dtype(dtype)
    self.precision = precision_for(dtype)
    self.q_proj = Linear((d,), (n, h), axes=("embed", "q_heads", "head_dim"), use_bias=True,
                         dtype=dtype, rngs=rngs)
    self.k_proj = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), use_bias=True,
                         dtype=dtype, rngs=rngs)
    self.v_proj = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), use_bias=True,
                         dtype=dtype, rngs=rngs)
    self.o_proj = Linear((n, h), (d,), axes=("q_heads", "head_dim", "embed"), use_bias=False,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x_btd, cos_bth, sin_bth, allowed_bts, cache: KVCache | None, layer: int):
    """Returns (out [B, T, d], cache with this layer's new k/v written at `cache.length`)."""
    q_btnh, k_btkh, v_btkh = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    q_btnh = q_btnh * cos + rotate_half(q_btnh) * sin  # in the activation dtype, as HF
    k_btkh = k_btkh * cos + rotate_half(k_btkh) * sin
    if cache is not None:  # write into the stacked buffer in place, then read this layer's slots
      at = (layer, 0, cache.length, 0, 0)
      cache = cache.replace(k=jax.lax.dynamic_update_slice(cache.k, k_btkh[None], at),
                            v=jax.lax.dynamic_update_slice(cache.v, v_btkh[None], at))
      k_btkh, v_btkh = cache.k[layer], cache.v[layer]
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kh, n // kh, h)  # query head i uses kv head i // group
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh, precision=self.precision,
                        preferred_element_type=jnp.float32) * h**-0.5
    probs = attention_weights(scores, allowed_bts[:, None, None], self.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_btkh, precision=self.precision,
                     preferred_element_type=jnp.float32).astype(self.dtype)
    return self.o_proj(out.reshape(b, t, n, h)), cache


class DecoderLayer(nnx.Module):
  """x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype)
    self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed",
                                            dtype=dtype)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=False, embed_axis="embed",
                      mlp_axis="mlp", dtype=dtype, rngs=rngs)

  def __call__(self, x_btd, cos_bth, sin_bth, allowed_bts, cache: KVCache | None, layer: int):
    attn, cache = self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, allowed_bts, cache, layer)
    x_btd = x_btd + attn
    return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), cache


class TextDecoder(nnx.Module):
  """Embeddings in, final-norm hidden states out: [B, T, d] -> [B, T, d] (and the updated cache)."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype)

  def __call__(self, x_btd: jax.Array, positions_3bt: jax.Array, token_mask_bt: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    cos_bth, sin_bth = mrope_cos_sin(positions_3bt, self.cfg, self.dtype)
    allowed_bts, valid_bs = attention_mask(token_mask_bt.astype(bool), cache)
    x_btd = x_btd.astype(self.dtype)
    for i, layer in enumerate(self.layers):
      x_btd, cache = layer(x_btd, cos_bth, sin_bth, allowed_bts, cache, i)
    if cache is not None:
      cache = cache.replace(valid=valid_bs, length=cache.length + x_btd.shape[1])
    return self.norm(x_btd), cache
