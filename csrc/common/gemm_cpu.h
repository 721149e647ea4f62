// A float32 GEMM of fastllm's own for the CPU (torch-free): linear cross-entropy's chunk
// products (fastllm/ops/linear_cross_entropy.py through fastllm::linear_mm), which run on
// operands too thin for torch's GEMM (MKL) to reach its rate: a chunk of 128-160 rows against
// the whole weight. On the AVX-512 path (common/gemm_avx512.h's micro-kernel) or the AVX2 one
// (common/gemm_avx2.h's; the same sums in the same order, so the same bits); callers check
// cpu_avx512() or cpu_isa() == kAvx2 (cpu_features.h) and use torch's GEMM otherwise.
#pragma once

#include <cstdint>

namespace fastllm {
namespace cpu {

// C = A op(B) (+ bias[n] on every row), all float32, overwriting C (M x N, row stride ldc):
// A is M x K (row stride lda, elements contiguous); op(B) = B^T with B an N x K matrix (row
// stride ldb) when b_transposed -- torch.mm(A, W.t()) for a (N, K) weight W --, else B
// itself, K x N (row stride ldb). bias: N floats or null. Strides in elements, >= the rows'
// lengths; the operands must not overlap C. Threads: the calling OpenMP team's size
// (omp_get_max_threads()), over blocks of 64 columns of C. K = 0 writes the bias (or zeros).
// Requires cpu_avx512() or cpu_isa() == CpuIsa::kAvx2.
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
              int64_t ldb, bool b_transposed, const float* bias, float* C, int64_t ldc);

}  // namespace cpu
}  // namespace fastllm
