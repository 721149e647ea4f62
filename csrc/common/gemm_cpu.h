// Float32 GEMMs of fastllm's own for the CPU (torch-free): linear cross-entropy's chunk
// products (fastllm/ops/linear_cross_entropy.py through fastllm::linear_mm_out and
// fastllm::linear_weight_grad_out), which run on operands too thin for torch's GEMM (MKL) to
// reach its rate: a chunk of 128-160 rows against the whole weight, and the weight gradient's
// sum over such chunks. On the AVX-512 path (common/gemm_avx512.h's micro-kernel) or the AVX2
// one (common/gemm_avx2.h's; the same sums in the same order, so the same bits); callers check
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

// C (+)= A^T B, all float32 (C = A^T B, or C += A^T B when accumulate): A is K x M (row
// stride lda), B is K x N (row stride ldb), C is M x N (row stride ldc); elements contiguous
// within rows, strides in elements, >= the rows' lengths, the operands not overlapping C.
// A linear layer's weight gradient dW (+)= dY^T X for dY (K rows, M outputs) and X (K rows,
// N inputs): linear cross-entropy's chunks, K a chunk's rows, M the classes (their logits'
// gradient, rows far apart: 128 KiB at 32000 classes), N the hidden size. K = 0 leaves C
// (accumulate) or zeroes it. Threads: the calling OpenMP team's size, over blocks of rows of
// C. Requires cpu_avx512() or cpu_isa() == CpuIsa::kAvx2; the same bits on both paths.
void gemm_f32_at(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate);

}  // namespace cpu
}  // namespace fastllm
