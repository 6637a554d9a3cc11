"""`export_hf`: a `Qwen25VL` -> an HF checkpoint directory that transformers' `from_pretrained` loads.

Writes `config.json` (the nested transformers-5 layout, which transformers 4.5x also reads), the weights
in the hub's key spelling (`model.layers.*`, `visual.*`) as `model-0000i-of-0000n.safetensors` with a
`model.safetensors.index.json`, and copies tokenizer/processor files from the directory the model was
loaded from. Tensors are fetched and written one shard at a time, so the host never holds more than one
shard; with several processes every process takes part in gathering and only process 0 writes.

Everything is first written into a hidden staging directory inside `out_dir`, then moved into place
file by file, so an interrupted export never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable

import jax
import numpy as np
from flax import nnx

from zoomer_jax.checkpoint.key_map import is_stacked, nnx_to_hf, unstacked_path
from zoomer_jax.checkpoint.safetensors_io import save_file
from zoomer_jax.parallel.distributed import to_host

# Files of an HF model directory that are not weights and that a user of the export needs.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)
DEFAULT_SHARD_BYTES = 4 * 2**30
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(jax.numpy.bfloat16): "bfloat16",
                np.dtype(np.float16): "float16"}
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?\Z")


def export_hf(model, out_dir: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              source_dir: str | os.PathLike | None = None, overwrite: bool = False) -> str:
  """Writes `model` to `out_dir` as an HF Qwen2.5-VL checkpoint; returns `out_dir`.

  Parameters keep their dtype (a bf16 model exports bf16). `source_dir` (default: the directory
  `load_hf` read the model from, if any) is where tokenizer and processor files are copied from.
  An `out_dir` that already holds weights is refused unless `overwrite=True`; then only weight files
  and the side files named above are replaced, and stale shards of the old export are removed.
  """
  out_dir = os.fspath(out_dir)
  source_dir = source_dir if source_dir is not None else getattr(model, "hf_source", None)
  writer = jax.process_index() == 0
  if writer:
    _check_out_dir(out_dir, overwrite)

  tensors = list(_hf_tensors(model))
  shards = _plan_shards(tensors, max_shard_bytes)
  n = len(shards)
  names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  staging = os.path.join(out_dir, ".export-staging")
  if writer:
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)

  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    host = {key: transform.to_hf(to_host(value.fetch() if isinstance(value, _LayerSlice) else value), model.config)
            for key, value, transform in shard}
    total += sum(a.nbytes for a in host.values())
    weight_map.update({key: name for key in host})
    if writer:
      save_file(host, os.path.join(staging, name), metadata={"format": "pt"})
    del host

  if not writer:
    return out_dir
  dtypes = {np.dtype(v.dtype) for _, v, _ in tensors}
  config = model.config.to_hf_dict()
  if len(dtypes) == 1 and next(iter(dtypes)) in _DTYPE_NAMES:
    config["dtype"] = config["torch_dtype"] = _DTYPE_NAMES[next(iter(dtypes))]
  _write_json(os.path.join(staging, "config.json"), config)
  if n > 1:
    _write_json(os.path.join(staging, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
  _copy_side_files(source_dir, staging)

  written = set(os.listdir(staging))
  for f in os.listdir(out_dir):  # stale weights of an earlier export would confuse the loader
    if _WEIGHT_FILE.match(f) and f not in written:
      os.remove(os.path.join(out_dir, f))
  for f in sorted(written):
    os.replace(os.path.join(staging, f), os.path.join(out_dir, f))
  os.rmdir(staging)
  return out_dir


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise NotADirectoryError(f"export target {out_dir} exists and is not a directory")
  os.makedirs(out_dir, exist_ok=True)
  existing = [f for f in os.listdir(out_dir) if _WEIGHT_FILE.match(f) or f == "config.json"]
  if existing and not overwrite:
    raise FileExistsError(f"{out_dir} already holds a checkpoint ({sorted(existing)[:3]}); pass "
                          f"overwrite=True to replace it")


def _hf_tensors(model) -> Iterable[tuple[str, jax.Array, object]]:
  """(HF key, parameter array, transform) for every parameter, in the model's parameter order; a stacked
  parameter of a scanned model gives one tensor per layer (its slice, taken when the shard is written)."""
  _, state = nnx.split(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    if not is_stacked(tuple(path)):
      key, transform = nnx_to_hf(path)
      yield key, value, transform
      continue
    for i in range(value.shape[0]):
      key, transform = nnx_to_hf(unstacked_path(tuple(path), i))
      yield key, _LayerSlice(value, i), transform


class _LayerSlice:
  """Layer i of a stacked array, sliced only when fetched (`to_host`), so planning shards allocates nothing."""

  def __init__(self, stacked: jax.Array, i: int):
    self.stacked, self.i = stacked, i
    self.shape, self.dtype = tuple(stacked.shape[1:]), stacked.dtype
    self.size = int(np.prod(self.shape))

  def fetch(self) -> jax.Array:
    return self.stacked[self.i]


def _plan_shards(tensors, max_bytes: int) -> list[list]:
  """Groups tensors in order into shards of at most `max_bytes` (a bigger tensor gets its own)."""
  shards, current, size = [], [], 0
  for item in tensors:
    nbytes = item[1].size * item[1].dtype.itemsize
    if current and size + nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(item)
    size += nbytes
  if current:
    shards.append(current)
  return shards


def _copy_side_files(source_dir, dest: str) -> None:
  if source_dir is None or not os.path.isdir(source_dir):
    return
  for name in SIDE_FILES:
    src = os.path.join(source_dir, name)
    if os.path.isfile(src):
      shutil.copy2(src, os.path.join(dest, name))


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
