"""A scripted expert for the synthetic zoom task, served as an OpenAI-compatible chat-completions endpoint on
loopback: `distill` and `reflect` run against it without a real model (the demo's reflect stage, the tests).

    with ExpertServer(ScriptedExpert(records, tool)) as server:     # records: the RL records the videos came from
        cfg.expert.base_url = server.url                            # http://127.0.0.1:<port>/v1
        run_reflect(cfg)

It knows each video's truth (`extra_info` of its record, `data/synthetic.py`: the planned zoom, the flash's frames,
the object) and finds the task from the first user turn, which must be exactly the rollout's (frame tags and
question, one image part per tag); tasks whose first turns are alike are told apart by their overview images. Two
kinds of request:

  * an agent turn (system prompt: the agent's): first the zoom the cold start's direct trajectory makes (the cue's
    segment at the rate that shows the flash, with its think text); after a zoom whose frame tags fall inside the
    flash, the answer naming the object and its times; after one that misses it, the same zoom again;
  * a reflection request (system prompt: `agent/prompts/reflect_prompt.txt`): it reads the failed trajectory's
    steps and observations and corrects the first mistake: a zoom whose frames miss the flash, or an answer given
    without having seen it, becomes the dense zoom; a wrong answer after frames that showed the flash becomes
    the right answer naming the object.

Like a real expert it never reads the answer off the request; unlike one it is always right about the video.
"""

from __future__ import annotations

import base64
import collections
import http.server
import json
import re
import threading
import time
from typing import Sequence

import cv2
import numpy as np

from zoomer_jax.agent import protocol as P
from zoomer_jax.data.cold_start import _times
from zoomer_jax.data.synthetic import LETTERS
from zoomer_jax.tools import ZOOM
from zoomer_jax.video import VideoReader, read_meta, sample_overview

TAG = re.compile(r"<frame(\d+)_time(\d+\.\d\d)s>")
_STEP = re.compile(r"\n\[(?:step (\d+): the agent|the question|the tool)\]\n")
REFLECTION_SYSTEM = "You review"  # how reflect_prompt.txt starts: tells a reflection request from an agent turn


def message_text(content) -> tuple[str, list[str]]:
  """A chat message's text with `<image>` where each image part was, and the image URLs."""
  if isinstance(content, str):
    return content, []
  text, urls = "", []
  for part in content:
    if part["type"] == "text":
      text += part["text"]
    elif part["type"] == "image_url":
      text += P.IMAGE
      urls.append(part["image_url"]["url"])
    else:
      raise ValueError(f"unknown content part type {part['type']!r}")
  return text, urls


def _decode(url: str) -> np.ndarray:
  """An image part's data URL -> uint8 RGB [H, W, 3]."""
  data = base64.b64decode(url.split(",", 1)[1])
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if img is None:
    raise ValueError(f"an image part that does not decode: {url[:60]!r}")
  return img[..., ::-1].astype(np.float32)


def tag_times(text: str) -> list[float]:
  return [float(t) for _, t in TAG.findall(text)]


class ScriptedExpert:
  """The expert's knowledge (`records`, the agent's `tool`) and what it was asked (`requests` per task index,
  `times`, `reflections`: task index -> the reflection request's text, `problems`: what was wrong in a request)."""

  def __init__(self, records: Sequence[dict], tool: P.ToolConfig, key: str = ""):
    self.records, self.tool, self.key = list(records), tool, key
    self.by_prompt, self.overview = collections.defaultdict(list), {}
    for i, r in enumerate(self.records):
      meta = read_meta(r["videos"][0])
      idx, ts = sample_overview(meta, tool.video_fps, tool.frames_upbound)
      self.by_prompt[P.user_prompt(r["problem"], ts)].append(i)
      self.overview[i] = (idx, ts)
    self._frames: dict[int, np.ndarray] = {}  # task -> its overview frames (tasks that share a first turn)
    self.requests = collections.Counter()
    self.times: list[tuple[int, float]] = []
    self.reflections: dict[int, str] = {}
    self.problems: list[str] = []
    self.lock = threading.Lock()

  # ------------------------------------------------------------------ the truth
  def _seen(self, i: int, times: Sequence[float]) -> list[float]:
    """The times among `times` whose frame shows the flash."""
    info = self.records[i]["extra_info"]
    a0, a1 = info["answer_frames"]
    return [t for t in times if a0 <= round(t * info["fps"]) <= a1]

  def dense_zoom(self, i: int) -> str:
    """The cold start's direct zoom turn: the cue's segment at the rate whose frames show the flash."""
    info = self.records[i]["extra_info"]
    idx, ts = self.overview[i]
    c0, c1 = info["cue_frames"]
    cued = (idx >= c0) & (idx <= c1)
    (s, e), fps = info["zoom"]["segment"], info["zoom"]["fps"]
    on = _times(ts[cued]) if cued.any() else "no overview frame"
    think = (f"The yellow border is on at {on} and off at {s:.2f}s and {e:.2f}s. The object appears briefly "
             f"between {s:.2f}s and {e:.2f}s, which these frames miss, so I zoom in there.")
    return f"<think>{think}</think>\n{ZOOM.call_text({'segment': [s, e], 'fps': fps})}"

  def answer(self, i: int, seen: Sequence[float]) -> str:
    """The answer turn after frames at `seen` showed the flash (the cold start's wording)."""
    rec = self.records[i]
    name = rec["extra_info"]["options"][LETTERS.index(rec["solution"])]
    return (f"<think>A {name} appears at {_times(seen)}. That is option {rec['solution']}.</think>\n"
            f"<answer>{rec['solution']}</answer>")

  def _task(self, candidates: list[int], urls: Sequence[str]) -> int:
    """The task among those whose first turn is the request's: the templated questions and equal durations of
    the synthetic task make some first turns alike, so the overview images tell them apart (the candidate whose
    frames are nearest the request's JPEG images)."""
    if len(candidates) == 1:
      return candidates[0]
    shown = [_decode(u) for u in urls[:len(self.overview[candidates[0]][0])]]

    def distance(i: int) -> float:
      if i not in self._frames:
        with VideoReader(self.records[i]["videos"][0]) as reader:
          self._frames[i] = reader.frames(self.overview[i][0])
      return sum(float(np.abs(cv2.resize(f, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
                               .astype(np.float32) - img).mean()) for f, img in zip(self._frames[i], shown))
    with self.lock:
      return min(candidates, key=distance)

  # ------------------------------------------------------------------ the two kinds of request
  def turn(self, i: int, r: int, chat: list) -> str | tuple:
    """The expert's turn `r` (0-based) of task `i`; a tuple (status, headers, body) answers with an HTTP error."""
    if r == 0:
      return self.dense_zoom(i)
    seen = self._seen(i, tag_times(message_text(chat[-1]["content"])[0]))
    if not seen:
      self.problems.append(f"task {i}: the planned zoom's frames miss the flash")
      return self.dense_zoom(i)
    return self.answer(i, seen)

  def correction(self, i: int, text: str) -> tuple[str, int, str]:
    """(analysis, step, continuation) for the failed trajectory of task `i` shown in `text`."""
    pieces = _STEP.split(text)  # [head, marker, body, marker, body, ...]: the marker's step number or None
    seen_so_far = []
    for k in range(1, len(pieces) - 1, 2):
      number, body = pieces[k], pieces[k + 1]
      if number is None:  # the question or a tool's observation: frames the agent saw
        seen_so_far += self._seen(i, tag_times(body))
        continue
      step = int(number)
      after = pieces[k + 3] if k + 3 < len(pieces) else ""  # the observation this step got, if any
      if ZOOM.close in body:
        if self._seen(i, tag_times(after)):
          continue
        return (f"At step {step} the agent zoomed, but the frames it got miss the brief flash; the whole cue at a "
                f"denser rate shows it.", step, self.dense_zoom(i))
      if seen_so_far:
        return (f"At step {step} the agent did not name the object that its frames at {_times(seen_so_far)} "
                f"show.", step, self.answer(i, seen_so_far))
      return (f"At step {step} the agent went on without having seen the object: no frame it was shown falls "
              f"inside the brief flash.", step, self.dense_zoom(i))
    return "The agent's trajectory shows no step to correct; it should zoom into the cue.", 0, self.dense_zoom(i)

  def reply(self, body: dict) -> tuple[int, dict, dict | str]:
    """(HTTP status, headers, JSON body or error text) for a chat-completions request."""
    chat = body["messages"]
    if str(chat[0]["content"]).startswith(REFLECTION_SYSTEM):
      return self._reflection(chat)
    if chat[0]["content"] != P.system_prompt(self.tool):
      self.problems.append(f"system prompt differs: {str(chat[0]['content'])[:80]!r}")
    first, urls = message_text(chat[1]["content"])
    if first not in self.by_prompt:
      self.problems.append(f"unknown first turn {first[:120]!r}")
      return 400, {}, "unknown task"
    i = self._task(self.by_prompt[first], urls)
    if len(urls) != len(TAG.findall(first)):
      self.problems.append(f"task {i}: {len(urls)} images for {len(TAG.findall(first))} frame tags")
    with self.lock:
      self.requests[i] += 1
      self.times.append((i, time.monotonic()))
    out = self.turn(i, sum(m["role"] == "assistant" for m in chat), chat)
    if isinstance(out, tuple):
      return out
    return 200, {}, completion(out, body.get("model", "scripted-expert"), prompt_tokens=100 + 10 * len(chat))

  def _reflection(self, chat) -> tuple[int, dict, dict | str]:
    text, urls = message_text(chat[1]["content"])
    candidates = next((k for p, k in self.by_prompt.items() if p in text), None)
    if candidates is None:
      self.problems.append(f"reflection request without the task's first turn: {text[:200]!r}")
      return 400, {}, "unknown task"
    i = self._task(candidates, urls)
    with self.lock:
      self.requests[i] += 1
      self.reflections[i] = text
    analysis, step, cont = self.correction(i, text)
    out = f"<analysis>{analysis}</analysis>\n<step>{step}</step>\n<continuation>{cont}</continuation>"
    return 200, {}, completion(out, "scripted-expert", prompt_tokens=500)


def completion(text: str, model: str, prompt_tokens: int) -> dict:
  return dict(id="scripted", object="chat.completion", model=model,
              choices=[dict(index=0, message=dict(role="assistant", content=text), finish_reason="stop")],
              usage=dict(prompt_tokens=prompt_tokens, completion_tokens=len(text) // 4,
                         total_tokens=prompt_tokens + len(text) // 4))


class ExpertServer:
  """A ThreadingHTTPServer on 127.0.0.1 (a free port) serving `expert` at /v1/chat/completions; a context
  manager that starts and stops it. With `expert.key`, requests need `Authorization: Bearer <key>`."""

  def __init__(self, expert: ScriptedExpert):
    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
          code, headers, out = 404, {}, "not found"
        elif expert.key and self.headers.get("Authorization") != f"Bearer {expert.key}":
          code, headers, out = 401, {}, "bad key"
        else:
          code, headers, out = expert.reply(body)
        data = (json.dumps(out) if isinstance(out, dict) else out).encode()
        self.send_response(code)
        for k, v in headers.items():
          self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def __enter__(self) -> ExpertServer:
    self.thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join()
