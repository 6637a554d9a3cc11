"""How the paged kernel reads one layer of a stacked pool, compiled for a TPU chip (no TPU needed): XLA's bytes
accessed and time for one layer's attention of a decode step over pools of growing size.

    PYTHONPATH=. python bench/bench_paged_layout.py [--topology v5p:2x2x1]

baseline "slice": the kernel gets `kv[layer]` ([P, page_size, 2k, h]): a custom call's operand must be a buffer
  of its own, so XLA copies the layer's whole pool out (read + write of every page, every layer, every step);
candidate "flat": the kernel gets every layer's pages as one flat pool [L * P, ...] (a reshape) with the layer's
  page numbers (`paged.flat_pool`, what `paged.ragged_attention` does).

The kernel itself is priced at nothing by XLA in both (a custom call): what differs is the copy around it.
Prints a table, the ratio slice / flat, and a BENCH_JSON line.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoomer_jax.aot.target import tpu_target
from zoomer_jax.model import paged

HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 28, 4, 128, 16, 2  # Qwen2.5-VL-7B's attention, bf16


def _abstract(target, pages: int, seqs: int = 16, per_seq: int = 256):
  mesh = Mesh(np.asarray(target.devices[:1]).reshape(1), ("x",))
  rep = NamedSharding(mesh, PartitionSpec())
  sds = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=rep)
  batch = paged.RaggedBatch(page_indices=sds((seqs, per_seq)), kv_lens=sds((seqs,)), cu_q_lens=sds((seqs + 1,)),
                            num_seqs=sds((1,)), copy_src=sds((seqs,)), copy_dst=sds((seqs,)))
  q = sds((seqs, HEADS, HEAD_DIM), jnp.bfloat16)
  kv = sds((LAYERS, pages, PAGE, 2 * KV_HEADS, HEAD_DIM), jnp.bfloat16)
  return q, kv, batch


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--topology", default="v5p:2x2x1")
  args = ap.parse_args()
  target = tpu_target(args.topology)
  variants = {
      "slice": lambda q, kv, b: paged.ragged_attention_tpu(q, kv[1], b, sm_scale=HEAD_DIM**-0.5),
      "flat": lambda q, kv, b: paged.ragged_attention_tpu(q, kv, b, sm_scale=HEAD_DIM**-0.5, layer=1),
  }
  rows = []
  print(f"one layer's paged attention of 16 decode rows on {args.topology}, XLA's cost analysis")
  print(f"{'pages':>8} {'layer pool GB':>14} {'slice GB acc':>13} {'flat GB acc':>12} {'slice us':>9} {'flat us':>8}"
        f" {'ratio':>7}")
  for pages in (1024, 8192, 45696):
    q, kv, b = _abstract(target, pages)
    got = {}
    for name, f in variants.items():
      ca = jax.jit(f).lower(q, kv, b).compile().cost_analysis()
      got[name] = (float(ca["bytes accessed"]), float(ca["optimal_seconds"]))
    layer_gb = pages * PAGE * 2 * KV_HEADS * HEAD_DIM * 2 / 1e9
    ratio = got["slice"][0] / got["flat"][0]
    print(f"{pages:8d} {layer_gb:14.3f} {got['slice'][0] / 1e9:13.3f} {got['flat'][0] / 1e9:12.4f} "
          f"{got['slice'][1] * 1e6:9.1f} {got['flat'][1] * 1e6:8.2f} {ratio:7.0f}")
    rows.append(dict(pages=pages, layer_pool_bytes=layer_gb * 1e9, slice_bytes=got["slice"][0],
                     flat_bytes=got["flat"][0], slice_s=got["slice"][1], flat_s=got["flat"][1]))
  print("BENCH_JSON " + json.dumps(dict(bench="paged_layout", topology=args.topology, baseline="slice",
                                        candidate="flat", rows=rows)))


if __name__ == "__main__":
  main()
