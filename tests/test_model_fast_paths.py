"""The model's attention kernels and CPU fast paths compute what the plain formulas compute (float64 numpy
references).

* `attention.dense` in query blocks (the short block first, keys past a block skipped without a cache), on keys
  and values as projected and in the cache's layout; `attention.blockwise` (online softmax over key blocks of the
  cache); `attention.splash` (the TPU kernel, run by Pallas' interpreter);
* tied logits for few rows (decode) as table x hidden^T, and 1-row bf16 matmuls run as 2 rows;
* `Linear` with its kernel stored outputs first (the sampler's layout): kernel x x^T for few rows, x x kernel^T
  for many;
* the vision attention's packing of segments by reshape (no padded segment) and by gather.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_oracle as O
import tolerances as tol
from zoomer_jax.model import attention
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.model import layers
from zoomer_jax.model.layers import Linear
from zoomer_jax.model.qwen25vl import Qwen25VL
from zoomer_jax.model.vision import VisionAttention, vision_rotary
from zoomer_jax.model.vision_layout import layout_sizes as vision_layout_sizes, padded_layout, vision_layout
from zoomer_jax.parallel.mesh import make_mesh


def _softmax_attention(q_tnh, k_snh, v_snh, allowed_ts):
  """One sequence, heads already matched: float64 softmax over allowed keys; no allowed key -> zeros."""
  scores = np.einsum("tnh,snh->nts", q_tnh, k_snh) / np.sqrt(q_tnh.shape[-1])
  scores = np.where(allowed_ts[None], scores, -np.inf)
  top = np.max(np.where(allowed_ts[None], scores, -1e300), axis=-1, keepdims=True)
  w = np.where(allowed_ts[None], np.exp(scores - top), 0.0)
  w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  return np.einsum("nts,snh->tnh", w, v_snh)


def _as(x, dtype):
  return jnp.asarray(x, jnp.float32).astype(dtype)


def _attention_case(rng, dtype, with_cache, b=2, t=150, n=6, kh=2, h=16):
  """Inputs and the float64 reference: 6 query heads on 2 kv heads; without a cache left padding in row 1 (its
  first 17 queries see no key), with one queries at slots 30.. of a cache whose slots may be invalid anywhere."""
  s = t + 50 if with_cache else t
  q = rng.standard_normal((b, t, n, h))
  k, v = rng.standard_normal((b, s, kh, h)), rng.standard_normal((b, s, kh, h))
  if with_cache:
    valid = rng.random((b, s)) > 0.2
    start = 30
  else:
    valid = np.ones((b, t), bool)
    valid[1, :17] = False
    start = 0
  allowed = (np.arange(s)[None, :] <= start + np.arange(t)[:, None])[None] & valid[:, None, :]
  dt = jnp.dtype(dtype)
  qd, kd, vd = _as(q, dt), _as(k, dt), _as(v, dt)
  group = n // kh
  q64, k64, v64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (qd, kd, vd))
  want = np.stack([_softmax_attention(q64[i], np.repeat(k64[i], group, axis=1), np.repeat(v64[i], group, axis=1),
                                      allowed[i]) for i in range(b)])
  mask = attention.AttentionMask(key_valid=jnp.asarray(valid), q_start=jnp.asarray(start, jnp.int32))
  return qd, kd, vd, mask, want


def _precision(dt):
  return jax.lax.Precision.HIGHEST if dt == jnp.float32 else jax.lax.Precision.DEFAULT


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind,with_cache", [("dense_blocks", False), ("dense_blocks", True), ("blockwise", True)])
def test_attention_matches_softmax(rng, measure, dtype, with_cache, kind):
  """dense: 150 queries = blocks of 22 + 64 + 64 rows; blockwise (cache only): key blocks of 64 over 200 slots
  (the last one padded) and query blocks of 100."""
  dt = jnp.dtype(dtype)
  qd, kd, vd, mask, want = _attention_case(rng, dtype, with_cache)
  t = qd.shape[1]
  k_in, v_in = (kd.transpose(0, 2, 3, 1), vd.transpose(0, 2, 1, 3)) if with_cache else (kd, vd)  # cache layout
  if kind == "dense_blocks":
    assert attention.QUERY_BLOCK == 64 and attention.query_blocks(t) == [0, 22, 86, 150]
    fn = lambda q, k, v, m: attention.dense(q, k, v, m, bounds=attention.query_blocks(t), causal_prefix=not with_cache,
                                            cache_layout=with_cache, dtype=dt, precision=_precision(dt))
  else:
    fn = lambda q, k, v, m: attention.blockwise(q, k, v, m, dtype=dt, precision=_precision(dt), query_block=100,
                                                key_block=64)
  got = jax.jit(fn)(qd, k_in, v_in, mask)
  diff = float(np.abs(np.asarray(got, np.float64) - want).max())
  measure(f"{kind}_{dtype}_cache{int(with_cache)}", diff)
  assert diff <= (tol.ATTENTION_FP32 if dt == jnp.float32 else tol.ATTENTION_BF16)
  if not with_cache:
    assert not np.asarray(got[1, :17], np.float32).any()  # fully masked queries give zeros, not NaN


@pytest.mark.slow
def test_splash_attention_matches_softmax(rng, measure):
  """The TPU kernel (Pallas interpreter on CPU), 256 tokens in 128-token tiles, GQA, right padding in row 1:
  real queries match the reference; padded ones (which splash lets read padded keys) are never read."""
  b, t, n, kh, h = 2, 256, 4, 2, 128
  q = rng.standard_normal((b, t, n, h))
  k, v = rng.standard_normal((b, t, kh, h)), rng.standard_normal((b, t, kh, h))
  valid = np.ones((b, t), bool)
  valid[1, 200:] = False
  allowed = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  q32, k32, v32 = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
  got = jax.jit(lambda q, k, v, m: attention.splash(q, k, v, m, rules=(), interpret=True, block=128))(
      q32, k32, v32, jnp.asarray(valid))
  want = np.stack([_softmax_attention(q[i], np.repeat(k[i], n // kh, axis=1), np.repeat(v[i], n // kh, axis=1),
                                      allowed[i]) for i in range(b)])
  diff = float(np.abs(np.asarray(got, np.float64) - want)[valid].max())
  measure("splash_fp32", diff)
  assert diff <= tol.ATTENTION_FP32


def test_save_attention_keeps_the_kernels_residuals(rng, capsys):
  """Under the "save_attention" remat policy the backward reads the splash kernel's output and log-sum-exp and
  its named inputs from the forward (so no attention forward runs again); "full" keeps neither."""
  from jax.ad_checkpoint import checkpoint_name, print_saved_residuals
  from zoomer_jax.model.stack import ATTENTION_RESIDUALS, remat
  b, t, n, kh, h = 1, 256, 4, 2, 128
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32) for _ in range(2))

  def f(q, k, v):
    q, k, v = (checkpoint_name(jnp.sin(a), ATTENTION_RESIDUALS) for a in (q, k, v))
    return jnp.sum(attention.splash(q, k, v, jnp.ones((b, t), bool), rules=(), interpret=True, block=128) ** 2)

  saved = {}
  for policy in ("full", "save_attention"):
    capsys.readouterr()
    print_saved_residuals(remat(f, policy), q, k, v)
    saved[policy] = capsys.readouterr().out
  assert "splash" not in saved["full"] and ATTENTION_RESIDUALS not in saved["full"]
  kept = saved["save_attention"]
  assert kept.count(ATTENTION_RESIDUALS) == 3  # q, k, v
  assert f"f32[{b},{n},{t},{h}] output of jitted function '_splash_attention'" in kept  # the output
  assert f"f32[{b},{n},{t}] output of jitted function '_splash_attention'" in kept  # its log-sum-exp


def test_save_attention_up_keeps_the_decoder_mlp_up_projection(rng, capsys, measure):
  """"save_attention_up" keeps each decoder layer's MLP up projection output beside what "save_attention" keeps
  (the backward recomputes the gate projection only), and the decoder's gradients stay those of "full"."""
  from jax.ad_checkpoint import print_saved_residuals
  from zoomer_jax.model.stack import DECODER_MLP_UP
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config())
  model = Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(0))
  b, t, d = 2, 24, cfg.text.hidden_size
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (3, b, t))
  mask = jnp.ones((b, t), bool)
  graphdef, state = nnx.split(model.model)

  def loss(state, x, policy):
    decoder = nnx.merge(graphdef, state)
    return jnp.sum(decoder(x, positions, mask, remat_policy=policy)[0] ** 2)

  saved = {}
  for policy in ("save_attention", "save_attention_up"):
    capsys.readouterr()
    print_saved_residuals(lambda s, x, p=policy: loss(s, x, p), state, x)
    saved[policy] = capsys.readouterr().out
  up = f"f32[{b},{t},{cfg.text.intermediate_size}] named '{DECODER_MLP_UP}'"
  assert f"named '{DECODER_MLP_UP}'" not in saved["save_attention"]
  assert saved["save_attention_up"].count(up) == cfg.text.num_hidden_layers, saved["save_attention_up"]
  grads = {p: jax.jit(jax.grad(loss), static_argnums=2)(state, x, p) for p in ("full", "save_attention_up")}
  want, got = (jax.tree.leaves(grads[p]) for p in ("full", "save_attention_up"))
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b_)).max()) for a, b_ in zip(want, got)) / max(
      float(np.abs(np.asarray(a)).max()) for a in want)
  measure("save_attention_up_grad_rel", diff)
  assert diff <= tol.LAYOUT_FP32_REL


@pytest.mark.slow
@pytest.mark.parametrize("t,balanced", [(512, False), (1024, True)])
def test_splash_context_parallel_matches_the_unsplit_kernel(rng, measure, t, balanced):
  """Queries split over the tensor axis (`activation_length`: context parallelism; keys and values gathered, the
  kernel's mask tables split with the queries; at 1024 tokens in `balanced_order`, at 512 its chunks would not
  tile): outputs and the gradients of q, k and v equal the unsplit kernel's (Pallas interpreter), padding in row 1
  included."""
  b, n, kh, h = 2, 4, 2, 128
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32) for _ in range(2))
  valid = np.ones((b, t), bool)
  valid[1, t - 112:] = False
  w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) * jnp.asarray(valid)[:, :, None, None]
  rules = (("activation_batch", "fsdp"), ("activation_length", "tensor"), ("activation_kv_heads", None))
  mesh = make_mesh((1, 2, 4))
  built = []  # (q_seq_shards, permuted queries) of each kernel built
  make_kernel = attention._splash_kernel

  def loss_and_out(q, k, v, rules):
    out = attention.splash(q, k, v, jnp.asarray(valid), rules=rules, interpret=True, block=128)
    return (out * w).sum(), out

  attention._splash_kernel = lambda *a, **kw: built.append(
      (kw.get("q_seq_shards", 1), kw.get("q_order") is not None)) or make_kernel(*a, **kw)
  try:
    grad = jax.jit(jax.grad(loss_and_out, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (dq0, dk0, dv0), out0 = grad(q, k, v, ())
    assert built == [(1, False)]
    with jax.set_mesh(mesh):
      (dq, dk, dv), out = grad(q, k, v, rules)
      if balanced:  # inputs already in the balanced order (the decoder's): the output stays in it
        order = attention.balanced_order(t, 4, block=128)
        permuted = jax.jit(lambda q, k, v, m: attention.splash(q, k, v, m, rules=rules, interpret=True,
                                                               permuted=True, block=128))(
            q[:, order], k[:, order], v[:, order], jnp.asarray(valid)[:, order])
        out_p = np.asarray(permuted)[:, np.argsort(order)]
  finally:
    attention._splash_kernel = make_kernel
  assert built[:2] == [(1, False), (4, balanced)]  # the second run split the queries four ways
  if balanced:
    diffs_p = float(np.abs(np.where(valid[:, :, None, None], out_p - np.asarray(out0), 0)).max())
    assert diffs_p <= tol.ATTENTION_FP32
  real = valid[:, :, None, None]
  diffs = [float(np.abs(np.where(real, np.asarray(a) - np.asarray(b_), 0)).max())
           for a, b_ in ((out, out0), (dq, dq0))] + [float(np.abs(np.asarray(a) - np.asarray(b_)).max())
                                                     for a, b_ in ((dk, dk0), (dv, dv0))]
  measure(f"splash_context_parallel_{t}_fp32", max(diffs))
  assert max(diffs) <= tol.ATTENTION_FP32


def test_decoder_in_a_balanced_order_equals_the_decoder_in_order(rng, measure):
  """With the sequence split over the tensor axis and flash attention, the text decoder runs its layers in the
  balanced order (`attention.context_split`: permuted once per forward, put back at the end); off TPU attention
  sees the sequence in order. Hidden states equal the unsplit decoder's, padding included."""
  from zoomer_jax.model.options import ModelOptions
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config())
  b, t = 4, 512
  x = jnp.asarray(rng.standard_normal((b, t, cfg.text.hidden_size)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (3, b, t))
  mask = np.ones((b, t), bool)
  mask[1, 450:] = False
  mesh = make_mesh((1, -1, 2))
  rules = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)
  assert attention.context_split(b, t, cfg.text.num_key_value_heads, rules)[2] is None  # no mesh in context
  plain = Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(3))
  split = Qwen25VL(cfg, dtype="float32", rngs=nnx.Rngs(3), options=ModelOptions(attention="flash", rules=rules))
  want = jax.jit(lambda x: plain.model(x, positions, jnp.asarray(mask))[0])(x)
  with jax.set_mesh(mesh):
    assert attention.context_split(b, t, cfg.text.num_key_value_heads, rules)[2] is not None
    got = jax.jit(lambda x: split.model(x, positions, jnp.asarray(mask))[0])(x)
  diff = float(np.abs(np.asarray(got) - np.asarray(want))[mask].max())
  measure("balanced_decoder_fp32", diff)
  assert diff <= tol.ATTENTION_FP32 * 10


def test_permute_tokens_gradient_is_the_inverse_gather(rng):
  """`text.permute_tokens` (the balanced order's permutation) has autodiff's gradient (a scatter-add of the
  cotangent) computed as a gather by the inverse permutation: the same values, exactly; masks pass through."""
  from zoomer_jax.model.text import permute_tokens
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES
  rules = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)
  order = rng.permutation(64)
  x = jnp.asarray(rng.standard_normal((2, 64, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 64, 8)), jnp.float32)
  got = jax.grad(lambda x: jnp.sum(permute_tokens(x, order, rules) ** 2 * w))(x)
  want = jax.grad(lambda x: jnp.sum(jnp.take(x, order, axis=1) ** 2 * w))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  mask = jnp.asarray(rng.random((2, 64)) < 0.5)
  np.testing.assert_array_equal(np.asarray(permute_tokens(mask, order, rules)), np.asarray(mask)[:, order])


def test_gathers_with_gradients_by_gather_equal_autodiff(rng):
  """`layers.permute_rows` (the tower's placeholder order) and `qwen25vl.scatter_features` (image features into
  the placeholders: a row with none, feature rows left over) take their gradients by a gather where autodiff
  would scatter-add: the same values as autodiff of the plain gathers, exactly."""
  from zoomer_jax.model.layers import permute_rows
  from zoomer_jax.model.qwen25vl import scatter_features
  index = jnp.asarray(np.stack([rng.permutation(7) for _ in range(2)]))
  a, w = (jnp.asarray(rng.standard_normal((2, 7, 3)), jnp.float32) for _ in range(2))
  got = jax.grad(lambda a: jnp.sum(permute_rows(a, index, jnp.argsort(index, axis=1)) * w))(a)
  want = jax.grad(lambda a: jnp.sum(jnp.take_along_axis(a, index[..., None], axis=1) * w))(a)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  ids = jnp.asarray(rng.integers(0, 4, (3, 40)), jnp.int32).at[2].set(0)  # token 3 the placeholder
  x, w = (jnp.asarray(rng.standard_normal((3, 40, 5)), jnp.float32) for _ in range(2))
  feats = jnp.asarray(rng.standard_normal((3, 16, 5)), jnp.float32)

  def plain(x, feats):
    hit = ids == 3
    row = jnp.clip(jnp.cumsum(hit, axis=1) - 1, 0, feats.shape[1] - 1)
    return jnp.where(hit[..., None], jnp.take_along_axis(feats, row[..., None], axis=1), x)

  assert 0 < int((ids == 3).sum(1).max()) <= 16
  np.testing.assert_array_equal(np.asarray(scatter_features(x, ids, 3, feats)), np.asarray(plain(x, feats)))
  got = jax.grad(lambda x, f: jnp.sum(scatter_features(x, ids, 3, f) * w), argnums=(0, 1))(x, feats)
  want = jax.grad(lambda x, f: jnp.sum(plain(x, f) * w), argnums=(0, 1))(x, feats)
  for g, h in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(h))


def test_embedding_lookup_by_all_to_all_equals_take(rng):
  """`text.embed_lookup` on a (1, 2, 4) mesh under the context-parallel rules (the table's width split over fsdp x
  tensor, the stream's rows over fsdp and tokens over tensor): one all-to-all, the table's rows and the gradient
  equal to `jnp.take`'s, exactly; where the axes do not divide the rows it falls back to `jnp.take`."""
  from jax.sharding import NamedSharding, PartitionSpec
  from zoomer_jax.model.text import embed_lookup
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES
  rules = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)
  mesh = make_mesh((1, 2, 4))
  table = jnp.asarray(rng.standard_normal((50, 16)), jnp.float32)
  for b, t, sharded in ((4, 32, True), (3, 32, False)):
    ids = jnp.asarray(rng.integers(0, 50, (b, t)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((b, t, 16)), jnp.float32)
    with jax.set_mesh(mesh):
      placed = jax.device_put(table, NamedSharding(mesh, PartitionSpec(None, ("fsdp", "tensor"))))
      fn = jax.jit(lambda table, ids: embed_lookup(table, ids, rules))
      got = fn(placed, ids)
      grad = jax.jit(jax.grad(lambda table: jnp.sum(embed_lookup(table, ids, rules) * w)))(placed)
      text = fn.lower(placed, ids).as_text()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[np.asarray(ids)])
    want = jax.grad(lambda table: jnp.sum(jnp.take(table, ids, axis=0) * w))(table)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=0, atol=1e-5)
    assert ("all_to_all" in text) == sharded, text[:2000]


def test_permute_tokens_gradient_compiles_for_tpu_without_a_sort_or_scatter():
  """Compiled for TPU over a context-parallel mesh, the permutation's backward is a gather: no sort of indices
  and no scatter (XLA's TPU lowering of autodiff's scatter-add, which cost the 7B update two sorts and two
  [32768, 3584] scatters and ~20 s of compile). The plain gather's gradient has both, so the check can fail."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from zoomer_jax.aot.target import tpu_target
  from zoomer_jax.model.text import permute_tokens
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES
  rules = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)
  target = tpu_target("v5p:2x2x1")
  mesh = Mesh(np.asarray(target.devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
  order = attention.balanced_order(4096, 2, block=512)
  x = jax.ShapeDtypeStruct((2, 4096, 256), jnp.bfloat16,
                           sharding=NamedSharding(mesh, PartitionSpec("fsdp", "tensor", None)))
  texts = {}
  with jax.set_mesh(mesh):
    for name, permute in (("custom", lambda x: permute_tokens(x, order, rules)),
                          ("autodiff", lambda x: jnp.take(x, order, axis=1))):
      texts[name] = jax.jit(jax.grad(lambda x: jnp.sum(permute(x).astype(jnp.float32) ** 2))).lower(
          x).compile().as_text()
  def has(text):  # an instruction that sorts or scatters (not a reduce-scatter collective)
    ops = re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", text, re.M)
    return [o for o in ops if re.search(r"(?<!reduce-)scatter|^sort", o[0]) or o[1] in ("sort", "scatter")]

  assert has(texts["autodiff"]), "the baseline lost its sort and scatter"
  assert not has(texts["custom"]), has(texts["custom"])


def _tiny_tied(dtype):
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config(tie=True))
  return Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bt", [(1, 1), (8, 1), (2, 3), (1, 65)])
def test_tied_logits_few_and_many_rows(rng, measure, dtype, bt):
  """(1,1), (8,1), (2,3) take the decode layout (table x hidden^T); (1,65) the prefill one."""
  model = _tiny_tied(dtype)
  h = _as(rng.standard_normal(bt + (model.config.text.hidden_size,)), model.dtype)
  got = np.asarray(jax.jit(lambda h: model.logits(h))(h), np.float64)
  table = np.asarray(model.model.embed_tokens.embedding[...].astype(jnp.float32), np.float64)
  want = np.asarray(h.astype(jnp.float32), np.float64) @ table.T
  assert got.shape == bt + (model.config.text.vocab_size,)
  rel = float(np.abs(got - want).max() / np.abs(want).max())
  measure(f"{dtype}_{bt[0]}x{bt[1]}", rel)
  assert rel <= (tol.LOGITS_LAYOUT_FP32_REL if dtype == "float32" else tol.BF16_ROUNDING_REL)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 1)])
def test_bf16_linear_one_row(rng, measure, lead):
  """A 1-row bf16 product (run as 2 rows on CPU) equals the fp32-accumulated reference, shapes kept."""
  lin = Linear((32,), (4, 8), axes=("embed", "heads", "head_dim"), use_bias=True, dtype="bfloat16",
               rngs=nnx.Rngs(1))
  x = _as(rng.standard_normal(lead + (32,)), jnp.bfloat16)
  got = jax.jit(lambda x: lin(x))(x)
  assert got.shape == lead + (4, 8) and got.dtype == jnp.bfloat16
  w = np.asarray(lin.kernel[...].astype(jnp.float32), np.float64)
  want = np.einsum("...k,kno->...no", np.asarray(x.astype(jnp.float32), np.float64), w)
  rel = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
  measure(f"lead{len(lead)}x{lead[0]}", rel)
  assert rel <= tol.BF16_ROUNDING_REL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lead", [(1,), (8, 1), (2, 32), (65,)])
@pytest.mark.parametrize("shapes", [((32,), (4, 8)), ((4, 8), (32,))], ids=["q_like", "o_like"])
def test_outputs_first_linear(rng, measure, dtype, lead, shapes):
  """An outputs-first copy of a layer computes the float64 product from its transposed kernel, for few rows
  (up to FEW_ROWS: kernel x x^T) and many (65: x x kernel^T), bf16's 1-row padding included; the layer it was
  copied from keeps its [*in, *out] kernel."""
  in_shape, out_shape = shapes
  names = tuple(f"ax{i}" for i in range(len(in_shape) + len(out_shape)))
  lin = Linear(in_shape, out_shape, axes=names, use_bias=True, dtype=dtype, rngs=nnx.Rngs(2))
  lin.bias.value = _as(rng.standard_normal(out_shape), jnp.dtype(dtype))
  w = np.asarray(lin.kernel[...].astype(jnp.float32), np.float64)
  copy = nnx.merge(*nnx.split(lin))
  layers.outputs_first(copy)
  n_in = len(in_shape)
  assert copy.kernel.shape == out_shape + in_shape and lin.kernel.shape == in_shape + out_shape
  assert copy.kernel.get_metadata()["axes"] == names[n_in:] + names[:n_in]
  assert copy.kernel_outputs_first and not lin.kernel_outputs_first
  x = _as(rng.standard_normal(lead + in_shape), jnp.dtype(dtype))
  got = jax.jit(lambda x: copy(x))(x)
  assert got.shape == lead + out_shape and got.dtype == jnp.dtype(dtype)
  rows = int(np.prod(lead))
  want = ((np.asarray(x.astype(jnp.float32), np.float64).reshape(rows, -1) @ w.reshape(-1, int(np.prod(out_shape))))
          .reshape(lead + out_shape) + np.asarray(lin.bias[...].astype(jnp.float32), np.float64))
  rel = float(np.abs(np.asarray(got.astype(jnp.float32), np.float64) - want).max() / np.abs(want).max())
  measure(f"{dtype}_{'x'.join(map(str, lead))}", rel)
  assert rel <= (tol.LINEAR_FP32_REL if dtype == "float32" else tol.BF16_ROUNDING_REL)


@pytest.mark.parametrize("grid", [(2, 16, 16), (1, 12, 20), "padded"])
def test_vision_attention_packing(rng, measure, grid):
  """(2,16,16): 8x8-patch windows all full, packed by reshape; (1,12,20): edge windows padded, gathered;
  "padded": a (1,12,12) row padded to a batch layout of 320 patches (blank rows in segments of their own)."""
  cfg = ModelConfig.from_hf_dict(O.tiny_hf_config()).vision
  if grid == "padded":
    grid = (1, 12, 12)
    sizes = vision_layout_sizes([np.asarray([[1, 12, 20]])], cfg)
    layout = padded_layout(np.asarray([grid]), cfg, sizes)
    assert layout.perm.shape == (1, 240) and not layout.windows.identity and not layout.frames.identity
    one = lambda seg: seg.replace(gather=seg.gather[0], valid=seg.valid[0], scatter=seg.scatter[0])
    layout = layout.replace(perm=layout.perm[0], rot_pos=layout.rot_pos[0], windows=one(layout.windows),
                            frames=one(layout.frames))
  else:
    layout = vision_layout(np.asarray([grid]), cfg)
    assert layout.windows.identity == (grid == (2, 16, 16))
  attn = VisionAttention(cfg, dtype="float32", rngs=nnx.Rngs(2))
  n = len(layout.perm)
  x = jnp.asarray(rng.standard_normal((n, cfg.hidden_size)), jnp.float32)
  cos, sin = vision_rotary(jnp.asarray(layout.rot_pos), cfg)
  for seg in (layout.windows, layout.frames):
    got = np.asarray(jax.jit(lambda x, c, s, g: attn(x, c, s, g))(x, cos, sin, seg), np.float64)
    # Reference: rotate q and k, attend inside each segment's rows only, project.
    qkv = np.asarray(attn.qkv(x), np.float64)
    c64, s64 = np.asarray(cos, np.float64)[:, None], np.asarray(sin, np.float64)[:, None]
    rot = lambda a: a * c64 + np.concatenate([-a[..., a.shape[-1] // 2:], a[..., :a.shape[-1] // 2]], -1) * s64
    q, k, v = rot(qkv[:, 0]), rot(qkv[:, 1]), qkv[:, 2]
    out = np.zeros_like(q)
    for rows, ok in zip(seg.gather, seg.valid):
      r = rows[ok]
      if not len(r):  # an empty padding segment
        continue
      out[r] = _softmax_attention(q[r], k[r], v[r], np.ones((len(r), len(r)), bool))
    want = np.asarray(attn.proj(jnp.asarray(out, jnp.float32)), np.float64)
    real = int(np.prod(grid))  # blank rows' outputs are never read
    diff = float(np.abs(got - want)[:real].max())
    measure(f"{grid}_{seg.gather.shape}", diff)
    assert diff <= tol.ATTENTION_FP32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotate_half_by_matmul_equals_the_slicing_form_exactly(dtype):
  """The vision rotary's rotate_half as a signed permutation product: bit for bit the halves-and-concatenation form
  in fp32 (one +-1 term per output), its gradient too, at the vision tower's head_dim 80 and the decoder's 128."""
  for d in (80, 128):
    x = jax.random.normal(jax.random.key(d), (5, 3, d), dtype)
    w = jax.random.normal(jax.random.key(d + 1), (5, 3, d), jnp.float32)
    prec = layers.precision_for(dtype)
    got = layers.rotate_half_by_matmul(x, prec)
    want = layers.rotate_half(x.astype(jnp.float32))
    assert got.dtype == jnp.float32 and np.array_equal(np.asarray(got), np.asarray(want))
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)  # noqa: E731
    assert np.array_equal(np.asarray(grad(lambda x: layers.rotate_half_by_matmul(x, prec))),
                          np.asarray(grad(lambda x: layers.rotate_half(x.astype(jnp.float32)))))
