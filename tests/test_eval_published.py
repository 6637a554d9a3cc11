"""The benchmarks as their authors publish them: `publish(root, name)` writes each benchmark's files in the
layout its own download produces (HF repositories downloaded to root/<repository>, LVBench's video2dataset
script), with the kinds of dirty records seen in the real files. The shipped eval_7b variants find them at
their default paths (root standing for /data), dirty records are resolved or skipped and reported, subtitles
come in video time, and `eval --check` reports missing videos without loading a model."""

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zoomer_jax.__main__ import main as cli
from zoomer_jax.config_loader import load
from zoomer_jax.eval import harness
from zoomer_jax.eval.layouts import video2dataset_index, youtube_id
from zoomer_jax.eval.readers import AnnotationError, load_benchmark
from zoomer_jax.eval.subtitles import HEADER, read_srt


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\0")  # existence is what the readers and the check look at


def _json(path, obj, lines=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=2))


def _mc(video, question, candidates, answer, qtype, **extra):
  return dict(video=video, duration=300.5, question=question, candidates=candidates, answer=answer,
              question_type=qtype, **extra)


MLVU_PLOT = [
    _mc("movie101_66.mp4", "What color is the man's coat?", ["Yellow", "Red", "Green", "Blue"], "Red", "plotQA"),
    _mc("movie101_70.mp4", "How many dogs are there?", ["Three", "Two", "Three", "Five"], "Three", "plotQA"),
    dict(video="", duration="", question="", candidates=[], answer="", question_type=""),  # all empty
    _mc("movie101_71.mp4", "Who opens the door?", ["The boy", "The girl", "The cat", "Nobody"], "The dog", "plotQA"),
]
MLVU_COUNT = [_mc("count_12.mp4", "How many jumps?", ["2", "4", "3", "5"], "3", "count")]
MLVU_TEST = [_mc("AR_video_1.mp4", "Which anomaly occurs?", ["Fire", "Theft", "Fight", "Flood", "None", "Crash"],
                 "Fight", "anomaly_reco", question_id="AR_0"),
             _mc("test_sport_3.mp4", "Who scores?", ["Red", "Blue", "Nobody", "Both"], "Blue", "sportsQA",
                 question_id="SQA_4")]
LVB = [
    dict(video_id="86CxyhFV9MI", id="86CxyhFV9MI_0", video_path="86CxyhFV9MI.mp4", question="What is said first?",
         candidates=["hello", "bye", "thanks", "sorry", "wait"], correct_choice=0, duration_group=600,
         subtitle_path="86CxyhFV9MI_en.json", starting_timestamp_for_subtitles=0, duration=527.2,
         question_category="TOS", position=[1, 2]),
    dict(video_id="-0sdz7t-A4g", id="-0sdz7t-A4g_3", video_path="-0sdz7t-A4g.mp4", question="What does the dog do?",
         candidates=["sits", "runs", "barks", "sleeps"], correct_choice=2, duration_group=60,
         subtitle_path="-0sdz7t-A4g_en.json", starting_timestamp_for_subtitles=12.5, duration=47.9,
         question_category="E2O", position=[3, 4]),
]
LVB_SUBS = {
    "86CxyhFV9MI_en.json": [{"start": "00:00:01.500", "end": "00:00:03.000", "line": "hello there"},
                            {"start": "00:01:02.250", "end": "00:01:04.000", "line": "see you"}],
    "-0sdz7t-A4g_en.json": [{"timestamp": [13.0, 15.5], "text": "good dog"},
                            {"timestamp": [40.0, None], "text": " the  end "}],
}
VIDEOMME = [
    dict(video_id="001", duration="short", domain="Knowledge", sub_category="History", url="https://www.youtube.com/"
         "watch?v=fFjv93ACGo8", videoID="fFjv93ACGo8", question_id="001-1", task_type="Counting Problem",
         question="How many trees?", options=["A. One.", "B. Two.", "C. Three.", "D. Four."], answer="C"),
    dict(video_id="002", duration="medium", domain="Sports", sub_category="Football", url="https://www.youtube.com/"
         "watch?v=Qm3t7hX0aZ4", videoID="Qm3t7hX0aZ4", question_id="002-1", task_type="Action Recognition",
         question="Who scores?", options=["A. Red.", "B. Blue.", "C. Nobody.", "D. Both."], answer="B"),
    dict(video_id="003", duration="long", domain="Life", sub_category="Travel", url="https://www.youtube.com/"
         "watch?v=a1B2c3D4e5F", videoID="a1B2c3D4e5F", question_id="003-1", task_type="OCR Problems",
         question="What is on the sign?", options=["A. Stop.", "B. Go.", "C. Exit.", "D. Open."], answer="D"),
]
SRT = ("\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\n<i>Oh</i> Christmas\r\ntree\r\n\r\n"
       "2\r\n00:01:00,040 --> 00:01:01,000\r\n{\\an8}apples and candles\r\n\r\n")
LVBENCH = [
    dict(key="Cm73ma6Ibcs", type="sport", video_info=dict(duration_minutes=118.8, fps=30.0),
         qa=[dict(uid=1, question="What year?\n(A) 1636\n(B) 1366\n(C) 1363\n(D) 1633", answer="D",
                  question_type=["key information retrieval"], time_reference="00:15-00:19"),
             dict(uid=2, question="Who fouls out?\n(A) None\n(B) One\n(C) Two\n(D) Three", answer="B",
                  question_type=["event understanding"], time_reference="01:02:11-01:58:40")]),
    dict(key="uF1P6B0tNyk", type="documentary", video_info=dict(duration_minutes=52.1, fps=25.0),
         qa=[dict(uid=17, question="What is the diver holding?\n(A) A camera\n(B) A net\n(C) A torch\n(D) A slate",
                  answer="A", question_type=["entity recognition"], time_reference="12:40-12:55")]),
]


def publish(root, name):
  """Writes benchmark `name` under root as its download does (root stands for /data)."""
  if name == "mlvu":
    _json(f"{root}/MVLU/MLVU/json/1_plotQA.json", MLVU_PLOT)
    _json(f"{root}/MVLU/MLVU/json/4_count.json", MLVU_COUNT)
    _json(f"{root}/MVLU/MLVU/json/8_sub_scene.json", [dict(video="sub.mp4", question="Describe.", answer="x")])
    for r in MLVU_PLOT[:2] + MLVU_PLOT[3:]:
      _touch(f"{root}/MVLU/MLVU/video/1_plotQA/{r['video']}")
    _touch(f"{root}/MVLU/MLVU/video/4_count/count_12.mp4")
  elif name == "mlvu_test":
    _json(f"{root}/MLVU_Test/test-ground-truth/test_mcq_gt.json", MLVU_TEST)
    for r in MLVU_TEST:
      _touch(f"{root}/MLVU_Test/video/{r['video']}")
  elif name == "longvideobench":
    _json(f"{root}/LongVideoBench/lvb_val.json", LVB)
    for r in LVB:
      _touch(f"{root}/LongVideoBench/videos/{r['video_path']}")
    for file, items in LVB_SUBS.items():
      _json(f"{root}/LongVideoBench/subtitles/{file}", items)
  elif name == "videomme":
    os.makedirs(f"{root}/Video-MME/videomme")
    pq.write_table(pa.Table.from_pylist(VIDEOMME), f"{root}/Video-MME/videomme/test-00000-of-00001.parquet")
    for vid, ext in zip(["fFjv93ACGo8", "Qm3t7hX0aZ4", "a1B2c3D4e5F"], [".mp4", ".MP4", ".mkv"]):
      _touch(f"{root}/Video-MME/data/{vid}{ext}")
    os.makedirs(f"{root}/Video-MME/subtitle")
    with open(f"{root}/Video-MME/subtitle/fFjv93ACGo8.srt", "w", encoding="utf-8", newline="") as f:
      f.write(SRT)
  elif name == "lvbench":
    _json(f"{root}/LVBench/data/video_info.meta.jsonl", LVBENCH, lines=True)
    videos = f"{root}/LVBench/scripts/videos"
    for n, key in enumerate(["uF1P6B0tNyk", "Cm73ma6Ibcs", "zzzzzzzzzzz"]):  # video2dataset's order, not ours
      _json(f"{videos}/00000/00000000{n}.json", dict(url=f"https://www.youtube.com/watch?v={key}",
                                                     key=f"00000000{n}", status="success", error_message=None))
      if key != "zzzzzzzzzzz":
        _touch(f"{videos}/00000/00000000{n}.mp4")
    _json(f"{videos}/00000_stats.json", dict(count=3, successes=2))


def _config(root, variant, *overrides):
  """eval_7b:<variant> with its default /data paths moved under root."""
  cfg = load(f"eval_7b:{variant}", list(overrides))
  b = cfg.benchmark
  b.annotation = b.annotation.replace("/data", str(root), 1)
  b.video_root = b.video_root.replace("/data", str(root), 1)
  if "subtitle_root" in b.options:
    b.options.subtitle_root = b.options.subtitle_root.replace("/data", str(root), 1)
  return cfg


EXPECTED = {  # variant -> (tasks, ids, dirty (action, id))
    "mlvu": (3, ["1_plotQA/0", "1_plotQA/1", "4_count/0"],
             [("resolved", "1_plotQA/1"), ("skipped", "1_plotQA/2"), ("skipped", "1_plotQA/3")]),
    "mlvu_test": (2, ["AR_0", "SQA_4"], []),
    "longvideobench": (2, ["86CxyhFV9MI_0", "-0sdz7t-A4g_3"], []),
    "videomme": (3, ["001-1", "002-1", "003-1"], []),
    "lvbench": (3, ["1", "2", "17"], []),
}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_every_shipped_variant_finds_its_published_layout_at_the_default_paths(variant, tmp_path, capsys):
  publish(tmp_path, variant)
  cfg = _config(tmp_path, variant)
  assert harness.check(cfg) == 0, capsys.readouterr().out
  out = capsys.readouterr().out
  n, ids, dirty = EXPECTED[variant]
  assert f"tasks: {n} on" in out and "missing videos: 0 of" in out
  bench = harness.benchmark_tasks(cfg, None)
  assert [t.id for t in bench.tasks] == ids and [(d.action, d.id) for d in bench.dirty] == dirty
  assert all(os.path.isfile(t.video) for t in bench.tasks)


def test_mlvu_dev_dirty_records_as_mlvu_scores_them(tmp_path):
  publish(tmp_path, "mlvu")
  bench = load_benchmark("mlvu", f"{tmp_path}/MVLU/MLVU/json", f"{tmp_path}/MVLU/MLVU/video", by_group=True)
  tasks = {t.id: t for t in bench.tasks}
  assert tasks["1_plotQA/0"].answer == "B" and tasks["4_count/0"].answer == "C"
  # "Three" is candidates A and C: MLVU's choice_bench.py keeps the last index it matched.
  assert tasks["1_plotQA/1"].answer == "C" and tasks["1_plotQA/1"].data_source == "MVLU/plotQA"
  assert tasks["1_plotQA/1"].video == f"{tmp_path}/MVLU/MLVU/video/1_plotQA/movie101_70.mp4"
  resolved, empty, absent = bench.dirty
  assert re.search(r"1_plotQA.json: record 1: field 'answer': 'Three' is candidates A, C; scored as C",
                   resolved.reason)
  assert re.search(r"1_plotQA.json: record 2: field 'video': is empty$", empty.reason)
  assert re.search(r"1_plotQA.json: record 3: field 'answer': 'The dog' is not one of the candidates$",
                   absent.reason)
  assert bench.n_records == 5 and len(bench.skipped) == 2 and len(bench.resolved) == 1


def test_mlvu_test_layout_and_layout_option(tmp_path):
  publish(tmp_path, "mlvu_test")
  gt, videos = f"{tmp_path}/MLVU_Test/test-ground-truth/test_mcq_gt.json", f"{tmp_path}/MLVU_Test/video"
  bench = load_benchmark("mlvu", gt, videos, by_group=True)
  assert [(t.video, t.answer, t.data_source) for t in bench.tasks] == [
      (f"{videos}/AR_video_1.mp4", "C", "MVLU/anomaly_reco"), (f"{videos}/test_sport_3.mp4", "B", "MVLU/sportsQA")]
  assert "F. Crash" in bench.tasks[0].problem  # six options
  forced = load_benchmark("mlvu", gt, videos, video_layout="per_task")  # what per-task folders would give
  assert forced.tasks[0].video == f"{videos}/test_mcq_gt/AR_video_1.mp4" and forced.missing_videos()
  with pytest.raises(ValueError, match="video_layout must be one of"):
    load_benchmark("mlvu", gt, videos, video_layout="dev")


def test_longvideobench_parquet_and_json_agree_and_timed_subtitles(tmp_path):
  publish(tmp_path, "longvideobench")
  base = f"{tmp_path}/LongVideoBench"
  rows = []
  for r in LVB:  # the HF parquet: option0..option4, "N/A" where a question has fewer options
    row = {k: v for k, v in r.items() if k != "candidates"}
    row.update({f"option{k}": (r["candidates"][k] if k < len(r["candidates"]) else "N/A") for k in range(5)})
    rows.append(row)
  pq.write_table(pa.Table.from_pylist(rows), f"{base}/validation-00000-of-00001.parquet")
  from_json = load_benchmark("lvb", f"{base}/lvb_val.json", f"{base}/videos")
  from_parquet = load_benchmark("lvb", f"{base}/validation-00000-of-00001.parquet", f"{base}/videos")
  assert from_json.tasks == from_parquet.tasks and from_json.tasks[1].answer == "C"
  assert "E. wait" in from_json.tasks[0].problem and "E." not in from_json.tasks[1].problem
  timed = load_benchmark("lvb", f"{base}/lvb_val.json", f"{base}/videos", subtitles="timed",
                         subtitle_root=f"{base}/subtitles")
  assert timed.tasks[0].problem.startswith(f"<image>\n{HEADER}\n[1.5-3.0] hello there\n[62.2-64.0] see you\n"
                                           "What is said first?\nA. hello")
  # timestamp items shifted by starting_timestamp_for_subtitles (12.5); an open end runs to the duration
  assert f"{HEADER}\n[0.5-3.0] good dog\n[27.5-35.4] the end\nWhat does the dog do?" in timed.tasks[1].problem
  os.remove(f"{base}/subtitles/-0sdz7t-A4g_en.json")
  timed = load_benchmark("lvb", f"{base}/lvb_val.json", f"{base}/videos", subtitles="timed",
                         subtitle_root=f"{base}/subtitles")
  inter = load_benchmark("lvb", f"{base}/lvb_val.json", f"{base}/videos", subtitles="interleaved",
                         subtitle_root=f"{base}/subtitles")
  assert inter.tasks[0].subtitles == ((1.5, 3.0, "hello there"), (62.25, 64.0, "see you"))
  assert inter.tasks[0].problem == from_json.tasks[0].problem  # the lines go among the frames, not in the text
  from zoomer_jax.agent.protocol import user_prompt  # noqa: PLC0415
  shown = user_prompt(inter.tasks[0].problem, [0.0, 30.0, 60.0, 90.0], inter.tasks[0].subtitles)
  assert shown.startswith("<frame0_time0.00s><image>\nhello there\n<frame1_time30.00s><image>"
                          "<frame2_time60.00s><image>\nsee you\n<frame3_time90.00s><image>\nWhat is said first?")
  assert [t.id for t in timed.tasks] == ["86CxyhFV9MI_0"]
  assert re.search(r"subtitles/-0sdz7t-A4g_en.json: cannot be read", timed.skipped[0].reason)
  with pytest.raises(FileNotFoundError, match="subtitle_root"):
    load_benchmark("lvb", f"{base}/lvb_val.json", f"{base}/videos", subtitles="timed", subtitle_root="/nope")


def test_videomme_extensions_and_subtitles(tmp_path):
  publish(tmp_path, "videomme")
  base = f"{tmp_path}/Video-MME"
  annotation = f"{base}/videomme/test-00000-of-00001.parquet"
  bench = load_benchmark("videomme", annotation, f"{base}/data")
  assert [os.path.basename(t.video) for t in bench.tasks] == ["fFjv93ACGo8.mp4", "Qm3t7hX0aZ4.MP4",
                                                              "a1B2c3D4e5F.mkv"]
  assert not bench.missing_videos()
  subs = load_benchmark("videomme", annotation, f"{base}/data", subtitles="timed", subtitle_root=f"{base}/subtitle")
  assert subs.tasks[0].problem == (f"<image>\n{HEADER}\n[1.0-2.5] Oh Christmas tree\n[60.0-61.0] apples and "
                                   "candles\nHow many trees?\nA. One.\nB. Two.\nC. Three.\nD. Four.")
  assert HEADER not in subs.tasks[1].problem  # no .srt: the video has no speech
  os.makedirs(f"{tmp_path}/empty")
  with pytest.raises(AnnotationError, match=r"empty: holds no <videoID>.srt of any video"):
    load_benchmark("videomme", annotation, f"{base}/data", subtitles="timed", subtitle_root=f"{tmp_path}/empty")
  assert read_srt(f"{base}/subtitle/fFjv93ACGo8.srt") == ((1.0, 2.5, "Oh Christmas tree"),
                                                          (60.04, 61.0, "apples and candles"))


def test_lvbench_video2dataset_layout_and_flat_table(tmp_path):
  publish(tmp_path, "lvbench")
  videos = f"{tmp_path}/LVBench/scripts/videos"
  assert video2dataset_index(videos) == {"uF1P6B0tNyk": f"{videos}/00000/000000000.mp4",
                                         "Cm73ma6Ibcs": f"{videos}/00000/000000001.mp4"}
  meta = load_benchmark("lvbench", f"{tmp_path}/LVBench/data/video_info.meta.jsonl", videos, by_group=True)
  assert [(t.id, os.path.relpath(t.video, videos), t.answer, t.data_source) for t in meta.tasks] == [
      ("1", "00000/000000001.mp4", "D", "lvbench/sport"), ("2", "00000/000000001.mp4", "B", "lvbench/sport"),
      ("17", "00000/000000000.mp4", "A", "lvbench/documentary")]
  rows = [dict(key=v["key"], type=v["type"], video_path=f"{v['key']}.mp4", **qa) for v in LVBENCH for qa in v["qa"]]
  pq.write_table(pa.Table.from_pylist(rows), f"{tmp_path}/lvbench_flat.parquet")
  assert load_benchmark("lvbench", f"{tmp_path}/lvbench_flat.parquet", videos, by_group=True).tasks == meta.tasks
  _touch(f"{tmp_path}/flat/Cm73ma6Ibcs.mp4")  # the <key>.mp4 folder (e.g. the HF video zips)
  flat = load_benchmark("lvbench", f"{tmp_path}/LVBench/data/video_info.meta.jsonl", f"{tmp_path}/flat")
  assert flat.tasks[0].video == f"{tmp_path}/flat/Cm73ma6Ibcs.mp4"
  assert flat.missing_videos() == {f"{tmp_path}/flat/uF1P6B0tNyk.mp4": ["17"]}


def test_youtube_ids_from_urls():
  for url in ("https://www.youtube.com/watch?v=Cm73ma6Ibcs", "https://youtu.be/Cm73ma6Ibcs?t=3",
              "https://www.youtube.com/watch?feature=x&v=Cm73ma6Ibcs", "https://youtube.com/shorts/Cm73ma6Ibcs"):
    assert youtube_id(url) == "Cm73ma6Ibcs", url
  assert youtube_id("https://example.com/video.mp4") is None and youtube_id("") is None


def test_check_reports_and_fails_on_missing_videos_without_loading_a_model(tmp_path, capsys):
  publish(tmp_path, "mlvu")
  os.remove(f"{tmp_path}/MVLU/MLVU/video/4_count/count_12.mp4")
  paths = [f"--config.benchmark.annotation={tmp_path}/MVLU/MLVU/json",
           f"--config.benchmark.video_root={tmp_path}/MVLU/MLVU/video", "--config.checkpoint=/nonexistent/ckpt"]
  assert cli(["eval", "--config=eval_7b:mlvu", *paths, "--check"]) == 1
  out = capsys.readouterr().out
  assert "tasks: 3 on 3 videos, from 5 records; dirty records: 1 resolved, 2 skipped" in out
  assert re.search(r"resolved 1_plotQA/1: .*'Three' is candidates A, C", out)
  assert re.search(r"skipped 1_plotQA/3: .*'The dog' is not one of the candidates", out)
  assert f"missing videos: 1 of 3 (1 tasks)\n  {tmp_path}/MVLU/MLVU/video/4_count/count_12.mp4 (tasks 4_count/0)" in out
  # A run refuses before the model (whose checkpoint does not exist) is touched ...
  assert cli(["eval", "--config=eval_7b:mlvu", *paths]) == 2
  err = capsys.readouterr().err
  assert "1 videos are missing (nothing was run" in err and "count_12.mp4" in err and "/nonexistent" not in err
  # ... and with --allow-missing-videos goes on to load it.
  assert cli(["eval", "--config=eval_7b:mlvu", *paths, "--allow-missing-videos"]) == 2
  assert "/nonexistent/ckpt" in capsys.readouterr().err
  _touch(f"{tmp_path}/MVLU/MLVU/video/4_count/count_12.mp4")
  assert cli(["eval", "--config=eval_7b:mlvu", *paths, "--check"]) == 0
