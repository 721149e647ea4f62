// Every fastllm op schema, in one list. registration.cpp defines them in the `fastllm`
// library; the host build of the CUDA kernels (SIMT emulation, tests only) defines the
// same schemas in `fastllm_emu`, so the emulated CUDA path is called exactly like the
// real one.
#pragma once

#define FASTLLM_NORM_SCHEMAS(X)                                                           \
  X("layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, " \
    "float eps) -> (Tensor out, Tensor mean, Tensor rstd)")                               \
  X("add_layer_norm_fwd(Tensor input, Tensor residual, int[] normalized_shape, "       \
    "Tensor? weight, Tensor? bias, float eps) -> (Tensor out, Tensor residual_out, "       \
    "Tensor mean, Tensor rstd)")                                                          \
  X("layer_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor input, "           \
    "int[] normalized_shape, Tensor? weight, Tensor mean, Tensor rstd, "               \
    "bool weight_grad, bool bias_grad) -> (Tensor grad_input, Tensor grad_weight, "       \
    "Tensor grad_bias)")                                                                  \
  X("rms_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, float eps) "   \
    "-> (Tensor out, Tensor rstd)")                                                       \
  X("add_rms_norm_fwd(Tensor input, Tensor residual, int[] normalized_shape, "         \
    "Tensor? weight, float eps) -> (Tensor out, Tensor residual_out, Tensor rstd)")       \
  X("rms_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor input, "             \
    "int[] normalized_shape, Tensor? weight, Tensor rstd, bool weight_grad) "          \
    "-> (Tensor grad_input, Tensor grad_weight)")

#define FASTLLM_CROSS_ENTROPY_SCHEMAS(X)                                                  \
  X("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "  \
    "float label_smoothing, float z_loss, float softcap) -> (Tensor loss, Tensor lse, "     \
    "Tensor correct)")                                                                    \
  X("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "  \
    "Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap) "  \
    "-> Tensor grad_logits")                                                              \
  X("cross_entropy_bwd_inplace(Tensor grad_loss, Tensor(a!) logits, Tensor target, "      \
    "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, " \
    "float softcap) -> ()")                                                               \
  /* CPU only: the in-place backward of a block of classes (cross_entropy.h, BwdParams) */ \
  X("cross_entropy_bwd_block_inplace(Tensor grad_loss, Tensor(a!) logits, Tensor target, " \
    "Tensor? weight, Tensor lse, Tensor? lse_split, int class_offset, int num_classes, "  \
    "int ignore_index, float label_smoothing, float z_loss, float softcap) -> ()")      \
  /* CPU only, float32, AVX-512 or AVX2: out = a @ (b.T if b_transposed else b) (+ bias),  */ \
  /* fastllm's own GEMM for linear cross-entropy's chunks (common/gemm_cpu.h) */            \
  X("linear_mm_out(Tensor a, Tensor b, bool b_transposed, Tensor? bias, Tensor(a!) out) "  \
    "-> ()")                                                                              \
  /* CPU only, float32, AVX-512 or AVX2: out (+)= grad.T @ input (a linear layer's weight */ \
  /* gradient; out += when accumulate), for linear cross-entropy's chunks (gemm_cpu.h) */   \
  X("linear_weight_grad_out(Tensor grad, Tensor input, bool accumulate, Tensor(a!) out) "  \
    "-> ()")

// q (B, Tq, H, D) / k, v (B, Tk, Hkv, D), or packed (total, heads, D) with cu_seqlens; see
// csrc/attention/attention.h for the math and csrc/attention/attention_glue.h for the checks.
#define FASTLLM_ATTENTION_OPTIONS                                                         \
  "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, "     \
  "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, " \
  "float softcap, Tensor? alibi_slopes, float dropout_p, Tensor? dropout_seed, "          \
  "Tensor? attn_bias=None, Tensor? key_padding_mask=None"
#define FASTLLM_ATTENTION_SCHEMAS(X)                                                      \
  X("attention_fwd(Tensor q, Tensor k, Tensor v, " FASTLLM_ATTENTION_OPTIONS              \
    ") -> (Tensor out, Tensor lse)")                                                      \
  X("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "   \
    FASTLLM_ATTENTION_OPTIONS ", bool bias_grad=False) -> (Tensor dq, Tensor dk, Tensor dv, "  \
    "Tensor dbias)")

// out = act(gate) * up, act = activation ('silu', 'gelu', 'gelu_tanh'); up = None: gate holds
// both halves (..., 2N). See csrc/gated_mlp/gated_mlp.h and gated_mlp_glue.h.
#define FASTLLM_GATED_MLP_SCHEMAS(X)                                                      \
  X("gated_mlp_fwd(Tensor gate, Tensor? up, str activation) -> Tensor out")               \
  X("gated_mlp_bwd(Tensor grad_out, Tensor gate, Tensor? up, str activation) "            \
    "-> (Tensor grad_gate, Tensor grad_up)")

// Rotary position embeddings: out = x rotated pairwise by the angles of cos / sin at each
// token's position (conjugate = true: the inverse rotation, i.e. backward). x (B, T, H, D) or
// packed (total, H, D) with cu_seqlens (B + 1,) int32; cos, sin (max_T, R / 2); position_ids
// None (positions position_offset + t), (B,) per-sequence offsets (+ t) or (B, T) positions.
// The _inplace variants rotate x (q, k) in place. See csrc/rotary/rotary.h and rotary_glue.h.
#define FASTLLM_ROTARY_OPTIONS                                                            \
  "Tensor cos, Tensor sin, Tensor? position_ids, Tensor? cu_seqlens, int position_offset, " \
  "bool interleaved, bool conjugate"
#define FASTLLM_ROTARY_SCHEMAS(X)                                                         \
  X("rotary_fwd(Tensor x, " FASTLLM_ROTARY_OPTIONS ") -> Tensor out")                      \
  X("rotary_fwd_inplace(Tensor(a!) x, " FASTLLM_ROTARY_OPTIONS ") -> ()")                  \
  X("rotary_qk_fwd(Tensor q, Tensor k, " FASTLLM_ROTARY_OPTIONS                            \
    ") -> (Tensor q_out, Tensor k_out)")                                                  \
  X("rotary_qk_fwd_inplace(Tensor(a!) q, Tensor(b!) k, " FASTLLM_ROTARY_OPTIONS ") -> ()")

// Every family's list; registration.cpp and the emulation build define exactly these.
#define FASTLLM_ALL_SCHEMAS(X)                                                            \
  FASTLLM_NORM_SCHEMAS(X) FASTLLM_CROSS_ENTROPY_SCHEMAS(X) FASTLLM_ATTENTION_SCHEMAS(X)   \
  FASTLLM_GATED_MLP_SCHEMAS(X) FASTLLM_ROTARY_SCHEMAS(X)
