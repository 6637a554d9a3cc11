"""The training forward: hidden states with a rematerialisation policy, then per-token log-probs.

    logp_bt, entropy_bt = sequence_logprobs(model, batch, remat="full", vocab_chunk=16384)

`logp_bt[b, t]` is log p(ids[b, t] | ids[b, :t]) (0 at t = 0), from the same model pieces, positions and
rounding as the sampler, so the two agree (issue #5). Logits are never materialised over the whole
vocabulary when `vocab_chunk` is set, and `token_chunk` also walks the tokens in blocks
(`zoomer_jax.train.logprobs`): at 32k tokens and Qwen's 152k vocabulary that is ~0.8 GiB of scratch, not ~93.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoomer_jax.model.kv_cache import attention_mask
from zoomer_jax.model.mrope import mrope_cos_sin
from zoomer_jax.train.batch import TrainBatch
from zoomer_jax.train.logprobs import head_weight, logits_dtype, token_logprobs

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each decoder layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def _layer_fn(layer, remat: str):
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  graphdef, state = nnx.split(layer)

  def run(state, x_btd, cos, sin, allowed):
    return nnx.merge(graphdef, state)(x_btd, cos, sin, allowed, None, 0)[0]
  policy = REMAT_POLICIES[remat]
  return state, (run if remat == "none" else jax.checkpoint(run, policy=policy))


def hidden_states(model, batch: TrainBatch, *, remat: str = "none", freeze_vision: bool = False) -> jax.Array:
  """Final-norm hidden states [B, L, d]. `freeze_vision` (`optim.FREEZE_VISION`): True, no gradient reaches the
  vision tower; "blocks", none reaches its patch embedding and blocks (the merger trains)."""
  feats = None
  if batch.images is not None:
    feats = model.encode_vision(batch.images, frozen_blocks=freeze_vision == "blocks")
    if freeze_vision is True:
      feats = jax.lax.stop_gradient(feats)
  x_btd = model.embed(batch.ids, feats)
  dec = model.model
  cos_bth, sin_bth = mrope_cos_sin(batch.positions, dec.cfg, dec.dtype)
  allowed_bts, _ = attention_mask(batch.token_mask.astype(bool), None)
  x_btd = x_btd.astype(dec.dtype)
  for layer in dec.layers:
    state, run = _layer_fn(layer, remat)
    x_btd = run(state, x_btd, cos_bth, sin_bth, allowed_bts)
  return dec.norm(x_btd)


def sequence_logprobs(model, batch: TrainBatch, *, remat: str = "none", vocab_chunk: int | None = None,
                      token_chunk: int | None = None, freeze_vision: bool = False, temperature: float = 1.0,
                      with_entropy: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """(log-prob of each token given its prefix [B, L], entropy of that prediction [B, L] or None), fp32."""
  h_btd = hidden_states(model, batch, remat=remat, freeze_vision=freeze_vision)
  logp, ent = token_logprobs(h_btd[:, :-1], head_weight(model), batch.ids[:, 1:], vocab_chunk=vocab_chunk or None,
                             token_chunk=token_chunk or None, temperature=temperature, with_entropy=with_entropy,
                             dtype_rounding=logits_dtype(model))
  pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (1, 0)))
  return pad(logp), pad(ent)
