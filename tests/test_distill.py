"""`distill` and `reflect` end to end against a scripted expert served over HTTP on loopback.

The expert is the package's (zoomer_jax/demo/scripted_expert.py) with a plan per task. It knows the synthetic
task's truth, finds the task from the first user turn (which must be exactly the rollout's text, frame tags and
question, with one image part per tag) and answers as the test planned for it (zooms then answers, answers
wrongly, writes a broken call, never answers, keeps zooming, HTTP 400, 429 with Retry-After then 500, 503 for
good). It counts requests per task, so resume is checked by what it was asked.
"""

import base64
import collections
import json

import cv2
import numpy as np
import pytest

from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.expert import content_parts, cut_turn
from zoomer_jax.agent.expert_api import ExpertAPI, ExpertError, ExpertSettings
from zoomer_jax.agent.rewards import judge
from zoomer_jax.config_loader import load
from zoomer_jax.data import load_records
from zoomer_jax.data import synthetic as S
from zoomer_jax.data.distill import run_distill
from zoomer_jax.data.jsonl_log import LogError, read_log
from zoomer_jax.data.mixture import MixedSource
from zoomer_jax.data.reflect import run_reflect
from zoomer_jax.demo.scripted_expert import ExpertServer as Server, ScriptedExpert, message_text, tag_times
from zoomer_jax.video import VideoReader, sample_overview, sample_zoom

TOOL = dict(max_generation_round=3, tool_call_max_frames=8, frames_upbound=16, video_fps=0.5, max_total_frames=40)
PLAN = {0: "zoom", 1: "direct", 2: "wrong", 3: "bad_json", 4: "no_answer", 5: "rounds", 6: "http400",
        7: "flaky", 8: "down"}
ACCEPTED = {0, 1, 7, 8}
REASONS = {2: "wrong_answer", 3: "tool_error", 4: "no_answer", 5: "round_limit", 6: "http_400"}


def _decode(url: str) -> np.ndarray:
  assert url.startswith("data:image/jpeg;base64,")
  img = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
  assert img is not None
  return img


class Expert(ScriptedExpert):
  """The package's scripted expert, answering each task as PLAN says; `down`: task indices answered 503 for
  good, `reflect`: task index -> (step, continuation or None for the package's correction)."""

  def __init__(self, records, tool: P.ToolConfig, key: str = ""):
    super().__init__(records, tool, key)
    self.down = set()
    self.reflect = {}

  def turn(self, i: int, r: int, chat: list) -> str | tuple:
    rec = self.records[i]
    wrong = "ABCD"[("ABCD".index(rec["solution"]) + 1) % 4]
    _decode(message_text(chat[1]["content"])[1][0])
    kind = PLAN.get(i, "zoom")
    if kind == "down" and i in self.down:
      return (503, {}, "overloaded")
    if kind in ("zoom", "flaky", "down"):
      if kind == "flaky" and self.requests[i] == 1:
        return (429, {"Retry-After": "1"}, "slow down")
      if kind == "flaky" and self.requests[i] == 2:
        return (500, {}, "oops")
      if r == 0:
        return super().turn(i, r, chat) + "\nand then I will answer <answer>Z</answer>"  # cut after the call
      text, urls = message_text(chat[-1]["content"])
      (s, e) = rec["extra_info"]["zoom"]["segment"]
      times = tag_times(text)
      if not (times and len(urls) == len(times) and all(s <= t <= e + 1e-6 for t in times)):
        self.problems.append(f"task {i}: zoom observation {text[:200]!r} with {len(urls)} images")
      return super().turn(i, r, chat)
    answer = f"<think>The object is option {rec['solution']}.</think>\n<answer>{rec['solution']}</answer>"
    if kind == "direct":
      return answer
    if kind == "wrong":
      return f"<think>Guessing.</think>\n<answer>{wrong}</answer>"
    if kind == "bad_json":
      if r == 0:
        return '<think>Zoom.</think>\n<video_zoom>{"segment": [1, }</video_zoom>'
      if "ERROR occurs" not in message_text(chat[-1]["content"])[0]:
        self.problems.append(f"task {i}: no error observation after a broken call")
      return answer
    if kind == "no_answer":
      return "<think>I cannot tell.</think>"
    if kind == "rounds":
      return self.dense_zoom(i)
    if kind == "http400":
      return (400, {}, "bad request: image too large")
    raise AssertionError(kind)

  def correction(self, i: int, text: str) -> tuple[str, int, str]:
    analysis, step, cont = super().correction(i, text)
    step, forced = self.reflect.get(i, (step, None))
    return analysis, step, forced or cont


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  root = tmp_path_factory.mktemp("distill")
  path = S.generate(str(root / "rl"), seed=3, n_train=len(PLAN), n_val=0, n_test=0,
                    tool_cfg=P.ToolConfig(**TOOL))["train"]
  return root, path, json.load(open(path))


def distill_config(out_dir, train, url, **over):
  cfg = load("distill")
  cfg.out_dir = str(out_dir)
  cfg.progress = False
  cfg.log_every = 2
  cfg.data.train_files = (train,)
  cfg.agent.update(TOOL)
  cfg.frames.update(dict(max_pixels=112 * 112, min_pixels=28 * 28))
  cfg.expert.update(dict(base_url=url, model="scripted-expert", api_key="k3y", backoff_s=0.01, max_backoff_s=0.05,
                         max_retries=3, concurrency=3, timeout_s=30.0))
  for k, v in over.items():
    section, _, key = k.rpartition(".")
    (cfg[section] if section else cfg)[key] = v
  return cfg


def test_distill_end_to_end_with_retries_rejections_and_resume(synth, tmp_path):
  root, train, records = synth
  expert = Expert(records, P.ToolConfig(**TOOL), key="k3y")
  out = tmp_path / "out"
  ids = [r["doc_id"] for r in records]
  with Server(expert) as server:
    # A first run stopped after 4 tasks (as a killed run leaves it).
    s1 = run_distill(distill_config(out, train, server.url, **{"data.limit": 4}))
    assert s1["attempts"] == 4 and expert.requests.keys() == {0, 1, 2, 3}
    first = dict(expert.requests)
    expert.down = {8}
    s2 = run_distill(distill_config(out, train, server.url))
    assert all(expert.requests[i] == first[i] for i in first), "a finished task was asked again"
    assert s2["skipped_done"] == 4 and s2["attempts"] == len(PLAN)
    attempts = {a["task_id"]: a for a in read_log(str(out / "attempts.jsonl"))}
    assert attempts[ids[8]]["reason"] == "http_503" and expert.requests[8] == 4  # 1 + max_retries
    assert attempts[ids[7]]["usage"]["retries"] == 2 and expert.requests[7] == 4  # 429, 500, zoom, answer
    t7 = [t for i, t in expert.times if i == 7]
    assert t7[1] - t7[0] >= 0.99, "Retry-After: 1 not honoured"

    # A kill mid-write: a torn attempt line, and an accepted attempt whose record line never made it.
    with open(out / "attempts.jsonl", "a") as f:
      f.write('{"key": "torn')
    lines = open(out / "records.jsonl").read().splitlines(keepends=True)
    lost = json.loads(lines[-1])["id"]
    open(out / "records.jsonl", "w").write("".join(lines[:-1]))
    before = dict(expert.requests)
    expert.down = set()
    s3 = run_distill(distill_config(out, train, server.url))
  assert not expert.problems, expert.problems
  # Only the attempt that failed on the endpoint is run again (retry_failed), now accepted.
  assert {i for i in expert.requests if expert.requests[i] != before.get(i, 0)} == {8}
  assert s3["restored_records"] == 1 and s3["finished_this_run"] == 1

  attempts = {}
  for a in read_log(str(out / "attempts.jsonl")):
    attempts[a["task_id"]] = a
  assert len(attempts) == len(PLAN)
  for i, rid in enumerate(ids):
    a = attempts[rid]
    assert (a["status"] == "accepted") == (i in ACCEPTED), (i, a["reason"])
    if i in REASONS:
      assert a["reason"] == REASONS[i], (i, a["reason"], a["error"])
    if a["turns"]:  # the recorded verdict is the judge's
      assert a["acc"] == judge(a["turns"], records[i]["solution"], "multiple_choice")
  assert "the call is not valid JSON" in attempts[ids[3]]["calls"][0]["error"]
  assert attempts[ids[5]]["rounds"] == TOOL["max_generation_round"]
  assert attempts[ids[0]]["turns"][0].endswith("</video_zoom>")  # the reply was cut after the call
  summary = json.load(open(out / "summary.json"))
  assert summary["accepted"] == len(ACCEPTED) and summary["reasons"]["wrong_answer"] == 1
  assert summary["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in attempts.values()) > 0
  metrics = read_log(str(out / "metrics.jsonl"))
  assert metrics[-1]["final"] and metrics[-1]["accepted"] == len(ACCEPTED)

  # The records: one per accepted attempt (the lost one restored), read by the SFT reader, frames ours.
  rows = read_log(str(out / "records.jsonl"))
  assert sorted(r["id"] for r in rows) == sorted(f"{ids[i]}#0" for i in ACCEPTED) and lost in [r["id"] for r in rows]
  sft = {r.id: r for r in load_records(str(out / "records.jsonl"), kind="sft")}
  tool = P.ToolConfig(**TOOL)
  for i in ACCEPTED:
    rec, r = sft[f"{ids[i]}#0"], records[i]
    assert rec.messages[0]["content"] == P.system_prompt(tool)
    with VideoReader(r["videos"][0]) as reader:
      ov, ts = sample_overview(reader.meta, tool.video_fps, tool.frames_upbound)
      assert rec.messages[1]["content"] == P.user_prompt(r["problem"], ts)
      frames = list(reader.frames(ov))
      if PLAN[i] != "direct":
        (s, e), fps = r["extra_info"]["zoom"]["segment"], r["extra_info"]["zoom"]["fps"]
        zidx, _ = sample_zoom(reader.meta, s, e, fps)
        frames += list(reader.frames(zidx))
    assert len(rec.images) == len(frames)
    for path, frame in zip(rec.images, frames):
      assert np.array_equal(cv2.imread(path)[..., ::-1], frame)  # lossless, cut by our tools


def test_expert_api_errors_settings_and_parts(synth):
  _, _, records = synth
  expert = Expert(records, P.ToolConfig(**TOOL), key="right")
  with Server(expert) as server:
    api = ExpertAPI(ExpertSettings(base_url=server.url, model="m", api_key="wrong", max_retries=0))
    with pytest.raises(ExpertError, match="http_401: bad key"):
      api.chat([{"role": "user", "content": "hi"}], max_tokens=8, temperature=0.0)
    assert api.stats["requests"] == 1 and api.stats["failed"] == 1
  dead = ExpertAPI(ExpertSettings(base_url=server.url, model="m", max_retries=2, backoff_s=0.0, timeout_s=2.0))
  with pytest.raises(ExpertError, match="connection: gave up after 3 tries"):
    dead.chat([], max_tokens=8, temperature=0.0)
  assert dead.stats["retries"] == 2

  class Section(dict):
    __getattr__ = dict.__getitem__
  section = Section(base_url="", model="", api_key="", timeout_s=5, max_retries=1, backoff_s=0.1, max_backoff_s=1)
  env = {"OPENAI_BASE_URL": "http://h:1/v1/", "OPENAI_API_KEY": "e", "ZOOMER_EXPERT_MODEL": "envmodel"}
  s = ExpertSettings.resolve(section, env)
  assert (s.base_url, s.api_key, s.model) == ("http://h:1/v1", "e", "envmodel")
  s = ExpertSettings.resolve(Section(section, model="cfgmodel", base_url="https://x/v1"), env)
  assert (s.base_url, s.model) == ("https://x/v1", "cfgmodel")  # the config wins
  with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
    ExpertSettings.resolve(section, {})
  with pytest.raises(ValueError, match="ZOOMER_EXPERT_MODEL"):
    ExpertSettings.resolve(section, {"OPENAI_BASE_URL": "http://h/v1"})

  parts = content_parts("a<image>b<image>", ["u1", "u2"])
  assert parts == [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u1"}},
                   {"type": "text", "text": "b"}, {"type": "image_url", "image_url": {"url": "u2"}}]
  with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
    content_parts("a<image>", ["u1", "u2"])
  assert cut_turn("x</video_zoom> y</video_zoom>", ("zoom",)) == "x</video_zoom>"
  assert cut_turn("no call", ("zoom",)) == "no call"


def test_read_log_cuts_a_torn_tail_and_refuses_a_broken_middle(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
  assert read_log(str(p)) == [{"a": 1}, {"b": 2}] and p.read_text() == '{"a": 1}\n{"b": 2}\n'
  p.write_text('{"a": 1}\n{"b": 2}')
  assert read_log(str(p)) == [{"a": 1}, {"b": 2}] and p.read_text() == '{"a": 1}\n{"b": 2}\n'
  p.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
  with pytest.raises(LogError, match="line 2 is not a JSON object"):
    read_log(str(p))


def test_reflect_corrects_the_tiny_models_failures_and_verifies_them(synth, tmp_path):
  _, train, records = synth
  expert = Expert(records, P.ToolConfig(**TOOL))
  expert.reflect = {1: (5, None)}  # task 1: a step the model never took
  out = tmp_path / "reflect"
  ids = [r["doc_id"] for r in records]
  with Server(expert) as server:
    cfg = load("reflect:tiny")
    cfg.out_dir, cfg.progress = str(out), False
    cfg.data.train_files, cfg.data.limit = (train,), 3
    cfg.agent.update(TOOL)
    cfg.rollout.update(dict(max_new_tokens=12, decode_chunk=12))
    cfg.expert.update(dict(base_url=server.url, model="scripted-expert", backoff_s=0.01, concurrency=2))
    s1 = run_reflect(cfg)
    asked = dict(expert.requests)
    s2 = run_reflect(cfg)  # everything is done: nothing is run or asked again
  assert not expert.problems, expert.problems
  assert expert.requests == asked and s2["finished_this_run"] == 0
  assert len(read_log(str(out / "rollouts.jsonl"))) == 3
  attempts = {a["task_id"]: a for a in read_log(str(out / "attempts.jsonl"))}
  # The random model fails every task; task 0 is corrected (zoom, then the right answer), task 1's reply names
  # a step the model never took, task 2's expert zooms and then answers wrongly.
  assert s1["attempts"] == 3 and all(a["model_answer"] != records[i]["solution"] for i, a in
                                     enumerate(attempts[k] for k in ids[:3]))
  assert attempts[ids[0]]["status"] == "accepted", attempts[ids[0]]["reason"]
  assert "without having seen the object" in attempts[ids[0]]["reflection"]["analysis"]
  assert attempts[ids[1]]["reason"] == "bad_reflection" and "<step> must be" in attempts[ids[1]]["error"]
  assert attempts[ids[2]]["reason"] == "wrong_answer"
  for i in (0, 2):  # the request showed the model's trajectory, not the answer
    text = expert.reflections[i]
    assert "[step 0: the agent]" in text and "The correct answer" not in text
  (rec,) = load_records(str(out / "records.jsonl"), kind="sft")
  (raw,) = read_log(str(out / "records.jsonl"))
  assert raw["kind"] == "reflection" and raw["reflection"]["step"] == 0 and not raw["reflection"]["answer_revealed"]
  roles = [m["role"] for m in rec.messages]
  assert roles == ["system", "user", "assistant", "user", "assistant"]
  assert rec.messages[2]["content"] == expert.dense_zoom(0)  # the correction, as turn 0
  r = records[0]
  (s, e), fps = r["extra_info"]["zoom"]["segment"], r["extra_info"]["zoom"]["fps"]
  with VideoReader(r["videos"][0]) as reader:
    ov, _ = sample_overview(reader.meta, TOOL["video_fps"], TOOL["frames_upbound"])
    frames = list(reader.frames(ov)) + list(reader.frames(sample_zoom(reader.meta, s, e, fps)[0]))
  assert len(rec.images) == len(frames)
  assert all(np.array_equal(cv2.imread(p)[..., ::-1], f) for p, f in zip(rec.images, frames))  # the tool's frames


def test_mixed_source_holds_the_ratio_in_every_stretch():
  ex, re_ = [("e", k) for k in range(30)], [("r", k) for k in range(7)]
  src = MixedSource(ex, re_, ratio=0.25, seed=1)
  assert src.m == 10 and len(src) == 40
  items = [src[i] for i in range(len(src))]
  assert sorted(x for x in items if x[0] == "e") == ex  # every exemplar once
  refl = [x for x in items if x[0] == "r"]
  assert len(refl) == 10 and max(collections.Counter(refl).values()) - min(collections.Counter(refl).values()) <= 1
  flags = np.array([x[0] == "r" for x in items])
  for length in range(1, 41):  # every prefix holds its share, to one record
    assert abs(flags[:length].sum() - 0.25 * length) <= 1
  assert MixedSource(ex, [], 0.0).m == 0
  with pytest.raises(ValueError, match=r"reflection_ratio must be in \[0, 1\)"):
    MixedSource(ex, re_, 1.0)
  with pytest.raises(ValueError, match="there are none"):
    MixedSource(ex, [], 0.5)
  with pytest.raises(IndexError, match="outside the mixture's 40 records"):
    src[40]


def _sft_file(path, prefix: str, n: int) -> str:
  with open(path, "w") as f:
    for k in range(n):
      f.write(json.dumps({"id": f"{prefix}{k}", "messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": f"a{k}"}]}) + "\n")
  return str(path)


def test_the_sft_pipeline_mixes_reflections_at_the_ratio(tmp_path):
  from zoomer_jax.train.jobs import JobContext
  cfg = load("sft_tiny")
  cfg.workdir = str(tmp_path / "work")
  cfg.data.train_files = (_sft_file(tmp_path / "ex.jsonl", "ex", 45),)
  cfg.data.reflection_files = (_sft_file(tmp_path / "re.jsonl", "re", 4),)
  cfg.data.reflection_ratio = 0.1
  ctx = JobContext(cfg, kind="sft")
  source = ctx.sft_source("train")
  assert len(source) == 50
  stream = ctx.iterator(source, seed=3)
  ids = [next(stream).id for _ in range(100)]  # two shuffled epochs
  for epoch in (ids[:50], ids[50:]):
    assert sum(i.startswith("re") for i in epoch) == 5 and len({i for i in epoch if i.startswith("ex")}) == 45
  cfg.data.reflection_ratio = 0.0
  with pytest.raises(ValueError, match="go together"):
    JobContext(cfg, kind="sft").sft_source("train")


def test_the_scripted_expert_tells_tasks_with_the_same_first_turn_apart_by_their_images(tmp_path):
  """With the demo's videos (one duration, options in a fixed order) every task has the same first turn: the
  expert then picks the task whose overview frames the request's JPEGs show."""
  from zoomer_jax.agent.expert import ExpertTurns, jpeg_url
  tool = P.ToolConfig(**TOOL)
  path = S.generate(str(tmp_path), seed=5, n_train=4, n_val=0, n_test=0, tool_cfg=tool, height=56, width=56,
                    min_seconds=40.0, max_seconds=40.0, n_classes=4, shuffle_options=False)["train"]
  records = json.load(open(path))
  expert = ScriptedExpert(records, tool)
  assert len(expert.by_prompt) == 1 and len({r["solution"] for r in records}) > 1
  turns = ExpertTurns(tool=tool, max_pixels=112 * 112, min_pixels=28 * 28)
  for i in (2, 0, 3, 1):
    idx, ts = expert.overview[i]
    with VideoReader(records[i]["videos"][0]) as reader:
      urls = [jpeg_url(f, turns) for f in reader.frames(idx)]
    chat = [{"role": "system", "content": P.system_prompt(tool)},
            {"role": "user", "content": content_parts(P.user_prompt(records[i]["problem"], ts), urls)}]
    status, _, body = expert.reply({"messages": chat})
    assert status == 200 and body["choices"][0]["message"]["content"] == expert.dense_zoom(i)
    assert expert.requests[i] == 1, dict(expert.requests)
  assert not expert.problems


def test_parse_correction_takes_an_unclosed_continuation_to_the_reply_end():
  from zoomer_jax.data.reflect import parse_correction
  zoom = '<video_zoom>{"segment": [1, 2], "fps": 2}</video_zoom>'
  full = parse_correction(f"<analysis>a</analysis><step>1</step><continuation>{zoom}</continuation> tail", 3)
  assert (full.analysis, full.step, full.continuation) == ("a", 1, zoom)
  # an expert that stops after the call's closing tag (serve's turn model), or at a `stop` of "</continuation>"
  cut = parse_correction(f"<analysis>a</analysis>\n<step>0</step>\n<continuation>{zoom}", 3)
  assert (cut.step, cut.continuation) == (0, zoom)
  with pytest.raises(ValueError, match="lacks <step>"):
    parse_correction(f"<analysis>a</analysis><continuation>{zoom}", 3)
  with pytest.raises(ValueError, match="is empty"):
    parse_correction("<analysis>a</analysis><step>0</step><continuation>  ", 3)
