"""The paged KV cache (`model/paged.py`, `model/page_allocator.py`).

* a ragged step (decode rows, extend chunks, a fresh prefill, two samples sharing a prompt's pages, one of them
  copied on write, pages scattered over the pool) attends as the dense cache and dense attention do, fp32;
* the same step equals jax's reference of the TPU kernel (`ref_ragged_paged_attention`);
* padding rows and padding sequences change nothing, and steps of one bucket compile once;
* the allocator: alloc, free, share, copy on write, exhaustion and misuse errors;
* the Pallas kernel compiles for v5p and v6e, and a program compiled for TPU takes it (one compiled on CPU not).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import tolerances as tol
from zoomer_jax.aot.hlo import Hlo
from zoomer_jax.aot.target import tpu_target
from zoomer_jax.model import paged
from zoomer_jax.model.attention import AttentionMask, attend
from zoomer_jax.model.config import TextConfig
from zoomer_jax.model.kv_cache import KVCache, write_kv
from zoomer_jax.model.page_allocator import PageAllocator, PagePoolExhausted, bucket, seq_bucket, token_bucket
from zoomer_jax.parallel.rules import DEFAULT_RULES

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 2, 128  # head_dim 128: shapes the TPU kernel tiles
PAGE, PAGES, PER_SEQ = 4, 48, 8
CFG = TextConfig(vocab_size=16, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV_HEADS, intermediate_size=16)
KERNEL = "ragged_paged_attention_kernel"


class Run:
  """An allocator, a pool, and every sequence's keys and values as written ([L, len, k, h] per sequence)."""

  def __init__(self, rng):
    self.rng = rng
    self.alloc = PageAllocator(PAGES, PAGE, PER_SEQ)
    self.kv = paged.PagePool.init(CFG, PAGES, PAGE, jnp.float32).kv
    self.hist = {}

  def new(self, *seqs):
    for s in seqs:
      self.alloc.new(s)
      self.hist[s] = np.zeros((2, LAYERS, 0, KV_HEADS, HEAD_DIM), np.float32)

  def fork(self, src, dst):
    self.alloc.fork(src, dst)
    self.hist[dst] = self.hist[src]

  def step(self, appends, max_seqs=8, max_tokens=32):
    """Appends random keys/values for `appends` through the device functions; returns the step's batch."""
    batch = self.alloc.step(appends, max_seqs=max_seqs, max_tokens=max_tokens)
    kv_new = self.rng.normal(size=(2, LAYERS, max_tokens, KV_HEADS, HEAD_DIM)).astype(np.float32)
    self.kv = paged.copy_pages(self.kv, batch)
    self.kv = jnp.stack([paged.write(self.kv[l], kv_new[0, l], kv_new[1, l], batch) for l in range(LAYERS)])
    cu = batch.cu_q_lens
    for i, (s, _) in enumerate(appends):
      self.hist[s] = np.concatenate([self.hist[s], kv_new[:, :, cu[i]:cu[i + 1]]], axis=2)
    return batch


def _scenario(rng):
  """Five sequences in one step: a and b, two samples of prompt p (13 tokens, the last page shared and part
  full), a extending by 3 (copy on write) and b decoding in place; c extending by a chunk of 6; d a fresh prefill
  of 5; e a decode step. Earlier steps interleave p, c, e and a freed filler, so pages are scattered."""
  run = Run(rng)
  run.new("p", "c", "e", "f")
  run.step([("p", 10), ("f", 3), ("c", 5), ("e", 7)])
  run.step([("c", 4), ("p", 3)])
  run.alloc.free("f")
  run.fork("p", "a")
  run.fork("p", "b")
  run.alloc.free("p")
  run.new("d")
  appends = [("a", 3), ("b", 1), ("c", 6), ("d", 5), ("e", 1)]
  batch = run.step(appends)
  q = rng.normal(size=(32, HEADS, HEAD_DIM)).astype(np.float32)
  return run, appends, batch, q


def test_scenario_shares_copies_and_scatters_pages(rng):
  run, _, batch, _ = _scenario(rng)
  a, b, c = (run.alloc.pages(s) for s in "abc")
  assert a[:3] == b[:3] and all(run.alloc.refcount(p) == 2 for p in a[:3])  # full prompt pages shared
  assert a[3] != b[3]  # the part-full page: a took a copy, b kept the original
  n_copies = int((batch.copy_dst < PAGES).sum())
  assert n_copies == 1 and (int(batch.copy_src[0]), int(batch.copy_dst[0])) == (b[3], a[3])
  assert any(np.diff(run.alloc.pages(s)).tolist() != [1] * (len(run.alloc.pages(s)) - 1) for s in "abce")
  assert c != sorted(c) or np.any(np.diff(c) != 1)


def _dense(run, appends, batch, q_tnh, layer):
  """The same step through the dense `KVCache` and `attention.attend`: row b holds sequence b's context
  left-padded up to slot C and its new tokens from slot C (padding after them); returns [T, n, h]."""
  kv_lens, cu = np.asarray(batch.kv_lens), np.asarray(batch.cu_q_lens)
  q_lens = [n for _, n in appends]
  ctx = [int(kv_lens[i]) - q_lens[i] for i in range(len(appends))]
  b, c, t = len(appends), max(ctx), max(q_lens)
  cache = KVCache.init(CFG, b, c + t, jnp.float32)
  k_ctx, v_ctx, k_new, v_new = (np.zeros((b, n, KV_HEADS, HEAD_DIM), np.float32) for n in (c, c, t, t))
  ctx_mask, new_mask = np.zeros((b, c), bool), np.zeros((b, t), bool)
  q_btnh = np.zeros((b, t, HEADS, HEAD_DIM), np.float32)
  for i, (s, n) in enumerate(appends):
    h = run.hist[s][:, layer]
    k_ctx[i, c - ctx[i]:], v_ctx[i, c - ctx[i]:] = h[0, :ctx[i]], h[1, :ctx[i]]
    k_new[i, :n], v_new[i, :n] = h[0, ctx[i]:], h[1, ctx[i]:]
    ctx_mask[i, c - ctx[i]:], new_mask[i, :n] = True, True
    q_btnh[i, :n] = q_tnh[cu[i]:cu[i + 1]]
  k, v = write_kv(cache.k[layer], cache.v[layer], k_ctx, v_ctx, cache.length)
  valid, length = cache.after_write(ctx_mask)
  cache = cache.replace(valid=valid, length=length)
  k, v = write_kv(k, v, k_new, v_new, cache.length)
  valid, _ = cache.after_write(new_mask)
  out = attend(q_btnh, k, v, AttentionMask(key_valid=valid, q_start=cache.length), token_mask_bt=new_mask,
               cached=True, kind="dot_product", rules=DEFAULT_RULES, dtype=jnp.float32,
               precision=jax.lax.Precision.HIGHEST)
  return np.concatenate([np.asarray(out)[i, :n] for i, n in enumerate(q_lens)])


def test_ragged_step_equals_dense_cache_attention(rng, measure):
  run, appends, batch, q = _scenario(rng)
  n_real = int(batch.cu_q_lens[int(batch.num_seqs[0])])
  for layer in range(LAYERS):
    out = np.asarray(jax.jit(paged.ragged_attention)(q, run.kv[layer], batch))
    want = _dense(run, appends, batch, q, layer)
    diff = float(np.abs(out[:n_real] - want).max())
    measure(f"layer{layer}", diff)
    assert diff <= tol.PAGED_ATTENTION_FP32
    assert not out[n_real:].any()  # padding rows read nothing


def test_ragged_step_equals_the_kernels_reference(rng, measure):
  run, _, batch, q = _scenario(rng)
  n_real = int(batch.cu_q_lens[int(batch.num_seqs[0])])
  ref = ref_ragged_paged_attention(q, run.kv[1], batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                                   batch.num_seqs, sm_scale=HEAD_DIM**-0.5)
  ours = paged.ragged_attention_xla(q, run.kv[1], batch, sm_scale=HEAD_DIM**-0.5, keys_per_block=2 * PAGE)
  diff = float(np.abs(np.asarray(ours)[:n_real] - np.asarray(ref)).max())
  measure("vs_reference", diff)
  assert diff <= tol.PAGED_ATTENTION_FP32


def test_the_kernels_flat_pool_reads_the_layers_pages(rng, measure):
  """The TPU path hands the kernel every layer's pages as one flat pool with the layer's page numbers
  (`paged.flat_pool`, no copy of a layer): the kernel's reference on it equals the layer's attention."""
  run, _, batch, q = _scenario(rng)
  n_real = int(batch.cu_q_lens[int(batch.num_seqs[0])])
  worst = 0.0
  for layer in range(LAYERS):
    flat, fb = paged.flat_pool(run.kv, batch, layer)
    assert flat.shape == (LAYERS * PAGES, PAGE, 2 * KV_HEADS, HEAD_DIM)
    ref = ref_ragged_paged_attention(q, flat, fb.kv_lens, fb.page_indices, fb.cu_q_lens, fb.num_seqs,
                                     sm_scale=HEAD_DIM**-0.5)
    ours = paged.ragged_attention_xla(q, run.kv, batch, sm_scale=HEAD_DIM**-0.5, layer=layer)
    worst = max(worst, float(np.abs(np.asarray(ours)[:n_real] - np.asarray(ref)[:n_real]).max()))
  measure("flat_vs_layer", worst)
  assert worst <= tol.PAGED_ATTENTION_FP32


def _padded(batch, max_seqs):
  s = batch.kv_lens.shape[0]
  pad = lambda x, v: np.concatenate([x, np.full((max_seqs - s,) + x.shape[1:], v, x.dtype)])
  return paged.RaggedBatch(page_indices=pad(batch.page_indices, 0), kv_lens=pad(batch.kv_lens, 0),
                           cu_q_lens=pad(batch.cu_q_lens, batch.cu_q_lens[-1]), num_seqs=batch.num_seqs,
                           copy_src=pad(batch.copy_src, 0), copy_dst=pad(batch.copy_dst, PAGES))


def test_padding_rows_and_sequences_change_nothing(rng):
  """The scenario's step written and attended at 32 rows / 8 sequences, and at 64 / 16 with NaN in every padding
  row of q, k and v: the same pool and the same outputs for the real rows (to fp32 rounding: the decode rows'
  one-row tiles are 8 or 16 to a batch, and XLA's CPU dots may sum in another order at another batch size)."""
  run, appends, batch, q = _scenario(rng)
  n_real = int(batch.cu_q_lens[int(batch.num_seqs[0])])
  k_new, v_new = (rng.normal(size=(32, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(2))
  nan_rows = lambda x: np.concatenate([x[:n_real], np.full((64 - n_real,) + x.shape[1:], np.nan, np.float32)])
  small = paged.write(run.kv[0], k_new, v_new, batch)
  big_batch = _padded(batch, 16)
  big = paged.write(run.kv[0], nan_rows(k_new), nan_rows(v_new), big_batch)
  np.testing.assert_array_equal(np.asarray(small), np.asarray(big))
  out_small = np.asarray(paged.ragged_attention(q, small, batch))
  out_big = np.asarray(paged.ragged_attention(nan_rows(q), big, big_batch))
  assert np.isfinite(out_big).all()
  assert float(np.abs(out_small[:n_real] - out_big[:n_real]).max()) <= tol.PAGED_ATTENTION_FP32
  assert not out_big[n_real:].any()


def test_steps_of_one_bucket_compile_once(rng):
  traces = []

  @jax.jit
  def step(kv, batch, q, k, v):
    traces.append(1)
    kv = paged.copy_pages(kv, batch)
    layer = paged.write(kv[0], k, v, batch)
    return kv.at[0].set(layer), paged.ragged_attention(q, layer, batch)

  run = Run(rng)
  run.new("x", "y")
  kv = run.kv
  for appends in ([("x", 9), ("y", 2)], [("x", 1)], [("x", 1), ("y", 5)]):
    t, s = bucket(sum(n for _, n in appends)), bucket(len(appends))
    batch = run.alloc.step(appends, max_seqs=s, max_tokens=t)
    q, k, v = (rng.normal(size=(t, h, HEAD_DIM)).astype(np.float32) for h in (HEADS, KV_HEADS, KV_HEADS))
    kv, out = step(kv, batch, q, k, v)
    assert np.isfinite(np.asarray(out)).all()
  assert len(traces) == 2  # 16 rows, then 8 rows twice


# --- the allocator ------------------------------------------------------------------------------------------------

def test_alloc_grows_by_pages_and_free_returns_them():
  a = PageAllocator(10, 4, 5)
  a.new("x")
  assert a.append("x", 5) is None and a.pages("x") == [0, 1] and a.length("x") == 5
  a.append("x", 3)  # fills page 1: no new page
  assert a.pages("x") == [0, 1] and a.free_pages == 8
  a.append("x", 1)
  assert a.pages("x") == [0, 1, 2] and a.free_pages == 7
  a.free("x")
  assert a.free_pages == 10 and "x" not in a and a.refcount(0) == 0


def test_fork_shares_pages_and_frees_them_with_the_last_holder():
  a = PageAllocator(10, 4, 5)
  a.new("p")
  a.append("p", 8)  # two full pages: a fork shares them and copies nothing
  a.fork("p", "s0")
  a.fork("p", "s1")
  assert a.pages("s0") == a.pages("s1") == [0, 1] and a.refcount(0) == 3 and a.free_pages == 8
  assert a.append("s0", 2) is None and a.pages("s0") == [0, 1, 2]
  a.free("p")
  a.free("s1")
  assert a.refcount(0) == 1 and a.free_pages == 7
  a.free("s0")
  assert a.free_pages == 10


def test_copy_on_write_of_the_shared_part_full_page():
  a = PageAllocator(10, 4, 5)
  a.new("p")
  a.append("p", 6)  # page 1 holds 2 tokens
  a.fork("p", "s")
  assert a.append("s", 1) == (1, 2)  # s moves to a copy of page 1
  assert a.pages("s") == [0, 2] and a.pages("p") == [0, 1] and a.refcount(1) == 1 and a.refcount(2) == 1
  assert a.append("p", 4) is None and a.pages("p") == [0, 1, 3]  # p alone holds page 1 now: in place
  assert a.append("s", 0) is None  # nothing written, nothing copied


def test_truncate_gives_back_the_pages_past_the_kept_tokens():
  """A burst reserves room and gives back what it did not write: pages wholly past the kept length return to the
  free list (a shared one only loses a reference), the partly filled last page stays, and the freed pages are
  reused; truncating to more than the length, or a negative length, is refused."""
  a = PageAllocator(10, 4, 5)
  a.new("p")
  a.append("p", 6)
  a.fork("p", "s")
  a.append("s", 11)  # 17 tokens: page 1 copied on write, three new pages
  assert a.length("s") == 17 and len(a.pages("s")) == 5 and a.free_pages == 10 - 2 - 4
  a.truncate("s", 7)
  assert a.length("s") == 7 and a.pages("s") == [0, 2] and a.free_pages == 10 - 3
  a.truncate("s", 4)  # the copied page goes back too: s now ends on the shared full page 0
  assert a.pages("s") == [0] and a.refcount(0) == 2 and a.free_pages == 10 - 2
  a.truncate("p", 0)  # p's own page 1 back; page 0 stays, s holds it
  assert a.pages("p") == [] and a.refcount(0) == 1 and a.refcount(1) == 0 and a.free_pages == 10 - 1
  assert a.append("s", 5) is None and a.length("s") == 9  # 5 more on free pages, nothing shared left to copy
  with pytest.raises(ValueError, match="cannot truncate sequence 's' of 9 tokens to 10"):
    a.truncate("s", 10)
  with pytest.raises(ValueError, match="to -1"):
    a.truncate("s", -1)
  a.free("s")
  a.free("p")
  assert a.free_pages == 10 and not a.refcount(0)


def test_copies_on_write_reach_the_device():
  """A copied page holds the shared tokens; writes to the copy leave the original as it was."""
  kv = jnp.zeros((1, 6, 4, 2, 128), jnp.float32).at[:, 1].set(7.0)
  a = PageAllocator(6, 4, 3)
  a.new("p")
  a.append("p", 6)
  a.fork("p", "s")
  batch = a.step([("s", 1)], max_seqs=2, max_tokens=8)
  dst = a.pages("s")[1]
  kv = paged.copy_pages(kv, batch)
  layer = paged.write(kv[0], jnp.ones((8, 1, 128)), jnp.full((8, 1, 128), 2.0), batch)
  np.testing.assert_array_equal(np.asarray(layer[1]), 7.0)
  np.testing.assert_array_equal(np.asarray(layer[dst, :2]), 7.0)
  np.testing.assert_array_equal(np.asarray(layer[dst, 2]), [[1.0] * 128, [2.0] * 128])  # K, then V


def test_exhaustion_names_the_pages_asked_for_and_free_and_changes_nothing():
  a = PageAllocator(4, 4, 8)
  a.new("x")
  a.new("y")
  a.append("x", 10)
  with pytest.raises(PagePoolExhausted, match=r"sequence 'y' asked for 2 pages .*, 1 of 4 free"):
    a.append("y", 5)
  assert a.length("y") == 0 and a.free_pages == 1
  with pytest.raises(PagePoolExhausted, match=r"2 sequences asked for 2 pages, 1 of 4 free"):
    a.step([("x", 3), ("y", 1)], max_seqs=2, max_tokens=8)  # each fits alone
  assert a.length("x") == 10 and a.length("y") == 0 and a.free_pages == 1
  a.fork("x", "z")
  with pytest.raises(PagePoolExhausted, match=r"asked for 2 pages"):  # a copy and a new page
    a.append("z", 3)


def test_a_step_counts_copies_once_per_shared_page():
  """Two samples of a prompt both append: the first copies, the second then writes the original in place."""
  a = PageAllocator(4, 4, 8)
  a.new("p")
  a.append("p", 6)
  a.fork("p", "s")
  batch = a.step([("p", 1), ("s", 1)], max_seqs=2, max_tokens=8)  # needs 1 page, 2 free
  assert int((batch.copy_dst < 4).sum()) == 1 and a.free_pages == 1


def test_misuse_is_refused_by_name():
  a = PageAllocator(8, 4, 2)
  a.new("x")
  with pytest.raises(ValueError, match="exists already"):
    a.new("x")
  with pytest.raises(KeyError) as e:
    a.free("q")
  assert e.value.args[0] == "unknown sequence 'q' (known: 'x')"
  with pytest.raises(ValueError, match="exists already"):
    a.fork("x", "x")
  with pytest.raises(ValueError, match=r"pages_per_seq=2 \(8 tokens\)"):
    a.append("x", 9)
  with pytest.raises(ValueError, match="cannot append -1"):
    a.append("x", -1)
  a.new("y")
  with pytest.raises(ValueError, match="do not fit a step of max_seqs=1"):
    a.step([("x", 1), ("y", 1)], max_seqs=1, max_tokens=8)
  with pytest.raises(ValueError, match="appears twice"):
    a.step([("x", 1), ("x", 1)], max_seqs=2, max_tokens=8)
  with pytest.raises(ValueError, match="at least one token"):
    a.step([("x", 0)], max_seqs=2, max_tokens=8)
  with pytest.raises(ValueError, match="must be positive"):
    PageAllocator(0, 4, 2)
  with pytest.raises(ValueError, match=r"must both be \[T, 2, 128\]"):
    paged.write(jnp.zeros((4, 4, 4, 128)), jnp.zeros((8, 1, 128)), jnp.zeros((8, 1, 128)),
                a.step([("x", 1)], max_seqs=2, max_tokens=8))
  assert [bucket(n) for n in (0, 1, 8, 9, 33)] == [8, 8, 8, 16, 64]
  # two buckets per octave from 96 rows and 12 sequences up: padding at most a third
  assert [token_bucket(n) for n in (0, 9, 96, 97, 129, 192, 193, 660)] == [8, 16, 96, 128, 192, 192, 256, 768]
  assert [seq_bucket(n) for n in (3, 9, 12, 13, 17, 25)] == [8, 12, 12, 16, 24, 32]


def test_step_metadata_follows_the_kernels_conventions():
  a = PageAllocator(16, 4, 4)
  a.new("x")
  a.new("y")
  a.append("x", 5)
  batch = a.step([("x", 1), ("y", 6)], max_seqs=4, max_tokens=8)
  np.testing.assert_array_equal(batch.kv_lens, [6, 6, 0, 0])
  np.testing.assert_array_equal(batch.cu_q_lens, [0, 1, 7, 7, 7])
  np.testing.assert_array_equal(batch.num_seqs, [2])
  np.testing.assert_array_equal(batch.page_indices[:2, :2], [a.pages("x"), a.pages("y")])
  seq, pos, real = paged.token_layout(batch, 8)
  np.testing.assert_array_equal(seq[:7], [0, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(pos[:7], [5, 0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(real, [True] * 7 + [False])


# --- the TPU kernel -----------------------------------------------------------------------------------------------

def _abstract(target, t=32, s=8, heads=28, kv_heads=4, per_seq=16, pages=64, page=16, dtype=jnp.bfloat16):
  """Qwen2.5-VL-7B's attention heads (28 query, 4 kv, head_dim 128) on one chip of the target, bf16."""
  mesh = Mesh(np.asarray(target.devices[:1]).reshape(1), ("x",))
  rep = NamedSharding(mesh, PartitionSpec())
  sds = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=rep)
  batch = paged.RaggedBatch(page_indices=sds((s, per_seq), jnp.int32), kv_lens=sds((s,), jnp.int32),
                            cu_q_lens=sds((s + 1,), jnp.int32), num_seqs=sds((1,), jnp.int32),
                            copy_src=sds((s,), jnp.int32), copy_dst=sds((s,), jnp.int32))
  return (sds((t, heads, HEAD_DIM), dtype), sds((2, pages, page, 2 * kv_heads, HEAD_DIM), dtype),
          sds((t, kv_heads, HEAD_DIM), dtype), sds((t, kv_heads, HEAD_DIM), dtype), batch)


def _decode_layer(q, kv, k, v, batch):
  kv = paged.copy_pages(kv, batch)
  layer = paged.write(kv[1], k, v, batch)
  return kv.at[1].set(layer), paged.ragged_attention(q, layer, batch)


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_kernel_compiles_for_tpu_and_the_tpu_program_takes_it(topology, measure):
  """A whole layer's step (copies, writes, attention) compiled for the chip holds the kernel's custom call; the
  same function compiled on this CPU host does not."""
  target = tpu_target(topology)
  args = _abstract(target)
  compiled = jax.jit(_decode_layer).lower(*args).compile()
  kernels = Hlo(compiled.as_text()).kernels(KERNEL)
  assert len(kernels) == 1 and kernels[0][2][0] == ("bf16", (32, 28, HEAD_DIM)), kernels
  measure("temp_bytes", compiled.memory_analysis().temp_size_in_bytes)
  cpu_args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  assert KERNEL not in jax.jit(_decode_layer).lower(*cpu_args).compile().as_text()


def test_shapes_the_kernel_cannot_tile_take_the_jax_path_on_tpu():
  """head_dim 64 (not a lane tile): the TPU program holds no kernel call, and still compiles."""
  target = tpu_target("v5p:2x2x1")
  q, kv, k, v, batch = _abstract(target)
  small = lambda a, n: jax.ShapeDtypeStruct(a.shape[:-1] + (n,), a.dtype, sharding=a.sharding)
  assert not paged.kernel_fits(small(kv, 64)) and paged.kernel_fits(kv)  # any leading axes
  text = jax.jit(_decode_layer).lower(small(q, 64), small(kv, 64), small(k, 64), small(v, 64), batch).compile()
  assert not Hlo(text.as_text()).kernels(KERNEL)
