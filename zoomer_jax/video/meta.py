"""Shared by the frame sources: the metadata record, the error types, and a small thread helper."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class VideoError(ValueError):
  """A video that cannot be opened or decoded; the message names the file."""


class NoIndex(Exception):
  """A file's frames cannot be indexed this way (the caller tries another)."""


@dataclasses.dataclass(frozen=True)
class VideoMeta:
  """What the agent knows of a video: frames as shown (after display rotation) and their true times."""
  path: str
  fps: float  # average frame rate
  n_frames: int
  width: int  # upright (display rotation applied)
  height: int
  codec: str = ""
  # float64 [n_frames]: each frame's presentation time in seconds from the container's start, ascending.
  # None: constant rate from 0 (index / fps), as synthetic metadata in tests and data generators has it.
  times: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  end: float | None = None  # seconds when the last frame stops being shown; None: n_frames / fps
  rotation: int = 0  # degrees counterclockwise applied to decoded frames

  @property
  def duration(self) -> float:
    """Seconds: the end of the last frame (n_frames / fps at a constant rate from 0, as the original has it)."""
    return self.end if self.end is not None else self.n_frames / self.fps


def in_parallel(groups: list, work) -> None:
  """Runs work(group) for each group in its own thread (decoders release the GIL); re-raises the first error."""
  with ThreadPoolExecutor(len(groups)) as pool:
    for f in [pool.submit(work, g) for g in groups]:
      f.result()
