"""Chunked log-probs and entropies: equal to the full-logits computation (values and gradients), equal to
the model's own logits on the tiny Qwen2.5-VL, and far smaller in compiled temporary memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import tolerances as tol
from zoomer_jax.config_loader import load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.qwen25vl import Qwen25VL, prepare_inputs
from zoomer_jax.parallel.rules import logical_to_spec
from zoomer_jax.train.logprobs import head_weight, sequence_logprobs, token_logprobs


def _reference(h, w, tg, temperature, rounding=None):
  """Independent oracle in float64 numpy: log_softmax at the target and the entropy of the softmax."""
  z = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
  if rounding is not None:
    z = np.asarray(jnp.asarray(z, jnp.float32).astype(rounding).astype(jnp.float32), np.float64)
  z = z / temperature
  z = z - z.max(-1, keepdims=True)
  logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp = np.take_along_axis(logp_all, np.asarray(tg)[..., None], -1)[..., 0]
  return logp, -(np.exp(logp_all) * logp_all).sum(-1)


def _bf16_bound(logits) -> float:
  """tol.LOGPROB_BF16_ULPS bf16 ulps (8 significant bits) of the largest |logit|."""
  return tol.LOGPROB_BF16_ULPS * 2.0 ** (np.floor(np.log2(np.abs(np.asarray(logits)).max())) - 7)


def _problem(rng, b=2, t=9, d=24, v=250, scale=0.6):
  h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, v)) * scale, jnp.float32)  # logits of std ~3: peaked and flat rows
  return h, w, jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)


@pytest.mark.parametrize("vocab_chunk,token_chunk", [(None, None), (16, None), (96, None), (96, 5), (250, 4),
                                                     (1000, None), (1, 7), (None, 4)])
def test_chunked_equals_reference_fp32(rng, measure, vocab_chunk, token_chunk):
  """Against float64 numpy; 96 does not divide the 250-entry vocabulary, 5 and 4 do not divide the 18 tokens,
  1000 is wider than the vocabulary, 1 is one column per chunk."""
  h, w, tg = _problem(rng)
  ref_logp, ref_ent = _reference(h, w, tg, 0.7)
  logp, ent = jax.jit(lambda h, w: token_logprobs(h, w, tg, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                                                  temperature=0.7))(h, w)
  assert logp.dtype == ent.dtype == jnp.float32 and logp.shape == ent.shape == tg.shape
  d_lp, d_ent = np.abs(np.asarray(logp) - ref_logp).max(), np.abs(np.asarray(ent) - ref_ent).max()
  measure("logp", d_lp)
  measure("entropy", d_ent)
  assert d_lp <= tol.CHUNKED_LOGPROB_FP32 and d_ent <= tol.CHUNKED_LOGPROB_FP32, (d_lp, d_ent)


def test_chunked_equals_full_bf16(rng, measure):
  """bf16 h and w with the model's rounding: the same bf16-rounded logits, summed in a different order."""
  h, w, tg = _problem(rng, d=64, v=1000)
  h, w = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  ref_logp, ref_ent = _reference(h, w, tg, 1.3, rounding=jnp.bfloat16)
  bound = _bf16_bound(np.einsum("btd,dv->btv", np.asarray(h, np.float32), np.asarray(w, np.float32)) / 1.3)
  for vc, tc in [(None, None), (128, None), (300, 7)]:
    logp, ent = jax.jit(lambda h, w: token_logprobs(h, w, tg, vocab_chunk=vc, token_chunk=tc, temperature=1.3,
                                                    dtype_rounding=jnp.bfloat16))(h, w)
    d_lp, d_ent = np.abs(np.asarray(logp) - ref_logp).max(), np.abs(np.asarray(ent) - ref_ent).max()
    measure(f"logp_vc{vc}", d_lp)
    measure(f"entropy_vc{vc}", d_ent)
    assert d_lp <= bound and d_ent <= bound, (vc, d_lp, d_ent, bound)
  # the rounding flag is not a no-op: without it the chunked path gives measurably different values
  rounded, _ = token_logprobs(h, w, tg, vocab_chunk=128, temperature=1.3, dtype_rounding=jnp.bfloat16)
  unrounded, _ = token_logprobs(h, w, tg, vocab_chunk=128, temperature=1.3)
  assert np.abs(np.asarray(rounded) - np.asarray(unrounded)).max() > 1e-3


@pytest.mark.parametrize("vocab_chunk,token_chunk", [(37, None), (64, 6), (250, None)])
def test_gradients_match_autodiff_of_plain_log_softmax(rng, measure, vocab_chunk, token_chunk):
  h, w, tg = _problem(rng)
  mask = jnp.asarray(rng.integers(0, 2, tg.shape), jnp.float32)
  coef = jnp.asarray(rng.standard_normal(tg.shape), jnp.float32)  # arbitrary per-token weights

  def plain(h, w):
    z = jnp.einsum("btd,dv->btv", h, w, precision="highest") / 0.8
    logp_all = jax.nn.log_softmax(z, -1)
    logp = jnp.take_along_axis(logp_all, tg[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    return jnp.sum((logp * coef + 0.3 * ent) * mask)

  def chunked(h, w):
    logp, ent = token_logprobs(h, w, tg, vocab_chunk=vocab_chunk, token_chunk=token_chunk, temperature=0.8)
    return jnp.sum((logp * coef + 0.3 * ent) * mask)

  ref = jax.grad(plain, (0, 1))(h, w)
  got = jax.jit(jax.grad(chunked, (0, 1)))(h, w)
  for name, a, b in zip(("dh", "dw"), got, ref):
    rel = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    measure(name, rel)
    assert rel <= tol.CHUNKED_GRAD_FP32_REL, (name, rel)
  # masked tokens get no gradient: their hidden state rows are exactly zero
  assert np.all(np.asarray(got[0])[np.asarray(mask) == 0] == 0)


def test_logp_only_and_bad_arguments(rng):
  h, w, tg = _problem(rng, t=4)
  logp, ent = token_logprobs(h, w, tg, vocab_chunk=64, with_entropy=False)
  assert ent is None
  np.testing.assert_allclose(logp, _reference(h, w, tg, 1.0)[0], atol=tol.CHUNKED_LOGPROB_FP32)
  g = jax.grad(lambda w: token_logprobs(h, w, tg, vocab_chunk=64, with_entropy=False)[0].sum())(w)
  assert np.isfinite(np.asarray(g)).all()
  with pytest.raises(ValueError, match="vocab_chunk"):
    token_logprobs(h, w, tg, vocab_chunk=0)
  with pytest.raises(ValueError, match="token_chunk"):
    token_logprobs(h, w, tg, vocab_chunk=8, token_chunk=2.5)
  with pytest.raises(ValueError, match="head weight"):
    token_logprobs(h, w.T, tg, vocab_chunk=8)
  with pytest.raises(ValueError, match="targets"):
    token_logprobs(h, w, tg[:, :2], vocab_chunk=8)


# ---------------------------------------------------------------------------------------- tiny model
def _tiny(tied: bool, dtype: str):
  cfg = load("qwen25vl_tiny", [f"model.text.tie_word_embeddings={tied}"]).model
  return Qwen25VL(ModelConfig.from_config_dict(cfg), dtype=dtype, rngs=nnx.Rngs(3))


def _batch(rng, cfg):
  """Two right-padded sequences, the first with a 4-token image between text runs."""
  grid = (1, 4, 4)
  first = list(rng.integers(3, 578, 5)) + [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + \
      [cfg.vision_end_token_id] + list(rng.integers(3, 578, 7))
  second = list(rng.integers(3, 578, 11))
  ids = np.full((2, len(first)), cfg.pad_token_id, np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate((first, second)):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  pixels = rng.standard_normal((16, cfg.vision.patch_dim)).astype(np.float32)
  return ids, mask, pixels, np.asarray([grid])


@nnx.jit(static_argnames=("vocab_chunk", "token_chunk"))
def _seq_logprobs(model, ids, positions, mask, images, vocab_chunk, token_chunk):
  return sequence_logprobs(model, ids, positions, mask, images, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                           temperature=1.0)


@pytest.mark.parametrize("tied,dtype,vocab_chunk,token_chunk", [(False, "float32", 100, 8),
                                                                (True, "bfloat16", 128, None)])
def test_sequence_logprobs_equal_model_logits(rng, measure, tied, dtype, vocab_chunk, token_chunk):
  model = _tiny(tied, dtype)
  assert (model.lm_head is None) == tied
  assert head_weight(model).shape == (model.config.text.hidden_size, model.config.text.vocab_size)
  ids, mask, pixels, grid = _batch(rng, model.config)
  logits = np.asarray(model(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want_lp = np.take_along_axis(logp_all[:, :-1], ids[:, 1:, None], -1)[..., 0]  # scores ids[:, 1:]
  want_ent = -(np.exp(logp_all[:, :-1]) * logp_all[:, :-1]).sum(-1)
  prep = prepare_inputs(model.config, ids, mask, pixels, grid)
  bound = tol.CHUNKED_LOGPROB_FP32 if dtype == "float32" else _bf16_bound(logits)
  scored = mask[:, 1:].astype(bool)
  logp, ent = _seq_logprobs(model, prep.ids, prep.positions, prep.token_mask, prep.images, vocab_chunk,
                            token_chunk)
  logp, ent = np.asarray(logp), np.asarray(ent)
  assert logp.shape == ent.shape == ids.shape and np.all(logp[:, 0] == 0) and np.all(ent[:, 0] == 0)
  d_lp = np.abs(logp[:, 1:] - want_lp)[scored].max()
  d_ent = np.abs(ent[:, 1:] - want_ent)[scored].max()
  measure("logp", d_lp)
  measure("entropy", d_ent)
  assert d_lp <= bound and d_ent <= bound, (d_lp, d_ent)


@pytest.mark.slow
def test_sequence_logprobs_gradient_matches_full_path(rng, measure):
  """d/dparams of a masked log-prob sum: vocab-chunked equals full logits, through trunk, vision and the tied
  head (whose table also gets the embedding lookup's gradient)."""
  model = _tiny(True, "float32")
  ids, mask, pixels, grid = _batch(rng, model.config)
  prep = prepare_inputs(model.config, ids, mask, pixels, grid)
  graphdef, state = nnx.split(model)
  weight = jnp.asarray(mask, jnp.float32)

  def loss(state, vocab_chunk):
    m = nnx.merge(graphdef, state)
    logp, ent = sequence_logprobs(m, prep.ids, prep.positions, prep.token_mask, prep.images,
                                  vocab_chunk=vocab_chunk, token_chunk=None if vocab_chunk is None else 16)
    return jnp.sum((logp - 0.01 * ent) * weight)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  full, chunked = grad(state, None), grad(state, 96)
  worst = 0.0
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(chunked),
                               jax.tree_util.tree_leaves_with_path(full)):
    scale = float(jnp.abs(b).max())
    assert scale > 0, f"no gradient reached {jax.tree_util.keystr(path)}"
    worst = max(worst, float(jnp.abs(a - b).max()) / scale)
  measure("worst_rel_param_grad", worst)
  assert worst <= tol.CHUNKED_GRAD_FP32_REL


# --------------------------------------------------------------------------------------------- memory
def test_compiled_temp_memory_is_far_below_full_logits():
  """value_and_grad at T=4096, d=64 and Qwen's vocabulary: compiled, never run."""
  t, d, v = 4096, 64, 152064

  def loss(h, w, tg, m, vocab_chunk, token_chunk):
    logp, ent = token_logprobs(h, w, tg, vocab_chunk=vocab_chunk, token_chunk=token_chunk)
    return jnp.sum((logp + 0.001 * ent) * m)

  args = (jax.ShapeDtypeStruct((1, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.float32))

  def temp_bytes(vocab_chunk, token_chunk=None):
    fn = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=(4, 5))
    return fn.lower(*args, vocab_chunk, token_chunk).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = t * v * 4
  full, chunked, blocked = temp_bytes(None), temp_bytes(8192), temp_bytes(8192, 1024)
  assert full > logits_bytes, (full, logits_bytes)
  assert chunked < logits_bytes / 4, (chunked, logits_bytes)  # ~3 live [T, 8192] fp32 blocks
  assert blocked < logits_bytes / 16, (blocked, logits_bytes)  # ~3 live [1024, 8192] fp32 blocks


# --------------------------------------------------------------------------------------------- on a mesh
@pytest.mark.parametrize("context", [False, True])
def test_sharded_head_equals_one_device_and_gathers_the_head_once(context, measure):
  """`token_logprobs(rules=...)` under a mesh (shard_map: each device its rows and, with context parallelism, its
  tokens; the head gathered once, its gradient reduce-scattered once): log-probs, entropies and both gradients
  equal one device's, and the head's collectives move a fraction of what the partitioner's per-chunk gathers and
  all-reduces do (the same function without rules)."""
  from zoomer_jax.aot.hlo import Hlo
  from zoomer_jax.parallel.mesh import make_mesh
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES
  rules = (CONTEXT_PARALLEL + DEFAULT_RULES) if context else DEFAULT_RULES
  rng = np.random.default_rng(3)
  b, t, d, v = 4, 64, 32, 512
  h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
  tg = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  c = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

  def loss(h, w, rules):
    logp, ent = token_logprobs(h, w, tg, vocab_chunk=128, token_chunk=16, rules=rules)
    return jnp.sum(logp * c + 0.1 * ent), (logp, ent)

  grad = jax.jit(jax.grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (want_h, want_w), (want_lp, want_ent) = grad(h, w, None)
  mesh = make_mesh((1, 4, 2))
  with jax.set_mesh(mesh):
    hs = jax.device_put(h, NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_length", None),
                                                               rules, mesh, h.shape)))
    ws = jax.device_put(w, NamedSharding(mesh, logical_to_spec(("embed", "vocab"), rules, mesh, w.shape)))
    (got_h, got_w), (got_lp, got_ent) = grad(hs, ws, rules)
    moved = {r: sum(k["moved"] for k in Hlo(grad.lower(hs, ws, r).compile().as_text()).collectives(8).values())
             for r in (None, rules)}
  for name, a, b_ in (("logp", got_lp, want_lp), ("entropy", got_ent, want_ent)):
    err = float(jnp.abs(a - b_).max())
    measure(f"{name}_diff", err)
    assert err <= tol.CHUNKED_LOGPROB_FP32, name
  for name, a, b_ in (("dh", got_h, want_h), ("dw", got_w, want_w)):
    rel = float(jnp.abs(a - b_).max() / jnp.abs(b_).max())
    measure(f"{name}_rel", rel)
    assert rel <= tol.CHUNKED_GRAD_FP32_REL, name
  measure("bytes_moved_sharded_over_partitioner", moved[rules] / moved[None])
  assert moved[rules] < 0.5 * moved[None], moved
