"""Orbax train-state I/O: a sharded `TrainState` plus a JSON dict per step, async, keeping the last N.

    ckpt = Checkpointer("/ckpt/run1", max_to_keep=3)
    ckpt.save(step, state, extra={"data": iterator_state})      # returns once arrays are on the host
    target = abstract_on_mesh(state, new_mesh)                   # ShapeDtypeStructs with the new shardings
    state, extra = ckpt.restore(target=target)                   # latest step, laid out on new_mesh
    params, step = ckpt.restore_params(abstract_on_mesh(params, mesh))   # the params alone: no optimizer needed

Restoring onto another mesh is only a matter of the target's shardings: every process reads just the
slices its devices hold. Typed PRNG keys are stored as their raw `key_data` and re-wrapped on restore.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from zoomer_jax.checkpoint.hf_import import CheckpointError
from zoomer_jax.parallel.rules import DEFAULT_RULES, Rules, variable_sharding

STATE, EXTRA = "state", "extra"
_ORBAX_DIR = os.path.dirname(ocp.__file__)


class _DropOrbaxInfo(logging.Filter):
  """Drops Orbax's INFO records (some 50 per save) from the shared `absl` logger; its warnings pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.pathname.startswith(_ORBAX_DIR)


_ORBAX_FILTER = _DropOrbaxInfo()


def quiet_orbax_logs(quiet: bool = True) -> None:
  """Hides Orbax's INFO logging (on at import) or, with False, shows it again; other absl users are untouched."""
  absl_logger = logging.getLogger("absl")
  if quiet:
    absl_logger.addFilter(_ORBAX_FILTER)  # a no-op when already present
  else:
    absl_logger.removeFilter(_ORBAX_FILTER)


quiet_orbax_logs()


@flax.struct.dataclass
class TrainState:
  """What a training step replaces: params (nnx.State of nnx.Param), Optax state, step, PRNG key."""
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array, step: int = 0) -> TrainState:
    return cls(params=params, opt_state=optimizer.init(params), step=jnp.asarray(step, jnp.int32), rng=rng)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings shaped like `tree`: each nnx.Variable from its logical `axes`, all else replicated.

  Optax moments (`mu`, `nu`) are nnx.State trees of the same Params, so they follow the params.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(x):
    if _is_var(x) and hasattr(x.get_value(), "shape"):
      sharding = variable_sharding(x, mesh, rules)
      return jax.tree.map(lambda _: sharding, x)
    if _is_var(x):  # a frozen parameter's moments: an empty MaskedNode, kept as a node so the trees match
      return jax.tree.map(lambda _: replicated, x)
    return replicated
  return jax.tree.map(one, tree, is_leaf=_is_var)


def abstract_like(tree, shardings: Sharding | Any):
  """`jax.ShapeDtypeStruct` leaves with `tree`'s shapes and dtypes; `shardings` is one Sharding or a tree."""
  if isinstance(shardings, Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_on_mesh(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """The restore target for `tree` (concrete or abstract) laid out on `mesh` by `rules`."""
  return abstract_like(tree, state_shardings(tree, mesh, rules))


def _key_impl(key) -> Any:
  """The PRNG implementation of a typed key array or ShapeDtypeStruct (key_impl takes no ShapeDtypeStruct)."""
  found = []
  jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)) or jax.random.key_data(k), key)
  return found[0]


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(target):
  def one(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, target)


def _wrap_keys(restored, target):
  def one(x, t):
    return jax.random.wrap_key_data(x, impl=_key_impl(t)) if _is_key(t) else x
  return jax.tree.map(one, restored, target)


def _name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


class Checkpointer:
  """Numbered train-state checkpoints in `directory` (an Orbax CheckpointManager).

  Each step holds `state` (a pytree of arrays, saved sharded) and `extra` (a JSON dict: data iterator
  state, config). `async_save` writes in a background thread once arrays are copied to the host;
  only the newest `max_to_keep` steps stay (None keeps all); `save` skips steps that are not multiples
  of `save_interval_steps` unless `force` (Orbax always saves the first step into an empty directory).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    # Handlers named up front, so that a fresh manager can read metadata before any save or restore.
    handlers = {STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, state, extra: dict | None = None, force: bool = False) -> bool:
    """Starts saving `state` and `extra` as `step`; False if skipped by the save interval."""
    if not force and not self.should_save(step):
      return False
    extra = {} if extra is None else extra
    try:
      json.dumps(extra)
    except TypeError as e:
      raise TypeError(f"checkpoint extra for step {step} is not JSON-serialisable: {e}") from None
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(_keys_to_data(state)), EXTRA: ocp.args.JsonSave(extra)})
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, step: int | None = None, target=None) -> tuple[Any, dict]:
    """(state, extra) of `step` (default: the latest).

    `target` is a pytree of `jax.ShapeDtypeStruct` with shardings (see `abstract_on_mesh`); the state
    comes back in its structure and layout. Without it, arrays come back as saved, in nested dicts.
    """
    self._manager.wait_until_finished()
    self._manager.reload()  # steps another process (a trainer, for an evaluator) may have added
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; steps there: {steps}")
    if target is None:
      state_args = ocp.args.StandardRestore()
    else:
      stored = _abstract_key_data(target)
      self._check_target(step, stored)
      state_args = ocp.args.StandardRestore(stored)
    out = self._manager.restore(step, args=ocp.args.Composite(**{STATE: state_args, EXTRA: ocp.args.JsonRestore()}))
    state = out[STATE] if target is None else _wrap_keys(out[STATE], target)
    return state, (out[EXTRA] or {})

  def restore_params(self, params_target, step: int | None = None) -> tuple[Any, int]:
    """(params, step): the `params` field of the `TrainState` saved at `step` (default: the latest) in
    `params_target`'s structure and layout, read alone (an Orbax partial restore), so a model can be exported
    without building the optimizer whose state the checkpoint also holds."""
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = self.all_steps()
    if not steps or (step is not None and step not in steps):
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}; "
                              f"steps there: {steps}")
    step = steps[-1] if step is None else step
    target = {"params": params_target}
    self._check_target(step, target, partial=True)
    path = os.path.join(self.directory, str(step), STATE)
    args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(path, args=args)["params"], step

  def _check_target(self, step: int, target, partial: bool = False) -> None:
    """Raises CheckpointError naming the key if `target` differs from what `step` stored (with `partial`, the
    checkpoint may hold more keys than the target)."""
    meta = self._manager.item_metadata(step)[STATE]
    meta = getattr(meta, "tree", meta)
    saved = {_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
    wanted = {_name(p): t for p, t in jax.tree_util.tree_flatten_with_path(target)[0]}
    where = f"checkpoint {self.directory} step {step}"
    missing = [k for k in wanted if k not in saved]
    if missing:
      raise CheckpointError(f"{where} has no {missing[:5]} ({len(missing)} missing of {len(wanted)} target keys)")
    unused = [k for k in saved if k not in wanted]
    if unused and not partial:
      raise CheckpointError(f"{where} holds {unused[:5]} that the target lacks ({len(unused)} keys)")
    for k, t in wanted.items():
      m = saved[k]
      if tuple(m.shape) != tuple(t.shape):
        raise CheckpointError(f"{where}: {k!r} has shape {list(m.shape)}, target wants {list(t.shape)}")
      if jnp.dtype(m.dtype) != jnp.dtype(t.dtype):
        raise CheckpointError(f"{where}: {k!r} has dtype {m.dtype}, target wants {t.dtype}")

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save(step)` would write (the save interval), so callers can skip gathering state."""
    return self._manager.should_save(int(step))

  def wait(self) -> None:
    """Blocks until every started save is on disk (and old steps are deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
