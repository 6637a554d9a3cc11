"""Pre-flight of an evaluation: what a benchmark's files gave, and which videos are not there, before any model.

    bench = load_benchmark("lvbench", ".../video_info.meta.jsonl", ".../videos")
    print(summary(bench))   # tasks, dirty records (id: reason), missing videos (path: task ids)

`python -m zoomer_jax eval --config=... --check` prints this and exits 1 when a video is missing; a run
(without `--check`) refuses to start on missing videos unless `--allow-missing-videos`
(`benchmark.allow_missing_videos`), which leaves their tasks out and lists them in the report.
"""

from __future__ import annotations

import os

from zoomer_jax.eval.readers import Benchmark, dirty_counts

MAX_LISTED = 50  # missing videos printed in full; the report's JSON lists all


def summary(bench: Benchmark, max_listed: int = MAX_LISTED) -> str:
  """Several lines: the benchmark's counts, every dirty record, the (first `max_listed`) missing videos."""
  counts = dirty_counts(bench.dirty)
  videos = {t.video for t in bench.tasks}
  missing = bench.missing_videos()
  lines = [f"benchmark {bench.name}: {bench.annotation} (videos under {bench.video_root or '.'})",
           f"tasks: {len(bench.tasks)} on {len(videos)} videos, from {bench.n_records} records; dirty records: "
           f"{counts['resolved']} resolved, {counts['skipped']} skipped"]
  lines += [f"  {d.action} {d.id}: {d.reason}" for d in bench.dirty]
  n_tasks = sum(len(ids) for ids in missing.values())
  lines.append(f"missing videos: {len(missing)} of {len(videos)} ({n_tasks} tasks)")
  if missing and bench.video_root and not os.path.isdir(bench.video_root):
    lines.append(f"  (video_root {bench.video_root} is not a folder)")
  for video, ids in list(missing.items())[:max_listed]:
    shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} tasks)" if len(ids) > 5 else "")
    lines.append(f"  {video} (tasks {shown})")
  if len(missing) > max_listed:
    lines.append(f"  ... and {len(missing) - max_listed} more")
  return "\n".join(lines)


def missing_records(bench: Benchmark) -> list[dict]:
  """[{video, ids}] of the missing videos, for the report."""
  return [dict(video=v, ids=ids) for v, ids in bench.missing_videos().items()]
