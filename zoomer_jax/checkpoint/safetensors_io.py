"""Reading and writing the safetensors format with numpy memory maps (bf16 via ml_dtypes, no torch).

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensor bytes. Tensors are returned as read-only views of a memory map, so a loader can
hand them one at a time to the devices without holding a host copy of the whole model.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


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
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
      raise ValueError(f"{self.path} is not a readable safetensors file: {e}") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._header = header
    self._data_start = 8 + n
    self._mmap = None

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
    f = SafetensorsFile(path)
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
      f.write(arr.tobytes())
  os.replace(tmp, path)
