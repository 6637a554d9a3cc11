"""PyAV frame source: seek to the keyframe before each run of wanted frames, decode forward, skip what no one needs.

Frame i is the i-th frame in presentation order (decord's definition). Two timelines map indices to pts:
  CfrTimeline    constant frame rate, read off the container's index without touching the packets (mp4/mov):
                 pts = start + i / fps; keyframes found by a binary search of the index.
  TableTimeline  any file (variable frame rate, mkv/webm): one pass over all packets (no decoding) records
                 every pts and keyframe, as decord does when it opens a file.
A CFR file whose decoded pts fall off the grid is re-read with a TableTimeline.

Decoding: per packet, skip_frame is NONREF unless the packet is a wanted frame, so the decoder drops
non-reference frames no one asked for (references are always decoded: every returned frame is exact); once
every wanted packet is in, the decoder is drained instead of decoding further. Frames are matched by pts;
a wanted frame that does not come out (open GOP) is retried from an earlier keyframe. Reads spanning several
keyframes are split over `workers` threads at keyframes (a split never adds decoding), a container each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import av
import numpy as np

from zoomer_jax.video.meta import NoIndex, VideoError, VideoMeta, in_parallel
from zoomer_jax.video.sampling import plan_runs, split_runs


class OffGrid(NoIndex):
  """A decoded pts is not on the constant-rate grid."""


class CfrTimeline:
  """Constant frame rate: index <-> pts by arithmetic; keyframes from the container's index (decode order)."""

  def __init__(self, stream: Any):
    entries = stream.index_entries
    n, rate = stream.frames, stream.average_rate
    if n <= 0 or not rate or len(entries) != n:  # e.g. mkv/webm: no frame count, index read lazily
      raise NoIndex(f"{n} frames, {len(entries)} index entries, average rate {rate}")
    # Evenly spaced decode timestamps, checked on a sample of the index (decoded pts are checked too).
    ts0 = entries[0].timestamp
    step = entries[1].timestamp - ts0 if n > 1 else 1
    probe = np.unique(np.linspace(0, n - 1, min(n, 257)).astype(int))
    if step <= 0 or any(entries[int(k)].timestamp != ts0 + int(k) * step for k in probe):
      raise NoIndex("variable frame rate")
    self.n, self.fps = int(n), float(rate)
    self.ts0, self.step = ts0, step
    self.start = stream.start_time if stream.start_time is not None else ts0
    self.scale = float(stream.time_base * rate)  # pts units -> frames
    if n > 1 and abs(step * self.scale - 1) > 1e-3:
      raise NoIndex(f"index step {step} does not match {float(rate)} fps")

  def frame_of(self, pts: int) -> int:
    x = (pts - self.start) * self.scale
    j = round(x)
    if abs(x - j) > 0.01:
      raise OffGrid(f"pts {pts} is off the {self.fps} fps grid")
    return j

  def pts_of(self, frame: int) -> int:
    return self.start + round(frame / self.scale)

  def keyframes_before(self, container: Any, frames: Sequence[int]) -> np.ndarray:
    """Sorted unique keyframes, one at or before each of `frames` (0 included), from `container`'s index.

    With closed GOPs a keyframe's decode position is its presentation index; a wrong guess (open GOP) only
    costs a retry from an earlier keyframe.
    """
    search = container.streams.video[0].index_entries.search_timestamp
    return np.unique([0] + [max(0, search(self.ts0 + int(f) * self.step, backward=True)) for f in frames])


class TableTimeline:
  """Any frame rate: presentation order from the sorted pts of every packet (one demux pass, no decoding)."""

  def __init__(self, container: Any):
    stream = container.streams.video[0]
    pts, key = [], []
    for packet in container.demux(stream):
      if packet.size == 0 or packet.is_discard:
        continue
      if packet.pts is None:
        raise NoIndex("packets without pts")
      pts.append(packet.pts)
      key.append(packet.is_keyframe)
    order = np.argsort(pts, kind="stable")
    self.pts = np.asarray(pts, np.int64)[order]
    if len(self.pts) == 0 or np.any(np.diff(self.pts) == 0):
      raise NoIndex(f"{len(self.pts)} packets, or repeated pts")
    self.n = len(self.pts)
    rate = stream.average_rate or stream.guessed_rate
    self.fps = float(rate) if rate else (self.n - 1) / float((self.pts[-1] - self.pts[0]) * stream.time_base)
    self.index = {int(p): i for i, p in enumerate(self.pts)}
    self.keys = np.union1d([0], np.flatnonzero(np.asarray(key, bool)[order]))

  def frame_of(self, pts: int) -> int:
    return self.index.get(pts, -1)

  def pts_of(self, frame: int) -> int:
    return int(self.pts[frame])

  def keyframes_before(self, container: Any, frames: Sequence[int]) -> np.ndarray:
    k = self.keys[np.searchsorted(self.keys, np.asarray(frames, np.int64), side="right") - 1]
    return np.union1d([0], k)


class AvSource:
  """Metadata and frames of one file with PyAV; `read` is safe per container (one container per thread)."""

  name = "av"
  retries = 3  # earlier keyframes tried when a run's frames do not come out (open GOPs)
  threads = "AUTO"  # decoder threading for a read in one thread (frame + slice threads)
  group_threads = "SLICE"  # decoder threading inside each worker of a split read
  seek_cost = 4  # frames of decoding a seek is worth, reading in one thread
  min_split = 32  # frames of decoding below which a read is not split over workers

  def __init__(self, path: str, workers: int):
    self.path, self.workers = path, workers
    container = self.open()
    try:
      stream = container.streams.video[0]
      try:
        self.timeline = CfrTimeline(stream)
      except NoIndex:
        self.timeline = TableTimeline(container)
      cc = stream.codec_context
      self.meta = VideoMeta(path, self.timeline.fps, self.timeline.n, cc.width, cc.height, cc.name)
    except BaseException:
      container.close()
      raise
    self.handle = container

  def open(self, threads: str | None = None) -> Any:
    try:
      container = av.open(self.path)
    except av.FFmpegError as e:
      raise VideoError(f"cannot open video {self.path} with PyAV: {e}") from None
    if not container.streams.video:
      container.close()
      raise VideoError(f"video {self.path} has no video stream with frames")
    container.streams.video[0].thread_type = threads or self.threads
    return container

  @staticmethod
  def close(container: Any) -> None:
    container.close()

  def read(self, container: Any, wanted: np.ndarray, out: dict[int, np.ndarray]) -> None:
    """Decodes the sorted unique frames `wanted` into out[index] (uint8 RGB [H, W, 3]); a decoder failure is a
    VideoError naming the file and the frames asked for."""
    timeline = self.timeline
    try:
      try:
        self._read(container, timeline, wanted, out)
      except OffGrid:
        with av.open(self.path) as c:  # not constant-rate after all: index every packet and read again
          self.timeline = TableTimeline(c)
        self.meta = dataclasses.replace(self.meta, fps=self.timeline.fps, n_frames=self.timeline.n)
        out.clear()
        self._read(container, self.timeline, wanted, out)
    except av.FFmpegError as e:
      raise VideoError(f"video {self.path}: decoding frames {int(wanted[0])}..{int(wanted[-1])} failed "
                       f"({type(e).__name__}: {e})") from e

  def _read(self, container: Any, timeline: Any, wanted: np.ndarray, out: dict[int, np.ndarray]) -> None:
    keys = timeline.keyframes_before(container, wanted)
    groups = []
    if self.workers > 1:  # every keyframe between wanted frames is a free split point
      runs = plan_runs(wanted, keys, seek_cost=0)
      if sum(r[-1] - s + 1 for s, r in runs) >= self.min_split:
        groups = split_runs(runs, self.workers)
    if len(groups) <= 1:
      for seek, run in plan_runs(wanted, keys, seek_cost=self.seek_cost):
        self._run(container, timeline, seek, run, out)
      return

    def work(group):  # one container per thread; the groups are the parallelism
      c = self.open(self.group_threads)
      try:
        for seek, run in group:
          self._run(c, timeline, seek, run, out)
      finally:
        c.close()

    in_parallel(groups, work)

  def _run(self, container: Any, timeline: Any, seek: int, run: np.ndarray, out: dict[int, np.ndarray]) -> None:
    """Decodes the frames `run` after seeking to keyframe `seek`; retries from earlier keyframes if needed."""
    for _ in range(self.retries):
      missing = self._decode(container, timeline, timeline.pts_of(seek), run, out)
      if not missing:
        return
      if seek == 0:
        break
      seek = int(timeline.keyframes_before(container, [seek - 1])[-1])
    raise VideoError(f"video {self.path}: cannot decode frames {sorted(missing)[:8]} of {self.meta.n_frames}")

  def _decode(self, container: Any, timeline: Any, seek_pts: int, run: np.ndarray,
              out: dict[int, np.ndarray]) -> set[int]:
    """One seek (presentation timestamps, backward to a keyframe), then decode; returns what did not come out."""
    stream = container.streams.video[0]
    cc = stream.codec_context
    container.seek(seek_pts, stream=stream, backward=True)
    frame_of = timeline.frame_of
    pending, unsent = set(run.tolist()), set(run.tolist())
    skip = None
    lost = False  # a wanted frame was passed over (not decodable from this keyframe)

    def take(frames) -> bool:
      nonlocal lost
      for frame in frames:
        if frame.pts is None:
          continue
        j = frame_of(frame.pts)
        if j in pending:
          out[j] = frame.to_ndarray(format="rgb24")
          pending.discard(j)
        elif pending and j > min(pending):  # frames come out in presentation order
          lost = True
      return lost or not pending

    for packet in container.demux(stream):
      if packet.size == 0 or packet.pts is None:
        break
      i = frame_of(packet.pts)
      mode = "DEFAULT" if i in unsent else "NONREF"
      if mode != skip:
        cc.skip_frame = skip = mode
      unsent.discard(i)
      # Once every wanted packet is in the decoder, drain it instead of decoding further.
      if take(cc.decode(packet)) or not unsent:
        break
    if pending and not lost:
      take(cc.decode(None))
    return pending
