"""Reflection: an expert corrects a checkpoint's failed trajectories; the corrections are verified and kept.

    python -m zoomer_jax reflect --config=reflect --config.checkpoint=/ckpt/sft --config.data.train_files=...

1. Our model runs the training tasks (`agent.engine`, `data.samples` trajectories per task at
   `reflect.temperature`); each trajectory is logged in `rollouts.jsonl` (append-only, so a rerun does not run
   it again). Those the judge accepts need no correction (status "skipped", reason "model_correct").
2. For each failed one the expert gets one request (`agent/prompts/reflect_prompt.txt`): the agent's system
   prompt, then what the model saw and wrote (its first user turn and observations with their frames as images,
   its turns numbered from 0). The correct answer is not revealed unless `reflect.reveal_answer`: a corrector
   that knows the answer can write a correction that reaches it without reading the frames, which is what SFT
   must not teach. The expert answers `<analysis>…</analysis><step>k</step><continuation>…</continuation>`.
3. The corrected trajectory is the model's turns 0..k-1 with their observations replayed through the protocol,
   then the continuation as turn k, then the expert's own turns in the protocol of `distill` until it ends:
   every call runs on our video, so its frames are ours, not the expert's claims. It is judged as `distill`
   judges; accepted ones become SFT records with "kind": "reflection" and a "reflection" field (analysis, step,
   the model's failed answer, whether the answer was revealed).

Outputs as `distill` writes them (docs/distill.md), plus rollouts.jsonl. The SFT job mixes these records with
exemplars at `data.reflection_ratio` (configs/sft_7b.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import jax

from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.engine import continuous_rollout
from zoomer_jax.agent.expert import Conversation, ExpertAgent, content_parts, cut_turn, jpeg_url
from zoomer_jax.agent.expert_api import ExpertAPI, ExpertError, ExpertSettings
from zoomer_jax.agent.rewards import judge
from zoomer_jax.agent.rollout import Videos
from zoomer_jax.data.distill import (Job, Outputs, attempt_line, expert_turns, rl_tasks, run_jobs, sft_record,
                                     verdict)
from zoomer_jax.data.jsonl_log import AppendLog, read_log

ROLLOUTS = "rollouts.jsonl"
_REPLY = {k: re.compile(f"<{k}>(.*?)</{k}>", re.DOTALL) for k in ("analysis", "step", "continuation")}


@dataclasses.dataclass(frozen=True)
class Correction:
  analysis: str
  step: int
  continuation: str


def read_prompt(name: str) -> str:
  """A prompt file: a path, or a name in agent/prompts/."""
  path = name if os.path.exists(name) else os.path.join(P.PROMPT_DIR, name)
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  except OSError as e:
    raise FileNotFoundError(f"prompt file {name!r} cannot be read: {e}") from e


def parse_correction(text: str, n_steps: int) -> Correction:
  """The expert's reply; raises ValueError naming what is missing or out of range."""
  found = {k: rx.findall(text) for k, rx in _REPLY.items()}
  if not found["continuation"] and "<continuation>" in text:
    # Unclosed: the reply ended inside it (an expert that stops after a tool call's closing tag, as `serve`'s turn
    # model does, or a `stop` at "</continuation>"): the continuation runs to the reply's end.
    found["continuation"] = [text.rsplit("<continuation>", 1)[1]]
  missing = [k for k, v in found.items() if not v]
  if missing:
    raise ValueError(f"the reply lacks <{'>, <'.join(missing)}>")
  step = found["step"][-1].strip()
  if not re.fullmatch(r"\d+", step) or not 0 <= int(step) < n_steps:
    raise ValueError(f"<step> must be a step number from 0 to {n_steps - 1}, got {step[:20]!r}")
  continuation = found["continuation"][-1].strip()
  if not continuation:
    raise ValueError("<continuation> is empty")
  return Correction(found["analysis"][-1].strip(), int(step), continuation)


def reflection_request(seen: Conversation, system_prompt: str, answer: str | None, turns) -> list[dict]:
  """The expert's request: instructions, then the agent's prompt and what it saw and wrote, frames as images."""
  text, k = [f"The agent's instructions:\n{seen.messages[0]['content']}\n\nWhat it saw and wrote:\n"], 0
  for m in seen.messages[1:]:
    if m["role"] == "assistant":
      # The model's text is not ours to expand: a literal <image> in it stays text.
      text.append(f"\n[step {k}: the agent]\n{m['content'].replace(P.IMAGE, '<image' + chr(0x2060) + '>')}\n")
      k += 1
    else:
      text.append(f"\n[{'the question' if k == 0 else 'the tool'}]\n{m['content']}\n")
  if answer is not None:
    text.append(f"\nThe correct answer is {answer}.\n")
  text.append("\nReply with <analysis>, <step> and <continuation> as instructed.")
  return [{"role": "system", "content": system_prompt},
          {"role": "user", "content": content_parts("".join(text), [jpeg_url(f, turns) for f in seen.frames])}]


def _rollouts(cfg, jobs: list[Job], out_dir: str) -> dict[str, dict]:
  """The model's trajectory of every job (key -> line of rollouts.jsonl), running those not logged yet."""
  from zoomer_jax.eval import harness  # noqa: PLC0415
  path = os.path.join(out_dir, ROLLOUTS)
  have = {r["key"]: r for r in read_log(path)}
  todo = [j for j in jobs if j.key not in have]
  if not todo:
    return have
  model, tok, mesh = harness._model_and_tokenizer(cfg)  # noqa: SLF001 (the eval job's loader)
  agent, engine = harness.agent_config(cfg), harness.engine_config(cfg)
  agent = dataclasses.replace(agent, sampling=dataclasses.replace(agent.sampling,
                                                                  temperature=float(cfg.reflect.temperature)))
  key = jax.random.fold_in(jax.random.key(cfg.seed), len(have))
  with AppendLog(path) as log:
    for start in range(0, len(todo), cfg.reflect.batch_size):
      batch = todo[start:start + cfg.reflect.batch_size]
      key, sub = jax.random.split(key)
      tasks = [j.task for j in batch]
      if mesh is None:
        trajs = continuous_rollout(model, tok, tasks, agent, sub, engine=engine)
      else:
        with jax.set_mesh(mesh):
          trajs = continuous_rollout(model, tok, tasks, agent, sub, engine=engine)
      for job, t in zip(batch, trajs):
        acc = judge(t.turns, job.record.solution, job.record.answer_type) if t.turns else 0.0
        line = dict(key=job.key, turns=t.turns, answer=t.answer, finish_reason=t.finish_reason, calls=t.calls,
                    acc=acc)
        log.append(line)
        have[job.key] = line
  return have


def run_reflect(cfg) -> dict:
  """The reflect job of `cfg` (configs/reflect.py); returns the summary."""
  from zoomer_jax.eval import harness  # noqa: PLC0415
  agent_cfg = harness.agent_config(cfg)
  tool = agent_cfg.tool
  api = ExpertAPI(ExpertSettings.resolve(cfg.expert))
  jobs = [Job(r, t, s) for r, t in rl_tasks(cfg.data) for s in range(cfg.data.samples)]
  out = Outputs(cfg.out_dir, cfg.retry_failed)
  rolled = _rollouts(cfg, [j for j in jobs if not out.done(j.key)], cfg.out_dir)
  videos = Videos(agent_cfg)
  turns_cfg = expert_turns(cfg, tool, agent_cfg.max_pixels, agent_cfg.min_pixels)
  agent = ExpertAgent(api, videos, turns_cfg)
  reflect_prompt = read_prompt(cfg.reflect.prompt)
  reveal = bool(cfg.reflect.reveal_answer)

  def replay_ends(conv, chat):
    raise ExpertError("replay_end", "the model's trajectory ended without a final turn")

  def work(job: Job) -> dict:
    t0 = time.perf_counter()
    model = rolled[job.key]
    base = dict(model_turns=model["turns"], model_answer=model["answer"], model_finish_reason=model["finish_reason"])
    if model["finish_reason"] == "video_error" or model["acc"] == 1.0:
      conv = Conversation(job.task, [], [], model["turns"], model["calls"], model["answer"], model["finish_reason"])
      reason = "video_error" if model["finish_reason"] == "video_error" else "model_correct"
      return attempt_line(job, conv, dict(status="skipped", reason=reason, acc=model["acc"], format=0.0), None,
                          time.perf_counter() - t0, **base)
    seen = agent.run(job.task, forced=model["turns"], ask=replay_ends)  # what the model saw, frames ours
    request = reflection_request(seen, reflect_prompt, job.record.solution if reveal else None, turns_cfg)
    usage = dict(prompt_tokens=0, completion_tokens=0, requests=0, retries=0)
    try:
      reply = api.chat(request, max_tokens=turns_cfg.max_tokens, temperature=turns_cfg.temperature)
      usage.update(reply.usage, requests=1 + reply.retries, retries=reply.retries)
      fix = parse_correction(reply.text, len(model["turns"]))
    except (ExpertError, ValueError) as e:
      reason = e.reason if isinstance(e, ExpertError) else "bad_reflection"
      conv = Conversation(job.task, [], [], [], [], finish_reason="expert_error", error=f"{reason}: {e}",
                          usage=usage)
      return attempt_line(job, conv, dict(status="rejected", reason=reason, acc=0.0, format=0.0), None,
                          time.perf_counter() - t0, **base)
    forced = list(model["turns"][:fix.step]) + [cut_turn(fix.continuation, tool.tools)]
    conv = agent.run(job.task, forced=forced)
    for k, v in usage.items():
      conv.usage[k] += v
    v = verdict(conv, job.record, tool, cfg.accept)
    info = dict(analysis=fix.analysis, step=fix.step, failed_answer=model["answer"], answer_revealed=reveal)
    record = None
    if v["status"] == "accepted":
      record = sft_record(conv, job, out.dir, "reflection", reflection=info, expert=api.settings.model)
    return attempt_line(job, conv, v, record, time.perf_counter() - t0, reflection=info, **base)

  return run_jobs(jobs, work, out, api, videos, cfg, "reflect")
