"""The continuous rollout engine: trajectories enter, pause and leave one by one over the paged KV cache.

    trajs = continuous_rollout(model, tok, tasks, agent_cfg, key, engine=EngineConfig(page_size=16))

The same contract as `agent.rollout.rollout` (the lockstep engine): the same tasks in, the same `Trajectory`
objects out, greedy trajectories token for token equal. `on_event` also sees ("tokens", row, ids): the ids each
device step sampled for a row (a burst's several at once), before the "turn" that they end (streaming). What
differs is the loop (docs/rollout_engine.md):

  * every engine step is one ragged device step (`sampling/ragged.py`): the decode rows of the running sequences
    together with whole prefill and extend chunks of new or resumed ones, up to `step_tokens` tokens; a step
    that holds only decode rows is a burst (`sampling/burst.py`): up to `decode_burst` tokens per row in one call;
  * a sequence that ends a turn with a tool call leaves the running set while the call runs in the thread pool
    (`rollout.Videos`: a zoom cuts a clip, a crop a region of one frame); the others keep decoding. It comes back
    with the observation (text and image pads) appended to its own pages at the positions that follow its own;
  * a finished sequence frees its pages at once, and a waiting task is admitted (`max_running` at a time);
  * with a pool smaller than every trajectory in flight at its longest (`pool_pages`), a sequence that needs a
    page when none is free takes it from the sequences admitted after it (the latest first): they are
    preempted, their pages freed (but the group's prompt pages others still hold), and each goes on later by
    computing the rest of its transcript again, images included, in one chunk (its sampled tokens and
    log-probs are kept);
  * the n samples of a GRPO prompt (consecutive tasks with the same video and question) prefill the prompt once:
    one sequence is prefilled, its n slots draw n first tokens from the same logits, and the n samples fork its
    pages (`PageAllocator.fork`; the shared last page is copied on the first write).

Turn parsing, budgets and observations are the protocol's (`agent.protocol.Episode`), and the rollout's own
host pieces are reused (`_start` renders prompts and reads overviews, `_finish` builds trajectories).

On a pod, GRPO and evaluation run one such engine per data-parallel replica of the rollout mesh, each on its own
chips (`agent/replicas.py`). One engine can also span several processes (one global mesh), run as the lockstep
engine is: every process runs the same control flow on every row (admission, scheduling and parsing are
deterministic given identical inputs), each device step is a global program fed identical host inputs (replicated
over the model's mesh), and only the videos are split: row i's owner (`rollout.owned_rows`) reads its overview and
cuts its clips. When a clip is cut is the one event that differs between processes, so it is agreed on: at every
step at which clips are pending, the processes share the outcomes of the clips they finished (`rollout._shared`: a
count first, the outcomes only when there are any), and every process delivers exactly that set. When no sequence
can run, they repeat this, each waiting up to `CLIP_POLL_S` for one of its own clips, until a clip anywhere is done;
a process that owns no pending clip joins each round with nothing. A failure that is no video error is raised on
every process (`rollout._outcome`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from zoomer_jax import tools as T
from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.rollout import AgentConfig, Task, Trajectory, Videos, _append, _cache_size, _clip, _finish
from zoomer_jax.agent.rollout import _images, _new_row, _outcome, _overview, _overview_outcome, _shared, _start
from zoomer_jax.agent.rollout import _tokens_per_image, for_model, owned_rows
from zoomer_jax.agent.rollout import several_processes, stop_criteria
from zoomer_jax.model.page_allocator import PageAllocator
from zoomer_jax.model.paged import PagePool
from zoomer_jax.parallel.distributed import host_allgather, mesh_of, replicate, to_host
from zoomer_jax.sampling import burst as B
from zoomer_jax.sampling import ragged as R
from zoomer_jax.sampling.sampler import decode_weights
from zoomer_jax.text.tokenizer import Tokenizer
from zoomer_jax.video import VideoError

ENGINES = ("lockstep", "continuous")
CLIP_POLL_S = 0.01  # several processes, nothing to run: how long each waits for its own clips between agreements
JOIN_POLL_S = 0.01  # tasks may join (`admit`), nothing to run: how long to wait for a clip before polling again


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """page_size: tokens per page. max_running: trajectories in flight (0: every task); the pool holds that many
  at the longest length a trajectory may reach. step_tokens: tokens per step, decode rows first, then whole
  chunks while they fit (a longer chunk runs alone). share_prompts: a group's prompt is prefilled once.
  decode_burst: tokens per device call when a step holds only decode rows (`sampling/burst.py`; 1: one per step).
  pool_pages: pages of the pool (0: `pool_pages(...)`, every trajectory in flight at its longest, so none is ever
  preempted); fewer lets more trajectories run in flight on the same memory, at the cost of recomputing the
  preempted ones (module docstring). At least one trajectory at its longest plus a page per sample of a group."""

  page_size: int = 16
  max_running: int = 0
  step_tokens: int = 256
  share_prompts: bool = True
  decode_burst: int = 16
  pool_pages: int = 0


@dataclasses.dataclass
class EngineStats:
  """What one run did: steps, tokens written to the cache by kind, and the rows the device computed."""

  steps: int = 0  # device calls, bursts included
  bursts: int = 0  # of which decode bursts
  prefills: int = 0  # prompt chunks (a shared prompt once)
  prefill_tokens: int = 0  # prompt tokens (a shared prompt once)
  extend_tokens: int = 0  # observation chunks (with the turn's last token)
  decode_tokens: int = 0  # one-token rows
  device_rows: int = 0  # the steps' bucketed rows, padding included (a burst: rows x iterations)
  page_tokens_peak: int = 0  # over trajectories: the most pages each referenced at once, x page_size
  tokens_held: int = 0  # over trajectories: the tokens each held in its pages at its end
  pages_leaked: int = 0  # pages not free again when the run ended (0)
  shapes: set = dataclasses.field(default_factory=set)  # distinct step shapes: each is one compiled program
  preemptions: int = 0  # sequences whose pages were taken for an older one's
  recompute_tokens: int = 0  # tokens computed again after a preemption
  prefix_kept_tokens: int = 0  # tokens of a shared prompt that preempted sequences kept (not computed again)
  step_seconds: float = 0.0  # wall time of the steps that fed chunks, from the call to the host's copy of the result
  burst_seconds: float = 0.0  # the same for the decode bursts
  engines: int = 1  # engines whose runs these figures sum (`agent/replicas.py`)

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "shapes": len(self.shapes)}


def as_key(key: jax.Array | None) -> jax.Array:
  """A typed PRNG key: key(0) for None, a raw uint32 key (jax.random.PRNGKey) wrapped."""
  key = jax.random.key(0) if key is None else key
  return key if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def add_stats(total: EngineStats, more: EngineStats) -> None:
  """Adds another run's figures to `total` (counts and seconds summed, step shapes joined)."""
  for f in dataclasses.fields(EngineStats):
    a, b = getattr(total, f.name), getattr(more, f.name)
    setattr(total, f.name, a | b if isinstance(a, set) else a + b)


def pool_pages(running: int, largest_group: int, pages_per_seq: int) -> int:
  """Pages of a pool that never preempts: every trajectory in flight (at least a whole group: one is admitted
  alone if it must be) at its longest, plus a group's prompt before its fork."""
  return (max(running, largest_group) + 1) * pages_per_seq


class _Seq:
  """Engine state of one trajectory (its transcript and tool state live in the rollout's `_Row`)."""

  def __init__(self, i: int, row):
    self.i, self.row = i, row
    self.pos = 0  # M-RoPE position of the next token
    self.window: np.ndarray | None = None  # the turn's last bytes (stop strings)
    self.script: list[int] | None = None  # this turn's forced ids
    self.end_at: int | None = None  # index in row.logprobs of an appended <|im_end|>, scored at the next chunk
    self.images: tuple[np.ndarray, np.ndarray] | None = None  # the pending chunk's images
    self.clip: Any = None  # (ZoomCall, future) while the clip is cut
    self.order = 0  # admission order: a sequence preempts only later ones
    self.recompute = False  # preempted: its next chunk is its transcript after the pages it kept
    self.kept_overview = False  # ... which hold the overview's images (the chunk then shows only later ones)
    self.prompt_end: tuple[int, int] | None = None  # a shared prompt's (tokens, next M-RoPE position), once forked
    self.end_row: int | None = None  # index in row.tr.ids of the token whose logits score `end_at`


class _Prompt:
  """A group's shared prompt: prefilled once as its own sequence, then forked to every member."""

  def __init__(self, members: list[_Seq]):
    self.members = members
    self.key = ("prompt", members[0].i)


def continuous_rollout(model, tok: Tokenizer, tasks, cfg: AgentConfig = AgentConfig(), key: jax.Array | None = None,
                       on_event=None, script=None, engine: EngineConfig = EngineConfig(),
                       stats: EngineStats | None = None, admit=None, row_ids=None) -> list[Trajectory]:
  """`rollout`'s contract (its arguments, `script` and `on_event` included) on the continuous engine; `stats`, if
  given, is filled with what the run did. With several processes, every process calls it with the same
  arguments (module docstring).

  Each trajectory is also reported as it ends, by a ("done", row, Trajectory) event (a video error at the start
  included), so that a caller can use it before the run ends.

  `admit(free) -> list[Task]` (optional; one process): tasks that join while the engine runs (serving). It is
  polled between steps with the number of free places (`engine.max_running` less the trajectories in flight
  or having their overview read), and the run ends when nothing is in flight and it returns none. A joining
  task's row index follows the rows before it. It needs `engine.max_running` and `cfg.cache_size` (the pool and
  its page tables are sized before the later prompts are known).

  `row_ids`: each row's index in a larger batch whose other rows other engines run (`agent/replicas.py`), the
  tasks' first and then the joining ones' in the order they join (a list the caller may extend as `admit` hands
  out tasks); None: a row's own index. A token's sampling key folds in its row's index in the whole batch, so
  which engine runs a task does not change its samples."""
  key = as_key(key)
  if admit is not None and (not engine.max_running or not cfg.cache_size or several_processes()):
    raise ValueError("admitting tasks while the engine runs needs engine.max_running > 0 and cfg.cache_size > 0 "
                     f"(got {engine.max_running}, {cfg.cache_size}) and one process ({jax.process_count()})")
  finished: dict[int, Trajectory] = {}

  def event(kind, i, info):
    if kind == "done":
      finished[i] = info
    if on_event is not None:
      on_event(kind, i, info)

  system = P.system_prompt(cfg.tool)
  mine = set(owned_rows(len(tasks)))
  with cf.ThreadPoolExecutor(cfg.workers) as pool:
    videos = Videos(cfg, pool)
    try:
      rows = _start(tasks, cfg, tok, system, videos, mine)
      for i, r in enumerate(rows):
        if r.done:
          event("done", i, _finish(r))
      if admit is not None or any(not r.done for r in rows):
        _Engine(model, tok, rows, cfg, engine, videos, event, script, stats or EngineStats(), mine,
                _Admission(admit, system) if admit else None, row_ids).run(key)
    finally:
      videos.close()
  return [finished[i] if i in finished else _finish(r) for i, r in enumerate(rows)]


class _Admission:
  """Tasks joining a running engine: their overviews are read in the thread pool, then they wait as groups of
  one (see `continuous_rollout`)."""

  def __init__(self, admit, system: str):
    self.admit, self.system = admit, system
    self.reading: dict[int, tuple[Task, cf.Future]] = {}  # row -> its task, its overview being read


def same_task_prompt(a: Task, b: Task) -> bool:
  """Whether two tasks ask the same question of the same video (with the same subtitles)."""
  return (a.video, a.problem, a.subtitles) == (b.video, b.problem, b.subtitles)


def same_prompt(a, b) -> bool:
  """Whether two rows (`rollout._Row`) start from the same prompt: task, ids and overview pixels."""
  return (same_task_prompt(a.task, b.task) and a.tr.ids == b.tr.ids
          and np.array_equal(a.pixels[0], b.pixels[0]))


def groups(rows, share: bool) -> list[list[int]]:
  """Consecutive rows whose prompts are the same (`same_prompt`), as lists of row indices; finished rows (a
  video error) are left out."""
  out: list[list[int]] = []
  for i, r in enumerate(rows):
    if r.done:
      continue
    if share and out and out[-1][-1] == i - 1 and same_prompt(rows[out[-1][0]], r):
      out[-1].append(i)
      continue
    out.append([i])
  return out


class _Engine:
  def __init__(self, model, tok, rows, cfg: AgentConfig, engine: EngineConfig, videos: Videos, event, script,
               stats: EngineStats, mine: set[int], joining: _Admission | None = None, row_ids=None):
    self.model, self.tok, self.rows, self.cfg, self.engine = model, tok, rows, cfg, engine
    self.videos, self.event, self.script, self.stats, self.mine = videos, event, script, stats, mine
    self.joining, self.row_ids = joining, row_ids
    self.mesh = mesh_of(nnx.state(model, nnx.Param))
    self.stop = self._global(stop_criteria(tok, cfg.tool.tools))  # once, not at every step
    self.split = nnx.split(model)
    self.burst_split = nnx.split(decode_weights(model)) if engine.decode_burst > 1 else None
    self.waiting = collections.deque(groups(rows, engine.share_prompts))
    self.running = engine.max_running or sum(map(len, self.waiting))
    largest = max(map(len, self.waiting), default=1)
    ps = engine.page_size
    self.pages_per_seq = -(-_cache_size(rows, cfg) // ps)
    self.max_len = self.pages_per_seq * ps
    num_pages = engine.pool_pages or pool_pages(self.running, largest, self.pages_per_seq)
    if num_pages < self.pages_per_seq + largest:
      raise ValueError(f"pool_pages={num_pages} (EngineConfig; rollout.pool_pages in a GRPO config) is too small: "
                       f"one trajectory may hold {self.pages_per_seq} pages and each of a group's {largest} samples "
                       f"copies one on write, so the pool needs at least {self.pages_per_seq + largest}")
    self.admissions = 0
    self.alloc = PageAllocator(num_pages, ps, self.pages_per_seq)
    self.kv = self._pool(num_pages)
    self.live: dict[int, _Seq] = {}
    self.peak: dict[int, int] = {}  # trajectory -> the most pages it referenced at once
    self.chunk_fed = False  # the last step fed chunks: the next one bursts the decode rows if there are any
    self.ready: list[_Seq | _Prompt] = []  # sequences with tokens to feed, in the order they became ready

  # --- the loop ----------------------------------------------------------------------------------------------
  def run(self, key: jax.Array) -> None:
    key = self._global(key)  # constant for the rollout (`sampler.draw_keys`): placed once
    while self._join() or self.live or self.waiting:
      self._admit()
      clips = any(s.clip is not None for s in self.live.values())
      if not self.ready and not clips:
        if self.joining and self.joining.reading:  # only overviews are being read: wait for one
          cf.wait([f for _, f in self.joining.reading.values()], return_when=cf.FIRST_COMPLETED)
          continue
        raise RuntimeError(f"no sequence can run and none waits for a clip: live {sorted(self.live)}")
      # Joining tasks are polled while clips are cut: block on the clips only briefly then.
      self._collect(block=not self.ready, timeout=JOIN_POLL_S if self.joining else None)
      if not self.ready:
        continue
      feeds = self._schedule(decode_only=self.chunk_fed)
      if not feeds:  # none has room in the pool until an older sequence's clip returns: wait for clips a while
        self._collect(block=True, timeout=JOIN_POLL_S)
        continue
      # One key for the rollout: each token's draw folds in its trajectory and index (`sampler.draw_keys`), so
      # sampled trajectories do not depend on which sequences share a step (when clips finish, `max_running`).
      if self._burstable(feeds, chunks_wait=self.chunk_fed):
        self._burst(feeds, key)
        self.chunk_fed = False
      else:
        self._step(feeds, key)
        self.chunk_fed = self.engine.decode_burst > 1 and any(self._feed_len(f) > 1 for f in feeds)
    self.stats.pages_leaked = self.alloc.num_pages - self.alloc.free_pages

  def _row_id(self, i: int) -> int:
    """Row i's index in the whole batch (`continuous_rollout`'s `row_ids`): what its sampling keys fold in."""
    return i if self.row_ids is None else self.row_ids[i]

  def _join(self) -> bool:
    """Polls the tasks joining a running engine (`admit`): new ones' overviews go to the thread pool, those read
    wait for admission (a video error ends its task at once). True while some are still being read."""
    j = self.joining
    if j is None:
      return False
    free = self.running - len(self.live) - sum(map(len, self.waiting)) - len(j.reading)
    for task in j.admit(free) if free > 0 else ():
      i = len(self.rows)
      self.rows.append(None)
      self.mine.add(i)
      j.reading[i] = (task, self.videos.pool.submit(_overview, task, self.videos))
    for i, (task, fut) in sorted(j.reading.items()):
      if not fut.done():
        break  # in order: first come, first admitted, and a group's samples stay together
      del j.reading[i]
      row = self.rows[i] = _new_row(task, _overview_outcome(fut), self.cfg, self.tok, j.system)
      if not row.done and _cache_size([row], dataclasses.replace(self.cfg, cache_size=0)) > self.max_len:
        row.reason = "context_limit"  # its prompt is longer than the page tables were sized for (cache_size)
      if row.done:
        self.event("done", i, _finish(row))
      elif (self.engine.share_prompts and self.waiting and self.waiting[-1][-1] == i - 1
            and same_prompt(self.rows[i - 1], row)):
        self.waiting[-1].append(i)  # the next sample of a task still waiting: it shares the prompt's prefill
      else:
        self.waiting.append([i])
    return bool(j.reading)

  def _admit(self) -> None:
    while self.waiting and (not self.live or len(self.live) + len(self.waiting[0]) <= self.running
                            and self._room(self.waiting[0])):
      seqs = [_Seq(i, self.rows[i]) for i in self.waiting.popleft()]
      self.admissions += 1
      for s in seqs:
        s.order = self.admissions
        self.live[s.i] = s
        s.row.in_cache = 0
        s.images = (s.row.pixels[0], s.row.grids[0])
        self._start_turn(s)
      if len(seqs) == 1:
        self.alloc.new(seqs[0].i)
        self.ready.append(seqs[0])
      else:
        prompt = _Prompt(seqs)
        self.alloc.new(prompt.key)
        self.ready.append(prompt)

  def _room(self, group: list[int]) -> bool:
    """Whether a group's prompt (and a page per sample) fits in the free pages beside the chunks of sequences not
    in the cache yet (always, when the pool holds every trajectory at its longest)."""
    if not self.engine.pool_pages:
      return True
    ps = self.engine.page_size
    pages = lambda n, samples: -(-n // ps) + samples
    pending = sum(pages(self._feed_len(f), len(f.members) if isinstance(f, _Prompt) else 1)
                  for f in self.ready if self._row(f).in_cache == 0)
    return self.alloc.free_pages - pending >= pages(len(self.rows[group[0]].tr.ids), len(group))

  def _row(self, f):
    return f.members[0].row if isinstance(f, _Prompt) else f.row

  def _start_turn(self, s: _Seq) -> None:
    r = s.row
    r.turn_tokens = 0
    s.window = np.zeros(self.stop.window, np.uint8)
    text = self.script(s.i, len(r.turns)) if self.script is not None else None
    s.script = None if text is None else self.tok.encode(text)

  def _forced(self, s: _Seq) -> int:
    n = s.row.turn_tokens
    return s.script[n] if s.script is not None and n < len(s.script) else -1

  def _schedule(self, decode_only: bool = False) -> list:
    """The step's feeders: decode rows first, then chunks in the order they became ready, within
    `step_tokens`; a chunk longer than that goes with the decode rows alone (were it to wait for a step without
    decode rows, it would wait for every running turn to end). Sequences that would outgrow their page table end
    with "context_limit". `decode_only` (after a step that fed chunks, when bursts are on): chunks wait for the
    next step if there are decode rows, so that steps with chunks and bursts alternate while clips keep arriving
    (otherwise nearly every step would hold a new observation and decode one token)."""
    decode_only &= any(self._burst_row(f) for f in self.ready)
    order = sorted(range(len(self.ready)), key=lambda k: (self._feed_len(self.ready[k]) > 1, k))
    feeds, tokens, keep, chunk = [], 0, [], False
    for f in [self.ready[k] for k in order]:
      n = self._feed_len(f)
      if not isinstance(f, _Prompt) and self.alloc.length(f.i) + n > self.max_len:
        f.row.reason = "context_limit"
        self._retire(f)
        continue
      if decode_only and not self._burst_row(f) or (
          feeds and tokens + n > self.engine.step_tokens and (n <= self.engine.step_tokens or chunk)):
        keep.append(f)
        continue
      if self.engine.pool_pages:
        fits, dropped = self._fits(f, feeds)
        keep += dropped  # preempted out of this step: they stay ready, with their whole transcript to compute
        tokens = sum(map(self._feed_len, feeds))
        if not fits:
          keep.append(f)
          continue
        n = self._feed_len(f)  # f itself is never preempted here
      feeds.append(f)
      tokens += n
      chunk |= n > 1
    self.ready = [f for f in self.ready if f in keep]
    return feeds

  def _fits(self, f, feeds: list) -> tuple[bool, list]:
    """Whether the pool has room for `f` beside `feeds` (a decode row with room for a whole burst); if not,
    sequences admitted after f are preempted, the latest first, until it has (those among `feeds` leave it and
    are returned) or none is left."""
    order = max(m.order for m in f.members) if isinstance(f, _Prompt) else f.order
    dropped = []
    while self.alloc.pages_needed([self._append(g) for g in feeds + [f]]) > self.alloc.free_pages:
      later = [v for v in self.live.values() if v.order > order and v.i in self.alloc and self.alloc.pages(v.i)]
      if not later:
        return False, dropped
      v = max(later, key=lambda v: (v.order, v.i))
      if v in feeds:
        feeds.remove(v)
        dropped.append(v)
      self._preempt(v)
    return True, dropped

  def _append(self, f) -> tuple[Any, int]:
    """(allocator key, tokens) that feeding f appends: a decode row reserves a whole burst's room."""
    if isinstance(f, _Prompt):
      return f.key, self._feed_len(f)
    if self.engine.decode_burst > 1 and self._burst_row(f):
      return f.i, self._burst_limit(f)
    return f.i, self._feed_len(f)

  def _preempt(self, v: _Seq) -> None:
    """Frees a sequence's pages, except the leading pages of its group's prompt that others still hold (freeing
    them would free nothing); it goes on from the rest of its transcript, computed again as one chunk."""
    keep, pos, v.kept_overview = self._kept_prefix(v)
    if keep:
      self.alloc.truncate(v.i, keep)
      self.stats.prefix_kept_tokens += keep
    else:
      self.alloc.free(v.i)
      self.alloc.new(v.i)
    v.row.in_cache, v.pos, v.recompute = keep, pos, True
    self.stats.preemptions += 1

  def _kept_prefix(self, v: _Seq) -> tuple[int, int, bool]:
    """(tokens, the M-RoPE position that follows them, whether they hold the overview's images) of the whole pages
    of v's shared prompt that other sequences hold too, cut where the positions are those of text (before the
    prompt's first image or after its last); nothing when there are none, or when v holds nothing else (preempted
    again, it frees everything)."""
    if v.prompt_end is None:
      return 0, 0, False
    n, next_pos = v.prompt_end
    ps, pages = self.alloc.page_size, self.alloc.pages(v.i)
    shared = 0
    while shared < min(n // ps, len(pages)) and self.alloc.refcount(pages[shared]) > 1:
      shared += 1
    keep = shared * ps
    pads = np.flatnonzero(np.asarray(v.row.tr.ids[:n]) == self.tok.image_pad)
    after_images = bool(not len(pads) or keep > pads[-1])
    if after_images:  # text after the last image: one position per token
      pos = next_pos - (n - keep)
    else:  # cut before the first image, where a token's position is its index
      keep = min(keep, int(pads[0]) // ps * ps)
      pos = keep
    if keep == 0 or keep >= self.alloc.length(v.i):
      return 0, 0, False
    return keep, pos, after_images

  def _feed_len(self, f) -> int:
    r = self._row(f)
    return len(r.tr.ids) - r.in_cache

  def _chunk(self, f) -> tuple[R.Chunk, list]:
    """The feeder's chunk and its slots' owners: (seq, "sample" | "end")."""
    s = f.members[0] if isinstance(f, _Prompt) else f
    r = s.row
    ids = np.asarray(r.tr.ids[r.in_cache:], np.int32)
    pixels, grids = s.images if s.images is not None else (None, None)
    if s.recompute:  # after a preemption: the transcript after the pages it kept, the images in it
      pixels, grids = _images(r, first=1 if s.kept_overview else 0)
      s.recompute = False
      self.stats.recompute_tokens += len(ids)
    else:
      self.stats.prefills += r.in_cache == 0
      kind = "prefill_tokens" if r.in_cache == 0 else "decode_tokens" if len(ids) == 1 else "extend_tokens"
      setattr(self.stats, kind, getattr(self.stats, kind) + len(ids))
    positions, next_pos = R.chunk_positions(self.model.config, ids, grids, s.pos)
    members = f.members if isinstance(f, _Prompt) else [f]
    start = r.in_cache
    slots, owners = [], []
    for m in members:
      if isinstance(f, _Prompt):
        m.prompt_end = (len(ids), next_pos)
      m.pos, m.images = next_pos, None
      m.row.in_cache = len(m.row.tr.ids)
      if m.end_at is not None:  # the logits after the turn's last token score the <|im_end|> appended to it
        slots.append(R.Slot(m.end_row - start))
        owners.append((m, "end"))
      slots.append(R.Slot(len(ids) - 1, m.window, self._forced(m), (self._row_id(m.i), len(m.row.logprobs))))
      owners.append((m, "sample"))
    return R.Chunk(f.key if isinstance(f, _Prompt) else s.i, ids, positions, pixels, grids, slots), owners

  def _step(self, feeds, key) -> None:
    chunks, owners = [], []
    for f in feeds:
      c, o = self._chunk(f)
      chunks.append(c)
      owners += o
    inp = R.build_step(self.model.config, self.alloc, chunks, self.stop.window)
    self.stats.steps += 1
    self.stats.device_rows += inp.ids.shape[0]
    self.stats.shapes.add(R.step_shape(inp, self.kv))
    t0 = time.perf_counter()
    self.kv, out = R.ragged_step(self.split, self.kv, self._global(inp), key, self.stop,
                                 self.cfg.sampling, end_token=self.tok.im_end)
    out = to_host(out)
    self.stats.step_seconds += time.perf_counter() - t0
    for f in feeds:
      if isinstance(f, _Prompt):  # the members take the prompt's pages
        for m in f.members:
          self.alloc.fork(f.key, m.i)
        self.alloc.free(f.key)
    self._note_pages([m for f in feeds for m in (f.members if isinstance(f, _Prompt) else [f])])
    for k, (s, what) in enumerate(owners):
      if what == "end":
        s.row.logprobs[s.end_at] = float(out.end_logprob[k])
        s.end_at = None
      else:
        self._take(s, int(out.tokens[k]), float(out.logprobs[k]), out.windows[k],
                   bool(out.hit_token[k] or out.hit_string[k]))

  def _note_pages(self, seqs) -> None:
    for s in seqs:
      self.peak[s.i] = max(self.peak.get(s.i, 0), len(self.alloc.pages(s.i)))

  # --- decode bursts (`sampling/burst.py`) ---------------------------------------------------------------------
  def _burstable(self, feeds, chunks_wait: bool) -> bool:
    """Whether the step holds only decode rows (each sequence feeds its last sampled token, no appended
    <|im_end|> to score), every one there is, and no chunk waits unless `chunks_wait` (chunks were just fed,
    `_schedule`): then it runs as a burst of up to `decode_burst` tokens."""
    return (self.engine.decode_burst > 1 and all(map(self._burst_row, feeds))
            and not any(self._burst_row(f) or not chunks_wait for f in self.ready))

  def _burst_row(self, f) -> bool:
    return isinstance(f, _Seq) and f.end_at is None and self._feed_len(f) == 1

  def _burst_limit(self, s: _Seq) -> int:
    """The most tokens a burst feeds the sequence: the burst's length, the turn's budget, its page table."""
    return min(self.engine.decode_burst, self.cfg.sampling.max_new_tokens - s.row.turn_tokens,
               self.max_len - self.alloc.length(s.i))

  def _burst(self, feeds: list[_Seq], key) -> None:
    """Up to `decode_burst` tokens for each sequence in one device call: pages reserved for each row's limit (its
    turn's budget, its page table), the unused room given back after; then each row's tokens are taken as one-token
    steps would take them (a row that stopped ends its turn)."""
    k, rows, windows = self.engine.decode_burst, [], []
    forced = np.full((len(feeds), k), -1, np.int32)
    for j, s in enumerate(feeds):
      r = s.row
      limit = self._burst_limit(s)
      rows.append((s.i, r.tr.ids[-1], s.pos, limit))
      windows.append(s.window)
      if s.script is not None:
        part = s.script[r.turn_tokens:r.turn_tokens + limit]
        forced[j, :len(part)] = part
    starts = [self.alloc.length(s.i) for s in feeds]
    inp = B.build_burst(self.alloc, rows, windows, forced, self.stop.window,
                        [(self._row_id(s.i), len(s.row.logprobs)) for s in feeds])
    self._note_pages(feeds)
    t0 = time.perf_counter()
    self.kv, out = B.burst_step(self.burst_split, self.kv, self._global(inp), key, self.stop,
                                self.cfg.sampling)
    out = to_host(out)
    self.stats.burst_seconds += time.perf_counter() - t0
    self.stats.steps += 1
    self.stats.bursts += 1
    self.stats.device_rows += inp.tokens.shape[0] * int(out.num.max())
    self.stats.shapes.add(B.burst_shape(inp, self.kv))
    for j, s in enumerate(feeds):
      n, r = int(out.num[j]), s.row
      self.alloc.truncate(s.i, starts[j] + n)
      self.stats.decode_tokens += n
      s.pos += n
      r.tr.append_generated(out.tokens[j, :n - 1].tolist())
      r.logprobs += out.logprobs[j, :n - 1].tolist()
      r.turn_tokens += n - 1
      r.in_cache = len(r.tr.ids)  # every token but the last sampled one is in the pages
      self.event("tokens", s.i, out.tokens[j, :n].tolist())
      self._take(s, int(out.tokens[j, n - 1]), float(out.logprobs[j, n - 1]), out.windows[j], bool(out.stopped[j]),
                 told=True)

  def _take(self, s: _Seq, token: int, logprob: float, window: np.ndarray, stopped: bool,
            told: bool = False) -> None:
    """Appends a sampled token and ends the turn or queues the next one; `told`: its "tokens" event was sent."""
    r = s.row
    r.tr.append_generated([token])
    if not told:
      self.event("tokens", s.i, [token])
    r.logprobs.append(logprob)
    r.turn_tokens += 1
    s.window = window
    if stopped or r.turn_tokens >= self.cfg.sampling.max_new_tokens:
      self._end_turn(s)
    else:
      self.ready.append(s)

  # --- turns and observations (as `rollout._end_turn` and `rollout._observe`, one sequence at a time) -------
  def _end_turn(self, s: _Seq) -> None:
    r, i = s.row, s.i
    text = r.tr.turn_text()
    r.turns.append(text)
    self.event("turn", i, text)
    out = r.episode.step(text)
    if isinstance(out, P.Final):
      r.answer, r.reason = out.answer, out.reason
      self.event("final", i, out)
      self._retire(s)
      return
    if r.tr.close_turn():
      r.logprobs.append(0.0)
      s.end_at, s.end_row = len(r.logprobs) - 1, len(r.tr.ids) - 2
    if isinstance(out, P.ToolError):
      r.calls.append(dict(round=out.round, tool=out.tool, error=out.message))  # tool None: the turn named several
      self.event("tool_error", i, out)
      self._observe(s, out.observation, None)
    else:  # a tool call: its frames are cut in the pool (by the row's owner) while the other sequences run
      fut = self.videos.pool.submit(_clip, r.task, out, self.videos) if i in self.mine else None
      s.clip = (out, fut)

  def _collect(self, block: bool, timeout: float | None = None) -> None:
    """Observations of the clips that are cut (waiting for one at least when `block`, in one process at most
    `timeout` s if given), in row order; with several processes, those every process agreed on (module
    docstring)."""
    waiting = {s.i: s for s in self.live.values() if s.clip is not None}  # the same rows on every process
    if not waiting:
      return
    outcomes = self._done_clips(waiting, block, timeout)
    while block and not outcomes and timeout is None:
      outcomes = self._done_clips(waiting, block)
    for i in sorted(outcomes):
      s = waiting[i]
      call, _ = s.clip
      s.clip = None
      r = s.row
      tool = T.by_name(call.tool)
      outcome = outcomes[i]
      if "error" in outcome:
        message = outcome["error"]
        err = r.episode.extraction_failed(for_model(message, r.task.video))
        r.calls.append(tool.log(call, error=message))
        self.event("tool_error", s.i, err)
        self._observe(s, err.observation, None)
        continue
      ts, pixels, grids = outcome["value"]
      obs = r.episode.observation(ts)
      r.calls.append(tool.log(call, ts))
      self.event(tool.name, s.i, r.calls[-1])
      self._observe(s, obs, (pixels, grids))

  def _done_clips(self, waiting: dict[int, _Seq], block: bool, timeout: float | None = None) -> dict[int, dict]:
    """{row: `_outcome`} of the waiting clips that are cut: this process's in one process, every process's
    (identical everywhere) with several; `block`: this process waits for one of its own first (in one process
    until one is done or `timeout`, with several up to `CLIP_POLL_S`)."""
    futures = {s.clip[1]: i for i, s in waiting.items() if s.clip[1] is not None}
    several = several_processes()
    if block and futures:
      done = cf.wait(list(futures), timeout=CLIP_POLL_S if several else timeout,
                     return_when=cf.FIRST_COMPLETED).done
    else:
      done = [f for f in futures if f.done()]
    outcomes = {futures[f]: _outcome(f, (VideoError, ValueError, OSError)) for f in done}
    if not several:
      return outcomes
    if not host_allgather(np.asarray(len(outcomes), np.int32)).any():  # the common case: one small collective
      return {}
    return _shared(outcomes, "running the tool call", [r.task for r in self.rows])

  def _pool(self, num_pages: int) -> jax.Array:
    """The pool's pages, made on the model's chips with the kv heads split as its rules say (`PagePool.sharding`),
    on the default device when the model has no mesh."""
    make = lambda: PagePool.init(self.model.config.text, num_pages, self.engine.page_size, self.model.dtype).kv
    if self.mesh is None:
      return make()
    shape = jax.eval_shape(make).shape
    return jax.jit(make, out_shardings=PagePool.sharding(self.mesh, self.model.options.rules, shape))()

  def _global(self, tree):
    """Host inputs of a device step as global arrays replicated over the model's mesh when it spans several
    processes (every process passes the same values); unchanged in one process."""
    return replicate(tree, self.mesh)

  def _observe(self, s: _Seq, text: str, images) -> None:
    r = s.row
    if images is None:
      _append(r, text, ())
    else:
      r.pixels.append(images[0])
      r.grids.append(images[1])
      s.images = images
      _append(r, text, _tokens_per_image(images[1]))
    self._start_turn(s)
    self.ready.append(s)

  def _retire(self, s: _Seq) -> None:
    """A finished sequence frees its pages and is reported ("done") now."""
    self.live.pop(s.i, None)
    if s.i in self.alloc:
      self.stats.page_tokens_peak += self.peak.pop(s.i, 0) * self.engine.page_size
      self.stats.tokens_held += self.alloc.length(s.i)
      self.alloc.free(s.i)
    self.event("done", s.i, _finish(s.row))
