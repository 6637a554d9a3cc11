"""The jitted sampler: filters, stops, per-sequence done flags, extend at M-RoPE positions, and logprobs
that equal a teacher-forced forward over the finished multi-turn sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_oracle as O
import tolerances as tol
import zoomer_jax
from zoomer_jax import sampling as S
from zoomer_jax.model.mrope import rope_index

VOCAB_BYTES = [f"<{i}>".encode() for i in range(O.VOCAB)]  # a made-up detokenisation of the tiny vocab


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = O.save_hf(O.make_hf_model(O.tiny_hf_config(heads=4, kv_heads=2), seed=5), str(tmp_path_factory.mktemp("s")))
  return zoomer_jax.load_hf(path)


def _left_pad(rows):
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), 2, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r):] = r
    mask[i, length - len(r):] = 1
  return ids, mask


def _right_pad(rows):
  length = max(max(len(r) for r in rows), 1)
  ids = np.full((len(rows), length), 2, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return ids, mask


def _image_run(grid):
  return [O.VSTART] + [O.IMAGE] * (int(np.prod(grid)) // 4) + [O.VEND]


def _teacher_forced_logprobs(model, ids, pixels, grids):
  """log p(ids[i] | ids[:i]) for one unpadded sequence, positions from the whole sequence."""
  ids = np.asarray(ids)[None]
  kw = {}
  if grids:
    kw = dict(pixel_values=np.concatenate(pixels), image_grid_thw=np.asarray(grids))
  logits = np.asarray(model(ids, **kw), np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  return logp[np.arange(ids.shape[1] - 1), ids[0, 1:]]


# ---------------------------------------------------------------------------------------------- filters
def test_greedy_top_k_and_top_p(rng):
  logits = jnp.asarray(rng.standard_normal((4, 50)) * 3, jnp.float32)
  key = jax.random.key(0)
  greedy, lp = S.sample(logits, key, S.SamplingParams(temperature=0.0))
  np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
  np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[np.arange(4), greedy], atol=1e-6)
  assert np.array_equal(S.sample(logits, key, S.SamplingParams(top_k=1))[0], greedy)
  assert np.array_equal(S.sample(logits, key, S.SamplingParams(top_p=1e-6))[0], greedy)

  keys = jax.random.split(jax.random.key(1), 400)
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  got = np.asarray(jax.vmap(lambda k: S.sample(logits, k, S.SamplingParams(temperature=2.0, top_k=3))[0])(keys))
  assert all(set(got[:, r]) <= set(top3[r]) for r in range(4))
  assert all(len(set(got[:, r])) == 3 for r in range(4))  # temperature 2 visits all three
  probs = np.asarray(jax.nn.softmax(logits))
  order = np.argsort(-probs, -1)
  got = np.asarray(jax.vmap(lambda k: S.sample(logits, k, S.SamplingParams(top_p=0.7))[0])(keys))
  for r in range(4):  # the nucleus: the smallest prefix of the sorted tokens with mass >= 0.7
    cum = np.cumsum(probs[r, order[r]])
    nucleus = set(order[r, :int(np.searchsorted(cum, 0.7)) + 1])
    assert set(got[:, r]) <= nucleus and (len(set(got[:, r])) > 1 or len(nucleus) == 1)


def test_temperature_sampling_follows_the_distribution(rng):
  logits = jnp.asarray(rng.standard_normal((1, 6)), jnp.float32)
  keys = jax.random.split(jax.random.key(2), 20000)
  got = np.asarray(jax.vmap(lambda k: S.sample(logits, k, S.SamplingParams(temperature=0.7))[0])(keys))[:, 0]
  freq = np.bincount(got, minlength=6) / len(got)
  want = np.asarray(jax.nn.softmax(logits / 0.7))[0]
  assert np.abs(freq - want).max() < 0.02, (freq, want)  # ~5 standard errors at n=20000


def test_stop_criteria_reject_bad_strings():
  with pytest.raises(ValueError, match="token bytes"):
    S.StopCriteria.build(stop_strings=["</video_zoom>"])
  with pytest.raises(ValueError, match="1..8 bytes"):
    S.StopCriteria.build(stop_strings=["</video_zoom>"], vocab_bytes=VOCAB_BYTES, window=8)


# ---------------------------------------------------------------------------------------------- decode
def _prompts(rng):
  """Two prompts of different lengths, each with an image."""
  rows, pixels, grids = [], [], []
  for n_text, grid in ((5, (1, 4, 6)), (9, (1, 4, 4))):
    rows.append(list(rng.integers(3, O.TEXT_MAX, n_text)) + _image_run(grid) + list(rng.integers(3, O.TEXT_MAX, 3)))
    grids.append(grid)
    pixels.append(rng.standard_normal((int(np.prod(grid)), 1176)).astype(np.float32))
  return rows, pixels, grids


@pytest.fixture(params=["model", "decode_weights"])
def decoder(request, model):
  """What `decode` is handed: the model itself, or its sampler-layout copy (`S.decode_weights`, outputs-first
  kernels on CPU in fp32) - prefill, extend and the teacher-forced forward always take the model."""
  if request.param == "model":
    return model
  view = S.decode_weights(model)
  assert view is not model and view.model.layers[0].mlp.up_proj.kernel_outputs_first
  assert not model.model.layers[0].mlp.up_proj.kernel_outputs_first  # the model keeps its layout
  return view


def test_greedy_decode_matches_teacher_forcing_and_stops(model, decoder, rng, measure):
  rows, pixels, grids = _prompts(rng)
  ids, mask = _left_pad(rows)
  vision = dict(pixel_values=np.concatenate(pixels), image_grid_thw=np.asarray(grids))
  logits, cache, pos = S.prefill(model, ids, mask, cache_size=128, **vision)
  params = S.SamplingParams(temperature=0.0, max_new_tokens=12)
  free = S.decode(decoder, cache, logits, pos, np.ones(2, bool), jax.random.key(0), S.StopCriteria.build(), params)
  assert np.array_equal(free.num_tokens, [12, 12]) and np.array_equal(free.stop_reason, [S.STOP_LENGTH] * 2)
  worst = 0.0
  for b in range(2):
    seq = rows[b] + list(np.asarray(free.tokens[b]))
    want = _teacher_forced_logprobs(model, seq, [pixels[b]], [grids[b]])[-12:]
    worst = max(worst, float(np.abs(want - np.asarray(free.logprobs[b])).max()))
    # greedy: each token is the argmax of the teacher-forced distribution, so its logprob is the max
  measure("greedy_logprob_vs_teacher_forced", worst)
  assert worst <= tol.LOGPROB_FP32

  # Row 0 stops on a token id at step 3, row 1 on a stop string spanning steps 5 and 6.
  t0, t1 = np.asarray(free.tokens[0]), np.asarray(free.tokens[1])
  stop_id = int(t0[3])
  assert stop_id not in t0[:3]
  string = (VOCAB_BYTES[t1[5]][-2:] + VOCAB_BYTES[t1[6]][:2]).decode()
  text_before = b"".join(VOCAB_BYTES[t] for t in t1[:6]).decode()
  # the seeded draw must make both stops unambiguous, or the checks below would prove nothing
  assert stop_id not in t1[:7] and string not in text_before
  stop = S.StopCriteria.build([stop_id], [string], VOCAB_BYTES, window=16)
  out = S.decode(decoder, cache, logits, pos, np.ones(2, bool), jax.random.key(0), stop, params)
  assert np.asarray(out.num_tokens).tolist() == [4, 7]
  assert np.asarray(out.stop_reason).tolist() == [S.STOP_TOKEN, S.STOP_STRING]
  assert np.array_equal(out.tokens[0, :4], t0[:4]) and (np.asarray(out.tokens[0, 4:]) == -1).all()
  assert np.array_equal(out.tokens[1, :7], t1[:7])
  assert np.asarray(out.next_position - pos).tolist() == [4, 7]
  # The same turn split over two calls: the stop string straddles them and is still found.
  six = S.SamplingParams(temperature=0.0, max_new_tokens=6)
  part = S.decode(decoder, cache, logits, pos, np.array([False, True]), jax.random.key(0), stop, six)
  assert int(part.stop_reason[1]) == S.STOP_LENGTH
  rest = S.decode(decoder, part.cache, part.last_logits, part.next_position, np.array([False, True]),
                  jax.random.key(0), stop, six, window=part.window)
  assert int(rest.num_tokens[1]) == 1 and int(rest.stop_reason[1]) == S.STOP_STRING
  assert int(rest.tokens[1, 0]) == int(t1[6])
  # Suppressed ids are never drawn, even when they are the argmax; their log-prob is still reported.
  banned = S.StopCriteria.build(suppress_ids=[int(t0[0]), int(t1[0])])
  alt = S.decode(decoder, cache, logits, pos, np.ones(2, bool), jax.random.key(0), banned,
                 S.SamplingParams(temperature=0.0, max_new_tokens=1))
  assert int(alt.tokens[0, 0]) not in (t0[0], t1[0]) and int(alt.tokens[1, 0]) not in (t0[0], t1[0])
  # A sequence that is not live generates nothing and leaves its cache rows invalid.
  idle = S.decode(decoder, cache, logits, pos, np.array([False, True]), jax.random.key(0), stop, params)
  assert int(idle.num_tokens[0]) == 0 and int(idle.stop_reason[0]) == S.STOP_NONE
  assert not np.asarray(idle.cache.valid[0, int(cache.length):]).any()


def test_sampled_multi_turn_logprobs_equal_one_teacher_forced_forward(model, decoder, rng, measure):
  """prefill -> sample -> extend with a tool observation holding new images -> sample, batch of 2 with
  different lengths; then one forward over each finished sequence with positions from the whole."""
  rows, pixels, grids = _prompts(rng)
  ids, mask = _left_pad(rows)
  vision = dict(pixel_values=np.concatenate(pixels), image_grid_thw=np.asarray(grids))
  logits, cache, pos = S.prefill(model, ids, mask, cache_size=160, **vision)
  params = S.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8)
  stop = S.StopCriteria.build([int(rng.integers(3, O.TEXT_MAX))])
  first = S.decode(decoder, cache, logits, pos, np.ones(2, bool), jax.random.key(7), stop, params)

  # The tool answers row 0 with two new frames and row 1 with one; row 1's chunk is shorter.
  new_grids = [[(1, 4, 4), (1, 6, 4)], [(1, 4, 6)]]
  chunks, new_pixels = [], []
  for b in range(2):
    chunk = list(rng.integers(3, O.TEXT_MAX, 4))
    for g in new_grids[b]:
      chunk += list(rng.integers(3, O.TEXT_MAX, 2)) + _image_run(g)
      new_pixels.append(rng.standard_normal((int(np.prod(g)), 1176)).astype(np.float32))
    chunks.append(chunk + list(rng.integers(3, O.TEXT_MAX, 3 + b)))
  cids, cmask = _right_pad(chunks)
  logits2, cache2, pos2 = S.extend(model, first.cache, cids, cmask, first.next_position, first.last_logits,
                                   pixel_values=np.concatenate(new_pixels),
                                   image_grid_thw=np.asarray(new_grids[0] + new_grids[1]))
  second = S.decode(decoder, cache2, logits2, pos2, np.ones(2, bool), jax.random.key(8), stop, params)

  worst, k = 0.0, 0
  for b in range(2):
    n1, n2 = int(first.num_tokens[b]), int(second.num_tokens[b])
    gen1, gen2 = list(np.asarray(first.tokens[b, :n1])), list(np.asarray(second.tokens[b, :n2]))
    seq = rows[b] + gen1 + chunks[b] + gen2
    px = [pixels[b]] + new_pixels[k:k + len(new_grids[b])]
    k += len(new_grids[b])
    lp = _teacher_forced_logprobs(model, seq, px, [grids[b]] + new_grids[b])
    got1, got2 = np.asarray(first.logprobs[b, :n1]), np.asarray(second.logprobs[b, :n2])
    want1 = lp[len(rows[b]) - 1:len(rows[b]) - 1 + n1]
    want2 = lp[len(seq) - 1 - n2:]
    worst = max(worst, float(np.abs(want1 - got1).max()), float(np.abs(want2 - got2).max()))
    # the resumed positions are those of the whole sequence
    full_pos, _ = rope_index(np.asarray(seq)[None], model.config,
                             image_grid_thw=np.asarray([grids[b]] + new_grids[b]))
    assert int(second.next_position[b]) == int(full_pos.max()) + 1
  measure("sampled_logprob_vs_teacher_forced", worst)
  assert worst <= tol.LOGPROB_FP32
