"""VideoReader on videos made here with the frame index drawn in the pixels: every frame must be the one asked for.

Files (29.97 fps, except one at 30): MPEG-4 part 2 from OpenCV's writer (GOP 12), H.264 from libx264 with
B-frames and a long GOP (250), and H.264 with a short GOP. Each is read with both backends.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import media
from zoomer_jax.video import VideoError, VideoReader, read_meta, sample_overview, sample_zoom
from zoomer_jax.video.pyav_source import AvSource
from zoomer_jax.video.timeline import OffGrid, Timeline

FPS = 30000 / 1001
SIZE = (96, 160)
FILES = {
    "mp4v": dict(n=700, fps=FPS, codec="mp4v"),
    "h264_gop250": dict(n=700, fps=FPS, codec="h264", gop=250),
    "h264_gop30": dict(n=400, fps=30.0, codec="h264", gop=30),
}
BACKENDS = ["cv2", "av"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  return {name: (media.write_video(str(d / f"{name}.mp4"), spec["n"], spec["fps"], SIZE, spec["codec"],
                                   gop=spec.get("gop")), spec) for name, spec in FILES.items()}


def assert_frames(reader, idx):
  frames = reader.frames(idx)
  assert frames.shape == (len(idx), *SIZE, 3) and frames.dtype == np.uint8
  got = [media.frame_index(f) for f in frames]
  assert got == [int(i) for i in idx], f"{reader.backend}: wanted {list(idx)}, got {got}"


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_meta(videos, name, backend):
  path, spec = videos[name]
  m = VideoReader(path, backend).meta
  assert m.n_frames == spec["n"] and (m.height, m.width) == SIZE and m.path == path
  assert m.fps == pytest.approx(spec["fps"], rel=1e-5)  # OpenCV's writer stores 29.97 as 2997/100
  assert m.duration == pytest.approx(spec["n"] / spec["fps"], rel=1e-5)
  assert read_meta(path, backend) == m


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overview_frames(videos, name, backend):
  path, _ = videos[name]
  reader = VideoReader(path, backend)
  idx, ts = sample_overview(reader.meta)  # step branch: 60 frames apart
  assert len(idx) > 5
  assert_frames(reader, idx)
  np.testing.assert_allclose(ts, idx / reader.meta.fps)
  idx, _ = sample_overview(reader.meta, frames_upbound=5)  # linspace branch, ends on the last frame
  assert idx[-1] == reader.meta.n_frames - 1
  assert_frames(reader, idx)


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zoom_frames(videos, name, backend, rng):
  path, _ = videos[name]
  reader = VideoReader(path, backend)
  duration = reader.meta.duration
  segments = [(0, 4), (8.31, 12.31), (duration - 3, duration + 5), (duration + 2, duration + 4), (5.5, 5.5)]
  segments += [(s, s + float(rng.uniform(0.5, 8))) for s in rng.uniform(0, duration, 6)]
  for start, end in segments:
    fps = float(rng.choice([0.5, 1, 2, 4])) if end - start <= 4 else 2.0
    idx, _ = sample_zoom(reader.meta, start, end, fps)
    assert_frames(reader, idx)


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_arbitrary_indices(videos, name, backend, rng):
  path, spec = videos[name]
  reader = VideoReader(path, backend)
  n = spec["n"]
  for k in (1, 3, 17, 40):
    assert_frames(reader, rng.integers(0, n, k))  # unsorted, with repeats
  assert_frames(reader, [n - 1, 0, n - 1, 1])
  assert_frames(reader, np.arange(n))  # every frame, in order
  assert reader.frames([]).shape == (0, *SIZE, 3)
  with pytest.raises(IndexError, match=os.path.basename(path)):
    reader.frames([n])
  with pytest.raises(IndexError):
    reader.frames([-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads(videos, backend, rng):
  """One reader shared by a thread pool (how the agent extracts clips), plus readers of its own per thread."""
  path, _ = videos["h264_gop250"]
  reader = VideoReader(path, backend)
  starts = rng.uniform(0, reader.meta.duration - 4, 16)
  errors = []

  def job(k):
    idx, _ = sample_zoom(reader.meta, starts[k], starts[k] + 4, 4)
    r = reader if k % 2 else VideoReader(path, backend)
    frames = r.frames(idx)
    got = [media.frame_index(f) for f in frames]
    if got != idx.tolist():
      errors.append((k, idx.tolist(), got))
    return threading.get_ident()

  with ThreadPoolExecutor(4) as pool:
    list(pool.map(job, range(16)))
  assert not errors


def test_auto_backend_falls_back_to_opencv(videos, monkeypatch):
  """A PyAV decode failure under "auto" is retried with OpenCV; "av" alone reports it."""
  path, _ = videos["h264_gop250"]
  assert VideoReader(path).backend == "av"

  def broken(self, container, wanted, out):
    raise VideoError(f"video {self.path}: broken decoder")

  monkeypatch.setattr(AvSource, "read", broken)
  reader = VideoReader(path)
  assert_frames(reader, [5, 300, 699])
  assert reader.backend == "cv2"
  with pytest.raises(VideoError, match="broken decoder"):
    VideoReader(path, "av").frames([5])


def test_split_read(videos):
  """The overview split over worker threads gives the same frames as one worker."""
  path, _ = videos["h264_gop250"]
  idx = np.linspace(0, 699, 40).astype(int)
  for workers in (1, 2, 3):
    assert_frames(VideoReader(path, "av", workers=workers), idx)


def test_errors(tmp_path):
  missing = tmp_path / "missing.mp4"
  with pytest.raises(FileNotFoundError, match="missing.mp4"):
    VideoReader(missing)
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(os.urandom(5000))
  for backend in ("auto", "cv2", "av"):
    with pytest.raises(VideoError, match="garbage.mp4"):
      VideoReader(garbage, backend)
  empty = tmp_path / "empty.mp4"
  import cv2
  cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 64)).release()  # a video track, no frames
  assert empty.stat().st_size > 0
  for backend in ("auto", "cv2", "av"):
    with pytest.raises(VideoError, match="empty.mp4"):
      VideoReader(empty, backend)
  with pytest.raises(ValueError, match="backend"):
    VideoReader(garbage, "decord")
  # A container that opens but whose frames 25-34 cannot be decoded: the error names the file, on every backend
  torn = media.write_torn_mjpeg(str(tmp_path / "torn.avi"), range(25, 35))
  for backend in ("auto", "cv2", "av"):
    with VideoReader(torn, backend) as reader:
      assert reader.frames([0, 100]).shape == (2, 64, 80, 3)
      with pytest.raises(VideoError, match="torn.avi"):
        reader.frames(np.arange(24, 36))


def test_av_retries_from_an_earlier_keyframe(videos, monkeypatch):
  """A seek that lands past the wanted frames (as with an open GOP or MPEG-TS) is retried from the keyframe
  before, last from the start of the file."""
  path, _ = videos["h264_gop250"]
  reader = VideoReader(path, "av", workers=1)
  assert reader.timeline.grid
  seeks = []
  real = AvSource._decode

  def late_once(self, c, tl, seek, run, out):
    seeks.append(seek)
    return set(run.tolist()) if len(seeks) == 1 else real(self, c, tl, seek, run, out)

  monkeypatch.setattr(AvSource, "_decode", late_once)
  assert_frames(reader, [300, 310])
  assert seeks == [250, 0]
  monkeypatch.setattr(AvSource, "_decode", lambda self, c, tl, seek, run, out: set(run.tolist()))
  with pytest.raises(VideoError, match="h264_gop250.mp4"):
    reader.frames([300])


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_and_mkv(tmp_path, suffix, rng):
  """PyAV indexes every packet when the index is not a constant-rate grid (VFR mp4) or absent (mkv)."""
  cfr = media.write_video(str(tmp_path / f"cfr{suffix}"), 300, FPS, SIZE, "h264", gop=50)
  vfr = media.write_video(str(tmp_path / f"vfr{suffix}"), 300, FPS, SIZE, "h264", gop=50, vfr=True)
  for path in (cfr, vfr):
    reader = VideoReader(path)
    assert reader.backend == "av" and reader.meta.n_frames == 300
    assert reader.timeline.grid == (path == cfr and suffix == ".mp4")
    assert_frames(reader, sample_overview(reader.meta, frames_upbound=7)[0])
    assert_frames(reader, rng.integers(0, 300, 20))
    assert_frames(reader, np.arange(300))
    assert_frames(VideoReader(path, "cv2"), rng.integers(0, 300, 20))  # frames named by their timestamps


def test_off_grid_pts_switch_to_a_packet_table(videos, monkeypatch):
  """A file that passes the index check but decodes off the grid is re-indexed from its packets."""
  path, _ = videos["h264_gop30"]
  reader = VideoReader(path, "av")
  source = reader._sources[0]
  real = Timeline.frame_of

  def off_grid(self, pts):
    if self.grid:
      raise OffGrid("test")
    return real(self, pts)

  monkeypatch.setattr(Timeline, "frame_of", off_grid)
  assert_frames(reader, [3, 200, 399])
  assert not source.timeline.grid and source.timeline.n == 400


def test_rgb_converter_gives_to_ndarrays_pixels(videos):
  """The reused swscale context (`pyav_source.rgb_converter`) converts exactly as `to_ndarray(format="rgb24")`."""
  import av
  from zoomer_jax.video.pyav_source import rgb_converter
  rgb = rgb_converter()
  with av.open(videos["h264_gop250"][0]) as container:
    for k, frame in enumerate(container.decode(video=0)):
      assert np.array_equal(rgb(frame), frame.to_ndarray(format="rgb24"))
      if k == 20:
        break
