"""Training sequences and the padded, bucketed batches a jitted step consumes.

An `Example` is one token sequence with its images (an SFT conversation or a GRPO trajectory):

    ids        int32 [L]         the whole conversation, vision pads expanded
    loss_mask  float32 [L]       1 where ids[t] is a target (assistant / model tokens), else 0
    pixel_values [P, 1176], image_grid_thw [n, 3]   every image, in placeholder order
    token_values {name: float32 [L]}   per-token inputs of the loss (old / reference / sampler log-probs)
    seq_values   {name: float}         per-sequence inputs (the GRPO advantage)

`make_batch` lays a list of examples out as `rows` rows of a bucketed length with 3-D M-RoPE positions
computed exactly as at sampling time (so trainer and sampler log-probs agree), each row's images beside it
(`VisionInput` [rows, patches, ...], split over the mesh with the rows) and image counts padded to a bucket, so
a run compiles a handful of programs. Rows beyond the examples are empty (all masks 0).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.mrope import rope_index
from zoomer_jax.model.qwen25vl import VisionInput, vision_input
from zoomer_jax.model.vision_layout import LayoutSizes, layout_sizes
from zoomer_jax.sampling.sampler import round_up

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass
class Example:
  ids: np.ndarray
  loss_mask: np.ndarray
  pixel_values: np.ndarray | None = None
  image_grid_thw: np.ndarray | None = None
  token_values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  seq_values: dict[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.ids = np.asarray(self.ids, np.int32).reshape(-1)
    self.loss_mask = np.asarray(self.loss_mask, np.float32).reshape(-1)
    if self.loss_mask.shape != self.ids.shape:
      raise ValueError(f"loss_mask has {self.loss_mask.size} entries for {self.ids.size} ids")
    for name, v in self.token_values.items():
      if np.shape(v) != self.ids.shape:
        raise ValueError(f"token value {name!r} has shape {np.shape(v)}, ids {self.ids.shape}")

  @property
  def n_images(self) -> int:
    return 0 if self.image_grid_thw is None else len(self.image_grid_thw)

  def truncated(self, max_len: int) -> "Example":
    """The first max_len tokens; images whose pads are cut (even partly) are dropped with them."""
    if len(self.ids) <= max_len:
      return self
    if self.n_images:
      raise ValueError(f"a sequence of {len(self.ids)} tokens with images exceeds {max_len}; cutting "
                       "through its images is not supported: raise the length limit or drop the example")
    return dataclasses.replace(self, ids=self.ids[:max_len], loss_mask=self.loss_mask[:max_len],
                               token_values={k: v[:max_len] for k, v in self.token_values.items()})


@struct.dataclass
class TrainBatch:
  ids: jax.Array  # int32 [B, L]
  positions: jax.Array  # int32 [3, B, L]
  token_mask: jax.Array  # bool [B, L]: real tokens
  loss_mask: jax.Array  # float32 [B, L]: targets
  images: VisionInput | None
  token_values: dict  # name -> float32 [B, L]
  seq_values: dict  # name -> float32 [B]

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.ids.shape)


def batch_length(examples: Sequence[Example | None], token_bucket: int) -> int:
  return round_up(max(len(e.ids) for e in examples if e is not None), token_bucket)


def make_batch(cfg: ModelConfig, examples: Sequence[Example | None], *, rows: int | None = None,
               token_bucket: int = 0, image_bucket: int = 0, pad_id: int = 0, length: int | None = None,
               sizes: LayoutSizes | None = None, token_names: Sequence[str] | None = None,
               seq_names: Sequence[str] | None = None, pieces: int = 1) -> TrainBatch:
  """`examples` as a right-padded [rows, length] host batch (numpy leaves); see the module docstring. A None
  example is an empty row, as are rows past the examples. `pieces`: how many pieces each row's images are cut
  into (`rules.vision_pieces` of the mesh it runs on). `sizes` fixes the images' padded shapes, `token_names` /
  `seq_names` the per-token / per-sequence values (by default those the examples have): several processes agree
  on them (`make_global_batch`)."""
  if not examples:
    raise ValueError("make_batch needs at least one example")
  rows = len(examples) if rows is None else rows
  if rows < len(examples):
    raise ValueError(f"{len(examples)} examples do not fit {rows} rows")
  length = batch_length(examples, token_bucket) if length is None else length
  ids = np.full((rows, length), pad_id, np.int32)
  token_mask = np.zeros((rows, length), bool)
  loss_mask = np.zeros((rows, length), np.float32)
  real = [e for e in examples if e is not None]
  token_names = sorted({k for e in real for k in e.token_values} if token_names is None else token_names)
  seq_names = sorted({k for e in real for k in e.seq_values} if seq_names is None else seq_names)
  token_values = {k: np.zeros((rows, length), np.float32) for k in token_names}
  seq_values = {k: np.zeros((rows,), np.float32) for k in seq_names}
  pixels, grids = [None] * rows, [None] * rows
  for i, e in enumerate(examples):
    if e is None:
      continue
    n = len(e.ids)
    if n > length:
      raise ValueError(f"example {i} has {n} tokens, more than the batch length {length}")
    ids[i, :n], token_mask[i, :n], loss_mask[i, :n] = e.ids, True, e.loss_mask
    for k in token_names:
      if k not in e.token_values:
        raise ValueError(f"example {i} lacks token value {k!r} that others have")
      token_values[k][i, :n] = e.token_values[k]
    for k in seq_names:
      if k not in e.seq_values:
        raise ValueError(f"example {i} lacks sequence value {k!r} that others have")
      seq_values[k][i] = e.seq_values[k]
    if e.n_images:
      pixels[i] = np.asarray(e.pixel_values, np.float32)
      grids[i] = np.asarray(e.image_grid_thw, np.int64).reshape(-1, 3)
  every = [g for g in grids if g is not None]
  positions, _ = rope_index(ids, cfg, attention_mask=token_mask,
                            image_grid_thw=np.concatenate(every) if every else None)
  images = vision_input(cfg, pixels, grids, image_bucket=image_bucket, sizes=sizes, pieces=pieces)
  return TrainBatch(ids=ids, positions=positions.astype(np.int32), token_mask=token_mask, loss_mask=loss_mask,
                    images=images, token_values=token_values, seq_values=seq_values)


def row_spec(mesh: Mesh, rows: int) -> PartitionSpec:
  """How a batch of `rows` rows lays its row axis out: split over (data, fsdp) when it divides, else replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  n = int(np.prod([mesh.shape[a] for a in axes]))
  return PartitionSpec(axes) if rows % n == 0 else PartitionSpec()


def batch_sharding(mesh: Mesh | None, batch: TrainBatch):
  """Shardings for `batch`: the row axis (of every leaf, images included) split over (data, fsdp) when it divides,
  everything else replicated."""
  if mesh is None:
    return None
  spec = row_spec(mesh, batch.ids.shape[0])
  rep = NamedSharding(mesh, PartitionSpec())

  def spec_for(path, x):
    if not spec:
      return rep
    names = [getattr(p, "name", getattr(p, "key", None)) for p in path]
    if names[0] == "positions":
      return NamedSharding(mesh, PartitionSpec(None, *spec))
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(spec_for, batch)


def local_rows(mesh: Mesh | None, rows: int) -> list[int]:
  """The rows of a `rows`-row batch that this process's devices hold (all of them when the rows are replicated,
  or in a single process)."""
  if mesh is None:
    return list(range(rows))
  held = NamedSharding(mesh, row_spec(mesh, rows)).addressable_devices_indices_map((rows,))
  return sorted({r for idx in held.values() for r in range(*idx[0].indices(rows))})


def make_global_batch(cfg: ModelConfig, local: dict[int, Example | None], mesh: Mesh, *, rows: int, length: int,
                      image_bucket: int = 0, pad_id: int = 0, token_names: Sequence[str] | None = None,
                      seq_names: Sequence[str] | None = None, pieces: int = 1) -> TrainBatch:
  """A global batch (jax arrays laid out by `batch_sharding`) from this process's rows only.

  `local` maps each row this process holds (`local_rows(mesh, rows)`) to its example (None: an empty row); every
  process must pass the same `length` (e.g. bucketed from the global longest row, which `RecordStream.take` gives
  every process), and the same `token_names` / `seq_names` when some process's rows may lack a value (all empty).
  Every leaf, images included, is built from the local rows alone; the processes agree on the images' padded
  shapes by exchanging their rows' grids (a collective when no process holds every row).
  """
  want = local_rows(mesh, rows)
  missing = [r for r in want if r not in local]
  if missing:
    raise ValueError(f"make_global_batch: this process holds rows {missing} but was given no example for them")
  mine = [local[r] for r in want]
  names = dict(token_names=token_names, seq_names=seq_names, pieces=pieces)
  if len(want) == rows:  # every row is here (one process, or replicated rows): the whole batch
    host = make_batch(cfg, mine, rows=rows, length=length, image_bucket=image_bucket, pad_id=pad_id, **names)
    return _global_arrays(host, mesh, list(range(rows)), rows)
  sizes = _global_sizes(cfg, mine, image_bucket, pieces)
  host = make_batch(cfg, mine, rows=len(want), length=length, pad_id=pad_id, sizes=sizes, **names)
  return _global_arrays(host, mesh, want, rows)


def _global_sizes(cfg: ModelConfig, examples: Sequence[Example], image_bucket: int,
                  pieces: int) -> LayoutSizes | None:
  """The images' padded shapes fitted to every process's rows (None when no row has an image): each process
  sends its rows' grids, [n, 4] (row, t, h, w), and all fit the sizes to all of them."""
  from zoomer_jax.parallel.distributed import ragged_allgather  # noqa: PLC0415
  grids = [np.concatenate([np.full((e.n_images, 1), i), np.asarray(e.image_grid_thw, np.int64).reshape(-1, 3)], 1)
           for i, e in enumerate(examples) if e is not None and e.n_images]
  every = ragged_allgather(np.concatenate(grids) if grids else np.zeros((0, 4), np.int64))
  per_row = [g[g[:, 0] == r, 1:] for g in every for r in np.unique(g[:, 0])]
  return layout_sizes(per_row, cfg.vision, image_bucket, pieces) if per_row else None


def _global_arrays(host: TrainBatch, mesh: Mesh, held: list[int], rows: int) -> TrainBatch:
  """Global arrays of `rows` rows from host arrays holding rows `held` (in that order) of every leaf (row axis
  1 for positions, 0 for the rest)."""
  where = {r: i for i, r in enumerate(held)}
  shardings = batch_sharding(mesh, host.replace(ids=np.zeros((rows, 1), np.int32)))

  def one(path, x, sharding):
    x = np.asarray(x)
    names = [getattr(p, "name", getattr(p, "key", None)) for p in path]
    axis = 1 if names[0] == "positions" else 0
    if len(held) == rows and held == list(range(rows)):
      return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    shape = x.shape[:axis] + (rows,) + x.shape[axis + 1:]

    def block(idx):
      picked = np.take(x, [where[r] for r in range(*idx[axis].indices(rows))], axis=axis)
      return picked[tuple(slice(None) if a == axis else s for a, s in enumerate(idx))]
    return jax.make_array_from_callback(shape, sharding, block)
  return jax.tree_util.tree_map_with_path(one, host, shardings)


def to_device(batch: TrainBatch, mesh: Mesh | None = None) -> TrainBatch:
  """Puts a host batch on the devices (split over the mesh's batch axes when given)."""
  shardings = batch_sharding(mesh, batch)
  if shardings is None:
    return jax.tree.map(jnp.asarray, batch)
  return jax.device_put(batch, shardings)
