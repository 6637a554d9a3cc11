"""The OpenAI chat-completions wire format of `serve`: requests parsed and checked, responses and stream chunks.

    req = parse_request(body_bytes, settings)      # -> Request, or raises ApiError(status, message, code)
    completion(req, result) / chunk(req, delta=..., finish_reason=...) / ApiError(...).body()

Two served models, chosen by the request's `model` (docs/serve.md):

  * agent (`settings.agent_model`): one user message holding the question text and exactly one video part,
    `{"type": "video_url", "video_url": {"url": "file:///abs/v.mp4"}}` (vLLM's extension), the url also a plain path
    (absolute, or relative to `video_root`). The video part's place in the text is where the overview frames go
    (`Task.problem`'s `<image>`). The zoom loop runs on the server; the answer is the whole trajectory.
  * turn (`settings.turn_model`): any system / user / assistant conversation with text and `image_url` parts
    (`data:image/png;base64,...` or `data:image/jpeg;base64,...`, or a file under `video_root`), ending on a user
    turn: the model writes one assistant turn, which stops after a tool call's closing tag as the agent's sampler
    does. The caller runs the tools (what `distill` does with an expert).

Every refusal is an `ApiError` whose body is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import queue
import time
import urllib.parse
import uuid

import cv2
import numpy as np

from zoomer_jax.agent.protocol import IMAGE
from zoomer_jax.agent.rollout import Task


class ApiError(Exception):
  """A refused or failed request: HTTP `status`, OpenAI's error `type` and a short `code`."""

  def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
               type_: str | None = None):
    super().__init__(message)
    self.status, self.message, self.code, self.param = status, message, code, param
    self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a request may ask for. `max_tokens` caps a request's `max_tokens` (per assistant turn);
  `default_max_tokens` and `default_temperature` apply when it gives none."""

  agent_model: str
  turn_model: str  # "" serves no turn model
  video_root: str
  max_body_bytes: int
  max_messages: int
  max_images: int
  max_tokens: int
  default_max_tokens: int
  default_temperature: float


@dataclasses.dataclass
class Request:
  """One parsed request. Agent mode carries `task`; turn mode `messages` (content as text with `<image>` where
  each image was) and `images` (uint8 RGB [H, W, 3] each, in order). `events` receives what the scheduler sends
  the connection: ("turn", text), ("done", result dict), ("error", ApiError)."""

  mode: str  # "agent" | "turn"
  model: str
  stream: bool
  include_usage: bool
  max_tokens: int
  temperature: float
  top_p: float
  stop: tuple[str, ...] | None = None  # turn model: the request's stop strings (None: a tool call's closing tag)
  task: Task | None = None
  messages: list[dict] | None = None
  images: list[np.ndarray] = dataclasses.field(default_factory=list)
  id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  arrived: float = dataclasses.field(default_factory=time.perf_counter)
  events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)

  @property
  def batch_key(self) -> tuple:
    """Requests batch together only when one engine call can serve them all (its sampling is per call)."""
    return (self.mode, self.max_tokens, self.temperature, self.top_p, self.stop)


# ---------------------------------------------------------------------------------------------- parsing
def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
  v = body.get(name)
  if v is None:
    return default
  ok = isinstance(v, int) if integer else isinstance(v, (int, float))
  if isinstance(v, bool) or not ok or not lo <= v <= hi:
    kind = "an integer" if integer else "a number"
    raise ApiError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {v!r}", "invalid_value", name)
  return v


def resolve_path(ref: str, root: str, what: str) -> str:
  """The real path of a file reference (`file://` URL, absolute path, or a path relative to `root`), which must
  lie under `root` (symlinks resolved) and be a file."""
  if ref.startswith("file://"):
    ref = urllib.parse.unquote(urllib.parse.urlparse(ref).path)
  elif "://" in ref or ref.startswith("data:"):
    raise ApiError(400, f"the {what} must be a local file under the server's video root (a file:// URL or a path), "
                   f"got {ref[:60]!r}", "unsupported_url")
  root = os.path.realpath(root)
  path = os.path.realpath(os.path.join(root, ref))
  if os.path.commonpath([root, path]) != root:
    raise ApiError(403, f"the {what} {ref!r} is outside the server's video root", "path_outside_root")
  if not os.path.isfile(path):
    raise ApiError(400, f"the {what} {ref!r} does not exist under the server's video root", "file_not_found")
  return path


def _part_url(part: dict, kind: str) -> str:
  v = part.get(kind)
  url = v.get("url") if isinstance(v, dict) else v
  if not isinstance(url, str) or not url:
    raise ApiError(400, f"a '{kind}' content part needs {{\"{kind}\": {{\"url\": ...}}}}", "invalid_content")
  return url


def _parts(content, where: str) -> list[dict]:
  if isinstance(content, str):
    return [{"type": "text", "text": content}]
  if not isinstance(content, list):
    raise ApiError(400, f"{where}: content must be a string or a list of parts", "invalid_content")
  for p in content:
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
      raise ApiError(400, f"{where}: every content part must be an object with a 'type'", "invalid_content")
    if p["type"] == "text" and not isinstance(p.get("text"), str):
      raise ApiError(400, f"{where}: a text part needs a string 'text'", "invalid_content")
    if p["type"] == "text" and IMAGE in p["text"]:
      raise ApiError(400, f"{where}: the text holds a literal {IMAGE}, which marks where frames go; send images "
                     "as parts", "invalid_content")
  return content


def parse_request(raw: bytes, s: Settings) -> Request:
  """A chat-completions body -> Request; ApiError (4xx) names what is wrong. Images are decoded here (in the
  connection's thread, not the scheduler's)."""
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from None
  if not isinstance(body, dict):
    raise ApiError(400, "the body must be a JSON object", "invalid_json")
  model = body.get("model")
  modes = {s.agent_model: "agent", **({s.turn_model: "turn"} if s.turn_model else {})}
  if model not in modes:
    raise ApiError(404, f"the model {model!r} does not exist; served: {sorted(modes)}", "model_not_found", "model")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages", "messages")
  if len(messages) > s.max_messages:
    raise ApiError(400, f"{len(messages)} messages, more than the limit of {s.max_messages}", "too_many_messages",
                   "messages")
  if _number(body, "n", 1, 1, 1, integer=True) != 1:
    raise ApiError(400, "only n=1 is served", "invalid_value", "n")
  limit = body.get("max_completion_tokens", body.get("max_tokens"))
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise ApiError(400, "'stream' must be true or false", "invalid_value", "stream")
  options = body.get("stream_options") or {}
  req = Request(mode=modes[model], model=model, stream=stream,
                include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
                max_tokens=_number({"max_tokens": limit}, "max_tokens", s.default_max_tokens, 1, s.max_tokens, True),
                temperature=float(_number(body, "temperature", s.default_temperature, 0, 2)),
                top_p=float(_number(body, "top_p", 1.0, 1e-6, 1)))
  req.stop = _stop(body.get("stop"))
  if req.mode == "agent":
    if req.stop is not None:
      raise ApiError(400, "the agent's turns end where its protocol says; 'stop' is for the turn model",
                     "invalid_value", "stop")
    req.task = _agent_task(messages, s, req.id)
  else:
    req.messages, req.images = _turn_messages(messages, s)
  return req


STOP_BYTES = 32  # the sampler's stop-string window (`StopCriteria.build`)


def _stop(v) -> tuple[str, ...] | None:
  """OpenAI's `stop`: a string or up to 4 non-empty strings of at most STOP_BYTES bytes (null: the model's own)."""
  if v is None:
    return None
  v = [v] if isinstance(v, str) else v
  if not isinstance(v, list) or len(v) > 4 or not all(isinstance(x, str) and 0 < len(x.encode()) <= STOP_BYTES
                                                      for x in v):
    raise ApiError(400, f"'stop' must be a string of 1 to {STOP_BYTES} bytes or a list of at most 4 of them",
                   "invalid_value", "stop")
  return tuple(v)


def _agent_task(messages: list, s: Settings, rid: str) -> Task:
  if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
    raise ApiError(400, "the agent takes one user message (its question and one video part); the system prompt "
                   "and the zoom turns are the agent's own", "invalid_messages", "messages")
  text, videos = "", []
  for p in _parts(messages[0].get("content"), "messages[0]"):
    if p["type"] == "text":
      text += p["text"]
    elif p["type"] == "video_url":
      videos.append(resolve_path(_part_url(p, "video_url"), s.video_root, "video"))
      text += IMAGE
    else:
      raise ApiError(400, f"messages[0]: the agent takes text and one video_url part, not {p['type']!r}",
                     "invalid_content")
  if len(videos) != 1:
    raise ApiError(400, f"the agent needs exactly one video_url part in the user message, got {len(videos)}",
                   "missing_video" if not videos else "too_many_videos", "messages")
  return Task(videos[0], text, id=rid)


def decode_image(url: str, s: Settings) -> np.ndarray:
  """uint8 RGB [H, W, 3] from a data URL or a file under the video root."""
  if url.startswith("data:"):
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
      raise ApiError(400, "image data URLs must be base64", "invalid_image")
    try:
      buf = np.frombuffer(base64.b64decode(data, validate=True), np.uint8)
    except ValueError as e:
      raise ApiError(400, f"an image's base64 is broken: {e}", "invalid_image") from None
  else:
    with open(resolve_path(url, s.video_root, "image"), "rb") as f:
      buf = np.frombuffer(f.read(), np.uint8)
  img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
  if img is None:
    raise ApiError(400, "an image could not be decoded (PNG or JPEG expected)", "invalid_image")
  return np.ascontiguousarray(img[..., ::-1])


def _turn_messages(messages: list, s: Settings) -> tuple[list[dict], list[np.ndarray]]:
  out, images = [], []
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
      raise ApiError(400, f"messages[{k}]: role must be system, user or assistant", "invalid_messages", "messages")
    text = ""
    for p in _parts(m.get("content"), f"messages[{k}]"):
      if p["type"] == "text":
        text += p["text"]
      elif p["type"] == "image_url":
        if len(images) == s.max_images:
          raise ApiError(400, f"more than {s.max_images} images", "too_many_images", "messages")
        images.append(decode_image(_part_url(p, "image_url"), s))
        text += IMAGE
      else:
        raise ApiError(400, f"messages[{k}]: the turn model takes text and image_url parts, not {p['type']!r}",
                       "invalid_content")
    out.append({"role": m["role"], "content": text})
  if out[-1]["role"] != "user":
    raise ApiError(400, "the last message must be the user's: the model writes the next assistant turn",
                   "invalid_messages", "messages")
  return out, images


# ---------------------------------------------------------------------------------------------- responses
def completion(req: Request, result: dict) -> dict:
  """A chat.completion: `result` holds content, finish_reason, usage and the `zoomer` extra."""
  return dict(id=req.id, object="chat.completion", created=req.created, model=req.model,
              choices=[dict(index=0, message=dict(role="assistant", content=result["content"]),
                            logprobs=None, finish_reason=result["finish_reason"])],
              usage=result["usage"], zoomer=result["zoomer"])


def chunk(req: Request, delta: dict | None = None, finish_reason: str | None = None, **extra) -> dict:
  """A chat.completion.chunk with one choice (or none, with `choices=[]` in extra for the usage chunk)."""
  out = dict(id=req.id, object="chat.completion.chunk", created=req.created, model=req.model,
             choices=[dict(index=0, delta=delta or {}, logprobs=None, finish_reason=finish_reason)])
  out.update(extra)
  return out


def models(s: Settings, created: int) -> dict:
  names = [s.agent_model] + ([s.turn_model] if s.turn_model else [])
  return dict(object="list", data=[dict(id=n, object="model", created=created, owned_by="zoomer_jax")
                                   for n in names])
