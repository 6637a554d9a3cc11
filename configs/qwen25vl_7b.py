"""Qwen2.5-VL-7B-Instruct architecture (the hub config.json).

    cfg = zoomer_jax.configs.load("configs/qwen25vl_7b.py")
    model_cfg = zoomer_jax.ModelConfig.from_config_dict(cfg.model)
"""

import ml_collections


def get_config(arg=None):
  del arg
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
      text=dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, intermediate_size=18944, rms_norm_eps=1e-6, rope_theta=1000000.0,
                mrope_section=(16, 24, 24), tie_word_embeddings=False, max_position_embeddings=128000),
      vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=112,
                  fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2.0, rope_theta=10000.0,
                  rms_norm_eps=1e-6),
      image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
      vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
      position_rule="original",
  ))
  cfg.seed = 0  # the random weights of `python -m zoomer_jax forward|infer` without a checkpoint
  # How the model computes (zoomer_jax.model.options.ModelOptions): stacked layers run by lax.scan (compile time
  # independent of depth) and flash attention (splash on TPU, in tiles of attention_block tokens; blockwise over
  # the KV cache elsewhere); staged_gradients reduces each layer's weight gradients one mesh axis at a time.
  cfg.impl = ml_collections.ConfigDict(dict(scan_layers=True, attention="flash", attention_block=512,
                                            staged_gradients=False))
  # Logical axis -> mesh axes (data, fsdp, tensor), for parameters and activations; the first rule naming an axis
  # wins, and an axis a mesh dimension does not divide stays replicated. FSDP over the embedding-like widths,
  # tensor parallelism over heads, MLP width and vocabulary (MaxText's layout).
  cfg.rules = (
      ("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
      ("q_heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None),
      ("vision_patch", None), ("vision_embed", "fsdp"), ("vision_mlp", "tensor"), ("vision_heads", "tensor"),
      ("vision_merged", "fsdp"), ("vision_merged_out", "tensor"), ("vision_pieces", None), ("layers", None),
      ("activation_batch", ("data", "fsdp")), ("activation_length", None), ("activation_norm_length", None),
      ("activation_embed", None),
      ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"), ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"), ("cache_batch", ("data", "fsdp")), ("cache_kv_heads", "tensor"),
  )
  return cfg
