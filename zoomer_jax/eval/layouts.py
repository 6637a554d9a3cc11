"""Where a benchmark's videos lie on disk, as their download tools write them.

    find = VideoFinder("/data/Video-MME/data")
    find.by_stem("fFjv93ACGo8")   # ".../fFjv93ACGo8.MP4" if that is the file there; ".../fFjv93ACGo8.mp4" if none is
    find.youtube("Cm73ma6Ibcs")   # ".../00000/000000003.mp4" in a video2dataset folder, else None

Downloads keep the extension the source had (Video-MME holds `.mp4`, `.MP4` and `.mkv`), so a video is looked up
by its stem among `EXTENSIONS`, `.mp4` first; each folder is listed once. A path that exists nowhere is still
returned (as `<stem>.mp4`): the pre-flight check (`python -m zoomer_jax eval ... --check`) reports it missing.

video2dataset (`--output_format files`, what LVBench's `scripts/download.sh` runs) writes
`<root>/<shard:05d>/<shard:05d><index:04d>.mp4` beside a `.json` sidecar whose "url" is the source URL; the
YouTube id comes from that URL. A sidecar without a video is a failed download (its "status" says so).
"""

from __future__ import annotations

import glob
import json
import os
import re

EXTENSIONS = (".mp4", ".MP4", ".mkv", ".MKV", ".webm", ".mov", ".MOV", ".m4v", ".avi", ".ts")
_YOUTUBE_ID = re.compile(r"(?:[?&]v=|youtu\.be/|/shorts/|/embed/|/live/|/v/)([A-Za-z0-9_-]{11})(?![A-Za-z0-9_-])")


def youtube_id(url: str) -> str | None:
  """The 11-character video id of a YouTube URL (watch?v=, youtu.be/, shorts/, embed/, live/), else None."""
  m = _YOUTUBE_ID.search(url or "")
  return m.group(1) if m else None


class VideoFinder:
  """Videos under one root folder, found by relative path, by stem, or by YouTube id (video2dataset sidecars)."""

  def __init__(self, root: str):
    self.root = root
    self._listings: dict[str, dict[str, list[str]]] = {}  # folder -> stem -> file names present
    self._youtube: dict[str, str] | None = None

  def _listing(self, folder: str) -> dict[str, list[str]]:
    if folder not in self._listings:
      names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
      stems: dict[str, list[str]] = {}
      for name in names:
        stem, ext = os.path.splitext(name)
        if ext in EXTENSIONS:
          stems.setdefault(stem, []).append(name)
      self._listings[folder] = stems
    return self._listings[folder]

  def exists(self, rel: str) -> bool:
    path = os.path.join(self.root, rel)
    folder, name = os.path.split(path)
    return name in self._listing(folder).get(os.path.splitext(name)[0], ()) or os.path.isfile(path)

  def by_stem(self, rel_stem: str) -> str:
    """`root/<rel_stem><ext>` for the first extension of EXTENSIONS present, else `root/<rel_stem>.mp4`."""
    folder, stem = os.path.split(os.path.join(self.root, rel_stem))
    present = self._listing(folder).get(stem, [])
    for ext in EXTENSIONS:
      if stem + ext in present:
        return os.path.join(folder, stem + ext)
    return os.path.join(folder, stem + ".mp4")

  def first(self, rels) -> str:
    """The first of the relative paths `rels` that exists, else the first one."""
    rels = list(rels)
    return os.path.join(self.root, next((r for r in rels if self.exists(r)), rels[0]))

  def youtube(self, video_id: str) -> str | None:
    """The video2dataset file whose sidecar's URL is YouTube video `video_id`, or None."""
    if self._youtube is None:
      self._youtube = video2dataset_index(self.root)
    return self._youtube.get(video_id)


def video2dataset_index(root: str) -> dict[str, str]:
  """YouTube id -> video path, from the `<root>/<shard>/<key>.json` sidecars that have a video beside them.

  A sidecar that cannot be parsed or holds no YouTube URL is passed over (video2dataset also writes
  `<shard>_stats.json` files, at the top level, which are not scanned)."""
  index: dict[str, str] = {}
  for sidecar in sorted(glob.glob(os.path.join(glob.escape(root), "*", "*.json"))):
    try:
      with open(sidecar, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    vid = youtube_id(meta.get("url", "")) if isinstance(meta, dict) else None
    if vid is None:
      continue
    stem = os.path.splitext(sidecar)[0]
    video = next((stem + ext for ext in EXTENSIONS if os.path.isfile(stem + ext)), None)
    if video is not None:
      index.setdefault(vid, video)
  return index
