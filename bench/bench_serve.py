"""`serve` throughput: batched (up to `--max-batch` requests in the engine at once, later ones joining between
steps) vs one request at a time (the named baseline, `batch.max_batch=1`: the next request joins the running
engine only when the one in it has ended), on the same requests, in the same run, interleaved.

A real server on 127.0.0.1 in this process (`serve:small`, the built-in tiny model with random weights), `--clients`
threads of the `openai` client sending `--requests` agent requests (a video part and a question) over
`--videos` short synthetic clips, alternating greedy and sampled requests (two batch keys). Each setting first
serves one untimed round (its programs compile), then `--repeats` timed rounds alternate between the two.
Printed per setting: seconds (median), requests/s, batches (engine runs started), the mean batch (requests per
engine run, those that joined included) and the fraction of the wall time the scheduler spent running batches (the
rest is HTTP, the clients and waiting); every request must get one well-formed answer with its own id. Ratio =
unbatched seconds / batched seconds (> 1: batching is faster).

  PYTHONPATH=. python bench/bench_serve.py                               # 128 requests, 32 clients
  PYTHONPATH=. python bench/bench_serve.py --requests 32 --clients 8 --repeats 1
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import openai  # noqa: E402

from zoomer_jax.config_loader import load  # noqa: E402
from zoomer_jax.data import synthetic  # noqa: E402
from zoomer_jax.serve.server import Server, load_model  # noqa: E402


def one_round(server: Server, videos: list[str], requests: int, clients: int, max_tokens: int) -> dict:
  client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)

  def ask(k: int) -> str:
    r = client.chat.completions.create(
        model="zoomer-agent", temperature=0.0 if k % 2 else 1.0, max_tokens=max_tokens,
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": videos[k % len(videos)]}},
                                               {"type": "text", "text": f"\nWhich object appears? ({k})"}]}])
    z = r.model_extra["zoomer"]
    assert r.choices[0].message.content == "\n".join(z["turns"]) and r.usage.completion_tokens >= 1, r
    return r.id

  before = dict(server.batcher.stats)
  t0 = time.perf_counter()
  with cf.ThreadPoolExecutor(clients) as pool:
    ids = list(pool.map(ask, range(requests)))
  wall = time.perf_counter() - t0
  assert len(set(ids)) == requests, "a response id repeats"
  batches = server.batcher.stats["batches"] - before["batches"]
  return dict(seconds=wall, batches=batches, busy=(server.batcher.stats["busy_s"] - before["busy_s"]) / wall)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--requests", type=int, default=128)
  p.add_argument("--clients", type=int, default=32)
  p.add_argument("--max-batch", type=int, default=16)
  p.add_argument("--max-tokens", type=int, default=8, help="per assistant turn")
  p.add_argument("--videos", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()

  root = tempfile.mkdtemp(prefix="bench_serve_")
  synthetic.generate(root, seed=0, n_train=args.videos, n_val=0, n_test=0, min_seconds=20.0, max_seconds=40.0)
  videos = sorted(os.listdir(os.path.join(root, "videos")))
  settings = {"unbatched": 1, "batched": args.max_batch}
  cfg = load("serve:small")
  cfg.port, cfg.video_root = 0, os.path.join(root, "videos")
  model, tok, _ = load_model(cfg)
  servers = {}
  for name, b in settings.items():
    c = load("serve:small")
    c.port, c.video_root = 0, cfg.video_root
    c.batch.max_batch, c.batch.max_queue = b, args.requests
    servers[name] = Server(model, tok, c).start()
  try:
    for name, server in servers.items():  # compiles
      one_round(server, videos, args.requests, args.clients, args.max_tokens)
    runs = {name: [] for name in settings}
    for _ in range(args.repeats):
      for name, server in servers.items():
        runs[name].append(one_round(server, videos, args.requests, args.clients, args.max_tokens))
  finally:
    for server in servers.values():
      server.close()

  out = {}
  print(f"{'setting':>10} {'max_batch':>9} {'seconds':>8} {'req/s':>7} {'batches':>7} {'mean batch':>10} {'busy':>5}")
  for name, rs in runs.items():
    sec = statistics.median(r["seconds"] for r in rs)
    batches = statistics.median(r["batches"] for r in rs)
    busy = statistics.median(r["busy"] for r in rs)
    out[name] = dict(max_batch=settings[name], seconds=round(sec, 3), requests_per_s=round(args.requests / sec, 3),
                     batches=batches, mean_batch=round(args.requests / batches, 2), busy=round(busy, 3))
    print(f"{name:>10} {settings[name]:>9} {sec:>8.2f} {args.requests / sec:>7.2f} {batches:>7} "
          f"{args.requests / batches:>10.2f} {busy:>5.2f}")
  ratio = out["unbatched"]["seconds"] / out["batched"]["seconds"]
  print(f"ratio unbatched / batched seconds: {ratio:.2f}")
  print("BENCH_JSON " + json.dumps(dict(bench="serve", baseline="unbatched", requests=args.requests,
                                        clients=args.clients, max_tokens=args.max_tokens, ratio=round(ratio, 3),
                                        **out)))


if __name__ == "__main__":
  main()
