"""GRPO loss pieces against hand-computed numbers (verl semantics): advantages, dynamic sampling, KL kinds,
aggregation modes, the asymmetric clip, TIS, masking and exact accumulation over micro-batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoomer_jax.train import grpo_loss as G

ATOL = 1e-6


# ------------------------------------------------------------------------------------------ advantages
def test_advantages_unbiased_std_and_single_sample_group():
  # group "a" (indices 0, 2, 3, 4) = [1, 0, 1, 1]: mean 0.75, unbiased var (3 * 0.25^2 + 0.75^2) / 3 = 0.25
  # group "b" (index 1) = [0.7] alone: mean 0, std 1
  rewards, ids = [1.0, 0.7, 0.0, 1.0, 1.0], ["a", "b", "a", "a", "a"]
  adv = G.grpo_advantages(rewards, ids)
  want = [0.25 / (0.5 + 1e-6), 0.7 / (1 + 1e-6), -0.75 / (0.5 + 1e-6), 0.25 / (0.5 + 1e-6), 0.25 / (0.5 + 1e-6)]
  np.testing.assert_allclose(adv, want, rtol=1e-6)
  assert adv.dtype == np.float32 and adv.shape == (5,)
  # Dr.GRPO: no division by the std
  np.testing.assert_allclose(G.grpo_advantages(rewards, ids, norm_adv_by_std=False),
                             [0.25, 0.7, -0.75, 0.25, 0.25], rtol=1e-6)
  # integer group ids work the same; an all-equal group gets 0 (not NaN)
  np.testing.assert_allclose(G.grpo_advantages([2.0, 2.0, 5.0], [7, 7, 3]), [0.0, 0.0, 5.0 / (1 + 1e-6)])
  with pytest.raises(ValueError, match="rewards"):
    G.grpo_advantages([1.0, 2.0], [0])


def test_rloo_advantages_leave_one_out_by_hand():
  # group "a" = [1, 0, 1, 1]: each reward minus the mean of the other three: 1 - 2/3, 0 - 1, 1 - 2/3, 1 - 2/3;
  # group "b" = [0.7] alone keeps its reward (verl)
  rewards, ids = [1.0, 0.7, 0.0, 1.0, 1.0], ["a", "b", "a", "a", "a"]
  want = [1 / 3, 0.7, -1.0, 1 / 3, 1 / 3]
  np.testing.assert_allclose(G.rloo_advantages(rewards, ids), want, rtol=1e-6)
  np.testing.assert_allclose(G.outcome_advantages("rloo", rewards, ids, norm_adv_by_std=True), want, rtol=1e-6)
  np.testing.assert_array_equal(G.outcome_advantages("grpo", rewards, ids, norm_adv_by_std=False),
                                G.grpo_advantages(rewards, ids, norm_adv_by_std=False))
  with pytest.raises(ValueError, match=r"algorithm.adv_estimator 'gae' is not one of \['grpo', 'rloo'\]"):
    G.outcome_advantages("gae", rewards, ids)


def test_keep_groups_drops_all_equal_groups():
  rewards = [1, 0, 1, 1, 0.7, 0.5, 0.5, 0.5, 1.0, 1.0 + 1e-5]
  ids = ["a", "a", "a", "a", "b", "c", "c", "c", "d", "d"]
  # a varies: keep; b is one sample (torch.std is NaN, never < 1e-4): keep; c is constant: drop;
  # d differs by 1e-5 (std 7.1e-6 < 1e-4): drop
  np.testing.assert_array_equal(G.keep_groups(rewards, ids), [True] * 5 + [False] * 5)
  np.testing.assert_array_equal(G.keep_groups(rewards, ids, min_std=1e-6)[-2:], [True, True])


# ------------------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("kind,want", [
    ("kl", [0.5, -1.5]), ("k1", [0.5, -1.5]),
    ("abs", [0.5, 1.5]),
    ("mse", [0.125, 1.125]), ("k2", [0.125, 1.125]),
    # k3 = exp(x) - x - 1 with x = ref - logp: x = -0.5 and x = 1.5
    ("low_var_kl", [math.exp(-0.5) + 0.5 - 1, math.exp(1.5) - 1.5 - 1]),
    ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(1.5) - 1.5 - 1]),
])
def test_kl_kinds_at_two_points(kind, want):
  logp, ref = jnp.asarray([-1.0, -2.0]), jnp.asarray([-1.5, -0.5])
  np.testing.assert_allclose(G.kl_penalty(logp, ref, kind), want, rtol=1e-6)


def test_low_var_kl_is_clipped_to_10_and_unknown_kind_names_the_valid_ones():
  # x = 15: e^15 - 16 is far above 10; x = -30: -x - 1 = 29 (after verl's x clamp to -20: 19): both clip to 10
  np.testing.assert_allclose(G.kl_penalty(jnp.asarray([-20.0, -1.0]), jnp.asarray([-5.0, -31.0]), "low_var_kl"),
                             [10.0, 10.0])
  g = jax.grad(lambda lp: G.kl_penalty(lp, jnp.asarray(-5.0), "low_var_kl"))(jnp.asarray(-20.0))
  assert float(g) == 0.0  # clipped: no gradient
  with pytest.raises(ValueError, match=r"'full'.*low_var_kl"):
    G.kl_penalty(jnp.zeros(2), jnp.zeros(2), "full")


# --------------------------------------------------------------------------------------- aggregation
LOSS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK = [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("mode,want_sum,want_denom", [
    ("token-mean", 10.0, 4.0),  # (1 + 2 + 3 + 4) / 4 tokens = 2.5
    ("seq-mean-token-mean", 6.0, 2.0),  # ((1 + 2 + 3) / 3 + 4 / 1) / 2 = 3
    ("seq-mean-token-sum", 10.0, 2.0),  # (6 + 4) / 2 = 5
    ("seq-mean-token-sum-norm", 10.0, 3.0),  # (6 + 4) / T=3
])
def test_agg_modes_on_a_masked_2x3(mode, want_sum, want_denom):
  s, d = G.agg_loss(jnp.asarray(LOSS), jnp.asarray(MASK), mode)
  assert (float(s), float(d)) == pytest.approx((want_sum, want_denom))
  assert float(G.finish(s, d)) == pytest.approx(want_sum / want_denom)


def test_agg_rejects_unknown_mode_and_bad_shapes_and_skips_empty_rows():
  with pytest.raises(ValueError, match=r"'mean'.*seq-mean-token-mean"):
    G.agg_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), "mean")
  with pytest.raises(ValueError, match="mask"):
    G.agg_loss(jnp.ones((2, 3)), jnp.ones((2, 4)), "token-mean")
  # a row of batch padding (mask all 0) is not a sequence: same value as without it
  loss, mask = jnp.asarray(LOSS + [[9.0, 9.0, 9.0]]), jnp.asarray(MASK + [[0, 0, 0]])
  for mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
    assert float(G.finish(*G.agg_loss(loss, mask, mode))) == pytest.approx(
        float(G.finish(*G.agg_loss(jnp.asarray(LOSS), jnp.asarray(MASK), mode))))
  assert float(G.finish(*G.agg_loss(jnp.zeros((1, 3)), jnp.zeros((1, 3)), "token-mean"))) == 0.0


# --------------------------------------------------------------------------------------------- clip
def _clip_case():
  """Row 0 has advantage +1, row 1 advantage -1; ratios 0.7, 1.0, 1.3 in both; clip range [0.8, 1.27]."""
  ratios = np.asarray([0.7, 1.0, 1.3])
  logp = jnp.asarray(np.log(np.stack([ratios, ratios])), jnp.float32)
  return logp, jnp.zeros_like(logp), jnp.asarray([1.0, -1.0]), jnp.ones((2, 3))


def test_clip_sides_values_gradients_and_metrics():
  logp, old, adv, mask = _clip_case()
  # A>0: max(-r, -clip(r)) -> r=0.7: -0.7 (unclipped); 1.0: -1; 1.3: -1.27 (clipped at 1 + 0.27)
  # A<0: max(r, clip(r))   -> r=0.7: 0.8 (clipped at 1 - 0.2); 1.0: 1; 1.3: 1.3 (unclipped)
  per_token = np.asarray([[-0.7, -1.0, -1.27], [0.8, 1.0, 1.3]])

  def loss(lp):
    (s, d), _ = G.policy_loss(lp, old, adv, mask, loss_agg_mode="token-mean")
    return s / d

  (s, d), m = G.policy_loss(logp, old, adv, mask, loss_agg_mode="token-mean")
  assert float(s) == pytest.approx(per_token.sum(), abs=1e-5) and float(d) == 6
  # d/dlogp = -A r where unclipped, 0 where the clipped branch is taken; / 6 tokens
  grad = np.asarray(jax.grad(loss)(logp))
  np.testing.assert_allclose(grad, np.asarray([[-0.7, -1.0, 0.0], [0.0, 1.0, 1.3]]) / 6, atol=ATOL)
  assert float(m["pg_clipfrac"]) == pytest.approx(2 / 6)
  assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
  assert float(m["ppo_kl"]) == pytest.approx(-2 * (math.log(0.7) + math.log(1.3)) / 6, abs=1e-6)
  # symmetric clip 0.2/0.2: the A>0, r=1.3 token is now clipped at 1.2
  (s2, _), _ = G.policy_loss(logp, old, adv, mask, clip_ratio_high=0.2, loss_agg_mode="token-mean")
  assert float(s2) == pytest.approx(per_token.sum() + 1.27 - 1.2, abs=1e-5)


def test_tis_weights_are_capped_and_carry_no_gradient():
  old = jnp.asarray([[math.log(0.5), 0.0, math.log(3.0)]])
  sampler = jnp.zeros((1, 3))
  np.testing.assert_allclose(G.tis_weights(old, sampler, cap=2.0), [[0.5, 1.0, 2.0]], rtol=1e-6)
  assert np.all(np.asarray(jax.grad(lambda o: G.tis_weights(o, sampler).sum())(old)) == 0)
  # in the loss: ratio 1 everywhere, A = 2, so per-token pg = -2 * w; token-mean = -2 * (0.5 + 1 + 2) / 3
  cfg = G.GRPOLossConfig(loss_agg_mode="token-mean", use_kl_loss=False, entropy_coeff=0.0, tis_cap=2.0)
  s, d, m = G.grpo_loss(old, None, old, None, jnp.asarray([2.0]), jnp.ones((1, 3)), cfg, sampler_logp=sampler)
  assert float(s / d) == pytest.approx(-2 * 3.5 / 3, rel=1e-6)
  assert float(m["tis_weight_mean"]) == pytest.approx(3.5 / 3, rel=1e-6)
  with pytest.raises(ValueError, match="sampler_logp"):
    G.grpo_loss(old, None, old, None, jnp.asarray([2.0]), jnp.ones((1, 3)), cfg)


# ---------------------------------------------------------------------------------------- grpo_loss
def test_grpo_loss_combines_terms_by_hand():
  # one sequence, third token padded; ratio 1 so pg = -A = -2 per token
  logp = jnp.asarray([[-1.0, -2.0, 99.0]])
  ref = jnp.asarray([[-1.5, -2.0, 0.0]])
  ent = jnp.asarray([[3.0, 5.0, 100.0]])
  mask = jnp.asarray([[1, 1, 0]])
  cfg = G.GRPOLossConfig(kl_loss_coef=0.1, entropy_coeff=0.01)  # seq-mean-token-mean, low_var_kl
  s, d, m = G.grpo_loss(logp, ent, logp, ref, jnp.asarray([2.0]), mask, cfg)
  kl = (math.exp(-0.5) + 0.5 - 1 + 0.0) / 2  # k3 at x = -0.5 and x = 0
  assert float(d) == 1.0
  assert float(s / d) == pytest.approx(-2.0 + 0.1 * kl - 0.01 * 4.0, abs=1e-6)
  assert float(m["pg_loss"]) == pytest.approx(-2.0) and float(m["entropy"]) == pytest.approx(4.0)
  assert float(m["kl_loss"]) == pytest.approx(kl, abs=1e-7)
  with pytest.raises(ValueError, match="ref_logp"):
    G.grpo_loss(logp, ent, logp, None, jnp.asarray([2.0]), mask, cfg)
  with pytest.raises(ValueError, match="entropy"):
    G.grpo_loss(logp, None, logp, ref, jnp.asarray([2.0]), mask, cfg)


def test_padding_contributes_nothing_and_gets_zero_gradient(rng):
  b, t = 3, 6
  mask = np.ones((b, t), np.float32)
  mask[0, 4:] = 0
  mask[2, 1:] = 0
  logp = rng.normal(-1, 0.3, (b, t)).astype(np.float32)
  old = (logp + rng.normal(0, 0.2, (b, t))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.2, (b, t))).astype(np.float32)
  ent = rng.uniform(0, 3, (b, t)).astype(np.float32)
  adv = jnp.asarray([1.0, -0.5, 2.0])
  cfg = G.GRPOLossConfig()
  # garbage at padded tokens: inf / NaN in every input
  bad = lambda x, v: jnp.asarray(np.where(mask > 0, x, v))  # noqa: E731
  args = dict(old_logp=bad(old, np.inf), ref_logp=bad(ref, -np.inf), advantages=adv, mask_bt=jnp.asarray(mask),
              cfg=cfg)

  def loss(lp, ent):
    s, d, _ = G.grpo_loss(lp, ent, **args)
    return s / d

  clean = G.grpo_loss(jnp.asarray(logp), jnp.asarray(ent), jnp.asarray(old), jnp.asarray(ref), adv,
                      jnp.asarray(mask), cfg)
  value, (g_lp, g_ent) = jax.value_and_grad(loss, (0, 1))(bad(logp, np.nan), bad(ent, np.inf))
  assert float(value) == pytest.approx(float(clean[0] / clean[1]), rel=1e-6)
  g_lp, g_ent = np.asarray(g_lp), np.asarray(g_ent)
  assert np.isfinite(g_lp).all() and np.isfinite(g_ent).all()
  assert np.all(g_lp[mask == 0] == 0) and np.all(g_ent[mask == 0] == 0)
  assert np.all(g_lp[mask > 0] != 0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_accumulation_is_exact(rng, mode):
  b, t = 5, 7
  mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.float32)
  mask[:, 0] = 1
  logp = jnp.asarray(rng.normal(-1, 0.3, (b, t)), jnp.float32)
  old = logp + jnp.asarray(rng.normal(0, 0.2, (b, t)), jnp.float32)
  ref = logp + jnp.asarray(rng.normal(0, 0.2, (b, t)), jnp.float32)
  ent = jnp.asarray(rng.uniform(0, 3, (b, t)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=b), jnp.float32)
  cfg = G.GRPOLossConfig(loss_agg_mode=mode)
  whole = G.grpo_loss(logp, ent, old, ref, adv, jnp.asarray(mask), cfg)
  parts = [G.grpo_loss(logp[sl], ent[sl], old[sl], ref[sl], adv[sl], jnp.asarray(mask[sl]), cfg)
           for sl in (slice(0, 2), slice(2, 5))]
  acc_sum, acc_den = sum(p[0] for p in parts), sum(p[1] for p in parts)
  assert float(G.finish(acc_sum, acc_den)) == pytest.approx(float(G.finish(whole[0], whole[1])), rel=1e-6)
  if mode == "token-mean":  # the denominator is the token count of the whole batch
    assert float(acc_den) == mask.sum()


# ------------------------------------------------------------------------------------------- config
def test_config_defaults_from_dict_and_errors():
  cfg = G.GRPOLossConfig()
  assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.loss_agg_mode, cfg.use_kl_loss, cfg.kl_loss_coef,
          cfg.kl_loss_type, cfg.entropy_coeff, cfg.tis_cap) == (0.2, 0.27, "seq-mean-token-mean", True, 0.001,
                                                                 "low_var_kl", 0.001, 0.0)
  assert G.GRPOLossConfig.from_dict({"kl_loss_coef": 0.01}).kl_loss_coef == 0.01
  with pytest.raises(ValueError, match=r"unknown GRPO loss keys \['clip_ratio'\]"):
    G.GRPOLossConfig.from_dict({"clip_ratio": 0.2})
  with pytest.raises(ValueError, match="loss_agg_mode"):
    G.GRPOLossConfig(loss_agg_mode="token_mean")
  with pytest.raises(ValueError, match="kl_loss_type"):
    G.GRPOLossConfig(kl_loss_type="k4")
