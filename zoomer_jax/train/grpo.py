"""GRPO over multi-turn zoom-tool rollouts (docs/training.md; verl's recipe and names).

One RL step:
  1. take `data.train_batch_size` prompts; run `rollout.n` trajectories of each with the agent (the sampler
     pauses on a tool's closing tag such as `</video_zoom>`, the host runs the call, the cache is extended,
     decoding resumes);
  2. score them (0.9 accuracy + 0.1 format, optional tool bonus) and turn rewards into advantages within each
     prompt's group (`algorithm.adv_estimator`: GRPO's normalisation, or RLOO's leave-one-out baseline); with
     `algorithm.rejection_sample`, drop groups whose rewards are all equal and generate more batches until
     `train_batch_size` groups are kept (at most `max_num_gen_batches` generations);
  3. compute old (current-policy) and reference log-probs with teacher-forced forwards at the rollout's 3-D
     positions (they equal the sampler's: tests/test_agent.py);
  4. `ppo_epochs` passes over mini-batches of `ppo_mini_batch_size` prompts (x n trajectories), each one
     optimizer step accumulated over micro-batches of `ppo_micro_batch_size` trajectories; the loss is the
     clipped surrogate (clip_ratio_low / high) + kl_loss_coef * KL(ref) - entropy_coeff * entropy, over model
     tokens only (prompt and tool-observation tokens are masked), aggregated by `loss_agg_mode`. With one rollout
     engine per data-parallel replica, each trajectory takes a training row on the chips of the replica that
     was given it (`train/placement.py`): its images stay on the host that decoded them unless another replica's
     engine, idle early, took it from the waiting tasks.
Checkpoints count RL steps (`extra["job_step"]`), so a resumed run continues with the next RL step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
from functools import partial

import jax
import numpy as np

from zoomer_jax.agent import rewards
from zoomer_jax.agent.engine import ENGINES, EngineConfig, EngineStats, add_stats
from zoomer_jax.agent.replicas import replica_engines, replicated_rollout
from zoomer_jax.agent.protocol import ToolConfig
from zoomer_jax.agent.rewards import RewardConfig, score_batch
from zoomer_jax.agent.rollout import AgentConfig, Task, Trajectory, rollout, sized_for_joining
from zoomer_jax.parallel.rules import vision_pieces
from zoomer_jax.sampling.sampler import SamplingParams
from zoomer_jax.train.batch import Example, TrainBatch, batch_length, local_rows, make_global_batch
from zoomer_jax.train.forward import sequence_logprobs
from zoomer_jax.train.grpo_loss import GRPOLossConfig, check_adv_estimator, grpo_loss, keep_groups, outcome_advantages
from zoomer_jax.train.placement import home_replicas, place, share_pixels

LOSS_KEYS = ("clip_ratio_low", "clip_ratio_high", "loss_agg_mode", "use_kl_loss", "kl_loss_coef", "kl_loss_type",
             "entropy_coeff", "tis_cap")


def agent_config(rollout_cfg, *, greedy: bool = False) -> AgentConfig:
  r = rollout_cfg
  tool = ToolConfig(max_generation_round=r.max_generation_round, tool_call_max_frames=r.tool_call_max_frames,
                    max_total_frames=r.max_total_frames, video_fps=r.video_fps,
                    frames_upbound=r.frames_upbound, system_prompt=r.system_prompt,
                    system_prompt_verbatim=r.system_prompt_verbatim, last_round_hint=r.last_round_hint,
                    hint_separator=r.hint_separator, tools=r.tools)
  sampling = SamplingParams(temperature=0.0 if greedy else r.temperature, top_p=r.top_p, top_k=max(0, r.top_k),
                            max_new_tokens=r.response_length)
  return AgentConfig(tool=tool, sampling=sampling, decode_chunk=r.decode_chunk, max_pixels=r.max_pixels,
                     min_pixels=r.min_pixels, workers=r.workers)


def task_of(record) -> Task:
  """An RL record (zoomer_jax.data.records.RLRecord) as an agent task."""
  return Task(video=record.video, problem=record.problem, answer=record.solution, id=str(record.doc_id),
              data_source=record.data_source)


def generate(model, tok, tasks: list[Task], agent_cfg: AgentConfig, key, batch_size: int, engine: str = "continuous",
             engine_cfg: EngineConfig = EngineConfig(), stats: EngineStats | None = None) -> list[Trajectory]:
  """Trajectories of `tasks`. The lockstep engine runs device batches of exactly `batch_size` rows (the last one
  padded with repeats, whose results are dropped), so every call reuses the same compiled programs; the
  continuous one (`agent/engine.py`) runs every task in one call with `engine_cfg.max_running` (0: `batch_size`)
  trajectories in flight, one engine per data-parallel replica of the model's mesh (`agent/replicas.py`), and
  adds what this process's engines did to `stats`. With several engines tasks join as places free, and an engine
  whose block ends early takes groups still waiting in another's (so none idles while another works through its
  block); a trajectory another process's engine made comes without its pixels (`train/placement.py` moves those
  its rows need)."""
  if engine == "continuous":
    joining = replica_engines(model) > 1
    return replicated_rollout(model, tok, tasks, sized_for_joining(agent_cfg, tok, tasks) if joining else agent_cfg,
                              key, engine=dataclasses.replace(engine_cfg, max_running=engine_cfg.max_running or
                                                              batch_size), stats=stats, pixels="own", join=joining)
  if engine != "lockstep":
    raise ValueError(f"rollout.engine {engine!r} is not one of {list(ENGINES)}")
  out = []
  for c, i in enumerate(range(0, len(tasks), batch_size)):
    chunk = tasks[i:i + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    out += rollout(model, tok, padded, agent_cfg, jax.random.fold_in(key, c))[:len(chunk)]
  return out


def used_tool(t: Trajectory) -> bool:
  """Whether the trajectory received a tool's frames (the original's 'successful tool call')."""
  return rewards.used_tool(t.calls)


def score(trajs: list[Trajectory], reward_cfg: RewardConfig, step: int, answer_types: list[str]) -> list[dict]:
  return score_batch([t.turns for t in trajs], [t.task.answer for t in trajs], answer_types,
                     [used_tool(t) for t in trajs], reward_cfg, step=step)


def grpo_micro_loss(model, batch, *, loss_cfg: GRPOLossConfig, remat: str, vocab_chunk, token_chunk,
                    freeze_vision: bool, temperature: float, vocab_limit: int | None = None):
  logp, entropy = sequence_logprobs(model, batch, remat=remat, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                                    freeze_vision=freeze_vision, temperature=temperature, with_entropy=True,
                                    vocab_limit=vocab_limit)
  tv = batch.token_values
  return grpo_loss(logp, entropy, tv["old_logp"], tv.get("ref_logp"), batch.seq_values["advantage"],
                   batch.loss_mask, loss_cfg, sampler_logp=tv.get("sampler_logp"))


def grpo_loss_fns(cfg, *, token_chunk: int | None | str = "config", vocab_limit: int | None = None):
  """(the update's loss `loss(model, batch) -> (sum, denominator, metrics)`, the old/reference log-prob function
  `logp(model, batch) -> [B, L]`) of the GRPO job of `cfg`. `token_chunk` overrides `actor.logprob_token_chunk`
  (`zoomer_jax.aot`'s cost probes walk tokens in one block); `vocab_limit`, the tokenizer's size, restricts the
  log-probs' support to the ids the sampler may draw."""
  actor, r = cfg.actor, cfg.rollout
  loss_cfg = GRPOLossConfig(**{k: actor[k] for k in LOSS_KEYS})
  vocab_chunk = actor.logprob_vocab_chunk or None
  chunk = (actor.logprob_token_chunk or None) if token_chunk == "config" else token_chunk
  temperature = r.temperature or 1.0
  loss = partial(grpo_micro_loss, loss_cfg=loss_cfg, remat=actor.remat, vocab_chunk=vocab_chunk, token_chunk=chunk,
                 freeze_vision=actor.freeze_vision_tower, temperature=temperature, vocab_limit=vocab_limit)
  return loss, partial(_logp_only, vocab_chunk=vocab_chunk, token_chunk=chunk, temperature=temperature,
                       vocab_limit=vocab_limit)


def _logp_only(model, batch, *, vocab_chunk, token_chunk, temperature, vocab_limit=None):
  return sequence_logprobs(model, batch, remat="none", vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                           temperature=temperature, with_entropy=False, vocab_limit=vocab_limit)[0]


@dataclasses.dataclass
class Rollouts:
  trajs: list[Trajectory]
  scores: list[dict]
  groups: np.ndarray  # [N] group index of each trajectory
  advantages: np.ndarray  # [N]
  gen_batches: int
  all_scores: list[dict]  # every generated trajectory's score (before dynamic sampling), for metrics
  all_trajs: list[Trajectory]
  engine: EngineStats  # this process's engines, summed over the generation batches (the continuous engine)


def collect(model, tok, it, cfg, reward_cfg, agent_cfg, key, step: int) -> Rollouts:
  """Generates until `train_batch_size` informative groups are kept (or the generation cap is reached)."""
  a, r = cfg.algorithm, cfg.rollout
  want = cfg.data.train_batch_size
  kept: list[tuple[list[Trajectory], list[dict]]] = []
  all_trajs, all_scores, gen, stats = [], [], 0, EngineStats(engines=0)
  while len(kept) < want:
    records = [next(it) for _ in range(want)]
    tasks = [task_of(rec) for rec in records for _ in range(r.n)]
    batch_stats = EngineStats()
    trajs = generate(model, tok, tasks, agent_cfg, jax.random.fold_in(key, gen), r.batch_size, r.engine,
                     engine_config(r), batch_stats)
    add_stats(stats, batch_stats)
    scores = score(trajs, reward_cfg, step, [rec.answer_type for rec in records for _ in range(r.n)])
    gen += 1
    all_trajs += trajs
    all_scores += scores
    rewards = np.array([s["score"] for s in scores], np.float64)
    groups = np.repeat(np.arange(want), r.n)
    keep = keep_groups(rewards, groups) if a.rejection_sample else np.ones(len(trajs), bool)
    for g in range(want):
      if keep[g * r.n]:
        kept.append((trajs[g * r.n:(g + 1) * r.n], scores[g * r.n:(g + 1) * r.n]))
    if not a.rejection_sample or gen >= a.max_num_gen_batches:
      break
  if not kept:  # every group was uniform up to the cap: train on the last batch (its advantages are all 0)
    kept = [(trajs[g * r.n:(g + 1) * r.n], scores[g * r.n:(g + 1) * r.n]) for g in range(want)]
  kept = kept[:want]
  trajs = [t for ts, _ in kept for t in ts]
  scores = [s for _, ss in kept for s in ss]
  groups = np.repeat(np.arange(len(kept)), r.n)
  adv = outcome_advantages(a.adv_estimator, np.array([s["score"] for s in scores], np.float64), groups,
                           norm_adv_by_std=a.norm_adv_by_std_in_grpo)
  return Rollouts(trajs, scores, groups, adv, gen, all_scores, all_trajs, stats)


def training_batch(mc, examples: list[Example], mesh, *, rows: int, token_bucket: int, image_bucket: int,
                   pad_id: int, pieces: int = 1) -> TrainBatch:
  """A micro-batch of `examples` (trajectories in `placement.place` order) as global arrays; each process builds
  only the rows its chips hold, whose pixels it has (`placement.share_pixels`); `pieces`: see
  `batch.make_batch`."""
  local = {r: examples[r] if r < len(examples) else None for r in local_rows(mesh, rows)}
  return make_global_batch(mc, local, mesh, rows=rows, length=batch_length(examples, token_bucket),
                           image_bucket=image_bucket, pad_id=pad_id, token_names=("sampler_logp",),
                           seq_names=("advantage",), pieces=pieces)


def logprob_micro_batch(actor) -> int:
  """Trajectories per old/reference log-prob forward (`actor.logprob_micro_batch_size`, 0: the update's
  micro-batch), checked to be a multiple of the update's."""
  rows, lp = actor.ppo_micro_batch_size, actor.logprob_micro_batch_size or actor.ppo_micro_batch_size
  if lp < rows or lp % rows:
    raise ValueError(f"actor.logprob_micro_batch_size {actor.logprob_micro_batch_size} is not a positive multiple "
                     f"of actor.ppo_micro_batch_size {rows}")
  return lp


def logprob_batches(engine, examples: list[Example], logp_fn, ref_params, *, rows: int, logprob_rows: int,
                    token_bucket: int, image_bucket: int, pad_id: int) -> list[TrainBatch]:
  """The update's micro-batches of `rows` trajectories (in `placement.place` order) with their old (and, given
  `ref_params`, reference) log-probs, computed `logprob_rows` trajectories at a time: k = logprob_rows / rows
  consecutive micro-batches in one forward, micro-batch j's row r at row r * k + j, so a row's k trajectories
  sit on the chips (and process) that hold row r of each micro-batch; each micro-batch takes back its rows and
  its own token length."""
  k = logprob_rows // rows
  pieces = vision_pieces(engine.mesh, engine.rules)
  build = lambda exs, n: training_batch(mc=engine.model_config, examples=exs, mesh=engine.mesh, rows=n,
                                        token_bucket=token_bucket, image_bucket=image_bucket, pad_id=pad_id,
                                        pieces=pieces)
  micro = [examples[i:i + rows] for i in range(0, len(examples), rows)]
  groups = [micro[g:g + k] for g in range(0, len(micro), k)]
  groups = [[m] for grp in groups for m in grp] if any(len(m) < rows for m in micro) else groups  # a short tail
  out = []
  for group in groups:
    devs = [build(m, rows) for m in group]
    if len(group) == 1:
      whole = devs[0]
    else:
      whole = build([m[r] for r in range(rows) for m in group], rows * len(group))
    logps = {"old_logp": engine.evaluate(whole, logp_fn)}
    if ref_params is not None:
      logps["ref_logp"] = engine.evaluate(whole, logp_fn, params=ref_params)
    for j, dev in enumerate(devs):
      like = dev.token_values["sampler_logp"]
      take = (lambda a: a) if len(group) == 1 else _rows_of(len(group), j, like.shape[1], like.sharding)
      out.append(dev.replace(token_values=dict(dev.token_values, **{n: take(a) for n, a in logps.items()})))
  return out


@functools.cache
def _rows_of(k: int, j: int, length: int, sharding):
  """Rows j, j + k, ... and the first `length` tokens of a [rows * k, T] array, laid out as `sharding`."""
  return jax.jit(lambda a: a[j::k, :length], out_shardings=sharding)


def example_of(t: Trajectory, advantage: float) -> Example:
  return Example(ids=t.ids, loss_mask=t.response_mask, pixel_values=t.pixel_values, image_grid_thw=t.image_grid_thw,
                 token_values={"sampler_logp": t.logprobs}, seq_values={"advantage": float(advantage)})


def rollout_metrics(ro: Rollouts, max_round: int) -> dict:
  s = ro.all_scores
  trajs = ro.all_trajs
  m = {f"reward/{k}": float(np.mean([x[k] for x in s])) for k in ("score", "acc", "format", "tool_term")}
  m["reward/mean"] = m.pop("reward/score")
  m["acc/mean"] = m["reward/acc"]
  m["reward/max"] = float(max(x["score"] for x in s))
  m["reward/min"] = float(min(x["score"] for x in s))
  m["tool_calls/mean"] = float(np.mean([x["tool_call_count"] for x in s]))
  m["tool_use_rate"] = float(np.mean([used_tool(t) for t in trajs]))
  m["frames/mean"] = float(np.mean([t.n_frames for t in trajs]))
  m["response_length/mean"] = float(np.mean([t.response_mask.sum() for t in trajs]))
  rounds = collections.Counter(t.rounds for t in trajs)
  for k in range(1, max_round + 1):
    m[f"rounds/{k}_ratio"] = rounds.get(k, 0) / len(trajs)
  for reason, n in collections.Counter(t.finish_reason for t in trajs).items():
    m[f"finish/{reason}"] = n / len(trajs)
  m["dynamic_sampling/gen_batches"] = ro.gen_batches
  if ro.engine.engines:  # the continuous engine ran: engines per generation batch on this process, and its work
    e = ro.engine
    m["rollout/engines_per_process"] = e.engines / ro.gen_batches
    m.update({f"rollout/{k}": float(getattr(e, k)) for k in ("prefills", "preemptions", "recompute_tokens")})
  if any(t.home >= 0 for t in trajs):  # replicas joined: the share made by another replica than their block's
    m["rollout/taken_from_other_blocks"] = float(np.mean([t.replica != t.home for t in trajs]))
  m["dynamic_sampling/kept_groups"] = int(ro.groups.max() + 1) if len(ro.groups) else 0
  m["advantage/abs_mean"] = float(np.abs(ro.advantages).mean())
  return m


def rollout_mesh(rollout_cfg):
  """The mesh the rollout's weights and caches are laid out on (`rollout.mesh`: degrees like `mesh`), or None to
  sample with the training layout."""
  if not rollout_cfg.mesh.ici:
    return None
  from zoomer_jax.parallel.mesh import make_mesh  # noqa: PLC0415
  return make_mesh(tuple(rollout_cfg.mesh.ici), tuple(rollout_cfg.mesh.dcn))


def rollout_rules(cfg):
  """The logical-axis rules the sampler runs by on its mesh: `rollout.mesh.rules`, or the training table
  (`mesh.rules`) when that is empty. A table of its own needs a mesh of its own (`rollout.mesh.ici`)."""
  rules = tuple(cfg.rollout.mesh.rules)
  if rules and not cfg.rollout.mesh.ici:
    raise ValueError("config rollout.mesh.rules is set but rollout.mesh.ici is (): a sampler with its own rules "
                     "table needs its own mesh (set rollout.mesh.ici, or leave rollout.mesh.rules empty)")
  return rules or tuple(cfg.mesh.rules)


def engine_config(r) -> EngineConfig:
  """The continuous engine's settings from a config's `rollout` section (the rollout and validation share them)."""
  return EngineConfig(page_size=r.page_size, step_tokens=r.step_tokens, decode_burst=r.decode_burst,
                      pool_pages=r.pool_pages, max_running=r.max_running)


def validate(engine, tok, val_tasks, agent_cfg, cfg, step: int) -> dict:
  """Greedy evaluation with the tool on the validation set (verl's `test_freq`); writes val_{step}.jsonl."""
  from zoomer_jax.eval.harness import evaluate  # noqa: PLC0415
  out = os.path.join(cfg.workdir, "validation", f"val_{step}.jsonl")
  with jax.set_mesh(engine.rollout_mesh or engine.mesh):
    rep = evaluate(engine.rollout_model(), tok, val_tasks, agent_cfg, use_tool=True,
                   batch_size=cfg.rollout.max_running or cfg.rollout.batch_size, out_jsonl=out,
                   key=jax.random.key(cfg.seed), progress=False,
                   engine=engine_config(cfg.rollout))
  m = {"val/acc": rep.accuracy, "val/format": rep.format, "val/tool_calls": rep.mean_tool_calls,
       "val/frames": rep.mean_frames}
  m.update({f"val/acc/{src}": v["accuracy"] for src, v in rep.per_source.items()})
  return m


def run_grpo(cfg) -> dict:
  """The GRPO job of `cfg` (configs/grpo_*.py); resumes from the workdir's latest checkpoint. Returns the last
  RL step's metrics."""
  from zoomer_jax.train.jobs import JobContext  # noqa: PLC0415 (cycle)

  check_adv_estimator(cfg.algorithm.adv_estimator)  # before any work
  ctx = JobContext(cfg, kind="grpo")
  actor, r = cfg.actor, cfg.rollout
  reward_cfg = RewardConfig.from_dict(dict(cfg.reward.to_dict(), tool_call_max_frames=r.tool_call_max_frames,
                                            tools=r.tools))
  loss, logp_fn = grpo_loss_fns(cfg, vocab_limit=ctx.tok.vocab_size)
  want = cfg.data.train_batch_size
  if want % actor.ppo_mini_batch_size:
    raise ValueError(f"data.train_batch_size {want} is not a multiple of actor.ppo_mini_batch_size "
                     f"{actor.ppo_mini_batch_size}")
  updates_per_step = want // actor.ppo_mini_batch_size * actor.ppo_epochs
  total = cfg.trainer.total_steps
  engine = ctx.engine(loss, total_steps=total * updates_per_step, optim=actor.optim,
                      freeze_vision=actor.freeze_vision_tower, rollout_mesh=rollout_mesh(r),
                      rollout_rules=rollout_rules(cfg))
  ref_params = None
  if actor.use_kl_loss:  # the frozen reference: the starting weights, in the compute dtype
    ref_params = engine.compute_params()
    if ref_params is engine.state.params:  # same dtype: copy, as the state's buffers are donated to each update
      ref_params = jax.tree.map(lambda x: x.copy(), ref_params)
  source = ctx.rl_source("train")
  it = ctx.iterator(source, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
  writer, bar = ctx.start(engine, it, total)
  agent_cfg = agent_config(r)
  test_freq = cfg.trainer.test_freq if cfg.data.val_files else 0
  val_source = ctx.rl_source("validation") if test_freq else []
  val_tasks = [task_of(val_source[i]) for i in range(len(val_source))]
  rows = actor.ppo_micro_batch_size
  mini = actor.ppo_mini_batch_size * r.n  # trajectories per optimizer step
  if mini % rows:
    raise ValueError(f"actor.ppo_mini_batch_size x rollout.n = {mini} trajectories is not a multiple of "
                     f"actor.ppo_micro_batch_size {rows}")
  logprob_rows = logprob_micro_batch(actor)
  stats, completed = {}, False
  try:
    while ctx.job_step < total:
      step = ctx.job_step
      t0 = time.perf_counter()
      with jax.set_mesh(engine.rollout_mesh or engine.mesh):
        ro = collect(engine.rollout_model(), ctx.tok, it, cfg, reward_cfg, agent_cfg,
                     jax.random.fold_in(jax.random.key(cfg.seed), step), step)
      t_roll = time.perf_counter() - t0
      roll_mesh = engine.rollout_mesh or engine.mesh
      order = place([t.home for t in ro.trajs], home_replicas(engine.mesh, roll_mesh, rows))
      trajs, sent = share_pixels(ro.trajs, order, engine.mesh, roll_mesh, rows)
      examples = [example_of(trajs[k], ro.advantages[k]) for k in order]
      batches = logprob_batches(engine, examples, logp_fn, ref_params, rows=rows, logprob_rows=logprob_rows,
                                token_bucket=actor.token_bucket, image_bucket=actor.image_bucket,
                                pad_id=ctx.tok.endoftext)
      updates = []
      for _ in range(actor.ppo_epochs):
        for j in range(0, len(batches), mini // rows):
          for b in batches[j:j + mini // rows]:
            engine.accumulate(b)
          updates.append(engine.apply())
      dt = time.perf_counter() - t0
      stats = rollout_metrics(ro, r.max_generation_round)
      for k in updates[0]:
        stats[f"actor/{k}"] = float(np.mean([u[k] for u in updates]))
      stats["grad_norm"] = stats.pop("actor/grad_norm")
      stats["loss"] = stats["actor/loss"]
      n_tok = sum(len(t.ids) for t in ro.all_trajs) + 3 * sum(len(e.ids) for e in examples)
      stats.update(step_s=dt, rollout_s=t_roll, update_s=dt - t_roll, tokens_per_s=n_tok / dt)
      # This process's: the images it holds after the rollout (its own engines'), and those it sent to others' rows.
      stats["rollout/pixel_bytes_held"] = float(sum(t.pixel_values.nbytes for t in ro.trajs
                                                     if t.pixel_values is not None))
      stats["rollout/pixel_bytes_sent"] = float(sent)
      ctx.job_step = step + 1
      if test_freq and (ctx.job_step % test_freq == 0 or ctx.job_step == total):
        stats.update(validate(engine, ctx.tok, val_tasks, agent_config(r, greedy=True), cfg, ctx.job_step))
      ctx.end_step(engine, it, writer, bar, stats)
    completed = True
  finally:
    ctx.finish(engine, it, writer, bar, completed)
  return stats
