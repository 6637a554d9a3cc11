"""GRPO of Qwen2.5-VL-7B with the zoom tool: the released VideoZoomer recipe (docs/training.md), verl's names.

    python -m zoomer_jax train --config=grpo_7b --config.init.checkpoint=/ckpt/videozoomer-sft \
        --config.data.train_files='("/data/train.json",)' --config.workdir=gs://bucket/runs/grpo

`get_config("runlocal")` shrinks batch, group and lengths to something a laptop finishes (the model stays 7B).
Fields are grouped as verl groups them: data, rollout (actor_rollout_ref.rollout), actor
(actor_rollout_ref.actor), algorithm, reward (reward_model), trainer. Every field can be overridden with
`--config.a.b=value`; a misspelt key fails and names the closest valid ones.
"""

import ml_collections

from zoomer_jax.config_loader import load


def get_config(arg=None):
  cfg = ml_collections.ConfigDict()
  cfg.job = "grpo"
  cfg.model = load("qwen25vl_7b").model
  cfg.impl = load("qwen25vl_7b").impl  # how the model computes (scanned layers, attention kernel)
  cfg.init = ml_collections.ConfigDict(dict(
      checkpoint="",  # an HF directory (the SFT cold-start model); "" = random weights (tiny configs only)
      dtype="bfloat16",  # compute dtype (activations and the forward's weights); matmuls accumulate in fp32
      param_dtype="float32",  # master weights and Adam moments (lr 1e-6 steps vanish in bf16)
  ))
  cfg.workdir = "/tmp/zoomer_jax/grpo_7b"  # checkpoints, metrics.jsonl, TensorBoard events; resumed if present
  cfg.seed = 0
  cfg.accelerator_type = ""  # e.g. "v5p-64": the TPU slice the cost account (zoomer_jax.cost) sizes for
  # (data, fsdp, tensor) degrees; -1 fills with the devices left. ICI is within a slice, DCN across slices.
  cfg.mesh = ml_collections.ConfigDict(dict(ici=(1, -1, 1), dcn=(1, 1, 1), rules=load("qwen25vl_7b").rules))

  cfg.data = ml_collections.ConfigDict(dict(
      train_files=(),  # the original's RL JSON / JSONL / YAML (data/records.py), or a TFDS dir via tfds_dir
      val_files=(),
      tfds_dir="",  # where the array_record TFDS copy of the files is built (default: workdir/tfds)
      train_batch_size=128,  # prompts per RL step (data.train_batch_size)
      shuffle=True,
      seed=0,
  ))
  cfg.rollout = ml_collections.ConfigDict(dict(
      n=16,  # trajectories per prompt (the GRPO group)
      temperature=1.0, top_p=1.0, top_k=-1,
      response_length=4096,  # new tokens per turn
      # ToolConfig fields (zoomer_jax/agent/protocol.py)
      max_generation_round=5, tool_call_max_frames=16, max_total_frames=128, video_fps=0.5, frames_upbound=64,
      system_prompt="system_prompt.txt", system_prompt_verbatim=False, last_round_hint=True, hint_separator="\n",
      tools=("zoom",),  # the enabled tools (zoomer_jax/tools): ("zoom", "crop") adds the spatial crop
      max_pixels=100352, min_pixels=25088,
      decode_chunk=64, batch_size=64,  # trajectories in flight (the lockstep engine: decoded together)
      # "continuous" (agent/engine.py: batch_size trajectories in flight over a paged cache of page_size-token
      # pages, step_tokens tokens per device step; docs/rollout_engine.md) or "lockstep" (agent/rollout.py:
      # batches of batch_size in lockstep over a dense cache, decode_chunk tokens per device call; the baseline)
      engine="continuous", page_size=16, step_tokens=512,
      decode_burst=16,  # continuous: tokens per device call when every running sequence only decodes
      # continuous: pages of each engine's pool; 0 holds every trajectory in flight at its longest. Fewer runs more
      # in flight on the same memory: a sequence short of pages preempts later ones, which recompute their prefix.
      pool_pages=0,
      # continuous: trajectories in flight (0: batch_size). With a pool under the worst case, more than the
      # lockstep engine's batch fit in the same memory.
      max_running=0,
      workers=16,  # host threads for frame extraction
      # The sampler's layout (data, fsdp, tensor degrees as in `mesh`): its weights are resharded into it once
      # per RL step. ici=() samples with the training layout. rules: the sampler's own logical-axis rules table
      # (a tensor-parallel sampler beside context-parallel training); () takes `mesh.rules`.
      mesh=dict(ici=(-1, 1, 1), dcn=(1, 1, 1), rules=()),
  ))
  cfg.actor = ml_collections.ConfigDict(dict(
      optim=dict(lr=1e-6, lr_scheduler="constant", warmup_ratio=0.0, warmup_steps=0, min_lr_ratio=0.0,
                 betas=(0.9, 0.999), weight_decay=0.01, grad_clip=1.0),
      ppo_mini_batch_size=32,  # prompts per optimizer step (x n trajectories)
      ppo_micro_batch_size=1,  # trajectories per forward/backward (gradient accumulation inside a mini-batch)
      # trajectories per old/reference log-prob forward (verl's log_prob_micro_batch_size): a multiple of
      # ppo_micro_batch_size, as a forward keeps less than an update; 0 = ppo_micro_batch_size
      logprob_micro_batch_size=0,
      ppo_epochs=1,
      clip_ratio_low=0.2, clip_ratio_high=0.27,
      loss_agg_mode="seq-mean-token-mean",
      use_kl_loss=True, kl_loss_coef=0.001, kl_loss_type="low_var_kl",
      entropy_coeff=0.001,
      tis_cap=0.0,  # truncated importance sampling against the sampler's log-probs; 0 = off
      freeze_vision_tower=False,
      # "none" | "full" (recompute each decoder layer in the backward pass) | "save_dots" (keep its matmul
      # outputs) | "save_attention" (keep the attention kernel's inputs and outputs) | "save_attention_up" (and
      # the MLP's up projection) | "save_attention_mlp_weights" (and the MLP's gathered weights, with
      # impl.staged_gradients): model.stack.REMAT_POLICIES
      remat="full",
      logprob_vocab_chunk=16384,  # log-probs and entropy over vocabulary chunks; 0 = full logits
      logprob_token_chunk=4096,  # ... and over blocks of this many tokens; 0 = all tokens at once
      max_token_len=32768,  # the longest trajectory the cost account sizes a micro-batch for (not enforced)
      token_bucket=1024,  # micro-batches are padded to a multiple of this many tokens
      image_bucket=8,  # and of this many images
  ))
  cfg.algorithm = ml_collections.ConfigDict(dict(
      adv_estimator="grpo",  # "grpo" | "rloo" (zoomer_jax.train.grpo_loss.ADVANTAGE_ESTIMATORS)
      norm_adv_by_std_in_grpo=True,  # False: Dr.GRPO (r - mean, no division by the std)
      rejection_sample=True,  # dynamic sampling: drop groups whose rewards are all equal, keep generating
      max_num_gen_batches=256,
  ))
  # RewardConfig fields (zoomer_jax/agent/rewards.py, which documents each); tool_call_max_frames and tools are
  # the rollout's.
  cfg.reward = ml_collections.ConfigDict(dict(
      acc_reward_weight=0.9, format_reward_weight=0.1,
      tool_call_penalty=0.0, target_tool_call_rate=1.0,  # the authors' internal run: -0.5 and 0.5
      penalize_mode="correct", penalty_per_turn=0.0, tool_call_frame_target=0, tool_call_frame_num_penalty=0.0,
      forced_tool_call=False, letter_pattern=r"([A-Z])\.", count_failed_calls=True,
      float_penalty=False, start_penalty=0.0, end_penalty=0.0, anneal_steps=0,
  ))
  cfg.trainer = ml_collections.ConfigDict(dict(
      total_steps=200, save_freq=10, max_to_keep=3, test_freq=5, log_freq=1, tensorboard=True, progress=True,
  ))
  if arg == "runlocal":
    cfg.data.train_batch_size, cfg.rollout.n = 2, 4
    cfg.rollout.response_length, cfg.rollout.batch_size = 256, 8
    cfg.actor.ppo_mini_batch_size = 2
    cfg.trainer.total_steps = 2
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of grpo_7b; known: 'runlocal'")
  return cfg
