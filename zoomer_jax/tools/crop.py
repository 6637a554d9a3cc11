"""The spatial crop: `<crop>{"time": t, "box": [x0, y0, x1, y1]}</crop>` shows one region of the frame nearest
`t` s, cut from the decoded frame at the video's own resolution (not the overview's downscaled copy).

The box is in fractions of the frame's width (x) and height (y), 0 at the left / top edge: the model sees every
frame at some resized size, so a relative box means the same region at any size. The region is then one image,
resized under the rollout's pixel budget as every frame is. A crop shows one frame: it counts one call (one round)
and one frame of `max_total_frames` (docs/protocol.md, "The crop tool").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import ClassVar, Sequence

import numpy as np

from zoomer_jax.tools.base import CallError, Shown, Tool, frame_tags, inert, number
from zoomer_jax.video.sampling import frame_times

PROMPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "agent", "prompts", "tool_crop.txt")
MIN_SIDE = 0.01  # a box narrower than 1% of the frame is a slip, not a question


@dataclasses.dataclass(frozen=True)
class CropCall:
  """A valid crop: `time` in [0, duration] s, `box` (x0, y0, x1, y1) in [0, 1] with x0 < x1, y0 < y1."""

  tool: ClassVar[str] = "crop"
  time: float
  box: tuple[float, float, float, float]
  round: int
  n_frames: int = 1


def _box_text(box) -> str:
  return "[" + ", ".join(f"{v:g}" for v in box) + "]"


class Crop(Tool):
  name = "crop"
  tag = "crop"
  fields = ("time", "box")
  shape = '{"time": t, "box": [x0, y0, x1, y1]}'

  def parse(self, body: str, cfg, duration: float, round: int) -> CropCall:  # noqa: A002
    obj = self.json_object(body)
    t = number(obj["time"], "time")
    if not 0 <= t <= duration:
      raise CallError(f'"time" {t:g} s is outside the video (0 to {duration:.2f} s)')
    box = obj["box"]
    if not isinstance(box, list) or len(box) != 4:
      raise CallError(f'"box" must be a list of four numbers [x0, y0, x1, y1], got {inert(json.dumps(box)[:60])}')
    box = tuple(number(v, f"box[{i}]") for i, v in enumerate(box))
    if not all(0 <= v <= 1 for v in box):
      raise CallError(f'"box" {_box_text(box)} must lie inside [0, 1]: fractions of the frame\'s width and height')
    x0, y0, x1, y1 = box
    if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
      raise CallError(f'"box" {_box_text(box)} is empty or too small: x0 < x1 and y0 < y1 are needed, each side '
                      f"at least {MIN_SIDE:g} of the frame")
    return CropCall(t, box, round)

  def run(self, call: CropCall, reader) -> Shown:
    times = frame_times(reader.meta)
    idx = np.array([int(np.argmin(np.abs(times - call.time)))], np.int64)
    frame = reader.frames(idx)[0]
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = call.box
    # Pixels the box touches, at least one of them on each side.
    c0, r0 = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
    c1, r1 = max(c0 + 1, math.ceil(x1 * w)), max(r0 + 1, math.ceil(y1 * h))
    return Shown(np.ascontiguousarray(frame[r0:r1, c0:c1])[None], times[idx], idx)

  def observation(self, call: CropCall, times: Sequence[float], duration: float) -> str:
    return (f"The region {_box_text(call.box)} (x0, y0, x1, y1 as fractions of the width and height) of the frame "
            f"at {float(times[0]):.2f}s, the one nearest {call.time:g} s, is shown below at the video's own "
            f"resolution:\n{frame_tags(times)}")

  def log(self, call: CropCall, times=None, error=None) -> dict:
    head = dict(round=call.round, tool=self.name, time=call.time, box=list(call.box))
    if error is not None:
      return dict(head, error=error)
    return dict(head, frames=len(times), timestamps=[round(float(t), 3) for t in times])

  def from_log(self, record: dict) -> CropCall:
    return CropCall(record["time"], tuple(record["box"]), record["round"])

  def requested_frames(self, body: str) -> int | None:
    """1 when the body is one JSON object with a number "time" and four numbers in "box", else None (the
    format reward's rule: float() of each value, as the zoom's)."""
    try:
      obj = json.loads(body)
      float(obj["time"])
      ok = len([float(v) for v in obj["box"]]) == 4
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError):
      return None
    return 1 if ok else None

  def span(self, call: CropCall) -> tuple[float, float]:
    return (call.time, call.time)

  def describe(self, call: CropCall) -> str:
    return f"crop {_box_text(call.box)} at {call.time:g} s"

  def prompt(self, cfg) -> str:
    with open(PROMPT, encoding="utf-8") as f:
      return f.read().strip()

  def observation_tokens(self, cfg, frame_tokens: int, max_pixels: int) -> int:
    # One image under the pixel budget; rounding each side to a multiple of 28 at most doubles its area.
    return max(frame_tokens, 2 * max_pixels // (28 * 28) + 12)


CROP = Crop()
