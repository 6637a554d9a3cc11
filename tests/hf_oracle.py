"""transformers' Qwen2.5-VL as the test oracle: tiny random configs, random prompts, reference logits.

Test-only (imports torch). Weights are re-drawn with a larger scale than transformers' 0.02 init so
that every parameter visibly moves the logits.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VOCAB = 600
IMAGE, VIDEO, VSTART, VEND = 590, 591, 592, 593  # special ids remapped into the tiny vocabulary
TEXT_MAX = 580  # ordinary text ids are drawn below this


def tiny_hf_config(*, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, mrope=(2, 3, 3),
                   tie=False, v_depth=4, v_hidden=32, v_heads=2, v_intermediate=48,
                   fullatt=(1, 3), window=112, tokens_per_second=2, layout="nested") -> dict:
  """A tiny Qwen2.5-VL config.json dict, in the nested (transformers 5) or flat (hub) layout."""
  text = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=intermediate, rms_norm_eps=1e-6,
              max_position_embeddings=4096, hidden_act="silu",
              rope_parameters={"rope_type": "default", "mrope_section": list(mrope), "rope_theta": 1e6},
              bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=tie)
  vision = dict(depth=v_depth, hidden_size=v_hidden, num_heads=v_heads, intermediate_size=v_intermediate,
                out_hidden_size=hidden, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                in_channels=3, window_size=window, fullatt_block_indexes=list(fullatt),
                tokens_per_second=tokens_per_second, hidden_act="silu")
  top = dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
             image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
             vision_end_token_id=VEND, tie_word_embeddings=tie)
  if layout == "nested":
    return dict(top, text_config=text, vision_config=vision)
  flat = dict(top, vision_config=dict(vision, model_type="qwen2_5_vl", in_chans=3, spatial_patch_size=14))
  flat["vision_config"].pop("in_channels")
  flat["vision_config"].pop("patch_size")
  text = dict(text)
  rope = text.pop("rope_parameters")
  flat.update(text, rope_theta=rope["rope_theta"],
              rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
  return flat


def make_hf_model(config: dict, seed: int, dtype=torch.float32):
  """A transformers model for `config`: weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.3^2), norms ~ 1 + N(0, 0.1^2)."""
  hf_cfg = Qwen2_5_VLConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        scale = 0.3 if "embed_tokens" in name else 1.0 / np.sqrt(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) * scale)
  return model.to(dtype)


def save_hf(model, path: str) -> str:
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  return path


@dataclasses.dataclass
class Prompt:
  input_ids: np.ndarray  # [B, L]
  attention_mask: np.ndarray  # [B, L]
  pixel_values: np.ndarray | None = None
  image_grid_thw: np.ndarray | None = None
  pixel_values_videos: np.ndarray | None = None
  video_grid_thw: np.ndarray | None = None
  second_per_grid_ts: np.ndarray | None = None

  def ours(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  def mm_token_type_ids(self) -> np.ndarray:
    return np.where(self.input_ids == IMAGE, 1, np.where(self.input_ids == VIDEO, 2, 0))


def build_prompt(rng: np.random.Generator, sequences: list[list[tuple]], *, pad_left: bool = True) -> Prompt:
  """Random prompts from specs: ("text", n), ("image", (t, h, w)), ("video", (t, h, w), sec_per_grid).

  Each image/video is wrapped in vision_start/vision_end; sequences are padded to one length.
  """
  rows, images, videos, spgs = [], [], [], []
  for spec in sequences:
    ids = []
    for item in spec:
      if item[0] == "text":
        ids += list(rng.integers(3, TEXT_MAX, item[1]))
      else:
        grid = np.asarray(item[1])
        n = int(np.prod(grid)) // 4
        ids += [VSTART] + [IMAGE if item[0] == "image" else VIDEO] * n + [VEND]
        (images if item[0] == "image" else videos).append(grid)
        if item[0] == "video":
          spgs.append(item[2] if len(item) > 2 else 1.0)
    rows.append(ids)
  length = max(len(r) for r in rows)
  input_ids = np.full((len(rows), length), 2, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    sl = slice(length - len(r), length) if pad_left else slice(0, len(r))
    input_ids[i, sl] = r
    mask[i, sl] = 1

  def pixels(grids):
    if not grids:
      return None, None
    g = np.stack(grids)
    return rng.standard_normal((int(g.prod(-1).sum()), 1176)).astype(np.float32), g

  pv, ig = pixels(images)
  pvv, vg = pixels(videos)
  return Prompt(input_ids, mask, pv, ig, pvv, vg, np.asarray(spgs, np.float32) if spgs else None)


def hf_logits(model, prompt: Prompt, position_ids: np.ndarray | None = None) -> np.ndarray:
  """Reference logits [B, L, vocab] (fp32 numpy)."""
  kw = dict(input_ids=torch.as_tensor(prompt.input_ids), attention_mask=torch.as_tensor(prompt.attention_mask),
            mm_token_type_ids=torch.as_tensor(prompt.mm_token_type_ids()))
  dtype = next(model.parameters()).dtype
  for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
    value = getattr(prompt, name)
    if value is not None:
      t = torch.as_tensor(value)
      kw[name] = t.to(dtype) if name.startswith("pixel") else t
  if position_ids is not None:
    kw["position_ids"] = torch.as_tensor(position_ids)
  model.model.rope_deltas = None  # transformers caches this across calls
  with torch.no_grad():
    return model(**kw).logits.float().numpy()
