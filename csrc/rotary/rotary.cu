// CUDA kernel of the rotary family (RoPE): q and k (or one x) rotated in one pass, forward
// and backward (conjugate: s negated). Torch-free; the glue is rotary_cuda_ops.cpp. The same
// source also builds for the host against the SIMT emulation (FASTLLM_SIMT_EMU), so it uses
// only what csrc/common/cuda_compat.h promises: launches through FASTLLM_LAUNCH_KERNEL, no
// shared memory, no barriers, no inline PTX.
//
// Math (rotary.h), per token at position p and head, in float:
//   out1 = x1 c - x2 s,  out2 = x2 c + x1 s,  c = cos[p, i], s = sin[p, i] (-sin: conjugate)
//   pairs (x1, x2) = features (i, i + R / 2) (NeoX) or (2 i, 2 i + 1) (interleaved)
//   features R..D-1 copied when out != in.
// Positions come from rotary.h's position_of_row and are clamped into [0, cos_rows): reading
// them on the host would cost a synchronisation, so a bad position gives the rotation of the
// first or last row of cos / sin, never an access outside them.
//
// Variants, and why:
//   - One kernel, templated on the storage type T and the angle type A (float32 caches, or
//     caches of x's dtype); the layout (NeoX / interleaved) and conjugate are uniform run-time
//     branches: element-wise and memory-bound, the branch costs nothing next to the loads.
//   - Grid: a block per token (row), looping over rows r, r + gridDim.x, ... for very long
//     inputs; threadIdx.y over the H + Hkv heads of q then k (GQA: q and k in one launch,
//     sharing the token's angles), threadIdx.x over the R / 2 pairs of a head, so a warp reads
//     32 consecutive features (NeoX: two such runs, R / 2 apart). Each thread reads both
//     elements of its pairs before writing them, so in place needs no barrier. No shared
//     memory, a handful of registers, no spills.
//
// Glossary: rows = B T (or total), H / Hkv heads of q / k, D head dim, R rotary dim, T =
// storage dtype (float, __nv_bfloat16, __half), A = angle dtype.
#include <cstdint>

#include "common/cuda_compat.h"
#include "common/cuda_utils.cuh"
#include "rotary/rotary_cuda.h"

namespace fastllm {
namespace rotary {
namespace {

constexpr int kThreadsX = 32;  // pairs of a head
constexpr int kThreadsY = 4;   // heads
constexpr int64_t kMaxBlocks = 65535 * 16;

template <class T, class A>
__global__ void __launch_bounds__(kThreadsX * kThreadsY) rotary_kernel(const Params p) {
  const bool packed = p.cu_seqlens != nullptr;
  const int64_t rows = packed ? p.seqlen : p.batch * p.seqlen;
  const int64_t half = p.rotary_dim / 2;
  const int64_t heads = p.q.heads + p.k.heads;
  const int64_t rest_end = p.copy_rest ? p.head_dim : p.rotary_dim;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t pos = position_of_row(p, r);
    pos = pos < 0 ? 0 : (pos >= p.cos_rows ? p.cos_rows - 1 : pos);
    const A* cos_row = static_cast<const A*>(p.cos) + pos * p.cos_row_stride;
    const A* sin_row = static_cast<const A*>(p.sin) + pos * p.sin_row_stride;
    const int64_t b = packed ? 0 : r / p.seqlen;
    const int64_t t = packed ? r : r - b * p.seqlen;
    for (int64_t h = threadIdx.y; h < heads; h += blockDim.y) {
      // The operand's fields by value (a reference into the kernel's parameters would make
      // the compiler copy them to local memory).
      const bool is_q = h < p.q.heads;
      const int64_t hh = is_q ? h : h - p.q.heads;
      const T* in = static_cast<const T*>(is_q ? p.q.in : p.k.in) +
                    b * (is_q ? p.q.in_batch_stride : p.k.in_batch_stride) +
                    t * (is_q ? p.q.in_row_stride : p.k.in_row_stride) +
                    hh * (is_q ? p.q.in_head_stride : p.k.in_head_stride);
      T* out = static_cast<T*>(is_q ? p.q.out : p.k.out) +
               b * (is_q ? p.q.out_batch_stride : p.k.out_batch_stride) +
               t * (is_q ? p.q.out_row_stride : p.k.out_row_stride) +
               hh * (is_q ? p.q.out_head_stride : p.k.out_head_stride);
      for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = to_float(cos_row[i]);
        const float s = p.conjugate ? -to_float(sin_row[i]) : to_float(sin_row[i]);
        const int64_t i1 = p.interleaved ? 2 * i : i;
        const int64_t i2 = p.interleaved ? 2 * i + 1 : i + half;
        const float x1 = to_float(in[i1]);
        const float x2 = to_float(in[i2]);
        out[i1] = from_float<T>(fmaf(-x2, s, x1 * c));
        out[i2] = from_float<T>(fmaf(x1, s, x2 * c));
      }
      for (int64_t j = p.rotary_dim + threadIdx.x; j < rest_end; j += blockDim.x) out[j] = in[j];
    }
  }
}

template <class T, class A>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const int64_t rows = p.cu_seqlens != nullptr ? p.seqlen : p.batch * p.seqlen;
  int64_t blocks = rows < kMaxBlocks ? rows : kMaxBlocks;
  if (p.max_blocks > 0 && blocks > p.max_blocks) blocks = p.max_blocks;
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(kThreadsX, kThreadsY);
  FASTLLM_LAUNCH_KERNEL((rotary_kernel<T, A>), grid, block, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rotary_cuda(const Params& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.seqlen <= 0 || p.head_dim <= 0) return cudaSuccess;
  if (p.q.heads + p.k.heads <= 0) return cudaSuccess;
  return dispatch_cuda_dtype(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    if (p.cos_dtype == DType::kFloat32) return launch<T, float>(p, stream);
    if (p.cos_dtype != p.dtype) return cudaErrorInvalidValue;
    return launch<T, T>(p, stream);
  });
}

}  // namespace rotary
}  // namespace fastllm
