"""Which frames to read, as pure numpy functions of the video's metadata (no I/O).

sample_overview / sample_zoom follow VideoZoomer exactly (videozoomer.md §1.3, §1.6):
  overview: step max(1, round(native_fps / 0.5)); over 64 frames -> linspace(0, N-1, 64).astype(int).
  zoom: int(fps * (end - start)) frames at linspace(start_frame, end_frame, n).astype(int), endpoints included,
        start_frame = int(start * native_fps), end_frame = int(end * native_fps), clamped to [0, N-1], end >= start.
Timestamps are absolute seconds, index / native_fps.

plan_runs groups the wanted indices into runs that a reader decodes after one seek each.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

OVERVIEW_FPS = 0.5  # data.video_fps
FRAMES_UPBOUND = 64  # data.frames_upbound
ZOOM_MAX_FRAMES = 16  # rollout.tool_call_max_frames


class HasFrames(Protocol):
  n_frames: int
  fps: float


def _check_meta(meta: HasFrames) -> None:
  if meta.n_frames < 1 or not meta.fps > 0:
    raise ValueError(f"video needs >= 1 frame and fps > 0, got {meta.n_frames} frames at {meta.fps} fps")


def sample_overview(meta: HasFrames, video_fps: float = OVERVIEW_FPS,
                    frames_upbound: int = FRAMES_UPBOUND) -> tuple[np.ndarray, np.ndarray]:
  """The first-turn overview: (frame indices int64 [n], timestamps float64 [n] in s)."""
  _check_meta(meta)
  step = max(1, round(meta.fps / video_fps))
  idx = np.arange(0, meta.n_frames, step)
  if frames_upbound > 0 and len(idx) > frames_upbound:
    idx = np.linspace(0, meta.n_frames - 1, frames_upbound).astype(int)
  idx = idx.astype(np.int64)
  return idx, idx / meta.fps


def zoom_frame_count(start: float, end: float, fps: float, max_frames: int | None = ZOOM_MAX_FRAMES) -> int:
  """int(fps * (end - start)); over max_frames raises the original tool's error text."""
  n = int(fps * (end - start))
  if max_frames is not None and n > max_frames:
    raise ValueError(f"Number of frames extracted ({n}) exceeds the maximum allowed ({max_frames}).")
  return n


def sample_zoom(meta: HasFrames, start: float, end: float, fps: float,
                max_frames: int | None = ZOOM_MAX_FRAMES) -> tuple[np.ndarray, np.ndarray]:
  """A `<video_zoom>` clip of [start, end] s at `fps`: (frame indices int64 [n], timestamps float64 [n] in s).

  Segments past the end clamp to the last frame (repeated); n == 0 gives empty arrays; a negative n (start > end)
  raises numpy's ValueError, all as in the original.
  """
  _check_meta(meta)
  n = zoom_frame_count(start, end, fps, max_frames)
  last = meta.n_frames - 1
  start_frame = max(0, min(int(start * meta.fps), last))
  end_frame = max(start_frame, min(int(end * meta.fps), last))
  idx = np.linspace(start_frame, end_frame, n).astype(int).astype(np.int64)
  return idx, idx / meta.fps


def plan_runs(wanted: np.ndarray, keyframes: np.ndarray | None = None, max_gap: int = 64,
              seek_cost: int = 4) -> list[tuple[int, np.ndarray]]:
  """Sorted unique frame indices -> [(seek_frame, indices)], each run decoded forward after one seek.

  With `keyframes` (sorted frame indices of keyframes, 0 included), seek_frame is the last keyframe at or before
  the run's first index, and a new run starts when the next index's keyframe lies more than `seek_cost` frames
  past the previous index (decoding from it is then cheaper than decoding on). Without them, seek_frame is the
  run's first index (the reader finds the keyframe) and a new run starts after a gap over `max_gap`.
  """
  wanted = np.asarray(wanted, np.int64)
  if wanted.size == 0:
    return []
  if np.any(np.diff(wanted) <= 0) or wanted[0] < 0:
    raise ValueError("wanted indices must be sorted, unique and >= 0")
  if keyframes is None:
    cut = np.flatnonzero(np.diff(wanted) > max_gap) + 1
    return [(int(r[0]), r) for r in np.split(wanted, cut)]
  keyframes = np.asarray(keyframes, np.int64)
  if keyframes.size == 0 or keyframes[0] != 0:
    raise ValueError("keyframes must start with frame 0")
  key = keyframes[np.searchsorted(keyframes, wanted, side="right") - 1]
  cut = np.flatnonzero(key[1:] > wanted[:-1] + seek_cost) + 1
  return [(int(key[r0]), r) for r0, r in zip(np.r_[0, cut], np.split(wanted, cut))]


def split_runs(runs: list[tuple[int, np.ndarray]], parts: int) -> list[list[tuple[int, np.ndarray]]]:
  """Splits runs into at most `parts` contiguous groups of about equal decode work (frames from seek to end)."""
  if not runs:
    return []
  cost = np.array([r[-1] - s + 1 for s, r in runs], np.float64)
  parts = max(1, min(parts, len(runs)))
  edges = np.searchsorted(np.cumsum(cost), cost.sum() * np.arange(1, parts) / parts, side="left") + 1
  groups = [runs[a:b] for a, b in zip(np.r_[0, edges], np.r_[edges, len(runs)])]
  return [g for g in groups if g]
