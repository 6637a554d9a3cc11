"""The decoder over the paged cache (`model/paged.py` as a cache kind of the one trunk, `sampling/ragged.py`):
ragged steps that mix a prefill with images, a text prefill, an extend chunk with an image and decode rows give
the logits the dense path gives (`sampler.prefill` / `sampler.extend` per sequence), fp32; the step's sampler
draws what greedy decoding of those logits draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances as tol
from zoomer_jax.config_loader import load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.options import ModelOptions
from zoomer_jax.model.page_allocator import PageAllocator
from zoomer_jax.model.paged import PagedCache, PagePool
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.sampling import SamplingParams, StopCriteria, extend, prefill
from zoomer_jax.sampling import ragged as R

PATCH_DIM = 1176


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model)
  return Qwen25VL(cfg, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def scanned_model():
  """Stacked layers run by `lax.scan`: the paged step carries the whole pool through the scan."""
  cfg = ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model)
  return Qwen25VL(cfg, rngs=nnx.Rngs(7), options=ModelOptions(scan_layers=True))


def _image(rng, grid):
  n = int(np.prod(grid))
  return rng.normal(size=(n, PATCH_DIM)).astype(np.float32), np.asarray([grid], np.int64)


def _with_images(cfg, rng, text_lens, grids):
  """Ids of text runs with an image between consecutive runs, and the images' pixels and grids."""
  ids, pix, gs = [], [], []
  for k, n in enumerate(text_lens):
    ids += rng.integers(0, 500, n).tolist()
    if k < len(grids):
      p, g = _image(rng, grids[k])
      ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (int(np.prod(grids[k])) // 4) + \
          [cfg.vision_end_token_id]
      pix.append(p)
      gs.append(g)
  return (np.asarray(ids, np.int32), np.concatenate(pix) if pix else None,
          np.concatenate(gs) if gs else None)


@nnx.jit(graph_updates=False)
def _paged_logits(model, kv, inp):
  t = inp.ids.shape[0]
  return model.forward(inp.ids[None], inp.positions[:, None], jnp.ones((1, t), bool), images=inp.images,
                       cache=PagedCache(kv=kv, batch=inp.batch), logits_at=inp.slot_rows)


class Dense:
  """One sequence on the dense path: its own batch-1 cache, `prefill` then `extend` chunks."""

  def __init__(self, model):
    self.model, self.cache, self.pos = model, None, None

  def feed(self, ids, pixels=None, grids=None):
    vision = {} if grids is None else dict(pixel_values=pixels, image_grid_thw=grids)
    if self.cache is None:
      logits, self.cache, self.pos = prefill(self.model, ids[None], cache_size=256, **vision)
    else:
      logits, self.cache, self.pos = extend(self.model, self.cache, ids[None], None, self.pos, **vision)
    return np.asarray(logits[0])


@pytest.mark.parametrize("layers", ["unrolled", "scanned"])
def test_ragged_steps_equal_the_dense_path(model, scanned_model, layers, rng, measure):
  model = scanned_model if layers == "scanned" else model
  cfg = model.config
  alloc = PageAllocator(num_pages=64, page_size=8, pages_per_seq=16)
  kv = PagePool.init(cfg.text, 64, 8, jnp.float32).kv
  next_pos = {}
  dense = {s: Dense(model) for s in "abc"}
  a = _with_images(cfg, rng, [5, 3, 4], [(1, 4, 4), (2, 4, 6)])  # a prefill with an image and a 2-frame video grid
  b = _with_images(cfg, rng, [11], [])  # a text prefill
  c = _with_images(cfg, rng, [3], [])
  c_obs = _with_images(cfg, rng, [4, 6], [(1, 6, 4)])  # an extend chunk with an image
  steps = [  # (seq, (ids, pixels, grids)) per step; a seq's first chunk is its prefill
      [("a", a), ("b", b)],
      [("a", (rng.integers(0, 500, 1).astype(np.int32), None, None)), ("c", c),
       ("b", (rng.integers(0, 500, 1).astype(np.int32), None, None))],
      [("c", c_obs), ("a", (rng.integers(0, 500, 1).astype(np.int32), None, None))],
      [(s, (rng.integers(0, 500, 1).astype(np.int32), None, None)) for s in "cab"],
  ]
  worst = 0.0
  for step in steps:
    chunks = []
    for seq, (ids, pix, grids) in step:
      if seq not in next_pos:
        alloc.new(seq)
        next_pos[seq] = 0
      positions, next_pos[seq] = R.chunk_positions(cfg, ids, grids, next_pos[seq])
      chunks.append(R.Chunk(seq, ids, positions, pix, grids, [R.Slot(len(ids) - 1)]))
    inp = R.build_step(cfg, alloc, chunks, window=8)
    got, cache = _paged_logits(model, kv, inp)
    kv = cache.kv
    for k, (seq, (ids, pix, grids)) in enumerate(step):
      want = dense[seq].feed(ids, pix, grids)
      assert int(dense[seq].pos[0]) == next_pos[seq]
      worst = max(worst, float(np.abs(np.asarray(got[k]) - want).max()))
  measure("ragged_vs_dense_logits", worst)
  assert worst <= tol.PAGED_STEP_LOGITS_FP32


def test_the_steps_sampler_draws_what_greedy_decoding_draws(model, rng, measure):
  """Two sequences and three slots (two on one row: a shared prompt's samples); greedy tokens are the argmax of
  the dense logits over the allowed ids, log-probs their log-softmax; a forced token is scored, not drawn."""
  cfg = model.config
  alloc = PageAllocator(num_pages=16, page_size=8, pages_per_seq=8)
  kv = PagePool.init(cfg.text, 16, 8, jnp.float32).kv
  stop = StopCriteria.build([580], suppress_ids=[cfg.image_token_id], vocab_limit=cfg.text.vocab_size)
  a = _with_images(cfg, rng, [6, 2], [(1, 4, 4)])
  b = _with_images(cfg, rng, [9], [])
  chunks = []
  for seq, (ids, pix, grids) in (("a", a), ("b", b)):
    alloc.new(seq)
    positions, _ = R.chunk_positions(cfg, ids, grids, 0)
    chunks.append((seq, ids, positions, pix, grids))
  slots = {"a": [R.Slot(len(a[0]) - 1), R.Slot(len(a[0]) - 1, forced=580)], "b": [R.Slot(len(b[0]) - 1)]}
  inp = R.build_step(cfg, alloc, [R.Chunk(*c, slots[c[0]]) for c in chunks], window=stop.window)
  _, out = R.ragged_step(model, kv, inp, jax.random.key(0), stop, SamplingParams(temperature=0.0), end_token=580)
  la, lb = Dense(model).feed(a[0], a[1], a[2]), Dense(model).feed(b[0])
  want_tok, want_lp = [], []
  for logits, forced in ((la, -1), (la, 580), (lb, -1)):
    allowed = logits.copy()
    allowed[cfg.image_token_id] = -np.inf
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    tok = int(np.argmax(allowed)) if forced < 0 else forced
    want_tok.append(tok)
    want_lp.append(logp[tok])
  assert np.asarray(out.tokens[:3]).tolist() == want_tok
  assert np.asarray(out.hit_token[:3]).tolist() == [t == 580 for t in want_tok]
  diff = float(np.abs(np.asarray(out.logprobs[:3]) - want_lp).max())
  measure("ragged_sampler_logprob_diff", diff)
  assert diff <= tol.LOGPROB_FP32
  logp_end = [float(l[580] - l.max() - np.log(np.exp(l - l.max()).sum())) for l in (la, la, lb)]
  assert float(np.abs(np.asarray(out.end_logprob[:3]) - logp_end).max()) <= tol.LOGPROB_FP32


@pytest.mark.parametrize("rows_per_tile", [1, 3, 64])
def test_query_tiles_of_any_size_give_the_same_attention(rng, rows_per_tile, measure):
  """The plain-JAX path cuts rows into tiles of one sequence; decode rows, chunks longer than a tile and padding
  rows give what the default tiling gives, whatever the tile size."""
  from zoomer_jax.model import paged
  alloc = PageAllocator(num_pages=32, page_size=4, pages_per_seq=8)
  kv = jnp.asarray(rng.normal(size=(32, 4, 4, 16)).astype(np.float32))
  for s, n in (("a", 9), ("b", 1), ("c", 20)):
    alloc.new(s)
    alloc.append(s, n)
  batch = alloc.step([("a", 1), ("c", 7), ("b", 5)], max_seqs=8, max_tokens=16)
  q = jnp.asarray(rng.normal(size=(16, 4, 16)).astype(np.float32))
  want = paged.ragged_attention_xla(q, kv, batch, sm_scale=0.25, keys_per_block=8)
  got = paged.ragged_attention_xla(q, kv, batch, sm_scale=0.25, keys_per_block=8, rows_per_tile=rows_per_tile)
  assert float(jnp.abs(want[13:]).max()) == 0.0  # padding rows read nothing
  diff = float(jnp.abs(want - got).max())
  measure("tiles_vs_default", diff)
  assert diff <= tol.PAGED_ATTENTION_FP32


@pytest.mark.parametrize("rows_per_tile", [None, 2, 8])
def test_decode_rows_apart_give_the_same_attention(rng, rows_per_tile, measure, monkeypatch):
  """A step mixing decode rows with chunks runs them apart on the plain-JAX path (one-row tiles for the decode
  rows, the chunks' tiles in groups, only the groups they fill): the same attention as one tiling of every row,
  padding rows zero. Groups of two tiles, so that the chunks fill several and leave some unused."""
  from zoomer_jax.model import paged
  monkeypatch.setattr(paged, "CHUNK_ROWS_PER_TILE", 2)  # taken when rows_per_tile is None
  monkeypatch.setattr(paged, "TILE_GROUP_ROWS", 2 * (rows_per_tile or 2))
  alloc = PageAllocator(num_pages=64, page_size=4, pages_per_seq=12)
  kv = jnp.asarray(rng.normal(size=(64, 4, 4, 16)).astype(np.float32))
  for s, n in (("a", 9), ("b", 1), ("c", 20), ("d", 30), ("e", 3)):
    alloc.new(s)
    alloc.append(s, n)
  batch = alloc.step([("a", 1), ("c", 7), ("d", 1), ("b", 5), ("e", 1)], max_seqs=8, max_tokens=24)
  q = jnp.asarray(rng.normal(size=(24, 4, 16)).astype(np.float32))
  run = lambda apart: jax.jit(lambda q, kv, b: paged.ragged_attention_xla(
      q, kv, b, sm_scale=0.25, keys_per_block=8, rows_per_tile=rows_per_tile, decode_apart=apart))(q, kv, batch)
  want, got = run(False), run(True)
  assert float(jnp.abs(got[15:]).max()) == 0.0  # padding rows read nothing
  assert float(jnp.abs(got[:15]).min(axis=(1, 2)).max()) > 0  # every real row was written
  diff = float(jnp.abs(want - got).max())
  measure("decode_apart_vs_together", diff)
  assert diff <= tol.PAGED_ATTENTION_FP32
