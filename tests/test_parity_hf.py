"""Logit parity with transformers' Qwen2_5_VLForConditionalGeneration on tiny random configs.

Each config is saved with `save_pretrained` and loaded with `zoomer_jax.load_hf`; every test draws
fresh random token ids and pixels. transformers 5.23 computes text positions after a vision block
with the "max(lh, lw)" rule, so the models here use `position_rule="hf_5.23"`; the default
("original") rule is checked against transformers by passing it our position ids explicitly.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import hf_oracle as O
import tolerances as tol
import zoomer_jax
from zoomer_jax.checkpoint.safetensors_io import SafetensorsFile, save_file
from zoomer_jax.model.mrope import rope_index

# name -> (config kwargs, layout, key spelling)
CONFIGS = {
    "gqa2_untied_nested": (dict(heads=4, kv_heads=2), "nested", "legacy"),
    "gqa1_tied_flat": (dict(heads=4, kv_heads=4, tie=True), "flat", "legacy"),
    "gqa3_untied_newkeys": (dict(hidden=96, heads=6, kv_heads=2, mrope=(2, 3, 3), v_heads=4, v_hidden=64,
                                 fullatt=(0, 2), v_depth=3), "nested", "new"),
    "mqa_tied_newkeys": (dict(heads=4, kv_heads=1, tie=True, layers=3), "flat", "new"),
}


def _respell(path: str) -> None:
  """Rewrites the checkpoint with transformers >= 4.52 in-memory names (model.language_model.*)."""
  f = SafetensorsFile(os.path.join(path, "model.safetensors"))
  renamed = {}
  for k in f.keys():
    new = k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k
    new = "model." + new if new.startswith("visual.") else new
    renamed[new] = np.array(f.get(k))
  save_file(renamed, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(transformers model, our fp32 model, name) for one tiny config."""
  kwargs, layout, spelling = CONFIGS[request.param]
  config = O.tiny_hf_config(layout=layout, **kwargs)
  hf = O.make_hf_model(config, seed=len(request.param))
  path = O.save_hf(hf, str(tmp_path_factory.mktemp(request.param)))
  with open(os.path.join(path, "config.json"), "w") as fh:  # the layout under test, not HF's rewrite
    json.dump(config, fh)
  if spelling == "new":
    _respell(path)
    assert any(k.startswith("model.language_model.") for k in SafetensorsFile(
        os.path.join(path, "model.safetensors")).keys())
  ours = zoomer_jax.load_hf(path, dtype="float32", position_rule="hf_5.23")
  return hf, ours, request.param


def _check(measure, name, ours, ref, prompt, bound):
  valid = prompt.attention_mask.astype(bool)
  diff = float(np.abs(np.asarray(ours) - ref)[valid].max())
  measure(name, diff)
  assert np.isfinite(diff) and diff <= bound, f"{name}: max |dlogit| {diff:.3e} > {bound:.1e}"
  return diff


def test_many_images_with_text_between(pair, rng, measure):
  """The VideoZoomer prompt shape: frames as separate images, each after a text time tag."""
  hf, ours, name = pair
  spec = [("text", 6)]
  for _ in range(int(rng.integers(5, 8))):
    spec += [("text", int(rng.integers(2, 6))), ("image", (1, 4, int(rng.choice([4, 6]))))]
  prompt = O.build_prompt(rng, [spec + [("text", 5)]])
  _check(measure, name, ours(**prompt.ours()), O.hf_logits(hf, prompt), prompt, tol.LOGITS_FP32)


@pytest.mark.parametrize("t", [8, 9])
def test_video_with_many_temporal_groups(pair, rng, measure, t):
  hf, ours, name = pair
  spg = float(rng.choice([0.5, 1.0, 1.25]))
  prompt = O.build_prompt(rng, [[("text", 4), ("image", (1, 4, 4)), ("text", 3), ("video", (t, 4, 6), spg),
                                 ("text", 6)]])
  _check(measure, f"{name}-t{t}", ours(**prompt.ours()), O.hf_logits(hf, prompt), prompt, tol.LOGITS_FP32)


@pytest.mark.parametrize("grid", [(1, 6, 10), (1, 10, 12), (2, 18, 6)])
def test_grids_the_window_does_not_divide(pair, rng, measure, grid):
  hf, ours, name = pair
  prompt = O.build_prompt(rng, [[("text", 3), ("image", grid), ("text", 4)]])
  _check(measure, f"{name}-{grid}", ours(**prompt.ours()), O.hf_logits(hf, prompt), prompt, tol.LOGITS_FP32)


@pytest.mark.parametrize("pad_left", [True, False])
def test_batch_of_two_with_padding(pair, rng, measure, pad_left):
  hf, ours, name = pair
  prompt = O.build_prompt(rng, [
      [("text", 5), ("image", (1, 4, 6)), ("text", 9), ("video", (2, 4, 4), 1.0), ("text", 2)],
      [("text", 3), ("image", (1, 6, 4)), ("text", 2)],
  ], pad_left=pad_left)
  assert (prompt.attention_mask == 0).any()
  _check(measure, f"{name}-left{pad_left}", ours(**prompt.ours()), O.hf_logits(hf, prompt), prompt,
         tol.LOGITS_FP32)


def test_text_only(pair, rng, measure):
  hf, ours, name = pair
  prompt = O.build_prompt(rng, [[("text", 17)]])
  _check(measure, name, ours(**prompt.ours()), O.hf_logits(hf, prompt), prompt, tol.LOGITS_FP32)


def test_original_position_rule_matches_hf_given_the_same_positions(pair, rng, measure):
  """Default rule (text after a long video at max+1): HF fed our 3-D positions agrees with us."""
  hf, ours, name = pair
  prompt = O.build_prompt(rng, [[("text", 4), ("video", (8, 4, 4), 1.0), ("text", 5)]])
  kw = dict(attention_mask=prompt.attention_mask, video_grid_thw=prompt.video_grid_thw,
            second_per_grid_ts=prompt.second_per_grid_ts)
  original, _ = rope_index(prompt.input_ids, dataclasses.replace(ours.config, position_rule="original"), **kw)
  hf_rule, _ = rope_index(prompt.input_ids, ours.config, **kw)
  assert original[0, 0, -1] > hf_rule[0, 0, -1]  # the rules really differ on this input
  got = ours(**prompt.ours(), position_ids=original)
  _check(measure, name, got, O.hf_logits(hf, prompt, position_ids=original), prompt, tol.LOGITS_FP32)


def test_bfloat16_agrees_with_hf_bfloat16(tmp_path, rng, measure):
  config = O.tiny_hf_config(heads=4, kv_heads=2)
  hf = O.make_hf_model(config, seed=7)
  path = O.save_hf(hf, str(tmp_path / "m"))
  ours16 = zoomer_jax.load_hf(path, dtype="bfloat16", position_rule="hf_5.23")
  ours32 = zoomer_jax.load_hf(path, dtype="float32", position_rule="hf_5.23")
  assert ours16.model.embed_tokens.embedding[...].dtype == np.dtype("bfloat16")
  prompt = O.build_prompt(rng, [[("text", 5), ("image", (1, 4, 6)), ("text", 4), ("video", (2, 4, 4), 1.0),
                                 ("text", 3)]])
  hf16 = hf.to(torch.bfloat16)
  ref16 = O.hf_logits(hf16, prompt)
  got16 = np.asarray(ours16(**prompt.ours()))
  got32 = np.asarray(ours32(**prompt.ours()))
  scale = float(np.abs(got32).max())
  _check(measure, "ours_bf16_vs_hf_bf16", got16, ref16, prompt, tol.LOGITS_BF16_REL * scale)
  _check(measure, "ours_bf16_vs_ours_fp32", got16, got32, prompt, tol.OURS_BF16_VS_FP32_REL * scale)
  measure("logit_scale", scale)
