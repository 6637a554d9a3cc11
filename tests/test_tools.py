"""Tools behind one seam: the registry and config switch, the crop's parsing, validation and budget, the format
reward asking the enabled tools, and a scripted rollout whose `<crop>` shows the right region of the right frame
(the test video draws each frame's index into its top band, tests/media.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

import media
from zoomer_jax import tools as T
from zoomer_jax.agent import protocol as P
from zoomer_jax.agent import rewards as R
from zoomer_jax.agent.rollout import AgentConfig, Task, Videos, rollout, stop_criteria
from zoomer_jax.config_loader import load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.sampling import SamplingParams
from zoomer_jax.text import build_tiny_tokenizer
from zoomer_jax.video import VideoReader, preprocess_frames, sample_zoom

BOTH = ("zoom", "crop")
SMALL = 56 * 56  # 4 vision tokens per frame


def _episode(duration=20.0, overview=10, **kw):
  return P.Episode(P.ToolConfig(tools=BOTH, **kw), duration, overview)


def _crop(body: str, think="<think>closer</think>") -> str:
  return f"{think}<crop>{body}</crop>"


# ---------------------------------------------------------------------------------------------- the seam
def test_tools_are_chosen_by_name_and_bad_names_are_refused():
  assert [t.name for t in T.enabled(BOTH)] == ["zoom", "crop"]
  assert P.ToolConfig().tools == ("zoom",) and P.ToolConfig(tools=["zoom", "crop"]).tools == BOTH
  with pytest.raises(ValueError, match="unknown tool 'pan'.*known: \\['crop', 'zoom'\\]"):
    P.ToolConfig(tools=("zoom", "pan"))
  with pytest.raises(ValueError, match="at least one tool"):
    P.ToolConfig(tools=())
  with pytest.raises(ValueError, match="twice"):
    P.ToolConfig(tools=("crop", "crop"))
  with pytest.raises(TypeError, match="the string 'zoom'"):
    T.enabled("zoom")
  with pytest.raises(ValueError, match="unknown tool 'pan'"):
    R.RewardConfig(tools=("pan",))


def test_a_crop_is_no_call_unless_enabled():
  text = _crop('{"time": 3, "box": [0, 0, 0.5, 0.5]}')
  assert P.Episode(P.ToolConfig(), 20.0, 10).step(text) == P.Final(None, "no_call")
  assert isinstance(_episode().step(text), P.CropCall)
  assert P.find_calls(text) == [] and P.find_calls(text, BOTH) == ['{"time": 3, "box": [0, 0, 0.5, 0.5]}']


def test_prompt_hint_and_stop_strings_name_every_enabled_tool():
  zoom_only = P.system_prompt(P.ToolConfig())
  both = P.system_prompt(P.ToolConfig(tools=BOTH))
  assert both.startswith(zoom_only + "\n\n") and "<crop>" in both and "<crop>" not in zoom_only
  assert "<crop>" not in P.system_prompt(P.ToolConfig(tools=BOTH, max_generation_round=1))  # no round to call in
  assert P.last_round_hint(P.ToolConfig()) == P.LAST_ROUND_HINT
  assert "Do not call <video_zoom> or <crop> in this round" in P.last_round_hint(P.ToolConfig(tools=BOTH))
  ep = _episode(max_generation_round=2)
  ep.step(_crop('{"time": 3, "box": [0, 0, 0.5, 0.5]}'))
  assert ep.observation([3.0]).endswith("Do not call <video_zoom> or <crop> in this round, give a final answer "
                                        "based on information above.<|im_end|>\n<|im_start|>assistant\n")
  tok = build_tiny_tokenizer()

  def strings(stop):
    return [bytes(np.asarray(s)[:n]).decode() for s, n in zip(stop.strings, np.asarray(stop.string_len))]
  assert strings(stop_criteria(tok, BOTH)) == ["</video_zoom>", "</crop>"]
  assert strings(stop_criteria(tok)) == ["</video_zoom>"]


# ---------------------------------------------------------------------------------------------- the crop
def test_a_valid_crop_and_its_observation():
  ep = _episode()
  call = ep.step(_crop('{"time": "12.77", "box": [0.5, 0, 1, 0.5]}'))
  assert call == P.CropCall(12.77, (0.5, 0.0, 1.0, 0.5), 0) and call.n_frames == 1
  obs = ep.observation([12.8])
  assert obs == ("<|im_start|>user\n<tool_response>\nThe region [0.5, 0, 1, 0.5] (x0, y0, x1, y1 as fractions of "
                 "the width and height) of the frame at 12.80s, the one nearest 12.77 s, is shown below at the "
                 "video's own resolution:\n<frame0_time12.80s><image>\n</tool_response>\ncontinue your reasoning "
                 "process inside <think> and </think> and then write your final answer inside <answer> and "
                 "</answer><|im_end|>\n<|im_start|>assistant\n")
  assert ep.frames_used == 11 and ep.round == 1


@pytest.mark.parametrize("body, says", [
    ('{"time": 3, "box": [0, 0, 1, 1]', "not valid JSON"),
    ("the top left please", 'no JSON object inside <crop>; expected {"time": t, "box": [x0, y0, x1, y1]}'),
    ('{"box": [0, 0, 1, 1]}', 'missing field "time"'),
    ('{"time": 3}', 'missing field "box"'),
    ('{"time": 21, "box": [0, 0, 1, 1]}', '"time" 21 s is outside the video (0 to 20.00 s)'),
    ('{"time": -1, "box": [0, 0, 1, 1]}', "outside the video"),
    ('{"time": NaN, "box": [0, 0, 1, 1]}', "finite"),
    ('{"time": true, "box": [0, 0, 1, 1]}', '"time" must be a number'),
    ('{"time": 3, "box": [0, 0, 1]}', "list of four numbers"),
    ('{"time": 3, "box": "all"}', "list of four numbers"),
    ('{"time": 3, "box": [0, 0, "x", 1]}', '"box[2]" must be a number'),
    ('{"time": 3, "box": [0, 0, 1.5, 1]}', "must lie inside [0, 1]"),
    ('{"time": 3, "box": [-0.1, 0, 1, 1]}', "must lie inside [0, 1]"),
    ('{"time": 3, "box": [0.5, 0, 0.5, 1]}', "empty or too small"),
    ('{"time": 3, "box": [0.6, 0, 0.4, 1]}', "empty or too small"),
    ('{"time": 3, "box": [0, 0.2, 1, 0.205]}', "empty or too small"),
])
def test_each_malformed_crop_gets_an_error_observation_saying_what(body, says):
  ep = _episode()
  out = ep.step(_crop(body))
  assert isinstance(out, P.ToolError) and out.tool == "crop", out
  assert says in out.message
  assert out.observation.startswith("<|im_start|>user\n<tool_response>\nERROR occurs during the function tool "
                                    "call. Error Information: ")
  assert ep.frames_used == 10 and not ep.done


def test_a_crop_counts_one_call_and_one_frame():
  ep = _episode(overview=10, frames_upbound=10, max_total_frames=12, max_generation_round=9)
  for _ in range(2):
    out = ep.step(_crop('{"time": 3, "box": [0, 0, 1, 1]}'))
    ep.observation([3.0])
  out = ep.step(_crop('{"time": 3, "box": [0, 0, 1, 1]}'))
  assert isinstance(out, P.ToolError) and "frame budget spent: all 12 frames" in out.message
  assert ep.round == 3 and ep.frames_used == 12
  ep = _episode(max_generation_round=2)
  assert isinstance(ep.step(_crop('{"time": 3, "box": [0, 0, 1, 1]}')), P.CropCall)
  ep.observation([3.0])
  assert ep.step(_crop('{"time": 3, "box": [0, 0, 1, 1]}')) == P.Final(None, "round_limit")


def test_a_zoom_and_a_crop_in_one_turn_is_an_error():
  out = _episode().step('<video_zoom>{"segment": [1, 2], "fps": 2}</video_zoom>'
                        + _crop('{"time": 3, "box": [0, 0, 1, 1]}'))
  assert isinstance(out, P.ToolError) and out.tool is None
  assert "2 tool calls (<video_zoom>, <crop>) in one turn" in out.message


# ---------------------------------------------------------------------------------------------- rewards
def test_the_format_reward_accepts_the_calls_of_the_enabled_tools():
  crop_turn = _crop('{"time": 3, "box": [0, 0, 0.5, 0.5]}')
  zoom_turn = '<think>x</think><video_zoom>{"segment": [1, 3], "fps": 2}</video_zoom>'
  answer = "<think>seen</think><answer>B</answer>"
  fmt = R.format_reward([zoom_turn, crop_turn, answer], 16, BOTH)
  assert (fmt.score, fmt.tool_call_count, fmt.requested_frames) == (1.0, 2, 4 + 1)
  assert R.format_reward([crop_turn, answer], 16).score == 0.0  # the zoom alone: a crop turn is no tool turn
  assert R.format_reward([crop_turn, answer], 16).tool_call_count == 0
  assert R.format_reward([_crop('{"time": 3, "box": [0, 0]}'), answer], 16, BOTH).score == 0.0
  assert R.format_reward([zoom_turn + crop_turn, answer], 16, BOTH).score == 0.0  # two tools in one turn
  assert R.format_reward(["<think>x</think><crop>{}</crop><answer>B</answer>"], 16, BOTH).score == 0.0
  cfg = R.RewardConfig(tools=BOTH)
  assert R.score_trajectory([crop_turn, answer], "B", "multiple_choice", cfg, success_tool_call_rate=1.0,
                            used_tool=True)["format"] == 1.0
  assert R.used_tool([{"round": 0, "tool": "crop", "frames": 1}]) and not R.used_tool([{"round": 0, "error": "x"}])


# ---------------------------------------------------------------------------------------------- on a video
@pytest.fixture(scope="module")
def video(tmp_path_factory):
  return media.write_video(str(tmp_path_factory.mktemp("v") / "v.mp4"), 200, 10.0, (64, 80))  # 20 s


def _band_bits(region: np.ndarray, top: int, left: int, h: int, w: int) -> dict[int, int]:
  """The index bits (tests/media.py's band of an h x w frame) whose blocks lie inside `region`, a crop of that
  frame at (top, left): bit -> 0/1."""
  bh, bw = h // (2 * media.ROWS), w // media.COLS
  bits = {}
  for b in range(media.BITS):
    r, c = divmod(b, media.COLS)
    y, x = r * bh - top, c * bw - left
    if 0 <= y and y + bh <= region.shape[0] and 0 <= x and x + bw <= region.shape[1]:
      block = region[y + bh // 4:y + bh - bh // 4, x + bw // 4:x + bw - bw // 4]
      bits[b] = int(block.mean() > (media.LO + media.HI) / 2)
  return bits


def test_the_crop_cuts_the_box_from_the_nearest_frame_at_full_resolution(video):
  with VideoReader(video) as reader:
    # 12.77 s: frame 127 is on screen, frame 128 (12.8 s) is the nearest; their top-right bits differ.
    shown = T.CROP.run(P.CropCall(12.77, (0.5, 0.0, 1.0, 0.5), 0), reader)
    full = reader.frames(np.array([128]))[0]
  assert shown.indices.tolist() == [128] and abs(float(shown.times[0]) - 12.8) < 1e-3
  assert shown.frames.shape == (1, 32, 40, 3) and shown.frames.dtype == np.uint8
  np.testing.assert_array_equal(shown.frames[0], full[:32, 40:])
  bits = _band_bits(shown.frames[0], 0, 40, 64, 80)
  assert sorted(bits) == [4, 5, 6, 7, 12, 13, 14, 15]
  assert bits == {b: (128 >> b) & 1 for b in bits} != {b: (127 >> b) & 1 for b in bits}


@pytest.fixture(scope="module")
def model():
  return Qwen25VL(ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model), rngs=nnx.Rngs(4))


def test_a_scripted_rollout_crops_zooms_and_logs_each_tool(model, video):
  cfg = AgentConfig(tool=P.ToolConfig(tools=BOTH), sampling=SamplingParams(temperature=1.0, max_new_tokens=64),
                    decode_chunk=16, max_pixels=SMALL, min_pixels=SMALL, workers=2)
  script = ['<think>the top right</think><crop>{"time": 12.77, "box": [0.5, 0, 1, 0.5]}</crop>',
            '<think>again</think><crop>{"time": 30, "box": [0, 0, 1, 1]}</crop>',
            '<think>and when</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>',
            "<think>seen it</think><answer>B</answer><|im_end|>"]
  tok = build_tiny_tokenizer()
  events = []
  (traj,) = rollout(model, tok, [Task(video, "<image>\nWhich? A. x B. y", "B", "t0")], cfg, jax.random.key(3),
                    on_event=lambda *e: events.append(e), script=lambda row, rnd: script[rnd] if rnd < 4 else None)
  assert (traj.answer, traj.finish_reason, traj.rounds) == ("B", "answer", 4)
  assert traj.turns[:3] == script[:3]  # each call's closing tag ended its turn
  crop, bad, zoom = traj.calls
  assert crop == dict(round=0, tool="crop", time=12.77, box=[0.5, 0, 1, 0.5], frames=1, timestamps=[12.8])
  assert bad["tool"] == "crop" and "outside the video" in bad["error"]
  _, ts = sample_zoom(VideoReader(video).meta, 2, 4, 2)
  assert zoom["tool"] == "zoom" and zoom["timestamps"] == [round(float(t), 3) for t in ts]
  assert [e[0] for e in events if e[0] in ("crop", "zoom", "tool_error")] == ["crop", "tool_error", "zoom"]
  text = tok.decode(traj.ids.tolist())
  assert "of the frame at 12.80s, the one nearest 12.77 s" in text and "<crop>" in text.split("<|im_end|>")[0]
  # The crop's image is the box of frame 128 at the video's resolution, preprocessed as every frame is.
  assert traj.n_frames == 10 + 1 + 4
  with VideoReader(video) as reader:
    region = reader.frames(np.array([128]))[0][:32, 40:]
  want_pixels, want_grid = preprocess_frames(region[None], SMALL, SMALL)
  rows = np.cumsum([0] + [int(np.prod(g)) for g in traj.image_grid_thw])
  np.testing.assert_array_equal(traj.image_grid_thw[10], want_grid[0])
  np.testing.assert_array_equal(traj.pixel_values[rows[10]:rows[11]], want_pixels)
  # The rollout's reader shows the same uint8 region (before preprocessing).
  videos = Videos(cfg)
  try:
    idx, _, frames = videos.clip_frames(traj.task, T.CROP.from_log(crop))
  finally:
    videos.close()
  assert idx.tolist() == [128] and _band_bits(frames[0], 0, 40, 64, 80)[7] == 1


# ---------------------------------------------------------------------------------------------- fuzzing
def test_fuzzed_two_tool_episodes_never_raise_and_keep_every_budget(measure):
  """Random turns mixing zoom and crop calls (valid, malformed, cut off, several per turn) through whole
  episodes with random budgets: each outcome is one of the three, and rounds and frames stay in budget."""
  from hypothesis import HealthCheck, given, settings
  from hypothesis import strategies as st
  num = st.one_of(st.floats(-2, 30, allow_nan=False), st.sampled_from(["NaN", "1e999", '"x"', "true", "null"]))
  crop = st.builds(lambda t, b: '<crop>{"time": %s, "box": [%s]}</crop>' % (t, ", ".join(map(str, b))),
                   num, st.lists(st.one_of(st.floats(-0.2, 1.2, allow_nan=False), num), min_size=0, max_size=5))
  zoom = st.builds(lambda s, d, f: '<video_zoom>{"segment": [%s, %s], "fps": %s}</video_zoom>' % (s, s + d, f),
                   st.floats(-5, 30, allow_nan=False), st.floats(0.1, 12), st.floats(0.2, 4))
  xs, ys = st.lists(st.floats(0, 1), min_size=2, max_size=2), st.lists(st.floats(0, 1), min_size=2, max_size=2)
  good_crop = st.builds(lambda t, x, y: '<crop>{"time": %r, "box": [%r, %r, %r, %r]}</crop>'
                        % (t, min(x), min(y), max(x), max(y)), st.floats(0, 20), xs, ys)
  piece = st.one_of(crop, zoom, st.text(max_size=12), st.sampled_from(["<crop>", "</crop>", "<answer>A</answer>"]))
  turns = st.one_of(good_crop, crop, zoom, st.lists(piece, max_size=4).map("".join))
  counts = {"calls": 0, "crops": 0, "errors": 0, "finals": 0}

  # derandomize: the same 400 episodes every run, so the coverage counts below cannot drift under the threshold
  @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None,
            derandomize=True)
  @given(texts=st.lists(turns, min_size=1, max_size=6), rounds=st.integers(1, 6), extra=st.integers(0, 20))
  def episode(texts, rounds, extra):
    cfg = P.ToolConfig(tools=BOTH, max_generation_round=rounds, frames_upbound=4, max_total_frames=4 + extra)
    ep = P.Episode(cfg, 20.0, 4)
    for text in texts:
      if ep.done:
        break
      out = ep.step(text)
      if isinstance(out, P.Final):
        counts["finals"] += 1
      elif isinstance(out, P.ToolError):
        counts["errors"] += 1
        assert out.message and "<image>" not in out.observation
      else:
        counts["calls"] += 1
        counts["crops"] += isinstance(out, P.CropCall)
        assert 1 <= out.n_frames <= ep.frames_left
        obs = ep.observation([0.0] * out.n_frames)
        assert obs.count("<image>") == out.n_frames
      assert ep.round <= rounds and ep.frames_used <= cfg.max_total_frames

  episode()
  for k, v in counts.items():
    measure(f"fuzz_{k}", v)
  assert counts["crops"] > 20 and min(counts["calls"] - counts["crops"], counts["errors"], counts["finals"]) > 20, counts
