"""GRPO's training rows follow the rollout replicas that made the trajectories (train/placement.py)."""

import collections

import numpy as np

from zoomer_jax.agent.replicas import replica_meshes
from zoomer_jax.agent.rollout import Task, Trajectory
from zoomer_jax.parallel.mesh import make_mesh
from zoomer_jax.train import placement as PL


def _replica_of(mesh):
  return {dev: r for r, sub in enumerate(replica_meshes(mesh)) for dev in sub.devices.flat}


def test_each_row_is_homed_on_the_replica_whose_chips_hold_it():
  train = make_mesh((2, 4, 1))  # grpo_tiny: rows over data x fsdp, one per chip; rollout on the same mesh
  homes = PL.home_replicas(train, train, 8)
  of = _replica_of(train)
  held = PL.row_devices(train, 8)
  assert all(len(h) == 1 for h in held)
  assert homes == [of[next(iter(h))] for h in held]
  assert collections.Counter(homes) == {0: 4, 1: 4}
  # The v5p layout: training FSDP over every chip, the rollout one replica per chip: a row per replica.
  rollout = make_mesh((8, 1, 1))
  homes = PL.home_replicas(make_mesh((1, 8, 1)), rollout, 8)
  assert sorted(homes) == list(range(8))
  # A row held by several chips (tensor 2): the replica holding most of them.
  homes = PL.home_replicas(make_mesh((1, 4, 2)), rollout, 4)
  of = _replica_of(rollout)
  for h, home in zip(PL.row_devices(make_mesh((1, 4, 2)), 4), homes):
    assert len(h) == 2 and home == min(of[d] for d in h)
  # No homes: rows replicated on every chip (2 rows do not divide 8 shards), or a rollout of one replica.
  assert PL.home_replicas(train, train, 2) is None
  assert PL.home_replicas(train, make_mesh((1, 8, 1)), 8) is None
  assert PL.home_replicas(train, None, 8) is None


def test_place_keeps_each_trajectory_on_its_home_and_moves_only_the_surplus():
  homes = [0, 0, 0, 0, 1, 1, 1, 1]
  balanced = PL.place([0] * 8 + [1] * 8, homes)
  assert balanced == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
  # Replica 0 made 9 of 12 (dynamic sampling kept more of its groups): row 7 of the first micro-batch takes one
  # of replica 0's, the only trajectory trained away from its replica.
  replicas = [0] * 9 + [1] * 3
  order = PL.place(replicas, homes)
  assert sorted(order) == list(range(12))
  assert order == [0, 1, 2, 3, 9, 10, 11, 4, 5, 6, 7, 8]
  moved = [k for pos, k in enumerate(order) if replicas[k] != homes[pos % 8]]
  assert moved == [4]
  # A home with none left takes from the nearest replica before it that has any, else the nearest after it.
  assert PL.place([1, 1, 3, 3, 3], [0, 2]) == [0, 1, 2, 3, 4]
  assert PL.place([0, 4, 4, 2], [3, 3]) == [3, 0, 1, 2]
  assert PL.place([0, 4, 4, 2], [1, 3]) == [0, 3, 1, 2]
  # More replicas than groups (a rollout of 8 replicas, 2 groups of 4 made by replicas 0 and 4): rows homed on
  # the idle replicas 1-3 and 5-7 take the nearest made ones, so none crosses from one half to the other.
  order = PL.place([0] * 4 + [4] * 4, list(range(8)))
  assert order == [0, 1, 2, 3, 4, 5, 6, 7]
  assert PL.place([0, 0], [5]) == [0, 1]
  # One engine (replica -1) or no homes: the given order.
  assert PL.place([-1] * 4, homes) == [0, 1, 2, 3]
  assert PL.place([0, 1, 0], None) == [0, 1, 2]


def test_share_pixels_in_one_process_moves_nothing():
  traj = Trajectory(task=Task("v.mp4", "q", "A"), ids=np.zeros(3, np.int32), response_mask=np.zeros(3, np.int32),
                    logprobs=np.zeros(3, np.float32), pixel_values=np.ones((4, 8), np.float32),
                    image_grid_thw=np.array([[1, 2, 2]]), calls=[], answer="A", finish_reason="answer", rounds=1,
                    turns=["x"], replica=1)
  mesh = make_mesh((2, 4, 1))
  got, sent = PL.share_pixels([traj, traj], [1, 0], mesh, mesh, 8)
  assert sent == 0 and got[0] is traj and got[1] is traj

