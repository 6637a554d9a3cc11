"""The multi-turn agent: scripted zoom calls pause and resume each sequence on its own, observations and frames
are appended to the same cache, and the recorded log-probs equal one teacher-forced forward."""

import jax
import numpy as np
import pytest
from flax import nnx

import media
import tolerances as tol
from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.rollout import AgentConfig, Task, rollout
from zoomer_jax.config_loader import load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.sampling import SamplingParams
from zoomer_jax.text import build_tiny_tokenizer
from zoomer_jax.video import VideoReader, sample_zoom

SMALL = 56 * 56  # frames of 56x56: 4 tokens each, to keep the test quick


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model)
  return Qwen25VL(cfg, rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  return media.write_video(str(tmp_path_factory.mktemp("v") / "v.mp4"), 200, 10.0, (64, 80))


def _config(**tool):
  return AgentConfig(tool=P.ToolConfig(**tool), sampling=SamplingParams(temperature=1.0, max_new_tokens=40),
                     decode_chunk=16, max_pixels=SMALL, min_pixels=SMALL, workers=2)


SCRIPT = {
    0: ['<think>the overview is too coarse</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>',
        '<think>again</think><video_zoom>{"segment": [2, 4], "fps": </video_zoom>',
        '<think>the end</think><video_zoom>{"segment": [18, 25], "fps": 1}</video_zoom>',
        "<think>seen it</think><answer>B</answer><|im_end|>"],
    1: ["<think>easy</think><answer>A</answer><|im_end|>"],
}


def _teacher_forced(model, traj):
  logits = np.asarray(model(traj.ids[None], pixel_values=traj.pixel_values, image_grid_thw=traj.image_grid_thw),
                      np.float64)[0]
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return logp[np.arange(len(traj.ids) - 1), traj.ids[1:]]  # logp[i] scores token i + 1


def test_scripted_rollout_pauses_resumes_and_agrees_with_teacher_forcing(model, video, tmp_path, measure):
  tok = build_tiny_tokenizer()
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "t0"),
           Task(video, "<image>\nIs there a square? A. yes B. no", "A", "t1"),
           Task(str(tmp_path / "missing.mp4"), "<image>\nAnything?", "A", "t2")]
  events = []
  out = rollout(model, tok, tasks, _config(), jax.random.key(3), on_event=lambda *e: events.append(e),
                script=lambda row, rnd: SCRIPT.get(row, [None] * 9)[rnd] if rnd < len(SCRIPT.get(row, [])) else None)
  t0, t1, t2 = out
  # The failing video is reported for its task only.
  assert t2.finish_reason == "video_error" and "missing.mp4" in t2.calls[0]["error"]

  assert (t0.answer, t0.finish_reason, t0.rounds) == ("B", "answer", 4)
  assert (t1.answer, t1.finish_reason, t1.rounds) == ("A", "answer", 1)
  assert [("error" in c) for c in t0.calls] == [False, True, False]
  meta = VideoReader(video).meta
  _, ts = sample_zoom(meta, 2, 4, 2)
  assert t0.calls[0]["frames"] == 4 and t0.calls[0]["timestamps"] == [round(float(t), 3) for t in ts]
  assert "not valid JSON" in t0.calls[1]["error"]
  assert t0.calls[2]["clamped"] == [18.0, 20.0] and t0.calls[2]["frames"] == 7
  assert t0.n_frames == 10 + 4 + 7 and t1.n_frames == 10
  text = tok.decode(t0.ids.tolist())
  assert text.count("<tool_response>") == 3 and text.count("</tool_response>") == 3
  assert "clamped to [18.00, 20.00]" in text and "Error Information:" in text

  for traj in (t0, t1):
    ids, mask = traj.ids, traj.response_mask.astype(bool)
    assert not np.isin(ids[mask], [tok.image_pad, tok.video_pad]).any()  # no vision token is a model token
    assert (ids == tok.image_pad).sum() == sum(int(np.prod(g)) // 4 for g in traj.image_grid_thw)
    generated = tok.decode(ids[mask].tolist())
    for turn in SCRIPT[int(traj.task.id[1])]:
      assert turn.replace("<|im_end|>", "") in generated
    want = _teacher_forced(model, traj)[np.flatnonzero(mask) - 1]
    diff = float(np.abs(want - traj.logprobs[mask]).max())
    measure(f"{traj.task.id}_logprob_vs_teacher_forced", diff)
    assert diff <= tol.LOGPROB_FP32
    assert (traj.logprobs[~mask] == 0).all()
  kinds = [e[0] for e in events]
  assert kinds.count("zoom") == 2 and kinds.count("tool_error") == 1 and kinds.count("final") == 2


def test_unscripted_rollout_ends_and_keeps_budgets(model, video):
  """The random tiny model writes noise: every trajectory still ends within the round and token limits."""
  tok = build_tiny_tokenizer()
  out = rollout(model, tok, [Task(video, "<image>\nWhat happens?")] * 2, _config(max_generation_round=2),
                jax.random.key(0))
  for traj in out:
    assert traj.finish_reason in ("no_call", "answer", "round_limit")
    assert 1 <= traj.rounds <= 2 and traj.n_frames <= 128
    assert traj.response_mask.sum() <= 2 * 40 + 2


def test_rollout_on_the_8_device_mesh_equals_one_device(model, video, tmp_path, measure):
  """The same scripted rollout with the model sharded over (data 2, fsdp 2, tensor 2)."""
  import zoomer_jax
  from zoomer_jax.parallel.mesh import make_mesh
  tok = build_tiny_tokenizer()
  mesh = make_mesh((2, 2, 2))
  sharded = zoomer_jax.load_hf(zoomer_jax.export_hf(model, tmp_path / "m"), mesh=mesh)
  assert any(not v.sharding.is_fully_replicated for v in jax.tree.leaves(nnx.state(sharded, nnx.Param)))
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "t0"),
           Task(video, "<image>\nIs there a square? A. yes B. no", "A", "t1")]
  script = lambda row, rnd: SCRIPT[row][rnd] if rnd < len(SCRIPT[row]) else None
  want = rollout(model, tok, tasks, _config(), jax.random.key(3), script=script)
  with jax.set_mesh(mesh):
    got = rollout(sharded, tok, tasks, _config(), jax.random.key(3), script=script)
  for a, b in zip(want, got):
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.response_mask, b.response_mask)
    assert a.calls == b.calls and a.answer == b.answer
    diff = float(np.abs(a.logprobs - b.logprobs).max())
    measure(f"{a.task.id}_sharded_logprob_diff", diff)
    assert diff <= tol.LOGPROB_FP32


def test_no_recompilation_across_turns_after_warm_up(model, video):
  """A 4-round rollout compiles its programs; a second one whose turns and observations have other lengths
  and frame counts (within the same buckets) compiles nothing new."""
  from zoomer_jax.sampling import sampler
  tok = build_tiny_tokenizer()
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue"), Task(video, "<image>\nWhere?")]
  first = {0: ['<think>a</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>',
               '<think>b</think><video_zoom>{"segment": [5, 8], "fps": 1}</video_zoom>',
               '<think>c c c</think><video_zoom>{"segment": [1, 2], "fps": 3}</video_zoom>',
               "<think>d</think><answer>B</answer><|im_end|>"],
           1: ['<think>x</think><video_zoom>{"segment": [0, 1], "fps": 4}</video_zoom>',
               "<think>y</think><answer>A</answer><|im_end|>"]}
  second = {0: ['<think>other words here</think><video_zoom>{"segment": [10, 11.5], "fps": 2}</video_zoom>',
                '<think>z</think><video_zoom>{"segment": [3, 6], "fps": 1.5}</video_zoom>',
                '<think>q</think><video_zoom>{"segment": [12, 13], "fps": 1}</video_zoom>',
                "<think>so</think><answer>A</answer><|im_end|>"],
            1: ['<think>p</think><video_zoom>{"segment": [4, 5], "fps": 5}</video_zoom>',
                '<think>p</think><video_zoom>{"segment": [6, 7], "fps": 2}</video_zoom>',
                "<think>r</think><answer>B</answer><|im_end|>"]}
  cfg = _config()
  for script in (first, second):
    before = dict(sampler.TRACES)
    out = rollout(model, tok, tasks, cfg, jax.random.key(1),
                  script=lambda row, rnd, s=script: s[row][rnd] if rnd < len(s[row]) else None)
    assert out[0].rounds == 4 and all(t.answer for t in out)
    grown = {k: sampler.TRACES[k] - before[k] for k in before}
  assert sampler.TRACES["step"] > 0 and sampler.TRACES["decode"] > 0  # the counters do count
  assert grown == {"step": 0, "decode": 0}, grown  # the second rollout compiled nothing


def test_each_video_is_indexed_once_and_errors_hide_its_path(model, video, tmp_path, monkeypatch):
  """Overview and every zoom of a rollout share one reader per file (one time-index scan each, however many
  rows and calls); a clip that cannot be decoded is an error observation that does not show the file's path."""
  from zoomer_jax.video import reader as reader_module
  scans = []
  real = reader_module.read_timeline
  monkeypatch.setattr(reader_module, "read_timeline", lambda path: scans.append(path) or real(path))
  torn = media.write_torn_mjpeg(str(tmp_path / "torn_secret_dir_name.avi"), range(25, 35))
  script = {0: ['<video_zoom>{"segment": [2.5, 3.5], "fps": 4}</video_zoom>',
                '<video_zoom>{"segment": [5, 7], "fps": 2}</video_zoom>', "<answer>A</answer><|im_end|>"],
            1: ['<video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>', "<answer>A</answer><|im_end|>"],
            2: ['<video_zoom>{"segment": [6, 8], "fps": 2}</video_zoom>', "<answer>B</answer><|im_end|>"]}
  tasks = [Task(torn, "<image>\nQ?", "A", "torn"), Task(video, "<image>\nQ?", "A", "a"),
           Task(video, "<image>\nQ?", "B", "b")]
  tok = build_tiny_tokenizer()
  out = rollout(model, tok, tasks, _config(), jax.random.key(1),
                script=lambda row, rnd: script[row][rnd] if rnd < len(script[row]) else None)
  assert sorted(scans) == sorted([torn, video])
  assert [t.finish_reason for t in out] == ["answer"] * 3
  bad = out[0].calls[0]
  assert "torn_secret_dir_name.avi" in bad["error"] and "frames" not in bad  # the log keeps the path
  text = tok.decode(out[0].ids.tolist())
  assert "Error:" in text and "torn_secret_dir_name" not in text and str(tmp_path) not in text
  assert out[0].calls[1].get("frames") == 4, out[0].calls[1]
  assert all(5 <= t <= 7 for t in out[0].calls[1]["timestamps"])
