// gemm_cpu.h's float32 GEMM: C is computed in blocks of 64 columns, each OpenMP thread taking
// a contiguous range of blocks; a block's columns of op(B) are packed, kKc rows of k at a
// time, into a contiguous kKc x 64 panel (a transpose of 64 rows of B for b_transposed, a copy
// of 64-column row pieces otherwise), and common/gemm_avx512.h's micro-kernel runs every
// 6-row block of A against the panel in its `separately` mode (sums of at most 32 products
// added to C one by one). The micro-kernel reads A in place (its broadcasts want no layout),
// so only B is packed: a panel is 64 KiB, reused by every row of A while it sits in L2.
// Two loop orders (gemm_blocks): k outer when a thread's columns are fewer than K (dX =
// dlogits @ W: the thread's 128-row x 1024-column share of C stays in L2 while A's and B's
// k ranges pass once), blocks outer otherwise (logits = x @ W^T: A, 128 x 1024, stays in L2
// while W's rows pass once).
#include "common/gemm_cpu.h"

#include <omp.h>

#include <algorithm>
#include <stdexcept>

#include "common/cpu_aligned.h"
#include "common/cpu_features.h"
#include "common/cpu_parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include "common/gemm_avx512.h"
#endif

namespace fastllm {
namespace cpu {

#if defined(__x86_64__) || defined(__i386__)

namespace {

// Columns of C per block: the micro-kernel's 4 vectors.
constexpr int kNb = 64;
// Rows of k per packed panel: 256 x 64 floats, 64 KiB. A panel reads B's rows 64-256
// elements at a time, 256 B-1 KiB pieces 4 KiB or more apart, which the hardware prefetchers
// do not follow: packing from memory took 11-13 % of the GEMM's time at 132 x 1024 x 32000
// on one Zen 4 core (perf). The next panel's lines are prefetched into L2 while one is
// packed: the float32 linear cross-entropy forward there (the logits' product, mostly) went
// from 2840 to 2758 ms (3-process bench records of 2026-12-06, ...-own-gemm-noprefetch- and
// ...-own-gemm-3processes.txt). (The same prefetches spread over the panel's products, a
// share after every 24 rows of A, ran slower in a loop.)
constexpr int64_t kKc = 256;

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN

// The lanes of vector v (columns 16 v .. 16 v + 15) among the first `live` columns.
__mmask16 live_lanes(int live, int v) {
  return avx512::first_lanes(std::clamp(live - 16 * v, 0, 16));
}

// Where a panel's elements come from: op(B)[k0 + k][n0 + j] for k < kc, j < nb.
struct PanelAt {
  int64_t n0, k0;
  int nb, kc;
};

// Prefetches into L2 the cache line of B holding op(B)[k][n] (an address the panel reads).
FASTLLM_INLINE void prefetch_l2(const float* B, int64_t ldb, bool b_transposed, int64_t k,
                                int64_t n) {
  const float* p = b_transposed ? B + n * ldb + k : B + k * ldb + n;
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

// panel[k][j] = op(B)[at.k0 + k][at.n0 + j] for k < kc, j < nb, and 0 for j in [nb, 64);
// meanwhile the lines of the panel `next` (kc = 0: none) are prefetched into L2, each beside
// the line of this panel at the same place (see kKc).
void pack_panel(const float* B, int64_t ldb, bool b_transposed, const PanelAt& at,
                const PanelAt& next, float* panel) {
  const int64_t n0 = at.n0, k0 = at.k0;
  const int nb = at.nb, kc = at.kc;
  if (!b_transposed) {
    const float* src = B + k0 * ldb + n0;
    for (int k = 0; k < kc; ++k) {
      if (k < next.kc) {  // the next panel's row k: up to 64 floats, 4 lines
        for (int v = 0; 16 * v < next.nb; ++v) {
          prefetch_l2(B, ldb, false, next.k0 + k, next.n0 + 16 * v);
        }
      }
      for (int v = 0; v < kNb / 16; ++v) {
        _mm512_storeu_ps(panel + k * kNb + 16 * v,
                         _mm512_maskz_loadu_ps(live_lanes(nb, v), src + k * ldb + 16 * v));
      }
    }
    return;
  }
  // nb rows of B (nb columns of op(B)) by kc elements, transposed in 16 x 16 blocks (rows
  // kc .. round_up(kc, 16) of the panel written with zeros, never read); before each 16
  // elements of a row are loaded, the next panel's line at the same place.
  avx512::transpose_rows(B + n0 * ldb + k0, ldb, nb, kNb, kc, (kc + 15) / 16 * 16, panel,
                         [&](int j, int c) FASTLLM_INLINE_LAMBDA {
                           if (j < next.nb && c < next.kc) {
                             prefetch_l2(B, ldb, true, next.k0 + c, next.n0 + j);
                           }
                         });
}

// C's block of columns [n0, n0 + nb) = the block's result (rows ld_block apart) + bias: in
// place when the block was computed in C itself, else copied from the scratch block.
void finish_block(int64_t M, const float* block, int64_t ld_block, const float* bias,
                  int64_t n0, int nb, float* C, int64_t ldc) {
  __m512 b[kNb / 16];
  for (int v = 0; v < kNb / 16; ++v) {
    b[v] = bias ? _mm512_maskz_loadu_ps(live_lanes(nb, v), bias + n0 + 16 * v)
                : _mm512_setzero_ps();
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int v = 0; v < kNb / 16; ++v) {
      const __mmask16 live = live_lanes(nb, v);
      if (live == 0) break;
      const __m512 x = _mm512_maskz_loadu_ps(live, block + m * ld_block + 16 * v);
      _mm512_mask_storeu_ps(C + m * ldc + n0 + 16 * v, live, _mm512_add_ps(x, b[v]));
    }
  }
}

// The blocks [first, last) of C's columns, on one thread, in one of the two loop orders.
void gemm_blocks(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, bool b_transposed, const float* bias, float* C, int64_t ldc,
                 int64_t first, int64_t last, float* panel, UninitAlignedVector<float>& scratch) {
  // Where block blk is computed: in C, or in the scratch block for a last one of fewer than
  // 64 columns (the micro-kernel writes all 64).
  auto target = [&](int64_t blk, int64_t& ld) {
    if (N - blk * kNb >= kNb) {
      ld = ldc;
      return C + blk * kNb;
    }
    scratch.resize(M * kNb);
    ld = kNb;
    return scratch.data();
  };
  // Panel (blk, k0): its columns and k range (kc = 0 past the last block).
  auto panel_at = [&](int64_t blk, int64_t k0) {
    if (blk >= last || k0 >= K) return PanelAt{0, 0, 0, 0};
    return PanelAt{blk * kNb, k0, static_cast<int>(std::min<int64_t>(kNb, N - blk * kNb)),
                   static_cast<int>(std::min(kKc, K - k0))};
  };
  // The panel `at`'s products (the next one's lines prefetched while `at` is packed).
  auto product = [&](const PanelAt& at, const PanelAt& next) {
    int64_t ld;
    float* out = target(at.n0 / kNb, ld);
    pack_panel(B, ldb, b_transposed, at, next, panel);
    avx512::gemm(static_cast<int>(M), kNb, at.kc, A + at.k0, lda, 1, panel, kNb, out, ld,
                 /*accumulate=*/at.k0 > 0, /*separately=*/true);
  };
  auto finish = [&](int64_t blk) {
    const int nb = static_cast<int>(std::min<int64_t>(kNb, N - blk * kNb));
    int64_t ld;
    float* out = target(blk, ld);
    if (K == 0) {
      for (int64_t m = 0; m < M; ++m) {
        for (int v = 0; v < kNb / 16; ++v) {
          _mm512_storeu_ps(out + m * ld + 16 * v, _mm512_setzero_ps());
        }
      }
    }
    if (bias || out != C + blk * kNb) finish_block(M, out, ld, bias, blk * kNb, nb, C, ldc);
  };
  if ((last - first) * kNb <= K) {
    // k outer: the thread's columns of C stay in cache while A and B stream past.
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      for (int64_t blk = first; blk < last; ++blk) {
        product(panel_at(blk, k0),
                blk + 1 < last ? panel_at(blk + 1, k0) : panel_at(first, k0 + kKc));
      }
    }
    for (int64_t blk = first; blk < last; ++blk) finish(blk);
  } else {
    // blocks outer: A stays in cache while the blocks' columns of B stream past.
    for (int64_t blk = first; blk < last; ++blk) {
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        product(panel_at(blk, k0),
                k0 + kKc < K ? panel_at(blk, k0 + kKc) : panel_at(blk + 1, 0));
      }
      finish(blk);
    }
  }
}

void gemm_f32_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                     const float* B, int64_t ldb, bool b_transposed, const float* bias,
                     float* C, int64_t ldc) {
  const int64_t blocks = (N + kNb - 1) / kNb;
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), blocks)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    UninitAlignedVector<float> panel(kKc * kNb), scratch;
    gemm_blocks(M, N, K, A, lda, B, ldb, b_transposed, bias, C, ldc, block_begin(blocks, t, n),
                block_begin(blocks, t + 1, n), panel.data(), scratch);
  }
}

FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END

}  // namespace

#endif  // x86

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
              int64_t ldb, bool b_transposed, const float* bias, float* C, int64_t ldc) {
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_avx512()) {
    gemm_f32_avx512(M, N, K, A, lda, B, ldb, b_transposed, bias, C, ldc);
    return;
  }
#endif
  throw std::invalid_argument("gemm_f32 needs AVX-512 (cpu_avx512()), which this process lacks");
}

}  // namespace cpu
}  // namespace fastllm
