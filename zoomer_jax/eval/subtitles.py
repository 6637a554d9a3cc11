"""Benchmark subtitle files -> timed lines [(start_s, end_s, text)] and the text block put into a problem.

    lines = read_srt("Video-MME/subtitle/fFjv93ACGo8.srt")
    lines = read_longvideobench("LongVideoBench/subtitles/86CxyhFV9MI_en.json", offset=0.0, duration=527.2)
    block = format_subtitles(lines)   # "This video's subtitles ...:\n[0.0-2.5] Hello\n..."

Video-MME ships one SubRip file per video (`subtitle/<videoID>.srt`, only for videos that have speech);
LongVideoBench one JSON list per video (`subtitles/<subtitle_path>`), with items either
{"start": "HH:MM:SS.mmm", "end": ..., "line": text} or {"timestamp": [start, end], "text": text}, whose times
are shifted by the record's `starting_timestamp_for_subtitles` (a `timestamp` end that is not a number means
"until the end": the video's duration), as LongVideoBench's own loader reads them.

The agent shows the overview frames as one block, each labelled with its time (`<frame3_time12.00s>`), so the
subtitles come as one block too, each line labelled with its time span in seconds: the model pairs them by time.
(The benchmarks' own loaders put each line between the frames it falls between, and keep only the lines of the
sampled frames; the agent samples its frames while it runs, so every line is given.)
"""

from __future__ import annotations

import json
import re

HEADER = "This video's subtitles are listed below, each with its start and end time in seconds:"
_SRT_TIME = re.compile(r"(\d+):(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?")
_SRT_SPAN = re.compile(rf"^\s*({_SRT_TIME.pattern})\s*-->\s*({_SRT_TIME.pattern})")
_TAGS = re.compile(r"<[^>]*>|\{\\[^}]*\}")  # <i>, <font ...>, {\an8}


class SubtitleError(ValueError):
  """A subtitle file that cannot be read; the message names the file."""


def _seconds(h: str, m: str, s: str, ms: str | None) -> float:
  return int(h) * 3600 + int(m) * 60 + int(s) + (int(ms.ljust(3, "0")) / 1000 if ms else 0.0)


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
      return f.read()
  except OSError as e:
    raise SubtitleError(f"{path}: cannot be read: {e}") from e


def read_srt(path: str) -> tuple[tuple[float, float, str], ...]:
  """The cues of a SubRip file in file order; tags and line breaks inside a cue become plain spaces."""
  cues = []
  for n, block in enumerate(re.split(r"\n\s*\n", _read_text(path).replace("\r\n", "\n").replace("\r", "\n"))):
    lines = [ln for ln in block.strip().split("\n") if ln.strip()]
    at = next((k for k, ln in enumerate(lines) if "-->" in ln), None)
    if at is None:
      continue  # a stray number or an empty block
    m = _SRT_SPAN.match(lines[at])
    if not m:
      raise SubtitleError(f"{path}: cue {n + 1}: cannot read the time line {lines[at][:60]!r}")
    g = m.groups()
    text = " ".join(_TAGS.sub("", ln).strip() for ln in lines[at + 1:]).strip()
    if text:
      cues.append((_seconds(*g[1:5]), _seconds(*g[6:10]), text))
  return tuple(cues)


def _clock(value) -> float:
  m = _SRT_TIME.fullmatch(str(value).strip())
  if not m:
    raise ValueError(f"{value!r} is not HH:MM:SS.mmm")
  return _seconds(*m.groups())


def read_longvideobench(path: str, offset: float = 0.0, duration: float | None = None) -> tuple:
  """LongVideoBench subtitle JSON -> [(start, end, text)] in video time (file time minus `offset`)."""
  try:
    items = json.loads(_read_text(path))
  except ValueError as e:
    raise SubtitleError(f"{path}: is not valid JSON: {e}") from e
  if not isinstance(items, list):
    raise SubtitleError(f"{path}: must hold a list of subtitle items, got {type(items).__name__}")
  out = []
  for k, item in enumerate(items):
    try:
      if "timestamp" in item:
        start, end = item["timestamp"]
        end = end if isinstance(end, (int, float)) else (duration if duration is not None else start)
        text = item["text"]
      else:
        start, end, text = _clock(item["start"]), _clock(item["end"]), item["line"]
      start, end = float(start) - offset, float(end) - offset
    except (KeyError, TypeError, ValueError) as e:
      raise SubtitleError(f"{path}: item {k}: {type(e).__name__}: {e}") from None
    text = " ".join(str(text).split())
    if text:
      out.append((start, end, text))
  return tuple(out)


def format_subtitles(lines) -> str:
  """The block put into a problem: `HEADER`, then one "[start-end] text" line per subtitle (seconds, 1 decimal)."""
  return "\n".join([HEADER] + [f"[{max(s, 0.0):.1f}-{max(e, 0.0):.1f}] {t}" for s, e, t in lines])
