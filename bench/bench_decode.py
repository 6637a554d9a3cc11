"""Decode tokens/s: our jitted `lax.while_loop` sampler vs transformers' `generate`, same weights and prompt.

Greedy, no stop tokens, a text prompt of `--prompt` tokens, `--new` tokens per sequence, batch 1 and 8.
For transformers the decode time is `generate` over the prompt with all but its last token already in a cache
(prefix caching; the copy of the cache is made outside the timer), so both sides time `new` one-token forwards
per sequence; for us it is `decode` alone after `prefill`. Calls are interleaved and compiled beforehand. Greedy
tokens are checked against transformers' plain `generate` (no prefix cache).
Ratio = our tokens/s ÷ transformers' tokens/s (> 1: we are faster). `--dtype bfloat16` runs both sides with
bf16 weights and activations (ours accumulates its matmuls in fp32); `both` measures fp32 then bf16.

  PYTHONPATH=. python bench/bench_decode.py --config bench-small --batch 1,8
  PYTHONPATH=. python bench/bench_decode.py --config bench-small --batch 1,8 --dtype both
  PYTHONPATH=. python bench/bench_decode.py --config bench-small --batch 1,8 --prompt 1264 --new 64  # bench-small's context

Our decode gets `decode_weights(model)`, the sampler's weight layout, made once per set of weights as a rollout
does (not timed: 0.4-0.5 s here warm, 3.4 s the first time, compiling the transposes; measured at bench-small).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import torch  # noqa: E402

import hf_oracle  # noqa: E402
import machine_ceilings  # noqa: E402
import zoomer_jax  # noqa: E402
from bench_forward import bench_config  # noqa: E402
from zoomer_jax.sampling import SamplingParams, StopCriteria, decode, decode_weights, prefill  # noqa: E402


def bench_dtype(args, hf, ours, ids, dtype: str) -> list[dict]:
  """Times our decode and transformers' at `dtype` for each batch size, interleaved."""
  # Bytes a decode step must stream: every decoder weight once, the (tied) embedding table once for the logits.
  text = hf.model.language_model
  weight_bytes = sum(p.numel() * p.element_size() for p in text.parameters())
  if hf.lm_head.weight.data_ptr() != text.embed_tokens.weight.data_ptr():
    weight_bytes += hf.lm_head.weight.numel() * hf.lm_head.weight.element_size()
  cfg = hf.config.text_config
  layers, kv, head = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
  kv_bytes_per_token = 2 * layers * kv * head * (4 if dtype == "float32" else 2)
  attention_flops_per_token = 4 * layers * cfg.num_attention_heads * head
  rng = np.random.default_rng(0)
  # The sampler's weight layout (`decode_weights`), made once per set of weights, as a rollout does.
  decoder = decode_weights(ours)
  results = []
  for b in (int(x) for x in args.batch.split(",")):
    prompt = rng.integers(3, min(ids["text_max"], 20000), (b, args.prompt)).astype(np.int64)
    size = int(-(-(args.prompt + args.new) // 256) * 256)
    stop = StopCriteria.build()
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new)
    logits, cache, pos = prefill(ours, prompt, cache_size=size)

    t_ids = torch.as_tensor(prompt)
    mask = torch.ones_like(t_ids)

    def generate(past=None):
      with torch.no_grad():
        hf.model.rope_deltas = None
        return hf.generate(input_ids=t_ids, attention_mask=mask, past_key_values=past, max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False)

    # transformers' decode alone: `generate` over the same prompt with its first prompt - 1 tokens already in a
    # cache (prefix caching, a copy per call, made outside the timer), so it runs `new` forwards of one token
    # per sequence, as our `decode` does after `prefill`. (Timing generate minus a prefill forward instead left a
    # difference of two noisy timings: at a 1264-token prompt, batch 8, prefill is ~75% of generate.)
    with torch.no_grad():
      hf.model.rope_deltas = None
      prefix = hf(input_ids=t_ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1)
    prefix = prefix.past_key_values

    def run_hf():
      past = copy.deepcopy(prefix)
      t0 = time.perf_counter()
      out = generate(past)
      return time.perf_counter() - t0, out

    def run_ours():
      t0 = time.perf_counter()
      out = decode(decoder, cache, logits, pos, np.ones(b, bool), jax.random.key(0), stop, params)
      jax.block_until_ready(out.tokens)
      return time.perf_counter() - t0, out.tokens

    ours_tokens = np.asarray(run_ours()[1])  # compile
    hf_tokens = generate()[:, args.prompt:].numpy()  # without the prefix cache: it must not change the tokens
    agree = float((ours_tokens == hf_tokens).mean())
    agree_prefix = float((run_hf()[1][:, args.prompt:].numpy() == hf_tokens).mean())
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
      t_ours.append(run_ours()[0])
      t_hf.append(run_hf()[0])
    ours_s, hf_s = statistics.median(t_ours), statistics.median(t_hf)
    r = dict(config=args.config, dtype=dtype, weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token,
             attention_flops_per_token=attention_flops_per_token, batch=b, prompt=args.prompt, new=args.new,
             cache_size=size,
             ours_tok_s=round(b * args.new / ours_s, 2), hf_tok_s=round(b * args.new / hf_s, 2),
             ratio=round(hf_s / ours_s, 3), greedy_token_agreement=agree, hf_prefix_cache_agreement=agree_prefix,
             ours_step_ms=round(1e3 * ours_s / args.new, 1), hf_step_ms=round(1e3 * hf_s / args.new, 1),
             ours_weight_gbps=round(weight_bytes * args.new / ours_s / 1e9, 2),
             hf_weight_gbps=round(weight_bytes * args.new / hf_s / 1e9, 2),
             ours_runs=[round(t, 3) for t in t_ours], hf_runs=[round(t, 3) for t in t_hf])
    results.append(r)
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="bench-small", choices=["tiny", "bench-small"])
  p.add_argument("--batch", default="1,8")
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="float32")
  args = p.parse_args(argv)
  dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
  torch.set_num_threads(os.cpu_count() or 1)

  ceilings = [machine_ceilings.measure()]
  hf_cfg, ids = bench_config(args.config)
  hf = hf_oracle.make_hf_model(hf_cfg, seed=0)
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = ids["bos"]
  with tempfile.TemporaryDirectory() as d:
    path = hf_oracle.save_hf(hf, d)
    models = {dtype: zoomer_jax.load_hf(path, dtype=dtype) for dtype in dtypes}
  hf.config._attn_implementation = "sdpa"
  results = []
  for dtype in dtypes:
    hf.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    results += bench_dtype(args, hf, models[dtype], ids, dtype)
  ceilings.append(machine_ceilings.measure())
  ceil = {k: {f: max(c[k][f] for c in ceilings) for f in ceilings[0][k]} for k in ceilings[0]}
  bw = ceil["memory_gbps"]["read"]
  print(machine_ceilings.describe(ceil) + " (best of the start and the end of the run)")
  for dtype in dtypes:
    wb = next(r["weight_bytes"] for r in results if r["dtype"] == dtype)
    print(f"{dtype}: a decode step streams {wb / 1e9:.2f} GB of weights (decoder + tied embedding for the logits); "
          f"at {bw:.1f} GB/s that bounds batch-1 decode at {bw * 1e9 / wb:.1f} tok/s")
  for r in results:
    r["ours_of_bandwidth"], r["hf_of_bandwidth"] = r["ours_weight_gbps"] / bw, r["hf_weight_gbps"] / bw
    # The step's floor on this machine: stream every weight once plus each sequence's cached keys and values,
    # and do 2 FLOPs per weight per sequence plus attention's 4 * heads * head_dim per cached token and layer, at
    # the matmul ceiling of this dtype; whichever takes longer. The cache holds on average prompt + new / 2
    # tokens. (At the default 128 + 32 tokens attention is 24 * 4 * 14 * 64 * 144 = 12.4 MFLOP per sequence
    # against the weights' 2 * 494M, 1.3%; at a 1264-token prompt, 11%.) A ratio above hf_step / floor is out of
    # reach for any implementation.
    tflops = ceil["matmul_tflops"]["fp32" if r["dtype"] == "float32" else "bf16_fp32acc"]
    elem = 4 if r["dtype"] == "float32" else 2
    cached = r["prompt"] + r["new"] / 2
    cache_bytes = r["batch"] * cached * r["kv_bytes_per_token"]
    flops = r["batch"] * (2 * r["weight_bytes"] / elem + cached * r["attention_flops_per_token"])
    floor_ms = 1e3 * max((r["weight_bytes"] + cache_bytes) / (bw * 1e9), flops / (tflops * 1e12))
    r["floor_step_ms"] = round(floor_ms, 3)
    r["ours_of_floor"] = round(floor_ms / r["ours_step_ms"], 3)
    r["max_ratio"] = round(r["hf_step_ms"] / floor_ms, 2)
    print(f"{args.config} {r['dtype']} batch {r['batch']} prompt {r['prompt']}: ours {r['ours_tok_s']} tok/s "
          f"({r['ours_step_ms']} ms/step, weights at {r['ours_weight_gbps']} GB/s = "
          f"{100 * r['ours_of_bandwidth']:.0f}% of the bandwidth), transformers {r['hf_tok_s']} tok/s "
          f"({r['hf_step_ms']} ms/step, {100 * r['hf_of_bandwidth']:.0f}%), ratio {r['ratio']} (target: >= 0.9 at "
          f"batch 1, >= 3 at batch 8); greedy tokens agree {r['greedy_token_agreement']:.2f} (transformers with "
          f"the prefix cache vs without: {r['hf_prefix_cache_agreement']:.2f})")
    print(f"  runs (s): ours {r['ours_runs']}, transformers {r['hf_runs']}")
    print(f"  floor: {r['floor_step_ms']} ms/step (weights and KV cache at the bandwidth, or the step's FLOPs at "
          f"the matmul ceiling, whichever is longer); ours at {100 * r['ours_of_floor']:.0f}% of it; the best "
          f"ratio any implementation could reach here is {r['max_ratio']}")
  print("BENCH_JSON " + json.dumps(dict(ceilings=ceil, ceilings_start_end=ceilings, results=results)))
  return results


if __name__ == "__main__":
  main()
