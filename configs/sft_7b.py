"""SFT cold start of Qwen2.5-VL-7B on tool-using trajectories: the original's LLaMA-Factory recipe (docs/training.md).

    python -m zoomer_jax train --config=sft_7b --config.init.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.data.train_files='("/data/videozoomer_sft.json",)' --config.workdir=gs://bucket/runs/sft

Loss only on assistant tokens; vision tower frozen; lr 5e-6 with 10% warmup then cosine; one epoch; 16 sequences
per optimizer step, as the original (1 per GPU x 2 accumulation x 8 GPUs).

Sized for a TPU v5p-64 (32 chips; `python -m zoomer_jax compile --config=sft_7b` checks it): FSDP 16 x tensor 2,
so that the 16 sequences of a step are one micro-batch with a row on every FSDP shard and no chip idles, and the
tensor axis splits heads, MLP width and vocabulary in two. configs/sft_7b_v6e64.py is the v6e-64 layout.
"""

import ml_collections

from zoomer_jax.config_loader import load


def get_config(arg=None):
  cfg = ml_collections.ConfigDict()
  cfg.job = "sft"
  cfg.model = load("qwen25vl_7b").model
  cfg.impl = load("qwen25vl_7b").impl  # how the model computes (scanned layers, attention kernel)
  cfg.init = ml_collections.ConfigDict(dict(checkpoint="", dtype="bfloat16", param_dtype="float32"))
  cfg.workdir = "/tmp/zoomer_jax/sft_7b"
  cfg.seed = 0
  cfg.accelerator_type = "v5p-64"  # the TPU slice `compile` and the cost account (zoomer_jax.cost) size for
  cfg.mesh = ml_collections.ConfigDict(dict(ici=(1, -1, 2), dcn=(1, 1, 1), rules=load("qwen25vl_7b").rules))
  cfg.data = ml_collections.ConfigDict(dict(
      train_files=(),  # SFT records (docs/training.md): {"messages": [...], "images": [...]}, JSON / JSONL / YAML
      # Reflection records (`python -m zoomer_jax reflect`, docs/distill.md) mixed into train_files' so that they
      # are this fraction of the training records (zoomer_jax/data/mixture.py); both or neither.
      reflection_files=(), reflection_ratio=0.0,
      tfds_dir="",  # where the array_record TFDS copy of the files is built (default: workdir/tfds)
      batch_size=16,  # sequences per optimizer step (global), split into micro-batches
      micro_batch_size=16,  # sequences per forward/backward (one per batch shard); batch_size / micro_batch_size
                            # = grad accumulation
      cutoff_len=32768,  # longer sequences are truncated (LLaMA-Factory cutoff_len)
      token_bucket=1024,  # sequence lengths are padded up to a multiple of this (few compiled shapes)
      image_bucket=16,  # and image counts to a multiple of this
      max_pixels=100352, min_pixels=25088,
      shuffle=True, seed=0, num_epochs=1,
      workers=4,  # threads that tokenise records and read their images
  ))
  cfg.optim = ml_collections.ConfigDict(dict(
      lr=5e-6, lr_scheduler="cosine", warmup_ratio=0.1, warmup_steps=0, min_lr_ratio=0.0,
      betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0,
  ))
  cfg.train = ml_collections.ConfigDict(dict(
      freeze_vision_tower=True,
      # Keep every matmul output for the backward ("save_dots"): on v5p-64 a row's 32k tokens keep 55 GiB and
      # the step skips the recompute of the projections and MLP ("full": recompute each layer, 18 GiB less).
      remat="save_dots",
      logprob_vocab_chunk=16384,
      logprob_token_chunk=4096,
      total_steps=0,  # 0: one pass over the data (num_epochs)
  ))
  cfg.trainer = ml_collections.ConfigDict(dict(
      save_freq=200, max_to_keep=3, log_freq=1, tensorboard=True, progress=True,
  ))
  if arg == "runlocal":
    cfg.data.batch_size, cfg.data.cutoff_len = 2, 4096
    cfg.train.total_steps = 2
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of sft_7b; known: 'runlocal'")
  return cfg
