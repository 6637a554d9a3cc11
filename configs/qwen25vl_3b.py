"""Qwen2.5-VL-3B-Instruct architecture (the hub's config.json): the 7B with a smaller, tied decoder."""

import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "qwen25vl_7b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen25vl_7b.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  cfg = base.get_config(arg)
  cfg.model.text.update(dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                             num_key_value_heads=2, intermediate_size=11008, tie_word_embeddings=True))
  cfg.model.vision.out_hidden_size = 2048
  return cfg
