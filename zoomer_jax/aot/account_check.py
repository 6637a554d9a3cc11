"""The analytic account (`zoomer_jax.cost`) beside XLA's numbers for the compiled programs.

For each program the account's hardware FLOPs per chip at the program's own shapes (the account's formulas:
matmuls, flash attention over the causal pairs, remat recompute, padded vision segments) against XLA's (the cost
probes' FLOPs plus the Pallas kernels' own), and the account's per-chip memory of the update and rollout phases
(`account.memory`, sized for the same worst-case row) against the largest compiled program of that phase.
"""

from __future__ import annotations

import math

from zoomer_jax.aot import programs as P
from zoomer_jax.aot.target import TOPOLOGIES
from zoomer_jax.cost import flops as F
from zoomer_jax.cost.account import Trainer, _train_forward, _update_flops, account
from zoomer_jax.cost.workload import TrajectoryCounts, frame_grid, job_from_config
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.train.grpo import logprob_micro_batch

TRAIN = {"sft/grad", "grpo/update"}
FORWARD = {"grpo/old_logp", "grpo/ref_logp"}


def accelerator_of(topology: str) -> str:
  for acc, topo in TOPOLOGIES.items():
    if topo == topology:
      return acc
  chip, shape = topology.split(":")
  chips = math.prod(int(x) for x in shape.split("x"))
  return f"{chip}-{chips * (2 if chip in ('v4', 'v5p') else 1)}"


def _counts(tokens: int, images: int, grid, per_image: int) -> TrajectoryCounts:
  return TrajectoryCounts(grid=tuple(grid), tokens_per_image=per_image, prompt_tokens=tokens, observation_tokens=0,
                          zoom_calls=0, gen_tokens_per_turn=0, overview_frames=images, frames_per_call=0,
                          total_tokens=tokens)


def account_flops(cfg, mesh_shape: dict, rollout_shape: dict | None, name: str) -> float | None:
  """The account's hardware FLOPs per chip of one call of program `name` (None: not a matmul program)."""
  mc = ModelConfig.from_config_dict(cfg.model.to_dict())
  merge = mc.vision.spatial_merge_size
  job = job_from_config(cfg, cfg.accelerator_type or "v5p-8")
  trainer = Trainer(padding=1.0)  # a compiled row is as long as the program's shape
  tensor = mesh_shape.get("tensor", 1)
  shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  if name in TRAIN or name in FORWARD:
    d = cfg.data if cfg.job == "sft" else cfg.rollout
    if cfg.job == "sft":
      rows = cfg.data.micro_batch_size
    else:
      rows = cfg.actor.ppo_micro_batch_size if name in TRAIN else logprob_micro_batch(cfg.actor)
    length = cfg.data.cutoff_len if cfg.job == "sft" else cfg.actor.max_token_len
    images = P.SFT_IMAGES if cfg.job == "sft" else cfg.rollout.max_total_frames
    grid = frame_grid(*P.WORST_FRAME, d.max_pixels, d.min_pixels)
    tc = _counts(length, images, grid, math.prod(grid) // merge**2)
    hw = _update_flops(job, trainer, tc)[1] if name in TRAIN else _train_forward(job, trainer, tc)[1]
    per_chip_rows = rows / shards if rows % shards == 0 else rows  # rows that do not split are replicated
    return per_chip_rows * sum(hw.values()) / tensor
  if name.startswith("rollout/") and name != "rollout/reshard":
    r = cfg.rollout
    shapes = P.rollout_shapes(cfg, mc)
    rshape = rollout_shape or mesh_shape
    rshards = rshape.get("data", 1) * rshape.get("fsdp", 1)
    rtensor = rshape.get("tensor", 1)
    t = mc.text
    vision = lambda n: float(F.vision_forward_flops(mc.vision, [shapes["grid"]] * n, padded=True).total)
    if name == "rollout/prefill":  # an extend into the empty cache: blockwise attention visits every slot too
      f = F.text_forward_flops(t, shapes["prompt"], shapes["cache"], causal=False, logit_tokens=1)
      row = sum(f.values()) + vision(shapes["overview"])
    elif name == "rollout/extend":  # blockwise attention visits every slot of the cache
      f = F.text_forward_flops(t, shapes["clip"], shapes["cache"], causal=False, logit_tokens=1)
      row = sum(f.values()) + vision(shapes["clip_frames"])
    else:  # a decode step reads every slot of the cache
      per_token = (sum(F.text_matmul_flops_per_token(t).values()) + F.lm_head_flops_per_token(t)
                   + F.text_attention_flops(t, shapes["cache"]))
      row = per_token * r.decode_chunk
    per_chip_rows = r.batch_size / rshards if r.batch_size % rshards == 0 else r.batch_size
    return per_chip_rows * row / rtensor
  return None


def check(cfg, rep: dict) -> dict:
  """{"flops": [(program, account, xla, xla / account)], "memory": [(phase, account, xla, xla / account)]}."""
  results = {r.name: r for r in rep["results"]}
  out = {"flops": [], "memory": []}
  for r in rep["results"]:
    if r.cost is None:
      continue
    acc = account_flops(cfg, rep["mesh"], rep["rollout_mesh"], r.name)
    if acc:
      xla = r.cost.flops + r.cost.kernel_flops
      out["flops"].append((r.name, acc, xla, xla / acc))
  job = job_from_config(cfg, accelerator_of(rep["target"].name))
  acc_all = account(job)
  memory = acc_all.memory
  out["estimate"] = dict(step_s=acc_all.step_time, mfu=acc_all.mfu)
  phases = {"update": [n for n in ("sft/grad", "grpo/update") if n in results],
            "rollout": [n for n in results if n.startswith("rollout/")]}
  for phase, names in phases.items():
    if phase in memory and names:
      xla = max(results[n].required for n in names)
      out["memory"].append((phase, memory[phase].total, xla, xla / memory[phase].total))
  return out
