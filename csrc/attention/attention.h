// Fused (FlashAttention-style) attention: the torch-free interface shared by the CPU kernels
// (attention_cpu.cpp), the torch glue and the C++ tests. Nothing here includes torch or CUDA
// headers.
//
// Math, per batch b, query head h (kv head hk = h / (H / Hkv): GQA / MQA share one kv head
// among H / Hkv consecutive query heads) and query row i:
//   s_ij  = softmax_scale * <q_i, k_j>                 for the allowed keys j (mask below)
//   s_ij <- softcap * tanh(s_ij / softcap)              only when softcap > 0 (Gemma 2)
//   lse_i = log(sum_j exp(s_ij))                        (natural log, float32)
//   p_ij  = exp(s_ij - lse_i),  out_i = sum_j p_ij v_j
// Backward, with D_i = <dout_i, out_i>:
//   dv_j  = sum_{h in group(hk), i} p_ij dout_i
//   dp_ij = <dout_i, v_j>,  ds_ij = p_ij (dp_ij - D_i)
//           (softcap > 0: ds_ij *= 1 - tanh^2(s_raw_ij / softcap), the derivative of the cap)
//   dq_i  = softmax_scale * sum_j ds_ij k_j
//   dk_j  = softmax_scale * sum_{h in group(hk), i} ds_ij q_i
// Scores also get, when enabled (in this order):
//   ALiBi:    s_ij += -slope_{b,h} * |i + Tk_b - Tq_b - j|   (bottom-right aligned positions,
//             FlashAttention's convention; added after the softcap)
//   Bias:     s_ij += attn_bias[b, h, i, j]                 (additive, after ALiBi; T5's
//             relative-position bias, BERT's additive padding mask, any (L, S) mask)
// Mask: key j is allowed for query i iff j < Tk_b and key_padding_mask[b, j] (when given) and
//   lo(i) <= j <= hi(i),  with d = Tk_b - Tq_b (bottom-right alignment, FlashAttention's and
//   the KV-cache convention: the last query sees the last key),
//   lo(i) = i + d - window_left   (or 0 when window_left < 0),
//   hi(i) = i + d + window_right  (or Tk_b - 1 when window_right < 0; causal sets
//                                  window_right = min(window_right, 0), i.e. 0 when unbounded).
// A row with no allowed key (e.g. causal with Tq > Tk: rows i < Tq - Tk) gets out = 0,
// lse = -inf and zero gradients, never NaN. So does a row whose allowed scores are all -inf
// (an additive mask of -inf over the whole row): kernels must not form exp(-inf - (-inf));
// the row max is taken as 0 when it is -inf, and backward takes p_ij = 0 where lse_i = -inf.
// Bias gradient (bias_grad): dbias_ij = p_ij (dp_ij - D_i) (with dropout's z_ij in dp_ij),
// the gradient of the score after the softcap, i.e. before softcap's derivative; 0 where
// key j is not allowed for query i.
// Dropout (dropout_p > 0): after the softmax, p_ij is kept with probability 1 - dropout_p
// and scaled by 1 / (1 - dropout_p), else zeroed; lse is that of the undropped scores. The
// keep decision is a pure function of (seed, b, h, i, j) (dropout_keep below), so every
// backend draws the same mask and backward recomputes it; no mask is ever stored.
// Backward with dropout: dv_j = sum_i z_ij p_ij dout_i, dp_ij = z_ij <dout_i, v_j>, with
// z_ij = keep_ij / (1 - dropout_p), and D_i = <dout_i, out_i> as above.
// Arithmetic accumulates in the "acc type": double for kFloat64, float otherwise.
//
// Per-sequence lengths (b = batch index):
//   - padded batches (cu_seqlens_q == nullptr): Tq_b = Tq;  q/out/dout/dq row (b, i) at
//     b * stride.b + i * stride.t.
//   - packed variable-length batches (cu_seqlens_q != nullptr, (B + 1,) int32 prefix sums):
//     Tq_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b] <= Tq (= max_seqlen_q); row (b, i) at
//     (cu_seqlens_q[b] + i) * stride.t (stride.b is ignored). Likewise cu_seqlens_k for k, v,
//     dk, dv with Tk.
//   - seqused_k ((B,) int32, optional; the KV cache): only the first Tk_b = seqused_k[b]
//     keys of sequence b are used (Tk_b <= the sequence's key count); it wins over the length
//     from cu_seqlens_k.
//   cu_seqlens_q and cu_seqlens_k are independent (packed queries may attend a padded
//   cache). dk / dv rows of stored keys past seqused_k[b] are written as 0.
//   The caller guarantees these values (the torch glue checks them on the CPU); the CPU
//   kernels only check each length against seqlen_q / seqlen_k / the stored key count.
//   lse_stride_h (and lse_stride_b for padded B > 1) must be set; 0 is rejected.
//
// Glossary: B batch, Tq / Tk query / key sequence lengths (maxima in varlen mode), H query
// heads, Hkv kv heads (H % Hkv == 0), D head dim (any D >= 1; the kernels pad to their
// vector width internally).
// Layout: every (B, T, H, D) tensor is given by its base pointer and its strides in elements,
// one per dim (Strides4), so transposed or sliced inputs and outputs need no copy. lse is
// indexed lse[b * lse_stride_b + h * lse_stride_h + (cu_seqlens_q ? cu_seqlens_q[b] : 0) + i]
// in the acc type (float32; double for kFloat64): (B, H, Tq) contiguous for padded batches,
// (H, total_q) for packed ones, FlashAttention's layouts.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace fastllm {
namespace attention {

// Strides, in elements, of a (B, T, heads, D) tensor.
struct Strides4 {
  int64_t b = 0;
  int64_t t = 0;
  int64_t h = 0;
  int64_t d = 1;
};

// What forward and backward agree on.
struct Problem {
  int64_t batch = 0;         // B
  int64_t seqlen_q = 0;      // Tq
  int64_t seqlen_k = 0;      // Tk
  int64_t num_heads = 0;     // H
  int64_t num_kv_heads = 0;  // Hkv, divides H
  int64_t head_dim = 0;      // D
  double softmax_scale = 0;  // usually 1 / sqrt(D)
  bool causal = false;       // bottom-right aligned when Tq != Tk (see the mask above)
  int64_t window_left = -1;  // sliding window (local) attention; -1 = unbounded
  int64_t window_right = -1;
  double softcap = 0;        // logit soft-capping; 0 = off
  DType dtype = DType::kFloat32;  // of q, k, v, out, dout, dq, dk, dv

  // Variable lengths (see above); all optional. On CUDA these are device pointers.
  const int32_t* cu_seqlens_q = nullptr;  // (B + 1,) packed queries
  const int32_t* cu_seqlens_k = nullptr;  // (B + 1,) packed keys / values
  const int32_t* seqused_k = nullptr;     // (B,) keys used per sequence (KV cache)
  // Rows of the packed q / k tensors: the CUDA kernels clamp the values above to them
  // (the CUDA glue does not read them: that would need a host sync), so a bad value gives
  // a wrong row, never an access outside the tensors.
  int64_t total_q = 0;
  int64_t total_k = 0;

  // ALiBi: slope of (b, h) at alibi_slopes[b * alibi_stride_b + h] (float32; stride 0 for
  // per-head (H,) slopes); nullptr = off.
  const float* alibi_slopes = nullptr;
  int64_t alibi_stride_b = 0;

  // Additive score bias (padded batches only): the element of (b, h, i, j) at
  // attn_bias[b * bias_stride_b + h * bias_stride_h + i * bias_stride_q + j * bias_stride_k]
  // in the problem's dtype (float32 for kFloat32, ..., like q). Strides may be 0: a bias
  // broadcast over batch, heads, queries or keys costs only its own storage. nullptr = off.
  // h is the query head.
  const void* attn_bias = nullptr;
  int64_t bias_stride_b = 0;
  int64_t bias_stride_h = 0;
  int64_t bias_stride_q = 0;
  int64_t bias_stride_k = 0;

  // Key padding mask (padded batches only): key j of sequence b takes part iff
  // key_padding_mask[b * kpm_stride_b + j * kpm_stride_k] != 0 (one byte per key, torch's
  // bool). It combines with seqused_k and the window (a key must pass all). nullptr = off.
  const uint8_t* key_padding_mask = nullptr;
  int64_t kpm_stride_b = 0;
  int64_t kpm_stride_k = 0;

  // Dropout on the attention probabilities; 0 = off. dropout_seed points at one int64 (a
  // device pointer on CUDA, so a seed drawn on the GPU needs no host sync).
  double dropout_p = 0;
  const int64_t* dropout_seed = nullptr;

  // lse strides (see above), in elements.
  int64_t lse_stride_b = 0;
  int64_t lse_stride_h = 0;
};

// The inputs forward and backward share.
struct QkvParams : Problem {
  const void* q = nullptr;  // (B, Tq, H, D)
  Strides4 stride_q;
  const void* k = nullptr;  // (B, Tk, Hkv, D)
  Strides4 stride_k;
  const void* v = nullptr;  // (B, Tk, Hkv, D)
  Strides4 stride_v;
};

struct FwdParams : QkvParams {
  void* out = nullptr;  // (B, Tq, H, D)
  Strides4 stride_out;
  void* lse = nullptr;  // acc type (float32; double for kFloat64), strides in Problem
  // No backward will recompute this forward's scores against its lse (no input requires
  // grad: inference, decoding). The CPU may then run its decode kernel, which sums the
  // scores in another order than the backward's products (at scores near 1e5 that
  // difference alone exceeded the tests' accuracy rule for dv).
  bool no_backward = false;
};

struct BwdParams : QkvParams {
  const void* out = nullptr;  // (B, Tq, H, D): forward's output
  Strides4 stride_out;
  const void* dout = nullptr;  // (B, Tq, H, D)
  Strides4 stride_dout;
  const void* lse = nullptr;  // forward's lse, acc type, strides in Problem
  void* dq = nullptr;         // (B, Tq, H, D)
  Strides4 stride_dq;
  void* dk = nullptr;  // (B, Tk, Hkv, D), summed over the H / Hkv query heads of each kv head
  Strides4 stride_dk;
  void* dv = nullptr;  // (B, Tk, Hkv, D), likewise
  Strides4 stride_dv;
  // The bias gradient, when asked for (attn_bias set and bias_grad): (B, H, Tq, Tk) in the
  // problem's dtype, contiguous, ZEROED by the glue before the call; the kernels store
  // dbias_ij (see above) for every (b, h, i, j) whose score they compute (each exactly once:
  // h is the query head, so no two programs write one element) and may skip the rest.
  // nullptr = not asked for.
  void* dbias = nullptr;
};

// CPU kernels (attention_cpu.cpp has the design): OpenMP over (batch, head, query block) in
// forward; backward in one pass per (batch, kv head) when there are enough of them for the
// threads, else a dk/dv pass over (batch, kv head, key block) and a dq pass, with
// bit-identical results either way and for any thread count. AVX-512 or AVX2/FMA when the
// CPU has it, scalar otherwise. All four dtypes. Throw std::invalid_argument on a bad problem.
// Extra memory, all linear in T: per thread a few block tiles plus the packed K/V of one
// (batch, kv head) (at most 32 MiB per cache); backward also (B, H, Tq) acc-type D_i and, in
// the one-pass scheme, a (Tk, D) float dk / dv accumulator per thread.
void attention_fwd_cpu(const FwdParams& p);
void attention_bwd_cpu(const BwdParams& p);

// ---- dropout's keep decision, shared by every backend (and mirrored in Python by
// fastllm/reference/attention.py and in fastllm/triton/attention.py) ---------------------
// u = mix(mix(mix(mix(seed_lo ^ mix(seed_hi)) ^ (b * H + h)) ^ i) ^ mix(j ^ 0x9e3779b9))
// with Chris Wellons' "lowbias32" integer mixer; keep iff u >= dropout_threshold(p)
// = floor(p * 2^32) (p < 1). i and j are positions inside sequence b (not packed offsets), h
// is the query head. One mix per (row) and per (column) is hoisted out of the tile loops,
// so an element costs one xor, one mix and one compare.
#if defined(__CUDACC__)
#define FASTLLM_HD __host__ __device__ __forceinline__
#else
#define FASTLLM_HD inline
#endif
FASTLLM_HD uint32_t dropout_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
// Per (seed, b, h): the key of the (batch, head) slice.
FASTLLM_HD uint32_t dropout_head_key(int64_t seed, int64_t b, int64_t h, int64_t num_heads) {
  uint32_t k0 = dropout_mix(static_cast<uint32_t>(seed) ^
                            dropout_mix(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)));
  return dropout_mix(k0 ^ static_cast<uint32_t>(b * num_heads + h));
}
FASTLLM_HD uint32_t dropout_row_key(uint32_t head_key, int64_t i) {
  return dropout_mix(head_key ^ static_cast<uint32_t>(i));
}
FASTLLM_HD uint32_t dropout_col_key(int64_t j) {
  return dropout_mix(static_cast<uint32_t>(j) ^ 0x9e3779b9u);
}
FASTLLM_HD bool dropout_keep(uint32_t row_key, uint32_t col_key, uint32_t threshold) {
  return dropout_mix(row_key ^ col_key) >= threshold;
}
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}
#undef FASTLLM_HD

}  // namespace attention
}  // namespace fastllm
