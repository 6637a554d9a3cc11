"""Evaluation: benchmark readers (annotation files -> Tasks), the batched greedy harness, the report.

  bench = load_benchmark("lvbench", "LVBench/data/video_info.meta.jsonl", "LVBench/scripts/videos")
  print(preflight.summary(bench))   # tasks, dirty records (resolved / skipped), missing videos
  report = evaluate(model, tok, bench.tasks, AgentConfig(), use_tool=True, batch_size=8, out_jsonl="out/lvbench.jsonl")
  print(report.to_table())

`harness.main(cfg)` runs a whole job from `configs/eval_7b.py` / `configs/eval_tiny.py`.
"""

from zoomer_jax.eval.harness import Report, evaluate, frame_budget, main, no_tool_config
from zoomer_jax.eval.readers import (READERS, AnnotationError, Benchmark, DirtyRecord, format_problem, load_benchmark,
                                     read_benchmark)

__all__ = ["READERS", "AnnotationError", "Benchmark", "DirtyRecord", "Report", "evaluate", "format_problem",
           "frame_budget", "load_benchmark", "main", "no_tool_config", "read_benchmark"]
