"""A video's time index: the presentation time of every frame it shows, read with PyAV without decoding frames.

Frame i is the i-th frame in presentation order; its time is its pts minus the container's start time, the
clock a player shows (an MPEG-TS file's first frame at 0 s, not at its 1.4-s transport offset; a video track
that starts 2 s after its audio at 2 s). Two ways to build it, both one pass at open:

  grid   mp4/mov with a complete sample index and evenly spaced decode times (constant frame rate): read off
         the container's index without touching the packets; samples an edit list hides (`ffmpeg -ss -c copy`
         pre-roll) are not frames. Keyframes are guessed at their decode position (exact for closed GOPs; a
         wrong guess only costs a retry from an earlier keyframe).
  table  anything else (variable frame rate, mkv/webm, MPEG-TS, B-frame reordering): one demux pass records every
         packet's pts (not decoded), sorted; discarded packets (edit lists) are not frames.

The first frame is decoded once, for its display rotation (portrait phone videos) and to check the grid's start.

  timeline = build_timeline(container)   # Timeline: pts, times, keyframes, rotation, end
  timeline.frame_of(pts) -> index (or -1) ; timeline.pts_of(index) -> pts
"""

from __future__ import annotations

import dataclasses
import fractions
from typing import Any

import numpy as np

from zoomer_jax.video.meta import NoIndex


class OffGrid(NoIndex):
  """A decoded pts is not on the constant-rate grid."""


@dataclasses.dataclass(frozen=True, eq=False)
class Timeline:
  pts: np.ndarray  # int64 [N] presentation pts of every shown frame, ascending (stream time base)
  keys: np.ndarray  # int64 [K] frame indices of keyframes, ascending, 0 included
  time_base: fractions.Fraction
  origin: int  # the container's start, in stream pts: time = (pts - origin) * time_base
  stream_start: int  # the stream's own start pts (OpenCV's POS_MSEC counts from it)
  fps: float  # average frame rate
  last_duration: float  # seconds the last frame is shown
  width: int = 0  # as decoded (before rotation)
  height: int = 0
  codec: str = ""
  rotation: int = 0  # degrees counterclockwise that turn a decoded frame upright (0, 90, 180, 270)
  grid: bool = False  # pts = pts[0] + i * step, read from the container's index

  @property
  def n(self) -> int:
    return len(self.pts)

  @property
  def times(self) -> np.ndarray:
    """float64 [N] seconds from the container's start."""
    return self.seconds(self.pts)

  def seconds(self, pts) -> np.ndarray:
    tb = self.time_base
    return (np.asarray(pts, np.int64) - self.origin) * tb.numerator / tb.denominator

  @property
  def end(self) -> float:
    """Seconds: when the last frame stops being shown."""
    return float(self.seconds(self.pts[-1])) + self.last_duration

  def frame_of(self, pts: int) -> int:
    """The index of the frame with this pts, or -1 (a frame no one indexed: edit-list pre-roll)."""
    j = int(np.searchsorted(self.pts, pts))
    if j < self.n and self.pts[j] == pts:
      return j
    if self.grid and self.pts[0] <= pts <= self.pts[-1]:
      raise OffGrid(f"pts {pts} is off the {self.fps:g} fps grid")
    return -1

  def pts_of(self, frame: int) -> int:
    return int(self.pts[frame])

  def keyframes_before(self, frames) -> np.ndarray:
    """Sorted unique keyframe indices, one at or before each of `frames`, and 0."""
    k = self.keys[np.searchsorted(self.keys, np.asarray(frames, np.int64), side="right") - 1]
    return np.union1d([0], k)


def _origin(container: Any, stream: Any) -> int:
  """The container's start time in the stream's pts units (0 when the container does not say)."""
  start = container.start_time
  if start is None:
    return int(stream.start_time or 0)
  return round(fractions.Fraction(start, 1_000_000) / stream.time_base)


def _grid(container: Any, stream: Any) -> dict | None:
  """pts/keys of a constant-rate file from its sample index, or None when the index cannot tell."""
  entries = stream.index_entries
  n_all, rate = stream.frames, stream.average_rate
  if n_all <= 1 or not rate or len(entries) != n_all or stream.start_time is None:
    return None
  ts = np.fromiter((e.timestamp for e in entries), np.int64, n_all)
  kept = ~np.fromiter((e.is_discard for e in entries), bool, n_all)
  key = np.fromiter((e.is_keyframe for e in entries), bool, n_all)
  step = np.diff(ts)
  if kept.sum() < 2 or step[0] <= 0 or np.any(step != step[0]):
    return None
  step = int(step[0])
  if abs(step * float(stream.time_base * rate) - 1) > 1e-3:
    return None  # the index's step disagrees with the stated rate
  n = int(kept.sum())
  keys = np.cumsum(kept)[key & kept] - 1  # decode position among the shown frames
  return dict(pts=stream.start_time + step * np.arange(n, dtype=np.int64), keys=keys,
              last=step * stream.time_base, grid=True)


def _table(container: Any, stream: Any) -> dict:
  """pts/keys of every shown frame from one demux pass (packets are not decoded)."""
  pts, key, dur = [], [], []
  for packet in container.demux(stream):
    if packet.size == 0 or packet.is_discard:
      continue
    if packet.pts is None:
      raise NoIndex("packets without pts")
    pts.append(packet.pts)
    key.append(packet.is_keyframe)
    dur.append(packet.duration or 0)
  if not pts:
    return dict(pts=np.zeros(0, np.int64), keys=np.zeros(0, np.int64), last=0, grid=False)
  order = np.argsort(pts, kind="stable")
  pts = np.asarray(pts, np.int64)[order]
  if np.any(np.diff(pts) == 0):
    raise NoIndex("two packets with the same pts")
  keys = np.flatnonzero(np.asarray(key, bool)[order])
  return dict(pts=pts, keys=keys, last=dur[order[-1]] * stream.time_base, grid=False)


def rotation_of(frame: Any) -> int:
  """Degrees counterclockwise (0, 90, 180, 270) that turn a decoded PyAV frame upright (its display matrix)."""
  return int(round(getattr(frame, "rotation", 0) or 0)) % 360


def _first_frame(container: Any, stream: Any) -> Any:
  """The first frame in presentation order (decoded from the start of the file), or None."""
  for frame in container.decode(stream):
    return frame
  return None


def build_timeline(open_container) -> Timeline:
  """The time index of a file; `open_container()` gives a fresh PyAV container (the demux pass consumes one)."""
  with open_container() as container:
    stream = container.streams.video[0]
    origin, tb, stream_start = _origin(container, stream), stream.time_base, int(stream.start_time or 0)
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    found = _grid(container, stream)
    first = _first_frame(container, stream)
    cc = stream.codec_context
    (width, height), codec = (first.width, first.height) if first is not None else (cc.width, cc.height), cc.name
  if found is not None and (first is None or first.pts != found["pts"][0]):
    found = None  # the grid's start is not the first frame shown
  if found is None:
    with open_container() as container:
      found = _table(container, container.streams.video[0])
  pts = found["pts"]
  if len(pts) == 0:
    raise NoIndex("no frames")
  keys = np.union1d([0], found["keys"]).astype(np.int64)
  span = float((pts[-1] - pts[0]) * tb)
  fps = rate if found["grid"] else (len(pts) - 1) / span if span > 0 else rate
  fps = fps if fps > 0 else 1.0
  last = float(found["last"]) or 1 / fps
  rotation = rotation_of(first) if first is not None else 0
  return Timeline(pts=pts, keys=keys, time_base=tb, origin=origin, stream_start=stream_start,
                  fps=fps, last_duration=last, width=width, height=height, codec=codec, rotation=rotation,
                  grid=found["grid"])


def table_timeline(open_container, like: Timeline) -> Timeline:
  """`like` re-indexed from every packet (a grid file whose decoded pts fell off the grid)."""
  with open_container() as container:
    found = _table(container, container.streams.video[0])
  return dataclasses.replace(like, pts=found["pts"], keys=np.union1d([0], found["keys"]).astype(np.int64),
                             grid=False)
