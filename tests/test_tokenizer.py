"""The tokenizer against transformers' Qwen2Tokenizer loading the same files, and the tiny one against its config."""

import json
import re
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoomer_jax.config_loader import load
from zoomer_jax.text import TINY_SPECIAL_IDS, Tokenizer, build_tiny_tokenizer, load_tokenizer
from zoomer_jax.text import tokenizer as tokenizer_module
from zoomer_jax.text.tokenizer import QWEN_ADDED_TOKENS, _tiny_tokenizer_json

import transformers

SPECIALS = [t for t, _ in QWEN_ADDED_TOKENS]
WORDS = ["<think>", "</think>", "<answer>", "</answer>", "<video_zoom>", "</video_zoom>", '{"segment": [4.0, 6.0], ',
         '"fps": 2}', "<frame3_time12.50s>", "segment", " fps", " frame", " time", "A.", " (B)", "12.5", "1024",
         "\n", "\n\n", "  ", "\t", " ", "東京", "café", "😀", "Привет", "It's", "we'll", "<", "|>", "<|im_", "Ċ", "Ġ"]

fragments = st.one_of(st.sampled_from(SPECIALS), st.sampled_from(WORDS), st.text(max_size=12))
texts = st.lists(fragments, max_size=12).map("".join)


@pytest.fixture(scope="module")
def tiny():
  return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
  return tiny.save(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def hf(saved):
  return transformers.AutoTokenizer.from_pretrained(saved)


def test_transformers_loads_it_as_a_qwen2_tokenizer(hf, tiny):
  assert type(hf).__name__ == "Qwen2Tokenizer" and len(hf) == tiny.vocab_size == 600
  assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
  assert {t: hf.convert_tokens_to_ids(t) for t in SPECIALS} == TINY_SPECIAL_IDS
  specials = {t for t, special in QWEN_ADDED_TOKENS if special}
  assert {t for t in SPECIALS if hf.added_tokens_decoder[TINY_SPECIAL_IDS[t]].special} >= specials


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_encode_decode_match_transformers(tiny, hf, text):
  ids = tiny.encode(text)
  assert ids == hf.encode(text, add_special_tokens=False)
  for skip in (False, True):
    assert tiny.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_in_text_are_single_ids(tiny):
  for t in SPECIALS:
    assert tiny.encode(f"a{t}b") == tiny.encode("a") + [TINY_SPECIAL_IDS[t]] + tiny.encode("b")
  assert tiny.decode(tiny.encode("x<|im_end|>\n<tool_call>y"), skip_special_tokens=True) == "x\n<tool_call>y"
  assert tiny.decode(tiny.encode("東京 😀 12.50s {\"fps\": 2}")) == "東京 😀 12.50s {\"fps\": 2}"


def test_tiny_special_ids_equal_the_tiny_config(tiny):
  m = load("qwen25vl_tiny").model
  assert tiny.vocab_size <= m.text.vocab_size
  assert (tiny.image_pad, tiny.video_pad, tiny.vision_start, tiny.vision_end) == (
      m.image_token_id, m.video_token_id, m.vision_start_token_id, m.vision_end_token_id)
  assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (tiny.endoftext, tiny.im_end, tiny.endoftext)
  assert (tiny.im_start, tiny.im_end, tiny.endoftext) == (579, 580, 578)
  assert all(578 <= i < 600 for i in TINY_SPECIAL_IDS.values()) and len(set(TINY_SPECIAL_IDS.values())) == 22


def test_tiny_tokenizer_is_fast_and_deterministic_across_processes(tiny):
  _tiny_tokenizer_json.cache_clear()
  t0 = time.perf_counter()
  again = build_tiny_tokenizer()
  assert time.perf_counter() - t0 < 1.0
  ours = again.backend.to_str()
  assert ours == tiny.backend.to_str()
  code = ("import importlib.util as u, sys; s = u.spec_from_file_location('t', sys.argv[1]); m = u.module_from_spec(s);"
          " s.loader.exec_module(m); print(m.build_tiny_tokenizer().backend.to_str())")  # without importing jax
  other = subprocess.run([sys.executable, "-c", code, tokenizer_module.__file__], capture_output=True, text=True,
                         check=True).stdout
  assert json.loads(other) == json.loads(ours)
  merges = json.loads(ours)["model"]["merges"]
  assert len(merges) == 578 - 256  # all BPE ids 0-577 are used: no holes below the specials


def test_load_from_dir_round_trips(tiny, saved):
  loaded = load_tokenizer(saved)
  text = "<|im_start|>user\n<video_zoom>{\"segment\": [1, 2]}</video_zoom><|im_end|>"
  assert loaded.encode(text) == tiny.encode(text) and loaded.vocab_size == 600
  assert loaded.chat_template == tiny.chat_template and "tokenizer.json" in loaded.source
  assert Tokenizer.from_dir(f"{saved}/tokenizer.json").encode(text) == tiny.encode(text)


def test_missing_tokenizer_json_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/tokenizer.json does not exist")):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="nope"):
    load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "Nope"}}', ""])
def test_corrupt_tokenizer_json_names_the_path(tmp_path, content):
  (tmp_path / "tokenizer.json").write_text(content)
  with pytest.raises(ValueError, match=re.escape(f"cannot read tokenizer file {tmp_path}/tokenizer.json")):
    load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config_names_the_path(tiny, tmp_path):
  tiny.save(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("[1, 2")
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/tokenizer_config.json")):
    load_tokenizer(tmp_path)


def test_unknown_token_name_is_a_clear_error(tiny):
  with pytest.raises(KeyError, match=re.escape("'<|nope|>' is not in the vocabulary of tokenizer <tiny>")):
    tiny.token_id("<|nope|>")
