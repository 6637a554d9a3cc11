"""GRPO: group advantages (GRPO or RLOO), dynamic sampling, and the clipped policy loss with KL and entropy terms.

Semantics and names follow verl (`core_algos.py`, `dp_actor.py`) as VideoZoomer's fork uses them
(docs/training.md, GRPO): advantages per prompt group with the unbiased std, an asymmetric clip (`clip_ratio_low`,
`clip_ratio_high`) without dual-clip, a `low_var_kl` loss term against the reference policy and an entropy
bonus, all masked by the response mask and aggregated with one `loss_agg_mode`.

Every loss is returned as a (sum, denominator) pair so that gradient accumulation over micro-batches is
exact: sum the pairs of the micro-batches, then `finish(sum, denominator)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------------------------- advantages
def _groups(rewards, group_ids) -> tuple[np.ndarray, np.ndarray, int]:
  """(float64 rewards [N], group index of each sample [N], number of groups)."""
  rewards = np.asarray(rewards, np.float64)
  group_ids = np.asarray(group_ids)
  if rewards.ndim != 1 or group_ids.shape != rewards.shape:
    raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} must both be [N]")
  _, inverse = np.unique(group_ids, return_inverse=True)
  return rewards, inverse.reshape(-1), int(inverse.max(initial=-1)) + 1


def _group_stats(r: np.ndarray, g: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per group: (count, mean, unbiased std; NaN for a single sample as torch.std gives)."""
  count = np.bincount(g, minlength=n_groups).astype(np.float64)
  mean = np.bincount(g, r, minlength=n_groups) / count
  sq = np.bincount(g, (r - mean[g]) ** 2, minlength=n_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    std = np.sqrt(sq / (count - 1))
  return count, mean, std


def grpo_advantages(rewards, group_ids, eps: float = 1e-6, *, norm_adv_by_std: bool = True) -> np.ndarray:
  """Outcome advantages [N]: (r - mean) / (std + eps) within each group (samples of one prompt).

  The std is unbiased (torch.std); a group of one sample gets mean 0 and std 1, as verl's
  `compute_grpo_outcome_advantage`. `norm_adv_by_std=False` is Dr.GRPO: r - mean, no division.
  """
  r, g, n_groups = _groups(rewards, group_ids)
  count, mean, std = _group_stats(r, g, n_groups)
  single = count == 1
  mean, std = np.where(single, 0.0, mean), np.where(single, 1.0, std)
  adv = r - mean[g]
  if norm_adv_by_std:
    adv = adv / (std[g] + eps)
  return adv.astype(np.float32)


def rloo_advantages(rewards, group_ids) -> np.ndarray:
  """RLOO outcome advantages [N]: r minus the mean of the other samples of its group, = (r - mean) * n / (n - 1).

  A group of one sample keeps its reward, as verl's `compute_rloo_outcome_advantage`.
  """
  r, g, n_groups = _groups(rewards, group_ids)
  count, mean, _ = _group_stats(r, g, n_groups)
  n = count[g]
  adv = np.where(n > 1, (r - mean[g]) * n / np.maximum(n - 1, 1), r)
  return adv.astype(np.float32)


# `algorithm.adv_estimator` -> advantages [N] from (rewards, group ids, norm_adv_by_std_in_grpo), verl's names.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., np.ndarray]] = {
    "grpo": lambda r, g, norm_adv_by_std: grpo_advantages(r, g, norm_adv_by_std=norm_adv_by_std),
    "rloo": lambda r, g, norm_adv_by_std: rloo_advantages(r, g),  # norm_adv_by_std_in_grpo is GRPO's alone
}


def check_adv_estimator(name: str) -> None:
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"algorithm.adv_estimator {name!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}")


def outcome_advantages(name: str, rewards, group_ids, *, norm_adv_by_std: bool = True) -> np.ndarray:
  """Advantages [N] of the estimator `name` (one of `ADVANTAGE_ESTIMATORS`)."""
  check_adv_estimator(name)
  return ADVANTAGE_ESTIMATORS[name](rewards, group_ids, norm_adv_by_std)


def keep_groups(rewards, group_ids, min_std: float = 1e-4) -> np.ndarray:
  """Dynamic sampling: bool [N], False for every sample of a group whose rewards have std < min_std.

  As the fork's `ray_trainer.fit` (`uid_rewards.std() < 1e-4`, unbiased): a group of one sample has a NaN
  std, which never compares below min_std, so it is kept.
  """
  r, g, n_groups = _groups(rewards, group_ids)
  _, _, std = _group_stats(r, g, n_groups)
  return ~(std < min_std)[g]


# --------------------------------------------------------------------------------------- KL penalties
def _k1(logp, ref):
  return logp - ref


def _abs(logp, ref):
  return jnp.abs(logp - ref)


def _mse(logp, ref):
  return 0.5 * jnp.square(logp - ref)


def _low_var_kl(logp, ref):
  """Schulman's k3 estimator exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10] as verl does
  (verl also clamps ref - logp to [-20, 20] before exp; beyond that the result is clipped to 10 anyway)."""
  kl = jnp.clip(ref - logp, -20.0, 20.0)
  return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)


KL_PENALTIES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "kl": _k1, "k1": _k1, "abs": _abs, "mse": _mse, "k2": _mse, "low_var_kl": _low_var_kl, "k3": _low_var_kl,
}


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str) -> jax.Array:
  """Per-token KL estimate between the policy and the reference, `kind` one of `KL_PENALTIES`."""
  if kind not in KL_PENALTIES:
    raise ValueError(f"kl_loss_type {kind!r} is not one of {sorted(KL_PENALTIES)}")
  return KL_PENALTIES[kind](logp, ref_logp)


# ------------------------------------------------------------------------------------- aggregation
def _token_mean(loss_bt, mask_bt):
  return jnp.sum(loss_bt * mask_bt), jnp.sum(mask_bt)


def _n_seqs(mask_bt):
  # Rows without a single unmasked token (batch padding) are not sequences: verl never sees them (its
  # token-mean would divide 0/0), so leaving them out keeps verl's value for every real batch.
  return jnp.sum((jnp.sum(mask_bt, axis=-1) > 0).astype(jnp.float32))


def _seq_mean_token_mean(loss_bt, mask_bt):
  per_seq = jnp.sum(loss_bt * mask_bt, axis=-1) / jnp.maximum(jnp.sum(mask_bt, axis=-1), 1.0)
  return jnp.sum(per_seq), _n_seqs(mask_bt)


def _seq_mean_token_sum(loss_bt, mask_bt):
  return jnp.sum(loss_bt * mask_bt), _n_seqs(mask_bt)


def _seq_mean_token_sum_norm(loss_bt, mask_bt):
  # Dr.GRPO: divide by the (constant) padded response length, not by a count of sequences or tokens.
  return jnp.sum(loss_bt * mask_bt), jnp.asarray(mask_bt.shape[-1], jnp.float32)


LOSS_AGG_MODES: dict[str, Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def agg_loss(loss_bt: jax.Array, mask_bt: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
  """(sum, denominator) whose ratio is verl's `agg_loss(loss_bt, mask_bt, mode)`; [B, T] -> two scalars.

  token-mean: sum of masked losses / number of unmasked tokens.
  seq-mean-token-mean: mean over sequences of each sequence's token-mean.
  seq-mean-token-sum: mean over sequences of each sequence's token-sum.
  (rows with no unmasked token are not counted as sequences.)
  seq-mean-token-sum-norm: sum of masked losses / T (the padded length).
  Summing the pairs of several micro-batches and then dividing gives the loss of the whole batch (for the
  -norm mode, the mean of the micro-batches' losses, which is what verl's accumulation computes).
  """
  if mode not in LOSS_AGG_MODES:
    raise ValueError(f"loss_agg_mode {mode!r} is not one of {sorted(LOSS_AGG_MODES)}")
  loss_bt = jnp.asarray(loss_bt, jnp.float32)
  mask_bt = jnp.asarray(mask_bt).astype(jnp.float32)
  if loss_bt.ndim != 2 or mask_bt.shape != loss_bt.shape:
    raise ValueError(f"loss {loss_bt.shape} and mask {mask_bt.shape} must both be [batch, tokens]")
  # where, not multiply: a padded token holding inf or NaN must not poison the sum
  return LOSS_AGG_MODES[mode](jnp.where(mask_bt > 0, loss_bt, 0.0), mask_bt)


def finish(loss_sum, denominator):
  """The aggregated loss from accumulated (sum, denominator); 0 when nothing was counted."""
  return loss_sum / jnp.maximum(denominator, 1e-8)


def _masked_mean(x_bt, mask_bt):
  return jnp.sum(jnp.where(mask_bt > 0, x_bt, 0.0)) / jnp.maximum(jnp.sum(mask_bt), 1.0)


# ------------------------------------------------------------------------------------- policy loss
def tis_weights(old_logp: jax.Array, sampler_logp: jax.Array, cap: float = 2.0) -> jax.Array:
  """Truncated importance weights min(pi_old / pi_sampler, cap) per token, without gradient: they correct
  for the sampler's numerics differing from the trainer's (same weights, different kernels)."""
  w = jnp.minimum(jnp.exp(jnp.clip(old_logp - sampler_logp, -20.0, 20.0)), cap)
  return jax.lax.stop_gradient(w)


def _per_token(advantages, shape):
  adv = jnp.asarray(advantages, jnp.float32)
  if adv.ndim == 1:
    adv = adv[:, None]
  return jnp.broadcast_to(adv, shape)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask_bt: jax.Array, *,
                clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.27, loss_agg_mode: str,
                tis_weights: jax.Array | None = None) -> tuple[tuple[jax.Array, jax.Array], dict[str, jax.Array]]:
  """PPO clipped surrogate max(-A r, -A clip(r, 1 - low, 1 + high)), r = exp(logp - old_logp).

  logp, old_logp, mask_bt [B, T]; advantages [B] (one per trajectory) or [B, T]. `tis_weights` [B, T]
  multiplies the per-token loss. No dual-clip (the fork has none); the log-ratio is clamped to [-20, 20] before exp
  as newer verl does (the fork does not; they differ only for ratios beyond e^20). Returns ((sum, denominator),
  metrics) with metrics pg_clipfrac (share of tokens where the clipped branch is larger), ppo_kl (mean of old_logp -
  logp) and ratio_mean, each a mean over the unmasked tokens of this call.
  """
  mask_bt = jnp.asarray(mask_bt).astype(jnp.float32)
  valid = mask_bt > 0
  # Padded tokens may hold anything; zero their log-ratio so neither value nor gradient sees it.
  log_ratio = jnp.where(valid, logp - old_logp, 0.0)
  ratio = jnp.exp(jnp.clip(log_ratio, -20.0, 20.0))
  adv = _per_token(advantages, logp.shape)
  loss1 = -adv * ratio
  loss2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
  pg = jnp.maximum(loss1, loss2)
  if tis_weights is not None:
    pg = pg * jax.lax.stop_gradient(tis_weights)
  metrics = {
      "pg_clipfrac": _masked_mean((loss2 > loss1).astype(jnp.float32), mask_bt),
      "ppo_kl": _masked_mean(-log_ratio, mask_bt),
      "ratio_mean": _masked_mean(ratio, mask_bt),
  }
  return agg_loss(pg, mask_bt, loss_agg_mode), metrics


# ---------------------------------------------------------------------------------------- GRPO loss
@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
  """The actor's loss settings under verl's names; defaults are VideoZoomer's (docs/training.md, GRPO)."""

  clip_ratio_low: float = 0.2
  clip_ratio_high: float = 0.27
  loss_agg_mode: str = "seq-mean-token-mean"
  use_kl_loss: bool = True
  kl_loss_coef: float = 0.001
  kl_loss_type: str = "low_var_kl"
  entropy_coeff: float = 0.001
  tis_cap: float = 0.0  # truncated importance sampling cap; 0 = off

  def __post_init__(self):
    if self.loss_agg_mode not in LOSS_AGG_MODES:
      raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r} is not one of {sorted(LOSS_AGG_MODES)}")
    if self.kl_loss_type not in KL_PENALTIES:
      raise ValueError(f"kl_loss_type {self.kl_loss_type!r} is not one of {sorted(KL_PENALTIES)}")
    if not 0 <= self.clip_ratio_low < 1 or self.clip_ratio_high < 0:
      raise ValueError(f"clip ratios must satisfy 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got "
                       f"{self.clip_ratio_low}, {self.clip_ratio_high}")
    if self.tis_cap < 0:
      raise ValueError(f"tis_cap must be >= 0 (0 = off), got {self.tis_cap}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GRPOLossConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown GRPO loss keys {unknown}; valid keys: {sorted(names)}")
    return cls(**dict(d))


def grpo_loss(logp: jax.Array, entropy: jax.Array | None, old_logp: jax.Array, ref_logp: jax.Array | None,
              advantages: jax.Array, mask_bt: jax.Array, cfg: GRPOLossConfig, *,
              sampler_logp: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """pg + kl_loss_coef * kl - entropy_coeff * entropy, each aggregated with `cfg.loss_agg_mode`.

  All [B, T] arrays are aligned token by token (advantages may be [B]). `ref_logp` is needed when
  `cfg.use_kl_loss`, `entropy` when `cfg.entropy_coeff` != 0, `sampler_logp` (the rollout's log-probs)
  when `cfg.tis_cap` > 0. Returns (loss_sum, denominator, metrics); the three terms share the denominator,
  and metrics hold each term's aggregated value for this call (pg_loss, kl_loss, entropy) plus
  policy_loss's.
  """
  mask_bt = jnp.asarray(mask_bt).astype(jnp.float32)
  valid = mask_bt > 0
  # Padded tokens may hold anything (NaN, -inf); replace them before any nonlinearity so that their
  # (masked) loss cannot turn into a NaN gradient.
  clean = lambda x: None if x is None else jnp.where(valid, x, 0.0)  # noqa: E731
  logp, entropy, old_logp, ref_logp, sampler_logp = map(clean, (logp, entropy, old_logp, ref_logp, sampler_logp))
  tis = None
  if cfg.tis_cap > 0:
    if sampler_logp is None:
      raise ValueError("tis_cap > 0 needs sampler_logp (the log-probs recorded by the rollout)")
    tis = tis_weights(old_logp, sampler_logp, cfg.tis_cap)
  (pg_sum, denom), metrics = policy_loss(logp, old_logp, advantages, mask_bt, clip_ratio_low=cfg.clip_ratio_low,
                                         clip_ratio_high=cfg.clip_ratio_high, loss_agg_mode=cfg.loss_agg_mode,
                                         tis_weights=tis)
  loss_sum = pg_sum
  metrics["pg_loss"] = finish(pg_sum, denom)
  if entropy is not None:
    ent_sum, _ = agg_loss(entropy, mask_bt, cfg.loss_agg_mode)
    loss_sum = loss_sum - cfg.entropy_coeff * ent_sum
    metrics["entropy"] = finish(ent_sum, denom)
  elif cfg.entropy_coeff != 0:
    raise ValueError(f"entropy_coeff={cfg.entropy_coeff} needs the per-token entropy")
  if cfg.use_kl_loss:
    if ref_logp is None:
      raise ValueError("use_kl_loss=True needs ref_logp (the reference policy's log-probs)")
    kl_sum, _ = agg_loss(kl_penalty(logp, ref_logp, cfg.kl_loss_type), mask_bt, cfg.loss_agg_mode)
    loss_sum = loss_sum + cfg.kl_loss_coef * kl_sum
    metrics["kl_loss"] = finish(kl_sum, denom)
  if tis is not None:
    metrics["tis_weight_mean"] = _masked_mean(tis, mask_bt)
  return loss_sum, denom, metrics
