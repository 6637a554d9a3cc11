"""The temporal zoom: `<video_zoom>{"segment": [start, end], "fps": n}</video_zoom>` shows `int(fps*(end-start))`
frames spread over [start, end] s (the original VideoZoomer tool, docs/protocol.md; its rules are in the system
prompt files, agent/prompts/system_prompt*.txt)."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar, Sequence

from zoomer_jax.tools.base import CallError, Shown, Tool, frame_tags, inert, number

FRAMES_HEADER = "The frames of the video clip are shown below:\n"


@dataclasses.dataclass(frozen=True)
class ZoomCall:
  """A valid call. `segment` is the request clamped to [0, duration]; `n_frames = int(fps*(end-start))` of
  the request (the original's count, kept when the segment is clamped). Frames are cut with the
  requested segment, whose frame indices the video sampler clamps exactly as the original does."""

  tool: ClassVar[str] = "zoom"
  requested: tuple[float, float]
  segment: tuple[float, float]
  fps: float
  n_frames: int
  clamped: bool
  round: int


def parse_call(body: str) -> tuple[float, float, float]:
  """(start, end, fps) from the text between the tags; raises CallError saying what is wrong."""
  obj = ZOOM.json_object(body)
  seg = obj["segment"]
  if not isinstance(seg, list) or len(seg) != 2:
    raise CallError(f'"segment" must be a list of two numbers [start, end], got {inert(json.dumps(seg)[:60])}')
  start, end = number(seg[0], "segment[0]"), number(seg[1], "segment[1]")
  fps = number(obj["fps"], "fps")
  if start >= end:
    raise CallError(f"segment start {start:g} must be before its end {end:g}")
  if fps <= 0:
    raise CallError(f'"fps" must be positive, got {fps:g}')
  return start, end, fps


class Zoom(Tool):
  name = "zoom"
  tag = "video_zoom"
  fields = ("segment", "fps")
  shape = '{"segment": [start, end], "fps": n}'

  def parse(self, body: str, cfg, duration: float, round: int) -> ZoomCall:  # noqa: A002
    start, end, fps = parse_call(body)
    n = int(fps * (end - start)) if fps * (end - start) < 2**31 else 2**31
    if n > cfg.tool_call_max_frames:
      raise CallError(f"Number of frames extracted ({n}) exceeds the maximum allowed "
                      f"({cfg.tool_call_max_frames}); lower fps to at most "
                      f"{cfg.tool_call_max_frames / (end - start):.3g} or shorten the segment")
    if n < 1:
      raise CallError(f"fps {fps:g} over {end - start:g} s gives no frame (fps x duration must be >= 1)")
    # Clamped as the original clamps frame indices: a segment past the end yields the last frame.
    seg = (min(max(start, 0.0), duration), min(max(end, 0.0), duration))
    return ZoomCall((start, end), seg, fps, n, seg != (start, end), round)

  def run(self, call: ZoomCall, reader) -> Shown:
    idx, ts, frames = reader.zoom(call.requested[0], call.requested[1], call.fps, max_frames=None)
    return Shown(frames, ts, idx)

  def observation(self, call: ZoomCall, times: Sequence[float], duration: float) -> str:
    note = ""
    if call.clamped:
      note = (f"Note: the requested segment [{call.requested[0]:g}, {call.requested[1]:g}] s extends beyond "
              f"the video (0 to {duration:.2f} s); it was clamped to [{call.segment[0]:.2f}, "
              f"{call.segment[1]:.2f}] s.\n")
    return f"{note}{FRAMES_HEADER}{frame_tags(times)}"

  def log(self, call: ZoomCall, times=None, error=None) -> dict:
    if error is not None:
      return dict(round=call.round, tool=self.name, segment=list(call.requested), fps=call.fps, error=error)
    return dict(round=call.round, tool=self.name, segment=list(call.requested), clamped=list(call.segment),
                fps=call.fps, frames=len(times), timestamps=[round(float(t), 3) for t in times])

  def from_log(self, record: dict) -> ZoomCall:
    requested = tuple(record["segment"])
    segment = tuple(record.get("clamped", requested))
    return ZoomCall(requested, segment, record["fps"], record.get("frames", 0), segment != requested,
                    record["round"])

  def requested_frames(self, body: str) -> int | None:
    """int(fps*(end-start)). The original's rule, which is looser than `parse`: the whole body must be one JSON
    value (surrounding whitespace allowed), values go through float() (so "2" and true pass), and a reversed
    segment or fps 0 gives a count <= 0, which passes the frame limit."""
    try:
      obj = json.loads(body)
      return int(float(obj["fps"]) * (float(obj["segment"][1]) - float(obj["segment"][0])))
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError):
      return None

  def span(self, call: ZoomCall) -> tuple[float, float]:
    return call.requested

  def describe(self, call: ZoomCall) -> str:
    return f"zoom {list(call.requested)} at {call.fps:g} fps"

  def observation_tokens(self, cfg, frame_tokens: int, max_pixels: int) -> int:
    return cfg.tool_call_max_frames * frame_tokens


ZOOM = Zoom()
