"""Text side of the model: the Qwen2 tokenizer and chat rendering straight to token ids."""

from zoomer_jax.text.chat import ImageSlot, RenderedIds, Transcript, render_messages, render_text
from zoomer_jax.text.tokenizer import (CHAT_TEMPLATE, TINY_SPECIAL_IDS, Tokenizer, build_tiny_tokenizer,
                                       load_tokenizer)

__all__ = ["CHAT_TEMPLATE", "ImageSlot", "RenderedIds", "TINY_SPECIAL_IDS", "Tokenizer", "Transcript",
           "build_tiny_tokenizer", "load_tokenizer", "render_messages", "render_text"]
