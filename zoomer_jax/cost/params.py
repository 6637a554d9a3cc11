"""Parameter counts of Qwen2.5-VL from its config, by tower and part, and their size on one chip of a mesh.

`param_table` lists every parameter `zoomer_jax.model` creates -- its path (layer index as `*`), shape and
logical axes -- with how many layers repeat it:

    vision: patch_embed [C*T*P*P, d] (no bias); per block norm1, norm2 [d], qkv [d, 3, n, h] + [3, n, h],
            proj [n, h, d] + [d], SwiGLU gate/up [d, I] + [I], down [I, d] + [d];
            merger ln_q [d], fc1 [4d, 4d] + [4d], fc2 [4d, out] + [out]
    text:   embed [V, D]; per layer 2 norms [D], q [D, n, h] + [n, h], k and v [D, k, h] + [k, h],
            o [n, h, D] (no bias), SwiGLU gate/up/down without biases; final norm [D]
    head:   lm_head [D, V] unless tie_word_embeddings

`params_per_chip` shards that table with the same rules table the trainer uses
(`zoomer_jax.parallel.rules`): a mesh axis that does not divide a dimension leaves it replicated, so e.g.
tensor = 8 cannot split Qwen2.5-VL-7B's 4 kv heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from zoomer_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamEntry:
  path: str  # e.g. "model.layers.*.self_attn.q_proj.kernel"
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  repeat: int = 1  # layers / blocks that hold one each

  @property
  def size(self) -> int:
    return self.repeat * math.prod(self.shape)

  @property
  def part(self) -> str:
    """vision_patch_embed | vision_blocks | vision_merger | text_embed | text_layers | text_norm | lm_head"""
    head = self.path.split(".")
    if head[0] == "visual":
      return {"patch_embed": "vision_patch_embed", "blocks": "vision_blocks", "merger": "vision_merger"}[head[1]]
    if head[0] == "lm_head":
      return "lm_head"
    return {"embed_tokens": "text_embed", "layers": "text_layers", "norm": "text_norm"}[head[1]]


def param_table(cfg: ModelConfig) -> list[ParamEntry]:
  v, t = cfg.vision, cfg.text
  d, vi, vn, vh = v.hidden_size, v.intermediate_size, v.num_heads, v.head_dim
  m = d * v.spatial_merge_size**2
  ve, vm = "vision_embed", "vision_mlp"
  blk = lambda name, shape, axes: ParamEntry(f"visual.blocks.*.{name}", shape, axes, v.depth)
  out = [ParamEntry("visual.patch_embed.kernel", (v.patch_dim, d), ("vision_patch", ve))]
  out += [blk("norm1.weight", (d,), (ve,)), blk("norm2.weight", (d,), (ve,)),
          blk("attn.qkv.kernel", (d, 3, vn, vh), (ve, None, "vision_heads", "head_dim")),
          blk("attn.qkv.bias", (3, vn, vh), (None, "vision_heads", "head_dim")),
          blk("attn.proj.kernel", (vn, vh, d), ("vision_heads", "head_dim", ve)), blk("attn.proj.bias", (d,), (ve,))]
  for name in ("gate_proj", "up_proj"):
    out += [blk(f"mlp.{name}.kernel", (d, vi), (ve, vm)), blk(f"mlp.{name}.bias", (vi,), (vm,))]
  out += [blk("mlp.down_proj.kernel", (vi, d), (vm, ve)), blk("mlp.down_proj.bias", (d,), (ve,))]
  out += [ParamEntry("visual.merger.ln_q.weight", (d,), (ve,)),
          ParamEntry("visual.merger.fc1.kernel", (m, m), ("vision_merged", "vision_merged_out")),
          ParamEntry("visual.merger.fc1.bias", (m,), ("vision_merged_out",)),
          ParamEntry("visual.merger.fc2.kernel", (m, v.out_hidden_size), ("vision_merged_out", "embed")),
          ParamEntry("visual.merger.fc2.bias", (v.out_hidden_size,), ("embed",))]

  D, n, k, h, inter = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
  lay = lambda name, shape, axes: ParamEntry(f"model.layers.*.{name}", shape, axes, t.num_hidden_layers)
  out.append(ParamEntry("model.embed_tokens.embedding", (t.vocab_size, D), ("vocab", "embed")))
  out += [lay("input_layernorm.weight", (D,), ("embed",)), lay("post_attention_layernorm.weight", (D,), ("embed",)),
          lay("self_attn.q_proj.kernel", (D, n, h), ("embed", "q_heads", "head_dim")),
          lay("self_attn.q_proj.bias", (n, h), ("q_heads", "head_dim"))]
  for name in ("k_proj", "v_proj"):
    out += [lay(f"self_attn.{name}.kernel", (D, k, h), ("embed", "kv_heads", "head_dim")),
            lay(f"self_attn.{name}.bias", (k, h), ("kv_heads", "head_dim"))]
  out += [lay("self_attn.o_proj.kernel", (n, h, D), ("q_heads", "head_dim", "embed")),
          lay("mlp.gate_proj.kernel", (D, inter), ("embed", "mlp")),
          lay("mlp.up_proj.kernel", (D, inter), ("embed", "mlp")),
          lay("mlp.down_proj.kernel", (inter, D), ("mlp", "embed")),
          ParamEntry("model.norm.weight", (D,), ("embed",))]
  if not t.tie_word_embeddings:
    out.append(ParamEntry("lm_head.kernel", (D, t.vocab_size), ("embed", "vocab")))
  return out


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts by part; `vision`, `text` (decoder incl. embeddings), `lm_head` and `total`."""

  vision_patch_embed: int
  vision_blocks: int
  vision_merger: int
  text_embed: int
  text_layers: int
  text_norm: int
  lm_head: int  # 0 when tied to the embedding table

  @property
  def vision(self) -> int:
    return self.vision_patch_embed + self.vision_blocks + self.vision_merger

  @property
  def text(self) -> int:
    """The language model as HF counts it: embeddings, layers, final norm and the (untied) lm_head."""
    return self.text_embed + self.text_layers + self.text_norm + self.lm_head

  @property
  def total(self) -> int:
    return self.vision + self.text

  @property
  def text_non_embedding(self) -> int:
    """Decoder layers and final norm: the parameters every text token multiplies through."""
    return self.text_layers + self.text_norm

  def as_dict(self) -> dict[str, int]:
    d = dataclasses.asdict(self)
    d.update(vision=self.vision, text=self.text, total=self.total)
    return d


def param_counts(cfg: ModelConfig) -> ParamCounts:
  parts = {f.name: 0 for f in dataclasses.fields(ParamCounts)}
  for e in param_table(cfg):
    parts[e.part] += e.size
  return ParamCounts(**parts)


def text_layer_params(cfg: ModelConfig) -> int:
  return sum(math.prod(e.shape) for e in param_table(cfg) if e.part == "text_layers")


def vision_block_params(cfg: ModelConfig) -> int:
  return sum(math.prod(e.shape) for e in param_table(cfg) if e.part == "vision_blocks")


class _Mesh:
  """The two attributes `logical_to_spec` reads from a mesh."""

  def __init__(self, sizes: dict[str, int]):
    self.shape = sizes


def params_per_chip(cfg: ModelConfig, fsdp: int, tensor: int, parts: Sequence[str] | None = None,
                    rules=None) -> float:
  """Parameters one chip holds when the table is sharded over (fsdp, tensor) by the rules (replicated over
  data). `parts` restricts to some `ParamEntry.part`s (e.g. the trainable ones)."""
  from zoomer_jax.parallel.rules import DEFAULT_RULES, logical_to_spec  # noqa: PLC0415 (imports jax)
  mesh = _Mesh({"data": 1, "fsdp": fsdp, "tensor": tensor})
  total = 0.0
  for e in param_table(cfg):
    if parts is not None and e.part not in parts:
      continue
    spec = logical_to_spec(e.axes, rules or DEFAULT_RULES, mesh, e.shape)
    used = [a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))]
    total += e.size / math.prod(mesh.shape[a] for a in used)
  return total
