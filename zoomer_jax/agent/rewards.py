"""The GRPO reward: answer accuracy, tool-call format, and the tool-use term (docs/training.md, Rewards).

A trajectory is scored from its assistant turns (`Trajectory.turns`: each turn's text with special tokens
removed, as the original's reward manager decodes them):

  score = acc_reward_weight * acc + format_reward_weight * format + tool_term

  * `acc` (0/1): multiple choice by the original's rule (`judge_multi_choice`); open-ended by a normalised
    exact match (`judge_open_ended`), standing in for the original's GPT-4o judge.
  * `format` (0/1): every non-final turn a well-formed call of an enabled tool (the zoom by default; each tool
    judges its own call, `Tool.requested_frames`), the final turn a well-formed answer (`format_reward`).
  * `tool_term`: minus the "penalty" of the original's `tool_call_extra_reward.py` (a negative penalty is a
    bonus), applied to trajectories that used the tool, of the chosen kind (correct / incorrect / all), while
    the batch's tool-use rate is at most `target_tool_call_rate`.

Everything follows the original's code (`openr1.py`, `toolcall_format.py`, `tool_call_extra_reward.py`,
`ray_trainer.py`); the few deviations are marked "Deviation:" where they occur. Training (`train.grpo`) and
evaluation (`eval.harness`) both score with this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
import unicodedata
from typing import Mapping, Sequence

from zoomer_jax import tools as T

ANSWER_TYPES = ("multiple_choice", "open_ended")
PENALIZE_MODES = ("correct", "incorrect", "all", "none")

_DIRECT_ANSWER = re.compile(r"<think>.*</think>.*<answer>.*</answer>", re.DOTALL)  # the whole (stripped) turn
_BOXED = r"\boxed{"


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward settings, named as verl's `reward_model.*` / `trainer.*` keys; defaults are the released script's.

  penalize_mode: which trajectories that used the tool get the tool term - "correct" (verl
    `penalize_correct_tool_call=True`, the default), "incorrect" (`penalize_incorrect_tool_call=True` alone),
    "all" (both True), "none" (both False, as the original's validation reward).
  tool_call_frame_target / tool_call_frame_num_penalty: the frame penalty applies when the requested frames
    exceed the target (the original's `frames >= target + 1e-4`). A target of 0 therefore hits every
    trajectory that requested a frame; the term is off when `tool_call_frame_num_penalty` is 0 (the default).
  float_penalty: anneal `tool_call_penalty` linearly from `start_penalty` to `end_penalty` over
    `anneal_steps` trainer steps (`penalty_at`).
  tool_call_max_frames: the per-call frame limit of the format check; keep it equal to
    `ToolConfig.tool_call_max_frames` (the original passed the rollout's value in).
  tools: the enabled tools, whose calls the format check accepts; keep it equal to `ToolConfig.tools`.
  count_failed_calls: ours, not verl's. True (the original): a trajectory "used the tool", for the mode gate
    and for `forced_tool_call`, when any non-final turn holds a tool call, even one that failed.
    False: only when a tool's frames actually arrived (`used_tool`).
  """

  acc_reward_weight: float = 0.9
  format_reward_weight: float = 0.1
  tool_call_penalty: float = 0.0  # subtracted; -0.5 was the authors' internal +0.5 bonus
  target_tool_call_rate: float = 1.0
  penalize_mode: str = "correct"
  penalty_per_turn: float = 0.0  # subtracted once per tool call
  tool_call_frame_target: int = 0
  tool_call_frame_num_penalty: float = 0.0
  forced_tool_call: bool = False  # reward 0 for a trajectory that never used the tool
  letter_pattern: str = r"([A-Z])\."  # the eval scripts used ([A-F])\.
  float_penalty: bool = False
  start_penalty: float = 0.0
  end_penalty: float = 0.0
  anneal_steps: int = 0
  tool_call_max_frames: int = 16
  count_failed_calls: bool = True
  tools: tuple[str, ...] = T.DEFAULT

  def __post_init__(self):
    object.__setattr__(self, "tools", tuple(self.tools))
    T.enabled(self.tools)
    if self.penalize_mode not in PENALIZE_MODES:
      raise ValueError(f"penalize_mode must be one of {PENALIZE_MODES}, got {self.penalize_mode!r}")
    for name in ("acc_reward_weight", "format_reward_weight", "tool_call_penalty", "target_tool_call_rate",
                 "penalty_per_turn", "tool_call_frame_num_penalty", "start_penalty", "end_penalty"):
      if not math.isfinite(getattr(self, name)):
        raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
    if self.float_penalty and self.anneal_steps < 1:
      raise ValueError(f"float_penalty needs anneal_steps >= 1, got {self.anneal_steps}")
    if self.tool_call_max_frames < 1:
      raise ValueError(f"tool_call_max_frames must be >= 1, got {self.tool_call_max_frames}")
    try:
      re.compile(self.letter_pattern)
    except re.error as e:
      raise ValueError(f"letter_pattern {self.letter_pattern!r} is not a valid regex: {e}") from None

  @classmethod
  def from_dict(cls, d: Mapping) -> "RewardConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      hint = ""
      if {"penalize_correct_tool_call", "penalize_incorrect_tool_call"} & set(unknown):
        hint = " (verl's penalize_correct_tool_call/penalize_incorrect_tool_call are penalize_mode here)"
      raise ValueError(f"unknown reward config keys {unknown}{hint}; known: {sorted(names)}")
    return cls(**dict(d))

  def penalty_at(self, step: int) -> float:
    """`tool_call_penalty`, or with `float_penalty` the annealed value at trainer step `step` (the original
    counts steps from 1): start + min(1, step/anneal_steps) * (end - start)."""
    if not self.float_penalty:
      return self.tool_call_penalty
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return self.start_penalty + min(1.0, step / self.anneal_steps) * (self.end_penalty - self.start_penalty)


# ---------------------------------------------------------------------------------------------- accuracy
def _joined(turns: Sequence[str]) -> str:
  if isinstance(turns, str):
    raise TypeError("turns must be a sequence of assistant turn strings, got one str")
  return " ".join(turns)


def _answer_span(text: str) -> str:
  """The original's candidate: after the last <answer>, up to the next </answer> (or the end), stripped.
  Without any <answer> this is the text up to its first </answer> - in practice the whole text."""
  return text.split("<answer>")[-1].split("</answer>")[0].strip()


def extract_answer(turns: Sequence[str]) -> str | None:
  """The turns joined with spaces; the stripped text between the last `<answer>` and the next `</answer>`
  (the rest of the text if that tag is never closed). None when there is no `<answer>` at all."""
  text = _joined(turns)
  return _answer_span(text) if "<answer>" in text else None


def extract_boxed(text: str) -> str | None:
  r"""The brace-matched content of the last `\boxed{`, stripped (as mathruler's `extract_boxed_content`).

  Deviation: None when there is no complete box, where mathruler returns the string "None" (which would
  match a ground truth "None")."""
  start = text.rfind(_BOXED)
  if start == -1:
    return None
  depth = 0
  content = text[start + len(_BOXED):]
  for i, ch in enumerate(content):
    depth += (ch == "{") - (ch == "}")
    if depth == -1:
      return content[:i].strip()
  return None


def _ground_truth(ground_truth: str) -> str:
  if not isinstance(ground_truth, str) or not ground_truth:
    raise ValueError(f"ground truth must be a non-empty string, got {ground_truth!r}")
  return ground_truth[:-1] if ground_truth.endswith(".") else ground_truth


def judge_multi_choice(turns: Sequence[str], ground_truth: str, letter_pattern: str = r"([A-Z])\.") -> float:
  r"""1.0 if the answer is the ground truth option, else 0.0 (the original's `judge_multi_choice`).

  One trailing "." is removed from the ground truth ("A." -> "A"). The candidate is the text between the last
  `<answer>` and the next `</answer>`, stripped. It is correct when the candidate equals the ground truth,
  or the last `\boxed{...}` in it does, or the last match of `letter_pattern` in it does ("B. xxx" -> "B").

  No `<answer>` tag: as in the original, the candidate is then the whole joined text (up to a stray
  `</answer>`), so "B." anywhere in the reasoning still counts (docs/training.md, Rewards).
  """
  gt = _ground_truth(ground_truth)
  candidate = _answer_span(_joined(turns))
  if candidate == gt or extract_boxed(candidate) == gt:
    return 1.0
  matches = re.findall(letter_pattern, candidate, re.MULTILINE)
  return 1.0 if matches and matches[-1] == gt else 0.0


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_NOT_DECIMAL = re.compile(r"(?<!\d)[.,]|[.,](?!\d)")  # "." or "," unless between two digits


def normalize_answer(text: str) -> str:
  """Lower case; punctuation removed (a "." or "," between digits is kept, so 3.5 != 35); the articles
  a/an/the removed; whitespace collapsed to single spaces (SQuAD-style)."""
  text = _PUNCT_NOT_DECIMAL.sub("", text.lower())
  text = "".join(ch for ch in text if ch in ".," or not (ch in string.punctuation
                                                          or unicodedata.category(ch).startswith("P")))
  return " ".join(_ARTICLES.sub(" ", text).split())


def judge_open_ended(turns: Sequence[str], ground_truth: str | Sequence[str]) -> float:
  r"""1.0 if the answer matches the ground truth after `normalize_answer`, else 0.0.

  Deviation: the original asks a GPT-4o judge for "Score: 0/1"; we cannot call it, so this is a normalised
  exact match - stricter than a judge (paraphrases and synonyms score 0). The candidate is the original's
  (the `<answer>` content, or the whole text without a tag); a `\boxed{...}` inside it is also tried.
  `ground_truth` may be a list of accepted answers (any one matches).
  """
  truths = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
  targets = set()
  for t in truths:
    norm = normalize_answer(t) if isinstance(t, str) else ""
    if not norm:
      raise ValueError(f"open-ended ground truth {t!r} is empty after normalisation")
    targets.add(norm)
  candidate = _answer_span(_joined(turns))
  boxed = extract_boxed(candidate)
  hits = normalize_answer(candidate) in targets or (boxed is not None and normalize_answer(boxed) in targets)
  return 1.0 if hits else 0.0


# ---------------------------------------------------------------------------------------------- format
@dataclasses.dataclass(frozen=True)
class FormatResult:
  score: float  # 0.0 or 1.0
  tool_call_count: int  # turns holding a tool call, counted as the original counts them
  requested_frames: int  # sum of the frames the well-formed calls ask for (a zoom: int(fps*(end-start)))


def _direct_answer_ok(turn: str, tools) -> bool:
  """<think>...</think>...<answer>...</answer> as the whole turn, one answer pair, no tool's opening tag."""
  return (_DIRECT_ANSWER.fullmatch(turn) is not None and turn.count("<answer>") == 1
          and turn.count("</answer>") == 1 and not any(t.open in turn for t in tools))


@functools.cache
def _tool_turn(tool: T.Tool) -> re.Pattern:
  """<think>...</think>...<tag>...</tag>, matched as a prefix of the turn."""
  return re.compile(f"<think>.*</think>.*{re.escape(tool.open)}.*{re.escape(tool.close)}", re.DOTALL)


def _tool_turn_frames(turn: str, max_frames: int, tools) -> int | None:
  """The frame count of a well-formed tool turn, None if the turn is not one: exactly one enabled tool's tags
  appear, the turn starts <think>...</think>...<tag>...</tag>, has one call pair, no answer tags, and the tool
  accepts its (last) call by the original's looser rule (`Tool.requested_frames`) with at most max_frames."""
  named = [t for t in tools if t.open in turn]
  if len(named) != 1 or "<answer>" in turn or "</answer>" in turn:
    return None
  tool = named[0]
  bodies = tool.find(turn)
  n = tool.requested_frames(bodies[-1][1]) if bodies else None
  ok = (n is not None and n <= max_frames and _tool_turn(tool).match(turn) is not None
        and turn.count(tool.open) == 1 and turn.count(tool.close) == 1)
  return n if ok else None


def format_reward(turns: Sequence[str], tool_call_max_frames: int = 16,
                  tools: Sequence[str] = T.DEFAULT) -> FormatResult:
  """Binary format score of a trajectory (the original's `toolcall_format.format_reward`; docs/training.md).

  Single turn: the stripped turn is a direct answer (`_direct_answer_ok`); `tool_call_count` is 1 if it
  holds a call (a call made in the last round), else 0.
  Several turns: each non-final stripped turn is a well-formed tool turn (`_tool_turn_frames`) and the
  final stripped turn a direct answer. As in the original, non-final turns are examined in order up to the
  first malformed one: `tool_call_count` counts the calls among the turns examined (the malformed one
  included), `requested_frames` sums the counts of the well-formed ones before it.
  No turns at all (a video that failed to load): score 0, no calls.
  `tools` names the enabled tools (default: the zoom); a call of a tool not enabled is no call.

  Deviation: the original does not strip the final turn of a multi-turn trajectory (leading whitespace, or
  trailing whitespace beyond one newline, failed it); here every turn is stripped, as docs/training.md states.
  """
  if isinstance(turns, str):
    raise TypeError("turns must be a sequence of assistant turn strings, got one str")
  tools = T.enabled(tools)
  turns = [t.strip() for t in turns]
  has_call = lambda turn: any(t.has_call(turn) for t in tools)
  if not turns:
    return FormatResult(0.0, 0, 0)
  if len(turns) == 1:
    calls = 1 if has_call(turns[0]) else 0
    return FormatResult(1.0 if _direct_answer_ok(turns[0], tools) else 0.0, calls, 0)
  calls, frames, tools_ok = 0, 0, True
  for turn in turns[:-1]:
    if has_call(turn):
      calls += 1
    n = _tool_turn_frames(turn, tool_call_max_frames, tools)
    if n is None:
      tools_ok = False
      break
    frames += n
  ok = tools_ok and _direct_answer_ok(turns[-1], tools)
  return FormatResult(1.0 if ok else 0.0, calls, frames)


# ---------------------------------------------------------------------------------------------- score
def used_tool(calls: Sequence[dict]) -> bool:
  """Whether a trajectory's call records (`Tool.log`) show frames that arrived (the original's 'successful tool
  call')."""
  return any(c.get("frames", 0) > 0 for c in calls)


def judge(turns: Sequence[str], ground_truth, answer_type: str, letter_pattern: str = r"([A-Z])\.") -> float:
  """Accuracy (0/1) by answer type: "multiple_choice" or "open_ended"."""
  if answer_type == "multiple_choice":
    return judge_multi_choice(turns, ground_truth, letter_pattern)
  if answer_type == "open_ended":
    return judge_open_ended(turns, ground_truth)
  raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


def _tool_term(cfg: RewardConfig, acc: float, fmt: FormatResult, used: bool, rate: float, step: int) -> float:
  """Minus the original's tool penalty when the gate is open, else 0 (subtracted term by term, as the original)."""
  if not used or rate > cfg.target_tool_call_rate:
    return 0.0
  mode = cfg.penalize_mode
  if mode == "none" or (mode == "correct" and acc != 1) or (mode == "incorrect" and acc != 0):
    return 0.0
  if mode == "all" and not cfg.target_tool_call_rate > 0:  # the original's extra condition in this mode only
    return 0.0
  extra = 0.0
  extra -= cfg.penalty_at(step)
  extra -= cfg.penalty_per_turn * fmt.tool_call_count
  extra -= cfg.tool_call_frame_num_penalty if fmt.requested_frames >= cfg.tool_call_frame_target + 1e-4 else 0.0
  return extra


def _check_rate(rate: float, name: str) -> float:
  rate = float(rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {rate}")
  return rate


def score_trajectory(turns: Sequence[str], ground_truth, answer_type: str, cfg: RewardConfig, *,
                     success_tool_call_rate: float, used_tool: bool, step: int = 0) -> dict:
  """The training reward of one trajectory.

  success_tool_call_rate: the fraction of the batch that received a tool's frames (gates the tool term).
  used_tool: whether this trajectory received a tool's frames (`used_tool`; see `RewardConfig.count_failed_calls`).
  step: the trainer step, for the annealed penalty.
  Returns {score, acc, format, tool_term, tool_call_count, requested_frames}; `acc` and `format` are the
  unweighted 0/1 values. With `forced_tool_call` and no tool use the score and tool_term are 0 (the original
  also zeroed its logged acc/format; here they keep the judged values).
  """
  rate = _check_rate(success_tool_call_rate, "success_tool_call_rate")
  acc = judge(turns, ground_truth, answer_type, cfg.letter_pattern)
  fmt = format_reward(turns, cfg.tool_call_max_frames, cfg.tools)
  used = fmt.tool_call_count > 0 if cfg.count_failed_calls else bool(used_tool)
  out = dict(acc=acc, format=fmt.score, tool_call_count=fmt.tool_call_count, requested_frames=fmt.requested_frames)
  if cfg.forced_tool_call and not used:
    return dict(out, score=0.0, tool_term=0.0)
  tool_term = _tool_term(cfg, acc, fmt, used, rate, step)
  score = cfg.acc_reward_weight * acc + cfg.format_reward_weight * fmt.score
  return dict(out, score=score + tool_term, tool_term=tool_term)


def score_batch(trajectories_turns: Sequence[Sequence[str]], ground_truths: Sequence, answer_types: Sequence[str],
                used_tool: Sequence[bool], cfg: RewardConfig, step: int = 0,
                gate_rate: float | None = None) -> list[dict]:
  """Scores a generation batch. Each dict is `score_trajectory`'s plus `success_tool_call_rate`, this batch's
  fraction of trajectories that received a tool's frames.

  gate_rate: the rate that gates the tool term; None uses this batch's own rate. The original gated a batch
  with the rate measured on the previous training step's batches (0.0 before the first); pass that here to
  reproduce it.
  """
  n = len(trajectories_turns)
  lengths = dict(ground_truths=len(ground_truths), answer_types=len(answer_types), used_tool=len(used_tool))
  bad = {k: v for k, v in lengths.items() if v != n}
  if bad:
    raise ValueError(f"score_batch got {n} trajectories but lengths {bad}")
  if n == 0:
    return []
  rate = sum(bool(u) for u in used_tool) / n
  gate = rate if gate_rate is None else _check_rate(gate_rate, "gate_rate")
  out = []
  for i in range(n):
    try:
      r = score_trajectory(trajectories_turns[i], ground_truths[i], answer_types[i], cfg,
                           success_tool_call_rate=gate, used_tool=used_tool[i], step=step)
    except (ValueError, TypeError) as e:
      raise type(e)(f"trajectory {i}: {e}") from e
    out.append(dict(r, success_tool_call_rate=rate))
  return out


def validation_score(turns: Sequence[str], ground_truth, answer_type: str, cfg: RewardConfig = RewardConfig()) -> dict:
  """The original's validation reward: acc + format (both weights 1.0), no tool term, no forced tool use.
  Only `cfg.letter_pattern`, `cfg.tool_call_max_frames` and `cfg.tools` are used. The reported accuracy is `acc`."""
  val = dataclasses.replace(cfg, acc_reward_weight=1.0, format_reward_weight=1.0, penalize_mode="none",
                            forced_tool_call=False, float_penalty=False)
  return score_trajectory(turns, ground_truth, answer_type, val, success_tool_call_rate=0.0, used_tool=False)
