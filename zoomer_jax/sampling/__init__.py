"""Generation: jitted prefill / extend / decode around the KV cache, with stop tokens and stop strings."""

from zoomer_jax.sampling.sampler import (STOP_LENGTH, STOP_NONE, STOP_STRING, STOP_TOKEN, DecodeOut, SamplingParams,
                                         StopCriteria, decode, decode_weights, extend, prefill,
                                         restrict_vocab, sample)

__all__ = ["DecodeOut", "STOP_LENGTH", "STOP_NONE", "STOP_STRING", "STOP_TOKEN", "SamplingParams", "StopCriteria",
           "decode", "decode_weights", "extend", "prefill", "restrict_vocab", "sample"]
