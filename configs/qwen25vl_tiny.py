"""The built-in tiny Qwen2.5-VL (a 600-token vocabulary): random weights, CPU-sized.

Its vocabulary is that of `zoomer_jax.text.build_tiny_tokenizer()` (a byte-level BPE with the Qwen specials).

Used by the default job and the tests; it has the real architecture in miniature (window attention,
full-attention blocks, GQA, M-RoPE), so every code path of the 7B runs.
"""

import ml_collections

from zoomer_jax.config_loader import load


def get_config(arg=None):
  del arg
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
      text=dict(vocab_size=600, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                mrope_section=(4, 6, 6), tie_word_embeddings=False, max_position_embeddings=32768),
      vision=dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=128,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=112,
                  fullatt_block_indexes=(1, 3), tokens_per_second=2.0, rope_theta=10000.0, rms_norm_eps=1e-6),
      image_token_id=590, video_token_id=591, vision_start_token_id=592, vision_end_token_id=593,
      # Special ids of zoomer_jax.text.build_tiny_tokenizer (578-599): bos = pad = <|endoftext|>, eos = <|im_end|>.
      bos_token_id=578, eos_token_id=580, pad_token_id=578, position_rule="original",
  ))
  cfg.seed = 0
  # Unrolled layers and whole-matrix attention: on CPU, slicing stacked weights costs a copy per step, and the
  # dense path is the reference the tests compare against (ModelOptions).
  cfg.impl = ml_collections.ConfigDict(dict(scan_layers=False, attention="dot_product", attention_block=512,
                                            staged_gradients=False))
  cfg.rules = load("qwen25vl_7b").rules
  return cfg
