"""Benchmark annotation files, as their authors publish them -> a `Benchmark`: `Task`s plus the dirty records.

    bench = load_benchmark("videomme", "Video-MME/videomme/test-00000-of-00001.parquet", "Video-MME/data")
    bench.tasks                # [Task(video, problem, answer letter, id, data_source)]
    bench.dirty                # [DirtyRecord(id, reason, action)]: resolved as the benchmark's scorer does, or skipped
    bench.missing_videos()     # {video path: [task ids]} for videos that are not on disk
    tasks = read_benchmark(...)   # bench.tasks

Every reader gives the same problem text (`format_problem`): the `<image>` placeholder where the overview
frames go, the subtitles when asked for, the question, then one option per line as "A. text". The original's
`problem` field (`data/records.py`) is "the question with a literal <image> placeholder, plus options"; its exact
layout in the released data is unknown, so this is ours. "A. text" lines are what the multiple-choice
judge's fallback regex `([A-Z])\\.` reads when the model repeats an option.

| name          | file (layout)                                       | video path                       | source   |
|---------------|-----------------------------------------------------|----------------------------------|----------|
| mlvu          | dev `MLVU/json/<k>_<task>.json` or that folder;     | dev: root/<file stem>/<video>    | MVLU     |
|               | test `test-ground-truth/test_mcq_gt.json`           | test: root/<video>               |          |
| longvideobench| `lvb_val.json`, `validation-00000-of-00001.parquet` | root/<video_path>                | lvb      |
| videomme      | `videomme/test-00000-of-00001.parquet` (or its rows | root/<videoID>.mp4 / .MP4 / .mkv | VideoMME |
|               | as a JSON list / JSON lines)                        |                                  |          |
| lvbench       | `video_info.meta.jsonl`, or the flat table (one row | root/<key>.mp4, or video2dataset | lvbench  |
|               | per question, `lmms-lab/LVBench`'s parquet)         | root/00000/000000000.mp4         |          |
| original      | VideoZoomer RL/eval JSON (data/records.py)         | videos[0] (relative: under root) | its own  |

The data_source names are the original's reward/metric keys, so reports line up with its
`val/test_score/{data_source}` metrics (MLVU's is spelled "MVLU" there). `by_group=True` appends each
benchmark's usual breakdown, e.g. "VideoMME/long", "lvb/600", "MVLU/plotQA".

Dirty records never stop a run. A record the benchmark's own scorer reads by a rule is kept, scored by that
rule and listed as "resolved" (MLVU: an answer that equals several candidates is the last of them, as MLVU's
`choice_bench.py` sets the answer index in a loop over the candidates). Any other bad record (a missing or
empty field, an answer that is no option, a repeated id, an unreadable subtitle file) is left out and listed as
"skipped"; the reason names the file, the record's index and the field. Only a file that cannot be read at all,
or none of whose records can, raises `AnnotationError`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import json
import os
import re
from typing import Any, Callable, Sequence

from zoomer_jax.agent.protocol import IMAGE
from zoomer_jax.agent.rollout import Task
from zoomer_jax.eval import subtitles as subs
from zoomer_jax.eval.layouts import VideoFinder

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUBTITLE_MODES = ("none", "timed", "interleaved")


class AnnotationError(ValueError):
  """A malformed annotation file or record; the message names the file, record index and field."""

  def __init__(self, path: str, index: int | str | None, field: str | None, problem: str):
    where = path if index is None else f"{path}: record {index}"
    if field is not None:
      where += f": field {field!r}"
    super().__init__(f"{where}: {problem}")


class RecordError(AnnotationError):
  """One bad record: the record is skipped and reported, the run goes on."""


@dataclasses.dataclass(frozen=True)
class DirtyRecord:
  id: str  # the task id the record has or would have had
  reason: str  # names the file, the record's index and the field
  action: str  # "resolved" (kept, scored as the benchmark's scorer does) or "skipped"


@dataclasses.dataclass
class Benchmark:
  """A benchmark's tasks and what was dirty in its files. `n_records`: questions in the file(s)."""

  name: str
  annotation: str
  video_root: str
  tasks: list[Task]
  dirty: list[DirtyRecord]
  n_records: int

  @property
  def skipped(self) -> list[DirtyRecord]:
    return [d for d in self.dirty if d.action == "skipped"]

  @property
  def resolved(self) -> list[DirtyRecord]:
    return [d for d in self.dirty if d.action == "resolved"]

  def missing_videos(self) -> dict[str, list[str]]:
    """{video path: [task ids]} for the tasks whose video is not a file, in task order."""
    missing: dict[str, list[str]] = {}
    exists: dict[str, bool] = {}
    for t in self.tasks:
      if t.video not in exists:
        exists[t.video] = os.path.isfile(t.video)
      if not exists[t.video]:
        missing.setdefault(t.video, []).append(t.id)
    return missing


class Read:
  """What a reader collects: tasks, and dirty records (`record()` turns a RecordError into a skipped one)."""

  def __init__(self):
    self.tasks: list[Task] = []
    self.dirty: list[DirtyRecord] = []
    self.n_records = 0

  @contextlib.contextmanager
  def record(self, rid: str):
    self.n_records += 1
    try:
      yield
    except RecordError as e:
      self.dirty.append(DirtyRecord(rid, str(e), "skipped"))

  def resolved(self, rid: str, reason: str):
    self.dirty.append(DirtyRecord(rid, reason, "resolved"))


def format_problem(question: str, options: Sequence[str], subtitles: str | None = None) -> str:
  """`"<image>\\n[{subtitles}\\n]{question}\\nA. {options[0]}\\nB. {options[1]}..."` (module docstring)."""
  lines = [IMAGE] + ([subtitles] if subtitles else []) + [question.strip()]
  lines += [f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options)]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- file helpers
class _BadLine:
  """A JSON-lines line that does not parse: its record is skipped, not the file."""

  def __init__(self, message: str):
    self.message = message


def _load_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8-sig") as f:
      return json.load(f)
  except OSError as e:
    raise AnnotationError(path, None, None, f"cannot be read: {e}") from e
  except ValueError as e:
    raise AnnotationError(path, None, None, f"is not valid JSON: {e}") from e


def _load_jsonl(path: str) -> list:
  try:
    with open(path, encoding="utf-8-sig") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise AnnotationError(path, None, None, f"cannot be read: {e}") from e
  out = []
  for n, line in enumerate(lines):
    if line.strip():
      try:
        out.append(json.loads(line))
      except ValueError as e:
        out.append(_BadLine(f"(line {n + 1}) is not valid JSON: {e}"))
  return out


def _load_records(path: str) -> list:
  """A JSON list, JSON lines, or a parquet table (pyarrow), as a list of dicts."""
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as e:
      raise AnnotationError(path, None, None, "reading parquet needs pyarrow (pip install pyarrow); or export "
                            "the rows to JSON") from e
    try:
      records = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
      raise AnnotationError(path, None, None, f"cannot be read as parquet: {e}") from e
  else:
    records = _load_jsonl(path) if path.endswith(".jsonl") else _load_json(path)
  if not isinstance(records, list):
    raise AnnotationError(path, None, None, f"must hold a list of records, got {type(records).__name__}")
  if not records:
    raise AnnotationError(path, None, None, "holds no records")
  return records


def _field(path: str, index, record, name: str, kind: type | tuple = object):
  if isinstance(record, _BadLine):
    raise RecordError(path, index, None, record.message)
  if not isinstance(record, dict):
    raise RecordError(path, index, None, f"must be an object, got {type(record).__name__}")
  if name not in record or record[name] is None:
    raise RecordError(path, index, name, "is missing")
  value = record[name]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise RecordError(path, index, name, f"must be {want}, got {type(value).__name__} {str(value)[:40]!r}")
  return value


def _text(path: str, index, record, name: str) -> str:
  value = _field(path, index, record, name, str)
  if not value.strip():
    raise RecordError(path, index, name, "is empty")
  return value


def _options(path: str, index, record, name: str) -> list[str]:
  return _check_options(path, index, name, _field(path, index, record, name, list))


def _check_options(path: str, index, name: str, options: list) -> list[str]:
  if not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, (str, int, float)) for o in options):
    raise RecordError(path, index, name, f"must be a list of 2 to 26 option texts, got {str(options)[:80]}")
  if not all(str(o).strip() for o in options):
    raise RecordError(path, index, name, f"has an empty option: {str(options)[:80]}")
  return [str(o) for o in options]


def _letter(path: str, index, field: str, letter: str, n_options: int) -> str:
  letter = letter.strip().rstrip(".").strip("()")
  if len(letter) != 1 or letter not in LETTERS[:n_options]:
    raise RecordError(path, index, field, f"{letter!r} is not one of the options' letters "
                      f"{LETTERS[0]}-{LETTERS[n_options - 1]}")
  return letter


def _optional(record, name: str):
  """An optional field of a published record (a JSON object or a parquet row): its value, or None."""
  return record[name] if isinstance(record, dict) and name in record else None


def _rid(path: str, index, record, key: str | None, fallback: str | None = None) -> str:
  """The record's id field if it has one, else `fallback`, else "<file name>#<index>"."""
  value = _optional(record, key) if key else None
  if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
    return str(value)
  return fallback or f"{os.path.basename(path)}#{index}"


def _source(base: str, group, by_group: bool) -> str:
  return f"{base}/{group}" if by_group and group not in (None, "") else base


def _check_mode(subtitles: str, subtitle_root: str):
  if subtitles not in SUBTITLE_MODES:
    raise ValueError(f"subtitles must be one of {SUBTITLE_MODES}, got {subtitles!r}")
  if subtitles != "none" and not os.path.isdir(subtitle_root):
    raise FileNotFoundError(f"subtitle_root {subtitle_root!r} is not a folder (subtitles={subtitles!r} reads the "
                            "benchmark's subtitle files from it)")


def _subtitle_parts(mode: str, cache: dict, read: Callable, sub_path: str, *args) -> tuple[str | None, tuple]:
  """(the block for the problem text, the timed lines for the prompt builder) of one subtitle file: "timed" puts a
  block of "[start-end] text" lines before the question; "interleaved" hands the lines to the agent, which puts
  each one after the overview frame shown when it starts (`agent.protocol.user_prompt`)."""
  block = _subtitle_block(cache, read, sub_path, *args)
  if mode == "interleaved":
    return None, (cache[sub_path, args] or ()) if block is not None else ()
  return block, ()


def _subtitle_block(cache: dict, read: Callable, sub_path: str, *args) -> str | None:
  """The subtitle block of one file (read once per reader call: a video's questions share it)."""
  if (sub_path, args) not in cache:
    try:
      lines = read(sub_path, *args)
    except subs.SubtitleError as e:
      lines = RecordError(sub_path, None, None, str(e).removeprefix(f"{sub_path}: "))
    cache[sub_path, args] = lines
  lines = cache[sub_path, args]
  if isinstance(lines, RecordError):
    raise lines
  return subs.format_subtitles(lines) if lines else None


# ---------------------------------------------------------------------------------------------- MLVU
MLVU_VIDEO_LAYOUTS = ("auto", "per_task", "flat")


def read_mlvu(annotation_path: str, video_root: str, *, by_group: bool = False, video_layout: str = "auto") -> Read:
  """MLVU multiple-choice tasks (JUNJIE99/MLVU; HF `MLVU/MVLU` dev, `MLVU/MLVU_Test` test).

  `annotation_path` is a JSON list of records, or a folder of them (every `*.json`, sorted; the open-ended
  files, whose records have no `candidates`, e.g. `8_sub_scene.json` and `9_summary.json`, are passed over):

    dev   `MLVU/json/1_plotQA.json` ... `7_topic_reasoning.json`; videos in `MLVU/video/<file stem>/<video>`
    test  `test-ground-truth/test_mcq_gt.json`; videos in `MLVU_Test/video/<video>`

  Each record:
    video          file name, e.g. "movie101_66.mp4"
    question       the question text
    candidates     the option texts
    answer         the correct option's TEXT; the candidate equal to it gives the letter (see the module
                   docstring for an answer equal to several)
    question_type  (optional) the task, e.g. "plotQA"; the group for `by_group` (default: the file's stem)
    question_id    (test; optional) the task id; otherwise "<file stem>/<index>"
    duration       (seconds; unused)

  `video_layout`: "per_task" (`root/<file stem>/<video>`), "flat" (`root/<video>`), or "auto": the per-task
  folder for a dev task file (`<k>_<task>.json`), else flat, and the other one where only that one exists.
  """
  if video_layout not in MLVU_VIDEO_LAYOUTS:
    raise ValueError(f"video_layout must be one of {MLVU_VIDEO_LAYOUTS}, got {video_layout!r}")
  if os.path.isdir(annotation_path):
    files = sorted(glob.glob(os.path.join(glob.escape(annotation_path), "*.json")))
    if not files:
      raise AnnotationError(annotation_path, None, None, "folder holds no *.json files")
  else:
    files = [annotation_path]
  out, find = Read(), VideoFinder(video_root)
  for path in files:
    records = _load_records(path)
    if len(files) > 1 and not any(isinstance(r, dict) and "candidates" in r for r in records):
      continue  # an open-ended task file (sub-scene captioning, summary)
    stem = os.path.splitext(os.path.basename(path))[0]
    per_task = video_layout == "per_task" or video_layout == "auto" and re.match(r"\d+_", stem) is not None
    for i, r in enumerate(records):
      rid = _rid(path, i, r, "question_id", f"{stem}/{i}")
      with out.record(rid):
        video = _text(path, i, r, "video")
        layouts = [os.path.join(stem, video), video] if per_task else [video, os.path.join(stem, video)]
        letter = _mlvu_answer(out, rid, path, i, r)
        group = _optional(r, "question_type") or stem
        out.tasks.append(Task(video=find.first(layouts if video_layout == "auto" else layouts[:1]),
                              problem=format_problem(_text(path, i, r, "question"), r["candidates"]), answer=letter,
                              id=rid, data_source=_source("MVLU", group, by_group)))
  return out


def _mlvu_answer(out: Read, rid: str, path: str, i: int, r: dict) -> str:
  """The answer's letter as MLVU's scorer reads it: the last candidate that equals the answer."""
  _options(path, i, r, "candidates")
  answer = _field(path, i, r, "answer", (str, int, float))
  hits = [k for k, c in enumerate(r["candidates"]) if c == answer]
  if not hits:
    raise RecordError(path, i, "answer", f"{str(answer)[:60]!r} is not one of the candidates")
  if len(hits) > 1:
    out.resolved(rid, f"{path}: record {i}: field 'answer': {str(answer)[:60]!r} is candidates "
                      f"{', '.join(LETTERS[k] for k in hits)}; scored as {LETTERS[hits[-1]]}, the last, as MLVU's "
                      "scorer does")
  return LETTERS[hits[-1]]


# ---------------------------------------------------------------------------------------------- LongVideoBench
def read_longvideobench(annotation_path: str, video_root: str, *, by_group: bool = False, subtitles: str = "none",
                        subtitle_root: str = "") -> Read:
  """LongVideoBench (HF `longvideobench/LongVideoBench`): `lvb_val.json`, a JSON list, or the same rows in
  `validation-00000-of-00001.parquet`, where the options are columns `option0`..`option4` ("N/A": none):

    id                  e.g. "86CxyhFV9MI_0"; the task id
    video_id            YouTube id; the video is `<video_id>.mp4` when `video_path` is absent
    video_path          e.g. "86CxyhFV9MI.mp4", under `video_root` (the dataset's `videos/`)
    question            the question (with its referring query)
    candidates          the option texts (4 or 5); or option0..option4
    correct_choice      index of the correct option; absent in the test split (`lvb_test_wo_gt.json`)
    duration_group      8 / 15 / 60 / 600 / 3600 (s); the group for `by_group`
    subtitle_path       e.g. "86CxyhFV9MI_en.json", under `subtitle_root` (the dataset's `subtitles/`)
    starting_timestamp_for_subtitles, duration   place the subtitles in video time (`subtitles.py`)

  `subtitles="timed"` puts the video's subtitles, each with its time span, before the question
  (`zoomer_jax/eval/subtitles.py` says how this stands to LongVideoBench's interleaved input); "none" leaves
  them out.
  """
  _check_mode(subtitles, subtitle_root)
  out, cache = Read(), {}
  for i, r in enumerate(_load_records(annotation_path)):
    with out.record(_rid(annotation_path, i, r, "id")):
      options = _lvb_options(annotation_path, i, r)
      choice = _field(annotation_path, i, r, "correct_choice", (int, str))
      if isinstance(choice, str) and not choice.strip().isdigit() or not 0 <= int(choice) < len(options):
        raise RecordError(annotation_path, i, "correct_choice", f"{choice!r} is outside the {len(options)} options")
      if "video_path" in r:
        video = _text(annotation_path, i, r, "video_path")
      else:
        video = _text(annotation_path, i, r, "video_id") + ".mp4"
      block, timed = None, ()
      if subtitles != "none":
        offset = _optional(r, "starting_timestamp_for_subtitles") or 0.0
        block, timed = _subtitle_parts(subtitles, cache, subs.read_longvideobench, os.path.join(
            subtitle_root, _text(annotation_path, i, r, "subtitle_path")), float(offset), _optional(r, "duration"))
      out.tasks.append(Task(video=os.path.join(video_root, video), answer=LETTERS[int(choice)], subtitles=timed,
                            problem=format_problem(_text(annotation_path, i, r, "question"), options, block),
                            id=str(_field(annotation_path, i, r, "id", (str, int))),
                            data_source=_source("lvb", _optional(r, "duration_group"), by_group)))
  return out


def _lvb_options(path: str, i: int, r) -> list[str]:
  if isinstance(r, dict) and "candidates" not in r and "option0" in r:
    options = [_optional(r, f"option{k}") for k in range(len(LETTERS))]
    return _check_options(path, i, "option0..option4", [o for o in options if o is not None and o != "N/A"])
  return _options(path, i, r, "candidates")


# ---------------------------------------------------------------------------------------------- Video-MME
_LETTERED = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.*)$", re.DOTALL)


def read_videomme(annotation_path: str, video_root: str, *, by_group: bool = False, subtitles: str = "none",
                  subtitle_root: str = "") -> Read:
  """Video-MME (HF `lmms-lab/Video-MME`, `videomme/test-00000-of-00001.parquet`; or the same rows as a JSON
  list / JSON lines). Columns:

    video_id      "001" (the benchmark's video number; unused)
    videoID       YouTube id; the video is `video_root/<videoID>` with its extension (.mp4, .MP4, .mkv, ...:
                  the unzipped `data/` folder holds all three)
    question_id   "001-1"; the task id
    question      the question text
    options       ["A. ...", "B. ...", "C. ...", "D. ..."]: the "A. " prefixes are checked and re-written
    answer        the letter, e.g. "C"
    duration      "short" / "medium" / "long"; the group for `by_group`
    domain, sub_category, task_type, url (unused)

  `subtitles="timed"` ("w/ subs") puts `subtitle_root/<videoID>.srt` (the unzipped `subtitle/` folder), each
  line with its time span, before the question; a video without speech has no file and gets no subtitles.
  """
  _check_mode(subtitles, subtitle_root)
  out, find, cache, with_subs = Read(), VideoFinder(video_root), {}, 0
  records = _load_records(annotation_path)
  if records and isinstance(records[0], dict) and "questions" in records[0] and "videoID" not in records[0]:
    # The official repository's results template nests questions under a video number and has no YouTube id,
    # which the downloaded videos are named by.
    raise AnnotationError(annotation_path, 0, "questions", "is Video-MME's nested results template (videos by "
                          "number, no videoID): read the annotation rows instead (videomme/test-00000-of-00001"
                          ".parquet, or those rows as JSON)")
  for i, r in enumerate(records):
    with out.record(_rid(annotation_path, i, r, "question_id")):
      options = []
      for k, o in enumerate(_options(annotation_path, i, r, "options")):
        m = _LETTERED.match(o)
        if not m or m.group(1) != LETTERS[k]:
          raise RecordError(annotation_path, i, "options", f"option {k} {o[:40]!r} does not start with "
                            f"'{LETTERS[k]}.'")
        options.append(m.group(2))
      answer = _letter(annotation_path, i, "answer", _field(annotation_path, i, r, "answer", str), len(options))
      video_id = _text(annotation_path, i, r, "videoID")
      block, timed = None, ()
      srt = os.path.join(subtitle_root, video_id + ".srt")
      if subtitles != "none" and os.path.isfile(srt):
        block, timed = _subtitle_parts(subtitles, cache, subs.read_srt, srt)
        with_subs += 1
      out.tasks.append(Task(video=find.by_stem(video_id), answer=answer, subtitles=timed,
                            problem=format_problem(_text(annotation_path, i, r, "question"), options, block),
                            id=str(_field(annotation_path, i, r, "question_id", (str, int))),
                            data_source=_source("VideoMME", _optional(r, "duration"), by_group)))
  if subtitles != "none" and out.tasks and not with_subs:
    raise AnnotationError(subtitle_root, None, None, "holds no <videoID>.srt of any video in "
                          f"{annotation_path}; subtitle_root should be Video-MME's unzipped subtitle/ folder")
  return out


# ---------------------------------------------------------------------------------------------- LVBench
_PAREN_OPTION = re.compile(r"\n\s*\(([A-Z])\)\s*")


def split_parenthesised_options(text: str) -> tuple[str, list[str]]:
  """ "Q?\\n(A) x\\n(B) y" -> ("Q?", ["x", "y"]); options must run A, B, C... in order."""
  parts = _PAREN_OPTION.split(text)
  stem, letters, options = parts[0], parts[1::2], [p.strip() for p in parts[2::2]]
  if len(options) < 2 or "".join(letters) != LETTERS[:len(letters)] or not all(options):
    raise ValueError(f"expected option lines '(A) ...', '(B) ...' in order, found letters {letters}")
  return stem.strip(), options


def read_lvbench(annotation_path: str, video_root: str, *, by_group: bool = False) -> Read:
  """LVBench (THUDM/LVBench) `video_info.meta.jsonl`: one video per line,

    key         YouTube id
    type        the video's genre ("sport", "documentary", ...); the group for `by_group`
    video_info  duration_minutes, fps, resolution, ... (unused)
    qa          list of questions:
      uid             the task id (int or str)
      question        "What ...?\\n(A) ...\\n(B) ...\\n(C) ...\\n(D) ..." (options inline)
      answer          the letter, e.g. "D"
      question_type   list of capabilities, time_reference "mm:ss-mm:ss" (unused)

  or the flat table (`lmms-lab/LVBench`'s parquet, or its rows as JSON): one row per question with `key`,
  `uid`, `question`, `answer`, `type` and optionally `video_path` (relative to `video_root`).

  The video is `video_root/<key>.mp4` (any extension of `layouts.EXTENSIONS`), or the file that LVBench's own
  download script (video2dataset) wrote under `video_root/<shard>/` for that YouTube id. Record indices in
  reasons are "<line index>.qa[<k>]" (the meta file) or "<row index>" (the flat table).
  """
  out, find = Read(), VideoFinder(video_root)
  for i, r in enumerate(_load_records(annotation_path)):
    if isinstance(r, dict) and "qa" not in r and "uid" in r:  # the flat table
      _lvbench_question(out, find, annotation_path, i, r, r, by_group)
      continue
    qas = None
    with out.record(f"{os.path.basename(annotation_path)}#{i}"):  # a bad video line: its questions are skipped
      _text(annotation_path, i, r, "key")
      qas = _field(annotation_path, i, r, "qa", list)
    if qas is None:
      continue
    out.n_records -= 1  # the line is a video; its questions are the records
    for k, qa in enumerate(qas):
      _lvbench_question(out, find, annotation_path, f"{i}.qa[{k}]", qa, r, by_group)
  return out


def _lvbench_question(out: Read, find: VideoFinder, path: str, where, qa, video: dict, by_group: bool):
  with out.record(_rid(path, where, qa, "uid")):
    key = _text(path, where, video, "key")
    text = _text(path, where, qa, "question")
    try:
      question, options = split_parenthesised_options(text)
    except ValueError as e:
      raise RecordError(path, where, "question", str(e)) from None
    answer = _letter(path, where, "answer", _field(path, where, qa, "answer", str), len(options))
    rel = _optional(video, "video_path")
    if isinstance(rel, str) and rel.strip() and find.exists(rel):
      file = os.path.join(find.root, rel)
    else:
      file = find.by_stem(key)
      if not os.path.isfile(file):
        file = find.youtube(key) or file
    out.tasks.append(Task(video=file, problem=format_problem(question, options), answer=answer,
                          id=str(_field(path, where, qa, "uid", (str, int))),
                          data_source=_source("lvbench", _optional(video, "type"), by_group)))


# ---------------------------------------------------------------------------------------------- original
def read_original(annotation_path: str, video_root: str = "", *, by_group: bool = False,
                  open_ended: str = "error") -> Read:
  """The original's RL/eval records (`data/records.py`; its `multimodal_dataset.py`), a JSON list (or JSON lines):

    problem      the question with a literal "<image>" where the video goes, options included; used as is
    solution     the ground truth, e.g. "B"
    data_source  the metric key, e.g. "MVLU", "lvb", "VideoMME"
    videos       a list with exactly one path; a relative one is joined to `video_root`
    extra_info   {"answer_type": "multiple_choice" | "open_ended", ...}
    doc_id       (optional) the task id; otherwise the record's index

  Open-ended records need a GPT judge, which this harness does not have: `open_ended="error"` (default)
  raises on them, `"skip"` leaves them out. `by_group` has no groups here and changes nothing.
  """
  del by_group
  if open_ended not in ("error", "skip"):
    raise ValueError(f"open_ended must be 'error' or 'skip', got {open_ended!r}")
  out = Read()
  for i, r in enumerate(_load_records(annotation_path)):
    with out.record(_rid(annotation_path, i, r, "doc_id", str(i))):
      info = _field(annotation_path, i, r, "extra_info", dict)
      kind = _optional(info, "answer_type")
      if kind is None:
        raise RecordError(annotation_path, i, "extra_info.answer_type", "is missing")
      if kind != "multiple_choice":
        if kind == "open_ended" and open_ended == "skip":
          out.n_records -= 1  # asked to be left out: not a dirty record
          continue
        raise AnnotationError(annotation_path, i, "extra_info.answer_type", f"{kind!r}: only multiple_choice is "
                              "scored here (open_ended='skip' leaves others out)")
      problem = _field(annotation_path, i, r, "problem", str)
      if IMAGE not in problem:
        raise RecordError(annotation_path, i, "problem", f"has no {IMAGE} placeholder for the video")
      solution = str(_field(annotation_path, i, r, "solution", (str, int))).strip()
      source = _text(annotation_path, i, r, "data_source")
      videos = _field(annotation_path, i, r, "videos", list)
      if len(videos) != 1 or not isinstance(videos[0], str):
        raise RecordError(annotation_path, i, "videos", f"must hold exactly one path, got {str(videos)[:80]}")
      doc_id = _optional(r, "doc_id")
      out.tasks.append(Task(video=os.path.join(video_root, videos[0]), problem=problem, answer=solution,
                            id=str(i if doc_id is None else doc_id), data_source=source))
  return out


# ---------------------------------------------------------------------------------------------- registry
READERS: dict[str, Callable[..., Read]] = {
    "mlvu": read_mlvu,
    "longvideobench": read_longvideobench,
    "videomme": read_videomme,
    "lvbench": read_lvbench,
    "original": read_original,
}
ALIASES = {"lvb": "longvideobench", "video-mme": "videomme", "video_mme": "videomme", "mvlu": "mlvu",
           "mlvu_test": "mlvu", "videozoomer": "original"}


def load_benchmark(name: str, annotation_path: str, video_root: str = "", **options) -> Benchmark:
  """Benchmark `name` (a key of `READERS` or `ALIASES`) from its files; `options` go to its reader.

  A task whose id repeats an earlier one's is skipped (reported). Raises AnnotationError when the file cannot
  be read or none of its records can (the first reasons are in the message)."""
  key = ALIASES.get(name.lower(), name.lower())
  if key not in READERS:
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(READERS)} (aliases {sorted(ALIASES)})")
  path = os.fspath(annotation_path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{name} annotation file {path} does not exist")
  read = READERS[key](path, os.fspath(video_root), **options)
  seen: dict[str, int] = {}
  tasks = []
  for t in read.tasks:
    if t.id in seen:
      read.dirty.append(DirtyRecord(t.id, f"{path}: id {t.id!r} is an earlier record's too; this one is left out",
                                    "skipped"))
    else:
      seen[t.id] = len(tasks)
      tasks.append(t)
  if read.n_records and not tasks:
    reasons = "; ".join(d.reason for d in read.dirty[:3])
    raise AnnotationError(path, None, None, f"none of its {read.n_records} records can be read: {reasons}")
  return Benchmark(name=key, annotation=path, video_root=os.fspath(video_root), tasks=tasks, dirty=read.dirty,
                   n_records=read.n_records)


def read_benchmark(name: str, annotation_path: str, video_root: str = "", **options) -> list[Task]:
  """`load_benchmark(...).tasks`: the tasks only (dirty records are left out unreported)."""
  return load_benchmark(name, annotation_path, video_root, **options).tasks


def dirty_counts(dirty: Sequence[DirtyRecord]) -> dict[str, int]:
  """{"resolved": n, "skipped": m}."""
  counts = collections.Counter(d.action for d in dirty)
  return {"resolved": counts["resolved"], "skipped": counts["skipped"]}
