"""Accelerator specs per chip, and accelerator types ("v5p-64", "v6e-64", "h100-8") -> (chip, chip count).

Numbers are the vendors' published peaks; what a program reaches is a fraction of them (the account's
`Efficiency`). bf16 FLOP/s are dense (no 2:4 sparsity). ICI is the bidirectional bandwidth of all of a
chip's inter-chip links together (NVLink for GPUs); a chip can receive at most half of it.

Sources:
  v5p: cloud.google.com/tpu/docs/v5p -- 459 TFLOPs bf16, 95 GB HBM2e ("HBM capacity per chip (GiB) 95" on
       the newer page; we take the smaller, 95e9 bytes), 2765 GB/s, ICI 1200 GB/s bidirectional per chip
       (= 4800 Gbps one way), DCN 50 Gbps per chip, 2 TensorCores per chip.
  v6e: cloud.google.com/tpu/docs/v6e -- 918 TFLOPs bf16, 32 GB HBM, 1638 GB/s (1640 on older pages),
       ICI 800 GB/s bidirectional per chip (4 ports), 1 TensorCore per chip.
  v5e: cloud.google.com/tpu/docs/v5e -- 197 TFLOPs bf16, 16 GB HBM2, 819 GB/s, ICI 400 GB/s bidirectional.
  v4:  cloud.google.com/tpu/docs/v4 -- 275 TFLOPs bf16, 32 GiB HBM2, 1200 GB/s, 2 TensorCores per chip.
       The page gives no per-chip ICI figure; 540 GB/s = 6 links x 45 GB/s x 2 directions is the per-link
       figure of the JAX scaling book (jax-ml.github.io/scaling-book/tpus) -- less certain than the rest.
  H100 SXM5: NVIDIA H100 datasheet -- 989 TFLOPs dense bf16 (1979 with sparsity), 80 GB HBM3, 3.35 TB/s,
       NVLink 4 900 GB/s bidirectional.
  H200 SXM: NVIDIA H200 datasheet -- same compute as H100 (989 dense bf16), 141 GB HBM3e, 4.8 TB/s,
       NVLink 900 GB/s.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  name: str
  bf16_flops: float  # peak dense bf16 FLOP/s per chip
  hbm_bytes: float
  hbm_bw: float  # bytes/s
  ici_bw: float  # bytes/s, bidirectional, all links of one chip
  cores_per_chip: int = 1  # TensorCores per chip (v4/v5p accelerator names count cores, not chips)
  dcn_bw: float | None = None  # bytes/s per chip across slices, where published
  platform: str = "tpu"  # "tpu" | "gpu": which kernels the model runs there (model/vision.py's splash path)

  @property
  def ici_in_bw(self) -> float:
    """What one chip can receive per second over all its links (half the bidirectional figure)."""
    return self.ici_bw / 2


GB = 1e9
CHIPS = {
    "v5p": ChipSpec("v5p", 459e12, 95 * GB, 2765 * GB, 1200 * GB, cores_per_chip=2, dcn_bw=50e9 / 8),
    "v6e": ChipSpec("v6e", 918e12, 32 * GB, 1638 * GB, 800 * GB),
    "v5e": ChipSpec("v5e", 197e12, 16 * GB, 819 * GB, 400 * GB),
    "v4": ChipSpec("v4", 275e12, 32 * 2**30, 1200 * GB, 540 * GB, cores_per_chip=2),
    "h100": ChipSpec("h100", 989e12, 80 * GB, 3350 * GB, 900 * GB, platform="gpu"),
    "h200": ChipSpec("h200", 989e12, 141 * GB, 4800 * GB, 900 * GB, platform="gpu"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


def parse_accelerator(accelerator_type: str) -> tuple[ChipSpec, int]:
  """"v5p-64" -> (v5p spec, 32 chips): v4/v5p names count TensorCores (2 per chip), v5e/v6e names count
  chips; GPUs are "h100-8" (GPUs). A bare chip name ("v6e") means one chip."""
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+))?", accelerator_type.strip().lower())
  name = m and _ALIASES.get(m.group(1), m.group(1))
  if not m or name not in CHIPS:
    raise ValueError(f"unknown accelerator type {accelerator_type!r}; expected <chip>-<count> with chip one of "
                     f"{sorted(CHIPS)} (or {sorted(_ALIASES)})")
  chip = CHIPS[name]
  count = int(m.group(2) or chip.cores_per_chip)
  if count % chip.cores_per_chip:
    raise ValueError(f"{accelerator_type!r}: {name} names count TensorCores, {chip.cores_per_chip} per chip; "
                     f"{count} is not a multiple")
  return chip, count // chip.cores_per_chip
