"""The zoom agent with an expert model behind a chat-completions API: the same protocol, budgets and error paths as
`agent.rollout`, one trajectory at a time.

    conv = ExpertAgent(api, videos, ExpertTurns(tool=ToolConfig(), max_tokens=1024)).run(task)
    conv.messages, conv.frames      # the SFT record's messages (<image> placeholders) and one frame per placeholder
    conv.finish_reason, conv.answer

What the expert is sent is what our model sees (docs/distill.md): the system prompt `protocol.system_prompt`,
the first user turn `protocol.user_prompt` (frame time tags, question), each of its own turns, and each
observation the `Episode` writes (frames, clamping notes, error messages, the last-round hint) without the chat
tokens around it. Each `<image>` becomes an `image_url` part holding the frame as a base64 JPEG at the size our
model's vision tower sees (`video.preprocess.resize_frame` with the agent's max/min pixels); the text between
images stays a text part. Frames are cut by the tools (`Videos`, the rollout's own readers), never taken from the
expert. A reply is cut after the first closing tag of an enabled tool, as our sampler stops there.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Callable, Sequence

import cv2
import numpy as np

from zoomer_jax import tools as T
from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.expert_api import ExpertAPI, ExpertError
from zoomer_jax.agent.rollout import Task, Videos, for_model
from zoomer_jax.video import VideoError
from zoomer_jax.video.preprocess import resize_frame


@dataclasses.dataclass(frozen=True)
class ExpertTurns:
  """How the expert is asked for a turn: the protocol's budgets, reply length and sampling, image encoding."""

  tool: P.ToolConfig = P.ToolConfig()
  max_tokens: int = 2048  # per reply
  temperature: float = 0.7
  max_pixels: int = 100352  # the frames' size as the agent's (AgentConfig.max_pixels / min_pixels)
  min_pixels: int = 25088
  jpeg_quality: int = 90

  def __post_init__(self):
    if self.max_tokens < 1 or not 1 <= self.jpeg_quality <= 100 or not self.temperature >= 0:
      raise ValueError(f"need max_tokens >= 1, 1 <= jpeg_quality <= 100, temperature >= 0; got {self}")


@dataclasses.dataclass
class Conversation:
  """One trajectory. `messages` use SFT roles and `<image>` placeholders; `frames` [H, W, 3] uint8 RGB as decoded,
  one per placeholder in order. `finish_reason`: the protocol's ("answer", "no_call", "round_limit"), or
  "expert_error" / "video_error" (then `error` says what)."""

  task: Task
  messages: list[dict]
  frames: list[np.ndarray]
  turns: list[str]
  calls: list[dict]
  answer: str | None = None
  finish_reason: str = ""
  error: str | None = None
  usage: dict = dataclasses.field(default_factory=lambda: dict(prompt_tokens=0, completion_tokens=0, requests=0,
                                                               retries=0))

  @property
  def tool_errors(self) -> list[str]:
    return [c["error"] for c in self.calls if "error" in c]


def jpeg_url(frame: np.ndarray, turns: ExpertTurns) -> str:
  """A data URL of the frame as a JPEG at the model's input size."""
  small = resize_frame(frame, turns.max_pixels, turns.min_pixels)
  ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(small[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, turns.jpeg_quality])
  if not ok:
    raise ValueError(f"JPEG encoding failed for a frame of shape {frame.shape}")
  return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def content_parts(text: str, urls: Sequence[str]) -> list[dict]:
  """`text` as chat-completions content parts: text between `<image>` placeholders, each one an image part."""
  pieces = text.split(P.IMAGE)
  if len(pieces) - 1 != len(urls):
    raise ValueError(f"the text holds {len(pieces) - 1} {P.IMAGE} placeholders but {len(urls)} images were given")
  parts = []
  for k, piece in enumerate(pieces):
    if piece:
      parts.append({"type": "text", "text": piece})
    if k < len(urls):
      parts.append({"type": "image_url", "image_url": {"url": urls[k]}})
  return parts


def cut_turn(text: str, tools: Sequence[str]) -> str:
  """The reply up to the end of the first closing tag of an enabled tool (where our sampler stops)."""
  ends = [i + len(t.close) for t in T.enabled(tools) if (i := text.find(t.close)) != -1]
  return text[:min(ends)] if ends else text


def observation_body(observation: str) -> str:
  """An Episode observation without the chat tokens around it (the SFT renderer and the API add their own)."""
  assert observation.startswith(P.TURN_OPEN) and observation.endswith(P.TURN_CLOSE), observation[:80]
  return observation[len(P.TURN_OPEN):-len(P.TURN_CLOSE)]


class ExpertAgent:
  """Runs tasks with the expert; thread-safe (one `Videos` shared by every worker)."""

  def __init__(self, api: ExpertAPI, videos: Videos, turns: ExpertTurns):
    self.api, self.videos, self.cfg = api, videos, turns

  def _say(self, conv: Conversation, chat: list[dict], role: str, text: str, frames=()) -> None:
    """Appends a turn to the SFT messages and to the API messages (text or parts with the frames)."""
    frames = list(frames)
    conv.messages.append({"role": role, "content": text})
    conv.frames += frames
    if frames or role == "user":
      chat.append({"role": role, "content": content_parts(text, [jpeg_url(f, self.cfg) for f in frames])})
    else:
      chat.append({"role": role, "content": text})

  def _ask(self, conv: Conversation, chat: list[dict]) -> str:
    reply = self.api.chat(chat, max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature)
    conv.usage["requests"] += 1 + reply.retries
    conv.usage["retries"] += reply.retries
    for k, v in reply.usage.items():
      conv.usage[k] += v
    return reply.text

  def run(self, task: Task, forced: Sequence[str] = (),
          ask: Callable[[Conversation, list[dict]], str] | None = None) -> Conversation:
    """One trajectory of `task`. Its first turns are `forced` (a failed trajectory's prefix and a correction:
    `reflect`), the rest the expert's. Never raises on the expert's text or a failed request."""
    ask = ask or self._ask
    cfg = self.cfg.tool
    conv = Conversation(task, [], [], [], [])
    try:
      meta, _, ts, frames = self.videos.overview_frames(task)
    except (VideoError, OSError) as e:
      conv.finish_reason, conv.error = "video_error", str(e)
      return conv
    chat: list[dict] = []
    self._say(conv, chat, "system", P.system_prompt(cfg))
    self._say(conv, chat, "user", P.user_prompt(task.problem, ts, task.subtitles), frames)
    episode = P.Episode(cfg, meta.duration, len(ts))
    while True:
      k = len(conv.turns)
      try:
        text = forced[k] if k < len(forced) else cut_turn(ask(conv, chat), cfg.tools)
      except ExpertError as e:
        conv.finish_reason, conv.error = "expert_error", str(e)
        return conv
      conv.turns.append(text)
      self._say(conv, chat, "assistant", text)
      out = episode.step(text)
      if isinstance(out, P.Final):
        conv.answer, conv.finish_reason = out.answer, out.reason
        return conv
      if isinstance(out, P.ToolError):
        conv.calls.append(dict(round=out.round, tool=out.tool, error=out.message))
        self._say(conv, chat, "user", observation_body(out.observation))
        continue
      tool = T.by_name(out.tool)
      try:
        _, times, clip = self.videos.clip_frames(task, out)
      except (VideoError, ValueError, OSError) as e:
        err = episode.extraction_failed(for_model(str(e), task.video))
        conv.calls.append(tool.log(out, error=str(e)))
        self._say(conv, chat, "user", observation_body(err.observation))
        continue
      observation = episode.observation(times)
      conv.calls.append(tool.log(out, times))
      self._say(conv, chat, "user", observation_body(observation), clip)
