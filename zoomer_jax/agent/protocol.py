"""The `<video_zoom>` tool protocol: prompts, parsing a model turn, budgets, and the observation turn.

Everything here is pure text and arithmetic (no video I/O, no model), so it can be fuzzed: an `Episode`
takes each assistant turn's text and answers with exactly one of

  * `Final`     - the trajectory ends (an answer, no call, or a call in the last round);
  * `ZoomCall`  - a valid call: the host cuts `n_frames` frames out of `segment` and calls
                  `Episode.observation(timestamps)` for the text to append;
  * `ToolError` - a malformed call: its `observation` says what was wrong, and generation resumes.

Texts use `<image>` where one frame goes (the chat renderer expands it to the vision tokens). The
observation texts reproduce the original's (docs/protocol.md, "What is the same") with its two bugs
fixed; `docs/protocol.md` lists every deviation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Sequence, Union

PROMPT_DIR = os.path.join(os.path.dirname(__file__), "prompts")
IMAGE = "<image>"  # one frame's place in a text; expanded to <|vision_start|><|image_pad|>*n<|vision_end|>

_CALL = re.compile(r"<video_zoom>(.*?)</video_zoom>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

FRAMES_HEADER = "The frames of the video clip are shown below:\n"
CONTINUE = ("continue your reasoning process inside <think> and </think> and then write your final answer "
            "inside <answer> and </answer>")
AFTER_ERROR = ("Please analyze the error information obtained from the function tool and adjust your response. "
               "Continue your reasoning process inside <think> and </think>.")
LAST_ROUND_HINT = "Do not call <video_zoom> in this round, give a final answer based on information above."
# The observation is a user turn that follows the assistant's <|im_end|> directly (no newline), as the
# original's rollout builds it, and opens the next assistant turn.
TURN_OPEN = "<|im_start|>user\n"
TURN_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"


@dataclasses.dataclass(frozen=True)
class ToolConfig:
  """Budgets and prompt choice. Names follow the original's config keys (docs/protocol.md)."""

  max_generation_round: int = 5  # assistant turns per trajectory, the answer round included
  tool_call_max_frames: int = 16  # frames one call may return
  frames_upbound: int = 64  # overview frames at most (data.frames_upbound)
  video_fps: float = 0.5  # overview sampling rate before the upbound applies (data.video_fps)
  max_total_frames: int = 128  # all images of a trajectory (limit_mm_per_prompt['image'])
  system_prompt: str = "system_prompt.txt"  # a file in agent/prompts/, or a path
  # True: the file is the system prompt byte for byte (no stripping, no `{tool_call_max_frames}` filled in), for
  # a checkpoint trained on another prompt (docs/protocol.md, "Running with the exact training prompt").
  system_prompt_verbatim: bool = False
  last_round_hint: bool = True
  hint_separator: str = "\n"  # between an observation's last line and the hint; the original writes none ("")

  def __post_init__(self):
    if self.max_generation_round < 1:
      raise ValueError(f"max_generation_round must be >= 1, got {self.max_generation_round}")
    if self.tool_call_max_frames < 1:
      raise ValueError(f"tool_call_max_frames must be >= 1, got {self.tool_call_max_frames}")
    if self.frames_upbound < 1 or self.max_total_frames < self.frames_upbound:
      raise ValueError(f"need 1 <= frames_upbound ({self.frames_upbound}) <= max_total_frames "
                       f"({self.max_total_frames})")
    if not self.video_fps > 0:
      raise ValueError(f"video_fps must be > 0, got {self.video_fps}")

  @classmethod
  def from_dict(cls, d) -> "ToolConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown tool config keys {unknown}; known: {sorted(names)}")
    return cls(**dict(d))


# ---------------------------------------------------------------------------------------------- prompts
def system_prompt(cfg: ToolConfig = ToolConfig()) -> str:
  """The system prompt file named by `cfg.system_prompt`: stripped, with `{tool_call_max_frames}` filled in,
  or exactly its bytes with `cfg.system_prompt_verbatim`."""
  path = cfg.system_prompt
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(PROMPT_DIR, path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise FileNotFoundError(f"system prompt file {cfg.system_prompt!r} cannot be read: {e}") from e
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"system prompt file {path} is not UTF-8 text: {e}") from e
  if cfg.system_prompt_verbatim:
    return text
  return text.strip().replace("{tool_call_max_frames}", str(cfg.tool_call_max_frames))


def frame_tags(timestamps: Sequence[float]) -> str:
  """`<frame{i}_time{t:.2f}s><image>` for each frame, i from 0."""
  return "".join(f"<frame{i}_time{float(t):.2f}s>{IMAGE}" for i, t in enumerate(timestamps))


def user_prompt(problem: str, timestamps: Sequence[float], subtitles: Sequence[tuple] = ()) -> str:
  """The first user turn: the `<image>` in `problem` becomes the tagged overview frames.

  A problem without `<image>` gets the frames in front of it (the original required the placeholder).
  Only the first `<image>` is replaced; the others are dropped, as they would be images without pixels.
  `subtitles` ((start, end, text) in seconds, interleaved as LongVideoBench does) go each on its own line after
  the last frame shown at or before its start (those before the first frame, in front of it).
  """
  frames = frame_tags(timestamps)
  if subtitles:
    starts = sorted(subtitles, key=lambda line: line[0])
    parts, k = [], 0
    for i, t in enumerate(list(timestamps) + [math.inf]):
      lines = []
      while k < len(starts) and starts[k][0] < t:
        lines.append(inert(" ".join(str(starts[k][2]).split())))
        k += 1
      if lines:
        parts.append(("\n" if parts else "") + "\n".join(lines) + "\n")
      if i < len(timestamps):
        parts.append(f"<frame{i}_time{float(t):.2f}s>{IMAGE}")
    frames = "".join(parts)
  if IMAGE not in problem:
    return frames + "\n" + problem
  head, tail = problem.split(IMAGE, 1)
  return head + frames + tail.replace(IMAGE, "")


# ---------------------------------------------------------------------------------------------- outcomes
@dataclasses.dataclass(frozen=True)
class Final:
  """The trajectory ends. `reason`: "answer" (an <answer> tag), "no_call" (neither call nor answer),
  "round_limit" (a call in the last round, not executed, as in the original)."""

  answer: str | None
  reason: str


@dataclasses.dataclass(frozen=True)
class ZoomCall:
  """A valid call. `segment` is the request clamped to [0, duration]; `n_frames = int(fps*(end-start))` of
  the request (the original's count, kept when the segment is clamped). Frames are cut with the
  requested segment, whose frame indices the video sampler clamps exactly as the original does."""

  requested: tuple[float, float]
  segment: tuple[float, float]
  fps: float
  n_frames: int
  clamped: bool
  round: int


@dataclasses.dataclass(frozen=True)
class ToolError:
  message: str
  observation: str
  round: int


Outcome = Union[Final, ZoomCall, ToolError]


class CallError(ValueError):
  """A tool call that cannot be executed; the message goes into the error observation."""


# ---------------------------------------------------------------------------------------------- parsing
_WORD_JOINER = "\u2060"


def inert(text: str) -> str:
  """`text` (written by the model, or by anything outside the host's templates) made safe to echo in an
  observation: a WORD JOINER (U+2060, invisible) after every `<`, so no spelling in it - `<|im_end|>`,
  `<|image_pad|>`, `<image>`, `<|im_start|>user` - can become a special token, an image slot or a turn."""
  return text.replace("<", "<" + _WORD_JOINER)


def final_answer(text: str) -> str | None:
  """The content of the last complete <answer>...</answer>, stripped; None if there is none."""
  found = _ANSWER.findall(text)
  return found[-1].strip() if found else None


def find_calls(text: str) -> list[str]:
  """The bodies of the complete <video_zoom>...</video_zoom> pairs in `text`."""
  return _CALL.findall(text)


def _number(value, name: str) -> float:
  """A finite float from a JSON number or numeric string (the original applied float())."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise CallError(f'"{name}" must be a number, got {inert(json.dumps(value)[:40])}')
  try:
    x = float(value)
  except (ValueError, OverflowError):
    raise CallError(f'"{name}" must be a number, got {inert(json.dumps(value)[:40])}') from None
  if not math.isfinite(x):
    raise CallError(f'"{name}" must be a finite number, got {inert(str(value)[:40])}')
  return x


def parse_call(body: str) -> tuple[float, float, float]:
  """(start, end, fps) from the text between the tags; raises CallError saying what is wrong."""
  decoder = json.JSONDecoder()
  objects, pos = [], 0
  while (pos := body.find("{", pos)) != -1:
    try:
      obj, end = decoder.raw_decode(body, pos)
    except (ValueError, RecursionError) as e:  # includes int literals longer than Python allows
      if not objects:
        raise CallError(f"the call is not valid JSON: {inert(str(e)[:120])}") from None
      pos += 1
      continue
    objects.append(obj)
    pos = end
  if not objects:
    raise CallError('no JSON object inside <video_zoom>; expected {"segment": [start, end], "fps": n}')
  if len(objects) > 1:
    raise CallError(f"{len(objects)} JSON objects inside <video_zoom>; give exactly one call per turn")
  obj = objects[0]
  if not isinstance(obj, dict):
    raise CallError('the call must be a JSON object {"segment": [start, end], "fps": n}')
  for key in ("segment", "fps"):
    if key not in obj:
      raise CallError(f'missing field "{key}"; expected {{"segment": [start, end], "fps": n}}')
  seg = obj["segment"]
  if not isinstance(seg, list) or len(seg) != 2:
    raise CallError(f'"segment" must be a list of two numbers [start, end], got {inert(json.dumps(seg)[:60])}')
  start, end = _number(seg[0], "segment[0]"), _number(seg[1], "segment[1]")
  fps = _number(obj["fps"], "fps")
  if start >= end:
    raise CallError(f"segment start {start:g} must be before its end {end:g}")
  if fps <= 0:
    raise CallError(f'"fps" must be positive, got {fps:g}')
  return start, end, fps


# ---------------------------------------------------------------------------------------------- episode
class Episode:
  """One trajectory's tool state: rounds taken and frames shown. Never raises on model text."""

  def __init__(self, cfg: ToolConfig, duration: float, overview_frames: int):
    if not duration > 0 or not math.isfinite(duration):
      raise ValueError(f"video duration must be a positive number of seconds, got {duration}")
    if overview_frames > cfg.max_total_frames:
      raise ValueError(f"{overview_frames} overview frames exceed max_total_frames={cfg.max_total_frames}")
    self.cfg = cfg
    self.duration = float(duration)
    self.round = 0  # assistant turns seen so far
    self.frames_used = int(overview_frames)
    self.calls: list[ZoomCall | ToolError] = []
    self.done = False
    self._pending: ZoomCall | None = None

  @property
  def frames_left(self) -> int:
    return self.cfg.max_total_frames - self.frames_used

  def step(self, text: str) -> Outcome:
    """Takes one assistant turn's text (special tokens already removed)."""
    if self.done:
      raise RuntimeError("the episode is over; start a new one")
    if self._pending is not None:
      raise RuntimeError("the previous call's observation was not taken; call observation() first")
    it = self.round
    self.round += 1
    bodies = find_calls(text)
    if not bodies:
      self.done = True
      answer = final_answer(text)
      return Final(answer, "answer" if answer is not None else "no_call")
    if it >= self.cfg.max_generation_round - 1:
      self.done = True  # the original ends here too: the last round never runs the tool
      return Final(final_answer(text), "round_limit")
    try:
      if len(bodies) > 1:
        raise CallError(f"{len(bodies)} <video_zoom> calls in one turn; make one call and wait for its frames")
      start, end, fps = parse_call(bodies[0])
      n = int(fps * (end - start)) if fps * (end - start) < 2**31 else 2**31
      if n > self.cfg.tool_call_max_frames:
        raise CallError(f"Number of frames extracted ({n}) exceeds the maximum allowed "
                        f"({self.cfg.tool_call_max_frames}); lower fps to at most "
                        f"{self.cfg.tool_call_max_frames / (end - start):.3g} or shorten the segment")
      if n < 1:
        raise CallError(f"fps {fps:g} over {end - start:g} s gives no frame (fps x duration must be >= 1)")
      if n > self.frames_left:
        raise CallError(f"frame budget spent: {self.frames_left} of {self.cfg.max_total_frames} frames left, "
                        f"the call asks for {n}" if self.frames_left else
                        f"frame budget spent: all {self.cfg.max_total_frames} frames have been shown")
    except CallError as e:
      err = ToolError(str(e), self._error_observation(str(e), it), it)
      self.calls.append(err)
      return err
    # Clamped as the original clamps frame indices: a segment past the end yields the last frame.
    seg = (min(max(start, 0.0), self.duration), min(max(end, 0.0), self.duration))
    call = ZoomCall((start, end), seg, fps, n, seg != (start, end), it)
    self._pending = call
    return call

  def observation(self, timestamps: Sequence[float]) -> str:
    """The text to append after a `ZoomCall`'s frames were extracted (one `<image>` per timestamp)."""
    call = self._pending
    if call is None:
      raise RuntimeError("no call is waiting for its observation")
    if len(timestamps) != call.n_frames:
      raise ValueError(f"the call asked for {call.n_frames} frames, got {len(timestamps)} timestamps")
    self._pending = None
    self.frames_used += len(timestamps)
    self.calls.append(call)
    note = ""
    if call.clamped:
      note = (f"Note: the requested segment [{call.requested[0]:g}, {call.requested[1]:g}] s extends beyond "
              f"the video (0 to {self.duration:.2f} s); it was clamped to [{call.segment[0]:.2f}, "
              f"{call.segment[1]:.2f}] s.\n")
    body = f"<tool_response>\n{note}{FRAMES_HEADER}{frame_tags(timestamps)}\n</tool_response>\n{CONTINUE}"
    return TURN_OPEN + body + self._hint(call.round) + TURN_CLOSE

  def extraction_failed(self, message: str) -> ToolError:
    """The host could not cut the clip (e.g. a decode error): an error observation, no frames used."""
    call = self._pending
    if call is None:
      raise RuntimeError("no call is waiting for its observation")
    self._pending = None
    err = ToolError(message, TURN_OPEN + f"<tool_response>\nError: {inert(message)}\n</tool_response>\n" + AFTER_ERROR
                    + self._hint(call.round) + TURN_CLOSE, call.round)
    self.calls.append(err)
    return err

  def _error_observation(self, message: str, it: int) -> str:
    body = (f"<tool_response>\nERROR occurs during the function tool call. Error Information: {message}.\n"
            f"</tool_response>\n{AFTER_ERROR}")
    return TURN_OPEN + body + self._hint(it) + TURN_CLOSE

  def _hint(self, it: int) -> str:
    """The "answer now" line, in the observation that precedes the last round (round max-2 -> max-1)."""
    last = self.cfg.last_round_hint and it == self.cfg.max_generation_round - 2
    return self.cfg.hint_separator + LAST_ROUND_HINT if last else ""
