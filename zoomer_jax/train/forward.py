"""The training forward: hidden states with a rematerialisation policy, then per-token log-probs.

    logp_bt, entropy_bt = sequence_logprobs(model, batch, remat="full", vocab_chunk=16384)

`logp_bt[b, t]` is log p(ids[b, t] | ids[b, :t]) (0 at t = 0), from the same model pieces, positions and
rounding as the sampler, so the two agree (tests/test_agent.py). Logits are never materialised over the whole
vocabulary when `vocab_chunk` is set, and `token_chunk` also walks the tokens in blocks
(`zoomer_jax.train.logprobs`): at 32k tokens and Qwen's 152k vocabulary that is ~0.8 GiB of scratch, not ~93.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoomer_jax.model.stack import REMAT_POLICIES
from zoomer_jax.train.batch import TrainBatch
from zoomer_jax.train.logprobs import head_weight, logits_dtype, token_logprobs

__all__ = ["REMAT_POLICIES", "hidden_states", "sequence_logprobs"]


def hidden_states(model, batch: TrainBatch, *, remat: str = "none", freeze_vision: bool | str = False):
  """Final-norm hidden states [B, L, d] from the model's one trunk (`Qwen25VL.forward(logits_at=None)`).
  `freeze_vision` (`optim.FREEZE_VISION`): True, no gradient reaches the vision tower; "blocks", none reaches its
  patch embedding and blocks (the merger trains). `remat` is a `model.stack.REMAT_POLICIES` name."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  h_btd, _ = model.forward(batch.ids, batch.positions, batch.token_mask, images=batch.images, logits_at=None,
                           remat_policy=remat, freeze_vision=freeze_vision)
  return h_btd


def sequence_logprobs(model, batch: TrainBatch, *, remat: str = "none", vocab_chunk: int | None = None,
                      token_chunk: int | None = None, freeze_vision: bool = False, temperature: float = 1.0,
                      with_entropy: bool = True, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array | None]:
  """(log-prob of each token given its prefix [B, L], entropy of that prediction [B, L] or None), fp32.

  `vocab_limit` (the tokenizer's size): the distribution is over ids below it, as the sampler draws them
  (`sampling.restrict_vocab`); the head's padding rows past it are not tokens."""
  h_btd = hidden_states(model, batch, remat=remat, freeze_vision=freeze_vision)
  w_dv = head_weight(model)
  if vocab_limit is not None and vocab_limit < w_dv.shape[1]:
    w_dv = w_dv[:, :vocab_limit]
  # Every position is scored (the last against a dummy 0, dropped) so the token axis keeps the length the mesh
  # splits (`token_logprobs` under shard_map, `rules`); position t scores ids[t + 1].
  targets = jnp.concatenate([batch.ids[:, 1:], jnp.zeros_like(batch.ids[:, :1])], axis=1)
  logp, ent = token_logprobs(h_btd, w_dv, targets, vocab_chunk=vocab_chunk or None, token_chunk=token_chunk or None,
                             temperature=temperature, with_entropy=with_entropy, dtype_rounding=logits_dtype(model),
                             rules=model.options.rules)
  shift = lambda x: None if x is None else jnp.pad(x[:, :-1], ((0, 0), (1, 0)))
  return shift(logp), shift(ent)
