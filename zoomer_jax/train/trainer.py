"""What the SFT and GRPO loops share: model and sharded train state, the jitted steps, resume, SIGTERM.

    engine = Engine(cfg, loss_fn, total_steps=..., optim=cfg.optim, freeze_vision=..., remat=...)
    engine.resume()                                  # restores the latest checkpoint in cfg.workdir, if any
    for micro in micro_batches:                      # gradient accumulation, exact for any loss_agg_mode
      engine.accumulate(micro)
    stats = engine.apply()                           # one optimizer step
    engine.save(extra={"data": iterator.get_state()})

`loss_fn(model, batch) -> (loss_sum, denominator, metrics)` returns sums: the step's loss is the sum over its
micro-batches divided by the summed denominators, so accumulating is exactly one large batch. `metrics` are
per-micro-batch means, averaged weighted by the denominator.

Every process runs the same Python control flow (SPMD): jitted programs span the whole mesh, so every process
must call them in the same order with the same shapes. A batch is either a host batch identical on every
process (`put`, GRPO) or already global arrays assembled from each process's own rows
(`batch.make_global_batch`, SFT).
"""

from __future__ import annotations

import dataclasses

import logging
import os
import signal
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import zoomer_jax
from zoomer_jax.checkpoint.orbax_io import Checkpointer, TrainState, abstract_on_mesh, state_shardings
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.options import ModelOptions, options_from_config
from zoomer_jax.parallel.distributed import put, to_host
from zoomer_jax.parallel.mesh import make_mesh
from zoomer_jax.train.batch import TrainBatch, batch_sharding
from zoomer_jax.train.optim import make_optimizer

log = logging.getLogger("zoomer_jax.train")
LossFn = Callable[[Any, TrainBatch], tuple[jax.Array, jax.Array, Mapping[str, jax.Array]]]


def model_options(cfg) -> ModelOptions:
  """How a job's model computes: `cfg.impl` (scanned layers, attention kernel) and the rules `cfg.mesh.rules`."""
  return options_from_config(cfg.impl, cfg.mesh.rules)


def build_model(cfg, mesh) -> zoomer_jax.Qwen25VL:
  """The model of `cfg.init`: an HF checkpoint directory, or random weights from `cfg.seed`, on `mesh`."""
  options = model_options(cfg)
  if cfg.init.checkpoint:
    return zoomer_jax.load_hf(cfg.init.checkpoint, dtype=cfg.init.dtype, mesh=mesh, options=options)
  model = zoomer_jax.Qwen25VL(ModelConfig.from_config_dict(cfg.model.to_dict()), dtype=cfg.init.dtype,
                              rngs=nnx.Rngs(cfg.seed), options=options)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, put(state, state_shardings(state, mesh, options.rules)))


def with_rules(graphdef, model: zoomer_jax.Qwen25VL, rules) -> tuple[Any, tuple]:
  """(`graphdef` of `model` split as (Param, ...), with `rules` in its options (the same graphdef when they are
  its own), the checked rules): the same modules and parameters, activations laid out by another table."""
  options = dataclasses.replace(model.options, rules=rules)
  if options.rules == model.options.rules:
    return graphdef, options.rules
  from zoomer_jax.checkpoint.hf_import import abstract_model  # noqa: PLC0415
  other = nnx.split(abstract_model(model.config, model.dtype, options), nnx.Param, ...)[0]
  return other, options.rules


def cast_floats(tree, dtype):
  """Every floating leaf of `tree` in `dtype` (no-op leaves keep their buffers)."""
  def one(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
  return jax.tree.map(one, tree)


def device_order(shardings) -> tuple:
  """The chips of the mesh that `shardings` (a tree of NamedShardings over one mesh) lay out over, in its order."""
  leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  orders = {tuple(s.mesh.devices.flat) for s in leaves if isinstance(s, jax.sharding.NamedSharding)}
  if len(orders) != 1:
    raise ValueError(f"expected shardings over one mesh, got {len(orders)} device orders")
  return orders.pop()


def trained_model(cfg) -> tuple[zoomer_jax.Qwen25VL, int]:
  """(model, step): the params of the latest checkpoint in `cfg.workdir` in the model `cfg` trains, in its
  compute dtype; only the params are read and no optimizer is built (exporting a finished job)."""
  mesh = make_mesh(tuple(cfg.mesh.ici), tuple(cfg.mesh.dcn))
  model = build_model(cfg, mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # The checkpoint holds master weights in `init.param_dtype` (see Engine); the model computes in its own dtype.
  param_dtype = jnp.dtype(cfg.init.param_dtype or model.dtype)
  stored = jax.eval_shape(lambda p: cast_floats(p, param_dtype), params)
  with Checkpointer(os.path.join(cfg.workdir, "checkpoints"), max_to_keep=None) as ckpt:
    params, step = ckpt.restore_params(abstract_on_mesh(stored, mesh, model_options(cfg).rules))
  return nnx.merge(graphdef, cast_floats(params, model.dtype), rest), step


class TrainSteps:
  """A training job's jitted programs as pure functions of arrays: `grad` (one micro-batch's gradient, added to
  the accumulator), `apply` (the optimizer step), `evaluate` (a function of the model, no gradient: old and
  reference log-probs). The same objects run a job (`Engine`) and compile for a TPU topology from
  ShapeDtypeStructs (`zoomer_jax.compile`)."""

  def __init__(self, graphdef, rest, loss_fn: LossFn, tx: optax.GradientTransformation, schedule,
               compute_dtype, state_shardings, rollout_shardings=None):
    self.graphdef, self.rest, self._loss_fn = graphdef, rest, loss_fn
    self.tx, self.schedule, self.compute_dtype = tx, schedule, jnp.dtype(compute_dtype)
    self.grad = jax.jit(self._grad_impl, donate_argnums=(1,))
    # The state is donated (its buffers become the new state's); the accumulator is not: nothing it could become.
    self.apply = jax.jit(self._apply_impl, donate_argnums=(0,), out_shardings=(state_shardings, None))
    self.evaluate = jax.jit(self._eval_impl, static_argnums=(2,))
    # The sampler's weights: the compute-dtype copy laid out for the rollout mesh, made once per RL step. One
    # program when both meshes list their chips in one order. `make_mesh` orders each mesh for its own groups
    # (v5p-64: the rollout's single-chip replicas host by host, the training mesh in torus order), and no jit may
    # take its input in one order and give its output in another: then the cast runs in the training layout and
    # `device_put` moves it (JAX relabels the shards to the new order and reshards them in one program).
    cast = lambda p: cast_floats(p, self.compute_dtype)
    self.rollout_shardings = rollout_shardings
    self.reshard = jax.jit(cast, out_shardings=rollout_shardings)
    self.same_order = rollout_shardings is None or device_order(state_shardings) == device_order(rollout_shardings)
    # In the training layout, named: `device_put` relabels the shards of a NamedSharding only.
    self._cast = jax.jit(cast, out_shardings=state_shardings.params)

  def rollout_weights(self, params):
    """`params` in the compute dtype, laid out for the rollout mesh (as given when there is none)."""
    if self.same_order:
      return self.reshard(params)
    # Not donated: with equal dtypes the cast forwards the master weights themselves.
    return jax.device_put(self._cast(params), self.rollout_shardings)

  def model(self, params) -> zoomer_jax.Qwen25VL:
    return nnx.merge(self.graphdef, cast_floats(params, self.compute_dtype), self.rest)

  def _grad_impl(self, params, acc, batch):
    def f(p):
      loss_sum, denom, metrics = self._loss_fn(self.model(p), batch)
      return loss_sum, (denom, metrics)
    (loss_sum, (denom, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
    acc = grads if acc is None else jax.tree.map(jnp.add, acc, grads)
    return acc, loss_sum, denom, metrics

  def _apply_impl(self, state: TrainState, acc, denom):
    grads = jax.tree.map(lambda g: g / jnp.maximum(denom, 1e-8), acc)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    lr = self.schedule(state.step)
    new = TrainState(params, opt_state, state.step + 1, jax.random.split(state.rng)[0])
    return new, dict(grad_norm=grad_norm, lr=lr)

  def _eval_impl(self, params, batch, fn):
    return fn(self.model(params), batch)


def global_batch(batch: TrainBatch, mesh) -> TrainBatch:
  """A host batch (identical on every process) as global arrays laid out by `batch_sharding`."""
  shardings = batch_sharding(mesh, batch)

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, batch, shardings)


class Preempted(Exception):
  """Raised by `Engine.check_preemption` after a SIGTERM once the state is saved."""


class Engine:
  def __init__(self, cfg, loss_fn: LossFn, *, total_steps: int, optim: Mapping[str, Any], freeze_vision: bool,
               save_freq: int, max_to_keep: int, rollout_mesh=None, rollout_rules=None):
    """`rollout_mesh`: the mesh the sampler's weights are laid out on (`rollout_model`); None samples with the
    training layout. `rollout_rules`: the rules table the sampler runs by there (default: the training one)."""
    self.cfg = cfg
    self.mesh = make_mesh(tuple(cfg.mesh.ici), tuple(cfg.mesh.dcn))
    self.rules = model_options(cfg).rules
    model = build_model(cfg, self.mesh)
    self.model_config = model.config
    self.compute_dtype = model.dtype
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    # Mixed precision: the optimizer updates master weights in `init.param_dtype` (fp32 by default: a 1e-6
    # step vanishes in bf16), and every forward runs on a copy cast to the model dtype.
    self.param_dtype = jnp.dtype(cfg.init.param_dtype or model.dtype)
    params = cast_floats(params, self.param_dtype)
    self.tx, self.schedule = make_optimizer(dict(optim), total_steps, params, freeze_vision)
    state = TrainState.create(params, self.tx, jax.random.key(cfg.seed))
    self.shardings = state_shardings(state, self.mesh, self.rules)
    self.state = put(state, self.shardings)
    self.ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), max_to_keep=max_to_keep,
                             save_interval_steps=max(1, save_freq))
    self._acc = None
    self._sums = None
    self._sigterm = False
    self.saved_step = None
    self.rollout_mesh = rollout_mesh
    self.rollout_graphdef, rollout_rules = with_rules(self.graphdef, model, rollout_rules or self.rules)
    rollout_shardings = None if rollout_mesh is None else state_shardings(params, rollout_mesh, rollout_rules)
    self.steps = TrainSteps(self.graphdef, self.rest, loss_fn, self.tx, self.schedule, self.compute_dtype,
                            self.shardings, rollout_shardings)

  # ------------------------------------------------------------------ the model at the current params
  def compute_params(self, params=None):
    """`params` (default: the current master weights) in the model's compute dtype (no copy when equal)."""
    params = self.state.params if params is None else params
    if self.param_dtype == self.compute_dtype:
      return params
    return jax.jit(cast_floats, static_argnums=1)(params, self.compute_dtype)

  def model(self, params=None) -> zoomer_jax.Qwen25VL:
    """An nnx model at `params` (default: the current ones) in the compute dtype; valid until the next `apply`."""
    return nnx.merge(self.graphdef, self.compute_params(params), self.rest)

  def rollout_model(self) -> zoomer_jax.Qwen25VL:
    """The policy to sample from: the current weights in the compute dtype, resharded into the rollout layout when
    there is one (one program per call: call it once per RL step); run its rollouts under
    `jax.set_mesh(self.rollout_mesh)`."""
    if self.rollout_mesh is None:
      return self.model()
    return nnx.merge(self.rollout_graphdef, self.steps.rollout_weights(self.state.params), self.rest)

  @property
  def step(self) -> int:
    return int(self.state.step)

  # ------------------------------------------------------------------ public steps
  def put(self, batch: TrainBatch) -> TrainBatch:
    return global_batch(batch, self.mesh)

  def accumulate(self, batch: TrainBatch) -> None:
    """Adds one micro-batch's gradient (of its loss sum) to the running sum."""
    batch = batch if isinstance(batch.ids, jax.Array) else self.put(batch)
    with jax.set_mesh(self.mesh):  # activations are laid out by the rules on this mesh
      self._acc, loss_sum, denom, metrics = self.steps.grad(self.state.params, self._acc, batch)
    loss_sum, denom, metrics = to_host((loss_sum, denom, metrics))  # (a gather when the mesh spans processes)
    d = float(denom)
    s = self._sums or {"loss_sum": 0.0, "denom": 0.0, "metrics": {}}
    s["loss_sum"] += float(loss_sum)
    s["denom"] += d
    for k, v in metrics.items():
      s["metrics"][k] = s["metrics"].get(k, 0.0) + float(v) * d
    self._sums = s

  def apply(self) -> dict:
    """One optimizer step with the accumulated gradient; returns the step's loss and metrics."""
    if self._acc is None:
      raise RuntimeError("apply() before any accumulate()")
    s = self._sums
    denom = jnp.asarray(s["denom"], jnp.float32)
    with jax.set_mesh(self.mesh):
      self.state, stats = self.steps.apply(self.state, self._acc, denom)
    self._acc, self._sums = None, None
    out = {"loss": s["loss_sum"] / max(s["denom"], 1e-8)}
    out.update({k: v / max(s["denom"], 1e-8) for k, v in s["metrics"].items()})
    out.update({k: float(v) for k, v in to_host(stats).items()})
    return out

  def evaluate(self, batch: TrainBatch, fn, params=None):
    """`fn(model, batch)` jitted at the current (or given) params, no gradient: e.g. old/ref log-probs."""
    batch = batch if isinstance(batch.ids, jax.Array) else self.put(batch)
    with jax.set_mesh(self.mesh):
      return self.steps.evaluate(self.state.params if params is None else params, batch, fn)

  # ------------------------------------------------------------------ checkpoints and preemption
  def resume(self) -> dict | None:
    """Restores the latest checkpoint in the workdir onto this mesh; returns its `extra` (None if none)."""
    if self.ckpt.latest_step() is None:
      return None
    self.state, extra = self.ckpt.restore(target=abstract_on_mesh(self.state, self.mesh, self.rules))
    self.saved_step = self.step
    log.info("resumed from step %d of %s", self.step, self.ckpt.directory)
    return extra

  def save(self, extra: dict | None = None, force: bool = False) -> bool:
    """Checkpoints the state at its step (every `save_freq` steps, or now with `force`); once per step."""
    if self.step == self.saved_step:
      return False
    saved = self.ckpt.save(self.step, self.state, extra=extra, force=force)
    if saved:
      self.saved_step = self.step
    return saved

  def install_sigterm_handler(self) -> None:
    """On SIGTERM (a preempted TPU VM, `kill`), finish the current step, save, and stop (`check_preemption`)."""
    def handler(signum, frame):
      del frame
      log.warning("signal %d: saving at the end of this step, then stopping", signum)
      self._sigterm = True
    signal.signal(signal.SIGTERM, handler)
    # Restart system calls the signal interrupts (SA_RESTART): a process-directed SIGTERM can land on any thread,
    # native ones included (XLA, Orbax/tensorstore, gloo), whose calls then need not cope with EINTR.
    signal.siginterrupt(signal.SIGTERM, False)

  @property
  def preempted(self) -> bool:
    return self._sigterm

  def check_preemption(self, extra: dict | None = None) -> None:
    if self._sigterm:
      self.save(extra, force=True)
      self.ckpt.wait()
      raise Preempted(f"stopped by SIGTERM after step {self.step}; saved to {self.ckpt.directory}")

  def close(self) -> None:
    self.ckpt.wait()
    self.ckpt.close()
