"""Benchmark readers: each fixture (written by hand in the benchmark's own format) gives exactly the Tasks
written out below by hand; a malformed record is skipped and reported naming the file, the record and the field,
and a file none of whose records can be read fails the same way. (tests/test_eval_published.py: the published
layouts, dirty records, subtitles and the pre-flight check.)"""

import copy
import json
import os
import re

import pytest

from zoomer_jax.agent.rollout import Task
from zoomer_jax.eval.readers import AnnotationError, load_benchmark, read_benchmark, split_parenthesised_options

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
ROOT = "/videos"


def test_mlvu_folder_reads_every_multiple_choice_file_and_skips_open_ended():
  tasks = read_benchmark("mlvu", os.path.join(FIX, "mlvu", "json"), ROOT)
  assert tasks == [
      Task("/videos/1_plotQA/movie101_66.mp4",
           "<image>\nWhat color is the main male character in the video?\nA. Yellow\nB. Red\nC. Green\nD. Blue",
           "A", "1_plotQA/0", "MVLU"),
      Task("/videos/1_plotQA/movie101_71.mp4",
           "<image>\nWhere does the girl hide the letter after reading it?\nA. Under the pillow\nB. In a drawer\n"
           "C. Inside a book\nD. In her coat pocket", "C", "1_plotQA/1", "MVLU"),
      Task("/videos/4_count/count_12.mp4",
           "<image>\nThroughout this video, how many times does the man jump into the pool?\nA. 2\nB. 4\nC. 3\nD. 5",
           "C", "4_count/0", "MVLU"),
  ]


def test_mlvu_single_file_groups_and_flat_layout():
  tasks = read_benchmark("MLVU", os.path.join(FIX, "mlvu", "json", "4_count.json"), ROOT, by_group=True,
                         video_layout="flat")
  assert [(t.video, t.data_source, t.answer) for t in tasks] == [("/videos/count_12.mp4", "MVLU/count", "C")]
  with pytest.raises(AnnotationError, match=r"9_summary.json: none of its 1 records can be read: .*9_summary.json: "
                                            r"record 0: field 'candidates': is missing"):
    read_benchmark("mlvu", os.path.join(FIX, "mlvu", "json", "9_summary.json"), ROOT)


def test_longvideobench():
  tasks = read_benchmark("longvideobench", os.path.join(FIX, "lvb_val.json"), ROOT)
  assert tasks == [
      Task("/videos/86CxyhFV9MI.mp4",
           "<image>\nIn the video, which subtitles appear at the same time as the man with black hair holding a red "
           "cup?\nA. promisc has come to the gym\nB. and I'm ready to go\nC. see you next week\n"
           "D. that was a great workout\nE. thanks for watching", "B", "86CxyhFV9MI_0", "lvb"),
      Task("/videos/-0sdz7t-A4g.mp4",
           "<image>\nAfter the woman in the grey coat leaves the kitchen, what does the dog do?\nA. It follows her\n"
           "B. It lies down by the oven\nC. It drinks from its bowl\nD. It barks at the door", "D", "-0sdz7t-A4g_3",
           "lvb"),
      Task("/videos/Zx9t1qR2VbE.mp4",  # no video_path: <video_id>.mp4
           "<image>\nWhat is written on the sign behind the speaker at the start of the talk?\nA. Open Science Day\n"
           "B. Welcome Students\nC. Innovation Lab\nD. Room 204", "A", "Zx9t1qR2VbE_1", "lvb"),
  ]
  grouped = read_benchmark("lvb", os.path.join(FIX, "lvb_val.json"), ROOT, by_group=True)
  assert [t.data_source for t in grouped] == ["lvb/600", "lvb/60", "lvb/3600"]


VIDEOMME = [
    Task("/videos/fFjv93ACGo8.mp4",
         "<image>\nWhen demonstrating the Germany modern Christmas tree is initially decorated with apples, candles "
         "and berries, which kind of the decoration has the largest number?\nA. Apples.\nB. Candles.\nC. Berries.\n"
         "D. The three kinds are of the same number.", "C", "001-1", "VideoMME"),
    Task("/videos/fFjv93ACGo8.mp4",
         "<image>\nWhat is the genre of this video?\n"
         "A. It is a news report that introduces the history behind Christmas decorations.\n"
         "B. It is a documentary on the evolution of Christmas holiday recipes.\n"
         "C. It is a travel vlog exploring Christmas markets around the world.\n"
         "D. It is a tutorial on DIY Christmas ornament crafting.", "A", "001-2", "VideoMME"),
    Task("/videos/Qm3t7hX0aZ4.mp4",
         "<image>\nWhich team scores first in the match?\nA. The team in white.\nB. The team in blue.\n"
         "C. Neither team scores.\nD. Both teams score at the same time.", "B", "601-3", "VideoMME"),
]


def test_videomme_json_rows_and_parquet(tmp_path):
  assert read_benchmark("videomme", os.path.join(FIX, "videomme_rows.json"), ROOT) == VIDEOMME
  import pyarrow as pa
  import pyarrow.parquet as pq
  with open(os.path.join(FIX, "videomme_rows.json")) as f:
    rows = json.load(f)
  path = str(tmp_path / "test-00000-of-00001.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)  # the HF file's layout: one row per question, options a list
  assert read_benchmark("Video-MME", path, ROOT) == VIDEOMME
  grouped = read_benchmark("videomme", path, ROOT, by_group=True)
  assert [t.data_source for t in grouped] == ["VideoMME/short", "VideoMME/short", "VideoMME/long"]


def test_videomme_nested_results_template_is_refused_with_the_file_to_read(tmp_path):
  nested = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
             "questions": [{"question_id": "001-1", "task_type": "Counting Problem", "question": "How many?",
                            "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "C"}]}]
  path = tmp_path / "output_test_template.json"
  path.write_text(json.dumps(nested))
  with pytest.raises(AnnotationError, match=r"output_test_template.json: record 0: field 'questions': .*nested "
                                            r"results template.*test-00000-of-00001.parquet"):
    read_benchmark("videomme", str(path), ROOT)


def test_lvbench():
  tasks = read_benchmark("lvbench", os.path.join(FIX, "lvbench_video_info.meta.jsonl"), ROOT)
  assert tasks == [
      Task("/videos/Cm73ma6Ibcs.mp4",
           "<image>\nWhat year appears in the opening caption of the video?\nA. 1636\nB. 1366\nC. 1363\nD. 1633",
           "D", "1", "lvbench"),
      Task("/videos/Cm73ma6Ibcs.mp4",
           "<image>\nHow many players from the red team foul out in the second half?\nA. None\nB. One\nC. Two\n"
           "D. Three", "B", "2", "lvbench"),
      Task("/videos/uF1P6B0tNyk.mp4",
           "<image>\nWhat is the diver holding when the turtle first appears?\nA. A camera\nB. A net\nC. A torch\n"
           "D. A slate", "A", "17", "lvbench"),
  ]
  assert split_parenthesised_options("Q?\n(A) x y\n(B) z") == ("Q?", ["x y", "z"])


def test_original_json():
  path = os.path.join(FIX, "original_eval.json")
  with pytest.raises(AnnotationError, match=r"original_eval.json: record 2: field 'extra_info.answer_type': "
                                            r"'open_ended'"):
    read_benchmark("original", path, ROOT)
  tasks = read_benchmark("original", path, ROOT, open_ended="skip")
  assert tasks == [
      Task("/videos/lvr/0001.mp4",
           "<image>\nWhat does the person put on the table first?\nA. A cup\nB. A book\nC. A phone\nD. A plate",
           "B", "lvr-0001", "longvideo-reason"),
      Task("/abs/videos/mlvu_9.mp4",  # an absolute path stays as it is
           "<image>\nWhich colour is the car that overtakes the bus?\nA. Red\nB. White\nC. Black\nD. Silver",
           "D", "1", "MVLU"),
  ]


# ------------------------------------------------------------------------------------------------ bad input
def _skipped_or_error(name, path):
  """The skipped records' reasons, or the error when no record could be read."""
  try:
    bench = load_benchmark(name, path, ROOT)
  except AnnotationError as e:
    return f"error: {e}"
  return "\n".join(f"{d.id}: {d.reason}" for d in bench.skipped)


@pytest.mark.parametrize("name, file, message", [
    ("mlvu", "bad/mlvu_answer_not_a_candidate.json",
     r"^mlvu_answer_not_a_candidate/1: .*mlvu_answer_not_a_candidate.json: record 1: field 'answer': 'The dog' is "
     r"not one of the candidates$"),
    ("lvbench", "bad/lvbench_inline_options.jsonl",
     r"^2: .*lvbench_inline_options.jsonl: record 0.qa\[1\]: field 'question': expected option lines"),
    ("videomme", "bad/videomme_missing_answer.json",
     r"^001-2: .*videomme_missing_answer.json: record 1: field 'answer': is missing$"),
    ("longvideobench", "bad/lvb_choice_out_of_range.json",  # its only record: the file fails
     r"^error: .*lvb_choice_out_of_range.json: none of its 1 records can be read: .*record 0: field "
     r"'correct_choice': 4 is outside the 4 options"),
])
def test_bad_records_are_skipped_naming_file_record_and_field(name, file, message):
  assert re.search(message, _skipped_or_error(name, os.path.join(FIX, file)))


REQUIRED = {  # benchmark -> (fixture, fields that every record must have)
    "mlvu": ("mlvu/json/1_plotQA.json", ["video", "question", "candidates", "answer"]),
    "longvideobench": ("lvb_val.json", ["question", "candidates", "correct_choice", "id"]),
    "videomme": ("videomme_rows.json", ["videoID", "question_id", "question", "options", "answer"]),
    "original": ("original_eval.json", ["problem", "solution", "data_source", "videos", "extra_info"]),
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_each_missing_field_is_named_and_its_record_skipped(name, tmp_path):
  fixture, fields = REQUIRED[name]
  with open(os.path.join(FIX, fixture)) as f:
    records = json.load(f)
  n = len(read_benchmark(name, os.path.join(FIX, fixture), ROOT, **({"open_ended": "skip"} if name == "original"
                                                                      else {})))
  for field in fields:
    bad = copy.deepcopy(records)
    del bad[1][field]
    path = tmp_path / f"{name}_{field}.json"
    path.write_text(json.dumps(bad))
    options = {"open_ended": "skip"} if name == "original" else {}
    bench = load_benchmark(name, str(path), ROOT, **options)
    assert len(bench.tasks) == n - 1 and len(bench.skipped) == 1, field
    assert re.search(rf"{path.name}: record 1: field '{field}': is missing$", bench.skipped[0].reason)


def test_lvbench_missing_fields_and_wrong_types(tmp_path):
  lines = open(os.path.join(FIX, "lvbench_video_info.meta.jsonl")).read().splitlines()
  rec = json.loads(lines[1])
  for field in ("key", "qa"):
    bad = dict(rec)
    del bad[field]
    (tmp_path / "m.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    bench = load_benchmark("lvbench", str(tmp_path / "m.jsonl"), ROOT)
    assert [t.id for t in bench.tasks] == ["1", "2"]  # line 0's questions are kept
    assert [(d.id, d.reason) for d in bench.skipped] == [("m.jsonl#1", f"{tmp_path}/m.jsonl: record 1: field "
                                                                      f"'{field}': is missing")]
  bad = copy.deepcopy(rec)
  bad["qa"][0]["answer"] = "E"
  (tmp_path / "m.jsonl").write_text(json.dumps(bad) + "\n")
  with pytest.raises(AnnotationError, match=r"record 0.qa\[0\]: field 'answer': 'E' is not one of the options' "
                                            r"letters A-D"):
    read_benchmark("lvbench", str(tmp_path / "m.jsonl"), ROOT)
  (tmp_path / "m.jsonl").write_text(lines[0] + "\n{not json\n")
  bench = load_benchmark("lvbench", str(tmp_path / "m.jsonl"), ROOT)
  assert len(bench.tasks) == 2 and re.search(r"m.jsonl: record 1: \(line 2\) is not valid JSON",
                                             bench.skipped[0].reason)


def test_wrong_types_empty_files_duplicates_and_unknown_names(tmp_path):
  rows = json.load(open(os.path.join(FIX, "videomme_rows.json")))
  bad = copy.deepcopy(rows)
  bad[2]["options"] = "A. x B. y"
  (tmp_path / "v.json").write_text(json.dumps(bad))
  assert re.search(r"601-3: .*v.json: record 2: field 'options': must be list, got str",
                   _skipped_or_error("videomme", str(tmp_path / "v.json")))
  bad = copy.deepcopy(rows)
  bad[0]["options"][1] = "C. Candles."
  (tmp_path / "v.json").write_text(json.dumps(bad))
  assert re.search(r"001-1: .*record 0: field 'options': option 1 'C. Candles.' does not start",
                   _skipped_or_error("videomme", str(tmp_path / "v.json")))
  bad = copy.deepcopy(rows)
  bad[2]["question_id"] = "001-1"
  (tmp_path / "v.json").write_text(json.dumps(bad))
  bench = load_benchmark("videomme", str(tmp_path / "v.json"), ROOT)
  assert [t.id for t in bench.tasks] == ["001-1", "001-2"] and bench.tasks[0].answer == "C"  # the first is kept
  assert [d.id for d in bench.skipped] == ["001-1"] and "is an earlier record's too" in bench.skipped[0].reason
  (tmp_path / "e.json").write_text("[]")
  with pytest.raises(AnnotationError, match=r"e.json: holds no records"):
    read_benchmark("lvb", str(tmp_path / "e.json"), ROOT)
  (tmp_path / "o.json").write_text('{"problem": "x"}')
  with pytest.raises(AnnotationError, match=r"o.json: must hold a list of records, got dict"):
    read_benchmark("original", str(tmp_path / "o.json"), ROOT)
  (tmp_path / "n.json").write_text("{not json")
  with pytest.raises(AnnotationError, match=r"n.json: is not valid JSON"):
    read_benchmark("mlvu", str(tmp_path / "n.json"), ROOT)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    read_benchmark("lvb", str(tmp_path / "nope.json"), ROOT)
  with pytest.raises(ValueError, match=r"unknown benchmark 'mvbench'; known: \['longvideobench', 'lvbench'"):
    read_benchmark("mvbench", os.path.join(FIX, "lvb_val.json"), ROOT)
