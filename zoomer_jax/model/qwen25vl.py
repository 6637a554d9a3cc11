"""Qwen2.5-VL: vision tower + Qwen2 decoder, with vision features scattered into pad tokens.

Two levels of API:
  * `Qwen25VL.forward(...)` and `Qwen25VL.encode_vision(...)` are pure traced functions of arrays
    (positions, layouts and caches prepared by the caller) for jitted loops such as the sampler;
  * `model(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, ...)` takes
    transformers' argument names, prepares everything on the host and runs one jitted forward;
    `prefill` / `decode` do the same around a KV cache.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.kv_cache import KVCache
from zoomer_jax.model.layers import FEW_ROWS, Linear, pads_single_row, precision_for
from zoomer_jax.model.mrope import rope_index, text_positions
from zoomer_jax.model.options import ModelOptions
from zoomer_jax.model.paged import PagedCache
from zoomer_jax.model.text import TextDecoder
from zoomer_jax.model.vision import VisionTower
from zoomer_jax.model.vision_layout import (LayoutSizes, VisionLayout, batch_layout, layout_sizes, num_tokens,
                                           piece_rows)
from zoomer_jax.parallel.rules import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[dtype])
  return jnp.dtype(dtype)


@struct.dataclass
class VisionInput:
  """Pixel rows of one modality (images or videos), per batch row, and their layouts.

  pixels [R, N, patch_dim]: row r's images, in placeholder order, split into the layout's pieces (each padded
  with blank rows to N / pieces); layout leaves [R, ...] (`vision_layout.batch_layout`). Row r's features go to
  row r's pad tokens."""

  pixels: jax.Array  # [R, N, patch_dim]
  layout: VisionLayout


def vision_input(cfg: ModelConfig, pixels: Sequence[np.ndarray | None], grids: Sequence[np.ndarray | None], *,
                 image_bucket: int = 0, sizes: LayoutSizes | None = None, pieces: int = 1) -> VisionInput | None:
  """Per-row pixel rows and grids (None or empty for rows without images) as one padded `VisionInput` (numpy
  leaves); None when no row has an image. The padded shapes are `sizes`, or fitted to these rows
  (`vision_layout.layout_sizes`, with `image_bucket` and `pieces`)."""
  grids = [np.zeros((0, 3), np.int64) if g is None else np.asarray(g, np.int64).reshape(-1, 3) for g in grids]
  if sizes is None and not any(len(g) for g in grids):
    return None
  sizes = layout_sizes(grids, cfg.vision, image_bucket, pieces) if sizes is None else sizes
  out = np.zeros((len(grids), sizes.patches, cfg.vision.patch_dim), np.float32)
  for r, (p, g) in enumerate(zip(pixels, grids)):
    n = int(g.prod(-1).sum())
    if n:
      p = np.asarray(p)
      if p.shape != (n, cfg.vision.patch_dim):
        raise ValueError(f"row {r}: pixel values have shape {tuple(p.shape)}, its grids {g.tolist()} need "
                         f"({n}, {cfg.vision.patch_dim})")
      for src, dst, k in piece_rows(g, sizes):
        out[r, dst:dst + k] = p[src:src + k]
  return VisionInput(pixels=out, layout=batch_layout(grids, cfg.vision, sizes))


def scatter_features(x_btd: jax.Array, ids_bt: jax.Array, token_id: int, feats_rmd: jax.Array) -> jax.Array:
  """Writes row r's feature rows [M, d], in order, into row r's positions where ids == token_id (at most M of
  them, as batches are built: every placeholder has its own feature row)."""
  hit = ids_bt == token_id
  row = jnp.clip(jnp.cumsum(hit, axis=1, dtype=jnp.int32) - 1, 0, feats_rmd.shape[1] - 1)
  return _place_features(x_btd, feats_rmd.astype(x_btd.dtype), hit, row)


@jax.custom_vjp
def _place_features(x_btd, feats_bmd, hit_bt, row_bt):
  feats_btd = jnp.take_along_axis(feats_bmd, row_bt[..., None], axis=1)
  return jnp.where(hit_bt[..., None], feats_btd, x_btd)


def _place_features_fwd(x_btd, feats_bmd, hit_bt, row_bt):
  # The position of each feature row's placeholder (T where it has none), so that the gradient is a gather where
  # autodiff's transpose of the forward's gather would scatter-add (a sort and a scatter on TPU). Computed here,
  # not in the forward, so that a forward without a gradient (inference) pays nothing for it.
  nth = jnp.arange(1, feats_bmd.shape[1] + 1, dtype=jnp.int32)
  count = jnp.cumsum(hit_bt, axis=1, dtype=jnp.int32)
  # scan_unrolled: log2(T) steps and no while loop (a cost probe's analysis would count a loop body once).
  where = jax.vmap(lambda c: jnp.searchsorted(c, nth, side="left", method="scan_unrolled"))(count)
  return _place_features(x_btd, feats_bmd, hit_bt, row_bt), (hit_bt, where.astype(jnp.int32))


def _place_features_bwd(res, g_btd):
  hit_bt, where_bm = res
  t = g_btd.shape[1]
  g_bmd = jnp.take_along_axis(g_btd, jnp.minimum(where_bm, t - 1)[..., None], axis=1)
  g_bmd = jnp.where((where_bm < t)[..., None], g_bmd, 0)
  return jnp.where(hit_bt[..., None], 0, g_btd), g_bmd, None, None


_place_features.defvjp(_place_features_fwd, _place_features_bwd)


class Qwen25VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in Flax NNX; parameter paths mirror HF's module names (a scanned model,
  `ModelOptions.scan_layers`, stacks `model.layers.*` and `visual.blocks.*` along a leading axis)."""

  def __init__(self, config: ModelConfig, *, dtype="float32", rngs: nnx.Rngs | None = None,
               options: ModelOptions = ModelOptions()):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = resolve_dtype(dtype)
    self.options = options
    self.visual = VisionTower(config.vision, dtype=self.dtype, rngs=rngs, options=options)
    self.model = TextDecoder(config.text, dtype=self.dtype, rngs=rngs, options=options)
    t = config.text
    self.lm_head = None if t.tie_word_embeddings else Linear(
        (t.hidden_size,), (t.vocab_size,), axes=("embed", "vocab"), use_bias=False, dtype=self.dtype,
        rngs=rngs)

  # ------------------------------------------------------------------ traced pieces
  def encode_vision(self, vision: VisionInput, *, frozen_blocks: bool = False,
                    remat_policy: str = "none") -> jax.Array:
    """[R, N, patch_dim] pixel rows -> [R, N/4, d] features in placeholder order (`frozen_blocks`: see
    VisionTower)."""
    return self.visual(vision.pixels, vision.layout, frozen_blocks=frozen_blocks, remat_policy=remat_policy)

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
      z = self.lm_head(h_btd).astype(jnp.float32)
    else:
      z = self._tied_logits(h_btd)
    return constrain(z, ("activation_batch", "activation_length", "activation_vocab"), self.options.rules)

  def _tied_logits(self, h_btd: jax.Array) -> jax.Array:
    table = self.model.embed_tokens.embedding[...]
    b, t, d = h_btd.shape
    prec = precision_for(self.dtype)

    def general(h):
      return jnp.einsum("btd,vd->btv", h, table, precision=prec, preferred_element_type=jnp.float32)

    # Compiled for CPU, logits for at most `layers.FEW_ROWS` rows (decode steps) are table [V, d] x hidden^T:
    # with the table as the left operand XLA:CPU streams it once, where hidden x table^T repacks it and reads it
    # about twice as slowly. The barrier keeps XLA from folding the final transpose back into the matmul's
    # output layout, which would bring the slow kernel back.
    def cpu_few_rows(h):
      h_rd = h.reshape(b * t, d).astype(table.dtype)
      if pads_single_row(b * t, self.dtype):
        h_rd = jnp.broadcast_to(h_rd, (2, d))
      z_vr = jnp.einsum("vd,rd->vr", table, h_rd, precision=prec, preferred_element_type=jnp.float32)
      return jax.lax.optimization_barrier(z_vr)[:, :b * t].T.reshape(b, t, -1)

    z_btv = general(h_btd) if b * t > FEW_ROWS else jax.lax.platform_dependent(h_btd, cpu=cpu_few_rows,
                                                                                default=general)
    return z_btv.astype(self.dtype).astype(jnp.float32)

  def forward(self, ids_bt: jax.Array, positions_3bt: jax.Array, token_mask_bt: jax.Array, *,
              images: VisionInput | None = None, videos: VisionInput | None = None,
              cache: KVCache | PagedCache | None = None, logits_at: Any = "all", remat_policy: str = "none",
              freeze_vision: bool | str = False) -> tuple[jax.Array, KVCache | None]:
    """The one trunk: vision, embedding, decoder, head. Returns (output, updated cache), where the output is

      * `logits_at="all"`: fp32 logits [B, T, vocab];
      * `logits_at` an int array [B]: the logits at that position of each row, [B, vocab] (prefill, extend);
        with a `PagedCache` (one row of a ragged step's T tokens) an array [S] of rows: [S, vocab];
      * `logits_at=None`: the final-norm hidden states [B, T, d] (the trainer applies the head in chunks).

    `remat_policy` rematerialises decoder layers and vision blocks in the backward pass; `freeze_vision`
    (`train.optim.FREEZE_VISION`): True, no gradient reaches the vision tower; "blocks", none reaches its patch
    embedding and blocks (the merger trains).
    """
    def features(vision):
      if vision is None:
        return None
      feats = self.encode_vision(vision, frozen_blocks=freeze_vision == "blocks", remat_policy=remat_policy)
      return jax.lax.stop_gradient(feats) if freeze_vision is True else feats

    x_btd = self.embed(ids_bt, features(images), features(videos))
    h_btd, cache = self.model(x_btd, positions_3bt, token_mask_bt, cache, remat_policy=remat_policy)
    if logits_at is None:
      return h_btd, cache
    if isinstance(logits_at, str):
      if logits_at != "all":
        raise ValueError(f"logits_at must be 'all', None or an index array, got {logits_at!r}")
      return self.logits(h_btd), cache
    h_bd = h_btd[jnp.arange(h_btd.shape[0]), logits_at]
    return self.logits(h_bd[:, None])[:, 0], cache

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
    return KVCache.init(self.config.text, batch, size, self.dtype, stacked=self.options.scan_layers)

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


def _vision_input(cfg: ModelConfig, pixels, grid, kind: str, ids: np.ndarray, mask: np.ndarray, token_id: int,
                  image_bucket: int):
  """HF's flat pixel rows and grids (images in batch-major order of their pad runs) as a per-row VisionInput."""
  if pixels is None and grid is None:
    if (ids[mask] == token_id).any():
      raise ValueError(f"input_ids hold {kind} pad tokens but no {kind} pixels were given")
    return None
  if pixels is None or grid is None:
    raise ValueError(f"{kind}: pixel values and grid_thw must be given together")
  grid = np.asarray(grid, np.int64).reshape(-1, 3)
  pixels = np.asarray(pixels)
  n_rows = int(grid.prod(-1).sum())
  if pixels.shape != (n_rows, cfg.vision.patch_dim):
    raise ValueError(f"{kind} pixel values have shape {tuple(pixels.shape)}, grids {grid.tolist()} need "
                     f"({n_rows}, {cfg.vision.patch_dim})")
  merge = cfg.vision.spatial_merge_size
  n_tok = int((ids[mask] == token_id).sum())
  if n_tok != num_tokens(grid, merge):
    raise ValueError(f"{kind} features and tokens do not match: input_ids hold {n_tok} {kind} pad tokens, "
                     f"grids give {num_tokens(grid, merge)}")
  tokens = grid.prod(-1) // merge**2
  starts = np.concatenate([[0], np.cumsum(grid.prod(-1))])
  row_pixels, row_grids, first = [], [], 0
  for r in range(ids.shape[0]):
    want, last, taken = int((ids[r][mask[r]] == token_id).sum()), first, 0
    while taken < want and last < len(grid):
      taken, last = taken + int(tokens[last]), last + 1
    if taken != want:
      raise ValueError(f"{kind}s do not split at row {r}: it holds {want} {kind} pad tokens, the next {kind}s "
                       f"give {taken}")
    row_grids.append(grid[first:last])
    row_pixels.append(pixels[starts[first]:starts[last]])
    first = last
  return vision_input(cfg, row_pixels, row_grids, image_bucket=image_bucket)


def prepare_inputs(cfg: ModelConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
                   image_bucket: int = 0) -> PreparedInputs:
  """Host-side work for one forward: 3-D positions, per-row vision inputs (`image_bucket`: see
  `vision_layout.layout_sizes`), and shape checks."""
  ids = np.asarray(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  mask = mask.reshape(ids.shape)
  images = _vision_input(cfg, pixel_values, image_grid_thw, "image", ids, mask, cfg.image_token_id, image_bucket)
  videos = _vision_input(cfg, pixel_values_videos, video_grid_thw, "video", ids, mask, cfg.video_token_id,
                         image_bucket)
  positions, deltas = rope_index(ids, cfg, attention_mask=mask, image_grid_thw=image_grid_thw,
                                 video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
  return PreparedInputs(ids=jnp.asarray(ids, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
                        token_mask=jnp.asarray(mask), next_position=(deltas + mask.sum(-1)).astype(np.int32),
                        images=images, videos=videos)
