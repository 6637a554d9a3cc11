"""Serve the zoom agent behind an OpenAI-compatible HTTP API (zoomer_jax/serve/, docs/serve.md).

    python -m zoomer_jax serve                                   # the built-in tiny random model, nothing downloaded
    python -m zoomer_jax serve --config.checkpoint=/ckpt/VideoZoomer-7B --config.dtype=bfloat16 \
        --config.video_root=/data/videos --config.port=8000

Variants: `small` shrinks frames, rounds and turns for CPU tests and smoke runs. Models served: `agent_model`
(the whole zoom loop runs on the server) and `turn_model` (one assistant turn of a chat with images; "" turns it
off).
"""

import os

import ml_collections

from zoomer_jax.config_loader import load


def get_config(arg=None):
  cfg = ml_collections.ConfigDict()
  cfg.job = "serve"
  cfg.host = "127.0.0.1"  # loopback; 0.0.0.0 listens on every interface
  cfg.port = 8000  # 0: a free port
  cfg.api_key = ""  # "": no Authorization header needed
  cfg.video_root = "."  # requests may name files under this folder only (symlinks resolved)
  cfg.agent_model = "zoomer-agent"
  cfg.turn_model = "zoomer-model"
  cfg.checkpoint = ""  # an HF Qwen2.5-VL directory with tokenizer files; "" = random `model` + the tiny tokenizer
  tiny = load("qwen25vl_tiny")
  cfg.model = tiny.model
  cfg.impl = tiny.impl
  cfg.dtype = "float32"
  cfg.seed = 0  # the random weights and the batches' sampling keys
  cfg.mesh = ml_collections.ConfigDict(dict(ici=(1, -1, 1), dcn=(1, 1, 1), rules=tiny.rules))
  # ToolConfig fields (zoomer_jax/agent/protocol.py): the protocol and prompt the model was trained with.
  cfg.agent = ml_collections.ConfigDict(dict(
      max_generation_round=5, tool_call_max_frames=16, frames_upbound=64, video_fps=0.5, max_total_frames=128,
      system_prompt="system_prompt.txt", system_prompt_verbatim=False, last_round_hint=True, hint_separator="\n",
      tools=("zoom",),
  ))
  cfg.frames = ml_collections.ConfigDict(dict(max_pixels=100352, min_pixels=25088, workers=4, video_backend="auto"))
  cfg.engine = ml_collections.ConfigDict(dict(
      page_size=16, step_tokens=256,  # the continuous engine (docs/rollout_engine.md)
      # An agent prompt's tokens besides its overview's images: with the budgets, the page tables' width, so
      # requests can join a running engine; a longer prompt ends at once with finish_reason "length".
      max_prompt_text_tokens=1024,
      token_bucket=64, image_bucket=8,  # the turn model's prefill buckets
  ))
  # A request without max_tokens / temperature gets these; max_tokens is per assistant turn.
  cfg.sampling = ml_collections.ConfigDict(dict(max_tokens=512, temperature=1.0))
  cfg.batch = ml_collections.ConfigDict(dict(
      max_batch=16,  # requests run together in one engine call
      max_queue=64,  # requests waiting beyond the running batch; more get 429
      wait_ms=5.0,  # the scheduler waits this long after the first request so that a burst shares a batch
  ))
  cfg.limits = ml_collections.ConfigDict(dict(
      max_body_bytes=32 << 20,  # larger bodies get 413
      max_messages=64, max_images=256,  # per request (turn model)
      max_tokens=4096,  # the largest max_tokens a request may ask for
  ))
  if arg == "small":
    # The demo's short system prompt (~100 tokens instead of ~390): a prompt then fits a step with the decode rows.
    cfg.agent.system_prompt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoomer_jax",
                                           "demo", "system_prompt.txt")
    cfg.agent.update(dict(max_generation_round=3, frames_upbound=8, tool_call_max_frames=8, max_total_frames=32))
    cfg.frames.update(dict(max_pixels=56 * 56, min_pixels=56 * 56, workers=2))
    cfg.sampling.max_tokens = 16
    cfg.limits.max_tokens = 64
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of serve; known: 'small'")
  return cfg
