"""One zoom clip cut from a file without its time index: the packets around the segment stand in for it.

    frames, times, rotation = window_clip(container, start, end, fps)   # or None: use the time index

`VideoReader(path, index="lazy").zoom(...)` calls this before the file is indexed (docs/video.md). One seek to the
keyframe before `start`, a demux of the packets from there (nothing decoded) until more packets shown after
`end` than a decoder may reorder (or the file's end), then the same choice of frames as `sample_zoom` on those
packets' true times, and one decode of the packets kept in memory that skips the non-reference frames no one
wants. The frames and their times are the ones the time index would give; whenever that cannot be told from the
window (the seek landed after `start`, no frame is shown after `end` so the clamp needs the video's end, no frame
starts inside the segment), the answer is None and the caller indexes the file.
"""

from __future__ import annotations

import fractions
from typing import Any

import numpy as np

from zoomer_jax.video.pyav_source import AvSource, decode_wanted, rgb_converter
from zoomer_jax.video.sampling import TOL, frames_inside, zoom_frame_count
from zoomer_jax.video.timeline import _origin, rotation_of

REORDER = 32  # packets shown after `end` that end the demux: more than any decoder's reorder depth


def window_clip(container: Any, start: float, end: float, fps: float, max_frames: int | None = None):
  """(n uint8 RGB frames [H, W, 3] as decoded (not rotated), true times float64 [n], the frames' display rotation
  in degrees) of the zoom [start, end] at `fps` (the rules of `sampling.sample_zoom`), read from an open PyAV
  container; None when the window cannot tell (module docstring) or a frame does not decode from its keyframe
  (the time index's reader retries from earlier ones). FFmpeg's errors propagate. n == 0 is left to the caller
  (None)."""
  n = zoom_frame_count(start, end, fps, max_frames)
  if n <= 0 or end <= max(start, 0.0):
    return None
  stream = container.streams.video[0]
  tb = stream.time_base
  origin = _origin(container, stream)
  lo, hi = max(start, 0.0), end
  to_pts = lambda t: origin + int(fractions.Fraction(t).limit_denominator(1 << 20) / tb)
  container.seek(to_pts(lo), stream=stream, backward=True)
  pts, packets, past, limit = [], [], 0, to_pts(hi) + 1
  for packet in container.demux(stream):
    if packet.size == 0:
      break  # the end of the file: every packet is in
    if packet.pts is None or not packets and not packet.is_keyframe:
      return None
    packets.append(packet)  # kept (compressed) and decoded from memory below: no second seek
    if packet.is_discard:
      continue
    pts.append(packet.pts)
    past += packet.pts > limit
    if past > REORDER:  # no packet after these can still be shown before `end`
      break
  if not pts:
    return None
  order = np.argsort(pts, kind="stable")
  pts = np.asarray(pts, np.int64)[order]
  times = (pts - origin) * tb.numerator / tb.denominator
  if times[0] > lo + TOL or times[-1] <= hi + TOL:
    return None  # a frame before the first one seen may lie in the segment, or none is known past its end
  idx = frames_inside(times, lo, hi, n)
  if idx is None:
    return None  # no frame starts inside the segment: the frame on screen at `start` is the index's to say
  decoded = _decode(stream, packets, set(pts[np.unique(idx)].tolist()))
  if decoded is None:
    return None
  frames, rotation = decoded
  return [frames[int(p)] for p in pts[idx]], times[idx], rotation


def _decode(stream: Any, packets: list, wanted: set[int]):
  """({pts: frame} for the pts in `wanted`, their display rotation), decoded from `packets` (a keyframe's, on) as
  `pyav_source.AvSource` decodes; None when one does not come out."""
  cc = stream.codec_context
  out, rotation, rgb = {}, [0], rgb_converter()

  def take(frames) -> bool:
    for frame in frames:
      if frame.pts in wanted and frame.pts not in out:
        out[frame.pts] = rgb(frame)
        rotation[0] = rotation_of(frame)
    return len(out) == len(wanted)

  decode_wanted(cc, packets, lambda pts: pts, set(wanted), take, cc.name in AvSource.skip_codecs)
  return (out, rotation[0]) if len(out) == len(wanted) else None
