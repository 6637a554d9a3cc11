"""The main job (`python -m zoomer_jax demo`): data -> SFT -> GRPO -> evaluation with and without the tool -> report.

    report = run_demo(load("demo"))      # configs/demo.py; every stage reuses what an earlier run left in out_dir

Stages (`cfg.stages`, comma-separated, in this order):
  data  `data.synthetic.generate` (train / validation / test) and `data.cold_start.generate_sft` on the first
        `data.n_sft` train records, under `out_dir/data`;
  sft   `train.sft.run_sft` on the cold start (workdir `out_dir/sft`), then the last checkpoint exported as an HF
        directory with the tiny tokenizer (`out_dir/sft/hf`); with `sft_direct_steps`, first that many steps on
        the direct trajectories alone (`out_dir/sft_direct`, exported to `out_dir/sft_direct/hf`), and the
        rest on the mix from those weights;
  grpo  `train.grpo.run_grpo` from that directory (`init.checkpoint`) on the train split (workdir `out_dir/grpo`),
        exported to `out_dir/grpo/hf`;
  eval  `eval.harness.evaluate` of each exported model on the test split, with the tool and as the no-tool
        baseline (same frame budget), greedy; and the tool run sampled `eval.samples` times per video at
        `eval.temperature` (GRPO's rollout temperature: the policy's expected accuracy, which GRPO trains);
        trajectories in `out_dir/eval/{sft,grpo}_{tool,no_tool,sampled}.jsonl`.
Then: the table (printed and `out_dir/table.txt`), `out_dir/report.json`, `out_dir/training_curves.png` and
`out_dir/trajectories.png`.

One `ToolConfig` (`cfg.tool`) serves every stage: the generator hides the flash from its overview, the cold start
writes its turns, GRPO's rollouts and the evaluation run the agent with it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time

import numpy as np

from zoomer_jax.agent.protocol import ToolConfig
from zoomer_jax.agent.rollout import AgentConfig, Task

STAGES = ("data", "sft", "grpo", "eval")
MODELS = ("sft", "grpo")
MODES = ("tool", "no_tool")  # greedy, every model
SAMPLED = "sampled"  # the tool run sampled eval.samples times per video (when eval.samples > 0)
CHANCE = 0.25  # four options


# ---------------------------------------------------------------------------------------------- helpers
class Clock:
  """Stage headers with the elapsed time, and each stage's wall time (`times`)."""

  def __init__(self, n_stages: int):
    self.t0 = time.perf_counter()
    self.n, self.i = n_stages, 0
    self.times: dict[str, float] = {}

  @contextlib.contextmanager
  def stage(self, name: str, what: str):
    self.i += 1
    print(f"\n=== [{self.i}/{self.n}] {name}: {what}  (elapsed {self.elapsed():.0f} s, load {_load()})", flush=True)
    t = time.perf_counter()
    yield
    self.times[name] = round(time.perf_counter() - t, 1)
    print(f"=== {name} done in {self.times[name]:.1f} s", flush=True)

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def tool_config(cfg) -> ToolConfig:
  return ToolConfig.from_dict(cfg.tool.to_dict())


def agent_config(cfg) -> AgentConfig:
  """The evaluation's agent: `cfg.tool`, greedy, frames resized to `cfg.pixels`."""
  from zoomer_jax.sampling import SamplingParams  # noqa: PLC0415
  e = cfg.eval
  return AgentConfig(tool=tool_config(cfg), sampling=SamplingParams(temperature=0.0, max_new_tokens=e.max_new_tokens),
                     decode_chunk=e.decode_chunk, max_pixels=cfg.pixels, min_pixels=cfg.pixels, workers=e.workers)


def _stages(cfg) -> list[str]:
  names = [s.strip() for s in str(cfg.stages).split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown demo stages {unknown}; known: {list(STAGES)}")
  return [s for s in STAGES if s in names]


# ---------------------------------------------------------------------------------------------- data
def data_paths(out: str) -> dict[str, str]:
  d = os.path.join(out, "data")
  return {"train": os.path.join(d, "train.json"), "validation": os.path.join(d, "validation.json"),
          "test": os.path.join(d, "test.json"), "sft": os.path.join(d, "sft", "sft_records_sft.json"),
          "sft_mix": os.path.join(d, "sft", "sft_records_mix_sft.json"),
          "sft_no_tool": os.path.join(d, "sft", "sft_records_notool_sft.json")}


def build_data(cfg, out: str) -> dict[str, str]:
  """Writes (or finds, unchanged) the three splits and the cold-start SFT file; returns their paths."""
  from zoomer_jax.data import cold_start, synthetic  # noqa: PLC0415
  from zoomer_jax.demo.no_tool_sft import generate_no_tool_sft  # noqa: PLC0415
  d, tool = cfg.data, tool_config(cfg)
  if max(d.n_sft, d.n_sft_no_tool) > d.n_train:
    raise ValueError(f"data.n_sft ({d.n_sft}) and data.n_sft_no_tool ({d.n_sft_no_tool}) cannot exceed "
                     f"data.n_train ({d.n_train})")
  root = os.path.join(out, "data")
  paths = synthetic.generate(root, seed=cfg.seed, n_train=d.n_train, n_val=d.n_val, n_test=d.n_test, tool_cfg=tool,
                             **d.video.to_dict())
  with open(paths["train"], encoding="utf-8") as f:
    records = json.load(f)[:d.n_sft]
  sft_in = data_paths(out)["sft"].replace("_sft.json", ".json")  # cold_start names its output <stem>_sft.json
  os.makedirs(os.path.dirname(sft_in), exist_ok=True)
  synthetic.write_if_changed(sft_in, json.dumps(records, indent=1).encode())
  paths["sft"] = cold_start.generate_sft(sft_in, os.path.dirname(sft_in), seed=cfg.seed,
                                         reflection_fraction=d.reflection_fraction, tool_cfg=tool)
  if d.sparse_copies:
    # Every record also as a sparse trajectory (half the zoom's frame rate); the mix holds each direct one
    # direct_copies times and each sparse one sparse_copies times: the same video is shown with both frame
    # rates, so SFT learns the mix (direct_copies : sparse_copies), not which video got which.
    sparse = cold_start.generate_sft(sft_in, os.path.join(os.path.dirname(sft_in), "sparse"), seed=cfg.seed,
                                     reflection_fraction=0.0, sparse_fraction=1.0, tool_cfg=tool)
    with open(paths["sft"], encoding="utf-8") as f, open(sparse, encoding="utf-8") as g:
      mix = json.load(f) * d.direct_copies + json.load(g) * d.sparse_copies
    paths["sft_mix"] = data_paths(out)["sft_mix"]
    synthetic.write_if_changed(paths["sft_mix"], json.dumps(mix, indent=1).encode())
  if d.n_sft_no_tool:
    paths["sft_no_tool"] = generate_no_tool_sft(sft_in, os.path.dirname(sft_in), tool_cfg=tool, seed=cfg.seed,
                                                n=d.n_sft_no_tool)
  mixed = f"; mixed {d.direct_copies}:{d.sparse_copies} with sparse ones" if d.sparse_copies else ""
  print(f"train {d.n_train}, validation {d.n_val}, test {d.n_test} videos; {len(records)} cold-start "
        f"trajectories ({d.reflection_fraction:.0%} reflection{mixed}) and {d.n_sft_no_tool} no-tool ones in {root}")
  return paths


def no_tool_flash_visible(test_json: str, tool: ToolConfig) -> float:
  """Share of test videos where one of the no-tool baseline's frames (the frame budget spread evenly, as
  `eval.harness.no_tool_config` samples them) shows the flash: the baseline's ceiling is this + the rest / 4."""
  from zoomer_jax.eval.harness import frame_budget  # noqa: PLC0415
  from zoomer_jax.video.sampling import sample_overview  # noqa: PLC0415
  from types import SimpleNamespace  # noqa: PLC0415
  with open(test_json, encoding="utf-8") as f:
    records = json.load(f)
  budget, seen = frame_budget(tool), 0
  for r in records:
    info = r["extra_info"]
    idx, _ = sample_overview(SimpleNamespace(n_frames=info["n_frames"], fps=info["fps"]), 1e9, budget)
    a0, a1 = info["answer_frames"]
    seen += bool(((idx >= a0) & (idx <= a1)).any())
  return seen / max(1, len(records))


# ---------------------------------------------------------------------------------------------- training
def sft_job(cfg, paths: dict, out: str):
  job = copy.deepcopy(cfg.sft)
  job.model = copy.deepcopy(cfg.model)
  job.seed = cfg.seed
  job.workdir = os.path.join(out, "sft")
  tool = paths["sft_mix"] if cfg.data.sparse_copies else paths["sft"]
  job.data.train_files = (tool,) + ((paths["sft_no_tool"],) if cfg.data.n_sft_no_tool else ())
  job.data.max_pixels = job.data.min_pixels = cfg.pixels
  # Image counts padded to what a micro-batch can hold at most: one compiled training shape.
  job.data.image_bucket = job.data.micro_batch_size * cfg.tool.max_total_frames
  return job


def grpo_job(cfg, paths: dict, out: str, init_dir: str):
  job = copy.deepcopy(cfg.grpo)
  job.model = copy.deepcopy(cfg.model)  # unused: the weights and their config come from init_dir
  job.seed = cfg.seed
  job.workdir = os.path.join(out, "grpo")
  job.init.checkpoint = init_dir
  job.data.train_files = (paths["train"],)
  job.data.val_files = (paths["validation"],) if cfg.data.n_val and job.trainer.test_freq else ()
  r = job.rollout
  r.update(cfg.tool)  # the agent of the rollouts is the demo's (grpo.agent_config reads these)
  r.max_pixels = r.min_pixels = cfg.pixels
  job.actor.image_bucket = job.actor.ppo_micro_batch_size * cfg.tool.max_total_frames  # one training shape
  return job


def export_trained(job, optim, freeze_vision: bool, hf_dir: str) -> str:
  """The latest checkpoint of `job.workdir` as an HF directory with the job's tokenizer; returns hf_dir."""
  from zoomer_jax.checkpoint.hf_export import export_hf  # noqa: PLC0415
  from zoomer_jax.train.jobs import tokenizer_for  # noqa: PLC0415
  from zoomer_jax.train.trainer import Engine  # noqa: PLC0415
  engine = Engine(job, None, total_steps=1, optim=optim, freeze_vision=freeze_vision, save_freq=1, max_to_keep=None)
  try:
    if engine.resume() is None:
      raise FileNotFoundError(f"no checkpoint in {job.workdir}/checkpoints to export")
    export_hf(engine.model(), hf_dir, overwrite=True)
    tokenizer_for(job).save(hf_dir)
    with open(os.path.join(hf_dir, "demo_step.json"), "w") as f:
      json.dump({"workdir": job.workdir, "step": engine.step}, f)
  finally:
    engine.close()
  return hf_dir


def direct_job(cfg, paths: dict, out: str):
  """The first `sft_direct_steps` of SFT: direct trajectories only (workdir `out/sft_direct`)."""
  job = sft_job(cfg, paths, out)
  job.workdir = os.path.join(out, "sft_direct")
  job.data.train_files = (paths["sft"],) + tuple(job.data.train_files[1:])  # the no-tool conversations stay
  job.train.total_steps = cfg.sft_direct_steps
  return job


def train_sft(cfg, paths: dict, out: str) -> str:
  """SFT; with `sft_direct_steps`, in two jobs: direct trajectories only, then the mix from its result."""
  from zoomer_jax.train.sft import run_sft  # noqa: PLC0415
  job = sft_job(cfg, paths, out)
  if cfg.sft_direct_steps:
    if not 0 < cfg.sft_direct_steps < job.train.total_steps:
      raise ValueError(f"sft_direct_steps={cfg.sft_direct_steps} must lie in (0, sft.train.total_steps="
                       f"{job.train.total_steps})")
    first = direct_job(cfg, paths, out)
    run_sft(first)
    job.init.checkpoint = export_trained(first, first.optim, first.train.freeze_vision_tower,
                                         os.path.join(first.workdir, "hf"))
    job.train.total_steps -= cfg.sft_direct_steps
  run_sft(job)
  return export_trained(job, job.optim, job.train.freeze_vision_tower, os.path.join(job.workdir, "hf"))


def train_grpo(cfg, paths: dict, out: str, init_dir: str) -> str:
  from zoomer_jax.train.grpo import run_grpo  # noqa: PLC0415
  job = grpo_job(cfg, paths, out, init_dir)
  run_grpo(job)
  return export_trained(job, job.actor.optim, job.actor.freeze_vision_tower, os.path.join(job.workdir, "hf"))


# ---------------------------------------------------------------------------------------------- evaluation
def test_tasks(test_json: str) -> list[Task]:
  with open(test_json, encoding="utf-8") as f:
    records = json.load(f)
  return [Task(video=r["videos"][0], problem=r["problem"], answer=r["solution"], id=r["doc_id"],
               data_source=r["data_source"]) for r in records]


def evaluate_model(cfg, hf_dir: str, name: str, tasks: list[Task], out: str) -> dict:
  """{mode: Report} of the HF model in hf_dir on `tasks`, with the tool and without."""
  import jax  # noqa: PLC0415

  import zoomer_jax  # noqa: PLC0415
  from zoomer_jax.eval.harness import evaluate  # noqa: PLC0415
  from zoomer_jax.text import load_tokenizer  # noqa: PLC0415
  model, tok = zoomer_jax.load_hf(hf_dir, dtype="float32"), load_tokenizer(hf_dir)
  agent = agent_config(cfg)
  reports = {}
  for mode in modes(cfg):
    sampled = dict(temperature=cfg.eval.temperature, samples=cfg.eval.samples) if mode == SAMPLED else {}
    reports[mode] = evaluate(model, tok, tasks, agent, use_tool=mode != "no_tool", batch_size=cfg.eval.batch_size,
                             out_jsonl=os.path.join(out, "eval", f"{name}_{mode}.jsonl"),
                             key=jax.random.key(cfg.seed), **sampled)
    print(f"{name} {reports[mode].mode}: accuracy {reports[mode].accuracy:.3f} ({reports[mode].wall_s:.1f} s)",
          flush=True)
  return reports


def modes(cfg) -> tuple[str, ...]:
  """The evaluations of each model: greedy with and without the tool, and (eval.samples > 0) the tool run
  sampled eval.samples times per video at eval.temperature - the expected reward GRPO optimises."""
  return MODES + ((SAMPLED,) if cfg.eval.samples else ())


# ---------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
  """The summary table: one row per (model, mode)."""
  head = (f"{'model':<6} {'mode':<10} {'n':>4} {'acc %':>6} {'format %':>8} {'zooms':>6} {'tool use %':>10} "
          f"{'frames':>7}  rounds")
  lines = [head, "-" * len(head)]
  for name in MODELS:
    for key in MODES + (SAMPLED,):
      r = results.get(name, {}).get(key)
      if r is None:
        continue
      mode = r.get("mode", key)
      rounds = ", ".join(f"{k}:{v['count']}" for k, v in r["rounds"].items())
      lines.append(f"{name.upper():<6} {mode:<10} {r['n']:>4} {100 * r['accuracy']:>6.1f} {100 * r['format']:>8.1f} "
                   f"{r['mean_tool_calls']:>6.2f} {100 * r['tool_use_rate']:>10.1f} {r['mean_frames']:>7.1f}  {rounds}")
  return "\n".join(lines)


def _training_summary(workdir: str, keys: tuple[str, ...]) -> dict:
  from zoomer_jax.train.metrics import read_metrics  # noqa: PLC0415
  rows = read_metrics(workdir)
  if not rows:
    return {}
  out = {"steps": rows[-1]["step"]}
  for k in keys:
    vals = [r[k] for r in rows if k in r]
    if vals:
      q = max(1, len(vals) // 4)
      out[k] = {"first": vals[0], "last": vals[-1], "first_quarter_mean": float(np.mean(vals[:q])),
                "last_quarter_mean": float(np.mean(vals[-q:]))}
  return out


def run_demo(cfg) -> dict:
  """Runs `cfg.stages`; prints the table; writes report.json, table.txt and the pictures; returns the report."""
  stages = _stages(cfg)
  out = os.path.abspath(cfg.out_dir)
  os.makedirs(out, exist_ok=True)
  load_start = os.getloadavg()
  has_eval = "eval" in stages
  clock = Clock(len(stages) + (1 if has_eval else 0))
  paths = data_paths(out)
  hf = {name: os.path.join(out, name, "hf") for name in MODELS}
  if "data" in stages:
    with clock.stage("data", "synthetic videos and cold-start trajectories"):
      paths = build_data(cfg, out)
  if "sft" in stages:
    with clock.stage("sft", f"{cfg.sft.train.total_steps} steps of {cfg.sft.data.batch_size} trajectories"):
      train_sft(cfg, paths, out)
  if "grpo" in stages:
    with clock.stage("grpo", f"{cfg.grpo.trainer.total_steps} RL steps of {cfg.grpo.data.train_batch_size} "
                     f"prompts x {cfg.grpo.rollout.n} rollouts, from the SFT model"):
      train_grpo(cfg, paths, out, hf["sft"])
  results, reports = {}, {}
  if has_eval:
    tasks = test_tasks(paths["test"])
    for name in MODELS:
      if not os.path.exists(os.path.join(hf[name], "config.json")):
        print(f"(no {name} model in {hf[name]}: not evaluated)")
        continue
      with clock.stage(f"eval_{name}", f"{name.upper()} model on {len(tasks)} test videos, with and without the tool"):
        reports[name] = evaluate_model(cfg, hf[name], name, tasks, out)
        results[name] = {mode: r.to_dict() for mode, r in reports[name].items()}
  tool = tool_config(cfg)
  report = dict(
      results=results, times_s=dict(clock.times, total=round(clock.elapsed(), 1)),
      load_average=dict(start=list(load_start), end=list(os.getloadavg())), cpu_count=os.cpu_count(),
      chance=CHANCE, no_tool_flash_visible=no_tool_flash_visible(paths["test"], tool) if has_eval else None,
      training=dict(sft=_training_summary(os.path.join(out, "sft"), ("loss",)),
                    grpo=_training_summary(os.path.join(out, "grpo"), ("reward/mean", "acc/mean", "tool_calls/mean",
                                                                       "frames/mean", "actor/kl_loss"))),
      tool=dataclasses.asdict(tool), config=json.loads(cfg.to_json()), out_dir=out)
  if cfg.sft_direct_steps:
    report["training"]["sft_direct"] = _training_summary(os.path.join(out, "sft_direct"), ("loss",))
  if results:
    report["table"] = table(results)
    print("\n" + report["table"])
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
      f.write(report["table"] + "\n")
  from zoomer_jax.demo.plots import plot_training  # noqa: PLC0415
  from zoomer_jax.demo.trajectories import draw_trajectories  # noqa: PLC0415
  report["pictures"] = {"training_curves": plot_training(
      os.path.join(out, "sft"), os.path.join(out, "grpo"), os.path.join(out, "training_curves.png"),
      sft_direct_workdir=os.path.join(out, "sft_direct") if cfg.sft_direct_steps else None)}
  best = next((n for n in ("grpo", "sft") if n in reports), None)
  if best:
    report["pictures"]["trajectories"] = draw_trajectories(
        reports[best]["tool"].records, os.path.join(out, "trajectories.png"), tool, paths["test"],
        n=cfg.eval.trajectories, title=f"{best.upper()} model, test videos, with the tool")
  with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(f"\nstage times (s): {report['times_s']}; load average {_load()} on {os.cpu_count()} cores")
  print(f"wrote {out}/report.json, table.txt, training_curves.png, trajectories.png")
  return report
