"""Every numerical tolerance the tests use, in one place (max absolute differences unless stated)."""

# Our fp32 logits vs transformers' fp32 eager logits on tiny random configs (measured ~1e-5).
LOGITS_FP32 = 1e-4
# Our bf16 logits vs transformers' bf16 eager logits: both round activations to bf16 at every layer, but
# in different places (fp32-accumulated GEMMs vs torch CPU bf16 kernels), so they drift apart by a few bf16
# ulps of the logits' scale. Stated relative to max |logit|.
LOGITS_BF16_REL = 5e-2
# bf16 vs fp32 of our own model, relative to max |logit| (bounds the bf16 rounding itself).
OURS_BF16_VS_FP32_REL = 5e-2
# KV-cache decode vs one full forward, fp32.
KV_CACHE_FP32 = 1e-5
# Log-probs recorded while sampling vs one teacher-forced forward over the finished sequence, fp32 (GRPO's
# importance ratio needs the two to agree).
LOGPROB_FP32 = 1e-4
# Vocabulary-chunked log-probs / entropies vs float64 numpy, fp32 inputs (only the summation order differs;
# measured ~2e-6 on logits of std ~3, and up to 1.0e-5 on the entropy with one vocabulary column per online
# rescaling step, a thousand sequential rescalings).
CHUNKED_LOGPROB_FP32 = 2e-5
# bf16 h and w (or a bf16 model) with the model's bf16 rounding of the logits, vs float64 on the same rounded
# logits; in units of one bf16 ulp of the largest |logit|. Only the summation order differs in principle
# (measured ~5e-6), but XLA:CPU's YNNPACK fusion of the full-logits path may round the bf16 logits
# differently (measured 0.03 on logits up to ~15, half an ulp; 1.5e-6 with
# --xla_cpu_experimental_ynn_fusion_type= ), and the model's own logits are subject to the same.
LOGPROB_BF16_ULPS = 1.0
# Gradients (w.r.t. hidden states, head and model parameters) of chunked vs plain autodiff, relative to the
# largest gradient entry, fp32.
CHUNKED_GRAD_FP32_REL = 1e-5
# Synthetic zoom task (tests/test_synthetic.py): a pixel "shows class c" when its RGB lies within this max-channel
# distance of c's colour after mp4v coding, and a frame shows c when at least SYNTH_MIN_PIXELS pixels do (the
# smallest object, the ring at 112x112, covers ~490 px; chroma bleed at edges gives a few dozen at most).
SYNTH_COLOUR_DIST = 45
SYNTH_MIN_PIXELS = 100
# Where the answer object would be, an overview frame without objects differs from its background colour by at
# most this much (measured <= 7 levels: plain I-frame coding error; a P-frame ghost of the vanished object is 16-23).
SYNTH_GHOST_MAX = 12
# zoomer_jax.cost's matmul-only FLOP count vs XLA's cost analysis of the compiled forward, relative. XLA also
# counts element-wise ops (norms, rotary, softmax, activations, masks), ~1-3% of the total on the test configs.
COST_FLOPS_REL = 0.05
# The model's CPU fast paths vs float64 references (test_model_fast_paths): attention in query blocks and the
# vision segment packing, fp32 (absolute, values O(1)); the same in bf16, where the probabilities and the output
# are rounded to bf16 (absolute); tied logits in either matmul layout, fp32, relative to max |logit|; a bf16
# result's own rounding (2^-9 relative per element), relative to the largest element.
ATTENTION_FP32 = 1e-5
ATTENTION_BF16 = 2e-2
LOGITS_LAYOUT_FP32_REL = 1e-5
# A Linear layer in either kernel layout vs the float64 product, fp32, relative to the largest output element.
LINEAR_FP32_REL = 1e-5
BF16_ROUNDING_REL = 1e-2
# A training job on two processes (4 CPU devices each) vs one process of 8 devices, same mesh: the same programs,
# but cross-process reductions go through gloo in another order. Relative; measured <= 1e-7 (SFT loss, GRPO KL and
# grad norm). GRPO rollouts are compared exactly (the same tokens: host-side metrics must be equal).
MULTIPROCESS_LOSS_REL = 1e-5
MULTIPROCESS_GRAD_REL = 1e-4
# One fp32 job under two layouts of the same mesh (a row's images in pieces on its chips vs the vision tower's
# heads split over them): the same arithmetic, summed in another order. Relative (loss, gradient norm).
LAYOUT_FP32_REL = 1e-5
# Agent rollout log-probs on two processes vs one (same 8-device mesh, the same forced tokens): only the order of
# cross-process reductions differs (measured 0: bit-identical on 2 x 4 CPU devices).
MULTIPROCESS_LOGPROB_FP32 = 1e-5
# zoomer_jax.aot's cost probes (1- and 2-layer programs, extrapolated linearly in depth) vs XLA's cost analysis of
# the whole program compiled unrolled, relative (FLOPs and bytes accessed). Only fusion decisions at the layer
# boundaries differ.
AOT_PROBE_REL = 0.02
# Ragged paged attention (plain JAX, an online softmax over pages) vs the dense cache's attention and vs jax's
# reference of the TPU kernel, on the same keys and values, fp32; only the order of the sums differs.
PAGED_ATTENTION_FP32 = 1e-5
# Logits of a ragged step over the paged cache vs the dense cache's prefill / extend of each sequence alone, fp32:
# only the order of the attention sums and of the vision tower's packing differs (measured 3e-6).
PAGED_STEP_LOGITS_FP32 = 2e-5
