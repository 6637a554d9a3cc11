"""Frames -> Qwen2.5-VL pixel rows (reference §5): smart_resize, CLIP normalisation, patchify.

numpy/OpenCV only (no torch, no PIL in the hot path).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """transformers' rule: round to multiples of `factor`, then rescale into [min_pixels, max_pixels]."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"aspect ratio of {height}x{width} exceeds 200")
  h, w = round(height / factor) * factor, round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
  return h, w


def resize(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of uint8 RGB frames [T, H, W, 3] with OpenCV."""
  return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_CUBIC) for f in frames_thwc])


def patchify(frames_thwc: np.ndarray, patch: int = 14, temporal: int = 2, merge: int = 2
             ) -> tuple[np.ndarray, np.ndarray]:
  """RGB frames [T, H, W, 3] (H, W multiples of patch*merge) -> (pixel rows [N, 3*T*P*P], grid [3]).

  Rescale 1/255, CLIP-normalise, pad T to a multiple of `temporal` with the last frame, then order
  rows as (t, h/merge, w/merge, merge, merge) with each row flattened as (C, T, P, P).
  """
  t, h, w, c = frames_thwc.shape
  if h % (patch * merge) or w % (patch * merge):
    raise ValueError(f"frame size {h}x{w} is not a multiple of {patch * merge}")
  x = (frames_thwc.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  if t % temporal:
    x = np.concatenate([x, np.repeat(x[-1:], temporal - t % temporal, axis=0)])
  gt, gh, gw = x.shape[0] // temporal, h // patch, w // patch
  x = x.transpose(0, 3, 1, 2)  # T, C, H, W
  x = x.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return x.reshape(gt * gh * gw, c * temporal * patch * patch), np.array([gt, gh, gw])
