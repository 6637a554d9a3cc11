"""GRPO of the built-in tiny model: every code path of grpo_7b at CPU size (tests and the demo).

    python -m zoomer_jax train --config=grpo_tiny --config.data.train_files='("/tmp/synth/train.json",)'
"""

from zoomer_jax.config_loader import load


def get_config(arg=None):
  cfg = load("grpo_7b")
  cfg.model = load("qwen25vl_tiny").model
  cfg.impl = load("qwen25vl_tiny").impl
  cfg.init.dtype = "float32"
  cfg.workdir = "/tmp/zoomer_jax/grpo_tiny"
  cfg.mesh.ici = (2, -1, 1)
  cfg.data.train_batch_size = 4
  cfg.rollout.update(dict(n=4, response_length=48, max_generation_round=3, batch_size=16, workers=4,
                          max_pixels=56 * 56, min_pixels=28 * 28))
  cfg.actor.update(dict(ppo_mini_batch_size=2, ppo_micro_batch_size=4, logprob_vocab_chunk=256, logprob_token_chunk=0,
                        max_token_len=8192, token_bucket=128))
  cfg.actor.optim.lr = 1e-4
  cfg.algorithm.max_num_gen_batches = 4
  cfg.trainer.update(dict(total_steps=4, save_freq=2, test_freq=0))
  if arg:
    raise ValueError(f"grpo_tiny takes no variant, got {arg!r}")
  return cfg
