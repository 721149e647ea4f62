// The float32 attention's AVX2 products alone: the 6 x 16 micro-kernel of
// csrc/attention/attention_cpu.cpp (gemm_tile_avx2: 12 ymm accumulators, 2 loads of B and 6
// broadcasts of A per k; copied here, the kernel's own is internal to its translation unit)
// on the tile products of the forward and backward at D64 and D128, with the operands in L1
// (one set) or in L2 (8 sets cycled, 8 x ~200 KiB), in two loop orders: each 6-row strip of A
// across all 16-column slices of B (the kernel's), or each slice of B down all strips.
// The measurement behind the README's reading of the AVX2 path on a Zen 5 core (the full
// forwards at 1.17-1.18x torch's SDPA held to AVX2, under issue 16's 1.2x): in the kernel the
// products run at about 128 GFLOP/s, and this loop alone at 120-131 of the core's 143 on
// 256-bit FMAs, with the operands in L1 or in L2, in either order
// (benchmarks/results/2026-12-06-cpu-attention-avx2-gemm-zen5.txt).
// It also prints the core's 256-bit FMA peak (12 independent FMA chains) and a fourth column,
// "L1 padded": every row stride 16 floats longer than its row, so that the K rows a product
// reads fall on all of L1's 64 sets (at strides of 64 and 128 floats they fall on 16 or 8).
// On a Zen 3 core (32 KiB 8-way L1d; record ...-attention-avx2-gemm-zen3.txt) that raised
// dv += p^T dout from 75 to 84 GFLOP/s (56 to 66 in a noisier second run); copying such
// operands to spread strides inside the kernel measured no faster (record
// ...-attention-avx2-spread-strides-ab-zen3.txt).
//
// Build and run (x86-64, GCC >= 11; the measuring code carries its own target pragma):
//   g++ -O2 -o /tmp/aag benchmarks/micro/attention_avx2_gemm.cpp && /tmp/aag
// or through CMakeLists.txt (target attention_avx2_gemm, also run by ctest, which only checks
// that it runs; it measures nothing on a CPU without AVX2 and FMA).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#define INLINE inline __attribute__((always_inline))

// The measured code is AVX2 / FMA (a region, so that the lambda in gemm is too); main checks
// the CPU before calling it.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// C[0..R)[0..16) += A B over K (A read through a row and a column stride, B row-major).
template <int R>
INLINE void tile(int K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                      int64_t ldb, float* C, int64_t ldc) {
  __m256 c[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 2; ++v) c[r][v] = _mm256_loadu_ps(C + r * ldc + 8 * v);
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * a_rs + k * a_ks);
      c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
  }
}

// One tile product; M is a multiple of 2 (6-row strips, then a 4- or 2-row one), N of 16.
template <bool kColumnOuter>
__attribute__((noinline)) void gemm(int M, int N, int K, const float* A, int64_t a_rs,
                                    int64_t a_ks, const float* B, int64_t ldb, float* C,
                                    int64_t ldc) {
  auto strip = [&](int m, int n) {
    const float* a = A + m * a_rs;
    float* c = C + m * ldc + n;
    switch (std::min(6, M - m)) {
      case 6: return tile<6>(K, a, a_rs, a_ks, B + n, ldb, c, ldc);
      case 4: return tile<4>(K, a, a_rs, a_ks, B + n, ldb, c, ldc);
      default: return tile<2>(K, a, a_rs, a_ks, B + n, ldb, c, ldc);
    }
  };
  if (kColumnOuter) {
    for (int n = 0; n < N; n += 16) {
      for (int m = 0; m < M; m += 6) strip(m, n);
    }
  } else {
    for (int m = 0; m < M; m += 6) {
      for (int n = 0; n < N; n += 16) strip(m, n);
    }
  }
}

// The core's 256-bit FMA peak: 12 independent chains (latency 4-5 cycles on 2 pipes).
__attribute__((noinline)) double fma_peak_gflops() {
  using Clock = std::chrono::steady_clock;
  __m256 c[12];
  for (int i = 0; i < 12; ++i) c[i] = _mm256_set1_ps(0.001f * (i + 1));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  const long iters = 10000000;
  double best = 1e30;
  for (int run = 0; run < 5; ++run) {
    const auto begin = Clock::now();
    for (long k = 0; k < iters; ++k) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) c[i] = _mm256_fmadd_ps(c[i], a, b);
    }
    best = std::min(best, std::chrono::duration<double>(Clock::now() - begin).count());
  }
  float sink = 0.0f;
  for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(c[i]);
  if (sink == 12345.0f) std::printf(" ");  // keeps the chains live
  return iters * 12 * 16.0 / best / 1e9;
}

#pragma GCC pop_options

struct Shape {
  const char* name;
  int M, N, K;
  bool a_transposed;  // A read column by column (p^T and ds^T in place): a_rs 1, a_ks = lda
  int lda;            // A's leading dimension in the kernel: its tile's row length
};

int main() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("no AVX2 / FMA on this CPU: nothing measured\n");
    return 0;
  }
  const Shape shapes[] = {
      {"s = q k^T, D64 (fwd)        M128 N64  K64 ", 128, 64, 64, false, 64},
      {"o += p v, D64 (fwd)         M128 N64  K64 ", 128, 64, 64, false, 64},
      {"s = q k^T, D128 (fwd, bwd)  M128 N64  K128", 128, 64, 128, false, 128},
      {"o += p v, D128 (fwd)        M128 N128 K64 ", 128, 128, 64, false, 64},
      {"dv += p^T dout, D128 (bwd)  M64  N128 K128", 64, 128, 128, true, 64},
      {"dq += ds k, D128 (bwd)      M128 N128 K64 ", 128, 128, 64, false, 64},
  };
  using Clock = std::chrono::steady_clock;
  std::printf("256-bit FMA peak of this core: %.1f GFLOP/s\n", fma_peak_gflops());
  std::printf("GFLOP/s, best of 20 runs (operands in L1: one set; in L2: 8 sets cycled; padded:\n"
              "every row stride of A, B and C 16 floats (64 bytes) longer than its row)\n");
  std::printf("%-45s %14s %14s %14s %14s\n", "product", "L1 row-outer", "L2 row-outer",
              "L2 col-outer", "L1 padded");
  for (const Shape& s : shapes) {
    const int sets = 8;
    const size_t elems = 160 * 160;  // the largest padded operand: 144 x 144
    std::vector<std::vector<float>> A(sets, std::vector<float>(elems, 0.5f));
    std::vector<std::vector<float>> B(sets, std::vector<float>(elems, 0.25f));
    std::vector<std::vector<float>> C(sets, std::vector<float>(elems, 0.0f));
    double rate[4];
    for (int variant = 0; variant < 4; ++variant) {
      const int used = variant == 0 || variant == 3 ? 1 : sets;
      const int pad = variant == 3 ? 16 : 0;
      const int64_t lda = s.lda + pad, ldb = s.N + pad, ldc = s.N + pad;
      const int64_t a_rs = s.a_transposed ? 1 : lda, a_ks = s.a_transposed ? lda : 1;
      const int calls = 800 / used;
      double best = 1e30;
      for (int run = 0; run < 20; ++run) {
        const auto begin = Clock::now();
        for (int call = 0; call < calls; ++call) {
          for (int i = 0; i < used; ++i) {
            (variant == 2 ? gemm<true> : gemm<false>)(s.M, s.N, s.K, A[i].data(), a_rs, a_ks,
                                                      B[i].data(), ldb, C[i].data(), ldc);
          }
        }
        best = std::min(best, std::chrono::duration<double>(Clock::now() - begin).count());
      }
      rate[variant] = 2.0 * s.M * s.N * s.K * calls * used / best / 1e9;
    }
    std::printf("%-45s %14.1f %14.1f %14.1f %14.1f\n", s.name, rate[0], rate[1], rate[2],
                rate[3]);
  }
  return 0;
}
