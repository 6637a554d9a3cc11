"""What the agent sees of one video: `python -m zoomer_jax frames VIDEO [--zoom START END FPS] [--save-npz PATH]`.

The frames come from the rollout's own code: `rollout.Videos` (the reader, the time index, the overview and
clip sampling) and, for a zoom, the protocol's `Episode` parsing the call as the model would write it (so a call
the model could not make is refused here with the same error). Prints the video's time index and the plan
(each frame's index and true time, as the model reads it in `<frame{i}_time{t:.2f}s>`), writes a contact sheet
PNG, and with `save_npz` an npz of `frames` uint8 [N, H, W, 3] RGB (as decoded, upright, before resizing),
`timestamps` float64 [N] s, `indices` int64 [N] and `part` [N] ("overview" or "zoom").
"""

from __future__ import annotations

import os

import numpy as np

from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.rollout import AgentConfig, Task, Videos
from zoomer_jax.tools import ZOOM


def _plan(label: str, idx: np.ndarray, ts: np.ndarray) -> str:
  tags = " ".join(f"#{int(i)}@{t:.2f}s" for i, t in zip(idx, ts))
  return f"{label} ({len(idx)} frames): {tags}"


def contact_sheet(frames: np.ndarray, labels: list[str], path: str, columns: int = 8) -> None:
  """Writes frames [N, H, W, 3] as a grid, each titled with its label, to a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = max(1, len(frames))
  cols = min(columns, n)
  rows = -(-n // cols)
  h, w = (frames.shape[1], frames.shape[2]) if len(frames) else (1, 1)
  fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows * h / w + 0.3 * rows), squeeze=False)
  for k, ax in enumerate(axes.flat):
    ax.axis("off")
    if k < len(frames):
      ax.imshow(frames[k])
      ax.set_title(labels[k], fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def show_frames(video: str, zoom: tuple[float, float, float] | None = None, cfg: AgentConfig = AgentConfig(),
                sheet: str = "out/frames.png", save_npz: str | None = None) -> dict:
  """Prints what the agent sees of `video` (overview, and the clip of `zoom` = (start, end, fps)); returns it."""
  videos = Videos(cfg)
  task = Task(video, "")
  try:
    meta, idx, ts, frames = videos.overview_frames(task)
    reader = videos.reader(video)
    kind = "constant-rate grid from the container's index" if reader.timeline.grid else "every packet's pts"
    print(f"video: {video}\n  {meta.n_frames} frames, {meta.fps:.3f} fps on average, {meta.duration:.2f} s "
          f"(first frame at {meta.times[0]:.3f} s), {meta.width}x{meta.height} shown"
          f"{f' (rotated {meta.rotation} degrees)' if meta.rotation else ''}, codec {meta.codec}, "
          f"decoded with {reader.backend}; time index: {kind}")
    print(_plan("overview", idx, ts))
    parts = [("overview", idx, ts, frames)]
    report = dict(video=video, n_frames=meta.n_frames, fps=meta.fps, duration=meta.duration,
                  size=[meta.width, meta.height], rotation=meta.rotation,
                  overview=dict(indices=idx.tolist(), timestamps=[round(float(t), 3) for t in ts]))
    if zoom is not None:
      start, end, fps = zoom
      episode = P.Episode(cfg.tool, meta.duration, len(ts))
      call = episode.step(ZOOM.call_text({"segment": [start, end], "fps": fps}))
      if not isinstance(call, P.ZoomCall):
        raise ValueError(f"the zoom call is refused, as the model would be told: {call.message}")
      zidx, zts, zframes = videos.clip_frames(task, call)
      note = f" (clamped to [{call.segment[0]:.2f}, {call.segment[1]:.2f}] s)" if call.clamped else ""
      print(_plan(f"zoom [{start:g}, {end:g}] s at {fps:g} fps{note}", zidx, zts))
      print("  the model reads: " + P.frame_tags(zts))
      parts.append(("zoom", zidx, zts, zframes))
      report["zoom"] = dict(segment=[start, end], fps=fps, indices=zidx.tolist(),
                            timestamps=[round(float(t), 3) for t in zts])
  finally:
    videos.close()
  frames = np.concatenate([p[3] for p in parts])
  labels = [f"{p[0][0]}{k} #{int(i)} {t:.2f}s" for p in parts for k, (i, t) in enumerate(zip(p[1], p[2]))]
  if sheet:
    os.makedirs(os.path.dirname(os.path.abspath(sheet)), exist_ok=True)
    contact_sheet(frames, labels, sheet)
    print(f"contact sheet: {sheet}")
  if save_npz:
    os.makedirs(os.path.dirname(os.path.abspath(save_npz)), exist_ok=True)
    np.savez(save_npz, frames=frames, timestamps=np.concatenate([p[2] for p in parts]).astype(np.float64),
             indices=np.concatenate([p[1] for p in parts]).astype(np.int64),
             part=np.array([p[0] for p in parts for _ in p[1]]))
    print(f"frames: {save_npz} ({frames.shape[0]} x {frames.shape[1]}x{frames.shape[2]} RGB)")
  return report
