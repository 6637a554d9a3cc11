"""Forward FLOPs of Qwen2.5-VL's towers, counted from the config (2 FLOPs per multiply-add).

Only matmuls are counted: the dense layers and the two attention einsums (q k^T and p v). Not counted:
norms, rotary, softmax, SiLU/GELU, residual adds, bias adds, the embedding gather and the feature
scatter -- element-wise work that is O(tokens x width) against the matmuls' O(tokens x width^2); on the
tiny test configs it is ~1-3% of what XLA's cost analysis reports, at 7B well under 1%.

A backward pass costs 2x its forward (the input and the weight gradient), which callers apply -- except the
attention of a blockwise kernel: splash attention's backward runs a dq kernel (scores, dP, dq: 3 matmuls) and a
dk/dv kernel (scores, dP, dv, dk: 4), 7 matmuls against the forward's 2 (`FLASH_BACKWARD_OVER_FORWARD`).

Attention comes in two counts:
  * `causal=True`: the pairs a query really attends to (keys at or before it) -- the model FLOPs;
  * `causal=False`: every (query, key) pair, as our dense implementation computes it (`text.Attention`
    evaluates the full [T, S] score matrix and masks it) -- the hardware FLOPs of that implementation.
The vision tower's attention is block-diagonal: windows of <= 8x8 patches and whole frames (pairs of
frames). `zoomer_jax.model.vision` packs the segments of one call into [segments, max_len] and computes
every padded slot; `padded=True` counts that, `padded=False` only the real pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from zoomer_jax.model.config import TextConfig, VisionConfig


FLASH_BACKWARD_OVER_FORWARD = 3.5


# ------------------------------------------------------------------ text decoder
def text_matmul_flops_per_token(t: TextConfig) -> dict[str, int]:
  """Forward dense-layer FLOPs of one token through all decoder layers, by projection (no lm_head)."""
  d, h, n_layers = t.hidden_size, t.head_dim, t.num_hidden_layers
  q, kv = t.num_attention_heads * h, t.num_key_value_heads * h
  per_layer = dict(q_proj=2 * d * q, kv_proj=2 * 2 * d * kv, o_proj=2 * q * d, mlp=2 * 3 * d * t.intermediate_size)
  return {k: n_layers * v for k, v in per_layer.items()}


def text_down_proj_flops_per_token(t: TextConfig) -> int:
  """Forward FLOPs of the MLP's down projection in all layers: its output only joins the residual stream that a
  rematerialised layer keeps, so the remat recompute skips it."""
  return t.num_hidden_layers * 2 * t.intermediate_size * t.hidden_size


def lm_head_flops_per_token(t: TextConfig) -> int:
  return 2 * t.hidden_size * t.vocab_size


def attention_pairs(q_len: int, k_len: int, causal: bool) -> int:
  """(query, key) pairs of `q_len` queries that are the last `q_len` of `k_len` keys.

  Causal: query i (0-based among the queries) sees k_len - q_len + i + 1 keys.
  """
  if q_len > k_len:
    raise ValueError(f"{q_len} queries cannot be the last of {k_len} keys")
  if not causal:
    return q_len * k_len
  return q_len * (k_len - q_len) + q_len * (q_len + 1) // 2


def text_attention_flops(t: TextConfig, pairs: int) -> int:
  """Scores (2 n h) plus the weighted sum of values (2 n h) per pair, in every layer (GQA shares k/v
  between query heads but every query head still does its own dot products)."""
  return 4 * t.num_attention_heads * t.head_dim * t.num_hidden_layers * pairs


def text_forward_flops(t: TextConfig, q_len: int, k_len: int | None = None, *, causal: bool,
                       logit_tokens: int | None = None) -> dict[str, int]:
  """One forward of `q_len` new tokens over a context of `k_len` (default q_len) keys.

  `logit_tokens`: tokens whose lm_head logits are computed (default all q_len). Returns FLOPs by part:
  dense (the layers' projections), attention, lm_head.
  """
  k_len = q_len if k_len is None else k_len
  logit_tokens = q_len if logit_tokens is None else logit_tokens
  return dict(dense=q_len * sum(text_matmul_flops_per_token(t).values()),
              attention=text_attention_flops(t, attention_pairs(q_len, k_len, causal)),
              lm_head=logit_tokens * lm_head_flops_per_token(t))


# ------------------------------------------------------------------ vision tower
def vision_segments(v: VisionConfig, grids_thw: Iterable[Sequence[int]]) -> tuple[list[int], list[int]]:
  """Segment lengths in patches: (windows, frames) for the items with these (t, h, w) grids.

  Windows are `window_units` x `window_units` merged units (4 patches each) read per frame in raster
  order; edge windows are smaller. Frames are the h*w patches of each temporal index.
  """
  m, wu = v.spatial_merge_size, v.window_units
  windows, frames = [], []
  for t, h, w in grids_thw:
    if h % m or w % m:
      raise ValueError(f"grid {(t, h, w)}: height and width must be multiples of spatial_merge_size={m}")
    lh, lw = h // m, w // m
    rows = [min(wu, lh - y) for y in range(0, lh, wu)]
    cols = [min(wu, lw - x) for x in range(0, lw, wu)]
    windows += [r * c * m * m for r in rows for c in cols] * t
    frames += [h * w] * t
  return windows, frames


@dataclasses.dataclass(frozen=True)
class VisionFlops:
  patch_embed: int
  dense: int  # qkv, proj and the SwiGLU in every block
  window_attention: int
  full_attention: int
  merger: int

  @property
  def total(self) -> int:
    return self.patch_embed + self.dense + self.window_attention + self.full_attention + self.merger


def vision_dense_flops_per_patch(v: VisionConfig) -> int:
  d, i = v.hidden_size, v.intermediate_size
  return v.depth * 2 * (d * 3 * d + d * d + 3 * d * i)


def vision_merger_flops_per_token(v: VisionConfig) -> int:
  """Per merged (LLM) token: fc1 [4d, 4d] and fc2 [4d, out]."""
  mdim = v.hidden_size * v.spatial_merge_size**2
  return 2 * (mdim * mdim + mdim * v.out_hidden_size)


def vision_forward_flops(v: VisionConfig, grids_thw: Sequence[Sequence[int]], *, padded: bool) -> VisionFlops:
  """One forward of the tower over these items together (one call packs all their segments)."""
  grids = [tuple(int(x) for x in g) for g in grids_thw]
  patches = sum(t * h * w for t, h, w in grids)
  windows, frames = vision_segments(v, grids)
  n_full = sum(1 for i in range(v.depth) if i in set(v.fullatt_block_indexes))
  n_window = v.depth - n_full

  def attn(lengths: list[int]) -> int:
    if not lengths:
      return 0
    pairs = len(lengths) * max(lengths) ** 2 if padded else sum(n * n for n in lengths)
    return 4 * v.hidden_size * pairs  # scores + values over all heads: 2 * 2 * heads * head_dim

  return VisionFlops(
      patch_embed=2 * v.patch_dim * v.hidden_size * patches,
      dense=vision_dense_flops_per_patch(v) * patches,
      window_attention=n_window * attn(windows),
      full_attention=n_full * attn(frames),
      merger=vision_merger_flops_per_token(v) * (patches // v.spatial_merge_size**2),
  )
