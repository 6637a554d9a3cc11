"""The parts of a training job around its loop: distributed start, tokenizer, data, resume, logging, stop.

    ctx = JobContext(cfg, kind="sft")              # joins the pod's processes, writes workdir/config.json
    engine = ctx.engine(loss_fn, total_steps=..., optim=..., freeze_vision=...)
    it = ctx.iterator(ctx.sft_source("train"), seed=0)
    writer, bar = ctx.start(engine, it, total)     # resume (model, optimizer, step, RNG, data position)
    ... ctx.end_step(engine, it, writer, bar, metrics) ...   # log, checkpoint, stop after SIGTERM
    ctx.finish(engine, it, writer, bar)
"""

from __future__ import annotations

import logging
import os

from tqdm.auto import tqdm

from zoomer_jax.parallel import distributed
from zoomer_jax.train.metrics import MetricWriter
from zoomer_jax.train.trainer import Engine

log = logging.getLogger("zoomer_jax.train")
SHOWN = ("loss", "reward/mean", "acc/mean", "grad_norm", "tokens_per_s")


def tokenizer_for(cfg):
  from zoomer_jax.text import build_tiny_tokenizer, load_tokenizer  # noqa: PLC0415
  if cfg.init.checkpoint:
    return load_tokenizer(cfg.init.checkpoint)
  tok = build_tiny_tokenizer()
  if tok.vocab_size > cfg.model.text.vocab_size:
    raise ValueError(f"random-weight runs use the built-in tiny tokenizer ({tok.vocab_size} ids), which does not "
                     f"fit model.text.vocab_size={cfg.model.text.vocab_size}: set init.checkpoint to an HF "
                     "directory (with its tokenizer) for full-size models")
  return tok


class JobContext:
  def __init__(self, cfg, kind: str):
    distributed.initialize()  # a no-op off a pod; must precede any other JAX use
    self.cfg, self.kind = cfg, kind
    self.tok = tokenizer_for(cfg)
    self._builders = {}
    self.job_step = 0  # finished steps of the job (RL steps for GRPO, optimizer steps for SFT)
    os.makedirs(cfg.workdir, exist_ok=True)
    if distributed.is_main_process():
      with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
        f.write(cfg.to_json(indent=1))

  # ------------------------------------------------------------------ data
  def _files(self, split: str):
    files = tuple(self.cfg.data.train_files if split == "train" else self.cfg.data.val_files)
    if not files:
      key = "train_files" if split == "train" else "val_files"
      raise ValueError(f"config data.{key} is empty: give --config.data.{key}='(\"/path/records.json\",)'")
    return files

  def _tfds_dir(self) -> str:
    return self.cfg.data.tfds_dir or os.path.join(self.cfg.workdir, "tfds")

  def _builder(self, kind: str):
    """The TFDS (array_record) copy of the config's train and validation files, built once per workdir."""
    from zoomer_jax.data import tfds_builders  # noqa: PLC0415
    if kind not in self._builders:
      splits = {"train": list(self._files("train"))}
      if kind == "sft" and self.cfg.data.reflection_files:  # mixed in by `sft_source`
        splits["reflection"] = list(self.cfg.data.reflection_files)
      if kind == "rl" and self.cfg.data.val_files:  # GRPO validates (trainer.test_freq); SFT does not
        splits["validation"] = list(self._files("validation"))
      build = tfds_builders.build_sft_dataset if kind == "sft" else tfds_builders.build_rl_dataset
      if not distributed.is_main_process():  # process 0 writes the files, the others then open them
        distributed.barrier(f"tfds_{kind}_built")
      self._builders[kind] = build(splits, self._tfds_dir())
      if distributed.is_main_process():
        distributed.barrier(f"tfds_{kind}_built")
    return self._builders[kind]

  def sft_source(self, split: str):
    """The split's SFT records; for "train" with `data.reflection_files`, those files' records mixed in at
    `data.reflection_ratio` (`data.mixture.MixedSource`: the exemplars once each, reflections that fraction)."""
    from zoomer_jax.data import tfds_builders  # noqa: PLC0415
    from zoomer_jax.data.mixture import MixedSource  # noqa: PLC0415
    self._files(split)
    data = self.cfg.data
    if split == "train" and bool(data.reflection_files) != (data.reflection_ratio > 0):
      raise ValueError(f"data.reflection_files ({len(data.reflection_files)} files) and data.reflection_ratio "
                       f"({data.reflection_ratio}) go together: give both or neither")
    source = tfds_builders.sft_source(self._builder("sft"), split)
    if split != "train" or not data.reflection_files:
      return source
    return MixedSource(source, tfds_builders.sft_source(self._builder("sft"), "reflection"),
                       data.reflection_ratio, seed=data.seed)

  def rl_source(self, split: str):
    from zoomer_jax.data import tfds_builders  # noqa: PLC0415
    self._files(split)
    return tfds_builders.rl_source(self._builder("rl"), split)

  def iterator(self, source, *, seed: int, shuffle: bool = True, transform=None, workers: int = 1):
    """The records forever (reshuffled each epoch) as one global stream (`data.pipeline.RecordStream`): every
    process sees the same order, so step k's global batch is the same records whatever the process count,
    and the saved position (`next_index`) is the same on every process. `next(it)` reads a record on every
    process (GRPO prompts); `it.take(n, rows, ...)` gives each process only its rows, passed through
    `transform` (SFT: tokenising and reading images) on that process alone, in `workers` threads."""
    from zoomer_jax.data.pipeline import make_stream  # noqa: PLC0415
    return make_stream(source, seed=seed, shuffle=shuffle, num_epochs=None, transform=transform,
                       workers=workers)

  # ------------------------------------------------------------------ loop
  def engine(self, loss_fn, *, total_steps: int, optim, freeze_vision: bool, rollout_mesh=None,
             rollout_rules=None) -> Engine:
    t = self.cfg.trainer
    return Engine(self.cfg, loss_fn, total_steps=total_steps, optim=optim, freeze_vision=freeze_vision,
                  save_freq=1, max_to_keep=t.max_to_keep, rollout_mesh=rollout_mesh, rollout_rules=rollout_rules)

  def start(self, engine: Engine, it, total: int):
    """Resumes model, optimizer, RNG, step and data position from the latest checkpoint, if there is one."""
    extra = engine.resume()
    if extra is not None:
      if "data" in extra:
        it.set_state(extra["data"])
      self.job_step = int(extra.get("job_step", engine.step))
    t = self.cfg.trainer
    writer = MetricWriter(self.cfg.workdir, tensorboard=t.tensorboard, resume_step=self.job_step + 1)
    bar = tqdm(total=total, initial=self.job_step, desc=self.kind, dynamic_ncols=True,
               disable=not (t.progress and distributed.is_main_process()))
    engine.install_sigterm_handler()
    return writer, bar

  def extra(self, it) -> dict:
    return {"data": it.get_state(), "job_step": self.job_step}

  def end_step(self, engine: Engine, it, writer: MetricWriter, bar, metrics: dict) -> None:
    """After `self.job_step` was advanced: log, checkpoint every `save_freq` steps, stop after a SIGTERM."""
    step = self.job_step
    if step % max(1, self.cfg.trainer.log_freq) == 0:
      writer.write(step, metrics)
    bar.update(1)
    bar.set_postfix({k.split("/")[0]: f"{metrics[k]:.3g}" for k in SHOWN if k in metrics})
    extra = self.extra(it)
    if self.cfg.trainer.save_freq > 0 and step % self.cfg.trainer.save_freq == 0:
      engine.save(extra, force=True)
    engine.check_preemption(extra)  # raises Preempted after saving when a SIGTERM arrived

  def finish(self, engine: Engine, it, writer: MetricWriter, bar, completed: bool) -> None:
    """Saves the final step of a completed run (an interrupted one keeps its last consistent checkpoint)."""
    try:
      if completed:
        engine.save(self.extra(it), force=True)
    finally:
      engine.close()
      writer.close()
      bar.close()
