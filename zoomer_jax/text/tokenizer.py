"""`Tokenizer`: a Qwen2 `tokenizer.json` (HF `tokenizers` BPE) behind a small API, and the built-in tiny one.

`Tokenizer.from_dir(path)` loads a checkpoint's tokenizer. `build_tiny_tokenizer()` trains a byte-level BPE
on `tiny_corpus.txt` (deterministic, a few ms) with the Qwen2 normalizer (NFC), pre-tokenizer (the Qwen2
regex split + ByteLevel) and decoder, plus all 22 Qwen special tokens at ids 578-599, so that its
vocabulary is exactly the 600 ids of `configs/qwen25vl_tiny.py`. `save(dir)` writes `tokenizer.json` and a
`tokenizer_config.json` (with `CHAT_TEMPLATE`) that `transformers.AutoTokenizer` loads as a Qwen2 tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2's pre-tokenisation regex (transformers `tokenization_qwen2.PRETOKENIZE_REGEX`; digits split one by one).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The Qwen2 added tokens in hub order (Qwen2.5-VL's tokenizer_config.json), with their `special` flag: the tool-call and
# fill-in-the-middle tokens are added but not special, so `decode(skip_special_tokens=True)` keeps them.
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)

# Ids of the added tokens in the tiny tokenizer: the 578 BPE tokens take 0-577, these fill 578-599. The four
# vision ids are those of configs/qwen25vl_tiny.py (image 590, video 591, vision_start 592, vision_end 593).
TINY_VOCAB_SIZE = 600
TINY_SPECIAL_IDS = {
    "<|endoftext|>": 578, "<|im_start|>": 579, "<|im_end|>": 580, "<|object_ref_start|>": 581,
    "<|object_ref_end|>": 582, "<|box_start|>": 583, "<|box_end|>": 584, "<|quad_start|>": 585,
    "<|quad_end|>": 586, "<|vision_pad|>": 587, "<tool_call>": 588, "</tool_call>": 589, "<|image_pad|>": 590,
    "<|video_pad|>": 591, "<|vision_start|>": 592, "<|vision_end|>": 593, "<|fim_prefix|>": 594,
    "<|fim_middle|>": 595, "<|fim_suffix|>": 596, "<|fim_pad|>": 597, "<|repo_name|>": 598, "<|file_sep|>": 599,
}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL's chat format (its hub chat_template), written for this project. A default system turn when the
# first message is not `system`; `<|im_start|>{role}\n{content}<|im_end|>\n` per message; string content
# verbatim; list content concatenated without separators (image -> vision_start image_pad vision_end, video
# -> vision_start video_pad vision_end, text -> its text); `<|im_start|>assistant\n` as the generation prompt.
# `zoomer_jax.text.chat.render_messages` renders the same string in Python (tests check the two agree).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_CORPUS = os.path.join(os.path.dirname(__file__), "tiny_corpus.txt")


class Tokenizer:
  """A Qwen2-style tokenizer: text <-> ids, with special tokens written in text mapped to their ids."""

  def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None, source: str = "<memory>"):
    self.backend = backend
    self.config = dict(config or {})  # the tokenizer_config.json fields (chat_template, eos_token, ...)
    self.source = source
    self._ids: dict[str, int] = {}

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads `tokenizer.json` (and `tokenizer_config.json` if present) from a checkpoint directory."""
    path = os.fspath(path)
    file = path if path.endswith(".json") and not os.path.isdir(path) else os.path.join(path, "tokenizer.json")
    directory = os.path.dirname(file)
    slow = all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt"))
    if not os.path.isfile(file) and not slow:
      have = [f for f in ("vocab.json", "merges.txt") if os.path.isfile(os.path.join(directory, f))]
      raise FileNotFoundError(
          f"tokenizer file {file} does not exist" + (f" and {directory} has only {have}: add the missing one of "
                                                     "vocab.json / merges.txt" if have else "")
          + "; add the checkpoint's tokenizer.json (or its vocab.json + merges.txt)")
    config = {}
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
      try:
        with open(config_file, encoding="utf-8") as f:
          config = json.load(f)
      except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokenizer config {config_file}: {e}") from e
      if not isinstance(config, dict):
        raise ValueError(f"tokenizer config {config_file} is not a JSON object")
    jinja = os.path.join(directory, "chat_template.jinja")
    if "chat_template" not in config and os.path.isfile(jinja):
      with open(jinja, encoding="utf-8") as f:
        config["chat_template"] = f.read()
    if os.path.isfile(file):
      try:
        backend = tokenizers.Tokenizer.from_file(file)
      except Exception as e:  # tokenizers raises a bare Exception on bad JSON or an unknown format
        raise ValueError(f"cannot read tokenizer file {file}: {e}") from e
      return cls(backend, config, source=file)
    return cls(_from_vocab_merges(directory, config), config, source=os.path.join(directory, "vocab.json"))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; added tokens written in it (`<|im_start|>`, ...) become their single ids."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and each token's (start, end) character span in `text`."""
    enc = self.backend.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; with `skip_special_tokens`, tokens flagged special (not `<tool_call>` etc.) are dropped."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_id(self, name: str) -> int:
    """The id of one token, e.g. `token_id("<|im_end|>")`."""
    i = self._ids.get(name)
    if i is None:
      i = self.backend.token_to_id(name)
      if i is None:
        raise KeyError(f"token {name!r} is not in the vocabulary of tokenizer {self.source}")
      self._ids[name] = i
    return i

  def id_to_token(self, i: int) -> str | None:
    return self.backend.id_to_token(int(i))

  @functools.cached_property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included (151665 for Qwen2.5-VL, 600 for the tiny one).

    Counted once: the agent checks every generated token against it."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def chat_template(self) -> str | None:
    return self.config.get("chat_template")

  endoftext = property(lambda self: self.token_id("<|endoftext|>"))
  im_start = property(lambda self: self.token_id("<|im_start|>"))
  im_end = property(lambda self: self.token_id("<|im_end|>"))
  vision_start = property(lambda self: self.token_id("<|vision_start|>"))
  vision_end = property(lambda self: self.token_id("<|vision_end|>"))
  image_pad = property(lambda self: self.token_id("<|image_pad|>"))
  video_pad = property(lambda self: self.token_id("<|video_pad|>"))

  def vocab_bytes(self) -> list[bytes]:
    """Each id's text as bytes (byte-level tokens mapped back through GPT-2's byte<->unicode table;
    added tokens as their UTF-8 content). Used by the sampler to match stop strings on bytes."""
    if getattr(self, "_vocab_bytes", None) is None:
      unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
      added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
      out = []
      for i in range(self.vocab_size):
        if i in added:
          out.append(added[i].encode())
          continue
        piece = self.backend.id_to_token(i) or ""
        if all(c in unicode_to_byte for c in piece):
          out.append(bytes(unicode_to_byte[c] for c in piece))
        else:  # not a byte-level vocabulary: fall back to the decoded text
          out.append(self.backend.decode([i], skip_special_tokens=False).encode())
      self._vocab_bytes = out
    return self._vocab_bytes

  def save(self, path: str | os.PathLike) -> str:
    """Writes `tokenizer.json` and `tokenizer_config.json` into directory `path`; returns `path`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    self.backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(self.config, f, indent=2, ensure_ascii=False)
    return path

  def __repr__(self):
    return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """`Tokenizer.from_dir`: a checkpoint directory, or the path of a `tokenizer.json`."""
  return Tokenizer.from_dir(path)


def qwen2_tokenizer_config(eos_token: str = "<|im_end|>", model_max_length: int = 32768) -> dict:
  """A Qwen2.5-VL-Instruct-style `tokenizer_config.json` for the added tokens of `QWEN_ADDED_TOKENS`."""
  return {
      "tokenizer_class": "Qwen2Tokenizer",
      "add_prefix_space": False,
      "bos_token": None,
      "eos_token": eos_token,
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "additional_special_tokens": [t for t, special in QWEN_ADDED_TOKENS if special and t != "<|endoftext|>"],
      "clean_up_tokenization_spaces": False,
      "errors": "replace",
      "split_special_tokens": False,
      "model_max_length": model_max_length,
      "chat_template": CHAT_TEMPLATE,
  }


def _qwen2_pipeline(model) -> tokenizers.Tokenizer:
  """A byte-level BPE `model` behind Qwen2's normalizer (NFC), pre-tokenizer and decoder."""
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def _from_vocab_merges(directory: str, config: dict) -> tokenizers.Tokenizer:
  """A Qwen2 tokenizer from the slow files `vocab.json` + `merges.txt`, its added tokens from
  `tokenizer_config.json`'s `added_tokens_decoder` (as transformers' Qwen2Tokenizer builds it)."""
  vocab_file, merges_file = (os.path.join(directory, f) for f in ("vocab.json", "merges.txt"))
  try:
    model = models.BPE.from_file(vocab_file, merges_file, dropout=None, unk_token=None, fuse_unk=False,
                                 byte_fallback=False, continuing_subword_prefix="", end_of_word_suffix="")
  except Exception as e:  # tokenizers raises a bare Exception on a malformed file
    raise ValueError(f"cannot read {vocab_file} + {merges_file}: {e}") from e
  tok = _qwen2_pipeline(model)
  added = config.get("added_tokens_decoder") or {}
  if not isinstance(added, dict):
    raise ValueError(f"{directory}/tokenizer_config.json: added_tokens_decoder must map ids to tokens")
  for key in sorted(added, key=int):
    entry = added[key]
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
      raise ValueError(f"{directory}/tokenizer_config.json: added_tokens_decoder[{key!r}] has no content")
    special = bool(entry.get("special", False))
    token = AddedToken(entry["content"], special=special, normalized=bool(entry.get("normalized", False)),
                       lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                       single_word=bool(entry.get("single_word", False)))
    (tok.add_special_tokens if special else tok.add_tokens)([token])
    if tok.token_to_id(entry["content"]) != int(key):
      raise ValueError(f"{directory}/tokenizer_config.json: added token {entry['content']!r} should have id {key} "
                       f"but lands at {tok.token_to_id(entry['content'])} (vocab.json and the added tokens "
                       "disagree)")
  return tok


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(corpus: str) -> str:
  """Trains the tiny BPE on `corpus` and returns the tokenizer.json text (cached: a few ms the first time)."""
  tok = _qwen2_pipeline(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  n_bpe = min(TINY_SPECIAL_IDS.values())
  trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=1, show_progress=False, special_tokens=[],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus.splitlines(keepends=True), trainer)
  if tok.get_vocab_size() != n_bpe:
    raise ValueError(f"the tiny corpus yields {tok.get_vocab_size()} BPE tokens, need {n_bpe}: give it more text")
  for content, special in sorted(QWEN_ADDED_TOKENS, key=lambda t: TINY_SPECIAL_IDS[t[0]]):
    token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
    (tok.add_special_tokens if special else tok.add_tokens)([token])
    if tok.token_to_id(content) != TINY_SPECIAL_IDS[content]:
      raise AssertionError(f"{content} got id {tok.token_to_id(content)}, want {TINY_SPECIAL_IDS[content]}")
  spec = json.loads(tok.to_str())
  spec["decoder"] = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)  # as Qwen2's
  spec["model"].update(continuing_subword_prefix="", end_of_word_suffix="")
  return json.dumps(spec, ensure_ascii=False)


def build_tiny_tokenizer(corpus: str | None = None) -> Tokenizer:
  """The built-in tiny Qwen-style tokenizer (600 ids, specials at 578-599), trained on `tiny_corpus.txt`."""
  if corpus is None:
    with open(_CORPUS, encoding="utf-8") as f:
      corpus = f.read()
  backend = tokenizers.Tokenizer.from_str(_tiny_tokenizer_json(corpus))
  return Tokenizer(backend, qwen2_tokenizer_config(model_max_length=32768), source="<tiny>")


def build_sized_tokenizer(vocab_size: int = 151665) -> Tokenizer:
  """A Qwen2-shaped byte-level BPE of `vocab_size` ids (Qwen2.5-VL's 151,665 by default), built locally: the 256
  byte symbols, every pair of them, then triples, then Qwen's 22 added tokens last, at Qwen's ids when the size
  is the real one. For tests and benchmarks of what the real vocabulary's size costs (no download)."""
  regular = vocab_size - len(QWEN_ADDED_TOKENS)
  if not 256 <= regular <= 256 + 256**2 + 256**3:
    raise ValueError(f"vocab_size {vocab_size} must leave 256 to {256 + 256**2 + 256**3} regular ids beside the "
                     f"{len(QWEN_ADDED_TOKENS)} added tokens")
  symbols = [_bytes_to_unicode()[b] for b in range(256)]
  vocab = {c: i for i, c in enumerate(symbols)}
  merges = []

  def grow(prefixes):
    for a in prefixes:
      for c in symbols:
        if len(vocab) == regular:
          return
        vocab[a + c] = len(vocab)
        merges.append((a, c))
  grow(symbols)
  grow([t for t in vocab if len(t) == 2])
  tok = _qwen2_pipeline(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=""))
  for content, special in QWEN_ADDED_TOKENS:
    (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(content, special=special, normalized=False)])
  return Tokenizer(tok, qwen2_tokenizer_config(), source=f"<sized {vocab_size}>")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters (byte-level BPE)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
      list(range(ord("\xae"), ord("\xff") + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars
