"""Which training rows a GRPO step's trajectories take, so that a trajectory's pixels stay on the process whose
rollout engine made them.

With one engine per data-parallel replica (`agent/replicas.py`, `pixels="own"`), a process ends a rollout
holding the images of its own replicas' trajectories only; every process holds every trajectory's tokens,
log-probs and score. A training micro-batch of `rows` rows is laid out over the training mesh's batch axes
(`batch.row_spec`), so row j of every micro-batch is held by the same chips. `place` gives row j, micro-batch
after micro-batch, the trajectories of the replica whose chips hold it (its home replica); each process then
builds its own rows (`batch.make_global_batch`) from pixels it already has. A trajectory counts as its replica's
by the block of tasks the replica was given at the start (`Trajectory.home`), not by the engine that made it: when
tasks join as places free, an engine whose block ends early takes tasks waiting in another's, and which one does
depends on timing, while the training batches must not (the same trajectories give the same micro-batches on every
run); such a trajectory's pixels travel to its home's process. A row whose home has none left (the
replicas made unequal numbers of the trajectories kept: dynamic sampling keeps whole groups, whichever replica made
them, and a rollout may have more replicas than groups) takes one from the nearest replica before it along the
rollout mesh's data axis that has any, else the nearest after it; only such trajectories' pixels travel, and only
when that replica is on another process (`share_pixels`). Looking back first follows `replicas.split_groups`,
which gives each busy replica the idle ones after it; with a process's replicas neighbours on the data axis (as
`make_mesh` lays out CPU processes, tests/test_multiprocess.py, and TPU hosts: `parallel.mesh._host_local`) a move
then mostly stays within the process.

The rule reads the meshes' layouts, never which process holds a chip, so one process and several give the same
micro-batches. A micro-batch mixes the replicas' trajectories (one engine's order kept a group's samples
together); advantages are computed per group before, so what changes is only which trajectories share an
optimizer step.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from zoomer_jax.agent.replicas import replica_meshes
from zoomer_jax.agent.rollout import Trajectory
from zoomer_jax.parallel.distributed import share_by_key
from zoomer_jax.train.batch import row_spec


def row_devices(mesh: Mesh, rows: int) -> list[set]:
  """The chips that hold each row of a `rows`-row training batch (`batch.row_spec`)."""
  held: list[set] = [set() for _ in range(rows)]
  for dev, idx in NamedSharding(mesh, row_spec(mesh, rows)).devices_indices_map((rows,)).items():
    for r in range(*idx[0].indices(rows)):
      held[r].add(dev)
  return held


def home_replicas(train_mesh: Mesh, rollout_mesh: Mesh | None, rows: int) -> list[int] | None:
  """Each row's home: the data-parallel replica of `rollout_mesh` that holds most of the row's chips (the first
  such). None when no row has a home of its own: one replica, or rows held alike by every chip (a micro-batch
  that does not divide the batch axes is replicated)."""
  if rollout_mesh is None or "data" not in rollout_mesh.axis_names or rollout_mesh.shape["data"] == 1:
    return None
  held = row_devices(train_mesh, rows)
  if all(h == held[0] for h in held):
    return None
  chips = [set(sub.devices.flat) for sub in replica_meshes(rollout_mesh)]
  return [max(range(len(chips)), key=lambda r: (len(h & chips[r]), -r)) for h in held]


def place(replicas: Sequence[int], homes: Sequence[int] | None) -> list[int]:
  """The trajectories' order in the training batches (micro-batch i takes order[i * rows:(i + 1) * rows], rows =
  len(homes)): row j takes its home replica's next trajectory, or, when that replica has none left, the next of
  the nearest replica before it (by index) that has any, else of the nearest after it. `replicas[k]`: trajectory k's
  replica (`Trajectory.home`); any -1 (one engine made them) or no homes keeps the given order."""
  if homes is None or any(r < 0 for r in replicas):
    return list(range(len(replicas)))
  left: dict[int, collections.deque] = collections.defaultdict(collections.deque)
  for k, r in enumerate(replicas):
    left[r].append(k)
  order: list[int] = []
  while len(order) < len(replicas):
    for home in homes:
      if len(order) == len(replicas):
        break
      q = left.get(home)
      if not q:
        q = left[min((r for r in left if left[r]), key=lambda r, h=home: (r > h, abs(r - h)))]
      order.append(q.popleft())
  return order


def share_pixels(trajs: Sequence[Trajectory], order: Sequence[int], train_mesh: Mesh, rollout_mesh: Mesh | None,
                 rows: int) -> tuple[list[Trajectory], int]:
  """`trajs` with the pixels this process's training rows need and lacks (`pixel_values` None: made on another
  process), sent by the processes whose engines made them (`Trajectory.replica`); and the bytes this process
  sent. A collective (every process calls it with the same trajectories and order); nothing moves in one process,
  nor when every row's trajectory was made on the processes that hold the row."""
  trajs = list(trajs)
  if jax.process_count() == 1:
    return trajs, 0
  me = jax.process_index()
  row_procs = [{d.process_index for d in h} for h in row_devices(train_mesh, rows)]
  maker = ({r: sub.devices.flat[0].process_index for r, sub in enumerate(replica_meshes(rollout_mesh))}
           if rollout_mesh is not None and "data" in rollout_mesh.axis_names else {})
  send, need = {}, []
  for pos, k in enumerate(order):
    t, procs = trajs[k], row_procs[pos % rows]
    if t.image_grid_thw is None or not len(t.image_grid_thw):
      continue
    if t.pixel_values is None:
      if me in procs:
        need.append(k)
    elif maker.get(t.replica) == me and procs - {me}:
      send[str(k)] = t.pixel_values
  got = share_by_key(send)
  for k in need:
    if str(k) not in got:
      raise RuntimeError(f"share_pixels: trajectory {k} (replica {trajs[k].replica}) is trained on process {me} "
                         "but no process sent its pixels")
    trajs[k] = dataclasses.replace(trajs[k], pixel_values=np.asarray(got[str(k)]))
  return trajs, int(sum(np.asarray(v).nbytes for v in send.values()))
