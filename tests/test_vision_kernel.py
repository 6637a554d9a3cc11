"""The vision tower's attention through the splash kernel (`attention.segment_splash`: rows in window order, a
segment id per row, a band mask), against the packed dense path it replaces on TPU: the same outputs and
gradients (the kernel run by Pallas' interpreter on this host), sharded per row and piece under the tower's
`vmap`s, and compiled for TPU with each chip running its own piece."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import hf_oracle as O
import tolerances as tol
from zoomer_jax.model.attention import segment_ids, segment_splash, segment_splash_fits
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.vision import VisionAttention
from zoomer_jax.model.vision_layout import layout_sizes, padded_layout

VISION = ModelConfig.from_hf_dict(O.tiny_hf_config()).vision


def _piece_layout(grids, patches):
  """One row's layout, one piece padded to `patches` rows (blank rows at the end), its leaves without the piece
  axis."""
  sizes = layout_sizes([grids], VISION).replace(patches=patches)
  return jax.tree.map(lambda a: a[0], padded_layout(grids, VISION, sizes))


@pytest.mark.parametrize("kind", ["windows", "frames"])
def test_segment_splash_equals_the_packed_attention(kind):
  # Frames of 256 and 96 patches (windows of up to 64), 608 real rows and 32 blank ones in a 640-row piece.
  layout = _piece_layout(np.asarray([[2, 16, 16], [1, 8, 12]]), 640)
  seg = getattr(layout, kind)
  n, span = 640, seg.gather.shape[1]
  assert segment_splash_fits(n, span) and not seg.identity
  ids = np.asarray(segment_ids(seg, n))
  assert (ids[:608] >= 0).all() and (ids[608:] == -1).all()
  assert (np.diff(ids[:608]) >= 0).all()  # segments are consecutive runs, in order

  attn = VisionAttention(VISION, dtype="float32", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((n, VISION.num_heads, VISION.head_dim)), jnp.float32)
             for _ in range(3))
  w = jnp.asarray(rng.standard_normal((608, VISION.num_heads, VISION.head_dim)), jnp.float32)

  def packed(q, k, v):
    return attn._packed(q, k, v, seg)

  def kernel(q, k, v):
    return segment_splash(q, k, v, jnp.asarray(ids), span, interpret=True)

  for fn in (packed, kernel):
    assert np.isfinite(np.asarray(fn(q, k, v))).all()
  np.testing.assert_allclose(kernel(q, k, v)[:608], packed(q, k, v)[:608], atol=tol.ATTENTION_FP32, rtol=0)
  # Blank rows' outputs feed nothing; every row's q, k and v get the same gradient (blank rows: none).
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v)[:608] * w)
  got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(packed), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=tol.ATTENTION_FP32, rtol=0)
    assert not np.asarray(r[608:]).any()


def test_segment_splash_runs_per_row_and_piece_under_a_mesh():
  """The tower's two `vmap`s name the mesh axes rows and pieces are split over (`spmd_axis_name`): the kernel's
  `shard_map` then runs each chip's own row and piece, and the result is the unsharded one's."""
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("rows", "pieces"))
  n, heads, h = 256, 2, 8
  rng = np.random.default_rng(1)
  ids = np.repeat(np.arange(8), 32).astype(np.int32)  # segments of 32 rows
  q, k, v = (rng.standard_normal((2, 2, n, heads, h)).astype(np.float32) for _ in range(3))
  ids_rc = np.broadcast_to(ids, (2, 2, n))
  attend = lambda q, k, v, i: segment_splash(q, k, v, i, 32, interpret=True)
  want = jax.vmap(jax.vmap(attend))(q, k, v, ids_rc)
  spec = NamedSharding(mesh, PartitionSpec("rows", "pieces"))
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, spec) for a in (q, k, v, ids_rc)]
    got = jax.jit(jax.vmap(jax.vmap(attend, spmd_axis_name="pieces"), spmd_axis_name="rows"))(*args)
  assert got.sharding.spec[:2] == ("rows", "pieces")
  np.testing.assert_allclose(got, want, atol=tol.ATTENTION_FP32, rtol=0)
  # The reference is right too: each row reads its own 32-row segment only.
  one = q[0, 0, :32, 0]
  s = one @ k[0, 0, :32, 0].T * h**-0.5
  np.testing.assert_allclose(want[0, 0, :32, 0], jax.nn.softmax(s, -1) @ v[0, 0, :32, 0], atol=tol.ATTENTION_FP32)
