"""Qwen2.5-VL model configuration, read from an HF `config.json` in either layout.

Hub checkpoints (and transformers 4.x `save_pretrained`) keep the text fields at the top level
("flat"); transformers 5.x nests them under `text_config`. Both are accepted: a text field is read
from `text_config` when present, else from the top level. Required sizes are never taken from class
defaults, because transformers' class defaults do not match any released model (the hub's config.json
files are the truth).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)

# How the temporal index and the text position after a vision block are computed (transformers' `get_rope_index`).
#   original : floor(t * tokens_per_second * second_per_grid) in float; next text at max(block) + 1.
#              Qwen's own code, transformers 4.49-4.51 and vLLM. The default.
#   hf_4.52  : second_per_grid truncated to int first; next text at max(block) + 1 (transformers 4.52-5.2).
#   hf_5.3   : int(second_per_grid); next text at block_start + max(lh, lw) (transformers 5.3-5.12).
#   hf_5.23  : float floor; next text at block_start + max(lh, lw) (transformers >= 5.23).
POSITION_RULES = {
    "original": ("float", "max_plus_one"),
    "hf_4.52": ("int", "max_plus_one"),
    "hf_5.3": ("int", "max_hw"),
    "hf_5.23": ("float", "max_hw"),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT encoder (`visual.*`)."""

  depth: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  out_hidden_size: int
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: float = 2.0
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6  # hard-coded in transformers for every vision norm

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Width of one `pixel_values` row: C * temporal_patch * patch * patch (1176)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def window_units(self) -> int:
    """Side of an attention window in merged (2x2) units: 112 // 2 // 14 = 4."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder (`model.*`, `lm_head`)."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  intermediate_size: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything needed to build `Qwen25VL`; `position_rule` picks a row of `POSITION_RULES`."""

  text: TextConfig
  vision: VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None
  position_rule: str = "original"

  def __post_init__(self):
    if self.position_rule not in POSITION_RULES:
      raise ValueError(
          f"position_rule={self.position_rule!r} is not one of {sorted(POSITION_RULES)}")
    t, v = self.text, self.vision
    if t.hidden_size % t.num_attention_heads:
      raise ValueError(f"text hidden_size {t.hidden_size} is not divisible by "
                       f"num_attention_heads {t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
      raise ValueError(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {t.num_key_value_heads}")
    if 2 * sum(t.mrope_section) != t.head_dim:
      raise ValueError(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = "
                       f"{t.head_dim // 2}")
    if v.hidden_size % v.num_heads:
      raise ValueError(f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
    if v.out_hidden_size != t.hidden_size:
      raise ValueError(f"vision out_hidden_size {v.out_hidden_size} must equal text hidden_size "
                       f"{t.hidden_size}")

  # ------------------------------------------------------------------ HF config.json
  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> "ModelConfig":
    """Parses an HF Qwen2.5-VL config dict (flat hub layout or nested transformers-5 layout)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r} in config.json; expected one of "
                       f"{list(SUPPORTED_MODEL_TYPES)}")
    text_d = dict(d.get("text_config") or {})

    def text_field(key, default=dataclasses.MISSING):
      for src in (text_d, d):
        if key in src and src[key] is not None:
          return src[key]
      if default is dataclasses.MISSING:
        raise ValueError(f"config.json has no text field {key!r} (looked in text_config and the "
                         "top level)")
      return default

    rope = text_field("rope_parameters", None) or text_field("rope_scaling", None) or {}
    mrope_section = rope.get("mrope_section")
    if mrope_section is None:
      raise ValueError("config.json has no mrope_section (looked in rope_parameters and rope_scaling)")
    theta = rope.get("rope_theta", text_field("rope_theta", 1000000.0))
    tie = bool(d.get("tie_word_embeddings", False) or text_d.get("tie_word_embeddings", False))
    num_heads = text_field("num_attention_heads")
    text = TextConfig(
        vocab_size=int(text_field("vocab_size")),
        hidden_size=int(text_field("hidden_size")),
        num_hidden_layers=int(text_field("num_hidden_layers")),
        num_attention_heads=int(num_heads),
        num_key_value_heads=int(text_field("num_key_value_heads", num_heads)),
        intermediate_size=int(text_field("intermediate_size")),
        rms_norm_eps=float(text_field("rms_norm_eps")),
        rope_theta=float(theta),
        mrope_section=tuple(int(s) for s in mrope_section),
        tie_word_embeddings=tie,
        max_position_embeddings=int(text_field("max_position_embeddings", 128000)),
    )

    vd = d.get("vision_config")
    if not vd:
      raise ValueError("config.json has no vision_config")

    def vision_field(*keys, default=dataclasses.MISSING):
      for key in keys:
        if key in vd and vd[key] is not None:
          return vd[key]
      if default is dataclasses.MISSING:
        raise ValueError(f"config.json vision_config has no field {keys[0]!r}")
      return default

    vrope = vd.get("rope_parameters") or {}
    vision = VisionConfig(
        depth=int(vision_field("depth", "num_hidden_layers")),
        hidden_size=int(vision_field("hidden_size", "embed_dim")),
        num_heads=int(vision_field("num_heads", "num_attention_heads")),
        intermediate_size=int(vision_field("intermediate_size")),
        out_hidden_size=int(vision_field("out_hidden_size")),
        patch_size=int(vision_field("patch_size", "spatial_patch_size", default=14)),
        temporal_patch_size=int(vision_field("temporal_patch_size", default=2)),
        spatial_merge_size=int(vision_field("spatial_merge_size", default=2)),
        in_channels=int(vision_field("in_channels", "in_chans", default=3)),
        window_size=int(vision_field("window_size", default=112)),
        fullatt_block_indexes=tuple(int(i) for i in vision_field(
            "fullatt_block_indexes", default=(7, 15, 23, 31))),
        # transformers' class default is 4, but every released checkpoint says 2 in its file.
        tokens_per_second=float(vision_field("tokens_per_second", default=4)),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    eos = text_field("eos_token_id", None)
    kwargs = dict(
        text=text,
        vision=vision,
        image_token_id=int(d.get("image_token_id", 151655)),
        video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
        bos_token_id=text_field("bos_token_id", None),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=text_field("pad_token_id", None),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_hf_file(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    """Reads `config.json` (or the directory holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return cls.from_hf_dict(d, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers-5 nested layout, which transformers 4.5x also reads."""
    t, v = self.text, self.vision
    text_config = {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "intermediate_size": t.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                            "rope_theta": t.rope_theta},
        "rope_scaling": {"type": "default", "rope_type": "default",
                         "mrope_section": list(t.mrope_section)},
        "rope_theta": t.rope_theta,
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                        else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    vision_config = {
        "model_type": "qwen2_5_vl_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "out_hidden_size": v.out_hidden_size,
        "hidden_act": "silu",
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "in_channels": v.in_channels,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        # transformers' strict config wants an int here (the released models use 2).
        "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
                             else v.tokens_per_second,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
    }

  # ------------------------------------------------------------------ ml_collections presets
  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a nested mapping {text: {...}, vision: {...}, <top-level fields>} (configs/)."""
    cd = dict(cd)
    unknown = set(cd) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown model config keys {sorted(unknown)}")
    text = _dataclass_from(TextConfig, cd.pop("text"), "model.text")
    vision = _dataclass_from(VisionConfig, cd.pop("vision"), "model.vision")
    return cls(text=text, vision=vision, **cd)

  def to_config_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _dataclass_from(kind, values: Mapping[str, Any], where: str):
  values = dict(values)
  names = {f.name: f for f in dataclasses.fields(kind)}
  unknown = set(values) - set(names)
  if unknown:
    raise ValueError(f"unknown keys {sorted(unknown)} in {where}; valid keys: {sorted(names)}")
  for k, v in values.items():
    if isinstance(v, list):
      values[k] = tuple(v)
  return kind(**values)
