// gemm_cpu.h's float32 GEMM: C is computed in blocks of 64 columns, each OpenMP thread taking
// a contiguous range of blocks; a block's columns of op(B) are packed, kKc rows of k at a
// time, into a contiguous kKc x 64 panel (a transpose of 64 rows of B for b_transposed, a copy
// of 64-column row pieces otherwise), and the micro-kernel runs every 6-row block of A against
// the panel in its `separately` mode (sums of at most 32 products added to C one by one):
// common/gemm_avx512.h's (6 x 64 floats of C in zmm registers) on the AVX-512 path,
// common/gemm_avx2.h's (6 x 16 in ymm registers, the panel's 64 columns 16 at a time) on the
// AVX2 one. The loop structure (gemm_blocks) is shared; each path brings its packing, its
// micro-kernel and its bias step (Avx512Path, Avx2Path). The micro-kernel reads A in place
// (its broadcasts want no layout), so only B is packed: a panel is 64 KiB, reused by every
// row of A while it sits in L2.
// Two loop orders (gemm_blocks): k outer when a thread's columns are fewer than K (dX =
// dlogits @ W: the thread's 128-row x 1024-column share of C stays in L2 while A's and B's
// k ranges pass once), blocks outer otherwise (logits = x @ W^T: A, 128 x 1024, stays in L2
// while W's rows pass once).
// gemm_f32_at (C (+)= A^T B, the weight gradient) has its own loop (gemm_f32_at_on): its A is
// read transposed, so a block of it is transposed into a contiguous tile first, and B is
// packed once for the whole call.
#include "common/gemm_cpu.h"

#include <omp.h>

#include <algorithm>
#include <stdexcept>

#include "common/cpu_aligned.h"
#include "common/cpu_features.h"
#include "common/cpu_parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include "common/gemm_avx2.h"
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

// For a transposing pack (before it loads row j of B, elements c ..): the next panel's line
// at the same place, once per 64-byte line -- the AVX-512 pack asks every 16 elements, the
// AVX2 one every 8.
struct PrefetchNextPanel {
  const float* B;
  int64_t ldb;
  const PanelAt& next;
  FASTLLM_INLINE void operator()(int j, int c) const {
    if (j < next.nb && c < next.kc && c % 16 == 0) {
      prefetch_l2(B, ldb, true, next.k0 + c, next.n0 + j);
    }
  }
};

// For a panel of B itself (not transposed): the next panel's row k (up to 64 floats, 4
// lines) into L2, if it has one.
FASTLLM_INLINE void prefetch_next_row(const float* B, int64_t ldb, const PanelAt& next, int k) {
  if (k >= next.kc) return;
  for (int v = 0; 16 * v < next.nb; ++v) {
    prefetch_l2(B, ldb, false, next.k0 + k, next.n0 + 16 * v);
  }
}

// ---- the AVX-512 path -------------------------------------------------------------------

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN

// The lanes of vector v (columns 16 v .. 16 v + 15) among the first `live` columns.
__mmask16 live_lanes(int live, int v) {
  return avx512::first_lanes(std::clamp(live - 16 * v, 0, 16));
}

struct Avx512Path {
  // panel[k][j] = op(B)[at.k0 + k][at.n0 + j] for k < kc, j < nb, and 0 for j in [nb, 64);
  // meanwhile the lines of the panel `next` (kc = 0: none) are prefetched into L2, each beside
  // the line of this panel at the same place (see kKc).
  static void pack_panel(const float* B, int64_t ldb, bool b_transposed, const PanelAt& at,
                         const PanelAt& next, float* panel) {
    const int64_t n0 = at.n0, k0 = at.k0;
    const int nb = at.nb, kc = at.kc;
    if (!b_transposed) {
      const float* src = B + k0 * ldb + n0;
      for (int k = 0; k < kc; ++k) {
        prefetch_next_row(B, ldb, next, k);
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
                           PrefetchNextPanel{B, ldb, next});
  }

  // C's block of columns [n0, n0 + nb) = the block's result (rows ld_block apart) + bias: in
  // place when the block was computed in C itself, else copied from the scratch block.
  static void finish_block(int64_t M, const float* block, int64_t ld_block, const float* bias,
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

  // M x 64 zeros (a block of C when K = 0).
  static void zero_block(int64_t M, float* out, int64_t ld) {
    for (int64_t m = 0; m < M; ++m) {
      for (int v = 0; v < kNb / 16; ++v) {
        _mm512_storeu_ps(out + m * ld + 16 * v, _mm512_setzero_ps());
      }
    }
  }

  // gemm_f32_at's block of A^T: dst[c * ld + r] = first[r * stride + c] for r < rows,
  // c < cols, with ld = rows rounded up to 16 (returned); zeros in the padding.
  static int transpose_block(const float* first, int64_t stride, int rows, int cols,
                             float* dst) {
    const int ld = (rows + 15) / 16 * 16;
    avx512::transpose_rows(first, stride, rows, ld, cols, (cols + 15) / 16 * 16, dst);
    return ld;
  }

  // out (M x 64, rows ld apart) (+)= A's k range times the packed panel.
  static void product(int64_t M, int kc, const float* A, int64_t lda, const float* panel,
                      float* out, int64_t ld, bool accumulate) {
    avx512::gemm(static_cast<int>(M), kNb, kc, A, lda, 1, panel, kNb, out, ld, accumulate,
                 /*separately=*/true);
  }
};  // struct Avx512Path

FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END

// ---- the AVX2 path ----------------------------------------------------------------------

FASTLLM_AVX2_BEGIN

// The same sums as the AVX-512 path's, so the same bits (tests/test_linear_mm.py).
static_assert(avx2::kGemmSeparateK == avx512::kSeparateK);

struct Avx2Path {
  // Avx512Path::pack_panel's panel, 8 columns at a time (8 x 8 transposes for b_transposed).
  static void pack_panel(const float* B, int64_t ldb, bool b_transposed, const PanelAt& at,
                         const PanelAt& next, float* panel) {
    const int64_t n0 = at.n0, k0 = at.k0;
    const int nb = at.nb, kc = at.kc;
    if (!b_transposed) {
      const float* src = B + k0 * ldb + n0;
      for (int k = 0; k < kc; ++k) {
        prefetch_next_row(B, ldb, next, k);
        for (int v = 0; v < kNb / 8; ++v) {
          _mm256_storeu_ps(panel + k * kNb + 8 * v,
                           _mm256_maskload_ps(src + k * ldb + 8 * v,
                                              avx2::first_lanes_mask(nb - 8 * v)));
        }
      }
      return;
    }
    avx2::transpose_rows(B + n0 * ldb + k0, ldb, nb, kNb, kc, (kc + 7) / 8 * 8, panel,
                         PrefetchNextPanel{B, ldb, next});
  }

  static void finish_block(int64_t M, const float* block, int64_t ld_block, const float* bias,
                           int64_t n0, int nb, float* C, int64_t ldc) {
    __m256 b[kNb / 8];
    for (int v = 0; v < kNb / 8; ++v) {
      b[v] = bias ? _mm256_maskload_ps(bias + n0 + 8 * v, avx2::first_lanes_mask(nb - 8 * v))
                  : _mm256_setzero_ps();
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int v = 0; v < kNb / 8 && 8 * v < nb; ++v) {
        const __m256i live = avx2::first_lanes_mask(nb - 8 * v);
        const __m256 x = _mm256_maskload_ps(block + m * ld_block + 8 * v, live);
        _mm256_maskstore_ps(C + m * ldc + n0 + 8 * v, live, _mm256_add_ps(x, b[v]));
      }
    }
  }

  static void zero_block(int64_t M, float* out, int64_t ld) {
    for (int64_t m = 0; m < M; ++m) {
      for (int v = 0; v < kNb / 8; ++v) {
        _mm256_storeu_ps(out + m * ld + 8 * v, _mm256_setzero_ps());
      }
    }
  }

  // Avx512Path::transpose_block, 8 x 8 blocks: ld = rows rounded up to 8.
  static int transpose_block(const float* first, int64_t stride, int rows, int cols,
                             float* dst) {
    const int ld = (rows + 7) / 8 * 8;
    avx2::transpose_rows(first, stride, rows, ld, cols, (cols + 7) / 8 * 8, dst,
                         [](int, int) {});
    return ld;
  }

  static void product(int64_t M, int kc, const float* A, int64_t lda, const float* panel,
                      float* out, int64_t ld, bool accumulate) {
    avx2::gemm_separately(static_cast<int>(M), kNb, kc, A, lda, panel, kNb, out, ld, accumulate);
  }
};  // struct Avx2Path

FASTLLM_AVX2_END

// The blocks [first, last) of C's columns, on one thread, in one of the two loop orders.
template <class Path>
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
    Path::pack_panel(B, ldb, b_transposed, at, next, panel);
    Path::product(M, at.kc, A + at.k0, lda, panel, out, ld, /*accumulate=*/at.k0 > 0);
  };
  auto finish = [&](int64_t blk) {
    const int nb = static_cast<int>(std::min<int64_t>(kNb, N - blk * kNb));
    int64_t ld;
    float* out = target(blk, ld);
    if (K == 0) Path::zero_block(M, out, ld);
    if (bias || out != C + blk * kNb) {
      Path::finish_block(M, out, ld, bias, blk * kNb, nb, C, ldc);
    }
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

template <class Path>
void gemm_f32_on(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, bool b_transposed, const float* bias, float* C, int64_t ldc) {
  const int64_t blocks = (N + kNb - 1) / kNb;
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), blocks)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    UninitAlignedVector<float> panel(kKc * kNb), scratch;
    gemm_blocks<Path>(M, N, K, A, lda, B, ldb, b_transposed, bias, C, ldc,
                      block_begin(blocks, t, n), block_begin(blocks, t + 1, n), panel.data(),
                      scratch);
  }
}

// Prefetches into L2 the `rows` x `cols` floats at `first` (rows `ld` apart). (Always
// inlined: GCC takes a function whose only effects are prefetches for a pure one and drops
// its calls.)
FASTLLM_INLINE void prefetch_tile(const float* first, int64_t ld, int64_t rows, int cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; c += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(first + r * ld + c), _MM_HINT_T1);
    }
  }
}

// gemm_f32_at's rows of C per block (a multiple of the micro-kernels' 6 rows and of the
// transposes' 16): the block's A^T, at most kMa x kKc floats (96 KiB), stays in L2 while it
// meets every column block of the packed B.
constexpr int kMa = 96;
// Rows of C per micro-kernel call of gemm_f32_at, each call preceded by prefetches of the
// same rows of the next tile (the next 64 columns, or the next row block's first 64). C's
// tiles are 256-byte pieces of rows 4 KiB or more apart (dW's rows), one page each, which
// the hardware prefetchers do not follow: adding into a (32000, 1024) dW in memory ran at
// 170 GFLOP/s against 237 for a dW in cache (132-row chunks, one Zen 5 core); the tile's
// prefetches issued at once before each tile, 178; a share before each 12 rows, 203; before
// each 6 rows (this), 224.
constexpr int kStripRows = 6;

// C (+)= A^T B (gemm_cpu.h): B is packed once, each 64-column block's K rows into a
// contiguous K x 64 panel (zero-padded columns), shared by the team; then each thread takes a
// contiguous range of kMa-row blocks of C and, kKc rows of k at a time, transposes the
// block's columns of A (rows `lda` apart, far apart in memory: a transposed read in the
// micro-kernel would thrash L1, whose sets such strides alias) into a contiguous kMa x kKc
// tile and runs the micro-kernel (separately mode, as gemm_blocks) on it against every panel.
// A last column block of fewer than 64 columns is computed in a scratch block.
template <class Path>
void gemm_f32_at_on(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t blocks = (N + kNb - 1) / kNb;
  const int64_t row_blocks = (M + kMa - 1) / kMa;
  const int64_t tail_n0 = N % kNb == 0 ? N : N / kNb * kNb;  // where a short block starts
  UninitAlignedVector<float> packed(blocks * K * kNb);
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), row_blocks)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t blk = block_begin(blocks, t, n); blk < block_begin(blocks, t + 1, n); ++blk) {
      const int nb = static_cast<int>(std::min<int64_t>(kNb, N - blk * kNb));
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const PanelAt at{blk * kNb, k0, nb, static_cast<int>(std::min(kKc, K - k0))};
        Path::pack_panel(B, ldb, false, at, PanelAt{0, 0, 0, 0},
                         packed.data() + (blk * K + k0) * kNb);
      }
    }
#pragma omp barrier
    UninitAlignedVector<float> tile(kMa * kKc), scratch;
    for (int64_t rb = block_begin(row_blocks, t, n); rb < block_begin(row_blocks, t + 1, n);
         ++rb) {
      const int64_t m0 = rb * kMa;
      const int rows = static_cast<int>(std::min<int64_t>(kMa, M - m0));
      if (tail_n0 < N) {  // the short column block's current values, zero-padded
        scratch.resize(static_cast<int64_t>(rows) * kNb);
        for (int r = 0; r < rows; ++r) {
          for (int j = 0; j < kNb; ++j) {
            scratch.data()[r * kNb + j] =
                accumulate && tail_n0 + j < N ? C[(m0 + r) * ldc + tail_n0 + j] : 0.0f;
          }
        }
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int kc = static_cast<int>(std::min(kKc, K - k0));
        const int ld_tile = Path::transpose_block(A + k0 * lda + m0, lda, kc, rows, tile.data());
        for (int64_t blk = 0; blk < blocks; ++blk) {
          // The tile after this one (the next column block, or the next row block's first)
          // is prefetched a share at a time, kStripRows rows before each kStripRows rows of
          // this one are computed.
          const int64_t next_m0 = blk + 1 < blocks ? m0 : m0 + kMa;
          const int64_t next_n0 = blk + 1 < blocks ? (blk + 1) * kNb : 0;
          const int64_t next_rows = std::clamp<int64_t>(M - next_m0, 0, kMa);
          const int next_cols = static_cast<int>(std::min<int64_t>(kNb, N - next_n0));
          const bool short_block = blk * kNb == tail_n0;
          float* out = short_block ? scratch.data() : C + m0 * ldc + blk * kNb;
          const int64_t ld = short_block ? kNb : ldc;
          const float* panel = packed.data() + (blk * K + k0) * kNb;
          for (int r = 0; r < rows; r += kStripRows) {
            if (k0 == 0 && r < next_rows) {
              prefetch_tile(C + (next_m0 + r) * ldc + next_n0, ldc,
                            std::min<int64_t>(kStripRows, next_rows - r), next_cols);
            }
            Path::product(std::min(kStripRows, rows - r), kc, tile.data() + r * ld_tile,
                          ld_tile, panel, out + r * ld, ld,
                          /*accumulate=*/accumulate || k0 > 0 || short_block);
          }
        }
      }
      if (tail_n0 < N) {
        Path::finish_block(rows, scratch.data(), kNb, nullptr, tail_n0,
                           static_cast<int>(N - tail_n0), C + m0 * ldc, ldc);
      }
    }
  }
}

}  // namespace

#endif  // x86

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
              int64_t ldb, bool b_transposed, const float* bias, float* C, int64_t ldc) {
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_avx512()) {
    gemm_f32_on<Avx512Path>(M, N, K, A, lda, B, ldb, b_transposed, bias, C, ldc);
    return;
  }
  if (cpu_isa() == CpuIsa::kAvx2) {
    gemm_f32_on<Avx2Path>(M, N, K, A, lda, B, ldb, b_transposed, bias, C, ldc);
    return;
  }
#endif
  throw std::invalid_argument(
      "gemm_f32 needs the AVX-512 or AVX2 path (cpu_avx512() or cpu_isa() == kAvx2), which "
      "this process lacks");
}

void gemm_f32_at(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    }
    return;
  }
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_avx512()) {
    gemm_f32_at_on<Avx512Path>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
  if (cpu_isa() == CpuIsa::kAvx2) {
    gemm_f32_at_on<Avx2Path>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
#endif
  throw std::invalid_argument(
      "gemm_f32_at needs the AVX-512 or AVX2 path (cpu_avx512() or cpu_isa() == kAvx2), "
      "which this process lacks");
}

}  // namespace cpu
}  // namespace fastllm
