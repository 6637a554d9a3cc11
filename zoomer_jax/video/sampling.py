"""Which frames to read, by presentation time, as pure numpy functions of the video's metadata (no I/O).

Times come from `meta.times` (every frame's true presentation time, video/timeline.py), or index / fps for
metadata without them (synthetic videos). "The frame on screen at t" is the last frame whose time is <= t.
VideoZoomer's rules (docs/protocol.md), read as times instead of indices / fps (docs/video.md):
  overview: a frame every max(1, round(native_fps / 0.5)) / native_fps seconds from the first frame; when that
            is over 64 frames, 64 times spread evenly from the first frame's time to the last's; the frame on
            screen at each. On a constant-rate file that starts at 0 these are the original's indices exactly.
  zoom:     int(fps * (end - start)) frames; the segment is clamped to the video ([0, duration]); the frames
            on screen at that many times spread evenly from the first frame inside the segment to the last one
            (endpoints included), so every frame lies inside [start, end] (repeats where the segment holds
            fewer frames). A segment that holds no frame's start gets the frame on screen at its start
            (past the end: the last frame), repeated, as the original clamps indices.
Timestamps returned are the chosen frames' true times.

plan_runs groups the wanted indices into runs that a reader decodes after one seek each.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

OVERVIEW_FPS = 0.5  # data.video_fps
FRAMES_UPBOUND = 64  # data.frames_upbound
ZOOM_MAX_FRAMES = 16  # rollout.tool_call_max_frames
TOL = 1e-4  # s: a time this close past a frame's time counts as that frame's (float rounding of i / fps)


class HasFrames(Protocol):
  n_frames: int
  fps: float


def _check_meta(meta: HasFrames) -> None:
  if meta.n_frames < 1 or not meta.fps > 0:
    raise ValueError(f"video needs >= 1 frame and fps > 0, got {meta.n_frames} frames at {meta.fps} fps")


def frame_times(meta: HasFrames) -> np.ndarray:
  """float64 [n_frames]: `meta.times`, or index / fps when the metadata has none."""
  times = getattr(meta, "times", None)
  if times is None:
    return np.arange(meta.n_frames) / meta.fps
  return np.asarray(times, np.float64)


def duration_of(meta: HasFrames) -> float:
  d = getattr(meta, "duration", None)
  return float(d) if d is not None else meta.n_frames / meta.fps


def on_screen(times: np.ndarray, t) -> np.ndarray:
  """Indices of the frames on screen at times `t` (the first frame for times before it)."""
  return np.clip(np.searchsorted(times, np.asarray(t) + TOL, side="right") - 1, 0, len(times) - 1).astype(np.int64)


def sample_overview(meta: HasFrames, video_fps: float = OVERVIEW_FPS,
                    frames_upbound: int = FRAMES_UPBOUND) -> tuple[np.ndarray, np.ndarray]:
  """The first-turn overview: (frame indices int64 [n], true times float64 [n] in s)."""
  _check_meta(meta)
  times = frame_times(meta)
  period = max(1, round(meta.fps / video_fps)) / meta.fps
  t0, t1 = times[0], times[-1]
  count = int((t1 - t0) / period + TOL) + 1
  if frames_upbound > 0 and count > frames_upbound:
    targets = np.linspace(t0, t1, frames_upbound)
  else:
    targets = t0 + period * np.arange(count)
  idx = on_screen(times, targets)
  return idx, times[idx]


def zoom_frame_count(start: float, end: float, fps: float, max_frames: int | None = ZOOM_MAX_FRAMES) -> int:
  """int(fps * (end - start)); over max_frames raises the original tool's error text."""
  n = int(fps * (end - start))
  if max_frames is not None and n > max_frames:
    raise ValueError(f"Number of frames extracted ({n}) exceeds the maximum allowed ({max_frames}).")
  return n


def sample_zoom(meta: HasFrames, start: float, end: float, fps: float,
                max_frames: int | None = ZOOM_MAX_FRAMES) -> tuple[np.ndarray, np.ndarray]:
  """A `<video_zoom>` clip of [start, end] s at `fps`: (frame indices int64 [n], true times float64 [n] in s).

  n == 0 gives empty arrays; a negative n (start > end) raises numpy's ValueError, as in the original.
  """
  _check_meta(meta)
  n = zoom_frame_count(start, end, fps, max_frames)
  if n <= 0:
    np.linspace(0, 1, n)  # n < 0: numpy's own error, as the original surfaces it
    return np.zeros(0, np.int64), np.zeros(0, np.float64)
  times = frame_times(meta)
  lo, hi = max(start, 0.0), min(end, duration_of(meta))
  idx = frames_inside(times, lo, hi, n)
  if idx is None:  # no frame starts inside the segment
    idx = np.full(n, on_screen(times, lo))
  return idx, times[idx]


def frames_inside(times: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray | None:
  """The zoom's n frames of [lo, hi] among frames at `times` (ascending): the frames on screen at n times spread
  evenly from the first frame inside to the last one; None when no frame starts inside."""
  a = int(np.searchsorted(times, lo - TOL, side="left"))
  b = int(np.searchsorted(times, hi + TOL, side="right")) - 1
  if a > b:
    return None
  return np.clip(on_screen(times, np.linspace(times[a], times[b], n)), a, b)


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
