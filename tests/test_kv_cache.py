"""Prefill then N decode steps equals one full forward over the same tokens (fp32)."""

import numpy as np
import pytest

import hf_oracle as O
import tolerances as tol
import zoomer_jax


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  config = O.tiny_hf_config(heads=4, kv_heads=2, layers=2)
  path = O.save_hf(O.make_hf_model(config, seed=3), str(tmp_path_factory.mktemp("kv")))
  return zoomer_jax.load_hf(path, dtype="float32")


@pytest.mark.parametrize("chunk", [1, 3])
def test_prefill_then_decode_equals_full_forward(model, rng, measure, chunk):
  """A prompt with an image and a video (default position rule), left-padded batch of 2."""
  prompt = O.build_prompt(rng, [
      [("text", 4), ("image", (1, 4, 6)), ("text", 3), ("video", (8, 4, 4), 1.0), ("text", 2)],
      [("text", 6), ("image", (1, 4, 4)), ("text", 5)],
  ])
  n_new = 6
  new_ids = rng.integers(3, O.TEXT_MAX, (2, n_new))
  full_ids = np.concatenate([prompt.input_ids, new_ids], axis=1)
  full_mask = np.concatenate([prompt.attention_mask, np.ones_like(new_ids)], axis=1)
  kw = {k: v for k, v in prompt.ours().items() if k not in ("input_ids", "attention_mask")}
  full = np.asarray(model(full_ids, attention_mask=full_mask, **kw))

  length = prompt.input_ids.shape[1]
  logits, cache, next_pos = model.prefill(prompt.input_ids, attention_mask=prompt.attention_mask, **kw,
                                          cache_size=length + n_new + 5)
  steps = [np.asarray(logits)]
  for start in range(0, n_new, chunk):
    logits, cache, next_pos = model.decode(new_ids[:, start:start + chunk], cache, next_pos)
    steps.append(np.asarray(logits))
  cached = np.concatenate(steps, axis=1)
  assert int(cache.length) == length + n_new
  valid = full_mask.astype(bool)
  diff = float(np.abs(cached - full)[valid].max())
  measure(f"chunk{chunk}", diff)
  assert diff <= tol.KV_CACHE_FP32


def test_cache_overflow_is_refused(model, rng):
  prompt = O.build_prompt(rng, [[("text", 8)]])
  with pytest.raises(ValueError, match="does not fit a cache"):
    model.prefill(prompt.input_ids, cache_size=4)
  _, cache, pos = model.prefill(prompt.input_ids, cache_size=9)
  with pytest.raises(ValueError, match="overflow the cache"):
    model.decode(np.zeros((1, 2), np.int64), cache, pos)
