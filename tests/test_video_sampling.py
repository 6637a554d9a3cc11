"""Frame sampling (pure numpy) against VideoZoomer's own index rules, transcribed line for line.

On a constant-rate video from 0 the time-true overview is the original's (up to the original's float
truncation, e.g. linspace's 13160.9999 for 13161); the zoom keeps the original's count and spacing but takes
its frames from inside [start, end], where the original's first frame can lie before `start`.
"""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoomer_jax.video.sampling import TOL, plan_runs, sample_overview, sample_zoom, split_runs, zoom_frame_count

FPS_VALUES = [23.976023976023978, 24.0, 25.0, 29.97002997002997, 30.0, 50.0, 59.94005994005994, 60.0, 1.0, 7.5]


def meta(n, fps):
  return SimpleNamespace(n_frames=n, fps=fps)


def original_overview(total_frame_num, avg_fps_native, video_fps=0.5, frames_upbound=64):
  """The overview rule as docs/video.md states it, written independently of ours."""
  avg_fps = max(1, round(avg_fps_native / video_fps))
  frame_idx = [i for i in range(0, total_frame_num, avg_fps)]
  frame_time = [i / avg_fps_native for i in frame_idx]
  if frames_upbound > 0:
    if len(frame_idx) > frames_upbound:
      frame_idx = np.linspace(0, total_frame_num - 1, frames_upbound, dtype=int).tolist()
      frame_time = [i / avg_fps_native for i in frame_idx]
  return frame_idx, frame_time


def exact_overview(n, fps, video_fps=0.5, frames_upbound=64):
  """The original's overview with integer arithmetic (no float truncation in linspace)."""
  idx = list(range(0, n, max(1, round(fps / video_fps))))
  if 0 < frames_upbound < len(idx):
    idx = [k * (n - 1) // (frames_upbound - 1) for k in range(frames_upbound)]
  return idx


def original_zoom(total_frame_num, video_fps, start_time, end_time, fps, max_frames=16):
  """The zoom-clip rule as docs/video.md states it, written independently of ours."""
  extract_frame_num = int(fps * (end_time - start_time))
  if extract_frame_num > max_frames:
    raise ValueError(f"Number of frames extracted ({extract_frame_num}) exceeds the maximum allowed ({max_frames}).")
  start_frame = int(start_time * video_fps)
  end_frame = int(end_time * video_fps)
  start_frame = max(0, min(start_frame, total_frame_num - 1))
  end_frame = max(start_frame, min(end_frame, total_frame_num - 1))
  frame_idx = np.linspace(start_frame, end_frame, extract_frame_num).astype(int).tolist()
  return frame_idx, [i / video_fps for i in frame_idx]


@pytest.mark.parametrize("fps", FPS_VALUES)
@pytest.mark.parametrize("seconds", [0.04, 1, 2, 3.3, 60, 127.9, 128, 128.1, 129, 300, 3600])
def test_overview_matches_original(fps, seconds):
  n = max(1, int(seconds * fps))
  idx, ts = sample_overview(meta(n, fps))
  want_idx, want_ts = original_overview(n, fps)
  assert idx.tolist() == want_idx and idx.dtype == np.int64
  np.testing.assert_allclose(ts, want_ts)
  assert len(idx) <= 64 and idx[0] == 0 and idx[-1] <= n - 1


def test_overview_branches():
  # 29.97 fps: step round(59.94) = 60, so <= 64 frames up to 64*60 = 3840 frames, linspace beyond.
  idx, _ = sample_overview(meta(3840, 29.97))
  assert np.all(np.diff(idx) == 60) and len(idx) == 64
  idx, _ = sample_overview(meta(3841, 29.97))
  assert len(idx) == 64 and idx[-1] == 3840 and idx.tolist() == np.linspace(0, 3840, 64).astype(int).tolist()
  assert sample_overview(meta(1, 30.0))[0].tolist() == [0]
  # frames_upbound <= 0 disables the cap, as in the original.
  assert len(sample_overview(meta(100000, 30.0), frames_upbound=0)[0]) == math.ceil(100000 / 60)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 200000), fps=st.sampled_from(FPS_VALUES), video_fps=st.sampled_from([0.2, 0.5, 1.0, 2.0]),
       up=st.sampled_from([0, 8, 32, 64]))
def test_overview_property(n, fps, video_fps, up):
  idx, ts = sample_overview(meta(n, fps), video_fps, up)
  assert idx.tolist() == exact_overview(n, fps, video_fps, up)
  np.testing.assert_allclose(ts, idx / fps)
  want, _ = original_overview(n, fps, video_fps, up)
  assert np.all(np.abs(idx - np.array(want)) <= 1)  # the original's float truncation, at most one frame


@settings(max_examples=500, deadline=None)
@given(n=st.integers(1, 100000), fps_native=st.sampled_from(FPS_VALUES),
       start=st.floats(-20, 4000, allow_nan=False), dur=st.floats(0, 40, allow_nan=False),
       fps=st.sampled_from([0.1, 0.5, 1, 2, 3.3, 4, 8, 16]))
def test_zoom_against_original(n, fps_native, start, dur, fps):
  end = start + dur
  try:
    want, _ = original_zoom(n, fps_native, start, end, fps)
  except ValueError as e:
    with pytest.raises(ValueError, match=re.escape(str(e))):
      sample_zoom(meta(n, fps_native), start, end, fps)
    return
  idx, ts = sample_zoom(meta(n, fps_native), start, end, fps)
  assert len(idx) == len(want) and idx.dtype == np.int64
  np.testing.assert_allclose(ts, idx / fps_native)
  if not len(idx):
    return
  assert 0 <= idx.min() and idx.max() <= n - 1 and np.all(np.diff(idx) >= 0)
  lo, hi = max(start, 0), min(end, n / fps_native)
  inside = np.flatnonzero((np.arange(n) / fps_native >= lo - TOL) & (np.arange(n) / fps_native <= hi + TOL))
  if len(inside):  # every frame inside the segment, first and last included
    assert idx[0] == inside[0] and (idx[-1] == inside[-1] or len(idx) == 1)
    # the original's indices, moved to the first frame inside: the same spacing
    assert np.all(np.abs(idx - np.array(want)) <= 1 + inside[0] - want[0])
  else:  # no frame starts inside: the frame on screen at the start (or the last frame)
    assert np.all(idx == min(n - 1, int(lo * fps_native + TOL * fps_native)))


def test_zoom_cases():
  m = meta(18000, 30.0)
  idx, ts = sample_zoom(m, 301.3, 305.3, 4)  # 16 frames, endpoints included, all inside the segment
  assert len(idx) == 16 and idx[0] == 9039 and idx[-1] == 9159
  idx, ts = sample_zoom(m, 301.31, 305.31, 4)  # the original would start at 9039 (301.30 s), before the segment
  assert len(idx) == 16 and idx[0] == 9040 and idx[-1] == 9159 and ts.min() >= 301.31
  np.testing.assert_allclose(ts, idx / 30.0)
  # Past the end: clamped to the last frame, repeated (no error).
  idx, _ = sample_zoom(m, 700, 703, 4)
  assert idx.tolist() == [17999] * 12
  # fps * duration < 1: no frames.
  idx, ts = sample_zoom(m, 10, 10.2, 4)
  assert idx.shape == (0,) and ts.shape == (0,)
  # Over the budget: the original's message.
  with pytest.raises(ValueError, match=r"Number of frames extracted \(20\) exceeds the maximum allowed \(16\)\."):
    sample_zoom(m, 0, 5, 4)
  assert len(sample_zoom(m, 0, 5, 4, max_frames=None)[0]) == 20
  # start > end: numpy's own error, as the original surfaces it.
  with pytest.raises(ValueError, match="must be non-negative"):
    sample_zoom(m, 10, 9, 4)
  assert zoom_frame_count(0, 4, 4) == 16
  with pytest.raises(ValueError, match="fps > 0"):
    sample_zoom(meta(0, 30.0), 0, 1, 1)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_plan_runs_cover_wanted(data):
  n = data.draw(st.integers(1, 5000))
  wanted = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=80))))
  keyframes = np.array(sorted({0} | data.draw(st.sets(st.integers(0, n - 1), max_size=60))))
  cost = data.draw(st.integers(0, 20))
  runs = plan_runs(wanted, keyframes, seek_cost=cost)
  assert np.concatenate([r for _, r in runs]).tolist() == wanted.tolist()
  for seek, run in runs:
    assert seek in keyframes and seek <= run[0]
    assert not np.any((keyframes > seek) & (keyframes <= run[0]))  # the last keyframe before the run
    gap_keys = [keyframes[np.searchsorted(keyframes, b, side="right") - 1] for b in run[1:]]
    assert all(k <= a + cost for a, k in zip(run[:-1], gap_keys))  # no cheaper seek inside a run
  groups = split_runs(runs, data.draw(st.integers(1, 4)))
  assert [r for g in groups for r in g] == runs

  plain = plan_runs(wanted, max_gap=10)
  assert np.concatenate([r for _, r in plain]).tolist() == wanted.tolist()
  assert all(seek == run[0] and np.all(np.diff(run) <= 10) for seek, run in plain)


def test_plan_runs_examples():
  kf = np.arange(0, 1000, 250)
  assert [(s, r.tolist()) for s, r in plan_runs(np.array([260, 270, 520, 990]), kf)] == [
      (250, [260, 270]), (500, [520]), (750, [990])]
  # A keyframe just past the previous wanted frame is not worth a seek.
  assert [(s, r.tolist()) for s, r in plan_runs(np.array([248, 252]), kf, seek_cost=4)] == [(0, [248, 252])]
  assert plan_runs(np.array([], np.int64), kf) == []
  with pytest.raises(ValueError, match="sorted"):
    plan_runs(np.array([3, 2]), kf)
  with pytest.raises(ValueError, match="frame 0"):
    plan_runs(np.array([3]), np.array([2]))
