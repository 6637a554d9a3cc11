"""Jitted generation around the KV cache: sample, decode until a stop, extend with new tokens and frames.

Three operations in two device programs (`step_program`: prefill and extend; `decode_program`), each
compiled once per bucketed shape; both donate the cache they replace:

  * `prefill`  - the prompt (with its images) into a fresh cache; the logits of each sequence's last token;
  * `extend`   - appends a chunk of tokens (with images) to an existing cache at given M-RoPE positions,
                 for the sequences whose `token_mask` rows are set; the others are untouched;
  * `decode`   - a `lax.while_loop` that samples one token per step for every live sequence and stops a
                 sequence on a stop token id or when its text ends in a stop string (e.g. `</video_zoom>`,
                 which is several tokens in Qwen's vocabulary), or after `max_new_tokens`.

Stop strings are matched on bytes inside the loop: every token's bytes come from a [vocab, W] table and
a rolling window of each sequence's last bytes is compared with each stop string, so the loop stops on
the string whatever tokens spell it, like vLLM's `stop=[...]`.

Log-probs are recorded under the distribution the token was drawn from before top-k/top-p truncation:
`log_softmax(logits / temperature)` (temperature 1 when greedy), which is what a teacher-forced forward at
the same temperature computes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zoomer_jax.model.kv_cache import KVCache
from zoomer_jax.model.layers import Linear, outputs_first, outputs_first_helps, platform_of
from zoomer_jax.model.mrope import text_positions

STOP_NONE, STOP_TOKEN, STOP_STRING, STOP_LENGTH = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 256

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
      raise ValueError(f"bad sampling parameters {self}")


@struct.dataclass
class StopCriteria:
  """Stop token ids and stop strings, as device arrays (built once per tokenizer)."""

  token_ids: jax.Array  # [n_ids] int32 (may be empty)
  token_bytes: jax.Array  # [vocab, W] uint8: the last W bytes of each token, left-aligned
  token_len: jax.Array  # [vocab] int32: min(len(bytes), W)
  strings: jax.Array  # [n_str, W] uint8, left-aligned
  string_len: jax.Array  # [n_str] int32
  suppress: jax.Array  # [n_sup] int32: ids never sampled (e.g. <|image_pad|>, which only the host may write)
  vocab_limit: jax.Array  # [] int32: ids >= this are outside the tokenizer (padding rows of the model's head)

  @classmethod
  def build(cls, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
            vocab_bytes: Sequence[bytes] | None = None, window: int = 32,
            suppress_ids: Sequence[int] = (), vocab_limit: int | None = None) -> "StopCriteria":
    """`vocab_bytes[i]` is token i's text as bytes (needed only for stop strings). `vocab_limit`: the
    tokenizer's size (default: `len(vocab_bytes)`, or no limit without them); ids at or past it are never
    drawn and are outside the log-probs' support (`restrict_vocab`)."""
    if vocab_limit is None:
      vocab_limit = len(vocab_bytes) if vocab_bytes is not None else np.iinfo(np.int32).max
    encoded = [s.encode() for s in stop_strings]
    if any(not s or len(s) > window for s in encoded):
      raise ValueError(f"stop strings must be 1..{window} bytes long: {list(stop_strings)}")
    if encoded and vocab_bytes is None:
      raise ValueError("stop strings need the vocabulary's token bytes")
    vocab = vocab_bytes or [b""]
    table = np.zeros((len(vocab), window), np.uint8)
    lens = np.zeros(len(vocab), np.int32)
    for i, b in enumerate(vocab):
      b = b[-window:]
      lens[i] = len(b)
      if b:
        table[i, :len(b)] = np.frombuffer(b, np.uint8)
    strings = np.zeros((max(len(encoded), 1), window), np.uint8)
    slens = np.zeros(max(len(encoded), 1), np.int32)
    for i, s in enumerate(encoded):
      strings[i, :len(s)] = np.frombuffer(s, np.uint8)
      slens[i] = len(s)
    return cls(token_ids=jnp.asarray(np.asarray(stop_token_ids, np.int32).reshape(-1)),
               token_bytes=jnp.asarray(table), token_len=jnp.asarray(lens), strings=jnp.asarray(strings),
               string_len=jnp.asarray(slens),
               suppress=jnp.asarray(np.asarray(suppress_ids, np.int32).reshape(-1)),
               vocab_limit=jnp.asarray(vocab_limit, jnp.int32))

  @property
  def window(self) -> int:
    return self.token_bytes.shape[1]


def restrict_vocab(logits_bv: jax.Array, vocab_limit) -> jax.Array:
  """Logits [..., V] with the ids at or past `vocab_limit` set to -inf. A checkpoint's head has more rows than
  its tokenizer has ids (Qwen2.5-VL: 152064 vs 151665); the padding rows are not tokens, so they leave both
  the sampled distribution and the log-probs' support (the trainer's `sequence_logprobs` takes the same
  limit)."""
  ids = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, logits_bv.ndim - 1)
  return jnp.where(ids < vocab_limit, logits_bv, -jnp.inf)


def draw_keys(key: jax.Array, ids_b2: jax.Array) -> jax.Array:
  """One key per row [B] from a typed key and each row's (trajectory, token index) [B, 2]: a token's draw depends
  only on which trajectory it belongs to and where, not on which rows share its device step (the continuous
  engine's steps depend on when clips finish)."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i[0]), i[1]))(ids_b2)


def sample(logits_bv: jax.Array, key: jax.Array, params: SamplingParams,
           suppress: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(token [B], logprob [B]) from fp32 logits [B, V]; `suppress` ids are never drawn. `key` is one typed key,
  or one per row [B] (`draw_keys`).

  The log-prob is that of the unfiltered distribution (see the module docstring).
  """
  logits_bv = logits_bv.astype(jnp.float32)
  allowed = logits_bv if suppress is None else logits_bv.at[:, suppress].set(-jnp.inf)
  if params.temperature == 0:
    token = jnp.argmax(allowed, axis=-1)
    logp = jax.nn.log_softmax(logits_bv, axis=-1)
  else:
    scaled = logits_bv / params.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    masked = allowed / params.temperature
    if params.top_k > 0:
      kth = jax.lax.top_k(scaled, params.top_k)[0][:, -1:]
      masked = jnp.where(scaled < kth, -jnp.inf, masked)
    if params.top_p < 1.0:
      sorted_desc = jnp.sort(masked, axis=-1)[:, ::-1]
      probs = jax.nn.softmax(sorted_desc, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
      keep = before < params.top_p  # the smallest prefix whose mass reaches top_p (at least one token)
      threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
      masked = jnp.where(masked < threshold, -jnp.inf, masked)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:
      token = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, masked)
    else:
      token = jax.random.categorical(key, masked, axis=-1)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _push_bytes(window_bw: jax.Array, token_b: jax.Array, stop: StopCriteria) -> jax.Array:
  """Each sequence's last W bytes after appending its token's bytes (table rows are left-aligned)."""
  w = stop.window
  combined = jnp.concatenate([window_bw, stop.token_bytes[token_b]], axis=1)  # real bytes: [0, W + n)
  idx = jnp.arange(w)[None, :] + stop.token_len[token_b][:, None]  # the last W real bytes
  return jnp.take_along_axis(combined, idx, axis=1)


def _has_stop_string(window_bw: jax.Array, stop: StopCriteria) -> jax.Array:
  """[B] bool: some stop string occurs in the window (strings are left-aligned, zero-padded)."""
  w = stop.window
  idx = jnp.minimum(jnp.arange(w)[:, None] + jnp.arange(w)[None, :], w - 1)  # [offset, j]
  spans = window_bw[:, idx]  # [B, offset, j] = window[offset + j]
  j = jnp.arange(w)

  def one(s_w, m):
    eq = (spans == s_w[None, None, :]) | (j >= m)[None, None, :]
    fits = (jnp.arange(w) + m <= w)[None, :]
    return jnp.any(jnp.all(eq, axis=-1) & fits, axis=-1) & (m > 0)

  return jnp.any(jax.vmap(one, out_axes=1)(stop.strings, stop.string_len), axis=1)


@struct.dataclass
class DecodeOut:
  tokens: jax.Array  # [B, N] int32 (stop token / string's last token included; -1 after the end)
  logprobs: jax.Array  # [B, N] fp32 (0 after the end)
  num_tokens: jax.Array  # [B] int32
  stop_reason: jax.Array  # [B] int32: STOP_TOKEN, STOP_STRING, STOP_LENGTH, or STOP_NONE (was not live)
  cache: KVCache
  next_position: jax.Array  # [B] int32
  last_logits: jax.Array  # [B, V]: logits after each sequence's last token (to resume sampling)
  window: jax.Array  # [B, W] uint8: each sequence's last bytes, to continue a turn in a later call


@struct.dataclass
class _Loop:
  step: jax.Array
  key: jax.Array
  cache: KVCache
  logits: jax.Array
  next_position: jax.Array
  live: jax.Array
  window: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  num: jax.Array
  reason: jax.Array


def decode_weights(model):
  """The model to hand `decode`: the same function, with the text decoder's kernels in the sampler's layout.

  On CPU in fp32 (the platform of the model's parameters) that is a copy whose decoder `Linear` kernels are
  stored outputs first (`layers.FEW_ROWS` says why); it shares every other array with `model` and costs one pass
  over the decoder weights, so make it once per set of weights (once per rollout), not per call. Elsewhere, and
  for scanned models (whose stacked kernels the layer scan slices), it is `model` itself. Prefill and extend take
  `model`, which is unchanged; results agree to float rounding, since only the order of the sums changes.
  """
  if model.options.scan_layers or not outputs_first_helps(model.dtype, platform_of(nnx.state(model, nnx.Param))):
    return model
  view = nnx.merge(*nnx.split(model))
  for _, layer in nnx.iter_modules(view.model):
    if isinstance(layer, Linear):
      outputs_first(layer)
  return view


def decode(model, cache: KVCache, logits_bv: jax.Array, next_position: jax.Array, live: jax.Array,
           key: jax.Array, stop: StopCriteria, params: SamplingParams,
           window: jax.Array | None = None, forced: np.ndarray | None = None, *, donate: bool = False) -> DecodeOut:
  """Samples up to `params.max_new_tokens` tokens for every `live` sequence, from `logits_bv` on.

  Every sampled token (stop tokens included) is written to the cache, so a stopped sequence can be
  extended and resumed. The cache must have `max_new_tokens` free slots. Pass the previous call's
  `window` to continue the same turn (a stop string may straddle the two calls); None starts a turn.
  `forced` [B, max_new_tokens] (-1 = sample) replaces sampled tokens by given ones - scripted turns for
  tests and demonstrations; their log-probs are still the model's. `model` may be `decode_weights(model)`
  (faster on CPU) or the model itself. `donate` hands the cache's buffers to the result (the agent does: one cache
  in memory, not two); the `cache` passed in is then unusable.
  """
  free = cache.size - int(cache.length)
  if params.max_new_tokens > free:
    raise ValueError(f"max_new_tokens={params.max_new_tokens} does not fit the cache ({free} slots free of "
                     f"{cache.size})")
  b = np.shape(logits_bv)[0]
  window = jnp.zeros((b, stop.window), jnp.uint8) if window is None else jnp.asarray(window, jnp.uint8)
  forced = np.full((b, params.max_new_tokens), -1, np.int32) if forced is None else np.asarray(forced, np.int32)
  if forced.shape != (b, params.max_new_tokens):
    raise ValueError(f"forced tokens must have shape {(b, params.max_new_tokens)}, got {forced.shape}")
  rows = _on_model_rows(model, b, (jnp.asarray(logits_bv, jnp.float32), jnp.asarray(next_position, jnp.int32),
                                   jnp.asarray(live, bool), window, jnp.asarray(forced)))
  cache, key, stop = _on_model_mesh(model, (cache, key, stop))
  logits_bv, next_position, live, window, forced = rows
  graphdef, state = nnx.split(model)
  program = decode_program if donate else _decode_keeping_cache
  return program(graphdef, state, cache, logits_bv, next_position, live, key, stop, params, window, forced)


def _decode_loop(graphdef, state, cache, logits_bv, next_position, live, key, stop, params, window, forced):
  """The decode loop (`decode`) as a function of the model's state."""
  TRACES["decode"] += 1
  b, n = logits_bv.shape[0], params.max_new_tokens

  def cond(s: _Loop):
    return (s.step < n) & jnp.any(s.live)

  def body(s: _Loop) -> _Loop:
    key, sub = jax.random.split(s.key)
    logits = restrict_vocab(s.logits, stop.vocab_limit)
    token, logprob = sample(logits, sub, params, stop.suppress)
    f = forced[:, s.step]
    logp_all = jax.nn.log_softmax(logits / (params.temperature or 1.0), axis=-1)
    logprob = jnp.where(f >= 0, jnp.take_along_axis(logp_all, jnp.maximum(f, 0)[:, None], axis=-1)[:, 0], logprob)
    token = jnp.where(f >= 0, f, token)
    token = jnp.where(s.live, token, 0)
    window = jnp.where(s.live[:, None], _push_bytes(s.window, token, stop), s.window)
    hit_token = (token[:, None] == stop.token_ids[None, :]).any(-1) & s.live
    hit_string = _has_stop_string(window, stop) & s.live & ~hit_token
    at_length = (s.step + 1 >= n) & s.live & ~hit_token & ~hit_string
    reason = jnp.where(hit_token, STOP_TOKEN, jnp.where(hit_string, STOP_STRING,
                                                        jnp.where(at_length, STOP_LENGTH, s.reason)))
    m = nnx.merge(graphdef, state)
    logits, cache = m.forward(token[:, None], text_positions(s.next_position, 1), s.live[:, None], cache=s.cache)
    return _Loop(
        step=s.step + 1, key=key, cache=cache,
        logits=jnp.where(s.live[:, None], logits[:, 0], s.logits),
        next_position=s.next_position + s.live.astype(jnp.int32),
        live=s.live & ~hit_token & ~hit_string, window=window,
        tokens=s.tokens.at[:, s.step].set(jnp.where(s.live, token, -1)),
        logprobs=s.logprobs.at[:, s.step].set(jnp.where(s.live, logprob, 0.0)),
        num=s.num + s.live.astype(jnp.int32), reason=reason)

  init = _Loop(step=jnp.zeros((), jnp.int32), key=key, cache=cache, logits=logits_bv,
               next_position=next_position, live=live, window=window,
               tokens=jnp.full((b, n), -1, jnp.int32), logprobs=jnp.zeros((b, n), jnp.float32),
               num=jnp.zeros((b,), jnp.int32), reason=jnp.full((b,), STOP_NONE, jnp.int32))
  out = jax.lax.while_loop(cond, body, init)
  return DecodeOut(tokens=out.tokens, logprobs=out.logprobs, num_tokens=out.num, stop_reason=out.reason,
                   cache=out.cache, next_position=out.next_position, last_logits=out.logits,
                   window=out.window)


decode_program = jax.jit(_decode_loop, static_argnames=("graphdef", "params"), donate_argnames=("cache",))
_decode_keeping_cache = jax.jit(_decode_loop, static_argnames=("graphdef", "params"))


# Trace counts of the jitted programs (a retrace means a new compilation); tests read them.
TRACES = {"step": 0, "decode": 0}


def _on_model_mesh(model, args):
  """Host and process-local inputs as global arrays replicated over the model's mesh when that mesh spans
  several processes (every process runs the same calls on the same host values); unchanged otherwise."""
  if jax.process_count() == 1:
    return args
  from zoomer_jax.parallel.distributed import mesh_of, replicate  # noqa: PLC0415
  return replicate(args, mesh_of(nnx.state(model, nnx.Param)))


def _on_model_rows(model, rows: int, tree, axis: int = 0):
  """Inputs indexed by the batch's rows (on `axis`), laid out over the model's mesh as the rules lay out
  "activation_batch" (split over the data axes when they divide the rows): every chip receives only its rows, not
  the whole batch's tokens and pixels. Unchanged for a model that is not on a mesh."""
  from zoomer_jax.parallel.distributed import mesh_of, put  # noqa: PLC0415
  from zoomer_jax.parallel.rules import logical_to_spec  # noqa: PLC0415
  mesh = mesh_of(nnx.state(model, nnx.Param))
  if mesh is None:
    return tree
  batch = logical_to_spec(("activation_batch",), model.options.rules, mesh, (rows,))[0]

  def sharding(x):
    spec = [None] * np.ndim(x)
    spec[axis] = batch
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  return put(tree, jax.tree.map(sharding, tree))


def fresh_cache(model, batch: int, size: int) -> KVCache:
  """An empty cache of `batch` rows x `size` slots, created directly in its layout on the model's mesh
  (`kv_cache.cache_shardings`): no chip ever holds the whole cache."""
  from zoomer_jax.model.kv_cache import cache_shardings  # noqa: PLC0415
  from zoomer_jax.parallel.distributed import mesh_of  # noqa: PLC0415
  mesh = mesh_of(nnx.state(model, nnx.Param))
  if mesh is None:
    return model.init_cache(batch, size)
  shardings = cache_shardings(jax.eval_shape(lambda: model.init_cache(batch, size)), mesh, model.options.rules)
  return jax.jit(lambda: model.init_cache(batch, size), out_shardings=shardings)()


def round_up(n: int, bucket: int) -> int:
  """n rounded up to a multiple of bucket (bucket <= 0: n)."""
  return n if bucket <= 0 else -(-n // bucket) * bucket


def extend(model, cache: KVCache, input_ids, attention_mask, next_position, prev_logits=None, *,
           pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
           second_per_grid_ts=None, token_bucket: int = 0, image_bucket: int = 0,
           donate: bool = False) -> tuple[jax.Array, KVCache, jax.Array]:
  """Appends a chunk [B, T] (rows may be empty; padding anywhere) with its images to the cache.

  Row b's tokens get M-RoPE positions counted from `next_position[b]`, laid out exactly as if the chunk
  had been part of the prompt. Returns (logits after each row's last real token [B, V] - `prev_logits`
  for rows with no tokens -, cache, next_position). Used for the prompt too (a fresh cache, position 0).

  Shape buckets, so that turns of different lengths reuse one compiled program: `token_bucket` pads T up to
  a multiple (padding is masked; it uses cache slots), and `image_bucket` pads every row's images with blank
  rows to room for a multiple of that many images (`vision_layout.layout_sizes`). `donate`: see `decode`.
  """
  from zoomer_jax.model.qwen25vl import prepare_inputs  # noqa: PLC0415 (no import cycle)
  ids = np.asarray(input_ids)
  ids = ids[None] if ids.ndim == 1 else ids
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
  pad = round_up(ids.shape[1], token_bucket) - ids.shape[1]
  if pad:
    ids = np.pad(ids, ((0, 0), (0, pad)))
    mask = np.pad(mask, ((0, 0), (0, pad)))
  prep = prepare_inputs(model.config, ids, mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                        second_per_grid_ts, image_bucket=image_bucket)
  b, t = prep.ids.shape
  if int(cache.length) + t > cache.size:
    raise ValueError(f"a chunk of {t} tokens overflows the cache ({int(cache.length)} of {cache.size} slots "
                     f"used)")
  mask = np.asarray(prep.token_mask)
  n = mask.sum(1)
  last = np.where(n > 0, t - 1 - np.argmax(mask[:, ::-1], axis=1), 0).astype(np.int32)
  from zoomer_jax.parallel.distributed import to_host  # noqa: PLC0415
  start = np.asarray(to_host(next_position), np.int32).reshape(b)  # rows may be split over processes
  positions = prep.positions + jnp.asarray(start)[None, :, None]
  ids, token_mask, images, videos, last_b = _on_model_rows(
      model, b, (np.asarray(prep.ids), np.asarray(prep.token_mask), prep.images, prep.videos, last))
  positions = _on_model_rows(model, b, np.asarray(positions), axis=1)
  step_args = (ids, positions, token_mask, images, videos, _on_model_mesh(model, cache), last_b,
               *_on_model_mesh(model, (n > 0, prev_logits)))
  graphdef, state = nnx.split(model)
  logits, cache = (step_program if donate else _step_keeping_cache)(graphdef, state, *step_args[:7])
  if prev_logits is not None:
    logits = jnp.where(jnp.asarray(step_args[7])[:, None], logits, step_args[8])
  return logits, cache, jnp.asarray(np.where(n > 0, start + np.asarray(prep.next_position), start), jnp.int32)


def prefill(model, input_ids, attention_mask=None, *, cache_size: int, **kw) -> tuple[jax.Array, KVCache,
                                                                                     jax.Array]:
  """The prompt into a fresh cache of `cache_size` slots: (last-token logits [B, V], cache, next_position).

  Takes `extend`'s vision, bucket and `donate` arguments (a fresh cache can always be donated)."""
  ids = np.asarray(input_ids)
  ids = ids[None] if ids.ndim == 1 else ids
  cache = fresh_cache(model, ids.shape[0], cache_size)
  return extend(model, cache, ids, attention_mask, np.zeros(ids.shape[0], np.int32), **kw)


def _step(graphdef, state, ids, positions, token_mask, images, videos, cache, last_b):
  """A prefill / extend chunk (`extend`) as a function of the model's state: (logits after each row's token
  `last_b` [B, V], the cache with the chunk written)."""
  TRACES["step"] += 1
  model = nnx.merge(graphdef, state)
  return model.forward(ids, positions, token_mask, images=images, videos=videos, cache=cache, logits_at=last_b)


step_program = jax.jit(_step, static_argnames=("graphdef",), donate_argnames=("cache",))
_step_keeping_cache = jax.jit(_step, static_argnames=("graphdef",))
