// The AMX path's tile products (csrc/attention/attention_cpu_amx.h) on emulated tiles, so that
// their code runs on every x86-64 machine with AVX-512, not only on those with AMX: this file
// defines GCC's tile intrinsics (_tile_loadd, _tile_stored, _tile_zero, _tile_dpbf16ps) and the
// header's tdpfp16ps as plain C++ on eight 16 x 64-byte tiles before it includes the header,
// whose amx::gemm (the two alternating tile sets, the pair jobs of narrow products, the
// 16-column jobs of a ragged right edge, the K = 128 path) and amx::gemm_split (six part
// products over a B in segments) then run here as written, and compares them with a float64
// reference of the same 16-bit operands: leading dimensions padded past the rows, and the
// padding checked untouched. Where the CPU has AVX512-BF16 the vector engine (gemm_dot,
// gemm_split_dot: the avx512-bf16 path and the emulation of the others) meets the same
// reference. (The kernel tests run the whole attention path on real tiles where the CPU has
// them; this test is what runs the tile code everywhere else.)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "common/cpu_dtypes.h"

namespace emu {

// The tile registers under the kernel's one configuration (palette 1: 16 rows of 64 bytes).
struct Tile {
  uint8_t rows[16][64];
};
inline Tile tiles[8];

inline void load(int t, const void* base, int64_t stride) {
  for (int r = 0; r < 16; ++r) {
    std::memcpy(tiles[t].rows[r], static_cast<const uint8_t*>(base) + r * stride, 64);
  }
}

inline void store(int t, void* base, int64_t stride) {
  for (int r = 0; r < 16; ++r) {
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles[t].rows[r], 64);
  }
}

inline void zero(int t) { std::memset(&tiles[t], 0, sizeof(Tile)); }

template <class E>
float element(const Tile& t, int row, int index) {
  E e;
  std::memcpy(&e.bits, &t.rows[row][2 * index], 2);
  return fastllm::cpu::to_float(e);
}

// C (16 x 16 floats) += A (16 rows x 16 pairs of E) B (16 pair rows x 16 columns of pairs),
// pair by pair in float32 (as tdpbf16ps / tdpfp16ps do, up to their internal rounding).
template <class E>
void dot(int c, int a, int b) {
  float C[16][16];
  std::memcpy(C, tiles[c].rows, sizeof(C));
  for (int m = 0; m < 16; ++m) {
    for (int k = 0; k < 16; ++k) {
      const float a0 = element<E>(tiles[a], m, 2 * k), a1 = element<E>(tiles[a], m, 2 * k + 1);
      for (int n = 0; n < 16; ++n) {
        C[m][n] += a0 * element<E>(tiles[b], k, 2 * n) + a1 * element<E>(tiles[b], k, 2 * n + 1);
      }
    }
  }
  std::memcpy(tiles[c].rows, C, sizeof(C));
}

}  // namespace emu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadd(t, base, stride) emu::load(t, base, stride)
#define _tile_stored(t, base, stride) emu::store(t, base, stride)
#define _tile_zero(t) emu::zero(t)
#define _tile_dpbf16ps(c, a, b) emu::dot<fastllm::cpu::BFloat16>(c, a, b)
#define FASTLLM_AMX_TDPFP16PS(c, a, b) emu::dot<fastllm::cpu::Half>(c, a, b)

#include "attention/attention_cpu_amx.h"

namespace {

using fastllm::cpu::BFloat16;
using fastllm::cpu::Half;
namespace amx = fastllm::attention::amx;

constexpr float kSentinel = -12345.0f;

template <class E>
uint16_t bits_of(float x) {
  if constexpr (std::is_same_v<E, Half>) return fastllm::cpu::to_half(x).bits;
  return fastllm::cpu::to_bfloat16(x).bits;
}

template <class E>
float value_of(uint16_t bits) {
  E e;
  e.bits = bits;
  return fastllm::cpu::to_float(e);
}

std::vector<uint16_t> random_elements(std::mt19937& gen, size_t n, bool half) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> out(n);
  for (auto& x : out) x = half ? bits_of<Half>(dist(gen)) : bits_of<BFloat16>(dist(gen));
  return out;
}

// A product's operands, leading dimensions padded past the rows (a stride mistake reads or
// writes the padding): A (M x K, rows lda apart), B (K x N as pair rows ldb apart, in
// `segments` of seg_k rows seg elements apart), C (M x N, rows ldc apart, sentinels around).
struct Operands {
  int M, N, K, seg_k;
  int64_t lda, ldb, ldc, seg, part_a, part_b;
  std::vector<uint16_t> A, B;  // `parts` copies each (the split product's parts)
  std::vector<float> C0;       // C before the product

  Operands(std::mt19937& gen, int m, int n, int k, int segment_k, int parts, bool half)
      : M(m), N(n), K(k), seg_k(segment_k) {
    lda = K + 32;
    ldb = 2 * N + 32;
    ldc = N + 16;
    seg = static_cast<int64_t>(seg_k / 2 + 3) * ldb;  // segments with a gap between them
    part_a = static_cast<int64_t>(M) * lda;
    part_b = static_cast<int64_t>(K / seg_k) * seg;
    A = random_elements(gen, parts * part_a, half);
    B = random_elements(gen, parts * part_b, half);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    C0.assign(static_cast<size_t>(M + 1) * ldc, kSentinel);
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) C0[i * ldc + j] = dist(gen);
    }
  }

  // Element (k, n) of B's part p.
  uint16_t b(int p, int k, int n) const {
    return B[p * part_b + (k / seg_k) * seg + (k % seg_k / 2) * ldb + 2 * n + k % 2];
  }
};

// sum over (pa, pb) in pairs of A_pa B_pb, plus C0 where accumulating, in float64.
template <class E>
std::vector<double> reference(const Operands& o, const std::vector<std::pair<int, int>>& pairs,
                              bool accumulate, std::vector<double>& magnitude) {
  std::vector<double> out(static_cast<size_t>(o.M) * o.N);
  magnitude.assign(out.size(), 0.0);
  for (int i = 0; i < o.M; ++i) {
    for (int j = 0; j < o.N; ++j) {
      double sum = accumulate ? o.C0[i * o.ldc + j] : 0.0, size = std::fabs(sum);
      for (auto [pa, pb] : pairs) {
        for (int k = 0; k < o.K; ++k) {
          const double term = static_cast<double>(value_of<E>(o.A[pa * o.part_a + i * o.lda + k])) *
                              value_of<E>(o.b(pb, k, j));
          sum += term;
          size += std::fabs(term);
        }
      }
      out[i * o.N + j] = sum;
      magnitude[i * o.N + j] = size;
    }
  }
  return out;
}

// C against the reference (float32 accumulation: at most K float32 roundings of the running
// sum, relative to the terms' magnitudes), and the padding left as it was.
void check_result(const char* what, const Operands& o, const std::vector<float>& C,
                  const std::vector<double>& ref, const std::vector<double>& magnitude,
                  int roundings) {
  const double eps = std::ldexp(1.0, -24) * (roundings + 2);
  int bad = 0;
  for (int i = 0; i <= o.M; ++i) {
    for (int j = 0; j < o.ldc; ++j) {
      const float got = C[i * o.ldc + j];
      if (i == o.M || j >= o.N) {
        if (got != o.C0[i * o.ldc + j] && bad++ < 3) {
          CHECK(false, "%s M%d N%d K%d: padding (%d, %d) changed to %g", what, o.M, o.N, o.K,
                i, j, static_cast<double>(got));
        }
        continue;
      }
      const double want = ref[i * o.N + j], tol = eps * magnitude[i * o.N + j] + 1e-30;
      if (!(std::fabs(got - want) <= tol) && bad++ < 3) {
        CHECK(false, "%s M%d N%d K%d: C(%d, %d) = %.9g, want %.9g (tolerance %.3g)", what, o.M,
              o.N, o.K, i, j, static_cast<double>(got), want, tol);
      }
    }
  }
}

template <class E, class Product>
void check_products(const char* what, Product product) {
  std::mt19937 gen(1234);
  for (int M : {16, 32, 48, 64, 128}) {
    for (int N : {16, 32, 48, 64, 80, 128, 160}) {
      for (int K : {32, 64, 96, 128, 256}) {
        for (bool accumulate : {false, true}) {
          const Operands o(gen, M, N, K, K, 1, std::is_same_v<E, Half>);
          std::vector<float> C = o.C0;
          product(o, C.data(), accumulate);
          std::vector<double> magnitude;
          const auto ref = reference<E>(o, {{0, 0}}, accumulate, magnitude);
          check_result(what, o, C, ref, magnitude, K);
        }
      }
    }
  }
}

template <class Product>
void check_split_products(const char* what, Product product) {
  std::mt19937 gen(99);
  // (a part, b part): h = 0, m = 1, l = 2; the six pairs whose parts sum to at most m m
  const std::vector<std::pair<int, int>> pairs = {{2, 0}, {0, 2}, {1, 1}, {1, 0}, {0, 1}, {0, 0}};
  for (int M : {16, 48, 128}) {
    for (int N : {16, 48, 64, 128}) {
      for (int K : {32, 64, 128, 256}) {
        // B in one segment, and in segments of 32 and 64 rows where K has several
        std::vector<int> segments = {K};
        for (int seg_k : {32, 64}) {
          if (seg_k < K) segments.push_back(seg_k);
        }
        for (int seg_k : segments) {
          for (bool accumulate : {false, true}) {
            const Operands o(gen, M, N, K, seg_k, amx::kSplitParts, false);
            std::vector<float> C = o.C0;
            product(o, C.data(), accumulate);
            std::vector<double> magnitude;
            const auto ref = reference<BFloat16>(o, pairs, accumulate, magnitude);
            check_result(what, o, C, ref, magnitude, 6 * K);
          }
        }
      }
    }
  }
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

}  // namespace

// The kernel's tile code is compiled for AVX-512 (and AMX) targets: it runs only on a CPU
// with AVX-512, emulated tiles or not.
TEST_CASE(tile_gemm_bfloat16) {
  if (!cpu_has_avx512()) return;
  check_products<BFloat16>("amx::gemm<BFloat16>", [](const Operands& o, float* C, bool acc) {
    amx::gemm<BFloat16>(o.M, o.N, o.K, o.A.data(), o.lda, o.B.data(), o.ldb, C, o.ldc, acc);
  });
}

TEST_CASE(tile_gemm_float16) {
  if (!cpu_has_avx512()) return;
  check_products<Half>("amx::gemm<Half>", [](const Operands& o, float* C, bool acc) {
    amx::gemm<Half>(o.M, o.N, o.K, o.A.data(), o.lda, o.B.data(), o.ldb, C, o.ldc, acc);
  });
}

TEST_CASE(tile_gemm_split) {
  if (!cpu_has_avx512()) return;
  check_split_products("amx::gemm_split", [](const Operands& o, float* C, bool acc) {
    amx::gemm_split(o.M, o.N, o.K, o.A.data(), o.lda, o.part_a, o.B.data(), o.ldb, o.part_b,
                    o.seg_k, o.seg, C, o.ldc, acc);
  });
}

TEST_CASE(vector_engine_products) {
  if (!cpu_has_avx512() || !__builtin_cpu_supports("avx512bf16")) return;
  check_products<BFloat16>("amx::gemm_dot", [](const Operands& o, float* C, bool acc) {
    amx::gemm_dot(o.M, o.N, o.K, o.A.data(), o.lda, o.B.data(), o.ldb, C, o.ldc, acc);
  });
  check_products<Half>("amx::gemm_dot<half>", [](const Operands& o, float* C, bool acc) {
    amx::gemm_dot<true>(o.M, o.N, o.K, o.A.data(), o.lda, o.B.data(), o.ldb, C, o.ldc, acc);
  });
  check_split_products("amx::gemm_split_dot", [](const Operands& o, float* C, bool acc) {
    amx::gemm_split_dot(o.M, o.N, o.K, o.A.data(), o.lda, o.part_a, o.B.data(), o.ldb,
                        o.part_b, o.seg_k, o.seg, C, o.ldc, acc);
  });
}

TEST_MAIN()
