"""`load_hf`: an HF Qwen2.5-VL directory (config.json + safetensors) -> `Qwen25VL`.

The model is built abstractly (no parameter memory), then the checkpoint is streamed tensor by
tensor: each tensor is read in chunks straight into the slices its devices hold (transformed and cast
on the way, see `safetensors_io.read_shards`) before the next is read. The host holds at most one
tensor beyond the loaded model, and no file pages stay mapped.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from zoomer_jax.checkpoint.key_map import hf_to_nnx
from zoomer_jax.checkpoint.safetensors_io import checkpoint_files, iter_tensors, read_shards
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.qwen25vl import Qwen25VL, resolve_dtype
from zoomer_jax.parallel.rules import DEFAULT_RULES, Rules, variable_sharding


class CheckpointError(ValueError):
  """A checkpoint does not fit the model: names the key and the shapes involved."""


def abstract_model(cfg: ModelConfig, dtype="float32") -> Qwen25VL:
  """The model with ShapeDtypeStruct leaves: no memory, no initialisation."""
  return nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def load_hf(path: str | os.PathLike, dtype="float32", mesh: Mesh | None = None, *,
            rules: Rules = DEFAULT_RULES, **config_overrides) -> Qwen25VL:
  """Loads an HF Qwen2.5-VL checkpoint directory.

  Accepts the flat hub and nested transformers-5 `config.json` layouts and both key spellings
  (`model.layers.*`/`visual.*` and `model.language_model.*`/`model.visual.*`). `dtype` is the
  parameter and activation dtype ("float32" or "bfloat16"); with `mesh`, every tensor goes straight
  into the sharding that `rules` give it. `config_overrides` replace `ModelConfig` fields
  (e.g. `position_rule="hf_5.23"`).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  cfg = ModelConfig.from_hf_file(path, **config_overrides)
  dtype = resolve_dtype(dtype)
  model = abstract_model(cfg, dtype)
  graphdef, state = nnx.split(model)
  targets = dict(nnx.to_flat_state(state))
  tied = cfg.text.tie_word_embeddings

  loaded: dict = {}
  for key, f in iter_tensors(checkpoint_files(path)):
    match = hf_to_nnx(key)
    if match is None:
      raise CheckpointError(f"unexpected tensor {key!r} in {f.path}: no Qwen2.5-VL parameter has this name")
    nnx_path, transform = match
    if tied and nnx_path == ("lm_head", "kernel"):
      continue  # tied checkpoints may still carry a copy of the embedding; transformers ignores it
    if nnx_path not in targets:
      raise CheckpointError(f"unexpected tensor {key!r} in {f.path}: the config has no such parameter "
                            f"({'.'.join(map(str, nnx_path))})")
    if nnx_path in loaded:
      raise CheckpointError(f"tensor {key!r} appears twice (second time in {f.path})")
    var = targets[nnx_path]
    want = var.get_value()
    hf_shape = transform.hf_shape(want.shape, cfg)
    if f.shape(key) != tuple(hf_shape):
      raise CheckpointError(f"tensor {key!r} has shape {list(f.shape(key))} in {f.path}, the config "
                            f"needs {list(hf_shape)}")
    if not jnp.issubdtype(f.dtype(key), jnp.floating):
      raise CheckpointError(f"tensor {key!r} has dtype {f.dtype(key)} in {f.path}, expected a float dtype")
    sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
    loaded[nnx_path] = _put(f, key, transform, want.shape, dtype, sharding)

  missing = [k for k in targets if k not in loaded]
  if missing:
    names = [".".join(map(str, k)) for k in missing]
    raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensors, e.g. {names[:5]}")
  for nnx_path, var in targets.items():
    var.set_value(loaded[nnx_path])
  model = nnx.merge(graphdef, nnx.from_flat_state(targets))
  model.hf_source = path  # where `export_hf` copies tokenizer and processor files from
  return model


def _put(f, key: str, transform, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
  """Reads one tensor from the file straight into its shards (the whole array without a sharding).

  Each distinct slice that a local device holds is read once, in the loaded dtype, into an aligned
  host array, which XLA's CPU client adopts without a copy (replicas share it; other backends copy
  it to the device).
  """
  view = lambda stored: transform.to_nnx(stored, shape)
  if sharding is None:
    (host,) = read_shards(f, key, view, [tuple(slice(0, n) for n in shape)], dtype)
    return jax.device_put(host)
  boxes = sorted({_box_key(idx, shape) for idx in sharding.addressable_devices_indices_map(shape).values()})
  hosts = dict(zip(boxes, read_shards(f, key, view, [tuple(slice(*b) for b in box) for box in boxes], dtype)))
  return jax.make_array_from_callback(shape, sharding, lambda idx: hosts[_box_key(idx, shape)])


def _box_key(idx: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """A shard index as hashable (start, stop) pairs, one per axis."""
  return tuple(s.indices(n)[:2] for s, n in zip(idx, shape))
