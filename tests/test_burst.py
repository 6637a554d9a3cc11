"""The decode burst (`sampling/burst.py`) against one-token ragged steps (`sampling/ragged.py`): the same tokens,
log-probs and pages, with a row that ends on its budget, one on a stop string and one on a stop id mid-burst,
forced tokens, a copy on write of a shared prompt's last page, and the unused room given back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances as tol
from zoomer_jax.agent.rollout import stop_criteria
from zoomer_jax.config_loader import load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.page_allocator import PageAllocator
from zoomer_jax.model.paged import PagePool
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.sampling import SamplingParams, decode_weights
from zoomer_jax.sampling import burst as B
from zoomer_jax.sampling import ragged as R
from zoomer_jax.text import build_tiny_tokenizer

K = 8


@pytest.fixture(scope="module")
def model():
  return Qwen25VL(ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model), rngs=nnx.Rngs(11))


def _prefilled(model, rng, stop):
  """An allocator and pool holding "a" (a 13-token prompt) and "b", "c" forked from one 10-token prompt (their
  shared last page is partly filled), each sequence's first sampled token, its next position and its window."""
  cfg = model.config
  alloc = PageAllocator(num_pages=32, page_size=4, pages_per_seq=8)
  kv = PagePool.init(cfg.text, 32, 4, jnp.float32).kv
  chunks, pos = [], {}
  for seq, n in (("a", 13), ("p", 10)):
    ids = rng.integers(0, 500, n).astype(np.int32)
    alloc.new(seq)
    positions, pos[seq] = R.chunk_positions(cfg, ids, None, 0)
    slots = [R.Slot(n - 1)] * (1 if seq == "a" else 2)
    chunks.append(R.Chunk(seq, ids, positions, slots=slots))
  inp = R.build_step(cfg, alloc, chunks, stop.window)
  kv, out = R.ragged_step(model, kv, inp, jax.random.key(0), stop, SamplingParams(temperature=0.0), end_token=0)
  for s in "bc":
    alloc.fork("p", s)
  alloc.free("p")
  first = dict(zip("abc", np.asarray(out.tokens[:3]).tolist()))
  windows = dict(zip("abc", np.asarray(out.windows[:3])))
  return alloc, kv, first, {"a": pos["a"], "b": pos["p"], "c": pos["p"]}, windows


def test_a_burst_equals_one_token_steps(model, measure):
  """Row a decodes greedily to K tokens, b to its budget of 3, c is forced to a stop string (the zoom tool's
  closing tag) and stops mid-burst. One-token ragged steps over a copy of the same pool draw the same tokens
  with the same log-probs and write the same keys and values; the burst's unused pages go back."""
  tok = build_tiny_tokenizer()
  stop = stop_criteria(tok)
  params = SamplingParams(temperature=0.0)
  close = tok.encode("x</video_zoom>")
  assert 2 < len(close) < K - 1
  forced_c = close + [-1] * (K - len(close))
  limits = {"a": K, "b": 3, "c": K}
  seqs = "abc"

  def setup():
    return _prefilled(model, np.random.default_rng(0), stop)

  # The burst.
  alloc, kv, first, pos, windows = setup()
  starts = {s: alloc.length(s) for s in seqs}
  forced = np.stack([np.full(K, -1), np.full(K, -1), forced_c]).astype(np.int32)
  inp = B.build_burst(alloc, [(s, first[s], pos[s], limits[s]) for s in seqs], [windows[s] for s in seqs], forced,
                      stop.window)
  assert int(inp.copy_dst[1]) < alloc.num_pages and int(inp.copy_dst[2]) == alloc.num_pages  # b copies, c in place
  kv_burst, out = B.burst_step(nnx.split(decode_weights(model)), kv, inp, jax.random.key(1), stop, params)
  out = jax.device_get(out)
  num = dict(zip(seqs, out.num[:3].tolist()))
  assert num == {"a": K, "b": 3, "c": len(close)}
  assert out.stopped[:3].tolist() == [False, False, True]
  assert out.tokens[2, :len(close)].tolist() == close and (out.tokens[2, len(close):] == -1).all()
  for s in seqs:
    alloc.truncate(s, starts[s] + num[s])
  pages = lambda n: -(-n // 4)
  held = pages(13 + K) + 2 + (pages(10 + 3) - 2) + (pages(10 + len(close)) - 2)  # b and c share 2 full pages
  assert [alloc.length(s) for s in seqs] == [13 + K, 10 + 3, 10 + len(close)]
  assert alloc.free_pages == alloc.num_pages - held

  # The same tokens as one-token steps.
  ref, kv_ref, first, pos, windows = setup()
  token, lps, toks = dict(first), {s: [] for s in seqs}, {s: [] for s in seqs}
  live = set(seqs)
  for j in range(K):
    step = [s for s in seqs if s in live]
    chunks = []
    for s in step:
      positions, pos[s] = R.chunk_positions(model.config, [token[s]], None, pos[s])
      chunks.append(R.Chunk(s, np.asarray([token[s]], np.int32), positions,
                            slots=[R.Slot(0, windows[s], int(forced[seqs.index(s), j]))]))
    inp = R.build_step(model.config, ref, chunks, stop.window)
    kv_ref, o = R.ragged_step(model, kv_ref, inp, jax.random.key(2), stop, params, end_token=0)
    for k, s in enumerate(step):
      token[s], windows[s] = int(o.tokens[k]), np.asarray(o.windows[k])
      toks[s].append(token[s])
      lps[s].append(float(o.logprobs[k]))
      if bool(o.hit_token[k] or o.hit_string[k]) or len(toks[s]) == limits[s]:
        live.discard(s)
  worst = 0.0
  for i, s in enumerate(seqs):
    assert out.tokens[i, :num[s]].tolist() == toks[s]
    worst = max(worst, float(np.abs(out.logprobs[i, :num[s]] - lps[s]).max()))
    assert ref.length(s) == alloc.length(s) and len(ref.pages(s)) == len(alloc.pages(s))  # ids differ: order
  measure("burst_vs_steps_logprob_diff", worst)
  assert worst <= tol.LOGPROB_FP32
  assert ref.free_pages == alloc.free_pages
  # Every written key and value agrees; no stopped row wrote past its tokens (its pages hold what the steps hold).
  kv_diff = 0.0
  for s in seqs:
    flat = np.concatenate([np.asarray(kv_burst[:, p]) for p in alloc.pages(s)], axis=1)[:, :alloc.length(s)]
    want = np.concatenate([np.asarray(kv_ref[:, p]) for p in ref.pages(s)], axis=1)[:, :ref.length(s)]
    kv_diff = max(kv_diff, float(np.abs(flat - want).max()))
    tail = alloc.length(s) % 4
    if tail:  # the last page past the sequence's tokens: never written (the pool starts at zero)
      assert not np.asarray(kv_burst[:, alloc.pages(s)[-1], tail:]).any(), s
  held = {p for s in seqs for p in alloc.pages(s)}
  assert not np.asarray(kv_burst[:, [p for p in range(alloc.num_pages) if p not in held]]).any()  # given back
  measure("burst_vs_steps_kv_diff", kv_diff)
  assert kv_diff <= tol.KV_CACHE_FP32


def test_a_burst_refuses_rows_outside_its_length(model):
  tok = build_tiny_tokenizer()
  stop = stop_criteria(tok)
  alloc = PageAllocator(num_pages=8, page_size=4, pages_per_seq=4)
  alloc.new("a")
  with pytest.raises(ValueError, match="every row of a burst feeds 1..8 tokens"):
    B.build_burst(alloc, [("a", 1, 0, 9)], [np.zeros(stop.window, np.uint8)], np.full((1, 8), -1, np.int32),
                  stop.window)
