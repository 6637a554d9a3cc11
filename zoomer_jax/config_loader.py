"""Job configs: `configs/<name>.py` files with `get_config(arg)` returning an ml_collections ConfigDict.

    cfg = load("qwen25vl_tiny")                           # a name under configs/
    cfg = load("configs/qwen25vl_7b.py:arg", ["model.position_rule=hf_5.23"])

Overrides are `dotted.key=value` with Python-literal values (strings may be bare). A key that does
not exist fails with the closest valid names, so a typo never silently adds a field.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_path(spec: str) -> tuple[str, str | None]:
  """Resolves "name", "name:arg", "path/to/file.py" or "path/to/file.py:arg" to (path, arg)."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(CONFIG_DIR, path + ".py")
  if not os.path.exists(path):
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py")) if os.path.isdir(CONFIG_DIR) else []
    raise FileNotFoundError(f"config {spec!r} not found at {path}; known configs: {known}")
  return path, (arg or None)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  path, arg = config_path(spec)
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg)
  apply_overrides(cfg, overrides)
  return cfg


def _flat_keys(cfg, prefix="") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys += _flat_keys(v, prefix + k + ".")
  return keys


def parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for item in overrides:
    key, sep, text = item.removeprefix("--config.").partition("=")
    if not sep:
      raise ValueError(f"override {item!r} must look like key=value")
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        close = difflib.get_close_matches(key, _flat_keys(cfg), n=3)
        raise KeyError(f"unknown config key {key!r}" + (f"; did you mean {close}?" if close else ""))
      if i < len(parts) - 1:
        node = node[part]
    value = parse_value(text)
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    node[parts[-1]] = value
