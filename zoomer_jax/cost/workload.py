"""What one step processes: the job's sizes from its config, and the expected shape of a trajectory.

    job = job_from_config(load("grpo_7b_v5p64"))          # sizes, mesh, chip
    traj = Trajectory().counts(job)                        # expected tokens / images of one trajectory

The trajectory defaults are assumptions with their sources; override any of them (`Trajectory(zoom_calls=4)`).
Memory is sized for the worst case the config allows (`Trajectory.worst_case`): `max_token_len` tokens
and `max_total_frames` images, because micro-batches are padded up to that and must never run out of HBM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from zoomer_jax.cost.chips import ChipSpec, parse_accelerator
from zoomer_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Resolved (data, fsdp, tensor) degrees, ICI x DCN."""

  data: int
  fsdp: int
  tensor: int
  dcn_data: int = 1  # the part of `data` that crosses slices

  @property
  def chips(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def batch_shards(self) -> int:
    """Batch rows are sharded over (data, fsdp) (train/batch.py BATCH_AXES)."""
    return self.data * self.fsdp

  @property
  def param_shards(self) -> int:
    """Parameters are sharded over fsdp (embed-like dims) and tensor (heads, MLP, vocab); replicated over data."""
    return self.fsdp * self.tensor


def _fill(degrees, total: int, what: str) -> tuple[int, ...]:
  degrees = [int(d) for d in degrees]
  if degrees.count(-1) > 1 or any(d == 0 or d < -1 for d in degrees):
    raise ValueError(f"mesh.{what} {degrees}: positive degrees, at most one -1")
  known = math.prod(d for d in degrees if d != -1)
  if total % known:
    raise ValueError(f"mesh.{what} {degrees} does not divide {total} chips")
  return tuple(total // known if d == -1 else d for d in degrees)


def resolve_mesh(ici, dcn, chips: int) -> MeshShape:
  """(data, fsdp, tensor) for `chips` chips, with -1 filled as `zoomer_jax.parallel.mesh.make_mesh` does."""
  dcn = _fill(dcn, chips, "dcn") if -1 in tuple(dcn) else tuple(int(d) for d in dcn)
  slices = math.prod(dcn)
  if chips % slices:
    raise ValueError(f"{chips} chips cannot form {slices} slices (mesh.dcn={list(dcn)})")
  ici = _fill(ici, chips // slices, "ici")
  shape = [i * d for i, d in zip(ici, dcn)]
  if math.prod(shape) != chips:
    raise ValueError(f"mesh ici={list(ici)} x dcn={list(dcn)} needs {math.prod(shape)} chips, have {chips}")
  if dcn[1] != 1 or dcn[2] != 1:
    raise ValueError(f"mesh.dcn={list(dcn)}: the account models slices only on the data axis")
  return MeshShape(data=shape[0], fsdp=shape[1], tensor=shape[2], dcn_data=dcn[0])


@dataclasses.dataclass(frozen=True)
class Job:
  """The sizes of one training step, read from a job config (GRPO or SFT)."""

  kind: str  # "grpo" | "sft"
  model: ModelConfig
  accelerator: str
  chip: ChipSpec
  mesh: MeshShape
  prompts: int  # GRPO: data.train_batch_size; SFT: data.batch_size (sequences)
  group: int  # GRPO: rollout.n; SFT: 1
  mini_batch: int  # trajectories per optimizer step
  micro_batch: int  # trajectories per forward/backward, over the whole mesh
  epochs: int
  max_token_len: int
  token_bucket: int
  remat: str
  vocab_chunk: int  # 0 = full logits
  freeze_vision: bool
  use_kl: bool
  max_pixels: int
  min_pixels: int
  max_total_frames: int
  response_length: int = 0  # GRPO only from here
  max_rounds: int = 0
  frames_per_call_max: int = 0
  rollout_batch: int = 0
  decode_chunk: int = 0
  context: int = 1  # training splits each row's tokens this many ways (rules map activation_length to tensor)
  token_chunk: int = 0  # the log-prob head walks a row's tokens in blocks of this many (0: all at once)

  @property
  def trajectories(self) -> int:
    return self.prompts * self.group

  @property
  def optimizer_steps(self) -> int:
    return self.epochs * (self.trajectories // self.mini_batch)

  @property
  def micro_per_chip(self) -> int:
    """Trajectories each chip runs per forward/backward (rows are sharded over data x fsdp)."""
    return -(-self.micro_batch // self.mesh.batch_shards)


def job_from_config(cfg: Mapping[str, Any], accelerator: str | None = None) -> Job:
  """Reads a `configs/grpo_*.py` or `configs/sft_*.py` ConfigDict. The accelerator is the argument, else
  `cfg.accelerator_type` (e.g. "v5p-64")."""
  accelerator = accelerator or cfg["accelerator_type"]
  if not accelerator:
    raise ValueError("the config's accelerator_type is empty; pass accelerator='v5p-64' (or another)")
  chip, chips = parse_accelerator(accelerator)
  model = ModelConfig.from_config_dict(cfg["model"].to_dict())
  mesh = resolve_mesh(cfg["mesh"]["ici"], cfg["mesh"]["dcn"], chips)
  kind = cfg["job"]
  if kind == "grpo":
    d, r, a = cfg["data"], cfg["rollout"], cfg["actor"]
    job = Job(kind=kind, model=model, accelerator=accelerator, chip=chip, mesh=mesh,
              prompts=int(d["train_batch_size"]), group=int(r["n"]),
              mini_batch=int(a["ppo_mini_batch_size"]) * int(r["n"]), micro_batch=int(a["ppo_micro_batch_size"]),
              epochs=int(a["ppo_epochs"]), max_token_len=int(a["max_token_len"]),
              token_bucket=int(a["token_bucket"]), remat=str(a["remat"]), vocab_chunk=int(a["logprob_vocab_chunk"]),
              token_chunk=int(a["logprob_token_chunk"]),
              freeze_vision=bool(a["freeze_vision_tower"]), use_kl=bool(a["use_kl_loss"]),
              max_pixels=int(r["max_pixels"]), min_pixels=int(r["min_pixels"]),
              max_total_frames=int(r["max_total_frames"]), response_length=int(r["response_length"]),
              max_rounds=int(r["max_generation_round"]), frames_per_call_max=int(r["tool_call_max_frames"]),
              rollout_batch=int(r["batch_size"]), decode_chunk=int(r["decode_chunk"]))
  elif kind == "sft":
    d, t = cfg["data"], cfg["train"]
    job = Job(kind=kind, model=model, accelerator=accelerator, chip=chip, mesh=mesh,
              prompts=int(d["batch_size"]), group=1, mini_batch=int(d["batch_size"]),
              micro_batch=int(d["micro_batch_size"]), epochs=1, max_token_len=int(d["cutoff_len"]),
              token_bucket=int(d["token_bucket"]), remat=str(t["remat"]), vocab_chunk=int(t["logprob_vocab_chunk"]),
              token_chunk=int(t["logprob_token_chunk"]),
              freeze_vision=bool(t["freeze_vision_tower"]), use_kl=False, max_pixels=int(d["max_pixels"]),
              min_pixels=int(d["min_pixels"]), max_total_frames=128)  # SFT records: 64 overview + zoom frames, <= 128
  else:
    raise ValueError(f"config job={kind!r}: the account knows 'grpo' and 'sft'")
  job = dataclasses.replace(job, context=_context_degree(cfg["mesh"]["rules"], mesh))
  if job.mini_batch <= 0 or job.trajectories % job.mini_batch:
    raise ValueError(f"{job.trajectories} trajectories per step do not split into mini-batches of {job.mini_batch}")
  if job.mini_batch % job.micro_batch:
    raise ValueError(f"mini-batch of {job.mini_batch} trajectories is not a multiple of the micro-batch "
                     f"{job.micro_batch}")
  return job


def _context_degree(rules, mesh: MeshShape) -> int:
  """How many ways the rules split a row's tokens in training: the first rule for `activation_length`, over the
  mesh axes it names (context parallelism, `parallel.rules.CONTEXT_PARALLEL`)."""
  degrees = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
  for name, target in rules:
    if name == "activation_length":
      axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
      return math.prod(degrees.get(a, 1) for a in axes)
  return 1


def frame_grid(height: int, width: int, max_pixels: int, min_pixels: int, patch: int = 14) -> tuple[int, int, int]:
  """(1, h, w) patch grid of one frame after VideoZoomer's pixel budget and the processor's rounding."""
  from zoomer_jax.video.preprocess import model_size  # the rule the data pipeline applies
  _, (h, w) = model_size(height, width, max_pixels=max_pixels, min_pixels=min_pixels)
  return (1, h // patch, w // patch)


@dataclasses.dataclass(frozen=True)
class TrajectoryCounts:
  grid: tuple[int, int, int]  # patch grid of every frame
  tokens_per_image: int
  prompt_tokens: int  # system + question + overview frames
  observation_tokens: int  # one zoom call's tool response (frames + wrapper)
  zoom_calls: int
  gen_tokens_per_turn: int
  overview_frames: int
  frames_per_call: int
  total_tokens: int

  @property
  def images(self) -> int:
    return self.overview_frames + self.zoom_calls * self.frames_per_call

  @property
  def turns(self) -> int:
    return self.zoom_calls + 1

  @property
  def gen_tokens(self) -> int:
    return self.turns * self.gen_tokens_per_turn

  @property
  def patches(self) -> int:
    return self.images * math.prod(self.grid)

  def segments(self) -> list[tuple[str, int]]:
    """The trajectory in order: prompt, then (generated turn, tool response) per call, the answer turn."""
    out = [("prompt", self.prompt_tokens)]
    for _ in range(self.zoom_calls):
      out += [("gen", self.gen_tokens_per_turn), ("obs", self.observation_tokens)]
    return out + [("gen", self.gen_tokens_per_turn)]


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """Expected shape of one trajectory. Defaults, and where they come from:

  prompt_text_tokens  400: agent/prompts/system_prompt.txt is 1192 bytes (~270 Qwen tokens) + a
                      multiple-choice question (~100) + chat-template tokens.
  overview_frames     64: data.frames_upbound (docs/video.md; videos > 128 s get 64).
  zoom_calls          2: expected tool calls (an assumption; at most max_generation_round - 1 = 4).
  frames_per_call     16: rollout.tool_call_max_frames, the most a call may ask for.
  frame_size          720x1280 source frames -> 224x420 after the 100352-pixel budget -> 16x30 patches,
                      120 LLM tokens per frame (a 4:3 source gives 20x26 patches, 130 tokens).
  text_tokens_per_frame 12: the `<frame{i}_time{t:.2f}s>` tag plus vision start/end (agent/rollout.py
                      allows the same 12 per frame when sizing its cache).
  observation_text_tokens 64: the tool-response wrapper and instruction text of one call (docs/protocol.md).
  gen_tokens_per_turn 512: expected generated tokens per assistant turn (an assumption; the cap is
                      rollout.response_length = 4096).
  """

  prompt_text_tokens: int = 400
  overview_frames: int = 64
  zoom_calls: int = 2
  frames_per_call: int = 16
  frame_size: tuple[int, int] = (720, 1280)
  text_tokens_per_frame: int = 12
  observation_text_tokens: int = 64
  gen_tokens_per_turn: int = 512

  def counts(self, job: Job) -> TrajectoryCounts:
    grid = frame_grid(*self.frame_size, job.max_pixels, job.min_pixels)
    merge = job.model.vision.spatial_merge_size
    per_image = math.prod(grid) // merge**2
    frame_cost = per_image + self.text_tokens_per_frame
    calls = self.zoom_calls
    if job.max_rounds and calls > job.max_rounds - 1:
      raise ValueError(f"{calls} zoom calls need more than max_generation_round={job.max_rounds} rounds")
    images = self.overview_frames + calls * self.frames_per_call
    if images > job.max_total_frames:
      raise ValueError(f"{images} images exceed max_total_frames={job.max_total_frames}")
    prompt = self.prompt_text_tokens + self.overview_frames * frame_cost
    obs = self.observation_text_tokens + self.frames_per_call * frame_cost
    total = prompt + calls * obs + (calls + 1) * self.gen_tokens_per_turn
    if total > job.max_token_len:
      raise ValueError(f"expected trajectory of {total} tokens exceeds max_token_len={job.max_token_len}")
    return TrajectoryCounts(grid=grid, tokens_per_image=per_image, prompt_tokens=prompt, observation_tokens=obs,
                            zoom_calls=calls, gen_tokens_per_turn=self.gen_tokens_per_turn,
                            overview_frames=self.overview_frames, frames_per_call=self.frames_per_call,
                            total_tokens=total)

  def worst_case(self, job: Job, frame_size: tuple[int, int] = (480, 640)) -> tuple[int, int, tuple[int, int, int]]:
    """(tokens, images, frame grid) a micro-batch row may hold: max_token_len tokens, max_total_frames images
    of the largest common frame (4:3 gives the most patches under the pixel budget)."""
    grid = frame_grid(*frame_size, job.max_pixels, job.min_pixels)
    return job.max_token_len, job.max_total_frames, grid
