"""A client for an OpenAI-compatible chat-completions endpoint: the expert behind `distill` and `reflect`.

    api = ExpertAPI(ExpertSettings.resolve(cfg.expert))
    reply = api.chat(messages, max_tokens=1024, temperature=0.7)   # Reply(text, finish_reason, usage, retries)

One request is `POST {base_url}/chat/completions` with `{"model", "messages", "max_tokens", "temperature"}`
(messages as OpenAI writes them: text and `image_url` parts). Standard library only (`urllib`), so the package
needs no client library; callers run requests concurrently in their own thread pool.

Retried, with exponential backoff and full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"),
waiting at least what a `Retry-After` header asks: HTTP 429, HTTP 5xx, connection errors and timeouts. Not
retried: any other HTTP status and a 200 whose body is not a chat completion. Either way, after the last try
`ExpertError` says why, with a short `reason` ("http_400", "http_429", "connection", "bad_response") that
callers record; it never ends a run.
"""

from __future__ import annotations

import dataclasses
import email.utils
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request

ENV_BASE_URL = "OPENAI_BASE_URL"
ENV_API_KEY = "OPENAI_API_KEY"
ENV_MODEL = "ZOOMER_EXPERT_MODEL"


class ExpertError(Exception):
  """A request that failed for good; `reason` is a short tag for logs, the message the detail."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
  base_url: str
  model: str
  api_key: str = ""  # "" sends no Authorization header (local servers)
  timeout_s: float = 120.0
  max_retries: int = 6  # tries after the first
  backoff_s: float = 1.0  # the first retry waits up to this, doubling each time
  max_backoff_s: float = 60.0

  def __post_init__(self):
    if not self.base_url.startswith(("http://", "https://")):
      raise ValueError(f"expert base_url must start with http:// or https://, got {self.base_url!r}")
    if not self.model:
      raise ValueError(f"no expert model: set expert.model or ${ENV_MODEL}")
    if self.max_retries < 0 or not self.timeout_s > 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
      raise ValueError(f"need max_retries >= 0, timeout_s > 0, backoff_s >= 0, max_backoff_s >= 0; got {self}")

  @classmethod
  def resolve(cls, expert, environ=None) -> "ExpertSettings":
    """From a config's `expert` section; base_url, api_key and model fall back to $OPENAI_BASE_URL,
    $OPENAI_API_KEY and $ZOOMER_EXPERT_MODEL when the config leaves them "" (the config wins when set)."""
    env = os.environ if environ is None else environ
    base_url = expert.base_url or env.get(ENV_BASE_URL, "")
    if not base_url:
      raise ValueError(f"no expert endpoint: set expert.base_url or ${ENV_BASE_URL} (e.g. http://host:8000/v1)")
    return cls(base_url=base_url.rstrip("/"), model=expert.model or env.get(ENV_MODEL, ""),
               api_key=expert.api_key or env.get(ENV_API_KEY, ""), timeout_s=float(expert.timeout_s),
               max_retries=int(expert.max_retries), backoff_s=float(expert.backoff_s),
               max_backoff_s=float(expert.max_backoff_s))


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  finish_reason: str
  usage: dict  # prompt_tokens, completion_tokens (0 when the server reports none)
  retries: int


def _retry_after(value: str | None) -> float | None:
  """Seconds from a Retry-After header (a number of seconds or an HTTP date), None if absent or unreadable."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
  except (TypeError, ValueError):
    return None


class ExpertAPI:
  """Thread-safe: one instance serves every worker; `stats` counts requests, retries and tokens."""

  def __init__(self, settings: ExpertSettings, sleep=time.sleep):
    self.settings = settings
    self._sleep = sleep
    self._lock = threading.Lock()
    self.stats = dict(requests=0, retries=0, failed=0, prompt_tokens=0, completion_tokens=0)

  def _count(self, **inc) -> None:
    with self._lock:
      for k, v in inc.items():
        self.stats[k] += v

  def _post(self, body: bytes) -> dict:
    s = self.settings
    headers = {"Content-Type": "application/json"}
    if s.api_key:
      headers["Authorization"] = f"Bearer {s.api_key}"
    req = urllib.request.Request(f"{s.base_url}/chat/completions", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=s.timeout_s) as resp:
      raw = resp.read()
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ExpertError("bad_response", f"the reply is not JSON ({e}): {raw[:200]!r}") from None

  def chat(self, messages: list[dict], *, max_tokens: int, temperature: float) -> Reply:
    s = self.settings
    body = json.dumps(dict(model=s.model, messages=messages, max_tokens=int(max_tokens),
                           temperature=float(temperature))).encode()
    for attempt in range(s.max_retries + 1):
      self._count(requests=1)
      wait = None
      try:
        out = self._post(body)
        break
      except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        error = ExpertError(f"http_{e.code}", detail or str(e.reason))
        if e.code != 429 and e.code < 500:
          self._count(failed=1)
          raise error from None
        wait = _retry_after(e.headers.get("Retry-After") if e.headers else None)
      except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError) as e:
        error = ExpertError("connection", str(getattr(e, "reason", e)))
      if attempt == s.max_retries:
        self._count(failed=1)
        raise ExpertError(error.reason, f"gave up after {attempt + 1} tries: {error}")
      self._count(retries=1)
      backoff = random.uniform(0, min(s.max_backoff_s, s.backoff_s * 2**attempt))
      self._sleep(max(backoff, wait or 0.0))
    return self._reply(out, attempt)

  def _reply(self, out, retries: int) -> Reply:
    try:
      choice = out["choices"][0]
      text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
      self._count(failed=1)
      raise ExpertError("bad_response", f"no choices[0].message.content in {json.dumps(out)[:200]}") from None
    if text is None:
      text = ""  # some servers send null content for an empty reply
    if not isinstance(text, str):
      self._count(failed=1)
      raise ExpertError("bad_response", f"message content is {type(text).__name__}, not a string")
    usage = out.get("usage") or {}
    tokens = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
    self._count(**tokens)
    return Reply(text, str(choice.get("finish_reason") or ""), tokens, retries)
