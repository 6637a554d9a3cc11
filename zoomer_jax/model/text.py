"""The Qwen2 text decoder with M-RoPE (`model.*` in HF checkpoints)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from zoomer_jax.model.attention import AttentionMask, attend, context_split
from zoomer_jax.model.config import TextConfig
from zoomer_jax.model.kv_cache import KVCache, write_kv
from zoomer_jax.model.layers import Linear, RMSNorm, SwiGLU, normal_init, permute_rows, precision_for, rotate_half
from zoomer_jax.model.mrope import mrope_cos_sin
from zoomer_jax.model.options import ModelOptions
from zoomer_jax.model.paged import PagedCache, PagedLayer, copy_pages, ragged_attention
from zoomer_jax.model.paged import write as write_pages
from zoomer_jax.model.stack import (ATTENTION_RESIDUALS, DECODER_MLP_UP, num_stacked, remat, scan_modules,
                                    stack_modules)
from zoomer_jax.parallel.rules import axes_size, constrain, logical_to_spec, spec_axes

# The residual stream between layers. Its length axis has a name of its own so that a rule can shard it over the
# tensor axis (sequence parallelism: the layer inputs remat keeps are split, an all-reduce becomes a reduce-scatter
# and an all-gather) while attention and MLP keep the whole sequence and split heads and width.
BTD = ("activation_batch", "activation_norm_length", "activation_embed")


class Embed(nnx.Module):
  """Token embedding table [vocab, d]; ids [B, T] -> [B, T, d]."""

  def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs, rules=None):
    self.embedding = nnx.Param(normal_init(rngs, (vocab, dim), dtype, 0.02), axes=("vocab", "embed"))
    self.rules = rules

  def __call__(self, ids_bt: jax.Array) -> jax.Array:
    return embed_lookup(self.embedding[...], ids_bt, self.rules)


def embed_lookup(table_vd: jax.Array, ids_bt: jax.Array, rules) -> jax.Array:
  """`table[ids]` laid out as the residual stream (`BTD`). With the table's width split over the mesh axes that
  split the stream's rows and tokens (FSDP: "embed" over (fsdp, tensor), rows over fsdp, tokens over tensor),
  each chip looks up every token in its columns and one all-to-all hands each chip its rows' tokens whole. The
  partitioner, left to itself, cannot re-tile [1, 1, n] to [n_rows, n_tokens, 1] and gathers the whole
  [B, T, d] onto every chip; its gradient then follows whatever layout the cotangent arrives in (once a whole
  [vocab, d] table per chip). Elsewhere (no mesh, other rules, sizes the axes do not divide): `jnp.take`."""
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return jnp.take(table_vd, ids_bt, axis=0)
  (b, t), (v, d) = ids_bt.shape, table_vd.shape
  vocab_ax, embed_ax = logical_to_spec(("vocab", "embed"), rules, mesh, (v, d))
  rows_ax, tokens_ax, width_ax = logical_to_spec(BTD, rules, mesh, (b, t, d))
  split = lambda axes: tuple(a for a in spec_axes(axes) if mesh.shape[a] > 1)
  if split(vocab_ax) or split(width_ax) or not split(embed_ax) or split(embed_ax) != split(rows_ax) + split(
      tokens_ax):
    return jnp.take(table_vd, ids_bt, axis=0)
  nb, nt = axes_size(mesh, split(rows_ax)), axes_size(mesh, split(tokens_ax))

  def local(table_l, ids):  # this chip's columns [V, d / n] of every token, then its own tokens' whole rows
    x = jnp.take(table_l, ids, axis=0)
    x = x.reshape(nb, b // nb, nt, t // nt, -1).transpose(0, 2, 1, 3, 4).reshape(nb * nt, b // nb, t // nt, -1)
    x = jax.lax.all_to_all(x, split(embed_ax), 0, 0, tiled=True)  # block j: chip j's columns of our tokens
    return x.transpose(1, 2, 0, 3).reshape(b // nb, t // nt, d)

  P = PartitionSpec
  return jax.shard_map(local, mesh=mesh, in_specs=(P(None, split(embed_ax)), P()),
                       out_specs=P(split(rows_ax) or None, split(tokens_ax) or None, None), check_vma=False)(
                           table_vd, ids_bt)


class Attention(nnx.Module):
  """GQA self-attention with q/k/v biases and M-RoPE; [B, T, d] -> [B, T, d]."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, options: ModelOptions):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.dtype = jnp.dtype(dtype)
    self.precision = precision_for(dtype)
    self.options = options
    self.q_proj = Linear((d,), (n, h), axes=("embed", "q_heads", "head_dim"), use_bias=True,
                         dtype=dtype, rngs=rngs)
    self.k_proj = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), use_bias=True,
                         dtype=dtype, rngs=rngs)
    self.v_proj = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), use_bias=True,
                         dtype=dtype, rngs=rngs)
    self.o_proj = Linear((n, h), (d,), axes=("q_heads", "head_dim", "embed"), use_bias=False,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x_btd, cos_bth, sin_bth, mask: AttentionMask, token_mask_bt, kv=None):
    """Returns (out [B, T, d], this layer's cache arrays with the new keys and values written, or None).

    `kv` is this layer's (keys [B, k, h, S], values [B, k, S, h]) cache arrays, a `PagedLayer` (B = 1: the T
    rows of a ragged step; returned with the new keys and values written to its pages), or None (no cache)."""
    rules = self.options.rules
    q_btnh, k_btkh, v_btkh = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    q_btnh = q_btnh * cos + rotate_half(q_btnh) * sin  # in the activation dtype, as HF
    k_btkh = k_btkh * cos + rotate_half(k_btkh) * sin
    heads = ("activation_batch", "activation_length", "activation_heads", None)
    q_btnh = constrain(q_btnh, heads, rules)
    k_btkh = constrain(k_btkh, heads[:2] + ("activation_kv_heads", None), rules)
    v_btkh = constrain(v_btkh, heads[:2] + ("activation_kv_heads", None), rules)
    # What the "save_attention" remat policy keeps (`stack.REMAT_POLICIES`): the kernel's inputs, and (named by
    # the kernel) its output and log-sum-exp, so the backward runs no attention forward again.
    q_btnh, k_btkh, v_btkh = (checkpoint_name(a, ATTENTION_RESIDUALS) for a in (q_btnh, k_btkh, v_btkh))
    if isinstance(kv, PagedLayer):  # each row reads its own sequence's pages (`paged.ragged_attention`)
      pages = write_pages(kv.pages, k_btkh[0], v_btkh[0], kv.batch, kv.layer)
      out_btnh = ragged_attention(q_btnh[0], pages, kv.batch, kv.layer, rules=rules)[None]
      return self.o_proj(constrain(out_btnh, heads, rules)), kv.replace(pages=pages)
    if kv is not None:  # written in place, then this layer's every slot is read
      kv = write_kv(*kv, k_btkh, v_btkh, mask.q_start)
      k_btkh, v_btkh = kv
    out_btnh = attend(q_btnh, k_btkh, v_btkh, mask, token_mask_bt=token_mask_bt, cached=kv is not None,
                      kind=self.options.attention, rules=rules, dtype=self.dtype,
                      precision=self.precision, block=self.options.attention_block)
    return self.o_proj(constrain(out_btnh, heads, rules)), kv


class DecoderLayer(nnx.Module):
  """x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, options: ModelOptions):
    self.rules = options.rules
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype)
    self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, options=options)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed",
                                            dtype=dtype)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=False, embed_axis="embed",
                      mlp_axis="mlp", dtype=dtype, rngs=rngs, rules=options.rules, up_name=DECODER_MLP_UP)

  def __call__(self, x_btd, cos_bth, sin_bth, mask: AttentionMask, token_mask_bt, kv=None):
    attn, kv = self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, mask, token_mask_bt, kv)
    x_btd = constrain(x_btd + attn, BTD, self.rules)
    return constrain(x_btd + self.mlp(self.post_attention_layernorm(x_btd)), BTD, self.rules), kv


def permute_tokens(a: jax.Array, index: np.ndarray, rules) -> jax.Array:
  """`a[:, index]` ([B, T, ...]) for a permutation `index`, with each row gathered over the chips that hold it only:
  left to itself, the partitioner gathers the whole batch onto every chip to permute a sequence split over the
  mesh. The gradient gathers by the inverse permutation (`layers.permute_rows`); the constraints' transposes put
  the same layouts around it."""
  index = np.asarray(index)
  rest = (None,) * (a.ndim - 2)
  a = constrain(a, ("activation_batch", None) + rest, rules)
  if jnp.issubdtype(a.dtype, jnp.inexact):
    out = permute_rows(a, index, np.argsort(index))
  else:
    out = jnp.take(a, index, axis=1)
  return constrain(out, ("activation_batch", "activation_length") + rest, rules)


class TextDecoder(nnx.Module):
  """Embeddings in, final-norm hidden states out: [B, T, d] -> [B, T, d] (and the updated cache).

  With `options.scan_layers` the layers are one stacked module run by `lax.scan` (`model.stack`)."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, options: ModelOptions):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.options = options
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, rules=options.rules)
    layers = [DecoderLayer(cfg, dtype=dtype, rngs=rngs, options=options) for _ in range(cfg.num_hidden_layers)]
    self.layers = stack_modules(layers) if options.scan_layers else nnx.List(layers)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype)

  def __call__(self, x_btd: jax.Array, positions_3bt: jax.Array, token_mask_bt: jax.Array,
               cache: KVCache | PagedCache | None = None, *,
               remat_policy: str = "none") -> tuple[jax.Array, KVCache | PagedCache | None]:
    """`remat_policy` rematerialises each layer in the backward pass (`model.stack.REMAT_POLICIES`). With a
    `PagedCache`, x is a ragged step's rows [1, T, d] (`model.paged`; the token mask is unused: the step's
    metadata says which rows are real)."""
    cos_bth, sin_bth = mrope_cos_sin(positions_3bt, self.cfg, self.dtype)
    if isinstance(cache, PagedCache):
      return self._paged(x_btd, cos_bth, sin_bth, cache)
    token_mask_bt = token_mask_bt.astype(bool)
    order = None
    if cache is None and self.options.attention == "flash":
      order = context_split(x_btd.shape[0], x_btd.shape[1], self.cfg.num_key_value_heads, self.options.rules,
                            self.options.attention_block)[2]
    if order is not None:  # context parallelism: the layers run in the balanced order, permuted once per forward
      x_btd, cos_bth, sin_bth, token_mask_bt = (permute_tokens(a, order, self.options.rules)
                                                for a in (x_btd, cos_bth, sin_bth, token_mask_bt))
    if cache is None:
      mask = AttentionMask(key_valid=token_mask_bt, q_start=jnp.zeros((), jnp.int32), balanced=order is not None)
    else:
      valid_bs, length = cache.after_write(token_mask_bt)
      mask = AttentionMask(key_valid=valid_bs, q_start=cache.length)
    x_btd = constrain(x_btd.astype(self.dtype), BTD, self.options.rules)

    def run(layer, x, kv):
      return layer(x, cos_bth, sin_bth, mask, token_mask_bt, kv)

    def run_remat(layer, x, kv):  # split, so that only arrays cross jax.checkpoint
      graphdef, state = nnx.split(layer)
      return remat(lambda state, x, kv: run(nnx.merge(graphdef, state), x, kv), remat_policy)(state, x, kv)

    if self.options.scan_layers:
      kv = None if cache is None else (cache.k, cache.v)
      x_btd, kv = scan_modules(lambda layer, x, kv: run(layer, x, kv), self.layers, x_btd, kv,
                               remat_policy=remat_policy,
                               staged_rules=self.options.rules if self.options.staged_gradients else None)
    else:
      kv = [] if cache is not None else None
      for i, layer in enumerate(self.layers):
        step = run if remat_policy == "none" else run_remat
        x_btd, kv_i = step(layer, x_btd, None if cache is None else (cache.k[i], cache.v[i]))
        if cache is not None:
          kv.append(kv_i)
      if cache is not None:
        kv = (tuple(k for k, _ in kv), tuple(v for _, v in kv))
    if cache is not None:
      cache = cache.replace(k=kv[0], v=kv[1], valid=valid_bs, length=length)
    if order is not None:
      x_btd = permute_tokens(x_btd, np.argsort(order), self.options.rules)
    return self.norm(x_btd), cache

  def _paged(self, x_btd, cos_bth, sin_bth, cache: PagedCache) -> tuple[jax.Array, PagedCache]:
    """The layers over a ragged step: [1, T, d] -> [1, T, d], each layer's keys and values written to its pages."""
    batch = cache.batch
    x_btd = constrain(x_btd.astype(self.dtype), BTD, self.options.rules)

    kv = copy_pages(cache.kv, batch)
    if self.options.scan_layers:  # the whole pool is carried and layer i's part read and written in place
      def run_at(layer, carry, i):
        x, kv = carry
        x, kv = layer(x, cos_bth, sin_bth, None, None, PagedLayer(kv, batch, i))
        return (x, kv.pages), None

      (x_btd, kv), _ = scan_modules(run_at, self.layers, (x_btd, kv),
                                    jnp.arange(num_stacked(self.layers), dtype=jnp.int32))
    else:  # each layer reads and writes its part of the whole pool, in place
      for i, layer in enumerate(self.layers):
        x_btd, kv = layer(x_btd, cos_bth, sin_bth, None, None, PagedLayer(kv, batch, i))
        kv = kv.pages
    return self.norm(x_btd), cache.replace(kv=kv)
