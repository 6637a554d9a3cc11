"""GQA softmax attention of the text decoder, three implementations of one contract.

    out_btnh = attend(q_btnh, k, v, mask, options=..., cached=...)

q [B, T, n, h]; without a cache k and v are [B, T, k, h] as projected, with one they are the cache's arrays
(`KVCache`: keys [B, k, h, S], values [B, k, S, h]). Query head i reads kv head i // (n / k). Query t of row b
sits at slot `mask.q_start + t` and reads key slot s when the slot holds a real token and s is not later
(`AttentionMask`); no [B, T, S] mask is ever materialised.

  * `dense`: whole score matrices, in query blocks on CPU (a block's fp32 scores stay in cache and, without a
    cache, block [t0, t1) reads keys [0, t1) only). The reference, and the path of decode steps (T = 1).
  * `splash`: the splash attention Pallas kernel (TPU, no cache), causal with segment ids for padding, under
    `shard_map` over the batch and head axes of the mesh in context.
  * `blockwise`: an online softmax over key blocks of the cache (prefill and extend chunks with
    `attention="flash"`): scores never exceed [B, k, rows, key block].

The vision tower's windows and frames (non-causal, within segments) take `segment_splash` on TPU with "flash":
the splash kernel with a band mask and a segment id per row.

The platform of the compiled program picks among paths (`jax.lax.platform_dependent`), never the host's
backend, so a program compiled for TPU on a CPU host is the TPU program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from zoomer_jax.model.layers import attention_weights
from zoomer_jax.model.stack import ATTENTION_RESIDUALS, loops_unrolled, scan
from zoomer_jax.parallel.rules import Rules, axes_size, logical_to_spec

QUERY_BLOCK = 64  # queries per attention block on CPU: [B, k, 64 * group, S] fp32 scores stay in L2/L3
MAX_QUERY_BLOCKS = 32  # longer sequences take larger blocks, so a layer unrolls at most this many
FLASH_QUERY_BLOCK = 1024  # blockwise attention: queries per block (x group rows) ...
FLASH_KEY_BLOCK = 512  # ... and keys per online-softmax step
SPLASH_BLOCK = 512  # splash attention tile (q, kv, and the backward's) by default, capped by the sequence length


@struct.dataclass
class AttentionMask:
  """Which keys each query reads: slot s when `key_valid[b, s]` and s <= q_start + t (t the query's index)."""

  key_valid: jax.Array  # [B, S] bool: the slot holds a real token (after writing this chunk)
  q_start: jax.Array  # int32 []: the slot of the chunk's first query (the cache's length; 0 without a cache)
  # Without a cache: queries and keys come in `context_split`'s balanced order (the decoder runs in it).
  balanced: bool = struct.field(pytree_node=False, default=False)

  def block(self, t0: int, t1: int, s0, size: int) -> jax.Array:
    """[B, t1 - t0, size] bool for queries [t0, t1) and keys [s0, s0 + size) (s0 may be traced)."""
    q_slot = self.q_start + jnp.arange(t0, t1)
    k_slot = s0 + jnp.arange(size)
    valid = jax.lax.dynamic_slice_in_dim(self.key_valid, s0, size, axis=1)
    return (k_slot[None, :] <= q_slot[:, None])[None] & valid[:, None, :]


def query_blocks(t: int) -> list[int]:
  """CPU block boundaries [0, ..., t] over t queries: the short block (t % size rows) first, where it reads the
  fewest keys."""
  size = max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS // QUERY_BLOCK) * QUERY_BLOCK)
  return [0] + list(range(t % size or min(t, size), t + 1, size))


def _rows(q_btnh: jax.Array, kh: int) -> jax.Array:
  """[B, T, n, h] -> [B, k, T * g, h]: each kv head's queries as rows r = (t, g)."""
  b, t, n, h = q_btnh.shape
  return q_btnh.reshape(b, t, kh, n // kh, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * (n // kh), h)


def _unrows(o_bkrh: jax.Array, t: int) -> jax.Array:
  b, kh, r, h = o_bkrh.shape
  g = r // t
  return o_bkrh.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, kh * g, h)


def _kv_specs(cache_layout: bool) -> tuple[str, str]:
  return ("bkhs", "bksh") if cache_layout else ("bskh", "bskh")


def dense(q_btnh, k, v, mask: AttentionMask, *, bounds: list[int], causal_prefix: bool, cache_layout: bool,
          dtype, precision) -> jax.Array:
  """Whole score matrices for query blocks `bounds`; with `causal_prefix` (no cache: query t at slot t) block
  [t0, t1) reads keys [0, t1) only, the rest being masked anyway."""
  b, t, n, h = q_btnh.shape
  kh, s = (k.shape[1], k.shape[3]) if cache_layout else (k.shape[2], k.shape[1])
  g = n // kh
  q_bktgh = q_btnh.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4)
  k_spec, v_spec = _kv_specs(cache_layout)
  outs = []
  for t0, t1 in zip(bounds[:-1], bounds[1:]):
    s1 = t1 if causal_prefix else s
    k_blk, v_blk = (k[..., :s1], v[:, :, :s1]) if cache_layout else (k[:, :s1], v[:, :s1])
    q_bkrh = q_bktgh[:, :, t0:t1].reshape(b, kh, (t1 - t0) * g, h)  # rows r = (t, g)
    scores = jnp.einsum(f"bkrh,{k_spec}->bkrs", q_bkrh, k_blk, precision=precision,
                        preferred_element_type=jnp.float32) * h**-0.5
    allowed = mask.block(t0, t1, 0, s1)
    probs = attention_weights(scores.reshape(b, kh, t1 - t0, g, s1), allowed[:, None, :, None, :], dtype)
    out = jnp.einsum(f"bkrs,{v_spec}->bkrh", probs.reshape(b, kh, (t1 - t0) * g, s1), v_blk,
                     precision=precision, preferred_element_type=jnp.float32).astype(dtype)
    outs.append(out.reshape(b, kh, t1 - t0, g, h))
  out_bktgh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out_bktgh.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def blockwise(q_btnh, k_bkhs, v_bksh, mask: AttentionMask, *, dtype, precision,
              query_block: int = FLASH_QUERY_BLOCK, key_block: int = FLASH_KEY_BLOCK) -> jax.Array:
  """Online-softmax attention over key blocks of a cache (keys [B, k, h, S], values [B, k, S, h]).

  Equals `dense` up to the order of the sums; rows that read no key get zeros (as `attention_weights`)."""
  b, t, n, h = q_btnh.shape
  kh, s = k_bkhs.shape[1], k_bkhs.shape[3]
  kb = s if loops_unrolled() else min(key_block, s)  # cost probes: one block, the same FLOPs
  n_blocks = -(-s // kb)
  pad = n_blocks * kb - s
  if pad:  # padded slots are invalid keys
    k_bkhs = jnp.pad(k_bkhs, ((0, 0), (0, 0), (0, 0), (0, pad)))
    v_bksh = jnp.pad(v_bksh, ((0, 0), (0, 0), (0, pad), (0, 0)))
    mask = mask.replace(key_valid=jnp.pad(mask.key_valid, ((0, 0), (0, pad))))
  outs = []
  for t0 in range(0, t, query_block):
    t1 = min(t, t0 + query_block)
    q_bkrh = _rows(q_btnh[:, t0:t1], kh)
    g = n // kh
    r = q_bkrh.shape[2]

    def step(carry, j, q_bkrh=q_bkrh, t0=t0, t1=t1):
      m, l, acc = carry
      s0 = j * kb
      k_blk = jax.lax.dynamic_slice_in_dim(k_bkhs, s0, kb, axis=3)
      v_blk = jax.lax.dynamic_slice_in_dim(v_bksh, s0, kb, axis=2)
      scores = jnp.einsum("bkrh,bkhs->bkrs", q_bkrh, k_blk, precision=precision,
                          preferred_element_type=jnp.float32) * h**-0.5
      allowed = jnp.repeat(mask.block(t0, t1, s0, kb)[:, None], g, axis=2)  # rows r = (t, g)
      scores = jnp.where(allowed, scores, -jnp.inf)
      m_new = jnp.maximum(m, scores.max(-1))
      safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.where(allowed, jnp.exp(scores - safe[..., None]), 0.0)
      scale = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
      acc = acc * scale[..., None] + jnp.einsum("bkrs,bksh->bkrh", p.astype(dtype), v_blk, precision=precision,
                                                preferred_element_type=jnp.float32)
      return (m_new, l * scale + p.sum(-1), acc), None

    init = (jnp.full((b, kh, r), -jnp.inf, jnp.float32), jnp.zeros((b, kh, r), jnp.float32),
            jnp.zeros((b, kh, r, h), jnp.float32))
    (_, l, acc), _ = scan(step, init, jnp.arange(n_blocks))
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0).astype(dtype)
    outs.append(_unrows(out, t1 - t0))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _splash_kernel(heads: int, t: int, interpret: bool, q_seq_shards: int = 1, q_order=None,
                   block: int = SPLASH_BLOCK):
  """The kernel for `heads` heads of `t` tokens in tiles of `block` (query and key, forward and backward), its
  mask tables split into `q_seq_shards` query blocks (context parallelism); `q_order` [t] is the original
  position of each query row when the queries come permuted (the keys never are). Built inside the trace that
  uses it (not cached: its mask tables become that trace's constants)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: PLC0415
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # noqa: PLC0415
  # A tile never spans two chunks of a balanced order (`balanced_order`), whose positions are not contiguous.
  blk = min(block, t // q_seq_shards // (1 if q_order is None else 2))
  # Separate dq and dkv backward kernels: the fused one keeps a dq partial per key block ([T / blk, heads, T, h],
  # 3.5 GiB per chip at 32k tokens and 7 heads), where dq's own kernel accumulates in place.
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk, use_fused_bwd_kernel=False)
  causal = sm.CausalMask((t, t))
  if q_order is not None:  # the kernel's causal test reads each row's position from this table
    causal.q_sequence = np.asarray(q_order, np.int32)
  mask = sm.MultiHeadMask([causal for _ in range(heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=q_seq_shards,
                            residual_checkpoint_name=ATTENTION_RESIDUALS, interpret=interpret)


def balanced_order(t: int, shards: int, block: int = SPLASH_BLOCK) -> np.ndarray | None:
  """Causal load balance for queries split over `shards` chips: the sequence cut into 2 x shards chunks, shard i
  taking chunks i and 2 x shards - 1 - i, so every shard reads the same number of key blocks (in order, the last
  shard reads 2 x shards - 1 times the first's). The original position of each row of the permuted order, or
  None when the chunks would not tile (`splash_fits`)."""
  chunk = t // (2 * shards)
  if shards < 2 or t % (2 * shards) or not splash_fits(chunk, block):
    return None
  return np.concatenate([np.r_[i * chunk:(i + 1) * chunk, (2 * shards - 1 - i) * chunk:(2 * shards - i) * chunk]
                         for i in range(shards)])


def splash_fits(t: int, block: int = SPLASH_BLOCK) -> bool:
  """Whether splash tiles a sequence of t tokens in tiles of `block` (a multiple of 128 and of the tile)."""
  return t % 128 == 0 and t % min(block, t) == 0


def context_split(b: int, t: int, kh: int, rules: Rules, block: int = SPLASH_BLOCK):
  """(query shards, the mesh axes of `activation_length`, `balanced_order` or None) of the splash kernel for a
  [b, t] batch with kh kv heads on the mesh in context; (1, None, None) when the queries are not split (no mesh,
  heads and queries both split, or a shard too short to tile)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1, None, None
  heads = logical_to_spec(("activation_kv_heads",), rules, mesh, (kh,))[0]
  length = logical_to_spec(("activation_batch", "activation_length"), rules, mesh, (b, t))[1]
  shards = axes_size(mesh, length)
  if shards == 1 or heads is not None or not splash_fits(t // shards, block):
    return 1, None, None
  return shards, length, balanced_order(t, shards, block)


def splash(q_btnh, k_btkh, v_btkh, token_mask_bt, *, rules: Rules, interpret: bool = False,
           permuted: bool = False, block: int = SPLASH_BLOCK) -> jax.Array:
  """Causal self-attention (no cache) with the splash kernel; padded tokens (segment 0) and real ones (1) never
  read each other. Sharded by `shard_map` over the batch and head axes the rules give the mesh in context, and
  over the query sequence when `activation_length` is split (context parallelism, `context_split`: each shard's
  queries read every key, the keys and values gathered, the kernel's mask tables split with the queries, the
  queries in `balanced_order`). `permuted`: q, k, v and the mask come in that order already (the decoder runs in
  it, `TextDecoder`), and the output stays in it; the keys are put back in order after their gather (local).
  `block`: the kernel's tile (`ModelOptions.attention_block`)."""
  b, t, n, h = q_btnh.shape
  kh = k_btkh.shape[2]
  seg = token_mask_bt.astype(jnp.int32)
  q = (q_btnh * h**-0.5).astype(q_btnh.dtype).transpose(0, 2, 1, 3)  # [B, n, T, h]; splash does not scale
  k, v = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    kernel = _splash_kernel(n, t, interpret, block=block)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=_segments(s, s)))(q, k, v, seg).transpose(
        0, 2, 1, 3)
  P = jax.sharding.PartitionSpec
  batch = logical_to_spec(("activation_batch",), rules, mesh, (b,))[0]
  shards, length, order = context_split(b, t, kh, rules, block)
  if permuted and order is None:
    raise ValueError(f"splash: inputs in a balanced order, but {t} tokens over this mesh have none")
  if shards == 1:
    heads = logical_to_spec(("activation_kv_heads",), rules, mesh, (kh,))[0]

    def local(q, k, v, seg):
      kernel = _splash_kernel(q.shape[1], t, interpret, block=block)
      return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=_segments(s, s)))(q, k, v, seg)

    spec = P(batch, heads, None, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                        check_vma=False)(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)

  kernel = _splash_kernel(n, t, interpret, q_seq_shards=shards, q_order=order, block=block)
  kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, length)))
  inverse = None if order is None else np.argsort(order)

  def local_cp(kernel, q, k, v, q_seg, kv_seg):
    if permuted:  # the gathered keys back in order: the kernel's causal test reads key positions as indices
      k, v, kv_seg = k[:, :, inverse], v[:, :, inverse], kv_seg[:, inverse]
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=_segments(qs, ks)))(q, k, v, q_seg, kv_seg)

  q_seg = seg
  if order is not None and not permuted:  # queries (and their segment ids) in the balanced order, put back after
    q, q_seg = jnp.take(q, order, axis=2), jnp.take(seg, order, axis=1)
  q_spec, kv_spec = P(batch, None, length, None), P(batch, None, None, None)
  out = jax.shard_map(local_cp, mesh=mesh,
                      in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, P(batch, length), P(batch, None)),
                      out_specs=q_spec, check_vma=False)(kernel, q, k, v, q_seg, seg)
  if order is not None and not permuted:
    out = jnp.take(out, inverse, axis=2)
  return out.transpose(0, 2, 1, 3)


VISION_SPLASH_BLOCK = 256  # the vision kernel's tile (128 where the rows do not tile in 256)
LANES = 128  # the vision kernel's head_dim is padded to a whole number of lanes


def vision_splash_block(n: int) -> int:
  return VISION_SPLASH_BLOCK if n % VISION_SPLASH_BLOCK == 0 else 128


def segment_splash_fits(n: int, span: int) -> bool:
  """Whether `segment_splash` tiles n rows in segments of at most `span` rows."""
  return n % 128 == 0 and span <= n


def segment_ids(seg, n: int) -> jax.Array:
  """[n] int32: the segment of each of n rows packed by `seg` (`vision_layout.Segments`); rows no slot holds
  (blank padding) get -1, so they only ever read each other."""
  s, length = seg.gather.shape
  where = jnp.where(seg.valid, seg.gather, n).reshape(-1)
  ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, length)).reshape(-1)
  return jnp.full((n,), -1, jnp.int32).at[where].set(ids, mode="drop")


def segment_splash(q_nkh, k_nkh, v_nkh, ids_n, span: int, *, heads_axes=None, interpret: bool = False,
                   block: int | None = None) -> jax.Array:
  """Non-causal attention within segments of consecutive rows (the vision tower's windows and frames) with the
  splash kernel: row i reads row j when `ids_n[i] == ids_n[j]`. A segment spans at most `span` rows, so the
  kernel's mask is the band |i - j| < span and it visits only the key tiles the band reaches (a few per query
  tile, not all). head_dim is zero-padded to whole 128-lane tiles (80 -> 128 for Qwen2.5-VL: exact, the padded
  dimensions add nothing to q.k and their outputs are dropped), which the matrix units run as fast as 80.
  q, k, v [N, heads, h] -> [N, heads, h]. Under a mesh the kernel runs in `shard_map`, the heads split over
  `heads_axes` (the mesh axes of `vision_heads`, as the projections split them); the tower's `vmap`s over rows
  and pieces name the mesh axes those are split over (`spmd_axis_name`), so each chip runs its own rows' pieces
  and heads. `block`: the tile (default `vision_splash_block(N)`)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: PLC0415
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # noqa: PLC0415
  n, heads, h = q_nkh.shape
  block = vision_splash_block(n) if block is None else block
  band = sm.LocalMask((n, n), window_size=(span - 1, span - 1), offset=0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
                        use_fused_bwd_kernel=False)
  pad = [(0, 0), (0, 0), (0, -h % LANES)]
  q = jnp.pad((q_nkh * h**-0.5).astype(q_nkh.dtype).transpose(1, 0, 2), pad)  # splash does not scale
  k, v = (jnp.pad(a.transpose(1, 0, 2), pad) for a in (k_nkh, v_nkh))

  def run(q, k, v, ids):
    kernel = sk.make_splash_mha(sm.MultiHeadMask([band] * q.shape[0]), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    return kernel(q, k, v, segment_ids=_segments(ids, ids))

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = run(q, k, v, ids_n)
  else:
    P = jax.sharding.PartitionSpec
    spec = P(heads_axes, None, None)
    out = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec, check_vma=False)(
        q, k, v, ids_n)
  return out[..., :h].transpose(1, 0, 2)


def _segments(q_seg, kv_seg):
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds  # noqa
  return SegmentIds(q=q_seg, kv=kv_seg)


def cudnn(q_btnh, k_btkh, v_btkh, token_mask_bt) -> jax.Array:
  """Causal self-attention (no cache) with cuDNN's fused kernel (`jax.nn.dot_product_attention`), for GPU runs
  (`ModelOptions.attention="cudnn"`). Rows are right-padded (training batches): each attends within its length."""
  lengths = token_mask_bt.sum(axis=1).astype(jnp.int32)
  return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, is_causal=True, query_seq_lengths=lengths,
                                      key_value_seq_lengths=lengths, implementation="cudnn")


def attend(q_btnh, k, v, mask: AttentionMask, *, token_mask_bt, cached: bool, kind: str, rules: Rules,
           dtype, precision, block: int = SPLASH_BLOCK) -> jax.Array:
  """Dispatch (module docstring): decode steps and "dot_product" take `dense` (query blocks on CPU), cached
  chunks with "flash" or "cudnn" take `blockwise`, uncached "flash" takes `splash` (tiles of `block`) on TPU and
  `dense` elsewhere, uncached "cudnn" takes `cudnn` (GPU only)."""
  t = q_btnh.shape[1]
  flash = kind in ("flash", "cudnn")
  kw = dict(cache_layout=cached, causal_prefix=not cached, dtype=dtype, precision=precision)

  def dense_cpu(q, k, v, mask):
    return dense(q, k, v, mask, bounds=query_blocks(t), **kw)

  def dense_one(q, k, v, mask):
    return dense(q, k, v, mask, bounds=[0, t], **kw)

  if mask.balanced:  # splash reads this order as it comes; the other paths see the sequence in order
    order = context_split(q_btnh.shape[0], t, k.shape[2], rules, block)[2]
    if cached or kind != "flash" or order is None:
      raise ValueError("attention: a balanced order needs uncached flash attention over a context split")
    inverse = np.argsort(order)

    def in_order(fn):
      def run(q, k, v, mask):
        mask = mask.replace(key_valid=mask.key_valid[:, inverse], balanced=False)
        return fn(q[:, inverse], k[:, inverse], v[:, inverse], mask)[:, order]
      return run

    return jax.lax.platform_dependent(
        q_btnh, k, v, mask, cpu=in_order(dense_cpu), default=in_order(dense_one),
        tpu=lambda q, k, v, mask: splash(q, k, v, token_mask_bt, rules=rules, permuted=True, block=block))
  if cached and flash and t > 1:
    return blockwise(q_btnh, k, v, mask, dtype=dtype, precision=precision)
  if not cached and kind == "cudnn":
    return cudnn(q_btnh, k, v, token_mask_bt).astype(dtype)
  if not cached and flash and splash_fits(t, block):  # shorter or ragged chunks are small enough for `dense`
    return jax.lax.platform_dependent(
        q_btnh, k, v, mask, cpu=dense_cpu, default=dense_one,
        tpu=lambda q, k, v, mask: splash(q, k, v, token_mask_bt, rules=rules, block=block))
  return jax.lax.platform_dependent(q_btnh, k, v, mask, cpu=dense_cpu, default=dense_one)
