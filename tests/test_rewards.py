"""The reward: accuracy judges, the format rule, the score and its tool term; every expected value by hand."""

import dataclasses

import pytest

from zoomer_jax.agent import rewards as R

T = "<think>look</think>"
ANS_A = f"{T}<answer>A</answer>"


def zoom(body: str, think: str = T) -> str:
  return f"{think}<video_zoom>{body}</video_zoom>"


def seg(start, end, fps) -> str:
  return f'{{"segment": [{start}, {end}], "fps": {fps}}}'


OK_CALL = zoom(seg(4.0, 6.0, 2))  # int(2*2) = 4 frames
CALL_8 = zoom(seg(10, 18, 1))  # 8 frames
CALL_17 = zoom(seg(0, 8.5, 2))  # 17 frames: over the limit

# ---------------------------------------------------------------------------------------------- answers
EXTRACT_CASES = [
  (["<answer> A </answer>"], "A"),
  (["<answer>A</answer> no wait <answer>C</answer>"], "C"),  # the last tag wins
  ([OK_CALL, f"{T}<answer>D</answer>"], "D"),
  ([f"{T}<answer>", "B</answer>"], "B"),  # opened in one turn, closed in the next: joined with a space
  (["<answer>A</answer> <answer>C and more"], "C and more"),  # never closed: the rest of the text
  ([f"{T}I think B. is right"], None),
  ([], None),
]


@pytest.mark.parametrize("turns,expected", EXTRACT_CASES)
def test_extract_answer(turns, expected):
  assert R.extract_answer(turns) == expected


MC_CASES = [
  # (turns, ground truth, expected)
  ([ANS_A], "A", 1.0),
  ([f"{T}<answer>B</answer>"], "A", 0.0),
  ([f"{T}<answer>a</answer>"], "A", 0.0),  # case matters
  ([f"{T}<answer>B. the red car</answer>"], "B", 1.0),  # the letter pattern
  ([f"{T}<answer>A. no, rather B. yes</answer>"], "B", 1.0),  # its last match
  ([f"{T}<answer>A. no, rather B. yes</answer>"], "A", 0.0),
  ([f"{T}<answer>The answer is \\boxed{{C}}</answer>"], "C", 1.0),
  ([f"{T}<answer>\\boxed{{A}} then \\boxed{{C}}</answer>"], "C", 1.0),  # the last box
  ([f"{T}<answer>\\boxed{{A}} then \\boxed{{C}}</answer>"], "A", 0.0),
  ([f"{T}<answer>\\boxed{{\\text{{C}}}}</answer>"], "\\text{C}", 1.0),  # nested braces
  ([f"{T}<answer>\\boxed{{{{C}} }}</answer>"], "{C}", 1.0),  # nested, stripped
  ([f"{T}<answer>\\boxed{{C</answer>"], "C", 0.0),  # an unclosed box is no box
  ([f"{T}<answer>A</answer> <answer>C</answer>"], "C", 1.0),
  ([f"{T}<answer>A</answer> <answer>C</answer>"], "A", 0.0),
  ([OK_CALL, f"{T}<answer>D</answer>"], "D", 1.0),
  ([f"{T}<answer>", "B</answer>"], "B", 1.0),
  ([ANS_A], "A.", 1.0),  # one trailing "." is dropped from the ground truth
  ([f"{T}<answer>A.</answer>"], "A", 1.0),  # via the letter pattern
  ([ANS_A], "A..", 0.0),  # only one
  ([f"{T}I pick B. because of the dog"], "B", 1.0),  # no <answer>: the whole text is scanned, as the original
  ([f"{T}no idea"], "B", 0.0),
  (["B"], "B", 1.0),  # a bare letter equals the ground truth
  ([], "A", 0.0),
]


@pytest.mark.parametrize("turns,gt,expected", MC_CASES)
def test_judge_multi_choice(turns, gt, expected):
  assert R.judge_multi_choice(turns, gt) == expected


def test_letter_pattern_is_configurable():
  turns = [f"{T}<answer>G. the last one</answer>"]
  assert R.judge_multi_choice(turns, "G") == 1.0
  assert R.judge_multi_choice(turns, "G", letter_pattern=r"([A-F])\.") == 0.0
  cfg = R.RewardConfig(letter_pattern=r"([A-F])\.")
  assert R.score_trajectory(turns, "G", "multiple_choice", cfg, success_tool_call_rate=0, used_tool=False)["acc"] == 0


def test_bad_answer_inputs_are_named():
  with pytest.raises(TypeError, match="sequence of assistant turn strings"):
    R.judge_multi_choice(ANS_A, "A")
  with pytest.raises(ValueError, match="ground truth"):
    R.judge_multi_choice([ANS_A], "")
  with pytest.raises(ValueError, match="'essay'"):
    R.score_trajectory([ANS_A], "A", "essay", R.RewardConfig(), success_tool_call_rate=0, used_tool=False)


@pytest.mark.parametrize("text,expected", [
  ("The Red  Car!", "red car"),
  ("An apple, please.", "apple please"),
  ("3.5 kg", "3.5 kg"),
  ("1,000 people.", "1,000 people"),
  ("«Paris»", "paris"),
])
def test_normalize_answer(text, expected):
  assert R.normalize_answer(text) == expected


OPEN_CASES = [
  ([f"{T}<answer>The Red Car!</answer>"], "red car", 1.0),
  ([f"{T}<answer>a red car</answer>"], "red car", 1.0),
  ([f"{T}<answer>red truck</answer>"], "red car", 0.0),
  ([f"{T}<answer>35</answer>"], "3.5", 0.0),
  ([f"{T}<answer>So it is \\boxed{{Paris}}</answer>"], "paris", 1.0),
  ([f"{T}<answer>two</answer>"], ["2", "two"], 1.0),
]


@pytest.mark.parametrize("turns,gt,expected", OPEN_CASES)
def test_judge_open_ended(turns, gt, expected):
  assert R.judge_open_ended(turns, gt) == expected
  cfg = R.RewardConfig()
  assert R.score_trajectory(turns, gt, "open_ended", cfg, success_tool_call_rate=0, used_tool=False)["acc"] == expected


def test_open_ended_ground_truth_must_survive_normalisation():
  with pytest.raises(ValueError, match="empty after normalisation"):
    R.judge_open_ended([ANS_A], "The.")


# ---------------------------------------------------------------------------------------------- format
FORMAT_CASES = [
  # (name, turns, (score, tool_call_count, requested_frames))
  ("direct answer", [ANS_A], (1.0, 0, 0)),
  ("whitespace around", ["\n  " + ANS_A + "\n\n "], (1.0, 0, 0)),
  ("no think", ["<answer>A</answer>"], (0.0, 0, 0)),
  ("text before think", ["Sure. " + ANS_A], (0.0, 0, 0)),
  ("text after answer", [ANS_A + " done"], (0.0, 0, 0)),
  ("two answers", [f"{T}<answer>A</answer><answer>B</answer>"], (0.0, 0, 0)),
  ("single turn zoom", [OK_CALL], (0.0, 1, 0)),
  ("single turn zoom and answer", [OK_CALL + "<answer>A</answer>"], (0.0, 1, 0)),
  ("one call", [OK_CALL, ANS_A], (1.0, 1, 4)),
  ("two calls", [OK_CALL, CALL_8, ANS_A], (1.0, 2, 12)),
  ("whitespace around turns", ["  " + OK_CALL + "\n", "\n" + ANS_A + "  \n"], (1.0, 1, 4)),
  ("text after the call", [OK_CALL + " waiting", ANS_A], (1.0, 1, 4)),
  ("call with whitespace in the tags", [zoom(" " + seg(4, 6, 2) + " \n"), ANS_A], (1.0, 1, 4)),
  ("zoom in the final turn", [OK_CALL, OK_CALL], (0.0, 1, 4)),
  ("final turn without think", [OK_CALL, "<answer>A</answer>"], (0.0, 1, 4)),
  ("answer in a non-final turn", [f"{T}<answer>A</answer><video_zoom>{seg(4, 6, 2)}</video_zoom>", ANS_A],
   (0.0, 1, 0)),
  ("tool turn without think", [f"<video_zoom>{seg(4, 6, 2)}</video_zoom>", ANS_A], (0.0, 1, 0)),
  ("two zooms in one turn", [OK_CALL + f"<video_zoom>{seg(4, 6, 2)}</video_zoom>", ANS_A], (0.0, 1, 0)),
  ("bad JSON", [zoom('{"segment": [4.0, 6.0], "fps": 2'), ANS_A], (0.0, 1, 0)),
  ("single-quoted JSON", [zoom("{'segment': [4.0, 6.0], 'fps': 2}"), ANS_A], (0.0, 1, 0)),
  ("missing fps", [zoom('{"segment": [4.0, 6.0]}'), ANS_A], (0.0, 1, 0)),
  ("text around the JSON", [zoom("call " + seg(4, 6, 2)), ANS_A], (0.0, 1, 0)),
  ("16 frames pass", [zoom(seg(0, 8, 2)), ANS_A], (1.0, 1, 16)),
  ("17 frames fail", [CALL_17, ANS_A], (0.0, 1, 0)),
  ("16.9 frames truncate to 16", [zoom(seg(0, 16.9, 1)), ANS_A], (1.0, 1, 16)),
  ("16.95 frames truncate to 16", [zoom(seg(0, 33.9, 0.5)), ANS_A], (1.0, 1, 16)),
  # The original's rule only bounds int(fps*(end-start)) from above: a reversed segment passes.
  ("reversed segment", [zoom(seg(6, 4, 2)), ANS_A], (1.0, 1, -4)),
  # Turns after the first malformed one are not examined (nor counted).
  ("stops at the first bad turn", [CALL_17, OK_CALL, ANS_A], (0.0, 1, 0)),
  ("bad turn after a good one", [OK_CALL, CALL_17, ANS_A], (0.0, 2, 4)),
  ("no turns", [], (0.0, 0, 0)),
]


@pytest.mark.parametrize("name,turns,expected", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_format_reward(name, turns, expected):
  got = R.format_reward(turns)
  assert (got.score, got.tool_call_count, got.requested_frames) == expected


def test_format_frame_limit_is_configurable():
  turns = [zoom(seg(0, 8, 2)), ANS_A]
  assert R.format_reward(turns, tool_call_max_frames=16).score == 1.0
  assert R.format_reward(turns, tool_call_max_frames=15).score == 0.0
  cfg = R.RewardConfig(tool_call_max_frames=15)
  assert R.score_trajectory(turns, "A", "multiple_choice", cfg, success_tool_call_rate=0, used_tool=True)["format"] == 0


# ---------------------------------------------------------------------------------------------- score
def score(turns, gt="A", cfg=R.RewardConfig(), rate=0.0, used_tool=None, step=0, answer_type="multiple_choice"):
  used = len(turns) > 1 if used_tool is None else used_tool
  return R.score_trajectory(turns, gt, answer_type, cfg, success_tool_call_rate=rate, used_tool=used, step=step)


BASE_CASES = [
  # (turns, ground truth, score, acc, format)
  ([ANS_A], "A", 1.0, 1.0, 1.0),
  (["<answer>A</answer>"], "A", 0.9, 1.0, 0.0),
  ([ANS_A], "B", 0.1, 0.0, 1.0),
  (["<answer>A</answer>"], "B", 0.0, 0.0, 0.0),
  ([OK_CALL, ANS_A], "A", 1.0, 1.0, 1.0),  # no tool term by default (tool_call_penalty 0)
]


@pytest.mark.parametrize("turns,gt,expected,acc,fmt", BASE_CASES)
def test_base_reward_takes_four_values(turns, gt, expected, acc, fmt):
  got = score(turns, gt)
  assert (got["score"], got["acc"], got["format"], got["tool_term"]) == (expected, acc, fmt, 0.0)
  assert set(got) == {"score", "acc", "format", "tool_term", "tool_call_count", "requested_frames"}


BONUS = R.RewardConfig(tool_call_penalty=-0.5, target_tool_call_rate=0.5)  # the authors' internal run
TOOL_RIGHT = ([OK_CALL, ANS_A], "A")  # base 1.0
TOOL_WRONG = ([OK_CALL, ANS_A], "B")  # base 0.1
DIRECT_RIGHT = ([ANS_A], "A")  # base 1.0
DIRECT_WRONG = ([ANS_A], "B")  # base 0.1

TOOL_TERM_CASES = [
  # (name, config, trajectory, batch rate, expected tool term)
  ("bonus at the target rate", BONUS, TOOL_RIGHT, 0.5, 0.5),
  ("bonus at rate 0", BONUS, TOOL_RIGHT, 0.0, 0.5),
  ("no bonus above the target", BONUS, TOOL_RIGHT, 0.51, 0.0),
  ("no bonus when wrong", BONUS, TOOL_WRONG, 0.5, 0.0),
  ("no bonus without the tool", BONUS, DIRECT_RIGHT, 0.5, 0.0),
  ("incorrect mode: wrong", dataclasses.replace(BONUS, penalize_mode="incorrect"), TOOL_WRONG, 0.5, 0.5),
  ("incorrect mode: right", dataclasses.replace(BONUS, penalize_mode="incorrect"), TOOL_RIGHT, 0.5, 0.0),
  ("incorrect mode: no tool", dataclasses.replace(BONUS, penalize_mode="incorrect"), DIRECT_WRONG, 0.5, 0.0),
  ("all mode: right", dataclasses.replace(BONUS, penalize_mode="all"), TOOL_RIGHT, 0.5, 0.5),
  ("all mode: wrong", dataclasses.replace(BONUS, penalize_mode="all"), TOOL_WRONG, 0.5, 0.5),
  ("all mode: no tool", dataclasses.replace(BONUS, penalize_mode="all"), DIRECT_RIGHT, 0.5, 0.0),
  ("all mode: above the target", dataclasses.replace(BONUS, penalize_mode="all"), TOOL_WRONG, 0.6, 0.0),
  ("none mode", dataclasses.replace(BONUS, penalize_mode="none"), TOOL_RIGHT, 0.0, 0.0),
  # The original's "all" branch alone also requires target > 0.
  ("target 0: correct mode", dataclasses.replace(BONUS, target_tool_call_rate=0.0), TOOL_RIGHT, 0.0, 0.5),
  ("target 0: all mode", dataclasses.replace(BONUS, target_tool_call_rate=0.0, penalize_mode="all"), TOOL_RIGHT,
   0.0, 0.0),
  ("a positive penalty", R.RewardConfig(tool_call_penalty=0.3), TOOL_RIGHT, 1.0, -0.3),
  ("per turn: 2 calls", R.RewardConfig(penalty_per_turn=0.1), ([OK_CALL, CALL_8, ANS_A], "A"), 1.0, -0.2),
  ("per turn plus bonus", dataclasses.replace(BONUS, penalty_per_turn=0.1), ([OK_CALL, CALL_8, ANS_A], "A"), 0.5,
   0.3),
  ("frames 12 > target 10", R.RewardConfig(tool_call_frame_target=10, tool_call_frame_num_penalty=0.3),
   ([OK_CALL, CALL_8, ANS_A], "A"), 1.0, -0.3),
  ("frames 12 = target 12", R.RewardConfig(tool_call_frame_target=12, tool_call_frame_num_penalty=0.3),
   ([OK_CALL, CALL_8, ANS_A], "A"), 1.0, 0.0),
  ("frames 4 < target 10", R.RewardConfig(tool_call_frame_target=10, tool_call_frame_num_penalty=0.3),
   TOOL_RIGHT, 1.0, 0.0),
  ("frames 4 > target 0", R.RewardConfig(tool_call_frame_num_penalty=0.3), TOOL_RIGHT, 1.0, -0.3),
]


@pytest.mark.parametrize("name,cfg,traj,rate,term", TOOL_TERM_CASES, ids=[c[0] for c in TOOL_TERM_CASES])
def test_tool_term(name, cfg, traj, rate, term):
  turns, gt = traj
  base = 1.0 if R.judge_multi_choice(turns, gt) else 0.1  # every trajectory here is well formatted
  got = score(turns, gt, cfg, rate=rate)
  assert got["tool_term"] == pytest.approx(term, abs=1e-12)
  assert got["score"] == pytest.approx(base + term, abs=1e-12)


def test_a_failed_call_counts_as_tool_use_unless_told_otherwise():
  turns = [CALL_17, ANS_A]  # the call asked for too many frames: no frames came, format 0
  assert score(turns, "A", BONUS, rate=0.0, used_tool=False)["score"] == pytest.approx(0.9 + 0.5)  # the original
  strict = dataclasses.replace(BONUS, count_failed_calls=False)
  assert score(turns, "A", strict, rate=0.0, used_tool=False)["score"] == 0.9
  assert score(turns, "A", strict, rate=0.0, used_tool=True)["score"] == pytest.approx(0.9 + 0.5)


def test_forced_tool_call():
  cfg = R.RewardConfig(forced_tool_call=True)
  got = score(*DIRECT_RIGHT, cfg)
  assert (got["score"], got["tool_term"], got["acc"], got["format"]) == (0.0, 0.0, 1.0, 1.0)
  assert score(*TOOL_RIGHT, cfg)["score"] == 1.0
  assert score(*TOOL_WRONG, cfg)["score"] == 0.1
  strict = dataclasses.replace(cfg, count_failed_calls=False)
  assert score(*TOOL_RIGHT, strict, used_tool=False)["score"] == 0.0
  assert score(*TOOL_RIGHT, strict, used_tool=True)["score"] == 1.0


def test_penalty_anneal():
  cfg = R.RewardConfig(float_penalty=True, start_penalty=0.0, end_penalty=-1.0, anneal_steps=100,
                       tool_call_penalty=7.0)  # ignored while annealing
  for step, expected in [(0, 0.0), (25, -0.25), (50, -0.5), (100, -1.0), (250, -1.0)]:
    assert cfg.penalty_at(step) == pytest.approx(expected, abs=1e-12), step
  assert score(*TOOL_RIGHT, cfg, rate=0.0, step=50)["score"] == pytest.approx(1.5)
  assert score(*TOOL_RIGHT, cfg, rate=0.0, step=0)["score"] == 1.0
  assert R.RewardConfig(tool_call_penalty=-0.5).penalty_at(1000) == -0.5
  with pytest.raises(ValueError, match="anneal_steps"):
    R.RewardConfig(float_penalty=True, anneal_steps=0)
  with pytest.raises(ValueError, match="step"):
    cfg.penalty_at(-1)


# ---------------------------------------------------------------------------------------------- batch
def test_score_batch_measures_the_tool_rate_and_gates_on_it():
  turns = [TOOL_RIGHT[0], DIRECT_RIGHT[0], DIRECT_RIGHT[0], DIRECT_WRONG[0]]
  gts, types = ["A", "A", "A", "B"], ["multiple_choice"] * 4
  out = R.score_batch(turns, gts, types, [True, False, False, False], BONUS)
  assert [o["success_tool_call_rate"] for o in out] == [0.25] * 4
  assert [o["score"] for o in out] == [1.5, 1.0, 1.0, 0.1]
  # 3 of 4 received frames: 0.75 > 0.5, the bonus is off.
  out = R.score_batch(turns, gts, types, [True, True, True, False], BONUS)
  assert [o["score"] for o in out] == [1.0, 1.0, 1.0, 0.1]
  assert out[0]["success_tool_call_rate"] == 0.75
  # The original gated on the previous step's rate: given explicitly, it decides; the batch's rate is reported.
  out = R.score_batch(turns, gts, types, [True, True, True, False], BONUS, gate_rate=0.25)
  assert [o["score"] for o in out] == [1.5, 1.0, 1.0, 0.1]
  assert out[0]["success_tool_call_rate"] == 0.75
  assert R.score_batch([], [], [], [], BONUS) == []


def test_score_batch_names_bad_inputs():
  with pytest.raises(ValueError, match="used_tool"):
    R.score_batch([[ANS_A]], ["A"], ["multiple_choice"], [], BONUS)
  with pytest.raises(ValueError, match="trajectory 1: .*'free_text'"):
    R.score_batch([[ANS_A], [ANS_A]], ["A", "A"], ["multiple_choice", "free_text"], [False, False], BONUS)
  with pytest.raises(ValueError, match="gate_rate"):
    R.score_batch([[ANS_A]], ["A"], ["multiple_choice"], [False], BONUS, gate_rate=1.5)


def test_validation_score_is_acc_plus_format_without_tool_terms():
  cfg = dataclasses.replace(BONUS, forced_tool_call=True, penalty_per_turn=0.1)
  got = R.validation_score(*TOOL_RIGHT, "multiple_choice", cfg)
  assert (got["score"], got["acc"], got["format"], got["tool_term"]) == (2.0, 1.0, 1.0, 0.0)
  assert R.validation_score(["<answer>A</answer>"], "A", "multiple_choice")["score"] == 1.0
  assert R.validation_score(*DIRECT_WRONG, "multiple_choice", cfg)["score"] == 1.0  # format only


# ---------------------------------------------------------------------------------------------- config
def test_config_from_dict():
  cfg = R.RewardConfig.from_dict({"tool_call_penalty": -0.5, "target_tool_call_rate": 0.5, "penalize_mode": "all"})
  assert (cfg.tool_call_penalty, cfg.target_tool_call_rate, cfg.penalize_mode) == (-0.5, 0.5, "all")
  assert (cfg.acc_reward_weight, cfg.format_reward_weight) == (0.9, 0.1)
  with pytest.raises(ValueError, match=r"\['tool_call_penalti'\]"):
    R.RewardConfig.from_dict({"tool_call_penalti": -0.5})
  with pytest.raises(ValueError, match="penalize_mode here"):
    R.RewardConfig.from_dict({"penalize_correct_tool_call": True})
  with pytest.raises(ValueError, match="penalize_mode must be one of"):
    R.RewardConfig(penalize_mode="wrong")
  with pytest.raises(ValueError, match="letter_pattern"):
    R.RewardConfig(letter_pattern="([A-Z]")
  with pytest.raises(ValueError, match="success_tool_call_rate"):
    score(*TOOL_RIGHT, rate=-0.1)
