"""The tool seam: everything the protocol, rollout, rewards, data generators, evaluation and pictures know of a tool.

A tool answers to one tag pair (`<video_zoom>…</video_zoom>`) holding one JSON object. It

  * finds its calls in a turn (`find`), parses and validates one (`parse`: a call object, or `CallError` whose
    message becomes the error observation), and says how many frames the call will show (`call.n_frames`, counted
    against the trajectory's `max_total_frames` by `agent.protocol.Episode`);
  * runs a call on the host (`run`: uint8 RGB frames [n, H, W, 3], their true times [n] s and frame indices [n]),
    and writes the observation's text around those frames (`observation`);
  * logs a call as a JSON-able record (`log`; `from_log` reads it back for pictures);
  * judges a turn's call by the looser rule of the format reward (`requested_frames`), and adds its rules to the
    system prompt (`prompt`).

docs/protocol.md, "Tools", says how to add one.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import re
from typing import Any, ClassVar, Sequence

import numpy as np

IMAGE = "<image>"  # one frame's place in a text; expanded to <|vision_start|><|image_pad|>*n<|vision_end|>
_WORD_JOINER = "\u2060"


class CallError(ValueError):
  """A tool call that cannot be executed; the message goes into the error observation."""


def inert(text: str) -> str:
  """`text` (written by the model, or by anything outside the host's templates) made safe to echo in an
  observation: a WORD JOINER (U+2060, invisible) after every `<`, so no spelling in it - `<|im_end|>`,
  `<|image_pad|>`, `<image>`, `<|im_start|>user` - can become a special token, an image slot or a turn."""
  return text.replace("<", "<" + _WORD_JOINER)


def frame_tags(timestamps: Sequence[float]) -> str:
  """`<frame{i}_time{t:.2f}s><image>` for each frame, i from 0."""
  return "".join(f"<frame{i}_time{float(t):.2f}s>{IMAGE}" for i, t in enumerate(timestamps))


def number(value, name: str) -> float:
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


@dataclasses.dataclass(frozen=True)
class Shown:
  """What a call shows: uint8 RGB frames [n, H, W, 3], their true times float64 [n] s, frame indices int64 [n]."""

  frames: np.ndarray
  times: np.ndarray
  indices: np.ndarray


class Tool(abc.ABC):
  """One tool; subclasses set the class attributes and implement the abstract methods."""

  name: ClassVar[str]  # as configs enable it (`ToolConfig.tools`)
  tag: ClassVar[str]  # calls are <tag>{json}</tag>
  fields: ClassVar[tuple[str, ...]]  # the JSON object's required keys
  shape: ClassVar[str]  # the JSON object as error messages show it, e.g. {"segment": [start, end], "fps": n}

  def __init__(self):
    self._pairs = re.compile(f"<{self.tag}>(.*?)</{self.tag}>", re.DOTALL)
    self._span = re.compile(f"<{self.tag}>.*</{self.tag}>", re.DOTALL)  # the format reward's (greedy) test

  @property
  def open(self) -> str:
    return f"<{self.tag}>"

  @property
  def close(self) -> str:
    return f"</{self.tag}>"

  # -------------------------------------------------------------------------------------------- text
  def find(self, text: str) -> list[tuple[int, str]]:
    """(offset, body) of each complete <tag>…</tag> pair in `text`."""
    return [(m.start(), m.group(1)) for m in self._pairs.finditer(text)]

  def has_call(self, text: str) -> bool:
    """Whether `text` holds an opening tag followed anywhere by a closing one (the original's count)."""
    return self._span.search(text) is not None

  def call_text(self, args: dict) -> str:
    """A call as the model writes it (cold-start data, `python -m zoomer_jax frames`)."""
    return self.open + json.dumps(args) + self.close

  def json_object(self, body: str) -> dict:
    """The one JSON object between the tags, with every key of `fields`; raises CallError saying what is wrong."""
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
      raise CallError(f"no JSON object inside {self.open}; expected {self.shape}")
    if len(objects) > 1:
      raise CallError(f"{len(objects)} JSON objects inside {self.open}; give exactly one call per turn")
    obj = objects[0]
    if not isinstance(obj, dict):
      raise CallError(f"the call must be a JSON object {self.shape}")
    for key in self.fields:
      if key not in obj:
        raise CallError(f'missing field "{key}"; expected {self.shape}')
    return obj

  # -------------------------------------------------------------------------------------------- the seam
  @abc.abstractmethod
  def parse(self, body: str, cfg, duration: float, round: int) -> Any:  # noqa: A002 (the protocol's word)
    """A valid call (with `n_frames` and `round`) from the text between the tags; raises CallError.
    `cfg` is the `ToolConfig`, `duration` the video's length in seconds."""

  @abc.abstractmethod
  def run(self, call, reader) -> Shown:
    """The frames of `call`, read with `reader` (a `video.VideoReader`)."""

  @abc.abstractmethod
  def observation(self, call, times: Sequence[float], duration: float) -> str:
    """The tool response's text for frames at `times` (one `<image>` each), without the <tool_response> tags."""

  @abc.abstractmethod
  def log(self, call, times: Sequence[float] | None = None, error: str | None = None) -> dict:
    """The trajectory's record of `call`: shown at `times`, or failed on the host with `error`."""

  @abc.abstractmethod
  def from_log(self, record: dict) -> Any:
    """The call a `log` record describes (its round kept)."""

  @abc.abstractmethod
  def requested_frames(self, body: str) -> int | None:
    """The frames a call asks for by the format reward's looser rule, None if that rule rejects it."""

  @abc.abstractmethod
  def span(self, call) -> tuple[float, float]:
    """The (start, end) s of the video the call looks at, for pictures."""

  @abc.abstractmethod
  def describe(self, call) -> str:
    """One line naming the call, for pictures and logs."""

  def prompt(self, cfg) -> str:
    """Text that tells the model how to call this tool, added to the system prompt; "" when the prompt file
    already does (the zoom's, docs/protocol.md)."""
    return ""

  @abc.abstractmethod
  def observation_tokens(self, cfg, frame_tokens: int, max_pixels: int) -> int:
    """An upper bound on the vision tokens of one observation: `frame_tokens` per overview frame, `max_pixels`
    the per-image budget (sizes the rollout's KV cache)."""
