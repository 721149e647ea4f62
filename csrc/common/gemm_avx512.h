// The float32 GEMM micro-kernel of the AVX-512 CPU kernels (x86 only; run only after
// cpu::cpu_avx512() returned true): attention's tile products (attention_cpu_avx512.h) and
// linear cross-entropy's chunk GEMMs (common/gemm_cpu.cpp) run it.
//   gemm:                  C[m][n] (+)= sum_k A[m * a_rs + k * a_ks] * B[k * ldb + n], N a
//                          multiple of 16 (callers pad their tiles with zeros).
//   transpose_16x16_epi32: 16 vectors of 16 32-bit lanes transposed in registers.
//   transpose_rows:        a zero-padded tile of strided float rows, transposed.
//
// The micro-kernel keeps an R x (16 NV) block of C in R * NV zmm registers, 24 of the 32
// (6 x 64, 8 x 48 or 12 x 32 floats): 24 independent FMA chains cover the FMA latency (4
// cycles) on both 512-bit FMA ports, and each k step loads NV vectors of B and broadcasts
// R scalars of A from memory: 96-97 % of one Zen 4 core's FMA peak on attention's cached
// tiles (benchmarks/micro/attention_fp32_inner.cpp, README's Zen 4 paragraph).
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_avx512.h"

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN

namespace fastllm {
namespace cpu {
namespace avx512 {

// A micro-kernel's R x (16 NV) block of C (rows ldc floats apart) into its accumulators
// (zeros unless accumulate), and back.
template <int R, int NV>
FASTLLM_INLINE void load_block(const float* C, int64_t ldc, bool accumulate, __m512 (&c)[R][NV]) {
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
}

template <int R, int NV>
FASTLLM_INLINE void store_block(float* C, int64_t ldc, const __m512 (&c)[R][NV]) {
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
  }
}

// The products of one micro-kernel's k range into its accumulators c (which hold the sums
// so far).
template <int R, int NV>
FASTLLM_INLINE void tile_products(int k0, int k1, const float* A, int64_t a_rs, int64_t a_ks,
                                  const float* B, int64_t ldb, __m512 (&c)[R][NV]) {
#pragma GCC unroll 2
  for (int k = k0; k < k1; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * a_rs + k * a_ks]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
}

// k per separate sum of gemm's `separately` mode.
inline constexpr int kSeparateK = 32;

// kSeparately = false: one chain per element over all K, from C's values (accumulate) or
// from zero. true: sums of at most kSeparateK products, each started from zero and added to
// C (stored over it, the first without accumulate), so an element's rounding error grows
// with kSeparateK plus the number of sums instead of with K; the extra loads, adds and
// stores of C (24 each per 32 k steps of 24 FMAs) run beside the FMAs. (Sums of 16 ran a few
// % slower in a loop on one Zen 4 core; sums over whole 256-k panels were over the tests' 2x
// rule against torch's error.)
template <int R, int NV, bool kSeparately = false>
FASTLLM_INLINE void gemm_tile(int K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  __m512 c[R][NV];
  if constexpr (!kSeparately) {
    load_block(C, ldc, accumulate, c);
    tile_products(0, K, A, a_rs, a_ks, B, ldb, c);
    store_block(C, ldc, c);
  } else {
    // ceil(K / kSeparateK) sums of equal length (K = 40: 20 + 20, not 32 + 8)
    const int sums = std::max(1, (K + kSeparateK - 1) / kSeparateK);
    const int step = std::max(1, (K + sums - 1) / sums);
    for (int k0 = 0; k0 == 0 || k0 < K; k0 += step) {
      load_block(C, ldc, false, c);
      tile_products(k0, std::min(K, k0 + step), A, a_rs, a_ks, B, ldb, c);
      if (accumulate || k0 > 0) {
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) {
            c[r][v] = _mm512_add_ps(_mm512_loadu_ps(C + r * ldc + 16 * v), c[r][v]);
          }
        }
      }
      store_block(C, ldc, c);
    }
  }
}

// The micro-kernel rows for NV column vectors: 24 accumulators (12 for one vector).
template <int NV>
inline constexpr int kMicroRows = NV == 4 ? 6 : NV == 3 ? 8 : 12;

// A tail of rows < R (the last rows of M): the largest micro-kernel that fits, then recurse.
template <int NV, int R, bool kSeparately>
FASTLLM_INLINE void gemm_row_tail(int rows, int K, const float* A, int64_t a_rs, int64_t a_ks,
                                  const float* B, int64_t ldb, float* C, int64_t ldc,
                                  bool accumulate) {
  if constexpr (R > 0) {
    if (rows >= R) {
      gemm_tile<R, NV, kSeparately>(K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      rows -= R;
      A += R * a_rs;
      C += R * ldc;
    }
    gemm_row_tail<NV, R / 2, kSeparately>(rows, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
  }
}

template <int NV, bool kSeparately = false>
void gemm_columns(int M, int K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int R = kMicroRows<NV>;
  int m = 0;
  for (; m + R <= M; m += R) {
    gemm_tile<R, NV, kSeparately>(K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc,
                                  accumulate);
  }
  // R - 1 <= 11 rows left: micro-kernels of 8, 4, 2 and 1 rows (as needed) cover them.
  gemm_row_tail<NV, 8, kSeparately>(M - m, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc,
                                    ldc, accumulate);
}

// In place: r[i] lane j <-> r[j] lane i, for 16 vectors of 16 32-bit units.
FASTLLM_INLINE void transpose_16x16_epi32(__m512i r[16]) {
  __m512i a[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[4 g + c], 128-bit lane L: rows 4 g .. 4 g + 3 of column c + 4 L.
  __m512i b[16];
  for (int g = 0; g < 16; g += 4) {
    b[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
    b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
    b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  // Column c + 4 L gathers lane L of b[c], b[4 + c], b[8 + c], b[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[c + 4] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[c + 8] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[c + 12] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// dst[c * Np + r] = first[r * stride_t + c] for r < rows, c < D, zeros in the rest of the
// Dp x Np tile (Np, Dp multiples of 16): 16 x 16 blocks transposed in registers. before_load(r,
// c) runs before row r's elements c .. c + 15 are loaded (for r < rows, c < D: a prefetch).
// Attention's packed k^T tiles and common/gemm_cpu.cpp's panels of a transposed B.
struct NoBeforeLoad {
  FASTLLM_INLINE void operator()(int, int) const {}
};

template <class BeforeLoad = NoBeforeLoad>
FASTLLM_INLINE void transpose_rows(const float* first, int64_t stride_t, int rows, int Np, int D,
                                   int Dp, float* dst, BeforeLoad before_load = {}) {
  for (int r0 = 0; r0 < Np; r0 += 16) {
    const int live = std::max(0, std::min(16, rows - r0));
    for (int c0 = 0; c0 < Dp; c0 += 16) {
      const __mmask16 cols = c0 >= D ? __mmask16(0) : first_lanes(std::min(16, D - c0));
      __m512i block[16];
      for (int i = 0; i < 16; ++i) {
        if (i < live && c0 < D) before_load(r0 + i, c0);
        block[i] = i < live ? _mm512_castps_si512(_mm512_maskz_loadu_ps(
                                  cols, first + static_cast<int64_t>(r0 + i) * stride_t + c0))
                            : _mm512_setzero_si512();
      }
      transpose_16x16_epi32(block);
      for (int j = 0; j < 16; ++j) {
        _mm512_storeu_si512(dst + static_cast<int64_t>(c0 + j) * Np + r0, block[j]);
      }
    }
  }
}

// accumulate: C += A B, else C = A B. separately: A B summed kSeparateK products at a time,
// each sum added to C (see gemm_tile), for long K (common/gemm_cpu.cpp); otherwise one chain
// per element from C's values or zero (attention's tiles, K <= 256, and its running output
// tiles).
template <bool kSeparately>
void gemm_n(int M, int N, int K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
            int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int n = 0;
  for (; n + 64 <= N; n += 64) {
    gemm_columns<4, kSeparately>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
  }
  const float* b = B + n;
  float* c = C + n;
  switch ((N - n) / 16) {
    case 3: return gemm_columns<3, kSeparately>(M, K, A, a_rs, a_ks, b, ldb, c, ldc, accumulate);
    case 2: return gemm_columns<2, kSeparately>(M, K, A, a_rs, a_ks, b, ldb, c, ldc, accumulate);
    case 1: return gemm_columns<1, kSeparately>(M, K, A, a_rs, a_ks, b, ldb, c, ldc, accumulate);
    default: return;
  }
}

inline void gemm(int M, int N, int K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate, bool separately = false) {
  if (separately) return gemm_n<true>(M, N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
  gemm_n<false>(M, N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fastllm

FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END

#endif  // x86
