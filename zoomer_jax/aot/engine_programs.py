"""The continuous engine's device programs (`sampling/ragged.py`), at the sizes the engine gives them, to compile.

    shapes = engine_shapes(cfg, mc, rollout_mesh)     # S, page table, pool, chunk buckets, counts per RL step
    programs = engine_programs(cfg, ab, mc, rollout_mesh, stop, params)   # engine/decode, engine/prefill, ...

One engine per data-parallel replica of the rollout mesh (`rollout.mesh`): its trajectories, its own pool of
pages, no traffic between replicas, so the programs compile on one replica's chips (`replica_mesh`: the data
axis cut to 1, the tensor axis kept) and every replica runs the same ones at once. The engine's own rules size
them (`agent.engine`): `running` = rollout.max_running (0: rollout.batch_size) / replicas trajectories in flight
(at least one GRPO group), the page table `pages_per_seq` from the agent's cache rule, the pool `rollout.pool_pages`
(0: `running + 1` sequences at their longest).

  engine/decode   S sequences, one token each (T = S rows): one generated token per sequence, the step whose
                  HBM bandwidth the report gives. Counted 0 times per RL step: the engine decodes in bursts.
  engine/burst    K of those steps in one device call (`sampling/burst.py`, K = rollout.decode_burst): what the
                  engine runs while every running sequence only decodes; the RL step counts its decode here.
  engine/prefill  a group's prompt alone, T = token_bucket(prompt tokens), its n sampling slots, the overview images.
  engine/extend   a zoom clip's observation alone, T = token_bucket(observation tokens + 2), its images.

Counts per RL step, per replica (replicas run in parallel): prefills = the replica's groups (a group's prompt
is computed once), extends = its trajectories x the expected zoom calls, bursts = its expected generated tokens /
the sequences in flight / K (a finished sequence's place refilled at once: continuous batching's ideal).

The Pallas kernel is a custom call XLA's cost analysis does not price (neither its bytes nor its FLOPs), so
its work is accounted from the shapes: in a decode step every layer reads each sequence's keys and values up to
its context, its share of the kv heads (`kv_bytes`); a prefill or extend chunk's tiles of 32 query rows each
read the pages up to their last row (`chunk_keys_read`), and do the causal pairs' FLOPs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomer_jax.agent.engine import pool_pages
from zoomer_jax.cost import flops as F
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.page_allocator import bucket, seq_bucket, token_bucket
from zoomer_jax.model.paged import KERNEL_QUERIES_PER_BLOCK, PagePool, RaggedBatch, kernel_fits
from zoomer_jax.parallel.rules import logical_to_spec
from zoomer_jax.sampling import burst as B
from zoomer_jax.sampling import ragged as R

MIN_IMAGES = 8  # build_step's image bucket floor


@dataclasses.dataclass(frozen=True)
class EngineShapes:
  replicas: int  # engines: the rollout mesh's data-parallel replicas
  running: int  # trajectories in flight per engine (at least a group)
  seqs: int  # S of the decode step: seq_bucket(running)
  page_size: int
  pages_per_seq: int
  num_pages: int  # the pool
  prefill_tokens: int  # T of a prompt's step
  prefill_images: int
  prefill_slots: int  # the group's n samples read the prompt's last row
  extend_tokens: int
  extend_images: int
  prefills: float  # per engine per RL step
  extends: float
  decode_steps: float
  mean_context: int  # keys a generated token attends to, on average (the expected trajectory)
  trajectories: float  # per engine per RL step
  grid: tuple  # the expected frame's patch grid
  prompt_real: int  # tokens of the prompt and of a clip's observation before bucketing
  clip_real: int

  @property
  def max_context(self) -> int:
    return self.pages_per_seq * self.page_size


def replica_mesh(rmesh: Mesh) -> Mesh:
  """The chips of one data-parallel replica of the rollout mesh (the last: every replica runs the same programs,
  and libtpu's compile without a TPU rejects the v6e-64 host block that holds chip 0, {0, 1, 8, 9}, with a
  RET_CHECK on its device ids where every other block compiles), with its axes (data of size 1)."""
  return Mesh(rmesh.devices[-1:], rmesh.axis_names, axis_types=rmesh.axis_types)


def engine_shapes(cfg, mc: ModelConfig, rmesh: Mesh) -> EngineShapes:
  """The engine's sizes and counts for `cfg` on the rollout mesh `rmesh` (module docstring)."""
  from zoomer_jax.aot.programs import rollout_shapes  # noqa: PLC0415 (programs imports this module)
  r = cfg.rollout
  shapes = rollout_shapes(cfg, mc)
  replicas = int(rmesh.shape["data"])
  in_flight, key = (r.max_running, "max_running") if r.max_running else (r.batch_size, "batch_size")
  if in_flight % replicas:
    raise ValueError(f"rollout.{key}={in_flight} does not split over {replicas} data-parallel engines")
  per_engine = cfg.data.train_batch_size * r.n / replicas
  running = max(in_flight // replicas, r.n)
  pages_per_seq = -(-shapes["cache"] // r.page_size)
  return EngineShapes(
      replicas=replicas, running=running, seqs=seq_bucket(running), page_size=r.page_size, pages_per_seq=pages_per_seq,
      num_pages=r.pool_pages or pool_pages(running, r.n, pages_per_seq), prefill_tokens=token_bucket(shapes["prompt"]),
      prefill_images=bucket(shapes["overview"], MIN_IMAGES), prefill_slots=r.n,
      extend_tokens=token_bucket(shapes["clip"] + 2), extend_images=bucket(shapes["clip_frames"], MIN_IMAGES),
      prefills=per_engine / r.n, extends=per_engine * shapes["zooms"],
      decode_steps=per_engine * shapes["gen_tokens"] / min(running, per_engine), mean_context=shapes["context"],
      trajectories=per_engine, grid=tuple(shapes["grid"]), prompt_real=shapes["prompt"],
      clip_real=shapes["clip"])


def kv_bytes(mc: ModelConfig, mesh: Mesh, rules, sequences: float, context: float, itemsize: int) -> float:
  """Bytes one chip's kernel reads in one step: every layer's keys and values of `sequences` sequences up to
  `context` tokens, the chip's share of the kv heads."""
  t = mc.text
  spec = logical_to_spec(("cache_kv_heads",), rules, mesh, (t.num_key_value_heads,))[0]
  split = int(np.prod([mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec or ())]))
  return t.num_hidden_layers * sequences * context * 2 * t.num_key_value_heads / split * t.head_dim * itemsize


def decode_weight_bytes(weights) -> float:
  """Bytes per chip of the weights a decode step reads: the decoder layers, final norm and output head (not the
  vision tower; of the embedding table only the step's rows, left out)."""
  from zoomer_jax.aot.programs import chip_bytes  # noqa: PLC0415
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]:
    name = jax.tree_util.keystr(path)
    if "visual" in name or "embed_tokens" in name:
      continue
    total += chip_bytes(leaf)
  return total


def _replicated(mesh: Mesh):
  """`sds(shape, dtype=int32)`: an abstract host input, replicated on the replica's chips."""
  rep = NamedSharding(mesh, PartitionSpec())
  return lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=rep)


def _step_input(mesh: Mesh, t: int, s: int, pages_per_seq: int, window: int, vision=None) -> R.StepInput:
  """An abstract `build_step` result: T rows, S sequences/slots."""
  sds = _replicated(mesh)
  batch = RaggedBatch(page_indices=sds((s, pages_per_seq)), kv_lens=sds((s,)), cu_q_lens=sds((s + 1,)),
                      num_seqs=sds((1,)), copy_src=sds((s,)), copy_dst=sds((s,)))
  return R.StepInput(ids=sds((t,)), positions=sds((3, t)), batch=batch, images=vision, slot_rows=sds((s,)),
                     windows=sds((s, window), jnp.uint8), forced=sds((s,)), draws=sds((s, 2)))


def _burst_input(mesh: Mesh, s: int, k: int, pages_per_seq: int, window: int) -> B.BurstInput:
  """An abstract `build_burst` result: S rows, K iterations."""
  sds = _replicated(mesh)
  return B.BurstInput(tokens=sds((s,)), positions=sds((s,)), kv_start=sds((s,)), limit=sds((s,)),
                      page_indices=sds((s, pages_per_seq)), copy_src=sds((s,)), copy_dst=sds((s,)),
                      windows=sds((s, window), jnp.uint8), forced=sds((s, k)), draws=sds((s, 2)))


def pool(mc: ModelConfig, mesh: Mesh, rules, num_pages: int, page_size: int, dtype) -> jax.ShapeDtypeStruct:
  """The abstract pool [L, P, page_size, 2k, h], kv heads split as the rules say."""
  abstract = jax.eval_shape(lambda: PagePool.init(mc.text, num_pages, page_size, dtype).kv)
  return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=PagePool.sharding(mesh, rules, abstract.shape))


def engine_programs(cfg, ab, mc: ModelConfig, rmesh: Mesh, stop, params, end_token: int = 0) -> list:
  """The engine's programs (module docstring) as `programs.Program`s on one replica's chips; `ab` is the job's
  `programs.Abstract`, `stop` / `params` the rollout's abstract stop criteria and sampling parameters."""
  from zoomer_jax.aot.programs import Program, _abstract, _vision, row_flops  # noqa: PLC0415
  from zoomer_jax.checkpoint.orbax_io import state_shardings  # noqa: PLC0415
  from zoomer_jax.train.trainer import cast_floats  # noqa: PLC0415
  es = engine_shapes(cfg, mc, rmesh)
  mesh = replica_mesh(rmesh)
  weights = jax.eval_shape(lambda p: cast_floats(p, ab.compute_dtype), ab.params)
  weights = _abstract(weights, state_shardings(weights, mesh, ab.rollout_rules))
  graphdef, state = nnx.split(nnx.merge(ab.rollout_graphdef, weights, ab.rest))
  kv = pool(mc, mesh, ab.rollout_rules, es.num_pages, es.page_size, ab.compute_dtype)
  rep = NamedSharding(mesh, PartitionSpec())
  stop = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), stop)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
  window = stop.token_bytes.shape[1]

  def step(name, t: int, s: int, images: int, per_step: float, note: str, flops: float, *, fn=R.ragged_program,
           probe_layers=(2, 3), **kw):
    vision = _vision(mc, 1, images, es.grid, mesh, bucket(images, MIN_IMAGES), False) if images else None
    inp = _step_input(mesh, t, s, es.pages_per_seq, window, vision)
    return Program(name, fn, (graphdef, state, kv, inp, key, stop, params, end_token), per_step, mesh, note, flops,
                   probe_layers=probe_layers, **kw)

  t = mc.text
  itemsize = jnp.dtype(ab.compute_dtype).itemsize
  per_token = sum(F.text_matmul_flops_per_token(t).values()) + F.lm_head_flops_per_token(t)
  chunk = lambda n, ctx, images: sum(row_flops(mc, n, images, es.grid, context=ctx, logit_tokens=1).values())
  kernel = lambda n, start: dict(
      kernel_bytes=kv_bytes(mc, mesh, ab.rollout_rules, 1, chunk_keys_read(n, start, es.page_size), itemsize),
      kernel_flops=F.text_attention_flops(t, n * start + n * (n + 1) // 2) / mesh.size)
  decode_kv = kv_bytes(mc, mesh, ab.rollout_rules, es.running, es.mean_context, itemsize)
  if not kernel_fits(kv):  # the plain-JAX attention: XLA's cost analysis sees its work
    kernel = lambda n, start: {}
  traffic = dict(weights=decode_weight_bytes(weights), kv_mean=decode_kv, mean_context=es.mean_context,
                 kv_max=kv_bytes(mc, mesh, ab.rollout_rules, es.running, es.max_context, itemsize),
                 max_context=es.max_context, sequences=es.running)
  decode_flops = es.running * (per_token + F.text_attention_flops(t, es.mean_context))
  decode_kernel = dict(kernel_bytes=decode_kv, kernel_flops=es.running * F.text_attention_flops(t, es.mean_context)
                       / mesh.size) if kernel_fits(kv) else {}
  k = int(cfg.rollout.decode_burst)
  progs = [
      # v6e's 2 -> 3 layer step of the decode probe is short of every later one (docs/tpu.md): probes at 3 and 4
      step("engine/decode", es.seqs, es.seqs, 0, 0 if k > 1 else es.decode_steps,
           f"{es.running} of S={es.seqs} sequences x 1 token; {es.pages_per_seq} pages of {es.page_size} per "
           f"sequence, pool {es.num_pages}; {es.replicas} engines" + ("; the RL step decodes in engine/burst"
                                                                      if k > 1 else ""),
           decode_flops, traffic=traffic, probe_layers=(3, 4), **decode_kernel),
      step("engine/prefill", es.prefill_tokens, seq_bucket(es.prefill_slots), es.prefill_images, es.prefills,
           f"T={es.prefill_tokens} (a group's prompt of {es.prompt_real}), {es.prefill_images} images, "
           f"{es.prefill_slots} slots", chunk(es.prompt_real, es.prompt_real, es.prefill_images),
           **kernel(es.prompt_real, 0)),
      step("engine/extend", es.extend_tokens, MIN_IMAGES, es.extend_images, es.extends,
           f"T={es.extend_tokens} (a clip of {es.clip_real}), {es.extend_images} images",
           chunk(es.clip_real, es.prompt_real + es.clip_real, es.extend_images),
           **kernel(es.clip_real, es.prompt_real)),
  ]
  if k > 1:  # the burst's while loop is costed per iteration (`loop_steps`), its kernel's bytes K times
    progs.insert(1, Program(
        "engine/burst", B.burst_program, (graphdef, state, kv, _burst_input(mesh, es.seqs, k, es.pages_per_seq,
                                                                             window), key, stop, params),
        es.decode_steps / k, mesh, f"{es.running} of S={es.seqs} sequences x up to {k} tokens in one call",
        k * decode_flops, loop_steps=k, traffic=traffic, probe_layers=(3, 4),
        **{name: k * v for name, v in decode_kernel.items()}))
  return progs


def chunk_keys_read(n: int, start: int, page_size: int, rows_per_tile: int = KERNEL_QUERIES_PER_BLOCK) -> int:
  """Keys the kernel reads for a chunk of n tokens after `start` cached ones: each tile of `rows_per_tile` query
  rows reads the sequence's pages up to its last row (whole pages)."""
  ends = np.minimum(np.arange(rows_per_tile, n + rows_per_tile, rows_per_tile), n) + start
  return int((-(-ends // page_size) * page_size).sum())
