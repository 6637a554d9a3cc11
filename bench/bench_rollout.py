"""Rollout throughput: the continuous engine (`agent/engine.py`, paged KV cache) vs the lockstep engine
(`agent/rollout.py`, the named baseline), on one GRPO-shaped workload, in the same run, interleaved.

Workload: `--groups` synthetic zoom-task videos (`data/synthetic.py`), each question repeated `--n` times (a GRPO
group; 8 x 8 = 64 trajectories by default), the built-in tiny model with random weights. Turns are scripted so
that both engines do the same work and the workload is what GRPO sees: per trajectory 0-3 zoom calls on the
video's own time range, thinking of random length, then an answer (turn lengths and zoom counts vary within and
across groups; seeded). The scripted tokens are forced, the model still computes every forward.

Each engine runs once to compile (not timed), then `--repeats` timed runs alternate between the two. Printed per
engine: seconds (median), trajectory tokens/s (every token of every finished trajectory: prompt, model and
observation tokens, over the wall time), model tokens/s, prompt tokens put through the model (the lockstep engine
prefills every row, padded to the longest; the continuous one each group's prompt once), and whether the two
engines' trajectories are token-for-token equal. Ratio = lockstep seconds / continuous seconds (> 1: continuous
is faster).

  PYTHONPATH=. python bench/bench_rollout.py                      # 8 groups x 8, a few minutes on 2 CPU cores
  PYTHONPATH=. python bench/bench_rollout.py --groups 2 --n 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from zoomer_jax.agent import protocol as P  # noqa: E402
from zoomer_jax.agent.engine import EngineConfig, EngineStats, continuous_rollout  # noqa: E402
from zoomer_jax.agent.rollout import AgentConfig, Task, rollout  # noqa: E402
from zoomer_jax.config_loader import load  # noqa: E402
from zoomer_jax.data import synthetic  # noqa: E402
from zoomer_jax.model.config import ModelConfig  # noqa: E402
from zoomer_jax.model.qwen25vl import Qwen25VL  # noqa: E402
from zoomer_jax.sampling import SamplingParams  # noqa: E402
from zoomer_jax.sampling.sampler import round_up  # noqa: E402
from zoomer_jax.text import build_tiny_tokenizer  # noqa: E402

WORDS = ("the border is on here so the object must be small and brief look again at this part of the clip "
         "colour shape left right maybe").split()


def workload(out_dir: str, groups: int, n: int, seed: int, max_frames: int):
  """(tasks, scripts by row): `groups` videos, each question n times, and each row's scripted turns."""
  paths = synthetic.generate(out_dir, seed=seed, n_train=groups, n_val=0, n_test=0, min_seconds=30.0,
                             max_seconds=90.0)
  with open(paths["train"]) as f:
    records = json.load(f)
  rng = np.random.default_rng(seed)
  tasks, scripts = [], {}
  for rec in records:
    duration = rec["extra_info"]["duration"]
    for _ in range(n):
      row = len(tasks)
      tasks.append(Task(rec["videos"][0], rec["problem"], rec["solution"], rec["doc_id"]))
      turns = []
      for _ in range(int(rng.integers(0, 4))):
        start = float(rng.uniform(0, duration - 4))
        length = float(rng.uniform(2, 8))
        fps = max(0.5, min(4.0, np.floor(max_frames / length)))
        think = " ".join(rng.choice(WORDS, int(rng.integers(3, 30))))
        turns.append(f'<think>{think}</think><video_zoom>{{"segment": [{start:.1f}, {start + length:.1f}], '
                     f'"fps": {fps:g}}}</video_zoom>')
      think = " ".join(rng.choice(WORDS, int(rng.integers(3, 30))))
      turns.append(f"<think>{think}</think><answer>{rec['solution']}</answer><|im_end|>")
      scripts[row] = turns
  return tasks, scripts


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--groups", type=int, default=8)
  p.add_argument("--n", type=int, default=8)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--step-tokens", type=int, default=256)
  args = p.parse_args(argv)

  tok = build_tiny_tokenizer()
  model = Qwen25VL(ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model), rngs=nnx.Rngs(0))
  tool = P.ToolConfig(max_generation_round=5, tool_call_max_frames=8)
  cfg = AgentConfig(tool=tool, sampling=SamplingParams(temperature=0.0, max_new_tokens=96), decode_chunk=32,
                    max_pixels=56 * 56, min_pixels=56 * 56, workers=2)
  engine = EngineConfig(page_size=args.page_size, step_tokens=args.step_tokens)
  with tempfile.TemporaryDirectory() as d:
    tasks, scripts = workload(d, args.groups, args.n, args.seed, tool.tool_call_max_frames)
    script = lambda row, rnd: scripts[row][rnd] if rnd < len(scripts[row]) else None
    runs = {"lockstep": [], "continuous": []}
    out, stats = {}, {}

    def run(name, timed):
      t0 = time.perf_counter()
      if name == "lockstep":
        trajs = rollout(model, tok, tasks, cfg, jax.random.key(args.seed), script=script)
      else:
        stats[name] = EngineStats()
        trajs = continuous_rollout(model, tok, tasks, cfg, jax.random.key(args.seed), script=script, engine=engine,
                                   stats=stats[name])
      if timed:
        runs[name].append(time.perf_counter() - t0)
      out[name] = trajs

    for timed in [False] + [True] * args.repeats:  # the first round compiles
      for name in ("lockstep", "continuous"):
        run(name, timed)

  lock, cont = out["lockstep"], out["continuous"]
  equal = all(a.ids.tolist() == b.ids.tolist() for a, b in zip(lock, cont))
  total = sum(len(t.ids) for t in lock)
  model_tokens = sum(int(t.response_mask.sum()) for t in lock)
  prompts = [int(np.argmax(t.response_mask)) for t in lock]
  prompt_pad = round_up(max(prompts), cfg.token_bucket) * len(prompts)
  zooms = [sum("frames" in c for c in t.calls) for t in lock]
  res = {}
  for name in runs:
    s = statistics.median(runs[name])
    res[name] = dict(seconds=round(s, 2), tokens_per_s=round(total / s, 1), model_tokens_per_s=round(model_tokens / s, 1),
                     runs=[round(x, 2) for x in runs[name]])
  res["lockstep"]["prefill_tokens"] = prompt_pad
  res["continuous"]["prefill_tokens"] = stats["continuous"].prefill_tokens
  res["continuous"]["engine"] = stats["continuous"].as_dict()
  ratio = res["lockstep"]["seconds"] / res["continuous"]["seconds"]

  print(f"workload: {len(tasks)} trajectories ({args.groups} groups x {args.n}), {total} tokens "
        f"({model_tokens} model tokens), zooms per trajectory {np.bincount(zooms).tolist()} (count of 0, 1, ...), "
        f"prompt {min(prompts)}-{max(prompts)} tokens; CPU devices {jax.device_count()}")
  print(f"{'engine':12s} {'seconds':>8s} {'tok/s':>9s} {'model tok/s':>12s} {'prefill tokens':>15s}")
  for name in runs:
    r = res[name]
    print(f"{name:12s} {r['seconds']:8.2f} {r['tokens_per_s']:9.1f} {r['model_tokens_per_s']:12.1f} "
          f"{r['prefill_tokens']:15d}")
  print(f"ratio (lockstep s / continuous s): {ratio:.3f}; trajectories equal: {equal}")
  print("BENCH_JSON " + json.dumps(dict(bench="rollout", baseline="lockstep", groups=args.groups, n=args.n,
                                        trajectories=len(tasks), tokens=total, model_tokens=model_tokens,
                                        zooms=int(sum(zooms)), ratio=round(ratio, 3), trajectories_equal=equal,
                                        page_size=args.page_size, step_tokens=args.step_tokens, **res)))


if __name__ == "__main__":
  main()
