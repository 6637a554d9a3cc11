"""Record formats (docs/training.md): parsing, validation errors, .json/.jsonl/.yaml loading, TFDS round trips."""

import json
import math
import os
import random
import subprocess
import sys

import pytest

from zoomer_jax.data.records import RecordError, RLRecord, SFTRecord, load_records, parse_rl_record, parse_sft_record
from zoomer_jax.data.tfds_builders import build_rl_dataset, build_sft_dataset, rl_source, sft_source


def rl_obj(i, **over):
  obj = {"problem": f"Question {i}? <image>\nA. yes\nB. no", "solution": "AB"[i % 2], "data_source": "lvb",
         "videos": [f"videos/{i}.mp4"], "extra_info": {"answer_type": "multiple_choice", "duration": i * 1.5}}
  if i % 3 == 1:
    obj["doc_id"] = i
  elif i % 3 == 2:
    obj["doc_id"] = f"doc-{i}"
  obj.update(over)
  return obj


def sft_obj(i, n_images=2):
  return {"messages": [{"role": "system", "content": "You zoom."},
                       {"role": "user", "content": "Watch: " + "<image>" * n_images + f" Q{i} ünï"},
                       {"role": "assistant", "content": "<video_zoom>[1, 2]</video_zoom>"},
                       {"role": "tool", "content": "clip: <image>"},
                       {"role": "assistant", "content": f"<answer>{i}</answer>"}],
          "images": [f"frames/{i}_{k}.png" for k in range(n_images + 1)]}


def write(path, objs, jsonl=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    if jsonl:
      f.write("\n".join(json.dumps(o, ensure_ascii=False) for o in objs) + "\n\n")
    else:
      json.dump(objs, f, ensure_ascii=False)
  return str(path)


def expected_rl(obj, json_dir):
  """The record the format defines, written out by hand (not through the parser)."""
  return RLRecord(problem=obj["problem"], solution=obj["solution"], data_source=obj["data_source"],
                  video=os.path.join(json_dir, obj["videos"][0]), answer_type=obj["extra_info"]["answer_type"],
                  doc_id=obj.get("doc_id"), extra_info=obj["extra_info"])


# ----------------------------------------------------------------------------------------------- parsing


def test_rl_record_fields_and_path_resolution(tmp_path):
  objs = [rl_obj(i) for i in range(4)] + [rl_obj(4, videos=["/abs/v.mp4"], solution=3)]
  path = write(tmp_path / "sub" / "rl.json", objs)
  recs = load_records(path)
  assert recs[:4] == [expected_rl(o, str(tmp_path / "sub")) for o in objs[:4]]
  assert recs[1].doc_id == 1 and recs[2].doc_id == "doc-2" and recs[0].doc_id is None
  assert recs[4].video == "/abs/v.mp4" and recs[4].solution == "3"
  assert load_records(path, base_dir="/media")[0].video == "/media/videos/0.mp4"


@pytest.mark.parametrize("change, field", [
    ({"problem": "no placeholder here"}, "problem"),
    ({"videos": ["a.mp4", "b.mp4"]}, "videos"),
    ({"videos": []}, "videos"),
    ({"videos": "a.mp4"}, "videos"),
    ({"extra_info": {"answer_type": "free_form"}}, "extra_info.answer_type"),
    ({"extra_info": {}}, "extra_info.answer_type"),
    ({"doc_id": True}, "doc_id"),
    ({"data_source": ""}, "data_source"),
    ({"solution": None}, "solution"),
])
def test_rl_errors_name_file_index_and_field(tmp_path, change, field):
  objs = [rl_obj(i) for i in range(5)]
  objs[3].update(change)
  path = write(tmp_path / "bad.json", objs)
  with pytest.raises(RecordError) as e:
    load_records(path)
  msg = str(e.value)
  assert path in msg and "record 3" in msg and f"'{field}'" in msg, msg


@pytest.mark.parametrize("missing", ["problem", "solution", "data_source", "videos", "extra_info"])
def test_rl_missing_field(missing):
  obj = rl_obj(0)
  del obj[missing]
  with pytest.raises(RecordError, match=f"x.json: record 9: missing field '{missing}'"):
    parse_rl_record(obj, "x.json: record 9")


def test_sft_record_roles_images_and_id(tmp_path):
  objs = [sft_obj(0), sft_obj(1, n_images=0), {**sft_obj(2), "id": "traj-2"}]
  path = write(tmp_path / "d" / "sft.jsonl", objs, jsonl=True)
  recs = load_records(path, kind="sft")
  assert len(recs) == 3 and all(isinstance(r, SFTRecord) for r in recs)
  assert recs[0].messages == tuple(objs[0]["messages"])
  assert recs[0].images == tuple(os.path.join(str(tmp_path / "d"), p) for p in objs[0]["images"])
  assert recs[1].images == (os.path.join(str(tmp_path / "d"), "frames/1_0.png"),)
  assert [r.id for r in recs] == ["sft.jsonl#0", "sft.jsonl#1", "traj-2"]
  assert [m["role"] for m in recs[0].messages] == ["system", "user", "assistant", "tool", "assistant"]


def _sft_with(change):
  obj = sft_obj(0)
  change(obj)
  return obj


@pytest.mark.parametrize("change, field", [
    (lambda o: o["messages"][1].update(role="human"), "messages[1]"),
    (lambda o: o["messages"][2].update(role="system"), "messages[2]"),
    (lambda o: o["messages"][1].update(extra=1), "messages[1]"),
    (lambda o: o["messages"][1].update(content=["x"]), "messages[1]"),
    (lambda o: o["images"].pop(), "images"),
    (lambda o: o["images"].append("more.png"), "images"),
    (lambda o: o.update(messages=[m for m in o["messages"] if m["role"] != "assistant"]), "messages"),
    (lambda o: o.update(messages=[]), "messages"),
    (lambda o: o.pop("messages"), "messages"),
])
def test_sft_errors_name_file_index_and_field(tmp_path, change, field):
  objs = [sft_obj(i) for i in range(3)]
  objs[2] = _sft_with(change)
  path = write(tmp_path / "bad.json", objs)
  with pytest.raises(RecordError) as e:
    load_records(path, kind="sft")
  msg = str(e.value)
  assert path in msg and "record 2" in msg and f"'{field}" in msg, msg


def test_observation_role_is_accepted_and_placeholders_counted_across_turns():
  obj = {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "call"},
                      {"role": "observation", "content": "<image><image>"}, {"role": "assistant", "content": "B"}],
         "images": ["a.png", "b.png", "c.png"]}
  rec = parse_sft_record(obj, "here", default_id="x")
  assert rec.images == ("a.png", "b.png", "c.png") and rec.id == "x"
  obj["images"] = obj["images"][:2]
  with pytest.raises(RecordError, match="has 2 paths but the messages have 3 <image>"):
    parse_sft_record(obj, "here")


def test_file_level_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    load_records(str(tmp_path / "nope.json"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rl_obj(0)) + "\n{not json\n")
  with pytest.raises(RecordError, match="bad.jsonl: line 2"):
    load_records(str(bad))
  obj = tmp_path / "obj.json"
  obj.write_text(json.dumps(rl_obj(0)))
  with pytest.raises(RecordError, match="expected a JSON list"):
    load_records(str(obj))
  with pytest.raises(RecordError, match=r"\.json, \.jsonl or \.yaml"):
    load_records(str(tmp_path / "x.parquet"))
  with pytest.raises(ValueError, match="kind"):
    load_records(str(obj), kind="dpo")


# ----------------------------------------------------------------------------------------------- yaml


def _yaml(tmp_path, entries):
  lines = ["datasets:"] + [f"  - json_path: {p}\n    sampling_strategy: {s}" for p, s in entries]
  path = tmp_path / "spec.yaml"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_yaml_sampling_strategies_match_the_original(tmp_path):
  a = [rl_obj(i) for i in range(10)]
  b = [rl_obj(100 + i) for i in range(7)]
  write(tmp_path / "a" / "a.json", a)
  write(tmp_path / "b.json", b)

  def problems(spec_entries):
    return [r.problem for r in load_records(_yaml(tmp_path, spec_entries))]

  def p(objs):
    return [o["problem"] for o in objs]

  assert problems([("a/a.json", "all"), ("b.json", "all")]) == p(a) + p(b)
  assert problems([("a/a.json", "first:3")]) == p(a[:3])
  assert problems([("a/a.json", "first:25%")]) == p(a[:math.ceil(2.5)])  # ceil(25 * 10 / 100) = 3
  assert problems([("a/a.json", "end:4"), ("b.json", "end:100%")]) == p(a[-4:]) + p(b)
  assert problems([("a/a.json", "end:0")]) == []
  # random:N: the original seeds the global `random` with 42 once, then shuffles each entry's list in turn.
  random.seed(42)
  ra, rb = list(a), list(b)
  random.shuffle(ra)
  random.shuffle(rb)
  assert problems([("a/a.json", "random:4"), ("b.json", "random:50%")]) == p(ra[:4]) + p(rb[:4])
  # Media paths resolve against each JSON file's own folder.
  recs = load_records(_yaml(tmp_path, [("a/a.json", "first:1"), ("b.json", "first:1")]))
  assert recs[0].video == str(tmp_path / "a" / "videos" / "0.mp4") and recs[1].video == str(tmp_path / "videos/100.mp4")


def test_yaml_errors(tmp_path):
  write(tmp_path / "a.json", [rl_obj(0)])
  with pytest.raises(FileNotFoundError, match=r"missing\.json.*datasets\[1\]"):
    load_records(_yaml(tmp_path, [("a.json", "all"), ("missing.json", "all")]))
  with pytest.raises(RecordError, match=r"datasets\[0\]: sampling_strategy"):
    load_records(_yaml(tmp_path, [("a.json", "sample:3")]))
  with pytest.raises(RecordError, match="bad number"):
    load_records(_yaml(tmp_path, [("a.json", "first:x")]))
  (tmp_path / "hf.yaml").write_text("datasets:\n  - data_path: /hf\n")
  with pytest.raises(RecordError, match="data_path"):
    load_records(str(tmp_path / "hf.yaml"))
  (tmp_path / "flat.yaml").write_text("json_path: a.json\n")
  with pytest.raises(RecordError, match="datasets:"):
    load_records(str(tmp_path / "flat.yaml"))


def test_list_of_files_is_concatenated(tmp_path):
  a = write(tmp_path / "a.json", [rl_obj(0), rl_obj(1)])
  b = write(tmp_path / "b.jsonl", [rl_obj(2)], jsonl=True)
  assert [r.problem for r in load_records([a, b])] == [rl_obj(i)["problem"] for i in range(3)]


# ----------------------------------------------------------------------------------------------- TFDS


def test_tfds_rl_round_trip_in_order(tmp_path):
  # Two files per split, enough records that any shuffling on write would show.
  objs = [rl_obj(i) for i in range(60)]
  objs[5]["extra_info"] = {"answer_type": "open_ended", "nested": {"k": [1, "ü", None]}}
  objs[5]["problem"] = "Что это? <image> 视频"
  f1 = write(tmp_path / "src" / "part1.json", objs[:40])
  f2 = write(tmp_path / "src2" / "part2.jsonl", objs[40:], jsonl=True)
  fv = write(tmp_path / "val.json", objs[:3])
  builder = build_rl_dataset({"train": [f1, f2], "validation": [fv]}, str(tmp_path / "tfds"))
  written = [expected_rl(o, str(tmp_path / "src")) for o in objs[:40]]
  written += [expected_rl(o, str(tmp_path / "src2")) for o in objs[40:]]
  train = rl_source(builder, "train")
  assert len(train) == 60
  assert [train[i] for i in range(60)] == written
  val = rl_source(builder, "validation")
  assert [val[i] for i in range(3)] == [expected_rl(o, str(tmp_path)) for o in objs[:3]]
  assert train[5].extra_info["nested"] == {"k": [1, "ü", None]}
  assert {type(train[i].doc_id) for i in range(3)} == {type(None), int, str}
  assert builder.info.file_format.value == "array_record"
  assert "tensorflow" not in sys.modules


def test_tfds_sft_round_trip_in_order(tmp_path):
  objs = [sft_obj(i, n_images=i % 3) for i in range(30)]
  objs[4] = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "no images"}]}
  src = write(tmp_path / "sft.jsonl", objs, jsonl=True)
  builder = build_sft_dataset({"train": [src]}, str(tmp_path / "tfds"), name="distill")
  train = sft_source(builder, "train")
  expected = [SFTRecord(messages=tuple(o["messages"]), images=tuple(str(tmp_path / p) for p in o.get("images", [])),
                        id=f"sft.jsonl#{i}") for i, o in enumerate(objs)]
  assert [train[i] for i in range(len(train))] == expected
  assert train.__getitems__([7, 2]) == [expected[7], expected[2]]
  assert os.path.isdir(tmp_path / "tfds" / "sft_records" / "distill" / "1.0.0")
  assert "tensorflow" not in sys.modules


def _data_files(builder):
  d = builder.data_dir
  return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in sorted(os.listdir(d))}


def test_tfds_rebuild_is_idempotent_and_detects_changed_inputs(tmp_path):
  src = write(tmp_path / "rl.json", [rl_obj(i) for i in range(5)])
  data_dir = str(tmp_path / "tfds")
  b1 = build_rl_dataset({"train": [src]}, data_dir)
  files = _data_files(b1)
  b2 = build_rl_dataset({"train": [src]}, data_dir)
  assert _data_files(b2) == files  # nothing rewritten
  assert [rl_source(b2, "train")[i] for i in range(5)] == load_records(src)
  write(tmp_path / "rl.json", [rl_obj(i) for i in range(1, 7)])
  with pytest.raises(ValueError, match="built from other inputs.*overwrite=True"):
    build_rl_dataset({"train": [src]}, data_dir)
  b3 = build_rl_dataset({"train": [src]}, data_dir, overwrite=True)
  assert [rl_source(b3, "train")[i] for i in range(6)] == load_records(src)
  assert len(rl_source(b3, "train")) == 6


def test_tfds_missing_source_names_it(tmp_path):
  good = write(tmp_path / "rl.json", [rl_obj(0)])
  with pytest.raises(FileNotFoundError, match="not_there.jsonl"):
    build_rl_dataset({"train": [good], "validation": [str(tmp_path / "not_there.jsonl")]}, str(tmp_path / "tfds"))
  assert not os.path.exists(tmp_path / "tfds" / "rl_records")
  bad = write(tmp_path / "bad.json", [rl_obj(0), rl_obj(1, videos=[])])
  with pytest.raises(RecordError, match="bad.json: record 1: field 'videos'"):
    build_rl_dataset({"train": [bad]}, str(tmp_path / "tfds"))


def test_package_import_is_light():
  # Sibling modules (synthetic.py, cold_start.py) import zoomer_jax.data; that must not pull in TFDS or grain.
  code = ("import sys, zoomer_jax.data as d; assert 'tensorflow_datasets' not in sys.modules; "
          "assert 'grain' not in sys.modules; d.make_iterator; d.build_rl_dataset; "
          "assert 'tensorflow_datasets' in sys.modules and 'tensorflow' not in sys.modules")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
