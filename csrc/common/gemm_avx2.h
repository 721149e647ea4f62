// The float32 GEMM micro-kernel of common/gemm_cpu.cpp on AVX2 / FMA (x86 only; run only
// after cpu::cpu_isa() said kAvx2): the AVX2 counterpart of common/gemm_avx512.h's
// `separately` mode, for linear cross-entropy's chunk products on CPUs without AVX-512.
//   gemm_separately: C[m][n] (+)= sum_k A[m * lda + k] * B[k * ldb + n], N a multiple of 16,
//                    in sums of at most kGemmSeparateK products added to C one by one.
//   transpose_rows:  a zero-padded tile of strided float rows, transposed (8 x 8 blocks).
//
// The micro-kernel keeps a 6 x 16 block of C in 12 of the 16 ymm registers (attention's AVX2
// micro-kernel, attention_cpu.cpp: 12 independent FMA chains cover the FMA latency on both
// ports), each k step 2 vector loads of B and 6 broadcasts of A. A 6-row strip of A (at most
// 256 k, 6 KiB) stays in L1 while it meets each 16 columns of the packed panel (the other
// order, each 16-column slice of the panel in L1 while every strip meets it, ran 3-6 %
// slower at 132 x 1024 x 32000 on a Zen 4 core held to AVX2).
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_avx2.h"

FASTLLM_AVX2_BEGIN

namespace fastllm {
namespace cpu {
namespace avx2 {

// The maskload / maskstore mask of the first n lanes (n clamped to [0, 8]).
FASTLLM_INLINE __m256i first_lanes_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The micro-kernel: kGemmRows x 8 kGemmVectors floats of C (4 x 24, 3 B loads and 4
// broadcasts a step, ran 3-4 % slower at 132 x 1024 x 32000 on a Zen 4 core held to AVX2;
// 3 x 32 does not fit: 12 accumulators, 4 of B and the broadcast are 17 registers).
inline constexpr int kGemmRows = 6;
inline constexpr int kGemmVectors = 2;

// k per separate sum (gemm_avx512.h's kSeparateK: the same sums, so the same rounding rule).
inline constexpr int kGemmSeparateK = 32;

// The products of k in [k0, k1) into the accumulators c (R rows, 8 NV columns).
template <int R, int NV>
FASTLLM_INLINE void gemm_products(int k0, int k1, const float* A, int64_t lda, const float* B,
                                  int64_t ldb, __m256 (&c)[R][NV]) {
#pragma GCC unroll 4
  for (int k = k0; k < k1; ++k) {
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
}

// An R x 16 block of C: ceil(K / kGemmSeparateK) sums of equal length, each from zero, the
// first stored over C (unless accumulate), the others added to it.
template <int R, int NV>
FASTLLM_INLINE void gemm_tile_separately(int K, const float* A, int64_t lda, const float* B,
                                         int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int sums = std::max(1, (K + kGemmSeparateK - 1) / kGemmSeparateK);
  const int step = std::max(1, (K + sums - 1) / sums);
  for (int k0 = 0; k0 == 0 || k0 < K; k0 += step) {
    __m256 c[R][NV];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_setzero_ps();
    }
    gemm_products(k0, std::min(K, k0 + step), A, lda, B, ldb, c);
    const bool add = accumulate || k0 > 0;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        float* out = C + r * ldc + 8 * v;
        _mm256_storeu_ps(out, add ? _mm256_add_ps(_mm256_loadu_ps(out), c[r][v]) : c[r][v]);
      }
    }
  }
}

// R rows of A against every 16 columns of B.
template <int R>
FASTLLM_INLINE void gemm_strip(int N, int K, const float* A, int64_t lda, const float* B,
                               int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int n = 0; n < N; n += 8 * kGemmVectors) {
    gemm_tile_separately<R, kGemmVectors>(K, A, lda, B + n, ldb, C + n, ldc, accumulate);
  }
}

// The last rows < kGemmRows of A: one strip of exactly that many rows.
template <int R>
FASTLLM_INLINE void gemm_row_tail(int rows, int N, int K, const float* A, int64_t lda,
                                  const float* B, int64_t ldb, float* C, int64_t ldc,
                                  bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) return gemm_strip<R>(N, K, A, lda, B, ldb, C, ldc, accumulate);
    gemm_row_tail<R - 1>(rows, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

// accumulate: C += A B, else C = A B; N a multiple of 16 (the packed panels pad with zeros).
inline void gemm_separately(int M, int N, int K, const float* A, int64_t lda, const float* B,
                            int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int R = kGemmRows;
  int m = 0;
  for (; m + R <= M; m += R) {
    gemm_strip<R>(N, K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, accumulate);
  }
  A += m * lda;
  C += m * ldc;
  gemm_row_tail<R - 1>(M - m, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// In place: r[i] lane j <-> r[j] lane i, for 8 vectors of 8 floats.
FASTLLM_INLINE void transpose_8x8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // s[4 g + c], 128-bit half H: rows 4 g .. 4 g + 3 of column c + 4 H.
  for (int g = 0; g < 8; g += 4) {
    s[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    s[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
    s[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    s[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
  }
}

// dst[c * Np + r] = first[r * stride_t + c] for r < rows, c < D, zeros in the rest of the
// Dp x Np tile (Np, Dp multiples of 8): 8 x 8 blocks transposed in registers. before_load(r,
// c) runs before row r's elements c .. c + 7 are loaded (for r < rows, c < D: a prefetch).
template <class BeforeLoad>
FASTLLM_INLINE void transpose_rows(const float* first, int64_t stride_t, int rows, int Np, int D,
                                   int Dp, float* dst, BeforeLoad before_load) {
  for (int r0 = 0; r0 < Np; r0 += 8) {
    const int live = std::max(0, std::min(8, rows - r0));
    for (int c0 = 0; c0 < Dp; c0 += 8) {
      const __m256i cols = first_lanes_mask(D - c0);
      __m256 block[8];
      for (int i = 0; i < 8; ++i) {
        if (i < live && c0 < D) before_load(r0 + i, c0);
        const float* row = first + static_cast<int64_t>(r0 + i) * stride_t;
        block[i] = i < live ? _mm256_maskload_ps(row + c0, cols) : _mm256_setzero_ps();
      }
      transpose_8x8(block);
      for (int j = 0; j < 8; ++j) {
        _mm256_storeu_ps(dst + static_cast<int64_t>(c0 + j) * Np + r0, block[j]);
      }
    }
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace fastllm

FASTLLM_AVX2_END

#endif  // x86
