"""`load_hf`: an HF Qwen2.5-VL directory (config.json + safetensors) -> `Qwen25VL`.

The model is built abstractly (no parameter memory), then the checkpoint is streamed tensor by
tensor: each tensor is read in chunks straight into the slices its devices hold (transformed and cast
on the way, see `safetensors_io.read_shards`) before the next is read. The host holds at most one
tensor beyond the loaded model, and no file pages stay mapped. For a scanned model
(`ModelOptions.scan_layers`) a layer's tensor is read into its slice of the stacked parameter's host shards,
which go to the devices once every layer has arrived.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from zoomer_jax.checkpoint.key_map import hf_to_nnx, stacked_path
from zoomer_jax.checkpoint.safetensors_io import aligned_empty, checkpoint_files, iter_tensors, read_shards
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.options import ModelOptions
from zoomer_jax.model.qwen25vl import Qwen25VL, resolve_dtype
from zoomer_jax.parallel.rules import Rules, variable_sharding


class CheckpointError(ValueError):
  """A checkpoint does not fit the model: names the key and the shapes involved."""


def abstract_model(cfg: ModelConfig, dtype="float32", options: ModelOptions = ModelOptions()) -> Qwen25VL:
  """The model with ShapeDtypeStruct leaves: no memory, no initialisation."""
  return nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(0), options=options))


def load_hf(path: str | os.PathLike, dtype="float32", mesh: Mesh | None = None, *,
            rules: Rules | None = None, options: ModelOptions | None = None, **config_overrides) -> Qwen25VL:
  """Loads an HF Qwen2.5-VL checkpoint directory.

  Accepts the flat hub and nested transformers-5 `config.json` layouts and both key spellings
  (`model.layers.*`/`visual.*` and `model.language_model.*`/`model.visual.*`). `dtype` is the
  parameter and activation dtype ("float32" or "bfloat16"); with `mesh`, every tensor goes straight
  into the sharding that the rules give it (`rules`, default `options.rules`). `options` picks how the model
  computes (`ModelOptions`: scanned layers, attention kernel). `config_overrides` replace `ModelConfig` fields
  (e.g. `position_rule="hf_5.23"`).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  cfg = ModelConfig.from_hf_file(path, **config_overrides)
  dtype = resolve_dtype(dtype)
  options = options or ModelOptions()
  rules = options.rules if rules is None else rules
  model = abstract_model(cfg, dtype, options)
  graphdef, state = nnx.split(model)
  targets = dict(nnx.to_flat_state(state))
  tied = cfg.text.tie_word_embeddings

  loaded: dict = {}
  stacks: dict = {}  # stacked path -> _Stack being filled layer by layer
  for key, f in iter_tensors(checkpoint_files(path)):
    match = hf_to_nnx(key)
    if match is None:
      raise CheckpointError(f"unexpected tensor {key!r} in {f.path}: no Qwen2.5-VL parameter has this name")
    nnx_path, transform = match
    if tied and nnx_path == ("lm_head", "kernel"):
      continue  # tied checkpoints may still carry a copy of the embedding; transformers ignores it
    stacked = stacked_path(nnx_path) if nnx_path not in targets else None
    target_path = stacked[0] if stacked is not None else nnx_path
    if target_path not in targets or stacked is not None and not 0 <= stacked[1] < _depth(targets[target_path]):
      raise CheckpointError(f"unexpected tensor {key!r} in {f.path}: the config has no such parameter "
                            f"({'.'.join(map(str, nnx_path))})")
    if nnx_path in loaded or stacked is not None and (target_path in loaded or
                                                      stacked[1] in stacks.get(target_path, _Stack.EMPTY).layers):
      raise CheckpointError(f"tensor {key!r} appears twice (second time in {f.path})")
    var = targets[target_path]
    want = var.get_value()
    shape = tuple(want.shape[1:]) if stacked is not None else tuple(want.shape)
    hf_shape = transform.hf_shape(shape, cfg)
    if f.shape(key) != tuple(hf_shape):
      raise CheckpointError(f"tensor {key!r} has shape {list(f.shape(key))} in {f.path}, the config "
                            f"needs {list(hf_shape)}")
    if not jnp.issubdtype(f.dtype(key), jnp.floating):
      raise CheckpointError(f"tensor {key!r} has dtype {f.dtype(key)} in {f.path}, expected a float dtype")
    sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
    if stacked is None:
      loaded[nnx_path] = _put(f, key, transform, shape, dtype, sharding)
      continue
    stack = stacks.setdefault(target_path, _Stack(tuple(want.shape), dtype, sharding))
    stack.add(stacked[1], f, key, transform)
    if stack.complete:
      loaded[target_path] = stack.put()
      del stacks[target_path]

  for target_path, stack in stacks.items():
    absent = sorted(set(range(stack.shape[0])) - stack.layers)
    raise CheckpointError(f"checkpoint {path} is missing layers {absent[:5]} of {'.'.join(map(str, target_path))}")
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


def _depth(var) -> int:
  return var.get_value().shape[0]


class _Stack:
  """The host shards of one stacked parameter [layers, ...], filled one layer's tensor at a time."""

  EMPTY: "_Stack"

  def __init__(self, shape: tuple[int, ...], dtype, sharding):
    self.shape, self.dtype, self.sharding = shape, dtype, sharding
    boxes = [tuple((0, n) for n in shape)] if sharding is None else sorted(
        {_box_key(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()})
    self.hosts = {box: aligned_empty(tuple(b - a for a, b in box), dtype) for box in boxes}
    self.layers: set[int] = set()

  @property
  def complete(self) -> bool:
    return len(self.layers) == self.shape[0]

  def add(self, layer: int, f, key: str, transform) -> None:
    view = lambda stored: transform.to_nnx(stored, self.shape[1:])
    boxes = [box for box in self.hosts if box[0][0] <= layer < box[0][1]]
    reads = read_shards(f, key, view, [tuple(slice(*b) for b in box[1:]) for box in boxes], self.dtype)
    for box, host in zip(boxes, reads):
      self.hosts[box][layer - box[0][0]] = host
    self.layers.add(layer)

  def put(self) -> jax.Array:
    if self.sharding is None:
      (host,) = self.hosts.values()
      return jax.device_put(host)
    return jax.make_array_from_callback(self.shape, self.sharding, lambda idx: self.hosts[_box_key(idx, self.shape)])


_Stack.EMPTY = _Stack((0,), jnp.float32, None)
