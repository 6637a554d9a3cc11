"""The zoom-tool protocol: prompts, call parsing, every error path, budgets, and a fuzzed environment."""

import json
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoomer_jax.agent import protocol as P

CFG = P.ToolConfig()


def _episode(duration=600.0, overview=64, **kw):
  return P.Episode(P.ToolConfig(**kw), duration, overview)


def _turn(call: str, think="<think>look closer</think>") -> str:
  return f"{think}<video_zoom>{call}</video_zoom>"


# ---------------------------------------------------------------------------------------------- prompts
def test_system_prompt_states_the_rules_and_can_be_replaced(tmp_path):
  text = P.system_prompt(CFG)
  for needle in ("<video_zoom>", "</video_zoom>", '"segment"', '"fps"', "<think>", "<answer>", "at most 16 frames"):
    assert needle in text, needle
  assert "{tool_call_max_frames}" not in text
  assert "at most 8 frames" in P.system_prompt(P.ToolConfig(tool_call_max_frames=8))
  assert "\\boxed{}" in P.system_prompt(P.ToolConfig(system_prompt="system_prompt_boxed.txt"))
  own = tmp_path / "mine.txt"
  own.write_text("Zoom with at most {tool_call_max_frames} frames.\n")
  assert P.system_prompt(P.ToolConfig(system_prompt=str(own))) == "Zoom with at most 16 frames."
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    P.system_prompt(P.ToolConfig(system_prompt="nope.txt"))


def test_user_prompt_tags_each_overview_frame():
  text = P.user_prompt("Watch: <image>\nWhat colour? A. red B. blue", [0.0, 2.0, 4.5, 1234.567])
  assert text == ("Watch: <frame0_time0.00s><image><frame1_time2.00s><image><frame2_time4.50s><image>"
                  "<frame3_time1234.57s><image>\nWhat colour? A. red B. blue")
  assert P.user_prompt("No placeholder?", [1.0]) == "<frame0_time1.00s><image>\nNo placeholder?"


def test_config_keys_are_checked():
  assert P.ToolConfig.from_dict({"max_generation_round": 3}).max_generation_round == 3
  with pytest.raises(ValueError, match="max_generaton_round"):
    P.ToolConfig.from_dict({"max_generaton_round": 3})
  with pytest.raises(ValueError, match="tool_call_max_frames"):
    P.ToolConfig(tool_call_max_frames=0)


# ---------------------------------------------------------------------------------------------- good calls
def test_a_valid_call_and_its_observation():
  ep = _episode()
  call = ep.step(_turn('{"segment": [4.0, 6.0], "fps": 2}'))
  assert isinstance(call, P.ZoomCall)
  assert (call.segment, call.fps, call.n_frames, call.clamped, call.round) == ((4.0, 6.0), 2.0, 4, False, 0)
  obs = ep.observation([4.0, 4.67, 5.33, 6.0])
  assert obs == ("<|im_start|>user\n<tool_response>\nThe frames of the video clip are shown below:\n"
                 "<frame0_time4.00s><image><frame1_time4.67s><image><frame2_time5.33s><image>"
                 "<frame3_time6.00s><image>\n</tool_response>\ncontinue your reasoning process inside <think> "
                 "and </think> and then write your final answer inside <answer> and </answer>"
                 "<|im_end|>\n<|im_start|>assistant\n")
  assert ep.frames_used == 68 and ep.round == 1


def test_fps_and_times_may_be_floats_or_numeric_strings_and_multiline_json():
  ep = _episode()
  call = ep.step(_turn('{"segment": ["10", 12.5],\n "fps": "1.5", "note": "extra keys are ignored"}'))
  assert isinstance(call, P.ZoomCall) and call.n_frames == int(1.5 * 2.5)


def test_segment_outside_the_video_is_clamped_and_said():
  ep = _episode(duration=100.0)
  call = ep.step(_turn('{"segment": [95, 105], "fps": 1}'))
  assert call.clamped and call.segment == (95.0, 100.0) and call.n_frames == 10  # the original's count
  obs = ep.observation([95.0 + i * 5 / 9 for i in range(10)])
  assert "clamped to [95.00, 100.00]" in obs and "[95, 105]" in obs
  call = _episode(duration=100.0).step(_turn('{"segment": [-3, 2], "fps": 2}'))
  assert call.clamped and call.segment == (0.0, 2.0)


def test_answer_ends_the_trajectory():
  ep = _episode()
  out = ep.step("<think>easy</think><answer> B </answer>")
  assert out == P.Final("B", "answer") and ep.done
  assert _episode().step("I think it is B.") == P.Final(None, "no_call")
  assert _episode().step("<answer>A</answer> then <answer>C</answer>").answer == "C"
  cut = _episode().step('<think>x</think><video_zoom>{"segment": [1, 2], "fps": 2}')  # cut-off tag
  assert cut == P.Final(None, "no_call")


def test_last_round_hint_then_round_limit():
  ep = _episode(max_generation_round=3)
  assert isinstance(ep.step(_turn('{"segment": [1, 2], "fps": 2}')), P.ZoomCall)
  assert P.LAST_ROUND_HINT not in ep.observation([1.0, 2.0])
  assert isinstance(ep.step(_turn('{"segment": [1, 2], "fps": 2}')), P.ZoomCall)
  obs = ep.observation([1.0, 2.0])
  assert obs.endswith(P.LAST_ROUND_HINT + "<|im_end|>\n<|im_start|>assistant\n")
  out = ep.step(_turn('{"segment": [3, 4], "fps": 2}'))  # a call in the last round is not run
  assert out == P.Final(None, "round_limit") and ep.done and ep.frames_used == 64 + 4


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body, says", [
    ('{"segment": [1, 2], "fps": 2', "not valid JSON"),
    ("segment 1 to 2 please", "no JSON object"),
    ('{"segment": [1, 2], "fps": 2} {"segment": [3, 4], "fps": 2}', "2 JSON objects"),
    ('{"fps": 2}', 'missing field "segment"'),
    ('{"segment": [1, 2]}', 'missing field "fps"'),
    ('{"segment": [1, 2, 3], "fps": 2}', "list of two numbers"),
    ('{"segment": {"start": 1}, "fps": 2}', "list of two numbers"),
    ('{"segment": ["one", 2], "fps": 2}', '"segment[0]" must be a number'),
    ('{"segment": [1, 2], "fps": true}', '"fps" must be a number'),
    ('{"segment": [1, 2], "fps": null}', '"fps" must be a number'),
    ('{"segment": [NaN, 2], "fps": 2}', "finite"),
    ('{"segment": [1, Infinity], "fps": 2}', "finite"),
    ('{"segment": [1, 1e999], "fps": 2}', "finite"),
    ('{"segment": [1, 2], "fps": "nan"}', "finite"),
    ('{"segment": [5, 5], "fps": 2}', "must be before its end"),
    ('{"segment": [6, 5], "fps": 2}', "must be before its end"),
    ('{"segment": [1, 2], "fps": -1}', '"fps" must be positive'),
    ('{"segment": [1, 2], "fps": 0.5}', "gives no frame"),
    ('{"segment": [0, 10], "fps": 2}', "Number of frames extracted (20) exceeds the maximum allowed (16)"),
    ('{"segment": [0, 1e300], "fps": 1e300}', "exceeds the maximum allowed"),
    ('{"segment": [1, 2], "fps": ' + "9" * 5000 + "}", "not valid JSON"),
    ('[1, 2]', "no JSON object"),
])
def test_each_malformed_call_gets_an_error_observation_saying_what(body, says):
  ep = _episode()
  out = ep.step(_turn(body))
  assert isinstance(out, P.ToolError), out
  assert says in out.message
  assert out.observation.startswith("<|im_start|>user\n<tool_response>\nERROR occurs during the function tool "
                                    "call. Error Information: ")
  assert "\n</tool_response>\nPlease analyze" in out.observation and "Continue your reasoning" in out.observation
  assert out.observation.endswith("<|im_end|>\n<|im_start|>assistant\n")
  assert ep.frames_used == 64 and not ep.done


def test_two_calls_in_one_turn_is_an_error():
  out = _episode().step(_turn('{"segment": [1, 2], "fps": 2}') + _turn('{"segment": [3, 4], "fps": 2}'))
  assert isinstance(out, P.ToolError) and "2 <video_zoom> calls" in out.message


def test_frame_budget_spent():
  ep = _episode(overview=64, max_total_frames=80, max_generation_round=9)
  for _ in range(5):  # 16 frames each: the fifth call finds no budget left
    out = ep.step(_turn('{"segment": [0, 8], "fps": 2}'))
    if isinstance(out, P.ZoomCall):
      ep.observation([0.0] * out.n_frames)
  assert isinstance(out, P.ToolError) and "frame budget spent: all 80 frames" in out.message
  ep = _episode(overview=64, max_total_frames=70)
  out = ep.step(_turn('{"segment": [0, 8], "fps": 1}'))
  assert isinstance(out, P.ToolError) and "6 of 70 frames left, the call asks for 8" in out.message


def test_extraction_failure_gets_a_closed_tool_response():
  ep = _episode()
  assert isinstance(ep.step(_turn('{"segment": [1, 2], "fps": 2}')), P.ZoomCall)
  err = ep.extraction_failed("cannot decode frame 30 of /data/v.mp4")
  assert "<tool_response>\nError: cannot decode frame 30 of /data/v.mp4\n</tool_response>\n" in err.observation
  assert "Countinue" not in err.observation and ep.frames_used == 64


def test_misuse_by_the_host_is_an_error_not_silence():
  ep = _episode()
  ep.step(_turn('{"segment": [1, 2], "fps": 2}'))
  with pytest.raises(RuntimeError, match="observation"):
    ep.step("again")
  with pytest.raises(ValueError, match="asked for 2 frames, got 3"):
    ep.observation([1.0, 1.5, 2.0])
  with pytest.raises(ValueError, match="duration"):
    P.Episode(CFG, float("nan"), 64)


# ---------------------------------------------------------------------------------------------- fuzzing
_numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(["1e999", "-0", "1e-320", "9" * 400, "NaN", "Infinity", "-Infinity"]),
                     st.text(max_size=5))
_json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                            lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                            max_leaves=8)


@st.composite
def _call_bodies(draw):
  kind = draw(st.integers(0, 3))
  if kind == 0:  # structurally right, values anything
    seg = [draw(_numbers), draw(_numbers)]
    raw = [json.dumps(v) if not isinstance(v, str) or not v[:1].isdigit() and v not in ("NaN", "Infinity",
                                                                                         "-Infinity") else v
           for v in seg]
    return '{"segment": [%s, %s], "fps": %s}' % (raw[0], raw[1], draw(_numbers))
  if kind == 1:  # plausible calls, to reach the budget checks
    s = draw(st.floats(-20, 700, allow_nan=False))
    return json.dumps({"segment": [s, s + draw(st.floats(0.01, 40))], "fps": draw(st.floats(0.01, 8))})
  if kind == 2:
    return json.dumps(draw(_json_values))
  return draw(st.text(alphabet=st.sampled_from('{}[]",:0123456789.-eE segmntfps\n'), max_size=60))


_pieces = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["<video_zoom>", "</video_zoom>", "<answer>", "</answer>", "<think>", "</think>", "{", "}",
                     "{{", "}}", "<|im_end|>", "\u202e", "🎥", "<video_zoom></video_zoom>"]),
    _call_bodies().map(lambda b: f"<video_zoom>{b}</video_zoom>"),
    _call_bodies().map(lambda b: f"<video_zoom>{b}"),  # cut off
    st.tuples(st.text(max_size=10), st.text(max_size=10)).map(lambda t: f"<answer>{t[0]}</answer>{t[1]}"),
)
_plausible = st.builds(lambda s, d, f, pre: f'{pre}<think>zoom</think><video_zoom>{{"segment": [{s}, {s + d}], '
                                           f'"fps": {f}}}</video_zoom>',
                       st.floats(-20, 700, allow_nan=False), st.floats(0.1, 12), st.floats(0.2, 4),
                       st.text(max_size=8))
# Half the turns are plausible calls, so episodes get deep enough to reach the round and frame budgets.
_turns = st.one_of(st.lists(_pieces, min_size=0, max_size=6).map("".join), _plausible)
_OBS = re.compile(r"<\|im_start\|>user\n<tool_response>\n.*\n</tool_response>\n.*<\|im_end\|>\n"
                  r"<\|im_start\|>assistant\n\Z", re.DOTALL)


def test_fuzzed_environment_never_raises_and_keeps_every_budget(measure):
  """Random turns (text, tags, cut-off calls, odd JSON) through whole episodes with random budgets."""
  counts = {"episodes": 0, "turns": 0, "calls": 0, "errors": 0, "finals": 0}

  @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
  @given(turns=st.lists(_turns, min_size=1, max_size=7), duration=st.floats(0.5, 5000),
         rounds=st.integers(1, 6), per_call=st.integers(1, 20), overview=st.integers(1, 64),
         extra=st.integers(0, 70))
  def episode(turns, duration, rounds, per_call, overview, extra):
    cfg = P.ToolConfig(max_generation_round=rounds, tool_call_max_frames=per_call, frames_upbound=overview,
                       max_total_frames=overview + extra)
    ep = P.Episode(cfg, duration, overview)
    counts["episodes"] += 1
    for text in turns:
      if ep.done:
        break
      counts["turns"] += 1
      out = ep.step(text)
      assert ep.round <= cfg.max_generation_round
      if isinstance(out, P.Final):
        counts["finals"] += 1
        assert ep.done and (out.answer is None or isinstance(out.answer, str))
        assert out.reason in ("answer", "no_call", "round_limit")
      elif isinstance(out, P.ToolError):
        counts["errors"] += 1
        assert _OBS.match(out.observation) and "<image>" not in out.observation and out.message
      else:
        counts["calls"] += 1
        assert isinstance(out, P.ZoomCall)
        assert 1 <= out.n_frames <= cfg.tool_call_max_frames and out.n_frames <= ep.frames_left
        assert all(math.isfinite(x) for x in (*out.segment, out.fps))
        assert 0 <= out.segment[0] <= out.segment[1] <= duration
        obs = ep.observation([out.segment[0]] * out.n_frames)
        assert _OBS.match(obs) and obs.count("<image>") == out.n_frames
      assert ep.frames_used <= cfg.max_total_frames

  episode()
  for k, v in counts.items():
    measure(f"fuzz_{k}", v)
  # The generators must reach every branch often, or the test proves little.
  assert counts["episodes"] >= 1000 and min(counts["calls"], counts["errors"], counts["finals"]) > 100, counts
