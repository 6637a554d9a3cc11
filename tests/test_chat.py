"""Chat rendering vs transformers' apply_chat_template + pad expansion; the token-in/token-out Transcript."""

import random

import pytest

from zoomer_jax.text import Transcript, build_tiny_tokenizer, render_messages, render_text

import transformers

PIECES = ["<think>", "</think>", "<answer>C</answer>", "<video_zoom>", "</video_zoom>", '{"segment": [35.0, 38.0], ',
          '"fps": 4}', "<frame0_time12.50s>", "The frames of the video clip are shown below:", " segment", " fps",
          " frame", " time", "A. a cup", " B. a book", "12.50", "1024", "\n", "\n\n", "  ", " ", "東京", "café",
          "😀", "Привет", "It's", "we'll", "<|im_end|>", "<tool_call>", "<|object_ref_start|>", "?", "!", "{}"]


def random_text(rng, n_max=8):
  out = []
  for _ in range(rng.randint(0, n_max)):
    if rng.random() < 0.8:
      out.append(rng.choice(PIECES))
    else:
      out.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FF), rng.randint(0x4E00, 0x4E80)]))
                         for _ in range(rng.randint(1, 4))))
  return "".join(out)


def random_content(rng, counts):
  """(our content, the same for transformers' template): a string with `<image>`s or a list of items."""
  if rng.random() < 0.5:  # string with <image> placeholders -> a list with image items for transformers
    texts = [random_text(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
    counts["image"] += [rng.randint(1, 6) for _ in texts[1:]]
    hf = [{"type": "text", "text": texts[0]}]
    for t in texts[1:]:
      hf += [{"type": "image"}, {"type": "text", "text": t}]
    return "<image>".join(texts), (hf if len(texts) > 1 else texts[0])
  items = []
  for _ in range(rng.randint(0, 4)):
    kind = rng.choice(["text", "text", "image", "video"])
    if kind == "text":
      items.append({"type": "text", "text": random_text(rng)})
    else:
      counts[kind].append(rng.randint(1, 6))
      items.append({"type": kind})
  return items, items


def random_conversation(rng):
  ours, hf, counts = [], [], {"image": [], "video": []}
  roles = (["system"] if rng.random() < 0.5 else []) + ["user", "assistant"] * rng.randint(1, 3)
  roles = roles[:len(roles) - rng.randint(0, 1)]  # end on a user or an assistant turn
  for role in roles:
    a, b = random_content(rng, counts)
    ours.append({"role": role, "content": a})
    hf.append({"role": role, "content": b})
  return ours, hf, counts


def expand(ids, tok, counts):
  """The processor's expansion of each single image/video pad into its count."""
  it = {tok.image_pad: iter(counts["image"]), tok.video_pad: iter(counts["video"])}
  out = []
  for t in ids:
    out += [t] * (next(it[t]) if t in it else 1)
  assert all(next(i, None) is None for i in it.values())
  return out


@pytest.fixture(scope="module")
def tok():
  return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
  return transformers.AutoTokenizer.from_pretrained(tok.save(tmp_path_factory.mktemp("tiny_tokenizer")))


@pytest.mark.parametrize("seed", range(60))
def test_render_equals_transformers_chat_template(tok, hf, seed):
  rng = random.Random(seed)
  ours, hf_messages, counts = random_conversation(rng)
  gen = bool(seed % 2)
  text = hf.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=gen)
  assert render_text(ours, add_generation_prompt=gen) == text
  want = hf.apply_chat_template(hf_messages, tokenize=True, add_generation_prompt=gen)["input_ids"]
  got = render_messages(tok, ours, counts["image"], counts["video"], add_generation_prompt=gen)
  assert got.ids == expand(want, tok, counts)
  assert len(got.mask) == len(got.message_index) == len(got.ids)
  assert (got.n_images, got.n_videos) == (len(counts["image"]), len(counts["video"]))
  for s, n in zip([s for s in got.slots if s.kind == "image"], counts["image"]):
    assert s.length == n and got.ids[s.start:s.start + n] == [tok.image_pad] * n
  for i, (m, k) in enumerate(zip(got.mask, got.message_index)):
    assert k == -1 or ours[k]["role"] == "assistant" or m == 0
    assert not m or got.ids[i] not in (tok.image_pad, tok.video_pad)
  owners = [k for k in got.message_index if k >= 0]
  assert owners == sorted(owners) and set(owners) == set(range(len(ours)))


def test_default_system_and_mask_of_a_known_conversation(tok):
  messages = [{"role": "user", "content": "Q?<image>"}, {"role": "assistant", "content": "<think>x</think> A"},
              {"role": "user", "content": "more"}]
  r = render_messages(tok, messages, [3], add_generation_prompt=True)
  assert r.ids[:4] == [tok.im_start] + tok.encode("system\nYou are a helpful assistant.")[:3]
  loss = [t for t, m in zip(r.ids, r.mask) if m]
  assert tok.decode(loss) == "<think>x</think> A<|im_end|>"
  assert r.ids[-3:] == [tok.im_start] + tok.encode("assistant\n") and r.message_index[-3:] == [-1] * 3
  no_system = render_messages(tok, messages, [3], default_system=False)
  assert no_system.ids[0] == tok.im_start and tok.decode(no_system.ids[1:3]) == "user\n"
  system = tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
  assert r.ids[:len(system)] == system and r.ids[len(system):] == no_system.ids


@pytest.mark.parametrize("counts,err", [([], "holds 1 images but 0"), ([2, 2], "2 image token counts were given"),
                                        ([0], "at least 1")])
def test_image_count_mismatch_is_a_clear_error(tok, counts, err):
  with pytest.raises(ValueError, match=err):
    render_messages(tok, [{"role": "user", "content": "<image> what?"}], counts)


def test_bad_messages_are_clear_errors(tok):
  with pytest.raises(ValueError, match="message 1 must be a dict with 'role' and 'content'"):
    render_messages(tok, [{"role": "user", "content": "a"}, {"content": "b"}])
  with pytest.raises(ValueError, match="message 0 item 1: content item .* is neither text, image nor video"):
    render_messages(tok, [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}])
  with pytest.raises(TypeError, match="messages must be a list"):
    render_messages(tok, {"role": "user", "content": "a"})


def observation(rng, n_frames):
  frames = "".join(f"<frame{i}_time{rng.uniform(0, 300):.2f}s><image>" for i in range(n_frames))
  return (f"<tool_response>\nThe frames of the video clip are shown below:\n{frames}\n</tool_response>\n"
          "continue your reasoning process inside <think> and </think> and then write your final answer inside "
          "<answer> and </answer>")


@pytest.mark.parametrize("seed", range(5))
def test_transcript_is_token_in_token_out(tok, seed):
  rng = random.Random(seed)
  prompt = [{"role": "system", "content": "Zoom when needed."},
            {"role": "user", "content": "<frame0_time0.00s><image><frame1_time9.00s><image>What happens? A. B."}]
  tr = Transcript.from_messages(tok, prompt, image_tokens=[4, 6])
  assert tr.ids == render_messages(tok, prompt, [4, 6]).ids and tr.mask == [0] * len(tr) == [0] * tr.prompt_len
  messages, generated, n_pads = list(prompt), [0] * len(tr), [4, 6]
  for turn in range(rng.randint(1, 4)):
    before_ids, before_mask = list(tr.ids), list(tr.mask)
    text = f"<think>{random_text(rng)}</think><video_zoom>{{\"segment\": [{turn}.0, 9.5], \"fps\": 2}}</video_zoom>"
    ids = tok.encode(text) + ([tok.im_end] if rng.random() < 0.3 else [])
    tr.append_generated(ids)
    assert tr.turn_text() == tok.decode(ids, skip_special_tokens=True)
    closed = tr.close_turn()
    assert closed == (ids[-1] != tok.im_end) and tr.ids[-1] == tok.im_end and not tr.close_turn()
    generated += [1] * (len(ids) + closed)
    frames = [rng.randint(1, 5) for _ in range(rng.randint(0, 4))]
    end_of_turn = len(tr)
    tr.append_observation(observation(rng, len(frames)), image_tokens=frames)
    assert tr.ids[end_of_turn - 1:end_of_turn + 3] == [tok.im_end, tok.im_start] + tok.encode("user\n")
    assert tr.ids[-3:] == [tok.im_start] + tok.encode("assistant\n") and tr.turn_ids == []
    generated += [0] * (len(tr) - end_of_turn)
    assert tr.ids[:len(before_ids)] == before_ids and tr.mask[:len(before_mask)] == before_mask  # append-only
    assert tr.mask == generated
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": observation(rng, 0)}]
    n_pads += frames
  assert [s.length for s in tr.slots] == n_pads and tr.n_images == len(n_pads)
  assert sum(t == tok.image_pad for t in tr.ids) == sum(n_pads)
  assert all(tr.ids[s.start:s.start + s.length] == [tok.image_pad] * s.length for s in tr.slots)


def test_transcript_matches_the_template_without_newline_after_assistant_turns(tok):
  """The original's stream = the chat template with no `\\n` after the assistant's `<|im_end|>`."""
  prompt = [{"role": "user", "content": "Q<image>"}]
  turns = ['<think>look</think><video_zoom>{"segment": [1, 2], "fps": 2}</video_zoom>', "<answer>B</answer>"]
  obs = "<tool_response>\n<frame0_time1.00s><image><frame1_time2.00s><image>\n</tool_response>"
  tr = Transcript.from_messages(tok, prompt, image_tokens=[3])
  tr.append_generated(tok.encode(turns[0]))
  tr.append_observation(obs, image_tokens=[2, 2])
  tr.append_generated(tok.encode(turns[1]) + [tok.im_end])
  messages = prompt + [{"role": "assistant", "content": turns[0]}, {"role": "user", "content": obs},
                       {"role": "assistant", "content": turns[1]}]
  text = render_text(messages, add_generation_prompt=False)
  assert text.count("<|im_end|>\n<|im_start|>user") == 2 and text.endswith("<|im_end|>\n")
  text = text.replace(f"{turns[0]}<|im_end|>\n", f"{turns[0]}<|im_end|>")[:-1]
  assert tr.ids == expand(tok.encode(text), tok, {"image": [3, 2, 2], "video": []})
  r = render_messages(tok, messages, [3, 2, 2], add_generation_prompt=False)
  assert len(r.ids) - len(tr) == 2 and sum(tr.mask) == sum(r.mask)  # SFT mask = RL mask on the same turns


def test_append_generated_rejects_pads_and_ids_outside_the_vocabulary(tok):
  tr = Transcript.from_messages(tok, [{"role": "user", "content": "hi"}])
  before = list(tr.ids)
  for bad in ([tok.image_pad], [5, tok.video_pad], [600], [-1]):
    with pytest.raises(ValueError, match="mask them out of the sampler's logits"):
      tr.append_generated(bad)
  assert tr.ids == before and tr.mask == [0] * len(before)
