"""Model configs: HF config.json in both layouts, presets, overrides, and clear errors."""

import json

import jax
import numpy as np
import pytest

import hf_oracle as O
from zoomer_jax import ModelConfig
from zoomer_jax.checkpoint.hf_import import abstract_model
from zoomer_jax.config_loader import load


def _n_params(cfg: ModelConfig) -> int:
  from flax import nnx
  _, state = nnx.split(abstract_model(cfg))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name, count", [("qwen25vl_7b", 8_292_166_656), ("qwen25vl_3b", 3_754_622_976)])
def test_presets_have_the_released_parameter_counts(name, count):
  """Counts from instantiating transformers' model on the meta device."""
  cfg = ModelConfig.from_config_dict(load(name).model.to_dict())
  assert _n_params(cfg) == count


def test_flat_and_nested_layouts_parse_the_same():
  flat = ModelConfig.from_hf_dict(O.tiny_hf_config(layout="flat", tie=True))
  nested = ModelConfig.from_hf_dict(O.tiny_hf_config(layout="nested", tie=True))
  assert flat == nested
  assert flat.text.tie_word_embeddings and flat.text.mrope_section == (2, 3, 3)
  assert flat.vision.in_channels == 3 and flat.vision.patch_size == 14


def test_hub_7b_config_parses_to_the_preset():
  hub = {  # the fields of Qwen/Qwen2.5-VL-7B-Instruct's config.json (flat hub layout)
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
      "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
      "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
      "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
      "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
      "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                        "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
  }
  parsed = ModelConfig.from_hf_dict(hub)
  preset = ModelConfig.from_config_dict(load("qwen25vl_7b").model.to_dict())
  assert parsed.text == preset.text and parsed.vision == preset.vision


def test_to_hf_dict_round_trips():
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config())
  assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(model_type="qwen2_vl"), "unsupported model_type 'qwen2_vl'"),
    (lambda d: d["text_config"].pop("hidden_size"), "no text field 'hidden_size'"),
    (lambda d: d["text_config"]["rope_parameters"].pop("mrope_section"), "no mrope_section"),
    (lambda d: d["text_config"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (lambda d: d.pop("vision_config"), "no vision_config"),
])
def test_bad_configs_fail_naming_the_problem(mutate, message):
  d = O.tiny_hf_config()
  mutate(d)
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    ModelConfig.from_hf_dict(d)


def test_overrides_and_typos():
  cfg = load("qwen25vl_tiny", ["model.text.num_hidden_layers=3", "--config.model.position_rule=hf_5.23"])
  assert cfg.model.text.num_hidden_layers == 3 and cfg.model.position_rule == "hf_5.23"
  with pytest.raises(KeyError, match="did you mean"):
    load("qwen25vl_tiny", ["model.text.num_hidden_layer=3"])
  with pytest.raises(ValueError, match="position_rule"):
    ModelConfig.from_config_dict(load("qwen25vl_tiny", ["model.position_rule=hf_9"]).model.to_dict())
