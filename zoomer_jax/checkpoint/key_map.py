"""The one table between HF checkpoint keys and `Qwen25VL` parameter paths.

Each row: an HF key regex (legacy spelling, as `save_pretrained` writes it), the NNX path template
filled from the regex groups, and the transform between the two layouts. Import and export read the
same rows in opposite directions. transformers >= 4.52 in-memory names (`model.language_model.*`,
`model.visual.*`) are normalised to the legacy spelling first.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from zoomer_jax.model.config import ModelConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Linear:
  """torch Linear weight [out, in] <-> kernel [*in_dims, *out_dims] (`n_in` leading kernel dims)."""

  n_in: int = 1

  def hf_shape(self, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

  def to_nnx(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return w.T.reshape(shape)

  def to_hf(self, k: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return k.reshape(math.prod(k.shape[:self.n_in]), -1).T


@dataclasses.dataclass(frozen=True)
class PatchConv:
  """Conv3d weight [d, C, T, P, P] <-> kernel [C*T*P*P, d] (a row-major flatten, then transpose)."""

  def hf_shape(self, shape, cfg: ModelConfig):
    v = cfg.vision
    return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

  def to_nnx(self, w, shape):
    return w.reshape(w.shape[0], -1).T.reshape(shape)

  def to_hf(self, k, cfg):
    return k.T.reshape(self.hf_shape(k.shape, cfg))


@dataclasses.dataclass(frozen=True)
class Flat:
  """A flat HF vector (biases) <-> any kernel-side shape with the same number of elements."""

  def hf_shape(self, shape, cfg):
    return (math.prod(shape),)

  def to_nnx(self, w, shape):
    return w.reshape(shape)

  def to_hf(self, k, cfg):
    return k.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Same:
  """Identical layout (norm weights, the embedding table)."""

  def hf_shape(self, shape, cfg):
    return tuple(shape)

  def to_nnx(self, w, shape):
    return w.reshape(shape)

  def to_hf(self, k, cfg):
    return k


_V = r"visual\.blocks\.(\d+)\."
_T = r"model\.layers\.(\d+)\."
TABLE: list[tuple[str, str, object]] = [
    (r"visual\.patch_embed\.proj\.weight", "visual.patch_embed.kernel", PatchConv()),
    (_V + r"norm([12])\.weight", "visual.blocks.{0}.norm{1}.weight", Same()),
    (_V + r"attn\.qkv\.weight", "visual.blocks.{0}.attn.qkv.kernel", Linear()),
    (_V + r"attn\.qkv\.bias", "visual.blocks.{0}.attn.qkv.bias", Flat()),
    (_V + r"attn\.proj\.weight", "visual.blocks.{0}.attn.proj.kernel", Linear(n_in=2)),
    (_V + r"attn\.proj\.bias", "visual.blocks.{0}.attn.proj.bias", Same()),
    (_V + r"mlp\.(gate|up|down)_proj\.weight", "visual.blocks.{0}.mlp.{1}_proj.kernel", Linear()),
    (_V + r"mlp\.(gate|up|down)_proj\.bias", "visual.blocks.{0}.mlp.{1}_proj.bias", Same()),
    (r"visual\.merger\.ln_q\.weight", "visual.merger.ln_q.weight", Same()),
    (r"visual\.merger\.mlp\.0\.weight", "visual.merger.fc1.kernel", Linear()),
    (r"visual\.merger\.mlp\.0\.bias", "visual.merger.fc1.bias", Same()),
    (r"visual\.merger\.mlp\.2\.weight", "visual.merger.fc2.kernel", Linear()),
    (r"visual\.merger\.mlp\.2\.bias", "visual.merger.fc2.bias", Same()),
    (r"model\.embed_tokens\.weight", "model.embed_tokens.embedding", Same()),
    (_T + r"(input_layernorm|post_attention_layernorm)\.weight", "model.layers.{0}.{1}.weight", Same()),
    (_T + r"self_attn\.([qkv])_proj\.weight", "model.layers.{0}.self_attn.{1}_proj.kernel", Linear()),
    (_T + r"self_attn\.([qkv])_proj\.bias", "model.layers.{0}.self_attn.{1}_proj.bias", Flat()),
    (_T + r"self_attn\.o_proj\.weight", "model.layers.{0}.self_attn.o_proj.kernel", Linear(n_in=2)),
    (_T + r"mlp\.(gate|up|down)_proj\.weight", "model.layers.{0}.mlp.{1}_proj.kernel", Linear()),
    (r"model\.norm\.weight", "model.norm.weight", Same()),
    (r"lm_head\.weight", "lm_head.kernel", Linear()),
]
_COMPILED = [(re.compile(rx + r"\Z"), tmpl, tf) for rx, tmpl, tf in TABLE]

# HF names are the legacy spelling that `save_pretrained` writes; these undo the >= 4.52 renames.
_RENAMES = [(re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual.")]


def normalize_key(key: str) -> str:
  for rx, repl in _RENAMES:
    key = rx.sub(repl, key)
  return key


def _to_path(dotted: str) -> Path:
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def hf_to_nnx(key: str) -> tuple[Path, object] | None:
  """(NNX path, transform) for an HF key in either spelling, or None if no row matches."""
  norm = normalize_key(key)
  for rx, tmpl, tf in _COMPILED:
    m = rx.match(norm)
    if m:
      return _to_path(tmpl.format(*m.groups())), tf
  return None


def nnx_to_hf(path: Path) -> tuple[str, object]:
  """(legacy HF key, transform) for an NNX parameter path."""
  dotted = ".".join(str(p) for p in path)
  for rx, tmpl, _ in TABLE:
    # Turn the template into a regex over paths, and the HF regex into a format string.
    path_rx = re.escape(tmpl).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", r"(\w+?)")
    m = re.fullmatch(path_rx, dotted)
    if m:
      hf = _fill(rx, m.groups())
      back = hf_to_nnx(hf)  # a loose template match (e.g. "o" for [qkv]) must round-trip to its own row
      if back is not None and back[0] == tuple(path):
        return hf, back[1]
  raise KeyError(f"no checkpoint key for parameter {dotted}")


def _fill(rx: str, groups) -> str:
  """Substitutes the regex groups of an HF row by values and unescapes the rest."""
  parts = re.split(r"\([^)]*\)", rx)
  out = parts[0]
  for g, rest in zip(groups, parts[1:]):
    out += str(g) + rest
  return out.replace("\\", "")


# Stacked modules of a scanned model (`ModelOptions.scan_layers`): the per-layer index moves into the array.
STACKED = (("model", "layers"), ("visual", "blocks"))


def stacked_path(path: Path) -> tuple[Path, int] | None:
  """(the stacked parameter's path, layer index) for a per-layer path such as model.layers.3.mlp.up_proj.kernel;
  None for a path outside the stacked modules."""
  for prefix in STACKED:
    n = len(prefix)
    if tuple(path[:n]) == prefix and len(path) > n and isinstance(path[n], int):
      return tuple(path[:n]) + tuple(path[n + 1:]), path[n]
  return None


def unstacked_path(path: Path, index: int) -> Path:
  """The per-layer path of layer `index` of a stacked parameter path (model.layers.mlp... -> model.layers.i.mlp...)."""
  for prefix in STACKED:
    n = len(prefix)
    if tuple(path[:n]) == prefix:
      return tuple(path[:n]) + (index,) + tuple(path[n:])
  raise KeyError(f"{'.'.join(map(str, path))} is not a stacked parameter")


def is_stacked(path: Path) -> bool:
  return any(tuple(path[:len(p)]) == p and (len(path) == len(p) or not isinstance(path[len(p)], int))
             for p in STACKED)
