"""The analytic step account (zoomer_jax.cost) against independent counts: the real NNX model's parameters,
XLA's FLOP count of compiled forwards, the real sharding's per-device bytes, the published 7B figures, and
hand arithmetic; the v5p-64 / v6e-64 configs fit their chips per the account."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerances as tol
from zoomer_jax.checkpoint.orbax_io import state_shardings
from zoomer_jax.config_loader import load
from zoomer_jax.cost import (Rollout, Trainer, Trajectory, account, as_implemented, job_from_config,
                             param_counts, parse_accelerator, resolve_mesh)
from zoomer_jax.cost import flops as F
from zoomer_jax.cost import memory as M
from zoomer_jax.cost.params import param_table, params_per_chip
from zoomer_jax.model.config import ModelConfig, TextConfig, VisionConfig
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.model.vision_layout import layout_sizes, padded_layout, vision_layout
from zoomer_jax.parallel.mesh import make_mesh


def random_config(rng, tie: bool, *, big: bool = False) -> ModelConfig:
  """A random small Qwen2.5-VL config; `big` makes matmuls dominate the element-wise work (FLOP tests)."""
  kv = int(rng.choice([1, 2]))
  heads = kv * int(rng.choice([1, 2, 3]))
  head_dim = 64 if big else int(rng.choice([16, 32]))
  hidden = heads * head_dim
  quarter = head_dim // 2
  t_ = quarter // 4
  mrope = (t_, (quarter - t_) // 2, quarter - t_ - (quarter - t_) // 2)
  text = TextConfig(vocab_size=int(rng.integers(300, 900)), hidden_size=hidden,
                    num_hidden_layers=int(rng.integers(1, 4)), num_attention_heads=heads, num_key_value_heads=kv,
                    intermediate_size=int(rng.integers(2, 5)) * hidden, mrope_section=mrope, tie_word_embeddings=tie)
  v_heads = int(rng.choice([2, 4]))
  v_hidden = v_heads * (64 if big else int(rng.choice([8, 16])))
  depth = int(rng.integers(2, 5))
  vision = VisionConfig(depth=depth, hidden_size=v_hidden, num_heads=v_heads,
                        intermediate_size=int(rng.integers(2, 4)) * v_hidden, out_hidden_size=hidden,
                        fullatt_block_indexes=tuple(sorted(rng.choice(depth, size=max(1, depth // 2), replace=False)
                                                           .tolist())))
  return ModelConfig(text=text, vision=vision, image_token_id=text.vocab_size - 4,
                     video_token_id=text.vocab_size - 3, vision_start_token_id=text.vocab_size - 2,
                     vision_end_token_id=text.vocab_size - 1)


def real_counts(model) -> dict[str, int]:
  """Sizes of every nnx.Param leaf, grouped by top-level module (visual / model / lm_head)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    out[str(path[0])] = out.get(str(path[0]), 0) + int(np.prod(var.get_value().shape))
  return out


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("trial", range(3))
def test_param_counts_equal_the_nnx_model(rng, tie, trial):
  cfg = random_config(rng, tie)
  got = real_counts(Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(trial)))
  p = param_counts(cfg)
  assert p.vision == got["visual"]
  assert p.text_embed + p.text_layers + p.text_norm == got["model"]
  assert p.lm_head == got.get("lm_head", 0)
  assert (p.lm_head == 0) == tie
  assert p.total == sum(got.values())


def test_param_counts_of_the_released_models():
  # transformers' meta-device count of the hub configs.
  p7 = param_counts(ModelConfig.from_config_dict(load("qwen25vl_7b").model.to_dict()))
  assert (p7.total, p7.text, p7.vision) == (8_292_166_656, 7_615_616_512, 676_550_144)
  p3 = param_counts(ModelConfig.from_config_dict(load("qwen25vl_3b").model.to_dict()))
  assert p3.total == 3_754_622_976 and p3.lm_head == 0


# ------------------------------------------------------------------ FLOPs vs XLA
def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("tie", [False, True])
def test_text_forward_flops_match_xla(rng, measure, tie):
  cfg = random_config(rng, tie, big=True)
  model = Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  b, t = 2, int(rng.integers(100, 300))
  ids = jnp.zeros((b, t), jnp.int32)
  pos = jnp.zeros((3, b, t), jnp.int32)
  mask = jnp.ones((b, t), bool)
  xla = _xla_flops(lambda s, i, p, m: nnx.merge(graphdef, s).forward(i, p, m)[0], state, ids, pos, mask)
  # Our dense attention evaluates every (query, key) pair: the causal=False count.
  ours = b * sum(F.text_forward_flops(cfg.text, t, causal=False).values())
  measure("xla_over_ours", xla / ours)
  assert abs(xla / ours - 1) <= tol.COST_FLOPS_REL
  causal = b * sum(F.text_forward_flops(cfg.text, t, causal=True).values())
  assert causal < ours  # the model-FLOP count of the same forward is smaller (half the score pairs)


def test_vision_forward_flops_match_xla(rng, measure):
  cfg = random_config(rng, False, big=True)
  v = cfg.vision
  model = Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  # Uneven grids: edge windows shorter than 8x8, frames of different sizes, a two-frame video.
  grids = [(1, 10, 12), (2, 8, 8), (1, 16, 30), (1, 6, 22)]
  layout = padded_layout(np.asarray(grids), v, layout_sizes([np.asarray(grids)], v))  # no padding: exact sizes
  pixels = jnp.zeros((sum(math.prod(g) for g in grids), v.patch_dim))
  one_row = lambda a: a[None]  # the tower takes a batch of rows, each with its images
  xla = _xla_flops(lambda s, px, lay: nnx.merge(graphdef, s).visual(px, lay), state, pixels[None],
                   jax.tree.map(one_row, layout))
  padded = F.vision_forward_flops(v, grids, padded=True).total
  exact = F.vision_forward_flops(v, grids, padded=False).total
  measure("xla_over_ours", xla / padded)
  assert abs(xla / padded - 1) <= tol.COST_FLOPS_REL
  assert exact < padded * (1 - tol.COST_FLOPS_REL)  # the padding is visible, so the check can tell them apart


def test_vision_segments_equal_the_model_layout(rng):
  v = VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32)
  for _ in range(20):
    grids = [(int(rng.integers(1, 3)), 2 * int(rng.integers(1, 12)), 2 * int(rng.integers(1, 12)))
             for _ in range(int(rng.integers(1, 4)))]
    layout = vision_layout(np.asarray(grids), v)
    windows, frames = F.vision_segments(v, grids)
    assert windows == layout.windows.valid.sum(1).tolist()
    assert frames == layout.frames.valid.sum(1).tolist()


def test_attention_pairs_by_enumeration(rng):
  for _ in range(20):
    k = int(rng.integers(1, 60))
    q = int(rng.integers(1, k + 1))
    mask = np.tril(np.ones((k, k), bool))[k - q:]  # the last q rows of a causal mask
    assert F.attention_pairs(q, k, causal=True) == mask.sum()
    assert F.attention_pairs(q, k, causal=False) == q * k


def test_7b_text_flops_per_token_are_twice_the_matmul_weights():
  cfg = ModelConfig.from_config_dict(load("qwen25vl_7b").model.to_dict())
  t, p = cfg.text, param_counts(cfg)
  biases = t.num_hidden_layers * (t.hidden_size + 2 * t.num_key_value_heads * t.head_dim)
  norms = (2 * t.num_hidden_layers + 1) * t.hidden_size
  assert sum(F.text_matmul_flops_per_token(t).values()) == 2 * (p.text_non_embedding - biases - norms)
  assert F.lm_head_flops_per_token(t) == 2 * p.lm_head


# ------------------------------------------------------------------ memory
def test_param_bytes_per_chip_equal_the_real_sharding(rng):
  """The account shards its parameter table with the trainer's rules; the real sharded arrays agree exactly."""
  cfg = random_config(rng, False)
  _, state = nnx.split(Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(0)))
  dev0 = jax.devices()[0]
  for ici in [(1, 4, 2), (1, 1, 8)]:
    placed = jax.device_put(state, state_shardings(state, make_mesh(ici)))
    on_dev0 = sum(s.data.size for x in jax.tree.leaves(placed) for s in x.addressable_shards if s.device == dev0)
    assert params_per_chip(cfg, ici[1], ici[2]) == on_dev0, ici
    job = job_from_config(_grpo_with(cfg, ici), accelerator="v6e-8")
    assert account(job).memory["update"].items["policy params"] == 2 * on_dev0  # bf16


def test_7b_per_chip_params_by_hand():
  cfg = ModelConfig.from_config_dict(load("qwen25vl_7b").model.to_dict())
  total = param_counts(cfg).total
  assert params_per_chip(cfg, 32, 1) == pytest.approx(total / 32, rel=0.005)
  assert params_per_chip(cfg, 16, 4) == pytest.approx(total / 64, rel=0.005)
  # fsdp 8 x tensor 8: 28 query heads, 4 kv heads and the vision MLP's 3420 do not divide by 8, so those
  # dimensions stay whole (replicated over tensor); everything else splits 64 ways.
  D, V, I, L = 3584, 152064, 18944, 28
  d, vi, vd = 1280, 3420, 32
  text = (2 * V * D + 3 * D * I * L) / 64 + (2 * D * L + D) / 8  # embeddings, head, MLP; norms (embed only)
  text += L * (2 * D * D / 8 + 28 * 128 + 2 * (D * 512 / 8 + 512))  # q, o (fsdp only); q bias; k, v and biases
  vision = 1176 * d / 8 + vd * (2 * d / 8 + d * 3 * d / 64 + 3 * d / 8 + d * d / 64 + d / 8)  # embed, norms, attn
  vision += vd * (3 * d * vi / 8 + 2 * vi + d / 8)  # MLP kernels (embed only), gate/up biases whole, down bias
  vision += d / 8 + 4 * d * 4 * d / 64 + 4 * d / 8 + 4 * d * D / 64 + D / 8  # merger
  assert params_per_chip(cfg, 8, 8) == pytest.approx(text + vision)
  assert params_per_chip(cfg, 8, 8) > 1.3 * total / 64


def _grpo_with(model_cfg: ModelConfig, ici):
  cfg = load("grpo_7b")
  d = model_cfg.to_config_dict()
  cfg.model.text.update(d["text"])
  cfg.model.vision.update(d["vision"])
  cfg.mesh.ici = ici
  cfg.actor.ppo_micro_batch_size = ici[0] * ici[1]
  return cfg


def _job(name="grpo_7b", accelerator="v5p-64", **sets):
  cfg = load(name, [f"{k}={v}" for k, v in sets.items()])
  return job_from_config(cfg, accelerator)


def test_memory_items_by_hand():
  job = _job(**{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32})
  acc = account(job, trainer=Trainer(attention="flash"))
  upd = acc.memory["update"].items
  n = 8_292_166_656  # a few bias vectors stay replicated: within 0.5% of an even split
  assert upd["policy params"] == pytest.approx(n * 2 / 32, rel=0.005)
  assert upd["Adam moments (m, v)"] == pytest.approx(n * 8 / 32, rel=0.005)
  assert upd["reference params (bf16)"] == upd["policy params"]
  assert upd["text activations kept (remat=full)"] == 28 * 32768 * 3584 * 2  # each layer's input, bf16
  # The head walks the row's tokens in blocks of actor.logprob_token_chunk (4096): one block's fp32 logits live.
  assert upd["logits (chunk 16384, 4096 tokens)"] == 3 * 4096 * 16384 * 4
  assert M.kv_bytes_per_token(job.model.text) == 2 * 28 * 4 * 128 * 2
  whole = account(_job(**{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32, "actor.logprob_token_chunk": 0}))
  assert whole.memory["update"].items["logits (chunk 16384)"] == 3 * 32768 * 16384 * 4
  full = account(_job(**{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32, "actor.logprob_vocab_chunk": 0,
                         "actor.logprob_token_chunk": 0}))
  assert full.memory["update"].items["logits (full vocab)"] == 3 * 32768 * 152064 * 4


def test_memory_scales_with_the_mesh():
  # Twice the FSDP degree halves the per-chip state; the same rows per chip keep the activations.
  a16 = account(_job(accelerator="v5p-32", **{"mesh.ici": (1, 16, 1), "actor.ppo_micro_batch_size": 16}))
  a32 = account(_job(accelerator="v5p-64", **{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32}))
  for item in ("policy params", "Adam moments (m, v)", "reference params (bf16)", "gradient accumulator"):
    assert a16.memory["update"].items[item] == pytest.approx(2 * a32.memory["update"].items[item], rel=0.005)
  for item in ("text activations kept (remat=full)", "vision activations kept (remat=full)",
               "logits (chunk 16384, 4096 tokens)"):
    assert a16.memory["update"].items[item] == a32.memory["update"].items[item]
  # Two rows per chip double the activations.
  a2 = account(_job(accelerator="v5p-64", **{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 64}))
  assert a2.memory["update"].items["text activations kept (remat=full)"] == pytest.approx(
      2 * a32.memory["update"].items["text activations kept (remat=full)"])
  # Tensor parallelism splits the MLP / heads part of a layer's working set but not the residual stream.
  t4 = account(_job(accelerator="v5p-64", **{"mesh.ici": (1, 8, 4), "actor.ppo_micro_batch_size": 8}))
  w1 = a32.memory["update"].items["text layer working set (backward)"]
  w4 = t4.memory["update"].items["text layer working set (backward)"]
  t = a32.job.model.text
  resid = 2 * 32768 * 4 * t.hidden_size * 2
  assert w4 - resid == pytest.approx((w1 - resid) / 4)
  # Remat: none keeps every layer's intermediates, full only each layer's input.
  none = account(_job(**{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32, "actor.remat": "none"}))
  per_token = 4 * 3584 + 2 * 3584 + 2 * 512 + 3 * 18944
  assert none.memory["update"].items["text activations kept (remat=none)"] == 28 * 32768 * per_token * 2
  # The KV cache of the rollout is spread over the chips: twice the chips, half the rows each.
  r16 = a16.memory["rollout"].items
  r32 = a32.memory["rollout"].items
  kv16 = next(v for k, v in r16.items() if k.startswith("KV cache"))
  kv32 = next(v for k, v in r32.items() if k.startswith("KV cache"))
  assert kv16 == pytest.approx(2 * kv32)


def test_dense_attention_and_no_vision_remat_cost_what_they_should():
  job = _job(**{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32})
  dense = account(job, trainer=Trainer(attention="dense")).memory["update"].items
  # fp32 scores + fp32 score gradient + bf16 probabilities of one layer, 28 heads, 32k x 32k.
  assert dense["text attention scores (dense)"] == 28 * 32768**2 * 10
  kept = account(job, trainer=Trainer(remat_vision=False)).memory["update"].items
  grid = Trajectory().worst_case(job)[2]
  patches = 128 * math.prod(grid)
  per_patch = 32 * (4 * 1280 + 4 * 1280 + 3 * 3420) + 5 * 1280
  assert kept["vision activations kept (remat=none)"] == patches * per_patch * 2
  # The tower's attention is dense wherever it does not run the splash kernel (off TPU, or with dense attention):
  # one full-attention block's fp32 scores, their gradient and bf16 probabilities per frame and head (and bf16
  # probabilities of every block kept without remat); on TPU with "flash" the kernel keeps no scores; a frozen
  # tower's are gone before the decoder's backward.
  frame = math.prod(grid)
  assert dense["vision attention scores (dense)"] == 128 * 16 * frame**2 * 10
  assert "vision attention scores (dense)" not in account(job).memory["update"].items
  assert "vision attention scores (dense)" not in kept
  gpu = _job(accelerator="h200-32", **{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32})
  gpu_kept = account(gpu, trainer=Trainer(remat_vision=False)).memory["update"].items
  assert gpu_kept["vision attention scores (dense)"] == 128 * 16 * frame**2 * (2 * 32 + 10)
  frozen = account(_job(**{"mesh.ici": (1, 32, 1), "actor.ppo_micro_batch_size": 32,
                           "actor.freeze_vision_tower": True}), trainer=Trainer(attention="dense")).memory["update"]
  assert "vision attention scores (dense)" not in frozen.items


# ------------------------------------------------------------------ configs, chips, mesh
def test_accelerator_names():
  assert parse_accelerator("v5p-64")[1] == 32  # v5p counts TensorCores
  assert parse_accelerator("v4-8")[1] == 4
  assert parse_accelerator("v6e-64")[1] == 64  # v6e counts chips
  assert parse_accelerator("v5litepod-16")[1] == 16
  assert parse_accelerator("h100-8")[0].name == "h100"
  with pytest.raises(ValueError, match="unknown accelerator"):
    parse_accelerator("tpu9-8")
  with pytest.raises(ValueError, match="not a multiple"):
    parse_accelerator("v5p-7")


@pytest.mark.parametrize("ici", [(1, -1, 1), (2, -1, 2), (-1, 1, 2), (2, 2, 2)])
def test_resolve_mesh_agrees_with_make_mesh(ici):
  mesh = make_mesh(ici)
  got = resolve_mesh(ici, (1, 1, 1), 8)
  assert (got.data, got.fsdp, got.tensor) == tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor"))


def test_resolve_mesh_across_slices_and_errors():
  # 4 slices of 16 chips, FSDP within a slice, data parallel across: (4 x 1, 16, 1).
  got = resolve_mesh((1, -1, 1), (4, 1, 1), 64)
  assert (got.data, got.fsdp, got.tensor, got.dcn_data) == (4, 16, 1, 4)
  with pytest.raises(ValueError, match="does not divide"):
    resolve_mesh((3, -1, 1), (1, 1, 1), 32)
  with pytest.raises(ValueError, match="at most one -1"):
    resolve_mesh((-1, -1, 1), (1, 1, 1), 32)


@pytest.mark.parametrize("name,chip,chips", [("grpo_7b_v5p64", "v5p", 32), ("grpo_7b_v6e64", "v6e", 64)])
def test_pod_configs_load_and_fit(name, chip, chips):
  cfg = load(name)
  job = job_from_config(cfg)
  assert (job.chip.name, job.mesh.chips) == (chip, chips)
  assert job.micro_batch % job.mesh.batch_shards == 0  # no idle chips
  acc = account(job)
  fits = acc.fits()
  assert set(fits) == {"update", "rollout"} and all(fits.values()), {k: m.total for k, m in acc.memory.items()}
  # Not vacuous: the naive baseline (dense attention, no vision remat) would not fit.
  trainer, rollout = as_implemented()
  assert not account(job, trainer=trainer, rollout=rollout).fits()["update"]


def test_step_account_identities():
  acc = account(job_from_config(load("grpo_7b_v5p64")))
  job = acc.job
  assert acc.mfu == pytest.approx(acc.model_flops / (acc.step_time * job.mesh.chips * job.chip.bf16_flops))
  ph = {p.name: p for p in acc.phases}
  old, upd = ph["old log-probs"], ph["policy update (fwd+bwd)"]
  # Trainable vision tower: forward + backward = 3 forwards, for both towers (model FLOPs).
  assert upd.model["text"] == pytest.approx(3 * old.model["text"])
  assert upd.model["vision"] == pytest.approx(3 * old.model["vision"])
  # Remat and padding only add hardware FLOPs.
  assert upd.hardware["text"] > 3 * old.model["text"]
  # A trajectory by hand: 400 + 64 x (120 + 12) prompt, 2 x (64 + 16 x 132) observations, 3 x 512 generated.
  assert acc.traj.total_tokens == 400 + 64 * 132 + 2 * (64 + 16 * 132) + 3 * 512
  # A decode step reads the rollout weights and each row's valid KV (flash) from HBM.
  tc, t = acc.traj, job.model.text
  ctx = [tc.prompt_tokens, tc.prompt_tokens + 512 + tc.observation_tokens,
         tc.prompt_tokens + 2 * (512 + tc.observation_tokens)]
  mean_ctx = sum(512 * c + 512 * 513 // 2 for c in ctx) // (3 * 512)
  rows = 320 // 32
  step_bytes = 8_292_166_656 * 2 + rows * mean_ctx * 57344
  steps = math.ceil(2048 / 320) * 5 * 2048
  assert ph["rollout decode"].time_s == pytest.approx(steps * step_bytes / (2765e9 * 0.7))


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match="accelerator_type"):
    job_from_config(load("grpo_7b"))
  with pytest.raises(ValueError, match="not a multiple of the micro-batch"):
    _job(**{"actor.ppo_micro_batch_size": 48})
  with pytest.raises(ValueError, match="rollout layout"):
    account(_job(**{"actor.ppo_micro_batch_size": 32}), rollout=Rollout(layout="paged"))


@pytest.mark.parametrize("tie", [False, True])
def test_param_table_lists_every_model_parameter(rng, tie):
  """Path (layer index as *), shape and logical axes of every nnx.Param, with its repeat count."""
  cfg = random_config(rng, tie)
  real = {}
  for path, var in nnx.to_flat_state(nnx.state(Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(0)), nnx.Param)):
    key = ".".join("*" if str(p).isdigit() else str(p) for p in path)
    entry = (tuple(var.get_value().shape), tuple(var.get_metadata()["axes"]))
    shape_axes, n = real.get(key, (entry, 0))
    assert shape_axes == entry, key
    real[key] = (entry, n + 1)
  table = {e.path: ((e.shape, e.axes), e.repeat) for e in param_table(cfg)}
  assert table == real


def test_context_parallelism_divides_the_decoders_tokens_in_the_update_memory():
  """A rules table that splits `activation_length` over tensor (sft_7b_v6e64) gives each chip a quarter of a
  row's tokens with whole heads and whole gathered layers: against the same job with the tensor axis on heads
  (the 7B model's table), the decoder's kept residual stream and the logits chunk are a quarter, the gathered
  layers and head four times; the vision tower's working set is a quarter of the row's patches with whole heads
  (`vision_pieces`), where the other table splits every patch's heads and MLP width."""
  full = ["--config.train.remat=full", "--config.train.logprob_token_chunk=0"]  # the residual stream; whole rows
  job = job_from_config(load("sft_7b_v6e64", full))
  heads = job_from_config(load("sft_7b_v6e64", full + [
      "--config.mesh.rules=" + repr(tuple(load("qwen25vl_7b", []).rules))]))
  assert (job.context, heads.context, job_from_config(load("sft_7b", [])).context) == (4, 1, 1)
  cp, tp = account(job).memory["update"].items, account(heads).memory["update"].items
  assert cp["text activations kept (remat=full)"] == pytest.approx(tp["text activations kept (remat=full)"] / 4)
  assert cp["logits (chunk 16384)"] == pytest.approx(tp["logits (chunk 16384)"] / 4)
  assert cp["FSDP-gathered layers + head"] == pytest.approx(tp["FSDP-gathered layers + head"] * 4)
  from zoomer_jax.cost.memory import vision_saved_per_patch_block
  v = job.model.vision
  per_patch = lambda shards: vision_saved_per_patch_block(v, shards)
  assert cp["vision block working set"] / tp["vision block working set"] == pytest.approx(
      per_patch(1) / 4 / per_patch(4))
  assert cp["vision block working set"] < tp["vision block working set"]
