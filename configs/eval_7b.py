"""Evaluate VideoZoomer-7B (or the Qwen2.5-VL-7B-Instruct base) on a long-video benchmark, with or without the tool.

    python -m zoomer_jax eval --config=eval_7b:videomme --config.checkpoint=/ckpt/VideoZoomer-7B \
        --config.benchmark.annotation=/data/Video-MME/videomme/test-00000-of-00001.parquet \
        --config.benchmark.video_root=/data/Video-MME/data

The variant (`:arg`) picks the benchmark and its default paths, the layout its own download writes under
/data/<repository> (`BENCHMARKS` below; override the paths): mlvu (dev) | mlvu_test | longvideobench | videomme |
lvbench | original (the default: VideoZoomer's own RL/eval JSON, `data/records.py`). docs/eval.md says how to get
each benchmark; `zoomer_jax/eval/readers.py` documents each file format and where the videos must be.

Check first (no model is loaded): the tasks, the dirty records (resolved or skipped, with ids and reasons) and
the missing videos; exits 1 when a video is missing:
    python -m zoomer_jax eval --config=eval_7b:videomme --check

Useful overrides:
  --config.use_tool=False                              the no-tool baseline, same frame budget
                                                       (`zoomer_jax/eval/harness.py` says how it is built)
  --config.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct     the base model instead of VideoZoomer
  --config.agent.max_generation_round=3 --config.agent.tool_call_max_frames=8
                                                       other tool budgets (the original's README varies these two)
  --config.agent.system_prompt=system_prompt.txt       our rewrite of the original's RL training rules (default:
                                                       its eval variant, which asks for the answer in \\boxed{}
                                                       inside <answer>, as the original's eval_video.sh)
  --config.agent.system_prompt=/path/prompt.txt --config.agent.system_prompt_verbatim=True \\
      --config.agent.hint_separator=''                 a released checkpoint on the exact prompt it was trained
                                                       with, byte for byte (docs/protocol.md says how to get it)
  --config.benchmark.by_group=True                     also accuracy per duration group / MLVU task
  --config.benchmark.limit=50                          the first 50 questions only
  --config.benchmark.options.subtitles=interleaved     longvideobench / videomme: with subtitles ("w/ subs"),
                                                       each after its overview frame (`timed`: one block)
  --allow-missing-videos                               run without the tasks whose video is missing
  --config.batch_size=16 --config.mesh.ici='(2,-1,1)' --config.out_dir=gs://bucket/eval --config.dtype=float32

Outputs: out_dir/{benchmark}_{tool|no_tool}.jsonl (every trajectory), .json (the report), .txt (the table).
Memory: at the defaults a trajectory's KV cache holds up to about 128 x 130 image tokens + 5 x 4096 generated
ones plus observations, ~50k tokens, ~2.9 GB in bf16 for the 7B (28 layers x 2 x 4 kv heads x 128); the batch's
caches and the weights are sharded over the mesh.
"""

import ml_collections

from zoomer_jax.config_loader import load

# name -> (annotation, video_root, reader options). Each path is where the benchmark's own download puts the
# file when its dataset repository is downloaded to /data/<repository name> (docs/eval.md gives the commands);
# override the paths with --config.benchmark.annotation=... --config.benchmark.video_root=...
BENCHMARKS = {
    # MLVU dev (HF MLVU/MVLU): json/<k>_<task>.json, videos in video/<k>_<task>/
    "mlvu": ("/data/MVLU/MLVU/json", "/data/MVLU/MLVU/video", dict(video_layout="auto")),
    # MLVU test (HF MLVU/MLVU_Test): the multiple-choice ground truth, videos in video/ (one folder)
    "mlvu_test": ("/data/MLVU_Test/test-ground-truth/test_mcq_gt.json", "/data/MLVU_Test/video",
                  dict(video_layout="auto")),
    # LongVideoBench (HF longvideobench/LongVideoBench): videos.tar -> videos/, subtitles.tar -> subtitles/
    "longvideobench": ("/data/LongVideoBench/lvb_val.json", "/data/LongVideoBench/videos",
                       dict(subtitles="none", subtitle_root="/data/LongVideoBench/subtitles")),
    # Video-MME (HF lmms-lab/Video-MME): videos_chunked_*.zip -> data/, subtitle.zip -> subtitle/
    "videomme": ("/data/Video-MME/videomme/test-00000-of-00001.parquet", "/data/Video-MME/data",
                 dict(subtitles="none", subtitle_root="/data/Video-MME/subtitle")),
    # LVBench (github THUDM/LVBench): data/video_info.meta.jsonl; scripts/download.sh (video2dataset), run in
    # scripts/, writes scripts/videos/00000/000000000.mp4 + .json; a folder of <key>.mp4 works too
    "lvbench": ("/data/LVBench/data/video_info.meta.jsonl", "/data/LVBench/scripts/videos", {}),
    "original": ("/data/videozoomer/val.json", "", dict(open_ended="error")),
}


def get_config(arg=None):
  name = arg or "original"
  if name not in BENCHMARKS:
    raise ValueError(f"unknown variant {arg!r} of eval_7b; known: {sorted(BENCHMARKS)}")
  annotation, video_root, options = BENCHMARKS[name]
  cfg = ml_collections.ConfigDict()
  cfg.job = "eval"
  cfg.checkpoint = "/ckpt/VideoZoomer-7B"  # an HF Qwen2.5-VL directory with its tokenizer files
  cfg.model = load("qwen25vl_7b").model  # used only when checkpoint is "" (random weights: tiny configs)
  cfg.impl = load("qwen25vl_7b").impl  # how the model computes (scanned layers, attention kernel)
  cfg.dtype = "bfloat16"
  cfg.seed = 0
  # (data, fsdp, tensor) degrees; -1 fills with the devices left. ICI is within a slice, DCN across slices.
  cfg.mesh = ml_collections.ConfigDict(dict(ici=(1, -1, 1), dcn=(1, 1, 1), rules=load("qwen25vl_7b").rules))
  cfg.benchmark = ml_collections.ConfigDict(dict(
      name=name,  # a reader of zoomer_jax.eval.readers.READERS, or "synthetic" (the generated zoom task)
      annotation=annotation,
      video_root=video_root,
      by_group=False,  # data_source/<group> rows: duration group (lvb, VideoMME), task (MLVU), genre (lvbench)
      limit=0,  # evaluate the first `limit` tasks only; 0 = all
      synthetic_n=0,  # videos to generate when name == "synthetic"
      options=options,  # the reader's own keyword arguments (zoomer_jax/eval/readers.py)
      allow_missing_videos=False,  # True: tasks whose video is missing are left out (listed in the report)
  ))
  # ToolConfig fields (zoomer_jax/agent/protocol.py), the original's eval_video.sh values (docs/protocol.md).
  cfg.agent = ml_collections.ConfigDict(dict(
      max_generation_round=5, tool_call_max_frames=16, frames_upbound=64, video_fps=0.5, max_total_frames=128,
      system_prompt="system_prompt_boxed.txt", system_prompt_verbatim=False, last_round_hint=True,
      hint_separator="\n",
      tools=("zoom",),  # the enabled tools (zoomer_jax/tools): ("zoom", "crop") adds the spatial crop
  ))
  # The other AgentConfig fields; decoding is greedy (temperature 0, one sample).
  cfg.rollout = ml_collections.ConfigDict(dict(
      max_new_tokens=4096,  # per assistant turn (data.max_response_length)
      decode_chunk=64, max_pixels=100352, min_pixels=25088, cache_size=0, token_bucket=64, image_bucket=8,
      workers=8, video_backend="auto",
  ))
  # The continuous engine (agent/engine.py, docs/rollout_engine.md): tokens per page of the paged KV cache, tokens
  # per device step. `batch_size` trajectories are in flight at once.
  cfg.engine = ml_collections.ConfigDict(dict(page_size=16, step_tokens=512))
  cfg.use_tool = True
  cfg.no_tool_system_prompt = "system_prompt_notool.txt"  # in zoomer_jax/agent/prompts/, or a path
  cfg.batch_size = 8  # trajectories in flight (one engine run; a task joins as another ends)
  cfg.out_dir = "out/eval"
  cfg.progress = True
  return cfg
