"""Qwen2.5-VL: vision tower + Qwen2 decoder, with vision features scattered into pad tokens.

Two levels of API:
  * `Qwen25VL.forward(...)` and `Qwen25VL.encode_vision(...)` are pure traced functions of arrays
    (positions, layouts and caches prepared by the caller) for jitted loops such as the sampler;
  * `model(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, ...)` takes
    transformers' argument names, prepares everything on the host and runs one jitted forward;
    `prefill` / `decode` do the same around a KV cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.kv_cache import KVCache
from zoomer_jax.model.layers import FEW_ROWS, Linear, pad_single_row, precision_for
from zoomer_jax.model.mrope import rope_index, text_positions
from zoomer_jax.model.text import TextDecoder
from zoomer_jax.model.vision import VisionTower
from zoomer_jax.model.vision_layout import VisionLayout, num_tokens, vision_layout

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[dtype])
  return jnp.dtype(dtype)


@struct.dataclass
class VisionInput:
  """Pixel rows of one modality (images or videos) and their layout."""

  pixels: jax.Array  # [N, patch_dim]
  layout: VisionLayout


def scatter_features(x_btd: jax.Array, ids_bt: jax.Array, token_id: int, feats_nd: jax.Array) -> jax.Array:
  """Writes feats rows, in row-major (batch, seq) order, into the positions where ids == token_id."""
  hit = ids_bt == token_id
  row = jnp.clip(jnp.cumsum(hit.reshape(-1)) - 1, 0, feats_nd.shape[0] - 1).reshape(hit.shape)
  return jnp.where(hit[..., None], feats_nd.astype(x_btd.dtype)[row], x_btd)


class Qwen25VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in Flax NNX; parameter paths mirror HF's module names."""

  def __init__(self, config: ModelConfig, *, dtype="float32", rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = resolve_dtype(dtype)
    self.visual = VisionTower(config.vision, dtype=self.dtype, rngs=rngs)
    self.model = TextDecoder(config.text, dtype=self.dtype, rngs=rngs)
    t = config.text
    self.lm_head = None if t.tie_word_embeddings else Linear(
        (t.hidden_size,), (t.vocab_size,), axes=("embed", "vocab"), use_bias=False, dtype=self.dtype,
        rngs=rngs)

  # ------------------------------------------------------------------ traced pieces
  def encode_vision(self, vision: VisionInput, *, frozen_blocks: bool = False) -> jax.Array:
    """[N, patch_dim] pixel rows -> [N/4, d] features in placeholder order (`frozen_blocks`: see VisionTower)."""
    return self.visual(vision.pixels, vision.layout, frozen_blocks=frozen_blocks)

  def embed(self, ids_bt: jax.Array, image_feats: jax.Array | None = None,
            video_feats: jax.Array | None = None) -> jax.Array:
    """Token embeddings with image then video features written over their pad tokens; [B, T, d]."""
    x_btd = self.model.embed_tokens(ids_bt)
    if image_feats is not None:
      x_btd = scatter_features(x_btd, ids_bt, self.config.image_token_id, image_feats)
    if video_feats is not None:
      x_btd = scatter_features(x_btd, ids_bt, self.config.video_token_id, video_feats)
    return x_btd

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """Final hidden states -> fp32 logits [B, T, vocab]."""
    if self.lm_head is not None:
      return self.lm_head(h_btd).astype(jnp.float32)
    table = self.model.embed_tokens.embedding[...]
    b, t, d = h_btd.shape
    prec = precision_for(self.dtype)
    # On CPU, logits for at most `layers.FEW_ROWS` rows (decode steps) are computed as table [V, d] x hidden^T:
    # with the table as the left operand XLA:CPU streams it once (22 GB/s at 8 rows here), where hidden x
    # table^T repacks it and reads it about twice as slowly. The barrier keeps XLA from folding the final
    # transpose back into the matmul's output layout, which would bring the slow kernel back.
    if b * t > FEW_ROWS or jax.default_backend() != "cpu":
      z_btv = jnp.einsum("btd,vd->btv", h_btd, table, precision=prec, preferred_element_type=jnp.float32)
    else:  # decode: the table as the GEMM's row operand
      h_rd = h_btd.reshape(b * t, d).astype(table.dtype)
      if pad_single_row(b * t, self.dtype):
        h_rd = jnp.broadcast_to(h_rd, (2, d))
      z_vr = jnp.einsum("vd,rd->vr", table, h_rd, precision=prec, preferred_element_type=jnp.float32)
      z_btv = jax.lax.optimization_barrier(z_vr)[:, :b * t].T.reshape(b, t, -1)
    return z_btv.astype(self.dtype).astype(jnp.float32)

  def forward(self, ids_bt: jax.Array, positions_3bt: jax.Array, token_mask_bt: jax.Array, *,
              images: VisionInput | None = None, videos: VisionInput | None = None,
              cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Returns (fp32 logits [B, T, vocab], updated cache)."""
    image_feats = None if images is None else self.encode_vision(images)
    video_feats = None if videos is None else self.encode_vision(videos)
    x_btd = self.embed(ids_bt, image_feats, video_feats)
    h_btd, cache = self.model(x_btd, positions_3bt, token_mask_bt, cache)
    return self.logits(h_btd), cache

  # ------------------------------------------------------------------ host-level API (HF names)
  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
               position_ids=None) -> jax.Array:
    """transformers-style forward: returns fp32 logits [B, L, vocab].

    `position_ids` [3, B, L] overrides the 3-D positions computed from the grids.
    """
    prep = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                          pixel_values_videos, video_grid_thw, second_per_grid_ts)
    positions = prep.positions
    if position_ids is not None:
      positions = jnp.asarray(position_ids, jnp.int32)
      if positions.shape != (3,) + prep.ids.shape:
        raise ValueError(f"position_ids must have shape {(3,) + prep.ids.shape}, got {positions.shape}")
    logits, _ = _jit_forward(self, prep.ids, positions, prep.token_mask, prep.images, prep.videos, None)
    return logits

  def init_cache(self, batch: int, size: int) -> KVCache:
    return KVCache.init(self.config.text, batch, size, self.dtype)

  def prefill(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
              cache_size: int) -> tuple[jax.Array, KVCache, jax.Array]:
    """Forward over the prompt into a fresh cache of `cache_size` slots.

    Returns (logits [B, L, vocab], cache, next_position [B]) where next_position is the M-RoPE
    position of the next token on all three axes (max prompt position + 1).
    """
    prep = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                          pixel_values_videos, video_grid_thw, second_per_grid_ts)
    b, length = prep.ids.shape
    if length > cache_size:
      raise ValueError(f"prompt of {length} tokens does not fit a cache of {cache_size} slots")
    logits, cache = _jit_forward(self, prep.ids, prep.positions, prep.token_mask, prep.images,
                                 prep.videos, self.init_cache(b, cache_size))
    return logits, cache, jnp.asarray(prep.next_position)

  def decode(self, token_ids, cache: KVCache, next_position) -> tuple[jax.Array, KVCache, jax.Array]:
    """Appends text tokens [B, T] to the cache; returns (logits [B, T, vocab], cache, next_position)."""
    ids = jnp.asarray(token_ids, jnp.int32)
    if ids.ndim != 2:
      raise ValueError(f"token_ids must be [batch, length], got shape {ids.shape}")
    if int(cache.length) + ids.shape[1] > cache.size:
      raise ValueError(f"{ids.shape[1]} more tokens overflow the cache ({int(cache.length)} of "
                       f"{cache.size} slots used)")
    next_position = jnp.asarray(next_position, jnp.int32)
    positions = text_positions(next_position, ids.shape[1])
    logits, cache = _jit_forward(self, ids, positions, jnp.ones(ids.shape, bool), None, None, cache)
    return logits, cache, next_position + ids.shape[1]


# graph_updates=False: the forward never changes the model, so its parameters are not returned (by default
# nnx.jit hands every parameter back as an output, which XLA serves with a copy of all the weights per call).
@nnx.jit(graph_updates=False)
def _jit_forward(model: Qwen25VL, ids, positions, token_mask, images, videos, cache):
  return model.forward(ids, positions, token_mask, images=images, videos=videos, cache=cache)


@struct.dataclass
class PreparedInputs:
  ids: Any
  positions: Any
  token_mask: Any
  next_position: Any
  images: VisionInput | None
  videos: VisionInput | None


def _vision_input(cfg: ModelConfig, pixels, grid, kind: str, ids: np.ndarray, token_id: int):
  if pixels is None and grid is None:
    if (ids == token_id).any():
      raise ValueError(f"input_ids hold {kind} pad tokens but no {kind} pixels were given")
    return None
  if pixels is None or grid is None:
    raise ValueError(f"{kind}: pixel values and grid_thw must be given together")
  grid = np.asarray(grid, np.int64).reshape(-1, 3)
  pixels = np.asarray(pixels) if not isinstance(pixels, jax.Array) else pixels
  n_rows = int(grid.prod(-1).sum())
  if pixels.shape != (n_rows, cfg.vision.patch_dim):
    raise ValueError(f"{kind} pixel values have shape {tuple(pixels.shape)}, grids {grid.tolist()} need "
                     f"({n_rows}, {cfg.vision.patch_dim})")
  n_tok = int((ids == token_id).sum())
  if n_tok != num_tokens(grid, cfg.vision.spatial_merge_size):
    raise ValueError(f"{kind} features and tokens do not match: input_ids hold {n_tok} {kind} pad tokens, "
                     f"grids give {num_tokens(grid, cfg.vision.spatial_merge_size)}")
  return VisionInput(pixels=jnp.asarray(pixels), layout=vision_layout(grid, cfg.vision))


def prepare_inputs(cfg: ModelConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> PreparedInputs:
  """Host-side work for one forward: 3-D positions, vision layouts, and shape checks."""
  ids = np.asarray(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  mask = mask.reshape(ids.shape)
  images = _vision_input(cfg, pixel_values, image_grid_thw, "image", ids, cfg.image_token_id)
  videos = _vision_input(cfg, pixel_values_videos, video_grid_thw, "video", ids, cfg.video_token_id)
  positions, deltas = rope_index(ids, cfg, attention_mask=mask, image_grid_thw=image_grid_thw,
                                 video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
  return PreparedInputs(ids=jnp.asarray(ids, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
                        token_mask=jnp.asarray(mask), next_position=(deltas + mask.sum(-1)).astype(np.int32),
                        images=images, videos=videos)
