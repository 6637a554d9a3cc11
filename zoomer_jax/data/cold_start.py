"""Cold-start SFT trajectories for the synthetic zoom task, written programmatically instead of distilled.

Each RL record of `data.synthetic` becomes one conversation in the SFT format of the original (docs/training.md, SFT):

  {"messages": [system, user, assistant, user (tool response), assistant, ...], "images": [png, ...],
   "id": doc_id, "kind": "direct" | "reflection"}

rendered with exactly the texts the agent sees at rollout time: `system_prompt(tool_cfg)`, `user_prompt(problem,
overview timestamps)`, and each tool response is `Episode.observation(timestamps)` without the chat-turn tokens
around it (the SFT renderer adds `<|im_start|>user\\n ... <|im_end|>\\n` itself). Each `<image>` follows its
`<frame{i}_time{t}s>` tag; the PNGs are the frames `VideoReader` decodes at the indices `sample_overview` gives and
those the zoom tool shows (`tools.ZOOM`: its call text and its frames), as in `agent.rollout`. Every turn goes
through a fresh `Episode`, so a call the protocol would reject cannot be written.

Kinds (think texts short and templated, every number read off the timestamp tags):
  direct:     think (where the border is) -> `<video_zoom>` on `synthetic.cue_zoom`'s segment -> frames ->
              think (which object appears, and when) -> `<answer>X</answer>`;
  reflection: the first zoom takes one overview gap inside the cue that does not hold the flash (a plausible
              miss; its frames show no object) -> the next turn says so and zooms as in `direct` -> answer.
  sparse:     as `direct`, with the same think text, but the zoom asks for half the frame rate (`sparse_fps`):
              its frames catch the flash only now and then; when they miss it, the answer turn says so and
              guesses a letter. An imperfect demonstration on purpose: SFT copies the mix of frame rates, and
              GRPO, whose reward sees the answers, can learn that the denser zoom pays (the demo's RL signal).
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np

from zoomer_jax.agent import protocol as P
from zoomer_jax.data.synthetic import LETTERS, write_if_changed, cue_zoom, hits, zoom_fps
from zoomer_jax.tools import ZOOM
from zoomer_jax.video import VideoReader, sample_overview

_NEEDED = ("cue_frames", "answer_frames", "options", "n_frames")
KINDS = ("direct", "reflection", "sparse")


def _times(ts) -> str:
  """'34.00s, 36.00s and 38.00s' (the tags' format)."""
  words = [f"{float(t):.2f}s" for t in ts]
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _png(frame_rgb: np.ndarray, path: str) -> str:
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(frame_rgb[..., ::-1]))
  if not ok:
    raise OSError(f"PNG encoding failed for {path}")
  write_if_changed(path, buf.tobytes())
  return path


def _check(record, i: int, where: str) -> dict:
  for key in ("problem", "solution", "videos", "extra_info"):
    if key not in record:
      raise ValueError(f"{where} record {i}: missing field {key!r}")
  info = record["extra_info"]
  for key in _NEEDED:
    if key not in info:
      raise ValueError(f"{where} record {i}: extra_info lacks {key!r} (not a synthetic-zoom record?)")
  if record["solution"] not in LETTERS[:len(info["options"])]:
    raise ValueError(f"{where} record {i}: solution {record['solution']!r} is not one of the option letters")
  if not isinstance(record["videos"], list) or len(record["videos"]) != 1:
    raise ValueError(f"{where} record {i}: videos must be a list of one path, got {record['videos']!r}")
  return info


class _Writer:
  """Builds one conversation: messages, their images, and the Episode that checks every turn."""

  def __init__(self, reader: VideoReader, cfg: P.ToolConfig, image_dir: str, where: str):
    self.reader, self.cfg, self.image_dir, self.where = reader, cfg, image_dir, where
    self.messages = [{"role": "system", "content": P.system_prompt(cfg)}]
    self.images: list[str] = []
    self.episode: P.Episode | None = None

  def _save(self, frames: np.ndarray, prefix: str) -> None:
    self.images += [_png(f, os.path.join(self.image_dir, f"{prefix}_{k:02d}.png")) for k, f in enumerate(frames)]

  def overview(self, problem: str) -> tuple[np.ndarray, np.ndarray]:
    meta = self.reader.meta
    idx, ts = sample_overview(meta, self.cfg.video_fps, self.cfg.frames_upbound)
    self.messages.append({"role": "user", "content": P.user_prompt(problem, ts)})
    self._save(self.reader.frames(idx), "overview")
    self.episode = P.Episode(self.cfg, meta.duration, len(ts))
    return idx, ts

  def zoom(self, think: str, segment: tuple[float, float], fps: float) -> tuple[np.ndarray, np.ndarray]:
    """An assistant turn with one call, and its tool response; returns the clip's (indices, timestamps)."""
    text = f"<think>{think}</think>\n{ZOOM.call_text({'segment': list(segment), 'fps': fps})}"
    out = self.episode.step(text)
    if not isinstance(out, P.ZoomCall):
      raise ValueError(f"{self.where}: the protocol rejects the zoom turn {text!r}: {out}")
    shown = ZOOM.run(out, self.reader)
    obs = self.episode.observation(shown.times)
    assert obs.startswith(P.TURN_OPEN) and obs.endswith(P.TURN_CLOSE), obs
    self.messages += [{"role": "assistant", "content": text},
                      {"role": "user", "content": obs[len(P.TURN_OPEN):-len(P.TURN_CLOSE)]}]
    self._save(shown.frames, f"zoom{len(self.episode.calls)}")
    return shown.indices, shown.times

  def answer(self, think: str, letter: str) -> None:
    text = f"<think>{think}</think>\n<answer>{letter}</answer>"
    out = self.episode.step(text)
    if not (isinstance(out, P.Final) and out.answer == letter):
      raise ValueError(f"{self.where}: the protocol does not end on the answer turn {text!r}: {out}")
    self.messages.append({"role": "assistant", "content": text})


def sparse_fps(fps: float) -> float:
  """The frame rate of a `sparse` trajectory's zoom: half the one that shows the flash."""
  return fps / 2


def trajectory(record: dict, kind: str, image_dir: str, rng: np.random.Generator,
               tool_cfg: P.ToolConfig = P.ToolConfig(), where: str = "record", video_backend: str = "auto") -> dict:
  """One SFT conversation ("direct" or "reflection") for a synthetic RL record; frames saved under image_dir."""
  if kind not in KINDS:
    raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
  info = record["extra_info"]
  answer_frames = tuple(info["answer_frames"])
  c0, c1 = info["cue_frames"]
  letter = record["solution"]
  name = info["options"][LETTERS.index(letter)]
  os.makedirs(image_dir, exist_ok=True)
  with VideoReader(record["videos"][0], backend=video_backend) as reader:
    if reader.meta.n_frames != info["n_frames"]:
      raise ValueError(f"{where}: video {reader.meta.path} has {reader.meta.n_frames} frames, "
                       f"extra_info says {info['n_frames']}")
    w = _Writer(reader, tool_cfg, image_dir, where)
    ov, ts = w.overview(record["problem"])
    if hits(ov, answer_frames):
      raise ValueError(f"{where}: an overview frame shows the answer under this tool config "
                       f"(video_fps {tool_cfg.video_fps}, frames_upbound {tool_cfg.frames_upbound})")
    cued = (ov >= c0) & (ov <= c1)
    (s, e), fps = cue_zoom(ts, cued, tool_cfg.tool_call_max_frames)
    on = _times(ts[cued])
    if kind == "reflection":
      # Overview gaps inside [s, e]; the one holding the flash lies between the tags around answer_frames.
      edges = np.flatnonzero(cued)
      edges = np.r_[edges[0] - 1, edges, edges[-1] + 1]
      wrong = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if not ov[a] < answer_frames[0] <= ov[b]]
      a, b = wrong[int(rng.integers(len(wrong)))]
      ws, we = round(float(ts[a]), 2), round(float(ts[b]), 2)
      near = _times([ts[a] if cued[a] else ts[b]])
      zidx, _ = w.zoom(f"The yellow border is on at {on}. The object should appear near {near}, so I zoom in "
                       f"on {ws:.2f}s to {we:.2f}s.", (ws, we), zoom_fps(we - ws, tool_cfg.tool_call_max_frames))
      if hits(zidx, answer_frames):
        raise ValueError(f"{where}: the planned miss [{ws}, {we}] s shows the answer")
      think = (f"No object appears in the frames from {ws:.2f}s to {we:.2f}s. The border is on somewhere "
               f"between {s:.2f}s and {e:.2f}s, so I zoom in on all of it.")
    else:
      think = (f"The yellow border is on at {on} and off at {s:.2f}s and {e:.2f}s. The object appears briefly "
               f"between {s:.2f}s and {e:.2f}s, which these frames miss, so I zoom in there.")
    if kind == "sparse":
      fps = sparse_fps(fps)
    zidx, zts = w.zoom(think, (s, e), fps)
    seen = (zidx >= answer_frames[0]) & (zidx <= answer_frames[1])
    if not seen.any():
      if kind != "sparse":
        raise ValueError(f"{where}: the zoom [{s}, {e}] s at {fps} fps misses the answer window {answer_frames}")
      guess = LETTERS[int(rng.integers(len(info["options"])))]
      w.answer(f"No object appears in these frames. I guess option {guess}.", guess)
      return {"messages": w.messages, "images": w.images}
    # The object first, its time after: the answer letter then follows from what is seen, not from copying a
    # timestamp first (which a small model gets wrong long after it has learned to see the object).
    w.answer(f"A {name} appears at {_times(zts[seen])}. That is option {letter}.", letter)
  return {"messages": w.messages, "images": w.images}


def generate_sft(rl_json: str, out_dir: str, *, seed: int = 0, reflection_fraction: float = 0.3,
                 sparse_fraction: float = 0.0, tool_cfg: P.ToolConfig = P.ToolConfig(),
                 video_backend: str = "auto") -> str:
  """Writes `out_dir/<rl_json stem>_sft.json` (a list of conversations) and `out_dir/images/<doc_id>/*.png`.

  round(reflection_fraction * n) records, drawn with `seed`, get a reflection trajectory, round(sparse_fraction *
  n) others a sparse one, the rest a direct one. Deterministic; files already there with the same bytes are left
  alone. Returns the JSON path.
  """
  for name, frac in (("reflection_fraction", reflection_fraction), ("sparse_fraction", sparse_fraction)):
    if not 0 <= frac <= 1:
      raise ValueError(f"{name} must lie in [0, 1], got {frac}")
  if reflection_fraction + sparse_fraction > 1:
    raise ValueError(f"reflection_fraction + sparse_fraction must be at most 1, got "
                     f"{reflection_fraction} + {sparse_fraction}")
  need = 3 if reflection_fraction > 0 else 2
  if tool_cfg.max_generation_round < need:
    raise ValueError(f"these trajectories take {need} rounds; max_generation_round is "
                     f"{tool_cfg.max_generation_round}")
  with open(rl_json, encoding="utf-8") as f:
    records = json.load(f)
  if not isinstance(records, list):
    raise ValueError(f"{rl_json}: expected a JSON list of records, got {type(records).__name__}")
  rng = np.random.default_rng(seed)
  n_reflect, n_sparse = round(reflection_fraction * len(records)), round(sparse_fraction * len(records))
  order = rng.permutation(len(records)).tolist()
  reflect, sparse = set(order[:n_reflect]), set(order[n_reflect:n_reflect + n_sparse])
  out_dir = os.path.abspath(out_dir)
  conversations = []
  for i, record in enumerate(records):
    _check(record, i, rl_json)
    doc_id = str(record.get("doc_id", f"{i:05d}"))
    kind = "reflection" if i in reflect else "sparse" if i in sparse else "direct"
    traj = trajectory(record, kind, os.path.join(out_dir, "images", doc_id), np.random.default_rng([seed, i]),
                      tool_cfg, where=f"{rl_json} record {i}", video_backend=video_backend)
    conversations.append({**traj, "id": doc_id, "kind": kind})
  stem = os.path.splitext(os.path.basename(rl_json))[0]
  path = os.path.join(out_dir, f"{stem}_sft.json")
  write_if_changed(path, json.dumps(conversations, indent=1).encode())
  return path
