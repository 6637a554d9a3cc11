"""One rollout engine per data-parallel replica of the rollout mesh.

    trajs = replicated_rollout(model, tok, tasks, agent_cfg, key, engine=EngineConfig(max_running=1024))

The rollout mesh's `data` axis holds whole copies of the sampler's weights (each split over its own `tensor`
chips). One engine over the whole mesh would make every chip hold the same page pool and every device step a
program over every chip; instead each replica runs an engine of its own (`agent/engine.py`) on its own chips:
its share of the tasks (whole groups of the same prompt, in contiguous blocks; when tasks join as places free,
an engine takes its own block's waiting groups first, then, on any process, the nearest block's), its own pool
(`max_running` / replicas trajectories in flight, `pool_pages` pages; the kv heads split over the replica's chips
as the rules say), its own videos and clips, and no traffic with the other replicas while it runs. This is the
layout the compile command's engine programs assume (`aot/engine_programs.py`).

A process runs the engines of the replicas whose chips it holds, each in a thread of its own (a v5p host whose 4
chips are 4 replicas runs 4 engines; dispatch releases the GIL while a device computes). When all are done the
processes exchange their trajectories (one collective), so that every process returns every trajectory, as one
engine over the whole mesh does, each tagged with the replica that made it (`Trajectory.replica`) and the one
whose block it was in (`Trajectory.home`). With `pixels="own"` the exchange leaves the images out: a trajectory
made on another process comes back with `pixel_values` None (its grids, tokens and log-probs are there), which is
what GRPO and evaluation need (at the 7B image budgets every trajectory's pixels on every host would be tens of
GB per host per RL step; `train/placement.py` trains each trajectory on its home's chips and moves only the pixels
of those another process's engine took). A failure in one process's engine is raised on every process.

The replicas' weights are the model's own buffers seen on each replica's mesh (no copy): each replica must hold
whole weights (no rule splits a weight over `data`) and lie within one process (the data axis spans hosts, the
tensor axis does not). A model whose mesh has one replica, or none, runs one `continuous_rollout` (and so, with a
warning, does one whose replicas span processes: every process then runs the one engine on every row, as
`agent/engine.py` says).

The split does not change the results: a token's sampling key folds in its row's index in the whole batch
(`continuous_rollout`'s `row_ids`), so trajectories equal one engine's over every task, sampled ones included
(up to the rounding of another layout). Events reach `on_event` with the row's index in the whole batch, from
the engines' threads one at a time, for this process's rows only.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import threading
import traceback
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomer_jax.agent.engine import EngineConfig, EngineStats, add_stats, as_key, continuous_rollout, same_task_prompt
from zoomer_jax.agent.rollout import AgentConfig, Task, Trajectory, alone, raise_fatal
from zoomer_jax.parallel.distributed import kv_store, mesh_of, share_by_key

DATA = "data"


def replica_meshes(mesh: Mesh) -> list[Mesh]:
  """The chips of each data-parallel replica of `mesh`, with its axes (data of size 1)."""
  axis = mesh.axis_names.index(DATA)
  return [Mesh(np.take(mesh.devices, [d], axis=axis), mesh.axis_names, axis_types=mesh.axis_types)
          for d in range(mesh.devices.shape[axis])]


def spanning_replica(mesh: Mesh) -> str | None:
  """Why `mesh`'s replicas cannot each run an engine in one process (a replica whose chips are on several
  processes), or None."""
  if DATA not in mesh.axis_names:
    return None
  for d, sub in enumerate(replica_meshes(mesh)):
    procs = {dev.process_index for dev in sub.devices.flat}
    if len(procs) > 1:
      return (f"replica {d} of the rollout mesh {dict(mesh.shape)} spans processes {sorted(procs)} (rollout.mesh: "
              f"put the data axis across hosts and keep the tensor axis within one)")
  return None


def local_replicas(mesh: Mesh) -> list[int]:
  """The replicas of `mesh` whose chips are all this process's."""
  return [d for d, sub in enumerate(replica_meshes(mesh))
          if {dev.process_index for dev in sub.devices.flat} == {jax.process_index()}]


def _spec_axes(spec: PartitionSpec) -> set[str]:
  out = set()
  for entry in spec:
    out |= set(entry) if isinstance(entry, tuple) else {entry} if entry else set()
  return out


def replica_model(model, sub: Mesh, name: str = "the model"):
  """`model` on one replica's mesh `sub` (a `replica_meshes` entry): every array laid out on the parent mesh is
  seen on `sub` through the shards this replica's chips already hold (no copy); an array elsewhere (a process's
  own, not on the mesh) is copied onto `sub`, replicated."""
  parent = mesh_of(nnx.state(model, nnx.Param))
  graphdef, state = nnx.split(model)
  devices = set(sub.devices.flat)

  def view(path, x):
    if not isinstance(x, jax.Array):
      return x
    s = x.sharding
    if not (isinstance(s, NamedSharding) and s.mesh == parent):
      if not x.is_fully_addressable:
        raise ValueError(f"{name}'s array {jax.tree_util.keystr(path)} spans processes on another mesh than its "
                         f"weights' ({s}): it cannot be placed on one replica")
      return jax.device_put(x, NamedSharding(sub, PartitionSpec()))
    if DATA in _spec_axes(s.spec) and s.mesh.shape[DATA] > 1:
      raise ValueError(f"{name}'s array {jax.tree_util.keystr(path)} is split over the rollout mesh's data axis "
                       f"({s.spec}): one engine per replica needs whole weights on each replica (rollout.mesh.rules)")
    target = NamedSharding(sub, s.spec)
    shards = {sh.device: sh.data for sh in x.addressable_shards if sh.device in devices}
    return jax.make_array_from_single_device_arrays(
        x.shape, target, [shards[d] for d in target.addressable_devices_indices_map(x.shape)])
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(view, state))


def task_groups(tasks) -> list[list[int]]:
  """Consecutive tasks with the same video, question and subtitles (a GRPO prompt's samples, which share its
  prefill), as lists of indices."""
  groups: list[list[int]] = []
  for i, t in enumerate(tasks):
    if groups and same_task_prompt(tasks[groups[-1][0]], t):
      groups[-1].append(i)
    else:
      groups.append([i])
  return groups


def split_groups(groups: list[list[int]], replicas: int) -> list[list[int]]:
  """Each replica's task indices: whole groups (`task_groups`), in contiguous blocks of about equal numbers of
  groups."""
  out: list[list[int]] = [[] for _ in range(replicas)]
  for g, members in enumerate(groups):
    out[g * replicas // len(groups)] += members
  return out


def first_groups(rows: list[int], groups: list[list[int]], running: int) -> list[int]:
  """The first of `rows` (whole groups of `groups`) that fit `running` places: at least one group."""
  inside, out = set(rows), []
  for g in (g for g in groups if g[0] in inside):
    if out and len(out) + len(g) > running:
      break
    out += g
  return out


def replica_engines(model) -> int:
  """How many engines `replicated_rollout` runs `model`'s rollouts on, over every process (1: one
  `continuous_rollout`)."""
  mesh = mesh_of(nnx.state(model, nnx.Param)) if model is not None else None
  return 1 if _one_engine(mesh) else int(mesh.shape[DATA])


def _one_engine(mesh) -> bool:
  return mesh is None or DATA not in mesh.axis_names or mesh.shape[DATA] == 1 or bool(spanning_replica(mesh))


def replicated_rollout(model, tok, tasks, cfg: AgentConfig = AgentConfig(), key: jax.Array | None = None,
                       on_event=None, script=None, engine: EngineConfig = EngineConfig(),
                       stats: EngineStats | None = None, pixels: str = "all", join: bool = False) -> list[Trajectory]:
  """`continuous_rollout`'s contract with one engine per data-parallel replica of the model's mesh (module
  docstring); every process calls it with the same arguments. `engine.max_running` counts trajectories in flight
  over all replicas (0: every task), `engine.pool_pages` each engine's pool. `stats` sums this process's
  engines' (and `stats.engines` counts them). `pixels`: "all" (every process gets every trajectory's images) or
  "own" (only those its own engines made; the others' `pixel_values` are None). `join`: each engine starts with
  the first of its tasks that fit in flight (whole groups) and the rest join as places free (`continuous_rollout`'s
  `admit`; needs `cfg.cache_size`), so no engine waits for a batch's slowest trajectory and a task's video is read
  only when it joins; an engine takes its own block's waiting groups first (in order) and, when none is left,
  the next group of the nearest block that has one, on its own host or another's (across processes through the
  distributed runtime's key-value store, `_Waiting`), instead of idling. Without it (and with one engine over the
  whole mesh) every task's overview is read at the start."""
  if pixels not in ("all", "own"):
    raise ValueError(f"replicated_rollout: pixels must be 'all' or 'own', got {pixels!r}")
  mesh = mesh_of(nnx.state(model, nnx.Param))
  if _one_engine(mesh):
    if mesh is not None and (why := spanning_replica(mesh)):
      warnings.warn(f"one rollout engine over the whole mesh: {why}", stacklevel=2)
    return continuous_rollout(model, tok, tasks, cfg, key, on_event=on_event, script=script, engine=engine,
                              stats=stats)
  key_data = np.asarray(jax.random.key_data(as_key(key)))  # placed on each replica's chips by its engine
  subs = replica_meshes(mesh)
  mine = local_replicas(mesh)
  groups = task_groups(tasks)
  parts = split_groups(groups, len(subs))
  home = {i: d for d, rows in enumerate(parts) for i in rows}
  largest = max(map(len, groups), default=1)
  running = max(-(-(engine.max_running or len(tasks)) // len(subs)), largest)
  lock = threading.Lock()
  results: dict[int, Trajectory] = {}
  total = stats if stats is not None else EngineStats()
  total.engines = 0
  busy = [d for d in mine if parts[d]]
  # Each engine's rows in the whole batch, in its own row order: its first tasks, then those it takes as they join.
  first = {d: parts[d] if not join else first_groups(parts[d], groups, running) for d in range(len(subs))}
  taken = {d: first[d] for d in busy}
  started = {i for rows in first.values() for i in rows}
  # The tasks not yet started, per block, in order: each engine takes its own block's, then the nearest one's.
  waiting = _Waiting([[g for g in groups if home[g[0]] == d and g[0] not in started] for d in range(len(subs))],
                     shared=jax.process_count() > 1)

  def run(d: int, model_d) -> tuple[list[Trajectory], EngineStats]:
    rows = taken[d]
    st = EngineStats()
    events = None if on_event is None else _Serial(on_event, rows, lock)
    row_script = None if script is None else (lambda i, rnd: script(rows[i], rnd))
    held: list[list[int]] = []  # a group this engine took that has not fit its free places yet

    def admit(free: int) -> list[Task]:  # whole groups, in order; a joining task's row follows the rows before it
      out = []
      while True:
        if not held:
          if free - len(out) < waiting.smallest or not (g := waiting.take(d)):
            break
          held.append(g)
        if len(out) + len(held[0]) > free:
          break
        out += held.pop()
      rows.extend(out)
      return [tasks[i] for i in out]
    with alone(), jax.set_mesh(subs[d]):
      k = jax.device_put(jax.random.wrap_key_data(key_data), NamedSharding(subs[d], PartitionSpec()))
      out = continuous_rollout(model_d, tok, [tasks[i] for i in rows], cfg, k, on_event=events,
                               script=row_script, engine=dataclasses.replace(engine, max_running=running),
                               stats=st, row_ids=rows, admit=admit if join else None)
    return out, st

  fatal = None
  try:
    models = {d: replica_model(model, subs[d]) for d in busy}  # here: nnx's graph walks are not thread-safe
    with cf.ThreadPoolExecutor(max(1, len(busy)), thread_name_prefix="replica") as pool:
      futures = {d: pool.submit(run, d, models[d]) for d in busy}
      for d, fut in futures.items():
        trajs, st = fut.result()
        results.update((i, dataclasses.replace(t, replica=d, home=home[i])) for i, t in zip(taken[d], trajs))
        add_stats(total, st)
  except Exception as e:
    if jax.process_count() == 1:
      raise
    fatal = [type(e).__name__, "".join(traceback.format_exception(e)).rstrip()]
  if jax.process_count() > 1:
    local = {f"fatal{jax.process_index()}": fatal} if fatal else {}
    local.update({str(i): _pack(t, with_pixels=pixels == "all") for i, t in results.items()})
    shared = share_by_key(local)
    waiting.close()  # after the exchange: every process's engines are done taking
    for k, v in shared.items():
      if k.startswith("fatal"):
        raise_fatal(*v, f"the rollout engines of process {k[len('fatal'):]} failed")
    results = {int(k): results[int(k)] if int(k) in results else _unpack(v)  # its own: with their pixels
               for k, v in shared.items()}
  return [results[i] for i in range(len(tasks))]


_QUEUES = itertools.count()  # every process calls replicated_rollout in the same order: the same queue names


class _Waiting:
  """The tasks no engine started with, as whole groups in order, per replica's block; each group is taken once.
  An engine takes its own block's next group first and, once that is empty, the next of the nearest block that
  still has one (looking back first, as `train/placement.py` does), so a replica trains mostly what it made and
  only an engine that ran out of its own work takes another's. Each block is a counter: under a lock in one
  process; across processes the distributed runtime's atomic counter (its key-value store, the one
  `jax.distributed.initialize` set up), so an engine on one host takes groups from another host's block (reading
  their videos itself) instead of idling while that host works through them."""

  def __init__(self, blocks: list[list[list[int]]], shared: bool):
    self.blocks = blocks
    sizes = [len(g) for block in blocks for g in block]
    self.smallest = min(sizes, default=1)
    queue = next(_QUEUES)
    self.keys = [f"zoomer_jax/rollout_queue/{queue}/{d}" if shared and block else None
                 for d, block in enumerate(blocks)]
    self._next, self._lock = [0] * len(blocks), threading.Lock()
    self._empty = [not block for block in blocks]  # a counter only grows: once past its end, no more round trips

  def take(self, d: int) -> list[int] | None:
    """The next waiting group for replica `d`'s engine: its own block's, else the nearest block's; None when
    every block is empty."""
    n = len(self.blocks)
    for b in sorted(range(n), key=lambda b: (abs(b - d), b > d)):
      if self._empty[b]:
        continue
      if self.keys[b] is None:
        with self._lock:
          i, self._next[b] = self._next[b], self._next[b] + 1
      else:
        i = kv_store().key_value_increment(self.keys[b], 1) - 1
      if i >= len(self.blocks[b]) - 1:
        self._empty[b] = True
      if i < len(self.blocks[b]):
        return self.blocks[b][i]
    return None

  def close(self) -> None:
    if jax.process_index() == 0:
      for key in self.keys:
        if key is not None:
          kv_store().key_value_delete(key)


class _Serial:
  """An engine's events for the caller: rows renumbered to the whole batch, one engine's call at a time."""

  def __init__(self, on_event, rows: list[int], lock: threading.Lock):
    self.on_event, self.rows, self.lock = on_event, rows, lock

  def __call__(self, kind, i, info):
    with self.lock:
      self.on_event(kind, self.rows[i], info)


_ARRAYS = ("ids", "response_mask", "logprobs", "pixel_values", "image_grid_thw")


def _pack(t: Trajectory, with_pixels: bool = True) -> dict:
  """A trajectory as `distributed.pack` takes it (arrays bit for bit; `pixel_values` None unless `with_pixels`)."""
  arrays = {k: getattr(t, k) for k in _ARRAYS}
  if not with_pixels:
    arrays["pixel_values"] = None
  return dict(task=dataclasses.asdict(t.task), **arrays, calls=t.calls, answer=t.answer,
              finish_reason=t.finish_reason, rounds=t.rounds, turns=t.turns, replica=t.replica, home=t.home)


def _unpack(d: dict) -> Trajectory:
  task = dict(d["task"], subtitles=tuple(tuple(s) for s in d["task"]["subtitles"]))
  return Trajectory(task=Task(**task), **{k: d[k] for k in _ARRAYS}, calls=d["calls"], answer=d["answer"],
                    finish_reason=d["finish_reason"], rounds=d["rounds"], turns=d["turns"], replica=d["replica"],
                    home=d["home"])
