"""zoomer_jax: VideoZoomer (active temporal zoom for long-video QA) on Qwen2.5-VL in JAX/Flax NNX."""

from zoomer_jax.checkpoint.hf_export import export_hf
from zoomer_jax.checkpoint.hf_import import CheckpointError, load_hf
from zoomer_jax.model.config import ModelConfig, TextConfig, VisionConfig
from zoomer_jax.model.kv_cache import KVCache
from zoomer_jax.model.qwen25vl import Qwen25VL

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "Qwen25VL", "TextConfig", "VisionConfig", "export_hf",
           "load_hf"]
__version__ = "0.1.0"
