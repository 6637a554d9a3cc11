"""PyAV frame source: seek to the keyframe before each run of wanted frames, decode forward, skip what no one needs.

Frame i is the i-th frame of the time index (timeline.py): frames are matched by pts, so a frame's index is its
place in presentation order whatever the container (edit lists, MPEG-TS, variable frame rate).

Decoding: per packet, skip_frame is NONREF unless the packet is a wanted frame (FFmpeg's own decoders), so it drops
non-reference frames no one asked for (references are always decoded: every returned frame is exact); once
every wanted packet is in, the decoder is drained instead of decoding further. A wanted frame that does not
come out (open GOP, or a seek that lands on a later keyframe, as MPEG-TS seeks do) is retried from an earlier
keyframe, last from the start of the file. Reads spanning several keyframes are split over `workers` threads at
keyframes (a split never adds decoding), a container each.
"""

from __future__ import annotations

from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from zoomer_jax.video.meta import VideoError, in_parallel
from zoomer_jax.video.sampling import plan_runs, split_runs
from zoomer_jax.video.timeline import OffGrid, Timeline, build_timeline, table_timeline


def open_container(path: str) -> Any:
  """A PyAV container with a video stream; VideoError naming the file otherwise."""
  try:
    container = av.open(path)
  except av.FFmpegError as e:
    raise VideoError(f"cannot open video {path} with PyAV: {e}") from None
  if not container.streams.video:
    container.close()
    raise VideoError(f"video {path} has no video stream")
  return container


def read_timeline(path: str) -> Timeline:
  """The file's time index (one pass; see timeline.py); VideoError naming the file when it has none."""
  try:
    return build_timeline(lambda: open_container(path))
  except av.FFmpegError as e:
    raise VideoError(f"video {path}: cannot index its frames ({type(e).__name__}: {e})") from None


def rgb_converter():
  """frame -> uint8 RGB [H, W, 3], the pixels of `frame.to_ndarray(format="rgb24")`. One converter keeps its
  swscale context across frames, where `to_ndarray(format=...)` builds one per frame (bench/bench_video.py prints
  the difference); not thread-safe: one per decode."""
  reformatter = VideoReformatter()
  return lambda frame: reformatter.reformat(frame, format="rgb24").to_ndarray()


def decode_wanted(cc: Any, packets, key, unsent: set, take, skipping: bool) -> None:
  """Feeds `packets` (decode order, from a keyframe) to the decoder `cc`. A packet whose key(pts) is in `unsent`
  decodes in full; with `skipping`, any other with skip_frame NONREF (references still decode, so every wanted
  frame is exact). `take(frames)` gets what comes out and returns True once nothing more is needed; when every
  wanted packet is in, the decoder is drained instead of fed further."""
  skip = None
  try:
    for packet in packets:
      if packet.size == 0:
        break
      if packet.pts is None:
        continue
      i = key(packet.pts)
      mode = "DEFAULT" if i in unsent or not skipping else "NONREF"
      if mode != skip:
        cc.skip_frame = skip = mode
      unsent.discard(i)
      if take(cc.decode(packet)):
        return
      if not unsent:
        break
    take(cc.decode(None))
  finally:
    cc.skip_frame = "DEFAULT"


class AvSource:
  """Metadata and frames of one file with PyAV; `read` is safe per container (one container per thread)."""

  name = "av"
  retries = 4  # seeks tried when a run's frames do not come out: earlier keyframes, last the file's start
  threads = "AUTO"  # decoder threading for a read in one thread (frame + slice threads)
  group_threads = "SLICE"  # decoder threading inside each worker of a split read
  seek_cost = 4  # frames of decoding a seek is worth, reading in one thread
  min_split = 32  # frames of decoding below which a read is not split over workers
  # FFmpeg's own decoders apply skip_frame to the packet it is set for; wrappers of outside libraries (libdav1d
  # for AV1) apply it frames later, dropping wanted frames, so those decode every frame.
  skip_codecs = frozenset({"h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video", "vp8", "vp9", "mjpeg"})

  def __init__(self, path: str, workers: int, timeline: Timeline):
    self.path, self.workers, self.timeline = path, workers, timeline
    self.handle = None

  def open(self, threads: str | None = None) -> Any:
    container = open_container(self.path)
    container.streams.video[0].thread_type = threads or self.threads
    return container

  @staticmethod
  def close(container: Any) -> None:
    container.close()

  def read(self, container: Any, wanted: np.ndarray, out: dict[int, np.ndarray]) -> None:
    """Decodes the sorted unique frames `wanted` into out[index] (uint8 RGB [H, W, 3]); a decoder failure is a
    VideoError naming the file and the frames asked for."""
    timeline = self.timeline
    try:
      try:
        self._read(container, timeline, wanted, out)
      except OffGrid:  # not constant-rate after all: index every packet and read again
        self.timeline = table_timeline(lambda: open_container(self.path), timeline)
        if self.timeline.n != timeline.n:
          raise VideoError(f"video {self.path}: its index lists {timeline.n} frames, its packets "
                           f"{self.timeline.n}") from None
        out.clear()
        self._read(container, self.timeline, wanted, out)
    except av.FFmpegError as e:
      raise VideoError(f"video {self.path}: decoding frames {int(wanted[0])}..{int(wanted[-1])} failed "
                       f"({type(e).__name__}: {e})") from e

  def _read(self, container: Any, timeline: Any, wanted: np.ndarray, out: dict[int, np.ndarray]) -> None:
    keys = timeline.keyframes_before(wanted)
    groups = []
    if self.workers > 1:  # every keyframe between wanted frames is a free split point
      runs = plan_runs(wanted, keys, seek_cost=0)
      if sum(r[-1] - s + 1 for s, r in runs) >= self.min_split:
        groups = split_runs(runs, self.workers)
    if len(groups) <= 1:
      for seek, run in plan_runs(wanted, keys, seek_cost=self.seek_cost):
        self._run(container, timeline, seek, run, out)
      return

    def work(group):  # one container per thread; the groups are the parallelism
      c = self.open(self.group_threads)
      try:
        for seek, run in group:
          self._run(c, timeline, seek, run, out)
      finally:
        c.close()

    in_parallel(groups, work)

  def _run(self, container: Any, timeline: Any, seek: int, run: np.ndarray, out: dict[int, np.ndarray]) -> None:
    """Decodes the frames `run` after seeking to keyframe `seek`; retries from earlier keyframes if needed."""
    for attempt in range(self.retries):
      missing = self._decode(container, timeline, seek, run, out)
      if not missing:
        return
      if seek == 0:
        break
      seek = int(timeline.keyframes_before([seek - 1])[-1]) if attempt < self.retries - 2 else 0
    raise VideoError(f"video {self.path}: cannot decode frames {sorted(missing)[:8]} of {timeline.n}")

  def _decode(self, container: Any, timeline: Any, seek: int, run: np.ndarray,
              out: dict[int, np.ndarray]) -> set[int]:
    """One seek (to keyframe `seek`'s pts, backward; frame 0: the start of the file), then decode; returns
    what did not come out."""
    stream = container.streams.video[0]
    cc = stream.codec_context
    if seek == 0:
      container.seek(0)  # the container's clock: before every frame, also where the first pts is not 0
    else:
      container.seek(timeline.pts_of(seek), stream=stream, backward=True)
    frame_of = timeline.frame_of
    rgb = rgb_converter()
    pending, unsent = set(run.tolist()), set(run.tolist())
    skipping = cc.name in self.skip_codecs
    lost = False  # a wanted frame was passed over (not decodable from this keyframe)

    def take(frames) -> bool:
      nonlocal lost
      for frame in frames:
        if frame.pts is None:
          continue
        j = frame_of(frame.pts)
        if j < 0:
          continue  # not a frame of the index (edit-list pre-roll)
        if j in pending:
          out[j] = rgb(frame)
          pending.discard(j)
        elif pending and j > min(pending):  # frames come out in presentation order
          lost = True
      return lost or not pending

    decode_wanted(cc, container.demux(stream), frame_of, unsent, take, skipping)
    return pending
