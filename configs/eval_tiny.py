"""Evaluate the built-in tiny random model on locally generated videos: every code path of eval_7b at CPU size.

    python -m zoomer_jax eval --config=eval_tiny
    python -m zoomer_jax eval --config=eval_tiny --config.use_tool=False --config.benchmark.synthetic_n=8

The benchmark is the built-in synthetic zoom task (`zoomer_jax/data/synthetic.py`): `synthetic_n` short videos
are generated under `benchmark.video_root` (kept there for later runs) with questions in VideoZoomer's JSON format.
The random model's turns are noise, so its accuracy is chance or below: the run shows the machinery. Any other
benchmark works too, e.g. `--config.benchmark.name=lvbench --config.benchmark.annotation=... ...video_root=...`.
Every override of eval_7b applies.
"""

from zoomer_jax.config_loader import load


def get_config(arg=None):
  if arg:
    raise ValueError(f"eval_tiny takes no variant, got {arg!r}")
  cfg = load("eval_7b")
  cfg.checkpoint = ""
  cfg.model = load("qwen25vl_tiny").model
  cfg.impl = load("qwen25vl_tiny").impl
  cfg.dtype = "float32"
  cfg.benchmark.update(dict(name="synthetic", annotation="", video_root="out/eval_tiny/synthetic", synthetic_n=4,
                            options=dict(open_ended="error")))
  cfg.agent.update(dict(max_generation_round=3, system_prompt="system_prompt.txt"))
  cfg.rollout.update(dict(max_new_tokens=32, decode_chunk=16, max_pixels=56 * 56, min_pixels=56 * 56, workers=2))
  cfg.batch_size = 4
  cfg.out_dir = "out/eval_tiny"
  return cfg
