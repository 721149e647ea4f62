// Rotary position embeddings (RoPE): the torch-free interface shared by the CPU kernels
// (rotary_cpu.cpp), the CUDA kernels (rotary.cu), the torch glue (rotary_glue.h) and the C++
// tests. Nothing here includes torch or CUDA headers.
//
// Math, per token at position p and per head, on the first R (rotary_dim) features of D; the
// other D - R features pass through. With c_i = cos[p, i], s_i = sin[p, i], i < R / 2, and the
// pair (x1, x2) of feature indices
//   NeoX / "rotate half" (HF LLaMA, default)  (i, i + R / 2)
//   GPT-J interleaved                          (2 i, 2 i + 1)
// the output pair is
//   out1 = x1 c_i - x2 s_i,   out2 = x2 c_i + x1 s_i
// and with conjugate = true (the inverse rotation, s negated) the backward pass: the rotation
// is orthogonal, so grad_x = R(-theta) grad_out, the same kernel; nothing is saved but cos,
// sin and the positions.
// Positions: token t of sequence b is at
//   kNone      position_offset + t
//   kPerSeq    position_offset + positions[b] + t           (positions (B,): KV-cache offsets)
//   kPerToken  position_offset + positions[b, t]            (positions (B, T): HF position_ids)
// where, packed (cu_seqlens != nullptr), b is the sequence holding row r (cu_seqlens[b] <= r <
// cu_seqlens[b + 1]) and t = r - cu_seqlens[b]. The CPU glue checks every position against
// [0, cos_rows); the CUDA kernels clamp a position into that range instead (no host
// synchronisation): a bad position rotates by the angles of row 0 or row cos_rows - 1, never
// reads outside cos / sin. Arithmetic is in the acc type (double for kFloat64, float
// otherwise); each stored value is rounded to `dtype` once.
//
// Glossary: B batch, T tokens per sequence (padded layout), total packed tokens, rows = B T
// (or total), H query heads, Hkv key heads (GQA: may differ from H), D head dim, R rotary dim
// (even, <= D), cos_rows = max_T (rows of the cos / sin caches).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace fastllm {
namespace rotary {

enum class PositionMode : int32_t { kNone = 0, kPerSeq = 1, kPerToken = 2 };

// One rotated tensor, q or k: heads x D features per row; every feature has unit stride.
// in == out is allowed (in place): each element is read before its pair is written, by the
// thread that writes it.
struct Operand {
  // (rows, heads, D). Packed: element (r, h, d) at r * row_stride + h * head_stride + d;
  // padded: (b, t, h, d) at b * batch_stride + t * row_stride + h * head_stride + d.
  const void* in = nullptr;
  int64_t in_row_stride = 0;
  int64_t in_batch_stride = 0;
  int64_t in_head_stride = 0;
  void* out = nullptr;
  int64_t out_row_stride = 0;
  int64_t out_batch_stride = 0;
  int64_t out_head_stride = 0;
  int64_t heads = 0;           // 0: absent (the one-tensor op has no k)
};

struct Params {
  Operand q;                   // x for the one-tensor op
  Operand k;                   // heads == 0: absent
  int64_t batch = 0;           // B (packed: the number of sequences)
  int64_t seqlen = 0;          // T (packed: total); rows = batch * seqlen (packed: seqlen)
  int64_t head_dim = 0;        // D
  int64_t rotary_dim = 0;      // R, even, <= D
  bool copy_rest = false;      // out != in: also write the D - R pass-through features
  const void* cos = nullptr;   // (cos_rows, R / 2), row stride cos_row_stride, of cos_dtype
  const void* sin = nullptr;   // (cos_rows, R / 2), row stride sin_row_stride, of cos_dtype
  int64_t cos_row_stride = 0;
  int64_t sin_row_stride = 0;
  int64_t cos_rows = 0;
  DType cos_dtype = DType::kFloat32;  // kFloat32 or dtype
  PositionMode mode = PositionMode::kNone;
  const int64_t* positions = nullptr;  // kPerSeq (B,), kPerToken (B, T), strides below
  int64_t positions_batch_stride = 0;
  int64_t positions_token_stride = 0;
  int64_t position_offset = 0;
  const int32_t* cu_seqlens = nullptr;  // (batch + 1,) or nullptr (padded)
  bool interleaved = false;
  bool conjugate = false;
  DType dtype = DType::kFloat32;
  int64_t max_blocks = 0;      // CUDA launcher: the most blocks of its grid (0: its own cap)
};

// The position of row r (see the header comment) before any check or clamp; packed rows
// outside [cu_seqlens[0], cu_seqlens[batch]) fall in the first or last sequence. Shared by the
// CPU kernels and the CUDA kernels (host and device code under nvcc; plain host functions in
// the SIMT emulation, where device code is host code).
#if defined(__CUDACC__)
#define FASTLLM_ROTARY_HD __host__ __device__
#else
#define FASTLLM_ROTARY_HD
#endif

FASTLLM_ROTARY_HD inline int64_t position_of_row(const Params& p, int64_t r) {
  int64_t b, t;
  if (p.cu_seqlens != nullptr) {
    // The last sequence whose start is <= r (binary search over the B + 1 offsets).
    int64_t lo = 0, hi = p.batch - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (p.cu_seqlens[mid] <= r) lo = mid; else hi = mid - 1;
    }
    b = lo;
    t = r - p.cu_seqlens[b];
  } else {
    b = r / p.seqlen;
    t = r - b * p.seqlen;
  }
  switch (p.mode) {
    case PositionMode::kPerSeq:
      return p.position_offset + p.positions[b * p.positions_batch_stride] + t;
    case PositionMode::kPerToken:
      return p.position_offset + p.positions[b * p.positions_batch_stride +
                                             t * p.positions_token_stride];
    case PositionMode::kNone:
      break;
  }
  return p.position_offset + t;
}

// The element offset of row r's first feature of an operand (`in` strides when in_side).
FASTLLM_ROTARY_HD inline int64_t row_offset(const Params& p, const Operand& o, int64_t r,
                                            bool in_side) {
  if (p.cu_seqlens != nullptr) return r * (in_side ? o.in_row_stride : o.out_row_stride);
  const int64_t b = r / p.seqlen, t = r - b * p.seqlen;
  return in_side ? b * o.in_batch_stride + t * o.in_row_stride
                 : b * o.out_batch_stride + t * o.out_row_stride;
}

// CPU kernel: OpenMP threads over contiguous ranges of rows (tokens); per row, cos / sin are
// widened once into a float (double) buffer and applied to every head of q and k. AVX-512 or
// AVX2/FMA/F16C for the float acc type when the CPU has it (common/cpu_features.h), a portable
// scalar path otherwise and for float64. All four dtypes. Positions must be in [0, cos_rows)
// (the glue checks); out may equal in, but may not otherwise overlap it.
void rotary_cpu(const Params& p);

}  // namespace rotary
}  // namespace fastllm
