"""`read_shards`: chunked, threaded, tiled reads of one tensor into shard boxes equal plain numpy slicing."""

import itertools

import ml_dtypes
import numpy as np
import pytest

from zoomer_jax.checkpoint import safetensors_io as sio

# The layouts the key map produces: transposes, transposes then reshapes, flat vectors, a conv kernel, a scalar.
VIEWS = {
    "a": [lambda w: w.T.reshape(20, 4, 12), lambda w: w.T.reshape(20, 48), lambda w: w.reshape(48, 20),
          lambda w: w.T.reshape(2, 10, 48)],
    "b": [lambda w: w.reshape(5, 6), lambda w: w],
    "c": [lambda w: w.reshape(6, -1).T.reshape(24, 6)],
    "s": [lambda w: w],
}


def _boxes(rng, shape):
  """Each axis cut into 1-3 parts at random, every combination, plus the whole array."""
  cuts = [sorted({0, d, *rng.integers(0, d + 1, rng.integers(0, 3))}) for d in shape]
  boxes = [tuple(slice(a, b) for a, b in combo)
           for combo in itertools.product(*[list(zip(c[:-1], c[1:])) for c in cuts])]
  return [b for b in boxes if all(s.stop > s.start for s in b)] + [tuple(slice(None) for _ in shape)]


def test_read_shards_equals_numpy_slicing(tmp_path, monkeypatch, rng, measure):
  monkeypatch.setattr(sio, "TILE", 3)  # tiny tiles and several threads, so every code path runs
  monkeypatch.setattr(sio, "WORKERS", 3)
  tensors = {"a": rng.standard_normal((48, 20)).astype(ml_dtypes.bfloat16),
             "b": rng.standard_normal((30,)).astype(np.float32),
             "c": rng.standard_normal((6, 3, 2, 2, 2)).astype(np.float32), "s": np.array(3.0, np.float32)}
  sio.save_file(tensors, tmp_path / "t.safetensors")
  n = 0
  with sio.SafetensorsFile(tmp_path / "t.safetensors") as f:
    for key, views in VIEWS.items():
      for view in views:
        full = view(np.array(f.get(key)))
        for dtype in (np.float32, ml_dtypes.bfloat16):
          for chunk in (1, 7, 64, 10**6):
            boxes = _boxes(rng, full.shape)
            for out, box in zip(sio.read_shards(f, key, view, boxes, dtype, chunk_bytes=chunk), boxes):
              assert out.dtype == dtype and np.array_equal(out, full[box].astype(dtype)), (key, box, chunk)
              assert out.ctypes.data % 64 == 0  # aligned, so JAX's CPU client adopts it without a copy
              n += 1
  measure("boxes_checked", n)
  assert n > 200


def test_truncated_file_is_a_clear_error(tmp_path):
  sio.save_file({"w": np.ones((64, 64), np.float32)}, tmp_path / "t.safetensors")
  data = (tmp_path / "t.safetensors").read_bytes()
  (tmp_path / "t.safetensors").write_bytes(data[:-100])
  with pytest.raises(ValueError, match="truncated"):
    sio.SafetensorsFile(tmp_path / "t.safetensors")
