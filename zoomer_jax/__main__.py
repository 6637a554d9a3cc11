"""Command line: `python -m zoomer_jax {demo,train,eval,distill,reflect,serve,compile,forward,infer,frames} ...`.

`demo` is the main job: it builds the synthetic long-video task, trains the tiny model SFT -> GRPO on CPU,
evaluates it with and without the zoom tool, and writes a table, training curves and trajectory pictures
(configs/demo.py; `--config=demo:quick` for a smoke run).

`forward` runs one forward pass of Qwen2.5-VL on a clip generated on the spot (a moving square whose
colour encodes the frame index), with the built-in tiny random model unless `--checkpoint` names an
HF directory, and prints what went in, what came out and how long it took.

`distill` runs the agent with an expert model behind an OpenAI-compatible chat-completions API and keeps the
trajectories the judge accepts as SFT records; `reflect` has the expert correct a checkpoint's failed trajectories
(docs/distill.md).

`serve` runs the zoom agent behind an OpenAI-compatible HTTP API: one request, one video and question, the
whole zoom loop on the server; concurrent requests are batched through the continuous engine (docs/serve.md).

`eval --check` reads a benchmark's annotation files and checks that every task's video is there, without
loading a model (docs/eval.md).

`infer --video V --question Q` runs the zoom agent on one video: it prints every turn, every zoom (segment,
fps, frames returned) and the answer, and writes the trajectory to `out/infer.json`. Without `--checkpoint`
it uses the built-in tiny random model and tokenizer, whose turns are noise: it shows the machinery, not an
answer.

`frames VIDEO [--zoom START END FPS] [--save-npz PATH]` shows what the agent sees of a video, through the
rollout's own code: the time index, the overview and zoom plans (each frame's true time), a contact sheet PNG
and, with `--save-npz`, the frames as decoded (uint8 RGB, before resizing) with their timestamps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def synthetic_clip(n_frames: int, height: int = 224, width: int = 320):
  """uint8 RGB frames [T, H, W, 3]: a square moving left to right, brightness = frame index."""
  import numpy as np
  frames = np.zeros((n_frames, height, width, 3), np.uint8)
  for i in range(n_frames):
    x = int((width - 48) * i / max(1, n_frames - 1))
    frames[i, 88:136, x:x + 48] = (255, 255 * i // max(1, n_frames - 1), 64)
    frames[i, :8, :, :] = i % 256
  return frames


def forward(args) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  import zoomer_jax
  from zoomer_jax.config_loader import load
  from zoomer_jax.video.preprocess import patchify, resize, smart_resize

  t0 = time.perf_counter()
  if args.checkpoint:
    model = zoomer_jax.load_hf(args.checkpoint, dtype=args.dtype)
    source = args.checkpoint
  else:
    cfg = load(args.config, args.override)
    model = zoomer_jax.Qwen25VL(zoomer_jax.ModelConfig.from_config_dict(cfg.model.to_dict()),
                                dtype=args.dtype, rngs=nnx.Rngs(cfg.seed), options=_options(cfg))
    source = f"{args.config} (random weights)"
  load_s = time.perf_counter() - t0
  mc = model.config

  frames = synthetic_clip(args.frames)
  h, w = smart_resize(*frames.shape[1:3], min_pixels=128 * 28 * 28 // 4, max_pixels=128 * 28 * 28)
  pixels, grid = patchify(resize(frames, h, w))
  n_video = int(np.prod(grid)) // mc.vision.spatial_merge_size**2
  rng = np.random.default_rng(0)
  text = lambda n: list(rng.integers(3, min(mc.text.vocab_size, 500), n))
  ids = text(8) + [mc.vision_start_token_id] + [mc.video_token_id] * n_video + [mc.vision_end_token_id] + text(12)
  ids = np.array([ids])

  timings = []
  for _ in range(2):  # the first call compiles
    t0 = time.perf_counter()
    logits = model(ids, pixel_values_videos=pixels, video_grid_thw=grid[None], second_per_grid_ts=[1.0])
    logits.block_until_ready()
    timings.append(time.perf_counter() - t0)
  top = np.asarray(logits[0, -1]).argsort()[-5:][::-1].tolist()
  report = dict(model=source, dtype=args.dtype, devices=len(jax.devices()), frames=args.frames,
                frame_size=[h, w], video_grid_thw=grid.tolist(), video_tokens=n_video, sequence_length=ids.shape[1],
                logits_shape=list(logits.shape), logits_finite=bool(np.isfinite(np.asarray(logits)).all()),
                next_token_top5=top, load_s=round(load_s, 3), compile_and_run_s=round(timings[0], 3),
                run_s=round(timings[1], 3))
  for k, v in report.items():
    print(f"{k:>20}: {v}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "forward.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


def _model_and_tokenizer(args):
  from flax import nnx

  import zoomer_jax
  from zoomer_jax.config_loader import load
  from zoomer_jax.text import build_tiny_tokenizer, load_tokenizer
  if args.checkpoint:
    model = zoomer_jax.load_hf(args.checkpoint, dtype=args.dtype)
    return model, load_tokenizer(args.checkpoint), args.checkpoint
  cfg = load(args.config, args.override)
  model = zoomer_jax.Qwen25VL(zoomer_jax.ModelConfig.from_config_dict(cfg.model.to_dict()), dtype=args.dtype,
                              rngs=nnx.Rngs(cfg.seed), options=_options(cfg))
  return model, build_tiny_tokenizer(), f"{args.config} (random weights)"


def _options(cfg):
  """A model config's `impl` (scanned layers, attention kernel) and logical-axis `rules`."""
  from zoomer_jax.model.options import options_from_config
  return options_from_config(cfg.impl, cfg.rules)


def infer(args) -> dict:
  import dataclasses

  import jax

  from zoomer_jax.agent.engine import EngineConfig, continuous_rollout
  from zoomer_jax.agent.protocol import ToolConfig
  from zoomer_jax.agent.rollout import AgentConfig, Task
  from zoomer_jax.sampling import SamplingParams
  from zoomer_jax.text.stream import TurnStream
  from zoomer_jax.video import read_meta

  meta = read_meta(args.video)  # an unreadable video fails here, before any model work
  model, tok, source = _model_and_tokenizer(args)
  print(f"model: {source}\nvideo: {args.video} ({meta.n_frames} frames at {meta.fps:.2f} fps, "
        f"{meta.duration:.1f} s, {meta.width}x{meta.height})")
  cfg = AgentConfig(tool=ToolConfig(max_generation_round=args.max_generation_round,
                                    tool_call_max_frames=args.tool_call_max_frames),
                    sampling=SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens))

  stream = TurnStream(tok)

  def show(kind, _row, info):  # the assistant's text as it is sampled, then each tool call and the end
    if kind in ("tokens", "turn"):
      if not stream.opened:
        print("\n--- assistant turn ---")
        stream.turns = 0  # no separator: each turn has its header
      print(stream.add(info) if kind == "tokens" else stream.end(info) + "\n", end="", flush=True)
    elif kind == "zoom":
      print(f"--- zoom: segment {info['segment']} (clamped {info['clamped']}), fps {info['fps']}, "
            f"{info['frames']} frames at {info['timestamps']}")
    elif kind == "tool_error":
      print(f"--- tool error: {info.message}")
    elif kind == "final":
      print(f"--- final ({info.reason}): answer = {info.answer!r}")

  engine = EngineConfig(page_size=args.page_size, step_tokens=args.step_tokens)
  (traj,) = continuous_rollout(model, tok, [Task(args.video, args.question)], cfg, jax.random.key(args.seed),
                               on_event=show, engine=engine)
  report = dict(model=source, video=args.video, question=args.question, answer=traj.answer,
                finish_reason=traj.finish_reason, rounds=traj.rounds, frames=traj.n_frames, calls=traj.calls,
                turns=traj.turns, tokens=len(traj.ids), agent=dataclasses.asdict(cfg.tool))
  if traj.finish_reason == "video_error":
    raise ValueError(traj.calls[0]["error"])
  print(f"\nanswer: {traj.answer!r} ({traj.finish_reason}; {traj.rounds} turns, {traj.n_frames} frames, "
        f"{len(traj.ids)} tokens)")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "infer.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


def frames(args) -> dict:
  from zoomer_jax.agent.inspect_video import show_frames  # noqa: PLC0415
  from zoomer_jax.agent.protocol import ToolConfig  # noqa: PLC0415
  from zoomer_jax.agent.rollout import AgentConfig  # noqa: PLC0415
  cfg = AgentConfig(tool=ToolConfig(video_fps=args.video_fps, frames_upbound=args.frames_upbound,
                                    tool_call_max_frames=args.tool_call_max_frames), video_backend=args.backend)
  return show_frames(args.video, tuple(args.zoom) if args.zoom else None, cfg, args.sheet, args.save_npz)


def _job_config(args):
  from zoomer_jax.config_loader import load  # noqa: PLC0415
  return load(args.config, args.overrides)


def train(args) -> dict:
  cfg = _job_config(args)
  job = cfg.job if "job" in cfg else None  # model configs (qwen25vl_*) and the demo's are not jobs of `train`
  if job == "sft":
    from zoomer_jax.train.sft import run_sft  # noqa: PLC0415
    return run_sft(cfg)
  if job == "grpo":
    from zoomer_jax.train.grpo import run_grpo  # noqa: PLC0415
    return run_grpo(cfg)
  raise ValueError(f"config {args.config!r} is not a training job (its 'job' field is {job!r}; "
                   "expected 'sft' or 'grpo')")


def evaluate(args) -> int:
  from zoomer_jax.eval import harness  # noqa: PLC0415
  if args.allow_missing_videos:
    args.overrides = list(args.overrides) + ["--config.benchmark.allow_missing_videos=True"]
  cfg = _job_config(args)
  if args.check:
    return harness.check(cfg)
  harness.main(cfg)
  return 0


def demo(args) -> dict:
  from zoomer_jax.demo import run_demo  # noqa: PLC0415
  return run_demo(_job_config(args))


def distill(args) -> dict:
  from zoomer_jax.data.distill import run_distill  # noqa: PLC0415
  return run_distill(_job_config(args))


def reflect(args) -> dict:
  from zoomer_jax.data.reflect import run_reflect  # noqa: PLC0415
  return run_reflect(_job_config(args))


def serve(args) -> dict:
  from zoomer_jax.serve.server import run_serve  # noqa: PLC0415
  return run_serve(_job_config(args))


def compile_(args) -> dict:
  from zoomer_jax.aot import run  # noqa: PLC0415
  return run(_job_config(args), args.topology, probes=not args.no_probes, only=tuple(args.only or ()),
             collective_ops=args.collective_ops)


def _add_job_parser(sub, name: str, help_: str, default: str):
  p = sub.add_parser(name, help=help_, description=f"{help_}. Any config field can be overridden with "
                     "--config.a.b=value (Python literals; strings may be bare).")
  p.add_argument("--config", default=default, help=f"a name under configs/ or a path (default {default}); "
                 "NAME:ARG passes ARG to get_config")
  return p


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m zoomer_jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  _add_job_parser(sub, "train", "SFT or GRPO training (the config's `job` field)", "sft_tiny")
  ev = _add_job_parser(sub, "eval", "evaluate the agent on a benchmark, with and without the tool", "eval_tiny")
  ev.add_argument("--check", action="store_true", help="read the benchmark and check that every task's video "
                  "exists, without loading a model: prints the tasks, the dirty records and the missing videos; "
                  "exit status 1 when a video is missing")
  ev.add_argument("--allow-missing-videos", action="store_true", help="run without the tasks whose video is "
                  "missing (they are listed in the report); same as --config.benchmark.allow_missing_videos=True")
  _add_job_parser(sub, "demo", "the main job: synthetic task, SFT -> GRPO of the tiny model on CPU, evaluation "
                  "with and without the tool, table and pictures under out/demo", "demo")
  _add_job_parser(sub, "distill", "run the zoom agent with an expert model behind an OpenAI-compatible API and "
                  "keep the judged-correct trajectories as SFT records (docs/distill.md)", "distill")
  _add_job_parser(sub, "reflect", "run a checkpoint on training tasks, have the expert correct its failed "
                  "trajectories, verify the corrections and keep them as reflection SFT records", "reflect")
  _add_job_parser(sub, "serve", "serve the zoom agent behind an OpenAI-compatible HTTP API (chat completions with a "
                  "video part; docs/serve.md) until SIGINT or SIGTERM", "serve")
  cp = _add_job_parser(sub, "compile", "compile every program of a job config for a TPU topology (no TPU needed: "
                       "libtpu, the [tpu] extra) and report per-chip memory, FLOPs, time and collectives",
                       "grpo_7b_v5p64")
  cp.add_argument("--topology", help="e.g. v5p:4x4x2 or v6e-64 (default: the config's accelerator_type)")
  cp.add_argument("--no-probes", action="store_true", help="memory and collectives only (skip the cost probes)")
  cp.add_argument("--only", action="append", metavar="PROGRAM", help="compile only this program (repeatable)")
  cp.add_argument("--collective-ops", type=int, default=0, metavar="N",
                  help="also print each program's N largest collectives by kind, group size and shape")
  fw = sub.add_parser("forward", help="one forward pass on a generated clip")
  fw.add_argument("--checkpoint", help="HF Qwen2.5-VL directory (default: the built-in tiny random model)")
  fw.add_argument("--config", default="qwen25vl_tiny", help="model config when no checkpoint is given")
  fw.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. model.text.num_hidden_layers=4 (repeatable)")
  fw.add_argument("--frames", type=int, default=16)
  fw.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  fw.add_argument("--out", default="out", help="directory for forward.json ('' to skip)")
  inf = sub.add_parser("infer", help="run the zoom agent on one video and question")
  inf.add_argument("--video", required=True)
  inf.add_argument("--question", required=True, help="the question; '<image>' marks where the frames go")
  inf.add_argument("--checkpoint", help="HF Qwen2.5-VL directory with tokenizer files (default: built-in tiny)")
  inf.add_argument("--config", default="qwen25vl_tiny", help="model config when no checkpoint is given")
  inf.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  inf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  inf.add_argument("--max-generation-round", type=int, default=5)
  inf.add_argument("--tool-call-max-frames", type=int, default=16)
  inf.add_argument("--max-new-tokens", type=int, default=64, help="per assistant turn")
  inf.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
  inf.add_argument("--seed", type=int, default=0)
  inf.add_argument("--page-size", type=int, default=16, help="tokens per page of the continuous engine's KV cache")
  inf.add_argument("--step-tokens", type=int, default=256, help="tokens per device step of the continuous engine")
  inf.add_argument("--out", default="out", help="directory for infer.json ('' to skip)")
  fr = sub.add_parser("frames", help="show the frames the agent sees of a video (overview, a zoom), with true times")
  fr.add_argument("video")
  fr.add_argument("--zoom", nargs=3, type=float, metavar=("START", "END", "FPS"),
                  help="a zoom call, as the model writes it (seconds, frames per second)")
  fr.add_argument("--save-npz", help="write frames (uint8 [N, H, W, 3] RGB, before resizing) and timestamps here")
  fr.add_argument("--sheet", default="out/frames.png", help="contact sheet PNG ('' to skip)")
  fr.add_argument("--backend", default="auto", choices=["auto", "av", "cv2"])
  fr.add_argument("--video-fps", type=float, default=0.5, help="overview frames per second (before the cap)")
  fr.add_argument("--frames-upbound", type=int, default=64, help="overview frame cap")
  fr.add_argument("--tool-call-max-frames", type=int, default=16)
  args, rest = parser.parse_known_args(argv)
  if args.command in ("train", "eval", "demo", "compile", "distill", "reflect", "serve"):
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
      parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.a.b=value)")
    args.overrides = rest
  elif rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  try:
    if args.command == "train":
      train(args)
    elif args.command == "eval":
      return evaluate(args)
    elif args.command == "demo":
      demo(args)
    elif args.command == "compile":
      compile_(args)
    elif args.command == "distill":
      distill(args)
    elif args.command == "reflect":
      reflect(args)
    elif args.command == "serve":
      serve(args)
    elif args.command == "forward":
      forward(args)
    elif args.command == "infer":
      infer(args)
    elif args.command == "frames":
      frames(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # a preempted training job stops cleanly after saving
    if type(e).__name__ != "Preempted":
      raise
    print(f"stopped: {e}", file=sys.stderr)
    return 143
  return 0


if __name__ == "__main__":
  sys.exit(main())
