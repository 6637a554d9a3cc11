"""The tool protocol: prompts, parsing a model turn, budgets, and the observation turn.

Everything here is pure text and arithmetic (no video I/O, no model), so it can be fuzzed: an `Episode`
takes each assistant turn's text and answers with exactly one of

  * `Final`     - the trajectory ends (an answer, no call, or a call in the last round);
  * a call      - a valid call of an enabled tool (`ToolConfig.tools`; `ZoomCall`, `CropCall`): the host runs it
                  (`tools.by_name(call.tool).run`, `n_frames` frames) and calls `Episode.observation(timestamps)`
                  for the text to append;
  * `ToolError` - a malformed call: its `observation` says what was wrong, and generation resumes.

What a call means is the tool's business (`zoomer_jax.tools`); rounds, the frame budget and the turn around
every observation are the protocol's.

Texts use `<image>` where one frame goes (the chat renderer expands it to the vision tokens). The
observation texts reproduce the original's (docs/protocol.md, "What is the same") with its two bugs
fixed; `docs/protocol.md` lists every deviation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence, Union

from zoomer_jax import tools as T
from zoomer_jax.tools import IMAGE, CallError, CropCall, ZoomCall, frame_tags, inert  # noqa: F401 (re-exported)
from zoomer_jax.tools.zoom import FRAMES_HEADER, parse_call  # noqa: F401 (re-exported)

PROMPT_DIR = os.path.join(os.path.dirname(__file__), "prompts")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

CONTINUE = ("continue your reasoning process inside <think> and </think> and then write your final answer "
            "inside <answer> and </answer>")
AFTER_ERROR = ("Please analyze the error information obtained from the function tool and adjust your response. "
               "Continue your reasoning process inside <think> and </think>.")
_HINT = "Do not call {tags} in this round, give a final answer based on information above."
LAST_ROUND_HINT = _HINT.format(tags=T.ZOOM.open)  # the original's, with the zoom alone
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
  tools: tuple[str, ...] = T.DEFAULT  # the enabled tools by name (zoomer_jax.tools.REGISTRY)

  def __post_init__(self):
    object.__setattr__(self, "tools", tuple(self.tools))  # a config's list, hashable
    T.enabled(self.tools)  # names checked here, where the config is read
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
  or exactly its bytes with `cfg.system_prompt_verbatim`; then each enabled tool's own text (`Tool.prompt`; the
  files describe the zoom, so a zoom-only prompt is the file alone), a blank line before each."""
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
  if not cfg.system_prompt_verbatim:
    text = text.strip().replace("{tool_call_max_frames}", str(cfg.tool_call_max_frames))
  # A tool is offered only where a call can run: one round (the no-tool baseline) never runs one.
  extra = [t.prompt(cfg) for t in T.enabled(cfg.tools)] if cfg.max_generation_round > 1 else []
  return "\n\n".join([text] + [e for e in extra if e])


def last_round_hint(cfg: ToolConfig) -> str:
  """The last-round hint ("Do not call <video_zoom> in this round, ...") naming every enabled tool."""
  return _HINT.format(tags=" or ".join(t.open for t in T.enabled(cfg.tools)))


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
class ToolError:
  message: str
  observation: str
  round: int
  tool: str | None = None  # the tool whose call failed; None when the turn named several


Outcome = Union[Final, ZoomCall, CropCall, ToolError]


# ---------------------------------------------------------------------------------------------- parsing

def final_answer(text: str) -> str | None:
  """The content of the last complete <answer>...</answer>, stripped; None if there is none."""
  found = _ANSWER.findall(text)
  return found[-1].strip() if found else None


def find_calls(text: str, tools: Sequence[str] = T.DEFAULT) -> list[str]:
  """The bodies of the complete call pairs of the tools named (default: <video_zoom>...</video_zoom>) in
  `text`, in the order they appear."""
  return [body for _, body, _ in _calls(text, T.enabled(tools))]


def _calls(text: str, tools) -> list[tuple[int, str, T.Tool]]:
  return sorted(((at, body, tool) for tool in tools for at, body in tool.find(text)), key=lambda c: c[0])


def _too_many(found) -> str:
  tags = list(dict.fromkeys(tool.open for _, _, tool in found))
  what = f"{tags[0]} calls" if len(tags) == 1 else f"tool calls ({', '.join(tags)})"
  return f"{len(found)} {what} in one turn; make one call and wait for its frames"


# ---------------------------------------------------------------------------------------------- episode
class Episode:
  """One trajectory's tool state: rounds taken and frames shown. Never raises on model text."""

  def __init__(self, cfg: ToolConfig, duration: float, overview_frames: int):
    if not duration > 0 or not math.isfinite(duration):
      raise ValueError(f"video duration must be a positive number of seconds, got {duration}")
    if overview_frames > cfg.max_total_frames:
      raise ValueError(f"{overview_frames} overview frames exceed max_total_frames={cfg.max_total_frames}")
    self.cfg = cfg
    self.tools = T.enabled(cfg.tools)
    self.duration = float(duration)
    self.round = 0  # assistant turns seen so far
    self.frames_used = int(overview_frames)
    self.calls: list = []  # the calls and ToolErrors so far
    self.done = False
    self._pending = None

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
    found = _calls(text, self.tools)
    if not found:
      self.done = True
      answer = final_answer(text)
      return Final(answer, "answer" if answer is not None else "no_call")
    if it >= self.cfg.max_generation_round - 1:
      self.done = True  # the original ends here too: the last round never runs the tool
      return Final(final_answer(text), "round_limit")
    names = {tool.name for _, _, tool in found}
    try:
      if len(found) > 1:
        raise CallError(_too_many(found))
      _, body, tool = found[0]
      call = tool.parse(body, self.cfg, self.duration, it)
      n = call.n_frames
      if n > self.frames_left:
        raise CallError(f"frame budget spent: {self.frames_left} of {self.cfg.max_total_frames} frames left, "
                        f"the call asks for {n}" if self.frames_left else
                        f"frame budget spent: all {self.cfg.max_total_frames} frames have been shown")
    except CallError as e:
      err = ToolError(str(e), self._error_observation(str(e), it), it, names.pop() if len(names) == 1 else None)
      self.calls.append(err)
      return err
    self._pending = call
    return call

  def observation(self, timestamps: Sequence[float]) -> str:
    """The text to append after a call's frames were extracted (one `<image>` per timestamp)."""
    call = self._pending
    if call is None:
      raise RuntimeError("no call is waiting for its observation")
    if len(timestamps) != call.n_frames:
      raise ValueError(f"the call asked for {call.n_frames} frames, got {len(timestamps)} timestamps")
    self._pending = None
    self.frames_used += len(timestamps)
    self.calls.append(call)
    shown = T.by_name(call.tool).observation(call, timestamps, self.duration)
    body = f"<tool_response>\n{shown}\n</tool_response>\n{CONTINUE}"
    return TURN_OPEN + body + self._hint(call.round) + TURN_CLOSE

  def extraction_failed(self, message: str) -> ToolError:
    """The host could not run the call (e.g. a decode error): an error observation, no frames used."""
    call = self._pending
    if call is None:
      raise RuntimeError("no call is waiting for its observation")
    self._pending = None
    err = ToolError(message, TURN_OPEN + f"<tool_response>\nError: {inert(message)}\n</tool_response>\n" + AFTER_ERROR
                    + self._hint(call.round) + TURN_CLOSE, call.round, call.tool)
    self.calls.append(err)
    return err

  def _error_observation(self, message: str, it: int) -> str:
    body = (f"<tool_response>\nERROR occurs during the function tool call. Error Information: {message}.\n"
            f"</tool_response>\n{AFTER_ERROR}")
    return TURN_OPEN + body + self._hint(it) + TURN_CLOSE

  def _hint(self, it: int) -> str:
    """The "answer now" line, in the observation that precedes the last round (round max-2 -> max-1)."""
    last = self.cfg.last_round_hint and it == self.cfg.max_generation_round - 2
    return self.cfg.hint_separator + last_round_hint(self.cfg) if last else ""
