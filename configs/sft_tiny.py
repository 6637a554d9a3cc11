"""SFT of the built-in tiny model: every code path of sft_7b at CPU size (tests and the demo).

    python -m zoomer_jax train --config=sft_tiny --config.data.train_files='("/tmp/synth/sft.json",)'
"""

from zoomer_jax.config_loader import load


def get_config(arg=None):
  cfg = load("sft_7b")
  cfg.model = load("qwen25vl_tiny").model
  cfg.impl = load("qwen25vl_tiny").impl
  cfg.init.dtype = "float32"
  cfg.workdir = "/tmp/zoomer_jax/sft_tiny"
  cfg.mesh.ici = (2, -1, 1)
  cfg.data.update(dict(batch_size=4, micro_batch_size=2, cutoff_len=4096, token_bucket=128, image_bucket=8,
                       max_pixels=56 * 56, min_pixels=28 * 28))
  cfg.optim.update(dict(lr=1e-3, warmup_ratio=0.1))
  cfg.train.update(dict(freeze_vision_tower=False, logprob_vocab_chunk=256, logprob_token_chunk=0, total_steps=8))
  cfg.trainer.update(dict(save_freq=4))
  if arg:
    raise ValueError(f"sft_tiny takes no variant, got {arg!r}")
  return cfg
