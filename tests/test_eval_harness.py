"""The evaluation harness on the tiny random model with generated videos and one missing video: scripted turns
give known accuracies, the report agrees with a recount of its JSONL, the missing video is reported while the
others run, and the no-tool baseline sees its promised frames and never runs the tool."""

import collections
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import media
from zoomer_jax.agent import protocol as P
from zoomer_jax.agent import replicas
from zoomer_jax.agent.rollout import AgentConfig, Task, Trajectory
from zoomer_jax.config_loader import load
from zoomer_jax.eval import harness
from zoomer_jax.eval.harness import evaluate, frame_budget, no_tool_config
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.sampling import SamplingParams
from zoomer_jax.text import build_tiny_tokenizer

SMALL = 56 * 56  # 4 vision tokens per frame
# Budget of the tool run: 4 overview frames + 2 calls x 3 frames = 10 (< max_total_frames 16).
TOOL = P.ToolConfig(max_generation_round=3, tool_call_max_frames=3, frames_upbound=4, max_total_frames=16)
# A turn's token limit: the longest scripted turn (28 tokens) fits.
CFG = AgentConfig(tool=TOOL, sampling=SamplingParams(temperature=1.0, max_new_tokens=32), decode_chunk=16,
                  max_pixels=SMALL, min_pixels=SMALL, workers=2)
END = "<|im_end|>"


@pytest.fixture(scope="module")
def model():
  return Qwen25VL(ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model), rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  return dict(a=media.write_video(str(d / "a.mp4"), 200, 20.0, (64, 80)),  # 10 s, 200 frames
              b=media.write_video(str(d / "b.mp4"), 150, 15.0, (64, 80)),  # 10 s, 150 frames
              c=media.write_video(str(d / "c.mp4"), 6, 2.0, (64, 80)),  # 3 s, 6 frames
              missing=str(d / "missing.mp4"))


def _script(turns):
  return lambda task, rnd: turns[task.id][rnd] if rnd < len(turns[task.id]) else None


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _tool_tasks(videos):
  """Six tasks and their scripted turns (zooms, a missing video, a malformed call, answers right and wrong)."""
  tasks = [Task(videos["a"], "<image>\nWhich? A. x B. y", "B", "t0", "S1"),
           Task(videos["b"], "<image>\nWhich? A. x B. y C. z", "A", "t1", "S1"),
           Task(videos["missing"], "<image>\nWhich? A. x B. y", "A", "t2", "S2"),
           Task(videos["a"], "<image>\nWhich? A. x B. y C. z D. w", "D", "t3", "S2"),
           Task(videos["b"], "<image>\nWhich? A. x B. y C. z", "C", "t4", "S2"),
           Task(videos["a"], "<image>\nWhich? A. x B. y", "A", "t5", "S1")]
  turns = {
      # a zoom of int(1 x 2) = 2 frames, then the right answer: acc 1, format 1
      "t0": ['<think>zoom</think><video_zoom>{"segment": [2, 4], "fps": 1}</video_zoom>',
             "<think>seen</think><answer>B</answer>" + END],
      "t1": ["<think>hmm</think><answer>C. the third</answer>" + END],  # wrong: acc 0, format 1
      "t2": [],
      "t3": ["the answer is D." + END],  # no tags: the judge's letter rule finds D (acc 1), format 0
      # a malformed call (tool error), a 3-frame zoom, then a call in the last round (never executed)
      "t4": ['<think>one</think><video_zoom>{"segment": [2, 4], "fps": </video_zoom>',
             '<think>two</think><video_zoom>{"segment": [0, 3], "fps": 1}</video_zoom>',
             '<think>three</think><video_zoom>{"segment": [5, 6], "fps": 2}</video_zoom>'],
      "t5": ["<think>t</think><answer>\\boxed{A}</answer>" + END],  # a boxed answer: acc 1, format 1
  }
  return tasks, turns


def test_tool_run_counts_and_jsonl_agree(model, videos, tmp_path):
  tok = build_tiny_tokenizer()
  tasks, turns = _tool_tasks(videos)
  out = str(tmp_path / "run" / "tool.jsonl")
  report = evaluate(model, tok, tasks, CFG, batch_size=3, out_jsonl=out, key=jax.random.key(1), progress=False,
                    script=_script(turns))
  lines = _read_jsonl(out)
  assert [r["id"] for r in lines] == ["t0", "t1", "t2", "t3", "t4", "t5"]
  by_id = {r["id"]: r for r in lines}

  # Per-sample outcomes, written by hand from the scripts.
  assert [by_id[i]["acc"] for i in by_id] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
  assert [by_id[i]["format"] for i in by_id] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
  assert [by_id[i]["finish_reason"] for i in by_id] == ["answer", "answer", "video_error", "no_call", "round_limit",
                                                        "answer"]
  assert [by_id[i]["rounds"] for i in by_id] == [2, 1, 0, 1, 3, 1]
  assert [by_id[i]["tool_calls"] for i in by_id] == [1, 0, 0, 0, 1, 0]
  assert [by_id[i]["tool_errors"] for i in by_id] == [0, 0, 0, 0, 1, 0]
  # overview: 0.5 fps gives 5 frames of each 10 s video, over frames_upbound 4 -> 4 spread evenly
  assert [by_id[i]["frames"] for i in by_id] == [4 + 2, 4, 0, 4, 4 + 3, 4]
  assert by_id["t0"]["zoom_frames"] == 2 and by_id["t0"]["score"] == 2.0 and by_id["t0"]["prediction"] == "B"
  assert by_id["t0"]["input"].count("<image>") == 4 and by_id["t0"]["output"].count("<image>") == 2
  assert "<tool_response>" in by_id["t0"]["output"] and "<tool_response>" not in by_id["t0"]["input"]
  assert by_id["t0"]["prompt_len"] + by_id["t0"]["response_len"] > by_id["t0"]["prompt_len"] > 0

  # The missing video is reported for its sample, counted wrong; its batch-mates t0 and t1 still ran.
  assert by_id["t2"]["error"] and "missing.mp4" in by_id["t2"]["error"]
  assert report.errors == [dict(id="t2", video=videos["missing"], error=by_id["t2"]["error"])]
  assert all(by_id[i]["error"] is None for i in ("t0", "t1", "t3", "t4", "t5"))

  # Report vs hand-expected numbers ...
  assert report.n == 6 and report.mode == "tool" and report.frame_budget == 10
  assert report.accuracy == pytest.approx(3 / 6) and report.format == pytest.approx(3 / 6)
  assert report.per_source == {"S1": dict(n=3, correct=2.0, accuracy=pytest.approx(2 / 3), errors=0),
                               "S2": dict(n=3, correct=1.0, accuracy=pytest.approx(1 / 3), errors=1)}
  assert report.mean_tool_calls == pytest.approx(2 / 5) and report.tool_use_rate == pytest.approx(2 / 5)
  assert report.mean_tool_errors == pytest.approx(1 / 5) and report.mean_frames == pytest.approx(25 / 5)
  assert report.rounds == {1: dict(count=3, accuracy=pytest.approx(2 / 3)), 2: dict(count=1, accuracy=1.0),
                           3: dict(count=1, accuracy=0.0)}
  assert report.finish_reasons == {"answer": 3, "video_error": 1, "no_call": 1, "round_limit": 1}
  # ... and vs a recount from the JSONL lines.
  groups = collections.defaultdict(list)
  for r in lines:
    groups[r["data_source"]].append(r["acc"])
  assert {k: sum(v) / len(v) for k, v in groups.items()} == {k: v["accuracy"] for k, v in report.per_source.items()}
  assert report.accuracy == sum(r["acc"] for r in lines) / len(lines)

  d = json.loads(json.dumps(report.to_dict()))
  assert d["per_source"]["S2"]["errors"] == 1 and d["rounds"]["3"]["count"] == 1 and "records" not in d
  table = report.to_table()
  assert "66.67" in table and "33.33" in table and "overall" in table and "50.00" in table and "missing.mp4" in table


def test_no_tool_baseline_sees_the_budget_and_never_zooms(model, videos, tmp_path):
  tok = build_tiny_tokenizer()
  assert frame_budget(TOOL) == 10  # min(16, 4 + (3 - 1) x 3)
  assert frame_budget(P.ToolConfig()) == 128  # the original's 64 + 4 x 16
  assert frame_budget(P.ToolConfig(frames_upbound=64, max_total_frames=100)) == 100  # capped by max_total_frames
  tasks = [Task(videos["a"], "<image>\nWhich? A. x B. y", "B", "n0", "S1"),
           Task(videos["b"], "<image>\nWhich? A. x B. y", "A", "n1", "S1"),
           Task(videos["c"], "<image>\nWhich? A. x B. y", "A", "n2", "S2")]
  turns = {"n0": ['<think>look</think><video_zoom>{"segment": [2, 4], "fps": 1}</video_zoom>'],
           "n1": ["<think>x</think><answer>A</answer>" + END],
           "n2": ["<think>x</think><answer>B</answer>" + END]}
  out = str(tmp_path / "notool.jsonl")
  report = evaluate(model, tok, tasks, CFG, use_tool=False, batch_size=3, out_jsonl=out, progress=False,
                    script=_script(turns))
  by_id = {r["id"]: r for r in _read_jsonl(out)}
  assert report.mode == "no_tool" and report.frame_budget == 10
  # 10 frames of the long videos, all 6 of the short one; no call ever runs, one round each.
  assert [by_id[i]["frames"] for i in ("n0", "n1", "n2")] == [10, 10, 6]
  assert all(r["calls"] == [] and r["tool_calls"] == 0 and r["zoom_frames"] == 0 and r["rounds"] == 1
             for r in by_id.values())
  assert by_id["n0"]["finish_reason"] == "round_limit" and "<tool_response>" not in by_id["n0"]["output"]
  # Frames spread evenly: int(linspace(0, 199, 10)) = 0 22 44 66 88 110 132 154 176 199 at 20 fps.
  stamps = ["0.00", "1.10", "2.20", "3.30", "4.40", "5.50", "6.60", "7.70", "8.80", "9.95"]
  assert "".join(f"<frame{i}_time{t}s><image>" for i, t in enumerate(stamps)) in by_id["n0"]["input"]
  assert "".join(f"<frame{i}_time{t}s><image>" for i, t in enumerate(["0.00", "0.50", "1.00", "1.50", "2.00",
                                                                        "2.50"])) in by_id["n2"]["input"]
  # The system prompt does not offer the tool.
  assert "video_zoom" not in by_id["n1"]["input"] and "<answer>" in by_id["n1"]["input"]
  assert [by_id[i]["acc"] for i in ("n0", "n1", "n2")] == [0.0, 1.0, 0.0]
  assert report.per_source["S1"]["accuracy"] == 0.5 and report.tool_use_rate == 0.0
  assert report.finish_reasons == {"round_limit": 1, "answer": 2}

  cfg = no_tool_config(CFG)
  assert (cfg.tool.max_generation_round, cfg.tool.frames_upbound, cfg.tool.max_total_frames) == (1, 10, 10)
  assert cfg.sampling == CFG.sampling and cfg.max_pixels == CFG.max_pixels


def _fake_trajectory(tok, task, text):
  """A one-turn trajectory whose prompt is the task's problem and whose only turn is `text`."""
  prompt, turn = tok.encode(task.problem), tok.encode(text)
  ids = np.array(prompt + turn, np.int32)
  mask = np.array([0] * len(prompt) + [1] * len(turn), np.int32)
  return Trajectory(task=task, ids=ids, response_mask=mask, logprobs=np.zeros(len(ids), np.float32),
                    pixel_values=np.zeros((0, 1176), np.float32), image_grid_thw=np.zeros((3, 3), np.int64), calls=[],
                    answer=P.final_answer(text), finish_reason="answer", rounds=1, turns=[text])


def test_a_failing_batch_is_retried_task_by_task(monkeypatch):
  """An exception raised for one task (e.g. a video whose duration reads as 0) costs that task only: what ended
  before it is kept, the tasks left run again in batches, and a failing batch one task at a time. (The engine is
  replaced by a stand-in that fails on the task "bad"; in the one run over every task, after the first ended.)"""
  tok = build_tiny_tokenizer()
  calls = []

  def flaky(model, tok, batch, cfg, key, script=None, engine=None, admit=None, on_event=None, pixels="all"):
    calls.append([t.id for t in batch])
    if admit is not None:  # the one run: batch_size in flight, the rest would join; the first ends, then the error
      assert engine.max_running == 3 and cfg.cache_size > 0
      on_event("done", 0, _fake_trajectory(tok, batch[0], script(0, 0)))
    if any(t.id == "bad" for t in batch):
      raise ValueError("video duration must be a positive number of seconds, got 0.0")
    return [_fake_trajectory(tok, t, script(i, 0)) for i, t in enumerate(batch)]

  monkeypatch.setattr(harness, "continuous_rollout", flaky)  # the one run (tasks join it)
  monkeypatch.setattr(harness, "replicated_rollout", flaky)  # the batches after it
  tasks = [Task("a.mp4", "Q? A. x B. y", "A", "ok0", "S"), Task("b.mp4", "Q?", "A", "bad", "S"),
           Task("c.mp4", "Q? A. x B. y", "B", "ok1", "S"), Task("d.mp4", "Q? A. x B. y", "B", "ok2", "S")]
  turns = {"ok0": ["<think>a</think><answer>A</answer>"], "ok1": ["<think>b</think><answer>B</answer>"],
           "ok2": ["<think>b</think><answer>A</answer>"]}
  report = evaluate(None, tok, tasks, CFG, batch_size=3, progress=False, script=_script(turns))
  assert calls == [["ok0", "bad", "ok1"], ["bad", "ok1", "ok2"], ["bad"], ["ok1"], ["ok2"]]
  assert [r["id"] for r in report.records] == ["ok0", "bad", "ok1", "ok2"]
  assert [r["acc"] for r in report.records] == [1.0, 0.0, 1.0, 0.0]
  assert report.errors == [dict(id="bad", video="b.mp4", error="ValueError: video duration must be a positive "
                                                                "number of seconds, got 0.0")]
  assert report.finish_reasons == {"answer": 3, "error": 1} and report.accuracy == pytest.approx(2 / 4)
  assert report.mean_frames == pytest.approx(3.0)  # errors are left out of trajectory means


def test_evaluate_rejects_tasks_without_answers(model):
  with pytest.raises(ValueError, match=r"without an answer cannot be scored: \['q'\]"):
    evaluate(model, build_tiny_tokenizer(), [Task("v.mp4", "<image>", None, "q")], CFG, progress=False)


def test_main_runs_the_tiny_config_on_a_benchmark_file(videos, tmp_path, capsys):
  """`main` wires config, reader, model and harness: the tiny config on an original-format JSON file. A missing
  video stops the run before the model is built, unless allowed: then its task is left out and reported."""
  records = [dict(problem="<image>\nWhich? A. x B. y", solution="A", data_source="mine", videos=[os.path.basename(v)],
                  extra_info=dict(answer_type="multiple_choice"), doc_id=f"d{k}")
             for k, v in enumerate([videos["a"], videos["missing"], videos["b"]])]
  records.append(dict(records[0], problem="no placeholder", doc_id="d3"))  # a dirty record: skipped, reported
  (tmp_path / "val.json").write_text(json.dumps(records))
  # The test's agent settings (so the compiled programs are reused), the model's turns left to the random weights.
  overrides = ["benchmark.name=original", f"benchmark.annotation={tmp_path / 'val.json'}",
               f"benchmark.video_root={os.path.dirname(videos['a'])}", f"out_dir={tmp_path / 'out'}",
               "agent.frames_upbound=4", "agent.tool_call_max_frames=3", "agent.max_total_frames=16",
               "rollout.max_new_tokens=24", "batch_size=3", "progress=False"]
  with pytest.raises(FileNotFoundError, match=r"1 videos are missing \(nothing was run.*\n(.*\n)*.*missing.mp4 "
                                              r"\(tasks d1\)"):
    harness.main(load("eval_tiny", overrides))
  report = harness.main(load("eval_tiny", overrides + ["benchmark.allow_missing_videos=True"]))
  assert report.n == 2 and not report.errors
  assert report.missing_videos == [dict(video=videos["missing"], ids=["d1"])]
  assert [(d["id"], d["action"]) for d in report.dirty] == [("d3", "skipped")]
  lines = _read_jsonl(tmp_path / "out" / "original_tool.jsonl")
  assert [r["id"] for r in lines] == ["d0", "d2"] and lines[0]["error"] is None
  assert all(1 <= r["rounds"] <= 3 for r in lines)
  saved = json.loads((tmp_path / "out" / "original_tool.json").read_text())
  assert saved["n"] == 2 and saved["agent"]["tool_call_max_frames"] == 3 and saved["checkpoint"] == "random weights"
  assert saved["missing_videos"][0]["ids"] == ["d1"] and "has no <image> placeholder" in saved["dirty"][0]["reason"]
  out = capsys.readouterr().out
  assert "overall" in out and "0 resolved, 1 skipped" in out and "missing video " in out
  assert np.isclose(saved["accuracy"], sum(r["acc"] for r in lines) / 2)


def test_evaluation_over_replicas_joins_tasks_into_one_engine_per_replica(model, videos, tmp_path, monkeypatch):
  """A model with 4 data-parallel replicas: one `replicated_rollout` with joining (each replica's engine takes a
  block of the tasks, one in flight, the next joining as it ends; no batches), and the JSONL lines equal one
  device's."""
  import zoomer_jax
  from zoomer_jax.parallel.mesh import make_mesh
  tok = build_tiny_tokenizer()
  tasks, turns = _tool_tasks(videos)

  def run(m, name):
    evaluate(m, tok, tasks, CFG, batch_size=4, out_jsonl=str(tmp_path / name), key=jax.random.key(1), progress=False,
             script=_script(turns))
    return _read_jsonl(tmp_path / name)
  want = run(model, "one.jsonl")
  calls, admitted = [], []
  inner_rollout, inner_engine = harness.replicated_rollout, replicas.continuous_rollout

  def spy(*a, **k):
    calls.append(k.get("join"))
    return inner_rollout(*a, **k)

  def engine_spy(*a, admit=None, **k):
    return inner_engine(*a, admit=None if admit is None else (lambda free: _count(admit, free, admitted)), **k)
  monkeypatch.setattr(harness, "replicated_rollout", spy)
  monkeypatch.setattr(replicas, "continuous_rollout", engine_spy)
  mesh = make_mesh((4, 1, 2))
  sharded = zoomer_jax.load_hf(zoomer_jax.export_hf(model, tmp_path / "m"), mesh=mesh)
  with jax.set_mesh(mesh):
    got = run(sharded, "replicas.jsonl")
  assert calls == [True]  # one run, joining
  assert sorted(t.id for t in admitted) == ["t1", "t4"]  # blocks [t0 t1] [t2] [t3 t4] [t5]: the second of each joined
  assert got == want


def _count(admit, free, seen):
  new = admit(free)
  seen.extend(new)
  return new


@pytest.mark.slow
def test_main_loads_a_checkpoint_onto_the_mesh(model, videos, tmp_path):
  """`main` with `checkpoint`: the HF directory (weights and tokenizer) is loaded sharded over (2, 2, 2) and the
  batch is evaluated under that mesh."""
  import zoomer_jax
  ckpt = zoomer_jax.export_hf(model, tmp_path / "ckpt")
  build_tiny_tokenizer().save(ckpt)
  records = [dict(problem="<image>\nWhich? A. x B. y", solution="B", data_source="mine", videos=[videos[k]],
                  extra_info=dict(answer_type="multiple_choice"), doc_id=k) for k in ("a", "b", "c")]
  (tmp_path / "val.json").write_text(json.dumps(records))
  cfg = load("eval_tiny", [f"checkpoint={ckpt}", "mesh.ici=(2,2,2)", "benchmark.name=original",
                           f"benchmark.annotation={tmp_path / 'val.json'}", f"out_dir={tmp_path / 'out'}",
                           "agent.frames_upbound=4", "agent.tool_call_max_frames=3", "agent.max_total_frames=16",
                           "rollout.max_new_tokens=24", "batch_size=3", "progress=False", "use_tool=False"])
  report = harness.main(cfg)
  assert report.n == 3 and not report.errors and report.mode == "no_tool"
  assert [r["frames"] for r in report.records] == [10, 10, 6]
  saved = json.loads((tmp_path / "out" / "original_no_tool.json").read_text())
  assert saved["checkpoint"] == str(ckpt) and saved["frame_budget"] == 10


def test_sampled_evaluation_draws_k_trajectories_per_task(model, videos, tmp_path):
  tok = build_tiny_tokenizer()
  tasks = [Task(videos["a"], "<image>\nWhich? A. x B. y", "B", "t0", "S1"),
           Task(videos["c"], "<image>\nWhich? A. x B. y", "A", "t1", "S1")]
  out = str(tmp_path / "sampled.jsonl")
  report = evaluate(model, tok, tasks, CFG, batch_size=4, out_jsonl=out, key=jax.random.key(2), progress=False,
                    temperature=1.0, samples=3)
  lines = _read_jsonl(out)
  assert report.mode == "tool@T1x3" and report.n == 6 == len(lines)
  assert [(r["id"], r["sample"]) for r in lines] == [(t, k) for t in ("t0", "t1") for k in range(3)]
  assert report.accuracy == pytest.approx(np.mean([r["acc"] for r in lines]))
  for t in ("t0", "t1"):  # a random model at temperature 1: the three samples of a task differ
    outputs = [r["output"] for r in lines if r["id"] == t]
    assert len(set(outputs)) == 3, outputs
  greedy = _read_jsonl(evaluate(model, tok, tasks, CFG, batch_size=4, out_jsonl=str(tmp_path / "g.jsonl"),
                                progress=False).out_jsonl)
  assert len(greedy) == 2 and "sample" not in greedy[0]
  for bad in (dict(samples=0, temperature=1.0), dict(samples=2, temperature=0.0), dict(temperature=-1.0)):
    with pytest.raises(ValueError, match="samples must be >= 1 and temperature >= 0"):
      evaluate(model, tok, tasks, CFG, progress=False, **bad)
