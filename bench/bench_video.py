"""Frame reading: zoomer_jax.video.VideoReader vs seek-per-frame OpenCV and a plain PyAV reader.

Tasks, on a 10-minute 640x360 30 fps video written at bench time (frame index drawn in the pixels) both as
MPEG-4 part 2 (OpenCV's mp4v writer, GOP 12) and as H.264 (libx264 veryfast, GOP 250, 3 B-frames):
  clip:     a 16-frame zoom clip, sample_zoom(meta, s, s + 4, fps=4), s rotating over starts off any keyframe;
  overview: the 64-frame overview, sample_overview(meta).
Methods, timed interleaved in one process (median of --repeats), each from a path (opening included):
  seek_per_frame  OpenCV, CAP_PROP_POS_FRAMES then read() per frame;
  pyav            PyAV, threads "AUTO": seek to the keyframe before the clip and decode forward (clip), or the
                  same per frame (overview);
  ours            VideoReader(path).frames(idx) (backend "auto");
  ours_warm       one VideoReader per file, reused (how the agent calls it: one overview, several zooms);
  ours_cv2        VideoReader(path, backend="cv2").frames(idx).
Every method's frames are checked against the index in their pixels on the first two repeats. Prints a table of
medians and ratios (baseline time / ours time; > 1 means ours is faster), then one `BENCH_JSON {...}` line.

  PYTHONPATH=. python bench/bench_video.py                # videos written to a temp dir in /tmp, deleted after
  PYTHONPATH=. python bench/bench_video.py --keep         # ... kept (the path is printed)
  PYTHONPATH=. python bench/bench_video.py --dir /tmp/vz  # videos reused from / written to /tmp/vz, kept
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import av  # noqa: E402
import cv2  # noqa: E402

import media  # noqa: E402
from zoomer_jax.video import VideoReader, sample_overview, sample_zoom  # noqa: E402

SIZE, FPS, SECONDS = (360, 640), 30, 600
FILES = {"mp4v": dict(codec="mp4v"), "h264": dict(codec="h264", gop=250)}
CLIP_STARTS = (101.3, 227.7, 333.1, 412.5, 515.9)  # seconds; none starts on a keyframe of either file
assert all(int(s * FPS) % 12 and int(s * FPS) % 250 for s in CLIP_STARTS)  # mp4v GOP 12, h264 GOP 250


def seek_per_frame(path: str, idx: np.ndarray) -> list[np.ndarray]:
  cap = cv2.VideoCapture(path)
  out = []
  for i in idx:
    cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
    ok, frame = cap.read()
    if not ok:
      raise RuntimeError(f"seek_per_frame: no frame {i}")
    out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  cap.release()
  return out


def pyav(path: str, idx: np.ndarray, contiguous: bool) -> list[np.ndarray]:
  """Seek to the keyframe before the target (pts-based, backward) and decode forward to it."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    start = stream.start_time or 0
    scale = float(stream.time_base * stream.average_rate)
    got: dict[int, np.ndarray] = {}
    runs = [idx] if contiguous else [idx[k:k + 1] for k in range(len(idx))]
    for run in runs:
      want = set(run.tolist())
      container.seek(start + round(int(run[0]) / scale), stream=stream, backward=True)
      for frame in container.decode(stream):
        j = round((frame.pts - start) * scale)
        if j in want and j not in got:
          got[j] = frame.to_ndarray(format="rgb24")
        if j >= run[-1]:
          break
  return [got[int(i)] for i in idx]


def make_videos(directory: str) -> dict[str, str]:
  paths = {}
  for name, kw in FILES.items():
    path = os.path.join(directory, f"bench_{name}_{SIZE[1]}x{SIZE[0]}_{FPS}fps_{SECONDS}s.mp4")
    if not os.path.exists(path):
      t0 = time.perf_counter()
      media.write_video(path + ".tmp.mp4", SECONDS * FPS, FPS, SIZE, **kw)
      os.replace(path + ".tmp.mp4", path)
      print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
    paths[name] = path
  return paths


def check(frames, idx, label: str) -> None:
  got = [media.frame_index(f) for f in frames]
  bad = [(int(i), g) for i, g in zip(idx, got) if i != g]
  if bad or len(frames) != len(idx):
    raise AssertionError(f"{label}: wrong frames (wanted, got) {bad[:5]}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dir", help="where the videos live (reused if present); default: a temp dir")
  ap.add_argument("--keep", action="store_true", help="keep the videos (default: delete a temp dir)")
  ap.add_argument("--repeats", type=int, default=15, help="repeats of the clip task (overview: a third)")
  ap.add_argument("--tasks", default="clip,overview")
  args = ap.parse_args()

  directory = args.dir or tempfile.mkdtemp(prefix="bench_video_", dir="/tmp")
  os.makedirs(directory, exist_ok=True)
  load_before = os.getloadavg()
  results = {}
  try:
    paths = make_videos(directory)
    warm = {name: VideoReader(path) for name, path in paths.items()}
    for task in args.tasks.split(","):
      repeats = args.repeats if task == "clip" else max(3, args.repeats // 3)
      for name, path in paths.items():
        meta = warm[name].meta
        methods = {
            "seek_per_frame": lambda p, i: seek_per_frame(p, i),
            "pyav": lambda p, i: pyav(p, i, contiguous=task == "clip"),
            "ours": lambda p, i: VideoReader(p).frames(i),
            "ours_warm": lambda p, i, r=warm[name]: r.frames(i),
            "ours_cv2": lambda p, i: VideoReader(p, backend="cv2").frames(i),
        }
        times = {m: [] for m in methods}
        for rep in range(repeats):
          if task == "clip":
            s = CLIP_STARTS[rep % len(CLIP_STARTS)]
            idx, _ = sample_zoom(meta, s, s + 4, 4)
          else:
            idx, _ = sample_overview(meta)
          order = list(methods) if rep % 2 == 0 else list(methods)[::-1]  # interleaved, alternating order
          for m in order:
            t0 = time.perf_counter()
            frames = methods[m](path, idx)
            times[m].append(time.perf_counter() - t0)
            if rep < 2:
              check(frames, idx, f"{task}/{name}/{m}")
        med = {m: statistics.median(t) for m, t in times.items()}
        results[f"{task}/{name}"] = dict(
            frames=len(idx), repeats=repeats, median_ms={m: round(v * 1e3, 1) for m, v in med.items()},
            ratio_vs_ours={b: round(med[b] / med["ours"], 2) for b in ("seek_per_frame", "pyav", "ours_cv2")},
            ratio_vs_ours_warm={b: round(med[b] / med["ours_warm"], 2) for b in ("seek_per_frame", "pyav")},
            backend=warm[name].backend)
        print(f"{task}/{name} done", flush=True)
  finally:
    if args.dir or args.keep:
      print(f"videos kept in {directory}")
    else:
      shutil.rmtree(directory, ignore_errors=True)
  load_after = os.getloadavg()

  cols = ("seek_per_frame", "pyav", "ours", "ours_warm", "ours_cv2")
  print(f"\n{'task/file':16s} " + " ".join(f"{c + ' ms':>17s}" for c in cols)
        + f" {'seek/ours':>10s} {'pyav/ours':>10s} {'pyav/warm':>10s}")
  for key, r in results.items():
    ms = r["median_ms"]
    print(f"{key:16s} " + " ".join(f"{ms[c]:17.1f}" for c in cols)
          + f" {r['ratio_vs_ours']['seek_per_frame']:10.2f} {r['ratio_vs_ours']['pyav']:10.2f}"
          + f" {r['ratio_vs_ours_warm']['pyav']:10.2f}")
  print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
  print("BENCH_JSON " + json.dumps(dict(
      bench="video", video=dict(size=list(SIZE), fps=FPS, seconds=SECONDS, files=list(FILES)), results=results,
      load_before=round(load_before[0], 2), load_after=round(load_after[0], 2), cpus=os.cpu_count(),
      opencv=cv2.__version__, pyav=av.__version__, python=platform.python_version())))


if __name__ == "__main__":
  main()
