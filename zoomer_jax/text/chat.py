"""Chat rendering straight to token ids, and the token-in/token-out `Transcript` of a multi-turn rollout.

`render_messages` gives the ids that Qwen2-VL's chat template (`tokenizer.CHAT_TEMPLATE`, the hub's
template) followed by the processor's pad expansion gives: every `<|image_pad|>` becomes `image_tokens[k]` pads (the
k-th image's `t*h*w // 4`), every `<|video_pad|>` `video_tokens[k]` pads. An image is an `{"type": "image"}`
item of list content, an `<image>` placeholder in string content (VideoZoomer's convention), or a
`<|image_pad|>` written in the text.

A `Transcript` starts from a rendered prompt and only ever appends: model tokens as they are, host text
(observations) tokenised on its own. Earlier ids never change, so a KV cache and log-probs stay valid.
The observation rule of the original (docs/protocol.md):

    ... generated turn <|im_end|>          <- appended by `close_turn` unless the turn ends with it (mask 1)
    <|im_start|>user\\n{observation}<|im_end|>\\n<|im_start|>assistant\\n   <- `append_observation` (mask 0)

with no `\\n` between the assistant's `<|im_end|>` and `<|im_start|>user`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from zoomer_jax.text.tokenizer import DEFAULT_SYSTEM_PROMPT, Tokenizer

IMAGE_PLACEHOLDER = "<image>"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"


@dataclasses.dataclass(frozen=True)
class ImageSlot:
  """The pads of one image or video: ids[start:start + length] are all `<|image_pad|>`/`<|video_pad|>`."""
  kind: str  # "image" or "video"
  start: int
  length: int


@dataclasses.dataclass(frozen=True)
class RenderedIds:
  """A rendered conversation.

  `mask` is 1 on the tokens of assistant messages' content and their closing `<|im_end|>` (the SFT loss
  tokens; vision pads excepted), 0 elsewhere. `message_index[i]` is the index in `messages` of token i's
  message, -1 for the inserted default system turn and the generation prompt. `slots`: images and videos.
  """
  ids: list[int]
  mask: list[int]
  message_index: list[int]
  slots: list[ImageSlot]

  @property
  def n_images(self) -> int:
    return sum(s.kind == "image" for s in self.slots)

  @property
  def n_videos(self) -> int:
    return sum(s.kind == "video" for s in self.slots)


def _item_text(item, where: str) -> str:
  """One item of list content, as the template writes it."""
  if not isinstance(item, Mapping):
    raise TypeError(f"{where}: a content item must be a dict, got {type(item).__name__}")
  kind = item.get("type")
  if kind == "image" or "image" in item or "image_url" in item:
    return IMAGE_BLOCK
  if kind == "video" or "video" in item:
    return VIDEO_BLOCK
  if "text" in item:
    if not isinstance(item["text"], str):
      raise TypeError(f"{where}: text must be a str, got {type(item['text']).__name__}")
    return item["text"]
  raise ValueError(f"{where}: content item {dict(item)!r} is neither text, image nor video")


def _content_text(content, where: str) -> str:
  if isinstance(content, str):
    return content.replace(IMAGE_PLACEHOLDER, IMAGE_BLOCK)
  if isinstance(content, Sequence):
    return "".join(_item_text(item, f"{where} item {j}") for j, item in enumerate(content))
  raise TypeError(f"{where}: content must be a str or a list of items, got {type(content).__name__}")


def _expand(tok: Tokenizer, ids: Sequence[int], image_tokens: Sequence[int], video_tokens: Sequence[int],
            offset: int, *per_token: Sequence[int]) -> tuple[list[int], list[list[int]], list[ImageSlot]]:
  """Each `<|image_pad|>`/`<|video_pad|>` -> n pads (n from the counts, in order); `per_token` lists are
  repeated alongside. Slot starts are shifted by `offset`. The counts must match the pads exactly."""
  pads = {tok.image_pad: ("image", list(image_tokens)), tok.video_pad: ("video", list(video_tokens))}
  used = {"image": 0, "video": 0}
  out, extra, slots = [], [[] for _ in per_token], []
  for i, t in enumerate(ids):
    n = 1
    if t in pads:
      kind, counts = pads[t]
      k = used[kind]
      if k >= len(counts):
        found = sum(x == t for x in ids)
        raise ValueError(f"the text holds {found} {kind}s but {len(counts)} {kind} token counts were given")
      n = int(counts[k])
      if n < 1:
        raise ValueError(f"{kind} {k} has {n} tokens; each needs at least 1 (grid t*h*w // 4)")
      used[kind] = k + 1
      slots.append(ImageSlot(kind, offset + len(out), n))
    out.extend([t] * n)
    for e, src in zip(extra, per_token):
      e.extend([src[i]] * n)
  for kind, counts in pads.values():
    if used[kind] != len(counts):
      raise ValueError(f"{len(counts)} {kind} token counts were given but the text holds {used[kind]} {kind}s")
  return out, extra, slots


def _render(messages: Sequence[Mapping], add_generation_prompt: bool, default_system: bool):
  """The template's string, and per message (block start, loss start, loss end, block end) in characters."""
  if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
    raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
  parts: list[str] = []
  spans: list[tuple[int, int, int, int]] = []
  pos = 0

  def put(s: str) -> int:
    nonlocal pos
    parts.append(s)
    pos += len(s)
    return pos

  for i, m in enumerate(messages):
    where = f"message {i}"
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"{where} must be a dict with 'role' and 'content', got {m!r}")
    role = m["role"]
    if not isinstance(role, str) or not role:
      raise ValueError(f"{where}: role must be a non-empty str, got {role!r}")
    if i == 0 and role != "system" and default_system:
      put(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    start = pos
    content_start = put(f"<|im_start|>{role}\n")
    content_end = put(_content_text(m["content"], where) + "<|im_end|>")
    put("\n")
    spans.append((start, content_start, content_end, pos) if role == "assistant" else (start, pos, pos, pos))
  if add_generation_prompt:
    put("<|im_start|>assistant\n")
  return "".join(parts), spans


def render_text(messages: Sequence[Mapping], add_generation_prompt: bool = True,
                default_system: bool = True) -> str:
  """The chat template's output before tokenisation (`<image>` in string content already replaced by
  `<|vision_start|><|image_pad|><|vision_end|>`)."""
  return _render(messages, add_generation_prompt, default_system)[0]


def render_messages(tok: Tokenizer, messages: Sequence[Mapping], image_tokens: Sequence[int] = (),
                    video_tokens: Sequence[int] = (), add_generation_prompt: bool = True,
                    default_system: bool = True) -> RenderedIds:
  """Renders `messages` with Qwen2-VL's chat template and expands the vision pads, straight to ids.

  Equals `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)` + pad expansion (string
  content with `<image>` is taken as the list content with an image item there). `default_system=False`
  drops the system turn that the template inserts when the first message is not `system`.
  """
  text, spans = _render(messages, add_generation_prompt, default_system)
  ids, offsets = tok.encode_with_offsets(text)
  mask, owner, k = [], [], 0
  for a, b in offsets:  # a token belongs to the message whose block holds its first character
    while k < len(spans) and a >= spans[k][3]:
      k += 1
    inside = k < len(spans) and a >= spans[k][0]
    owner.append(k if inside else -1)
    mask.append(int(inside and b > spans[k][1] and a < spans[k][2]))
  ids, (mask, owner), slots = _expand(tok, ids, image_tokens, video_tokens, 0, mask, owner)
  for s in slots:  # vision pads are inputs, never targets
    mask[s.start:s.start + s.length] = [0] * s.length
  return RenderedIds(ids, mask, owner, slots)


class Transcript:
  """Token ids of a growing conversation: append-only, with a mask that is 1 exactly on generated tokens.

  `ids`, `mask` (1 on model-generated tokens and the `<|im_end|>` that `close_turn` adds, 0 on the prompt
  and on host text) and `slots` (the image/video pads, in order) grow together; `prompt_len` is the length
  of the rendered prompt. Appending never re-tokenises anything already there.
  """

  def __init__(self, tok: Tokenizer, ids: Sequence[int] = (), slots: Sequence[ImageSlot] = ()):
    self.tok = tok
    self.ids: list[int] = [int(i) for i in ids]
    self.mask: list[int] = [0] * len(self.ids)
    self.slots: list[ImageSlot] = list(slots)
    self.prompt_len = len(self.ids)
    self.turn_start = len(self.ids)  # where the current assistant turn's generated tokens begin

  @classmethod
  def from_messages(cls, tok: Tokenizer, messages: Sequence[Mapping], image_tokens: Sequence[int] = (),
                    video_tokens: Sequence[int] = (), default_system: bool = True) -> Transcript:
    """A transcript whose prompt is `render_messages(..., add_generation_prompt=True)` (mask 0)."""
    r = render_messages(tok, messages, image_tokens, video_tokens, add_generation_prompt=True,
                        default_system=default_system)
    return cls(tok, r.ids, r.slots)

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def n_images(self) -> int:
    return sum(s.kind == "image" for s in self.slots)

  @property
  def turn_ids(self) -> list[int]:
    """The ids generated (plus a closing `<|im_end|>`) since the last host text."""
    return self.ids[self.turn_start:]

  def turn_text(self, skip_special_tokens: bool = True) -> str:
    """The current assistant turn decoded, as the original parses it (special tokens skipped)."""
    return self.tok.decode(self.turn_ids, skip_special_tokens=skip_special_tokens)

  def append_generated(self, ids: Sequence[int]) -> None:
    """Appends model tokens as they are (mask 1). They must be tokenizer ids and hold no vision pads: a
    sampler restricts its logits to `[0, tok.vocab_size)` minus `<|image_pad|>`/`<|video_pad|>`."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.tok.vocab_size or i in (self.tok.image_pad, self.tok.video_pad)]
    if bad:
      raise ValueError(f"generated ids {bad[:8]} are outside the tokenizer's {self.tok.vocab_size} ids or are "
                       "vision pads; mask them out of the sampler's logits")
    self.ids.extend(ids)
    self.mask.extend([1] * len(ids))

  def close_turn(self) -> bool:
    """Appends `<|im_end|>` (mask 1, as in the original) unless the current turn ends with one (the original
    checks "has one": the same, as generation stops at `<|im_end|>`); True if it appended."""
    if self.turn_ids[-1:] == [self.tok.im_end]:
      return False
    self.ids.append(self.tok.im_end)
    self.mask.append(1)
    return True

  def append_text(self, text: str, image_tokens: Sequence[int] = (), video_tokens: Sequence[int] = ()) -> None:
    """Appends host text (mask 0), tokenised on its own: special tokens written in it map to their ids, and
    each `<image>` (or `<|image_pad|>`) becomes an image of `image_tokens[k]` pads. The next generated
    tokens start a new assistant turn."""
    ids = self.tok.encode(text.replace(IMAGE_PLACEHOLDER, IMAGE_BLOCK))
    ids, _, slots = _expand(self.tok, ids, image_tokens, video_tokens, len(self.ids))
    self.ids.extend(ids)
    self.mask.extend([0] * len(ids))
    self.slots.extend(slots)
    self.turn_start = len(self.ids)

  def append_observation(self, text: str, image_tokens: Sequence[int] = ()) -> None:
    """The original's tool-observation turn: `close_turn()`, then
    `<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n` via `append_text`. `text` is everything
    inside the user turn (e.g. `<tool_response>\\n...\\n</tool_response>\\ncontinue your reasoning ...`)."""
    self.close_turn()
    self.append_text(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", image_tokens)
