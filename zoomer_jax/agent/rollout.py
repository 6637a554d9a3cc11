"""The multi-turn VideoZoomer agent: a batch of trajectories that each pause on their own tool calls.

`rollout` is the lockstep engine, kept as the baseline of `bench/bench_rollout.py` and the equality oracle of the
tests: every job (GRPO, evaluation, infer, reflect, the demo) runs the continuous engine (`agent/engine.py`,
docs/rollout_engine.md), which reuses this module's tasks, trajectories, video readers and host pieces.

One `rollout` call runs a batch of (video, question) tasks to the end:

  1. the overview frames of every video are read and preprocessed in a thread pool, the prompts rendered to
     token ids (`text.chat.Transcript`) and prefilled into one KV cache;
  2. decoding runs in chunks of `decode_chunk` tokens; a sequence whose turn ends (a stop token, an enabled
     tool's closing tag such as `</video_zoom>`, or the per-turn token limit) stops generating, its turn is parsed
     by the protocol (`agent.protocol.Episode`), and a valid call is run by its tool (`zoomer_jax.tools`: a zoom
     cuts a clip, a crop a region of one frame) and preprocessed in the thread pool
     while the other sequences keep decoding (`Videos`: one reader per file for the whole rollout, so each
     video's time index is built once; frames are chosen by their true presentation times, video/sampling.py);
  3. when every live sequence has ended its turn, each observation (text and frames) is appended to its own
     sequence's cache in one `extend` - positions continue from where the sequence stopped, nothing is
     prefilled again - and decoding resumes, up to `max_generation_round` turns.

Each trajectory comes back with its token ids, a response mask (1 on model tokens, 0 on prompt and tool
tokens), the sampler's log-probs, its images, the tool-call log and the final answer.

Several processes (one global mesh) run this same control flow on the same tasks in lockstep: the sampler's calls
are global programs, so every process holds every row and gives them identical inputs. Only the videos are split:
row i belongs to process `i * P // b` (`owned_rows`, contiguous blocks of the batch), and only its owner reads its
overview and cuts its clips; the owner then shares the result (timestamps, pixels, grids, duration) or the
error message with every other process (`distributed.share_by_key`: once after the overviews, once per round of
observations, called by every process even with nothing to send). Parsing turns is cheap and deterministic, so
it stays replicated, and `on_event` fires on every process alike. In one process every row is owned and nothing
is communicated.
"""

from __future__ import annotations

import builtins
import concurrent.futures as cf
import contextlib
import dataclasses
import threading
import traceback
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from zoomer_jax import tools as T
from zoomer_jax.agent import protocol as P
from zoomer_jax.parallel.distributed import mesh_of, replicate, share_by_key, to_host
from zoomer_jax.sampling import STOP_STRING, STOP_TOKEN, SamplingParams, StopCriteria, decode, extend
from zoomer_jax.sampling import decode_weights, prefill
from zoomer_jax.sampling.sampler import round_up
from zoomer_jax.text.chat import Transcript
from zoomer_jax.text.tokenizer import Tokenizer
from zoomer_jax.video import VideoError, VideoReader, preprocess_frames, sample_overview


@dataclasses.dataclass(frozen=True)
class Task:
  video: str
  problem: str  # the question, with "<image>" where the overview frames go
  answer: str | None = None
  id: str = ""
  data_source: str = ""
  subtitles: tuple = ()  # (start s, end s, text) lines placed among the overview frames (`P.user_prompt`)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  tool: P.ToolConfig = P.ToolConfig()
  sampling: SamplingParams = SamplingParams(temperature=1.0, max_new_tokens=512)  # per turn
  decode_chunk: int = 64  # tokens per device call; paused sequences are handed to the host in between
  max_pixels: int = 100352
  min_pixels: int = 25088
  cache_size: int = 0  # 0: enough for the longest prompt plus every round at its limits
  token_bucket: int = 64  # prompt and observation chunks are padded to a multiple of this many tokens
  image_bucket: int = 8  # and their images to a multiple of this many, so turns reuse compiled programs
  workers: int = 4
  video_backend: str = "auto"


@dataclasses.dataclass
class Trajectory:
  task: Task
  ids: np.ndarray  # int32 [L]
  response_mask: np.ndarray  # int32 [L]: 1 on model tokens
  logprobs: np.ndarray  # float32 [L]: the sampler's log-prob where response_mask is 1, else 0
  pixel_values: np.ndarray | None  # float32 [P, 1176]: all images, overview then each call's (None: another
  #   process holds them, `replicated_rollout(pixels="own")`)
  image_grid_thw: np.ndarray  # int64 [n_images, 3]
  calls: list[dict]
  answer: str | None
  finish_reason: str  # "answer", "no_call", "round_limit", "context_limit", "video_error"
  rounds: int
  turns: list[str]  # each assistant turn's text
  replica: int = -1  # the data-parallel replica whose engine made it (`agent/replicas.py`); -1: one engine
  # The replica whose block of the tasks it was given at the start (`replicas.split_groups`); with tasks joining, a
  # task still waiting may be made by another (`replica`). Fixed by the tasks alone, not by timing: GRPO places
  # training rows by it (`train/placement.py`). -1: one engine.
  home: int = -1

  @property
  def n_frames(self) -> int:
    return len(self.image_grid_thw)


def stop_criteria(tok: Tokenizer, tools: Sequence[str] = T.DEFAULT) -> StopCriteria:
  """A turn ends on <|im_end|>, <|endoftext|> or the closing tag of an enabled tool (the call is then complete)."""
  return StopCriteria.build([tok.im_end, tok.endoftext], [t.close for t in T.enabled(tools)], tok.vocab_bytes(),
                            suppress_ids=[tok.image_pad, tok.video_pad, tok.vision_start, tok.vision_end],
                            vocab_limit=tok.vocab_size)


_ALONE = threading.local()  # `alone()`: set in a thread whose rollout no other process shares


@contextlib.contextmanager
def alone():
  """In this thread, a rollout is one process's own (`agent/replicas.py`: the engine of a replica held by this
  process), even in a multi-process run: it reads every row's videos and shares nothing with other processes."""
  before = getattr(_ALONE, "on", False)
  _ALONE.on = True
  try:
    yield
  finally:
    _ALONE.on = before


def several_processes() -> bool:
  """Whether a rollout in this thread runs on several processes at once (every one calls it with the same rows)."""
  return jax.process_count() > 1 and not getattr(_ALONE, "on", False)


def owned_rows(b: int, process: int | None = None, processes: int | None = None) -> list[int]:
  """The rows of a batch of `b` whose videos `process` (default: this one) reads: row i belongs to process
  i * processes // b, so each process owns one contiguous block of b / processes rows (sizes differ by at most
  one). Contiguous, not strided: GRPO puts a prompt's n samples side by side, so a group's rows (the same
  video) are read on one host, and each host opens fewer distinct files."""
  several = several_processes()
  process = (jax.process_index() if several else 0) if process is None else process
  processes = (jax.process_count() if several else 1) if processes is None else processes
  return [i for i in range(b) if i * processes // b == process]


def _outcome(fut: cf.Future, expected: tuple, convert=lambda v: v) -> dict:
  """{"value": convert(the future's result)}, or {"error": message} when it raised one of `expected`.

  Any other exception propagates in one process; with several it becomes {"fatal": [type name, text]}, shared
  like the rest so that every process raises it (`_shared`) instead of waiting for this one in a collective.
  """
  try:
    return {"value": convert(fut.result())}
  except expected as e:
    return {"error": str(e)}
  except Exception as e:
    if not several_processes():
      raise
    return {"fatal": [type(e).__name__, "".join(traceback.format_exception(e)).rstrip()]}


def _shared(outcomes: dict[int, dict], what: str, tasks: Sequence[Task]) -> dict[int, dict]:
  """Every process's `_outcome`s by row, identical everywhere (a collective when there are several processes;
  `outcomes` itself in one). A fatal outcome is raised on every process, as its builtin type where it has one."""
  if not several_processes():
    return outcomes
  outcomes = share_by_key(outcomes)
  for i, out in sorted(outcomes.items()):
    if "fatal" in out:
      raise_fatal(*out["fatal"], f"{what} of row {i} ({tasks[i].video}) failed on the process that owns it")
  return outcomes


def raise_fatal(name: str, text: str, what: str):
  """Raises another process's failure (its exception's type name and traceback text) here, as its builtin type
  where it has one."""
  cls = getattr(builtins, name, None)
  message = f"{what}:\n{text}"
  try:
    err = cls(message) if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError(message)
  except Exception:  # a builtin type with other constructor arguments
    err = RuntimeError(message)
  raise err


class Videos:
  """The rollout's videos: one VideoReader per file for the whole rollout, so a file's time index is built once
  (not per tool call); `pool` runs the reads. `python -m zoomer_jax frames` shows what these methods return."""

  def __init__(self, cfg: AgentConfig, pool: cf.ThreadPoolExecutor | None = None):
    self.cfg, self.pool = cfg, pool
    self._lock = threading.Lock()
    self._readers: dict[str, list] = {}  # path -> [lock, reader or None]

  def reader(self, path: str) -> VideoReader:
    with self._lock:
      entry = self._readers.setdefault(path, [threading.Lock(), None])
    with entry[0]:  # rows of the same video wait for one index build
      if entry[1] is None:
        entry[1] = VideoReader(path, backend=self.cfg.video_backend)
      return entry[1]

  def overview_frames(self, task: Task):
    """(meta, frame indices [n], true times [n] s, uint8 RGB frames [n, H, W, 3] as decoded, upright)."""
    reader = self.reader(task.video)
    idx, ts = sample_overview(reader.meta, self.cfg.tool.video_fps, self.cfg.tool.frames_upbound)
    return reader.meta, idx, ts, reader.frames(idx)

  def clip_frames(self, task: Task, call):
    """(frame indices [n], true times [n] s, uint8 RGB frames [n, H, W, 3]) a tool call shows."""
    shown = T.by_name(call.tool).run(call, self.reader(task.video))
    return shown.indices, shown.times, shown.frames

  def overview(self, task: Task):
    meta, _, ts, frames = self.overview_frames(task)
    pixels, grids = preprocess_frames(frames, self.cfg.max_pixels, self.cfg.min_pixels)
    return meta, ts, pixels, grids

  def clip(self, task: Task, call):
    _, ts, frames = self.clip_frames(task, call)
    pixels, grids = preprocess_frames(frames, self.cfg.max_pixels, self.cfg.min_pixels)
    return ts, pixels, grids

  def close(self) -> None:
    for _, reader in self._readers.values():
      if reader is not None:
        reader.close()


def _overview(task: Task, videos: Videos):
  return videos.overview(task)


def _clip(task: Task, call, videos: Videos):
  return videos.clip(task, call)


def for_model(message: str, path: str) -> str:
  """An error message as the model may see it: the file's path is the host's business."""
  return message.replace(f"video {path}", "the video").replace(path, "the video")


class _Row:
  """Host state of one trajectory."""

  def __init__(self, task: Task, tr: Transcript, episode: P.Episode | None, pixels, grids):
    self.task, self.tr, self.episode = task, tr, episode
    self.logprobs = [0.0] * len(tr.ids)
    self.pixels, self.grids = [pixels], [grids]
    self.in_cache = 0  # transcript tokens already in the KV cache
    self.turn_tokens = 0
    self.calls: list[dict] = []
    self.turns: list[str] = []
    self.answer, self.reason = None, None
    self.pending: Any = None  # a tool call being run: (call, future)
    self.new_images: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def done(self) -> bool:
    return self.reason is not None


def _tokens_per_image(grids: np.ndarray) -> list[int]:
  return [int(np.prod(g)) // 4 for g in np.asarray(grids).reshape(-1, 3)]


def rollout(model, tok: Tokenizer, tasks: Sequence[Task], cfg: AgentConfig = AgentConfig(),
            key: jax.Array | None = None, on_event=None, script=None) -> list[Trajectory]:
  """The lockstep engine (the benchmark's baseline and the tests' oracle; jobs call `engine.continuous_rollout`,
  which has this contract). Runs every task to its end. `on_event(kind, row, info)` (optional) sees each turn
  ("turn"), tool call (kind: the tool's name, e.g. "zoom"; info: its log record), tool error ("tool_error") and end
  ("final").

  `script(row, round) -> str | None` (optional) dictates a turn's text instead of sampling it (tests and
  demonstrations): its tokens are forced, their log-probs are still the model's.
  """
  key = jax.random.key(0) if key is None else key
  event = on_event or (lambda *a: None)
  stop = stop_criteria(tok, cfg.tool.tools)
  if several_processes():  # the stop tables as global arrays once, not at every decode call
    stop = replicate(stop, mesh_of(nnx.state(model, nnx.Param)))
  system = P.system_prompt(cfg.tool)
  mine = set(owned_rows(len(tasks)))
  with cf.ThreadPoolExecutor(cfg.workers) as pool:
    videos = Videos(cfg, pool)
    try:
      rows = _start(tasks, cfg, tok, system, videos, mine)
      if any(not r.done for r in rows):
        _run(model, decode_weights(model), tok, rows, cfg, key, stop, videos, event, script, mine)
    finally:
      videos.close()
  return [_finish(r) for r in rows]


def cache_slots(tok: Tokenizer, tasks: Sequence[Task], cfg: AgentConfig = AgentConfig(),
                groups: Sequence[Sequence[int]] | None = None) -> list[int]:
  """Cache slots per row that both engines give each group of these tasks (indices; default: all of them) run
  together: the lockstep engine's dense cache is [rows, this]; the continuous engine's page table holds this many,
  rounded up to whole pages. Reads each task's overview once (a task whose video fails counts as an empty
  prompt, as in a rollout)."""
  with cf.ThreadPoolExecutor(cfg.workers) as pool:
    videos = Videos(cfg, pool)
    try:
      rows = _start(tasks, cfg, tok, P.system_prompt(cfg.tool), videos, range(len(tasks)))
    finally:
      videos.close()
  return [_cache_size([rows[i] for i in g], cfg) for g in (groups or [range(len(tasks))])]


def _start(tasks, cfg, tok, system, videos, mine) -> list[_Row]:
  futures = {i: videos.pool.submit(_overview, tasks[i], videos) for i in sorted(mine)}
  overviews = {i: _overview_outcome(f) for i, f in futures.items()}
  overviews = _shared(overviews, "reading the overview", tasks)
  return [_new_row(task, overviews[i], cfg, tok, system) for i, task in enumerate(tasks)]


def _new_row(task: Task, overview: dict, cfg, tok, system: str) -> _Row:
  """The row of a task given its overview's `_outcome` (an error: a finished row, "video_error")."""
  if "error" in overview:  # reported for this task; the others go on
    row = _Row(task, Transcript(tok, []), None, np.zeros((0, 1176), np.float32), np.zeros((0, 3), np.int64))
    row.reason, row.calls = "video_error", [dict(error=overview["error"])]
    return row
  duration, ts, pixels, grids = overview["value"]
  messages = [{"role": "system", "content": system},
              {"role": "user", "content": P.user_prompt(task.problem, ts, task.subtitles)}]
  tr = Transcript.from_messages(tok, messages, image_tokens=_tokens_per_image(grids))
  return _Row(task, tr, P.Episode(cfg.tool, duration, len(ts)), pixels, grids)


def _overview_outcome(fut: cf.Future) -> dict:
  return _outcome(fut, (VideoError, OSError), lambda v: (v[0].duration, *v[1:]))


def _cache_size(rows, cfg) -> int:
  if cfg.cache_size:
    return cfg.cache_size
  longest = max(len(r.tr.ids) for r in rows)
  per_frame = max((max(_tokens_per_image(r.grids[0]), default=0) for r in rows), default=0) + 12
  return _cache_need(cfg, longest, per_frame)


def cache_bound(cfg, text_tokens: int) -> int:
  """A cache size for any trajectory whose prompt holds at most `text_tokens` tokens besides its overview's
  images (each under `cfg.max_pixels`): what an engine that admits tasks while it runs is sized for."""
  # A resized frame keeps within [min_pixels, max_pixels], 28 x 28 pixels a token (+ its time's text).
  per_frame = max(cfg.max_pixels, cfg.min_pixels) // (28 * 28) + 12
  return _cache_need(cfg, text_tokens + cfg.tool.frames_upbound * per_frame, per_frame)


def prompt_text_bound(tok, tasks, tool: P.ToolConfig) -> int:
  """The most tokens any task's prompt holds besides its overview's images and their time tags (`cache_bound`'s
  `text_tokens` for these tasks)."""
  system = len(tok.encode(P.system_prompt(tool)))
  return system + max(len(tok.encode(P.user_prompt(t.problem, [], t.subtitles))) for t in tasks) + 32  # template


def sized_for_joining(cfg, tok, tasks):
  """`cfg` with page tables sized for the longest prompt text among `tasks` (`cache_bound`), unless it has a
  size: tasks that join a running engine arrive after its tables are made."""
  if cfg.cache_size:
    return cfg
  return dataclasses.replace(cfg, cache_size=cache_bound(cfg, prompt_text_bound(tok, tasks, cfg.tool)))


def _cache_need(cfg, longest: int, per_frame: int) -> int:
  tools = T.enabled(cfg.tool.tools)
  observation = max(t.observation_tokens(cfg.tool, per_frame, cfg.max_pixels) for t in tools) + 160
  need = longest + cfg.token_bucket + cfg.tool.max_generation_round * (
      cfg.sampling.max_new_tokens + cfg.decode_chunk + observation + cfg.token_bucket)
  return round_up(need, 256)


def _run(model, decoder, tok, rows, cfg, key, stop, videos, event, script, mine):
  """`decoder` is `decode_weights(model)`: decode steps use it, prefill and extend use `model`."""
  b = len(rows)
  size = _cache_size(rows, cfg)
  prompt_len = max(len(r.tr.ids) for r in rows)
  ids = np.full((b, prompt_len), tok.endoftext, np.int32)
  mask = np.zeros((b, prompt_len), np.int32)
  for i, r in enumerate(rows):
    if not r.done:
      ids[i, prompt_len - len(r.tr.ids):] = r.tr.ids
      mask[i, prompt_len - len(r.tr.ids):] = 1
      r.in_cache = len(r.tr.ids)
  pix = [r.pixels[0] for r in rows if not r.done]
  grids = [r.grids[0] for r in rows if not r.done]
  logits, cache, pos = prefill(model, ids, mask, cache_size=size, pixel_values=np.concatenate(pix),
                               image_grid_thw=np.concatenate(grids), token_bucket=cfg.token_bucket,
                               image_bucket=cfg.image_bucket, donate=True)
  temperature = cfg.sampling.temperature or 1.0

  while any(not r.done for r in rows):
    active = np.array([not r.done for r in rows])
    scripted = {}
    for i, r in enumerate(rows):
      r.turn_tokens = 0
      text = script(i, len(r.turns)) if script is not None and not r.done else None
      if text is not None:
        scripted[i] = tok.encode(text)
    window = None
    while active.any():  # one assistant turn for every live row, in chunks
      free = cache.size - int(cache.length)
      n = min(cfg.decode_chunk, free)
      if n <= 0:
        for i in np.flatnonzero(active):
          rows[i].reason = "context_limit"
        break
      forced = np.full((b, n), -1, np.int32)
      for i, ids_i in scripted.items():
        part = ids_i[rows[i].turn_tokens:rows[i].turn_tokens + n]
        forced[i, :len(part)] = part
      key, sub = jax.random.split(key)
      out = decode(decoder, cache, logits, pos, active, sub, stop, dataclasses.replace(cfg.sampling, max_new_tokens=n),
                   window, forced, donate=True)  # one cache in memory: each call's output replaces it
      tokens, lps, nums, reasons, last_logits = to_host(
          (out.tokens, out.logprobs, out.num_tokens, out.stop_reason, out.last_logits))
      for i in np.flatnonzero(active):
        r = rows[i]
        r.tr.append_generated(tokens[i, :nums[i]].tolist())
        r.logprobs += lps[i, :nums[i]].tolist()
        r.in_cache = len(r.tr.ids)  # the decode loop wrote every sampled token to the cache
        r.turn_tokens += int(nums[i])
        if reasons[i] in (STOP_TOKEN, STOP_STRING) or r.turn_tokens >= cfg.sampling.max_new_tokens:
          active[i] = False
          _end_turn(r, i, last_logits[i], temperature, tok, videos if i in mine else None, event)
      cache, logits, pos, window = out.cache, out.last_logits, out.next_position, out.window
    _observe(rows, tok, event)
    chunk_rows = [i for i, r in enumerate(rows) if not r.done and len(r.tr.ids) > r.in_cache]
    if not chunk_rows:
      continue
    length = max(len(rows[i].tr.ids) - rows[i].in_cache for i in chunk_rows)
    if int(cache.length) + round_up(length, cfg.token_bucket) > cache.size:
      for i in chunk_rows:
        rows[i].reason = "context_limit"
      continue
    cids = np.full((b, length), tok.endoftext, np.int32)
    cmask = np.zeros((b, length), np.int32)
    new_pix, new_grids = [], []
    for i in chunk_rows:
      r = rows[i]
      part = r.tr.ids[r.in_cache:]
      cids[i, :len(part)] = part
      cmask[i, :len(part)] = 1
      if r.new_images is not None:
        new_pix.append(r.new_images[0])
        new_grids.append(r.new_images[1])
        r.pixels.append(r.new_images[0])
        r.grids.append(r.new_images[1])
        r.new_images = None
      r.in_cache = len(r.tr.ids)
    vision = {}
    if new_pix:
      vision = dict(pixel_values=np.concatenate(new_pix), image_grid_thw=np.concatenate(new_grids))
    logits, cache, pos = extend(model, cache, cids, cmask, pos, logits, token_bucket=cfg.token_bucket,
                                image_bucket=cfg.image_bucket, donate=True, **vision)


def _end_turn(r: _Row, i: int, last_logits: np.ndarray, temperature: float, tok, videos, event):
  """Parses the finished turn; a valid call starts its clip extraction in the pool (None: another process owns
  the row, extracts the clip and shares it in `_observe`)."""
  text = r.tr.turn_text()
  r.turns.append(text)
  event("turn", i, text)
  out = r.episode.step(text)
  if isinstance(out, P.Final):
    r.answer, r.reason = out.answer, out.reason
    event("final", i, out)
    return
  if r.tr.close_turn():  # the original appends <|im_end|> to a turn that lacks it; it counts as a model token
    z = last_logits / temperature
    r.logprobs.append(float(z[tok.im_end] - (z.max() + np.log(np.exp(z - z.max()).sum()))))
  if isinstance(out, P.ToolError):
    r.calls.append(dict(round=out.round, tool=out.tool, error=out.message))  # tool None: the turn named several
    event("tool_error", i, out)
    r.pending = ("error", out.observation)
  else:
    r.pending = ("call", out, None if videos is None else videos.pool.submit(_clip, r.task, out, videos))


def _observe(rows, tok, event):
  """Waits for each pending clip (this process's, then every process's, shared) and appends the observation
  text (and frames) to the transcript. Every process calls it at the same point of each round."""
  clips = {i: _outcome(r.pending[2], (VideoError, ValueError, OSError)) for i, r in enumerate(rows)
           if r.pending is not None and r.pending[0] == "call" and r.pending[2] is not None}
  clips = _shared(clips, "running the tool call", [r.task for r in rows])
  for i, r in enumerate(rows):
    if r.pending is None:
      continue
    pending, r.pending = r.pending, None
    if pending[0] == "error":
      _append(r, pending[1], ())
      continue
    call = pending[1]
    tool = T.by_name(call.tool)
    if "error" in clips[i]:
      message = clips[i]["error"]
      err = r.episode.extraction_failed(for_model(message, r.task.video))
      r.calls.append(tool.log(call, error=message))
      event("tool_error", i, err)
      _append(r, err.observation, ())
      continue
    ts, pixels, grids = clips[i]["value"]
    obs = r.episode.observation(ts)
    r.calls.append(tool.log(call, ts))
    event(tool.name, i, r.calls[-1])
    r.new_images = (pixels, grids)
    _append(r, obs, _tokens_per_image(grids))


def _append(r: _Row, text: str, image_tokens):
  before = len(r.tr.ids)
  r.tr.append_text(text, image_tokens=image_tokens)
  r.logprobs += [0.0] * (len(r.tr.ids) - before)


def _images(r: _Row, first: int = 0) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(pixels, grids int64 [n, 3]) of the images the row's transcript shows, in order, from its `first` entry (0:
  the overview, then each observation's); (None, None) when there is none."""
  if first >= len(r.pixels):
    return None, None
  return np.concatenate(r.pixels[first:]), np.concatenate(r.grids[first:]).astype(np.int64)


def _finish(r: _Row) -> Trajectory:
  assert len(r.logprobs) == len(r.tr.ids) == len(r.tr.mask), (len(r.logprobs), len(r.tr.ids), len(r.tr.mask))
  pixels, grids = _images(r)
  return Trajectory(task=r.task, ids=np.asarray(r.tr.ids, np.int32), response_mask=np.asarray(r.tr.mask, np.int32),
                    logprobs=np.asarray(r.logprobs, np.float32), pixel_values=pixels, image_grid_thw=grids,
                    calls=r.calls, answer=r.answer,
                    finish_reason=r.reason or "context_limit", rounds=len(r.turns), turns=r.turns)
