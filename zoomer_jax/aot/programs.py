"""Every device program a job config runs, with abstract inputs at the config's own shapes, ready to lower.

    programs = job_programs(cfg, mesh)          # [Program(name, fn, args, per_step, mesh), ...]
    with jax.set_mesh(p.mesh): p.fn.lower(*p.args).compile()

The functions are the job's own (`train.trainer.TrainSteps`, `sampling.sampler.step_program` /
`decode_program`), built from an abstract model (`nnx.eval_shape`: no parameter memory), so what compiles here
is what a job runs. Shapes are the worst case the config allows where it bounds them (a training row of
`max_token_len` tokens with `max_total_frames` images; prompt, clip and cache sizes by the agent's own rules),
and the cost account's expected trajectory where only an expectation exists (how many zoom calls and decode
chunks a rollout runs, `zoomer_jax.cost.workload.Trajectory`).

SFT:  grad (one micro-batch's forward + backward, accumulated) x batch / micro-batch; apply x 1.
GRPO: old_logp and ref_logp (teacher-forced log-probs) x trajectories / micro-batch; update (grad)
      x epochs x trajectories / micro-batch; apply x optimizer steps; reshard (the weights into the rollout
      layout) x 1; prefill (the overview prompt), extend (a zoom clip) and decode (a chunk of `decode_chunk`
      steps) x their count in the rollout calls of a step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomer_jax.aot.engine_programs import engine_programs
from zoomer_jax.checkpoint.hf_import import abstract_model
from zoomer_jax.checkpoint.orbax_io import TrainState, state_shardings
from zoomer_jax.cost import flops as F
from zoomer_jax.cost.account import Rollout as RolloutAssumptions
from zoomer_jax.cost.account import _mean_decode_context
from zoomer_jax.cost.workload import Trajectory, frame_grid, job_from_config
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.kv_cache import KVCache, cache_shardings
from zoomer_jax.model.qwen25vl import VisionInput, resolve_dtype
from zoomer_jax.model.vision_layout import layout_sizes, padded_layout
from zoomer_jax.parallel.mesh import make_mesh
from zoomer_jax.parallel.rules import logical_to_spec, vision_pieces
from zoomer_jax.sampling.sampler import SamplingParams, StopCriteria, decode_program, round_up, step_program
from zoomer_jax.train.batch import TrainBatch, batch_sharding
from zoomer_jax.train.optim import make_optimizer
from zoomer_jax.train.trainer import TrainSteps, cast_floats, model_options, with_rules

WORST_FRAME = (480, 640)  # 4:3 gives the most patches under the pixel budget (the cost account's worst case)
STOP_WINDOW = 32  # StopCriteria's byte window (agent.rollout.stop_criteria)


@dataclasses.dataclass
class Program:
  name: str
  fn: Any  # a jax.jit-wrapped function
  args: tuple
  per_step: float  # how many times one job step runs it
  mesh: Mesh
  note: str = ""
  model_flops: float = 0.0  # useful FLOPs of one call (causal attention pairs, real work, no recompute)
  loop_steps: int = 1  # iterations of a while loop XLA's cost analysis counts once (the decode loop's steps)
  resident: float = 0.0  # bytes per chip the job keeps live while this runs that are not its arguments
  kwargs: dict = dataclasses.field(default_factory=dict)
  kernel_bytes: float = 0.0  # per chip per call, of a Pallas kernel XLA's cost analysis leaves out (the paged
  kernel_flops: float = 0.0  # attention); splash kernels are counted from the HLO instead (report.splash_flops)
  traffic: dict = dataclasses.field(default_factory=dict)  # bytes per chip per call the step must move, by part
  probe_layers: tuple = (1, 2)  # the decoder depths whose cost probes give the per-layer cost (report)

  def lower(self):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*self.args, **self.kwargs)


def _sds(shape, dtype, mesh, spec=PartitionSpec()) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _vision(cfg: ModelConfig, rows: int, images: int, grid, mesh: Mesh, image_bucket: int, split_rows: bool,
            pieces: int = 1):
  """Abstract per-row images: `images` frames of `grid` in every row, laid out as make_batch / extend do."""
  grids = np.asarray([grid] * images, np.int64)
  sizes = layout_sizes([grids], cfg.vision, image_bucket, pieces)
  one = padded_layout(grids, cfg.vision, sizes)
  spec = PartitionSpec(("data", "fsdp")) if split_rows else PartitionSpec()
  layout = jax.tree.map(lambda a: _sds((rows,) + a.shape, a.dtype, mesh, spec), one)
  pixels = _sds((rows, sizes.patches, cfg.vision.patch_dim), jnp.float32, mesh, spec)
  return VisionInput(pixels=pixels, layout=layout)


def train_batch(cfg: ModelConfig, mesh: Mesh, *, rows: int, length: int, images: int, grid, image_bucket: int,
                token_values=(), seq_values=(), pieces: int = 1) -> TrainBatch:
  """An abstract `make_batch` result laid out by `batch_sharding`."""
  host = TrainBatch(ids=np.zeros((rows, 1), np.int32), positions=None, token_mask=None, loss_mask=None, images=None,
                    token_values={}, seq_values={})
  split = bool(batch_sharding(mesh, host).ids.spec)
  sh = batch_sharding(mesh, host).ids
  row = lambda dtype: jax.ShapeDtypeStruct((rows, length), jnp.dtype(dtype), sharding=sh)
  pos_sh = NamedSharding(mesh, PartitionSpec(None, *sh.spec))
  return TrainBatch(
      ids=row(jnp.int32), positions=jax.ShapeDtypeStruct((3, rows, length), jnp.int32, sharding=pos_sh),
      token_mask=row(bool), loss_mask=row(jnp.float32),
      images=_vision(cfg, rows, images, grid, mesh, image_bucket, split, pieces) if images else None,
      token_values={k: row(jnp.float32) for k in token_values},
      seq_values={k: jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sh) for k in seq_values})


@dataclasses.dataclass
class Abstract:
  """The job's model split as the trainer splits it, with abstract parameters on `mesh`."""

  graphdef: Any
  params: Any  # master weights (param dtype), training layout
  rest: Any
  compute_dtype: Any
  param_dtype: Any
  rules: Any
  rollout_graphdef: Any = None  # the sampler's: the same model under the rollout's rules table
  rollout_rules: Any = None


def abstract_job(cfg, mesh: Mesh, model_cfg: ModelConfig | None = None, rollout_rules=None) -> Abstract:
  """The job's model as the trainer splits it; `rollout_rules`: the sampler's table (default: the training one)."""
  options = model_options(cfg)
  model_cfg = model_cfg or ModelConfig.from_config_dict(cfg.model.to_dict())
  compute = resolve_dtype(cfg.init.dtype)
  model = abstract_model(model_cfg, compute, options)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rollout_graphdef, rollout_rules = with_rules(graphdef, model, rollout_rules or options.rules)
  param_dtype = jnp.dtype(cfg.init.param_dtype or compute)
  params = jax.eval_shape(lambda p: cast_floats(p, param_dtype), params)
  params = _abstract(params, state_shardings(params, mesh, options.rules))
  return Abstract(graphdef, params, rest, compute, param_dtype, options.rules, rollout_graphdef, rollout_rules)


def _train_steps(cfg, ab: Abstract, mesh: Mesh, loss_fn, optim, freeze_vision, total_steps, rollout_mesh=None):
  tx, schedule = make_optimizer(dict(optim), total_steps, ab.params, freeze_vision)
  state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)), ab.params)
  shardings = state_shardings(state, mesh, ab.rules)
  state = _abstract(state, shardings)
  rollout_shardings = None if rollout_mesh is None else state_shardings(ab.params, rollout_mesh,
                                                                           ab.rollout_rules)
  steps = TrainSteps(ab.graphdef, ab.rest, loss_fn, tx, schedule, ab.compute_dtype, shardings, rollout_shardings)
  return steps, state


def _scalar(mesh, dtype=jnp.float32):
  return _sds((), dtype, mesh)


def chip_bytes(tree) -> float:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard: uneven splits pad)."""
  total = 0.0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.dtype(x.dtype).itemsize
    total += float(np.prod(shape, dtype=np.float64)) * itemsize
  return total


def row_flops(mc: ModelConfig, tokens: int, images: int, grid, *, context: int | None = None,
              logit_tokens: int | None = None) -> dict[str, float]:
  """Model FLOPs of one row's forward: `tokens` new tokens over `context` keys (causal), `images` of `grid`."""
  text = sum(F.text_forward_flops(mc.text, tokens, context or tokens, causal=True,
                                  logit_tokens=logit_tokens).values())
  vision = float(F.vision_forward_flops(mc.vision, [grid] * images, padded=False).total) if images else 0.0
  return dict(text=float(text), vision=vision)


def train_flops(mc: ModelConfig, rows: int, tokens: int, images: int, grid, *, backward: bool,
                freeze_vision) -> float:
  f = row_flops(mc, tokens, images, grid)
  if not backward:
    return rows * (f["text"] + f["vision"])
  return rows * (3 * f["text"] + (1 if freeze_vision else 3) * f["vision"])


def sft_programs(cfg, mesh: Mesh, *, model_cfg=None, token_chunk="config") -> list[Program]:
  from zoomer_jax.train.sft import sft_loss_fn  # noqa: PLC0415
  d = cfg.data
  ab = abstract_job(cfg, mesh, model_cfg)
  mc = model_cfg or ModelConfig.from_config_dict(cfg.model.to_dict())
  steps, state = _train_steps(cfg, ab, mesh, sft_loss_fn(cfg, token_chunk=token_chunk), cfg.optim,
                              cfg.train.freeze_vision_tower, total_steps=1000)
  grid = frame_grid(*WORST_FRAME, d.max_pixels, d.min_pixels)
  batch = train_batch(mc, mesh, rows=d.micro_batch_size, length=round_up(d.cutoff_len, d.token_bucket),
                      images=SFT_IMAGES, grid=grid, image_bucket=d.image_bucket,
                      pieces=vision_pieces(mesh, ab.rules))
  acc = jax.tree.map(lambda p: p, ab.params)
  micro = d.batch_size // d.micro_batch_size
  length = batch.ids.shape[1]
  flops = train_flops(mc, d.micro_batch_size, length, SFT_IMAGES, grid, backward=True,
                      freeze_vision=cfg.train.freeze_vision_tower)
  moments = chip_bytes(state) - chip_bytes(ab.params)
  return [
      Program("sft/grad", steps.grad, (ab.params, acc, batch), micro, mesh,
              f"{d.micro_batch_size} rows x {length} tokens, {SFT_IMAGES} images {grid} per row", flops,
              resident=moments),
      Program("sft/apply", steps.apply, (state, acc, _scalar(mesh)), 1, mesh, "AdamW on the accumulated gradient"),
  ]


SFT_IMAGES = 128  # an SFT record holds the overview and every zoom clip: at most 64 + 4 x 16 frames


def grpo_programs(cfg, mesh: Mesh, *, model_cfg=None, token_chunk="config", rollout_mesh: Mesh | None = None,
                  ) -> list[Program]:
  from zoomer_jax.train.grpo import grpo_loss_fns, logprob_micro_batch, rollout_rules  # noqa: PLC0415
  a, r = cfg.actor, cfg.rollout
  ab = abstract_job(cfg, mesh, model_cfg, rollout_rules(cfg))
  mc = model_cfg or ModelConfig.from_config_dict(cfg.model.to_dict())
  loss, logp_fn = grpo_loss_fns(cfg, token_chunk=token_chunk)
  steps, state = _train_steps(cfg, ab, mesh, loss, a.optim, a.freeze_vision_tower, total_steps=1000,
                              rollout_mesh=rollout_mesh)
  grid = frame_grid(*WORST_FRAME, r.max_pixels, r.min_pixels)
  rows, length = a.ppo_micro_batch_size, round_up(a.max_token_len, a.token_bucket)
  lp_rows = logprob_micro_batch(a)
  kw = dict(length=length, images=r.max_total_frames, grid=grid, image_bucket=a.image_bucket,
            pieces=vision_pieces(mesh, ab.rules))
  logp_batch = train_batch(mc, mesh, rows=lp_rows, **kw, token_values=("sampler_logp",), seq_values=("advantage",))
  tv = ("sampler_logp", "old_logp") + (("ref_logp",) if a.use_kl_loss else ())
  update_batch = train_batch(mc, mesh, rows=rows, **kw, token_values=tv, seq_values=("advantage",))
  ref = jax.eval_shape(lambda p: cast_floats(p, ab.compute_dtype), ab.params)
  ref = _abstract(ref, jax.tree.map(lambda x: x.sharding, ab.params))
  acc = jax.tree.map(lambda p: p, ab.params)
  trajectories = cfg.data.train_batch_size * r.n
  micro, lp_micro = trajectories // rows, trajectories // lp_rows
  per_row = f"{rows} rows x {length} tokens, {r.max_total_frames} images {grid} per row"
  lp_per_row = f"{lp_rows} rows x {length} tokens, {r.max_total_frames} images {grid} per row"
  fwd = train_flops(mc, lp_rows, length, r.max_total_frames, grid, backward=False, freeze_vision=True)
  upd = train_flops(mc, rows, length, r.max_total_frames, grid, backward=True, freeze_vision=a.freeze_vision_tower)
  # What stays live beside each program's arguments: the optimizer state, the reference weights.
  state_b, params_b = chip_bytes(state), chip_bytes(ab.params)
  moments, ref_b = state_b - params_b, chip_bytes(ref) if a.use_kl_loss else 0.0
  programs = [
      Program("grpo/old_logp", steps.evaluate, (ab.params, logp_batch, logp_fn), lp_micro, mesh, lp_per_row, fwd,
              resident=moments + ref_b),
  ]
  if a.use_kl_loss:
    programs.append(Program("grpo/ref_logp", steps.evaluate, (ref, logp_batch, logp_fn), lp_micro, mesh,
                            "the same forward on the bf16 reference weights", fwd, resident=state_b))
  programs += [
      Program("grpo/update", steps.grad, (ab.params, acc, update_batch), a.ppo_epochs * micro, mesh, per_row, upd,
              resident=moments + ref_b),
      Program("grpo/apply", steps.apply, (state, acc, _scalar(mesh)),
              a.ppo_epochs * trajectories // (a.ppo_mini_batch_size * r.n), mesh, "AdamW per mini-batch",
              resident=ref_b),
  ]
  rollout = rollout_programs(cfg, ab, steps, mc, mesh, rollout_mesh)
  for p in rollout:
    p.resident = moments + ref_b if p.name == "rollout/reshard" else state_b + ref_b
  return programs + rollout


def _cache(mc: ModelConfig, mesh: Mesh, rules, rows: int, size: int, dtype, stacked: bool) -> KVCache:
  abstract = jax.eval_shape(lambda: KVCache.init(mc.text, rows, size, dtype, stacked=stacked))
  return _abstract(abstract, cache_shardings(abstract, mesh, rules))


def rollout_shapes(cfg, mc: ModelConfig) -> dict:
  """Prompt, clip and cache sizes of the config's rollout, by the agent's own rules (agent.rollout._cache_size)
  on the expected trajectory's frame grid, and how many of each program a step runs."""
  from zoomer_jax.agent.rollout import AgentConfig  # noqa: PLC0415
  r = cfg.rollout
  job = job_from_config(cfg, cfg.accelerator_type or "v5p-8")
  traj = Trajectory().counts(job)
  bucket = AgentConfig.token_bucket
  per_frame = traj.tokens_per_image + 12
  prompt = round_up(traj.prompt_tokens, bucket)
  clip = round_up(traj.observation_tokens, bucket)
  observation = r.tool_call_max_frames * per_frame + 160
  cache = round_up(prompt + bucket + r.max_generation_round * (r.response_length + r.decode_chunk + observation +
                                                                bucket), 256)
  calls = -(-cfg.data.train_batch_size * r.n // r.batch_size)
  ro = RolloutAssumptions()
  per_turn = min(r.response_length, ro.straggler * traj.gen_tokens_per_turn)
  chunks = traj.turns * -(-int(per_turn) // r.decode_chunk)
  return dict(prompt=prompt, clip=clip, cache=cache, calls=calls, zooms=traj.zoom_calls, chunks=chunks,
              grid=traj.grid, overview=traj.overview_frames, clip_frames=traj.frames_per_call,
              context=_mean_decode_context(traj), gen_tokens=traj.gen_tokens)


def rollout_programs(cfg, ab: Abstract, steps: TrainSteps, mc: ModelConfig, mesh: Mesh,
                     rollout_mesh: Mesh | None) -> list[Program]:
  from zoomer_jax.agent.rollout import AgentConfig  # noqa: PLC0415
  r = cfg.rollout
  rmesh = rollout_mesh or mesh
  shapes = rollout_shapes(cfg, mc)
  rows = r.batch_size
  weights = jax.eval_shape(lambda p: cast_floats(p, ab.compute_dtype), ab.params)
  weights = _abstract(weights, state_shardings(weights, rmesh, ab.rollout_rules))
  state = nnx.merge(ab.rollout_graphdef, weights, ab.rest)
  graphdef, state = nnx.split(state)
  out: list[Program] = []
  if rollout_mesh is not None:
    params, at, note = ab.params, mesh, ""
    if not steps.same_order:
      # `device_put`'s reshard (TrainSteps.rollout_weights): the input relabelled onto the rollout mesh's chip
      # order, its layout over the training axes kept. Which chip sends which shard is relabelled too; the bytes
      # each chip moves are the same. The cast, here in the same program, runs before it in the job.
      at = Mesh(rmesh.devices.reshape(mesh.devices.shape), mesh.axis_names, axis_types=mesh.axis_types)
      params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
          at, x.sharding.spec)), ab.params)
      note = " (chips in the rollout mesh's order)"
    out.append(Program("rollout/reshard", steps.reshard, (params,), 1, at,
                       f"master weights -> {ab.compute_dtype.name} on the rollout mesh {dict(rmesh.shape)}{note}"))
  batch_spec = logical_to_spec(("activation_batch",), ab.rollout_rules, rmesh, (rows,))
  split = bool(batch_spec[0])
  row_sh = lambda *tail: NamedSharding(rmesh, PartitionSpec(batch_spec[0], *tail))
  stacked = model_options(cfg).scan_layers

  def chunk_args(t: int, images: int, fresh: bool):
    cache = _cache(mc, rmesh, ab.rollout_rules, rows, shapes["cache"], ab.compute_dtype, stacked)
    ids = jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=row_sh(None))
    pos = jax.ShapeDtypeStruct((3, rows, t), jnp.int32,
                               sharding=NamedSharding(rmesh, PartitionSpec(None, batch_spec[0], None)))
    mask = jax.ShapeDtypeStruct((rows, t), bool, sharding=row_sh(None))
    vision = _vision(mc, rows, images, shapes["grid"], rmesh, AgentConfig.image_bucket, split)
    last = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row_sh())
    del fresh
    return (graphdef, state, ids, pos, mask, vision, None, cache, last)

  n = shapes["calls"]
  pre = row_flops(mc, shapes["prompt"], shapes["overview"], shapes["grid"], logit_tokens=1)
  ext = row_flops(mc, shapes["clip"], shapes["clip_frames"], shapes["grid"], context=shapes["prompt"] + shapes["clip"],
                  logit_tokens=1)
  out.append(Program("rollout/prefill", step_program, chunk_args(shapes["prompt"], shapes["overview"], True), n,
                     rmesh, f"{rows} rows x {shapes['prompt']} tokens, {shapes['overview']} images, cache "
                            f"{shapes['cache']} slots", rows * sum(pre.values())))
  out.append(Program("rollout/extend", step_program, chunk_args(shapes["clip"], shapes["clip_frames"], False),
                     n * shapes["zooms"], rmesh, f"{rows} rows x {shapes['clip']} tokens, {shapes['clip_frames']} "
                                                 f"images (expected {shapes['zooms']} zoom calls)",
                     rows * sum(ext.values())))
  cache = _cache(mc, rmesh, ab.rollout_rules, rows, shapes["cache"], ab.compute_dtype, stacked)
  v = mc.text.vocab_size
  rep = lambda shape, dtype: _sds(shape, dtype, rmesh)
  stop = StopCriteria(token_ids=rep((2,), jnp.int32), token_bytes=rep((v, STOP_WINDOW), jnp.uint8),
                      token_len=rep((v,), jnp.int32), strings=rep((1, STOP_WINDOW), jnp.uint8),
                      string_len=rep((1,), jnp.int32), suppress=rep((4,), jnp.int32),
                      vocab_limit=rep((), jnp.int32))
  params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=max(0, r.top_k),
                          max_new_tokens=r.decode_chunk)
  args = (graphdef, state, cache, jax.ShapeDtypeStruct((rows, v), jnp.float32, sharding=row_sh(None)),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row_sh()),
          jax.ShapeDtypeStruct((rows,), bool, sharding=row_sh()),
          jax.eval_shape(lambda: jax.random.key(0)), stop, params,
          jax.ShapeDtypeStruct((rows, STOP_WINDOW), jnp.uint8, sharding=row_sh(None)),
          jax.ShapeDtypeStruct((rows, r.decode_chunk), jnp.int32, sharding=row_sh(None)))
  t = mc.text
  per_token = (sum(F.text_matmul_flops_per_token(t).values()) + F.lm_head_flops_per_token(t)
               + F.text_attention_flops(t, shapes["context"]))
  out.append(Program("rollout/decode", decode_program, args, n * shapes["chunks"], rmesh,
                     f"{rows} rows x {r.decode_chunk} steps ({shapes['chunks']} chunks per rollout call)",
                     rows * per_token * r.decode_chunk, loop_steps=r.decode_chunk))
  return out + engine_programs(cfg, ab, mc, rmesh, stop, SamplingParams(temperature=r.temperature, top_p=r.top_p,
                                                                        top_k=max(0, r.top_k)))


def job_programs(cfg, mesh: Mesh, **kw) -> list[Program]:
  kind = cfg.job
  if kind == "sft":
    kw.pop("rollout_mesh", None)
    return sft_programs(cfg, mesh, **kw)
  if kind == "grpo":
    return grpo_programs(cfg, mesh, **kw)
  raise ValueError(f"config job={kind!r}: compile knows 'sft' and 'grpo'")


def meshes(cfg, devices) -> tuple[Mesh, Mesh | None]:
  """(training mesh, rollout mesh or None) of `cfg` over `devices`."""
  mesh = make_mesh(tuple(cfg.mesh.ici), tuple(cfg.mesh.dcn), devices=devices)
  rollout = None
  if cfg.job == "grpo" and cfg.rollout.mesh.ici:
    rollout = make_mesh(tuple(cfg.rollout.mesh.ici), tuple(cfg.rollout.mesh.dcn), devices=devices)
  return mesh, rollout


def reduced(mc: ModelConfig, text_layers: int, window_blocks: int, full_blocks: int) -> ModelConfig:
  """The model with fewer decoder layers and vision blocks (the cost probes' depths)."""
  depth = window_blocks + full_blocks
  text = dataclasses.replace(mc.text, num_hidden_layers=text_layers)
  vision = dataclasses.replace(mc.vision, depth=depth, fullatt_block_indexes=tuple(range(window_blocks, depth)))
  return dataclasses.replace(mc, text=text, vision=vision)


def block_counts(mc: ModelConfig) -> tuple[int, int, int]:
  """(decoder layers, windowed vision blocks, full-attention vision blocks)."""
  full = len(mc.vision.fullatt_block_indexes)
  return mc.text.num_hidden_layers, mc.vision.depth - full, full

