"""Prefill forward: zoomer_jax vs transformers' Qwen2_5_VLForConditionalGeneration.

Both sides get the same random weights (one HF model saved to a temporary directory and loaded by
`zoomer_jax.load_hf`) and the same prompt; calls are timed interleaved in one process. Prints a
table and one `BENCH_JSON {...}` line.

  PYTHONPATH=. python bench/bench_forward.py --config tiny --dtype both
  PYTHONPATH=. python bench/bench_forward.py --config bench-small --dtype both --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "bench"))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import hf_oracle  # noqa: E402
import machine_ceilings  # noqa: E402
import zoomer_jax  # noqa: E402
from zoomer_jax.cost.flops import text_forward_flops, vision_forward_flops  # noqa: E402
from zoomer_jax.model.config import ModelConfig  # noqa: E402

# Real Qwen2.5 special ids (bench-small uses the full 151936 vocabulary).
QWEN_IDS = dict(image=151655, video=151656, vstart=151652, vend=151653, bos=151643, eos=151645,
                text_max=151643)
TINY_IDS = dict(image=hf_oracle.IMAGE, video=hf_oracle.VIDEO, vstart=hf_oracle.VSTART,
                vend=hf_oracle.VEND, bos=0, eos=1, text_max=hf_oracle.TEXT_MAX)


def bench_config(name: str) -> tuple[dict, dict]:
  """(HF config.json dict, special ids) for `name`."""
  if name == "tiny":
    return hf_oracle.tiny_hf_config(), TINY_IDS
  # Text like Qwen2.5-0.5B, a shallow and narrow vision tower.
  cfg = hf_oracle.tiny_hf_config(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                                 mrope=(8, 12, 12), tie=True, v_depth=8, v_hidden=640, v_heads=10,
                                 v_intermediate=1710, fullatt=(3, 7), window=112)
  ids = QWEN_IDS
  cfg["text_config"].update(vocab_size=151936, max_position_embeddings=32768, bos_token_id=ids["bos"],
                            eos_token_id=ids["eos"], pad_token_id=ids["bos"])
  cfg.update(image_token_id=ids["image"], video_token_id=ids["video"],
             vision_start_token_id=ids["vstart"], vision_end_token_id=ids["vend"])
  return cfg, ids


def build_prompt(rng: np.random.Generator, ids: dict, frames: int, grid: tuple[int, int, int],
                 text_tokens: int) -> dict:
  """One sequence: `frames` images of `grid`, each preceded by `text_tokens` random text ids.

  Returns our model's kwargs (numpy) plus `mm_token_type_ids` for transformers.
  """
  n = int(np.prod(grid)) // 4
  row = []
  for _ in range(frames):
    row += list(rng.integers(3, ids["text_max"], text_tokens))
    row += [ids["vstart"]] + [ids["image"]] * n + [ids["vend"]]
  row += list(rng.integers(3, ids["text_max"], text_tokens))
  input_ids = np.asarray([row], np.int64)
  grids = np.tile(np.asarray(grid, np.int64), (frames, 1))
  pixels = rng.standard_normal((int(grids.prod(-1).sum()), 1176)).astype(np.float32)
  return dict(input_ids=input_ids, attention_mask=np.ones_like(input_ids), pixel_values=pixels,
              image_grid_thw=grids, mm_token_type_ids=(input_ids == ids["image"]).astype(np.int64))


def hf_kwargs(prompt: dict, dtype: torch.dtype) -> dict:
  """Torch kwargs for transformers' forward (the same as hf_oracle.hf_logits builds)."""
  kw = {k: torch.as_tensor(v) for k, v in prompt.items()}
  kw["pixel_values"] = kw["pixel_values"].to(dtype)
  return kw


def our_kwargs(prompt: dict) -> dict:
  return {k: v for k, v in prompt.items() if k != "mm_token_type_ids"}


def run_ours(model, kw: dict) -> jax.Array:
  return model(**kw).block_until_ready()


def run_hf(model, kw: dict) -> torch.Tensor:
  model.model.rope_deltas = None  # transformers caches this across calls
  with torch.inference_mode():
    return model(**kw).logits


def prefill_flops(cfg: ModelConfig, seq_len: int, grids: np.ndarray) -> dict:
  """Matmul FLOPs of one prefill forward (batch 1): the useful work, the same for both implementations.

  `zoomer_jax.cost.flops`' model count: causal (query, key) pairs in the decoder, the real pairs of each
  window / frame segment in the vision tower, logits for every position (both sides compute them).
  """
  text = text_forward_flops(cfg.text, seq_len, causal=True)
  vision = vision_forward_flops(cfg.vision, np.asarray(grids).reshape(-1, 3).tolist(), padded=False).total
  return dict(vision=vision, text=text["dense"] + text["attention"], logits=text["lm_head"],
              total=vision + sum(text.values()))


def busy_cpu_s() -> float | None:
  """Non-idle CPU seconds of the whole machine since boot (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def bench_dtype(path: str, hf_model, prompt: dict, dtype: str, repeats: int) -> dict:
  """Times both sides interleaved at `dtype`; returns the numbers for one table row."""
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  hf_model.to(torch_dtype)
  t0 = time.perf_counter()
  ours = zoomer_jax.load_hf(path, dtype=dtype, position_rule="hf_5.23")
  load_s = time.perf_counter() - t0
  okw, hkw = our_kwargs(prompt), hf_kwargs(prompt, torch_dtype)

  t0 = time.perf_counter()
  our_out = run_ours(ours, okw)
  warm_ours = time.perf_counter() - t0
  t0 = time.perf_counter()
  hf_out = run_hf(hf_model, hkw)
  warm_hf = time.perf_counter() - t0

  valid = prompt["attention_mask"].astype(bool)
  a = np.asarray(our_out)[valid]
  b = hf_out.float().numpy()[valid]
  max_diff = float(np.abs(a - b).max())
  max_logit = float(np.abs(b).max())
  argmax_agree = float((a.argmax(-1) == b.argmax(-1)).mean())
  del our_out, hf_out, a, b

  t_ours, t_hf = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run_ours(ours, okw)
    t_ours.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_hf(hf_model, hkw)
    t_hf.append(time.perf_counter() - t0)
  del ours
  ours_s, hf_s = statistics.median(t_ours), statistics.median(t_hf)
  return dict(dtype=dtype, ours_s=ours_s, hf_s=hf_s, ratio_hf_over_ours=hf_s / ours_s,
              ours_min_s=min(t_ours), hf_min_s=min(t_hf), ratio_min=min(t_hf) / min(t_ours),
              ours_times_s=t_ours, hf_times_s=t_hf, ours_first_call_s=warm_ours, hf_first_call_s=warm_hf,
              ours_load_s=load_s, max_abs_dlogit=max_diff, max_abs_logit=max_logit,
              argmax_agreement=argmax_agree)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=["tiny", "bench-small"], default="tiny")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--frames", type=int, default=None, help="images in the prompt (tiny: 4, bench-small: 16)")
  p.add_argument("--hf-attn", choices=["sdpa", "eager"], default="sdpa",
                 help="transformers attention implementation (sdpa is its default)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  cores = os.cpu_count() or 1
  torch.set_num_threads(cores)
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    print(f"warning: XLA_FLAGS={os.environ['XLA_FLAGS']!r} splits the CPU into several devices")

  cfg, ids = bench_config(args.config)
  if args.config == "tiny":
    frames, grid, text_tokens = args.frames or 4, (1, 8, 8), 8
  else:
    frames, grid, text_tokens = args.frames or 16, (1, 16, 16), 12  # 16 * (12 + 66) + 12 = 1260 tokens
  prompt = build_prompt(np.random.default_rng(args.seed), ids, frames, grid, text_tokens)
  seq_len = prompt["input_ids"].shape[1]
  dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]

  busy0, own0, wall0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
  ceilings = [machine_ceilings.measure()]
  t0 = time.perf_counter()
  hf_model = hf_oracle.make_hf_model(cfg, args.seed)
  hf_model.set_attn_implementation(args.hf_attn)
  build_s = time.perf_counter() - t0
  n_params = sum(p.numel() for p in hf_model.parameters())

  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_forward_") as path:
    hf_oracle.save_hf(hf_model, path)
    for dtype in dtypes:
      rows.append(bench_dtype(path, hf_model, prompt, dtype, args.repeats))
  del hf_model
  ceilings.append(machine_ceilings.measure())
  wall = time.perf_counter() - wall0
  ceil = {k: {f: max(c[k][f] for c in ceilings) for f in ceilings[0][k]} for k in ceilings[0]}
  flops = prefill_flops(ModelConfig.from_hf_dict(cfg), seq_len, prompt["image_grid_thw"])
  for r in rows:
    peak = ceil["matmul_tflops"]["fp32" if r["dtype"] == "float32" else "bf16_fp32acc"] * 1e12
    for side in ("ours", "hf"):
      r[f"{side}_tflops"] = flops["total"] / r[f"{side}_min_s"] / 1e12
      r[f"{side}_of_ceiling"] = flops["total"] / r[f"{side}_min_s"] / peak
  # CPU that other processes used while we ran (the machine's busy time minus ours), in cores.
  others = None if busy0 is None else max(0.0, (busy_cpu_s() - busy0) - (own_cpu_s() - own0)) / wall

  print(f"\nprefill forward, config={args.config} ({n_params / 1e6:.1f}M params), batch 1, "
        f"{seq_len} tokens ({frames} images of grid {grid}), repeats={args.repeats}, hf attn={args.hf_attn}")
  print(f"{platform.processor() or platform.machine()}, {cores} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform} x{jax.device_count()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  print(machine_ceilings.describe(ceil) + " (best of the start and the end of the run)")
  print(f"matmul work of one forward: {flops['total'] / 1e12:.3f} TFLOP (vision {flops['vision'] / 1e12:.3f}, "
        f"decoder {flops['text'] / 1e12:.3f}, logits {flops['logits'] / 1e12:.3f})")
  if others is not None:
    print(f"other processes used {others:.2f} of {cores} cores on average during the run"
          + (" -- WARNING: timings are skewed by them" if others > 0.1 * cores else ""))
  print(f"{'dtype':<9} {'ours s':>9} {'hf s':>9} {'hf/ours':>8} {'(min)':>6} {'ours 1st':>9} "
        f"{'hf 1st':>8} {'max|dlogit|':>12} {'max|logit|':>11} {'argmax=':>8} {'ours %peak':>10} {'hf %peak':>8}")
  for r in rows:
    print(f"{r['dtype']:<9} {r['ours_s']:>9.4f} {r['hf_s']:>9.4f} {r['ratio_hf_over_ours']:>8.2f} "
          f"{r['ratio_min']:>6.2f} {r['ours_first_call_s']:>9.2f} {r['hf_first_call_s']:>8.2f} "
          f"{r['max_abs_dlogit']:>12.3e} {r['max_abs_logit']:>11.3e} {r['argmax_agreement']:>8.3f} "
          f"{100 * r['ours_of_ceiling']:>9.0f}% {100 * r['hf_of_ceiling']:>7.0f}%")
  print("(s = median seconds per forward; hf/ours > 1 means zoomer_jax is faster, (min) is the same "
        "ratio of the fastest calls; 1st = first call, incl. our jit compile; argmax= is the fraction "
        "of positions whose top token agrees; %peak = matmul FLOPs / fastest call over the matmul ceiling "
        "of that dtype: fp32, or bf16 with fp32 accumulation)")
  result = dict(config=args.config, seq_len=seq_len, frames=frames, grid=list(grid), params=n_params,
                repeats=args.repeats, hf_attn=args.hf_attn, cores=cores, ceilings=ceil, ceilings_start_end=ceilings,
                flops=flops,
                hf_build_s=build_s, other_procs_cores=others,
                jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                results={r["dtype"]: r for r in rows})
  print("BENCH_JSON " + json.dumps(result))


if __name__ == "__main__":
  main()
