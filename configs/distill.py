"""Distil the zoom agent from an expert model behind an OpenAI-compatible chat-completions API (docs/distill.md).

    OPENAI_BASE_URL=http://localhost:8000/v1 ZOOMER_EXPERT_MODEL=Qwen/Qwen2.5-VL-72B-Instruct \
        python -m zoomer_jax distill --config=distill --config.data.train_files='("/data/train.json",)'

Variants: `synthetic` runs on 8 generated videos of the built-in synthetic zoom task (a smoke run against a real
endpoint). Outputs under out_dir: records.jsonl (SFT records, images/), attempts.jsonl, metrics.jsonl,
summary.json; a rerun resumes. Endpoint, model and key: the `expert` fields, or when those are "" the
environment ($OPENAI_BASE_URL, $ZOOMER_EXPERT_MODEL, $OPENAI_API_KEY).
"""

import ml_collections


def get_config(arg=None):
  cfg = ml_collections.ConfigDict()
  cfg.job = "distill"
  cfg.out_dir = "out/distill"
  cfg.progress = True
  cfg.log_every = 10  # a metrics.jsonl line every this many trajectories (and one at the end)
  cfg.retry_failed = True  # a rerun runs again the attempts that ended on a failed request
  cfg.data = ml_collections.ConfigDict(dict(
      train_files=(),  # RL records (docs/training.md): JSON / JSONL / YAML
      limit=0,  # the first `limit` records only; 0 = all
      samples=1,  # trajectories per record (sampled at expert.temperature)
      synthetic_n=0,  # with no train_files: this many synthetic zoom videos (zoomer_jax/data/synthetic.py)
      synthetic_dir="out/distill_synthetic",
  ))
  cfg.expert = ml_collections.ConfigDict(dict(
      base_url="",  # "" -> $OPENAI_BASE_URL; requests go to {base_url}/chat/completions
      model="",  # "" -> $ZOOMER_EXPERT_MODEL
      api_key="",  # "" -> $OPENAI_API_KEY ("" there too: no Authorization header)
      timeout_s=120.0, max_retries=6, backoff_s=1.0, max_backoff_s=60.0,
      concurrency=8,  # requests in flight (one trajectory each)
      max_tokens=2048,  # per reply
      temperature=0.7,
      jpeg_quality=90,
  ))
  # ToolConfig fields (zoomer_jax/agent/protocol.py): the budgets and prompt our model is trained with.
  cfg.agent = ml_collections.ConfigDict(dict(
      max_generation_round=5, tool_call_max_frames=16, frames_upbound=64, video_fps=0.5, max_total_frames=128,
      system_prompt="system_prompt.txt", system_prompt_verbatim=False, last_round_hint=True, hint_separator="\n",
      tools=("zoom",),
  ))
  # The frames the expert sees: our model's input size (AgentConfig.max_pixels / min_pixels).
  cfg.frames = ml_collections.ConfigDict(dict(max_pixels=100352, min_pixels=25088, video_backend="auto"))
  cfg.accept = ml_collections.ConfigDict(dict(
      require_format=True,  # also the format reward's rule (think, then one call or the answer per turn)
      keep_tool_errors=False,  # False: a trajectory with a malformed or failed call is not an SFT example
  ))
  if arg == "synthetic":
    cfg.data.synthetic_n = 8
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of distill; known: 'synthetic'")
  return cfg
