"""One batch of `serve` requests through the model: agent requests through the continuous engine, turn requests
through the sampler's prefill and decode.

    runner = Runner(model, tok, RunnerConfig(tool=ToolConfig(), max_pixels=..., ...))
    runner.run(batch, more)  # each request gets ("turn", delta)* then ("done", result) or ("error", ...)

A batch shares its sampling parameters (`api.Request.batch_key`): the engine samples every row alike. Only the
scheduler's thread calls `run`, so JAX is driven from one thread.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.engine import EngineConfig, continuous_rollout
from zoomer_jax.agent.rollout import AgentConfig, Trajectory, _tokens_per_image, cache_bound, stop_criteria
from zoomer_jax.sampling import STOP_LENGTH, SamplingParams, decode, decode_weights, prefill
from zoomer_jax.sampling.sampler import StopCriteria, round_up
from zoomer_jax.serve.api import ApiError, Request
from zoomer_jax.text.chat import Transcript
from zoomer_jax.text.stream import TurnStream
from zoomer_jax.video.preprocess import preprocess_frames


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
  """The agent's protocol (`tool`), frame size, thread pool and video backend, the engine's paging, the turn
  model's shape buckets, and the seed of the batches' sampling keys."""

  tool: P.ToolConfig = P.ToolConfig()
  max_pixels: int = 100352
  min_pixels: int = 25088
  workers: int = 4
  video_backend: str = "auto"
  engine: EngineConfig = EngineConfig()
  token_bucket: int = 64
  image_bucket: int = 8
  seed: int = 0
  max_prompt_text_tokens: int = 1024  # an agent prompt's tokens besides its overview's images (page tables' width)


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def usage(prompt: int, completion: int) -> dict:
  return dict(prompt_tokens=int(prompt), completion_tokens=int(completion), total_tokens=int(prompt + completion))


class Runner:
  """`script(request, round) -> str | None` (optional) dictates a turn's text instead of sampling it, as
  `rollout`'s `script` does (tests and demonstrations): an agent request's round, or a turn request's (the number
  of assistant messages it holds). The tokens are forced; the turn still ends at a stop token or a tool's tag."""

  def __init__(self, model, tok, cfg: RunnerConfig, script=None):
    self.model, self.tok, self.cfg, self.script = model, tok, cfg, script
    self.decoder = decode_weights(model)
    self.stop = stop_criteria(tok, cfg.tool.tools)
    self._stop_cache: dict[tuple, StopCriteria] = {}
    self.key = jax.random.key(cfg.seed)

  def _next_key(self) -> jax.Array:
    self.key, sub = jax.random.split(self.key)
    return sub

  def run(self, batch: list[Request], more=None) -> None:
    """Runs the batch (one mode, one batch_key) and sends each request its events. `more(n)` (optional) gives up
    to n more requests of the batch's key while an agent batch runs (`Batcher`): they join the engine between
    steps, and every agent request is answered as soon as its trajectory ends."""
    t0 = time.perf_counter()
    if batch[0].mode == "agent":
      return self._agent(batch, more, t0)
    results = self._turns(batch)
    for req, res in zip(batch, results):
      self._answer(req, res, len(batch), t0)

  @staticmethod
  def _answer(req: Request, res, batch_size: int, t0: float) -> None:
    if isinstance(res, ApiError):
      req.events.put(("error", res))
      return
    res["zoomer"].update(batch_size=batch_size, queue_s=round(t0 - req.arrived, 4),
                         run_s=round(time.perf_counter() - t0, 4))
    req.events.put(("done", res))

  # --- agent mode ----------------------------------------------------------------------------------------------
  def _agent(self, batch: list[Request], more, t0: float) -> None:
    r0, c = batch[0], self.cfg
    agent = AgentConfig(tool=c.tool, sampling=SamplingParams(temperature=r0.temperature, top_p=r0.top_p,
                                                             max_new_tokens=r0.max_tokens),
                        max_pixels=c.max_pixels, min_pixels=c.min_pixels, workers=c.workers,
                        video_backend=c.video_backend)
    # One page-table width for every run of these sampling settings (the same compiled steps), wide enough for
    # requests that join later.
    agent = dataclasses.replace(agent, cache_size=cache_bound(agent, c.max_prompt_text_tokens))
    requests = list(batch)
    started = [t0] * len(requests)  # when each request entered the engine
    streams = [TurnStream(self.tok) for _ in requests]

    def admit(free: int) -> list:
      joined = more(free) if more is not None else []
      now = time.perf_counter()
      for r in joined:
        requests.append(r)
        started.append(now)
        streams.append(TurnStream(self.tok))
      return [r.task for r in joined]

    def on_event(kind, i, info):  # the content is the turns joined by "\n", streamed as the engine samples it
      if kind == "done":
        return self._answer(requests[i], agent_result(info), len(requests), started[i])
      if kind == "tokens":
        text = streams[i].add(info)
      elif kind == "turn":
        text = streams[i].end(info)
      else:
        return
      if text:
        requests[i].events.put(("turn", text))

    script = None if self.script is None else (lambda i, rnd: self.script(requests[i], rnd))
    continuous_rollout(self.model, self.tok, [r.task for r in batch], agent, self._next_key(), on_event=on_event,
                       script=script, engine=c.engine, admit=admit)

  # --- turn mode -----------------------------------------------------------------------------------------------
  def _stops(self, strings: tuple[str, ...] | None):
    """The turn's stop criteria: the agent's (a tool call's closing tag), or the request's `stop` strings."""
    if strings is None:
      return self.stop
    if strings not in self._stop_cache:
      tok = self.tok
      self._stop_cache[strings] = StopCriteria.build(
          [tok.im_end, tok.endoftext], list(strings), tok.vocab_bytes(), vocab_limit=tok.vocab_size,
          suppress_ids=[tok.image_pad, tok.video_pad, tok.vision_start, tok.vision_end])
    return self._stop_cache[strings]

  def _turns(self, batch: Sequence[Request]) -> list:
    c, tok = self.cfg, self.tok
    params = SamplingParams(temperature=batch[0].temperature, top_p=batch[0].top_p, max_new_tokens=batch[0].max_tokens)
    stop = self._stops(batch[0].stop)
    prompts, pixels, grids = [], [], []
    for r in batch:
      if r.images:
        pix, grid = preprocess_frames(r.images, c.max_pixels, c.min_pixels)
        pixels.append(pix)
        grids.append(grid)
      else:
        grid = np.zeros((0, 3), np.int64)
      prompts.append(Transcript.from_messages(tok, r.messages, image_tokens=_tokens_per_image(grid)).ids)
    length = max(map(len, prompts))
    rows = 1 << (len(batch) - 1).bit_length()  # padded to a power of two (empty rows): fewer compiled programs
    ids = np.full((rows, length), tok.endoftext, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, p in enumerate(prompts):  # left-padded, as the rollout lays out a batch's prompts
      ids[i, length - len(p):] = p
      mask[i, length - len(p):] = 1
    vision = dict(pixel_values=np.concatenate(pixels), image_grid_thw=np.concatenate(grids)) if pixels else {}
    size = round_up(round_up(length, c.token_bucket) + params.max_new_tokens, 256)
    logits, cache, pos = prefill(self.model, ids, mask, cache_size=size, token_bucket=c.token_bucket,
                                 image_bucket=c.image_bucket, donate=True, **vision)
    forced = np.full((rows, params.max_new_tokens), -1, np.int32)
    for i, r in enumerate(batch):
      text = self.script(r, sum(m["role"] == "assistant" for m in r.messages)) if self.script else None
      if text is not None:
        dictated = tok.encode(text)[:params.max_new_tokens]
        forced[i, :len(dictated)] = dictated
    out = decode(self.decoder, cache, logits, pos, np.arange(rows) < len(batch), self._next_key(), stop,
                 params, forced=forced, donate=True)
    tokens, nums, reasons = jax.device_get((out.tokens, out.num_tokens, out.stop_reason))
    results = []
    for i, p in enumerate(prompts):
      gen = tokens[i, :nums[i]].tolist()
      text = tok.decode(gen, skip_special_tokens=True)
      if batch[i].stop:  # as OpenAI: the reply ends before the first stop string
        text = text[:min((text.find(x) for x in batch[i].stop if x in text), default=len(text))]
      finish = "length" if reasons[i] == STOP_LENGTH else "stop"
      batch[i].events.put(("turn", text))
      results.append(dict(content=text, finish_reason=finish, usage=usage(len(p), len(gen)),
                          zoomer=dict(mode="turn", images=len(batch[i].images))))
    return results


def agent_result(t: Trajectory) -> dict | ApiError:
  """The response of one trajectory: content = its assistant turns joined by "\\n"; the `zoomer` extra holds the
  answer, the protocol's finish reason, the tool calls (segment, fps, frame times), turns and frames."""
  if t.finish_reason == "video_error":
    return ApiError(400, f"the video could not be read: {t.calls[0]['error']}", "video_error")
  model_tokens = int(t.response_mask.sum())
  return dict(content="\n".join(t.turns), finish_reason="length" if t.finish_reason == "context_limit" else "stop",
              usage=usage(len(t.ids) - model_tokens, model_tokens),
              zoomer=dict(mode="agent", answer=t.answer, finish_reason=t.finish_reason, rounds=t.rounds,
                          turns=list(t.turns), calls=_jsonable(t.calls), frames=t.n_frames))
