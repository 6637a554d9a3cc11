"""Orbax train-state I/O: bit-exact round trips on 8 simulated devices, onto other meshes, async, keep-last-N."""

import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zoomer_jax
from zoomer_jax.checkpoint.orbax_io import (Checkpointer, TrainState, abstract_on_mesh, quiet_orbax_logs,
                                         state_shardings)
from zoomer_jax.config_loader import load
from zoomer_jax.parallel.mesh import make_mesh

SAVE_MESH = (2, 2, 2)
# The tiny model, one text layer and two vision blocks fewer: every kind of parameter, fewer to compile.
TINY = ["model.text.num_hidden_layers=1", "model.vision.depth=2", "model.vision.fullatt_block_indexes=(1,)"]


def _trained_state(mesh, rng, steps=2) -> TrainState:
  """A TrainState on `mesh` after `steps` AdamW updates with random gradients (so mu, nu, count move)."""
  cfg = zoomer_jax.ModelConfig.from_config_dict(load("qwen25vl_tiny", TINY).model.to_dict())
  params = nnx.state(zoomer_jax.Qwen25VL(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  optimizer = optax.adamw(1e-2)
  state = TrainState.create(params, optimizer, jax.random.key(7))
  state = jax.device_put(state, state_shardings(state, mesh))

  @jax.jit
  def update(state, grads):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1,
                      jax.random.split(state.rng)[0])

  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), state.params)
    state = update(state, grads)
  return state


def _leaves(tree):
  """(name and dtype, numpy array) per leaf, typed PRNG keys as their key data."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = f"{jax.tree_util.keystr(path)}:{x.dtype}"
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out.append((name, np.asarray(x)))
  return out


def assert_bit_exact(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (name, g), (want_name, w) in zip(_leaves(got), _leaves(want), strict=True):
    assert (name, g.dtype, g.shape) == (want_name, w.dtype, w.shape)
    assert g.tobytes() == w.tobytes(), name


def assert_sharded_as(got, target):
  n_split = 0
  for (path, g), t in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(target), strict=True):
    name = jax.tree_util.keystr(path)
    assert g.sharding.spec == t.sharding.spec and g.sharding.mesh == t.sharding.mesh, (name, g.sharding, t.sharding)
    n_split += not g.sharding.is_fully_replicated
  return n_split


@pytest.fixture(scope="module")
def trained():
  return _trained_state(make_mesh(SAVE_MESH), np.random.default_rng(0))


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
  directory = tmp_path_factory.mktemp("orbax") / "run"
  extra = {"data": {"epoch": 1, "position": [3, 17], "shard": "train-00001"}, "lr": 1e-2, "note": None}
  with Checkpointer(directory, async_save=False) as ckpt:
    assert ckpt.save(2, trained, extra=extra)
  return directory, extra


def test_restore_same_mesh_is_bit_exact(trained, saved):
  directory, extra = saved
  assert int(trained.opt_state[0].count) == 2 and int(trained.step) == 2
  target = abstract_on_mesh(trained, make_mesh(SAVE_MESH))
  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 2
    state, got_extra = ckpt.restore(target=target)
  assert isinstance(state, TrainState) and isinstance(state.params, nnx.State)
  assert_bit_exact(state, trained)
  assert int(state.step) == 2 and state.step.dtype == jnp.int32
  assert jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(state.rng) == jax.random.key_impl(trained.rng)
  assert np.array_equal(jax.random.key_data(state.rng), jax.random.key_data(trained.rng))
  assert got_extra == extra
  assert assert_sharded_as(state, target) > 30  # params and both moments are split on the mesh


@pytest.mark.parametrize("ici", [(1, 8, 1), (8, 1, 1), (1, 2, 4)])
def test_restore_onto_other_mesh(trained, saved, ici):
  mesh = make_mesh(ici)
  target = abstract_on_mesh(trained, mesh)
  with Checkpointer(saved[0]) as ckpt:
    state, _ = ckpt.restore(2, target=target)
  assert_bit_exact(state, trained)
  n_split = assert_sharded_as(state, target)
  assert n_split == 0 if ici == (8, 1, 1) else n_split > 30  # data parallelism alone replicates everything
  assert dict(jax.tree.leaves(state)[0].sharding.mesh.shape) == dict(mesh.shape)


def test_restore_params_reads_the_params_alone(trained, saved):
  """What an export needs: the params on any mesh, without an optimizer (or its state) to build a target from."""
  mesh = make_mesh((1, 2, 4))
  target = abstract_on_mesh(trained.params, mesh)
  with Checkpointer(saved[0]) as ckpt:
    params, step = ckpt.restore_params(target)
    assert step == 2 and isinstance(params, nnx.State)
    assert_bit_exact(params, trained.params)
    assert assert_sharded_as(params, target) > 10
    good = target["lm_head"]["kernel"].value
    target["lm_head"]["kernel"].value = jax.ShapeDtypeStruct((128, 7), good.dtype, sharding=good.sharding)
    with pytest.raises(zoomer_jax.CheckpointError, match=r"'params\.lm_head\.kernel\.value' has shape \[128, 600\]"):
      ckpt.restore_params(target)
    with pytest.raises(FileNotFoundError, match=r"step 9 .*steps there: \[2\]"):
      ckpt.restore_params(target, step=9)


def test_bf16_params_stay_bf16(trained, tmp_path):
  to_bf16 = lambda x: np.asarray(x).astype(jnp.bfloat16) if x.dtype == jnp.float32 else x  # on the host: no compile
  trained = trained.replace(params=jax.tree.map(to_bf16, trained.params),
                            opt_state=jax.tree.map(to_bf16, trained.opt_state))
  trained = jax.device_put(trained, state_shardings(trained, make_mesh(SAVE_MESH)))
  assert {x.dtype for x in jax.tree.leaves(trained.params)} == {jnp.dtype(jnp.bfloat16)}
  with Checkpointer(tmp_path / "bf16") as ckpt:
    ckpt.save(1, trained)
    state, extra = ckpt.restore(target=abstract_on_mesh(trained, make_mesh((1, 8, 1))))
  assert extra == {}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state[0].mu)} == {jnp.dtype(jnp.bfloat16)}
  assert_bit_exact(state, trained)


def _small_state(step, mesh, rng_key):
  w = nnx.Param(jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * step, axes=("embed", "mlp"))
  params = nnx.State({"w": w})
  state = TrainState.create(params, optax.sgd(0.1, momentum=0.9), rng_key, step=step)
  return jax.device_put(state, state_shardings(state, mesh))


def test_raw_uint32_key_round_trips(tmp_path):
  mesh = make_mesh(SAVE_MESH)
  state = _small_state(3, mesh, jax.random.PRNGKey(5))
  with Checkpointer(tmp_path / "raw", async_save=False) as ckpt:
    ckpt.save(3, state)
    got, _ = ckpt.restore(target=abstract_on_mesh(state, mesh))
  assert got.rng.dtype == jnp.uint32 and got.rng.shape == (2,)
  assert_bit_exact(got, state)


def test_restore_without_target_gives_saved_layout(tmp_path):
  mesh = make_mesh(SAVE_MESH)
  state = _small_state(3, mesh, jax.random.key(5))
  with Checkpointer(tmp_path / "raw_tree", async_save=False) as ckpt:
    ckpt.save(3, state, extra={"a": 1})
    got, extra = ckpt.restore()
  assert extra == {"a": 1} and sorted(got) == ["opt_state", "params", "rng", "step"]
  w = got["params"]["w"]["value"]
  assert w.sharding.spec == state.params["w"].value.sharding.spec and not w.sharding.is_fully_replicated
  assert np.array_equal(w, state.params["w"].value)
  assert np.array_equal(got["rng"], jax.random.key_data(state.rng))


def test_async_save_then_wait(tmp_path):
  mesh = make_mesh(SAVE_MESH)
  first, second = _small_state(1, mesh, jax.random.key(1)), _small_state(2, mesh, jax.random.key(2))
  want_first = [(name, x.copy()) for name, x in _leaves(first)]
  directory = tmp_path / "async"
  with Checkpointer(directory, async_save=True) as ckpt:
    assert ckpt.save(1, first)
    # Arrays are on the host once save returns: a donated (deleted) buffer must not corrupt the write.
    first.params["w"].value.delete()
    assert ckpt.save(2, second, extra={"k": 2})  # while step 1 may still be writing
    ckpt.wait()
    assert sorted(os.listdir(directory)) == ["1", "2"]  # finalized: no "*.orbax-checkpoint-tmp" left
    target = abstract_on_mesh(second, mesh)
    got_first, extra_first = ckpt.restore(1, target=target)
    got_second, extra_second = ckpt.restore(2, target=target)
  assert [(n, x.tobytes()) for n, x in _leaves(got_first)] == [(n, x.tobytes()) for n, x in want_first]
  assert_bit_exact(got_second, second)
  assert (extra_first, extra_second) == ({}, {"k": 2})


def test_keep_last_n(tmp_path):
  mesh = make_mesh((1, 8, 1))
  directory = tmp_path / "keep"
  with Checkpointer(directory, max_to_keep=2, async_save=True) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, _small_state(step, mesh, jax.random.key(step)))
    ckpt.wait()
    assert ckpt.latest_step() == 5 and ckpt.all_steps() == [4, 5]
    got, _ = ckpt.restore(target=abstract_on_mesh(_small_state(0, mesh, jax.random.key(0)), mesh))
  assert sorted(os.listdir(directory)) == ["4", "5"]
  assert int(got.step) == 5 and float(got.params["w"].value[1, 0]) == 8.0 * 5


def test_save_interval_and_force(tmp_path):
  mesh = make_mesh(SAVE_MESH)
  with Checkpointer(tmp_path / "interval", max_to_keep=None, save_interval_steps=3,
                    async_save=False) as ckpt:
    assert ckpt.should_save(2)  # Orbax always saves the first step of an empty directory
    saved_steps = [s for s in range(1, 8) if ckpt.save(s, _small_state(s, mesh, jax.random.key(0)))]
    assert not ckpt.should_save(7) and ckpt.should_save(9)
    assert ckpt.save(8, _small_state(8, mesh, jax.random.key(0)), force=True)
    assert ckpt.all_steps() == saved_steps + [8]
  assert saved_steps == [1, 3, 6]


def test_extra_must_be_json(tmp_path):
  mesh = make_mesh(SAVE_MESH)
  with Checkpointer(tmp_path / "json", async_save=False) as ckpt:
    with pytest.raises(TypeError, match="step 1 is not JSON-serialisable"):
      ckpt.save(1, _small_state(1, mesh, jax.random.key(0)), extra={"bad": object()})


def test_restore_empty_dir_names_it(tmp_path):
  directory = tmp_path / "empty"
  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match=re.escape(str(directory))):
      ckpt.restore()


def test_restore_missing_step_lists_steps(trained, saved):
  with Checkpointer(saved[0]) as ckpt:
    with pytest.raises(FileNotFoundError, match=r"step 9 .*steps there: \[2\]"):
      ckpt.restore(9, target=abstract_on_mesh(trained, make_mesh(SAVE_MESH)))


def test_wrong_target_fails_naming_key(trained, saved):
  mesh = make_mesh(SAVE_MESH)
  target = abstract_on_mesh(trained, mesh)
  with Checkpointer(saved[0]) as ckpt:
    good = target.params["lm_head"]["kernel"].value
    target.params["lm_head"]["kernel"].value = jax.ShapeDtypeStruct((128, 7), good.dtype, sharding=good.sharding)
    with pytest.raises(zoomer_jax.CheckpointError,
                       match=r"'params\.lm_head\.kernel\.value' has shape \[128, 600\], target wants \[128, 7\]"):
      ckpt.restore(target=target)
    target = abstract_on_mesh(trained, mesh)
    target.params["lm_head"]["kernel"].value = jax.ShapeDtypeStruct(good.shape, jnp.bfloat16, sharding=good.sharding)
    with pytest.raises(zoomer_jax.CheckpointError, match=r"'params\.lm_head\.kernel\.value' has dtype float32"):
      ckpt.restore(target=target)
    target = abstract_on_mesh(trained, mesh)
    del target.params["lm_head"]
    with pytest.raises(zoomer_jax.CheckpointError, match=r"holds \['params\.lm_head\.kernel\.value'\]"):
      ckpt.restore(target=target)


def test_orbax_info_logs_are_quiet_until_asked_for(tmp_path, caplog):
  mesh = make_mesh(SAVE_MESH)
  orbax_records = lambda: [r for r in caplog.records if "orbax" in r.pathname and r.levelno < logging.WARNING]
  with caplog.at_level(logging.INFO):
    with Checkpointer(tmp_path / "quiet", async_save=False) as ckpt:
      ckpt.save(1, _small_state(1, mesh, jax.random.key(0)))
    assert orbax_records() == []
    quiet_orbax_logs(False)
    try:
      with Checkpointer(tmp_path / "loud", async_save=False) as ckpt:
        ckpt.save(1, _small_state(1, mesh, jax.random.key(0)))
    finally:
      quiet_orbax_logs()
    assert len(orbax_records()) > 5
