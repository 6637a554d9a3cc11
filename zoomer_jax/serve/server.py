"""`python -m zoomer_jax serve`: the zoom agent behind an OpenAI-compatible HTTP API (docs/serve.md).

    with Server(model, tok, cfg) as server:        # cfg: configs/serve.py; port 0 picks a free one
        server.url                                 # http://127.0.0.1:<port>/v1
    run_serve(cfg)                                 # the command: load, serve until SIGINT / SIGTERM, stop cleanly

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (`api.py`: the two served models, the
request and response format). Standard library HTTP (`http.server.ThreadingHTTPServer`): one thread per
connection parses its request and waits for its events; the scheduler thread (`batcher.py`) runs the model.
Streaming answers are server-sent events (`data: {chat.completion.chunk}`, then `data: [DONE]`) in chunked
transfer encoding; an error after the stream started is sent as `data: {"error": {...}}` before `[DONE]`.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import threading
import time
import traceback

from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.engine import EngineConfig
from zoomer_jax.serve import api
from zoomer_jax.serve.batcher import Batcher
from zoomer_jax.serve.runner import Runner, RunnerConfig


def settings(cfg) -> api.Settings:
  lim = cfg.limits
  return api.Settings(agent_model=cfg.agent_model, turn_model=cfg.turn_model, video_root=cfg.video_root,
                      max_body_bytes=lim.max_body_bytes, max_messages=lim.max_messages, max_images=lim.max_images,
                      max_tokens=lim.max_tokens, default_max_tokens=cfg.sampling.max_tokens,
                      default_temperature=cfg.sampling.temperature)


def runner_config(cfg) -> RunnerConfig:
  f, e = cfg.frames, cfg.engine
  return RunnerConfig(tool=P.ToolConfig.from_dict(cfg.agent.to_dict()), max_pixels=f.max_pixels,
                      min_pixels=f.min_pixels, workers=f.workers, video_backend=f.video_backend,
                      # the page pool sized for the most requests at once: every run reuses the same programs
                      engine=EngineConfig(page_size=e.page_size, step_tokens=e.step_tokens,
                                          max_running=cfg.batch.max_batch),
                      token_bucket=e.token_bucket, image_bucket=e.image_bucket, seed=cfg.seed,
                      max_prompt_text_tokens=e.max_prompt_text_tokens)


class Server:
  """The HTTP server and its scheduler over `model` and `tok`; a context manager (start, then close).
  `run` wraps the runner's `run` (tests hold a batch with it); `script` is the runner's."""

  def __init__(self, model, tok, cfg, run=None, script=None):
    self.settings = settings(cfg)
    if not os.path.isdir(self.settings.video_root):
      raise ValueError(f"video_root {self.settings.video_root!r} is not a directory")
    self.api_key = cfg.api_key
    self.started = int(time.time())
    self._inflight = 0  # requests submitted whose answer is not written yet
    self._idle = threading.Condition()
    try:
      self.httpd = _HTTPServer((cfg.host, cfg.port), _handler(self))
    except OSError as e:
      raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from None
    self.runner = Runner(model, tok, runner_config(cfg), script)
    b = cfg.batch
    self.batcher = Batcher(run(self.runner.run) if run else self.runner.run, b.max_batch, b.max_queue,
                           b.wait_ms / 1000)
    self._thread = threading.Thread(target=self.httpd.serve_forever, name="serve-http", daemon=True)

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f"http://{host}:{port}/v1"

  def start(self) -> Server:
    self._thread.start()
    return self

  def close(self, timeout: float = 60.0) -> None:
    """Stops accepting connections, refuses the queued requests (503), finishes the running batch and waits
    (up to `timeout` s) until every answer is written: connection threads are daemons, which a process exit
    would cut off."""
    self.httpd.shutdown()
    self.batcher.close()
    with self._idle:
      self._idle.wait_for(lambda: self._inflight == 0, timeout)
    self.httpd.server_close()
    self._thread.join()

  def track(self, delta: int) -> None:
    with self._idle:
      self._inflight += delta
      self._idle.notify_all()

  def __enter__(self) -> Server:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  def health(self) -> dict:
    return dict(status="ok", models=api.models(self.settings, self.started)["data"], queued=self.batcher.queued,
                running=self.batcher.running, **self.batcher.stats)


class _HTTPServer(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = socket.SOMAXCONN  # the listen backlog (socketserver's default, 5, drops bursts of clients)


def _handler(server: Server):
  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked encoding

    def log_message(self, *args):
      pass

    def _json(self, code: int, body: dict, headers: dict | None = None) -> None:
      data = json.dumps(body).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      for k, v in (headers or {}).items():
        self.send_header(k, v)
      self.end_headers()
      self.wfile.write(data)

    def _error(self, e: api.ApiError) -> None:
      self._json(e.status, e.body(), {"Retry-After": "1"} if e.status == 429 else None)

    def _authorized(self) -> bool:
      if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
        self._error(api.ApiError(401, "a valid 'Authorization: Bearer <key>' header is required", "invalid_api_key",
                                 type_="authentication_error"))
        return False
      return True

    def do_GET(self):
      path = self.path.split("?", 1)[0].rstrip("/")
      if path == "/health":
        self._json(200, server.health())
      elif not self._authorized():
        return
      elif path == "/v1/models":
        self._json(200, api.models(server.settings, server.started))
      else:
        self._error(api.ApiError(404, f"no endpoint GET {path}", "not_found"))

    def do_POST(self):
      path = self.path.split("?", 1)[0].rstrip("/")
      length = self.headers.get("Content-Length")
      if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
        self.close_connection = True
        return self._error(api.ApiError(411, "a Content-Length header is required", "length_required"))
      if int(length) > server.settings.max_body_bytes:
        self.close_connection = True  # the body is not read
        return self._error(api.ApiError(413, f"the body has {length} bytes, more than the limit of "
                                        f"{server.settings.max_body_bytes}", "body_too_large"))
      raw = self.rfile.read(int(length))
      if not self._authorized():
        return
      if path != "/v1/chat/completions":
        return self._error(api.ApiError(404, f"no endpoint POST {path}", "not_found"))
      server.track(1)
      self.streaming = False
      try:
        req = api.parse_request(raw, server.settings)
        server.batcher.submit(req)
        if req.stream:
          self._stream(req)
        else:
          self._answer(req)
      except api.ApiError as e:
        self._error(e)
      except Exception as e:  # noqa: BLE001 (a bug answers 500 instead of dropping the connection)
        traceback.print_exc()
        if self.streaming:
          self.close_connection = True
        else:
          self._error(api.ApiError(500, f"{type(e).__name__}: {e}", "internal_error"))
      finally:
        server.track(-1)

    def _answer(self, req: api.Request) -> None:
      while True:
        kind, info = req.events.get()
        if kind == "done":
          return self._json(200, api.completion(req, info))
        if kind == "error":
          return self._error(info)

    def _send_chunk(self, body: dict | str) -> None:
      data = f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()
      self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
      self.wfile.flush()

    def _stream(self, req: api.Request) -> None:
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Transfer-Encoding", "chunked")
      self.end_headers()
      self.streaming = True
      try:
        self._send_chunk(api.chunk(req, dict(role="assistant", content="")))
        while True:
          kind, info = req.events.get()
          if kind == "turn":
            self._send_chunk(api.chunk(req, dict(content=info)))
            continue
          if kind == "error":
            self._send_chunk(info.body())
          else:
            self._send_chunk(api.chunk(req, {}, info["finish_reason"], zoomer=info["zoomer"]))
            if req.include_usage:
              self._send_chunk(dict(api.chunk(req), choices=[], usage=info["usage"]))
          break
        self._send_chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
      except (BrokenPipeError, ConnectionResetError):  # the client left; its request still runs to its end
        self.close_connection = True

  return Handler


def load_model(cfg):
  """(model, tokenizer, description): the HF checkpoint `cfg.checkpoint`, or the random model `cfg.model` with
  the built-in tiny tokenizer (the evaluation harness's loader)."""
  from zoomer_jax.eval.harness import _model_and_tokenizer  # noqa: PLC0415
  model, tok, _ = _model_and_tokenizer(cfg)
  return model, tok, cfg.checkpoint or "random weights (the built-in tiny model unless model.* says otherwise)"


def run_serve(cfg) -> dict:
  """Serves until SIGINT or SIGTERM, then stops cleanly (queued requests get 503, the running batch finishes);
  returns the scheduler's counts."""
  model, tok, source = load_model(cfg)
  stop = threading.Event()
  previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    with Server(model, tok, cfg) as server:
      print(f"serving {source} at {server.url} (models: {cfg.agent_model}"
            f"{', ' + cfg.turn_model if cfg.turn_model else ''}; video root {cfg.video_root})", flush=True)
      stop.wait()
      print("stopping: refusing queued requests, finishing the running batch", flush=True)
    stats = dict(server.batcher.stats)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  print(json.dumps(stats), flush=True)
  return stats

