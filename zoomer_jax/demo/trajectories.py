"""A picture of a few evaluated trajectories: the overview the model saw, where it looked again, what it was shown.

    draw_trajectories(report.records, "out/demo/trajectories.png", n=4, title="...")

For each trajectory (an `eval.harness` JSONL record of the synthetic task), three rows:
  * the overview strip (the frames of the first turn, each with its timestamp tag);
  * a timeline of the whole video: the overview frames (ticks), the yellow-border span and the flash (ground
    truth), and the span of each tool call the model made (a zoom's segment: blue bar; a crop's time: a tick);
  * the frames of the last call that showed any, as its tool shows them (`Tool.run`), with their timestamps;
    frames inside the flash's window are framed in green.
The row title gives the model's answer against the truth. Frames are re-read from the videos.
"""

from __future__ import annotations

import json
import os

import numpy as np

from zoomer_jax import tools as T
from zoomer_jax.video import VideoReader, sample_overview

GAP = 4  # pixels between frames in a strip


def _strip(frames: list[np.ndarray], marks: list[bool] | None = None) -> np.ndarray:
  """Frames side by side [H, n*(W+GAP), 3]; a marked frame gets a green frame drawn over its edge."""
  h, w = frames[0].shape[:2]
  out = np.full((h, len(frames) * (w + GAP), 3), 255, np.uint8)
  for k, f in enumerate(frames):
    x = k * (w + GAP)
    out[:, x:x + w] = f
    if marks and marks[k]:
      out[:2, x:x + w] = out[-2:, x:x + w] = (0, 200, 0)
      out[:, x:x + 2] = out[:, x + w - 2:x + w] = (0, 200, 0)
  return out


def _extra(record: dict, rl_records: dict) -> dict:
  rl = rl_records.get(record["id"])
  return rl["extra_info"] if rl else {}


def draw_trajectories(records: list[dict], out_png: str, tool, test_json: str, *, n: int = 4, title: str = "") -> str:
  """Draws `n` records that ran (errors skipped), half correct and half wrong when there are both.

  `tool`: the ToolConfig of the run (the overview is re-sampled with it); `test_json`: the synthetic records
  (RL format) the tasks came from, for the ground truth (cue span, flash window, option names).
  """
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  ran = [r for r in records if r["error"] is None]
  right = [r for r in ran if r["acc"] > 0]
  wrong = [r for r in ran if r["acc"] <= 0]
  picked = (right[:(n + 1) // 2] + wrong[:n // 2])
  picked += [r for r in ran if r not in picked][:n - len(picked)]
  with open(test_json, encoding="utf-8") as f:
    rl_records = {r["doc_id"]: r for r in json.load(f)}
  if not picked:
    fig = plt.figure(figsize=(6, 1))
    fig.text(0.5, 0.5, "no trajectory to draw", ha="center")
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
  fig = plt.figure(figsize=(16, 4.2 * len(picked)))
  grid = fig.add_gridspec(3 * len(picked), 1, height_ratios=[3, 1, 3] * len(picked), hspace=0.6)
  for k, rec in enumerate(picked):
    _draw_one(fig, grid, 3 * k, rec, _extra(rec, rl_records), tool)
  if title:
    fig.suptitle(title, fontsize=13, y=0.995)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return out_png


def _draw_one(fig, grid, row: int, rec: dict, info: dict, tool) -> None:
  with VideoReader(rec["video"]) as reader:
    meta = reader.meta
    ov_idx, ov_ts = sample_overview(meta, tool.video_fps, tool.frames_upbound)
    ov = list(reader.frames(ov_idx))
  cue = info.get("cue_span")
  win = info.get("answer_window")
  a_frames = info.get("answer_frames")
  options = info.get("options", [])
  verdict = "correct" if rec["acc"] > 0 else "wrong"
  truth = rec["ground_truth"]
  name = lambda letter: (f" ({options['ABCD'.index(letter)]})" if letter and letter in "ABCD"[:len(options)]
                         and len(letter) == 1 else "")
  ax = fig.add_subplot(grid[row])
  ax.imshow(_strip(ov, [bool(cue) and cue[0] <= t <= cue[1] for t in ov_ts]))
  w = ov[0].shape[1] + GAP
  for k, t in enumerate(ov_ts):
    ax.text(k * w + (w - GAP) / 2, ov[0].shape[0] + 2, f"{t:.2f}s", ha="center", va="top", fontsize=7)
  ax.set_axis_off()
  ax.set_title(f"{rec['id']}: answer {rec['prediction']!r}{name(rec['prediction'])} vs truth {truth}{name(truth)}"
               f" -> {verdict}   ({rec['rounds']} rounds, {rec['tool_calls']} tool calls, {rec['frames']} frames)   "
               "overview (green: frames that show the yellow border)", fontsize=9, loc="left")
  tl = fig.add_subplot(grid[row + 1])
  tl.set_xlim(0, meta.duration)
  tl.set_ylim(0, 1)
  tl.set_yticks([])
  tl.vlines(ov_ts, 0, 1, color="gray", lw=0.8)
  if cue:
    tl.axvspan(cue[0], cue[1], color="gold", alpha=0.5, label="yellow border")
  if win:
    tl.axvspan(win[0], win[1] + 1 / meta.fps, color="red", alpha=0.9, label="flash (answer)")
  calls = [(c, *found) for c in rec["calls"] if (found := T.logged_call(c)) is not None]
  labelled = set()
  for _, tool, call in calls:
    s, e = tool.span(call)
    label = None if tool.name in labelled else f"model's {tool.name}"
    labelled.add(tool.name)
    tl.plot([s, e], [0.5, 0.5], color="tab:blue", lw=6, solid_capstyle="butt", marker="|" if s == e else None,
            markersize=14, label=label)
  tl.legend(loc="upper right", fontsize=7, ncol=3, framealpha=0.8)
  tl.set_xlabel("time (s)", fontsize=8)
  tl.tick_params(labelsize=7)
  zx = fig.add_subplot(grid[row + 2])
  zx.set_axis_off()
  ok = [(tool, call) for c, tool, call in calls if c.get("frames")]
  if not ok:
    zx.text(0.0, 0.5, "no tool frames" + (f" (tool error: {rec['calls'][0].get('error')})" if rec["calls"] else ""),
            fontsize=9, transform=zx.transAxes)
    return
  tool, call = ok[-1]
  with VideoReader(rec["video"]) as reader:
    shown = tool.run(call, reader)
  frames, idx, ts = list(shown.frames), shown.indices, shown.times
  marks = [bool(a_frames) and a_frames[0] <= i <= a_frames[1] for i in idx]
  zx.imshow(_strip(frames, marks))
  w = frames[0].shape[1] + GAP
  for k, t in enumerate(ts):
    zx.text(k * w + (w - GAP) / 2, frames[0].shape[0] + 2, f"{t:.2f}s", ha="center", va="top", fontsize=7)
  zx.set_title(f"{tool.describe(call)} (green: frames inside the flash)", fontsize=9, loc="left")
