"""Token log-probs and entropies without materialising [tokens, vocab] logits.

A 32k-token trajectory against Qwen's 152064-entry vocabulary would need 20 GB for its fp32 logits alone,
and several times that for autodiff's softmax, entropy and gradient buffers. `token_logprobs` instead walks
the vocabulary in chunks with an online logsumexp (running max m, s = sum exp(z - m), and
u = sum exp(z - m) z for the entropy), keeping only [tokens] statistics between chunks, and its backward
pass recomputes each chunk's logits. With `token_chunk` the tokens are walked in blocks too, so the largest
live buffers are a few [token_chunk, vocab_chunk] fp32 blocks.

    log p(y) = z_y - lse(z),    H = lse(z) - E_p[z],    z = round(h @ w) / temperature
    dlogp/dz = onehot(y) - p,   dH/dz = p (E_p[z] - z)

The backward is a custom VJP rather than autodiff of a `jax.checkpoint`ed scan over chunks, which also
recomputes the chunks but keeps more alive: XLA:CPU temp for value-and-grad at T=4096, d=3584, fp32,
vocab_chunk=16384 is 768 MiB here vs 1280 MiB (about 3 vs 5 [T, C] fp32 blocks), and with token blocks
(d=64, C=8192, 1024 tokens) 98 vs 503 MiB, as autodiff accumulates dw per token block. Here each vocab
chunk's dw is summed over token blocks in fp32 and written once, in place, into the [d, V] gradient.

`sequence_logprobs` runs the model's trunk (`Qwen25VL.forward(logits_at=None)`) and applies this to the head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zoomer_jax.model.layers import precision_for
from zoomer_jax.parallel.rules import logical_to_spec, spec_axes
from zoomer_jax.model.stack import scan
from zoomer_jax.model.qwen25vl import Qwen25VL, VisionInput


def head_weight(model: Qwen25VL) -> jax.Array:
  """The output projection as [d, vocab]: lm_head's kernel, or the tied embedding table transposed.

  Under jit the transpose is a view (XLA folds it into the matmul's dimension numbers), so no copy of the
  table is made.
  """
  if model.lm_head is not None:
    return model.lm_head.kernel[...]
  return model.model.embed_tokens.embedding[...].T


def logits_dtype(model: Qwen25VL) -> jnp.dtype:
  """The dtype `model.logits` rounds its fp32-accumulated logits to (both the lm_head and the tied path
  round to the model dtype before casting to fp32); pass it as `dtype_rounding` to reproduce them."""
  return model.dtype


def _chunk_logits(h_nd, w_dc, temperature, dtype_rounding):
  """[..., d] x [d, C] -> fp32 [..., C], rounded as model.logits rounds, then divided by the temperature."""
  z_nc = jax.lax.dot_general(h_nd.astype(w_dc.dtype), w_dc, (((h_nd.ndim - 1,), (0,)), ((), ())),
                             precision=precision_for(w_dc.dtype), preferred_element_type=jnp.float32)
  if dtype_rounding is not None:
    z_nc = z_nc.astype(dtype_rounding).astype(jnp.float32)
  return z_nc / temperature  # divided, not multiplied by 1/T: the sampler divides


def _full_rows(h_nd, *, w_dv, tg_n, temperature, with_entropy, dtype_rounding):
  """Reference path: the whole [..., V] logits at once."""
  z_nv = _chunk_logits(h_nd, w_dv, temperature, dtype_rounding)
  logp_nv = jax.nn.log_softmax(z_nv, axis=-1)
  hit = jnp.arange(z_nv.shape[-1]) == tg_n[..., None]
  logp_n = jnp.sum(jnp.where(hit, logp_nv, 0.0), axis=-1)
  ent_n = -jnp.sum(jnp.exp(logp_nv) * logp_nv, axis=-1) if with_entropy else None
  return logp_n, ent_n


def _rows_in_blocks(h_btd, tg_bt, token_chunk):
  """[B, T, d], [B, T] -> [k, B, C, d], [k, B, C]: each row's tokens in k blocks of C (zero-padded; C = T when
  token_chunk is None). The rows stay an axis of their own, so a block keeps the batch's sharding."""
  b, t, d = h_btd.shape
  c = t if token_chunk is None else min(token_chunk, t)
  k = -(-t // c)
  pad = k * c - t
  h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, k, c, d).transpose(1, 0, 2, 3)
  return h, jnp.pad(tg_bt, ((0, 0), (0, pad))).reshape(b, k, c).transpose(1, 0, 2)


def _vocab_slice(w_dv, i, vocab_chunk):
  """Chunk i of the vocabulary: (w [d, C], column ids [C], mask [C] of the columns no earlier chunk had).

  The last chunk starts at V - C, so every slice is in bounds and the weight is never padded (no copy);
  the columns it shares with the previous chunk are masked out.
  """
  vocab = w_dv.shape[1]
  start = jnp.minimum(i * vocab_chunk, vocab - vocab_chunk)
  col_c = start + jnp.arange(vocab_chunk)
  return jax.lax.dynamic_slice_in_dim(w_dv, start, vocab_chunk, axis=1), start, col_c, col_c >= i * vocab_chunk


def _chunked_forward(h_kcd, w_dv, tg_kc, temperature, vocab_chunk, with_entropy, dtype_rounding, matmul_dtype):
  """Online logsumexp: (lse, target logit, E_softmax[z]) per token, each [k, C]; no [C, V] array is live."""
  n_chunks = -(-w_dv.shape[1] // vocab_chunk)

  def vocab_step(stats, i):
    w_dc, _, col_c, new_c = _vocab_slice(w_dv, i, vocab_chunk)
    w_dc = w_dc.astype(matmul_dtype or w_dv.dtype)

    def block_step(_, xs):
      h_cd, tg_c, m_c, s_c, u_c, zt_c = xs
      z_cv = _chunk_logits(h_cd, w_dc, temperature, dtype_rounding)
      m_new = jnp.maximum(m_c, jnp.max(jnp.where(new_c, z_cv, -jnp.inf), axis=-1))
      e_cv = jnp.where(new_c, jnp.exp(z_cv - m_new[..., None]), 0.0)
      scale_c = jnp.exp(m_c - m_new)
      s_c = s_c * scale_c + jnp.sum(e_cv, axis=-1)
      if with_entropy:
        u_c = u_c * scale_c + jnp.sum(e_cv * z_cv, axis=-1)
      hit = new_c & (col_c == tg_c[..., None])
      return None, (m_new, s_c, u_c, zt_c + jnp.sum(jnp.where(hit, z_cv, 0.0), axis=-1))

    return scan(block_step, None, (h_kcd, tg_kc) + stats)[1], None

  zeros = jnp.zeros(tg_kc.shape, jnp.float32)
  init = (jnp.full(tg_kc.shape, -jnp.inf, jnp.float32), zeros, zeros, zeros)
  (m_kc, s_kc, u_kc, zt_kc), _ = scan(vocab_step, init, jnp.arange(n_chunks))
  lse_kc = m_kc + jnp.log(s_kc)
  return lse_kc, zt_kc, u_kc / s_kc


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked(h_kcd, w_dv, tg_kc, temperature, vocab_chunk, with_entropy, dtype_rounding, matmul_dtype):
  """([k, C] log-probs, [k, C] entropies (zeros unless with_entropy)) over vocabulary chunks. `matmul_dtype`: the
  logits' matmuls run in it (None: w's dtype), while w and its gradient keep w's (fp32: `_sharded`)."""
  lse_kc, zt_kc, ez_kc = _chunked_forward(h_kcd, w_dv, tg_kc, temperature, vocab_chunk, with_entropy,
                                          dtype_rounding, matmul_dtype)
  return zt_kc - lse_kc, (lse_kc - ez_kc) if with_entropy else jnp.zeros_like(lse_kc)


def _chunked_fwd(h_kcd, w_dv, tg_kc, temperature, vocab_chunk, with_entropy, dtype_rounding, matmul_dtype):
  lse_kc, zt_kc, ez_kc = _chunked_forward(h_kcd, w_dv, tg_kc, temperature, vocab_chunk, with_entropy,
                                          dtype_rounding, matmul_dtype)
  out = (zt_kc - lse_kc, (lse_kc - ez_kc) if with_entropy else jnp.zeros_like(lse_kc))
  return out, (h_kcd, w_dv, tg_kc, temperature, lse_kc, ez_kc)


def _chunked_bwd(vocab_chunk, with_entropy, dtype_rounding, matmul_dtype, res, cts):
  """Recomputes each [C, vocab_chunk] block of logits; dz = g_logp (onehot - p) + g_ent p (E[z] - z).

  dw is written chunk by chunk into one [d, V] buffer (accumulated in fp32 over token blocks), dh into one
  fp32 [k, B, C, d] buffer: no [d, V]-sized temporaries besides the gradient itself.
  """
  h_kcd, w_dv, tg_kc, temperature, lse_kc, ez_kc = res
  g_lp_kc, g_ent_kc = cts
  d = h_kcd.shape[-1]
  n_chunks = -(-w_dv.shape[1] // vocab_chunk)

  mm = matmul_dtype or w_dv.dtype

  def vocab_step(carry, i):
    dh_kcd, dw_dv = carry
    w_dc, start, col_c, new_c = _vocab_slice(w_dv, i, vocab_chunk)
    w_dc = w_dc.astype(mm)

    def block_step(dw_dc, xs):
      h_cd, tg_c, lse_c, ez_c, g_lp_c, g_ent_c = xs
      z_cv = _chunk_logits(h_cd, w_dc, temperature, dtype_rounding)
      p_cv = jnp.where(new_c, jnp.exp(z_cv - lse_c[..., None]), 0.0)
      hit = (new_c & (col_c == tg_c[..., None])).astype(jnp.float32)
      dz_cv = g_lp_c[..., None] * (hit - p_cv)
      if with_entropy:
        dz_cv = dz_cv + g_ent_c[..., None] * p_cv * (ez_c[..., None] - z_cv)
      dx_cv = (dz_cv / temperature).astype(mm)  # through the rounding cast: identity, as autodiff
      prec = precision_for(mm)
      lead = tuple(range(dx_cv.ndim - 1))  # the block's rows (and tokens)
      dh_cd = jax.lax.dot_general(dx_cv, w_dc, (((dx_cv.ndim - 1,), (1,)), ((), ())), precision=prec,
                                  preferred_element_type=jnp.float32)
      dw_dc = dw_dc + jax.lax.dot_general(h_cd.astype(mm), dx_cv, ((lead, lead), ((), ())),
                                          precision=prec, preferred_element_type=jnp.float32)
      return dw_dc, dh_cd

    dw_dc, dh_new = scan(block_step, jnp.zeros((d, vocab_chunk), jnp.float32),
                                 (h_kcd, tg_kc, lse_kc, ez_kc, g_lp_kc, g_ent_kc))
    # The overlapping last chunk adds zeros to the columns it shares with the previous one.
    old_dc = jax.lax.dynamic_slice_in_dim(dw_dv, start, vocab_chunk, axis=1).astype(jnp.float32)
    dw_dv = jax.lax.dynamic_update_slice_in_dim(dw_dv, (old_dc + dw_dc).astype(dw_dv.dtype), start, axis=1)
    return (dh_kcd + dh_new, dw_dv), None

  init = (jnp.zeros(h_kcd.shape, jnp.float32), jnp.zeros_like(w_dv))
  (dh_kcd, dw_dv), _ = scan(vocab_step, init, jnp.arange(n_chunks))
  return dh_kcd.astype(h_kcd.dtype), dw_dv, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


HEAD_AXES = ("embed", "vocab")  # `head_weight`'s [d, V] (lm_head's kernel, or the tied table transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gathered(w_dv, spec):
  """Inside `shard_map`: this device's shard of w gathered whole (as `spec` splits it), in fp32."""
  for dim, axes in enumerate(spec):
    if axes is not None:
      w_dv = jax.lax.all_gather(w_dv, axes, axis=dim, tiled=True)
  return w_dv.astype(jnp.float32)


def _gathered_fwd(w_dv, spec):
  return _gathered(w_dv, spec), jnp.zeros((0,), w_dv.dtype)


def _gathered_bwd(spec, res, ct_dv):
  """Each device's fp32 gradient rounded to w's dtype, summed over the devices and scattered back to the shards:
  one reduce-scatter per mesh axis of each split dim (an entry naming fsdp and tensor: over fsdp, then tensor).
  Over both axes at once, XLA's v6e compiler all-reduces the whole [d, V] gradient and slices it (twice the bytes;
  `parallel.rules.reduce_in_stages` does the same for the layers' weights). The rounding comes first because the
  TPU compiler moves it there for the single all-reduce anyway; staged in fp32, the reduce-scatters would move
  twice the bytes."""
  ct_dv = ct_dv.astype(res.dtype)
  for dim, axes in reversed(list(enumerate(spec))):
    for axis in spec_axes(axes):
      ct_dv = jax.lax.psum_scatter(ct_dv, axis, scatter_dimension=dim, tiled=True)
  return (ct_dv,)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _sharded(h_btd, w_dv, tg_bt, rules, *, vocab_chunk, token_chunk, temperature, with_entropy, dtype_rounding):
  """`token_logprobs`' chunked path under `shard_map`, or None when the mesh in context splits nothing here.

  Left to the partitioner, the vocabulary loop gathers each [d, vocab_chunk] slice of the head at every step
  and all-reduces its fp32 gradient there too (per vocabulary chunk and token block, over the batch shards).
  Here each device gathers the whole head once, runs the chunks over its own rows and tokens, accumulating the
  head's gradient in fp32, which leaves in one collective (`_gathered`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  b, t, _ = h_btd.shape
  batch, length = logical_to_spec(("activation_batch", "activation_length"), rules, mesh, (b, t))
  w_spec = logical_to_spec(HEAD_AXES, rules, mesh, w_dv.shape)
  if batch is None and length is None and not any(w_spec):
    return None
  P = jax.sharding.PartitionSpec

  def local(h, w, tg):
    h_kcd, tg_kc = _rows_in_blocks(h, tg, token_chunk)
    out = _chunked(h_kcd, _gathered(w, w_spec), tg_kc, jnp.asarray(temperature, jnp.float32),
                   min(vocab_chunk, w.shape[1]), with_entropy, dtype_rounding, w.dtype)
    unblock = lambda a: a.transpose(1, 0, 2).reshape(h.shape[0], -1)[:, :h.shape[1]]  # noqa: E731
    return tuple(unblock(a) for a in out)

  rows = P(batch, length)
  logp, ent = jax.shard_map(local, mesh=mesh, in_specs=(P(batch, length, None), w_spec, rows),
                            out_specs=(rows, rows), check_vma=False)(h_btd, w_dv, tg_bt)
  return logp, (ent if with_entropy else None)


def token_logprobs(h_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, *, vocab_chunk: int | None,
                   token_chunk: int | None = None, temperature=1.0, with_entropy: bool = True,
                   dtype_rounding=None, rules=None) -> tuple[jax.Array, jax.Array | None]:
  """log_softmax(h @ w / temperature) at `targets` and the softmax's entropy: ([B, T] fp32, [B, T] fp32).

  h_btd [B, T, d] hidden states; w_dv [d, V] output projection; targets_bt [B, T] int ids (an id outside
  [0, V) gives -lse). `vocab_chunk=None` is the plain full-logits path (autodiff); otherwise the vocabulary
  is walked in chunks of that width (any width, divisor of V or not) and the backward pass recomputes each
  chunk. `token_chunk` also walks each row's T tokens in blocks of that many. `dtype_rounding` rounds the
  fp32-accumulated logits to that dtype first (`logits_dtype(model)` reproduces `model.logits`). The
  entropy is None when `with_entropy` is False. Differentiable in h and w. With `rules` (the model's) and a mesh
  in context, the chunked path runs under `shard_map`, each device on its own rows and tokens (`_sharded`).
  """
  b, t, d = h_btd.shape
  if w_dv.ndim != 2 or w_dv.shape[0] != d:
    raise ValueError(f"head weight must be [d={d}, vocab], got shape {w_dv.shape}")
  if targets_bt.shape != (b, t):
    raise ValueError(f"targets have shape {targets_bt.shape}, hidden states need {(b, t)}")
  for name, value in (("vocab_chunk", vocab_chunk), ("token_chunk", token_chunk)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature must be > 0 (score greedy samples at 1.0), got {temperature}")
  if vocab_chunk is not None and rules is not None:
    out = _sharded(h_btd, w_dv, targets_bt.astype(jnp.int32), rules, vocab_chunk=vocab_chunk,
                   token_chunk=token_chunk, temperature=temperature, with_entropy=with_entropy,
                   dtype_rounding=dtype_rounding)
    if out is not None:
      return out
  h_kcd, tg_kc = _rows_in_blocks(h_btd, targets_bt.astype(jnp.int32), token_chunk)
  if vocab_chunk is None:
    block = functools.partial(_full_rows, w_dv=w_dv, temperature=temperature, with_entropy=with_entropy,
                              dtype_rounding=dtype_rounding)
    if h_kcd.shape[0] == 1:
      logp_kc, ent_kc = jax.tree.map(lambda a: a[None], block(h_kcd[0], tg_n=tg_kc[0]))
    else:  # recompute each block's [C, V] logits in the backward rather than saving them
      logp_kc, ent_kc = jax.lax.map(jax.checkpoint(lambda a: block(a[0], tg_n=a[1])), (h_kcd, tg_kc))
  else:
    logp_kc, ent_kc = _chunked(h_kcd, w_dv, tg_kc, jnp.asarray(temperature, jnp.float32),
                               min(vocab_chunk, w_dv.shape[1]), with_entropy, dtype_rounding, None)
  unblock = lambda a: a.transpose(1, 0, 2).reshape(b, -1)[:, :t]  # noqa: E731  ([k, B, C] -> [B, T])
  return unblock(logp_kc), (unblock(ent_kc) if with_entropy else None)


def sequence_logprobs(model: Qwen25VL, ids_bt: jax.Array, positions_3bt: jax.Array, token_mask_bt: jax.Array,
                      images: VisionInput | None = None, videos: VisionInput | None = None, *,
                      vocab_chunk: int | None, token_chunk: int | None = None, temperature=1.0,
                      with_entropy: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """Teacher-forced log p(ids[:, t] | ids[:, :t]) and the entropy of that next-token distribution.

  Returns ([B, T] fp32, [B, T] fp32 or None) aligned with ids: out[:, t] scores ids[:, t] (from the hidden
  state at t - 1), and out[:, 0] = 0. Positions and masks are the caller's (`prepare_inputs` builds them);
  values at padded positions are meaningless and must be masked by the loss.
  """
  h_btd, _ = model.forward(ids_bt, positions_3bt, token_mask_bt, images=images, videos=videos, logits_at=None)
  logp_bt, ent_bt = token_logprobs(h_btd[:, :-1], head_weight(model), ids_bt[:, 1:], vocab_chunk=vocab_chunk,
                                   token_chunk=token_chunk, temperature=temperature,
                                   with_entropy=with_entropy, dtype_rounding=logits_dtype(model))
  first = jnp.zeros((ids_bt.shape[0], 1), jnp.float32)
  logp_bt = jnp.concatenate([first, logp_bt], axis=1)
  ent_bt = None if ent_bt is None else jnp.concatenate([first, ent_bt], axis=1)
  return logp_bt, ent_bt
