"""One jitted program per step of continuous batching over the paged KV cache (`model/paged.py`).

    chunks = [Chunk(seq, ids, positions, pixels, grids, slots), ...]     # decode rows and prefill/extend chunks
    inp = build_step(model.config, alloc, chunks, stop.window)           # appends to the allocator, buckets shapes
    kv, out = ragged_step(model, kv, inp, key, stop, params, end_token=tok.im_end)

A step's tokens are the chunks' tokens flattened into T rows (one batch row of the trunk, `Qwen25VL.forward` with a
`paged.PagedCache`), each chunk at its own M-RoPE positions, the images of every chunk in one vision input, their
features scattered into the `<|image_pad|>` rows in order. Sampling happens on the device at *slots*: a slot reads
the logits of one row (a sequence's last row, or several slots on one row: the n samples of a shared prompt) and
draws a token as `sampler.decode`'s loop body does - the same `sample`, forced tokens, stop ids and stop strings
matched on a byte window per slot. Each slot also returns `end_logprob`, the log-prob of `end_token` at its row
under the unrestricted logits (the `<|im_end|>` the host appends to a turn that ended on a stop string).

Shapes are bucketed (`page_allocator.token_bucket`, `seq_bucket`, `bucket`): rows T, sequences and slots S (one
size for both), and images per step, so that a long rollout compiles a handful of programs; `TRACES["ragged"]`
counts traces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.mrope import rope_index
from zoomer_jax.model.page_allocator import PageAllocator, bucket, seq_bucket, token_bucket
from zoomer_jax.model.paged import PagedCache, RaggedBatch
from zoomer_jax.model.qwen25vl import VisionInput, vision_input
from zoomer_jax.model.vision_layout import layout_sizes
from zoomer_jax.sampling.sampler import SamplingParams, StopCriteria, _has_stop_string, _push_bytes
from zoomer_jax.sampling.sampler import draw_keys, restrict_vocab, sample

TRACES = {"ragged": 0}


@dataclasses.dataclass
class Slot:
  """A sampling slot: the row (index in its chunk) whose logits it reads, its sequence's byte window [W] before
  the token, and a forced token (-1: sample)."""

  row: int
  window: np.ndarray | None = None
  forced: int = -1
  draw: tuple[int, int] = (0, 0)  # (trajectory, token index): the sampling key's (`sampler.draw_keys`)


@dataclasses.dataclass
class Chunk:
  """One sequence's new tokens in a step: ids [L], M-RoPE positions [3, L], the pixels and grids of the images
  whose pads the ids hold (in order), and the slots that read its rows."""

  seq: Hashable
  ids: np.ndarray
  positions: np.ndarray
  pixels: np.ndarray | None = None
  grids: np.ndarray | None = None
  slots: Sequence[Slot] = ()


def chunk_positions(cfg: ModelConfig, ids: Sequence[int], grids: np.ndarray | None, start: int) -> tuple[np.ndarray,
                                                                                                      int]:
  """(positions [3, L] of a chunk whose first token follows position start - 1, the next position): laid out as
  if the chunk had been part of the prompt, as `sampler.extend` lays it out."""
  ids = np.asarray(ids, np.int64)[None]
  grids = None if grids is None or not len(grids) else np.asarray(grids, np.int64).reshape(-1, 3)
  pos, delta = rope_index(ids, cfg, image_grid_thw=grids)
  return (pos[:, 0] + start).astype(np.int32), int(start + delta[0] + ids.shape[1])


@struct.dataclass
class StepInput:
  """A step's device inputs (numpy leaves); T rows and S sequences/slots, both bucketed."""

  ids: np.ndarray  # int32 [T]
  positions: np.ndarray  # int32 [3, T]
  batch: RaggedBatch
  images: VisionInput | None
  slot_rows: np.ndarray  # int32 [S]: the row each slot reads
  windows: np.ndarray  # uint8 [S, W]
  forced: np.ndarray  # int32 [S]
  draws: np.ndarray  # int32 [S, 2]: each slot's (trajectory, token index), its sampling key


@struct.dataclass
class StepOut:
  tokens: jax.Array  # int32 [S]
  logprobs: jax.Array  # fp32 [S]
  windows: jax.Array  # uint8 [S, W]: each slot's window after its token
  hit_token: jax.Array  # bool [S]: the token is a stop id
  hit_string: jax.Array  # bool [S]: the window ends a stop string (and the token is no stop id)
  end_logprob: jax.Array  # fp32 [S]: log-prob of `end_token` at the slot's row


def build_step(cfg: ModelConfig, alloc: PageAllocator, chunks: Sequence[Chunk], window: int, *,
               min_tokens: int = 8, min_images: int = 8) -> StepInput:
  """Appends every chunk's tokens to its sequence in `alloc` and lays the step out in bucketed shapes (rows to
  `token_bucket(tokens, min_tokens)`, sequences and slots to `seq_bucket(max(both))`, images to
  `bucket(images, min_images)`)."""
  n_tokens = sum(len(c.ids) for c in chunks)
  n_slots = sum(len(c.slots) for c in chunks)
  t, s = token_bucket(n_tokens, min_tokens), seq_bucket(max(len(chunks), n_slots))
  batch = alloc.step([(c.seq, len(c.ids)) for c in chunks], max_seqs=s, max_tokens=t)
  ids = np.zeros(t, np.int32)
  positions = np.zeros((3, t), np.int32)
  slot_rows, forced, draws = np.zeros(s, np.int32), np.full(s, -1, np.int32), np.zeros((s, 2), np.int32)
  windows = np.zeros((s, window), np.uint8)
  pixels, grids = [], []
  row, k = 0, 0
  for c in chunks:
    ids[row:row + len(c.ids)] = c.ids
    positions[:, row:row + len(c.ids)] = c.positions
    if c.grids is not None and len(c.grids):
      pixels.append(np.asarray(c.pixels, np.float32))
      grids.append(np.asarray(c.grids, np.int64).reshape(-1, 3))
    for sl in c.slots:
      slot_rows[k], forced[k], draws[k] = row + sl.row, sl.forced, sl.draw
      if sl.window is not None:
        windows[k] = sl.window
      k += 1
    row += len(c.ids)
  images = None
  if grids:
    g = np.concatenate(grids)
    sizes = layout_sizes([g], cfg.vision, bucket(len(g), min_images))  # room for a power of two of images
    images = vision_input(cfg, [np.concatenate(pixels)], [g], sizes=sizes)
  return StepInput(ids=ids, positions=positions, batch=batch, images=images, slot_rows=slot_rows, windows=windows,
                   forced=forced, draws=draws)


def step_shape(inp: StepInput, kv) -> tuple:
  """What a step's compiled program depends on: rows, sequences/slots, the page table, the vision input's padded
  patches (0 without images) and the pool."""
  patches = 0 if inp.images is None else inp.images.pixels.shape[1]
  return inp.ids.shape[0], inp.slot_rows.shape[0], inp.batch.page_indices.shape[1], patches, tuple(kv.shape)


def draw(logits_sv: jax.Array, keys: jax.Array, forced: jax.Array, windows_sw: jax.Array, stop: StopCriteria,
         params: SamplingParams) -> tuple[jax.Array, ...]:
  """Each slot's next token from its logits [S, V], as `sampler._decode_loop`'s body draws it: the same `sample`,
  forced tokens [S] (-1: sample) scored by the model, stops on ids and strings. Returns (token [S], logprob [S],
  windows after the token [S, W], hit_token [S], hit_string [S]: a stop string and no stop id). The ragged step
  and the decode burst both draw here."""
  logits = restrict_vocab(logits_sv, stop.vocab_limit)
  token, logprob = sample(logits, keys, params, stop.suppress)
  logp_all = jax.nn.log_softmax(logits / (params.temperature or 1.0), axis=-1)
  forced_logprob = jnp.take_along_axis(logp_all, jnp.maximum(forced, 0)[:, None], axis=-1)[:, 0]
  logprob = jnp.where(forced >= 0, forced_logprob, logprob)
  token = jnp.where(forced >= 0, forced, token)
  windows = _push_bytes(windows_sw, token, stop)
  hit_token = (token[:, None] == stop.token_ids[None, :]).any(-1)
  return token, logprob, windows, hit_token, _has_stop_string(windows, stop) & ~hit_token


def _ragged_step(graphdef, state, kv, inp: StepInput, key, stop: StopCriteria, params: SamplingParams,
                 end_token: int):
  """The step as a function of the model's state: (pages with the step written, `StepOut`)."""
  TRACES["ragged"] += 1
  model = nnx.merge(graphdef, state)
  t = inp.ids.shape[0]
  logits_sv, cache = model.forward(inp.ids[None], inp.positions[:, None], jnp.ones((1, t), bool), images=inp.images,
                                   cache=PagedCache(kv=kv, batch=inp.batch), logits_at=inp.slot_rows)
  token, logprob, windows, hit_token, hit_string = draw(logits_sv, draw_keys(key, inp.draws), inp.forced,
                                                      inp.windows, stop, params)
  z = logits_sv / (params.temperature or 1.0)  # unrestricted, as the lockstep agent scores the appended end token
  end_logprob = z[:, end_token] - jax.nn.logsumexp(z, axis=-1)
  return cache.kv, StepOut(tokens=token, logprobs=logprob, windows=windows, hit_token=hit_token,
                           hit_string=hit_string, end_logprob=end_logprob)


ragged_program = jax.jit(_ragged_step, static_argnames=("graphdef", "params", "end_token"),
                         donate_argnames=("kv",))


def ragged_step(model, kv: jax.Array, inp: StepInput, key: jax.Array, stop: StopCriteria, params: SamplingParams,
                end_token: int) -> tuple[jax.Array, StepOut]:
  """Runs one step (module docstring); `kv` [L, P, page_size, 2k, h] is donated and replaced. `model` may be
  `nnx.split(model)`, made once per rollout (splitting walks every module, a cost per step otherwise)."""
  graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
  return ragged_program(graphdef, state, kv, inp, key, stop, params, end_token)


def compiled_programs() -> int:
  """Programs `ragged_program` holds compiled (jax's own cache): what a test of recompilation counts."""
  return ragged_program._cache_size()
