"""Shared by the frame sources: the metadata record, the error types, and a small thread helper."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor


class VideoError(ValueError):
  """A video that cannot be opened or decoded; the message names the file."""


class NoIndex(Exception):
  """PyAV cannot map this file's frames to indices exactly; VideoReader("auto") then uses OpenCV."""


@dataclasses.dataclass(frozen=True)
class VideoMeta:
  path: str
  fps: float  # native (average) frame rate
  n_frames: int
  width: int
  height: int
  codec: str = ""

  @property
  def duration(self) -> float:
    """Seconds: n_frames / fps, as the original computes it."""
    return self.n_frames / self.fps


def in_parallel(groups: list, work) -> None:
  """Runs work(group) for each group in its own thread (decoders release the GIL); re-raises the first error."""
  with ThreadPoolExecutor(len(groups)) as pool:
    for f in [pool.submit(work, g) for g in groups]:
      f.result()
