"""Small training data written at test time: SFT conversations with PNG frames, in the original's format."""

import json
import os

import cv2
import numpy as np


def write_sft_records(out_dir: str, n: int, seed: int = 0) -> str:
  """n conversations (overview frames, one zoom, an answer) as `sft.json` + PNGs; returns the JSON path."""
  rng = np.random.default_rng(seed)
  os.makedirs(out_dir, exist_ok=True)
  records = []
  for i in range(n):
    images = []
    for k in range(3):
      path = os.path.join(out_dir, f"r{i}_f{k}.png")
      cv2.imwrite(path, rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
      images.append(path)
    letter = "ABCD"[i % 4]
    messages = [
        {"role": "system", "content": "Answer with a letter."},
        {"role": "user", "content": f"<frame0_time0.0s><image><frame1_time{i}.0s><image>\nQuestion {i}?"},
        {"role": "assistant", "content": f'<think>see {i}s</think><video_zoom>{{"segment": [{i}, {i + 2}], '
                                         f'"fps": 0.5}}</video_zoom>'},
        {"role": "user", "content": f"<tool_response>\n<frame0_time{i}.0s><image>\n</tool_response>\ncontinue"},
        {"role": "assistant", "content": f"<think>it is {letter}</think><answer>{letter}</answer>"},
    ]
    records.append({"messages": messages, "images": images})
  path = os.path.join(out_dir, "sft.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def write_rl_records(out_dir: str, n: int) -> str:
  """n multiple-choice questions about short index-pattern videos, as the original's RL JSON (data/records.py)."""
  import media
  os.makedirs(out_dir, exist_ok=True)
  records = []
  for i in range(n):
    video = os.path.join(out_dir, f"v{i}.mp4")
    if not os.path.exists(video):
      media.write_video(video, 40 + 8 * i, 4.0, (64, 80))
    records.append({"problem": f"<image>\nHow many frames in video {i}?\nA. 1\nB. 2\nC. 3\nD. 4",
                    "solution": "ABCD"[i % 4], "data_source": "test_source", "videos": [video],
                    "extra_info": {"answer_type": "multiple_choice"}, "doc_id": i})
  path = os.path.join(out_dir, "rl.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path
