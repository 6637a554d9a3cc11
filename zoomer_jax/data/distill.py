"""Distillation: the zoom agent run by an expert model behind a chat-completions API, kept where the judge accepts.

    python -m zoomer_jax distill --config=distill --config.data.train_files='("train.json",)' \
        --config.expert.base_url=http://localhost:8000/v1 --config.expert.model=Qwen/Qwen2.5-VL-72B-Instruct

Each RL record (`data/records.py`) is run `data.samples` times by `agent.expert.ExpertAgent` (the protocol our
model runs, docs/distill.md) in a pool of `expert.concurrency` threads. A trajectory is accepted when the reward's
judge (`agent.rewards.judge`) accepts its final answer and the checks of `accept` pass; anything else is rejected
with a reason. Outputs under `out_dir`:

  attempts.jsonl  every trajectory: key ("<task id>#<sample>"), status "accepted" | "rejected", reason, answer,
                  ground truth, turns, calls, token usage; an accepted one also carries its SFT record
  records.jsonl   the accepted SFT records (`data/records.py`), images under images/ (PNG, paths relative to
                  the JSONL's folder, as the SFT reader resolves them), "kind": "exemplar"
  metrics.jsonl   running totals every `log_every` trajectories and at the end
  summary.json    totals over every attempt so far (resumed runs included) and this run's requests and tokens

Both JSONL files are append-only and read back at start: a killed run resumes without asking again for a key it
has (a torn last line is cut off, `jsonl_log.read_log`); an accepted attempt whose record line was lost is
written to records.jsonl again. With `retry_failed`, attempts that ended on a failed request (HTTP 429/5xx or
connection errors after every retry) or an internal error are run again.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import re
import time
import traceback
from typing import Callable, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from zoomer_jax.agent.expert import Conversation, ExpertAgent, ExpertTurns
from zoomer_jax.agent.expert_api import ExpertAPI, ExpertSettings
from zoomer_jax.agent.protocol import IMAGE, ToolConfig
from zoomer_jax.agent.rewards import format_reward, judge
from zoomer_jax.agent.rollout import AgentConfig, Task, Videos
from zoomer_jax.data.jsonl_log import AppendLog, read_log, write_atomic
from zoomer_jax.data.records import RLRecord, load_records

ATTEMPTS, RECORDS, METRICS, SUMMARY = "attempts.jsonl", "records.jsonl", "metrics.jsonl", "summary.json"
TRANSIENT = re.compile(r"^(http_429|http_5\d\d|connection|internal_error)$")  # run again with retry_failed


@dataclasses.dataclass(frozen=True)
class Job:
  """One trajectory to produce: a task and its sample index."""
  record: RLRecord
  task: Task
  sample: int

  @property
  def key(self) -> str:
    return f"{self.task.id}#{self.sample}"


def rl_tasks(data) -> list[tuple[RLRecord, Task]]:
  """(record, Task) of `data.train_files` (or, when it is empty and `data.synthetic_n` > 0, that many videos of
  the synthetic zoom task generated under `data.synthetic_dir`), the first `data.limit` when > 0. Task ids are
  the records' doc_id (else "<index>") and must be unique."""
  files = tuple(data.train_files)
  if not files and data.synthetic_n > 0:
    from zoomer_jax.data import synthetic  # noqa: PLC0415
    files = (synthetic.generate(data.synthetic_dir, n_train=data.synthetic_n, n_val=0, n_test=0)["train"],)
  if not files:
    raise ValueError("config data.train_files is empty: give --config.data.train_files='(\"/path/train.json\",)' "
                     "(RL records, docs/training.md) or --config.data.synthetic_n=8")
  records = load_records(list(files), kind="rl")
  if data.limit:
    records = records[:data.limit]
  out, seen = [], collections.Counter()
  for i, r in enumerate(records):
    tid = str(r.doc_id) if r.doc_id is not None else str(i)
    seen[tid] += 1
    out.append((r, Task(r.video, r.problem, r.solution, tid, r.data_source)))
  dup = sorted(k for k, n in seen.items() if n > 1)
  if dup:
    raise ValueError(f"task ids must be unique (doc_id); repeated: {dup[:10]}")
  return out


def expert_turns(cfg, tool: ToolConfig, max_pixels: int, min_pixels: int) -> ExpertTurns:
  e = cfg.expert
  return ExpertTurns(tool=tool, max_tokens=e.max_tokens, temperature=e.temperature, max_pixels=max_pixels,
                     min_pixels=min_pixels, jpeg_quality=e.jpeg_quality)


# ---------------------------------------------------------------------------------------------- verdict
def verdict(conv: Conversation, record: RLRecord, tool: ToolConfig, accept) -> dict:
  """{status, reason, acc, format} of a finished trajectory; `accept` is the config's `accept` section. The
  first failing check names the reason, in the order below."""
  acc = fmt = 0.0
  if conv.turns and conv.finish_reason not in ("expert_error", "video_error"):
    acc = judge(conv.turns, record.solution, record.answer_type)
    fmt = format_reward(conv.turns, tool.tool_call_max_frames, tool.tools).score
  reason = None
  if conv.finish_reason == "video_error":
    reason = "video_error"
  elif conv.finish_reason == "expert_error":
    reason = conv.error.split(":", 1)[0]  # ExpertError's tag: http_400, http_429, connection, bad_response
  elif conv.finish_reason == "round_limit":
    reason = "round_limit"
  elif conv.answer is None:
    reason = "no_answer"
  elif conv.tool_errors and not accept.keep_tool_errors:
    reason = "tool_error"
  elif any(IMAGE in t for t in conv.turns):
    reason = "image_tag_in_turn"  # the SFT reader would take it for a frame's place
  elif acc != 1.0:
    reason = "wrong_answer"
  elif accept.require_format and fmt != 1.0:
    reason = "format"
  return dict(status="rejected" if reason else "accepted", reason=reason, acc=acc, format=fmt)


# ---------------------------------------------------------------------------------------------- outputs
def _safe(name: str) -> str:
  """A file-name form of a task id: unsafe characters replaced, a short hash added so two ids never meet."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def save_frames(frames: Sequence[np.ndarray], out_dir: str, folder: str) -> list[str]:
  """PNGs (lossless, as decoded) under out_dir/images/folder; returns their paths relative to out_dir."""
  rel = []
  for k, frame in enumerate(frames):
    path = os.path.join("images", folder, f"{k:03d}.png")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(frame[..., ::-1]))
    if not ok:
      raise OSError(f"PNG encoding failed for {path}")
    write_atomic(os.path.join(out_dir, path), buf.tobytes())
    rel.append(path)
  return rel


class Outputs:
  """attempts.jsonl, records.jsonl, metrics.jsonl and summary.json of one out_dir; written by one thread."""

  def __init__(self, out_dir: str, retry_failed: bool):
    self.dir = out_dir
    os.makedirs(out_dir, exist_ok=True)
    attempts = read_log(os.path.join(out_dir, ATTEMPTS))
    self.latest = {a["key"]: a for a in attempts}  # a re-run attempt supersedes the earlier line
    records = read_log(os.path.join(out_dir, RECORDS))
    have = {r["id"] for r in records}
    self.attempts = AppendLog(os.path.join(out_dir, ATTEMPTS))
    self.records = AppendLog(os.path.join(out_dir, RECORDS))
    self.metrics = AppendLog(os.path.join(out_dir, METRICS))
    self.restored = 0
    for a in self.latest.values():  # killed between the attempt line and its record line
      if a["status"] == "accepted" and a["record"]["id"] not in have:
        self.records.append(a["record"])
        self.restored += 1
    self.retry_failed = retry_failed

  def done(self, key: str) -> bool:
    a = self.latest.get(key)
    return a is not None and not (self.retry_failed and a["status"] == "rejected" and TRANSIENT.match(a["reason"]))

  def write(self, attempt: dict) -> None:
    self.attempts.append(attempt)  # first: it carries the record, so a lost record line can be restored
    if attempt["status"] == "accepted":
      self.records.append(attempt["record"])
    self.latest[attempt["key"]] = attempt

  def totals(self) -> dict:
    """Counts over the latest attempt of every key: statuses ("accepted", "rejected", "skipped": nothing to do),
    the reasons of those not accepted, token usage."""
    rows = list(self.latest.values())
    status = collections.Counter(a["status"] for a in rows)
    reasons = collections.Counter(a["reason"] for a in rows if a["status"] != "accepted")
    tokens = {k: sum(a["usage"][k] for a in rows) for k in ("prompt_tokens", "completion_tokens")}
    return dict(attempts=len(rows), accepted=status["accepted"], rejected=status["rejected"],
                skipped=status["skipped"], accept_rate=status["accepted"] / len(rows) if rows else 0.0,
                reasons=dict(sorted(reasons.items())), **tokens)

  def close(self) -> None:
    for log in (self.attempts, self.records, self.metrics):
      log.close()


def attempt_line(job: Job, conv: Conversation, v: dict, record: dict | None, wall_s: float, **extra) -> dict:
  return dict(key=job.key, task_id=job.task.id, sample=job.sample, status=v["status"], reason=v["reason"],
              answer=conv.answer, ground_truth=job.record.solution, acc=v["acc"], format=v["format"],
              finish_reason=conv.finish_reason, error=conv.error, rounds=len(conv.turns), calls=conv.calls,
              turns=conv.turns, usage=conv.usage, wall_s=round(wall_s, 3), **extra,
              **({"record": record} if record is not None else {}))


def failed_line(job: Job, message: str) -> dict:
  """The attempt of a trajectory that raised (a bug or an unexpected error): recorded, and the run goes on."""
  conv = Conversation(job.task, [], [], [], [], finish_reason="internal_error", error=message)
  return attempt_line(job, conv, dict(status="rejected", reason="internal_error", acc=0.0, format=0.0), None, 0.0)


def run_jobs(jobs: Sequence[Job], work: Callable[[Job], dict], out: Outputs, api: ExpertAPI, videos: Videos, cfg,
             what: str) -> dict:
  """Runs `work(job) -> attempt line` for every job not done yet, `cfg.expert.concurrency` at a time; writes each
  line as it finishes, metrics every `cfg.log_every`; closes `out` and `videos`; prints and returns the summary
  (also written to summary.json)."""
  try:
    summary = _run_jobs(jobs, work, out, api, concurrency=cfg.expert.concurrency, log_every=cfg.log_every,
                        progress=cfg.progress, what=what)
  finally:
    out.close()
    videos.close()
  print(json.dumps({k: summary[k] for k in ("attempts", "accepted", "rejected", "reasons", "prompt_tokens",
                                            "completion_tokens")}))
  return summary


def _run_jobs(jobs: Sequence[Job], work: Callable[[Job], dict], out: Outputs, api: ExpertAPI, *, concurrency: int,
              log_every: int, progress: bool, what: str) -> dict:
  todo = [j for j in jobs if not out.done(j.key)]
  t0 = time.perf_counter()
  finished = 0

  def metrics(final: bool) -> dict:
    return dict(time=time.time(), elapsed_s=round(time.perf_counter() - t0, 3), finished_this_run=finished,
                final=final, **out.totals(), api=dict(api.stats))

  def safe(job: Job) -> dict:
    try:
      return work(job)
    except Exception as e:  # noqa: BLE001 (one trajectory's bug is recorded; the run goes on)
      where = traceback.extract_tb(e.__traceback__)[-1]
      return failed_line(job, f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})")

  bar = tqdm(total=len(todo), desc=what, unit="traj", disable=not progress)
  try:
    with cf.ThreadPoolExecutor(max(1, concurrency)) as pool:
      for fut in cf.as_completed([pool.submit(safe, j) for j in todo]):
        out.write(fut.result())
        finished += 1
        bar.update(1)
        t = out.totals()
        bar.set_postfix(accepted=t["accepted"], tokens=t["prompt_tokens"] + t["completion_tokens"])
        if log_every and finished % log_every == 0:
          out.metrics.append(metrics(False))
  finally:
    bar.close()
    out.metrics.append(metrics(True))
  summary = dict(out.totals(), jobs=len(jobs), skipped_done=len(jobs) - len(todo), finished_this_run=finished,
                 restored_records=out.restored, this_run=dict(api.stats),
                 wall_s=round(time.perf_counter() - t0, 3), expert=dict(base_url=api.settings.base_url,
                                                                        model=api.settings.model))
  write_atomic(os.path.join(out.dir, SUMMARY), json.dumps(summary, indent=1))
  return summary


# ---------------------------------------------------------------------------------------------- the job
def sft_record(conv: Conversation, job: Job, out_dir: str, kind: str, **extra) -> dict:
  images = save_frames(conv.frames, out_dir, f"{_safe(job.task.id)}/{job.sample}")
  return dict(id=job.key, messages=conv.messages, images=images, kind=kind, task_id=job.task.id,
              sample=job.sample, **extra)


def run_distill(cfg) -> dict:
  """The distill job of `cfg` (configs/distill.py); returns the summary."""
  tool = ToolConfig.from_dict(cfg.agent.to_dict())
  api = ExpertAPI(ExpertSettings.resolve(cfg.expert))
  pairs = rl_tasks(cfg.data)
  jobs = [Job(r, t, s) for r, t in pairs for s in range(cfg.data.samples)]
  videos = Videos(AgentConfig(tool=tool, video_backend=cfg.frames.video_backend))
  agent = ExpertAgent(api, videos, expert_turns(cfg, tool, cfg.frames.max_pixels, cfg.frames.min_pixels))
  out = Outputs(cfg.out_dir, cfg.retry_failed)

  def work(job: Job) -> dict:
    t0 = time.perf_counter()
    conv = agent.run(job.task)
    v = verdict(conv, job.record, tool, cfg.accept)
    record = None
    if v["status"] == "accepted":
      record = sft_record(conv, job, out.dir, "exemplar", expert=api.settings.model)
    return attempt_line(job, conv, v, record, time.perf_counter() - t0)

  return run_jobs(jobs, work, out, api, videos, cfg, "distill")
