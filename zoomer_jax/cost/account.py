"""The account of one training step: FLOPs by phase and tower, expected time, MFU, per-chip memory.

    acc = account(job_from_config(load("grpo_7b_v5p64")))
    acc.step_time, acc.mfu, acc.memory["update"].total

A GRPO step is: rollout (prefill of prompt + overview frames, extend with each zoom call's frames, decode
of the generated tokens), a sync of the new weights into the rollout layout, the old-policy and reference
forwards, then `ppo_epochs` passes of forward + backward over the trajectories in micro-batches with an
optimizer update per mini-batch. An SFT step is the last part only.

Model FLOPs are the useful work (causal attention pairs, real tokens, no recomputation); hardware FLOPs
are what the implementation executes (padded tokens, remat recompute, dense attention over whole score
matrices or cache buffers). MFU = model FLOPs / (step time x chips x peak bf16 FLOP/s).

Time model (assumptions in `Efficiency`, `Trainer`, `Rollout`):
  * matmul passes run at `Efficiency.matmul` of peak, on the chips that have rows to work on;
  * FSDP all-gathers / reduce-scatters and tensor-parallel all-reduces of a micro-batch move at
    `Efficiency.ici` of a chip's ICI receive bandwidth and overlap with its compute (time = max of both);
  * a decode step streams the chip's rollout weights and the KV cache it reads once from HBM at
    `Efficiency.hbm` (or is compute-bound if that is slower). Turns run in lock-step: every turn of a
    rollout batch lasts until its longest row stops, and the batch runs until its longest trajectory ends.
"""

from __future__ import annotations

import dataclasses
import math

from zoomer_jax.cost import flops as F
from zoomer_jax.cost import memory as M
from zoomer_jax.cost.params import ParamCounts, param_counts, params_per_chip, text_layer_params, vision_block_params
from zoomer_jax.cost.workload import Job, Trajectory, TrajectoryCounts


@dataclasses.dataclass(frozen=True)
class Efficiency:
  """Fractions of the chip's peaks reached (assumptions, not measurements)."""

  matmul: float = 0.6  # bf16 FLOP/s of large-matmul passes (prefill, training forward/backward)
  hbm: float = 0.7  # HBM bandwidth of a decode step
  ici: float = 0.6  # ICI receive bandwidth of collectives


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What the trainer does, where the config does not say.

  state: bf16 params (init.dtype), fp32 Adam moments and an fp32 gradient accumulator, no master copy.
    NOTE train/optim.py calls optax.adamw without mu_dtype, so today its moments take the params' dtype
    (bf16, 2 bytes): `TrainerState(moment_bytes=2)` reproduces that; fp32 is the safer assumption for fit.
  attention: "flash" assumes a blockwise kernel (splash attention on TPU) in training and sampling; "dense" is
    model/text.py's CPU path (full score matrices, over the whole KV buffer). The vision tower's attention is
    the splash kernel with "flash" on TPU, dense (packed windows and frames, model/vision.py) otherwise.
  remat_vision: apply `remat` to the vision blocks too (train/forward.py today rematerialises only the
    decoder layers; with ~100 images a trainable tower then keeps ~60-80 GB of activations per trajectory).
  padding: padded / real tokens of a training micro-batch (rows are padded to one bucketed length).
  gathered_layers: FSDP layers whose whole weights (and gradients) are live at once (current + prefetch).
  """

  state: M.TrainerState = M.TrainerState()
  act_bytes: int = 2
  attention: str = "flash"
  remat_vision: bool = True
  recompute_old_logprobs: bool = True
  padding: float = 1.2
  gathered_layers: int = 2


@dataclasses.dataclass(frozen=True)
class Rollout:
  """How the rollout runs.

  layout: "resharded" samples from a copy of the weights laid out for decoding (below); "training" samples
    with the training shards, as train/grpo.py does today, so every decode step all-gathers the weights.
  tensor_parallel: chips holding one bf16 copy of the weights for sampling (weights are resharded from the
    training layout once per step); None picks the smallest power of two that puts at most
    `weight_fraction` of a chip's HBM into weights.
  cache_slots: KV slots per trajectory; None uses agent/rollout.py's rule (the longest prompt plus every round
    at its limits).
  straggler: decode steps of a lock-step turn / mean generated tokens per turn (capped at response_length).
  oversample: trajectories generated / kept (dynamic sampling drops groups whose rewards are all equal).
  Every trajectory is prefilled on its own (the agent shares no prefix between the n rows of a group; sharing
  would cut the prompt's prefill ~n-fold). Not timed: the host work between decode chunks (stop checks,
  tool-call parsing, frame extraction and preprocessing), which overlaps poorly with the device today.
  """

  layout: str = "resharded"  # or "training": sample with the training mesh's FSDP shards (grpo.py today)
  tensor_parallel: int | None = None
  cache_slots: int | None = None
  straggler: float = 4.0
  oversample: float = 1.0
  weight_fraction: float = 0.25
  agent_token_bucket: int = 64  # AgentConfig.token_bucket


@dataclasses.dataclass
class Phase:
  name: str
  model: dict[str, float]  # FLOPs by tower: "vision", "text"
  hardware: dict[str, float]
  time_s: float
  bound: str  # "compute" | "hbm" | "ici"
  detail: str = ""


TEXT_PARTS = ("text_embed", "text_layers", "text_norm", "lm_head")


@dataclasses.dataclass(frozen=True)
class PerChip:
  """Parameters (elements) on one chip, sharded by the rules table (`params.params_per_chip`)."""

  all: float  # the training layout (fsdp x tensor)
  trainable: float
  gathered: float  # after the FSDP all-gather: sharded over tensor only
  gathered_trainable: float
  rollout: float  # the rollout layout (sharded over the rollout's tensor degree)

  @classmethod
  def of(cls, job: Job, rollout_tp: int) -> "PerChip":
    m, cfg = job.mesh, job.model
    train = TEXT_PARTS if job.freeze_vision else None
    return cls(all=params_per_chip(cfg, m.fsdp, m.tensor), trainable=params_per_chip(cfg, m.fsdp, m.tensor, train),
               gathered=params_per_chip(cfg, 1, m.tensor), gathered_trainable=params_per_chip(cfg, 1, m.tensor, train),
               rollout=params_per_chip(cfg, 1, rollout_tp) if rollout_tp else 0.0)


@dataclasses.dataclass
class Account:
  job: Job
  traj: TrajectoryCounts
  params: ParamCounts
  phases: list[Phase]
  memory: dict[str, M.MemoryTable]
  headroom: float
  rollout_tp: int = 0
  cache_slots: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def model_flops(self) -> float:
    return sum(sum(p.model.values()) for p in self.phases)

  @property
  def hardware_flops(self) -> float:
    return sum(sum(p.hardware.values()) for p in self.phases)

  @property
  def step_time(self) -> float:
    return sum(p.time_s for p in self.phases)

  def mfu_of(self, names: tuple[str, ...] | None = None) -> float:
    ps = [p for p in self.phases if names is None or p.name in names]
    t = sum(p.time_s for p in ps)
    f = sum(sum(p.model.values()) for p in ps)
    return f / (t * self.job.mesh.chips * self.job.chip.bf16_flops) if t > 0 else 0.0

  @property
  def mfu(self) -> float:
    return self.mfu_of()

  def fits(self) -> dict[str, bool]:
    return {k: m.fits(self.job.chip.hbm_bytes, self.headroom) for k, m in self.memory.items()}

  def to_dict(self) -> dict:
    return dict(
        accelerator=self.job.accelerator, chips=self.job.mesh.chips,
        mesh=dict(data=self.job.mesh.data, fsdp=self.job.mesh.fsdp, tensor=self.job.mesh.tensor),
        params=self.params.as_dict(),
        trajectory=dict(dataclasses.asdict(self.traj), images=self.traj.images, gen_tokens=self.traj.gen_tokens,
                        patches=self.traj.patches),
        phases=[dataclasses.asdict(p) for p in self.phases],
        model_flops=self.model_flops, hardware_flops=self.hardware_flops, step_time_s=self.step_time,
        mfu=self.mfu, memory={k: dict(m.items, total=m.total) for k, m in self.memory.items()},
        hbm_bytes=self.job.chip.hbm_bytes, headroom=self.headroom, fits=self.fits(),
        rollout_tp=self.rollout_tp, cache_slots=self.cache_slots, notes=self.notes)


# ------------------------------------------------------------------ helpers
def _sum(d: dict) -> float:
  return float(sum(d.values()))


def _vision(job: Job, grid, images: int, padded: bool) -> float:
  return float(F.vision_forward_flops(job.model.vision, [grid] * images, padded=padded).total) if images else 0.0


def _vision_blocks(job: Job, grid, images: int, padded: bool) -> float:
  """The blocks only (what a remat of the blocks recomputes)."""
  f = F.vision_forward_flops(job.model.vision, [grid] * images, padded=padded)
  return float(f.dense + f.window_attention + f.full_attention)


def choose_rollout_tp(job: Job, ro: Rollout) -> int:
  """Chips per rollout weight copy (see `Rollout.tensor_parallel`)."""
  if ro.layout == "training":
    return job.mesh.tensor
  if ro.layout != "resharded":
    raise ValueError(f"rollout layout {ro.layout!r} is not 'resharded' or 'training'")
  if ro.tensor_parallel:
    if job.mesh.chips % ro.tensor_parallel:
      raise ValueError(f"rollout tensor_parallel {ro.tensor_parallel} does not divide {job.mesh.chips} chips")
    return ro.tensor_parallel
  tp = 1
  while params_per_chip(job.model, 1, tp) * 2 > ro.weight_fraction * job.chip.hbm_bytes and tp < job.mesh.chips:
    tp *= 2
  return tp


def agent_cache_slots(job: Job, prompt_tokens: int, tokens_per_image: int, ro: Rollout) -> int:
  """agent/rollout.py::_cache_size: longest prompt + bucket + rounds x (turn + decode chunk + observation +
  bucket), rounded up to 256 slots."""
  if ro.cache_slots:
    return ro.cache_slots
  b = ro.agent_token_bucket
  observation = job.frames_per_call_max * (tokens_per_image + 12) + 160
  need = prompt_tokens + b + job.max_rounds * (job.response_length + job.decode_chunk + observation + b)
  return -(-need // 256) * 256


# ------------------------------------------------------------------ the training passes
def _train_forward(job: Job, tr: Trainer, tc: TrajectoryCounts) -> tuple[dict, dict, dict]:
  """One trajectory's training forward: (model FLOPs, hardware FLOPs, pieces for the backward/remat)."""
  t = job.model.text
  tokens = tc.total_tokens
  padded = max(tokens, int(round(tokens * tr.padding)))
  model = dict(vision=_vision(job, tc.grid, tc.images, False),
               text=_sum(F.text_forward_flops(t, tokens, causal=True)))
  hw_text = F.text_forward_flops(t, padded, causal=tr.attention == "flash")
  hw = dict(vision=_vision(job, tc.grid, tc.images, True), text=_sum(hw_text))
  mm = F.text_matmul_flops_per_token(t)
  pieces = dict(text_layers=hw_text["dense"] + hw_text["attention"], text_attention=hw_text["attention"],
                text_down_proj=padded * F.text_down_proj_flops_per_token(t),
                text_qkv=padded * (mm["q_proj"] + mm["kv_proj"]),
                lm_head=hw_text["lm_head"], vision_blocks=_vision_blocks(job, tc.grid, tc.images, True),
                padded_tokens=padded)
  return model, hw, pieces


def _update_flops(job: Job, tr: Trainer, tc: TrajectoryCounts) -> tuple[dict, dict]:
  """Forward + backward of one trajectory. The backward costs 2x the forward for every part gradients flow
  through (a blockwise attention kernel's backward more: `flops.FLASH_BACKWARD_OVER_FORWARD`); a frozen vision
  tower only runs forward. Remat adds a recompute (hardware FLOPs only) of what the backward reads: a full
  remat recomputes a layer but its down projection."""
  fm, fh, pieces = _train_forward(job, tr, tc)
  vmul = 1 if job.freeze_vision else 3
  model = dict(vision=vmul * fm["vision"], text=3 * fm["text"])
  hw = dict(vision=vmul * fh["vision"], text=3 * fh["text"])
  if tr.attention == "flash":
    hw["text"] += (F.FLASH_BACKWARD_OVER_FORWARD - 2) * pieces["text_attention"]
  if job.remat == "full":
    hw["text"] += pieces["text_layers"] - pieces["text_down_proj"]
  elif job.remat == "save_dots":
    hw["text"] += pieces["text_attention"]
  elif job.remat in ("save_attention", "save_attention_up", "save_attention_mlp_weights"):  # q, k, v, output kept
    hw["text"] += pieces["text_layers"] - pieces["text_down_proj"] - pieces["text_attention"] - pieces["text_qkv"]
    if job.remat == "save_attention_up":  # the up projection kept too (its FLOPs are the down projection's)
      hw["text"] -= pieces["text_down_proj"]
  if job.vocab_chunk:  # the chunked log-prob scan body is checkpointed: logits are recomputed
    hw["text"] += pieces["lm_head"]
  if not job.freeze_vision and tr.remat_vision and job.remat != "none":
    hw["vision"] += pieces["vision_blocks"]
  return model, hw


def _train_comm_bytes(job: Job, pc: PerChip, tr: Trainer, tc: TrajectoryCounts, passes: int,
                      with_grads: bool, tokens: int) -> float:
  """Bytes one chip receives per micro-batch: FSDP all-gathers of the weights (forward, and again for the
  backward) and the gradient reduce-scatter, plus tensor-parallel all-reduces of the residual stream (2 per
  layer per pass: forward, backward, and the remat recompute), or under context parallelism the gathers of
  each layer's keys and values. `passes` = 1 (forward only) or 2 (update)."""
  mesh, st = job.mesh, tr.state
  out = 0.0
  if mesh.fsdp > 1:
    out += passes * (pc.gathered - pc.all) * st.param_bytes
    if passes > 1 and job.remat == "save_attention_mlp_weights":  # the backward gathers no MLP weight again
      out -= M.decoder_mlp_weights(job.model.text, tp=mesh.tensor) * (mesh.fsdp - 1) / mesh.fsdp * st.param_bytes
    if with_grads:
      out += (pc.gathered_trainable - pc.trainable) * st.grad_bytes
  rows, t, v = job.micro_per_chip, job.model.text, job.model.vision
  tp_passes = passes + (1 if passes > 1 and job.remat != "none" else 0)
  if mesh.tensor > 1 and job.context > 1:  # keys and values gathered (and their gradients scattered back)
    kv_buf = rows * tokens * 2 * t.num_key_value_heads * t.head_dim * tr.act_bytes
    out += tp_passes * t.num_hidden_layers * kv_buf * (job.context - 1) / job.context
  elif mesh.tensor > 1:
    ar = 2 * (mesh.tensor - 1) / mesh.tensor  # a ring all-reduce moves 2 (n-1)/n of the buffer
    text_buf = rows * tokens * t.hidden_size * tr.act_bytes
    vis_buf = rows * tc.patches * v.hidden_size * tr.act_bytes
    out += tp_passes * 2 * ar * (t.num_hidden_layers * text_buf + v.depth * vis_buf)
  return out


def _train_phase(name: str, job: Job, pc: PerChip, tr: Trainer, eff: Efficiency, tc: TrajectoryCounts,
                 trajectories: int, model_1: dict, hw_1: dict, passes: int, with_grads: bool,
                 padded_tokens: int) -> Phase:
  chip, mesh = job.chip, job.mesh
  model = {k: v * trajectories for k, v in model_1.items()}
  hw = {k: v * trajectories for k, v in hw_1.items()}
  busy = min(job.micro_batch, mesh.batch_shards) * mesh.tensor  # chips with rows to work on
  compute = _sum(hw) / (busy * chip.bf16_flops * eff.matmul)
  n_micro = -(-trajectories // job.micro_batch)
  comm = n_micro * _train_comm_bytes(job, pc, tr, tc, passes, with_grads, padded_tokens) / (
      chip.ici_in_bw * eff.ici)
  bound = "compute" if compute >= comm else "ici"
  return Phase(name, model, hw, max(compute, comm), bound,
               f"{n_micro} micro-batches of {job.micro_batch}; compute {compute:.1f} s, ICI {comm:.1f} s")


# ------------------------------------------------------------------ the rollout
def _rollout_phases(job: Job, pc: PerChip, ro: Rollout, tr: Trainer, eff: Efficiency,
                    tc: TrajectoryCounts, tp: int, slots: int) -> list[Phase]:
  t, chip, chips = job.model.text, job.chip, job.mesh.chips
  n_gen = math.ceil(job.trajectories * ro.oversample)
  dense = tr.attention == "dense"
  # Model FLOPs of one trajectory, walking its segments: each new chunk attends causally to all before it.
  pre_m = dict(vision=0.0, text=0.0)
  pre_h = dict(vision=0.0, text=0.0)
  dec_m = dict(vision=0.0, text=0.0)
  ctx, per_tok_dense = 0, sum(F.text_matmul_flops_per_token(t).values())
  for kind, n in tc.segments():
    k = ctx + n
    if kind == "gen":
      dec_m["text"] += n * (per_tok_dense + F.lm_head_flops_per_token(t)) + F.text_attention_flops(
          t, F.attention_pairs(n, k, True))
    else:
      images = tc.overview_frames if kind == "prompt" else tc.frames_per_call
      pre_m["vision"] += _vision(job, tc.grid, images, False)
      pre_h["vision"] += _vision(job, tc.grid, images, True)
      fm = F.text_forward_flops(t, n, k, causal=True, logit_tokens=1)
      pre_m["text"] += _sum(fm)
      fh = dict(fm)
      if dense:  # the chunk's queries against every slot of the cache buffer
        fh["attention"] = F.text_attention_flops(t, n * slots)
      pre_h["text"] += _sum(fh)
    ctx = k
  phases = []
  model = {k: v * n_gen for k, v in pre_m.items()}
  hw = {k: v * n_gen for k, v in pre_h.items()}
  phases.append(Phase("rollout prefill+extend", model, hw, _sum(hw) / (chips * chip.bf16_flops * eff.matmul),
                      "compute", f"{n_gen} trajectories: prompt + {tc.zoom_calls} zoom observations each"))

  # Decode: lock-step batches of `rollout_batch` rows. Resharded layout: groups of tp chips each hold one
  # copy of the weights. Training layout: the FSDP shards are all-gathered in every decode step.
  mesh = job.mesh
  training = ro.layout == "training"
  groups = mesh.batch_shards if training else chips // tp
  rows = -(-job.rollout_batch // groups)
  rounds = math.ceil(n_gen / job.rollout_batch)
  steps_turn = min(job.response_length, math.ceil(ro.straggler * tc.gen_tokens_per_turn))
  steps = rounds * job.max_rounds * steps_turn
  read_slots = slots if dense else _mean_decode_context(tc)
  kv_shard = tp if t.num_key_value_heads % tp == 0 else 1
  weights = (pc.gathered if training else pc.rollout) * 2
  step_bytes = weights + rows * read_slots * M.kv_bytes_per_token(t) / kv_shard
  per_token = per_tok_dense + F.lm_head_flops_per_token(t) + F.text_attention_flops(t, read_slots)
  t_mem = step_bytes / (chip.hbm_bw * eff.hbm)
  t_cmp = rows * per_token / tp / (chip.bf16_flops * eff.matmul)
  t_ici = weights * (mesh.fsdp - 1) / mesh.fsdp / (chip.ici_in_bw * eff.ici) if training else 0.0
  t_step = max(t_mem, t_cmp, t_ici)
  bound = "hbm" if t_step == t_mem else ("ici" if t_step == t_ici else "compute")
  hw = dict(vision=0.0, text=float(steps * rows * groups * per_token))
  where = "training layout, weights all-gathered every step" if training else f"{tp}-chip groups"
  phases.append(Phase("rollout decode", {k: v * n_gen for k, v in dec_m.items()}, hw, steps * t_step, bound,
                      f"{rounds} rounds x {job.max_rounds} turns x {steps_turn} steps; {rows} rows per group "
                      f"({where}); {step_bytes / 1e9:.1f} GB HBM per step, {t_step * 1e3:.1f} ms"))
  if not training:
    sync = weights / (chip.ici_in_bw * eff.ici)
    phases.append(Phase("weight sync", dict(vision=0.0, text=0.0), dict(vision=0.0, text=0.0), sync, "ici",
                        f"all-gather the bf16 weights into {tp}-chip rollout shards"))
  return phases


def _mean_decode_context(tc: TrajectoryCounts) -> int:
  """Mean number of valid cache slots a generated token attends to."""
  ctx, total, n_gen = 0, 0, 0
  for kind, n in tc.segments():
    if kind == "gen":
      total += n * ctx + n * (n + 1) // 2
      n_gen += n
    ctx += n
  return total // max(n_gen, 1)


# ------------------------------------------------------------------ memory
def vision_scores_dense(job: Job, tr: Trainer) -> bool:
  """Whether the vision tower materialises its attention scores: yes unless it runs the splash kernel ("flash"
  on TPU, model/vision.py)."""
  return not (tr.attention == "flash" and job.chip.platform == "tpu")


def _memory(job: Job, pc: PerChip, tr: Trainer, ro: Rollout, traj: Trajectory, tc: TrajectoryCounts,
            tp_roll: int, slots: int) -> dict[str, M.MemoryTable]:
  t, v, mesh, st = job.model.text, job.model.vision, job.mesh, tr.state
  tp = mesh.tensor
  resident = M.MemoryTable("resident")
  resident.add("policy params", pc.all * st.param_bytes)
  resident.add("Adam moments (m, v)", pc.trainable * 2 * st.moment_bytes)
  if st.master_bytes:
    resident.add("fp32 master weights", pc.trainable * st.master_bytes)
  if job.use_kl:
    resident.add("reference params (bf16)", pc.all * 2)

  upd = M.MemoryTable("update", dict(resident.items))
  if job.mini_batch > job.micro_batch:
    upd.add("gradient accumulator", pc.trainable * st.grad_accum_bytes)
  upd.add("micro-batch gradient", pc.trainable * st.grad_bytes)
  # Context parallelism (job.context > 1) spends the tensor axis on the decoder's tokens: each chip keeps its
  # share of a row's tokens with whole heads, MLP width and vocabulary, and gathers whole layers and head; the
  # vision tower encodes its share of the row's frames (`vision_pieces`), with whole heads too.
  cp = job.context
  ttp = max(1, tp // cp)
  if mesh.fsdp > 1:
    layer = max(text_layer_params(job.model), vision_block_params(job.model))
    per = st.param_bytes + st.grad_bytes
    upd.add("FSDP-gathered layers + head", (tr.gathered_layers * layer + t.vocab_size * t.hidden_size) * per / ttp)
  tokens_max, images_max, grid = traj.worst_case(job)
  rows = job.micro_per_chip
  tokens = rows * tokens_max // cp
  patches = rows * images_max * math.prod(grid)
  act = M.text_activation_bytes(t, tokens, job.remat, tp=ttp, act_bytes=tr.act_bytes)
  upd.add(f"text activations kept (remat={job.remat})", act["saved"])
  if job.remat == "save_attention_mlp_weights":
    upd.add("decoder MLP weights kept gathered", M.decoder_mlp_weights(t, tp=ttp) * tr.act_bytes)
  upd.add("text layer working set (backward)", act["working"])
  heads = t.num_attention_heads // ttp if t.num_attention_heads % ttp == 0 else t.num_attention_heads
  kept = t.num_hidden_layers if job.remat == "none" else 0
  sc = M.attention_score_bytes(heads, rows, tokens_max, tokens_max, saved_layers=kept, attention=tr.attention)
  if tr.attention == "dense":
    upd.add("text attention scores (dense)", sc["saved"] + sc["working"])
  vremat = job.remat if tr.remat_vision else "none"
  vtp = ttp if cp > 1 else tp
  va = M.vision_activation_bytes(v, patches // cp, vremat, tp=vtp, trainable=not job.freeze_vision,
                                 act_bytes=tr.act_bytes)
  upd.add(f"vision activations kept (remat={vremat if not job.freeze_vision else 'frozen'})", va["saved"])
  upd.add("vision block working set", va["working"])
  # Off TPU the tower's attention is dense whatever the decoder's (model/vision.py: a full-attention block's
  # scores span a frame's patches), so a trainable tower's score matrices count with a blockwise decoder kernel
  # too; on TPU with "flash" it runs the splash kernel (O(patches) statistics, none). A frozen tower's live only
  # in its forward, before the decoder's activations build up.
  if not job.freeze_vision and vision_scores_dense(job, tr):
    vheads = v.num_heads // vtp if v.num_heads % vtp == 0 else v.num_heads
    fp = math.prod(grid)
    frames = rows * images_max // cp
    vsaved = v.depth if vremat == "none" else 0
    upd.add("vision attention scores (dense)", frames * vheads * fp * fp * (2 * vsaved + 10))
  # The head walks each chip's rows in blocks of token_chunk tokens (train/logprobs.py): one block's logits live.
  block = rows * min(job.token_chunk, tokens_max // cp) if job.token_chunk else tokens
  upd.add(f"logits ({'chunk ' + str(job.vocab_chunk) if job.vocab_chunk else 'full vocab'}"
          f"{', ' + str(block) + ' tokens' if block < tokens else ''})",
          M.logits_bytes(block, t.vocab_size, job.vocab_chunk, ttp))
  upd.add("inputs, embeddings, final hidden", patches * v.patch_dim * 4 + 2 * tokens * t.hidden_size * tr.act_bytes)
  tables = {"update": upd}
  if job.kind != "grpo":
    return tables

  roll = M.MemoryTable("rollout", dict(resident.items))
  if ro.layout == "training":
    groups = mesh.batch_shards
    if mesh.fsdp > 1:
      roll.add("FSDP-gathered layers + head", (tr.gathered_layers * text_layer_params(job.model)
                                               + t.vocab_size * t.hidden_size) * st.param_bytes / tp)
  else:
    groups = mesh.chips // tp_roll
    roll.add(f"rollout weights (bf16, tp={tp_roll})", pc.rollout * 2)
  r_rows = -(-job.rollout_batch // groups)
  kv_shard = tp_roll if t.num_key_value_heads % tp_roll == 0 else 1
  roll.add(f"KV cache ({r_rows} rows x {slots} slots)", r_rows * slots * M.kv_bytes_per_token(t) / kv_shard)
  per_image = math.prod(grid) // v.spatial_merge_size**2
  prompt = traj.prompt_text_tokens + traj.overview_frames * (per_image + traj.text_tokens_per_frame)
  roll.add("prefill activations (one layer)", r_rows * prompt * M.text_saved_per_token_layer(t, tp_roll) * tr.act_bytes)
  ov_patches = r_rows * traj.overview_frames * math.prod(grid)
  roll.add("prefill vision activations (one block)",
           ov_patches * (M.vision_saved_per_patch_block(v, tp_roll) * tr.act_bytes + v.patch_dim * 4))
  if tr.attention == "dense":
    h_roll = t.num_attention_heads // tp_roll if t.num_attention_heads % tp_roll == 0 else t.num_attention_heads
    roll.add("prefill attention scores (dense, vs cache)", r_rows * h_roll * prompt * slots * 6)
    vh = v.num_heads // tp_roll if v.num_heads % tp_roll == 0 else v.num_heads
    roll.add("prefill vision scores (dense)", r_rows * traj.overview_frames * vh * math.prod(grid)**2 * 6)
  roll.add("sampler logits", r_rows * t.vocab_size * 4 * 3)
  tables["rollout"] = roll
  return tables


# ------------------------------------------------------------------ the account
def account(job: Job, traj: Trajectory = Trajectory(), trainer: Trainer = Trainer(), rollout: Rollout = Rollout(),
            eff: Efficiency = Efficiency(), headroom: float = 0.1) -> Account:
  """FLOPs, time, MFU and per-chip memory of one step of `job` (see the module docstring)."""
  params = param_counts(job.model)
  tc = traj.counts(job)
  notes = []
  phases: list[Phase] = []
  tp_roll, slots = 0, 0
  if job.kind == "grpo":
    tp_roll = choose_rollout_tp(job, rollout)
  pc = PerChip.of(job, tp_roll)
  fm, fh, pieces = _train_forward(job, trainer, tc)
  padded = pieces["padded_tokens"]
  if job.kind == "grpo":
    _, _, grid = traj.worst_case(job)
    per_image = math.prod(grid) // job.model.vision.spatial_merge_size**2
    prompt = traj.prompt_text_tokens + traj.overview_frames * (per_image + traj.text_tokens_per_frame)
    slots = agent_cache_slots(job, prompt, per_image, rollout)
    phases += _rollout_phases(job, pc, rollout, trainer, eff, tc, tp_roll, slots)
    n = job.trajectories
    if trainer.recompute_old_logprobs:
      phases.append(_train_phase("old log-probs", job, pc, trainer, eff, tc, n, fm, fh, 1, False, padded))
    if job.use_kl:
      phases.append(_train_phase("reference log-probs", job, pc, trainer, eff, tc, n, fm, fh, 1, False, padded))
  um, uh = _update_flops(job, trainer, tc)
  phases.append(_train_phase("policy update (fwd+bwd)", job, pc, trainer, eff, tc, job.trajectories * job.epochs,
                             um, uh, 2, True, padded))
  # Optimizer: element-wise over the local shard, HBM-bound.
  st = trainer.state
  per_param = 2 * st.param_bytes + st.grad_accum_bytes + 4 * st.moment_bytes + 2 * st.master_bytes
  t_opt = job.optimizer_steps * pc.trainable * per_param / (job.chip.hbm_bw * eff.hbm)
  if job.mesh.dcn_data > 1:
    if job.chip.dcn_bw is None:
      notes.append("DCN bandwidth of this chip is not published here; the cross-slice all-reduce is not timed")
    else:
      d = job.mesh.dcn_data
      t_opt += job.optimizer_steps * 2 * (d - 1) / d * pc.trainable * st.grad_accum_bytes / job.chip.dcn_bw
  phases.append(Phase("optimizer", dict(vision=0.0, text=0.0), dict(vision=0.0, text=0.0), t_opt, "hbm",
                      f"{job.optimizer_steps} AdamW updates"))
  if job.micro_batch < job.mesh.batch_shards:
    notes.append(f"micro-batch {job.micro_batch} < {job.mesh.batch_shards} batch shards: chips idle")
  ideal = params.total / job.mesh.param_shards
  if pc.all > 1.01 * ideal:
    notes.append(f"the mesh leaves {pc.all / ideal - 1:.0%} more parameters per chip than total / (fsdp x tensor): "
                 "some sharded widths are not divisible by their mesh axis and stay replicated")
  memory = _memory(job, pc, trainer, rollout, traj, tc, tp_roll, slots)
  return Account(job=job, traj=tc, params=params, phases=phases, memory=memory, headroom=headroom,
                 rollout_tp=tp_roll, cache_slots=slots, notes=notes)


def as_implemented() -> tuple[Trainer, Rollout]:
  """(Trainer, Rollout) of the naive baseline the TPU work started from, kept as the account's point of
  comparison: dense attention, no remat of the vision blocks, bf16 Adam moments and gradient accumulator, and
  sampling with the training shards. The code now runs flash/splash attention (`impl.attention`), remats every
  layer and block, and samples from resharded weights (`rollout.mesh`); `python -m zoomer_jax compile` checks
  the account's default assumptions against the compiled programs."""
  return (Trainer(state=M.TrainerState(grad_accum_bytes=2, moment_bytes=2), attention="dense", remat_vision=False),
          Rollout(layout="training"))
