"""Reading and writing the safetensors format with numpy (bf16 via ml_dtypes, no torch).

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensor bytes. `SafetensorsFile.get` returns a read-only view of a memory map; `read_shards`
reads pieces of a re-laid-out tensor (transposed, reshaped) straight into new arrays in chunks with
`pread`, so a loader never holds more than one tensor and no file pages stay mapped into the process.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import queue
import struct
import threading
from typing import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
CHUNK_BYTES = 8 * 2**20  # how much of a tensor `read_shards` reads at a time, per thread
WORKERS = min(4, os.cpu_count() or 1)  # threads of `read_shards`
TILE = 256  # a transposing copy goes in TILE x TILE blocks, which stay in cache


class SafetensorsFile:
  """One `.safetensors` file: `keys()`, `shape(k)`, `dtype(k)`, `get(k)` (a memory-mapped view)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      size = os.path.getsize(self.path)
      with open(self.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100 * 2**20:
          raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        header = json.loads(f.read(n))
      metadata = header.pop("__metadata__", None) or {}
      end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (OSError, ValueError, struct.error, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
      raise ValueError(f"{self.path} is not a readable safetensors file: {e}") from e
    if 8 + n + end > size:
      raise ValueError(f"{self.path} is truncated: its tensors end at byte {8 + n + end}, "
                       f"the file has {size}")
    self.metadata = metadata
    self._header = header
    self._data_start = 8 + n
    self._mmap = None
    self._fd = None
    self._open_lock = threading.Lock()

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    name = self._header[key]["dtype"]
    if name not in DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
    return np.dtype(DTYPES[name])

  def get(self, key: str) -> np.ndarray:
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = self._header[key]["data_offsets"]
    raw = self._mmap[self._data_start + start:self._data_start + end]
    return raw.view(self.dtype(key)).reshape(self.shape(key))

  def offset(self, key: str) -> int:
    """Where the tensor's bytes start in the file."""
    return self._data_start + self._header[key]["data_offsets"][0]

  def read_into(self, offset: int, out: np.ndarray) -> None:
    """Fills the (contiguous) `out` with the file's bytes from `offset` on, with pread."""
    with self._open_lock:
      if self._fd is None:
        self._fd = os.open(self.path, os.O_RDONLY)
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
      n = os.preadv(self._fd, [view[done:]], offset + done)
      if n == 0:
        raise ValueError(f"{self.path} ends before byte {offset + len(view)}")
      done += n

  def close(self) -> None:
    """Closes the file; arrays `get` returned stay valid."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    self._mmap = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def aligned_empty(shape: Sequence[int], dtype, align: int = 64) -> np.ndarray:
  """`np.empty` whose data is `align`-byte aligned (which XLA's CPU client can adopt without a copy)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_shards(f: SafetensorsFile, key: str, view: Callable[[np.ndarray], np.ndarray],
                boxes: Sequence[tuple[slice, ...]], dtype,
                chunk_bytes: int = CHUNK_BYTES) -> list[np.ndarray]:
  """`view(tensor)[box].astype(dtype)` for every box, reading the tensor once, a chunk at a time.

  `view` re-lays the stored tensor out without copying (transpose, reshape). Its strides tell which
  axis is outermost in the file; the tensor is read along that axis in chunks of about `chunk_bytes`
  with pread, by up to WORKERS threads, and each chunk is cast into the part of every box it covers.
  The results are aligned (`aligned_empty`). Boxes are tuples of unit-step slices, one per axis, as in
  `jax.Array` shard indices.
  """
  stored = f.get(key)  # memory-mapped: here only for the layout, its pages are never touched
  v = view(stored)
  outs = [aligned_empty(_box_shape(box, v.shape), dtype) for box in boxes]
  lo, hi = stored.ctypes.data, stored.ctypes.data + stored.nbytes
  start = v.ctypes.data
  end = start + sum((n - 1) * s for n, s in zip(v.shape, v.strides)) + v.itemsize
  in_file = v.size > 0 and lo <= start and end <= hi
  if v.ndim == 0 or not in_file or any(s < 0 or s % v.itemsize for s in v.strides):
    for out, box in zip(outs, boxes):  # `view` copied (or laid out oddly): read from that copy
      np.copyto(out, v[box], casting="unsafe")
    return outs

  k = max(range(v.ndim), key=lambda i: (v.shape[i] > 1, v.strides[i]))
  unit = v.strides[k]
  span = sum((n - 1) * s for i, (n, s) in enumerate(zip(v.shape, v.strides)) if i != k) + v.itemsize
  ranges = [_bounds(box[k], v.shape[k]) for box in boxes]
  first, last = min(r[0] for r in ranges), max(r[1] for r in ranges)
  if first >= last:
    return outs
  step = max(1, chunk_bytes // max(unit, 1))
  size = (min(step, last - first) - 1) * unit + span
  dtype = np.dtype(dtype)
  strides = tuple(s // v.itemsize * dtype.itemsize for s in v.strides)
  offset = f.offset(key) + (start - lo)
  starts = range(first, last, step)
  workers = min(WORKERS, len(starts))
  buffers = queue.SimpleQueue()  # one (read, cast) pair of buffers per worker
  for _ in range(workers):
    cast = None if dtype == v.dtype else np.empty(size // v.itemsize, dtype)
    buffers.put((np.empty(size, np.uint8), cast))

  def one_chunk(a):
    b = min(a + step, last)
    nbytes = (b - a - 1) * unit + span
    buf, cast = buffers.get()
    try:
      f.read_into(offset + a * unit, buf[:nbytes])
      shape = v.shape[:k] + (b - a,) + v.shape[k + 1:]
      if cast is None:
        chunk = np.ndarray(shape, dtype, buf, 0, v.strides)
      else:  # the cast runs over the chunk as read (contiguous, fast), before any transposing copy
        np.copyto(cast[:nbytes // v.itemsize], buf[:nbytes].view(v.dtype), casting="unsafe")
        chunk = np.ndarray(shape, dtype, cast, 0, strides)
      for out, box, (r0, r1) in zip(outs, boxes, ranges):
        c0, c1 = max(a, r0), min(b, r1)
        if c0 < c1:
          src = box[:k] + (slice(c0 - a, c1 - a),) + box[k + 1:]
          dst = (slice(None),) * k + (slice(c0 - r0, c1 - r0),)
          _copy(out[dst], chunk[src])
    finally:
      buffers.put((buf, cast))

  if workers == 1:
    for a in starts:
      one_chunk(a)
  else:  # chunks fill disjoint parts of the outputs; numpy and pread release the GIL
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(one_chunk, starts))
  return outs


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
  """`dst[...] = src` with casting; in tiles when the two have different fastest axes (a transpose)."""
  axes = [a for a in range(src.ndim) if src.shape[a] > 1]
  i = min(axes, key=lambda a: src.strides[a], default=None)
  j = min(axes, key=lambda a: dst.strides[a], default=None)
  if i == j:
    np.copyto(dst, src, casting="unsafe")
    return
  for a in range(0, src.shape[i], TILE):
    for b in range(0, src.shape[j], TILE):
      box = tuple(slice(a, a + TILE) if n == i else slice(b, b + TILE) if n == j else slice(None)
                  for n in range(src.ndim))
      np.copyto(dst[box], src[box], casting="unsafe")


def _bounds(s: slice, n: int) -> tuple[int, int]:
  start, stop, step = s.indices(n)
  if step != 1:
    raise ValueError(f"read_shards needs unit-step slices, got {s}")
  return start, max(start, stop)


def _box_shape(box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(box) != len(shape):
    raise ValueError(f"box {box} does not have one slice per axis of shape {shape}")
  return tuple(b - a for a, b in (_bounds(s, n) for s, n in zip(box, shape)))


def checkpoint_files(path: str | os.PathLike) -> list[str]:
  """The safetensors files of an HF model directory (from the index if sharded)."""
  path = os.fspath(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
      raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
    return [os.path.join(path, f) for f in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  return [os.path.join(path, f) for f in found]


def iter_tensors(files: list[str]) -> Iterator[tuple[str, SafetensorsFile]]:
  """Yields (key, file) for every tensor in every file, file by file."""
  for path in files:
    with SafetensorsFile(path) as f:
      for key in f.keys():
        yield key, f


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (numpy, bf16 as ml_dtypes.bfloat16) to `path` atomically (tmp + rename)."""
  header, offset = {}, 0
  arrays = {}
  for key, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in NAMES:
      raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be written to safetensors")
    header[key] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + arr.nbytes]}
    arrays[key] = arr
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays.values():
      f.write(arr.reshape(-1).view(np.uint8))  # the array's own bytes, no copy
  os.replace(tmp, path)
