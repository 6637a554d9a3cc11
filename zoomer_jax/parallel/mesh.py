"""Device mesh from config: axes (data, fsdp, tensor) with ICI (within a slice) and DCN (across slices) degrees.

One degree per axis may be -1, meaning "whatever is left" of the devices. With every DCN degree 1 the mesh
follows the slice's torus (`create_device_mesh`); otherwise devices are arranged slice-major with
`create_hybrid_device_mesh`. Either way a data-parallel slice (or else a tensor group) that fits one host is
kept on one host (`_host_local`).
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def _fill(degrees: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  degrees = [int(d) for d in degrees]
  if degrees.count(-1) > 1:
    raise ValueError(f"{what} degrees {degrees}: at most one may be -1")
  known = math.prod(d for d in degrees if d != -1)
  if any(d == 0 or d < -1 for d in degrees) or total % known:
    raise ValueError(f"{what} degrees {degrees} do not divide {total} devices")
  return tuple(total // known if d == -1 else d for d in degrees)


def make_mesh(ici: Sequence[int] = (1, -1, 1), dcn: Sequence[int] = (1, 1, 1),
              axis_names: Sequence[str] = AXES, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh whose axis sizes are ici[i] * dcn[i]; raises if they do not multiply to the device count."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = _fill(dcn, len(devices), "dcn") if -1 in dcn else tuple(dcn)
  n_slices = math.prod(dcn)
  if len(devices) % n_slices:
    raise ValueError(f"{len(devices)} devices cannot form {n_slices} slices (dcn={list(dcn)})")
  ici = _fill(ici, len(devices) // n_slices, "ici")
  shape = tuple(i * d for i, d in zip(ici, dcn))
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {dict(zip(axis_names, shape))} needs {math.prod(shape)} devices, have {len(devices)}")
  if n_slices == 1:
    # allow_split_physical_axes: e.g. tensor 4 x fsdp 16 on a v6e-64 (8x8) splits a physical axis in two
    arranged = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  else:
    arranged = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  return Mesh(_host_local(np.asarray(arranged)), tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def _host_local(arranged: np.ndarray) -> np.ndarray:
  """`arranged` with the chips of each data-parallel slice (every axis after the first), or failing that of each
  group along the last axis (tensor), on one host, when such blocks divide the hosts' chips.

  `create_device_mesh` follows the physical torus, which may run a block across hosts: on v6e-64 (a host holds a
  2 x 2 block of chips) a mesh (16, 1, 4) gets 1 x 4 lines, each on two hosts. A rollout replica must lie within
  one process (`agent/replicas.py`), and a training row held by a tensor group is best built on one host
  (`train/placement.py`). The devices are then taken host by host, each host's in the torus order (a stable
  sort); a mesh whose blocks already lie within hosts, or cannot, is left as it is, except a mesh of single-chip
  data slices, which is always taken host by host (each host's replicas neighbours on the data axis).
  """
  shape = arranged.shape
  hosts = collections.Counter(d.process_index for d in arranged.flat)
  if len(hosts) == 1 or len(set(hosts.values())) > 1:
    return arranged
  per_host = next(iter(hosts.values()))
  flat = list(arranged.flat)
  by_host = np.array(sorted(flat, key=lambda d: d.process_index), dtype=object).reshape(shape)
  if math.prod(shape[1:]) == 1:
    # One chip per data slice (v5p-64's rollout mesh): the torus order visits the hosts 0, 4, 0, 4, 2, 6, ...;
    # host by host, a replica's neighbours on the data axis, where its idle helpers and a training row's
    # fallback replica are looked for (agent/replicas.py, train/placement.py), are on its own host.
    return by_host
  for block in (math.prod(shape[1:]), shape[-1]):
    if block == 1 or per_host % block:
      continue
    if all(len({d.process_index for d in flat[i:i + block]}) == 1 for i in range(0, len(flat), block)):
      return arranged
    return by_host
  return arranged
