"""The built-in synthetic long-video task: a brief flash that only a zoom can see.

Every video (small frames, default 112x112 at 6 fps, 30-120 s) shows, over a plain dark background,

  * a cue: a yellow border, on for `cue_seconds`. It is at least as long as the widest gap between overview
    frames (`video.sampling.sample_overview`: one frame every 2 s, or 64 spread evenly), so the overview always
    shows the border in one frame or more;
  * the answer: one of `CLASSES` (a coloured shape), shown inside the cue for `answer_seconds`. That is shorter
    than the overview spacing, and the window is placed between two overview frames, so no overview frame shows
    it (checked on the overview's own indices). mp4v's P-frames leave a faint ghost of a vanished object until
    the next keyframe (every `KEYFRAME_INTERVAL` frames), so the window also ends before a keyframe that comes
    no later than the next overview frame: no overview frame shows even the ghost. At the default 6 fps the
    overview step (12 frames) equals the keyframe interval, so every overview frame is a keyframe;
  * distractors: shapes of random classes, the answer's class included with the same chance as any other, each on
    for a few seconds away from the cue. The overview shows them, so guessing from the overview alone stays at
    chance (1 in 4).

The question asks which object appears while the border is on; four options A-D, shuffled (or, with
`shuffle_options=False`, in CLASSES order; `n_classes` limits the classes drawn). The zoom that
finds the answer follows from the overview's timestamp tags alone (`cue_zoom`): from the last overview frame
before the border to the first one after it, at the highest fps in (4, 2, 1, 0.5) that keeps the clip within
`tool_call_max_frames`. Generation checks that this zoom shows the answer in at least one frame.

Times: frame i is at i / fps s (as `sample_overview`/`sample_zoom` compute timestamps). Ground truth in
`extra_info`: `cue_frames`/`answer_frames` are inclusive frame ranges, `cue_span`/`answer_window` the times of
their first and last frames.

  generate(out_dir, seed=0, n_train=256, n_val=32, n_test=64) -> {"train": json, "validation": ..., "test": ...}

writes `videos/*.mp4` (OpenCV mp4v) and one JSON list per split in VideoZoomer's RL format (`data/records.py`).
The `SyntheticZoom` TFDS builder (array_record; reading needs no TensorFlow) stores the same records with
`tfds_builders.RLRecords`' features and example generator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from types import SimpleNamespace

import cv2
import numpy as np
import tensorflow_datasets as tfds

from zoomer_jax.agent.protocol import IMAGE, ToolConfig
from zoomer_jax.data.tfds_builders import RLRecords
from zoomer_jax.video.sampling import sample_overview, sample_zoom

DATA_SOURCE = "synth_zoom"
GENERATOR = "synth_zoom/v1"  # part of every video's file name: bump it when drawing changes
LETTERS = "ABCD"
SPLITS = ("train", "validation", "test")
_SPLIT_IDS = {name: k for k, name in enumerate(SPLITS)}

# name -> RGB. Far apart in colour (and shape), far from the yellow cue and the dark background.
CLASSES = {
    "red square": (220, 40, 40),
    "green circle": (40, 190, 60),
    "blue triangle": (50, 90, 240),
    "white cross": (235, 235, 235),
    "magenta diamond": (210, 50, 210),
    "cyan ring": (40, 200, 210),
}
CLASS_NAMES = tuple(CLASSES)
CUE_RGB = (240, 210, 20)
ZOOM_FPS = (4, 2, 1, 0.5)  # cue_zoom takes the first that fits the frame budget
KEYFRAME_INTERVAL = 12  # OpenCV's mp4v writer: a keyframe every 12 frames from frame 0, no B-frames

PROBLEM = (IMAGE + "\nFor a few seconds a yellow border frames the video, and while it is on an object appears "
           "briefly. Which object appears while the yellow border is on?\n{options}\n"
           "Answer with the option's letter.")


@dataclasses.dataclass(frozen=True)
class VideoParams:
  """How the videos look; every field can be passed to `generate` as a keyword."""

  height: int = 112
  width: int = 112
  fps: float = 6.0  # overview step round(6 / 0.5) = 12 = KEYFRAME_INTERVAL
  min_seconds: float = 30.0
  max_seconds: float = 120.0
  cue_seconds: tuple[float, float] = (3.0, 6.0)  # drawn uniformly; raised to the widest overview gap
  answer_seconds: float = 1.0  # must be shorter than the overview spacing
  distractor_every: float = 15.0  # one distractor per this many seconds of video; 0: none
  distractor_seconds: tuple[float, float] = (2.0, 6.0)
  object_frac: float = 0.3  # object size / the frame's short side
  n_classes: int = len(CLASSES)  # objects are drawn from the first n_classes of CLASSES (4 or more)
  shuffle_options: bool = True  # False: options A-D in CLASSES order (with n_classes=4 always the same list)

  def __post_init__(self):
    if self.height < 32 or self.width < 32 or self.height % 2 or self.width % 2:
      raise ValueError(f"frame size must be even and >= 32, got {self.height}x{self.width}")
    if not self.fps > 0:
      raise ValueError(f"fps must be > 0, got {self.fps}")
    if not 0 < self.min_seconds <= self.max_seconds:
      raise ValueError(f"need 0 < min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
    for name in ("cue_seconds", "distractor_seconds"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {getattr(self, name)}")
    if not self.answer_seconds > 0:
      raise ValueError(f"answer_seconds must be > 0, got {self.answer_seconds}")
    if not self.distractor_every >= 0:
      raise ValueError(f"distractor_every must be >= 0 (0: no distractors), got {self.distractor_every}")
    if not 0.1 <= self.object_frac <= 0.8:
      raise ValueError(f"object_frac must lie in [0.1, 0.8], got {self.object_frac}")
    if not len(LETTERS) <= self.n_classes <= len(CLASSES):
      raise ValueError(f"n_classes must lie in [{len(LETTERS)}, {len(CLASSES)}], got {self.n_classes}")

  @classmethod
  def from_kwargs(cls, kwargs: dict) -> VideoParams:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
      raise ValueError(f"unknown video parameters {unknown}; known: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})

  @property
  def border(self) -> int:
    """Width in pixels of the cue border."""
    return max(3, min(self.height, self.width) // 16)


@dataclasses.dataclass(frozen=True)
class Show:
  """Object `cls` (index into CLASS_NAMES) centred at (cx, cy), on for frames first..last (inclusive)."""

  cls: int
  first: int
  last: int
  cx: int
  cy: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything drawn in one video, and its question."""

  n_frames: int
  background: tuple[int, int, int]
  cue: tuple[int, int]  # inclusive frame range of the border
  answer: Show
  distractors: tuple[Show, ...]
  options: tuple[int, ...]  # class indices in A-D order
  zoom: tuple[tuple[float, float], float]  # cue_zoom's (segment, fps) for the overview it was placed against

  @property
  def solution(self) -> str:
    return LETTERS[self.options.index(self.answer.cls)]


# ---------------------------------------------------------------------------------------------- the zoom
def zoom_fps(seconds: float, max_frames: int) -> float:
  """The first of ZOOM_FPS whose clip of `seconds` has 1..max_frames frames (int(fps * seconds))."""
  for f in ZOOM_FPS:
    if 1 <= int(f * seconds) <= max_frames:
      return f
  raise ValueError(f"no fps in {ZOOM_FPS} fits a {seconds:g} s segment into 1..{max_frames} frames")


def cue_zoom(overview_ts: np.ndarray, cued: np.ndarray, max_frames: int) -> tuple[tuple[float, float], float]:
  """The zoom an agent derives from the overview: ((start, end) s, fps).

  overview_ts: float [n] the overview's timestamps; cued: bool [n], the frames that show the border (one
  contiguous run, with an uncued frame on each side). The segment runs from the uncued frame before the run to
  the one after it, with times as the tags print them (2 decimals).
  """
  k = np.flatnonzero(cued)
  if k.size == 0 or k[0] == 0 or k[-1] == len(cued) - 1 or k[-1] - k[0] + 1 != k.size:
    raise ValueError(f"the cue must show in one run of overview frames inside the video, got frames {k.tolist()}")
  start, end = round(float(overview_ts[k[0] - 1]), 2), round(float(overview_ts[k[-1] + 1]), 2)
  return (start, end), zoom_fps(end - start, max_frames)


def _meta(n_frames: int, fps: float):
  return SimpleNamespace(n_frames=n_frames, fps=fps)


def hits(frames: np.ndarray, window: tuple[int, int]) -> int:
  """How many of `frames` (indices) fall inside the inclusive range `window`."""
  frames = np.asarray(frames)
  return int(((frames >= window[0]) & (frames <= window[1])).sum())


# ---------------------------------------------------------------------------------------------- planning
def _position(rng: np.random.Generator, p: VideoParams) -> tuple[int, int]:
  r = _size(p) // 2 + p.border + 2
  return int(rng.integers(r, p.width - r + 1)), int(rng.integers(r, p.height - r + 1))


def _size(p: VideoParams) -> int:
  return int(p.object_frac * min(p.height, p.width))


def plan_video(rng: np.random.Generator, p: VideoParams, tool: ToolConfig = ToolConfig(),
               attempts: int = 100) -> Plan:
  """Draws one video's layout; raises ValueError when the parameters admit none."""
  la = max(1, round(p.answer_seconds * p.fps))
  why = "no attempt made"
  for _ in range(attempts):
    n = max(2, round(rng.uniform(p.min_seconds, p.max_seconds) * p.fps))
    ov, ts = sample_overview(_meta(n, p.fps), tool.video_fps, tool.frames_upbound)
    gaps = np.diff(ov)
    if gaps.size == 0 or la >= gaps.min():
      why = (f"the answer window ({la} frames) must be shorter than the overview spacing "
             f"({gaps.min() if gaps.size else 0} frames)")
      continue
    gmax = int(gaps.max())
    lc = max(round(rng.uniform(*p.cue_seconds) * p.fps), gmax + la)
    lo, hi = 2 * gmax, n - lc - 2 * gmax  # room for an overview frame (and a distractor-free gap) each side
    if hi < lo:
      why = f"a {n}-frame video has no room for a {lc}-frame cue and the overview frames around it"
      continue
    c0 = int(rng.integers(lo, hi + 1))
    c1 = c0 + lc - 1
    in_ov = np.zeros(n, bool)
    in_ov[ov] = True
    free = np.convolve(in_ov[c0:c1 + 1].astype(int), np.ones(la, int), "valid") == 0
    starts = c0 + np.flatnonzero(free)
    ends = starts + la - 1
    next_key = (ends // KEYFRAME_INTERVAL + 1) * KEYFRAME_INTERVAL
    starts = starts[next_key <= ov[np.searchsorted(ov, ends, side="right")]]  # the ghost ends before the overview
    if starts.size == 0:
      why = "no answer window between two overview frames (and clear of encoder ghosts) inside the cue"
      continue
    a0 = int(rng.choice(starts))
    cued = (ov >= c0) & (ov <= c1)
    try:
      (s, e), zfps = cue_zoom(ts, cued, tool.tool_call_max_frames)
    except ValueError as err:
      why = str(err)
      continue
    zidx, _ = sample_zoom(_meta(n, p.fps), s, e, zfps, max_frames=tool.tool_call_max_frames)
    if hits(zidx, (a0, a0 + la - 1)) < 1:
      why = f"the zoom [{s}, {e}] s at {zfps} fps misses the {la}-frame answer window"
      continue
    answer = Show(int(rng.integers(p.n_classes)), a0, a0 + la - 1, *_position(rng, p))
    others = rng.permutation([c for c in range(p.n_classes) if c != answer.cls])[:len(LETTERS) - 1]
    chosen = np.r_[answer.cls, others]
    options = tuple(int(c) for c in (rng.permutation(chosen) if p.shuffle_options else np.sort(chosen)))
    keep_out = (int(ov[cued][0]) - 2 * gmax, int(ov[cued][-1]) + 2 * gmax)  # distractors stay out of any zoom
    distractors = _distractors(rng, p, n, keep_out)
    background = tuple(int(v) for v in rng.integers(25, 66) + rng.integers(-10, 11, 3))
    return Plan(n, background, (c0, c1), answer, distractors, options, ((s, e), zfps))
  raise ValueError(f"cannot place a synthetic video with {p} and overview fps {tool.video_fps}, "
                   f"upbound {tool.frames_upbound}: {why}")


def _distractors(rng: np.random.Generator, p: VideoParams, n: int, keep_out: tuple[int, int]) -> tuple[Show, ...]:
  if p.distractor_every == 0:
    return ()
  taken = [keep_out]
  out = []
  for _ in range(max(1, round(n / p.fps / p.distractor_every))):
    for _ in range(20):  # rejection sampling; a distractor that finds no room is left out
      length = max(1, round(rng.uniform(*p.distractor_seconds) * p.fps))
      if length >= n:
        break
      f0 = int(rng.integers(0, n - length + 1))
      f1 = f0 + length - 1
      if all(f1 < a - 1 or f0 > b + 1 for a, b in taken):
        taken.append((f0, f1))
        out.append(Show(int(rng.integers(p.n_classes)), f0, f1, *_position(rng, p)))
        break
  return tuple(sorted(out, key=lambda d: d.first))


# ---------------------------------------------------------------------------------------------- drawing
def draw_object(img: np.ndarray, cls: int, cx: int, cy: int, size: int) -> None:
  """Draws class `cls` (filled shapes, solid colour) centred at (cx, cy) into RGB `img` [H, W, 3] in place."""
  name, rgb = CLASS_NAMES[cls], CLASSES[CLASS_NAMES[cls]]
  r = size // 2
  if name == "red square":
    cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), rgb, -1)
  elif name == "green circle":
    cv2.circle(img, (cx, cy), r, rgb, -1)
  elif name == "blue triangle":
    cv2.fillPoly(img, [np.array([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], np.int32)], rgb)
  elif name == "white cross":
    t = max(2, size // 6)
    cv2.rectangle(img, (cx - r, cy - t), (cx + r, cy + t), rgb, -1)
    cv2.rectangle(img, (cx - t, cy - r), (cx + t, cy + r), rgb, -1)
  elif name == "magenta diamond":
    cv2.fillPoly(img, [np.array([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], np.int32)], rgb)
  elif name == "cyan ring":
    cv2.circle(img, (cx, cy), r - max(2, size // 10), rgb, max(4, size // 5))
  else:
    raise ValueError(f"no drawing for class {name!r}")


def render_frame(plan: Plan, p: VideoParams, i: int) -> np.ndarray:
  """Frame i of the planned video: uint8 RGB [H, W, 3]."""
  img = np.empty((p.height, p.width, 3), np.uint8)
  img[:] = plan.background
  if plan.cue[0] <= i <= plan.cue[1]:
    b = p.border
    for sl in (np.s_[:b], np.s_[-b:]):
      img[sl] = CUE_RGB
      img[:, sl] = CUE_RGB
  for s in (plan.answer,) + plan.distractors:
    if s.first <= i <= s.last:
      draw_object(img, s.cls, s.cx, s.cy, _size(p))
  return img


def write_video(plan: Plan, p: VideoParams, path: str) -> None:
  """Encodes the plan with OpenCV's mp4v; each run of identical frames is drawn once. Atomic (tmp + rename)."""
  cuts = {0, plan.n_frames, plan.cue[0], plan.cue[1] + 1}
  for s in (plan.answer,) + plan.distractors:
    cuts |= {s.first, s.last + 1}
  cuts = sorted(c for c in cuts if 0 <= c <= plan.n_frames)
  tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp.mp4")
  out = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), p.fps, (p.width, p.height))
  if not out.isOpened():
    raise OSError(f"cv2.VideoWriter could not open {tmp}")
  try:
    for a, b in zip(cuts[:-1], cuts[1:]):
      bgr = np.ascontiguousarray(render_frame(plan, p, a)[..., ::-1])
      for _ in range(b - a):
        out.write(bgr)
  finally:
    out.release()
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- records
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _digest(plan: Plan, p: VideoParams) -> str:
  key = json.dumps([GENERATOR, dataclasses.asdict(plan), dataclasses.asdict(p)], sort_keys=True)
  return hashlib.sha1(key.encode()).hexdigest()[:10]


def video_name(split: str, index: int, plan: Plan, p: VideoParams) -> str:
  """`{split}_{index:05d}_{digest}.mp4`: the digest covers everything drawn, so an existing file is identical."""
  return f"{split}_{index:05d}_{_digest(plan, p)}.mp4"


def make_record(plan: Plan, p: VideoParams, tool: ToolConfig, video: str, *, seed: int, split: str,
                index: int) -> dict:
  """The RL record (`data/records.py`) of one planned video stored at `video`."""
  names = [CLASS_NAMES[c] for c in plan.options]
  (s, e), zfps = plan.zoom

  def t(frame: int) -> float:
    return round(frame / p.fps, 4)

  extra = {
      "answer_type": "multiple_choice",
      "options": names,
      "answer_class": CLASS_NAMES[plan.answer.cls],
      "cue_frames": list(plan.cue),
      "answer_frames": [plan.answer.first, plan.answer.last],
      "cue_span": [t(plan.cue[0]), t(plan.cue[1])],
      "answer_window": [t(plan.answer.first), t(plan.answer.last)],
      "zoom": {"segment": [s, e], "fps": zfps},
      "distractors": [{"class": CLASS_NAMES[d.cls], "frames": [d.first, d.last]} for d in plan.distractors],
      "fps": p.fps,
      "n_frames": plan.n_frames,
      "duration": t(plan.n_frames),
      "placed_for": {"video_fps": tool.video_fps, "frames_upbound": tool.frames_upbound,
                     "tool_call_max_frames": tool.tool_call_max_frames},
      "generator": GENERATOR, "seed": seed, "split": split, "index": index,
  }
  options = "\n".join(f"{LETTERS[k]}. {name}" for k, name in enumerate(names))
  return {"doc_id": f"{DATA_SOURCE}-{split}-{index:05d}", "problem": PROBLEM.format(options=options),
          "solution": plan.solution, "data_source": DATA_SOURCE, "videos": [video], "extra_info": extra}


def write_if_changed(path: str, data: bytes) -> None:
  """Writes `data` to `path` (atomically) unless the file already holds exactly these bytes."""
  if os.path.exists(path):
    with open(path, "rb") as f:
      if f.read() == data:
        return
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def generate(out_dir: str, *, seed: int = 0, n_train: int = 256, n_val: int = 32, n_test: int = 64,
             tool_cfg: ToolConfig = ToolConfig(), **video_params) -> dict[str, str]:
  """Writes `out_dir/videos/*.mp4` and `out_dir/{split}.json`; returns {split: json path} for splits with n > 0.

  Deterministic in (seed, split, index, parameters); a video or JSON file already there with the same content
  is left alone. `tool_cfg` gives the overview sampling (video_fps, frames_upbound) the answer is hidden from
  and the frame budget (tool_call_max_frames) the zoom must fit. Video paths in the records are absolute.
  """
  p = VideoParams.from_kwargs(video_params)
  for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
    if n < 0:
      raise ValueError(f"{name} must be >= 0, got {n}")
  videos = os.path.join(os.path.abspath(out_dir), "videos")
  os.makedirs(videos, exist_ok=True)
  paths = {}
  for split, n in zip(SPLITS, (n_train, n_val, n_test)):
    if n == 0:
      continue
    records = []
    for i in range(n):
      plan = plan_video(_rng(seed, split, i), p, tool_cfg)
      path = os.path.join(videos, video_name(split, i, plan, p))
      if not os.path.exists(path):
        write_video(plan, p, path)
      records.append(make_record(plan, p, tool_cfg, path, seed=seed, split=split, index=i))
    paths[split] = os.path.join(os.path.abspath(out_dir), f"{split}.json")
    write_if_changed(paths[split], json.dumps(records, indent=1).encode())
  return paths


# ---------------------------------------------------------------------------------------------- TFDS
@dataclasses.dataclass(eq=False)
class SyntheticZoomConfig(tfds.core.BuilderConfig):
  """Sizes and seed of one `SyntheticZoom` variant; `video_params` as `generate` takes them."""

  seed: int = 0
  n_train: int = 256
  n_val: int = 32
  n_test: int = 64
  video_params: dict = dataclasses.field(default_factory=dict)
  base_dir: str | None = None  # read by RLRecords' example generator; our video paths are absolute


class SyntheticZoom(RLRecords):
  """The synthetic zoom task's train / validation / test records, stored exactly as `RLRecords` stores RL JSON.

  The examples are `generate`'s records, written by RLRecords' own generator, so the features are RLRecords' and
  `tfds_builders.rl_source(builder, split)` reads them as `RLRecord`s. Videos go to
  `<data_dir>/downloads/synthetic_zoom/<config>/videos`; records keep their absolute paths.
  Without TensorFlow: `b = SyntheticZoom(config="tiny", data_dir=d)` (array_record files by default),
  `b.download_and_prepare()`, then `rl_source(b, "train")` or `b.as_data_source()`.
  """

  BUILDER_CONFIGS = [
      SyntheticZoomConfig(name="small", description="256 / 32 / 64 videos, seed 0"),
      SyntheticZoomConfig(name="tiny", n_train=16, n_val=4, n_test=4, description="16 / 4 / 4 videos, seed 0"),
  ]
  DEFAULT_CONFIG_NAME = "small"

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)  # array_record: readable without TensorFlow

  def _split_generators(self, dl_manager):
    c = self.builder_config
    out = os.path.join(dl_manager.download_dir, "synthetic_zoom", c.name)
    paths = generate(out, seed=c.seed, n_train=c.n_train, n_val=c.n_val, n_test=c.n_test, **c.video_params)
    return {split: self._generate_examples([path]) for split, path in paths.items()}
