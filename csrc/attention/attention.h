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
// Mask: key j is allowed for query i iff j < Tk and
//   lo(i) <= j <= hi(i),  with d = Tk - Tq (bottom-right alignment, FlashAttention's and the
//   KV-cache convention: the last query sees the last key),
//   lo(i) = i + d - window_left   (or 0 when window_left < 0),
//   hi(i) = i + d + window_right  (or Tk - 1 when window_right < 0; causal sets
//                                  window_right = min(window_right, 0), i.e. 0 when unbounded).
// A row with no allowed key (e.g. causal with Tq > Tk: rows i < Tq - Tk) gets out = 0,
// lse = -inf and zero gradients, never NaN.
// Arithmetic accumulates in the "acc type": double for kFloat64, float otherwise.
//
// Glossary: B batch, Tq / Tk query / key sequence lengths, H query heads, Hkv kv heads
// (H % Hkv == 0), D head dim (any D >= 1; the kernels pad to their vector width internally).
// Layout: every (B, T, H, D) tensor is given by its base pointer and its strides in elements,
// one per dim (Strides4), so transposed or sliced inputs and outputs need no copy. lse is
// contiguous (B, H, Tq) in the acc type (float32; double for kFloat64).
#pragma once

#include <cstdint>

#include "norm/norm.h"  // fastllm::DType

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
};

struct FwdParams : Problem {
  const void* q = nullptr;  // (B, Tq, H, D)
  Strides4 stride_q;
  const void* k = nullptr;  // (B, Tk, Hkv, D)
  Strides4 stride_k;
  const void* v = nullptr;  // (B, Tk, Hkv, D)
  Strides4 stride_v;
  void* out = nullptr;  // (B, Tq, H, D)
  Strides4 stride_out;
  void* lse = nullptr;  // (B, H, Tq) contiguous, acc type (float32; double for kFloat64)
};

struct BwdParams : Problem {
  const void* q = nullptr;  // (B, Tq, H, D)
  Strides4 stride_q;
  const void* k = nullptr;  // (B, Tk, Hkv, D)
  Strides4 stride_k;
  const void* v = nullptr;  // (B, Tk, Hkv, D)
  Strides4 stride_v;
  const void* out = nullptr;  // (B, Tq, H, D): forward's output
  Strides4 stride_out;
  const void* dout = nullptr;  // (B, Tq, H, D)
  Strides4 stride_dout;
  const void* lse = nullptr;  // (B, H, Tq) contiguous, acc type: forward's lse
  void* dq = nullptr;         // (B, Tq, H, D)
  Strides4 stride_dq;
  void* dk = nullptr;  // (B, Tk, Hkv, D), summed over the H / Hkv query heads of each kv head
  Strides4 stride_dk;
  void* dv = nullptr;  // (B, Tk, Hkv, D), likewise
  Strides4 stride_dv;
};

// CPU kernels: OpenMP over (batch, head, query block) in forward and in backward's dq pass,
// over (batch, kv head, key block) in backward's dk/dv pass; AVX2/FMA when the CPU has it,
// scalar otherwise. All four dtypes. Throw std::invalid_argument on a bad problem.
// Extra memory: forward O(threads * block tiles); backward also (B, H, Tq) acc-type D_i.
void attention_fwd_cpu(const FwdParams& p);
void attention_bwd_cpu(const BwdParams& p);

}  // namespace attention
}  // namespace fastllm
