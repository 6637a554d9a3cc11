"""The training step's pieces: SFT layout, batches, log-probs at batch positions, accumulation, freezing."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import LOGPROB_FP32

from zoomer_jax.config_loader import load
from zoomer_jax.text import build_tiny_tokenizer
from zoomer_jax.text.chat import IMAGE_BLOCK, render_text
from zoomer_jax.train.batch import Example, make_batch
from zoomer_jax.train.forward import sequence_logprobs
from zoomer_jax.train.optim import make_schedule
from zoomer_jax.train.sft import encode_conversation, sft_loss
from zoomer_jax.train.trainer import Engine

SMALL = ["--config.model.text.num_hidden_layers=1", "--config.model.vision.depth=2",
         "--config.model.vision.fullatt_block_indexes=(1,)"]
PIX = dict(max_pixels=56 * 56, min_pixels=28 * 28)


@pytest.fixture(scope="module")
def tok():
  return build_tiny_tokenizer()


def conversation(rng, n_overview=2):
  imgs = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(n_overview + 1)]
  user = "Frames: " + " ".join("<image>" for _ in range(n_overview)) + "\nWhich colour?"
  call = '<think>look at 2s</think><video_zoom>{"segment": [1, 3], "fps": 1}</video_zoom>'
  obs = "<tool_response>\nThe frames:\n<frame0_time2.0s><image>\n</tool_response>\ncontinue"
  final = f"<think>it is red {rng.integers(100)}</think><answer>B</answer>"
  msgs = [{"role": "system", "content": "Answer with a letter."}, {"role": "user", "content": user},
          {"role": "assistant", "content": call}, {"role": "user", "content": obs},
          {"role": "assistant", "content": final}]
  return msgs, imgs


def test_sft_layout_is_the_rollout_layout(tok, rng):
  msgs, imgs = conversation(rng)
  ex = encode_conversation(tok, msgs, imgs, **PIX)
  n_pad = [int(g.prod()) // 4 for g in ex.image_grid_thw]
  # Written out by hand: the template for the prompt, then the agent's turn rule (docs/protocol.md): the model's
  # turn closed by <|im_end|> with no newline, the observation as a user turn, the next assistant turn.
  text = (render_text(msgs[:2]) + msgs[2]["content"] + "<|im_end|>" + "<|im_start|>user\n" + msgs[3]["content"]
          + "<|im_end|>\n<|im_start|>assistant\n" + msgs[4]["content"] + "<|im_end|>")
  text = text.replace("<image>", IMAGE_BLOCK)
  pads = iter(n_pad)
  want = tok.decode(tok.encode(text))
  got = tok.decode([int(i) for i in ex.ids])
  want_expanded = want.replace("<|image_pad|>", "\0")
  want_expanded = "".join("<|image_pad|>" * next(pads) if c == "\0" else c for c in want_expanded)
  assert got == want_expanded
  # Loss tokens: exactly each assistant message and the <|im_end|> closing it.
  masked = tok.decode([int(i) for i, m in zip(ex.ids, ex.loss_mask) if m])
  assert masked == msgs[2]["content"] + "<|im_end|>" + msgs[4]["content"] + "<|im_end|>"
  assert ex.n_images == 3


def test_sft_layout_errors(tok, rng):
  msgs, imgs = conversation(rng)
  with pytest.raises(ValueError, match="3 <image> placeholders but 2 images"):
    encode_conversation(tok, msgs, imgs[:2], **PIX)
  with pytest.raises(ValueError, match="at least one assistant"):
    encode_conversation(tok, msgs[:2], imgs[:2], **PIX)


@pytest.fixture(scope="module")
def engine_factory(tmp_path_factory):
  def make(loss, *, freeze_vision=False, optim=None, **overrides):
    extra = [f"--config.{k}={v}" for k, v in overrides.items()]
    cfg = load("sft_tiny", SMALL + extra + [f"--config.workdir={tmp_path_factory.mktemp('run')}"])
    optim = dict(cfg.optim if optim is None else optim)
    return Engine(cfg, loss, total_steps=10, optim=optim, freeze_vision=freeze_vision, save_freq=1, max_to_keep=2)
  return make


def _examples(tok, rng, n):
  out = []
  for k in range(n):
    msgs, imgs = conversation(rng, n_overview=1 + k % 2)
    out.append(encode_conversation(tok, msgs, imgs, **PIX))
  return out


def _reference_logprobs(model, ex: Example) -> np.ndarray:
  """log p(ids[t] | ids[:t]) from one unpadded forward of the model's own HF-style call."""
  logits = np.asarray(model(ex.ids[None], pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw))[0]
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return np.concatenate([[0.0], logp[np.arange(len(ex.ids) - 1), ex.ids[1:]]])


@pytest.mark.parametrize("vocab_chunk,token_chunk", [(None, None), (96, None), (96, 100)])
def test_batch_logprobs_equal_unpadded_forward(tok, rng, engine_factory, vocab_chunk, token_chunk, measure):
  eng = engine_factory(partial(sft_loss))
  model = eng.model()
  examples = _examples(tok, rng, 2)
  batch = make_batch(eng.model_config, examples, rows=3, token_bucket=64, image_bucket=8, pad_id=tok.endoftext)
  assert batch.ids.shape[1] % 64 == 0 and batch.token_mask[2].sum() == 0  # bucketed, one empty row
  logp, ent = jax.jit(lambda b: sequence_logprobs(model, b, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                                                  remat="full"))(eng.put(batch))
  worst = 0.0
  for i, ex in enumerate(examples):
    want = _reference_logprobs(model, ex)
    worst = max(worst, np.abs(np.asarray(logp[i, :len(ex.ids)]) - want).max())
  measure("max_abs_logprob_diff", worst)
  assert worst <= LOGPROB_FP32
  assert np.isfinite(np.asarray(logp)).all() and np.all(np.asarray(ent) >= -1e-6)  # padding: finite, masked


def test_sft_loss_is_mean_nll_of_assistant_tokens(tok, rng, engine_factory):
  eng = engine_factory(partial(sft_loss))
  model = eng.model()
  examples = _examples(tok, rng, 2)
  batch = make_batch(eng.model_config, examples, token_bucket=32, pad_id=tok.endoftext)
  total, denom, _ = jax.jit(lambda b: sft_loss(model, b, vocab_chunk=64))(eng.put(batch))
  want = [-(_reference_logprobs(model, e) * e.loss_mask).sum() for e in examples]
  assert float(denom) == sum(e.loss_mask.sum() for e in examples)
  np.testing.assert_allclose(float(total), sum(want), rtol=1e-5)


def _params(eng):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(eng.state.params)[0]}


def _grads(eng):
  """The accumulated gradient divided by the accumulated denominator: what `apply` hands to the optimizer."""
  d = eng._sums["denom"]
  return {jax.tree_util.keystr(p): np.asarray(g) / d for p, g in jax.tree_util.tree_flatten_with_path(eng._acc)[0]}


def test_gradient_accumulation_is_exact(tok, rng, engine_factory):
  """One micro-batch of two sequences == two micro-batches of one (token-mean over the whole batch)."""
  examples = _examples(tok, rng, 2)
  loss = partial(sft_loss, vocab_chunk=64)
  whole, split = engine_factory(loss), engine_factory(loss)
  cfg = whole.model_config
  whole.accumulate(make_batch(cfg, examples, token_bucket=64, image_bucket=8, pad_id=tok.endoftext))
  for e in examples:
    split.accumulate(make_batch(cfg, [e], token_bucket=64, image_bucket=8, pad_id=tok.endoftext))
  ga, gb = _grads(whole), _grads(split)
  assert whole._sums["denom"] == split._sums["denom"] == sum(e.loss_mask.sum() for e in examples)
  scale = max(np.abs(g).max() for g in ga.values())
  for k in ga:
    np.testing.assert_allclose(ga[k], gb[k], atol=1e-5 * scale, err_msg=k)
  assert sum(np.abs(g).max() > 0 for g in ga.values()) > 10
  a, b = whole.apply(), split.apply()
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
  np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("freeze", [True, "blocks"])
def test_frozen_vision_tower_does_not_move(tok, rng, engine_factory, freeze):
  """True: no vision parameter moves; "blocks": only the patch merger's do (and all of them get a gradient)."""
  eng = engine_factory(partial(sft_loss, vocab_chunk=64, freeze_vision=freeze), freeze_vision=freeze)
  before = _params(eng)
  eng.accumulate(make_batch(eng.model_config, _examples(tok, rng, 2), token_bucket=64, image_bucket=8,
                            pad_id=tok.endoftext))
  eng.apply()  # warmup: lr 0 on the first step (transformers' schedule)
  eng.accumulate(make_batch(eng.model_config, _examples(tok, rng, 2), token_bucket=64, image_bucket=8,
                            pad_id=tok.endoftext))
  eng.apply()
  after = _params(eng)
  merger = [k for k in before if "visual" in k and "merger" in k] if freeze == "blocks" else []
  vision = [k for k in before if "visual" in k and k not in merger]
  text = [k for k in before if "visual" not in k]
  assert vision and all(np.array_equal(before[k], after[k]) for k in vision)
  assert sum(not np.array_equal(before[k], after[k]) for k in text) >= len(text) - 1
  assert all(not np.array_equal(before[k], after[k]) for k in merger)
  assert len(merger) == (5 if freeze == "blocks" else 0)  # ln_q weight, fc1 and fc2 kernels and biases


def test_freeze_vision_values_are_checked():
  from zoomer_jax.train.optim import check_freeze_vision
  for ok in (False, True, "blocks"):
    check_freeze_vision(ok)
  with pytest.raises(ValueError, match="freeze_vision_tower must be one of"):
    check_freeze_vision("merger")


def test_schedule_matches_transformers_cosine_with_warmup():
  sched = make_schedule(dict(lr=1.0, lr_scheduler="cosine", warmup_ratio=0.1), total_steps=100)
  # transformers.get_cosine_schedule_with_warmup(warmup=10, total=100): s/10 below 10, then
  # 0.5 * (1 + cos(pi * (s - 10) / 90)).
  for s, want in [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0)]:
    assert float(sched(s)) == pytest.approx(want, abs=1e-6), s
  with pytest.raises(ValueError, match="lr_scheduler"):
    make_schedule(dict(lr=1.0, lr_scheduler="linearish"), 10)


def test_bf16_compute_keeps_fp32_master_weights(tok, rng, engine_factory):
  """init.dtype=bfloat16 computes in bf16 but updates fp32 master weights: a 1e-6 Adam step survives (in bf16
  storage it would round away for most weights)."""
  optim = dict(lr=1e-6, lr_scheduler="constant", betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0)
  eng = engine_factory(partial(sft_loss, vocab_chunk=64), optim=optim, **{"init.dtype": "bfloat16"})
  assert eng.compute_dtype == jnp.bfloat16 and eng.param_dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eng.state.params))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(eng.model(), nnx.Param)))
  before = _params(eng)
  eng.accumulate(make_batch(eng.model_config, _examples(tok, rng, 1), token_bucket=64, image_bucket=8,
                            pad_id=tok.endoftext))
  eng.apply()
  after = _params(eng)
  k = "['model']['layers'][0]['mlp']['down_proj']['kernel'].value"
  step = np.abs(after[k] - before[k])
  assert np.median(step) == pytest.approx(1e-6, rel=0.2)  # Adam's first step is lr * sign(g)
  as_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
  assert np.mean(as_bf16(after[k]) == as_bf16(before[k])) > 0.9  # what bf16 weights would have kept
