"""Benchmark evaluation: the agent over a list of `Task`s in batches, scored, summarised, every trajectory dumped.

    tasks = read_benchmark("videomme", ".../test-00000-of-00001.parquet", ".../data")
    report = evaluate(model, tok, tasks, AgentConfig(), batch_size=8, out_jsonl="out/eval/videomme_tool.jsonl")
    print(report.to_table())

Decoding is greedy (temperature 0), one sample per question, as the original's validation;
whatever `agent_cfg.sampling.temperature` says is replaced by 0. `evaluate(..., temperature=T, samples=k)`
instead draws k trajectories per question at temperature T (the mode is then named e.g. "tool@T1x4"): its
accuracy is the mean over all k x n trajectories (avg@k), the expected reward of the sampling policy that RL
trains, each JSONL line carrying its `sample` index.

Two modes:

  * `use_tool=True`: the agent (`agent/engine.py`, the continuous engine) with `agent_cfg.tool`'s tools and budgets.
  * `use_tool=False`: the no-tool baseline, given the frame budget of the tool run. A tool run sees its overview
    (at most `frames_upbound` frames) plus at most `tool_call_max_frames` per call in each of its first
    `max_generation_round - 1` rounds (the last round never runs the tool), all capped by `max_total_frames`:
    `frame_budget(tool)` = min(max_total_frames, frames_upbound + (max_generation_round-1) * tool_call_max_frames),
    128 with the original's settings (64 + 4 x 16). The baseline's overview is that many frames spread evenly
    over the whole video (`linspace(0, N-1, budget)`, every frame for a video with fewer), whatever the video's
    length; the tool run's 0.5 fps overview holds fewer for videos under 2 x frames_upbound seconds, so the
    baseline never sees fewer frames than the tool run could have. It answers in one round under a system
    prompt without the tool (`agent/prompts/system_prompt_notool.txt`); a tool call it writes anyway is
    never executed (the trajectory ends, finish reason "round_limit"). This is `no_tool_config`. The original's
    own baseline (`eval_video_notool.sh`: "You are a helpful assistant.", native video input at 0.2 fps, at
    most 120 frames) is not reproduced: ours keeps the frames-as-images input of the tool run, so the two runs
    differ only in the tool.

Scoring (docs/training.md, Rewards): `acc` is `agent.rewards.judge_multi_choice` on the assistant turns
against the answer letter, `format` is `format_reward(turns, tool_call_max_frames, tools).score`, and
`score = acc + format` (the original's validation weights). Accuracy is the mean `acc`, per data_source and
overall. A sample whose video cannot be read (or whose batch fails on it) counts as wrong, is listed under
`errors`, and the run goes on.

JSONL (one line per task, in task order; the original's dump fields under the same names where they
exist): id, data_source, video, mode, ground_truth, prediction, acc, format, score, finish_reason, rounds,
frames (all images shown), zoom_frames (the images tool calls showed), tool_calls (calls executed),
tool_errors, requested_tool_calls (format_reward's count), calls (the tool log), turns, input (the prompt),
output (everything after it: turns and observations), prompt_len, response_len (tokens), error. In
`input`/`output` each image's vision tokens are written as one `<image>`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import time
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from zoomer_jax.agent.protocol import ToolConfig
from zoomer_jax.agent.engine import EngineConfig, continuous_rollout
from zoomer_jax.agent.replicas import replica_engines, replicated_rollout
from zoomer_jax.agent.rollout import AgentConfig, Task, Trajectory, sized_for_joining
from zoomer_jax.agent.rewards import format_reward, judge_multi_choice
from zoomer_jax.video import VideoError

NO_TOOL_PROMPT = "system_prompt_notool.txt"  # in agent/prompts/
DENSE_FPS = 1e9  # an overview rate above any video's own: every frame is a candidate, frames_upbound decides
_VISION = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>|<\|video_pad\|>)*<\|vision_end\|>")

Script = Callable[[Task, int], "str | None"]


# ---------------------------------------------------------------------------------------------- configs
def frame_budget(tool: ToolConfig) -> int:
  """The most frames one tool-run trajectory can be shown (see the module docstring)."""
  return min(tool.max_total_frames, tool.frames_upbound + (tool.max_generation_round - 1) * tool.tool_call_max_frames)


def no_tool_config(cfg: AgentConfig, system_prompt: str = NO_TOOL_PROMPT) -> AgentConfig:
  """The no-tool baseline of `cfg`: one round, an overview of `frame_budget(cfg.tool)` evenly spread frames."""
  budget = frame_budget(cfg.tool)
  tool = dataclasses.replace(cfg.tool, max_generation_round=1, frames_upbound=budget, max_total_frames=budget,
                             video_fps=DENSE_FPS, system_prompt=system_prompt, last_round_hint=False)
  return dataclasses.replace(cfg, tool=tool)


def greedy(cfg: AgentConfig) -> AgentConfig:
  return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, temperature=0.0))


# ---------------------------------------------------------------------------------------------- scoring
def _text(tok, ids) -> str:
  return _VISION.sub("<image>", tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False))


def _error_record(task: Task, mode: str, message: str, reason: str) -> dict:
  return dict(id=task.id, data_source=task.data_source, video=task.video, mode=mode, ground_truth=task.answer,
              prediction=None, acc=0.0, format=0.0, score=0.0, finish_reason=reason, rounds=0, frames=0,
              zoom_frames=0, tool_calls=0, tool_errors=0, requested_tool_calls=0, calls=[], turns=[], input="",
              output="", prompt_len=0, response_len=0, error=message)


def score_trajectory(traj: Trajectory, tok, mode: str, tool: ToolConfig) -> dict:
  """One JSONL record (see the module docstring) of a finished trajectory."""
  task = traj.task
  if traj.finish_reason == "video_error":
    message = traj.calls[0].get("error", "video error") if traj.calls else "video error"
    return _error_record(task, mode, message, "video_error")
  acc = judge_multi_choice(traj.turns, task.answer)
  fmt = format_reward(traj.turns, tool.tool_call_max_frames, tool.tools)
  generated = np.flatnonzero(traj.response_mask)
  prompt_len = int(generated[0]) if generated.size else len(traj.ids)
  zooms = [c for c in traj.calls if "frames" in c]
  return dict(id=task.id, data_source=task.data_source, video=task.video, mode=mode, ground_truth=task.answer,
              prediction=traj.answer, acc=float(acc), format=float(fmt.score), score=float(acc + fmt.score),
              finish_reason=traj.finish_reason, rounds=traj.rounds, frames=traj.n_frames,
              zoom_frames=sum(c["frames"] for c in zooms), tool_calls=len(zooms),
              tool_errors=sum("error" in c for c in traj.calls), requested_tool_calls=fmt.tool_call_count,
              calls=traj.calls, turns=traj.turns, input=_text(tok, traj.ids[:prompt_len]),
              output=_text(tok, traj.ids[prompt_len:]), prompt_len=prompt_len,
              response_len=len(traj.ids) - prompt_len, error=None)


# ---------------------------------------------------------------------------------------------- report
def _mean(xs) -> float:
  xs = list(xs)
  return float(sum(xs) / len(xs)) if xs else 0.0


@dataclasses.dataclass
class Report:
  """Summary of one evaluation. Accuracies are fractions in [0, 1]; errors count as wrong answers.

  Trajectory means (tool calls, frames, rounds) are over the samples that ran (errors left out).
  """

  mode: str
  n: int
  accuracy: float
  per_source: dict  # data_source -> {n, correct, accuracy, errors}
  format: float  # mean format score
  mean_tool_calls: float  # executed tool calls per trajectory
  tool_use_rate: float  # fraction of trajectories with at least one executed tool call
  mean_tool_errors: float
  mean_frames: float  # images shown per trajectory (overview and zooms)
  rounds: dict  # assistant turns -> {count, accuracy}
  finish_reasons: dict  # reason -> count
  errors: list  # [{id, video, error}]
  frame_budget: int  # frames a trajectory may be shown
  agent: dict  # the ToolConfig used
  wall_s: float = 0.0
  out_jsonl: str | None = None
  records: list = dataclasses.field(default_factory=list, repr=False)  # the JSONL lines (not in to_dict)
  # What the benchmark's files held besides these tasks (set by `main`): [{id, reason, action}] of dirty
  # records ("resolved": kept, scored as the benchmark's scorer does; "skipped": left out), and [{video, ids}]
  # of the tasks left out because their video is missing (`benchmark.allow_missing_videos`).
  dirty: list = dataclasses.field(default_factory=list)
  missing_videos: list = dataclasses.field(default_factory=list)

  @classmethod
  def from_records(cls, records: Sequence[dict], mode: str, tool: ToolConfig, **extra) -> Report:
    ran = [r for r in records if r["error"] is None]
    per_source = {}
    for src in sorted({r["data_source"] for r in records}):
      rs = [r for r in records if r["data_source"] == src]
      correct = sum(r["acc"] for r in rs)
      per_source[src] = dict(n=len(rs), correct=correct, accuracy=correct / len(rs),
                             errors=sum(r["error"] is not None for r in rs))
    rounds = {}
    for k in sorted({r["rounds"] for r in ran}):
      rs = [r for r in ran if r["rounds"] == k]
      rounds[k] = dict(count=len(rs), accuracy=_mean(r["acc"] for r in rs))
    return cls(mode=mode, n=len(records), accuracy=_mean(r["acc"] for r in records), per_source=per_source,
               format=_mean(r["format"] for r in records), mean_tool_calls=_mean(r["tool_calls"] for r in ran),
               tool_use_rate=_mean(r["tool_calls"] > 0 for r in ran),
               mean_tool_errors=_mean(r["tool_errors"] for r in ran), mean_frames=_mean(r["frames"] for r in ran),
               rounds=rounds, finish_reasons=dict(collections.Counter(r["finish_reason"] for r in records)),
               errors=[dict(id=r["id"], video=r["video"], error=r["error"]) for r in records if r["error"]],
               frame_budget=frame_budget(tool),
               agent=dataclasses.asdict(tool), records=list(records), **extra)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("records")
    d["rounds"] = {str(k): v for k, v in self.rounds.items()}
    return d

  def to_table(self) -> str:
    width = max([len("data_source"), len("overall")] + [len(s) for s in self.per_source])
    lines = [f"evaluation ({self.mode}): {self.n} tasks, {len(self.errors)} errors, frame budget "
             f"{self.frame_budget}, {self.wall_s:.1f} s",
             f"{'data_source':<{width}}  {'n':>6}  {'correct':>7}  {'errors':>6}  {'acc %':>6}"]
    rows = list(self.per_source.items())
    total = dict(n=self.n, correct=sum(v["correct"] for _, v in rows), accuracy=self.accuracy,
                 errors=len(self.errors))
    for name, v in rows + [("overall", total)]:
      lines.append(f"{name:<{width}}  {v['n']:>6}  {v['correct']:>7.0f}  {v['errors']:>6}  {100 * v['accuracy']:>6.2f}")
    lines.append(f"format {100 * self.format:.2f}%   zooms/traj {self.mean_tool_calls:.2f} (tool used in "
                 f"{100 * self.tool_use_rate:.1f}%, errors/traj {self.mean_tool_errors:.2f})   frames/traj "
                 f"{self.mean_frames:.1f}")
    lines.append("rounds: " + ", ".join(f"{k}: {v['count']} (acc {100 * v['accuracy']:.1f}%)"
                                        for k, v in self.rounds.items()))
    lines.append("finish: " + ", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())))
    for e in self.errors:
      lines.append(f"error {e['id']}: {e['video']}: {e['error']}")
    if self.dirty or self.missing_videos:
      resolved = sum(d["action"] == "resolved" for d in self.dirty)
      left_out = sum(len(m["ids"]) for m in self.missing_videos)
      lines.append(f"annotations: {resolved} dirty records resolved, {len(self.dirty) - resolved} skipped; "
                   f"{left_out} tasks left out for {len(self.missing_videos)} missing videos")
      lines += [f"{d['action']} {d['id']}: {d['reason']}" for d in self.dirty]
      lines += [f"missing video {m['video']} (tasks {', '.join(m['ids'])})" for m in self.missing_videos]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- evaluate
# Failures of a batch that are pinned on one of its tasks by running them one at a time (a programming error,
# e.g. TypeError, still stops the run).
_TASK_ERRORS = (VideoError, OSError, ValueError)


def _run_batch(model, tok, batch, cfg, key, script, engine: EngineConfig) -> list[Trajectory | str]:
  """`replicated_rollout` of one batch (all of it in flight; one engine per data-parallel replica); if it raises,
  its tasks run one by one, and a task that fails alone gives its error message instead of a trajectory."""
  row_script = None if script is None else (lambda row, rnd, b=batch: script(b[row], rnd))
  try:
    return replicated_rollout(model, tok, batch, cfg, key, script=row_script, engine=engine, pixels="own")
  except _TASK_ERRORS as e:
    if len(batch) == 1:
      return [f"{type(e).__name__}: {e}"]
  out = []
  for k, task in enumerate(batch):
    out += _run_batch(model, tok, [task], cfg, jax.random.fold_in(key, k), script, engine)
  return out


def evaluate(model, tok, tasks: Sequence[Task], agent_cfg: AgentConfig = AgentConfig(), *, use_tool: bool = True,
             batch_size: int = 8, out_jsonl: str | None = None, key: jax.Array | None = None, progress: bool = True,
             no_tool_system_prompt: str = NO_TOOL_PROMPT, script: Script | None = None,
             temperature: float = 0.0, samples: int = 1, engine: EngineConfig = EngineConfig()) -> Report:
  """Runs every task, scores it, writes one JSONL line per trajectory (if `out_jsonl`), returns the Report.

  Greedy by default; `temperature` > 0 samples `samples` trajectories per task (all k of a task in the same
  batch position order: task 0 k times, then task 1, ...). `script(task, round) -> str | None` (optional)
  dictates a turn's text instead of generating it, as `rollout`'s `script` does (tests and demonstrations).
  The tasks run on the continuous engine (`agent/engine.py`, settings `engine`) in one run with `batch_size`
  trajectories in flight (over a model with data-parallel replicas, one engine per replica, each on its block of
  the tasks: `agent/replicas.py`): a task joins as soon as another ends (no batch waits for its slowest
  trajectory); the
  JSONL is in task order, each line written once the tasks before it have ended; a task's k samples share its
  prompt's prefill when they join together. A failure that is not a video
  error is pinned on its task by running the tasks left in batches of `batch_size`, then one by one.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if samples < 1 or not temperature >= 0 or (temperature == 0 and samples > 1):
    raise ValueError(f"samples must be >= 1 and temperature >= 0, with samples > 1 only when sampling "
                     f"(temperature > 0); got samples={samples}, temperature={temperature}")
  missing = [t.id for t in tasks if not t.answer]
  if missing:
    raise ValueError(f"tasks without an answer cannot be scored: {missing[:5]}")
  mode = "tool" if use_tool else "no_tool"
  cfg = greedy(agent_cfg if use_tool else no_tool_config(agent_cfg, no_tool_system_prompt))
  if temperature > 0:
    mode += f"@T{temperature:g}x{samples}"
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, temperature=float(temperature)))
  tasks = [t for t in tasks for _ in range(samples)]
  key = jax.random.key(0) if key is None else key
  sink = None
  if out_jsonl:
    os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
    sink = open(out_jsonl, "w", encoding="utf-8")
  records: dict[int, dict] = {}
  t0 = time.perf_counter()
  bar = tqdm(total=len(tasks), desc=f"eval ({mode})", unit="task", disable=not progress)

  written = [0]  # lines are written in task order: each as soon as every task before it has ended

  def record(i: int, traj: Trajectory | str) -> None:
    """Scores task i's trajectory (or error message); writes the lines that are now in order."""
    rec = _error_record(tasks[i], mode, traj, "error") if isinstance(traj, str) else score_trajectory(
        traj, tok, mode, agent_cfg.tool)
    if temperature > 0:
      rec["sample"] = i % samples
    records[i] = rec
    while sink and written[0] in records:
      sink.write(json.dumps(records[written[0]], ensure_ascii=False) + "\n")
      written[0] += 1
      sink.flush()
    bar.update(1)
    bar.set_postfix(acc=f"{_mean(r['acc'] for r in records.values()):.3f}")

  try:
    key, sub = jax.random.split(key)
    try:  # one engine run: batch_size trajectories in flight, the next task joins as one ends
      if replica_engines(model) == 1:
        _run_all(model, tok, tasks, cfg, sub, script, engine, batch_size, record)
      else:  # an engine per data-parallel replica, each with its block of the tasks joining it
        _run_replicas(model, tok, tasks, cfg, sub, script, engine, batch_size, record)
    except _TASK_ERRORS:  # pinned on its task by running what is left in batches, then one by one
      pass
    left = [i for i in range(len(tasks)) if i not in records]
    for start in range(0, len(left), batch_size):
      idx = left[start:start + batch_size]
      key, sub = jax.random.split(key)
      for i, traj in zip(idx, _run_batch(model, tok, [tasks[i] for i in idx], cfg, sub, script, engine)):
        record(i, traj)
  finally:
    bar.close()
    if sink:  # a run that stopped early: the lines that ended after a gap are written too
      for i in sorted(i for i in records if i >= written[0]):
        sink.write(json.dumps(records[i], ensure_ascii=False) + "\n")
      sink.close()
  return Report.from_records([records[i] for i in sorted(records)], mode, cfg.tool,
                             wall_s=time.perf_counter() - t0, out_jsonl=out_jsonl)


def _run_replicas(model, tok, tasks, cfg, key, script, engine: EngineConfig, in_flight: int, record) -> None:
  """Every task through `replicated_rollout` with joining: each replica's engine takes a contiguous block of the
  tasks, `in_flight` / replicas at a time, the rest joining as places free; this process's tasks are recorded as
  they end, the other processes' when all are done."""
  if not tasks:
    return
  cfg = sized_for_joining(cfg, tok, tasks)
  done: set[int] = set()

  def on_event(kind, i, info):
    if kind == "done":
      done.add(i)
      record(i, info)
  row_script = None if script is None else (lambda row, rnd: script(tasks[row], rnd))
  trajs = replicated_rollout(model, tok, list(tasks), cfg, key, script=row_script, on_event=on_event,
                             engine=dataclasses.replace(engine, max_running=in_flight), pixels="own", join=True)
  for i, traj in enumerate(trajs):
    if i not in done:
      record(i, traj)


def _run_all(model, tok, tasks, cfg, key, script, engine: EngineConfig, in_flight: int, record) -> None:
  """Every task through one `continuous_rollout`: the first `in_flight` at the start, each later one joining as a
  place frees (`admit`: its overview is read only then), each recorded as it ends. The page tables are sized
  for the longest prompt text among the tasks (`cache_bound`)."""
  if not tasks:
    return
  cfg = sized_for_joining(cfg, tok, tasks)
  engine = dataclasses.replace(engine, max_running=in_flight)
  later = list(range(in_flight, len(tasks)))[::-1]

  def admit(free: int) -> list[Task]:
    return [tasks[later.pop()] for _ in range(min(free, len(later)))]

  row_script = None if script is None else (lambda row, rnd: script(tasks[row], rnd))
  continuous_rollout(model, tok, list(tasks[:in_flight]), cfg, key, script=row_script, engine=engine, admit=admit,
                     on_event=lambda kind, i, info: record(i, info) if kind == "done" else None)


# ---------------------------------------------------------------------------------------------- job
def _model_and_tokenizer(cfg):
  """The HF checkpoint `cfg.checkpoint` sharded over `cfg.mesh`, or the random model `cfg.model` with the
  built-in tiny tokenizer; returns (model, tokenizer, mesh or None)."""
  import zoomer_jax  # noqa: PLC0415
  from zoomer_jax.model.options import options_from_config  # noqa: PLC0415
  from zoomer_jax.text import build_tiny_tokenizer, load_tokenizer  # noqa: PLC0415
  options = options_from_config(cfg.impl, cfg.mesh.rules)
  if cfg.checkpoint:
    from zoomer_jax.parallel.mesh import make_mesh  # noqa: PLC0415
    mesh = make_mesh(tuple(cfg.mesh.ici), tuple(cfg.mesh.dcn))
    model = zoomer_jax.load_hf(cfg.checkpoint, dtype=cfg.dtype, mesh=mesh, options=options)
    return model, load_tokenizer(cfg.checkpoint), mesh
  from flax import nnx  # noqa: PLC0415
  model = zoomer_jax.Qwen25VL(zoomer_jax.ModelConfig.from_config_dict(cfg.model.to_dict()), dtype=cfg.dtype,
                              rngs=nnx.Rngs(cfg.seed), options=options)
  tok = build_tiny_tokenizer()
  if tok.vocab_size > model.config.text.vocab_size:
    raise ValueError(f"a random-weight model uses the tiny tokenizer ({tok.vocab_size} ids), which does not fit "
                     f"model.text.vocab_size={model.config.text.vocab_size}; set checkpoint to an HF directory")
  return model, tok, None


def agent_config(cfg) -> AgentConfig:
  """AgentConfig from a job config: `cfg.agent` holds ToolConfig fields, `cfg.rollout` the other AgentConfig
  fields plus `max_new_tokens` (per turn). Decoding is greedy."""
  from zoomer_jax.sampling import SamplingParams  # noqa: PLC0415
  rollout_kw = dict(cfg.rollout.to_dict())
  max_new_tokens = rollout_kw.pop("max_new_tokens")
  names = {f.name for f in dataclasses.fields(AgentConfig)} - {"tool", "sampling"}
  unknown = sorted(set(rollout_kw) - names)
  if unknown:
    raise ValueError(f"unknown rollout config keys {unknown}; known: {sorted(names | {'max_new_tokens'})}")
  return AgentConfig(tool=ToolConfig.from_dict(cfg.agent.to_dict()),
                     sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), **rollout_kw)


def engine_config(cfg) -> EngineConfig:
  """The continuous engine's settings of a job config (`cfg.engine`); `batch_size` trajectories are in flight."""
  return EngineConfig(page_size=cfg.engine.page_size, step_tokens=cfg.engine.step_tokens)


def benchmark_tasks(cfg, tool: ToolConfig):
  """`cfg.benchmark` read as a `readers.Benchmark` (its first `limit` tasks when limit > 0). The name
  "synthetic" first generates `synthetic_n` videos of the built-in synthetic zoom task (`data.synthetic`) under
  `video_root` (kept if already there) and reads their records."""
  from zoomer_jax.eval.readers import load_benchmark  # noqa: PLC0415
  b = cfg.benchmark
  name, annotation = b.name, b.annotation
  if name == "synthetic":
    from zoomer_jax.data import synthetic  # noqa: PLC0415
    annotation = synthetic.generate(b.video_root, seed=cfg.seed, n_train=0, n_val=0, n_test=b.synthetic_n,
                                    tool_cfg=tool)["test"]
    name = "original"
  bench = load_benchmark(name, annotation, b.video_root, by_group=b.by_group, **b.options.to_dict())
  if b.limit:
    bench.tasks = bench.tasks[:b.limit]
  return bench


def check(cfg) -> int:
  """`python -m zoomer_jax eval --check`: reads the benchmark, prints `preflight.summary` (tasks, dirty records,
  missing videos) without loading a model; returns 1 when a video is missing, else 0."""
  from zoomer_jax.eval import preflight  # noqa: PLC0415
  bench = benchmark_tasks(cfg, agent_config(cfg).tool)
  print(preflight.summary(bench))
  return 1 if bench.missing_videos() else 0


def main(cfg) -> Report:
  """Runs the job of an eval config (`configs/eval_7b.py`, `configs/eval_tiny.py`): prints the table and writes
  `out_dir/{benchmark}_{mode}.jsonl`, `.json` (the report) and `.txt` (the table); returns the Report.

  Before the model is loaded, every task's video must exist (FileNotFoundError listing the missing ones), unless
  `benchmark.allow_missing_videos`: then their tasks are left out and listed in the report."""
  from zoomer_jax.eval import preflight  # noqa: PLC0415
  agent = agent_config(cfg)
  bench = benchmark_tasks(cfg, agent.tool)
  missing = bench.missing_videos()
  if missing and not cfg.benchmark.allow_missing_videos:
    raise FileNotFoundError(f"{len(missing)} videos are missing (nothing was run; --allow-missing-videos leaves "
                            f"their tasks out):\n{preflight.summary(bench, max_listed=20)}")
  tasks = [t for t in bench.tasks if t.video not in missing]
  if not tasks:
    raise FileNotFoundError(f"no task of {bench.annotation} has its video under {bench.video_root!r}")
  if bench.dirty or missing:
    print(preflight.summary(bench, max_listed=20))
  model, tok, mesh = _model_and_tokenizer(cfg)
  mode = "tool" if cfg.use_tool else "no_tool"
  stem = os.path.join(cfg.out_dir, f"{cfg.benchmark.name}_{mode}")
  kwargs = dict(use_tool=cfg.use_tool, batch_size=cfg.batch_size, out_jsonl=stem + ".jsonl",
                key=jax.random.key(cfg.seed), progress=cfg.progress, no_tool_system_prompt=cfg.no_tool_system_prompt,
                engine=engine_config(cfg))
  if mesh is None:
    report = evaluate(model, tok, tasks, agent, **kwargs)
  else:
    with jax.set_mesh(mesh):
      report = evaluate(model, tok, tasks, agent, **kwargs)
  report.dirty = [dataclasses.asdict(d) for d in bench.dirty]
  report.missing_videos = preflight.missing_records(bench)
  table = report.to_table()
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(dict(report.to_dict(), checkpoint=cfg.checkpoint or "random weights",
                   benchmark=cfg.benchmark.to_dict()), f, indent=1)
  with open(stem + ".txt", "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  return report
