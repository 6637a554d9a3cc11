"""SFT cold start: tool-using conversations -> loss on assistant tokens only.

    python -m zoomer_jax train --config=sft_tiny --config.data.train_files='("sft.json",)'

A record (`{"messages": [...], "images": [...]}`, docs/training.md, SFT) is laid out token for token as the agent
lays out a rollout (`zoomer_jax.text.Transcript`): the system and first user turn through the chat template,
each assistant message as model tokens closed by `<|im_end|>` (loss mask 1), each later user or tool message
as the tool-observation turn (mask 0). So SFT teaches exactly the context the sampler sees.

The loss is the mean negative log-likelihood over the assistant tokens of the whole optimizer batch
(micro-batches accumulate sums, so gradient accumulation is exact).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import cv2
import jax.numpy as jnp
import numpy as np

from zoomer_jax.text.chat import IMAGE_PLACEHOLDER, Transcript
from zoomer_jax.text.tokenizer import Tokenizer
from zoomer_jax.sampling.sampler import round_up
from zoomer_jax.parallel.rules import vision_pieces
from zoomer_jax.train.batch import Example, local_rows, make_global_batch
from zoomer_jax.train.forward import sequence_logprobs
from zoomer_jax.video.preprocess import preprocess_frames

log = logging.getLogger("zoomer_jax.train")
NON_ASSISTANT = ("user", "tool", "observation")


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] from an image file; a missing or unreadable file raises naming it."""
  bgr = cv2.imread(path, cv2.IMREAD_COLOR)
  if bgr is None:
    raise FileNotFoundError(f"cannot read image {path}")
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _content(m, i) -> str:
  c = m["content"]
  if not isinstance(c, str):
    raise TypeError(f"message {i}: SFT content must be a string with <image> placeholders, got {type(c).__name__}")
  return c


def encode_conversation(tok: Tokenizer, messages: Sequence[dict], images: Sequence[np.ndarray] = (), *,
                        max_pixels: int = 100352, min_pixels: int = 25088, merge: int = 2) -> Example:
  """One conversation as an `Example` (ids, assistant-token loss mask, pixel_values, image_grid_thw)."""
  roles = [m["role"] for m in messages]
  if "assistant" not in roles:
    raise ValueError("an SFT conversation needs at least one assistant message")
  first = roles.index("assistant")
  n_placeholders = sum(_content(m, i).count(IMAGE_PLACEHOLDER) for i, m in enumerate(messages))
  if n_placeholders != len(images):
    raise ValueError(f"the messages hold {n_placeholders} <image> placeholders but {len(images)} images were given")
  pixels, grids = (preprocess_frames(list(images), max_pixels, min_pixels) if len(images)
                   else (None, np.zeros((0, 3), np.int64)))
  counts = [int(g.prod()) // merge**2 for g in grids]
  k = sum(_content(m, i).count(IMAGE_PLACEHOLDER) for i, m in enumerate(messages[:first]))
  tr = Transcript.from_messages(tok, list(messages[:first]), image_tokens=counts[:k])
  for i, m in enumerate(messages[first:], first):
    text = _content(m, i)
    if m["role"] == "assistant":
      if IMAGE_PLACEHOLDER in text:
        raise ValueError(f"message {i}: an assistant message cannot hold images")
      tr.append_generated(tok.encode(text))
      tr.close_turn()
    elif m["role"] in NON_ASSISTANT:
      n = text.count(IMAGE_PLACEHOLDER)
      tr.append_observation(text, image_tokens=counts[k:k + n])
      k += n
    else:
      raise ValueError(f"message {i}: role {m['role']!r} cannot follow the first assistant message")
  return Example(ids=np.asarray(tr.ids), loss_mask=np.asarray(tr.mask), pixel_values=pixels,
                 image_grid_thw=grids if len(images) else None)


def encode_record(record, tok: Tokenizer, *, max_pixels: int, min_pixels: int, merge: int = 2) -> Example:
  """An `SFTRecord` (zoomer_jax.data.records) with its images read from disk."""
  images = [read_image(p) for p in record.images]
  return encode_conversation(tok, [dict(m) for m in record.messages], images, max_pixels=max_pixels,
                             min_pixels=min_pixels, merge=merge)


def sft_loss(model, batch, *, remat: str = "none", vocab_chunk: int | None = None, token_chunk: int | None = None,
             freeze_vision: bool = False):
  """(sum of -log p over target tokens, number of target tokens, metrics)."""
  logp, _ = sequence_logprobs(model, batch, remat=remat, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                              freeze_vision=freeze_vision, with_entropy=False)
  m = batch.loss_mask
  nll = -(logp * m).sum()
  n = m.sum()
  return nll, n, {"tokens": n / jnp.maximum(n, 1.0)}


def sft_loss_fn(cfg, *, token_chunk: int | None | str = "config"):
  """The loss the SFT job of `cfg` differentiates, `loss(model, batch) -> (sum, denominator, metrics)`.
  `token_chunk` overrides `train.logprob_token_chunk` (`zoomer_jax.aot`'s cost probes walk tokens in one block)."""
  from functools import partial  # noqa: PLC0415
  t = cfg.train
  chunk = (t.logprob_token_chunk or None) if token_chunk == "config" else token_chunk
  return partial(sft_loss, remat=t.remat, vocab_chunk=t.logprob_vocab_chunk or None, token_chunk=chunk,
                 freeze_vision=t.freeze_vision_tower)


def step_rows(mesh, batch_size: int, micro_batch_size: int) -> list[int]:
  """The rows of an SFT step's global batch this process holds: in each micro-batch of `micro_batch_size`
  consecutive rows, those its devices hold (all of them when a micro-batch's rows are replicated)."""
  mine = local_rows(mesh, micro_batch_size)
  return [m + r for m in range(0, batch_size, micro_batch_size) for r in mine]


def read_step(stream, mesh, data_cfg) -> tuple[dict[int, Example], np.ndarray, int]:
  """This process's examples of the next step: ({global row: Example}, [batch_size, 2] (tokens, images) of
  every row, records skipped as longer than `cutoff_len`). Every process reads the same records in the same
  order whatever the process count; each encodes (tokenises, reads images) only the rows it holds."""
  rows = step_rows(mesh, data_cfg.batch_size, data_cfg.micro_batch_size)
  return stream.take(data_cfg.batch_size, rows, measure=lambda e: (len(e.ids), e.n_images), width=2,
                     accept=lambda m: m[0] <= data_cfg.cutoff_len)


def global_micro_batches(cfg_model, local: dict[int, Example], info: np.ndarray, mesh, data_cfg, pad_id: int,
                         pieces: int = 1):
  """The step's micro-batches as global arrays, each process contributing its rows; every process pads to the
  same length, bucketed from the micro-batch's longest row over all processes (`info`); `pieces`: see
  `batch.make_batch`."""
  mb = data_cfg.micro_batch_size
  for m in range(0, data_cfg.batch_size, mb):
    length = round_up(int(info[m:m + mb, 0].max()), data_cfg.token_bucket)
    part = {r - m: e for r, e in local.items() if m <= r < m + mb}
    yield make_global_batch(cfg_model, part, mesh, rows=mb, length=length, image_bucket=data_cfg.image_bucket,
                            pad_id=pad_id, pieces=pieces)


def run_sft(cfg) -> dict:
  """The SFT job of `cfg` (configs/sft_*.py); resumes from the workdir's latest checkpoint. Returns the last
  step's metrics."""
  from functools import partial  # noqa: PLC0415

  from zoomer_jax.train.jobs import JobContext  # noqa: PLC0415 (cycle)

  ctx = JobContext(cfg, kind="sft")
  data = cfg.data
  source = ctx.sft_source("train")
  if data.batch_size % data.micro_batch_size:
    raise ValueError(f"data.batch_size {data.batch_size} is not a multiple of data.micro_batch_size "
                     f"{data.micro_batch_size}")
  steps_per_epoch = len(source) // data.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(source)} training records make no batch of {data.batch_size}")
  total = cfg.train.total_steps or steps_per_epoch * data.num_epochs
  loss = sft_loss_fn(cfg)
  engine = ctx.engine(loss, total_steps=total, optim=cfg.optim, freeze_vision=cfg.train.freeze_vision_tower)
  tok, mc = ctx.tok, engine.model_config
  encode = partial(encode_record, tok=tok, max_pixels=data.max_pixels, min_pixels=data.min_pixels,
                   merge=mc.vision.spatial_merge_size)
  it = ctx.iterator(source, seed=data.seed, shuffle=data.shuffle, transform=encode, workers=data.workers)
  writer, bar = ctx.start(engine, it, total)
  stats, completed = {}, False
  try:
    while ctx.job_step < total:
      t0 = time.perf_counter()
      decoded = it.decoded
      local, info, skipped = read_step(it, engine.mesh, data)
      for batch in global_micro_batches(mc, local, info, engine.mesh, data, tok.endoftext,
                                        vision_pieces(engine.mesh, engine.rules)):
        engine.accumulate(batch)
      stats = engine.apply()
      dt = time.perf_counter() - t0
      stats.update(tokens_per_s=float(info[:, 0].sum()) / dt, step_s=dt, skipped_too_long=skipped,
                   epoch=engine.step / steps_per_epoch, records_decoded=it.decoded - decoded)
      ctx.job_step = engine.step
      ctx.end_step(engine, it, writer, bar, stats)
    completed = True
  finally:
    ctx.finish(engine, it, writer, bar, completed)
  return stats
