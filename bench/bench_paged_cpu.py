"""The paged cache's attention on the CPU (`paged.ragged_attention_xla`) against the lockstep engine's dense cache,
one decode step of every layer, bench-small's attention (24 layers, 14 query heads over 2 kv heads of 64), fp32.

    PYTHONPATH=. python bench/bench_paged_cpu.py [--rows 16] [--context 1200] [--repeats 5]
    PYTHONPATH=. python bench/bench_paged_cpu.py --chunk 241   # a step with a chunk: block sizes against 512

With `--chunk N` the step is the continuous engine's step with a chunk (`sampling/ragged.py`): rows - 1 decode rows
and one sequence's chunk of N rows at the end of its context, T = rows - 1 + N rows in tiles of T // rows rows
(`ragged_attention_xla`'s default); there is no dense counterpart (the lockstep engine has no such step), so the
baseline is "paged/512" (every row in tiles of T // rows rows, 512-key blocks: the default before) and the
candidates are the same tiling with blocks of 64, 128 and 256 keys, "apart" (the default: decode rows in
one-row tiles over blocks of KEYS_PER_BLOCK keys, the chunk in tiles of CHUNK_ROWS_PER_TILE rows over blocks of
CHUNK_KEYS_PER_BLOCK keys, in groups of TILE_GROUP_ROWS rows), "apart/16x64" (decode rows apart, the chunk in
tiles of T // rows rows over 64-key blocks, as `decode_apart` first cut chunks, but in groups of TILE_GROUP_ROWS
rows where those were groups of 32) and, with `--chunk-rows 32,128`, "apart/32" and "apart/128" (the default with
chunk tiles of that height).

baseline "dense": `attention.dense`, the lockstep engine's decode attention, over keys [rows, kv heads,
  head_dim, slots] and values [rows, kv heads, slots, head_dim] (its cache layout), every row over the same
  `slots` (the longest context + 400, as a batch's cache is sized for its longest row);
candidates "paged/N": the same keys and values in pages of 16 tokens scattered over a pool, each row's own
  context (context +- 400), read in blocks of N keys (`keys_per_block`; KEYS_PER_BLOCK is the default).

Each program runs the layers in a loop (each layer's queries depend on the last layer's output, so XLA cannot
hoist them); the outputs of all variants agree to fp32 rounding (checked; the largest difference is printed).
Printed: the median milliseconds per step of each, the ratio of each to "dense", and a BENCH_JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from zoomer_jax.model import attention, paged  # noqa: E402
from zoomer_jax.model.layers import precision_for  # noqa: E402

LAYERS, KV_HEADS, GROUP, HEAD_DIM, PAGE = 24, 2, 7, 64, 16


def _layers(attend):
  """A jitted decode step of every layer: layer l's queries are the input plus a trace of layer l - 1's output."""
  @jax.jit
  def run(q, *state):
    return jax.lax.fori_loop(0, LAYERS, lambda l, acc: acc + attend(q + 1e-3 * acc, l, *state), jnp.zeros_like(q))
  return run


def _median_ms(calls: dict, repeats: int) -> dict:
  """Median milliseconds of each zero-argument call, the calls interleaved (the host's speed drifts)."""
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      call().block_until_ready()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=16)
  p.add_argument("--context", type=int, default=1200)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--chunk", type=int, default=0, help="rows of a chunk after rows - 1 decode rows (0: decode only)")
  p.add_argument("--chunk-rows", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                 help="with --chunk: also the default with the chunk in tiles of these heights (e.g. 32,128)")
  args = p.parse_args(argv)
  if args.chunk:
    return chunk_step(args)
  rng = np.random.default_rng(0)
  rows, heads = args.rows, KV_HEADS * GROUP
  lens = rng.integers(max(1, args.context - 400), args.context + 400, rows).astype(np.int32)
  slots = int(lens.max()) + 400
  per_seq = -(-slots // PAGE)
  num_pages = rows * per_seq + 1
  table = (rng.permutation(num_pages - 1) + 1).reshape(rows, per_seq).astype(np.int32)  # page 0 unused
  pool = rng.standard_normal((LAYERS, num_pages, PAGE, 2 * KV_HEADS, HEAD_DIM)).astype(np.float32)
  q = jnp.asarray(rng.standard_normal((rows, heads, HEAD_DIM)), jnp.float32)
  batch = paged.RaggedBatch(page_indices=jnp.asarray(table), kv_lens=jnp.asarray(lens),
                            cu_q_lens=jnp.arange(rows + 1, dtype=jnp.int32), num_seqs=jnp.asarray([rows], jnp.int32),
                            copy_src=jnp.zeros(rows, jnp.int32), copy_dst=jnp.full(rows, num_pages, jnp.int32))
  # The dense cache holds the same keys and values as the pages, in the lockstep engine's layout.
  tokens = pool[:, table].reshape(LAYERS, rows, per_seq * PAGE, KV_HEADS, 2, HEAD_DIM)[:, :, :slots]
  k_dense = jnp.asarray(tokens[..., 0, :].transpose(0, 1, 3, 4, 2))  # [L, rows, k, h, slots]
  v_dense = jnp.asarray(tokens[..., 1, :].transpose(0, 1, 3, 2, 4))  # [L, rows, k, slots, h]
  pool = jnp.asarray(pool)
  del tokens

  def dense(qx, l, k, v, lens):  # the lockstep engine's decode attention, each row reading its own length
    mask = attention.AttentionMask(key_valid=jnp.arange(slots)[None, :] < lens[:, None],
                                   q_start=jnp.asarray(slots - 1, jnp.int32))
    out = attention.dense(qx[:, None], k[l], v[l], mask, bounds=[0, 1], causal_prefix=False, cache_layout=True,
                          dtype=jnp.float32, precision=precision_for(jnp.float32))
    return out[:, 0]

  def paged_with(keys):
    return lambda qx, l, kv, b: paged.ragged_attention_xla(qx, kv, b, sm_scale=HEAD_DIM**-0.5, layer=l,
                                                           keys_per_block=keys)

  programs = {"dense": (_layers(dense), (k_dense, v_dense, jnp.asarray(lens)))}
  for keys in sorted({paged.KEYS_PER_BLOCK, 128, 512}):
    programs[f"paged/{keys}"] = (_layers(paged_with(keys)), (pool, batch))
  outs = {name: np.asarray(fn(q, *state)) for name, (fn, state) in programs.items()}  # compiles
  first = outs[f"paged/{paged.KEYS_PER_BLOCK}"]
  for name, out in outs.items():
    if not np.allclose(out, first, rtol=1e-4, atol=1e-4):  # the dense cache holds the same keys and values
      raise AssertionError(f"{name} differs from paged/{paged.KEYS_PER_BLOCK} by {np.abs(out - first).max()}")
  print(f"largest difference from paged/{paged.KEYS_PER_BLOCK}: "
        f"{max(float(np.abs(o - first).max()) for o in outs.values()):.2e}")
  ms = _median_ms({name: lambda fn=fn, state=state: fn(q, *state) for name, (fn, state) in programs.items()},
                  args.repeats)
  print(f"one decode step of {LAYERS} layers, {rows} rows, contexts {lens.min()}-{lens.max()} (dense: {slots} slots "
        f"each), median of {args.repeats}:")
  for name, v in ms.items():
    print(f"  {name:12s} {v:8.1f} ms   / dense {v / ms['dense']:5.2f}")
  print("BENCH_JSON " + json.dumps(dict(bench="paged_cpu", baseline="dense", rows=rows, context=args.context,
                                        slots=slots, ms={k: round(v, 1) for k, v in ms.items()},
                                        ratio_to_dense={k: round(v / ms["dense"], 3) for k, v in ms.items()})))


def chunk_step(args):
  rng = np.random.default_rng(0)
  rows, heads = args.rows, KV_HEADS * GROUP
  q_lens = np.array([1] * (rows - 1) + [args.chunk], np.int32)
  lens = rng.integers(max(args.chunk, args.context - 400), args.context + 400, rows).astype(np.int32)
  per_seq = -(-int(lens.max()) // PAGE)
  num_pages = rows * per_seq + 1
  table = (rng.permutation(num_pages - 1) + 1).reshape(rows, per_seq).astype(np.int32)
  pool = jnp.asarray(rng.standard_normal((LAYERS, num_pages, PAGE, 2 * KV_HEADS, HEAD_DIM)), jnp.float32)
  t = int(q_lens.sum())
  q = jnp.asarray(rng.standard_normal((t, heads, HEAD_DIM)), jnp.float32)
  batch = paged.RaggedBatch(page_indices=jnp.asarray(table), kv_lens=jnp.asarray(lens),
                            cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
                            num_seqs=jnp.asarray([rows], jnp.int32), copy_src=jnp.zeros(rows, jnp.int32),
                            copy_dst=jnp.full(rows, num_pages, jnp.int32))
  programs = {f"paged/{keys}": _layers(lambda qx, l, kv, b, keys=keys: paged.ragged_attention_xla(
      qx, kv, b, sm_scale=HEAD_DIM**-0.5, layer=l, keys_per_block=keys, decode_apart=False))
      for keys in (512, 64, 128, 256)}
  apart = {"apart/16x64": dict(rows_per_tile=t // rows, keys_per_block=64),  # the chunk tiles before
           "apart": {}}
  apart.update({f"apart/{r}": dict(rows_per_tile=r) for r in args.chunk_rows})
  programs.update({name: _layers(lambda qx, l, kv, b, kw=kw: paged.ragged_attention_xla(
      qx, kv, b, sm_scale=HEAD_DIM**-0.5, layer=l, **kw)) for name, kw in apart.items()})
  outs = {name: np.asarray(fn(q, pool, batch)) for name, fn in programs.items()}  # compiles
  base = outs["paged/512"]
  diff = max(float(np.abs(o - base).max()) for o in outs.values())
  if not all(np.allclose(o, base, rtol=1e-4, atol=1e-4) for o in outs.values()):
    raise AssertionError(f"block sizes disagree by {diff}")
  ms = _median_ms({name: lambda fn=fn: fn(q, pool, batch) for name, fn in programs.items()}, args.repeats)
  print(f"one step of {LAYERS} layers: {rows - 1} decode rows and a {args.chunk}-row chunk ({t} rows), contexts "
        f"{lens.min()}-{lens.max()}, largest difference from paged/512 {diff:.2e}, median of {args.repeats}:")
  for name, v in ms.items():
    print(f"  {name:12s} {v:8.1f} ms   / paged/512 {v / ms['paged/512']:5.2f}")
  print("BENCH_JSON " + json.dumps(dict(bench="paged_cpu_chunk", baseline="paged/512", rows=rows, chunk=args.chunk,
                                        context=args.context, ms={k: round(v, 1) for k, v in ms.items()},
                                        ratio={k: round(v / ms["paged/512"], 3) for k, v in ms.items()})))


if __name__ == "__main__":
  main()
