"""Sharded forward on 8 simulated devices equals the unsharded one; parameters follow the rules table."""

import jax
import numpy as np
import pytest
from flax import nnx

import hf_oracle as O
import tolerances as tol
import zoomer_jax
from zoomer_jax.parallel.mesh import make_mesh
from zoomer_jax.parallel.rules import DEFAULT_RULES, logical_to_spec


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("shard"))
  return O.save_hf(O.make_hf_model(O.tiny_hf_config(heads=4, kv_heads=2), seed=11), path)


@pytest.fixture(scope="module")
def reference(saved):
  return zoomer_jax.load_hf(saved)


@pytest.mark.parametrize("ici", [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_sharded_forward_equals_unsharded(saved, reference, rng, measure, ici):
  mesh = make_mesh(ici)
  assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), ici))
  model = zoomer_jax.load_hf(saved, mesh=mesh)
  _, state = nnx.split(model)
  n_sharded = 0
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    want = logical_to_spec(var.get_metadata()["axes"], DEFAULT_RULES, mesh, value.shape)
    assert value.sharding.mesh.shape == mesh.shape, path
    assert value.sharding.spec == want, (path, value.sharding.spec, want)
    n_sharded += any(s is not None for s in want)
  if ici != (8, 1, 1):  # data parallelism alone replicates every parameter
    assert n_sharded > 10
  prompt = O.build_prompt(rng, [[("text", 5), ("image", (1, 4, 6)), ("text", 4), ("video", (2, 4, 4), 1.0)],
                                [("text", 7), ("image", (1, 4, 4)), ("text", 2)]])
  want = np.asarray(reference(**prompt.ours()))
  with jax.set_mesh(mesh):
    got = np.asarray(model(**prompt.ours()))
  diff = float(np.abs(got - want)[prompt.attention_mask.astype(bool)].max())
  measure(f"mesh{ici}", diff)
  assert diff <= tol.LOGITS_FP32


def test_mesh_degrees_fill_and_fail():
  assert dict(make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="do not divide 8 devices"):
    make_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="at most one may be -1"):
    make_mesh((-1, -1, 1))
