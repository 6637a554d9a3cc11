"""Window permutation, attention segments and 3-D positions: worked examples and transformers' helpers."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import vision_utils

import hf_oracle as O
from zoomer_jax import ModelConfig
from zoomer_jax.model.mrope import rope_index
from zoomer_jax.model.vision_layout import vision_layout, window_index

VISION = ModelConfig.from_hf_dict(O.tiny_hf_config()).vision


def _cu(lengths):
  return np.concatenate([[0], np.cumsum(lengths)]).tolist()


def test_worked_window_examples():
  """Window order, grid (1,10,12) and (2,8,8)."""
  idx, lengths = window_index(np.array([[1, 10, 12]]), 2, 4)
  assert idx.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21, 4, 5, 10, 11, 16, 17, 22, 23,
                          24, 25, 26, 27, 28, 29]
  assert _cu(lengths * 4) == [0, 64, 96, 112, 120]
  idx, lengths = window_index(np.array([[2, 8, 8]]), 2, 4)
  assert idx.tolist() == list(range(32)) and _cu(lengths * 4) == [0, 64, 128]


def test_frame_segments_example():
  """Full-attention boundaries, grids (2,8,8),(1,4,6) -> full-attention boundaries [0,64,128,152]."""
  layout = vision_layout(np.array([[2, 8, 8], [1, 4, 6]]), VISION)
  assert _cu(layout.frames.valid.sum(-1)) == [0, 64, 128, 152]


def _unpack(seg, n):
  """Rows of each segment, from the packing (checks gather/scatter agree)."""
  rows = [seg.gather[s][seg.valid[s]].tolist() for s in range(len(seg.gather))]
  flat = np.full(seg.gather.size, -1)
  flat[seg.scatter] = np.arange(n)
  assert (flat.reshape(seg.gather.shape)[seg.valid] == seg.gather[seg.valid]).all()
  return rows


@pytest.mark.parametrize("trial", range(5))
def test_layout_matches_transformers_helpers(rng, trial):
  """Random grids: our permutation, windows, frame segments and rotary positions equal transformers'."""
  n_items = int(rng.integers(1, 4))
  grid = np.stack([rng.integers(1, 4, n_items), 2 * rng.integers(1, 10, n_items),
                   2 * rng.integers(1, 10, n_items)], -1)
  layout = vision_layout(grid, VISION)
  n = int(grid.prod(-1).sum())
  g = torch.as_tensor(grid)
  hf_idx, hf_cu = vision_utils.get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
  assert np.argsort(layout.unperm).tolist() == hf_idx.tolist()
  assert layout.reperm.tolist() == hf_idx.tolist()  # the inverse of unperm
  assert _cu([len(r) for r in _unpack(layout.windows, n)]) == hf_cu.tolist()
  hf_full = vision_utils.get_vision_cu_seqlens(g)
  assert _cu([len(r) for r in _unpack(layout.frames, n)]) == hf_full.tolist()
  hf_pos = vision_utils.get_vision_position_ids(g, 2)  # (row, col) per patch in processor order
  hf_pos = np.asarray(hf_pos).reshape(-1, 2) if np.asarray(hf_pos).shape[-1] == 2 else np.asarray(hf_pos).T
  assert (layout.rot_pos == hf_pos[layout.perm]).all()


def _cfg(rule):
  return dataclasses.replace(ModelConfig.from_hf_dict(O.tiny_hf_config()), position_rule=rule)


def _ids(*parts):
  ids = []
  for kind, n in parts:
    ids += [5] * n if kind == "text" else [O.IMAGE if kind == "image" else O.VIDEO] * n
  return np.array([ids])


def test_worked_position_examples():
  """transformers' get_rope_index by hand, a (3,8,12) video at cur=15 with step 2; an image (1,4,4) at 4."""
  # text 0..3, image at 4 (next text 6), text 6..14 (9 tokens), so the video starts at cur=15.
  ids = _ids(("text", 4), ("image", 4), ("text", 9), ("video", 72), ("text", 2))
  pos, delta = rope_index(ids, _cfg("original"), image_grid_thw=[[1, 4, 4]], video_grid_thw=[[3, 8, 12]])
  img = pos[:, 0, 4:8]
  assert img[0].tolist() == [4] * 4 and img[1].tolist() == [4, 4, 5, 5] and img[2].tolist() == [4, 5, 4, 5]
  assert pos[0, 0, 8] == 6 and pos[0, 0, 16] == 14
  vid = pos[:, 0, 17:17 + 72]
  assert sorted(set(vid[0].tolist())) == [15, 17, 19]
  assert sorted(set(vid[1].tolist())) == list(range(15, 19)) and sorted(set(vid[2].tolist())) == list(range(15, 21))
  assert pos[:, 0, 89].tolist() == [21, 21, 21]
  assert delta[0] == 22 + 1 - 91


def test_rules_differ_after_a_long_video():
  """A (8,8,12) video at cur=15 (step 2): the next text is at max+1 = 30 (original), 15+6 = 21 (hf_5.23)."""
  ids = _ids(("text", 4), ("image", 4), ("text", 9), ("video", 8 * 4 * 6), ("text", 1))
  kw = dict(image_grid_thw=[[1, 4, 4]], video_grid_thw=[[8, 8, 12]], second_per_grid_ts=[1.0])
  original, _ = rope_index(ids, _cfg("original"), **kw)
  hf, _ = rope_index(ids, _cfg("hf_5.23"), **kw)
  assert original[:, 0, -1].tolist() == [30] * 3 and hf[:, 0, -1].tolist() == [21] * 3
  truncated, _ = rope_index(ids, _cfg("hf_4.52"), **dict(kw, second_per_grid_ts=[0.5]))
  assert set(truncated[0, 0, 17:17 + 192].tolist()) == {15}  # int(0.5) = 0: every frame at t = 15


@pytest.mark.parametrize("trial", range(4))
def test_positions_match_transformers_get_rope_index(rng, trial, tmp_path):
  """hf_5.23 rule vs transformers' own get_rope_index, random prompts with padding."""
  hf = O.make_hf_model(O.tiny_hf_config(layers=1, v_depth=1, fullatt=(0,)), seed=0)
  specs = []
  for _ in range(2):
    spec = [("text", int(rng.integers(1, 5)))]
    for _ in range(int(rng.integers(1, 4))):
      if rng.random() < 0.5:
        spec += [("image", (1, 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)))), ("text", 2)]
      else:
        spec += [("video", (int(rng.integers(1, 10)), 4, 2 * int(rng.integers(1, 4))),
                  float(rng.choice([0.5, 1.0, 1.5, 2.0]))), ("text", 3)]
    specs.append(spec)
  p = O.build_prompt(rng, specs)
  cfg = _cfg("hf_5.23")
  ours, deltas = rope_index(p.input_ids, cfg, attention_mask=p.attention_mask, image_grid_thw=p.image_grid_thw,
                            video_grid_thw=p.video_grid_thw, second_per_grid_ts=p.second_per_grid_ts)
  t = lambda x: None if x is None else torch.as_tensor(x)
  ref, ref_d = hf.model.get_rope_index(t(p.input_ids), t(p.mm_token_type_ids()), t(p.image_grid_thw),
                                       t(p.video_grid_thw), t(p.second_per_grid_ts), t(p.attention_mask))
  valid = p.attention_mask.astype(bool)
  assert (ours[:, valid] == ref.numpy()[:, valid]).all()
  assert deltas.tolist() == ref_d.reshape(-1).tolist()


def test_bad_vision_inputs_fail_clearly():
  cfg = _cfg("original")
  with pytest.raises(ValueError, match="more image placeholder runs"):
    rope_index(_ids(("image", 4)), cfg)
  with pytest.raises(ValueError, match="needs 4 consecutive"):
    rope_index(_ids(("image", 3), ("text", 2)), cfg, image_grid_thw=[[1, 4, 4]])
  with pytest.raises(ValueError, match="2 image grids were given"):
    rope_index(_ids(("image", 4)), cfg, image_grid_thw=[[1, 4, 4], [1, 4, 4]])
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    vision_layout(np.array([[1, 3, 4]]), VISION)
