"""What a training step costs: the analytic account of `zoomer_jax.cost`, and a measured MFU on an accelerator.

For each config: parameter counts, FLOPs by phase and tower (model and hardware), per-chip memory by item for
the update and rollout phases, expected step time and MFU; then the same totals for the naive baseline the
TPU work started from (`zoomer_jax.cost.as_implemented`). `python -m zoomer_jax compile` checks the account
against XLA's compiled programs (docs/tpu.md). Ends with one `BENCH_JSON {...}` line.

On a TPU or GPU it also times a jitted forward + backward of the first `--layers` decoder layers of the 7B
text model (with its embeddings and lm_head) at `--seq` tokens and prints the measured MFU beside the one
the account expects at its matmul efficiency. On CPU it says the measurement needs an accelerator.

  PYTHONPATH=. python bench/bench_step_cost.py                         # grpo_7b_v5p64 grpo_7b_v6e64 sft_7b
  PYTHONPATH=. python bench/bench_step_cost.py grpo_7b --accelerator v5p-128 --set actor.remat=none
  PYTHONPATH=. python bench/bench_step_cost.py grpo_7b_v5p64 --measure force --layers 1 --seq 256 --vocab 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from zoomer_jax.config_loader import load  # noqa: E402
from zoomer_jax.cost import CHIPS, Efficiency, account, as_implemented, job_from_config  # noqa: E402
from zoomer_jax.cost import flops as F  # noqa: E402

GiB = 2**30
DEFAULT_CONFIGS = ("grpo_7b_v5p64", "grpo_7b_v6e64", "sft_7b")


def _table(title: str, header: list[str], rows: list[list]) -> str:
  cells = [header] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  line = "-" * len(fmt(header))
  return "\n".join([f"\n{title}", line, fmt(header), line] + [fmt(r) for r in cells[1:]] + [line])


def params_table(acc) -> str:
  p = acc.params
  rows = [["vision: patch embed", f"{p.vision_patch_embed:,}"],
          [f"vision: {acc.job.model.vision.depth} blocks", f"{p.vision_blocks:,}"],
          ["vision: merger", f"{p.vision_merger:,}"], ["vision total", f"{p.vision:,}"],
          ["text: embeddings", f"{p.text_embed:,}"], ["text: decoder layers + norm", f"{p.text_non_embedding:,}"],
          ["text: lm_head" + (" (tied)" if not p.lm_head else ""), f"{p.lm_head:,}"], ["text total", f"{p.text:,}"],
          ["total", f"{p.total:,}"]]
  return _table("parameters", ["part", "count"], rows)


def unit_table(acc) -> str:
  """Forward FLOPs of the units the step is made of: one text token, one image of the trajectory's grid."""
  t, v, grid = acc.job.model.text, acc.job.model.vision, acc.traj.grid
  per_tok = F.text_matmul_flops_per_token(t)
  img = F.vision_forward_flops(v, [grid], padded=False)
  g = lambda x: f"{x / 1e9:.3f}"
  rows = [[f"text token: {k}", g(x)] for k, x in per_tok.items()]
  rows += [["text token: lm_head", g(F.lm_head_flops_per_token(t))],
           ["text token: attention per 1k tokens of context", g(F.text_attention_flops(t, 1000))],
           [f"image {grid}: patch embed", g(img.patch_embed)], [f"image {grid}: block matmuls", g(img.dense)],
           [f"image {grid}: window attention", g(img.window_attention)],
           [f"image {grid}: full attention", g(img.full_attention)], [f"image {grid}: merger", g(img.merger)],
           [f"image {grid}: total ({acc.traj.tokens_per_image} LLM tokens)", g(img.total)]]
  return _table("forward FLOPs per unit (GFLOP; backward = 2x)", ["unit", "GFLOP"], rows)


def flops_table(acc) -> str:
  rows = []
  for ph in acc.phases:
    rows.append([ph.name, f"{ph.model['vision'] / 1e15:.1f}", f"{ph.model['text'] / 1e15:.1f}",
                 f"{sum(ph.hardware.values()) / 1e15:.1f}", f"{ph.time_s:.1f}", ph.bound])
  rows.append(["step", f"{sum(p.model['vision'] for p in acc.phases) / 1e15:.1f}",
               f"{sum(p.model['text'] for p in acc.phases) / 1e15:.1f}", f"{acc.hardware_flops / 1e15:.1f}",
               f"{acc.step_time:.1f}", ""])
  return _table("FLOPs (PFLOP) and expected time per phase",
                ["phase", "model vision", "model text", "hardware", "time s", "bound"], rows) + "\n" + "\n".join(
                    f"  {p.name}: {p.detail}" for p in acc.phases if p.detail)


def memory_table(acc) -> str:
  out = []
  hbm = acc.job.chip.hbm_bytes
  for name, table in acc.memory.items():
    rows = [[k, f"{v / GiB:.2f}"] for k, v in table.items.items()]
    rows.append(["total", f"{table.total / GiB:.2f}"])
    rows.append([f"budget ({1 - acc.headroom:.0%} of {hbm / GiB:.1f} GiB)", f"{(1 - acc.headroom) * hbm / GiB:.2f}"])
    rows.append(["fits", "yes" if acc.fits()[name] else "NO"])
    out.append(_table(f"per-chip memory, {name} phase (GiB)", ["item", "GiB"], rows))
  return "\n".join(out)


def summary(name: str, acc) -> dict:
  j = acc.job
  upd = ("policy update (fwd+bwd)",)
  return dict(config=name, accelerator=j.accelerator, chips=j.mesh.chips,
              mesh=[j.mesh.data, j.mesh.fsdp, j.mesh.tensor],
              params_total=acc.params.total, params_vision=acc.params.vision, params_text=acc.params.text,
              trajectory_tokens=acc.traj.total_tokens, trajectory_images=acc.traj.images,
              model_pflop=acc.model_flops / 1e15, hardware_pflop=acc.hardware_flops / 1e15,
              step_s=acc.step_time, mfu=acc.mfu, update_mfu=acc.mfu_of(upd),
              phases={p.name: dict(model_pflop=sum(p.model.values()) / 1e15, vision_pflop=p.model["vision"] / 1e15,
                                   text_pflop=p.model["text"] / 1e15, time_s=p.time_s, bound=p.bound)
                      for p in acc.phases},
              memory_gib={k: m.total / GiB for k, m in acc.memory.items()}, fits=acc.fits(), notes=acc.notes)


# ------------------------------------------------------------------ measurement
def chip_of_device(device) -> str | None:
  kind = device.device_kind.lower()
  for key, name in (("v6", "v6e"), ("v5p", "v5p"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v4", "v4"),
                    ("h100", "h100"), ("h200", "h200")):
    if key in kind:
      return name
  return None


def measure(layers: int, seq: int, batch: int, repeats: int, dtype: str, vocab: int | None = None) -> dict:
  """Times jit(value_and_grad) of a log-likelihood loss through `layers` 7B decoder layers on one device
  (`vocab` shrinks the embedding table and lm_head, for a CPU smoke run)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from zoomer_jax.model.config import ModelConfig
  from zoomer_jax.model.qwen25vl import Qwen25VL

  base = ModelConfig.from_config_dict(load("qwen25vl_7b").model.to_dict())
  text = dataclasses.replace(base.text, num_hidden_layers=layers, vocab_size=vocab or base.text.vocab_size)
  vision = dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,))  # unused by a text batch
  ids_special = dict(image_token_id=text.vocab_size - 4, video_token_id=text.vocab_size - 3,
                     vision_start_token_id=text.vocab_size - 2, vision_end_token_id=text.vocab_size - 1)
  cfg = dataclasses.replace(base, text=text, vision=vision, **(ids_special if vocab else {}))
  device = jax.devices()[0]
  with jax.default_device(device):
    model = Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, text.vocab_size, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (3, batch, seq))
    mask = jnp.ones((batch, seq), bool)

    def loss(params, ids, pos, mask):
      logits, _ = nnx.merge(graphdef, params).forward(ids, pos, mask)
      logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
      return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params, ids, pos, mask).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(compiled(params, ids, pos, mask))  # warm-up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, ids, pos, mask))
      times.append(time.perf_counter() - t0)
  fwd_model = sum(F.text_forward_flops(text, seq, causal=True).values()) * batch
  fwd_hw = sum(F.text_forward_flops(text, seq, causal=False).values()) * batch  # dense attention, as implemented
  t = statistics.median(times)
  chip = chip_of_device(device)
  peak = CHIPS[chip].bf16_flops if chip else None
  out = dict(device=device.device_kind, backend=jax.default_backend(), layers=layers, seq=seq, batch=batch,
             dtype=dtype, time_s=t, times_s=times, model_flops=3 * fwd_model, hardware_flops=3 * fwd_hw,
             xla_flops=float(cost.get("flops", float("nan"))), chip=chip)
  if peak:
    out.update(peak_flops=peak, mfu=3 * fwd_model / (t * peak), hfu=3 * fwd_hw / (t * peak))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
  ap.add_argument("--accelerator", default="v5p-64", help="for configs whose accelerator_type is empty (e.g. sft_7b)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
  ap.add_argument("--measure", choices=("auto", "skip", "force"), default="auto",
                  help="auto: measure on TPU/GPU only; force: also on CPU (small --layers/--seq)")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--vocab", type=int, default=0, help="shrink the measured model's vocabulary (CPU smoke runs)")
  args = ap.parse_args(argv)

  results = []
  for name in args.configs:
    cfg = load(name, args.set)
    job = job_from_config(cfg, cfg.accelerator_type or args.accelerator)
    acc = account(job)
    today = account(job, trainer=as_implemented()[0], rollout=as_implemented()[1])
    m = job.mesh
    print(f"\n=== {name}: {job.kind} on {job.accelerator} ({m.chips} chips, {job.chip.hbm_bytes / GiB:.1f} GiB "
          f"each), mesh data={m.data} fsdp={m.fsdp} tensor={m.tensor}")
    tc = acc.traj
    print(f"expected trajectory: {tc.total_tokens} tokens ({tc.prompt_tokens} prompt incl. {tc.overview_frames} "
          f"overview frames, {tc.zoom_calls} x {tc.observation_tokens} zoom observations, {tc.gen_tokens} generated), "
          f"{tc.images} images of grid {tc.grid} = {tc.tokens_per_image} tokens each; {job.trajectories} trajectories "
          f"per step, micro-batch {job.micro_batch} ({job.micro_per_chip} per batch shard)")
    print(params_table(acc))
    print(unit_table(acc))
    print(flops_table(acc))
    print(memory_table(acc))
    print(f"\nexpected step {acc.step_time:.0f} s, model {acc.model_flops / 1e18:.2f} EFLOP, "
          f"hardware {acc.hardware_flops / 1e18:.2f} EFLOP, MFU {acc.mfu:.1%} "
          f"(update phase {acc.mfu_of(('policy update (fwd+bwd)',)):.1%})")
    print(f"the naive baseline (dense attention, no vision remat, bf16 moments, sampling in the training "
          f"layout): step {today.step_time:.0f} s, MFU {today.mfu:.1%}, per-chip "
          + ", ".join(f"{k} {t.total / GiB:.0f} GiB ({'fits' if today.fits()[k] else 'does NOT fit'})"
                      for k, t in today.memory.items()))
    for note in acc.notes:
      print(f"note: {note}")
    s = summary(name, acc)
    s["as_implemented"] = dict(step_s=today.step_time, mfu=today.mfu,
                               memory_gib={k: t.total / GiB for k, t in today.memory.items()}, fits=today.fits())
    results.append(s)

  import jax
  backend = jax.default_backend()
  measured = None
  if args.measure == "force" or (args.measure == "auto" and backend in ("tpu", "gpu")):
    measured = measure(args.layers, args.seq, args.batch, args.repeats, "bfloat16", args.vocab or None)
    expected = Efficiency().matmul * measured["model_flops"] / measured["hardware_flops"]
    print(_table(f"measured: jit(value_and_grad) through {args.layers} 7B decoder layers + embeddings + lm_head, "
                 f"{args.batch} x {args.seq} tokens, bf16, on {measured['device']}",
                 ["quantity", "value"],
                 [["median time (s)", f"{measured['time_s']:.4f}"],
                  ["model FLOPs (causal attention)", f"{measured['model_flops']:.3e}"],
                  ["hardware FLOPs (dense attention, as implemented)", f"{measured['hardware_flops']:.3e}"],
                  ["XLA cost-analysis FLOPs", f"{measured['xla_flops']:.3e}"],
                  ["measured MFU", f"{measured['mfu']:.1%}" if "mfu" in measured else "n/a (unknown peak)"],
                  ["measured HFU", f"{measured['hfu']:.1%}" if "hfu" in measured else "n/a"],
                  ["expected MFU (account: matmul efficiency x model/hardware)", f"{expected:.1%}"]]))
    measured["expected_mfu"] = expected
  else:
    print(f"\nmeasured MFU: needs an accelerator (jax backend is {backend!r}); the account above is analytic. "
          "Run on a TPU/GPU, or --measure force for a CPU smoke run.")
  print("BENCH_JSON " + json.dumps(dict(bench="step_cost", results=results, measured=measured), default=float))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
