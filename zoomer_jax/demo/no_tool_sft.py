"""SFT conversations for the no-tool condition: answer from the baseline's frames alone, in one turn.

The evaluation's no-tool baseline (`eval.harness.no_tool_config`) shows the model the whole frame budget spread
evenly over the video under a system prompt without the tool, and takes one answer turn. A model that only ever
saw tool conversations does not answer there at all (it asks for a zoom, which is never run), so its baseline
score says nothing about what the frames allow. These conversations teach that condition with the same
templated texts as the cold start (`data.cold_start`), exactly as the harness lays it out:

  the flash is in one of the frames: think (where the border is, which frame shows which object) -> answer;
  it is not:                          think (where the border is, no frame shows the object)     -> a guess
                                      (a letter drawn uniformly with the record's seed).

    path = generate_no_tool_sft(rl_json, out_dir, tool_cfg=tool, seed=0, n=128)   # `<stem>_notool_sft.json`
"""

from __future__ import annotations

import json
import os

import numpy as np

from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.rollout import AgentConfig
from zoomer_jax.data.cold_start import _check, _png, _times
from zoomer_jax.data.synthetic import LETTERS, write_if_changed
from zoomer_jax.eval.harness import no_tool_config
from zoomer_jax.video import VideoReader, sample_overview


def conversation(record: dict, tool_cfg: P.ToolConfig, image_dir: str, rng: np.random.Generator, *,
                 index: int = 0, where: str = "records") -> dict:
  """One no-tool conversation ({"messages", "images", "seen"}) of record `index` of the synthetic RL file
  `where`, for the tool run `tool_cfg` (its frame budget); the frames are saved as PNGs under image_dir."""
  info = _check(record, index, where)
  base = no_tool_config(AgentConfig(tool=tool_cfg)).tool
  a0, a1 = info["answer_frames"]
  c0, c1 = info["cue_frames"]
  letter = record["solution"]
  os.makedirs(image_dir, exist_ok=True)
  with VideoReader(record["videos"][0]) as reader:
    idx, ts = sample_overview(reader.meta, base.video_fps, base.frames_upbound)
    frames = reader.frames(idx)
  images = [_png(f, os.path.join(image_dir, f"frame_{k:03d}.png")) for k, f in enumerate(frames)]
  cued = (idx >= c0) & (idx <= c1)
  seen = (idx >= a0) & (idx <= a1)
  on = f"The yellow border is on at {_times(ts[cued])}." if cued.any() else "No frame shows the yellow border."
  if seen.any():
    name = info["options"][LETTERS.index(letter)]
    think = f"{on} A {name} appears at {_times(ts[seen])}. That is option {letter}."
  else:
    letter = LETTERS[int(rng.integers(len(info["options"])))]
    think = f"{on} No frame shows an object while it is on, so I guess option {letter}."
  messages = [{"role": "system", "content": P.system_prompt(base)},
              {"role": "user", "content": P.user_prompt(record["problem"], ts)},
              {"role": "assistant", "content": f"<think>{think}</think>\n<answer>{letter}</answer>"}]
  return {"messages": messages, "images": images, "seen": bool(seen.any())}


def generate_no_tool_sft(rl_json: str, out_dir: str, *, tool_cfg: P.ToolConfig, seed: int = 0,
                         n: int | None = None) -> str:
  """Writes `out_dir/<stem>_notool_sft.json` for the first `n` records of rl_json (all if None), PNGs under
  `out_dir/images_notool/<doc_id>/`; deterministic, unchanged files are left alone. Returns the JSON path."""
  with open(rl_json, encoding="utf-8") as f:
    records = json.load(f)
  if not isinstance(records, list):
    raise ValueError(f"{rl_json}: expected a JSON list of records, got {type(records).__name__}")
  records = records[:n] if n is not None else records
  out_dir = os.path.abspath(out_dir)
  out = []
  for i, record in enumerate(records):
    doc_id = str(record.get("doc_id", f"{i:05d}"))
    conv = conversation(record, tool_cfg, os.path.join(out_dir, "images_notool", doc_id),
                        np.random.default_rng([seed, i]), index=i, where=rl_json)
    out.append({**conv, "id": f"{doc_id}-notool", "kind": "no_tool"})
  stem = os.path.splitext(os.path.basename(rl_json))[0]
  path = os.path.join(out_dir, f"{stem}_notool_sft.json")
  write_if_changed(path, json.dumps(out, indent=1).encode())
  return path
