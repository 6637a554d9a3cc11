"""The two record formats of VideoZoomer (docs/training.md) and their loaders: RL/eval questions and SFT chats.

RL / eval record (verl's `data.train_files` / `data.val_files`, the original's `multimodal_dataset.py`):

  {"problem": "... <image> ... A. ... B. ...",   # the question; <image> marks where the video goes
   "solution": "B",                              # ground truth (verl renames it `ground_truth`)
   "data_source": "lvb",                         # picks the reward function; the metric key
   "videos": ["videos/abc.mp4"],                 # exactly one local path
   "extra_info": {"answer_type": "multiple_choice" | "open_ended", ...},
   "doc_id": 17}                                 # optional (str or int)

SFT record (LLaMA-Factory's sharegpt-style `messages` format, as the original's distillation writes it):

  {"messages": [{"role": "system" | "user" | "assistant" | "tool" | "observation", "content": "... <image> ..."}],
   "images": ["frames/0.png", ...],   # one path per <image> placeholder, in order of appearance
   "id": "..."}                       # optional; defaults to "<file name>#<record index>"

  `tool` and `observation` turns are tool responses: non-assistant turns (no loss on them), kept with the role
  as written. VideoZoomer itself feeds tool results back as `user` turns; the other two names are accepted for
  data written by other tool-use pipelines. A `system` turn may only come first. A message has exactly the keys
  `role` and `content` (a string); anything else is an error rather than silently dropped.

Files (`load_records`): a `.json` list, a `.jsonl` (one object per line), a `.yaml` spec as the original reads

  datasets:
    - json_path: a.json                   # relative to the yaml's folder
      sampling_strategy: all | first:N | first:P% | end:N | end:P% | random:N | random:P%

  (P% keeps ceil(P * n / 100) records, as the original does; `random` shuffles with one `random.Random(42)` shared
  by the yaml's entries in order, as the original's `random.seed(42)` + `random.shuffle`), or a list of any of these,
  concatenated (verl accepts a list of files too). Relative `videos`/`images` paths are resolved against the
  folder of the JSON file that holds the record (or `base_dir` if given); absolute paths are kept. Media files are
  not opened here. Keys other than the ones above are ignored.

Every error names the file, the record index and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Sequence
from typing import Any, Union

import yaml

from zoomer_jax.agent.protocol import IMAGE

ANSWER_TYPES = ("multiple_choice", "open_ended")
SFT_ROLES = ("system", "user", "assistant", "tool", "observation")
TOOL_ROLES = ("tool", "observation")  # tool-response turns: treated like user turns (no loss)
RANDOM_SEED = 42  # the original's random.seed(42) before `random:N` sampling
KINDS = ("rl", "sft")

PathSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class RecordError(ValueError):
  """A record, or the file holding it, does not follow the format; the message says where and what."""


@dataclasses.dataclass(frozen=True)
class RLRecord:
  """One RL / eval question about one video. `video` is a resolved path; `extra_info` holds `answer_type` too."""
  problem: str
  solution: str
  data_source: str
  video: str
  answer_type: str
  doc_id: str | int | None
  extra_info: dict  # read-only by convention (JSON-able; written to eval dumps as is)


@dataclasses.dataclass(frozen=True)
class SFTRecord:
  """One SFT chat: `messages` of {"role", "content"}, `images` (resolved paths) one per <image> in order."""
  messages: tuple[dict, ...]
  images: tuple[str, ...]
  id: str


def _resolve(path: str, base_dir: str | None) -> str:
  if base_dir is None or os.path.isabs(path):
    return path
  return os.path.normpath(os.path.join(base_dir, path))


def _field(obj: dict, key: str, where: str, types: type | tuple[type, ...], what: str):
  if key not in obj:
    raise RecordError(f"{where}: missing field {key!r}")
  value = obj[key]
  if not isinstance(value, types) or isinstance(value, bool):
    raise RecordError(f"{where}: field {key!r} must be {what}, got {type(value).__name__}: {value!r:.80}")
  return value


def parse_rl_record(obj: Any, where: str, base_dir: str | None = None) -> RLRecord:
  """Validates one RL/eval JSON object (`where` names it in errors) and resolves its video path."""
  if not isinstance(obj, dict):
    raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
  problem = _field(obj, "problem", where, str, "a string")
  if IMAGE not in problem:
    raise RecordError(f"{where}: field 'problem' has no {IMAGE} placeholder for the video: {problem!r:.80}")
  solution = _field(obj, "solution", where, (str, int, float), "a string")
  data_source = _field(obj, "data_source", where, str, "a string")
  if not data_source:
    raise RecordError(f"{where}: field 'data_source' is empty")
  videos = _field(obj, "videos", where, list, "a list with one path")
  if len(videos) != 1 or not isinstance(videos[0], str) or not videos[0]:
    raise RecordError(f"{where}: field 'videos' must be a list with exactly one path, got {videos!r:.120}")
  extra_info = _field(obj, "extra_info", where, dict, "an object")
  answer_type = extra_info.get("answer_type")
  if answer_type not in ANSWER_TYPES:
    raise RecordError(f"{where}: field 'extra_info.answer_type' must be one of {ANSWER_TYPES}, got {answer_type!r}")
  doc_id = obj.get("doc_id")
  if doc_id is not None and (not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool)):
    raise RecordError(f"{where}: field 'doc_id' must be a string or an integer, got {doc_id!r:.80}")
  return RLRecord(problem=problem, solution=str(solution), data_source=data_source,
                  video=_resolve(videos[0], base_dir), answer_type=answer_type, doc_id=doc_id,
                  extra_info=dict(extra_info))


def parse_sft_record(obj: Any, where: str, base_dir: str | None = None, default_id: str | None = None) -> SFTRecord:
  """Validates one SFT JSON object (`where` names it in errors) and resolves its image paths."""
  if not isinstance(obj, dict):
    raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
  messages = _field(obj, "messages", where, list, "a list of messages")
  if not messages:
    raise RecordError(f"{where}: field 'messages' is empty")
  n_placeholders, n_assistant = 0, 0
  clean = []
  for j, m in enumerate(messages):
    at = f"{where}: field 'messages[{j}]'"
    if not isinstance(m, dict) or set(m) != {"role", "content"}:
      keys = sorted(m) if isinstance(m, dict) else type(m).__name__
      raise RecordError(f"{at} must be an object with exactly the keys 'role' and 'content', got {keys}")
    role, content = m["role"], m["content"]
    if role not in SFT_ROLES:
      raise RecordError(f"{at}.role must be one of {SFT_ROLES}, got {role!r}")
    if role == "system" and j != 0:
      raise RecordError(f"{at}.role is 'system' but a system turn may only come first")
    if not isinstance(content, str):
      raise RecordError(f"{at}.content must be a string, got {type(content).__name__}")
    n_placeholders += content.count(IMAGE)
    n_assistant += role == "assistant"
    clean.append({"role": role, "content": content})
  if n_assistant == 0:
    raise RecordError(f"{where}: field 'messages' has no assistant turn")
  images = obj.get("images", [])
  if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
    raise RecordError(f"{where}: field 'images' must be a list of paths, got {images!r:.120}")
  if len(images) != n_placeholders:
    raise RecordError(f"{where}: field 'images' has {len(images)} paths but the messages have {n_placeholders} "
                      f"{IMAGE} placeholders")
  rid = obj.get("id", default_id)
  if not isinstance(rid, (str, int)) or isinstance(rid, bool):
    raise RecordError(f"{where}: field 'id' must be a string or an integer, got {rid!r:.80}")
  return SFTRecord(messages=tuple(clean), images=tuple(_resolve(p, base_dir) for p in images), id=str(rid))


def _read_json_objects(path: str) -> list:
  """The objects of a `.json` list or a `.jsonl` file."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".jsonl"):
    objs = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          objs.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise RecordError(f"{path}: line {n} is not valid JSON ({e})") from None
    return objs
  try:
    objs = json.loads(text)
  except json.JSONDecodeError as e:
    raise RecordError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(objs, list):
    raise RecordError(f"{path}: expected a JSON list of records, got {type(objs).__name__}")
  return objs


def _sample(items: list, strategy: str, rng: random.Random, where: str) -> list:
  """The original's `sampling_strategy`: all | first:N | end:N | random:N, N also as P% (ceil(P*n/100))."""
  if strategy == "all":
    return items
  how, _, number = strategy.partition(":")
  if how not in ("first", "end", "random") or not number:
    raise RecordError(f"{where}: sampling_strategy must be all | first:N | end:N | random:N (N may be P%), "
                      f"got {strategy!r}")
  try:
    n = math.ceil(float(number[:-1]) * len(items) / 100) if number.endswith("%") else int(number)
  except ValueError:
    raise RecordError(f"{where}: sampling_strategy {strategy!r} has a bad number {number!r}") from None
  if n < 0:
    raise RecordError(f"{where}: sampling_strategy {strategy!r} asks for a negative count")
  if how == "first":
    return items[:n]
  if how == "end":
    return items[len(items) - min(n, len(items)):]
  items = list(items)
  rng.shuffle(items)
  return items[:n]


def _yaml_entries(path: str) -> list[tuple[str, str]]:
  """[(json_path resolved against the yaml's folder, sampling_strategy)] of an original-style yaml spec."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data spec not found: {path}")
  with open(path, encoding="utf-8") as f:
    spec = yaml.safe_load(f)
  entries = spec.get("datasets") if isinstance(spec, dict) else None
  if not isinstance(entries, list):
    raise RecordError(f"{path}: expected a top-level 'datasets:' list")
  out = []
  for i, e in enumerate(entries):
    where = f"{path}: datasets[{i}]"
    if not isinstance(e, dict) or "json_path" not in e:
      if isinstance(e, dict) and "data_path" in e:
        raise RecordError(f"{where}: 'data_path' (a HF load_from_disk dataset) is not supported; export it to JSON")
      raise RecordError(f"{where}: missing field 'json_path'")
    out.append((_resolve(str(e["json_path"]), os.path.dirname(path)), str(e.get("sampling_strategy", "all"))))
  return out


def load_records(path_or_spec: PathSpec, kind: str = "rl", base_dir: str | None = None) -> list:
  """All records of a `.json` / `.jsonl` / `.yaml` file (or a list of them, concatenated), in file order.

  kind: "rl" -> list[RLRecord], "sft" -> list[SFTRecord]. base_dir: where relative media paths point (default:
  the folder of the JSON file holding the record).
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  paths = [path_or_spec] if isinstance(path_or_spec, (str, os.PathLike)) else list(path_or_spec)
  rng = random.Random(RANDOM_SEED)
  records = []
  for path in map(os.fspath, paths):
    if path.endswith((".yaml", ".yml")):
      files = [(p, s, f"{path}: datasets[{i}]") for i, (p, s) in enumerate(_yaml_entries(path))]
    elif path.endswith((".json", ".jsonl")):
      files = [(path, "all", path)]
    else:
      raise RecordError(f"{path}: data files must end in .json, .jsonl or .yaml")
    for file, strategy, where in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"data file not found: {file}" + (f" (named by {where})" if where != file else ""))
      objs = _read_json_objects(file)
      indexed = _sample(list(enumerate(objs)), strategy, rng, where)
      media_dir = os.path.dirname(os.path.abspath(file)) if base_dir is None else base_dir
      name = os.path.basename(file)
      for i, obj in indexed:
        at = f"{file}: record {i}"
        if kind == "rl":
          records.append(parse_rl_record(obj, at, media_dir))
        else:
          records.append(parse_sft_record(obj, at, media_dir, default_id=f"{name}#{i}"))
  return records
