"""VideoReader: metadata and frame-accurate uint8 RGB frames by index, with PyAV or OpenCV.

Frame i is the i-th frame in presentation order, as stored (no display rotation applied): what decord, which
the original uses, returns.

  backend="auto" (default): PyAV when it is installed and can index the file, else OpenCV. PyAV is faster for
                 the overview and for zoom clips on both H.264 (long GOP, B-frames) and MPEG-4 part 2
                 (bench/bench_video.py), and exact on variable-frame-rate files; OpenCV needs nothing beyond
                 the runtime dependencies. Both return identical pixels (same FFmpeg conversion to RGB).
  backend="av":  PyAV only (pyav_source.py); backend="cv2": OpenCV only (opencv_source.py).

Thread safety: a reader holds immutable metadata and one cached open handle taken under a non-blocking lock; a
call that finds the handle busy opens its own. `frames()` may be called from many threads at once, and a read
of frames far apart is itself split over `workers` threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from zoomer_jax.video.meta import NoIndex, VideoError, VideoMeta
from zoomer_jax.video.opencv_source import Cv2Source

try:
  from zoomer_jax.video.pyav_source import AvSource
except ImportError:  # PyAV is optional
  AvSource = None

BACKENDS = ("auto", "cv2", "av")


def default_workers() -> int:
  """Threads for one read: up to 4, no more than the machine's cores."""
  return max(1, min(4, os.cpu_count() or 1))


class VideoReader:
  """`VideoReader(path, backend="auto")`: `.meta`, `.frames(indices) -> uint8 RGB [n, H, W, 3]`."""

  def __init__(self, path: str | os.PathLike, backend: str = "auto", workers: int | None = None):
    path = os.fspath(path)
    if backend not in BACKENDS:
      raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"video file not found: {path}")
    if backend == "av" and AvSource is None:
      raise ImportError("backend='av' needs PyAV (pip install av)")
    workers = default_workers() if workers is None else max(1, workers)
    self._source = None
    if backend != "cv2" and AvSource is not None:
      try:
        self._source = AvSource(path, workers)
      except (NoIndex, VideoError) as e:
        if backend == "av":
          raise VideoError(f"video {path}: PyAV cannot read it frame-accurately ({e})") from None
    if self._source is None:
      self._source = Cv2Source(path, workers)
    self._lock = threading.Lock()

  @property
  def meta(self) -> VideoMeta:
    return self._source.meta

  @property
  def backend(self) -> str:
    """The backend in use: "av" or "cv2"."""
    return self._source.name

  def frames(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint8 RGB frames [len(indices), H, W, 3] in the order given (repeats allowed)."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    n, h, w = self.meta.n_frames, self.meta.height, self.meta.width
    if idx.size == 0:
      return np.zeros((0, h, w, 3), np.uint8)
    if idx.min() < 0 or idx.max() >= n:
      raise IndexError(f"video {self.meta.path}: frame indices must lie in [0, {n}), got {idx.min()}..{idx.max()}")
    wanted = np.unique(idx)
    out: dict[int, np.ndarray] = {}
    src = self._source
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
    return np.stack([out[int(i)] for i in idx])

  def close(self) -> None:
    """Closes the cached handle (a later `frames()` reopens one)."""
    with self._lock:
      if self._source.handle is not None:
        self._source.close(self._source.handle)
        self._source.handle = None

  def __enter__(self) -> VideoReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_meta(path: str | os.PathLike, backend: str = "auto") -> VideoMeta:
  """Metadata only (fps, frame count, size); raises FileNotFoundError / VideoError naming the path."""
  with VideoReader(path, backend) as reader:
    return reader.meta
