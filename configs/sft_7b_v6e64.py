"""SFT cold start of Qwen2.5-VL-7B on a TPU v6e-64 slice (64 chips, 32 GB each): sft_7b with FSDP 16 x context 4.

    python -m zoomer_jax train --config=sft_7b_v6e64 --config.init.checkpoint=gs://bucket/Qwen2.5-VL-7B-Instruct ...
    python -m zoomer_jax compile --config=sft_7b_v6e64          # every program, compiled for v6e:8x8

The 16 sequences of a step are one micro-batch with a row per FSDP shard, and each row's tokens are split four
ways over the mesh's third axis (context parallelism, `zoomer_jax.parallel.rules.CONTEXT_PARALLEL`): the decoder's
weights are sharded over all 64 chips and gathered per layer, each chip runs every layer on its quarter of the
tokens, and attention gathers the (GQA: 7x smaller) keys and values. Splitting heads and MLP width four ways
instead (tensor parallelism) moves the residual stream between chips twice per layer and pass.
"""

from zoomer_jax.config_loader import load
from zoomer_jax.parallel.rules import CONTEXT_PARALLEL


def get_config(arg=None):
  if arg:
    raise ValueError(f"sft_7b_v6e64 takes no variant, got {arg!r}")
  cfg = load("sft_7b")
  cfg.accelerator_type = "v6e-64"
  cfg.workdir = "/tmp/zoomer_jax/sft_7b_v6e64"
  cfg.mesh.ici = (1, 16, 4)
  cfg.mesh.rules = CONTEXT_PARALLEL + tuple(cfg.mesh.rules)
  # A 32 GB chip cannot keep every matmul output of a row's 8k tokens per chip (sft_7b's save_dots: ~23 GB);
  # it keeps the attention kernel's inputs and outputs (the backward runs no attention forward again) and each
  # layer's MLP weights as the forward gathered them (the backward gathers only the attention's again), and the
  # weight gradients are reduce-scattered over fsdp, then over tensor, where XLA's v6e compiler would all-reduce
  # them over all 64 chips: the collectives FSDP needs fall from 149 to 96 ms per step (docs/tpu.md).
  cfg.train.remat = "save_attention_mlp_weights"
  cfg.impl.staged_gradients = True
  # Splash tiles of 1024 (MaxText's v6e recipes run large tiles); 2048 outgrows the kernel's 32 MiB of VMEM.
  cfg.impl.attention_block = 1024
  return cfg
