"""The paged KV cache on the device: one pool of fixed-size pages that every sequence's keys and values live in,
and ragged steps that mix decode rows and prefill/extend chunks (layout and host side in docs/paged_kv.md).

    pool = PagePool.init(cfg, num_pages, page_size, dtype)   # kv [L, P, page_size, 2 * kv_heads, head_dim]
    batch = allocator.step([(seq, n_new), ...], max_seqs=S, max_tokens=T)   # `page_allocator.PageAllocator`
    kv = copy_pages(pool.kv, batch)                           # copies on write, before any write
    kv_l = write(kv[l], k_tkh, v_tkh, batch)                  # layer l's new keys/values, rotated already
    out_tnh = ragged_attention(q_tnh, kv_l, batch)            # [T, heads, head_dim]

A page holds `page_size` tokens of every kv head, keys and values interleaved on the head axis (key of head i at
2i, value at 2i + 1): the layout of the TPU kernel (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`),
which fetches one page of both with one copy. A step's tokens are flattened into one axis of T rows: sequence i
owns rows `cu_q_lens[i]:cu_q_lens[i + 1]` and holds `kv_lens[i]` tokens once they are written, so its row r sits
at position `kv_lens[i] - q_len + r` and reads keys 0 ... that position. Rows past `cu_q_lens[num_seqs]` and
sequences past `num_seqs` are padding (fixed T and S per bucket): they write nothing and read zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from zoomer_jax.model.config import TextConfig
from zoomer_jax.model.layers import precision_for
from zoomer_jax.model.stack import loops_unrolled, scan
from zoomer_jax.parallel.rules import logical_to_spec

# The plain-JAX path's online-softmax step: keys per block (whole pages). A block's gathered pages and scores are
# [tiles, block] wide; on the CPU small blocks, which stay in cache, ran fastest for decode rows and chunks alike
# (bench/bench_paged_cpu.py).
KEYS_PER_BLOCK = 64
PROBE_KEYS_PER_BLOCK = 512  # cost probes unroll every block: few, large ones there (the same FLOPs)
# When decode rows run apart (`ragged_attention_xla`): the chunks' tiles, their groups and key blocks. Larger than
# the decode rows' blocks: a chunk tile's [rows x group, block] scores are dots big enough to run near the CPU's
# matrix speed, where small ones are dominated by the per-block gather and loop.
CHUNK_ROWS_PER_TILE = 64
TILE_GROUP_ROWS = 64
CHUNK_KEYS_PER_BLOCK = 512
# The kernel's tile: jax's untuned default on v5 and later (`get_tuned_block_sizes`), which cannot be looked up
# here because it reads the host's device, a CPU when a TPU program is compiled on a CPU host.
KERNEL_KV_PAGES_PER_BLOCK = 128
KERNEL_QUERIES_PER_BLOCK = 32
POOL_AXES = ("layers", None, None, "cache_kv_heads", "head_dim")  # the logical axes of kv [L, P, page_size, 2k, h]


@struct.dataclass
class PagePool:
  """Every layer's pages, stacked: kv [layers, num_pages, page_size, 2 * kv_heads, head_dim]."""

  kv: jax.Array

  @classmethod
  def init(cls, cfg: TextConfig, num_pages: int, page_size: int, dtype) -> "PagePool":
    shape = (cfg.num_hidden_layers, num_pages, page_size, 2 * cfg.num_key_value_heads, cfg.head_dim)
    return cls(kv=jnp.zeros(shape, dtype))

  @staticmethod
  def sharding(mesh, rules, shape) -> jax.sharding.NamedSharding:
    """The pool's layout on `mesh`: the kv heads split as the rules say (`POOL_AXES`), the pages not (every
    chip of the engine holds its share of every page)."""
    return jax.sharding.NamedSharding(mesh, logical_to_spec(POOL_AXES, rules, mesh, shape))

  @property
  def num_pages(self) -> int:
    return self.kv.shape[1]

  @property
  def page_size(self) -> int:
    return self.kv.shape[2]


@struct.dataclass
class RaggedBatch:
  """One step's metadata, in the kernel's conventions (S = max_seqs, the bucketed number of sequences)."""

  page_indices: jax.Array  # int32 [S, pages_per_seq]: sequence i's pages in order (unused entries 0)
  kv_lens: jax.Array  # int32 [S]: tokens of sequence i after this step's writes
  cu_q_lens: jax.Array  # int32 [S + 1]: sequence i's new tokens are rows cu_q_lens[i]:cu_q_lens[i + 1]
  num_seqs: jax.Array  # int32 [1]: sequences in the step; the rest are padding
  copy_src: jax.Array  # int32 [S]: copies on write, page copy_src[j] -> copy_dst[j] ...
  copy_dst: jax.Array  # int32 [S]: ... where copy_dst[j] < num_pages (padding names num_pages)


@struct.dataclass
class PagedCache:
  """The decoder's cache kind for a ragged step (`TextDecoder` takes it where it takes a `KVCache`): the pool's
  pages [layers, P, page_size, 2k, h] and the step's metadata. The forward's tokens are the step's T rows as one
  batch row ([1, T]); the step's copies on write are made before any layer writes."""

  kv: jax.Array
  batch: RaggedBatch


@struct.dataclass
class PagedLayer:
  """One layer's pages [P, page_size, 2k, h] and the step's metadata, as a decoder layer's `kv` argument; or,
  with `layer` set (an int, or a traced index in a scan over layers), every layer's pages [L, P, ...] of which
  layer `layer` is read and written (in place: no copy of a layer's slice per step)."""

  pages: jax.Array
  batch: RaggedBatch
  layer: int | jax.Array | None = None


def token_layout(batch: RaggedBatch, t: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sequence [T], position in its sequence [T], real [T] bool) of each of the step's T rows."""
  rows = jnp.arange(t, dtype=jnp.int32)
  s = batch.kv_lens.shape[0]
  # compare_all: no while loop (the default's), which a cost probe's analysis would count once; [T, S] is small
  seq = jnp.minimum(jnp.searchsorted(batch.cu_q_lens[1:], rows, side="right", method="compare_all"),
                    s - 1).astype(jnp.int32)
  q_len = batch.cu_q_lens[seq + 1] - batch.cu_q_lens[seq]
  pos = batch.kv_lens[seq] - q_len + rows - batch.cu_q_lens[seq]
  real = rows < batch.cu_q_lens[batch.num_seqs[0]]
  return seq, pos, real


def copy_pages(kv: jax.Array, batch: RaggedBatch) -> jax.Array:
  """kv [L, P, page_size, 2k, h] with the step's copies on write made (every layer)."""
  return kv.at[:, batch.copy_dst].set(kv[:, batch.copy_src], mode="drop")


def write(kv: jax.Array, k_tkh: jax.Array, v_tkh: jax.Array, batch: RaggedBatch, layer: int | None = None
          ) -> jax.Array:
  """One layer's pages [P, page_size, 2k, h] with the step's new keys and values [T, k, h] written at each row's
  page and offset (padding rows are dropped); with `layer`, kv is every layer's [L, P, ...] and layer `layer`'s
  pages are written."""
  if layer is not None:
    one = jax.ShapeDtypeStruct(kv.shape[1:], kv.dtype)
    slot, kv_t2kh = _slots(one, k_tkh, v_tkh, batch)
    l, p, ps, kk, h = kv.shape
    return kv.reshape(l, p * ps, kk, h).at[layer, slot].set(kv_t2kh, mode="drop").reshape(kv.shape)
  slot, kv_t2kh = _slots(kv, k_tkh, v_tkh, batch)
  p, ps, kk, h = kv.shape
  return kv.reshape(p * ps, kk, h).at[slot].set(kv_t2kh, mode="drop").reshape(kv.shape)


def _slots(kv, k_tkh, v_tkh, batch):
  """(flat slot [T] of each row in pages shaped as kv, out of range for padding; the rows' keys and values
  interleaved [T, 2k, h])."""
  p, ps, kk, h = kv.shape
  t = k_tkh.shape[0]
  if k_tkh.shape != (t, kk // 2, h) or v_tkh.shape != k_tkh.shape:
    raise ValueError(f"keys {k_tkh.shape} and values {v_tkh.shape} must both be [T, {kk // 2}, {h}] for pages "
                     f"{kv.shape}")
  seq, pos, real = token_layout(batch, t)
  page = batch.page_indices[seq, jnp.clip(pos // ps, 0, batch.page_indices.shape[1] - 1)]
  slot = jnp.where(real, page * ps + pos % ps, p * ps)  # out of range: dropped
  kv_t2kh = jnp.stack([k_tkh, v_tkh], axis=2).reshape(t, kk, h).astype(kv.dtype)  # K at 2i, V at 2i + 1
  return slot, kv_t2kh


def query_tiles(batch: RaggedBatch, t: int, rows_per_tile: int, q_lens: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The step's rows cut into tiles of at most `rows_per_tile` rows of one sequence each (as the TPU kernel cuts
  them): (sequence [N], first row [N], rows [N]) of N = T // rows_per_tile + S tiles, a bound every step meets
  (each sequence adds at most one partial tile; with one row per tile there are none, and N = T: a decode step
  reads no page for unused tiles); the used tiles come first, unused ones have 0 rows. `q_lens` [S] (default:
  the batch's) leaves out the sequences given 0."""
  s = batch.kv_lens.shape[0]
  if q_lens is None:
    q_lens = batch.cu_q_lens[1:] - batch.cu_q_lens[:-1]
  q_lens = jnp.where(jnp.arange(s) < batch.num_seqs[0], q_lens, 0)
  tiles = -(-q_lens // rows_per_tile)
  ends = jnp.cumsum(tiles)
  k = jnp.arange(t // rows_per_tile + (s if rows_per_tile > 1 else 0), dtype=jnp.int32)
  seq = jnp.minimum(jnp.searchsorted(ends, k, side="right", method="compare_all"), s - 1).astype(jnp.int32)
  local = k - (ends[seq] - tiles[seq])
  first = batch.cu_q_lens[seq] + local * rows_per_tile
  rows = jnp.where(k < ends[-1], jnp.clip(q_lens[seq] - local * rows_per_tile, 0, rows_per_tile), 0)
  return seq, first, rows


def ragged_attention_xla(q_tnh: jax.Array, kv: jax.Array, batch: RaggedBatch, *, sm_scale: float,
                         keys_per_block: int | None = None, rows_per_tile: int | None = None,
                         precision=None, layer: int | None = None, decode_apart: bool = True) -> jax.Array:
  """Causal GQA attention of a ragged step in plain JAX: q [T, n, h], one layer's pages [P, page_size, 2k, h] ->
  [T, n, h]. The rows are cut into tiles of one sequence (`query_tiles`; `rows_per_tile` defaults to T / S, at
  most 64); each tile gathers its sequence's pages once per block of `keys_per_block` keys (whole pages) and
  runs an online softmax over the blocks with [tile rows x group, block] score matrices, so a prefill chunk reads
  its pages once per tile, not once per row (`keys_per_block` defaults to KEYS_PER_BLOCK, PROBE_KEYS_PER_BLOCK in
  cost probes). Only the blocks that the tiles' longest sequence reaches are read.

  With `decode_apart` (and tiles of several rows, outside cost probes) a step that mixes decode rows with chunks
  runs them apart: the sequences that feed one token in one-row tiles, the chunks' in tiles of `rows_per_tile`
  (default CHUNK_ROWS_PER_TILE) rows and blocks of CHUNK_KEYS_PER_BLOCK keys, in groups of about TILE_GROUP_ROWS
  rows, only as many groups as the chunks fill (a dynamic trip count), each over the blocks its own sequences
  reach. Otherwise a decode row would take a whole tile of the step's tile height, and every tile
  would be computed, used or not. With `layer`, kv is every layer's pages [L, P, ...] and layer `layer`'s are
  read."""
  t, n, h = q_tnh.shape
  kk = kv.shape[-2]
  kh = kk // 2
  if n % kh or q_tnh.shape[2] != kv.shape[-1]:
    raise ValueError(f"queries {q_tnh.shape} do not fit pages {kv.shape} (heads a multiple of {kh}, head_dim "
                     f"{kv.shape[-1]})")
  s = batch.kv_lens.shape[0]
  qt = rows_per_tile or max(1, min(64, t // s))
  precision = precision_for(q_tnh.dtype) if precision is None else precision
  if qt == 1 or not decode_apart or loops_unrolled():
    tiles = query_tiles(batch, t, qt)
    keys = PROBE_KEYS_PER_BLOCK if loops_unrolled() else KEYS_PER_BLOCK
    out, dest = _attend_tiles(q_tnh, kv, batch, tiles, qt, keys_per_block or keys, sm_scale, precision, layer,
                              batch.kv_lens.max())
    return jnp.zeros((t, n, h), q_tnh.dtype).at[dest].set(out.astype(q_tnh.dtype), mode="drop")
  # host arrays (an eager call) cannot be indexed by the loop's index below
  q_tnh, kv, batch = jax.tree.map(jnp.asarray, (q_tnh, kv, batch))
  q_lens = jnp.where(jnp.arange(s) < batch.num_seqs[0], batch.cu_q_lens[1:] - batch.cu_q_lens[:-1], 0)
  one = q_lens == 1
  # Decode rows: a one-row tile per sequence (empty for the others).
  dec = (jnp.arange(s, dtype=jnp.int32), batch.cu_q_lens[:-1], one.astype(jnp.int32))
  out_d, dest_d = _attend_tiles(q_tnh, kv, batch, dec, 1, keys_per_block or KEYS_PER_BLOCK, sm_scale,
                                precision, layer, jnp.where(one, batch.kv_lens, 0).max())
  # Chunks: their tiles come first (`query_tiles`); groups of g tiles, as many as they fill.
  qt = rows_per_tile or min(CHUNK_ROWS_PER_TILE, t)
  seq, first, rows = query_tiles(batch, t, qt, jnp.where(one, 0, q_lens))
  g = max(1, min(seq.shape[0], TILE_GROUP_ROWS // qt))
  groups = -(-seq.shape[0] // g)
  pad = groups * g - seq.shape[0]
  seq, first, rows = (jnp.pad(a, (0, pad)).reshape(groups, g) for a in (seq, first, rows))
  used = -(-jnp.sum(rows > 0) // g)

  def group(i, out):
    tiles = (seq[i], first[i], rows[i])
    reach = jnp.where(rows[i] > 0, batch.kv_lens[seq[i]], 0).max()
    o, dest = _attend_tiles(q_tnh, kv, batch, tiles, qt, keys_per_block or CHUNK_KEYS_PER_BLOCK, sm_scale,
                            precision, layer, reach)
    return out.at[dest].set(o.astype(out.dtype), mode="drop")

  out = jax.lax.fori_loop(0, used, group, jnp.zeros((t, n, h), q_tnh.dtype))
  return out.at[dest_d].set(out_d.astype(q_tnh.dtype), mode="drop")


def _attend_tiles(q_tnh, kv, batch: RaggedBatch, tiles, qt: int, keys_per_block: int, sm_scale: float, precision,
                  layer, reach) -> tuple[jax.Array, jax.Array]:
  """Tiles (sequence [N], first row [N], rows [N]) of at most `qt` rows, over the blocks of `keys_per_block` keys
  that `reach` keys cover (every block in cost probes): (outputs [N * qt, n, h], each output row's row in the step,
  T - out of range - for padding)."""
  t, n, h = q_tnh.shape
  ps, kk = kv.shape[-3], kv.shape[-2]
  kh = kk // 2
  g = n // kh
  seq, first, rows = tiles
  r = jnp.arange(qt)
  row_idx = first[:, None] + r[None, :]  # [N, Q]
  real = r[None, :] < rows[:, None]
  q_len = batch.cu_q_lens[seq + 1] - batch.cu_q_lens[seq]
  pos = batch.kv_lens[seq][:, None] - q_len[:, None] + row_idx - batch.cu_q_lens[seq][:, None]  # [N, Q]
  q_nqkgh = q_tnh[jnp.where(real, row_idx, 0)].reshape(-1, qt, kh, g, h)
  bp = max(1, min(keys_per_block // ps, batch.page_indices.shape[1]))  # pages per block
  n_blocks = -(-batch.page_indices.shape[1] // bp)
  table = jnp.pad(batch.page_indices, ((0, 0), (0, n_blocks * bp - batch.page_indices.shape[1])))[seq]  # [N, .]
  nt = seq.shape[0]

  def step(carry, j):
    m, l, acc = carry
    pages = jax.lax.dynamic_slice_in_dim(table, j * bp, bp, axis=1)  # [N, bp]
    blk = (kv[pages] if layer is None else kv[layer, pages]).reshape(nt, bp * ps, kh, 2, h)
    scores = jnp.einsum("nqkgh,nskh->nkqgs", q_nqkgh, blk[..., 0, :], precision=precision,
                        preferred_element_type=jnp.float32) * sm_scale
    key_pos = j * bp * ps + jnp.arange(bp * ps)
    allowed = ((key_pos[None, None, :] <= pos[..., None]) & real[..., None])[:, None, :, None, :]  # [N,1,Q,1,s]
    scores = jnp.where(allowed, scores, -jnp.inf)
    m_new = jnp.maximum(m, scores.max(-1))
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(allowed, jnp.exp(scores - safe[..., None]), 0.0)
    scale = jnp.where(jnp.isfinite(m), jnp.exp(m - safe), 0.0)
    pv = jnp.einsum("nkqgs,nskh->nkqgh", p.astype(q_tnh.dtype), blk[..., 1, :], precision=precision,
                    preferred_element_type=jnp.float32)
    return (m_new, l * scale + p.sum(-1), acc * scale[..., None] + pv), None

  init = (jnp.full((nt, kh, qt, g), -jnp.inf, jnp.float32), jnp.zeros((nt, kh, qt, g), jnp.float32),
          jnp.zeros((nt, kh, qt, g, h), jnp.float32))
  if loops_unrolled():  # cost probes count every block
    (_, l, acc), _ = scan(step, init, jnp.arange(n_blocks))
  else:  # blocks past the longest sequence hold no key any row reads
    _, l, acc = jax.lax.fori_loop(0, jnp.minimum(-(-reach // (bp * ps)), n_blocks), lambda j, c: step(c, j)[0],
                                  init)
  out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)  # [N, k, Q, g, h]
  out = out.transpose(0, 2, 1, 3, 4).reshape(nt * qt, n, h)
  return out, jnp.where(real, row_idx, t).reshape(-1)  # each real row sits in one tile; the rest are dropped


def flat_pool(kv: jax.Array, batch: RaggedBatch, layer: int | jax.Array) -> tuple[jax.Array, RaggedBatch]:
  """Every layer's pages [L, P, ...] as one pool [L * P, ...] (a reshape, no copy) and the step's metadata with
  layer `layer`'s page numbers in it."""
  return kv.reshape(-1, *kv.shape[2:]), batch.replace(page_indices=batch.page_indices + layer * kv.shape[1])


def ragged_attention_tpu(q_tnh: jax.Array, kv: jax.Array, batch: RaggedBatch, *, sm_scale: float,
                         layer: int | jax.Array | None = None) -> jax.Array:
  """The same contract through the Pallas TPU kernel (`ragged_paged_attention`); padding rows are zeroed, which
  the kernel leaves unwritten. With `layer`, kv is every layer's pages [L, P, ...]: the kernel reads them as one
  flat pool [L * P, ...] (a free reshape) with layer `layer`'s page numbers, since a slice kv[layer] handed to a
  custom call is a copy of the layer's whole pool."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention  # noqa: PLC0415
  t = q_tnh.shape[0]
  if layer is not None:
    kv, batch = flat_pool(kv, batch, layer)
  out = ragged_paged_attention(
      q_tnh, kv, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs, sm_scale=sm_scale,
      num_kv_pages_per_block=min(KERNEL_KV_PAGES_PER_BLOCK, batch.page_indices.shape[1]),
      num_queries_per_block=min(KERNEL_QUERIES_PER_BLOCK, t))
  return jnp.where(token_layout(batch, t)[2][:, None, None], out, 0).astype(q_tnh.dtype)


def kernel_fits(kv: jax.Array) -> bool:
  """Whether the kernel tiles pages [P, page_size, 2k, h]: head_dim a multiple of 128 (one lane tile), and the 2k
  interleaved heads whole sublane tiles of the dtype's packing (1, 2, 4 or a multiple of 8 of them)."""
  packing = 4 // jnp.dtype(kv.dtype).itemsize
  kk, h = kv.shape[-2], kv.shape[-1]
  return h % 128 == 0 and kk % packing == 0 and (kk // packing in (1, 2, 4, 8) or kk // packing % 8 == 0)


def ragged_attention_sharded(q_tnh: jax.Array, kv: jax.Array, batch: RaggedBatch, *, sm_scale: float,
                             layer: int | jax.Array | None = None, rules=None) -> jax.Array:
  """`ragged_attention_tpu` under `shard_map` over the kv-head axis the rules give the mesh in context
  ("activation_kv_heads"): each chip runs the kernel on its query heads [T, n / m, h] and its pages
  [..., page_size, 2k / m, h] (whole (key, value) pairs: the interleaved axis splits between heads), the step's
  metadata replicated. A Pallas call is opaque to XLA's partitioner, which would gather a sharded pool whole."""
  run = lambda q, kv, b, layer: ragged_attention_tpu(q, kv, b, sm_scale=sm_scale, layer=layer)
  mesh = jax.sharding.get_abstract_mesh()
  heads = None
  if not mesh.empty and rules is not None:
    heads = logical_to_spec(("activation_kv_heads",), rules, mesh, (kv.shape[-2] // 2,))[0]
  if heads is None:
    return run(q_tnh, kv, batch, layer)
  q_spec = PartitionSpec(None, heads, None)
  kv_spec = PartitionSpec(*(None,) * (kv.ndim - 2), heads, None)
  meta = jax.tree.map(lambda _: PartitionSpec(), batch)
  if layer is None:
    return jax.shard_map(lambda q, kv, b: run(q, kv, b, None), mesh=mesh, in_specs=(q_spec, kv_spec, meta),
                         out_specs=q_spec, check_vma=False)(q_tnh, kv, batch)
  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, meta, PartitionSpec()), out_specs=q_spec,
                       check_vma=False)(q_tnh, kv, batch, jnp.asarray(layer, jnp.int32))


def ragged_attention(q_tnh: jax.Array, kv: jax.Array, batch: RaggedBatch, layer: int | None = None, *,
                     rules=None) -> jax.Array:
  """q [T, n, h] over one layer's pages [P, page_size, 2k, h] -> [T, n, h], scale head_dim**-0.5 (Qwen2.5-VL's
  text attention: no window, no soft cap). The compiled program's platform picks the path (never the host's
  backend): the Pallas kernel on TPU when it tiles the pages (`kernel_fits`; sharded over kv heads by `rules`,
  `ragged_attention_sharded`), the plain-JAX online softmax elsewhere. With `layer`, kv is every layer's pages
  [L, P, ...] and layer `layer`'s are read."""
  scale = q_tnh.shape[-1] ** -0.5
  if not kernel_fits(kv):  # every branch is traced, so a shape the kernel refuses must not reach it
    return ragged_attention_xla(q_tnh, kv, batch, sm_scale=scale, layer=layer)
  return jax.lax.platform_dependent(
      q_tnh, kv, batch,
      tpu=lambda q, kv, b: ragged_attention_sharded(q, kv, b, sm_scale=scale, layer=layer, rules=rules),
      default=lambda q, kv, b: ragged_attention_xla(q, kv, b, sm_scale=scale, layer=layer))
