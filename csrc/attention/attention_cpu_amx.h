// The AMX building blocks of the CPU attention kernel's bfloat16 and float16 paths
// (attention_cpu.cpp; x86 only; run only after cpu::cpu_amx() -- bfloat16 -- or
// cpu::cpu_amx_fp16() -- float16 -- returned true): 16-bit tile products on the AMX tile unit,
// and the packing of the operands into the layouts it reads. The packing, the softmax and
// conversions, and DotEngine's vector products on the same layouts (no tile instruction)
// also run without AMX: bfloat16 on vdpbf16ps after cpu::cpu_avx512_dot() returned true, and
// the float32 / float16 paths' emulated products under cpu::amx_emulation() (tests only).
// float32 attention runs on the same bfloat16 tiles with its operands split into three
// bfloat16 parts (split3, gemm_split; attention_fwd_amx<float>, AmxBwdThread<float>).
//
// One AMX instruction, tdpbf16ps (AMX-BF16; tdpfp16ps, AMX-FP16, for float16 elements), adds
// the product of a 16 x 32 tile A of 16-bit elements (16 rows of 64 bytes) and a 32 x 16 tile
// B to a 16 x 16 float32 tile C. Everything below works on the elements' storage bits
// (uint16_t); the functions that round float32 to the element type or multiply take it as a
// template argument E (cpu::BFloat16 or cpu::Half). B is stored in pairs
// of rows ("VNNI" layout): row k / 2 of the stored tile holds, for each of the 16 columns n,
// the two elements B[k][n], B[k + 1][n] side by side, so a stored row is 64 bytes too. Every
// product of attention is C (+)= A B with A row-major and B stored that way:
//   forward   s  = q k^T:     A = q rows, B = k^T, whose pairs of rows (k, k + 1) are pairs of
//                             adjacent elements of one key's row: the key rows read as 32-bit
//                             units, transposed (pack_column_pairs);
//             o += p v:       A = p (float32 scores rounded to E), B = v in pairs of
//                             key rows (pack_row_pairs);
//   backward  s  = q k^T, dp = dout v^T (as forward's s),
//             dq += ds k:     B = k in pairs of key rows;
//             dk^T += q^T ds, dv^T += dout^T p: A = q^T / dout^T (pack_transposed, once per
//                             query tile), B = ds / p in pairs of query rows
//                             (convert_row_pairs), so no score tile is ever transposed;
//                             dk^T and dv^T are transposed once per key block at the end.
// Accumulation is float32 (the C tiles, stored between products); p and ds are rounded to
// the input's 16-bit type before their products, as FlashAttention and torch's CPU flash
// attention do.
//
// Tile registers (one configuration, loaded per thread by TileScope): two sets of 2 C tiles,
// an A tile and a B tile each (gemm's jobs); products at most 64 columns wide use 0-3 for C,
// 4-5 for A and 6-7 for B (two strips at a time); the K = 128 products (scores, and the p v
// of a head dim of 128) use tiles 4-7 for A, 0-1 for C and 2-3 for B.
//
// Shapes: M (rows of C) a multiple of 16, N a multiple of 16, K a multiple of 32; the packs
// zero-fill their padding so that it adds nothing.
//
// Costs (benchmarks/micro/amx_dot_rate.cpp, a Granite Rapids-class core, in two hours of
// different clocks): a bfloat16 product 13.1 / 9.6 TSC cycles, a float16 one 17.1 / 11.9 on
// nonzero data (1.24-1.31x: hence float16 attention ~15 % behind bfloat16); a tile load
// 6.2 / 4.9 and a tile store 11.8 / 9.1, during which no vector instruction runs --
// the softmax between the products cannot hide under their loads and stores, so the phases
// run one after the other and the products are arranged for few loads and stores per product.
//
// GCC's tile load and store intrinsics are volatile asm without a "memory" clobber: nothing
// tells the compiler that they read or write memory. gemm() therefore opens and closes with a
// compiler barrier, so that the vector code's stores of its operands (packs, p, ds, a rescaled
// output tile) come before its tile loads and its tile stores before the vector code's loads.
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/attention_cpu_avx512.h"
#include "common/cpu_avx512.h"

#define FASTLLM_AMX_BEGIN \
  _Pragma("GCC push_options") _Pragma(                                                       \
      "GCC target(\"amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c\")")
#define FASTLLM_AMX_END _Pragma("GCC pop_options")

FASTLLM_AMX_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN

namespace fastllm {
namespace attention {
namespace amx {

// The 64-byte tile configuration (palette 1): tiles 0-7 are 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(TileConfig) == 64, "the AMX tile configuration is 64 bytes");

// Loads the kernel's tile configuration on this thread for its lifetime and then puts back
// the configuration the thread had (another library's tiles, e.g. torch's oneDNN GEMMs on
// the same OpenMP thread), or releases the tiles if it had none (an all-zero configuration).
class TileScope {
 public:
  TileScope() {
    _tile_storeconfig(saved_);
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (saved_[0] == 0) {
      _tile_release();
    } else {
      _tile_loadconfig(saved_);
    }
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  alignas(64) uint8_t saved_[64];
};

// tdpfp16ps (AMX-FP16: Granite Rapids and later) C += A B on float16 tiles. GCC 12 has no
// intrinsic for it (GCC 13 added -mamx-fp16), so the instruction is written as its bytes:
// VEX.128.F2.0F38.W0 5C /r, ModRM.reg = C, ModRM.r/m = A, VEX.vvvv = B (inverted) -- the
// encoding of tdpbf16ps with the F2 instead of the F3 prefix. The tile numbers are literals.
// (tests/cpp/amx_tiles_emulated_test.cpp defines its own first, as it does the GCC tile
// intrinsics, to run the tile code below on emulated tiles.)
#ifndef FASTLLM_AMX_TDPFP16PS
#define FASTLLM_AMX_TDPFP16PS(C, A, B)                                               \
  __asm__ volatile(".byte 0xc4, 0xe2, %c0, 0x5c, %c1" ::"i"(0x03 | ((~(B)&15) << 3)), \
                   "i"(0xc0 | ((C) << 3) | (A)))
#endif

// The product runs as jobs of one 16-row strip x 32 columns of C (2 C tiles; 16 at a ragged
// right edge), alternating between two sets of tile registers: C tiles 0-1 with A tile 4 and
// B tile 6, and C tiles 2-3 with A 5 and B 7. Tile registers are not renamed, so a job that
// reused the previous job's tiles would wait for its products to finish and its C tiles to be
// stored (at K = 64, the head dim, only two products deep); with two sets, one job's products
// overlap the other's latency. Measured on Sapphire Rapids at K = 64: ~1.25 TFLOP/s per core,
// against ~1.1 for one set of 4 C tiles per strip and ~0.9 for a 2 x 2 block of C tiles.
// The AMX intrinsics take literal tile numbers: one function per set and width.
#define FASTLLM_AMX_GEMM_JOB(NAME, C0, C1, TA, TB, TWO, DOT)                                  \
  FASTLLM_INLINE void NAME(int K, const uint16_t* A, int64_t lda, const uint16_t* B,          \
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {             \
    const int64_t c_stride = ldc * 4, a_stride = lda * 2, b_stride = ldb * 2;                 \
    if (accumulate) {                                                                         \
      _tile_loadd(C0, C, c_stride);                                                           \
      if (TWO) _tile_loadd(C1, C + 16, c_stride);                                             \
    } else {                                                                                  \
      _tile_zero(C0);                                                                         \
      if (TWO) _tile_zero(C1);                                                                \
    }                                                                                         \
    for (int k = 0; k < K; k += 32) {                                                         \
      const uint16_t* b = B + static_cast<int64_t>(k / 2) * ldb;                              \
      _tile_loadd(TA, A + k, a_stride);                                                       \
      _tile_loadd(TB, b, b_stride);                                                           \
      DOT(C0, TA, TB);                                                                        \
      if (TWO) {                                                                              \
        _tile_loadd(TB, b + 32, b_stride);                                                    \
        DOT(C1, TA, TB);                                                                      \
      }                                                                                       \
    }                                                                                         \
    _tile_stored(C0, C, c_stride);                                                            \
    if (TWO) _tile_stored(C1, C + 16, c_stride);                                              \
  }
#define FASTLLM_AMX_TDPBF16PS(C, A, B) _tile_dpbf16ps(C, A, B)
FASTLLM_AMX_GEMM_JOB(gemm_job_set0_bf16, 0, 1, 4, 6, true, FASTLLM_AMX_TDPBF16PS)
FASTLLM_AMX_GEMM_JOB(gemm_job_set1_bf16, 2, 3, 5, 7, true, FASTLLM_AMX_TDPBF16PS)
FASTLLM_AMX_GEMM_JOB(gemm_half_job_set0_bf16, 0, 1, 4, 6, false, FASTLLM_AMX_TDPBF16PS)
FASTLLM_AMX_GEMM_JOB(gemm_half_job_set1_bf16, 2, 3, 5, 7, false, FASTLLM_AMX_TDPBF16PS)
FASTLLM_AMX_GEMM_JOB(gemm_job_set0_fp16, 0, 1, 4, 6, true, FASTLLM_AMX_TDPFP16PS)
FASTLLM_AMX_GEMM_JOB(gemm_job_set1_fp16, 2, 3, 5, 7, true, FASTLLM_AMX_TDPFP16PS)
FASTLLM_AMX_GEMM_JOB(gemm_half_job_set0_fp16, 0, 1, 4, 6, false, FASTLLM_AMX_TDPFP16PS)
FASTLLM_AMX_GEMM_JOB(gemm_half_job_set1_fp16, 2, 3, 5, 7, false, FASTLLM_AMX_TDPFP16PS)
#undef FASTLLM_AMX_GEMM_JOB

// Narrow products (N <= 64: the head dim 64's score products per key block, its p v and
// backward products) run as jobs of two 16-row strips x 32 columns (16 at a ragged right edge):
// 4 C tiles (0-3), an A tile per strip (4, 5) and 2 B tiles (6, 7), so each K step loads 2 A
// and 2 B tiles for 4 products, against 3 loads for 2 products in the jobs above: a tile load
// costs about half a product's time, during which no other work runs (see the costs
// above). With N <= 64 there are at most 2 such jobs per pair of strips, so the one set of
// tiles waits little on its own stores. Measured against the jobs above (D = 64, B2 H8 T1024
// and B1 H8 T4096, full and causal, one Granite Rapids-class core, old and new builds in
// alternating processes; outputs and gradients bit-identical): forward bfloat16 1.05-1.07x,
// float16 1.13-1.20x; forward + backward 1.00-1.05x and 1.04-1.15x. At N = 128 (the p v
// product of D = 128) no faster; wider products take the jobs above or, at K = 128, the path
// below.
#define FASTLLM_AMX_GEMM_PAIR_JOB(NAME, DOT)                                                  \
  FASTLLM_INLINE void NAME(int K, const uint16_t* A, int64_t lda, const uint16_t* B,          \
                           int64_t ldb, float* C, int64_t ldc, bool accumulate, bool two) {   \
    const int64_t c_stride = ldc * 4, a_stride = lda * 2, b_stride = ldb * 2;                 \
    float* c1 = C + 16 * ldc; /* the second strip's row 0 */                                  \
    if (accumulate) {                                                                         \
      _tile_loadd(0, C, c_stride);                                                            \
      _tile_loadd(2, c1, c_stride);                                                           \
      if (two) {                                                                              \
        _tile_loadd(1, C + 16, c_stride);                                                     \
        _tile_loadd(3, c1 + 16, c_stride);                                                    \
      }                                                                                       \
    } else {                                                                                  \
      _tile_zero(0);                                                                          \
      _tile_zero(2);                                                                          \
      if (two) {                                                                              \
        _tile_zero(1);                                                                        \
        _tile_zero(3);                                                                        \
      }                                                                                       \
    }                                                                                         \
    for (int k = 0; k < K; k += 32) {                                                         \
      const uint16_t* b = B + static_cast<int64_t>(k / 2) * ldb;                              \
      _tile_loadd(4, A + k, a_stride);                                                        \
      _tile_loadd(6, b, b_stride);                                                            \
      DOT(0, 4, 6);                                                                           \
      _tile_loadd(5, A + 16 * lda + k, a_stride);                                             \
      DOT(2, 5, 6);                                                                           \
      if (two) {                                                                              \
        _tile_loadd(7, b + 32, b_stride);                                                     \
        DOT(1, 4, 7);                                                                         \
        DOT(3, 5, 7);                                                                         \
      }                                                                                       \
    }                                                                                         \
    _tile_stored(0, C, c_stride);                                                             \
    _tile_stored(2, c1, c_stride);                                                            \
    if (two) {                                                                                \
      _tile_stored(1, C + 16, c_stride);                                                      \
      _tile_stored(3, c1 + 16, c_stride);                                                     \
    }                                                                                         \
  }
FASTLLM_AMX_GEMM_PAIR_JOB(gemm_pair_job_bf16, FASTLLM_AMX_TDPBF16PS)
FASTLLM_AMX_GEMM_PAIR_JOB(gemm_pair_job_fp16, FASTLLM_AMX_TDPFP16PS)
#undef FASTLLM_AMX_GEMM_PAIR_JOB

// C (+)= A B for K = 128, one 16-row strip at a time with its whole A in tiles 4-7 while the
// strip's C tiles (0 and 1) and B tiles (2 and 3) stream past: each A tile is loaded once per
// strip instead of once per 32 columns. The score products of a head dim of 128 (q k^T and
// dout v^T): measured on a Granite Rapids-class core (one thread, 128 x 128 score tiles, min
// of 40 runs) ~690 GFLOP/s against ~490 for the jobs above, which reload A per job (at K = 64
// the same scheme gained ~5 %). The forward's p v of a head dim of 128 (accumulate; K = the
// 128 keys of a key block pair, N = 128) too: the forward's key step 1.05-1.06x (mean of 12
// alternating runs), the whole forward 1.00-1.04x (B1 H8 T4096, bf16 and fp16, alternating
// processes). Narrower accumulating products take the pair jobs (the same speed here).
#define FASTLLM_AMX_GEMM_K128(NAME, DOT)                                                    \
  FASTLLM_INLINE void NAME(int M, int N, const uint16_t* A, int64_t lda, const uint16_t* B,  \
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {           \
    const int64_t a_stride = lda * 2, b_stride = ldb * 2, c_stride = ldc * 4;               \
    const int64_t b_step = 16 * ldb; /* the pair rows of 32 more K */                       \
    for (int m = 0; m < M; m += 16) {                                                       \
      const uint16_t* a = A + static_cast<int64_t>(m) * lda;                                \
      float* c = C + static_cast<int64_t>(m) * ldc;                                         \
      _tile_loadd(4, a, a_stride);                                                          \
      _tile_loadd(5, a + 32, a_stride);                                                     \
      _tile_loadd(6, a + 64, a_stride);                                                     \
      _tile_loadd(7, a + 96, a_stride);                                                     \
      int n = 0;                                                                            \
      for (; n + 32 <= N; n += 32) {                                                        \
        const uint16_t* b = B + 2 * n;                                                      \
        if (accumulate) {                                                                   \
          _tile_loadd(0, c + n, c_stride);                                                  \
          _tile_loadd(1, c + n + 16, c_stride);                                             \
        } else {                                                                            \
          _tile_zero(0);                                                                    \
          _tile_zero(1);                                                                    \
        }                                                                                   \
        _tile_loadd(2, b, b_stride);                                                        \
        DOT(0, 4, 2);                                                                       \
        _tile_loadd(3, b + 32, b_stride);                                                   \
        DOT(1, 4, 3);                                                                       \
        _tile_loadd(2, b + b_step, b_stride);                                               \
        DOT(0, 5, 2);                                                                       \
        _tile_loadd(3, b + b_step + 32, b_stride);                                          \
        DOT(1, 5, 3);                                                                       \
        _tile_loadd(2, b + 2 * b_step, b_stride);                                           \
        DOT(0, 6, 2);                                                                       \
        _tile_loadd(3, b + 2 * b_step + 32, b_stride);                                      \
        DOT(1, 6, 3);                                                                       \
        _tile_loadd(2, b + 3 * b_step, b_stride);                                           \
        DOT(0, 7, 2);                                                                       \
        _tile_loadd(3, b + 3 * b_step + 32, b_stride);                                      \
        DOT(1, 7, 3);                                                                       \
        _tile_stored(0, c + n, c_stride);                                                   \
        _tile_stored(1, c + n + 16, c_stride);                                              \
      }                                                                                     \
      if (n < N) { /* 16 columns left */                                                    \
        const uint16_t* b = B + 2 * n;                                                      \
        if (accumulate) {                                                                   \
          _tile_loadd(0, c + n, c_stride);                                                  \
        } else {                                                                            \
          _tile_zero(0);                                                                    \
        }                                                                                   \
        _tile_loadd(2, b, b_stride);                                                        \
        DOT(0, 4, 2);                                                                       \
        _tile_loadd(3, b + b_step, b_stride);                                               \
        DOT(0, 5, 3);                                                                       \
        _tile_loadd(2, b + 2 * b_step, b_stride);                                           \
        DOT(0, 6, 2);                                                                       \
        _tile_loadd(3, b + 3 * b_step, b_stride);                                           \
        DOT(0, 7, 3);                                                                       \
        _tile_stored(0, c + n, c_stride);                                                   \
      }                                                                                     \
    }                                                                                       \
  }
FASTLLM_AMX_GEMM_K128(gemm_k128_bf16, FASTLLM_AMX_TDPBF16PS)
FASTLLM_AMX_GEMM_K128(gemm_k128_fp16, FASTLLM_AMX_TDPFP16PS)
#undef FASTLLM_AMX_GEMM_K128
#undef FASTLLM_AMX_TDPBF16PS
#undef FASTLLM_AMX_TDPFP16PS

// A compiler barrier at construction and at destruction (see gemm()).
struct MemoryBarrier {
  MemoryBarrier() { __asm__ volatile("" ::: "memory"); }
  ~MemoryBarrier() { __asm__ volatile("" ::: "memory"); }
  MemoryBarrier(const MemoryBarrier&) = delete;
  MemoryBarrier& operator=(const MemoryBarrier&) = delete;
};

// Storage type E's 16-bit elements for E = cpu::BFloat16 or cpu::Half.
template <class E>
inline constexpr bool kIsHalf = std::is_same_v<E, cpu::Half>;

// C (M x N, floats) (+)= A (M x K, rows of E) B (K x N, E in pairs of rows); A rows lda
// elements apart, B's stored pair rows ldb elements apart, C rows ldc floats apart.
template <class E>
inline void gemm(int M, int N, int K, const uint16_t* A, int64_t lda, const uint16_t* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  MemoryBarrier barrier;
  if (K == 128 && (!accumulate || N > 64)) {
    if constexpr (kIsHalf<E>) {
      gemm_k128_fp16(M, N, A, lda, B, ldb, C, ldc, accumulate);
    } else {
      gemm_k128_bf16(M, N, A, lda, B, ldb, C, ldc, accumulate);
    }
    return;
  }
  int m0 = 0;
  if (N <= 64) {
    for (; m0 + 32 <= M; m0 += 32) {
      const uint16_t* a = A + static_cast<int64_t>(m0) * lda;
      float* c = C + static_cast<int64_t>(m0) * ldc;
      for (int n = 0; n < N; n += 32) {
        if constexpr (kIsHalf<E>) {
          gemm_pair_job_fp16(K, a, lda, B + 2 * n, ldb, c + n, ldc, accumulate, N - n >= 32);
        } else {
          gemm_pair_job_bf16(K, a, lda, B + 2 * n, ldb, c + n, ldc, accumulate, N - n >= 32);
        }
      }
    }
  }
  bool second = false;
  for (int m = m0; m < M; m += 16) {
    const uint16_t* a = A + static_cast<int64_t>(m) * lda;
    float* c = C + static_cast<int64_t>(m) * ldc;
    for (int n = 0; n < N; n += 32, second = !second) {
      const uint16_t* b = B + 2 * n;
      // The element type's jobs: the same tiles, its own product instruction.
#define FASTLLM_AMX_JOB(KIND)                                                 \
  if (N - n >= 32) {                                                          \
    if (second) {                                                             \
      gemm_job_set1_##KIND(K, a, lda, b, ldb, c + n, ldc, accumulate);        \
    } else {                                                                  \
      gemm_job_set0_##KIND(K, a, lda, b, ldb, c + n, ldc, accumulate);        \
    }                                                                         \
  } else if (second) {                                                        \
    gemm_half_job_set1_##KIND(K, a, lda, b, ldb, c + n, ldc, accumulate);     \
  } else {                                                                    \
    gemm_half_job_set0_##KIND(K, a, lda, b, ldb, c + n, ldc, accumulate);     \
  }
      if constexpr (kIsHalf<E>) {
        FASTLLM_AMX_JOB(fp16)
      } else {
        FASTLLM_AMX_JOB(bf16)
      }
#undef FASTLLM_AMX_JOB
    }
  }
}

// ---- the same bfloat16 products without AMX: AVX512-BF16's vdpbf16ps ---------------------
// On CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and later), the bfloat16 path's products run
// on the same packed operands with vdpbf16ps: one instruction adds, to each of 16 float32
// lanes, the two products of a pair of bfloat16 (a 32-bit unit) of each source -- A's pair
// (row m, elements k, k + 1) broadcast to every lane, B's stored pair row k / 2 (16 columns x
// 2 elements, 64 bytes) as the vector. Each product of two bfloat16 is exact in float32; each
// accumulation step rounds (to nearest even, denormals flushed, as the tile products).
// On a Zen 4 core (AMD EPYC, family 25 model 17) vdpbf16ps issues at the rate of a 16-lane
// FMA (0.27 ns each, benchmarks/micro/vdpbf16ps_rate.cpp) while doing twice its multiplies:
// 234 GFLOP/s against 117. (On Sapphire Rapids it measured 0.52 ns, below the
// float32 FMA path: there the AMX tiles take bfloat16.)
// The micro-kernel keeps an R x (16 NV) block of C in R * NV zmm registers (24: 6 x 64, 8 x 48,
// 12 x 32 or 12 x 16 floats), as cpu::avx512::gemm_tile does for float32.
//
// kHalf: float16 elements instead, each pair widened to two float32 vectors and added by two
// FMAs (products exact, as tdpfp16ps's). No CPU runs this by default: it stands in for the
// AMX-FP16 tiles when FASTLLM_CPU_EMULATE_AMX asks (cpu::cpu_amx_fp16_emulated()), so that the
// float16 tile path's packing, conversions and schemes are tested on CPUs without AMX-FP16.
template <int R, int NV, bool kHalf = false>
FASTLLM_INLINE void dot_tile(int pairs, const uint16_t* A, int64_t lda, const uint16_t* B,
                             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  __m512 c[R][NV];
  cpu::avx512::load_block(C, ldc, accumulate, c);
  if constexpr (kHalf) {
    for (int kk = 0; kk < pairs; ++kk) {
      __m512 b0[NV], b1[NV];  // rows k and k + 1 of B (the pair's low and high halves)
      for (int v = 0; v < NV; ++v) {
        const __m512i x = _mm512_loadu_si512(B + kk * ldb + 32 * v);
        b0[v] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(x));
        b1[v] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
      }
      for (int r = 0; r < R; ++r) {
        const uint16_t* a = A + r * lda + 2 * kk;
        const __m512 a0 = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<int16_t>(a[0])));
        const __m512 a1 = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<int16_t>(a[1])));
        for (int v = 0; v < NV; ++v) {
          c[r][v] = _mm512_fmadd_ps(a1, b1[v], _mm512_fmadd_ps(a0, b0[v], c[r][v]));
        }
      }
    }
    cpu::avx512::store_block(C, ldc, c);
    return;
  }
#pragma GCC unroll 2
  for (int kk = 0; kk < pairs; ++kk) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512i x = _mm512_loadu_si512(B + kk * ldb + 32 * v);
      b[v] = reinterpret_cast<const __m512bh&>(x);
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      int32_t unit;
      std::memcpy(&unit, A + r * lda + 2 * kk, sizeof(unit));
      const __m512i a = _mm512_set1_epi32(unit);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        c[r][v] = _mm512_dpbf16_ps(c[r][v], reinterpret_cast<const __m512bh&>(a), b[v]);
      }
    }
  }
  cpu::avx512::store_block(C, ldc, c);
}

// Rows of M past the full micro-kernels (fewer than R): the largest R' = R / 2^i that fits,
// then the rest.
template <int NV, int R, bool kHalf>
FASTLLM_INLINE void dot_row_tail(int rows, int pairs, const uint16_t* A, int64_t lda,
                                 const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                                 bool accumulate) {
  if constexpr (R > 0) {
    if (rows >= R) {
      dot_tile<R, NV, kHalf>(pairs, A, lda, B, ldb, C, ldc, accumulate);
      rows -= R;
      A += R * lda;
      C += R * ldc;
    }
    dot_row_tail<NV, R / 2, kHalf>(rows, pairs, A, lda, B, ldb, C, ldc, accumulate);
  }
}

template <int NV, bool kHalf>
inline void dot_columns(int M, int pairs, const uint16_t* A, int64_t lda, const uint16_t* B,
                        int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int R = cpu::avx512::kMicroRows<NV>;
  int m = 0;
  for (; m + R <= M; m += R) {
    dot_tile<R, NV, kHalf>(pairs, A + m * lda, lda, B, ldb, C + m * ldc, ldc, accumulate);
  }
  dot_row_tail<NV, 8, kHalf>(M - m, pairs, A + m * lda, lda, B, ldb, C + m * ldc, ldc,
                             accumulate);
}

// gemm's product (the same shapes and layouts) on vdpbf16ps (bfloat16), or for kHalf on
// widened float16 pairs (the emulation of the float16 tiles, see dot_tile).
template <bool kHalf = false>
inline void gemm_dot(int M, int N, int K, const uint16_t* A, int64_t lda, const uint16_t* B,
                     int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int pairs = K / 2;
  int n = 0;
  for (; n + 64 <= N; n += 64) {
    dot_columns<4, kHalf>(M, pairs, A, lda, B + 2 * n, ldb, C + n, ldc, accumulate);
  }
  switch ((N - n) / 16) {
    case 3:
      return dot_columns<3, kHalf>(M, pairs, A, lda, B + 2 * n, ldb, C + n, ldc, accumulate);
    case 2:
      return dot_columns<2, kHalf>(M, pairs, A, lda, B + 2 * n, ldb, C + n, ldc, accumulate);
    case 1:
      return dot_columns<1, kHalf>(M, pairs, A, lda, B + 2 * n, ldb, C + n, ldc, accumulate);
    default: return;
  }
}

// gemm_split's product (below) on vdpbf16ps, for tests: per K step of 32, its six part pairs in
// its order (l h, h l, m m, m h, h m, h h), each a gemm_dot over the step into a float32
// scratch block that starts from zero, then added to C once. (Added pair by pair straight into
// C, as vdpbf16ps adds, the forward's out measured 4.5x torch's float32 error at T 1023, D 32,
// where the split path on AMX tiles measured 0.3-1.2x: the tile unit evidently rounds into C
// less often. Summed per step as here: 0.3-0.6x at the tests' shapes.) 3.2x the FMA path's
// time (forward, B1 H8 T1024 D64, one Zen 4 thread): no CPU runs it by default. It stands in
// for the split path's tiles when FASTLLM_CPU_EMULATE_AMX asks (cpu::cpu_amx_split_emulated()),
// so that the float32 split path's packing, conversions and schemes are tested on CPUs without
// AMX.
inline void gemm_split_dot(int M, int N, int K, const uint16_t* A, int64_t lda, int64_t a_part,
                           const uint16_t* B, int64_t ldb, int64_t b_part, int b_seg_k,
                           int64_t b_seg, float* C, int64_t ldc, bool accumulate) {
  static constexpr int kPairs[6][2] = {{2, 0}, {0, 2}, {1, 1}, {1, 0}, {0, 1}, {0, 0}};
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(M) * N);
  for (int k = 0; k < K; k += 32) {
    const uint16_t* b = B + (k / b_seg_k) * b_seg + static_cast<int64_t>(k % b_seg_k / 2) * ldb;
    for (int i = 0; i < 6; ++i) {
      gemm_dot(M, N, 32, A + k + kPairs[i][0] * a_part, lda, b + kPairs[i][1] * b_part, ldb,
               scratch.data(), N, i > 0);
    }
    const bool add = accumulate || k > 0;
    for (int m = 0; m < M; ++m) {
      float* c = C + static_cast<int64_t>(m) * ldc;
      const float* t = scratch.data() + static_cast<int64_t>(m) * N;
      for (int n = 0; n < N; n += 16) {
        const __m512 step = _mm512_loadu_ps(t + n);
        _mm512_storeu_ps(c + n, add ? _mm512_add_ps(_mm512_loadu_ps(c + n), step) : step);
      }
    }
  }
}

// The engines that run the 16-bit path's products (attention_cpu.cpp's attention_fwd_amx and
// AmxBwdThread take one): the AMX tiles, configured per thread for the scope's lifetime, or
// vector instructions on the same packed operands (nothing to configure): vdpbf16ps for
// bfloat16 -- the avx512-bf16 path --, and the emulations of the float16 tiles and of the
// float32 split products (gemm_dot<true>, gemm_split_dot: tests only, see
// cpu::amx_emulation()).
struct TileEngine {
  using Scope = TileScope;
  template <class E>
  static void gemm(int M, int N, int K, const uint16_t* A, int64_t lda, const uint16_t* B,
                   int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    amx::gemm<E>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
  static void gemm_split(int M, int N, int K, const uint16_t* A, int64_t lda, int64_t a_part,
                         const uint16_t* B, int64_t ldb, int64_t b_part, int b_seg_k,
                         int64_t b_seg, float* C, int64_t ldc, bool accumulate);
};
struct DotEngine {
  struct Scope {};
  template <class E>
  static void gemm(int M, int N, int K, const uint16_t* A, int64_t lda, const uint16_t* B,
                   int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    gemm_dot<kIsHalf<E>>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
  static void gemm_split(int M, int N, int K, const uint16_t* A, int64_t lda, int64_t a_part,
                         const uint16_t* B, int64_t ldb, int64_t b_part, int b_seg_k,
                         int64_t b_seg, float* C, int64_t ldc, bool accumulate) {
    gemm_split_dot(M, N, K, A, lda, a_part, B, ldb, b_part, b_seg_k, b_seg, C, ldc, accumulate);
  }
};

// ---- float32 on bfloat16 tiles: each float an exact sum of three bfloat16 ---------------
// A float x (24 significant bits) is h + m + l exactly: h = bf16(x), m = bf16(x - h),
// l = x - h - m (8 significant bits at most, so exactly a bfloat16), each rounded to nearest
// even. A float32 product sum_k a_k b_k then takes the six part products whose parts sum to at
// most "m m": the three left out (m l, l m, l l) are at most 2^-24 |a_k b_k| each (|m| <=
// 2^-8 |x|, |l| <= 2^-16 |x|), float32's own rounding of each term. The part pairs run
// smallest first: each K step's small terms are added before its large ones. Six bfloat16
// tile products per float32 one, against 16-lane FMAs; the tile loads bound it (see
// gemm_split), so float32 attention gains 1.0-1.16x over its FMA path, not the instructions'
// ratio.
// (Henry et al., "Leveraging the bfloat16 Artificial Intelligence Datatype For
// Higher-Precision Computations", 2019: the 6-product "bf16x6".) Non-finite parts: a part
// after an infinite or NaN h is 0, so inf and NaN pass as h alone; bfloat16 conversion
// flushes denormals (below 2^-126 ~ 1.2e-38), so a part that small is 0 -- l of x below
// ~2^-110 (~8e-34) loses up to 2^-16 of x; and |x| above bfloat16's largest finite value
// (~3.39e38) has h = inf.
constexpr int kSplitParts = 3;

// 16 bfloat16 words as floats (exact).
FASTLLM_INLINE __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// x = h + m + l (see above), each 16 bfloat16 words.
FASTLLM_INLINE void split3(__m512 x, __m256i& h, __m256i& m, __m256i& l) {
  const __m256bh hb = _mm512_cvtneps_pbh(x);
  h = reinterpret_cast<const __m256i&>(hb);
  const __m512 hx = widen_bf16(h);
  // 0x99: NaN, +inf, -inf: the parts after a non-finite h are 0.
  const __mmask16 finite = static_cast<__mmask16>(~_mm512_fpclass_ps_mask(hx, 0x99));
  const __m512 r = _mm512_maskz_sub_ps(finite, x, hx);
  const __m256bh mb = _mm512_cvtneps_pbh(r);
  m = reinterpret_cast<const __m256i&>(mb);
  const __m256bh lb = _mm512_cvtneps_pbh(_mm512_sub_ps(r, widen_bf16(m)));
  l = reinterpret_cast<const __m256i&>(lb);
}

// Stores the three parts of 16 floats at dst, dst + part, dst + 2 part.
FASTLLM_INLINE void store_split3(uint16_t* dst, int64_t part, __m512 x) {
  __m256i h, m, l;
  split3(x, h, m, l);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + part), m);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * part), l);
}

// Float rows (row r at first + r * stride_t, element d at + d * stride_d) as three
// bfloat16 part arrays (part p at dst + p * part): dst[r * ld + d] for r < rows_padded, d < ld
// (a multiple of 16), zero past rows x D. The split operands' pack_rows (then A operands; as
// key-row staging for pack_column_pairs / pack_row_pairs, which take each part as 16-bit rows).
inline void split_rows(const float* first, int64_t stride_t, int64_t stride_d, int rows,
                       int rows_padded, int D, int ld, uint16_t* dst, int64_t part) {
  for (int r = 0; r < rows_padded; ++r) {
    uint16_t* out = dst + static_cast<int64_t>(r) * ld;
    if (r >= rows) {
      for (int p = 0; p < kSplitParts; ++p) std::memset(out + p * part, 0, sizeof(uint16_t) * ld);
      continue;
    }
    const float* in = first + r * stride_t;
    // The rows are strided (a head's row of a (B, T, H, D) tensor); the prefetchers miss
    // them: 4 rows ahead.
    if (stride_d == 1 && r + 4 < rows) {
      for (int d = 0; d < D; d += 16) _mm_prefetch(in + 4 * stride_t + d, _MM_HINT_T0);
    }
    for (int d = 0; d < ld; d += 16) {
      const int n = std::clamp(D - d, 0, 16);
      const __mmask16 live = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
      __m512 x;
      if (stride_d == 1) {
        x = _mm512_maskz_loadu_ps(live, in + d);
      } else {
        alignas(64) float g[16] = {};
        for (int i = 0; i < n; ++i) g[i] = in[(d + i) * stride_d];
        x = _mm512_load_ps(g);
      }
      store_split3(out + d, part, x);
    }
  }
}

// The split path's pack_transposed, from float rows: part q of src[r][d] at dst + q * part +
// d * ld + r for d < Dn, r < ld (zero past rows x D): 16 x 16 blocks transposed as floats
// (cpu::avx512::transpose_16x16_epi32), then split, instead of a scalar transpose of each
// part.
inline void split_transposed(const float* first, int64_t stride_t, int64_t stride_d, int rows,
                             int D, int Dn, int ld, uint16_t* dst, int64_t part) {
  for (int q = 0; q < kSplitParts; ++q) {
    std::memset(dst + q * part, 0, sizeof(uint16_t) * static_cast<int64_t>(Dn) * ld);
  }
  for (int r0 = 0; r0 < rows; r0 += 16) {
    for (int d0 = 0; d0 < D; d0 += 16) {
      const int nd = std::min(16, D - d0);
      const __mmask16 live = nd == 16 ? __mmask16(0xFFFF) : __mmask16((1u << nd) - 1);
      __m512i block[16];
      for (int i = 0; i < 16; ++i) {
        const float* in = first + (r0 + i) * stride_t + d0 * stride_d;
        if (r0 + i >= rows) {
          block[i] = _mm512_setzero_si512();
        } else if (stride_d == 1) {
          block[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(live, in));
        } else {
          alignas(64) float g[16] = {};
          for (int j = 0; j < nd; ++j) g[j] = in[j * stride_d];
          block[i] = _mm512_castps_si512(_mm512_load_ps(g));
        }
      }
      cpu::avx512::transpose_16x16_epi32(block);
      for (int j = 0; j < nd; ++j) {
        store_split3(dst + static_cast<int64_t>(d0 + j) * ld + r0, part,
                     _mm512_castsi512_ps(block[j]));
      }
    }
  }
}

// C (M x N floats) (+)= sum over the six part pairs (a, b) of A_a B_b: the float32 product of
// the split operands, A part p at A + p * a_part (M x K, rows lda apart), B part p at
// B + p * b_part (K x N in pairs of rows, pair rows ldb apart). B's K may lie in segments of
// b_seg_k (a multiple of 32) rows, b_seg elements apart (two key blocks of a tile cache, each
// with its three parts). One 16-row strip x 32 columns at a time: C tiles 0-1; per K step the
// strip's A parts in tiles 2 (h) and 3 (l, then m), the two column tiles' B parts in 4 / 6
// (h) and 5 / 7 (l, then m): 3 A and 6 B loads for 12 products, the two C tiles' products
// alternating. Per K step the pairs run
// l h, h l, m m, m h, h m, h h (small first). Measured against the six pairs outermost with
// two strips (1 load per product): 1.07-1.16x the forward (D = 64 and 128, one Granite
// Rapids-class core); the errors stayed at 0.3-1.2x torch's float32 SDPA's.
inline void gemm_split(int M, int N, int K, const uint16_t* A, int64_t lda, int64_t a_part,
                       const uint16_t* B, int64_t ldb, int64_t b_part, int b_seg_k, int64_t b_seg,
                       float* C, int64_t ldc, bool accumulate) {
  MemoryBarrier barrier;
  const int64_t c_stride = ldc * 4, a_stride = lda * 2, b_stride = ldb * 2;
  for (int m0 = 0; m0 < M; m0 += 16) {
    for (int n = 0; n < N; n += 32) {
      const bool two_cols = N - n >= 32;
      float* c0 = C + static_cast<int64_t>(m0) * ldc + n;
      if (accumulate) {
        _tile_loadd(0, c0, c_stride);
        if (two_cols) _tile_loadd(1, c0 + 16, c_stride);
      } else {
        _tile_zero(0);
        _tile_zero(1);
      }
      const uint16_t* a = A + static_cast<int64_t>(m0) * lda;
      for (int k = 0; k < K; k += 32) {
        const uint16_t* b =
            B + 2 * n + (k / b_seg_k) * b_seg + static_cast<int64_t>(k % b_seg_k / 2) * ldb;
        const uint16_t* ah = a + k;
        const uint16_t* am = ah + a_part;
        const uint16_t* al = ah + 2 * a_part;
        if (two_cols) {
          _tile_loadd(3, al, a_stride);
          _tile_loadd(4, b, b_stride);
          _tile_loadd(6, b + 32, b_stride);
          _tile_dpbf16ps(0, 3, 4);  // l h
          _tile_dpbf16ps(1, 3, 6);
          _tile_loadd(2, ah, a_stride);
          _tile_loadd(5, b + 2 * b_part, b_stride);
          _tile_loadd(7, b + 2 * b_part + 32, b_stride);
          _tile_dpbf16ps(0, 2, 5);  // h l
          _tile_dpbf16ps(1, 2, 7);
          _tile_loadd(3, am, a_stride);
          _tile_loadd(5, b + b_part, b_stride);
          _tile_loadd(7, b + b_part + 32, b_stride);
          _tile_dpbf16ps(0, 3, 5);  // m m
          _tile_dpbf16ps(1, 3, 7);
          _tile_dpbf16ps(0, 3, 4);  // m h
          _tile_dpbf16ps(1, 3, 6);
          _tile_dpbf16ps(0, 2, 5);  // h m
          _tile_dpbf16ps(1, 2, 7);
          _tile_dpbf16ps(0, 2, 4);  // h h
          _tile_dpbf16ps(1, 2, 6);
        } else {
          _tile_loadd(3, al, a_stride);
          _tile_loadd(4, b, b_stride);
          _tile_dpbf16ps(0, 3, 4);
          _tile_loadd(2, ah, a_stride);
          _tile_loadd(5, b + 2 * b_part, b_stride);
          _tile_dpbf16ps(0, 2, 5);
          _tile_loadd(3, am, a_stride);
          _tile_loadd(5, b + b_part, b_stride);
          _tile_dpbf16ps(0, 3, 5);
          _tile_dpbf16ps(0, 3, 4);
          _tile_dpbf16ps(0, 2, 5);
          _tile_dpbf16ps(0, 2, 4);
        }
      }
      _tile_stored(0, c0, c_stride);
      if (two_cols) _tile_stored(1, c0 + 16, c_stride);
    }
  }
}

inline void TileEngine::gemm_split(int M, int N, int K, const uint16_t* A, int64_t lda,
                                   int64_t a_part, const uint16_t* B, int64_t ldb,
                                   int64_t b_part, int b_seg_k, int64_t b_seg, float* C,
                                   int64_t ldc, bool accumulate) {
  amx::gemm_split(M, N, K, A, lda, a_part, B, ldb, b_part, b_seg_k, b_seg, C, ldc, accumulate);
}

// ---- packing 16-bit storage rows (row r at first + r * stride_t, element d at + d *
// stride_d) into the operand layouts; everything past rows x D is zero ----------------------

// dst[r * ld + d] = src[r][d]: A operands (q, dout), rows_padded rows of `ld` elements.
inline void pack_rows(const uint16_t* first, int64_t stride_t, int64_t stride_d, int rows,
                      int rows_padded, int D, int ld, uint16_t* dst) {
  for (int r = 0; r < rows_padded; ++r) {
    uint16_t* out = dst + static_cast<int64_t>(r) * ld;
    if (r >= rows) {
      std::memset(out, 0, sizeof(uint16_t) * ld);
      continue;
    }
    const uint16_t* in = first + r * stride_t;
    if (stride_d == 1) {
      std::memcpy(out, in, sizeof(uint16_t) * D);
    } else {
      for (int d = 0; d < D; ++d) out[d] = in[d * stride_d];
    }
    std::memset(out + D, 0, sizeof(uint16_t) * (ld - D));
  }
}

// Row c of dst (dst + c * ld_dst, c < rows), element d < D = E(scale * src[d * ld + c]): the
// transposed float accumulators dk^T / dv^T (round_up(D, 16) rows of ld >= round_up(rows, 16)
// floats) stored as key rows, 16 x 16 blocks through cpu::avx512::transpose_16x16_epi32,
// rounded as from_acc rounds (cpu::avx512::store).
template <class E>
inline void store_transposed_rows(const float* src, int64_t ld, int rows, int D, float scale,
                                  E* dst, int64_t ld_dst) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int c0 = 0; c0 < rows; c0 += 16) {
    const int nc = std::min(16, rows - c0);
    for (int d0 = 0; d0 < D; d0 += 16) {
      const int nd = std::min(16, D - d0);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = _mm512_castps_si512(
            _mm512_loadu_ps(src + static_cast<int64_t>(d0 + i) * ld + c0));
      }
      cpu::avx512::transpose_16x16_epi32(r);
      for (int j = 0; j < nc; ++j) {
        E* out = dst + static_cast<int64_t>(c0 + j) * ld_dst + d0;
        const __m512 x = _mm512_mul_ps(_mm512_castsi512_ps(r[j]), vscale);
        if (nd == 16) {
          cpu::avx512::store(out, x);
        } else {
          cpu::avx512::storen(out, x, nd);
        }
      }
    }
  }
}

// The transposed rows in pairs of columns: dst[(d / 2) * 2 cols + 2 r + d % 2] = src[r][d]
// for d < Dk (a multiple of 32), r < cols (a multiple of 16): the B operand k^T (and v^T)
// of a key tile, whose row pairs are pairs of adjacent elements of one key row.
inline void pack_column_pairs(const uint16_t* first, int64_t stride_t, int64_t stride_d,
                              int rows, int cols, int D, int Dk, uint16_t* dst) {
  const int64_t ld = 2 * static_cast<int64_t>(cols);
  std::memset(dst, 0, sizeof(uint16_t) * ld * (Dk / 2));
  if (stride_d == 1) {
    // The rows as 32-bit units (pairs of elements), transposed 16 x 16 at a time: units
    // [u0, u0 + 16) of rows [r0, r0 + 16) become rows u0.. of 16 units from column r0 on.
    // Units past D (half a pair at an odd D) and rows past `rows` load as zeros; dst has
    // Dk / 2 (a multiple of 16) rows of cols (a multiple of 16) units.
    const int units = (D + 1) / 2;
    uint32_t* out32 = reinterpret_cast<uint32_t*>(dst);
    for (int r0 = 0; r0 < rows; r0 += 16) {
      for (int u0 = 0; u0 < units; u0 += 16) {
        // 16-bit elements [2 u0, D) of each row, at most 32 of them.
        const int elems = std::min(32, D - 2 * u0);
        const __mmask32 live = elems == 32 ? ~__mmask32(0) : (__mmask32(1) << elems) - 1;
        __m512i block[16];
        for (int i = 0; i < 16; ++i) {
          block[i] = r0 + i < rows
                         ? _mm512_maskz_loadu_epi16(live, first + (r0 + i) * stride_t + 2 * u0)
                         : _mm512_setzero_si512();
        }
        cpu::avx512::transpose_16x16_epi32(block);
        for (int i = 0; i < 16; ++i) {
          _mm512_storeu_si512(out32 + static_cast<int64_t>(u0 + i) * cols + r0, block[i]);
        }
      }
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const uint16_t* in = first + r * stride_t;
    for (int d = 0; d < D; ++d) dst[(d / 2) * ld + 2 * r + d % 2] = in[d * stride_d];
  }
}

// 32 words -- 0-15 from row r, 16-31 from row r + 1 (e.g. to_words(row r, row r + 1)) -- in
// pairs of rows: word 2 c is row r's column c, word 2 c + 1 row r + 1's.
FASTLLM_INLINE __m512i interleave_row_pair(__m512i rows) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  return _mm512_permutexvar_epi16(order, rows);
}

// In pairs of rows: dst[(r / 2) * 2 Dn + 2 d + r % 2] = src[r][d] for r < rows_padded (even),
// d < Dn: the B operand v (and k) of a key tile, keys along K.
inline void pack_row_pairs(const uint16_t* first, int64_t stride_t, int64_t stride_d, int rows,
                           int rows_padded, int D, int Dn, uint16_t* dst) {
  const int64_t ld = 2 * static_cast<int64_t>(Dn);
  std::memset(dst, 0, sizeof(uint16_t) * ld * (rows_padded / 2));
  if (stride_d == 1) {
    // Rows r and r + 1 interleaved 16 elements at a time: words 2 i and 2 i + 1 of a store are
    // element d + i of row r and of row r + 1 (zero past D, or past `rows`). Dn >= D rounded
    // up to 16, so every store stays within its pair row.
    for (int r = 0; r < rows; r += 2) {
      const uint16_t* in0 = first + r * stride_t;
      const uint16_t* in1 = r + 1 < rows ? in0 + stride_t : nullptr;
      uint16_t* out = dst + (r / 2) * ld;
      for (int d = 0; d < D; d += 16) {
        const int n = std::min(16, D - d);
        const __mmask16 live = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
        const __m256i a = _mm256_maskz_loadu_epi16(live, in0 + d);
        const __m256i b = in1 == nullptr ? _mm256_setzero_si256()
                                         : _mm256_maskz_loadu_epi16(live, in1 + d);
        _mm512_storeu_si512(
            out + 2 * d, interleave_row_pair(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)));
      }
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const uint16_t* in = first + r * stride_t;
    uint16_t* out = dst + (r / 2) * ld + r % 2;
    for (int d = 0; d < D; ++d) out[2 * d] = in[d * stride_d];
  }
}

// dst[d * ld + r] = src[r][d] for d < Dn, r < ld (padding zero): the A operands q^T and
// dout^T of backward's dk^T / dv^T products, query rows along K.
inline void pack_transposed(const uint16_t* first, int64_t stride_t, int64_t stride_d, int rows,
                            int D, int Dn, int ld, uint16_t* dst) {
  std::memset(dst, 0, sizeof(uint16_t) * static_cast<int64_t>(Dn) * ld);
  for (int r = 0; r < rows; ++r) {
    const uint16_t* in = first + r * stride_t;
    for (int d = 0; d < D; ++d) dst[static_cast<int64_t>(d) * ld + r] = in[d * stride_d];
  }
}

// ---- float32 score tiles -> 16-bit operands -----------------------------------------------
// bfloat16: vcvtne2ps2bf16 rounds to nearest even (denormals flushed: p and ds that small add
// nothing a bfloat16 product could keep); float16: vcvtps2ph, to nearest even.

// 16 floats as 16 elements of E.
template <class E>
FASTLLM_INLINE __m256i to_words(__m512 x) {
  if constexpr (kIsHalf<E>) {
    return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256bh v = _mm512_cvtneps_pbh(x);
    return reinterpret_cast<const __m256i&>(v);
  }
}

// 32 floats as 32 elements of E: words 0-15 from lo, 16-31 from hi.
template <class E>
FASTLLM_INLINE __m512i to_words(__m512 lo, __m512 hi) {
  if constexpr (kIsHalf<E>) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(to_words<E>(lo)), to_words<E>(hi), 1);
  } else {
    const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
    return reinterpret_cast<const __m512i&>(v);
  }
}

// dst[r * ld + c] = E(X[r * ldx + c]) for rows [lo, hi), c < N (a multiple of 16), zero for
// the columns [N, K) and for the rows of [lo, hi) outside [live_lo, live_hi). kSplit
// (E = cpu::BFloat16): the three bfloat16 parts of X instead, part q at dst + q * part.
template <class E, bool kSplit = false>
inline void convert_rows(const float* X, int64_t ldx, int lo, int hi, int live_lo, int live_hi,
                         int N, int K, uint16_t* dst, int64_t ld, int64_t part = 0) {
  constexpr int kParts = kSplit ? kSplitParts : 1;
  for (int r = lo; r < hi; ++r) {
    uint16_t* out = dst + static_cast<int64_t>(r) * ld;
    if (r < live_lo || r >= live_hi) {
      for (int q = 0; q < kParts; ++q) std::memset(out + q * part, 0, sizeof(uint16_t) * K);
      continue;
    }
    const float* in = X + static_cast<int64_t>(r) * ldx;
    int c = 0;
    if constexpr (kSplit) {
      for (; c < N; c += 16) store_split3(out + c, part, _mm512_loadu_ps(in + c));
    } else {
      for (; c + 32 <= N; c += 32) {
        _mm512_storeu_si512(out + c,
                            to_words<E>(_mm512_loadu_ps(in + c), _mm512_loadu_ps(in + c + 16)));
      }
      if (c < N) {  // 16 left
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c),
                            to_words<E>(_mm512_loadu_ps(in + c)));
        c += 16;
      }
    }
    for (int q = 0; q < kParts; ++q) {
      if (c < K) std::memset(out + q * part + c, 0, sizeof(uint16_t) * (K - c));
    }
  }
}

// The three parts p0 of row r and p1 of row r + 1, 16 columns each, in pairs of rows (as
// interleave_row_pair lays them out): 32 words per part at dst + q * part.
FASTLLM_INLINE void store_parts_pairs(uint16_t* dst, int64_t part, const __m256i* p0,
                                      const __m256i* p1) {
  for (int q = 0; q < kSplitParts; ++q) {
    _mm512_storeu_si512(dst + q * part, interleave_row_pair(_mm512_inserti64x4(
                                            _mm512_castsi256_si512(p0[q]), p1[q], 1)));
  }
}
// The same for the floats x0 (row r) and x1 (row r + 1), split here.
FASTLLM_INLINE void store_split3_pairs(uint16_t* dst, int64_t part, __m512 x0, __m512 x1) {
  __m256i p0[3], p1[3];
  split3(x0, p0[0], p0[1], p0[2]);
  split3(x1, p1[0], p1[1], p1[2]);
  store_parts_pairs(dst, part, p0, p1);
}

// In pairs of rows: dst[(r / 2) * 2 N + 2 c + r % 2] = E(X[r * ldx + c]) for rows [lo, hi)
// (lo, hi even), c < N (a multiple of 16), zero for the rows outside [live_lo, live_hi): the
// B operands p and ds of backward's dv^T and dk^T products, query rows along K. kSplit
// (E = cpu::BFloat16): the three bfloat16 parts of X instead, part q at dst + q * part.
template <class E, bool kSplit = false>
inline void convert_row_pairs(const float* X, int64_t ldx, int lo, int hi, int live_lo,
                              int live_hi, int N, uint16_t* dst, int64_t part = 0) {
  constexpr int kParts = kSplit ? kSplitParts : 1;
  const int64_t ld = 2 * static_cast<int64_t>(N);
  const __m512 zero = _mm512_setzero_ps();
  for (int r = lo; r < hi; r += 2) {
    const bool live0 = r >= live_lo && r < live_hi;
    const bool live1 = r + 1 >= live_lo && r + 1 < live_hi;
    uint16_t* out = dst + (r / 2) * ld;
    if (!live0 && !live1) {
      for (int q = 0; q < kParts; ++q) std::memset(out + q * part, 0, sizeof(uint16_t) * ld);
      continue;
    }
    const float* x0 = X + static_cast<int64_t>(r) * ldx;
    const float* x1 = x0 + ldx;
    for (int c = 0; c < N; c += 16) {
      const __m512 a = live0 ? _mm512_loadu_ps(x0 + c) : zero;
      const __m512 b = live1 ? _mm512_loadu_ps(x1 + c) : zero;
      if constexpr (kSplit) {
        store_split3_pairs(out + 2 * c, part, a, b);
      } else {
        _mm512_storeu_si512(out + 2 * c, interleave_row_pair(to_words<E>(a, b)));
      }
    }
  }
}


// s[r][c] *= scale for the rows [r0, r1) of a score tile of rows of N floats (N a multiple
// of 16): the raw product's scores before the features that read them.
inline void scale_scores(float* s, int N, int r0, int r1, float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t e = int64_t{r0} * N; e < int64_t{r1} * N; e += 16) {
    _mm512_storeu_ps(s + e, _mm512_mul_ps(_mm512_loadu_ps(s + e), vscale));
  }
}

// ---- forward's online softmax, straight to the 16-bit p operand ---------------------------

// 2^t for the forward's p: a degree-4 polynomial for 2^r, r in [0, 1) (relative error 2.7e-6;
// fitted by Lawson's iteration on 2^r's relative error, float32 coefficients) instead of
// cpu::avx512::exp2's degree 5 (1.5e-7). p is rounded to bfloat16 (2^-9) or float16 (2^-12)
// for its product right after, and the row sums take these p as well, so the logsumexp is off
// by at most 2.7e-6 (torch's own float32 lse of these inputs: ~5e-7; degree 3, 7.5e-5, would be
// too far).
FASTLLM_INLINE __m512 exp2_p(__m512 t) {
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 y = _mm512_set1_ps(0.013534124940633774f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.05201142653822899f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.24144287407398224f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.69300377368927f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0000026226043701f));
  return _mm512_scalef_ps(y, t);
}

// The forward's score tile step when no feature modifies the scores but an attn_bias (no
// softcap, ALiBi, mixed key padding block or dropout): for the rows [lo, hi) of the raw product
// S = q k^T (rows of N floats, N a multiple of 16), the scores scale * S of row r's allowed
// columns [begin[r], end[r]) update its running max m[r], sum l[r] and output row O + r * ldo
// (Dp floats), as avx512::Ops::online_softmax does, and p goes straight to P (rows of ldp
// E; zero for the masked columns, the columns [N, ldp) and the rows outside [live_lo,
// live_hi)). One pass instead of scaling S, the softmax and a conversion of p.
//
// bias != nullptr: an additive attn_bias (E, its columns contiguous) joins the scores,
// scale S + bias, as ScoreMods::add_bias adds it: row r's at bias + r * bias_ld, of which the
// first nb columns exist (the rest are masked keys; never read).
//
// kSplit (E = cpu::BFloat16, the float32 inputs' split path): p is computed with the float32
// path's exp2 (cpu::avx512::exp2, not exp2_p) and written as its three bfloat16 parts, part q
// at P + q * p_part (see split3).
template <class E, bool kSplit = false>
inline void online_softmax_to_p(const float* S, int N, int lo, int hi, int live_lo, int live_hi,
                                const int* begin, const int* end, float scale, float* m, float* l,
                                float* O, int64_t ldo, int Dp, uint16_t* P, int64_t ldp,
                                const uint16_t* bias = nullptr, int64_t bias_ld = 0, int nb = 0,
                                int64_t p_part = 0) {
  static_assert(!kSplit || !kIsHalf<E>, "the split path's parts are bfloat16");
  constexpr int kParts = kSplit ? kSplitParts : 1;
  constexpr float kMaxGrowth = 8.0f;  // see avx512::Ops::online_softmax_row
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 log2e = _mm512_set1_ps(cpu::avx512::kLog2e);
  static_assert(kMaxGrowth == 8.0f, "growth_limit is e^kMaxGrowth = 2980.96, rounded down");
  const __m512 growth_limit = _mm512_set1_ps(2980.0f);
  // A power-of-two scale (1 / sqrt(D) at D = 16, 64, 256) multiplies exactly, so with the
  // max in the raw product's units, M = m / scale, (s - M) (scale log2 e) is the same float
  // as (scale s - m) log2 e (the same real number rounded once); ~10 % off this function.
  int scale_exponent = 0;
  const bool exact_scale = std::frexp(scale, &scale_exponent) == 0.5f;
  const float inv_scale = 1.0f / scale;
  const __m512 scale_log2e = _mm512_set1_ps(scale * cpu::avx512::kLog2e);
  for (int r0 = lo; r0 < hi; r0 += 16) {
    __m512 sums[16];
    for (int i = 0; i < 16; ++i) {
      const int r = r0 + i;
      sums[i] = _mm512_setzero_ps();
      uint16_t* p = P + static_cast<int64_t>(r) * ldp;
      if (r >= hi || r < live_lo || r >= live_hi || begin[r] >= end[r]) {
        if (r < hi) {
          for (int q = 0; q < kParts; ++q) std::memset(p + q * p_part, 0, sizeof(uint16_t) * ldp);
        }
        continue;
      }
      const float* s = S + static_cast<int64_t>(r) * N;
      const E* b = bias == nullptr
                       ? nullptr
                       : reinterpret_cast<const E*>(bias) + static_cast<int64_t>(r) * bias_ld;
      const bool full = begin[r] == 0 && end[r] == N;
      auto allowed = [&](int j) FASTLLM_INLINE_LAMBDA {
        return full ? __mmask16(0xFFFF) : cpu::avx512::band_mask(j, begin[r], end[r]);
      };
      // The scores of columns [j, j + 16): scale s (+ the bias, 0 past its nb columns).
      auto scores = [&](int j) FASTLLM_INLINE_LAMBDA {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale);
        if (b == nullptr || j >= nb) return x;
        return _mm512_add_ps(x, nb - j >= 16 ? cpu::avx512::load(b + j)
                                             : cpu::avx512::loadn(b + j, nb - j));
      };
      // t = (scale s (+ bias) - m) log2 e of columns [j, j + 16), with scale s rounded as
      // it was for m, so that t = 0 exactly at the max (folding scale and log2 e into one
      // FMA would leave the product's rounding error there, a large error for scores near
      // 1e5 and up). folded (an exact scale, no bias; vm = M = m / scale): the same float as
      // (s - M) (scale log2 e), one multiplication fewer.
      auto exponent = [&](int j, __m512 vm, bool folded) FASTLLM_INLINE_LAMBDA {
        if (folded) return _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm), scale_log2e);
        return _mm512_mul_ps(_mm512_sub_ps(scores(j), vm), log2e);
      };
      auto exp2_of = [&](__m512 t) FASTLLM_INLINE_LAMBDA {
        if constexpr (kSplit) {
          return cpu::avx512::exp2(t);
        } else {
          return exp2_p(t);
        }
      };
      // p = 2^t of the allowed columns into p and the row's sum; true when some lane of the
      // sum exceeds e^kMaxGrowth: then some p may, and m must grow first. (A lane sums N / 16
      // of the p: a superset of the p > e^kMaxGrowth test, one compare a row instead of one
      // a vector; when a lane's sum alone gets there, the max pass recomputes an m that stands
      // and rescales by 1.)
      auto exp_pass = [&](__m512& vsum) FASTLLM_INLINE_LAMBDA {
        const float mr = m[r] == neg_inf ? 0.0f : m[r];
        const bool folded = exact_scale && b == nullptr && std::isfinite(mr * inv_scale);
        const __m512 vm = _mm512_set1_ps(folded ? mr * inv_scale : mr);
        vsum = _mm512_setzero_ps();
        int j = 0;
        for (; j + 32 <= N; j += 32) {
          const __m512 t0 = exponent(j, vm, folded);
          const __m512 t1 = exponent(j + 16, vm, folded);
          const __mmask16 a0 = allowed(j), a1 = allowed(j + 16);
          const __m512 p0 = _mm512_maskz_mov_ps(a0, exp2_of(t0));
          const __m512 p1 = _mm512_maskz_mov_ps(a1, exp2_of(t1));
          vsum = _mm512_add_ps(vsum, _mm512_add_ps(p0, p1));
          if constexpr (kSplit) {
            store_split3(p + j, p_part, p0);
            store_split3(p + j + 16, p_part, p1);
          } else if constexpr (kIsHalf<E>) {  // two stores instead of joining the halves on port 5
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_words<E>(p0));  // (~5 %)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j + 16), to_words<E>(p1));
          } else {
            _mm512_storeu_si512(p + j, to_words<E>(p0, p1));
          }
        }
        if (j < N) {  // 16 left
          const __m512 t0 = exponent(j, vm, folded);
          const __m512 p0 = _mm512_maskz_mov_ps(allowed(j), exp2_of(t0));
          vsum = _mm512_add_ps(vsum, p0);
          if constexpr (kSplit) {
            store_split3(p + j, p_part, p0);
          } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_words<E>(p0));
          }
        }
        return _mm512_cmp_ps_mask(vsum, growth_limit, _CMP_GT_OQ) != 0;
      };
      // The common step -- no score far above the running max -- is that one pass; otherwise
      // (and at the row's first keys) the max first, the rescale, then the pass again.
      __m512 vsum;
      if (m[r] == neg_inf || exp_pass(vsum)) {
        __m512 vmax = _mm512_set1_ps(neg_inf);
        for (int j = 0; j < N; j += 16) {
          vmax = _mm512_mask_max_ps(vmax, allowed(j), vmax, scores(j));
        }
        const float m_new = std::max(m[r], _mm512_reduce_max_ps(vmax));
        const float alpha =
            m[r] == neg_inf ? 0.0f
                            : _mm512_cvtss_f32(cpu::avx512::exp2(
                                  _mm512_set1_ps((m[r] - m_new) * cpu::avx512::kLog2e)));
        l[r] *= alpha;
        float* o = O + static_cast<int64_t>(r) * ldo;
        const __m512 valpha = _mm512_set1_ps(alpha);
        for (int c = 0; c < Dp; c += 16) {
          _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), valpha));
        }
        m[r] = m_new;
        exp_pass(vsum);
      }
      if (N < ldp) {
        for (int q = 0; q < kParts; ++q) {
          std::memset(p + q * p_part + N, 0, sizeof(uint16_t) * (ldp - N));
        }
      }
      sums[i] = vsum;
    }
    const int rows = std::min(16, hi - r0);
    const __mmask16 live = rows == 16 ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
    _mm512_mask_storeu_ps(l + r0, live,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(live, l + r0),
                                        avx512::Ops::row_sums(sums)));
  }
}

// ---- backward's softmax gradient, straight to the 16-bit operands --------------------------

// The backward's step when no feature modifies the scores (as online_softmax_to_p): from
// the raw products S = q k^T and dP = dout v^T (rows of N floats, N a multiple of 16) of the
// rows [lo, hi) (lo, hi even), p = exp(scale S - lse) on row r's allowed columns and ds =
// p (dP - delta) (avx512::Ops::softmax_grad's math), written as the three operands of the
// products that follow: ds as rows (ds_rows, rows of ld_rows E, zero from N on), and
// p and ds in pairs of rows (p_pairs, ds_pairs: 2 N per row pair). Rows outside [live_lo,
// live_hi), without allowed keys or with lse = -inf (no key at all) get p = ds = 0.
//
// kSplit (E = cpu::BFloat16, the float32 inputs' split path): each operand as its three
// bfloat16 parts, ds_rows' part q at ds_rows + q * rows_part, p_pairs' and ds_pairs' at
// + q * pairs_part (see split3).
template <class E, bool kSplit = false>
inline void softmax_grad_to_operands(const float* S, const float* dP, int N, int lo, int hi,
                                     int live_lo, int live_hi, const int* begin, const int* end,
                                     float scale, const float* lse, const float* delta,
                                     uint16_t* ds_rows, int64_t ld_rows, uint16_t* p_pairs,
                                     uint16_t* ds_pairs, int64_t rows_part = 0,
                                     int64_t pairs_part = 0) {
  constexpr int kParts = kSplit ? kSplitParts : 1;
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 log2e = _mm512_set1_ps(cpu::avx512::kLog2e);
  const int64_t ld_pairs = 2 * static_cast<int64_t>(N);
  for (int r = lo; r < hi; r += 2) {
    bool live[2];
    for (int i = 0; i < 2; ++i) {
      const int row = r + i;
      live[i] = row >= live_lo && row < live_hi && begin[row] < end[row] &&
                lse[row] != -std::numeric_limits<float>::infinity();
    }
    uint16_t* pp = p_pairs + (r / 2) * ld_pairs;
    uint16_t* dsp = ds_pairs + (r / 2) * ld_pairs;
    if (!live[0] && !live[1]) {
      for (int q = 0; q < kParts; ++q) {
        std::memset(pp + q * pairs_part, 0, sizeof(uint16_t) * ld_pairs);
        std::memset(dsp + q * pairs_part, 0, sizeof(uint16_t) * ld_pairs);
        std::memset(ds_rows + q * rows_part + static_cast<int64_t>(r) * ld_rows, 0,
                    sizeof(uint16_t) * 2 * ld_rows);
      }
      continue;
    }
    for (int c = 0; c < N; c += 16) {
      __m512 p[2], ds[2];
      for (int i = 0; i < 2; ++i) {
        const int row = r + i;
        if (!live[i]) {
          p[i] = ds[i] = _mm512_setzero_ps();
          continue;
        }
        const int64_t e = static_cast<int64_t>(row) * N + c;
        const __m512 t = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(S + e), vscale), _mm512_set1_ps(lse[row])),
            log2e);
        p[i] = _mm512_maskz_mov_ps(cpu::avx512::band_mask(c, begin[row], end[row]),
                                   cpu::avx512::exp2(t));
        ds[i] = _mm512_mul_ps(p[i], _mm512_sub_ps(_mm512_loadu_ps(dP + e), _mm512_set1_ps(delta[row])));
      }
      if constexpr (kSplit) {  // ds split once for its pairs and its rows
        store_split3_pairs(pp + 2 * c, pairs_part, p[0], p[1]);
        __m256i d[2][3];
        for (int i = 0; i < 2; ++i) {
          split3(ds[i], d[i][0], d[i][1], d[i][2]);
          uint16_t* row = ds_rows + static_cast<int64_t>(r + i) * ld_rows + c;
          for (int q = 0; q < kSplitParts; ++q) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + q * rows_part), d[i][q]);
          }
        }
        store_parts_pairs(dsp + 2 * c, pairs_part, d[0], d[1]);
        continue;
      }
      const __m512i dsi = to_words<E>(ds[0], ds[1]);
      _mm512_storeu_si512(pp + 2 * c, interleave_row_pair(to_words<E>(p[0], p[1])));
      _mm512_storeu_si512(dsp + 2 * c, interleave_row_pair(dsi));
      // Words 0-15 are row r's ds, 16-31 row r + 1's.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds_rows + static_cast<int64_t>(r) * ld_rows + c),
                          _mm512_castsi512_si256(dsi));
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(ds_rows + static_cast<int64_t>(r + 1) * ld_rows + c),
          _mm512_extracti64x4_epi64(dsi, 1));
    }
    for (int q = 0; q < kParts; ++q) {
      for (int i = 0; i < 2; ++i) {
        std::memset(ds_rows + q * rows_part + static_cast<int64_t>(r + i) * ld_rows + N, 0,
                    sizeof(uint16_t) * (ld_rows - N));
      }
    }
  }
}

}  // namespace amx
}  // namespace attention
}  // namespace fastllm

FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AMX_END

#endif  // x86
