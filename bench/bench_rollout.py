"""Rollout throughput: the continuous engine (`agent/engine.py`, paged KV cache) vs the lockstep engine
(`agent/rollout.py`, the named baseline), on one GRPO-shaped workload, in the same run, interleaved.

Workload: `--groups` synthetic zoom-task videos (`data/synthetic.py`), each question repeated `--n` times (a GRPO
group; 8 x 8 = 64 trajectories by default), a model with random weights: `--config tiny` (the built-in tiny
model) or `bench-small` (text like Qwen2.5-0.5B with its 151936-row head, the narrow vision tower of
`bench/bench_forward.py`'s bench-small; the tokenizer stays the tiny one, whose special ids the config takes, and
sampling is restricted to its ids as for any checkpoint whose head has more rows than its tokenizer has ids).
Turns are scripted so
that both engines do the same work and the workload is what GRPO sees: per trajectory 0-3 zoom calls on the
video's own time range, thinking of random length, then an answer (turn lengths and zoom counts vary within and
across groups; seeded). The scripted tokens are forced, the model still computes every forward.

`--in-flight` caps the trajectories in flight (a host's memory holds the lockstep engine's dense caches for so many
rows): the lockstep engine then runs the tasks in batches of that many rows one after another, as GRPO does with
`rollout.batch_size`, and the continuous one admits that many at a time, refilling a finished one's place.
`--continuous-in-flight` admits a different number into the continuous engine, and `--pool-pages` sizes its page
pool (0: every trajectory in flight at its longest, no preemption; `lockstep`: the bytes of the lockstep engine's
dense cache, so that both engines hold the same KV memory and the continuous one runs more trajectories in it,
preempting when they outgrow it). Both engines' KV memory is printed.

Each engine runs once to compile (not timed; `--warmup-groups` runs it on fewer groups, which compiles the same
bucketed shapes in less time), then `--repeats` timed runs alternate between the two; several
configs (`--config tiny,bench-small`) run one after the other in the same process. Printed per engine: seconds
(median), trajectories/s, trajectory tokens/s (every token of every finished trajectory: prompt, model and
observation tokens, over the wall time), model tokens/s, prompt tokens put through the model (the lockstep engine
prefills every row, padded to the longest; the continuous one each group's prompt once), and whether the two
engines' trajectories are token-for-token equal. Ratio = lockstep seconds / continuous seconds (> 1: continuous
is faster). For the continuous engine also: device calls and decode bursts, tokens per device call, the
utilisation of the device rows (real tokens / bucketed rows computed), prefills per group, and the KV bytes a
trajectory referenced at its peak (pages x page size, bursts' reserved room included) against the bytes of the
tokens it held at its end.

  PYTHONPATH=. python bench/bench_rollout.py                      # tiny, 8 groups x 8
  PYTHONPATH=. python bench/bench_rollout.py --config tiny,bench-small
  PYTHONPATH=. python bench/bench_rollout.py --groups 2 --n 4 --repeats 1
  PYTHONPATH=. python bench/bench_rollout.py --config bench-small --in-flight 16 --warmup-groups 2
  PYTHONPATH=. python bench/bench_rollout.py --config bench-small --in-flight 16 --continuous-in-flight 32 \
      --pool-pages lockstep --warmup-groups 2 --overview-frames 8 --frames 4   # the same KV memory
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
from zoomer_jax.agent.engine import EngineConfig, EngineStats, continuous_rollout, pool_pages  # noqa: E402
from zoomer_jax.agent.rollout import AgentConfig, Task, cache_slots, rollout  # noqa: E402
from zoomer_jax.config_loader import load  # noqa: E402
from zoomer_jax.data import synthetic  # noqa: E402
from zoomer_jax.model.config import ModelConfig  # noqa: E402
from zoomer_jax.model.qwen25vl import Qwen25VL  # noqa: E402
from zoomer_jax.sampling import SamplingParams  # noqa: E402
from zoomer_jax.sampling.sampler import round_up  # noqa: E402
from zoomer_jax.text import build_tiny_tokenizer  # noqa: E402

# bench/bench_forward.py's bench-small: text like Qwen2.5-0.5B, a shallow and narrow vision tower.
BENCH_SMALL = dict(
    text=dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, intermediate_size=4864, mrope_section=(8, 12, 12), tie_word_embeddings=True),
    vision=dict(depth=8, hidden_size=640, num_heads=10, intermediate_size=1710, out_hidden_size=896,
                fullatt_block_indexes=(3, 7), window_size=112))


def model_config(name: str) -> ModelConfig:
  """The tiny model's config (the tiny tokenizer's special ids), at bench-small's sizes for "bench-small"."""
  cd = load("qwen25vl_tiny", []).model.to_dict()
  if name == "bench-small":
    for part, values in BENCH_SMALL.items():
      cd[part].update(values)
  elif name != "tiny":
    raise ValueError(f"--config {name!r} is not one of tiny, bench-small")
  return ModelConfig.from_config_dict(cd)

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


COMPILE = {"seconds": 0.0, "count": 0}  # XLA compiles so far (jax's backend-compile event)


def _on_event(event: str, seconds: float, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILE["seconds"] += seconds
    COMPILE["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="tiny", help="tiny, bench-small, or both comma-separated (run in turn)")
  p.add_argument("--groups", type=int, default=8)
  p.add_argument("--n", type=int, default=8)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--step-tokens", type=int, default=256)
  p.add_argument("--decode-burst", type=int, default=EngineConfig.decode_burst)
  p.add_argument("--decode-chunk", type=int, default=32, help="the lockstep engine's tokens per device call")
  p.add_argument("--frames", type=int, default=8, help="most frames a zoom shows (tool_call_max_frames)")
  p.add_argument("--overview-frames", type=int, default=64, help="most overview frames (frames_upbound)")
  p.add_argument("--in-flight", type=int, default=0,
                 help="trajectories in flight (0: all): the lockstep engine runs batches of this many rows one after "
                      "another (as GRPO's rollout.batch_size does), the continuous one admits this many at once")
  p.add_argument("--continuous-in-flight", type=int, default=0,
                 help="trajectories in flight in the continuous engine (0: --in-flight)")
  p.add_argument("--pool-pages", default="0",
                 help="the continuous engine's pool: 0 (every trajectory in flight at its longest), a number of pages, "
                      "or 'lockstep' (the bytes of the lockstep engine's dense cache)")
  p.add_argument("--warmup-groups", type=int, default=0,
                 help="groups of the untimed compile round (0: the whole workload)")
  args = p.parse_args(argv)
  for flag in ("in_flight", "continuous_in_flight"):
    if getattr(args, flag) % args.n:
      name = "--" + flag.replace("_", "-")
      raise ValueError(f"{name} {getattr(args, flag)} is not a whole number of groups of n={args.n}")
  if args.pool_pages != "lockstep" and not args.pool_pages.isdigit():
    raise ValueError(f"--pool-pages {args.pool_pages!r} is not a number of pages or 'lockstep'")
  return [bench(args, name) for name in args.config.split(",")]


def bench(args, name: str) -> dict:
  tok = build_tiny_tokenizer()
  model = Qwen25VL(model_config(name), rngs=nnx.Rngs(0))
  tool = P.ToolConfig(max_generation_round=5, tool_call_max_frames=args.frames, frames_upbound=args.overview_frames)
  cfg = AgentConfig(tool=tool, sampling=SamplingParams(temperature=0.0, max_new_tokens=96),
                    decode_chunk=args.decode_chunk, max_pixels=56 * 56, min_pixels=56 * 56, workers=2)
  text = model.config.text
  kv_token_bytes = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * np.dtype(
      model.dtype).itemsize
  with tempfile.TemporaryDirectory() as d:
    tasks, scripts = workload(d, args.groups, args.n, args.seed, tool.tool_call_max_frames)
    # KV memory: the lockstep engine's dense cache for its largest batch; the continuous engine's pool
    lock_rows = args.in_flight or len(tasks)
    batches = [range(i, min(i + lock_rows, len(tasks))) for i in range(0, len(tasks), lock_rows)]
    *batch_slots, all_slots = cache_slots(tok, tasks, cfg, batches + [range(len(tasks))])  # overviews read once
    lock_slots = max(batch_slots)
    running = args.continuous_in_flight or args.in_flight
    ps = args.page_size
    pool = lock_rows * lock_slots // ps if args.pool_pages == "lockstep" else int(args.pool_pages)
    pool_used = pool or pool_pages(running or len(tasks), args.n, -(-all_slots // ps))
    kv_bytes = dict(lockstep=lock_rows * lock_slots * kv_token_bytes, continuous=pool_used * ps * kv_token_bytes)
    engine = EngineConfig(page_size=ps, step_tokens=args.step_tokens, decode_burst=args.decode_burst,
                          max_running=running, pool_pages=pool)
    script = lambda row, rnd: scripts[row][rnd] if rnd < len(scripts[row]) else None
    runs = {"lockstep": [], "continuous": []}
    compiles = {"lockstep": [0, 0.0], "continuous": [0, 0.0]}  # inside timed runs: count, seconds
    got, stats = {}, {}

    def run(e, timed):
      # The continuous engine's shapes depend on which trajectories meet in a step: it compiles on the whole
      # workload; the lockstep one's batches repeat one batch's shapes.
      few = not timed and args.warmup_groups and e == "lockstep"
      rows = args.warmup_groups * args.n if few else len(tasks)
      c0 = dict(COMPILE)
      t0 = time.perf_counter()
      if e == "lockstep":  # batches of in-flight rows, one after another (keys as one call would give them)
        size = args.in_flight or rows
        trajs = []
        for i in range(0, rows, size):
          batch = tasks[i:min(i + size, rows)]
          trajs += rollout(model, tok, batch, cfg, jax.random.key(args.seed),
                           script=lambda row, rnd, i=i: script(i + row, rnd))
      else:
        stats[e] = EngineStats()
        trajs = continuous_rollout(model, tok, tasks[:rows], cfg, jax.random.key(args.seed), script=script,
                                   engine=engine, stats=stats[e])
      if timed:
        runs[e].append(time.perf_counter() - t0)
        compiles[e][0] += COMPILE["count"] - c0["count"]
        compiles[e][1] += COMPILE["seconds"] - c0["seconds"]
      got[e] = trajs

    for timed in [False] + [True] * args.repeats:  # the first round compiles
      for e in ("lockstep", "continuous"):
        run(e, timed)

  lock, cont = got["lockstep"], got["continuous"]
  equal = all(a.ids.tolist() == b.ids.tolist() for a, b in zip(lock, cont))
  total = sum(len(t.ids) for t in lock)
  model_tokens = sum(int(t.response_mask.sum()) for t in lock)
  prompts = [int(np.argmax(t.response_mask)) for t in lock]
  prompt_pad = round_up(max(prompts), cfg.token_bucket) * len(prompts)
  zooms = [sum("frames" in c for c in t.calls) for t in lock]
  res = {}
  for e in runs:
    s = statistics.median(runs[e])
    res[e] = dict(seconds=round(s, 2), trajectories_per_s=round(len(tasks) / s, 3), tokens_per_s=round(total / s, 1),
                  model_tokens_per_s=round(model_tokens / s, 1), runs=[round(x, 2) for x in runs[e]],
                  compiles_in_timed_runs=compiles[e][0], compile_s_in_timed_runs=round(compiles[e][1], 2))
  res["lockstep"]["prefill_tokens"] = prompt_pad
  st = stats["continuous"]
  res["continuous"]["prefill_tokens"] = st.prefill_tokens
  res["continuous"]["engine"] = st.as_dict()
  ratio = res["lockstep"]["seconds"] / res["continuous"]["seconds"]
  fed = st.prefill_tokens + st.extend_tokens + st.decode_tokens
  engine_res = dict(
      tokens_per_device_call=round(fed / st.steps, 2), decode_tokens_per_device_call=round(
          st.decode_tokens / st.steps, 2), utilisation=round(fed / st.device_rows, 3),
      prefills_per_group=round(st.prefills / args.groups, 3),
      peak_kv_bytes_per_trajectory=round(st.page_tokens_peak * kv_token_bytes / len(tasks)),
      held_kv_bytes_per_trajectory=round(st.tokens_held * kv_token_bytes / len(tasks)),
      kv_peak_over_held=round(st.page_tokens_peak / st.tokens_held, 3), pages_leaked=st.pages_leaked,
      pool_pages=pool_used, preemptions=st.preemptions, recompute_tokens=st.recompute_tokens)

  print(f"[{name}] workload: {len(tasks)} trajectories ({args.groups} groups x {args.n}), {total} tokens "
        f"({model_tokens} model tokens), zooms per trajectory {np.bincount(zooms).tolist()} (count of 0, 1, ...), "
        f"prompt {min(prompts)}-{max(prompts)} tokens; in flight: lockstep {lock_rows}, continuous "
        f"{running or len(tasks)}; CPU devices {jax.device_count()}")
  print(f"KV memory: lockstep {kv_bytes['lockstep'] / 1e9:.3f} GB ({lock_rows} rows x {lock_slots} slots), "
        f"continuous {kv_bytes['continuous'] / 1e9:.3f} GB ({pool_used} pages of {ps})")
  print(f"{'engine':12s} {'seconds':>8s} {'traj/s':>8s} {'tok/s':>9s} {'model tok/s':>12s} {'prefill tokens':>15s} "
        f"{'compiles (s) in timed runs':>27s}")
  for e in runs:
    r = res[e]
    print(f"{e:12s} {r['seconds']:8.2f} {r['trajectories_per_s']:8.3f} {r['tokens_per_s']:9.1f} "
          f"{r['model_tokens_per_s']:12.1f} {r['prefill_tokens']:15d} "
          f"{r['compiles_in_timed_runs']:>17d} ({r['compile_s_in_timed_runs']:.1f})")
  er = engine_res
  print(f"continuous: {st.steps} device calls ({st.bursts} decode bursts of up to {args.decode_burst}), "
        f"{er['tokens_per_device_call']} tokens per call ({er['decode_tokens_per_device_call']} decoded), "
        f"utilisation {er['utilisation']:.3f} (real tokens / device rows), prefills per group "
        f"{er['prefills_per_group']}; device time {st.step_seconds:.1f} s in steps with chunks, "
        f"{st.burst_seconds:.1f} s in bursts; KV per trajectory: peak "
        f"{er['peak_kv_bytes_per_trajectory'] / 1e6:.2f} MB referenced vs "
        f"{er['held_kv_bytes_per_trajectory'] / 1e6:.2f} MB of tokens held (ratio "
        f"{er['kv_peak_over_held']}, page size {args.page_size}), pages leaked {st.pages_leaked}; "
        f"preemptions {st.preemptions} ({st.recompute_tokens} tokens computed again)")
  print(f"[{name}] ratio (lockstep s / continuous s): {ratio:.3f}; trajectories equal: {equal}")
  out = dict(bench="rollout", config=name, baseline="lockstep", groups=args.groups, n=args.n,
             trajectories=len(tasks), tokens=total, model_tokens=model_tokens, zooms=int(sum(zooms)),
             ratio=round(ratio, 3), trajectories_equal=equal, page_size=args.page_size,
             step_tokens=args.step_tokens, decode_burst=args.decode_burst, decode_chunk=args.decode_chunk,
             frames=args.frames, overview_frames=args.overview_frames, in_flight=lock_rows,
             continuous_in_flight=running or len(tasks), kv_bytes=kv_bytes,
             continuous_engine=engine_res, **res)
  print("BENCH_JSON " + json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
