"""Host-side layout of the vision tower's patch sequence, computed in numpy from `grid_thw`.

The ViT sees all patches of a batch of images/videos as one sequence of N rows (transformers'
`Qwen2_5_VisionTransformerPretrainedModel`). Which rows attend to which is fixed by the grids: windowed blocks
attend inside windows of <= 8x8 patches,
full blocks inside one frame pair. Rather than an [N, N] mask, each kind of block gathers its
segments into a padded [segments, max_len] layout, runs dense attention per segment, and gathers
back. Everything here depends only on the (static) grids, so it is computed once per input on the
host and passed to the jitted tower as int arrays.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import struct

from zoomer_jax.model.config import VisionConfig


@struct.dataclass
class Segments:
  """Packing of a sequence of N rows into `[S, L]` segments.

  gather: [S, L] row index of each slot (0 for padding slots); valid: [S, L] slot holds a row;
  scatter: [N] flat slot index (s * L + l) of each row, to unpack [S * L, ...] -> [N, ...];
  identity: the packing is a plain reshape (S * L == N, every slot valid, rows in order), so the tower skips
  the gather/scatter round trip.
  """

  gather: np.ndarray
  valid: np.ndarray
  scatter: np.ndarray
  identity: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class VisionLayout:
  """All index arrays the tower needs for one set of grids (rows are in window order).

  perm: [N] patch row -> original row, the window permutation at patch granularity;
  rot_pos: [N, 2] (row, col) of each permuted patch inside its frame, for the 2-D rotary;
  windows / frames: segment packings for windowed and full-attention blocks;
  unperm: [N/4] merged row in window order for each output token (argsort of the unit permutation);
  reperm: [N/4] its inverse, the output token of each merged row (the tower's gradient gathers with it: autodiff
  would scatter-add, which XLA's TPU compiler sorts for).
  A padded layout (`padded_layout`) has a leading piece axis on every leaf but `unperm` and `reperm`.
  """

  perm: np.ndarray
  rot_pos: np.ndarray
  windows: Segments
  frames: Segments
  unperm: np.ndarray
  reperm: np.ndarray


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


def _pack(lengths: np.ndarray, width: int | None = None, segments: int | None = None,
          rows: int | None = None) -> Segments:
  """Packs consecutive runs of the given lengths into [S, width] (default: max(lengths)); with `segments` and
  `rows`, pads to that many segments (empty, invalid) and that many rows (scattered from slot 0)."""
  lengths = np.asarray(lengths, np.int64)
  n, s = int(lengths.sum()), len(lengths)
  width = int(lengths.max()) if width is None else width
  segments = s if segments is None else segments
  rows = n if rows is None else rows
  if (lengths > width).any() or segments < s or rows < n:
    raise ValueError(f"segments of lengths up to {int(lengths.max(initial=0))} ({s} of them, {n} rows) do not fit "
                     f"[{segments}, {width}] with {rows} rows")
  lengths = np.concatenate([lengths, np.zeros(segments - s, np.int64)])
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  offs = np.arange(width)
  valid = offs[None, :] < lengths[:, None]
  gather = np.where(valid, starts[:, None] + offs[None, :], 0)
  seg_of_row = np.repeat(np.arange(segments), lengths)
  scatter = np.zeros(rows, np.int64)
  scatter[:n] = seg_of_row * width + (np.arange(n) - starts[seg_of_row])
  identity = bool(valid.all() and segments * width == rows)
  return Segments(gather=gather.astype(np.int32), valid=valid, scatter=scatter.astype(np.int32), identity=identity)


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
      reperm=np.asarray(win_units, np.int32),  # the inverse of its argsort (win_units is a permutation)
  )


def num_tokens(grid_thw: np.ndarray, merge: int) -> int:
  """LLM tokens the tower produces for these grids: sum(t * h * w) / merge^2."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return int(grid.prod(-1).sum()) // (merge * merge)


@struct.dataclass
class LayoutSizes:
  """The padded shapes every row of a batch shares: patches per row, and per piece the windowed and per-frame
  segments and their widths. Rows with fewer patches are padded with blank rows that sit in segments of their
  own. A row's frames are split into `pieces` runs (`split_frames`), each padded to `patches // pieces` rows:
  attention never crosses a frame, so the tower runs each piece on its own (on its own chips, when the rules
  table maps `vision_pieces` to a mesh axis)."""

  patches: int
  windows: int
  window_len: int
  frames: int
  frame_len: int
  pieces: int = 1

  @property
  def piece_patches(self) -> int:
    return self.patches // self.pieces


def split_frames(grid_thw: np.ndarray, pieces: int) -> list[np.ndarray]:
  """A row's frames (temporal patch groups, in processor order) in `pieces` consecutive runs, the largest run as
  small as a split at frame boundaries allows; each run as grids [k, 3] (an item cut between runs becomes one
  grid in each). Runs at the end may be empty."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  if pieces < 1:
    raise ValueError(f"pieces must be >= 1, got {pieces}")
  if pieces == 1 or not len(grid):
    return [grid] + [np.zeros((0, 3), np.int64)] * (pieces - 1)
  item = np.repeat(np.arange(len(grid)), grid[:, 0])  # the item of every frame
  size = (grid[:, 1] * grid[:, 2])[item]

  def runs(cap):  # greedy: each run takes frames while they fit
    out, total = [[]], 0
    for f, n in enumerate(size):
      if total + n > cap and out[-1]:
        out.append([])
        total = 0
      out[-1].append(f)
      total += n
    return out

  lo, hi = int(size.max()), int(size.sum())
  while lo < hi:  # the smallest capacity the greedy split fits into `pieces` runs
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if len(runs(mid)) <= pieces else (mid + 1, hi)
  out = []
  for frames in runs(lo):
    items, counts = np.unique(item[frames], return_counts=True)  # frames of one run are consecutive
    out.append(np.stack([counts, grid[items, 1], grid[items, 2]], 1).astype(np.int64))
  return out + [np.zeros((0, 3), np.int64)] * (pieces - len(out))


def layout_sizes(grids: Sequence[np.ndarray], cfg: VisionConfig, image_bucket: int = 0,
                 pieces: int = 1) -> LayoutSizes:
  """Sizes that fit every row's grids, split into `pieces` runs each; with `image_bucket`, room for image counts
  rounded up to a multiple of it (images of the batch's largest; with pieces, frames of its largest, a multiple
  of ceil(image_bucket / pieces) per piece), so batches whose counts differ within a bucket share one program."""
  merge = cfg.spatial_merge_size
  grids = [_check_grid(g, merge) if len(np.asarray(g).reshape(-1, 3)) else np.zeros((0, 3), np.int64)
           for g in grids]
  every = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
  if not len(every):
    raise ValueError("layout_sizes needs at least one image")
  # The bucket's unit: the largest image (a piece holds frames, so with pieces the largest frame).
  units = every if pieces == 1 else np.concatenate([np.ones_like(every[:, :1]), every[:, 1:]], 1)
  wins_per_unit = [len(window_index(g[None], merge, cfg.window_units)[1]) for g in units]
  step = image_bucket if pieces == 1 or image_bucket <= 0 else -(-image_bucket // pieces)
  bucket = lambda n, one: n if step <= 0 else -(-n // (step * one)) * (step * one)
  runs = [run for g in grids for run in split_frames(g, pieces)]
  patches = max(int(g.prod(-1).sum()) for g in runs)
  windows = max(len(window_index(g, merge, cfg.window_units)[1]) if len(g) else 0 for g in runs)
  frames = max(int(g[:, 0].sum()) if len(g) else 0 for g in runs)
  return LayoutSizes(patches=pieces * bucket(patches, int(units.prod(-1).max())),
                     windows=bucket(windows, max(wins_per_unit)), window_len=(cfg.window_units * merge) ** 2,
                     frames=bucket(frames, int(units[:, 0].max())),
                     frame_len=int((every[:, 1] * every[:, 2]).max()), pieces=pieces)


def _padded_piece(grid: np.ndarray, cfg: VisionConfig, sizes: LayoutSizes) -> VisionLayout:
  """`vision_layout` of one piece's grids (possibly none), padded to a piece of `sizes` (rows beyond the real
  patches are blank: identity-permuted, in segments of their own, never gathered into the real output)."""
  unit = cfg.spatial_merge_size**2
  rows = sizes.piece_patches
  if len(grid):
    real = vision_layout(grid, cfg)
    win_lengths = window_index(grid, cfg.spatial_merge_size, cfg.window_units)[1] * unit
    frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    perm, rot_pos, unperm = real.perm, real.rot_pos, real.unperm
  else:
    win_lengths = frame_lengths = np.zeros(0, np.int64)
    perm, rot_pos, unperm = np.zeros(0, np.int32), np.zeros((0, 2), np.int32), np.zeros(0, np.int32)
  n = len(perm)
  if n > rows:
    raise ValueError(f"a row piece of {n} patches does not fit a batch layout of {rows} per piece")
  unperm = np.concatenate([unperm, np.arange(n // unit, rows // unit)]).astype(np.int32)
  return VisionLayout(
      perm=np.concatenate([perm, np.arange(n, rows)]).astype(np.int32),
      rot_pos=np.concatenate([rot_pos, np.zeros((rows - n, 2), np.int32)]).astype(np.int32),
      windows=_pack(win_lengths, sizes.window_len, sizes.windows, rows),
      frames=_pack(frame_lengths, sizes.frame_len, sizes.frames, rows),
      unperm=unperm, reperm=np.argsort(unperm).astype(np.int32))


def padded_layout(grid_thw: np.ndarray, cfg: VisionConfig, sizes: LayoutSizes) -> VisionLayout:
  """One row's layout (possibly no images) padded to `sizes`, split into `sizes.pieces` pieces: perm, rot_pos
  and the segments' leaves get a leading piece axis and index inside their piece; `unperm` [patches / 4] picks
  each output token, in placeholder order (then the blank ones), from the pieces' outputs laid end to end."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  unit = cfg.spatial_merge_size**2
  runs = split_frames(grid, sizes.pieces)
  pieces = [_padded_piece(g, cfg, sizes) for g in runs]
  width = sizes.piece_patches // unit
  real = [int(g.prod(-1).sum()) // unit for g in runs]
  unperm = np.concatenate([c * width + p.unperm[:k] for c, (p, k) in enumerate(zip(pieces, real))]
                          + [c * width + p.unperm[k:] for c, (p, k) in enumerate(zip(pieces, real))])
  return _stacked(pieces, unperm.astype(np.int32))


def _stacked(layouts: Sequence[VisionLayout], unperm: np.ndarray | None = None) -> VisionLayout:
  """`layouts`' leaves stacked on a new leading axis (`unperm` and `reperm` too, unless `unperm` is given: then
  `reperm` is its inverse); `identity` holds only if it holds for every one."""
  stack = lambda get: np.stack([get(lay) for lay in layouts])
  segs = lambda name: Segments(gather=stack(lambda l: getattr(l, name).gather),
                               valid=stack(lambda l: getattr(l, name).valid),
                               scatter=stack(lambda l: getattr(l, name).scatter),
                               identity=all(getattr(l, name).identity for l in layouts))
  return VisionLayout(perm=stack(lambda l: l.perm), rot_pos=stack(lambda l: l.rot_pos), windows=segs("windows"),
                      frames=segs("frames"), unperm=stack(lambda l: l.unperm) if unperm is None else unperm,
                      reperm=stack(lambda l: l.reperm) if unperm is None else np.argsort(unperm).astype(np.int32))


def piece_rows(grid_thw: np.ndarray, sizes: LayoutSizes) -> list[tuple[int, int, int]]:
  """Where a row's pixel rows go in its padded pixel array: (first source row, first destination row, count)
  per piece."""
  out, src = [], 0
  for c, g in enumerate(split_frames(grid_thw, sizes.pieces)):
    n = int(g.prod(-1).sum())
    out.append((src, c * sizes.piece_patches, n))
    src += n
  return out


def batch_layout(grids: Sequence[np.ndarray], cfg: VisionConfig, sizes: LayoutSizes) -> VisionLayout:
  """Every row's `padded_layout`, stacked: leaves [R, ...]; `identity` holds only if it holds for every row."""
  return _stacked([padded_layout(g, cfg, sizes) for g in grids])
