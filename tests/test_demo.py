"""The main job end to end at toy size (`configs/demo.py:quick`), and the pieces it is built from."""

import json
import os

import numpy as np
import pytest

from zoomer_jax.config_loader import load
from zoomer_jax.demo import pipeline, plots


def test_demo_config_is_consistent():
  cfg = load("demo")
  tool = pipeline.tool_config(cfg)
  # The no-tool baseline gets every frame the tool run may see: the overview plus one zoom.
  from zoomer_jax.eval.harness import frame_budget
  assert frame_budget(tool) == tool.frames_upbound + tool.tool_call_max_frames == tool.max_total_frames
  assert cfg.data.reflection_fraction == 0 or tool.max_generation_round >= 3
  assert cfg.sft.data.cutoff_len <= cfg.sft.data.token_bucket  # one compiled training shape
  assert os.path.exists(tool.system_prompt)
  # GRPO's rollouts read the demo's tool fields (grpo.agent_config), so they run the same agent as the eval.
  from zoomer_jax.train.grpo import agent_config
  job = pipeline.grpo_job(cfg, pipeline.data_paths("/tmp/x"), "/tmp/x", "/tmp/x/sft/hf")
  assert agent_config(job.rollout).tool == tool
  with pytest.raises(ValueError, match="unknown demo stages"):
    pipeline._stages(load("demo", ["stages=data,train"]))


def test_sft_direct_steps_must_leave_steps_for_the_mix(tmp_path):
  paths = pipeline.data_paths(str(tmp_path))
  for bad in (800, 900, -1):
    cfg = load("demo", [f"sft_direct_steps={bad}", "sft.train.total_steps=800"])
    with pytest.raises(ValueError, match="sft_direct_steps"):
      pipeline.train_sft(cfg, paths, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was trained or written


def test_table_rows_and_numbers():
  r = dict(mode="tool", n=4, accuracy=0.75, format=1.0, mean_tool_calls=1.0, tool_use_rate=1.0, mean_frames=27.5,
           rounds={"2": {"count": 4, "accuracy": 0.75}}, calls_per_answer=1.5)
  text = pipeline.table({"grpo": {"tool": r}, "sft": {"tool": r, "no_tool": dict(r, mode="no_tool", accuracy=0.25)},
                         "sft_r": {"tool": dict(r, calls_per_answer=None)}})
  rows = text.splitlines()[2:]
  assert [row.split()[:2] for row in rows] == [["SFT", "tool"], ["SFT", "no_tool"], ["SFT+R", "tool"],
                                               ["GRPO", "tool"]]
  assert rows[0].split()[3] == "75.0" and rows[1].split()[3] == "25.0" and rows[0].split()[-1] == "2:4"
  assert "zooms/ans" in text.splitlines()[0] and rows[0].split()[6] == "1.50" and rows[2].split()[6] == "-"


def test_reflect_variants_add_the_stage_and_nothing_else():
  default, quick = load("demo"), load("demo:quick")
  assert "reflect" not in pipeline._stages(default) and "reflect" not in pipeline._stages(quick)
  for name, base in (("demo:reflect", default), ("demo:quick_reflect", quick)):
    cfg = load(name)
    assert pipeline._stages(cfg) == ["data", "sft", "reflect", "grpo", "eval"]
    cfg.stages, cfg.out_dir = base.stages, base.out_dir
    assert cfg.to_dict() == base.to_dict(), name
  with pytest.raises(ValueError, match="quick_reflect"):
    load("demo:nope")


def test_scripted_expert_corrects_the_first_mistake(tmp_path):
  """The reflection's step and continuation for each kind of failure, read off the request's text."""
  from zoomer_jax.agent import protocol as P
  from zoomer_jax.data import synthetic as S
  from zoomer_jax.demo.scripted_expert import ScriptedExpert
  tool = pipeline.tool_config(load("demo"))
  paths = S.generate(str(tmp_path), seed=0, n_train=1, n_val=0, n_test=0, tool_cfg=tool, height=56, width=56,
                     min_seconds=661 / 6, max_seconds=661 / 6)
  (rec,) = json.loads(open(paths["train"]).read())
  expert = ScriptedExpert([rec], tool)
  (s, e), fps = rec["extra_info"]["zoom"]["segment"], rec["extra_info"]["zoom"]["fps"]
  a0, a1 = rec["extra_info"]["answer_window"]
  first = next(iter(expert.by_prompt))
  flash = f"<frame0_time{(a0 + a1) / 2:.2f}s>{P.IMAGE}"
  miss = f"<frame0_time{s:.2f}s>{P.IMAGE}"
  zoom = f'<think>z</think>\n<video_zoom>{{"segment": [{s}, {e}], "fps": {fps / 2}}}</video_zoom>'
  wrong = "<think>w</think>\n<answer>Z</answer>"

  def ask(*steps):
    text = f"The agent's instructions:\nx\n\nWhat it saw and wrote:\n\n[the question]\n{first}\n"
    for k, (turn, obs) in enumerate(steps):
      text += f"\n[step {k}: the agent]\n{turn}\n" + (f"\n[the tool]\n{obs}\n" if obs is not None else "")
    return expert.correction(0, text + "\nReply with <analysis>, <step> and <continuation> as instructed.")
  # A zoom whose frames miss the flash is redone densely at its step; a wrong answer after seeing it is named.
  assert ask((zoom, miss), (wrong, None))[1:] == (0, expert.dense_zoom(0))
  _, step, cont = ask((zoom, flash), (wrong, None))
  assert step == 1 and cont == expert.answer(0, [float(f"{(a0 + a1) / 2:.2f}")])
  assert f"<answer>{rec['solution']}</answer>" in cont
  assert ask((wrong, None))[1:] == (0, expert.dense_zoom(0))  # answered without zooming
  assert f'"fps": {fps}' in expert.dense_zoom(0) and expert.problems == []


def test_smooth_is_a_trailing_mean():
  y = np.array([1.0, 3.0, 5.0, 7.0])
  np.testing.assert_allclose(plots._smooth(y, 2), [1.0, 2.0, 4.0, 6.0])


def test_training_curves_put_sft_r_after_the_sft_steps(tmp_path, monkeypatch):
  """SFT+R starts from the SFT model: its loss is drawn after the SFT steps (direct steps first), in its own
  colour with a legend; without its workdir, only the SFT curve."""
  def metrics(name, rows):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  metrics("sft_direct", [{"step": s, "loss": 2.0 / s} for s in range(1, 5)])
  metrics("sft", [{"step": s, "loss": 1.0 / s} for s in range(1, 11)])
  metrics("sft_r", [{"step": s, "loss": 0.05} for s in range(1, 4)])
  metrics("grpo", [{"step": s, "reward/mean": 0.5, "acc/mean": 0.5, "frames/mean": 8, "actor/kl_loss": 0.0}
                   for s in range(1, 3)])
  drawn, curve = [], plots._curve
  monkeypatch.setattr(plots, "_curve", lambda ax, x, y, c, label: (drawn.append((list(x), label)),
                                                                    curve(ax, x, y, c, label)))
  for sft_r in (str(tmp_path / "sft_r"), None):
    drawn.clear()
    png = plots.plot_training(str(tmp_path / "sft"), str(tmp_path / "grpo"), str(tmp_path / f"c{bool(sft_r)}.png"),
                              sft_direct_workdir=str(tmp_path / "sft_direct"), sft_r_workdir=sft_r)
    assert os.path.getsize(png) > 0
    assert drawn[0] == (list(range(1, 15)), "SFT" if sft_r else None)  # 4 direct steps, then 10
    if sft_r:
      assert drawn[1] == ([15.0, 16.0, 17.0], "SFT+R (from the SFT model)") and len(drawn) == 6
    else:
      assert len(drawn) == 5 and all(label is None for _, label in drawn)


def test_no_tool_flash_visible_counts_frames_in_the_window(tmp_path):
  from zoomer_jax.agent.protocol import ToolConfig
  tool = ToolConfig(max_generation_round=2, frames_upbound=4, tool_call_max_frames=2, max_total_frames=6)
  # budget 6 frames over 101 frames: linspace(0, 100, 6) -> 0, 20, 40, 60, 80, 100
  recs = [{"extra_info": {"n_frames": 101, "fps": 6.0, "answer_frames": w}} for w in ([41, 45], [38, 40], [61, 70])]
  path = tmp_path / "test.json"
  path.write_text(json.dumps(recs))
  assert pipeline.no_tool_flash_visible(str(path), tool) == pytest.approx(1 / 3)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
  """Every stage at toy size: the outputs exist and the report agrees with the JSONL trajectories."""
  cfg = load("demo:quick", [f"out_dir={tmp_path / 'demo'}"])
  report = pipeline.run_demo(cfg)
  out = tmp_path / "demo"
  for name in ("report.json", "table.txt", "training_curves.png", "trajectories.png", "sft/hf/config.json",
               "grpo/hf/config.json", "grpo/hf/tokenizer.json", "sft/metrics.jsonl", "grpo/metrics.jsonl"):
    assert (out / name).exists(), name
  on_disk = json.loads((out / "report.json").read_text())
  assert on_disk["results"] == json.loads(json.dumps(report["results"]))
  assert set(on_disk["times_s"]) >= {"data", "sft", "grpo", "eval_sft", "eval_grpo", "total"}
  n_test = cfg.data.n_test
  for name in ("sft", "grpo"):
    for mode in ("tool", "no_tool", "sampled"):
      lines = [json.loads(x) for x in (out / "eval" / f"{name}_{mode}.jsonl").read_text().splitlines()]
      res = on_disk["results"][name][mode]
      assert len(lines) == res["n"] == n_test * (cfg.eval.samples if mode == "sampled" else 1)
      if mode == "sampled":
        assert res["mode"] == f"tool@T{cfg.eval.temperature:g}x{cfg.eval.samples}"
        assert [x["sample"] for x in lines] == list(range(cfg.eval.samples)) * n_test
      assert res["accuracy"] == pytest.approx(np.mean([x["acc"] for x in lines]))
      assert res["mean_frames"] == pytest.approx(np.mean([x["frames"] for x in lines if x["error"] is None]))
      budget = cfg.tool.max_total_frames
      assert all(x["frames"] <= budget for x in lines)
      if mode == "no_tool":
        assert all(x["tool_calls"] == 0 for x in lines)
  # The SFT mix: each cold-start record direct_copies times as a direct trajectory, sparse_copies as a sparse one
  mix = json.loads(open(pipeline.data_paths(str(out))["sft_mix"]).read())
  kinds = [c["kind"] for c in mix]
  d = cfg.data
  assert (kinds.count("direct"), kinds.count("sparse")) == (d.n_sft * d.direct_copies, d.n_sft * d.sparse_copies)
  sft_cfg = json.loads((out / "sft" / "config.json").read_text())
  assert sft_cfg["data"]["train_files"][0].endswith("_mix_sft.json")
  # sft_direct_steps: a first job on the direct trajectories alone; the mix starts from its exported weights
  direct_cfg = json.loads((out / "sft_direct" / "config.json").read_text())
  assert direct_cfg["data"]["train_files"][0].endswith("sft_records_sft.json")
  assert sft_cfg["init"]["checkpoint"] == str(out / "sft_direct" / "hf")
  direct_steps = [json.loads(x)["step"] for x in (out / "sft_direct" / "metrics.jsonl").read_text().splitlines()]
  assert direct_steps == list(range(1, cfg.sft_direct_steps + 1))
  sft_steps = [json.loads(x)["step"] for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
  assert sft_steps == list(range(1, cfg.sft.train.total_steps - cfg.sft_direct_steps + 1))
  assert json.loads((out / "grpo" / "hf" / "demo_step.json").read_text())["step"] >= 1
  # A second run reuses the data and both checkpoints: no training step is repeated.
  again = pipeline.run_demo(load("demo:quick", [f"out_dir={out}", "stages=data,sft,grpo"]))
  assert again["times_s"]["sft"] < report["times_s"]["sft"]
  assert [json.loads(x)["step"] for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()] == sft_steps


@pytest.mark.slow
def test_quick_reflect_stage(tmp_path):
  """The reflect stage at toy size: reflection records from the SFT model's failures, SFT+R trained from the SFT
  model on the mix with them, and its rows (with tool calls per answer) in the report."""
  from zoomer_jax.data.jsonl_log import read_log
  cfg = load("demo:quick_reflect", [f"out_dir={tmp_path / 'demo'}", "stages=data,sft,reflect,eval",
                                    "eval.samples=0", "data.n_train=4", "data.n_sft=4", "data.n_sft_no_tool=0"])
  report = pipeline.run_demo(cfg)
  out = tmp_path / "demo"
  paths = pipeline.data_paths(str(out))
  reflections = read_log(paths["reflections"])
  assert report["reflect"]["accepted"] == len(reflections) >= 1
  assert all(r["kind"] == "reflection" and r["reflection"]["step"] >= 0 for r in reflections)
  sft_r = json.loads((out / "sft_r" / "config.json").read_text())
  assert sft_r["init"]["checkpoint"] == str(out / "sft" / "hf")
  assert sft_r["data"]["reflection_files"] == [paths["reflections"]]
  assert sft_r["data"]["reflection_ratio"] == cfg.reflect.ratio > 0
  assert json.loads((out / "sft_r" / "hf" / "demo_step.json").read_text())["step"] == cfg.reflect.sft_steps
  assert set(report["times_s"]) >= {"reflect", "sft_r", "eval_sft", "eval_sft_r"}
  rows = [line.split() for line in report["table"].splitlines()[2:]]
  assert [r[:2] for r in rows] == [["SFT", "tool"], ["SFT", "no_tool"], ["SFT+R", "tool"], ["SFT+R", "no_tool"]]
  for name in ("sft", "sft_r"):
    tool = report["results"][name]["tool"]
    lines = [json.loads(x) for x in (out / "eval" / f"{name}_tool.jsonl").read_text().splitlines()]
    answered = [x["tool_calls"] for x in lines if x["finish_reason"] == "answer"]
    assert tool["calls_per_answer"] == (pytest.approx(np.mean(answered)) if answered else None)


def test_fixed_options_with_four_classes():
  from zoomer_jax.data import synthetic as S
  p = S.VideoParams(n_classes=4, shuffle_options=False, min_seconds=60.0, max_seconds=60.0)
  for seed in range(20):
    plan = S.plan_video(np.random.default_rng(seed), p)
    assert plan.options == (0, 1, 2, 3)  # always A-D = the first four classes in CLASSES order
    assert plan.solution == "ABCD"[plan.answer.cls]
    assert all(d.cls < 4 for d in plan.distractors)
  with pytest.raises(ValueError, match="n_classes"):
    S.VideoParams(n_classes=3)


def test_no_tool_conversation_shows_the_baseline_frames(tmp_path):
  """The conversation's images are the frames the harness's no-tool baseline shows; it names the flashed object
  exactly when one of them falls inside the flash, else it guesses."""
  from zoomer_jax.agent.protocol import ToolConfig
  from zoomer_jax.data import synthetic as S
  from zoomer_jax.demo.no_tool_sft import generate_no_tool_sft
  from zoomer_jax.eval.harness import frame_budget
  tool = ToolConfig(max_generation_round=2, tool_call_max_frames=10, frames_upbound=12, max_total_frames=22)
  paths = S.generate(str(tmp_path), seed=0, n_train=6, n_val=0, n_test=0, tool_cfg=tool, height=56, width=56,
                     min_seconds=110.0, max_seconds=110.0, answer_seconds=4.0)
  convs = json.loads(open(generate_no_tool_sft(paths["train"], str(tmp_path / "sft"), tool_cfg=tool)).read())
  records = json.loads(open(paths["train"]).read())
  assert len(convs) == len(records)
  for conv, rec in zip(convs, records):
    info = rec["extra_info"]
    idx = np.linspace(0, info["n_frames"] - 1, frame_budget(tool)).astype(int)  # the harness's even spread
    assert len(conv["images"]) == len(idx) == conv["messages"][1]["content"].count("<image>")
    seen = bool(((idx >= info["answer_frames"][0]) & (idx <= info["answer_frames"][1])).any())
    assert conv["seen"] == seen
    reply = conv["messages"][2]["content"]
    assert conv["messages"][0]["content"].startswith("You are a helpful assistant")
    assert "zoom" not in conv["messages"][0]["content"]
    if seen:
      assert f"A {info['answer_class']} appears at " in reply and reply.endswith(f"<answer>{rec['solution']}</answer>")
    else:
      assert "guess" in reply
  assert any(c["seen"] for c in convs) and not all(c["seen"] for c in convs)
