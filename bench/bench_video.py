"""Frame reading: zoomer_jax.video.VideoReader vs seek-per-frame OpenCV and a plain PyAV reader.

Files written at bench time (frame index drawn in the pixels):
  mp4v    10 min, 640x360, 30 fps, MPEG-4 part 2 (OpenCV's mp4v writer, GOP 12);
  h264    10 min, 640x360, 30 fps, H.264 (libx264 veryfast, GOP 250, 3 B-frames);
  vfr     about 10 min, 640x360, H.264 at a variable frame rate (each frame lasts 1-3 periods of 1/30 s);
  hour    one hour, 160x96, 15 fps, H.264 in mkv (no sample index: the time index is a demux of every packet).
Tasks:
  clip:       a 16-frame zoom clip, sample_zoom(meta, s, s + 4, fps=4), s rotating over starts off any keyframe;
  overview:   the 64-frame overview, sample_overview(meta);
  trajectory: what one agent trajectory reads: the overview, then 4 zoom clips, from the path.
Methods, timed interleaved in one process (median of --repeats), each from a path (opening included):
  seek_per_frame  OpenCV, CAP_PROP_POS_FRAMES then read() per frame (constant-rate files only: on VFR its
                  frame numbers are not the frames);
  pyav            PyAV, threads "AUTO", no index: seek to each target time (backward, to the keyframe before)
                  and decode forward to it, per clip (clip, trajectory's zooms) or per frame (overview);
  ours            VideoReader(path, index="lazy") (backend "auto"): the overview's frames (the time index is built
                  in the timing) and `zoom` clips (cut from the packets around the segment when no overview
                  came first: the clip task);
  ours_warm       one indexed VideoReader per file, reused (how the agent calls it: one overview, several zooms);
  ours_cv2        VideoReader(path, backend="cv2").frames(idx): the time index built in the timing.
The targets are the frames sample_overview/sample_zoom choose by true time; every method's frames are checked
against the index in their pixels on the first two repeats. Prints a table of medians and ratios (baseline time
/ ours time; > 1 means ours is faster), the per-frame cost of PyAV's RGB conversion on a fresh file's frames
against the reused converter the readers use, then one `BENCH_JSON {...}` line.

  PYTHONPATH=. python bench/bench_video.py                # videos written to a temp dir in /tmp, deleted after
  PYTHONPATH=. python bench/bench_video.py --keep         # ... kept (the path is printed)
  PYTHONPATH=. python bench/bench_video.py --dir /tmp/vz  # videos reused from / written to /tmp/vz, kept
  PYTHONPATH=. python bench/bench_video.py --files vfr,hour --tasks trajectory
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
from typing import NamedTuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import av  # noqa: E402
import cv2  # noqa: E402

import media  # noqa: E402
from zoomer_jax.video import VideoReader, sample_overview, sample_zoom  # noqa: E402
from zoomer_jax.video.pyav_source import rgb_converter  # noqa: E402

FILES = {  # name -> (file name, writer arguments)
    "mp4v": ("bench_mp4v_640x360_30fps_600s.mp4", dict(n_frames=18000, fps=30, size=(360, 640), codec="mp4v")),
    "h264": ("bench_h264_640x360_30fps_600s.mp4", dict(n_frames=18000, fps=30, size=(360, 640), codec="h264",
                                                      gop=250)),
    "vfr": ("bench_vfr_640x360_9000f.mp4", dict(n_frames=9000, fps=30, size=(360, 640), codec="h264", gop=250,
                                                vfr=True)),
    "hour": ("bench_h264_160x96_15fps_3600s.mkv", dict(n_frames=54000, fps=15, size=(96, 160), codec="h264",
                                                       gop=250)),
}
CLIP_STARTS = (0.169, 0.3795, 0.5552, 0.6875, 0.8598)  # fractions of the duration; off the keyframes
ZOOMS = 4  # clips per trajectory


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


def pyav(path: str, times: np.ndarray, contiguous: bool) -> list[np.ndarray]:
  """Plain PyAV without an index: seek to each run's first target time (backward, to the keyframe before) and
  decode forward, keeping the frame on screen at each target time (times from the container's start)."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    tb = float(stream.time_base)
    origin = (container.start_time or 0) / 1e6
    got: list[np.ndarray] = []
    runs = [times] if contiguous else [times[k:k + 1] for k in range(len(times))]
    for run in runs:
      container.seek(int((run[0] + origin) / tb), stream=stream, backward=True)
      k, prev = 0, None
      for frame in container.decode(stream):
        t = frame.pts * tb - origin
        while k < len(run) and t > run[k] + 1e-4:  # `prev` was on screen at run[k]
          got.append(prev.to_ndarray(format="rgb24"))
          k += 1
        if k == len(run):
          break
        prev = frame
      got += [prev.to_ndarray(format="rgb24") for _ in range(len(run) - k)]  # the end of the file
  return got


def make_videos(directory: str, names: list[str]) -> dict[str, str]:
  paths = {}
  for name in names:
    file, kw = FILES[name]
    path = os.path.join(directory, file)
    if not os.path.exists(path):
      t0 = time.perf_counter()
      tmp = path + ".tmp" + os.path.splitext(path)[1]
      kw = dict(kw)
      media.write_video(tmp, kw.pop("n_frames"), kw.pop("fps"), kw.pop("size"), **kw)
      os.replace(tmp, path)
      print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
    paths[name] = path
  return paths


def check(frames, idx, label: str) -> None:
  got = [media.frame_index(f) for f in frames]
  bad = [(int(i), g) for i, g in zip(idx, got) if i != g]
  if bad or len(frames) != len(idx):
    raise AssertionError(f"{label}: wrong frames (wanted, got) {bad[:5]}")


class Part(NamedTuple):
  idx: np.ndarray  # the frames' indices
  times: np.ndarray  # their true times
  contiguous: bool
  zoom: tuple[float, float, float] | None  # (start, end, fps) of a zoom clip


def _targets(task: str, meta, rep: int) -> list[Part]:
  """The parts the task reads, in order."""
  def clip(k):
    s = CLIP_STARTS[k % 5] * meta.duration
    return Part(*sample_zoom(meta, s, s + 4, 4), True, (s, s + 4, 4))

  if task == "clip":
    return [clip(rep)]
  overview = Part(*sample_overview(meta), False, None)
  if task == "overview":
    return [overview]
  return [overview] + [clip(rep + k) for k in range(ZOOMS)]


def _methods(name: str, warm) -> dict:
  def ours(p, parts):
    # As the agent reads: the overview (which builds the time index, inside the timing) and zooms; a zoom before
    # any overview is cut from the packets around it (the index is not built).
    reader = VideoReader(p, index="lazy")
    return [reader.frames(x.idx) if x.zoom is None else reader.zoom(*x.zoom)[2] for x in parts]

  def ours_cv2(p, parts):
    reader = VideoReader(p, "cv2")  # the time index is built here, inside the timing
    return [reader.frames(x.idx) for x in parts]

  methods = {
      "seek_per_frame": lambda p, parts: [seek_per_frame(p, x.idx) for x in parts],
      "pyav": lambda p, parts: [pyav(p, x.times, x.contiguous) for x in parts],
      "ours": ours,
      "ours_warm": lambda p, parts: [warm.frames(x.idx) if x.zoom is None else warm.zoom(*x.zoom)[2] for x in parts],
      "ours_cv2": ours_cv2,
  }
  if name in ("vfr",):
    del methods["seek_per_frame"]
  return methods


def rgb_conversion(path: str, frames: int = 16, repeats: int = 7) -> dict:
  """ms per frame to RGB of a zoom's worth of frames from a freshly opened file (as a cold clip converts them):
  PyAV's `to_ndarray(format="rgb24")` (a swscale context per frame) against `pyav_source.rgb_converter` (one
  context reused), each repeat on a new container, interleaved."""
  def decoded():
    container = av.open(path)
    container.streams.video[0].thread_type = "AUTO"
    return container, [f for _, f in zip(range(frames), container.decode(video=0))]

  times = {"to_ndarray": [], "converter": []}
  for _ in range(repeats):
    for name in times:
      container, got = decoded()
      t0 = time.perf_counter()
      convert = rgb_converter() if name == "converter" else lambda f: f.to_ndarray(format="rgb24")
      for f in got:
        convert(f)
      times[name].append((time.perf_counter() - t0) / len(got))
      container.close()
  med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
  return dict(ms_per_frame={k: round(v, 3) for k, v in med.items()},
              ratio=round(med["to_ndarray"] / med["converter"], 1))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dir", help="where the videos live (reused if present); default: a temp dir")
  ap.add_argument("--keep", action="store_true", help="keep the videos (default: delete a temp dir)")
  ap.add_argument("--repeats", type=int, default=15, help="repeats of the clip task (overview, trajectory: a third)")
  ap.add_argument("--tasks", default="clip,overview,trajectory")
  ap.add_argument("--files", default=",".join(FILES))
  args = ap.parse_args()

  directory = args.dir or tempfile.mkdtemp(prefix="bench_video_", dir="/tmp")
  os.makedirs(directory, exist_ok=True)
  load_before = os.getloadavg()
  results = {}
  try:
    paths = make_videos(directory, args.files.split(","))
    for name, path in paths.items():
      t0 = time.perf_counter()
      VideoReader(path).close()
      print(f"{name}: time index in {1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)
    conversion = {name: rgb_conversion(path) for name, path in paths.items()}
    warm = {name: VideoReader(path) for name, path in paths.items()}
    for task in args.tasks.split(","):
      repeats = args.repeats if task == "clip" else max(3, args.repeats // 3)
      for name, path in paths.items():
        meta = warm[name].meta
        methods = _methods(name, warm[name])
        times = {m: [] for m in methods}
        for rep in range(repeats):
          parts = _targets(task, meta, rep)
          order = list(methods) if rep % 2 == 0 else list(methods)[::-1]  # interleaved, alternating order
          for m in order:
            t0 = time.perf_counter()
            frames = methods[m](path, parts)
            times[m].append(time.perf_counter() - t0)
            if rep < 2:
              for x, f in zip(parts, frames):
                check(f, x.idx, f"{task}/{name}/{m}")
        med = {m: statistics.median(t) for m, t in times.items()}
        base = [b for b in ("seek_per_frame", "pyav", "ours_cv2") if b in med]
        results[f"{task}/{name}"] = dict(
            frames=sum(len(x.idx) for x in parts), repeats=repeats,
            median_ms={m: round(v * 1e3, 1) for m, v in med.items()},
            ratio_vs_ours={b: round(med[b] / med["ours"], 2) for b in base},
            ratio_vs_ours_warm={b: round(med[b] / med["ours_warm"], 2) for b in base if b != "ours_cv2"},
            backend=warm[name].backend)
        print(f"{task}/{name} done", flush=True)
  finally:
    if args.dir or args.keep:
      print(f"videos kept in {directory}")
    else:
      shutil.rmtree(directory, ignore_errors=True)
  load_after = os.getloadavg()

  cols = ("seek_per_frame", "pyav", "ours", "ours_warm", "ours_cv2")
  print(f"\n{'task/file':20s} " + " ".join(f"{c + ' ms':>17s}" for c in cols)
        + f" {'pyav/ours':>10s} {'pyav/warm':>10s}")
  for key, r in results.items():
    ms = r["median_ms"]
    print(f"{key:20s} " + " ".join(f"{ms[c]:17.1f}" if c in ms else f"{'-':>17s}" for c in cols)
          + f" {r['ratio_vs_ours']['pyav']:10.2f} {r['ratio_vs_ours_warm']['pyav']:10.2f}")
  for name, c in conversion.items():
    ms = c["ms_per_frame"]
    print(f"RGB conversion {name}: to_ndarray {ms['to_ndarray']:.3f} ms/frame, reused converter "
          f"{ms['converter']:.3f} ms/frame, ratio {c['ratio']}")
  print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
  print("BENCH_JSON " + json.dumps(dict(
      bench="video", files={n: FILES[n][0] for n in args.files.split(",")}, results=results, rgb_conversion=conversion,
      load_before=round(load_before[0], 2), load_after=round(load_after[0], 2), cpus=os.cpu_count(),
      opencv=cv2.__version__, pyav=av.__version__, python=platform.python_version())))


if __name__ == "__main__":
  main()
