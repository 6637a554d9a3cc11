"""Every numerical tolerance the tests use, in one place (max absolute differences unless stated)."""

# Our fp32 logits vs transformers' fp32 eager logits on tiny random configs (measured ~1e-5).
LOGITS_FP32 = 1e-4
# Our bf16 logits vs transformers' bf16 eager logits: both round activations to bf16 at every layer, but
# in different places (fp32-accumulated GEMMs vs torch CPU bf16 kernels), so they drift apart by a few bf16
# ulps of the logits' scale. Stated relative to max |logit|.
LOGITS_BF16_REL = 5e-2
# bf16 vs fp32 of our own model, relative to max |logit| (bounds the bf16 rounding itself).
OURS_BF16_VS_FP32_REL = 5e-2
# KV-cache decode vs one full forward, fp32 (the bar).
KV_CACHE_FP32 = 1e-5
# Log-probs recorded while sampling vs one teacher-forced forward over the finished sequence, fp32 (the bar
# of issue #5: GRPO's ratio needs the two to agree).
LOGPROB_FP32 = 1e-4
