"""Append-only JSONL logs that survive a kill, and atomic file writes.

    rows = read_log(path)          # complete lines; a torn last line (a kill mid-write) is cut off the file
    with AppendLog(path) as log:   # each append is one whole line, flushed and fsynced before it returns
      log.append({"key": ...})
    write_atomic(path, data)       # readers see the old file or the new one, never half of one

A line in the middle that is not JSON is not a torn write: it is reported with its line number, and nothing is
cut.
"""

from __future__ import annotations

import json
import os


class LogError(ValueError):
  """A log file that is damaged other than by a torn last line."""


def read_log(path: str) -> list[dict]:
  """The objects of a JSONL log (empty if there is none). A last line that is not JSON was torn by a kill: the
  file is truncated to the end of the last good line, so appends stay whole (a last line that is whole JSON but
  lacks its newline keeps its object and gets the newline)."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  rows, good_end, pos = [], 0, 0
  for n, line in enumerate(lines, 1):
    pos_next = pos + len(line) + 1
    if line.strip():
      try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
          raise ValueError(f"a line must hold a JSON object, got {type(obj).__name__}")
      except ValueError as e:
        if n == len(lines):
          break  # the torn tail
        raise LogError(f"{path}: line {n} is not a JSON object ({e}); fix or remove that line") from None
      rows.append(obj)
      good_end = min(pos_next, len(data))
    pos = pos_next
  if good_end < len(data) and data[good_end:].strip():
    with open(path, "r+b") as f:
      f.truncate(good_end)
  if rows and not data[:good_end].endswith(b"\n"):
    with open(path, "ab") as f:
      f.write(b"\n")
  return rows


class AppendLog:
  """One writer appending JSON lines; each `append` is on disk when it returns."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._f = open(path, "a", encoding="utf-8")

  def append(self, obj: dict) -> None:
    self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    self._f.flush()
    os.fsync(self._f.fileno())

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> "AppendLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `path` through a temporary file and a rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
