"""`export_hf`: transformers loads what we write, import -> export -> import is bit-exact, dtypes kept."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLForConditionalGeneration

import hf_oracle as O
import tolerances as tol
import zoomer_jax
from zoomer_jax.checkpoint.safetensors_io import SafetensorsFile, checkpoint_files
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.parallel.mesh import make_mesh

TOKENIZER_FILES = {"tokenizer.json": '{"fake": "tokenizer"}', "tokenizer_config.json": '{"model_max_length": 9}',
                   "preprocessor_config.json": '{"patch_size": 14}', "chat_template.jinja": "{{ messages }}"}


@pytest.fixture(scope="module", params=["untied", "tied"])
def source(request, tmp_path_factory):
  """An HF checkpoint made by transformers, with tokenizer/processor files beside it."""
  config = O.tiny_hf_config(heads=4, kv_heads=2, tie=request.param == "tied", layers=3)
  path = O.save_hf(O.make_hf_model(config, seed=21), str(tmp_path_factory.mktemp(request.param)))
  for name, text in TOKENIZER_FILES.items():
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return path


def _prompt(rng):
  return O.build_prompt(rng, [[("text", 5), ("image", (1, 4, 6)), ("text", 4), ("video", (4, 4, 4), 1.0),
                               ("text", 3)],
                              [("text", 7), ("image", (1, 6, 4)), ("text", 2)]])


def _hf_from(path, dtype="auto"):
  return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def _tensors(path) -> dict[str, np.ndarray]:
  out = {}
  for f in checkpoint_files(path):
    st = SafetensorsFile(f)
    out.update({k: np.array(st.get(k)) for k in st.keys()})
  return out


def _params(model) -> dict:
  _, state = nnx.split(model, nnx.Param)
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _check_logits(measure, name, got, want, prompt):
  diff = float(np.abs(np.asarray(got) - want)[prompt.attention_mask.astype(bool)].max())
  measure(name, diff)
  assert diff <= tol.LOGITS_FP32, f"{name}: max |dlogit| {diff:.3e}"


def test_transformers_loads_the_export(source, tmp_path, rng, measure):
  ours = zoomer_jax.load_hf(source, position_rule="hf_5.23")
  out = zoomer_jax.export_hf(ours, tmp_path / "export", max_shard_bytes=200_000)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", files
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  assert set(index["weight_map"]) == set(_tensors(out))
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in _tensors(out).values())
  for name, text in TOKENIZER_FILES.items():
    assert open(os.path.join(out, name)).read() == text
  assert not any(f.startswith(".") for f in files), files  # the staging directory is gone

  hf = _hf_from(out)
  assert next(hf.parameters()).dtype == torch.float32
  prompt = _prompt(rng)
  _check_logits(measure, os.path.basename(source).rstrip("0123456789"), ours(**prompt.ours()), O.hf_logits(hf, prompt), prompt)


def test_a_model_made_here_exports_to_transformers(tmp_path, rng, measure):
  """No HF origin: our own initialisation, our own config, written out and read by transformers."""
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config(heads=6, kv_heads=2, hidden=96, tie=True, v_heads=4,
                                                  v_hidden=64), position_rule="hf_5.23")
  ours = zoomer_jax.Qwen25VL(cfg, rngs=nnx.Rngs(3))
  out = zoomer_jax.export_hf(ours, tmp_path / "export")
  assert os.listdir(out) and "model.safetensors" in os.listdir(out)
  assert "tokenizer.json" not in os.listdir(out)
  assert "lm_head.weight" not in _tensors(out)  # tied: transformers does not store it either
  prompt = _prompt(rng)
  _check_logits(measure, "made_here", ours(**prompt.ours()), O.hf_logits(_hf_from(out), prompt), prompt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_import_is_bit_exact(source, tmp_path, dtype):
  first = zoomer_jax.load_hf(source, dtype=dtype)
  out = zoomer_jax.export_hf(first, tmp_path / "export", max_shard_bytes=300_000)
  second = zoomer_jax.load_hf(out, dtype=dtype)
  a, b = _params(first), _params(second)
  assert a.keys() == b.keys()
  for path in a:
    assert a[path].dtype == b[path].dtype == np.dtype(dtype), path
    np.testing.assert_array_equal(a[path].view(np.uint8), b[path].view(np.uint8), err_msg=str(path))
  if dtype == "float32":  # the file itself: every tensor transformers wrote comes back byte for byte
    theirs, mine = _tensors(source), _tensors(out)
    theirs.pop("lm_head.weight", None) if "lm_head.weight" not in mine else None
    assert theirs.keys() == mine.keys()
    for key in theirs:
      assert theirs[key].dtype == mine[key].dtype and theirs[key].shape == mine[key].shape, key
      np.testing.assert_array_equal(theirs[key], mine[key], err_msg=key)


def test_bfloat16_model_exports_bfloat16(source, tmp_path):
  model = zoomer_jax.load_hf(source, dtype="bfloat16")
  out = zoomer_jax.export_hf(model, tmp_path / "export")
  for f in checkpoint_files(out):
    st = SafetensorsFile(f)
    assert {st._header[k]["dtype"] for k in st.keys()} == {"BF16"}
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  hf = _hf_from(out)  # dtype="auto" takes the checkpoint's dtype
  assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}


def test_sharded_model_exports_the_same_files(source, tmp_path):
  plain = zoomer_jax.export_hf(zoomer_jax.load_hf(source), tmp_path / "plain")
  sharded_model = zoomer_jax.load_hf(source, mesh=make_mesh((2, 2, 2)))
  assert any(len(v.sharding.device_set) > 1 and not v.sharding.is_fully_replicated
             for v in jax.tree.leaves(nnx.state(sharded_model, nnx.Param)))
  sharded = zoomer_jax.export_hf(sharded_model, tmp_path / "sharded")
  a, b = _tensors(plain), _tensors(sharded)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_existing_checkpoint_is_not_overwritten_by_accident(source, tmp_path):
  model = zoomer_jax.load_hf(source)
  out = zoomer_jax.export_hf(model, tmp_path / "export", max_shard_bytes=200_000)
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
  with pytest.raises(FileExistsError, match="overwrite=True"):
    zoomer_jax.export_hf(model, out)
  assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before

  zoomer_jax.export_hf(model, out, overwrite=True)  # one file now: the old shards and index must go
  weights = sorted(f for f in os.listdir(out) if f.startswith("model"))
  assert weights == ["model.safetensors"]
  again = zoomer_jax.load_hf(out)
  for (p, x), (_, y) in zip(_params(model).items(), _params(again).items()):
    np.testing.assert_array_equal(x, y, err_msg=str(p))


def test_export_into_a_file_path_fails_clearly(tmp_path):
  target = tmp_path / "file"
  target.write_text("not a directory")
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config())
  with pytest.raises(NotADirectoryError, match="not a directory"):
    zoomer_jax.export_hf(zoomer_jax.Qwen25VL(cfg), target)
  assert target.read_text() == "not a directory"
