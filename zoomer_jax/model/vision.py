"""The Qwen2.5-VL vision tower in Flax NNX (`visual.*` in HF checkpoints).

pixel rows [N, 1176] -> patch embed -> window permutation -> blocks (windowed or per-frame
attention, 2-D rotary) -> RMSNorm + 2x2 patch merger -> inverse permutation -> [N/4, out_hidden].

Every row of a batch carries its own images ([R, N, 1176] with a per-row layout, `vision_layout.batch_layout`),
cut at frame boundaries into pieces; attention never crosses a frame, so the tower runs per row and piece
(vmapped) and its activations shard with the rows and, where the rules table says, the pieces (a row's frames
spread over the chips that split its tokens, with the tower's weights gathered as FSDP gathers the decoder's).
On TPU with `attention="flash"` each block's attention is the splash kernel over the piece's rows in window order
(`attention.segment_splash`); the `vmap`s name the mesh axes rows and pieces are split over, so the kernel's
`shard_map` runs each chip's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoomer_jax.model.attention import segment_ids, segment_splash, segment_splash_fits
from zoomer_jax.model.config import VisionConfig
from zoomer_jax.model.layers import (Linear, RMSNorm, SwiGLU, attention_weights, permute_rows, precision_for,
                                     rotate_half_by_matmul)
from zoomer_jax.model.options import ModelOptions
from zoomer_jax.model.stack import remat, scan_modules, stack_modules
from zoomer_jax.model.vision_layout import Segments, VisionLayout
from zoomer_jax.parallel.rules import constrain, logical_to_spec, spec_axes


def vision_rotary(rot_pos_n2: jax.Array, cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
  """cos, sin [N, head_dim] in fp32: first quarter height freqs, second quarter width, repeated."""
  spatial = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
  freqs = rot_pos_n2.astype(jnp.float32)[:, :, None] * inv_freq  # [N, 2, spatial/2]
  freqs = freqs.reshape(freqs.shape[0], spatial)  # height freqs, then width freqs
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):
  """Block-diagonal self-attention over packed segments; [N, d] -> [N, d].

  With `options.attention == "flash"` a program compiled for TPU runs the segments through the splash kernel
  (`attention.segment_splash`: rows stay in window order, a segment id per row, no packing); elsewhere, and for
  pieces the kernel does not tile, the segments are packed into [S, L] and attended densely."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    self.options = options
    self.dtype = jnp.dtype(dtype)
    self.precision = precision_for(dtype)
    self.qkv = Linear((d,), (3, n, h), axes=("vision_embed", None, "vision_heads", "head_dim"),
                      use_bias=True, dtype=dtype, rngs=rngs)
    self.proj = Linear((n, h), (d,), axes=("vision_heads", "head_dim", "vision_embed"),
                       use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x_nd: jax.Array, cos_nh: jax.Array, sin_nh: jax.Array, seg, kernel_heads=None,
               full: jax.Array | None = None) -> jax.Array:
    """`seg`: the `Segments` to attend within; or, with `full` (a traced bool: a scanned block's kind), a pair
    (windows, frames) that `full` picks from, in a `lax.cond` around the attention alone (so that the block's
    projections and MLP, forward and backward, compile once, not once per kind). `kernel_heads`: the mesh axes
    the kernel splits heads over (`VisionTower`)."""
    qkv_n3kh = self.qkv(x_nd)
    q_nkh, k_nkh, v_nkh = qkv_n3kh[:, 0], qkv_n3kh[:, 1], qkv_n3kh[:, 2]
    # Rotary in fp32, cast back (HF upcasts q and k for the vision rotary).
    cos, sin = cos_nh[:, None, :], sin_nh[:, None, :]
    rot = lambda t: t.astype(jnp.float32) * cos + rotate_half_by_matmul(t, self.precision) * sin
    q_nkh, k_nkh = rot(q_nkh).astype(self.dtype), rot(k_nkh).astype(self.dtype)
    if full is None:
      out_nkh = self._attend(q_nkh, k_nkh, v_nkh, seg, kernel_heads)
    else:
      windows, frames = seg
      out_nkh = jax.lax.cond(full, lambda q, k, v: self._attend(q, k, v, frames, kernel_heads),
                             lambda q, k, v: self._attend(q, k, v, windows, kernel_heads), q_nkh, k_nkh, v_nkh)
    return self.proj(out_nkh)

  def _attend(self, q_nkh, k_nkh, v_nkh, seg: Segments, kernel_heads) -> jax.Array:
    packed = lambda q, k, v: self._packed(q, k, v, seg)
    length = seg.gather.shape[1]
    if self.options.attention == "flash" and segment_splash_fits(q_nkh.shape[0], length):
      ids = segment_ids(seg, q_nkh.shape[0])
      return jax.lax.platform_dependent(
          q_nkh, k_nkh, v_nkh, cpu=packed, default=packed,
          tpu=lambda q, k, v: segment_splash(q, k, v, ids, length, heads_axes=kernel_heads))
    return packed(q_nkh, k_nkh, v_nkh)

  def _packed(self, q_nkh, k_nkh, v_nkh, seg: Segments) -> jax.Array:
    # Heads first, rows packed into segments: [k, S, L, h], so both GEMMs batch over leading (k, S). Segments
    # are consecutive runs of rows, so when none is padded (e.g. grids the window divides) the packing is a
    # reshape and the gather/scatter round trip is skipped.
    n, k, h = q_nkh.shape
    s, length = seg.gather.shape
    packed = seg.identity
    pack = (lambda a: a.reshape(k, s, length, h)) if packed else (lambda a: a[:, seg.gather])
    q_kslh, k_kslh, v_kslh = (pack(a.transpose(1, 0, 2)) for a in (q_nkh, k_nkh, v_nkh))
    scores = jnp.einsum("kslh,ksmh->kslm", q_kslh, k_kslh, precision=self.precision,
                        preferred_element_type=jnp.float32) * h**-0.5
    probs = attention_weights(scores, seg.valid[None, :, None, :], self.dtype)
    out_kslh = jnp.einsum("kslm,ksmh->kslh", probs, v_kslh, precision=self.precision,
                          preferred_element_type=jnp.float32).astype(self.dtype)
    out_knh = out_kslh.reshape(k, s * length, h)
    return (out_knh if packed else out_knh[:, seg.scatter]).transpose(1, 0, 2)


class VisionBlock(nnx.Module):
  """Pre-norm block: x + attn(norm1(x)); x + mlp(norm2(x)); [N, d] -> [N, d]."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vision_embed", dtype=dtype)
    self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vision_embed", dtype=dtype)
    self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs, options=options)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=True, embed_axis="vision_embed",
                      mlp_axis="vision_mlp", dtype=dtype, rngs=rngs)

  def __call__(self, x_nd, cos_nh, sin_nh, seg, kernel_heads=None, full=None):
    """`seg`, `full`: as `VisionAttention` takes them."""
    x_nd = x_nd + self.attn(self.norm1(x_nd), cos_nh, sin_nh, seg, kernel_heads, full)
    return x_nd + self.mlp(self.norm2(x_nd))


class PatchMerger(nnx.Module):
  """RMSNorm per patch, concat 2x2 patches, Linear -> exact GELU -> Linear; [N, d] -> [N/4, out]."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    merged = cfg.hidden_size * cfg.spatial_merge_size**2
    self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vision_embed", dtype=dtype)
    self.fc1 = Linear((merged,), (merged,), axes=("vision_merged", "vision_merged_out"),
                      use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = Linear((merged,), (cfg.out_hidden_size,), axes=("vision_merged_out", "embed"),
                      use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x_nd: jax.Array) -> jax.Array:
    x = self.ln_q(x_nd)
    x = x.reshape(-1, self.fc1.in_shape[0])  # 4 consecutive rows = one 2x2 block
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # exact erf GELU (nn.GELU())


class VisionTower(nnx.Module):
  """pixel rows [R, N, C*T*P*P] + per-row layouts -> merged tokens [R, N/4, out_hidden] in placeholder order.

  With `options.scan_layers` the blocks are one stacked module run by `lax.scan`; a block's kind (windowed or
  full attention) is a `lax.cond` on its index around the attention alone, so both kinds compile once and the
  rest of the block once for both."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.options = options
    # Conv3d(kernel = stride = (T, P, P)) over one row is a linear map of the flattened row.
    self.patch_embed = Linear((cfg.patch_dim,), (cfg.hidden_size,), axes=("vision_patch", "vision_embed"),
                              use_bias=False, dtype=dtype, rngs=rngs)
    blocks = [VisionBlock(cfg, dtype=dtype, rngs=rngs, options=options) for _ in range(cfg.depth)]
    self.blocks = stack_modules(blocks) if options.scan_layers else nnx.List(blocks)
    self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, pixels_rnp: jax.Array, layout: VisionLayout, *, frozen_blocks: bool = False,
               remat_policy: str = "none") -> jax.Array:
    """`layout`: a batch of padded layouts (`vision_layout.batch_layout`, leaves [R, pieces, ...]). Each piece
    runs on its own, its activations split over the mesh axes `vision_pieces` maps to. `frozen_blocks`: no
    gradient reaches the patch embedding and the blocks (only the merger trains); `remat_policy`
    rematerialises each block in the backward pass."""
    rules = self.options.rules
    r, n, patch_dim = pixels_rnp.shape
    pieces = layout.perm.shape[1]
    pixels_rcpq = pixels_rnp.reshape(r, pieces, n // pieces, patch_dim)
    pixels_rcpq = constrain(pixels_rcpq, ("activation_batch", "vision_pieces", None, None), rules)
    # The batch and piece axes are sharded over the mesh axes the rules give them; a kernel inside (`shard_map`)
    # must know that, or it would gather every row and piece onto every chip.
    mesh = jax.sharding.get_abstract_mesh()
    rows_ax, pieces_ax, heads_ax = (None, None, None) if mesh.empty else logical_to_spec(
        ("activation_batch", "vision_pieces", "vision_heads"), rules, mesh, (r, pieces, self.cfg.num_heads))
    if set(spec_axes(heads_ax)) & set(spec_axes(rows_ax) + spec_axes(pieces_ax)):
      heads_ax = None  # a mesh axis splits one dimension only
    piece = lambda p, perm, rot, win, frm: self._one_piece(p, perm, rot, win, frm, frozen_blocks, remat_policy,
                                                           heads_ax)
    merged_rcmd = jax.vmap(jax.vmap(piece, spmd_axis_name=pieces_ax), spmd_axis_name=rows_ax)(
        pixels_rcpq, layout.perm, layout.rot_pos, layout.windows, layout.frames)
    # Each row's pieces gathered onto the row's chips (not the whole batch onto every chip) for the reorder.
    merged_rcmd = constrain(merged_rcmd, ("activation_batch", None, None, None), rules)
    merged_rmd = merged_rcmd.reshape(r, -1, merged_rcmd.shape[-1])
    out = permute_rows(merged_rmd, layout.unperm, layout.reperm)  # placeholder order
    return constrain(out, ("activation_batch", "activation_length", "activation_embed"), rules)

  def _one_piece(self, pixels_np, perm, rot_pos, windows: Segments, frames: Segments, frozen_blocks: bool,
                 remat_policy: str, kernel_heads=None) -> jax.Array:
    """One piece's pixel rows [P, patch_dim] -> its merged tokens [P/4, out_hidden] in window order."""
    # Pixels are rounded to the tower's dtype first (HF casts pixel_values to visual.dtype).
    x_nd = self.patch_embed(pixels_np.astype(self.dtype)[perm])
    cos_nh, sin_nh = vision_rotary(rot_pos, self.cfg)
    full = frozenset(self.cfg.fullatt_block_indexes)

    def run(block, x, is_full):
      if isinstance(is_full, bool):
        return block(x, cos_nh, sin_nh, frames if is_full else windows, kernel_heads)
      return block(x, cos_nh, sin_nh, (windows, frames), kernel_heads, full=is_full)

    if self.options.scan_layers:
      kinds = jnp.asarray([i in full for i in range(self.cfg.depth)])
      x_nd, _ = scan_modules(lambda block, x, is_full: (run(block, x, is_full), None), self.blocks, x_nd, kinds,
                             remat_policy=remat_policy,
                             staged_rules=self.options.rules if self.options.staged_gradients else None)
    else:
      for i, block in enumerate(self.blocks):
        if remat_policy == "none":
          x_nd = run(block, x_nd, i in full)
        else:  # split, so that only arrays cross jax.checkpoint
          graphdef, state = nnx.split(block)
          x_nd = remat(lambda state, x, f=i in full: run(nnx.merge(graphdef, state), x, f), remat_policy)(state, x_nd)
    if frozen_blocks:
      x_nd = jax.lax.stop_gradient(x_nd)
    return self.merger(x_nd)
