"""GRPO of Qwen2.5-VL-7B on a TPU v5p-64 slice: grpo_7b with the mesh and batch sizes for 32 chips.

    python -m zoomer_jax train --config=grpo_7b_v5p64 --config.init.checkpoint=gs://bucket/videozoomer-sft ...
    PYTHONPATH=. python bench/bench_step_cost.py grpo_7b_v5p64      # the account behind the numbers below

v5p accelerator names count TensorCores (2 per chip): v5p-64 is 32 chips (topology 2x4x4, 8 hosts), each with
95 GB of HBM, 459 bf16 TFLOP/s and 2765 GB/s (cloud.google.com/tpu/docs/v5p). Numbers below are from
`zoomer_jax.cost` with its default assumptions (fp32 Adam moments, a blockwise attention kernel, vision blocks
rematerialised like the decoder layers, 10% HBM headroom) and its expected trajectory (64 overview frames +
2 zoom calls x 16 frames at 120 tokens each, 3 turns x 512 generated tokens: ~14.7k tokens, 96 images).
"""

from zoomer_jax.config_loader import load


def get_config(arg=None):
  if arg:
    raise ValueError(f"grpo_7b_v5p64 takes no variant, got {arg!r}")
  cfg = load("grpo_7b")
  cfg.accelerator_type = "v5p-64"
  cfg.workdir = "/tmp/zoomer_jax/grpo_7b_v5p64"
  # Mesh: pure FSDP over the 32 chips of the slice (one slice, no DCN).
  #  * The 8.29B parameters with their training state (bf16 params, fp32 m and v, fp32 gradient accumulator,
  #    bf16 reference copy) are ~150 GB in all: 4.3 GiB per chip when sharded 32 ways, so no tensor parallelism
  #    is needed to hold them, and without it there are no per-layer activation all-reduces.
  #  * FSDP traffic is ~48 GB received per chip per micro-batch (weights gathered for the forward and again
  #    for the backward, gradients reduce-scattered): ~0.13 s at 60% of the 600 GB/s receive bandwidth,
  #    against ~5.4 s of compute per micro-batch, so it hides behind compute (update: compute 346 s, ICI 9 s).
  #  * embed 3584, vision 1280 and merger 5120 widths all divide by 32, so every large matrix shards evenly.
  cfg.mesh.ici = (1, 32, 1)
  cfg.mesh.dcn = (1, 1, 1)
  # Batch: the released recipe (docs/training.md): 128 prompts x 16 = 2048 trajectories per RL step, mini-batches
  # of 32 prompts (512 trajectories) = 4 optimizer steps.
  cfg.data.train_batch_size = 128
  cfg.rollout.n = 16
  cfg.actor.ppo_mini_batch_size = 32
  # Micro-batch: rows are sharded over (data, fsdp) = 32, so one trajectory per chip per forward/backward
  # (a smaller global micro-batch would leave chips idle). Sized for the worst row the config allows
  # (max_token_len 32768 tokens, 128 images of up to 130 tokens). At 32k tokens per row the step is already
  # compute-bound: a second row per chip buys nothing.
  cfg.actor.ppo_micro_batch_size = 32
  cfg.actor.max_token_len = 32768
  # Remat keeps each layer's input and the attention kernel's inputs and outputs (the backward runs no attention
  # forward again): the update needs 55.3 GiB per chip by XLA (37.3 with "full") and is 7% faster (docs/tpu.md).
  cfg.actor.remat = "save_attention"
  # Log-probs in 16384-wide vocabulary chunks: 3 fp32 [32768, 16384] buffers = 6 GiB, against 56 GiB for
  # full [32768, 152064] logits.
  cfg.actor.logprob_vocab_chunk = 16384
  # Rollout: sampling from a bf16 copy of the weights on every chip (15.4 GiB, resharded once per step in
  # ~0.05 s). A decode step streams those weights plus the KV cache it reads, so rows per chip amortise the
  # weights: 320 trajectories per device call = 10 per chip, each with a 43008-slot cache (2.3 GiB; the
  # agent sizes it for every round at its limits) and ~2.8 GiB of prefill activations -> 69.5 GiB rollout
  # peak. 2048 trajectories take 7 such calls (the last padded), ~12 ms per decode step.
  cfg.rollout.batch_size = 320
  # The continuous engine (one per chip): 32 trajectories in flight each, in a pool of 36,000 pages (1.5x their
  # mean context's pages; the worst case is 3.5x the mean). Preemption covers those that outgrow it
  # (docs/rollout_engine.md, "Memory"); docs/tpu.md has the compiled figures.
  cfg.rollout.max_running = 1024
  cfg.rollout.pool_pages = 36000
  # Expected step (matmuls at 60% of peak, decode at 70% of HBM bandwidth, lock-step turns lasting 4x the
  # mean turn): ~1450 s, of which decode ~865 s, update ~346 s, old + reference log-probs ~173 s, prefill
  # ~62 s; model FLOPs ~3.8 EFLOP per step -> MFU ~18% (~38% in the update alone).
  return cfg
