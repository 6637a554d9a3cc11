"""Multimodal RoPE: 3-D (temporal, height, width) position ids and the decoder's cos/sin tables.

`rope_index` is host-side numpy (it walks token ids and grids, both concrete); `mrope_cos_sin` is
traced inside the jitted decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoomer_jax.model.config import POSITION_RULES, ModelConfig, TextConfig


def _temporal_positions(t: int, tokens_per_second: float, second_per_grid: float, mode: str) -> np.ndarray:
  """Temporal offsets of a video's t grids: floor(t * tps * spg) in float32, or with spg truncated."""
  if mode == "int":  # transformers 4.52 - 5.12 truncate the interval to an integer first
    return np.arange(t) * int(tokens_per_second) * int(second_per_grid)
  interval = np.float32(tokens_per_second) * np.float32(second_per_grid)
  return np.floor(np.arange(t, dtype=np.float32) * interval).astype(np.int64)


def _vision_block_positions(start: int, grid, t_pos: np.ndarray, merge: int) -> np.ndarray:
  """[3, t*lh*lw] positions of one image/video block starting at `start` (t slowest, w fastest)."""
  _, h, w = (int(g) for g in grid)
  lh, lw = h // merge, w // merge
  tt, hh, ww = np.meshgrid(t_pos, np.arange(lh), np.arange(lw), indexing="ij")
  return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start


def rope_index(input_ids: np.ndarray, cfg: ModelConfig, *, attention_mask: np.ndarray | None = None,
               image_grid_thw: np.ndarray | None = None, video_grid_thw: np.ndarray | None = None,
               second_per_grid_ts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """3-D positions [3, B, L] and rope deltas [B] (max position + 1 - unpadded length).

  Walks each sequence's unpadded tokens: text advances by one on all axes; a run of image (video)
  pad tokens takes the next image (video) grid, in batch-major order of appearance, and consumes
  exactly t*h*w/merge^2 tokens. The temporal step is 0 for images and
  tokens_per_second * second_per_grid_t for videos. Padding slots get position 0.
  """
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  b, length = input_ids.shape
  mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
  temporal, advance = POSITION_RULES[cfg.position_rule]
  merge = cfg.vision.spatial_merge_size
  grids = {cfg.image_token_id: _as_grid(image_grid_thw, "image_grid_thw"),
           cfg.video_token_id: _as_grid(video_grid_thw, "video_grid_thw")}
  used = {cfg.image_token_id: 0, cfg.video_token_id: 0}
  n_videos = len(grids[cfg.video_token_id])
  spg = (np.ones(n_videos, np.float32) if second_per_grid_ts is None
         else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
  if len(spg) != n_videos:
    raise ValueError(f"second_per_grid_ts has {len(spg)} entries for {n_videos} videos")

  positions = np.zeros((3, b, length), np.int64)
  deltas = np.zeros((b,), np.int64)
  for bi in range(b):
    ids = input_ids[bi][mask[bi]]
    out = np.empty((3, len(ids)), np.int64)
    cur, i = 0, 0
    while i < len(ids):
      tok = int(ids[i])
      if tok not in grids:
        out[:, i] = cur
        cur, i = cur + 1, i + 1
        continue
      kind = "image" if tok == cfg.image_token_id else "video"
      k = used[tok]
      if k >= len(grids[tok]):
        raise ValueError(f"more {kind} placeholder runs in input_ids than {kind} grids "
                         f"({len(grids[tok])}) were given")
      grid = grids[tok][k]
      used[tok] = k + 1
      n = int(np.prod(grid)) // (merge * merge)
      if i + n > len(ids) or (ids[i:i + n] != tok).any():
        got = int(np.argmax(np.append(ids[i:i + n] != tok, True)))
        raise ValueError(f"{kind} {k} with grid {list(grid)} needs {n} consecutive <{kind} pad> tokens, "
                         f"sequence {bi} has {got} at position {i}")
      if kind == "video":
        t_pos = _temporal_positions(int(grid[0]), cfg.vision.tokens_per_second, float(spg[k]), temporal)
      else:  # an image's temporal step: 0, but 1 in transformers >= 5.23 (matters only for t > 1)
        t_pos = np.arange(grid[0]) * (1 if cfg.position_rule == "hf_5.23" else 0)
      block = _vision_block_positions(cur, grid, t_pos, merge)
      out[:, i:i + n] = block
      i += n
      cur = int(block.max()) + 1 if advance == "max_plus_one" else cur + max(grid[1], grid[2]) // merge
    positions[:, bi, mask[bi]] = out
    deltas[bi] = (int(out.max()) + 1 if out.size else 0) - len(ids)
  for tok, name in ((cfg.image_token_id, "image"), (cfg.video_token_id, "video")):
    if used[tok] != len(grids[tok]):
      raise ValueError(f"{len(grids[tok])} {name} grids were given but input_ids hold "
                       f"{used[tok]} {name} placeholder runs")
  return positions, deltas


def _as_grid(grid, name) -> np.ndarray:
  if grid is None:
    return np.zeros((0, 3), np.int64)
  grid = np.asarray(grid, np.int64)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"{name} must have shape [num_items, 3], got {grid.shape}")
  return grid


def mrope_cos_sin(positions_3bt: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, head_dim]: frequency slot j takes the t, h or w position per `mrope_section`.

  Angles in fp32, then cast to the activation dtype (HF applies the rotation in that dtype).
  """
  half = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  axis_of_slot = np.repeat(np.arange(3), cfg.mrope_section)  # [half]
  pos = positions_3bt.astype(jnp.float32)[axis_of_slot]  # [half, B, T]
  freqs = jnp.moveaxis(pos, 0, -1) * inv_freq[:half]  # [B, T, half]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def text_positions(start: jax.Array, length: int) -> jax.Array:
  """[3, B, length] positions start, start+1, ... on all three axes (decoded text); start [B]."""
  pos = start[:, None] + jnp.arange(length, dtype=start.dtype)[None, :]
  return jnp.broadcast_to(pos[None], (3,) + pos.shape)

