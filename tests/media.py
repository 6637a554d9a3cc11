"""Test videos whose frame index is written in the pixels, so a decoded frame says which frame it is.

The top band of every frame holds `BITS` blocks (2 rows x 8 columns), white for a 1 bit and black for a 0,
big enough to survive lossy compression and chroma subsampling; the rest is a moving pattern so that the
encoder does real motion-compensated work (P/B frames that depend on their references).

  write_video(path, n_frames, fps, (h, w), codec="mp4v")         # OpenCV VideoWriter
  write_video(path, n_frames, fps, (h, w), codec="h264", gop=250) # PyAV/libx264, B-frames, long GOP
  write_rotated(path, n_frames, fps, (h, w), rotation)           # stored turned, display matrix to turn back
  ffmpeg("-i", src, ..., dst)                                     # imageio-ffmpeg's static binary
  true_frames(path) -> {index: seconds}                           # decoded start to finish with PyAV
  frame_index(rgb_frame) -> int
"""

from __future__ import annotations

import fractions
import functools

import numpy as np

BITS = 16
ROWS, COLS = 2, 8
LO, HI = 16, 235


def _layout(h: int, w: int) -> tuple[int, int]:
  """Block height and width of the index band for a frame of h x w."""
  bh, bw = h // (2 * ROWS), w // COLS
  if bh < 8 or bw < 8:
    raise ValueError(f"frame {h}x{w} too small for the index band")
  return bh, bw


CYCLE = 60  # the background pattern repeats every CYCLE frames


@functools.lru_cache(maxsize=4)
def _backgrounds(h: int, w: int) -> np.ndarray:
  """CYCLE uint8 RGB frames [CYCLE, h, w, 3] of drifting sinusoids (precomputed: writing is then cheap)."""
  x, y = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)[:, None]
  out = np.empty((CYCLE, h, w, 3), np.uint8)
  for k in range(CYCLE):
    p = 2 * np.pi * k / CYCLE
    out[k, ..., 0] = 128 + 90 * np.sin(x / 17.0 + p)
    out[k, ..., 1] = 128 + 90 * np.sin(y / 11.0 - p)
    out[k, ..., 2] = 128 + 90 * np.sin(x / 23.0 + y / 23.0 + 2 * p)
  return out


def draw_frame(i: int, h: int, w: int) -> np.ndarray:
  """uint8 RGB frame [h, w, 3] showing index `i` in its top band over a moving pattern."""
  if not 0 <= i < 2**BITS:
    raise ValueError(f"index {i} outside [0, {2**BITS})")
  img = _backgrounds(h, w)[i % CYCLE].copy()
  cx, cy = (7 * i) % w, h // 2 + (3 * i) % max(1, h // 2)  # a moving square in the lower half
  img[max(cy - 12, h // 2):cy + 12, max(cx - 12, 0):cx + 12] = (240, 30, 30)
  bh, bw = _layout(h, w)
  for b in range(BITS):
    r, c = divmod(b, COLS)
    img[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = HI if (i >> b) & 1 else LO
  return img


def frame_index(frame: np.ndarray) -> int:
  """Reads the index from an RGB (or BGR) frame [h, w, 3] drawn by `draw_frame`, after lossy coding."""
  h, w = frame.shape[:2]
  bh, bw = _layout(h, w)
  i = 0
  for b in range(BITS):
    r, c = divmod(b, COLS)
    block = frame[r * bh + bh // 4:(r + 1) * bh - bh // 4, c * bw + bw // 4:(c + 1) * bw - bw // 4]
    i |= int(block.mean() > (LO + HI) / 2) << b
  return i


def write_video(path: str, n_frames: int, fps: float, size: tuple[int, int], codec: str = "mp4v",
                gop: int | None = None, bframes: int = 3, crf: int = 23, vfr: bool = False) -> str:
  """Writes `n_frames` index frames of `size` (h, w) at `fps` to `path` (container from its suffix); returns path.

  codec "mp4v": OpenCV's VideoWriter (MPEG-4 part 2, its default GOP of 12, no B-frames).
  codec "h264": PyAV with libx264 (`gop` keyframe interval, default x264's 250; `bframes` B-frames).
    vfr: variable frame rate, each frame lasting 1, 2 or 3 periods of 1/fps at random (pts in ms).
  """
  h, w = size
  if codec == "mp4v":
    import cv2
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not out.isOpened():
      raise RuntimeError(f"cv2.VideoWriter could not open {path}")
    for i in range(n_frames):
      out.write(draw_frame(i, h, w)[..., ::-1].copy())
    out.release()
  elif codec == "h264":
    import av
    rate = fractions.Fraction(fps).limit_denominator(1001)
    periods = np.cumsum(np.r_[0, np.random.default_rng(n_frames).integers(1, 4, n_frames - 1)])
    with av.open(path, "w") as container:
      stream = container.add_stream("libx264", rate=rate)
      stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
      if vfr:
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
      opts = {"preset": "veryfast", "crf": str(crf), "bf": str(bframes)}
      if gop is not None:
        opts.update(g=str(gop), keyint_min=str(gop), sc_threshold="0")
      stream.options = opts
      for i in range(n_frames):
        frame = av.VideoFrame.from_ndarray(draw_frame(i, h, w), format="rgb24")
        if vfr:
          frame.pts, frame.time_base = round(1000 * periods[i] / fps), fractions.Fraction(1, 1000)
        for packet in stream.encode(frame):
          container.mux(packet)
      for packet in stream.encode():
        container.mux(packet)
  else:
    raise ValueError(f"unknown codec {codec!r}; expected 'mp4v' or 'h264'")
  return path


def write_torn_mjpeg(path: str, frames: range) -> str:
  """An MJPG AVI of 200 index frames (10 fps, 64x80) whose JPEGs for `frames` are zeroed: the container and the
  other frames are intact, so the overview reads and a clip over `frames` fails to decode."""
  import cv2
  out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (80, 64))
  for i in range(200):
    out.write(draw_frame(i, 64, 80)[..., ::-1].copy())
  out.release()
  data = bytearray(open(path, "rb").read())
  starts, at = [], data.find(b"\xff\xd8\xff")
  while at >= 0:
    starts.append(at)
    at = data.find(b"\xff\xd8\xff", at + 3)
  assert len(starts) == 200, len(starts)
  for k in frames:
    data[starts[k]:starts[k + 1] - 16] = bytes(starts[k + 1] - 16 - starts[k])
  with open(path, "wb") as f:
    f.write(data)
  return path


def write_rotated(path: str, n_frames: int, fps: float, size: tuple[int, int], rotation: int) -> str:
  """Index frames that are upright at `size` (h, w) when shown: stored turned by -`rotation` degrees, with a
  display matrix of `rotation` (as phones write portrait video)."""
  import av
  h, w = size
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
    turned = rotation % 180 == 90
    stream.width, stream.height, stream.pix_fmt = (h, w, "yuv420p") if turned else (w, h, "yuv420p")
    stream.set_display_rotation(rotation)
    for i in range(n_frames):
      stored = np.ascontiguousarray(np.rot90(draw_frame(i, h, w), -(rotation // 90)))
      for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def ffmpeg(*args: str) -> None:
  """Runs imageio-ffmpeg's static ffmpeg (every encoder the tests need), quietly; raises with its stderr."""
  import subprocess

  import imageio_ffmpeg
  cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", *args]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")


def true_frames(path: str) -> dict[int, float]:
  """Every frame's drawn index -> its presentation time in seconds from the container's start (the clock a
  player shows), decoded start to finish with PyAV (no seeking), display rotation applied."""
  import av
  with av.open(path) as container:
    start = (container.start_time or 0) / 1e6
    out = {}
    for frame in container.decode(video=0):
      rgb = np.rot90(frame.to_ndarray(format="rgb24"), round(frame.rotation or 0) // 90)
      out[frame_index(rgb)] = round(float(frame.time) - start, 6) + 0.0  # no -0.0 from float rounding
  return out
