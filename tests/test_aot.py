"""The TPU path stays compiled: the tiny jobs' programs compile for a TPU topology with XLA's TPU compiler (libtpu,
no TPU), and what `zoomer_jax.aot` reads from them is right.

* every program of grpo_tiny and sft_tiny (scanned layers, flash attention) compiles for v5p:2x2x1 and fits;
* `python -m zoomer_jax compile` prints its table and a BENCH_JSON line with one entry per program;
* the cost probes' extrapolation equals the cost of the fully unrolled program at full depth;
* the HLO reader multiplies a scanned loop's collectives by the trip count, prices a reduce-scatter by the operand it
  reduces (in either form the compiler writes it) and counts splash kernels;
* a program compiled for TPU on this CPU host takes the TPU paths (`lax.platform_dependent`), not the CPU ones.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import tolerances as tol
from zoomer_jax.aot import programs as P
from zoomer_jax.aot.hlo import Hlo
from zoomer_jax.aot.report import (PROBE_OPTIONS, Cost, _cost_of, compile_job, splash_flops, splash_kernels,
                                   splash_seconds)
from zoomer_jax.aot.target import tpu_target
from zoomer_jax.config_loader import load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.stack import unrolled_loops

TOPOLOGY = "v5p:2x2x1"
TPU_OVERRIDES = ["impl.scan_layers=True", "impl.attention=flash", "mesh.ici=(1,-1,1)"]


@pytest.fixture(scope="module")
def target():
  return tpu_target(TOPOLOGY)


def _cfg(name, overrides=TPU_OVERRIDES):
  from zoomer_jax.config_loader import apply_overrides
  cfg = load(name)
  apply_overrides(cfg, overrides)
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo_tiny", "sft_tiny"])
def test_tiny_programs_compile_for_tpu_and_fit(target, name, measure):
  rep = compile_job(_cfg(name), target, probes=False, log=lambda *a: None)
  want = {"grpo_tiny": {"grpo/old_logp", "grpo/ref_logp", "grpo/update", "grpo/apply", "rollout/reshard",
                        "rollout/prefill", "rollout/extend", "rollout/decode", "engine/decode", "engine/burst",
                        "engine/prefill", "engine/extend"},
          "sft_tiny": {"sft/grad", "sft/apply"}}[name]
  assert {r.name for r in rep["results"]} == want
  for r in rep["results"]:
    measure(f"{r.name}_GiB", r.required / 2**30)
    assert r.fits and r.memory["total"] > 0 and r.error == ""
  grads = [r for r in rep["results"] if r.name in ("grpo/update", "sft/grad")]
  assert all("all-gather" in r.collectives for r in grads)  # FSDP gathers the weights


# grpo_tiny with head_dim 128 (hidden 512 over 4 heads), a shape the paged kernel tiles.
KERNEL_OVERRIDES = TPU_OVERRIDES + ["model.text.hidden_size=512", "model.text.mrope_section=(16,24,24)",
                                    "model.vision.out_hidden_size=512"]


def test_engine_shapes_take_the_continuous_engines_own_in_flight_count_and_pool(target):
  """`rollout.max_running` (0: `rollout.batch_size`) trajectories in flight split over the rollout mesh's
  data-parallel engines, and `rollout.pool_pages` sizes each engine's pool; a count that does not split is named."""
  from zoomer_jax.aot.engine_programs import engine_shapes
  from zoomer_jax.model.page_allocator import seq_bucket

  def shapes(*overrides):
    c = _cfg("grpo_tiny", TPU_OVERRIDES + list(overrides))
    return engine_shapes(c, ModelConfig.from_config_dict(c.model.to_dict()), P.meshes(c, list(target.devices))[1])

  cfg = _cfg("grpo_tiny")
  n, base = cfg.rollout.n, shapes()
  r = base.replicas
  assert r > 1 and base.running == max(cfg.rollout.batch_size // r, n)
  es = shapes(f"rollout.max_running={3 * n * r}", f"rollout.pool_pages={3 * base.pages_per_seq}")
  assert (es.running, es.seqs, es.num_pages) == (3 * n, seq_bucket(3 * n), 3 * base.pages_per_seq)
  assert es.pages_per_seq == base.pages_per_seq
  with pytest.raises(ValueError, match=f"rollout.max_running={n * r + 1} does not split over {r}"):
    shapes(f"rollout.max_running={n * r + 1}")


@pytest.mark.slow
def test_engine_decode_step_compiles_with_the_kernel_reading_the_pool_in_place(target, measure):
  """The continuous engine's one-token paged step at the config's sizes, through `compile_job` and its cost
  probes: it fits, runs the Pallas kernel once per layer on the whole pool seen flat (no per-layer copy of a
  layer's pages), and its HBM account is the weights plus the kernel's keys and values."""
  from zoomer_jax.aot import decode_bandwidth
  from zoomer_jax.aot.engine_programs import engine_shapes, replica_mesh
  from zoomer_jax.aot.report import compile_program, xla_hbm_bytes
  cfg = _cfg("grpo_tiny", KERNEL_OVERRIDES)
  mesh, rmesh = P.meshes(cfg, list(target.devices))
  prog = next(p for p in P.job_programs(cfg, mesh, rollout_mesh=rmesh) if p.name == "engine/decode")
  mc = ModelConfig.from_config_dict(cfg.model.to_dict())
  es = engine_shapes(cfg, mc, rmesh)
  assert prog.mesh.devices.size == rmesh.devices.size // rmesh.shape["data"] == replica_mesh(rmesh).devices.size
  assert es.running == max(cfg.rollout.batch_size // rmesh.shape["data"], cfg.rollout.n)
  r, compiled = compile_program(prog, xla_hbm_bytes(target), 0.1)
  assert r.fits and r.error == ""
  hlo = Hlo(compiled.as_text())
  (name, _, shapes, count), = hlo.kernels("ragged_paged_attention_kernel")
  assert count == mc.text.num_hidden_layers and shapes[0][1] == (es.seqs, mc.text.num_attention_heads, 128)
  layer_pages = f"[{es.num_pages},{es.page_size},{2 * mc.text.num_key_value_heads},128]"
  assert layer_pages not in compiled.as_text()  # no buffer of one layer's pages: nothing copies a layer out
  rep = compile_job(cfg, target, only=("engine/decode",), log=lambda *a: None)
  d = decode_bandwidth(rep)
  measure("decode_fraction_mean", d["mean"]["fraction"])
  assert d["mean"]["kv"] == r.traffic["kv_mean"] > 0 and d["weights"] > 0
  assert 0 < d["mean"]["fraction"] < d["mean"]["xla_bytes_fraction"]


@pytest.mark.slow
def test_engine_burst_compiles_and_costs_k_decode_steps(target, measure):
  """The decode burst (K one-token steps in a device while loop) compiles for TPU with the paged kernel once per
  layer inside its loop body, and its cost probes, taken per iteration, give what one decode step costs: the RL
  step counts its decode in bursts (per step: tokens / sequences / K), the one-token step 0 times."""
  from zoomer_jax.aot import decode_bandwidth
  from zoomer_jax.aot.engine_programs import engine_shapes
  from zoomer_jax.aot.report import compile_program, xla_hbm_bytes
  cfg = _cfg("grpo_tiny", KERNEL_OVERRIDES)
  k = cfg.rollout.decode_burst
  mesh, rmesh = P.meshes(cfg, list(target.devices))
  progs = {p.name: p for p in P.job_programs(cfg, mesh, rollout_mesh=rmesh)}
  burst, step = progs["engine/burst"], progs["engine/decode"]
  assert k > 1 and burst.loop_steps == k and step.per_step == 0
  es = engine_shapes(cfg, ModelConfig.from_config_dict(cfg.model.to_dict()), rmesh)
  assert burst.per_step * k == pytest.approx(es.decode_steps)
  assert burst.kernel_bytes == pytest.approx(k * step.kernel_bytes) and burst.model_flops == pytest.approx(
      k * step.model_flops)
  r, compiled = compile_program(burst, xla_hbm_bytes(target), 0.1)
  assert r.fits and r.error == ""
  hlo = Hlo(compiled.as_text())
  assert hlo.count_ops("while") >= 1
  (_, _, _, count), = hlo.kernels("ragged_paged_attention_kernel")
  assert count == k * cfg.model.text.num_hidden_layers  # the loop body's kernels, times the loop's bound
  rep = compile_job(cfg, target, only=("engine/decode", "engine/burst"), log=lambda *a: None)
  per_step = decode_bandwidth(rep, "engine/decode")
  per_iteration = decode_bandwidth(rep, "engine/burst")
  ratio = per_iteration["xla_s"] / per_step["xla_s"]
  measure("burst_iteration_over_step_xla_s", ratio)
  assert per_iteration["steps_per_call"] == k and per_iteration["weights"] == per_step["weights"]
  assert 0.5 < ratio < 2.0  # the same forward, the loop's bookkeeping aside


@pytest.mark.slow
def test_compile_command_prints_table_and_bench_json():
  cmd = [sys.executable, "-m", "zoomer_jax", "compile", "--config=sft_tiny", f"--topology={TOPOLOGY}", "--no-probes",
         *[f"--config.{o}" for o in TPU_OVERRIDES]]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sft/grad" in out.stdout and "fits" in out.stdout
  line = next(l for l in out.stdout.splitlines() if l.startswith("BENCH_JSON "))
  rec = json.loads(line[len("BENCH_JSON "):])
  assert rec["topology"] == TOPOLOGY and rec["chips"] == 4
  names = [p["name"] for p in rec["programs"]]
  assert names == ["sft/grad", "sft/apply"]
  for p in rec["programs"]:
    assert {"name", "fits", "bytes_per_chip", "hbm_bytes", "flops", "collective_bytes", "estimated_s"} <= set(p)
    assert p["fits"] and 0 < p["bytes_per_chip"] < p["hbm_bytes"]
    assert 0 < p["lower_s"] < p["compile_s"]  # tracing and lowering are part of the program's compile time


@pytest.mark.slow
def test_probe_extrapolation_equals_the_unrolled_program(target, measure):
  """sft_tiny's gradient step (2 decoder layers, 2 windowed + 2 full vision blocks): the linear extrapolation from
  the 1/2-layer probes reproduces XLA's cost of the whole program compiled unrolled."""
  cfg = _cfg("sft_tiny", ["impl.scan_layers=False", "mesh.ici=(1,-1,1)"])
  mesh, _ = P.meshes(cfg, list(target.devices))
  full = ModelConfig.from_config_dict(cfg.model.to_dict())
  assert P.block_counts(full) == (2, 2, 2)

  def grad_cost(mc):
    with unrolled_loops():
      prog = P.job_programs(cfg, mesh, model_cfg=mc, token_chunk=None)[0]
      assert prog.name == "sft/grad"
      return _cost_of(prog.lower().compile(compiler_options=PROBE_OPTIONS))

  probes = {d: grad_cost(P.reduced(full, *d)) for d in [(1, 1, 0), (2, 1, 0), (1, 2, 0), (1, 0, 1)]}
  ct = probes[(2, 1, 0)] - probes[(1, 1, 0)]
  cw = probes[(1, 2, 0)] - probes[(1, 1, 0)]
  c0 = probes[(1, 1, 0)] - ct - cw
  cf = probes[(1, 0, 1)] - c0 - ct
  est = c0 + ct * 2 + cw * 2 + cf * 2
  whole = grad_cost(full)
  for field in ("flops", "bytes"):
    rel = abs(getattr(est, field) / getattr(whole, field) - 1)
    measure(f"{field}_rel", rel)
    assert rel <= tol.AOT_PROBE_REL


def test_hlo_counts_loop_bodies_by_trip_count(target):
  """A scan of 6 steps, each all-gathering a [128, 256] bf16 layer over 4 chips, moves 6 x 3/4 of 64 KiB per chip."""
  mesh = Mesh(np.asarray(target.devices).reshape(4), ("x",))
  w = jax.ShapeDtypeStruct((6, 128, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, "x")))
  x = jax.ShapeDtypeStruct((8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))

  def f(w, x):
    def step(x, wl):
      wl = jax.lax.with_sharding_constraint(wl, NamedSharding(mesh, PartitionSpec()))
      return jnp.tanh(x @ wl[:, :128]), None
    return jax.lax.scan(step, x, w)[0]

  hlo = Hlo(jax.jit(f).lower(w, x).compile().as_text())
  gathers = hlo.collectives(4)["all-gather"]
  assert gathers["count"] == 6
  assert gathers["moved"] == pytest.approx(6 * 0.75 * 128 * 256 * 2)
  # By shape: the same op, named by its group and gathered type.
  ops = {k: v for k, v in hlo.collectives(4, by_shape=True).items() if k.startswith("all-gather")}
  (name, op), = ops.items()
  assert name.startswith("all-gather g4 bf16[") and name.endswith("128,256]") and op == gathers, ops


@pytest.mark.parametrize("topology", [TOPOLOGY, "v6e:2x2"])
def test_a_reduce_scatter_moves_three_quarters_of_its_operand_over_four_chips(topology):
  """`psum_scatter` of a [2048, 1024] bf16 operand over 4 chips: each chip sends 3/4 of it (3 MiB), whether the
  compiler emits a reduce-scatter (v5p) or an all-reduce-scatter fusion around an all-reduce of the (padded) operand
  (v6e); pricing the fusion as the all-reduce inside it would double that, and the bare op's shard-sized result
  would quarter it."""
  target = tpu_target(topology)
  mesh = Mesh(np.asarray(target.devices).reshape(4), ("x",))
  g = jax.ShapeDtypeStruct((4 * 2048, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("x")))

  def rs(x):
    return jax.lax.psum_scatter(x * 2, "x", scatter_dimension=0, tiled=True)

  f = jax.shard_map(rs, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x"))
  found = Hlo(jax.jit(f).lower(g).compile().as_text()).collectives(4)
  operand = 2048 * 1024 * 2
  assert set(found) <= {"reduce-scatter", "collective-permute"}, found
  assert found["reduce-scatter"]["count"] == 1
  # v6e pads the operand's rows to a multiple of its tiles per chip (and permutes the padding's rows back).
  assert 0.75 * operand <= found["reduce-scatter"]["moved"] <= 0.75 * operand * 1.05, found


def test_an_all_reduce_scatter_fusion_is_counted_as_the_reduce_scatter_it_runs():
  """The fusion form as the v6e compiler writes it, in a loop of 3 trips: 3 reduce-scatters of the 8 x 16 f32
  operand over the 4 chips the all-reduce inside names, and no all-reduce."""
  text = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %x, f32[] %y)
}

%all-reduce-scatter.2 (input: f32[8,16]) -> f32[2,16] {
  %input = f32[8,16]{1,0} parameter(0)
  %all-reduce.1 = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %input), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.1 = f32[2,16]{1,0} dynamic-slice(f32[8,16]{1,0} %all-reduce.1, s32[] %o, s32[] %z), dynamic_slice_sizes={2,16}
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %fusion = f32[2,16]{1,0} fusion(f32[8,16]{1,0} %v), kind=kCustom, calls=%all-reduce-scatter.2, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
  ROOT %t = (s32[], f32[8,16]) tuple(s32[] %i, f32[8,16]{1,0} %v)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[8,16]) -> (s32[], f32[8,16]) {
  %a = f32[8,16]{1,0} parameter(0)
  ROOT %w = (s32[], f32[8,16]) while((s32[], f32[8,16]) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
}
"""
  found = Hlo(text).collectives(4)
  assert set(found) == {"reduce-scatter"}, found
  assert found["reduce-scatter"]["count"] == 3
  assert found["reduce-scatter"]["moved"] == pytest.approx(3 * 0.75 * 8 * 16 * 4)
  (name,), = [list(Hlo(text).collectives(4, by_shape=True))]
  assert name == "reduce-scatter g4 f32[2,16]"


def test_custom_calls_in_a_loop_count_per_trip_or_once_as_xlas_cost_analysis_does():
  """A while loop of 16 trips whose body holds a ConcatBitcast: 16 run; XLA's cost analysis prices the body (and
  its -1 s ConcatBitcast) once, so the give-back for a probe costed per iteration counts it once."""
  text = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %c = f32[4]{0} custom-call(f32[4]{0} %x), custom_call_target="ConcatBitcast"
  ROOT %t = (s32[], f32[4]) tuple(s32[] %i, f32[4]{0} %c)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[4]) -> (s32[], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %c0 = f32[4]{0} custom-call(f32[4]{0} %a), custom_call_target="ConcatBitcast"
  ROOT %w = (s32[], f32[4]) while((s32[], f32[4]) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"16"}}
}
"""
  hlo = Hlo(text)
  assert hlo.custom_calls("ConcatBitcast") == 1 + 16
  assert hlo.custom_calls("ConcatBitcast", trips=False) == 1 + 1


def test_splash_kernels_are_counted(target):
  from zoomer_jax.model import attention
  mesh = Mesh(np.asarray(target.devices).reshape(4), ("data",))
  q = jax.ShapeDtypeStruct((4, 1024, 8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))
  k = jax.ShapeDtypeStruct((4, 1024, 2, 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))
  m = jax.ShapeDtypeStruct((4, 1024), bool, sharding=NamedSharding(mesh, PartitionSpec("data")))
  rules = (("activation_batch", "data"),)

  def loss(q, k, v, m):
    return attention.splash(q, k, v, m, rules=rules).astype(jnp.float32).sum()

  with jax.set_mesh(mesh):
    fwd = Hlo(jax.jit(lambda *a: attention.splash(*a, rules=rules)).lower(q, k, k, m).compile().as_text())
    bwd = Hlo(jax.jit(jax.grad(loss)).lower(q, k, k, m).compile().as_text())
  pairs = 512 * 512 * 3  # two 512-token tiles: the block-causal pairs are 3 of the 4 blocks
  assert splash_flops(fwd) == 4 * 8 * 128 * pairs  # one row per chip, 8 heads
  assert splash_flops(bwd) == (4 + 14) * 8 * 128 * pairs  # forward (residuals) + dq and dkv kernels
  # The account's hardware FLOPs of a blockwise attention backward are the kernels' own ratio.
  from zoomer_jax.cost.flops import FLASH_BACKWARD_OVER_FORWARD
  assert (splash_flops(bwd) - splash_flops(fwd)) / splash_flops(fwd) == FLASH_BACKWARD_OVER_FORWARD
  # Walks of other kinds first (as `_cost_of` does) must not leave counts that a later walk reads: a memo keyed
  # by the visitor's id once served the kernels' walk a dead visitor's (empty) counts.
  for _ in range(3):
    bwd.custom_calls("ConcatBitcast")
    bwd.collectives(4)
    assert splash_flops(bwd) == (4 + 14) * 8 * 128 * pairs
  # The model's tile (`impl.attention_block`) reaches the kernel, and each kernel is counted and timed at it: four
  # 256-token tiles visit 10 block-causal pairs.
  with jax.set_mesh(mesh):
    small = Hlo(jax.jit(lambda *a: attention.splash(*a, rules=rules, block=256)).lower(q, k, k, m).compile()
                .as_text())
  assert list(splash_kernels(small, 256)) == [(4 * 8 * 128 * 256 * 256 * 10, (256, 128))]
  assert splash_seconds(small, 256, lambda tile, h: {(256, 128): 2.0}[tile, h]) == 4 * 8 * 128 * 256 * 256 * 10 / 2.0


@pytest.mark.parametrize("t,blocks", [(2048, (7 + 2) / 4), (1536, 3 + 1)])
def test_context_parallel_splash_kernels_are_counted(target, t, blocks):
  """Queries split four ways over the sequence (`activation_length`). 2048 tokens split into 8 chunks of 256
  (`balanced_order`): each chip's two chunks read 7 earlier chunks and their own two diagonal tiles, in 256-token
  tiles. 1536 tokens do not (chunks of 192): 384 queries per chip against 1536 keys, counted at the last shard, which
  reads its 3 earlier key tiles and its diagonal one (`blocks` in units of 512 x 512 pairs / (t / 2048)^2)."""
  from zoomer_jax.model import attention
  mesh = Mesh(np.asarray(target.devices).reshape(1, 4), ("fsdp", "tensor"))
  q = jax.ShapeDtypeStruct((1, t, 8, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, t, 2, 128), jnp.bfloat16)
  m = jax.ShapeDtypeStruct((1, t), bool)
  rules = (("activation_batch", "fsdp"), ("activation_length", "tensor"), ("activation_kv_heads", None))

  def loss(q, k, v, m):
    return attention.splash(q, k, v, m, rules=rules).astype(jnp.float32).sum()

  with jax.set_mesh(mesh):
    fwd = Hlo(jax.jit(lambda *a: attention.splash(*a, rules=rules)).lower(q, k, k, m).compile().as_text())
    bwd = Hlo(jax.jit(jax.grad(loss)).lower(q, k, k, m).compile().as_text())
  pairs = 512 * 512 * blocks * (t / 2048) ** 2
  assert splash_flops(fwd) == 4 * 8 * 128 * pairs
  assert splash_flops(bwd) == (4 + 14) * 8 * 128 * pairs


def test_programs_compiled_for_tpu_take_the_tpu_paths(target):
  """Tied logits of a decode step: the CPU path keeps the table as the GEMM's row operand behind an optimization
  barrier; the TPU program (compiled here, on a CPU host) must not, and the CPU program must."""
  from zoomer_jax.model.qwen25vl import Qwen25VL
  import hf_oracle as O
  model = Qwen25VL(ModelConfig.from_hf_dict(O.tiny_hf_config(tie=True)), dtype="float32", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  h = jnp.zeros((8, 1, model.config.text.hidden_size), jnp.float32)
  f = jax.jit(lambda s, h: nnx.merge(graphdef, s).logits(h))
  cpu_text = f.lower(state, h).as_text()
  mesh = Mesh(np.asarray(target.devices[:1]).reshape(1), ("x",))
  rep = NamedSharding(mesh, PartitionSpec())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), (state, h))
  tpu_text = f.lower(*abstract).compile().as_text()
  assert "optimization_barrier" in cpu_text
  assert "opt-barrier" not in tpu_text and "optimization_barrier" not in tpu_text


def test_cost_arithmetic():
  a, b = Cost(1, 2, 3, 4), Cost(10, 20, 30, 40)
  assert b - a == Cost(9, 18, 27, 36) and a * 2 == Cost(2, 4, 6, 8) and a + b == Cost(11, 22, 33, 44)


@pytest.mark.slow
def test_a_probe_in_the_configs_token_blocks_costs_what_one_block_does(target, measure):
  """The fallback of a probe whose log-probs in one token block outgrow HBM: the same program in the config's
  token blocks (unrolled) gives XLA the same FLOPs (the blocks partition the tokens)."""
  cfg = _cfg("sft_tiny", ["impl.scan_layers=False", "mesh.ici=(1,-1,1)", "train.logprob_token_chunk=32"])
  mesh, _ = P.meshes(cfg, list(target.devices))
  mc = P.reduced(ModelConfig.from_config_dict(cfg.model.to_dict()), 1, 1, 0)

  def grad_cost(token_chunk):
    with unrolled_loops():
      prog = P.job_programs(cfg, mesh, model_cfg=mc, token_chunk=token_chunk)[0]
      return _cost_of(prog.lower().compile(compiler_options=PROBE_OPTIONS))

  one, blocks = grad_cost(None), grad_cost("config")
  rel = abs(blocks.flops / one.flops - 1)
  measure("flops_rel", rel)
  assert rel <= tol.AOT_PROBE_REL


@pytest.mark.parametrize("config,topology", [("grpo_7b_v5p64", "v5p:4x4x2"), ("grpo_7b_v6e64", "v6e:8x8")])
def test_pod_rollout_replicas_and_training_rows_each_lie_on_one_host(config, topology):
  """On the 7B configs' slices every rollout replica's chips are one host's (so each runs its own engine there,
  `agent/replicas.py`), and every training row's chips are exactly its home replica's (so it is built from images
  that host decoded, `train/placement.py`). On v6e-64 the torus order alone would run each tensor-4 group across
  two hosts' 2 x 2 blocks, and on v5p-64 (a replica per chip) visit the hosts 0, 4, 0, 4, 2, 6, ... along the data
  axis (`parallel.mesh._host_local`)."""
  from zoomer_jax.agent.replicas import replica_meshes, spanning_replica
  from zoomer_jax.train.placement import home_replicas, row_devices
  cfg = load(config, [])
  mesh, rollout = P.meshes(cfg, list(tpu_target(topology).devices))
  assert spanning_replica(rollout) is None
  rows = cfg.actor.ppo_micro_batch_size
  homes = home_replicas(mesh, rollout, rows)
  chips = [set(sub.devices.flat) for sub in replica_meshes(rollout)]
  assert sorted(homes) == list(range(len(chips)))  # a row per replica
  for row, home in zip(row_devices(mesh, rows), homes):
    assert row == chips[home] and len({d.process_index for d in row}) == 1
  # Each host's replicas are neighbours on the data axis (where a busy replica's helpers and a row's fallback
  # replica are looked for): the hosts in replica order, each once.
  hosts = [next(iter(c)).process_index for c in chips]
  runs = [h for i, h in enumerate(hosts) if i == 0 or h != hosts[i - 1]]
  assert len(runs) == len(set(hosts)), hosts


@pytest.mark.slow
def test_the_weight_reshard_compiles_when_the_meshes_order_the_chips_differently(measure):
  """On a two-host v5p slice the rollout mesh of single-chip replicas lists the chips host by host and the
  training mesh in torus order (as on v5p-64): `rollout/reshard` is compiled as `device_put`'s reshard, its input
  relabelled onto the rollout mesh's order."""
  cfg = _cfg("grpo_tiny", TPU_OVERRIDES + ["rollout.mesh.ici=(-1,1,1)"])
  target = tpu_target("v5p:2x2x2")
  mesh, rollout = P.meshes(cfg, list(target.devices))
  assert list(mesh.devices.flat) != list(rollout.devices.flat)  # the case under test
  rep = compile_job(cfg, target, probes=False, only=("rollout/reshard",), log=lambda *a: None)
  (r,) = rep["results"]
  measure("reshard_GiB", r.required / 2**30)
  assert r.error == "" and r.fits and "all-gather" in r.collectives  # each replica gathers its whole copy


def test_vision_kernel_runs_each_chips_piece_and_is_counted_by_its_grid(target):
  """With flash attention the vision tower's windows and frames go through the splash kernel on TPU: two rows
  of eight 16 x 32 frames, each row's frames in two pieces over a (1, 2, 2) mesh (context-parallel rules). Every
  kernel attends one chip's piece (2048 rows, both heads, head_dim padded to 128 lanes), not the batch; in tiles
  of 256 the windows' band (+-63 rows) visits 3 key tiles per query tile and the frames' (+-511) 5 of the
  piece's 8, and the report counts them so (a causal count would take 36 of 64 tiles). The tower's gradient
  compiles with no kernel at "dot_product"."""
  import hf_oracle as O
  from zoomer_jax.checkpoint.orbax_io import state_shardings
  from zoomer_jax.model.options import ModelOptions
  from zoomer_jax.model.qwen25vl import Qwen25VL, vision_input
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config())
  v = cfg.vision
  mesh = Mesh(np.asarray(target.devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
  rules = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)
  grids = [np.asarray([[8, 16, 32]])] * 2
  vin = vision_input(cfg, [np.zeros((4096, v.patch_dim), np.float32)] * 2, grids, pieces=2)
  assert vin.layout.perm.shape == (2, 2, 2048)
  rep = NamedSharding(mesh, PartitionSpec())
  hlos = {}
  for kind in ("flash", "dot_product"):
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype="bfloat16", rngs=nnx.Rngs(0),
                                             options=ModelOptions(rules=rules, attention=kind)))
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    images = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=rep), vin)

    def loss(state, vin):
      return jnp.sum(nnx.merge(graphdef, state).encode_vision(vin).astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
      hlos[kind] = Hlo(jax.jit(jax.grad(loss)).lower(params, images).compile().as_text())
  assert not hlos["dot_product"].kernels("splash")
  kernels = hlos["flash"].kernels("splash")
  heads, tiles = v.num_heads, 2048 // 256
  want, steps_seen = 0, set()
  for name, operands, _, count in kernels:
    q = [d for dtype, d in operands if dtype == "bf16"][0]
    assert q == (heads, 2048, 128), (name, q)  # one chip's piece, every head, 16 lanes padded to 128
    grid = [d for dtype, d in operands if dtype[0] == "s" and len(d) == 3][0]
    steps = grid[1] if "dkv" in name else grid[2]
    assert grid == ((1, steps, tiles) if "dkv" in name else (1, tiles, steps)), (name, grid)
    steps_seen.add(steps)
    if "dkv" not in name:
      want += count * (14 if "dq" in name else 4) * heads * 128 * 256 * 256 * tiles * steps
  assert steps_seen == {3, 5}
  assert splash_flops(hlos["flash"]) == want
