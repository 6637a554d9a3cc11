"""Frames -> pixel rows against transformers' Qwen2VLImageProcessorPil and VideoZoomer's PIL resize.

Normalisation and patchify must equal the HF processor on the same already-resized frames. Our OpenCV resize
is compared with the original's PIL pipeline (LANCZOS to the budget, then the processor's BICUBIC to multiples
of 28): sizes must agree exactly; the pixel difference is recorded (`measure`) and only loosely bounded.
"""

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import media
from zoomer_jax.video import preprocess as pp

import PIL.Image as PIL  # noqa: N812
import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as hf_pil

# Tolerances (max abs unless stated).
PATCHIFY_VS_HF = 1e-5  # normalised values, same uint8 input
RESIZE_MEAN_LEVELS = 4.0  # loose: mean |ours - PIL| in uint8 levels after both resizes (measured 0.3-1.5)


def hf_processor(**kw):
  return hf_pil.Qwen2VLImageProcessorPil(min_pixels=pp.IMAGE_MIN_PIXELS, max_pixels=pp.IMAGE_MAX_PIXELS, **kw)


def original_size(h, w, max_pixels=pp.MAX_PIXELS, min_pixels=pp.MIN_PIXELS):
  """function_tools.py::extract_video_clip / multimodal_dataset.py::process_video, the size rule."""
  current_pixels = h * w
  if current_pixels > max_pixels:
    scale_factor = np.sqrt(max_pixels / current_pixels)
    new_w = int(w * scale_factor)
    new_h = int(h * scale_factor)
    if new_h * new_w < min_pixels:
      min_scale_factor = np.sqrt(min_pixels / (new_h * new_w))
      new_h = int(new_h * min_scale_factor)
      new_w = int(new_w * min_scale_factor)
    return new_h, new_w
  return h, w


def original_budget(frame: np.ndarray):
  """The original's resize: PIL LANCZOS to original_size (frames within the budget untouched)."""
  img = PIL.fromarray(frame)
  h, w = original_size(*frame.shape[:2])
  return img if (h, w) == frame.shape[:2] else img.resize((w, h), PIL.LANCZOS)


def natural(rng, h, w):
  """A photo-like frame: smooth noise at three scales, a bright box, text."""
  img = np.zeros((h, w, 3), np.float32)
  for s in (9, 27, 81):
    noise = rng.normal(size=(h // s + 2, w // s + 2, 3)).astype(np.float32)
    img += cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC) * 40
  img = (img + 128).clip(0, 255).astype(np.uint8)
  cv2.rectangle(img, (w // 12, h // 8), (w // 3, h // 3), (250, 250, 250), -1)
  cv2.putText(img, "VideoZoomer 12:34", (w // 3, h * 5 // 6), cv2.FONT_HERSHEY_SIMPLEX, h / 300, (0, 0, 0), 2)
  return img


@pytest.mark.parametrize("hw", [(56, 56), (224, 420), (252, 308), (28 * 20, 28 * 36), (84, 1680)])
def test_patchify_images_matches_hf(rng, hw):
  frames = rng.integers(0, 256, (3, *hw, 3), dtype=np.uint8)
  want = hf_processor(do_resize=False)(list(frames), return_tensors="np")
  pixels, grid = pp.patchify_images(frames)
  np.testing.assert_array_equal(grid, want["image_grid_thw"])
  assert pixels.dtype == np.float32 and pixels.shape == want["pixel_values"].shape == (3 * hw[0] * hw[1] // 196, 1176)
  assert np.abs(pixels - want["pixel_values"]).max() <= PATCHIFY_VS_HF
  # With the processor's own resize on: a no-op for such sizes, same rows.
  resized = hf_processor()(list(frames), return_tensors="np")
  assert np.abs(pixels - resized["pixel_values"]).max() <= PATCHIFY_VS_HF


def reference_video_rows(frames):
  """Qwen2.5-VL's patchify (transformers' image processor) in float: pad T to even, reshape (gt, 2, C, gh/2, 2, 14, gw/2, 2, 14), transpose, flatten."""
  x = (frames.astype(np.float32) / 255.0 - pp.CLIP_MEAN) / pp.CLIP_STD
  if len(x) % 2:
    x = np.concatenate([x, x[-1:]])
  t, h, w, c = x.shape
  x = x.transpose(0, 3, 1, 2).reshape(t // 2, 2, c, h // 28, 2, 14, w // 28, 2, 14)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return x.reshape(-1, c * 2 * 14 * 14), np.array([t // 2, h // 14, w // 14])


@pytest.mark.parametrize("t", [1, 2, 5, 8])
def test_video_form(rng, t):
  frames = rng.integers(0, 256, (t, 112, 196, 3), dtype=np.uint8)
  pixels, grid = pp.patchify(frames)
  want, want_grid = reference_video_rows(frames)
  np.testing.assert_array_equal(grid, want_grid)
  assert np.abs(pixels - want).max() <= PATCHIFY_VS_HF
  # A frame paired with itself is exactly the image form, i.e. the HF image processor's rows.
  image_rows, _ = pp.patchify_images(frames[:1])
  np.testing.assert_array_equal(pp.patchify(frames[:1])[0], image_rows)
  np.testing.assert_array_equal(pp.patchify(np.repeat(frames[:1], 2, 0))[0], image_rows)


def test_preprocess_video_outputs(rng):
  frames = rng.integers(0, 256, (16, 360, 640, 3), dtype=np.uint8)
  ts = np.linspace(301.3, 305.3, 16)
  out = pp.preprocess_video(frames, ts)
  assert out["video_grid_thw"].tolist() == [[8, 16, 30]]
  assert out["pixel_values_videos"].shape == (8 * 16 * 30, 1176)
  assert out["second_per_grid_ts"] == pytest.approx([2 * 4 / 15])
  assert pp.preprocess_video(frames[:1], [3.0])["second_per_grid_ts"] == pytest.approx([2.0])
  with pytest.raises(ValueError, match="timestamps"):
    pp.preprocess_video(frames[:2], [1.0])
  with pytest.raises(ValueError, match="decrease"):
    pp.preprocess_video(frames[:2], [2.0, 1.0])


@settings(max_examples=400, deadline=None)
@given(h=st.integers(8, 4000), w=st.integers(8, 4000))
def test_budget_size_matches_original(h, w):
  if max(h, w) / min(h, w) > 100:
    return
  want = original_size(h, w)
  assert pp.budget_size(h, w) == want
  bh, bw = want
  assert pp.model_size(h, w) == ((bh, bw), hf_pil.smart_resize(bh, bw, 28, pp.IMAGE_MIN_PIXELS, pp.IMAGE_MAX_PIXELS))


@settings(max_examples=400, deadline=None)
@given(h=st.integers(10, 5000), w=st.integers(10, 5000),
       bounds=st.sampled_from([(56 * 56, 28 * 28 * 1280), (pp.IMAGE_MIN_PIXELS, pp.IMAGE_MAX_PIXELS),
                               (pp.MIN_PIXELS, pp.MAX_PIXELS), (128 * 784, 768 * 784)]))
def test_smart_resize_matches_hf(h, w, bounds):
  if max(h, w) / min(h, w) > 200:
    with pytest.raises(ValueError, match="aspect"):
      pp.smart_resize(h, w, 28, *bounds)
    return
  assert pp.smart_resize(h, w, 28, *bounds) == hf_pil.smart_resize(h, w, 28, *bounds)


def original_pipeline(frames):
  """VideoZoomer's frames: PIL LANCZOS to the budget, then the HF processor (PIL BICUBIC to multiples of 28)."""
  images = [original_budget(f) for f in frames]
  out = hf_processor()(images, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("hw", [(360, 640), (720, 1280), (1080, 1920), (240, 320), (480, 270)])
def test_preprocess_frames_vs_original(rng, measure, hw):
  """Our OpenCV resize vs the original's PIL pipeline: same grids; the difference is measured, not tightened."""
  h, w = hw
  frames = np.stack([natural(rng, h, w), media.draw_frame(int(rng.integers(0, 60000)), h, w)])
  pixels, grid = pp.preprocess_frames(frames)
  want_pixels, want_grid = original_pipeline(frames)
  np.testing.assert_array_equal(grid, want_grid)
  assert pixels.shape == want_pixels.shape
  levels = np.abs(pixels - want_pixels) * (pp.CLIP_STD.mean() * 255)  # normalised units -> ~uint8 levels
  # Also directly in uint8, per frame kind.
  (bh, bw), (fh, fw) = pp.model_size(h, w)
  for kind, frame in zip(("natural", "index"), frames):
    ours = pp.resize_frame(frame).astype(np.int32)
    theirs = np.asarray(original_budget(frame).resize((fw, fh), PIL.BICUBIC)).astype(np.int32)
    d = np.abs(ours - theirs)
    measure(f"{kind}_{h}x{w}_mean_levels", d.mean())
    measure(f"{kind}_{h}x{w}_p99_levels", np.percentile(d, 99))
    measure(f"{kind}_{h}x{w}_max_levels", d.max())
    assert d.mean() < RESIZE_MEAN_LEVELS
  measure(f"pixel_values_{h}x{w}_max_abs", np.abs(pixels - want_pixels).max())
  assert levels.mean() < RESIZE_MEAN_LEVELS


def test_preprocess_frames_mixed_sizes_and_errors(rng):
  frames = [rng.integers(0, 256, (360, 640, 3), dtype=np.uint8), rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)]
  pixels, grid = pp.preprocess_frames(frames)
  assert grid.tolist() == [[1, 16, 30], [1, 14, 22]]
  assert pixels.shape == (16 * 30 + 14 * 22, 1176)
  one, _ = pp.preprocess_frames(frames[1:])
  np.testing.assert_array_equal(pixels[16 * 30:], one)
  with pytest.raises(ValueError, match="uint8"):
    pp.preprocess_frames(np.zeros((1, 56, 56, 3), np.float32))
  with pytest.raises(ValueError, match="no frames"):
    pp.preprocess_frames([])
  with pytest.raises(ValueError, match="multiple of 28"):
    pp.patchify_images(np.zeros((1, 50, 56, 3), np.uint8))
  assert pp.budget_size(300, 300) == (300, 300)  # small frames are left alone
  assert pp.budget_size(1080, 1920) == (237, 422)
  assert math.prod(pp.model_size(1080, 1920)[1]) <= pp.MAX_PIXELS
