"""load_hf fails clearly on a checkpoint that does not fit, naming the key and the shapes."""

import json
import os
import shutil

import numpy as np
import pytest

import hf_oracle as O
import zoomer_jax
from zoomer_jax.checkpoint.safetensors_io import SafetensorsFile, save_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt"))
  O.save_hf(O.make_hf_model(O.tiny_hf_config(layers=1, v_depth=2, fullatt=(1,)), seed=1), path)
  return path


def _edit(saved, tmp_path, change):
  """A copy of the checkpoint with its tensors dict passed through `change`."""
  out = str(tmp_path / "edited")
  shutil.copytree(saved, out)
  f = SafetensorsFile(os.path.join(out, "model.safetensors"))
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  change(tensors)
  save_file(tensors, os.path.join(out, "model.safetensors"))
  return out


def test_loads_clean(saved):
  model = zoomer_jax.load_hf(saved)
  assert model.config.text.num_hidden_layers == 1


def test_missing_tensor(saved, tmp_path):
  path = _edit(saved, tmp_path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
  with pytest.raises(zoomer_jax.CheckpointError, match=r"missing 1 tensors.*model\.layers\.0\.mlp\.up_proj"):
    zoomer_jax.load_hf(path)


def test_unexpected_tensor(saved, tmp_path):
  path = _edit(saved, tmp_path, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
  with pytest.raises(zoomer_jax.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
    zoomer_jax.load_hf(path)
  path2 = _edit(saved, tmp_path / "b", lambda t: t.update({"model.layers.5.input_layernorm.weight": np.ones(64, np.float32)}))
  with pytest.raises(zoomer_jax.CheckpointError, match=r"config has no such parameter"):
    zoomer_jax.load_hf(path2)


def test_shape_mismatch(saved, tmp_path):
  path = _edit(saved, tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
  with pytest.raises(zoomer_jax.CheckpointError, match=r"k_proj\.weight' has shape \[64, 64\].*needs \[32, 64\]"):
    zoomer_jax.load_hf(path)


def test_dtype_mismatch(saved, tmp_path):
  path = _edit(saved, tmp_path, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
  with pytest.raises(zoomer_jax.CheckpointError, match=r"'model\.norm\.weight' has dtype int32"):
    zoomer_jax.load_hf(path)


def test_unsupported_model_type_and_missing_paths(saved, tmp_path):
  out = str(tmp_path / "qwen2")
  shutil.copytree(saved, out)
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  cfg["model_type"] = "qwen2_vl"
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="unsupported model_type 'qwen2_vl'"):
    zoomer_jax.load_hf(out)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    zoomer_jax.load_hf(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(saved, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match="no .safetensors files"):
    zoomer_jax.load_hf(str(empty))
  (empty / "model.safetensors").write_bytes(b"garbage!")
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    zoomer_jax.load_hf(str(empty))


def test_key_table_round_trips(saved):
  """Every checkpoint tensor maps to a parameter and back to the same key and the same values."""
  from flax import nnx
  from zoomer_jax.checkpoint.hf_import import abstract_model
  from zoomer_jax.checkpoint.key_map import hf_to_nnx, nnx_to_hf
  from zoomer_jax.model.config import ModelConfig
  cfg = ModelConfig.from_hf_file(saved)
  shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.split(abstract_model(cfg))[1])}
  f = SafetensorsFile(os.path.join(saved, "model.safetensors"))
  for key in f.keys():
    path, transform = hf_to_nnx(key)
    assert nnx_to_hf(path) == (key, transform), key  # same key and the same transform both ways
    w = np.array(f.get(key))
    assert tuple(transform.hf_shape(shapes[path], cfg)) == w.shape, key
    assert np.array_equal(transform.to_hf(transform.to_nnx(w, shapes[path]), cfg), w), key
