"""Training curves of the demo from the jobs' `metrics.jsonl`: SFT loss (and SFT+R's); GRPO reward, accuracy,
frames shown, KL.

    plot_training("out/demo/sft", "out/demo/grpo", "out/demo/training_curves.png")
"""

from __future__ import annotations

import os

import numpy as np

from zoomer_jax.train.metrics import read_metrics

# (metrics.jsonl key, panel title) for each panel; a job without the key leaves its panel empty
SFT_PANELS = (("loss", "SFT loss (assistant tokens)"),)
GRPO_PANELS = (("reward/mean", "GRPO reward (mean of rollouts)"), ("acc/mean", "GRPO rollout accuracy"),
               ("frames/mean", "GRPO frames shown / trajectory"), ("actor/kl_loss", "GRPO KL to the SFT model"))


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
  """Trailing mean over k steps (the first steps average what there is)."""
  c = np.cumsum(np.r_[0.0, y])
  idx = np.arange(1, len(y) + 1)
  lo = np.maximum(0, idx - k)
  return (c[idx] - c[lo]) / (idx - lo)


def _curve(ax, steps, vals, color: str, label: str | None) -> None:
  ax.plot(steps, vals, color=color, alpha=0.35, lw=1, marker="." if len(steps) < 30 else None)
  if len(steps) >= 8:
    ax.plot(steps, _smooth(vals, max(2, len(steps) // 10)), color=color, lw=2, label=label)
  elif label:
    ax.plot([], [], color=color, lw=2, label=label)


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` over the rows that have it."""
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s, float), np.asarray(v, float)


def plot_training(sft_workdir: str, grpo_workdir: str, out_png: str, sft_direct_workdir: str | None = None,
                  sft_r_workdir: str | None = None) -> str:
  """Writes a 1x5 grid of curves (raw and smoothed) to out_png; returns its path.

  With `sft_direct_workdir` (the demo's `sft_direct_steps`), the SFT panels show that job's steps first and
  `sft_workdir`'s after them, a dashed line between. With `sft_r_workdir` (the reflect stage's SFT+R job, which
  starts from the SFT model), its steps follow the SFT steps in the SFT panels, in another colour."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  panels = [(sft_workdir, k, t) for k, t in SFT_PANELS] + [(grpo_workdir, k, t) for k, t in GRPO_PANELS]
  cache = {}
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  for ax, (workdir, key, title) in zip(axes, panels):
    rows = cache.setdefault(workdir, read_metrics(workdir))
    steps, vals = series(rows, key)
    if workdir == sft_workdir and sft_direct_workdir:
      first_steps, first_vals = series(cache.setdefault(sft_direct_workdir, read_metrics(sft_direct_workdir)), key)
      if len(first_steps):
        offset = first_steps.max()
        steps, vals = np.r_[first_steps, steps + offset], np.r_[first_vals, vals]
        ax.axvline(offset, color="gray", ls="--", lw=1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("SFT step" if workdir == sft_workdir else "RL step")
    ax.grid(alpha=0.3)
    if not len(steps):
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
      continue
    if key == "loss" and (vals > 0).all():
      ax.set_yscale("log")  # the cold start's templated text is learned in tens of steps; the rest is below
    _curve(ax, steps, vals, "tab:blue", "SFT" if workdir == sft_workdir and sft_r_workdir else None)
    if workdir == sft_workdir and sft_r_workdir:
      r_steps, r_vals = series(read_metrics(sft_r_workdir), key)
      if len(r_steps):
        _curve(ax, r_steps + steps.max(), r_vals, "tab:orange", "SFT+R (from the SFT model)")
      ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png
