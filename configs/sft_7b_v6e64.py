"""SFT cold start of Qwen2.5-VL-7B on a TPU v6e-64 slice (64 chips, 32 GB each): sft_7b with FSDP 16 x tensor 4.

    python -m zoomer_jax train --config=sft_7b_v6e64 --config.init.checkpoint=gs://bucket/Qwen2.5-VL-7B-Instruct ...
    python -m zoomer_jax compile --config=sft_7b_v6e64          # every program, compiled for v6e:8x8

The 16 sequences of a step are one micro-batch with a row per FSDP shard; tensor 4 splits heads (28 -> 7, kv 4
-> 1), MLP width, vocabulary and the vision tower's heads and MLP four ways, which a 32 GB chip needs at 32k tokens
per row (grpo_7b_v6e64 uses the same layout).
"""

from zoomer_jax.config_loader import load


def get_config(arg=None):
  if arg:
    raise ValueError(f"sft_7b_v6e64 takes no variant, got {arg!r}")
  cfg = load("sft_7b")
  cfg.accelerator_type = "v6e-64"
  cfg.workdir = "/tmp/zoomer_jax/sft_7b_v6e64"
  cfg.mesh.ici = (1, 16, 4)
  # Sequence parallelism: the residual stream between layers is split over the tensor axis too (grpo_7b_v6e64).
  cfg.mesh.rules = (("activation_norm_length", "tensor"),) + tuple(cfg.mesh.rules)
  cfg.train.remat = "full"  # a 32 GB chip cannot keep every matmul output of a 32k-token row (sft_7b's save_dots)
  return cfg
