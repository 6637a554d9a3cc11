"""Host-side layout of the vision tower's patch sequence, computed in numpy from `grid_thw`.

The ViT sees all patches of a batch of images/videos as one sequence of N rows (reference §2). Which
rows attend to which is fixed by the grids: windowed blocks attend inside windows of <= 8x8 patches,
full blocks inside one frame pair. Rather than an [N, N] mask, each kind of block gathers its
segments into a padded [segments, max_len] layout, runs dense attention per segment, and gathers
back. Everything here depends only on the (static) grids, so it is computed once per input on the
host and passed to the jitted tower as int arrays.
"""

from __future__ import annotations

import numpy as np
from flax import struct

from zoomer_jax.model.config import VisionConfig


@struct.dataclass
class Segments:
  """Packing of a sequence of N rows into `[S, L]` segments.

  gather: [S, L] row index of each slot (0 for padding slots); valid: [S, L] slot holds a row;
  scatter: [N] flat slot index (s * L + l) of each row, to unpack [S * L, ...] -> [N, ...].
  """

  gather: np.ndarray
  valid: np.ndarray
  scatter: np.ndarray


@struct.dataclass
class VisionLayout:
  """All index arrays the tower needs for one set of grids (rows are in window order).

  perm: [N] patch row -> original row, the window permutation at patch granularity;
  rot_pos: [N, 2] (row, col) of each permuted patch inside its frame, for the 2-D rotary;
  windows / frames: segment packings for windowed and full-attention blocks;
  unperm: [N/4] merged row in window order for each output token (argsort of the unit permutation).
  """

  perm: np.ndarray
  rot_pos: np.ndarray
  windows: Segments
  frames: Segments
  unperm: np.ndarray


def _check_grid(grid_thw: np.ndarray, merge: int) -> np.ndarray:
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  if (grid <= 0).any():
    raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
  if (grid[:, 1:] % merge).any():
    raise ValueError(f"grid_thw heights/widths must be multiples of spatial_merge_size={merge}, "
                     f"got {grid.tolist()}")
  return grid


def window_index(grid_thw: np.ndarray, merge: int, window_units: int) -> tuple[np.ndarray, np.ndarray]:
  """Merged-unit permutation into window order, and the windows' lengths in units (empty dropped).

  For each item and frame, windows are read in raster order of (window-row, window-col), units
  inside a window in raster order (equivalent to transformers' `get_window_index`).
  """
  grid = _check_grid(grid_thw, merge)
  index, lengths, offset = [], [], 0
  for t, h, w in grid:
    lh, lw = h // merge, w // merge
    units = np.arange(t * lh * lw).reshape(t, lh, lw) + offset
    for ti in range(t):
      for y0 in range(0, lh, window_units):
        for x0 in range(0, lw, window_units):
          win = units[ti, y0:y0 + window_units, x0:x0 + window_units].reshape(-1)
          index.append(win)
          lengths.append(win.size)
    offset += t * lh * lw
  return np.concatenate(index), np.asarray(lengths, np.int64)


def _pack(lengths: np.ndarray) -> Segments:
  """Packs consecutive runs of the given lengths into [S, max(lengths)]."""
  lengths = np.asarray(lengths, np.int64)
  n, s, width = int(lengths.sum()), len(lengths), int(lengths.max())
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  offs = np.arange(width)
  valid = offs[None, :] < lengths[:, None]
  gather = np.where(valid, starts[:, None] + offs[None, :], 0)
  seg_of_row = np.repeat(np.arange(s), lengths)
  scatter = seg_of_row * width + (np.arange(n) - starts[seg_of_row])
  return Segments(gather=gather.astype(np.int32), valid=valid, scatter=scatter.astype(np.int32))


def vision_layout(grid_thw: np.ndarray, cfg: VisionConfig) -> VisionLayout:
  """Computes the `VisionLayout` for the items described by `grid_thw` [num_items, 3]."""
  merge = cfg.spatial_merge_size
  unit = merge * merge
  grid = _check_grid(grid_thw, merge)
  win_units, win_lengths = window_index(grid, merge, cfg.window_units)
  perm = (win_units[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)

  # (row, col) of every patch in processor order: per frame, 2x2 blocks in raster order.
  pos = []
  for t, h, w in grid:
    hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
    wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
    hw = np.stack([hpos, wpos], -1).reshape(h // merge, merge, w // merge, merge, 2)
    hw = hw.transpose(0, 2, 1, 3, 4).reshape(-1, 2)
    pos.append(np.tile(hw, (t, 1)))
  rot_pos = np.concatenate(pos)[perm]

  frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
  return VisionLayout(
      perm=perm.astype(np.int32),
      rot_pos=rot_pos.astype(np.int32),
      windows=_pack(win_lengths * unit),
      frames=_pack(frame_lengths),
      unperm=np.argsort(win_units, kind="stable").astype(np.int32),
  )


def num_tokens(grid_thw: np.ndarray, merge: int) -> int:
  """LLM tokens the tower produces for these grids: sum(t * h * w) / merge^2."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return int(grid.prod(-1).sum()) // (merge * merge)
