"""The devices a job is compiled for: a TPU topology described by libtpu, without TPU hardware.

    target = tpu_target("v5p:4x4x2")          # the 32 chips of a v5p-64; "v6e:8x8" is a v6e-64
    target.devices, target.chip.hbm_bytes, target.name

`jax.experimental.topologies.get_topology_desc` (libtpu, the `[tpu]` extra) gives TPU devices to lower and
compile for while the host's CPU stays jax's default backend. Pallas TPU kernels ask the local backend for the
chip's description when they lower, so the target chip's is registered under the host's device kind.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

from zoomer_jax.cost.chips import CHIPS, ChipSpec, parse_accelerator

# Accelerator types -> topology names (v4/v5p names count TensorCores, v5e/v6e names count chips).
TOPOLOGIES = {"v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:4x4x2",
              "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4",
              "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8", "v6e-128": "v6e:8x16",
              "v6e-256": "v6e:16x16", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16"}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # topology name, e.g. "v5p:4x4x2"
  chip: ChipSpec
  devices: tuple

  @property
  def chips(self) -> int:
    return len(self.devices)


def topology_for(accelerator_type: str) -> str:
  """"v5p-64" -> "v5p:4x4x2"; a topology name is returned as it is."""
  if ":" in accelerator_type:
    return accelerator_type
  if accelerator_type not in TOPOLOGIES:
    raise ValueError(f"no known topology for accelerator type {accelerator_type!r}; pass --topology (e.g. "
                     f"v5p:4x4x2) or use one of {sorted(TOPOLOGIES)}")
  return TOPOLOGIES[accelerator_type]


def chip_of(topology: str) -> ChipSpec:
  m = re.fullmatch(r"([a-z0-9]+):[0-9x]+", topology)
  if not m or m.group(1) not in CHIPS:
    raise ValueError(f"topology {topology!r} is not <chip>:<shape> with chip one of {sorted(CHIPS)}")
  return CHIPS[m.group(1)]


def tpu_target(topology: str) -> Target:
  """The devices of a TPU topology ("v5p:4x4x2"), described by libtpu; raises naming the `[tpu]` extra when
  libtpu is missing."""
  from jax.experimental import topologies  # noqa: PLC0415
  chip = chip_of(topology)
  # libtpu takes a machine-wide lock meant for TPU hardware; describing a topology needs none, and several
  # compiling processes (pytest workers, a compile beside a test run) must not exclude each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # no libtpu, or a topology it does not know
    raise RuntimeError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); compiling for TPU "
                       f"needs libtpu: pip install -e '.[tpu]'") from e
  _register_pallas_chip(desc.devices[0])
  return Target(name=topology, chip=chip, devices=tuple(desc.devices))


def accelerator_chips(accelerator_type: str) -> int:
  return parse_accelerator(accelerator_type)[1]


def _register_pallas_chip(device) -> None:
  """Pallas' Mosaic lowering reads the chip's description from the local device; the host's is a CPU."""
  from jax._src.pallas.mosaic import tpu_info  # noqa: PLC0415  (no public API for this)
  host_kind = jax.devices()[0].device_kind
  version = tpu_info.chip_version_from_device_kind(device.device_kind)
  tpu_info.registry[host_kind] = lambda: tpu_info.get_tpu_info_for_chip(version, 1)
