"""A row's images cut into pieces at frame boundaries (`vision_layout.split_frames`), each piece encoded on its own
chips (`vision_pieces` in the rules table): the same features and gradients as the whole row on one device."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_oracle as O
import tolerances as tol
from zoomer_jax.checkpoint.orbax_io import state_shardings
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.options import ModelOptions
from zoomer_jax.model.qwen25vl import Qwen25VL, vision_input
from zoomer_jax.model.vision_layout import layout_sizes, num_tokens, split_frames
from zoomer_jax.parallel.mesh import make_mesh
from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES, vision_pieces


def _frames(grids) -> list[tuple[int, int, int]]:
  """(item, h, w) of every frame, in order."""
  return [(i, h, w) for i, (t, h, w) in enumerate(np.asarray(grids).reshape(-1, 3)) for _ in range(t)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pieces", [1, 2, 3, 4])
def test_split_frames_keeps_frame_order_and_balances_best(seed, pieces):
  rng = np.random.default_rng(seed)
  grid = np.stack([rng.integers(1, 4, 4), 2 * rng.integers(1, 4, 4), 2 * rng.integers(1, 4, 4)], 1)
  runs = split_frames(grid, pieces)
  assert len(runs) == pieces
  frames = _frames(grid)
  # Runs laid end to end are the row's frames in order (an item cut between runs continues in the next).
  got = [(h, w) for run in runs for t, h, w in run for _ in range(t)]
  assert got == [(h, w) for _, h, w in frames]
  size = [h * w for _, h, w in frames]
  best = min(max(sum(size[a:b]) for a, b in zip((0,) + cuts, cuts + (len(size),)))
             for cuts in itertools.combinations_with_replacement(range(len(size) + 1), pieces - 1))
  assert max(int(r.prod(-1).sum()) for r in runs) == best


def test_layout_sizes_per_piece_and_pixel_placement():
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config()).vision
  grids = [np.asarray([[1, 4, 6], [3, 4, 4]]), np.asarray([[2, 4, 4]])]
  sizes = layout_sizes(grids, cfg, pieces=2)
  # Row 0: frames of 24, 16, 16, 16 patches -> runs of 40 and 32; row 1: 16 and 16.
  assert (sizes.pieces, sizes.piece_patches, sizes.patches) == (2, 40, 80)
  assert layout_sizes(grids, cfg, image_bucket=4, pieces=2).piece_patches == 48  # 2 images of 24 per piece
  pixels = [np.arange(72 * cfg.patch_dim, dtype=np.float32).reshape(72, -1), np.ones((32, cfg.patch_dim))]
  vin = vision_input(ModelConfig.from_hf_dict(O.tiny_hf_config()), pixels, grids, pieces=2)
  assert vin.pixels.shape == (2, 80, cfg.patch_dim) and vin.layout.perm.shape == (2, 2, 40)
  assert vin.layout.unperm.shape == (2, 20) and vin.layout.reperm.shape == (2, 20)
  for u, r in zip(vin.layout.unperm, vin.layout.reperm):  # each row's two maps are inverse permutations
    np.testing.assert_array_equal(u[r], np.arange(20))
  np.testing.assert_array_equal(vin.pixels[0, :40], pixels[0][:40])
  np.testing.assert_array_equal(vin.pixels[0, 40:72], pixels[0][40:])
  assert not vin.pixels[0, 72:].any() and not vin.pixels[1, 16:40].any() and vin.pixels[1, 40:56].all()
  with pytest.raises(ValueError, match="pieces must be >= 1"):
    split_frames(grids[0], 0)


def test_vision_pieces_equal_one_device_and_move_less(measure):
  """Two rows (images of several sizes, a video cut between pieces; one row leaves a piece empty) on a (1, 2, 4)
  mesh under the context-parallel rules, each row's frames in 4 pieces on its 4 chips: features and the
  gradients of a loss on them equal one device's whole rows, and the program (gradients laid out as the
  parameters) moves less than the same rows with the tower's heads and MLP split over those chips (the previous
  context-parallel layout)."""
  from zoomer_jax.aot.hlo import Hlo
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config(v_heads=4, v_hidden=64))
  rng = np.random.default_rng(0)
  grids = [np.asarray([[1, 8, 12], [3, 16, 16], [1, 16, 8]]), np.asarray([[3, 16, 16]])]
  pixels = [rng.normal(size=(int(g.prod(-1).sum()), cfg.vision.patch_dim)).astype(np.float32) for g in grids]
  real = [num_tokens(g, cfg.vision.spatial_merge_size) for g in grids]
  keep = np.arange(max(real))[None, :, None] < np.asarray(real)[:, None, None]  # blank tokens' values differ
  weight = jnp.asarray(rng.normal(size=(2, max(real), cfg.text.hidden_size)) * keep, jnp.float32)

  def grad_fn(graphdef):
    def loss(state, vin):
      feats = nnx.merge(graphdef, state).encode_vision(vin)
      return jnp.sum(feats[:, :weight.shape[1]] * weight), feats
    return jax.grad(loss, has_aux=True)

  graphdef, state = nnx.split(Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(5)))
  want_g, want_f = jax.jit(grad_fn(graphdef))(state, jax.tree.map(jnp.asarray, vision_input(cfg, pixels, grids)))

  mesh = make_mesh((1, 2, 4))
  rules = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)
  old_rules = tuple(r for r in CONTEXT_PARALLEL if not r[0].startswith("vision")) + tuple(DEFAULT_RULES)
  assert vision_pieces(mesh, rules) == 4 and vision_pieces(mesh, old_rules) == 1 and vision_pieces(None, rules) == 1
  moved, got = {}, {}
  for name, table in (("pieces", rules), ("tensor", old_rules)):
    graphdef, _ = nnx.split(Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(5), options=ModelOptions(rules=table)))
    shardings = state_shardings(state, mesh, table)
    vin = jax.tree.map(jnp.asarray, vision_input(cfg, pixels, grids, pieces=vision_pieces(mesh, table)))
    step = jax.jit(grad_fn(graphdef), out_shardings=(shardings, None))
    with jax.set_mesh(mesh):
      placed = jax.device_put(state, shardings)
      got[name] = step(placed, vin)
      moved[name] = sum(k["moved"] for k in Hlo(step.lower(placed, vin).compile().as_text()).collectives(8).values())
  for name, (g, f) in got.items():
    err = max(float(jnp.abs(f[r, :k] - want_f[r, :k]).max()) for r, k in enumerate(real))
    measure(f"{name}_features", err)
    assert err <= tol.LOGITS_FP32, name
    rels = []
    for (path, a), (_, b) in zip(nnx.to_flat_state(want_g), nnx.to_flat_state(g)):
      a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
      if path[0] == "visual":
        rels.append(float(np.abs(a - b).max() / np.abs(a).max()))
    measure(f"{name}_grad_rel", max(rels))
    assert len(rels) > 10 and max(rels) <= tol.CHUNKED_GRAD_FP32_REL, name
  measure("bytes_moved_pieces_over_tensor", moved["pieces"] / moved["tensor"])
  assert moved["pieces"] < 0.5 * moved["tensor"], moved
