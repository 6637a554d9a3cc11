"""Host time per generated token in the agent's loop, with a tokenizer of a real checkpoint's size.

Per decode chunk the rollout appends each row's new ids to its transcript (`Transcript.append_generated`, which
checks them against the tokenizer) and their log-probs; at the end of a turn it decodes the turn's text and parses
it (`Episode.step`). This replays that host work for `--turns` turns of `--turn-tokens` tokens in chunks of
`--chunk`, with a tokenizer of `--vocab` ids built locally (`build_sized_tokenizer`), and compares it in the same
run against the baseline that counts the vocabulary on every check (what `Tokenizer.vocab_size` did before it
was cached). Target: <= 0.1 ms per generated token at 151,665 ids.

    python bench/bench_host_tokens.py                      # --vocab 151665 --turns 8 --turn-tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zoomer_jax.agent import protocol as P  # noqa: E402
from zoomer_jax.text.chat import Transcript  # noqa: E402
from zoomer_jax.text.tokenizer import QWEN_ADDED_TOKENS, Tokenizer, build_sized_tokenizer  # noqa: E402


class CountingEveryTime(Tokenizer):
  """The baseline: the vocabulary counted on every query, as before the cache."""

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)


def replay(tok: Tokenizer, turns: list[list[int]], chunk: int) -> float:
  """Seconds of host work for the given turns (ids per turn), as the rollout does it."""
  t0 = time.perf_counter()
  tr = Transcript(tok, tok.encode("<|im_start|>assistant\n"))
  logprobs: list[float] = []
  for ids in turns:
    for s in range(0, len(ids), chunk):
      part = np.asarray(ids[s:s + chunk])
      tr.append_generated(part.tolist())
      logprobs += np.zeros(len(part), np.float32).tolist()
    P.Episode(P.ToolConfig(), duration=3600.0, overview_frames=64).step(tr.turn_text())  # random text: one turn
    tr.close_turn()
    tr.append_text("<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n")
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--vocab", type=int, default=151665, help="tokenizer size (Qwen2.5-VL: 151665)")
  ap.add_argument("--turns", type=int, default=8)
  ap.add_argument("--turn-tokens", type=int, default=512)
  ap.add_argument("--chunk", type=int, default=64, help="tokens per decode call (rollout.decode_chunk)")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)

  t0 = time.perf_counter()
  ours = build_sized_tokenizer(args.vocab)
  base = CountingEveryTime(ours.backend, ours.config, source="baseline")
  print(f"tokenizer of {ours.vocab_size} ids built in {time.perf_counter() - t0:.1f} s")
  rng = np.random.default_rng(0)
  high = args.vocab - len(QWEN_ADDED_TOKENS)  # regular ids only, as a model's text turn is
  turns = [rng.integers(0, high, args.turn_tokens).tolist() for _ in range(args.turns)]
  tokens = sum(len(t) for t in turns)
  times = {"ours": [], "baseline": []}
  for _ in range(args.repeats):  # interleaved: the machine's speed drifts
    times["ours"].append(replay(ours, turns, args.chunk))
    times["baseline"].append(replay(base, turns, args.chunk))
  best = {k: min(v) for k, v in times.items()}
  per_token_ms = {k: v / tokens * 1e3 for k, v in best.items()}
  ratio = best["baseline"] / best["ours"]
  print(f"{tokens} generated tokens in chunks of {args.chunk}, {args.turns} turns, vocabulary {args.vocab}:")
  for k in ("ours", "baseline"):
    print(f"  {k:9s} {best[k] * 1e3:9.1f} ms   {per_token_ms[k]:.4f} ms per token")
  met = "met" if per_token_ms["ours"] <= 0.1 else "NOT met"
  print(f"  baseline / ours = {ratio:.1f}x; target <= 0.1 ms per token: {met}")
  print("BENCH_JSON " + json.dumps(dict(bench="host_tokens", vocab=args.vocab, tokens=tokens, chunk=args.chunk,
                                        ms_per_token=per_token_ms["ours"],
                                        baseline_ms_per_token=per_token_ms["baseline"], ratio=ratio,
                                        baseline="vocab_size counted per query")))


if __name__ == "__main__":
  main()
