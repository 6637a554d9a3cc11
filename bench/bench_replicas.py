"""Rollouts on a mesh with data-parallel replicas: one engine per replica (`agent/replicas.py`, what GRPO and
evaluation run) against one engine over the whole mesh (`agent/engine.py`'s `continuous_rollout`, the named
baseline), the same tasks, the same sharded model, in the same run, interleaved.

Workload: `bench_rollout.py`'s (synthetic zoom-task videos, `--groups` x `--n` scripted GRPO-shaped
trajectories, the tiny model or bench-small with random weights), the model loaded onto a (data `--data`, tensor
`--tensor`) mesh of simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 is set when absent).
The baseline's one engine runs every trajectory in one pool laid out over the whole mesh, each device step one
program over every device; the replicas each run their share of the groups on their own devices, in threads.

Each variant runs once to compile (timed apart: `first_round_s`, where each replica compiles its own programs,
in its own thread), then `--repeats` timed runs alternate. Printed: seconds (median),
trajectories/s, the ratio (baseline seconds / replicas seconds: > 1, the replicas are faster), whether both gave
the same trajectories, the engines run, and a BENCH_JSON line. On a CPU host the "devices" share its cores, so
the ratio says little about a TPU pod (where the replicas' chips compute at once); what it checks is the cost of
the threads and of one set of programs per replica.

  PYTHONPATH=. python bench/bench_replicas.py                           # tiny, 4 groups x 4, data 4 x tensor 2
  PYTHONPATH=. python bench/bench_replicas.py --groups 8 --n 8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import zoomer_jax  # noqa: E402
from bench_rollout import model_config, workload  # noqa: E402
from zoomer_jax.agent import protocol as P  # noqa: E402
from zoomer_jax.agent.engine import EngineConfig, EngineStats, continuous_rollout  # noqa: E402
from zoomer_jax.agent.replicas import replicated_rollout  # noqa: E402
from zoomer_jax.agent.rollout import AgentConfig  # noqa: E402
from zoomer_jax.model.qwen25vl import Qwen25VL  # noqa: E402
from zoomer_jax.parallel.mesh import make_mesh  # noqa: E402
from zoomer_jax.sampling import SamplingParams  # noqa: E402
from zoomer_jax.text import build_tiny_tokenizer  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="tiny", choices=("tiny", "bench-small"))
  p.add_argument("--groups", type=int, default=4)
  p.add_argument("--n", type=int, default=4)
  p.add_argument("--data", type=int, default=4)
  p.add_argument("--tensor", type=int, default=2)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.data * args.tensor > jax.device_count():
    raise ValueError(f"--data {args.data} x --tensor {args.tensor} needs more than the {jax.device_count()} devices")
  tok = build_tiny_tokenizer()
  tool = P.ToolConfig(max_generation_round=5, tool_call_max_frames=4, frames_upbound=8)
  cfg = AgentConfig(tool=tool, sampling=SamplingParams(temperature=0.0, max_new_tokens=96), decode_chunk=32,
                    max_pixels=56 * 56, min_pixels=56 * 56, workers=2)
  engine = EngineConfig(page_size=16)
  mesh = make_mesh((args.data, 1, args.tensor), devices=jax.devices()[:args.data * args.tensor])
  runs = {"one_engine": [], "replicas": []}
  first = {}
  got, stats = {}, {}
  with tempfile.TemporaryDirectory() as d:
    model = Qwen25VL(model_config(args.config), rngs=nnx.Rngs(0))
    sharded = zoomer_jax.load_hf(zoomer_jax.export_hf(model, os.path.join(d, "ckpt")), mesh=mesh)
    tasks, scripts = workload(d, args.groups, args.n, args.seed, tool.tool_call_max_frames)
    script = lambda row, rnd: scripts[row][rnd] if rnd < len(scripts[row]) else None
    for timed in [False] + [True] * args.repeats:  # the first round compiles
      for name, fn in (("one_engine", continuous_rollout), ("replicas", replicated_rollout)):
        stats[name] = EngineStats()
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
          got[name] = fn(sharded, tok, tasks, cfg, jax.random.key(args.seed), script=script, engine=engine,
                         stats=stats[name])
        dt = time.perf_counter() - t0
        if timed:
          runs[name].append(dt)
        else:
          first[name] = dt
  equal = all(a.ids.tolist() == b.ids.tolist() for a, b in zip(got["one_engine"], got["replicas"]))
  res = {k: dict(seconds=round(statistics.median(v), 2), runs=[round(x, 2) for x in v],
                 trajectories_per_s=round(len(tasks) / statistics.median(v), 3), engines=stats[k].engines,
                 prefills=stats[k].prefills, steps=stats[k].steps, first_round_s=round(first[k], 2))
         for k, v in runs.items()}
  ratio = res["one_engine"]["seconds"] / res["replicas"]["seconds"]
  print(f"[{args.config}] {len(tasks)} trajectories ({args.groups} groups x {args.n}) on a mesh {dict(mesh.shape)} "
        f"of CPU devices; trajectories equal: {equal}")
  for k, r in res.items():
    print(f"{k:11s} {r['seconds']:8.2f} s ({r['runs']})  {r['trajectories_per_s']:.3f} traj/s  engines "
          f"{r['engines']}  prefills {r['prefills']}  device calls {r['steps']}  first round (compiles) "
          f"{r['first_round_s']:.2f} s")
  print(f"ratio (one engine s / replicas s): {ratio:.3f}")
  print("BENCH_JSON " + json.dumps(dict(bench="replicas", config=args.config, trajectories=len(tasks),
                                        mesh=dict(mesh.shape), equal=equal, ratio=round(ratio, 3), **res)))
  return res


if __name__ == "__main__":
  main()
