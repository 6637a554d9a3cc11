"""GRPO of Qwen2.5-VL-7B on a TPU v6e-64 slice: grpo_7b with the mesh and batch sizes for 64 chips.

    python -m zoomer_jax train --config=grpo_7b_v6e64 --config.init.checkpoint=gs://bucket/videozoomer-sft ...
    PYTHONPATH=. python bench/bench_step_cost.py grpo_7b_v6e64      # the account behind the numbers below

v6e (Trillium) accelerator names count chips: v6e-64 is 64 chips (topology 8x8), each with 32 GB of HBM,
918 bf16 TFLOP/s and 1638 GB/s (cloud.google.com/tpu/docs/v6e). Numbers below are from `zoomer_jax.cost`
with its default assumptions (fp32 Adam moments, a blockwise attention kernel, vision blocks rematerialised
like the decoder layers, 10% HBM headroom: 28.8 GB usable) and its expected trajectory (64 overview frames +
2 zoom calls x 16 frames at 120 tokens each, 3 turns x 512 generated tokens: ~14.7k tokens, 96 images).
"""

from zoomer_jax.config_loader import load
from zoomer_jax.parallel.rules import CONTEXT_PARALLEL


def get_config(arg=None):
  if arg:
    raise ValueError(f"grpo_7b_v6e64 takes no variant, got {arg!r}")
  cfg = load("grpo_7b")
  cfg.accelerator_type = "v6e-64"
  cfg.workdir = "/tmp/zoomer_jax/grpo_7b_v6e64"
  # Mesh: FSDP 16 x 4 (one slice, no DCN). With 32 GB per chip the limit is activations, not state (the ~150 GB
  # of parameters, fp32 moments, accumulator and reference copy are 2.2 GiB per chip at 64 shards): pure FSDP
  # (1, 64, 1) puts a whole 32k-token trajectory on each chip (37.5 GB update peak, over the 28.8 GB budget).
  # Training splits each row's tokens over the third axis (context parallelism, as sft_7b_v6e64: the decoder's
  # weights sharded over all 64 chips, attention gathering the GQA keys and values), which moves less over ICI
  # than splitting heads and MLP width (tensor parallelism: the residual stream all-reduced twice per layer and
  # pass). docs/tpu.md has both layouts' compiled figures.
  cfg.mesh.ici = (1, 16, 4)
  cfg.mesh.dcn = (1, 1, 1)
  cfg.mesh.rules = CONTEXT_PARALLEL + tuple(cfg.mesh.rules)
  # Batch: the released recipe (docs/training.md): 128 prompts x 16 = 2048 trajectories per RL step, mini-batches
  # of 32 prompts (512 trajectories) = 4 optimizer steps.
  cfg.data.train_batch_size = 128
  cfg.rollout.n = 16
  cfg.actor.ppo_mini_batch_size = 32
  # Micro-batch: rows are sharded over (data, fsdp) = 16, one trajectory per group of 4 chips, its tokens
  # split four ways (the worst row: 32768 tokens, 128 images).
  cfg.actor.ppo_micro_batch_size = 16
  cfg.actor.max_token_len = 32768
  # Old and reference log-probs four trajectories per group of 4 chips (a forward keeps far less than an update:
  # 6.6 GiB per chip): each call gathers the FSDP weights once for four times the rows (docs/tpu.md).
  cfg.actor.logprob_micro_batch_size = 64
  # The attention kernel's inputs and outputs kept, and each decoder layer's MLP up projection (as sft_7b_v6e64):
  # the backward then recomputes the gate projection only, and the update still leaves >10% of HBM (docs/tpu.md).
  cfg.actor.remat = "save_attention_up"
  # Weight gradients reduce-scattered over fsdp, then over tensor (XLA's v6e compiler would all-reduce them over
  # all 64 chips): the update's collectives fall from 158.7 to 135.5 ms per call (docs/tpu.md). The kept MLP
  # weights that sft_7b_v6e64 adds do not fit beside this update's 27 GiB.
  cfg.impl.staged_gradients = True
  cfg.impl.attention_block = 1024  # splash tiles, as sft_7b_v6e64
  # Log-probs in 4096-wide vocabulary chunks: 3 fp32 [32768, 4096] buffers = 1.5 GiB (16384 would be 6 GiB,
  # full logits 56 GiB -- more than the chip).
  cfg.actor.logprob_vocab_chunk = 4096
  # Rollout: a bf16 copy of the weights per group of 4 chips, tensor-parallel (its own rules table: heads, MLP
  # width and vocabulary split four ways, 3.9 GiB per chip, kv heads 1 per chip; the residual stream split over
  # the group between layers), resharded once per step. 160 trajectories in flight = 10 per group (the
  # lockstep engine: KV caches of 43008 slots, 5.7 GiB per chip, + prefill activations -> 23.5 GiB rollout peak;
  # 176 would reach 27.2 GB).
  cfg.rollout.batch_size = 160
  # The continuous engine (one per group of 4 chips): 64 trajectories in flight each, in a pool of 72,000 pages
  # (1.5x their mean context's pages; the worst case, every one at its longest, is 3.5x the mean): a decode
  # burst then streams the weights for 64 rows at once. Sequences that outgrow the pool are preempted and
  # recompute (docs/rollout_engine.md, "Memory"); docs/tpu.md has the compiled figures.
  cfg.rollout.max_running = 1024
  cfg.rollout.pool_pages = 72000
  cfg.rollout.mesh.ici = (16, 1, 4)
  cfg.rollout.mesh.rules = (("activation_norm_length", "tensor"),) + tuple(load("qwen25vl_7b").rules)
  # Expected step (matmuls at 60% of peak, decode at 70% of HBM bandwidth, lock-step turns lasting 4x the
  # mean turn): ~817 s, of which decode ~678 s, update ~80 s, old + reference log-probs ~43 s, prefill ~16 s;
  # model FLOPs ~3.8 EFLOP per step -> MFU ~8% (~41% in the update alone). Decode dominates: v6e has 4x
  # v5p-64's FLOP/s here but only 1.2x its total HBM bandwidth.
  return cfg
