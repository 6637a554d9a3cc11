"""OpenCV frame source: one `CAP_PROP_POS_FRAMES` seek per run of wanted frames, then grab() forward.

Runs come from sampling.plan_runs without keyframes (OpenCV does not expose them): a gap over `max_gap` frames
starts a new run with a seek, which OpenCV resolves by decoding from the keyframe before it. Only wanted frames
are retrieve()d (colour-converted). Several runs are split over `workers` threads, a capture each.

Frame i is the i-th decoded frame when reading forward; seeks map indices to timestamps with the average frame
rate, which is exact for constant-frame-rate files only, and containers without a frame count (mkv/webm) get
one estimated from their duration. VideoReader prefers PyAV, exact for both, when it is installed.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from zoomer_jax.video.meta import VideoError, VideoMeta, in_parallel
from zoomer_jax.video.sampling import plan_runs, split_runs


class Cv2Source:
  """Metadata and frames of one file with OpenCV; `read` is safe per capture (one capture per thread)."""

  name = "cv2"
  max_gap = 64  # grab() through gaps up to this many frames rather than seek

  def __init__(self, path: str, workers: int):
    self.path, self.workers = path, workers
    cap = self.open()
    fps = cap.get(cv2.CAP_PROP_FPS)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
    codec = "".join(chr((fourcc >> 8 * k) & 0xFF) for k in range(4)).strip("\0 ")
    if n <= 0 or not fps > 0:
      cap.release()
      raise VideoError(f"video {path} has no frames (frame count {n}, fps {fps})")
    self.meta = VideoMeta(path, float(fps), n, w, h, codec)
    self.handle = cap

  def open(self, threads: int = 0) -> Any:
    """A new capture; threads=0 lets OpenCV pick the decoder thread count."""
    cap = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
    if not cap.isOpened():
      raise VideoError(f"cannot open video {self.path} with OpenCV (unreadable, or no frames)")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)  # frames as stored, as decord and PyAV return them
    return cap

  @staticmethod
  def close(cap: Any) -> None:
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
        c.release()

    in_parallel(groups, work)

  def _read_runs(self, cap: Any, runs: list[tuple[int, np.ndarray]], out: dict[int, np.ndarray]) -> None:
    pos = int(cap.get(cv2.CAP_PROP_POS_FRAMES))  # the index the next grab() returns
    for seek, run in runs:
      if not pos <= seek <= pos + self.max_gap:
        cap.set(cv2.CAP_PROP_POS_FRAMES, seek)
        pos = seek
      for i in run:
        while pos <= i:
          if not cap.grab():
            raise VideoError(f"video {self.path}: decoding stopped at frame {pos} of {self.meta.n_frames}")
          pos += 1
        frame = cap.retrieve()[1]
        if frame is None:
          raise VideoError(f"video {self.path}: cannot decode frame {i} of {self.meta.n_frames}")
        out[int(i)] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
