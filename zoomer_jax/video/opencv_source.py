"""OpenCV frame source: one seek per run of wanted frames, then grab() forward; every frame named by its time.

OpenCV numbers frames by `time * average fps` and counts them from the container's duration, which is wrong on
variable-frame-rate files, edit lists, mkv/webm whose audio outlasts the video, and late starts. So it is used
only to decode: each grabbed frame is identified by its own timestamp (`CAP_PROP_POS_MSEC`, counted from the
stream's start) against the PyAV time index (timeline.py), and a seek (by OpenCV's frame number, only a guess
of the time it lands on) that lands past a wanted frame is retried from further back, last from the start.
Only wanted frames are retrieve()d (colour-converted). Several runs are split over `workers` threads, a
capture each.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from zoomer_jax.video.meta import VideoError, in_parallel
from zoomer_jax.video.sampling import plan_runs, split_runs
from zoomer_jax.video.timeline import Timeline


class Cv2Source:
  """Frames of one file with OpenCV, by index into `timeline`; `read` is safe per capture (one per thread)."""

  name = "cv2"
  max_gap = 64  # grab() through gaps up to this many frames rather than seek
  backs = (1, 16, 128, None)  # frames a seek aims before the wanted one, on each try (None: the start)

  def __init__(self, path: str, workers: int, timeline: Timeline):
    self.path, self.workers, self.timeline = path, workers, timeline
    tb = timeline.time_base
    self.times = timeline.times
    self.shift = float((timeline.stream_start - timeline.origin) * tb)  # POS_MSEC's origin, on the index's clock
    gap = float(np.diff(self.times).min()) if timeline.n > 1 else 1.0
    self.tol = min(1e-3, gap / 3)
    self._pos: dict[int, int | None] = {}  # id(capture) -> index of the frame it grabbed last (-1: none)
    cap = self.open()
    fps = cap.get(cv2.CAP_PROP_FPS)
    self.cv_fps = float(fps) if fps > 0 else timeline.fps  # OpenCV's own frame numbering, for seeks
    self.handle = cap

  def open(self, threads: int = 0) -> Any:
    """A new capture; threads=0 lets OpenCV pick the decoder thread count."""
    cap = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
    if not cap.isOpened():
      raise VideoError(f"cannot open video {self.path} with OpenCV (unreadable, or no frames)")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)  # frames as stored; the reader applies the rotation
    self._pos[id(cap)] = -1
    return cap

  def close(self, cap: Any) -> None:
    self._pos.pop(id(cap), None)
    cap.release()

  def read(self, cap: Any, wanted: np.ndarray, out: dict[int, np.ndarray]) -> None:
    """Decodes the sorted unique frames `wanted` into out[index] (uint8 RGB [H, W, 3])."""
    runs = plan_runs(wanted, max_gap=self.max_gap)
    groups = split_runs(runs, self.workers) if len(runs) > 1 else []
    if len(groups) <= 1:
      self._read_runs(cap, runs, out)
      return

    def work(group):  # a capture per thread, one decoder thread each
      c = self.open(threads=1)
      try:
        self._read_runs(c, group, out)
      finally:
        self.close(c)

    in_parallel(groups, work)

  def _identify(self, cap: Any) -> int:
    """The index of the frame just grabbed, from its timestamp; -1 for a time the index does not list."""
    t = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000 + self.shift
    j = int(np.clip(np.searchsorted(self.times, t), 1, max(1, len(self.times) - 1)))
    j = j - 1 if abs(self.times[j - 1] - t) <= abs(self.times[j] - t) else j
    return j if abs(self.times[j] - t) <= self.tol else -1

  def _seek(self, cap: Any, frame: int, back: int | None) -> None:
    """Aims OpenCV `back` of its frames before `frame` (its frame numbers are times x average fps); None
    reopens the file, whose first grab() is then the first frame (MPEG-TS seeks cannot reach it), as does
    any seek aimed at the start."""
    target = None if back is None else int((self.times[frame] - self.shift) * self.cv_fps) - back
    if target is None or target <= 0:
      if not cap.open(self.path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 0]):
        raise VideoError(f"cannot reopen video {self.path} with OpenCV")
      cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
      return
    cap.set(cv2.CAP_PROP_POS_FRAMES, target)

  def _read_runs(self, cap: Any, runs: list[tuple[int, np.ndarray]], out: dict[int, np.ndarray]) -> None:
    pos = self._pos.get(id(cap))  # the index of the frame last grabbed (None: unknown)
    self._pos[id(cap)] = None  # unknown until this read ends well
    for _, run in runs:
      first = int(run[0])
      for back in self.backs:
        if back is None or pos is None or not pos < first <= pos + self.max_gap:
          self._seek(cap, first, back)
        pos = self._forward(cap, run, out)
        if pos is not None:
          break
      else:
        raise VideoError(f"video {self.path}: OpenCV cannot decode frames {first}.."
                         f"{int(run[-1])} of {len(self.times)} (from {self.times[first]:.3f} s)")
    self._pos[id(cap)] = pos

  def _forward(self, cap: Any, run: np.ndarray, out: dict[int, np.ndarray]) -> int | None:
    """Grabs forward through `run`: the last index grabbed, or None when it passed a wanted frame or stopped."""
    k, j, last = 0, -1, -1
    while k < len(run):
      if not cap.grab():
        return None  # decoding stopped (some seeks land where OpenCV cannot go on): seek from further back
      j = self._identify(cap)
      if j < 0:
        continue  # a frame OpenCV cannot place in time is never returned
      last = j
      if j > run[k]:
        return None  # passed a wanted frame: seek from further back
      if j == run[k]:
        frame = cap.retrieve()[1]
        if frame is None:
          raise VideoError(f"video {self.path}: cannot decode frame {j} of {len(self.times)}")
        out[j] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        k += 1
    return last
