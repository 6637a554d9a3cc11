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


QUERY_BLOCK = 64  # queries per attention block on CPU: [B, k, 64 * group, S] fp32 scores stay in L2/L3
MAX_QUERY_BLOCKS = 32  # longer sequences take larger blocks, so a layer unrolls at most this many


def query_blocks(t: int) -> list[int]:
  """Block boundaries [0, ..., t] over t queries: the short block (t % size rows) first, where it reads the
  fewest keys. One block on accelerators, whose compilers handle the whole score matrix well."""
  if jax.default_backend() != "cpu":
    return [0, t]
  size = max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS // QUERY_BLOCK) * QUERY_BLOCK)
  return [0] + list(range(t % size or min(t, size), t + 1, size))


def grouped_attention(q_btnh: jax.Array, k: jax.Array, v: jax.Array, allowed_bts: jax.Array, *,
                      causal_prefix: bool, cache_layout: bool, dtype, precision) -> jax.Array:
  """GQA softmax attention; q [B, T, n, h], allowed [B, T, S] -> [B, T, n, h].

  k and v are [B, S, k, h] as projected, or with `cache_layout` as the cache stores them (`KVCache`): keys
  transposed [B, k, h, S], values [B, k, S, h]. (XLA makes those copies itself from [B, S, k, h]; training
  keeps that form, whose gradients are bitwise those of earlier versions.)

  Query head i reads kv head i // (n / k). Queries go in blocks (`query_blocks`); each block is two batched
  GEMMs over (B, kv head) with the block's queries and heads as rows, [B, k, rows, S'], and the fp32
  scores of one block stay in cache. With `causal_prefix` (query t sits at key slot t, as without a cache)
  block [t0, t1) reads keys [0, t1) only: the rest are masked anyway, so skipping them changes nothing but
  the work (about half of it).
  """
  b, t, n, h = q_btnh.shape
  kh, s = (k.shape[1], k.shape[3]) if cache_layout else (k.shape[2], k.shape[1])
  g = n // kh
  q_bktgh = q_btnh.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4)
  bounds = query_blocks(t)
  outs = []
  for t0, t1 in zip(bounds[:-1], bounds[1:]):
    s1 = t1 if causal_prefix else s
    if cache_layout:
      k_spec, v_spec, k_blk, v_blk = "bkhs", "bksh", k[..., :s1], v[:, :, :s1]
    else:
      k_spec, v_spec, k_blk, v_blk = "bskh", "bskh", k[:, :s1], v[:, :s1]
    q_bkrh = q_bktgh[:, :, t0:t1].reshape(b, kh, (t1 - t0) * g, h)  # rows r = (t, g)
    scores = jnp.einsum(f"bkrh,{k_spec}->bkrs", q_bkrh, k_blk, precision=precision,
                        preferred_element_type=jnp.float32) * h**-0.5
    probs = attention_weights(scores.reshape(b, kh, t1 - t0, g, s1), allowed_bts[:, None, t0:t1, None, :s1],
                              dtype)
    out = jnp.einsum(f"bkrs,{v_spec}->bkrh", probs.reshape(b, kh, (t1 - t0) * g, s1), v_blk,
                     precision=precision, preferred_element_type=jnp.float32).astype(dtype)
    outs.append(out.reshape(b, kh, t1 - t0, g, h))
  out_bktgh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out_bktgh.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


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
    if cache is None:
      out_btnh = grouped_attention(q_btnh, k_btkh, v_btkh, allowed_bts, causal_prefix=True, cache_layout=False,
                                   dtype=self.dtype, precision=self.precision)
    else:  # written in place, then this layer's every slot is read
      cache = cache.write(layer, k_btkh, v_btkh)
      out_btnh = grouped_attention(q_btnh, cache.k[layer], cache.v[layer], allowed_bts, causal_prefix=False,
                                   cache_layout=True, dtype=self.dtype, precision=self.precision)
    return self.o_proj(out_btnh), cache


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
