"""AdamW with warmup + constant/cosine schedule, global-norm clipping, and an optionally frozen vision tower.

    tx, schedule = make_optimizer(cfg.optim, total_steps=1000, params=params, freeze_vision=True)

`optim` fields (verl / LLaMA-Factory names): lr, lr_scheduler ("constant" | "cosine"), warmup_ratio (or
warmup_steps), min_lr_ratio, betas, weight_decay, grad_clip (0 = off). Frozen parameters get no update and
no optimizer moments.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

_KNOWN = {"lr", "lr_scheduler", "warmup_ratio", "warmup_steps", "min_lr_ratio", "betas", "weight_decay",
          "grad_clip"}


def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  lr = float(optim["lr"])
  warmup = int(optim.get("warmup_steps", 0) or round(float(optim.get("warmup_ratio", 0.0)) * total_steps))
  kind = optim.get("lr_scheduler", "constant")
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=float(optim.get("min_lr_ratio", 0)))
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
  schedule = make_schedule(optim, total_steps)
  b1, b2 = optim.get("betas", (0.9, 0.999))
  parts = []
  if float(optim.get("grad_clip", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(optim["grad_clip"])))
  parts.append(optax.adamw(schedule, b1=float(b1), b2=float(b2), eps=1e-8,
                           weight_decay=float(optim.get("weight_decay", 0.0))))
  tx = optax.chain(*parts)
  if freeze_vision:
    if params is None:
      raise ValueError("freezing the vision tower needs the params to label")
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, freeze_vision))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
