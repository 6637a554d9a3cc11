"""A decode burst: up to K tokens for every decoding sequence of the paged cache in one device call.

    inp = build_burst(alloc, [(seq, last_token, position, limit), ...], windows, forced, k)  # reserves pages
    kv, out = burst_step(model, kv, inp, key, stop, params)
    for each row s: alloc.truncate(seq, start_length + out.num[s])                           # the unused room back

The continuous engine's step (`sampling/ragged.py`) feeds one token per decoding sequence and returns to the host.
When a step holds only decode rows (every sequence feeds exactly one token, its last sampled one), a burst runs
the same step K times in a `lax.while_loop` on the device: iteration j feeds each active row's last token at its
next position (text: the three M-RoPE positions equal), writes its keys and values to its pages, and draws the
next token with `ragged.draw`, as the one-token step does (the same `sample`, forced tokens [S, K], stop ids,
stop strings on the byte window). A row stops on a stop id or string, or after `limit` tokens (its turn's
budget, its page table); the loop ends when every row has stopped or after K iterations.

Stopped rows write nothing: each iteration's ragged batch gives them no row (q_len 0), and the live rows are
packed at the front of the S device rows, so a stopped row neither corrupts its pages nor reads another's.
Pages for `limit` tokens per row are reserved on the host before the call (copies on write made once, at the
start); the caller truncates each sequence to what was fed. Shapes: S rows (`seq_bucket`), K and the page table
fixed, so a rollout compiles one burst program per S bucket; `TRACES["burst"]` counts traces.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zoomer_jax.model.page_allocator import PageAllocator, seq_bucket
from zoomer_jax.model.paged import PagedCache, RaggedBatch, copy_pages
from zoomer_jax.sampling.ragged import draw
from zoomer_jax.sampling.sampler import SamplingParams, StopCriteria, draw_keys

TRACES = {"burst": 0}


@struct.dataclass
class BurstInput:
  """A burst's device inputs (numpy leaves); S rows (bucketed), K = forced.shape[1] iterations at most."""

  tokens: np.ndarray  # int32 [S]: each row's last sampled token, the first it feeds
  positions: np.ndarray  # int32 [S]: that token's M-RoPE position (t = h = w for text)
  kv_start: np.ndarray  # int32 [S]: tokens in the row's pages before the burst; the first is written there
  limit: np.ndarray  # int32 [S]: the most tokens the row feeds (0: a padding row)
  page_indices: np.ndarray  # int32 [S, pages_per_seq]: the row's pages with room for `limit` more tokens
  copy_src: np.ndarray  # int32 [S]: copies on write, made once before the first iteration ...
  copy_dst: np.ndarray  # int32 [S]: ... (num_pages: none)
  windows: np.ndarray  # uint8 [S, W]: each row's byte window before the burst
  forced: np.ndarray  # int32 [S, K]: forced token of each iteration (-1: sample)
  draws: np.ndarray  # int32 [S, 2]: (trajectory, token index of the first draw); iteration j draws index + j


@struct.dataclass
class BurstOut:
  tokens: jax.Array  # int32 [S, K]: sampled tokens (-1 past num)
  logprobs: jax.Array  # fp32 [S, K] (0 past num)
  num: jax.Array  # int32 [S]: tokens fed (= tokens sampled; the last sampled one is not in the pages)
  stopped: jax.Array  # bool [S]: the last token is a stop id or ends a stop string
  windows: jax.Array  # uint8 [S, W]: each row's window after its last token


def build_burst(alloc: PageAllocator, rows: Sequence[tuple[Hashable, int, int, int]], windows: Sequence[np.ndarray],
                forced: np.ndarray, window: int, draws: Sequence[tuple[int, int]] | None = None) -> BurstInput:
  """Reserves room for `limit` tokens of each `(seq, last token, position, limit)` in `alloc` (its length grows by
  limit: truncate it after the call) and lays the burst out in S = seq_bucket(rows) rows; `forced` [rows, K];
  `draws` [rows] (trajectory, token index) of each row's first sampled token (`sampler.draw_keys`)."""
  n, k = len(rows), forced.shape[1]
  if any(lim < 1 or lim > k for *_, lim in rows):
    raise ValueError(f"every row of a burst feeds 1..{k} tokens: {[r[3] for r in rows]}")
  s = seq_bucket(n)
  out = dict(tokens=np.zeros(s, np.int32), positions=np.zeros(s, np.int32), kv_start=np.zeros(s, np.int32),
             limit=np.zeros(s, np.int32), page_indices=np.zeros((s, alloc.pages_per_seq), np.int32),
             copy_src=np.zeros(s, np.int32), copy_dst=np.full(s, alloc.num_pages, np.int32),
             windows=np.zeros((s, window), np.uint8), forced=np.full((s, k), -1, np.int32),
             draws=np.zeros((s, 2), np.int32))
  for i, (seq, token, pos, lim) in enumerate(rows):
    out["kv_start"][i] = alloc.length(seq)
    copy = alloc.append(seq, lim)
    if copy is not None:
      out["copy_src"][i], out["copy_dst"][i] = copy
    pages = alloc.pages(seq)
    out["page_indices"][i, :len(pages)] = pages
    out["tokens"][i], out["positions"][i], out["limit"][i] = token, pos, lim
    out["windows"][i] = windows[i]
  out["forced"][:n] = forced
  if draws is not None:
    out["draws"][:n] = draws
  return BurstInput(**out)


@struct.dataclass
class _Loop:
  j: jax.Array
  key: jax.Array
  kv: jax.Array
  token: jax.Array  # [S]: the token each row feeds next
  live: jax.Array
  num: jax.Array
  stopped: jax.Array
  windows: jax.Array
  tokens: jax.Array
  logprobs: jax.Array


def _batch(inp: BurstInput, live, num, num_pages: int) -> tuple[RaggedBatch, jax.Array, jax.Array]:
  """One iteration's ragged batch (one row per live sequence, packed at the front; stopped ones have q_len 0),
  each sequence's row (its logits), and each row's sequence's index for the packed ids."""
  s = live.shape[0]
  cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(live.astype(jnp.int32))])
  batch = RaggedBatch(page_indices=inp.page_indices, kv_lens=inp.kv_start + num + live.astype(jnp.int32),
                      cu_q_lens=cu, num_seqs=jnp.full((1,), s, jnp.int32), copy_src=jnp.zeros(1, jnp.int32),
                      copy_dst=jnp.full((1,), num_pages, jnp.int32))
  dest = jnp.where(live, cu[:-1], s)  # a live sequence's packed row; out of range (dropped) for a stopped one
  return batch, jnp.minimum(cu[:-1], s - 1), dest


def _burst(graphdef, state, kv, inp: BurstInput, key, stop: StopCriteria, params: SamplingParams):
  """The burst as a function of the model's state: (pages with every fed token written, `BurstOut`)."""
  TRACES["burst"] += 1
  s, k = inp.forced.shape
  num_pages = kv.shape[1]
  kv = copy_pages(kv, RaggedBatch(page_indices=inp.page_indices, kv_lens=inp.kv_start, cu_q_lens=jnp.zeros(s + 1,
                  jnp.int32), num_seqs=jnp.zeros(1, jnp.int32), copy_src=inp.copy_src, copy_dst=inp.copy_dst))

  def cond(c: _Loop):
    return (c.j < k) & c.live.any()

  def body(c: _Loop) -> _Loop:
    model = nnx.merge(graphdef, state)
    batch, rows, dest = _batch(inp, c.live, c.num, num_pages)
    ids = jnp.zeros(s, jnp.int32).at[dest].set(c.token, mode="drop")
    pos = jnp.zeros(s, jnp.int32).at[dest].set(inp.positions + c.num, mode="drop")
    logits_sv, cache = model.forward(ids[None], jnp.broadcast_to(pos, (3, 1, s)), jnp.ones((1, s), bool),
                                     cache=PagedCache(kv=c.kv, batch=batch), logits_at=rows)
    keys = draw_keys(c.key, inp.draws + jnp.stack([jnp.zeros_like(c.num), c.num], axis=1))
    token, logprob, pushed, hit_token, hit_string = draw(logits_sv, keys, inp.forced[:, c.j], c.windows, stop,
                                                         params)
    windows = jnp.where(c.live[:, None], pushed, c.windows)
    hit = hit_token | hit_string
    num = c.num + c.live.astype(jnp.int32)
    return _Loop(j=c.j + 1, key=c.key, kv=cache.kv, token=jnp.where(c.live, token, c.token),
                 live=c.live & ~hit & (num < inp.limit), num=num, stopped=c.stopped | (c.live & hit),
                 windows=windows, tokens=c.tokens.at[:, c.j].set(jnp.where(c.live, token, -1)),
                 logprobs=c.logprobs.at[:, c.j].set(jnp.where(c.live, logprob, 0.0)))

  live = inp.limit > 0
  init = _Loop(j=jnp.zeros((), jnp.int32), key=key, kv=kv, token=inp.tokens, live=live,
               num=jnp.zeros(s, jnp.int32), stopped=jnp.zeros(s, bool), windows=inp.windows,
               tokens=jnp.full((s, k), -1, jnp.int32), logprobs=jnp.zeros((s, k), jnp.float32))
  out = jax.lax.while_loop(cond, body, init)
  return out.kv, BurstOut(tokens=out.tokens, logprobs=out.logprobs, num=out.num, stopped=out.stopped,
                          windows=out.windows)


burst_program = jax.jit(_burst, static_argnames=("graphdef", "params"), donate_argnames=("kv",))


def burst_step(model, kv: jax.Array, inp: BurstInput, key: jax.Array, stop: StopCriteria, params: SamplingParams
               ) -> tuple[jax.Array, BurstOut]:
  """Runs one burst (module docstring); `kv` [L, P, page_size, 2k, h] is donated and replaced. `model` may be
  `nnx.split(model)` (of `sampler.decode_weights(model)`, the decode layout), made once per rollout."""
  graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
  return burst_program(graphdef, state, kv, inp, key, stop, params)


def burst_shape(inp: BurstInput, kv) -> tuple:
  """What a burst's compiled program depends on: rows, K, the page table and the pool."""
  return ("burst",) + inp.forced.shape + (inp.page_indices.shape[1], tuple(kv.shape))


def compiled_programs() -> int:
  """Programs `burst_program` holds compiled (jax's own cache)."""
  return burst_program._cache_size()
