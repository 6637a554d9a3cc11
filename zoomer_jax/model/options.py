"""How the model is computed, as opposed to what it is (`ModelConfig`): layer stacking, attention kernels and the
logical-axis rules its activations are laid out by.

    model = Qwen25VL(cfg, dtype="bfloat16", options=ModelOptions(scan_layers=True, attention="flash"))

Every option keeps the function the same: a scanned model loads, exports and computes what the unrolled one does.
Job configs carry them as `cfg.impl` and the rules table as `cfg.mesh.rules` (`train.trainer.model_options`).
"""

from __future__ import annotations

import dataclasses
from zoomer_jax.parallel.rules import DEFAULT_RULES, Rules, check_rules

ATTENTION = ("dot_product", "flash", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """scan_layers: decoder layers and vision blocks are stored stacked ([layers, ...], logical axis "layers") and
    run by `lax.scan`, so compile time does not grow with depth (MaxText's `scan_layers`). False keeps one module
    per layer, as on CPU, where slicing stacked weights costs a copy per step.
  attention: "dot_product" computes whole score matrices (in query blocks on CPU); "flash" uses a kernel that
    never holds them: splash attention on TPU for self-attention without a cache, and everywhere a blockwise
    online softmax over the KV cache for prefill and extend chunks. "cudnn" is "flash" with cuDNN's fused kernel
    for self-attention without a cache (GPU runs; right-padded rows). The dense path stays the reference.
  rules: logical axis name -> mesh axes, for parameters (`axes` metadata) and activations (`constrain`).
  attention_block: the splash kernel's tile (queries and keys, forward and backward; a multiple of 128, capped
    by the sequence). Larger tiles feed the matrix units longer per step at the cost of more masked work on the
    causal diagonal; MaxText's published v6e recipes run 2048.
  staged_gradients: each scanned layer's weight gradients are reduced one mesh axis at a time (a weight split
    over fsdp x tensor: a reduce-scatter over fsdp, then one over tensor; `parallel.rules.reduce_in_stages`), where
    XLA's TPU compiler would otherwise all-reduce the whole gradient over every chip and keep a slice (v6e).
  """

  scan_layers: bool = False
  attention: str = "dot_product"
  rules: Rules = DEFAULT_RULES
  attention_block: int = 512
  staged_gradients: bool = False

  def __post_init__(self):
    if self.attention not in ATTENTION:
      raise ValueError(f"attention {self.attention!r} is not one of {list(ATTENTION)}")
    if self.attention_block < 128 or self.attention_block % 128:
      raise ValueError(f"impl.attention_block {self.attention_block} is not a positive multiple of 128")
    object.__setattr__(self, "rules", check_rules(self.rules))


def options_from_config(impl, rules) -> ModelOptions:
  """A config's `impl` section (scanned layers, attention kernel and its tile, staged gradient reduction) with the
  rules table."""
  return ModelOptions(scan_layers=impl.scan_layers, attention=impl.attention, rules=rules,
                      attention_block=impl.attention_block, staged_gradients=impl.staged_gradients)
