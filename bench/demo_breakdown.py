"""What the demo's models zoom for, and how often they are right after each kind of zoom (the README's seed analysis).

    PYTHONPATH=. python bench/demo_breakdown.py out/demo                       # per model and mode: zooms by fps
    PYTHONPATH=. python bench/demo_breakdown.py out/demo --against out/demo2   # ... and where two runs' SFT parts

Reads a demo run's evaluation JSONL (`eval/<model>_<mode>.jsonl`): each answer's zoom calls (their fps) and
whether it was right. Prints, per model and mode, the answers grouped by the fps of their zooms ("-" when no zoom),
with counts and accuracy. `--against` compares the two runs' SFT losses (`sft_direct`, then `sft`, step by step) and
prints the first step where they differ by more than 1e-4 (relative), then one `BENCH_JSON {...}` line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os


def zoom_breakdown(jsonl: str) -> dict[str, dict]:
  """{fps key: {"answers": n, "accuracy": a}} of one evaluation file, most frequent first."""
  counts, right = collections.Counter(), collections.Counter()
  with open(jsonl, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      key = ",".join(f"{c['fps']:g}" for c in r["calls"] if "fps" in c) or "-"
      counts[key] += 1
      right[key] += r["acc"]
  return {k: dict(answers=n, accuracy=round(right[k] / n, 3)) for k, n in counts.most_common()}


def losses(out: str) -> list[float]:
  rows = []
  for job in ("sft_direct", "sft"):
    path = os.path.join(out, job, "metrics.jsonl")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        rows += [json.loads(line)["loss"] for line in f]
  return rows


def first_difference(a: list[float], b: list[float], rtol: float = 1e-4) -> int | None:
  """The first (1-based) SFT step whose losses differ by more than rtol (relative), or None."""
  for i, (x, y) in enumerate(zip(a, b)):
    if abs(x - y) > rtol * max(1.0, abs(x)):
      return i + 1
  return None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("out", help="a demo run's out_dir")
  ap.add_argument("--against", help="another run's out_dir: where their SFT losses part")
  args = ap.parse_args()
  result = {}
  for path in sorted(glob.glob(os.path.join(args.out, "eval", "*.jsonl"))):
    name = os.path.basename(path)[:-len(".jsonl")]
    result[name] = zoom_breakdown(path)
    print(f"{name:18s} " + "; ".join(f"fps {k}: {v['answers']} answers, {100 * v['accuracy']:.0f}% right"
                                     for k, v in result[name].items()))
  parted = None
  if args.against:
    parted = first_difference(losses(args.out), losses(args.against))
    print(f"SFT losses of {args.out} and {args.against}: " +
          ("equal to 1e-4 at every step" if parted is None else f"first differ by more than 1e-4 at step {parted}"))
  print("BENCH_JSON " + json.dumps(dict(bench="demo_breakdown", out=args.out, zooms=result, sft_losses_part_at=parted)))


if __name__ == "__main__":
  main()
