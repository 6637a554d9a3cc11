"""Cold-start SFT trajectories: the rollout's exact texts, the original's format rule, budgets, and frames whose
pixels show what the think texts say."""

import json
import os
import re

import cv2
import numpy as np
import pytest

from test_synthetic import objects
from zoomer_jax.agent import protocol as P
from zoomer_jax.data import cold_start as C
from zoomer_jax.data import load_records
from zoomer_jax.data import synthetic as S
from zoomer_jax.text import build_tiny_tokenizer, render_messages
from zoomer_jax.video import VideoReader, read_meta, sample_overview, sample_zoom

CFG = P.ToolConfig()
N = 8
TAG = re.compile(r"<frame(\d+)_time(\d+\.\d\d)s><image>")


def format_reward(turns: list[str], max_frames: int) -> int:
  """The original's binary format rule (docs/training.md, Rewards), written from its description."""
  for t in turns[:-1]:
    t = t.strip()
    if not re.match(r"^<think>.*</think>.*<video_zoom>.*</video_zoom>", t, re.S):
      return 0
    if t.count("<video_zoom>") != 1 or t.count("</video_zoom>") != 1 or "<answer>" in t or "</answer>" in t:
      return 0
    body = re.search(r"<video_zoom>(.*?)</video_zoom>", t, re.S).group(1)
    try:
      call = json.loads(re.search(r"\{.*?\}", body).group())
      start, end, fps = float(call["segment"][0]), float(call["segment"][1]), float(call["fps"])
    except (AttributeError, ValueError, KeyError, TypeError):
      return 0
    if int(fps * (end - start)) > max_frames:
      return 0
  last = turns[-1].strip()
  ok = re.match(r"^<think>.*</think>.*<answer>.*</answer>$", last, re.S)
  return int(bool(ok) and last.count("<answer>") == 1 and last.count("</answer>") == 1
             and "<video_zoom>" not in last)


def rgb(path: str) -> np.ndarray:
  img = cv2.imread(path, cv2.IMREAD_COLOR)
  assert img is not None, path
  return img[..., ::-1]


def calls_of(conv) -> list[tuple[tuple[float, float], float]]:
  out = []
  for m in conv["messages"]:
    if m["role"] == "assistant":
      for body in P.find_calls(m["content"]):
        obj = json.loads(body)
        out.append(((obj["segment"][0], obj["segment"][1]), obj["fps"]))
  return out


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
  root = tmp_path_factory.mktemp("cold")
  rl = S.generate(str(root / "rl"), seed=7, n_train=N, n_val=0, n_test=0)["train"]
  path = C.generate_sft(rl, str(root / "sft"), seed=0, reflection_fraction=0.5, tool_cfg=CFG)
  return root, rl, path, json.load(open(rl)), json.load(open(path))


def test_conversations_are_the_rollout_texts_with_one_png_per_image(sft):
  _, _, path, records, convs = sft
  assert os.path.basename(path) == "train_sft.json" and len(convs) == N
  assert [r.id for r in load_records(path, kind="sft")] == [c["id"] for c in convs]  # the SFT reader takes it
  tok = build_tiny_tokenizer()
  for r, conv in zip(records, convs):
    assert set(conv) == {"messages", "images", "id", "kind"} and conv["id"] == r["doc_id"]
    msgs = conv["messages"]
    roles = [m["role"] for m in msgs]
    turns = 2 if conv["kind"] == "direct" else 3
    assert roles == ["system", "user"] + ["assistant", "user"] * (turns - 1) + ["assistant"]
    assert msgs[0]["content"] == P.system_prompt(CFG)
    meta = read_meta(r["videos"][0])
    _, ts = sample_overview(meta, CFG.video_fps, CFG.frames_upbound)
    assert msgs[1]["content"] == P.user_prompt(r["problem"], ts)
    text = "".join(m["content"] for m in msgs)
    assert text.count("<image>") == len(TAG.findall(text)) == len(conv["images"]) <= CFG.max_total_frames
    assert all(os.path.isfile(p) and p.endswith(".png") for p in conv["images"])
    rendered = render_messages(tok, msgs, image_tokens=[4] * len(conv["images"]), add_generation_prompt=False)
    assert rendered.n_images == len(conv["images"])
    for m in msgs[3::2]:  # tool responses: the rollout's observation body
      assert m["content"].startswith("<tool_response>\n" + P.FRAMES_HEADER) and m["content"].endswith(P.CONTINUE)


def test_assistant_turns_pass_the_original_format_rule_and_the_protocol_replays_them(sft):
  _, _, _, records, convs = sft
  for r, conv in zip(records, convs):
    msgs = conv["messages"]
    turns = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert format_reward(turns, CFG.tool_call_max_frames) == 1, turns
    meta = read_meta(r["videos"][0])
    ep = P.Episode(CFG, meta.duration, len(sample_overview(meta)[0]))
    for k, turn in enumerate(turns):
      out = ep.step(turn)
      if k < len(turns) - 1:
        assert isinstance(out, P.ZoomCall) and not out.clamped and out.n_frames <= CFG.tool_call_max_frames
        _, ts = sample_zoom(meta, *out.requested, out.fps)
        obs = msgs[2 + 2 * k + 1]["content"]
        assert [float(t) for _, t in TAG.findall(obs)] == [round(float(t), 2) for t in ts]
        assert ep.observation(ts) == P.TURN_OPEN + obs + P.TURN_CLOSE
      else:
        assert isinstance(out, P.Final) and out.answer == r["solution"]


def test_frames_show_what_the_thinks_say(sft):
  _, _, _, records, convs = sft
  border = S.VideoParams().border
  for r, conv in zip(records, convs):
    info = r["extra_info"]
    answer = info["options"]["ABCD".index(r["solution"])]
    msgs, images = conv["messages"], conv["images"]
    with VideoReader(r["videos"][0]) as reader:
      ov, ts = sample_overview(reader.meta)
      assert all(np.array_equal(rgb(p), f) for p, f in zip(images, reader.frames(ov)))  # lossless, same indices
    tags = [f"{t:.2f}" for t in ts]
    # The first think names the overview frames that show the border (read from the PNGs) and the
    # segment ends are the tags around them.
    bordered = [t for t, p in zip(tags, images) if (np.abs(rgb(p)[:2].astype(int) - S.CUE_RGB).max(-1) < 45).all()]
    first = msgs[2]["content"]
    assert bordered and all(f"{t}s" in first for t in bordered)
    (s, e), _ = calls_of(conv)[-1]
    assert f"{s:.2f}" == tags[tags.index(bordered[0]) - 1] and f"{e:.2f}" == tags[tags.index(bordered[-1]) + 1]
    # Each zoom's PNGs: the miss shows nothing, the last zoom shows the answer exactly at the times named.
    pos = len(ov)
    for k in range(len(calls_of(conv))):
      obs = msgs[3 + 2 * k]["content"]
      times = [t for _, t in TAG.findall(obs)]
      shown = [objects(rgb(p), border) for p in images[pos:pos + len(times)]]
      pos += len(times)
      assert all(x <= {answer} for x in shown)
      if k < len(calls_of(conv)) - 1:
        assert not any(shown), (conv["id"], shown)
      else:
        named = re.findall(r"(\d+\.\d\d)s", msgs[-1]["content"].split("</think>")[0])
        assert named and named == [t for t, x in zip(times, shown) if answer in x], (named, times, shown)
        assert f"A {answer} appears at " in msgs[-1]["content"]
        assert msgs[-1]["content"].endswith(f"That is option {r['solution']}.</think>\n<answer>{r['solution']}</answer>")
    assert pos == len(images)


def test_reflections_miss_first_then_zoom_on_the_cue(sft):
  _, _, _, records, convs = sft
  kinds = [c["kind"] for c in convs]
  assert kinds.count("reflection") == round(0.5 * N)
  for r, conv in zip(records, convs):
    calls = calls_of(conv)
    info = r["extra_info"]
    a = tuple(info["answer_frames"])
    meta = read_meta(r["videos"][0])
    last = sample_zoom(meta, *calls[-1][0], calls[-1][1])[0]
    assert S.hits(last, a) >= 1
    if conv["kind"] == "direct":
      assert len(calls) == 1
      continue
    assert len(calls) == 2
    (ws, we), fps = calls[0]
    assert S.hits(sample_zoom(meta, ws, we, fps)[0], a) == 0
    assert ws >= calls[1][0][0] and we <= calls[1][0][1] and we - ws < calls[1][0][1] - calls[1][0][0]
    assert f"No object appears in the frames from {ws:.2f}s to {we:.2f}s" in conv["messages"][4]["content"]


def test_same_seed_same_files_other_seed_other_choices(sft, tmp_path):
  root, rl, path, _, convs = sft
  again = C.generate_sft(rl, str(tmp_path / "a"), seed=0, reflection_fraction=0.5)
  assert open(again).read().replace(str(tmp_path / "a"), "ROOT") == \
      open(path).read().replace(str(root / "sft"), "ROOT")
  for conv in json.load(open(again)):
    for p in conv["images"]:
      assert open(p, "rb").read() == open(p.replace(str(tmp_path / "a"), str(root / "sft")), "rb").read()
  stamps = [os.stat(p).st_mtime_ns for p in [again] + [q for c in json.load(open(again)) for q in c["images"]]]
  C.generate_sft(rl, str(tmp_path / "a"), seed=0, reflection_fraction=0.5)  # a rerun rewrites nothing
  assert stamps == [os.stat(p).st_mtime_ns for p in [again] + [q for c in json.load(open(again)) for q in c["images"]]]
  other = json.load(open(C.generate_sft(rl, str(tmp_path / "b"), seed=1, reflection_fraction=0.5)))
  assert [c["kind"] for c in other] != [c["kind"] for c in convs]
  assert [c["kind"] for c in json.load(open(C.generate_sft(rl, str(tmp_path / "c"), reflection_fraction=0)))] \
      == ["direct"] * N


def test_bad_input_is_named(sft, tmp_path):
  _, _, _, records, _ = sft
  bad = [dict(records[0]), dict(records[1], extra_info={k: v for k, v in records[1]["extra_info"].items()
                                                         if k != "answer_frames"})]
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"record 1: extra_info lacks 'answer_frames'"):
    C.generate_sft(str(path), str(tmp_path / "o"))
  path.write_text(json.dumps([dict(records[0], videos=[str(tmp_path / "gone.mp4")])]))
  with pytest.raises(FileNotFoundError, match="gone.mp4"):
    C.generate_sft(str(path), str(tmp_path / "o"))
  path.write_text(json.dumps([dict(records[0], solution="E")]))
  with pytest.raises(ValueError, match="record 0: solution 'E'"):
    C.generate_sft(str(path), str(tmp_path / "o"))
  with pytest.raises(ValueError, match="max_generation_round"):
    C.generate_sft(str(path), str(tmp_path / "o"), tool_cfg=P.ToolConfig(max_generation_round=2))


def test_sparse_zooms_ask_half_the_frame_rate_and_guess_when_the_frames_miss(tmp_path):
  # The demo's layout (a 1-s flash, 10-frame zooms over 20-s segments), where half the frame rate mostly misses
  cfg = P.ToolConfig(max_generation_round=3, tool_call_max_frames=10, frames_upbound=12, max_total_frames=32)
  rl = S.generate(str(tmp_path / "rl"), seed=3, n_train=N, n_val=0, n_test=0, tool_cfg=cfg, height=56, width=56,
                  fps=6.0, min_seconds=661 / 6, max_seconds=661 / 6, answer_seconds=1.0)["train"]
  records = json.load(open(rl))
  convs = json.load(open(C.generate_sft(rl, str(tmp_path / "s"), seed=0, reflection_fraction=0.0,
                                        sparse_fraction=1.0, tool_cfg=cfg)))
  assert [c["kind"] for c in convs] == ["sparse"] * N
  mixed = json.load(open(C.generate_sft(rl, str(tmp_path / "m"), seed=0, reflection_fraction=0.25,
                                        sparse_fraction=0.5, tool_cfg=cfg)))
  kinds = [c["kind"] for c in mixed]
  assert (kinds.count("reflection"), kinds.count("sparse"), kinds.count("direct")) == (2, 4, 2)
  border, misses = S.VideoParams().border, 0
  ref = json.load(open(C.generate_sft(rl, str(tmp_path / "d"), seed=0, reflection_fraction=0.0, tool_cfg=cfg)))
  for r, conv, d in zip(records, convs, ref):
    msgs, answer = conv["messages"], r["extra_info"]["options"]["ABCD".index(r["solution"])]
    assert msgs[2]["content"].split("<video_zoom>")[0] == d["messages"][2]["content"].split("<video_zoom>")[0]
    ((s, e), fps), = calls_of(conv)
    ((ds, de), dfps), = calls_of(d)
    assert (s, e) == (ds, de) and fps == dfps / 2
    meta = read_meta(r["videos"][0])
    idx, _ = sample_zoom(meta, s, e, fps)
    n_ov = len(sample_overview(meta, cfg.video_fps, cfg.frames_upbound)[0])
    shown = [objects(rgb(p), border) for p in conv["images"][n_ov:]]
    assert len(shown) == len(idx) == int(fps * (e - s))
    last = msgs[-1]["content"]
    if S.hits(idx, tuple(r["extra_info"]["answer_frames"])):
      assert any(answer in x for x in shown) and f"A {answer} appears at " in last
      assert last.endswith(f"<answer>{r['solution']}</answer>")
    else:
      misses += 1
      assert not any(shown)
      guess = re.fullmatch(r"<think>No object appears in these frames\. I guess option ([A-D])\.</think>\n"
                           r"<answer>\1</answer>", last)
      assert guess, last
    turns = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert format_reward(turns, cfg.tool_call_max_frames) == 1
  assert misses >= N // 2  # half the frames of a 1-s flash: most sparse zooms miss it
  with pytest.raises(ValueError, match="sparse_fraction must lie in"):
    C.generate_sft(rl, str(tmp_path / "x"), sparse_fraction=-0.1)
  with pytest.raises(ValueError, match="reflection_fraction \\+ sparse_fraction must be at most 1"):
    C.generate_sft(rl, str(tmp_path / "x"), reflection_fraction=0.6, sparse_fraction=0.5)
