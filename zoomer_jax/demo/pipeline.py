"""The main job (`python -m zoomer_jax demo`): data -> SFT -> GRPO -> evaluation with and without the tool -> report.

    report = run_demo(load("demo"))      # configs/demo.py; every stage reuses what an earlier run left in out_dir

Stages (`cfg.stages`, comma-separated, in this order):
  data  `data.synthetic.generate` (train / validation / test) and `data.cold_start.generate_sft` on the first
        `data.n_sft` train records, under `out_dir/data`;
  sft   `train.sft.run_sft` on the cold start (workdir `out_dir/sft`), then the last checkpoint exported as an HF
        directory with the tiny tokenizer (`out_dir/sft/hf`); with `sft_direct_steps`, first that many steps on
        the direct trajectories alone (`out_dir/sft_direct`, exported to `out_dir/sft_direct/hf`), and the
        rest on the mix from those weights;
  reflect (not in the default stages) the SFT model runs the first `reflect.limit` training tasks (`data/reflect.py`,
        `reflect.samples` trajectories each at `reflect.temperature`) and the scripted expert
        (`demo/scripted_expert.py`, a loopback server that knows the task's truth) corrects each failure; the
        accepted corrections (`out_dir/reflect/records.jsonl`) are mixed at `reflect.ratio` into the SFT data
        (the second SFT job's files) for `reflect.sft_steps` more steps from the SFT model (workdir
        `out_dir/sft_r`, exported to `out_dir/sft_r/hf`, the "SFT+R" rows);
  grpo  `train.grpo.run_grpo` from that directory (`init.checkpoint`) on the train split (workdir `out_dir/grpo`),
        exported to `out_dir/grpo/hf`;
  eval  `eval.harness.evaluate` of each exported model on the test split, with the tool and as the no-tool
        baseline (same frame budget), greedy; and the tool run sampled `eval.samples` times per video at
        `eval.temperature` (GRPO's rollout temperature: the policy's expected accuracy, which GRPO trains);
        trajectories in `out_dir/eval/{sft,sft_r,grpo}_{tool,no_tool,sampled}.jsonl`.
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

STAGES = ("data", "sft", "reflect", "grpo", "eval")
MODELS = ("sft", "sft_r", "grpo")  # each stage's exported model, in out_dir/<name>/hf
LABELS = {"sft": "SFT", "sft_r": "SFT+R", "grpo": "GRPO"}
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


def engine_config(cfg):
  """The continuous engine's settings of the evaluation (and the reflect stage's rollouts)."""
  from zoomer_jax.agent.engine import EngineConfig  # noqa: PLC0415
  return EngineConfig(page_size=cfg.eval.page_size, step_tokens=cfg.eval.step_tokens)


def _stages(cfg) -> list[str]:
  names = [s.strip() for s in str(cfg.stages).split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown demo stages {unknown}; known: {list(STAGES)}")
  return [s for s in STAGES if s in names]


# ---------------------------------------------------------------------------------------------- data
def data_paths(out: str) -> dict[str, str]:
  """Every file the stages write or read. `sft_in` (the cold start's RL records) becomes `sft` (cold_start names
  its output <stem>_sft.json)."""
  d, sft = os.path.join(out, "data"), os.path.join(out, "data", "sft")
  return {"train": os.path.join(d, "train.json"), "validation": os.path.join(d, "validation.json"),
          "test": os.path.join(d, "test.json"), "sft_in": os.path.join(sft, "sft_records.json"),
          "sft": os.path.join(sft, "sft_records_sft.json"), "sft_mix": os.path.join(sft, "sft_records_mix_sft.json"),
          "sft_no_tool": os.path.join(sft, "sft_records_notool_sft.json"),
          "reflections": os.path.join(out, "reflect", "records.jsonl")}


def build_data(cfg, out: str) -> dict[str, str]:
  """Writes (or finds, unchanged) the three splits and the cold-start SFT file; returns their paths."""
  from zoomer_jax.data import cold_start, synthetic  # noqa: PLC0415
  from zoomer_jax.demo.no_tool_sft import generate_no_tool_sft  # noqa: PLC0415
  d, tool = cfg.data, tool_config(cfg)
  if max(d.n_sft, d.n_sft_no_tool) > d.n_train:
    raise ValueError(f"data.n_sft ({d.n_sft}) and data.n_sft_no_tool ({d.n_sft_no_tool}) cannot exceed "
                     f"data.n_train ({d.n_train})")
  root, paths = os.path.join(out, "data"), data_paths(out)
  written = synthetic.generate(root, seed=cfg.seed, n_train=d.n_train, n_val=d.n_val, n_test=d.n_test,
                               tool_cfg=tool, **d.video.to_dict())
  assert all(written[k] == paths[k] for k in written), written
  with open(paths["train"], encoding="utf-8") as f:
    records = json.load(f)[:d.n_sft]
  sft_in = paths["sft_in"]
  os.makedirs(os.path.dirname(sft_in), exist_ok=True)
  synthetic.write_if_changed(sft_in, json.dumps(records, indent=1).encode())
  written = cold_start.generate_sft(sft_in, os.path.dirname(sft_in), seed=cfg.seed,
                                    reflection_fraction=d.reflection_fraction, tool_cfg=tool)
  assert written == paths["sft"], written
  if d.sparse_copies:
    # Every record also as a sparse trajectory (half the zoom's frame rate); the mix holds each direct one
    # direct_copies times and each sparse one sparse_copies times: the same video is shown with both frame
    # rates, so SFT learns the mix (direct_copies : sparse_copies), not which video got which.
    sparse = cold_start.generate_sft(sft_in, os.path.join(os.path.dirname(sft_in), "sparse"), seed=cfg.seed,
                                     reflection_fraction=0.0, sparse_fraction=1.0, tool_cfg=tool)
    with open(paths["sft"], encoding="utf-8") as f, open(sparse, encoding="utf-8") as g:
      mix = json.load(f) * d.direct_copies + json.load(g) * d.sparse_copies
    synthetic.write_if_changed(paths["sft_mix"], json.dumps(mix, indent=1).encode())
  if d.n_sft_no_tool:
    written = generate_no_tool_sft(sft_in, os.path.dirname(sft_in), tool_cfg=tool, seed=cfg.seed, n=d.n_sft_no_tool)
    assert written == paths["sft_no_tool"], written
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
def sft_files(cfg, paths: dict, mix: bool) -> tuple[str, ...]:
  """The SFT data: the cold start's tool trajectories (the direct ones, or with `mix` and `data.sparse_copies`
  the direct / sparse mix), and the no-tool conversations when there are any."""
  tool = paths["sft_mix"] if mix and cfg.data.sparse_copies else paths["sft"]
  return (tool,) + ((paths["sft_no_tool"],) if cfg.data.n_sft_no_tool else ())


def sft_job(cfg, paths: dict, out: str):
  """The SFT job on the mix (workdir `out/sft`); `train_sft` splits off the direct steps."""
  job = copy.deepcopy(cfg.sft)
  job.model = copy.deepcopy(cfg.model)
  job.seed = cfg.seed
  job.workdir = os.path.join(out, "sft")
  job.data.train_files = sft_files(cfg, paths, mix=True)
  job.data.reflection_files, job.data.reflection_ratio = (), 0.0  # only the reflect stage's job mixes them in
  job.data.max_pixels = job.data.min_pixels = cfg.pixels
  # Image counts padded to what a micro-batch can hold at most: one compiled training shape.
  job.data.image_bucket = job.data.micro_batch_size * cfg.tool.max_total_frames
  return job


def direct_job(cfg, paths: dict, out: str):
  """The first `sft_direct_steps` of SFT: direct trajectories only (workdir `out/sft_direct`)."""
  job = sft_job(cfg, paths, out)
  job.workdir = os.path.join(out, "sft_direct")
  job.data.train_files = sft_files(cfg, paths, mix=False)
  job.train.total_steps = cfg.sft_direct_steps
  return job


def sft_r_job(cfg, paths: dict, out: str):
  """SFT+R: `reflect.sft_steps` more steps from the SFT model on its data with the reflection records mixed in
  at `reflect.ratio` (workdir `out/sft_r`). From the SFT model rather than from scratch: it isolates what the
  corrections add to the same starting point, at a fraction of SFT's steps."""
  job = sft_job(cfg, paths, out)
  job.workdir = os.path.join(out, "sft_r")
  job.init.checkpoint = os.path.join(out, "sft", "hf")
  job.train.total_steps = cfg.reflect.sft_steps
  job.data.reflection_files, job.data.reflection_ratio = (paths["reflections"],), cfg.reflect.ratio
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


def reflect_job(cfg, paths: dict, out: str, expert_url: str):
  """configs/reflect.py: the SFT model (`out/sft/hf`) on the training tasks, the evaluation's agent and decoding
  lengths, the expert at `expert_url` (outputs in `out/reflect`)."""
  from zoomer_jax.config_loader import load  # noqa: PLC0415
  job = load("reflect:tiny")  # the tiny model's impl and dtype; its weights come from `checkpoint`
  job.out_dir = os.path.dirname(paths["reflections"])
  job.checkpoint = os.path.join(out, "sft", "hf")
  job.seed = cfg.seed
  job.progress = False
  job.data.update(dict(train_files=(paths["train"],), limit=cfg.reflect.limit, samples=cfg.reflect.samples))
  job.agent.update(cfg.tool)
  e = cfg.eval
  job.rollout.update(dict(max_new_tokens=e.max_new_tokens, decode_chunk=e.decode_chunk, workers=e.workers,
                          max_pixels=cfg.pixels, min_pixels=cfg.pixels))
  job.reflect.update(dict(temperature=cfg.reflect.temperature, batch_size=e.batch_size))
  job.engine.update(dict(page_size=e.page_size, step_tokens=e.step_tokens))
  job.expert.update(dict(base_url=expert_url, model="scripted-expert", api_key="", max_retries=0))
  return job


def export_trained(job, hf_dir: str) -> str:
  """The latest checkpoint of `job.workdir` as an HF directory with the job's tokenizer; returns hf_dir."""
  from zoomer_jax.checkpoint.hf_export import export_hf  # noqa: PLC0415
  from zoomer_jax.train.jobs import tokenizer_for  # noqa: PLC0415
  from zoomer_jax.train.trainer import trained_model  # noqa: PLC0415
  model, step = trained_model(job)
  export_hf(model, hf_dir, overwrite=True)
  tokenizer_for(job).save(hf_dir)
  with open(os.path.join(hf_dir, "demo_step.json"), "w") as f:
    json.dump({"workdir": job.workdir, "step": step}, f)
  return hf_dir


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
    job.init.checkpoint = export_trained(first, os.path.join(first.workdir, "hf"))
    job.train.total_steps -= cfg.sft_direct_steps
  run_sft(job)
  return export_trained(job, os.path.join(job.workdir, "hf"))


def reflect(cfg, paths: dict, out: str) -> dict:
  """Reflection records of the SFT model's failures on the training tasks, corrected by the scripted expert;
  returns the reflect job's summary."""
  from zoomer_jax.data.reflect import run_reflect  # noqa: PLC0415
  from zoomer_jax.demo.scripted_expert import ExpertServer, ScriptedExpert  # noqa: PLC0415
  if not os.path.exists(os.path.join(out, "sft", "hf", "config.json")):
    raise FileNotFoundError(f"the reflect stage needs the SFT model in {out}/sft/hf: run the sft stage first")
  with open(paths["train"], encoding="utf-8") as f:
    records = json.load(f)
  expert = ScriptedExpert(records[:cfg.reflect.limit or None], tool_config(cfg))
  with ExpertServer(expert) as server:
    summary = run_reflect(reflect_job(cfg, paths, out, server.url))
  if expert.problems:
    raise RuntimeError(f"the scripted expert found {len(expert.problems)} problems: {expert.problems[:3]}")
  if not summary["accepted"]:
    raise RuntimeError(f"reflect accepted no correction ({summary['reasons']}): SFT+R has no reflection records "
                       f"to mix in; see {os.path.dirname(paths['reflections'])}/attempts.jsonl")
  return summary


def train_sft_r(cfg, paths: dict, out: str) -> str:
  from zoomer_jax.train.sft import run_sft  # noqa: PLC0415
  job = sft_r_job(cfg, paths, out)
  run_sft(job)
  return export_trained(job, os.path.join(job.workdir, "hf"))


def train_grpo(cfg, paths: dict, out: str, init_dir: str) -> str:
  from zoomer_jax.train.grpo import run_grpo  # noqa: PLC0415
  job = grpo_job(cfg, paths, out, init_dir)
  run_grpo(job)
  return export_trained(job, os.path.join(job.workdir, "hf"))


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
                             key=jax.random.key(cfg.seed), engine=engine_config(cfg), **sampled)
    print(f"{name} {reports[mode].mode}: accuracy {reports[mode].accuracy:.3f} ({reports[mode].wall_s:.1f} s)",
          flush=True)
  return reports


def evaluate_all(cfg, paths: dict, out: str, names: list[str], clock: Clock) -> dict:
  """{name: {mode: Report}} of each model in `names` (its export in out/<name>/hf) on the test split."""
  tasks = test_tasks(paths["test"])
  reports = {}
  for name in names:
    hf_dir = os.path.join(out, name, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
      print(f"(no {name} model in {hf_dir}: not evaluated)")
      continue
    with clock.stage(f"eval_{name}", f"{LABELS[name]} model on {len(tasks)} test videos, with and without the tool"):
      reports[name] = evaluate_model(cfg, hf_dir, name, tasks, out)
  return reports


def result(report) -> dict:
  """A Report's numbers (`Report.to_dict`) and its tool calls per answer: the mean over trajectories that ended
  with an answer (None when none did), which tells a model that zooms before answering from one that does not."""
  answered = [r["tool_calls"] for r in report.records if r["finish_reason"] == "answer"]
  return dict(report.to_dict(), calls_per_answer=float(np.mean(answered)) if answered else None)


def modes(cfg) -> tuple[str, ...]:
  """The evaluations of each model: greedy with and without the tool, and (eval.samples > 0) the tool run
  sampled eval.samples times per video at eval.temperature - the expected reward GRPO optimises."""
  return MODES + ((SAMPLED,) if cfg.eval.samples else ())


# ---------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
  """The summary table: one row per (model, mode)."""
  head = (f"{'model':<6} {'mode':<10} {'n':>4} {'acc %':>6} {'format %':>8} {'zooms':>6} {'zooms/ans':>9} "
          f"{'tool use %':>10} {'frames':>7}  rounds")
  lines = [head, "-" * len(head)]
  for name in MODELS:
    for key in MODES + (SAMPLED,):
      r = results.get(name, {}).get(key)
      if r is None:
        continue
      mode = r["mode"]  # a sampled run names its temperature and samples ("tool@T1x2")
      rounds = ", ".join(f"{k}:{v['count']}" for k, v in r["rounds"].items())
      per_answer = "-" if r["calls_per_answer"] is None else f"{r['calls_per_answer']:.2f}"
      lines.append(f"{LABELS[name]:<6} {mode:<10} {r['n']:>4} {100 * r['accuracy']:>6.1f} {100 * r['format']:>8.1f} "
                   f"{r['mean_tool_calls']:>6.2f} {per_answer:>9} {100 * r['tool_use_rate']:>10.1f} "
                   f"{r['mean_frames']:>7.1f}  {rounds}")
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


def _trained(stages: list[str], out: str) -> list[str]:
  """The models this run trains or an earlier one left in out (the ones the eval stage evaluates)."""
  trains = {"sft": "sft", "sft_r": "reflect", "grpo": "grpo"}
  return [m for m in MODELS if trains[m] in stages or os.path.exists(os.path.join(out, m, "hf", "config.json"))]


def run_demo(cfg) -> dict:
  """Runs `cfg.stages`; prints the table; writes report.json, table.txt and the pictures; returns the report."""
  stages = _stages(cfg)
  out = os.path.abspath(cfg.out_dir)
  os.makedirs(out, exist_ok=True)
  load_start = os.getloadavg()
  evaluated = _trained(stages, out) if "eval" in stages else []
  clock = Clock(len(stages) - ("eval" in stages) + ("reflect" in stages) + len(evaluated))
  paths = data_paths(out)
  reflection = None
  if "data" in stages:
    with clock.stage("data", "synthetic videos and cold-start trajectories"):
      build_data(cfg, out)
  if "sft" in stages:
    with clock.stage("sft", f"{cfg.sft.train.total_steps} steps of {cfg.sft.data.batch_size} trajectories"):
      train_sft(cfg, paths, out)
  if "reflect" in stages:
    with clock.stage("reflect", "the SFT model on the training tasks, its failures corrected by the scripted expert"):
      reflection = reflect(cfg, paths, out)
    with clock.stage("sft_r", f"{cfg.reflect.sft_steps} steps from the SFT model, {cfg.reflect.ratio:.0%} reflections"):
      train_sft_r(cfg, paths, out)
  if "grpo" in stages:
    with clock.stage("grpo", f"{cfg.grpo.trainer.total_steps} RL steps of {cfg.grpo.data.train_batch_size} "
                     f"prompts x {cfg.grpo.rollout.n} rollouts, from the SFT model"):
      train_grpo(cfg, paths, out, os.path.join(out, "sft", "hf"))
  reports = evaluate_all(cfg, paths, out, evaluated, clock) if evaluated else {}
  report = make_report(cfg, stages, out, reports, reflection, clock, load_start)
  write_outputs(cfg, report, reports, paths, out)
  return report


def make_report(cfg, stages: list[str], out: str, reports: dict, reflection: dict | None, clock: Clock,
                load_start) -> dict:
  tool = tool_config(cfg)
  results = {name: {mode: result(r) for mode, r in rs.items()} for name, rs in reports.items()}
  training = dict(sft=_training_summary(os.path.join(out, "sft"), ("loss",)),
                  grpo=_training_summary(os.path.join(out, "grpo"), ("reward/mean", "acc/mean", "tool_calls/mean",
                                                                     "frames/mean", "actor/kl_loss")))
  if cfg.sft_direct_steps:
    training["sft_direct"] = _training_summary(os.path.join(out, "sft_direct"), ("loss",))
  if "reflect" in stages:
    training["sft_r"] = _training_summary(os.path.join(out, "sft_r"), ("loss",))
  report = dict(
      results=results, times_s=dict(clock.times, total=round(clock.elapsed(), 1)),
      load_average=dict(start=list(load_start), end=list(os.getloadavg())), cpu_count=os.cpu_count(),
      chance=CHANCE, no_tool_flash_visible=no_tool_flash_visible(data_paths(out)["test"], tool) if reports else None,
      training=training, tool=dataclasses.asdict(tool), config=json.loads(cfg.to_json()), out_dir=out)
  if reflection is not None:
    report["reflect"] = {k: reflection[k] for k in ("attempts", "accepted", "rejected", "skipped", "reasons")}
  if results:
    report["table"] = table(results)
  return report


def write_outputs(cfg, report: dict, reports: dict, paths: dict, out: str) -> None:
  """table.txt, the pictures, report.json; prints the table and the stage times."""
  from zoomer_jax.demo.plots import plot_training  # noqa: PLC0415
  from zoomer_jax.demo.trajectories import draw_trajectories  # noqa: PLC0415
  if "table" in report:
    print("\n" + report["table"])
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
      f.write(report["table"] + "\n")
  report["pictures"] = {"training_curves": plot_training(
      os.path.join(out, "sft"), os.path.join(out, "grpo"), os.path.join(out, "training_curves.png"),
      sft_direct_workdir=os.path.join(out, "sft_direct") if cfg.sft_direct_steps else None,
      sft_r_workdir=os.path.join(out, "sft_r") if "reflect" in _stages(cfg) else None)}
  best = next((n for n in ("grpo", "sft") if n in reports), None)
  if best:
    report["pictures"]["trajectories"] = draw_trajectories(
        reports[best]["tool"].records, os.path.join(out, "trajectories.png"), tool_config(cfg), paths["test"],
        n=cfg.eval.trajectories, title=f"{LABELS[best]} model, test videos, with the tool")
  with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(f"\nstage times (s): {report['times_s']}; load average {_load()} on {os.cpu_count()} cores")
  print(f"wrote {out}/report.json, table.txt, training_curves.png, trajectories.png")
