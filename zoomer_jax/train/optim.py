"""AdamW with warmup + constant/cosine schedule, global-norm clipping, and an optionally frozen vision tower.

    tx, schedule = make_optimizer(cfg.optim, total_steps=1000, params=params, freeze_vision=True)

`optim` fields (verl / LLaMA-Factory names): lr, lr_scheduler ("constant" | "cosine"), warmup_ratio (or
warmup_steps, when > 0), min_lr_ratio, betas, weight_decay, grad_clip (0 = off); all but lr default to
`DEFAULTS` (job configs declare every field). Frozen parameters get no update and no optimizer moments.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

DEFAULTS = dict(lr_scheduler="constant", warmup_ratio=0.0, warmup_steps=0, min_lr_ratio=0.0, betas=(0.9, 0.999),
                weight_decay=0.0, grad_clip=0.0)
_KNOWN = {"lr", *DEFAULTS}


def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  optim = {**DEFAULTS, **optim}
  lr = float(optim["lr"])
  warmup = int(optim["warmup_steps"] or round(float(optim["warmup_ratio"]) * total_steps))
  kind = optim["lr_scheduler"]
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=float(optim["min_lr_ratio"]))
  else:
    raise ValueError(f"lr_scheduler {kind!r} is not one of ['constant', 'cosine']")
  if warmup <= 0:
    return decay
  # As transformers' get_*_schedule_with_warmup (LLaMA-Factory, verl): lr * s / warmup for s < warmup, so
  # the first update has lr 0; then the decay starts from lr at s = warmup.
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


FREEZE_VISION = (False, True, "blocks")  # train the vision tower; freeze all of it; freeze all but the merger


def check_freeze_vision(freeze_vision) -> None:
  if not any(freeze_vision is v or freeze_vision == v and isinstance(v, str) for v in FREEZE_VISION):
    raise ValueError(f"freeze_vision_tower must be one of {FREEZE_VISION}, got {freeze_vision!r}")


def trainable_mask(params, freeze_vision: bool | str):
  """A pytree of bools like `params`: False for the vision tower's frozen parameters (all of them with True;
  all but the patch merger's with "blocks")."""
  check_freeze_vision(freeze_vision)

  def one(path, _):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    if not (freeze_vision and names and names[0] == "visual"):
      return True
    return freeze_vision == "blocks" and len(names) > 1 and names[1] == "merger"
  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(optim: Mapping[str, Any], total_steps: int, params=None,
                   freeze_vision: bool = False) -> tuple[optax.GradientTransformation, optax.Schedule]:
  unknown = set(optim) - _KNOWN
  if unknown:
    raise KeyError(f"unknown optimizer fields {sorted(unknown)}; known: {sorted(_KNOWN)}")
  optim = {**DEFAULTS, **optim}
  schedule = make_schedule(optim, total_steps)
  b1, b2 = optim["betas"]
  parts = []
  if float(optim["grad_clip"]) > 0:
    parts.append(optax.clip_by_global_norm(float(optim["grad_clip"])))
  parts.append(optax.adamw(schedule, b1=float(b1), b2=float(b2), eps=1e-8,
                           weight_decay=float(optim["weight_decay"])))
  tx = optax.chain(*parts)
  if freeze_vision:
    if params is None:
      raise ValueError("freezing the vision tower needs the params to label")
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, freeze_vision))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
