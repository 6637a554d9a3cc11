"""Multi-process runs: joining the JAX distributed runtime, the main process, global arrays to host, host values
shared between processes (`host_allgather`, `ragged_allgather`, `share_by_key`).

One Python process per host (TPU pod) or per simulated host (CPU tests). `initialize` must run
before anything touches a JAX backend (`jax.devices()`, array creation, compilation); after it,
`jax.devices()` lists every process's devices and a mesh over them spans all processes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def _backends_initialized() -> bool:
  from jax._src import xla_bridge  # no public API says whether a backend exists yet
  return xla_bridge.backends_are_initialized()


def _cluster_detected() -> bool:
  """Whether jax's auto-detection finds a multi-process environment (Cloud TPU, SLURM, Open MPI, k8s)."""
  from jax._src import clusters  # what `jax.distributed.initialize()` consults when given no arguments
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return any(not env.opt_in_only_method and env.is_env_present() for env in clusters.ClusterEnv._cluster_types)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, cpu_collectives: str | None = "gloo", local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300) -> bool:
  """Joins this process to a multi-process JAX run; returns whether the distributed runtime is up.

  With no arguments jax auto-detects the cluster (Cloud TPU pod slices, SLURM, ...); when it finds
  none, or with `num_processes=1`, this process runs alone and nothing happens. Off a managed
  cluster (CPU tests), pass `coordinator="host:port"` (process 0 listens there), `num_processes`
  and `process_id` — or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which a
  call without arguments (e.g. a training job's) reads. `cpu_collectives` selects the CPU backend's
  cross-process collectives (None leaves jax's default). Must be called before any other JAX use.
  """
  if jax.distributed.is_initialized():
    return True
  # Off a managed cluster, `launch`-style wrappers (and the tests) can pass the three values by environment.
  env = os.environ
  if coordinator is None and num_processes is None and process_id is None and env.get("JAX_NUM_PROCESSES"):
    coordinator = env.get("JAX_COORDINATOR_ADDRESS")
    num_processes, process_id = int(env["JAX_NUM_PROCESSES"]), int(env.get("JAX_PROCESS_ID", -1))
  if num_processes == 1:
    return False
  args = (coordinator, num_processes, process_id)
  if any(a is None for a in args) and not _cluster_detected():
    if all(a is None for a in args):
      return False  # no cluster around: a single process
    raise ValueError(f"no cluster environment to detect the rest from: pass coordinator, num_processes and "
                     f"process_id together (got coordinator={coordinator!r}, num_processes={num_processes}, "
                     f"process_id={process_id})")
  if _backends_initialized():
    raise RuntimeError("zoomer_jax.parallel.distributed.initialize() must run before any other JAX use: a "
                       "backend is already initialised (jax.devices(), an array or a jit call came first)")
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids,
                             initialization_timeout=timeout_s)
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, checkpoints and exports."""
  return jax.process_index() == 0


def to_host(tree: Any) -> Any:
  """Each array leaf (numpy, local or global jax.Array) -> its full value as numpy, on every process.

  A global array that is not fully addressable is gathered across processes: a collective, so every
  process must call this with the same arrays in the same order. A replicated one is read from this process's
  own copy (no communication).
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def host_allgather(x: np.ndarray) -> np.ndarray:
  """[num_processes, *x.shape]: every process's host array `x` (same shape and dtype everywhere), stacked in
  process order. A collective (every process calls it in the same order); no communication in one process."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def ragged_allgather(x: np.ndarray) -> list[np.ndarray]:
  """Every process's host array `x`, whose leading length may differ between processes (trailing shape and
  dtype may not): a list in process order. Two collectives (the lengths, then the arrays padded to the longest)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return [x]
  lengths = host_allgather(np.asarray(len(x), np.int64))
  longest = int(lengths.max())
  if longest == 0:
    return [x[:0]] * len(lengths)
  padded = np.zeros((longest, *x.shape[1:]), x.dtype)
  padded[:len(x)] = x
  everything = host_allgather(padded)
  return [everything[p, :int(n)] for p, n in enumerate(lengths)]


_ARRAY = "__ndarray__"  # a packed dict with this key stands for an array: [dtype, shape, byte offset, is scalar]


def pack(tree: Any) -> np.ndarray:
  """uint8 [n]: `tree` (nested lists, tuples, dicts with str keys, str, int, float, bool, None, numpy arrays and
  scalars) as bytes that `unpack` turns back into it exactly: arrays keep their dtype, shape and bytes; tuples
  come back as lists. Layout: an 8-byte little-endian header length, a JSON header, the arrays' raw bytes."""
  chunks, offset = [], 0

  def one(x):
    nonlocal offset
    if isinstance(x, (np.ndarray, np.generic)):
      a = np.asarray(x)
      if a.dtype.hasobject or a.dtype.names:
        raise TypeError(f"pack: arrays of dtype {a.dtype} (objects or fields) cannot be packed")
      ref = {_ARRAY: [a.dtype.str, list(a.shape), offset, isinstance(x, np.generic)]}
      chunks.append(a.tobytes())
      offset += len(chunks[-1])
      return ref
    if isinstance(x, (list, tuple)):
      return [one(v) for v in x]
    if isinstance(x, dict):
      if not all(isinstance(k, str) for k in x):
        raise TypeError(f"pack: dict keys must be str, got {sorted({type(k).__name__ for k in x})}")
      return {k: one(v) for k, v in x.items()}
    if x is None or isinstance(x, (str, bool, int, float)):
      return x
    raise TypeError(f"pack: cannot pack a {type(x).__name__}")

  header = json.dumps(one(tree), separators=(",", ":")).encode()
  return np.frombuffer(b"".join([len(header).to_bytes(8, "little"), header, *chunks]), np.uint8)


def unpack(blob: np.ndarray) -> Any:
  """The tree `pack` made `blob` (uint8 [n]) from."""
  data = np.asarray(blob, np.uint8).tobytes()
  n = int.from_bytes(data[:8], "little")
  body = memoryview(data)[8 + n:]

  def one(x):
    if isinstance(x, dict) and _ARRAY in x:
      dtype, shape, offset, scalar = x[_ARRAY]
      size = int(np.prod(shape, dtype=np.int64))
      a = np.frombuffer(body, np.dtype(dtype), count=size, offset=offset) if size else np.zeros(0, dtype)
      a = a.reshape(shape).copy()
      return a[()] if scalar else a
    if isinstance(x, dict):
      return {k: one(v) for k, v in x.items()}
    if isinstance(x, list):
      return [one(v) for v in x]
    return x
  return one(json.loads(data[8:8 + n]))


def share_by_key(local: dict) -> dict:
  """Every process's `local` {key: value} (int or str keys, disjoint between processes; values as `pack` takes
  them) merged into one dict, identical on every process: process order, then each process's own order. Values
  arrive exactly (arrays bit for bit), tuples as lists. A collective: every process calls it, in the same order,
  with a dict that may be empty. In one process it returns `local` itself and communicates nothing."""
  if jax.process_count() == 1:
    return local
  merged, sender = {}, {}
  for p, blob in enumerate(ragged_allgather(pack([[k, v] for k, v in local.items()]))):
    for key, value in unpack(blob):
      if key in merged:
        raise ValueError(f"share_by_key: key {key!r} sent by processes {sender[key]} and {p}; keys must be disjoint")
      merged[key], sender[key] = value, p
  return merged


def kv_store():
  """The distributed runtime's key-value store (the client `initialize` connected: atomic counters, keys every
  process sees), for coordination that is not a collective."""
  from jax._src.distributed import global_state  # noqa: PLC0415 (jax has no public handle on it)
  if global_state.client is None:
    raise RuntimeError("the distributed key-value store needs jax.distributed.initialize "
                       "(zoomer_jax.parallel.distributed.initialize)")
  return global_state.client


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def put(tree: Any, shardings: Any) -> Any:
  """Lays `tree` out by `shardings` (a tree of Shardings), also across processes.

  A leaf already spread over several processes is resharded; any other leaf (numpy, a process-local array)
  must hold the same value on every process and becomes a global array built from its local slices.
  """
  def one(x, sharding):
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      impl = jax.random.key_impl(x)
      data = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
      return jax.random.wrap_key_data(data, impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(one, tree, shardings)


def mesh_of(tree: Any):
  """The mesh of the first leaf of `tree` laid out by a NamedSharding (e.g. a model's parameters), or None."""
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  return None


def replicate(tree: Any, mesh) -> Any:
  """Host values (numpy, Python scalars, process-local arrays) as global arrays replicated over `mesh` when the
  mesh spans several processes; `tree` unchanged otherwise (one process, or no mesh).

  Arrays already spread over several processes are left as they are. Every process must pass the same
  values: each one only copies its own devices' replicas (no communication, no check).
  """
  if mesh is None or jax.process_count() == 1 or not mesh.is_multi_process:
    return tree
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    return put(x, rep)
  return jax.tree.map(one, tree)
