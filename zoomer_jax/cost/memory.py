"""Per-chip HBM of a training step, item by item, for the update phase and the rollout phase.

Everything is bytes on one chip. Parameters and optimizer state are divided by the parameter shards
(fsdp x tensor; replicated over data); activations by the rows a chip holds (micro-batch rows are sharded
over data x fsdp) and, for head / MLP / vocabulary widths, by tensor. The residual stream (width d) is
replicated over tensor (no sequence parallelism). Sizes are upper bounds of what XLA keeps live; its
buffer reuse and fusion make the real peak lower, its fragmentation and scratch higher -- hence the
`headroom` the fit check leaves.
"""

from __future__ import annotations

import dataclasses

from zoomer_jax.model.config import TextConfig, VisionConfig

REMAT_POLICIES = ("none", "full", "save_dots", "save_attention", "save_attention_up", "save_attention_mlp_weights")
LOGIT_BUFFERS = 3  # fp32 logits of a chunk, exp(z - m) of it, and in the backward its gradient


@dataclasses.dataclass(frozen=True)
class TrainerState:
  """Bytes per parameter of what the trainer keeps (defaults: see `account.Trainer`)."""

  param_bytes: int = 2
  grad_bytes: int = 2  # one micro-batch's gradient, in the parameter dtype
  grad_accum_bytes: int = 4  # the accumulator across micro-batches
  moment_bytes: int = 4  # each of Adam's m and v
  master_bytes: int = 0  # an fp32 master copy, if any


def _div(n: int, shards: int) -> int:
  """Width of a dimension of size n sharded over `shards` (replicated when it does not divide)."""
  return n // shards if shards > 1 and n % shards == 0 else n


# ------------------------------------------------------------------ activations per token / patch
def text_saved_per_token_layer(t: TextConfig, tp: int) -> int:
  """Elements one decoder layer keeps for its backward per token without remat: the RMSNorm inputs x, x2,
  their outputs (matmul inputs), rotated q, k, v, the attention output, gate, up and silu(gate)*up."""
  h = t.head_dim
  q, kv = _div(t.num_attention_heads, tp) * h, _div(t.num_key_value_heads, tp) * h
  return 4 * t.hidden_size + 2 * q + 2 * kv + 3 * _div(t.intermediate_size, tp)


def text_dots_per_token_layer(t: TextConfig, tp: int) -> int:
  """Elements kept under `save_dots` (matmul outputs without batch dims: q, k, v, o, gate, up, down) plus
  the layer input the checkpoint always keeps."""
  h = t.head_dim
  q, kv = _div(t.num_attention_heads, tp) * h, _div(t.num_key_value_heads, tp) * h
  return q + 2 * kv + 3 * t.hidden_size + 2 * _div(t.intermediate_size, tp)


def text_attention_saved_per_token_layer(t: TextConfig, tp: int) -> int:
  """Elements kept under `save_attention` (the attention kernel's q, k, v and output) plus the layer input."""
  h = t.head_dim
  q, kv = _div(t.num_attention_heads, tp) * h, _div(t.num_key_value_heads, tp) * h
  return 2 * q + 2 * kv + t.hidden_size


def vision_saved_per_patch_block(v: VisionConfig, tp: int) -> int:
  """As `text_saved_per_token_layer` for a vision block (q, k, v all full width: no GQA)."""
  heads = _div(v.num_heads, tp) * v.head_dim
  return 4 * v.hidden_size + 4 * heads + 3 * _div(v.intermediate_size, tp)


def text_activation_bytes(t: TextConfig, tokens: int, remat: str, *, tp: int, act_bytes: int = 2) -> dict[str, int]:
  """Decoder activations of `tokens` tokens on one chip (rows x sequence length) -> {"saved": what all layers
  keep for the backward under the remat policy, "working": one layer's recomputed intermediates and their
  gradients during its backward}. Attention score matrices are separate (`attention_score_bytes`)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} is not one of {REMAT_POLICIES}")
  full = text_saved_per_token_layer(t, tp)
  saved_per = dict(none=full, full=t.hidden_size, save_dots=text_dots_per_token_layer(t, tp),
                   save_attention=text_attention_saved_per_token_layer(t, tp),
                   save_attention_up=text_attention_saved_per_token_layer(t, tp) + _div(t.intermediate_size, tp),
                   save_attention_mlp_weights=text_attention_saved_per_token_layer(t, tp))[remat]
  return dict(saved=t.num_hidden_layers * tokens * saved_per * act_bytes, working=2 * tokens * full * act_bytes)


def decoder_mlp_weights(t: TextConfig, *, tp: int) -> int:
  """Elements of every decoder layer's MLP weights (gate, up, down) on one chip, gathered over fsdp and sharded
  over tensor only: what "save_attention_mlp_weights" keeps for the backward."""
  return t.num_hidden_layers * 3 * t.hidden_size * _div(t.intermediate_size, tp)


def attention_score_bytes(heads: int, rows: int, q_len: int, k_len: int, *, saved_layers: int,
                          attention: str) -> dict[str, int]:
  """Dense attention's [rows, heads, q, k] buffers: fp32 scores and their gradient (4 + 4 bytes) for the
  layer being worked on, bf16 probabilities (2 bytes) for every layer that keeps them. A blockwise
  (flash/splash) kernel keeps O(q) statistics instead: counted as 0."""
  if attention == "flash":
    return dict(saved=0, working=0)
  if attention != "dense":
    raise ValueError(f"attention {attention!r} is not 'dense' or 'flash'")
  pairs = rows * heads * q_len * k_len
  return dict(saved=saved_layers * pairs * 2, working=pairs * (4 + 4 + 2))


def vision_activation_bytes(v: VisionConfig, patches: int, remat: str, *, tp: int, trainable: bool,
                            act_bytes: int = 2) -> dict[str, int]:
  """Vision tower activations for `patches` patches. A frozen tower keeps nothing for the backward."""
  full = vision_saved_per_patch_block(v, tp)
  if not trainable:
    return dict(saved=0, working=patches * full * act_bytes)
  # The tower's MLP is not named: save_attention_up keeps what save_attention does there (its input).
  saved_per = dict(none=full, full=v.hidden_size, save_dots=full, save_attention=v.hidden_size,
                   save_attention_up=v.hidden_size, save_attention_mlp_weights=v.hidden_size)[remat]
  merger = 5 * v.hidden_size  # ln_q in/out per patch, fc1 out and GELU out per merged token (4d / 4 patches)
  return dict(saved=(v.depth * saved_per + merger) * patches * act_bytes, working=2 * patches * full * act_bytes)


def logits_bytes(tokens: int, vocab: int, vocab_chunk: int, tp: int) -> int:
  """Live fp32 logits: a [tokens, chunk] block (chunked, train/logprobs.py) or the whole [tokens, vocab]."""
  width = min(vocab_chunk, vocab) if vocab_chunk else _div(vocab, tp)
  return LOGIT_BUFFERS * tokens * width * 4


def kv_bytes_per_token(t: TextConfig, kv_bytes: int = 2) -> int:
  """K and V of one token in every layer."""
  return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * kv_bytes


@dataclasses.dataclass
class MemoryTable:
  """Named per-chip byte counts of one phase; `total` and a fit check against the chip."""

  phase: str
  items: dict[str, float] = dataclasses.field(default_factory=dict)

  def add(self, name: str, nbytes: float) -> None:
    self.items[name] = self.items.get(name, 0) + float(nbytes)

  @property
  def total(self) -> float:
    return sum(self.items.values())

  def fits(self, hbm_bytes: float, headroom: float) -> bool:
    return self.total <= (1 - headroom) * hbm_bytes
