"""The synthetic zoom task: what the decoded pixels show where the records say, chance-level overviews,
determinism, idempotence, and the TFDS builder."""

import json
import os
import re
import time

import numpy as np
import pytest

from tolerances import SYNTH_COLOUR_DIST, SYNTH_GHOST_MAX, SYNTH_MIN_PIXELS
from zoomer_jax.agent.protocol import ToolConfig
from zoomer_jax.data import load_records
from zoomer_jax.data import synthetic as S
from zoomer_jax.data.tfds_builders import rl_source
from zoomer_jax.video import VideoReader, sample_overview, sample_zoom

SEED = 3
# Colours as the task defines them (the names are what the options print), written here on their own.
COLOURS = {"red square": (220, 40, 40), "green circle": (40, 190, 60), "blue triangle": (50, 90, 240),
           "white cross": (235, 235, 235), "magenta diamond": (210, 50, 210), "cyan ring": (40, 200, 210)}
YELLOW = (240, 210, 20)


# ---------------------------------------------------------------------------------------------- pixel reading
def class_masks(frame: np.ndarray, border: int) -> dict[str, np.ndarray]:
  """name -> bool [H, W]: pixels of that class's colour, inside the cue border."""
  inner = np.zeros(frame.shape[:2], bool)
  inner[border + 1:-border - 1, border + 1:-border - 1] = True
  px = frame.astype(np.int32)
  return {name: inner & (np.abs(px - rgb).max(-1) < SYNTH_COLOUR_DIST) for name, rgb in COLOURS.items()}


def objects(frame: np.ndarray, border: int) -> set[str]:
  """The classes a decoded RGB frame [H, W, 3] shows."""
  return {name for name, m in class_masks(frame, border).items() if m.sum() >= SYNTH_MIN_PIXELS}


def bordered(frames: np.ndarray, border: int) -> np.ndarray:
  """bool [n]: whether all four edges of each RGB frame [n, H, W, 3] are the cue's yellow."""
  b = border // 2 + 1
  edges = [frames[:, :b], frames[:, -b:], frames[:, :, :b], frames[:, :, -b:]]
  far = [np.abs(e.astype(np.int32) - YELLOW).max(-1).mean(axis=(1, 2)) for e in edges]
  return np.all([f < SYNTH_COLOUR_DIST for f in far], axis=0)


def options_of(problem: str) -> list[str]:
  return re.findall(r"^([A-D])\. (.+)$", problem, re.M)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  t = time.perf_counter()
  paths = S.generate(str(out), seed=SEED, n_train=6, n_val=2, n_test=2)
  seconds = (time.perf_counter() - t) / 10
  records = {split: json.load(open(p)) for split, p in paths.items()}
  return out, paths, records, seconds


@pytest.fixture(scope="module")
def dataset_8fps(tmp_path_factory):
  """At 8 fps the overview step (16) is not the keyframe interval (12): the placement must avoid ghosts."""
  out = tmp_path_factory.mktemp("synth8")
  paths = S.generate(str(out), seed=SEED, n_train=5, n_val=0, n_test=0, fps=8.0)
  return {"train": json.load(open(paths["train"]))}


def test_generation_speed(dataset, measure):
  seconds = dataset[3]
  measure("seconds_per_video_112px_6fps_30_120s", seconds)
  assert seconds < 1.0, f"{seconds:.2f} s per video"


def test_records_follow_the_rl_format_and_options_match_the_solution(dataset):
  _, paths, records, _ = dataset
  assert sorted(paths) == ["test", "train", "validation"] and [len(records[s]) for s in S.SPLITS] == [6, 2, 2]
  ids = set()
  for split, recs in records.items():
    for i, r in enumerate(recs):
      assert set(r) == {"doc_id", "problem", "solution", "data_source", "videos", "extra_info"}
      assert r["data_source"] == "synth_zoom" and r["extra_info"]["answer_type"] == "multiple_choice"
      assert r["problem"].count("<image>") == 1 and r["problem"].startswith("<image>")
      assert len(r["videos"]) == 1 and os.path.isabs(r["videos"][0]) and os.path.isfile(r["videos"][0])
      info = r["extra_info"]
      opts = options_of(r["problem"])
      assert [letter for letter, _ in opts] == list("ABCD")
      names = [name for _, name in opts]
      assert names == info["options"] and len(set(names)) == 4 and set(names) <= set(COLOURS)
      assert r["solution"] in "ABCD" and names["ABCD".index(r["solution"])] == info["answer_class"]
      assert (info["split"], info["index"], info["seed"]) == (split, i, SEED)
      ids.add(r["doc_id"])
  assert len(ids) == 10
  for split, path in paths.items():  # the project's RL reader takes the files as they are
    assert [r.doc_id for r in load_records(path, kind="rl")] == [r["doc_id"] for r in records[split]]
  assert len({r["videos"][0] for recs in records.values() for r in recs}) == 10


@pytest.mark.parametrize("which", ["6fps", "8fps"])
def test_pixels_show_the_cue_and_the_answer_where_recorded_and_the_overview_never_shows_it(
    which, dataset, dataset_8fps, measure):
  records = dataset[2] if which == "6fps" else dataset_8fps
  border = S.VideoParams().border
  worst_ghost = 0
  for r in [r for recs in records.values() for r in recs]:
    info = r["extra_info"]
    c0, c1 = info["cue_frames"]
    a0, a1 = info["answer_frames"]
    answer = info["answer_class"]
    with VideoReader(r["videos"][0]) as reader:
      meta = reader.meta
      frames = reader.frames(np.arange(meta.n_frames))
      assert meta.n_frames == info["n_frames"] and meta.fps == info["fps"]
    border_on = bordered(frames, border)
    assert np.flatnonzero(border_on).tolist() == list(range(c0, c1 + 1)), r["doc_id"]
    for i in range(c0, c1 + 1):  # inside the cue: the answer in its window, nothing else anywhere
      assert objects(frames[i], border) == ({answer} if a0 <= i <= a1 else set()), (r["doc_id"], i)
    assert np.isclose(info["cue_span"], [c0 / meta.fps, c1 / meta.fps]).all()
    assert np.isclose(info["answer_window"], [a0 / meta.fps, a1 / meta.fps]).all()
    # The overview catches the border and never the flash, not even its encoder ghost.
    ov, ts = sample_overview(meta)
    assert border_on[ov].any()
    assert not ((ov >= a0) & (ov <= a1)).any()
    assert all(not objects(frames[i], border) for i in ov[border_on[ov]])
    # mp4v's P-frames keep a faint ghost of a vanished object until the next keyframe: the overview frames
    # after the flash must show plain background where the object was.
    ys, xs = np.nonzero(class_masks(frames[(a0 + a1) // 2], border)[answer])
    box = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    after = ov[(ov > a1) & (ov <= a1 + 2 * np.median(np.diff(ov)))]
    assert after.size and not any(objects(frames[i], border) for i in after)
    for i in after:
      bg = np.median(frames[i].reshape(-1, 3), axis=0)
      worst_ghost = max(worst_ghost, np.abs(frames[i][box].astype(float) - bg).max())
    # The recorded zoom starts and ends on overview tags, and its frames show the answer, and only it.
    (s, e), fps = info["zoom"]["segment"], info["zoom"]["fps"]
    tags = {round(float(t), 2) for t in ts}
    assert s in tags and e in tags and s < ts[border_on[ov]][0] and e > ts[border_on[ov]][-1]
    zi, _ = sample_zoom(meta, s, e, fps)
    seen = [objects(frames[i], border) for i in zi]
    assert all(x <= {answer} for x in seen) and sum(answer in x for x in seen) >= 1, (r["doc_id"], seen)
    # A zoom on exactly the cue's span at 2 fps sees it too.
    zi, _ = sample_zoom(meta, c0 / meta.fps, c1 / meta.fps, 2)
    assert any(answer in objects(frames[i], border) for i in zi), r["doc_id"]
  measure("overview_after_flash_max_dev_in_answer_box", worst_ghost)
  assert worst_ghost <= SYNTH_GHOST_MAX


def test_overview_alone_gives_chance_accuracy():
  """Over many layouts, guessers that see everything an overview shows stay at 1 in 4."""
  p, n = S.VideoParams(), 2000
  rng = np.random.default_rng(0)
  picks = {"seen": 0, "unseen": 0, "first": 0}
  letters = np.zeros(4)
  for k in range(n):
    plan = S.plan_video(np.random.default_rng([11, k]), p)
    ov, _ = sample_overview(S._meta(plan.n_frames, p.fps))
    assert not ((ov >= plan.answer.first) & (ov <= plan.answer.last)).any()
    visible = [d.cls for d in plan.distractors if ((ov >= d.first) & (ov <= d.last)).any()]
    seen = [c for c in plan.options if c in visible]
    unseen = [c for c in plan.options if c not in visible]
    picks["seen"] += (seen[int(rng.integers(len(seen)))] if seen else plan.options[0]) == plan.answer.cls
    picks["unseen"] += (unseen[int(rng.integers(len(unseen)))] if unseen else plan.options[0]) == plan.answer.cls
    picks["first"] += plan.options[0] == plan.answer.cls
    letters["ABCD".index(plan.solution)] += 1
  sd = np.sqrt(0.25 * 0.75 / n)
  for name, hits in picks.items():
    assert abs(hits / n - 0.25) < 4 * sd, (name, hits / n)
  assert np.all(np.abs(letters / n - 0.25) < 4 * sd), letters / n


@pytest.mark.parametrize("kw", [dict(), dict(fps=8.0), dict(fps=25.0, height=64, width=96),
                                dict(min_seconds=150, max_seconds=400, fps=7.5),
                                dict(cue_seconds=(8.0, 12.0), answer_seconds=0.5)])
def test_layouts_hold_their_guarantees_across_parameters(kw):
  p = S.VideoParams(**kw)
  cfg = ToolConfig()
  for k in range(60):
    plan = S.plan_video(np.random.default_rng([5, k]), p, cfg)
    meta = S._meta(plan.n_frames, p.fps)
    ov, ts = sample_overview(meta, cfg.video_fps, cfg.frames_upbound)
    a = (plan.answer.first, plan.answer.last)
    cued = (ov >= plan.cue[0]) & (ov <= plan.cue[1])
    assert cued.any() and S.hits(ov, a) == 0
    assert a[1] - a[0] + 1 == max(1, round(p.answer_seconds * p.fps))
    (s, e), fps = plan.zoom
    assert int(fps * (e - s)) <= cfg.tool_call_max_frames
    assert S.hits(sample_zoom(meta, s, e, fps)[0], a) >= 1
    for d in plan.distractors:  # no distractor inside the zoom segment
      assert d.last < s * p.fps or d.first > e * p.fps


def test_cue_zoom_reads_the_tags():
  ts = np.arange(10) * 2.0
  cued = np.zeros(10, bool)
  cued[4:6] = True
  assert S.cue_zoom(ts, cued, 16) == ((6.0, 12.0), 2)
  assert S.cue_zoom(ts, cued, 5) == ((6.0, 12.0), 0.5)
  cued[4:7] = True
  assert S.cue_zoom(ts, cued, 16) == ((6.0, 14.0), 2)
  with pytest.raises(ValueError, match="one run"):
    S.cue_zoom(ts, np.r_[cued[:8], True, False], 16)
  with pytest.raises(ValueError, match="no fps"):
    S.zoom_fps(40.0, 16)


def test_same_seed_same_bytes_other_seed_other_data_and_reruns_write_nothing(dataset, tmp_path):
  out, paths, records, _ = dataset
  again = S.generate(str(tmp_path / "a"), seed=SEED, n_train=6, n_val=2, n_test=2)
  for split in S.SPLITS:
    mine = open(paths[split]).read().replace(str(out), "ROOT")
    theirs = open(again[split]).read().replace(str(tmp_path / "a"), "ROOT")
    assert mine == theirs
    for r in records[split]:
      twin = os.path.join(tmp_path / "a", "videos", os.path.basename(r["videos"][0]))
      assert open(r["videos"][0], "rb").read() == open(twin, "rb").read()
  other = S.generate(str(tmp_path / "b"), seed=SEED + 1, n_train=6, n_val=0, n_test=0)
  assert sorted(other) == ["train"]
  theirs = json.load(open(other["train"]))
  assert [r["extra_info"]["cue_frames"] for r in theirs] != [r["extra_info"]["cue_frames"] for r in records["train"]]
  assert {os.path.basename(r["videos"][0]) for r in theirs}.isdisjoint(
      os.path.basename(r["videos"][0]) for r in records["train"])
  files = sorted((tmp_path / "a").rglob("*"))
  stamps = [f.stat().st_mtime_ns for f in files]
  assert S.generate(str(tmp_path / "a"), seed=SEED, n_train=6, n_val=2, n_test=2) == again
  assert sorted((tmp_path / "a").rglob("*")) == files and [f.stat().st_mtime_ns for f in files] == stamps


def test_bad_parameters_are_named(tmp_path):
  with pytest.raises(ValueError, match="colour"):
    S.generate(str(tmp_path), n_train=1, colour="red")
  with pytest.raises(ValueError, match="n_val"):
    S.generate(str(tmp_path), n_val=-1)
  with pytest.raises(ValueError, match="shorter than the overview spacing"):
    S.plan_video(np.random.default_rng(0), S.VideoParams(answer_seconds=2.5))
  with pytest.raises(ValueError, match="frame size"):
    S.VideoParams(height=111)
  with pytest.raises(ValueError, match="distractor_every"):
    S.VideoParams(distractor_every=-1.0)


def test_distractor_every_zero_draws_none_and_the_default_draws_one_per_15_s():
  for k in range(20):
    none = S.plan_video(np.random.default_rng([7, k]), S.VideoParams(distractor_every=0.0))
    some = S.plan_video(np.random.default_rng([7, k]), S.VideoParams(min_seconds=90.0, max_seconds=90.0))
    assert none.distractors == ()
    assert 1 <= len(some.distractors) <= 6  # 90 s / 15 s; rejection sampling may leave some out


def test_tfds_builder_serves_the_same_records_without_tensorflow(tmp_path):
  config = S.SyntheticZoomConfig(name="t", seed=SEED, n_train=3, n_val=1, n_test=1)
  builder = S.SyntheticZoom(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert sorted(builder.info.splits) == ["test", "train", "validation"]
  for split in S.SPLITS:
    expected = json.load(open(tmp_path / "downloads" / "synthetic_zoom" / "t" / f"{split}.json"))
    source = rl_source(builder, split)
    assert len(source) == len(expected) == {"train": 3, "validation": 1, "test": 1}[split]
    for i, r in enumerate(expected):  # in the JSON's order
      got = source[i]
      assert (got.problem, got.solution, got.data_source, got.doc_id) == \
          (r["problem"], r["solution"], r["data_source"], r["doc_id"])
      assert got.video == r["videos"][0] and os.path.isfile(got.video)
      assert got.extra_info == r["extra_info"] and got.answer_type == "multiple_choice"
