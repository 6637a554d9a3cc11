"""VideoReader: a video's time index and its frames by index, upright, with PyAV or OpenCV decoding.

Opening a reader builds the file's time index once (timeline.py, docs/video.md; PyAV: every frame's true
presentation time, without decoding); `meta.times` holds it, and the sampling functions choose frames by it.
Keep one reader per trajectory: each new reader indexes the file again. With `index="lazy"` the index is built
at the first use that needs it; `zoom()` before then cuts its clip from the packets around the segment instead
(window.py), with the frames and times the index would give. Frame i is the i-th frame in presentation order;
frames come out upright (display rotation applied, as decord and players show portrait phone videos).

  backend="auto" (default): PyAV decoding (faster for the overview and zoom clips, bench/bench_video.py); a
                 read that fails is retried with OpenCV, and the error names both.
  backend="av":  PyAV only (pyav_source.py); backend="cv2": OpenCV decoding (opencv_source.py), each frame
                 identified by its timestamp against the same index. Both return identical pixels (same
                 FFmpeg conversion to RGB).

Thread safety: a reader holds immutable metadata and one cached open handle taken under a non-blocking lock; a
call that finds the handle busy opens its own. `frames()` may be called from many threads at once, and a read
of frames far apart is itself split over `workers` threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import av
import numpy as np

from zoomer_jax.video.meta import NoIndex, VideoError, VideoMeta
from zoomer_jax.video.opencv_source import Cv2Source
from zoomer_jax.video.pyav_source import AvSource, open_container, read_timeline
from zoomer_jax.video.sampling import ZOOM_MAX_FRAMES, sample_zoom
from zoomer_jax.video.window import window_clip

BACKENDS = ("auto", "cv2", "av")
INDEX = ("eager", "lazy")


def default_workers() -> int:
  """Threads for one read: up to 4, no more than the machine's cores."""
  return max(1, min(4, os.cpu_count() or 1))


class VideoReader:
  """`VideoReader(path, backend="auto")`: `.meta` (with true times), `.frames(indices) -> uint8 RGB [n, H, W, 3]`."""

  def __init__(self, path: str | os.PathLike, backend: str = "auto", workers: int | None = None,
               index: str = "eager"):
    path = os.fspath(path)
    if backend not in BACKENDS:
      raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if index not in INDEX:
      raise ValueError(f"unknown index {index!r}; expected one of {INDEX}")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"video file not found: {path}")
    self.path = path
    self._workers = default_workers() if workers is None else max(1, workers)
    self._backend = backend
    self._lock = threading.Lock()  # the cached decoder handle
    self._index_lock = threading.Lock()
    self._timeline = None
    if index == "eager":
      self._index()

  def _index(self):
    with self._index_lock:
      if self._timeline is None:
        try:
          timeline = read_timeline(self.path)
        except NoIndex as e:
          raise VideoError(f"video {self.path} has no frames to index ({e})") from None
        turned = timeline.rotation in (90, 270)
        w, h = (timeline.height, timeline.width) if turned else (timeline.width, timeline.height)
        self._meta = VideoMeta(self.path, timeline.fps, timeline.n, w, h, timeline.codec, times=timeline.times,
                               end=timeline.end, rotation=timeline.rotation)
        self._sources = [self._source("cv2" if self._backend == "cv2" else "av", timeline)]
        self._last = self._sources[0].name
        self._timeline = timeline
    return self._timeline

  @property
  def timeline(self):
    return self._timeline or self._index()

  @property
  def meta(self) -> VideoMeta:
    """Frames as shown and their true times (builds the time index if it is not built yet)."""
    self.timeline  # noqa: B018 (builds it)
    return self._meta

  @property
  def indexed(self) -> bool:
    return self._timeline is not None

  def _source(self, name: str, timeline=None):
    cls = Cv2Source if name == "cv2" else AvSource
    return cls(self.path, self._workers, timeline or self.timeline)

  @property
  def backend(self) -> str:
    """The decoder of the last read: "av" or "cv2" (auto: "cv2" after a read PyAV could not do)."""
    return self._last if self.indexed else "av"

  def zoom(self, start: float, end: float, fps: float, max_frames: int | None = ZOOM_MAX_FRAMES):
    """A `<video_zoom>` clip (`sampling.sample_zoom`'s rules): (frame indices int64 [n], or None when it was cut
    before the file was indexed; true times float64 [n]; uint8 RGB frames [n, H, W, 3], upright)."""
    if not self.indexed and self._backend != "cv2":
      got = self._window(start, end, fps, max_frames)
      if got is not None:
        frames, times, rotation = got
        return None, times, _upright(frames, rotation)
    idx, times = sample_zoom(self.meta, start, end, fps, max_frames=max_frames)
    return idx, times, self.frames(idx)

  def _window(self, start, end, fps, max_frames):
    try:
      container = open_container(self.path)
    except VideoError:
      return None  # the index's error names what is wrong with the file
    try:
      container.streams.video[0].thread_type = AvSource.threads
      return window_clip(container, start, end, fps, max_frames)
    except av.FFmpegError:
      return None  # the indexed read retries (earlier keyframes, OpenCV) and its error names what failed
    finally:
      container.close()

  def frames(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint8 RGB frames [len(indices), H, W, 3], upright, in the order given (repeats allowed)."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    n, h, w = self.meta.n_frames, self.meta.height, self.meta.width
    if idx.size == 0:
      return np.zeros((0, h, w, 3), np.uint8)
    if idx.min() < 0 or idx.max() >= n:
      raise IndexError(f"video {self.meta.path}: frame indices must lie in [0, {n}), got {idx.min()}..{idx.max()}")
    wanted = np.unique(idx)
    try:
      out = self._read(self._sources[0], wanted)
      self._last = self._sources[0].name
    except VideoError as first:
      if self._backend != "auto":
        raise
      try:  # PyAV failed on these frames: OpenCV tries them (the next read starts with PyAV again)
        if len(self._sources) == 1:
          self._sources.append(self._source("cv2"))
        out = self._read(self._sources[1], wanted)
        self._last = "cv2"
      except VideoError as second:
        raise VideoError(f"{first}; OpenCV also failed: {second}") from None
    return _upright([out[int(i)] for i in idx], self.meta.rotation)

  def _read(self, src, wanted: np.ndarray) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    if self._lock.acquire(blocking=False):
      try:
        if src.handle is None:
          src.handle = src.open()
        src.read(src.handle, wanted, out)
      finally:
        self._lock.release()
    else:  # another thread holds the cached handle
      handle = src.open()
      try:
        src.read(handle, wanted, out)
      finally:
        src.close(handle)
    return out

  def close(self) -> None:
    """Closes the cached handles (a later `frames()` reopens them)."""
    with self._lock:
      for src in self._sources if self.indexed else ():
        if src.handle is not None:
          src.close(src.handle)
          src.handle = None

  def __enter__(self) -> VideoReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _upright(frames, rotation: int) -> np.ndarray:
  """Decoded frames [n][H, W, 3] stacked and turned `rotation` degrees counterclockwise."""
  k = rotation // 90
  return np.stack([np.rot90(f, k) for f in frames] if k else frames)


def read_meta(path: str | os.PathLike, backend: str = "auto") -> VideoMeta:
  """Metadata (fps, frame count, size, true frame times); raises FileNotFoundError / VideoError naming the path."""
  with VideoReader(path, backend) as reader:
    return reader.meta
