"""Reflection data: run a checkpoint on training tasks, have an expert correct its failed trajectories, keep the
verified corrections as SFT records marked "reflection" (zoomer_jax/data/reflect.py, docs/distill.md).

    OPENAI_BASE_URL=http://localhost:8000/v1 ZOOMER_EXPERT_MODEL=Qwen/Qwen2.5-VL-72B-Instruct \
        python -m zoomer_jax reflect --config=reflect --config.checkpoint=/ckpt/sft_export \
        --config.data.train_files='("/data/train.json",)'

Variants: `tiny` runs the built-in tiny random model (its trajectories are noise, so all fail: tests and smoke
runs). Every field of configs/distill.py applies (expert, agent, accept, data, outputs); the model and rollout
fields are configs/eval_7b.py's.
"""

import ml_collections

from zoomer_jax.config_loader import load


def get_config(arg=None):
  cfg = load("distill")
  cfg.job = "reflect"
  cfg.out_dir = "out/reflect"
  del cfg.frames  # the rollout's max_pixels / min_pixels / video_backend size the expert's frames too
  model = load("eval_7b")
  cfg.checkpoint = "/ckpt/VideoZoomer-SFT"  # an HF Qwen2.5-VL directory with tokenizer files; "" = random `model`
  for key in ("model", "impl", "dtype", "seed", "mesh", "rollout", "engine"):
    cfg[key] = model[key]
  cfg.reflect = ml_collections.ConfigDict(dict(
      batch_size=8,  # trajectories our model decodes together
      temperature=1.0,  # our model's sampling (0: greedy); failures of a sampled policy are what GRPO would see
      reveal_answer=False,  # True: the expert is told the correct answer (the module docstring says why not)
      prompt="reflect_prompt.txt",  # in zoomer_jax/agent/prompts/, or a path
  ))
  if arg == "tiny":
    tiny = load("eval_tiny")
    cfg.checkpoint = ""
    for key in ("model", "impl", "dtype", "rollout"):
      cfg[key] = tiny[key]
    cfg.agent.update(dict(max_generation_round=3))
    cfg.reflect.batch_size = 4
    cfg.data.synthetic_n = 4
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of reflect; known: 'tiny'")
  return cfg
