"""Videos as cameras and tools write them, made here: each frame's index is drawn in its pixels and its true time
is its presentation time, decoded start to finish with PyAV (media.true_frames). Every overview and zoom frame
must be the frame on screen at a time the sampling rule chose: inside the requested segment, labelled with its
true time (to the 2 decimals the model sees), upright, the same with both decoders.

Kinds: variable frame rate (H.264 mp4, and mkv), an mp4 trimmed with `ffmpeg -ss -c copy` (edit list hiding
pre-roll frames), MPEG-TS with B-frames, webm (VP9) whose audio outlasts the video, an mkv whose video starts 2 s
after its audio, portrait phone videos (display rotation 90/270/180), HEVC, AV1 and open-GOP H.264.
"""

import numpy as np
import pytest

import media
from zoomer_jax.video import VideoError, VideoReader, sample_overview, sample_zoom

SIZE = (96, 160)
FPS = 30.0
N = 240  # 8 s


def _make(kind: str, d) -> str:
  src = str(d / "src.mp4")
  media.write_video(src, N, FPS, SIZE, "h264", gop=60)
  x264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
  out = {"vfr_mp4": "vfr.mp4", "vfr_mkv": "vfr.mkv", "trimmed_mp4": "trim.mp4", "mpegts_bframes": "cam.ts",
         "webm_long_audio": "long.webm", "mkv_late_start": "late.mkv", "portrait_90": "p90.mp4",
         "portrait_270": "p270.mp4", "upside_down_180": "p180.mp4", "hevc_mp4": "hevc.mp4", "av1_mp4": "av1.mp4",
         "open_gop_mkv": "open.mkv"}[kind]
  path = str(d / out)
  if kind == "vfr_mp4":
    media.write_video(path, N, FPS, SIZE, "h264", gop=50, vfr=True)
  elif kind == "vfr_mkv":
    media.write_video(str(d / "vfr.mp4"), N, FPS, SIZE, "h264", gop=50, vfr=True)
    media.ffmpeg("-i", str(d / "vfr.mp4"), "-c", "copy", path)
  elif kind == "trimmed_mp4":  # the cut (3.3 s) is off the 2-s keyframes: an edit list hides the pre-roll
    media.ffmpeg("-ss", "3.3", "-i", src, "-c", "copy", path)
  elif kind == "mpegts_bframes":
    media.ffmpeg("-i", src, *x264, "-bf", "3", "-g", "50", path)
  elif kind == "webm_long_audio":
    media.ffmpeg("-i", src, "-f", "lavfi", "-i", "sine=d=11", "-c:v", "libvpx-vp9", "-deadline", "realtime",
                 "-cpu-used", "8", "-g", "40", "-c:a", "libopus", path)
  elif kind == "mkv_late_start":
    media.ffmpeg("-itsoffset", "2", "-i", src, "-f", "lavfi", "-i", "sine=d=11", *x264, "-bf", "2", "-g", "50",
                 "-c:a", "aac", path)
  elif kind.startswith(("portrait", "upside")):
    media.write_rotated(path, N, FPS, SIZE[::-1] if kind.startswith("portrait") else SIZE,
                        int(kind.split("_")[-1]))
  elif kind == "hevc_mp4":
    media.ffmpeg("-i", src, "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error:keyint=45",
                 "-pix_fmt", "yuv420p", path)
  elif kind == "av1_mp4":
    media.ffmpeg("-i", src, "-c:v", "libsvtav1", "-preset", "12", "-g", "45", "-pix_fmt", "yuv420p", path)
  elif kind == "open_gop_mkv":
    media.ffmpeg("-i", src, *x264, "-bf", "3", "-x264-params", "open-gop=1:keyint=40:min-keyint=40:scenecut=0",
                 path)
  return path


KINDS = ["vfr_mp4", "vfr_mkv", "trimmed_mp4", "mpegts_bframes", "webm_long_audio", "mkv_late_start", "portrait_90",
         "portrait_270", "upside_down_180", "hevc_mp4", "av1_mp4", "open_gop_mkv"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  made = {}
  for kind in KINDS:
    d = tmp_path_factory.mktemp(kind)
    path = _make(kind, d)
    made[kind] = (path, media.true_frames(path))
  return made


def _segments(duration, rng):
  segs = [(0, 4, 4), (3.31, 5.2, 8), (duration - 2, duration + 3, 3), (5.0, 5.02, 100), (7.71, 8.1, 16),
          (0.01, 0.3, 30), (2.0, 2.0, 4)]
  segs += [(float(s), float(s) + float(w), 16 / float(w)) for s, w in zip(rng.uniform(0, duration, 6),
                                                                          rng.uniform(0.2, 4, 6))]
  return segs


def _check(reader, truth, idx, ts, segment=None):
  frames = reader.frames(idx)
  assert frames.shape[1:] == (reader.meta.height, reader.meta.width, 3)
  drawn = [media.frame_index(f) for f in frames]
  assert all(k in truth for k in drawn), f"frames not in the video (sideways or corrupt?): {drawn}"
  true = np.array([truth[k] for k in drawn])
  np.testing.assert_allclose(ts, true, atol=1e-3)
  assert [f"{t:.2f}" for t in ts] == [f"{t:.2f}" for t in true]
  if segment is not None:
    s, e = segment
    times = np.array(sorted(truth.values()))
    lo, hi = max(s, 0), min(e, reader.meta.duration)
    if np.any((times >= lo - 1e-4) & (times <= hi + 1e-4)):
      assert np.all((true >= lo - 1e-4) & (true <= hi + 1e-4)), (segment, true)
    else:  # no frame starts inside: the frame on screen at its start
      assert np.all(true == times[max(0, np.searchsorted(times, lo + 1e-4) - 1)])
  return frames, drawn


@pytest.mark.parametrize("kind", KINDS)
def test_frames_are_time_true_on_both_backends(videos, kind, rng):
  path, truth = videos[kind]
  times = np.array(sorted(truth.values()))
  seen = {}
  for backend in ("av", "cv2"):
    reader = VideoReader(path, backend)
    m = reader.meta
    assert m.n_frames == len(truth)
    np.testing.assert_allclose(m.times, times, atol=1e-3)
    assert m.times[-1] < m.duration <= m.times[-1] + 0.2
    if "portrait" in kind:
      assert m.height > m.width
    got = [_check(reader, truth, *sample_overview(m))]
    for s, e, fps in _segments(m.duration, np.random.default_rng(7)):
      idx, ts = sample_zoom(m, s, e, fps, max_frames=None)
      got.append(_check(reader, truth, idx, ts, (s, e)))
    seen[backend] = got
    assert reader.backend == backend
  for (fa, ia), (fc, ic) in zip(seen["av"], seen["cv2"]):
    assert ia == ic  # the same frames
    assert not len(fa) or np.abs(fa.astype(int) - fc.astype(int)).mean() < 1.0  # same pixels (decoder versions)


@pytest.mark.parametrize("kind", KINDS)
def test_a_zoom_before_the_index_equals_the_indexed_zoom(videos, kind):
  """`VideoReader(index="lazy").zoom` cuts a clip from the packets around the segment, before (and without) the
  time index: the same frames, times and pixels as the indexed reader's zoom, on every kind of file. Segments
  inside the video are cut so on the files whose seeks land where asked (interior segments of the H.264/HEVC/AV1
  mp4, mkv and webm files); past the end, with no frame inside, or where a seek lands late (MPEG-TS) the reader
  builds the index and answers from it."""
  path, truth = videos[kind]
  indexed = VideoReader(path)
  windowed = 0
  for s, e, fps in _segments(indexed.meta.duration, np.random.default_rng(7)):
    want_idx, want_ts, want = indexed.zoom(s, e, fps, max_frames=None)
    lazy = VideoReader(path, index="lazy")
    idx, ts, got = lazy.zoom(s, e, fps, max_frames=None)
    assert (idx is None) == (not lazy.indexed)  # a clip cut from the window has no frame indices
    windowed += idx is None
    np.testing.assert_array_equal(ts, want_ts)
    assert got.shape == want.shape
    assert [media.frame_index(f) for f in got] == [media.frame_index(f) for f in want]
    assert not len(got) or np.abs(got.astype(int) - want.astype(int)).mean() < 1.0
    _check(indexed, truth, want_idx, ts, (s, e))
  # 13 segments, 6 or more past the end, empty or without a frame inside (trimmed: a 4.7-s file); MPEG-TS seeks
  # land after the keyframe asked for, so its clips all come from the index.
  assert windowed >= (0 if kind == "mpegts_bframes" else 5), windowed


def test_edit_list_hides_pre_roll(videos):
  path, truth = videos["trimmed_mp4"]
  m = VideoReader(path).meta
  assert min(truth) == 99 and m.n_frames == N - 99  # the cut at 3.3 s: frame 99 is the first shown, at 0 s
  assert m.times[0] == 0


def test_late_start_and_long_audio_durations(videos):
  late = VideoReader(videos["mkv_late_start"][0]).meta
  assert late.times[0] == pytest.approx(2.0, abs=1e-3) and late.duration == pytest.approx(10.0, abs=0.05)
  long = VideoReader(videos["webm_long_audio"][0]).meta
  assert long.n_frames == N and long.duration == pytest.approx(8.0, abs=0.05)  # not the 11-s audio


def test_vfr_labels_are_true_times(videos):
  """On a VFR file index / average fps is far from the truth; the labels are the truth."""
  path, truth = videos["vfr_mp4"]
  m = VideoReader(path).meta
  idx = np.arange(m.n_frames)
  assert np.abs(idx / m.fps - m.times).max() > 0.2  # frames last 1-3 periods at random
  idx, ts = sample_zoom(m, 6.0, 6.5, 8)
  assert np.all((ts >= 6.0) & (ts <= 6.5)) and len(ts) == 4


def test_unreadable_files_name_the_video(tmp_path):
  bad = tmp_path / "not_a_video.mkv"
  bad.write_bytes(b"\x1aE\xdf\xa3" + bytes(3000))
  for backend in ("auto", "av", "cv2"):
    with pytest.raises(VideoError, match="not_a_video.mkv"):
      VideoReader(bad, backend)
