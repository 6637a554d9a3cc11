"""Weight gradients reduced one mesh axis at a time (`impl.staged_gradients`, `parallel.rules.reduce_in_stages`):
the same gradients as one device, and on TPU a reduce-scatter per axis where the compiler would all-reduce."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import hf_oracle as O
import tolerances as tol
from zoomer_jax.aot.hlo import Hlo
from zoomer_jax.checkpoint.orbax_io import state_shardings
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.layers import Linear
from zoomer_jax.model.options import ModelOptions
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.parallel.mesh import make_mesh
from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES, reduce_in_stages, stages

RULES = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)


def test_stages_add_the_axes_of_each_entry_one_at_a_time():
  P = PartitionSpec
  assert stages(P(("fsdp", "tensor"), None)) == (P("fsdp", None), P(("fsdp", "tensor"), None))
  assert stages(P(None, ("a", "b", "c"), "d")) == (P(None, "a", "d"), P(None, ("a", "b"), "d"),
                                                   P(None, ("a", "b", "c"), "d"))
  assert stages(P("fsdp", None)) == () and stages(P()) == ()


def _text_grads(cfg, staged: bool, mesh, ids, positions, mask, weight, remat="full"):
  options = ModelOptions(scan_layers=True, rules=RULES, staged_gradients=staged)
  graphdef, state = nnx.split(Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(3), options=options))

  def loss(state):
    h, _ = nnx.merge(graphdef, state).forward(ids, positions, mask, logits_at=None, remat_policy=remat)
    return jnp.sum(h * weight)

  if mesh is None:
    return jax.jit(jax.grad(loss))(state), None
  shardings = state_shardings(state, mesh, RULES)
  step = jax.jit(jax.grad(loss), out_shardings=shardings)
  with jax.set_mesh(mesh):
    placed = jax.device_put(state, shardings)
    return step(placed), step.lower(placed).compile().as_text()


def test_staged_gradients_equal_one_device_on_a_context_parallel_mesh(measure):
  """The tiny decoder, scanned, on a (1, 2, 4) CPU mesh under the context-parallel rules (weights split over
  fsdp x tensor): staged and unstaged gradients of every parameter equal one device's, also with the MLP's
  gathered weights kept for the backward (`save_attention_mlp_weights`)."""
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config())
  rng = np.random.default_rng(0)
  b, t = 2, 32
  ids = jnp.asarray(rng.integers(0, 100, size=(b, t)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (3, b, t))
  mask = jnp.ones((b, t), bool)
  weight = jnp.asarray(rng.normal(size=(b, t, cfg.text.hidden_size)), jnp.float32)
  want, _ = _text_grads(cfg, False, None, ids, positions, mask, weight)
  mesh = make_mesh((1, 2, 4))
  flat_want = dict(nnx.to_flat_state(want))
  gathered = {}
  for staged, remat in ((False, "full"), (True, "full"), (True, "save_attention_mlp_weights")):
    got, text = _text_grads(cfg, staged, mesh, ids, positions, mask, weight, remat)
    rels = []
    for path, var in nnx.to_flat_state(got):
      a, g = np.asarray(flat_want[path].get_value()), np.asarray(var.get_value())
      if np.abs(a).max() > 0:
        rels.append(float(np.abs(a - g).max() / np.abs(a).max()))
    measure(f"staged_{staged}_{remat}_grad_rel", max(rels))
    assert len(rels) > 10 and max(rels) <= tol.CHUNKED_GRAD_FP32_REL, (staged, remat)
    assert Hlo(text).collectives(8), "the mesh run moved nothing: the weights were not split"
    gathered[staged, remat] = Hlo(text).collectives(8).get("all-gather", {}).get("moved", 0.0)
  # The MLP's weights kept from the forward are not gathered again for the backward.
  measure("gathered_bytes_kept_over_full", gathered[True, "save_attention_mlp_weights"] / gathered[True, "full"])
  assert gathered[True, "save_attention_mlp_weights"] < 0.8 * gathered[True, "full"], gathered


@pytest.mark.parametrize("topology", ["v6e:4x4"])
def test_staged_reduction_moves_no_whole_gradient_all_reduce_for_tpu(topology, measure):
  """The gradient of a matmul whose [1024, 4096] weight is split over fsdp x tensor (4 x 4 v6e chips) and whose
  rows are split the same way. Unstaged, this libtpu all-reduces the whole gradient over the 16 chips (2 x 15/16
  of it per chip). Staged, the first reduction is a reduce-scatter over fsdp and no all-reduce carries more than
  one fsdp shard: at most 3/4 + 2 x 3/4 x 1/4 of the gradient per chip (a reduce-scatter then an all-reduce of
  the shard over tensor), padding aside. The product is the model's own bf16 `Linear`, whose TPU path keeps the
  per-chip partial sums in bf16 (an fp32 partial sum would be reduce-scattered in fp32: twice the bytes)."""
  from zoomer_jax.aot.target import tpu_target
  target = tpu_target(topology)
  mesh = Mesh(np.asarray(target.devices).reshape(4, 4), ("fsdp", "tensor"))
  rules = (("embed", ("fsdp", "tensor")), ("mlp", None))
  w_sharding = NamedSharding(mesh, PartitionSpec(("fsdp", "tensor"), None))
  w = jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16, sharding=w_sharding)
  x = jax.ShapeDtypeStruct((4, 4 * 512, 1024), jnp.bfloat16,
                           sharding=NamedSharding(mesh, PartitionSpec("fsdp", "tensor", None)))
  grad = 1024 * 4096 * 2
  layer = Linear((1024,), (4096,), axes=("embed", "mlp"), use_bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(layer)
  moved = {}
  for staged in (False, True):
    def loss(w, x, staged=staged):
      if staged:
        w = reduce_in_stages(w, ("embed", "mlp"), rules)
      y = nnx.merge(graphdef, nnx.State({"kernel": nnx.Param(w)}))(x)
      return jnp.sum(y.astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
      text = jax.jit(jax.grad(loss), out_shardings=w_sharding).lower(w, x).compile().as_text()
    found = Hlo(text).collectives(16, by_shape=True)
    moved[staged] = sum(v["moved"] for k, v in found.items() if not k.startswith("all-gather"))
    if staged:
      assert any(k.startswith("reduce-scatter g4") for k in found), found
      assert all("bf16[" in k for k in found if k.startswith("reduce-scatter")), found
      assert all(v["bytes"] <= grad / 4 for k, v in found.items() if k.startswith("all-reduce")), found
  measure("staged_over_unstaged_bytes", moved[True] / moved[False])
  assert moved[True] <= (3 / 4 + 2 * 3 / 4 / 4) * grad * 1.05, moved
  assert moved[True] < moved[False], moved


@pytest.mark.parametrize("topology", ["v6e:4x4"])
def test_log_prob_head_gradient_is_reduce_scattered_per_axis_for_tpu(topology, measure):
  """The log-prob head's [d, V] weight split over fsdp x tensor (the context-parallel rules), its gradient summed
  under `shard_map` (`train.logprobs._gathered`): a bf16 reduce-scatter over fsdp, then one over tensor, and no
  all-reduce of the whole gradient over the 16 chips (what one reduce-scatter over both axes compiles to)."""
  from zoomer_jax.aot.target import tpu_target
  from zoomer_jax.train.logprobs import token_logprobs
  target = tpu_target(topology)
  mesh = Mesh(np.asarray(target.devices).reshape(1, 4, 4), ("data", "fsdp", "tensor"))
  b, t, d, v = 4, 4096, 1024, 8192
  w_sharding = NamedSharding(mesh, PartitionSpec(("fsdp", "tensor"), None))
  w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16, sharding=w_sharding)
  h = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16,
                           sharding=NamedSharding(mesh, PartitionSpec("fsdp", "tensor", None)))
  tg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", "tensor")))

  def loss(w, h, tg):
    logp, _ = token_logprobs(h, w, tg, vocab_chunk=2048, with_entropy=False, rules=RULES)
    return jnp.sum(logp)

  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss), out_shardings=w_sharding).lower(w, h, tg).compile().as_text()
  found = Hlo(text).collectives(16, by_shape=True)
  grad = d * v * 2
  scattered = {k: x for k, x in found.items() if k.startswith("reduce-scatter")}
  assert any(k.startswith("reduce-scatter g4") for k in scattered), found
  assert scattered and all("bf16[" in k for k in scattered), found
  assert all(x["bytes"] <= grad / 4 for k, x in found.items() if k.startswith("all-reduce")), found
  moved = sum(x["moved"] for x in scattered.values())
  measure("head_gradient_moved_over_gradient", moved / grad)
  assert moved <= (3 / 4 + 3 / 4 / 4) * grad * 1.05, found


def test_the_account_keeps_the_gathered_mlp_weights_and_gathers_them_once():
  """sft_7b_v6e64 (context parallel: whole layers gathered) under "save_attention_mlp_weights": the update's
  memory holds every decoder layer's gate, up and down weights whole in bf16, what remat keeps per token is
  save_attention's, and the update moves one gather of them fewer than under save_attention."""
  from zoomer_jax.config_loader import load
  from zoomer_jax.cost import account, job_from_config
  kept = job_from_config(load("sft_7b_v6e64", ["--config.train.remat=save_attention_mlp_weights"]))
  plain = job_from_config(load("sft_7b_v6e64", ["--config.train.remat=save_attention"]))
  a, b = account(kept), account(plain)
  t = kept.model.text
  mem_a, mem_b = a.memory["update"].items, b.memory["update"].items
  assert mem_a["decoder MLP weights kept gathered"] == t.num_hidden_layers * 3 * t.hidden_size * t.intermediate_size * 2
  assert "decoder MLP weights kept gathered" not in mem_b
  assert (mem_a["text activations kept (remat=save_attention_mlp_weights)"]
          == mem_b["text activations kept (remat=save_attention)"])
  ici = [float(re.search(r"ICI ([0-9.]+) s", acc.phases[0].detail).group(1)) for acc in (a, b)]
  assert a.phases[0].name == "policy update (fwd+bwd)" and ici[0] < ici[1], (a.phases[0], b.phases[0])


def test_gather_for_use_gathers_the_fsdp_axes_and_keeps_tensor_parallelism():
  """An MLP weight [embed, mlp] on a (1, 2, 4) CPU mesh: under the default rules (fsdp on embed, tensor on mlp) it
  is gathered over fsdp and stays split over tensor; under the context-parallel rules (embed over fsdp x tensor)
  it is gathered whole."""
  from zoomer_jax.parallel.rules import gather_for_use
  mesh = make_mesh((1, 2, 4))
  for rules, want in ((DEFAULT_RULES, PartitionSpec(None, "tensor")), (RULES, PartitionSpec(None, None))):
    w = jnp.ones((16, 32), jnp.float32)
    with jax.set_mesh(mesh):
      out = jax.jit(lambda w, rules=rules: gather_for_use(w, ("embed", "mlp"), rules))(w)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, want), 2), (rules[:1], out.sharding.spec)
