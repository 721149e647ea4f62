// Fused attention on the CPU: attention_fwd_cpu and attention_bwd_cpu of attention.h, for
// float32, bfloat16, float16 and float64. Torch-free: C++17, OpenMP and x86 intrinsics.
//
// Math (attention.h holds the contract, mask included): s = scale * q k^T (soft-capped when
// softcap > 0), online softmax,
// out = softmax(s) v, lse = logsumexp(s); backward recomputes p = exp(s - lse) and forms
// dv = p^T dout, dp = dout v^T, ds = p (dp - D), dq = scale ds k, dk = scale ds^T q.
//
// Design (FlashAttention-2 on a CPU):
//   - Tiles of kBlockQ queries x kBlockK keys. The Tq x Tk score matrix never exists; extra
//     memory is a few tiles per thread plus, in backward, D_i = <dout_i, out_i> (B, H, Tq).
//   - Each tile of q, k, v (and dout) is first packed into the thread's acc-type buffers:
//     any dtype and any strides become one dense layout, q is pre-multiplied by the scale,
//     and key counts / head dims are zero-padded to the vector width, so one GEMM
//     primitive serves all products. Packing costs O(tile) against the O(tile * D) products.
//   - Every product is C (+)= A B with B row-major (the packed k^T, v, v^T or dout) and A
//     read through a row and a column stride, so p^T and ds^T in backward are read in place.
//     The AVX2 micro-kernel keeps a 6 x 16 block of C in 12 registers and does 12 FMAs per
//     2 vector loads and 6 broadcasts (kMicroRows).
//   - Forward: parallel over (batch, head, query block); online softmax keeps per-row max m
//     and sum l and rescales the fp32 output tile when m grows; key blocks that the mask
//     excludes for every row of the tile are skipped (causal / window).
//   - Backward: D first; then dk/dv parallel over (batch, kv head, key block), looping over
//     the query heads of the group and the query blocks that see the key block, so dk/dv of
//     a GQA group are summed without atomics; then dq parallel over (batch, head, query
//     block). s, p and dp are recomputed in both passes (7 tile products instead of 5): no
//     races, no per-thread dq copies, deterministic for any thread count.
//   - Two instruction paths, chosen at run time (common/cpu_features.h): AVX2/FMA for the
//     float acc type and a portable scalar path (also the float64 path).
//
// Glossary: B, Tq, Tk, H, Hkv, D as in attention.h; T = storage dtype, Acc = acc type;
// mq / nk = the rows of a query / key tile, Np = nk padded to kColPad, Dp = D padded to
// kColPad (the padding is zeros, so it adds nothing to any product).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_dispatch.h"
#include "common/cpu_dtypes.h"
#include "common/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include "common/cpu_avx2.h"
#define FASTLLM_ATTENTION_CPU_AVX2 1
#endif

namespace fastllm {
namespace attention {
namespace {

using cpu::AccOf;
using cpu::BFloat16;
using cpu::from_acc;
using cpu::Half;
using cpu::to_acc;

// Tiles of 128 queries x 64 keys. Packing a key tile costs O(kBlockK * D) per query tile, so
// taller query tiles amortise it better (64 rows measured clearly slower than 128 on the dev
// machine; 256 was no better than 128 and halves the parallel tasks). A thread's tiles (q,
// dout, s, dp, k, v, accumulators) take about 400 KiB at D = 128: L2-resident on current
// x86 server cores (1-2 MiB L2).
constexpr int kBlockQ = 128;
constexpr int kBlockK = 64;
// The vector width that tiles pad their key count and head dim to.
constexpr int kColPad = 8;

int round_up(int64_t n, int to) { return static_cast<int>((n + to - 1) / to * to); }

// The band of keys [begin, end) a query row may see (attention.h's mask), in absolute keys.
struct Mask {
  int64_t offset;  // Tk - Tq
  int64_t left;    // -1: unbounded
  int64_t right;   // -1: unbounded
  int64_t seqlen_q, seqlen_k;

  explicit Mask(const Problem& p)
      : offset(p.seqlen_k - p.seqlen_q),
        left(p.window_left),
        right(p.causal ? (p.window_right < 0 ? 0 : std::min<int64_t>(p.window_right, 0))
                       : p.window_right),
        seqlen_q(p.seqlen_q),
        seqlen_k(p.seqlen_k) {}

  int64_t key_begin(int64_t i) const {
    return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, seqlen_k);
  }
  int64_t key_end(int64_t i) const {
    return right < 0 ? seqlen_k : std::clamp<int64_t>(i + offset + right + 1, 0, seqlen_k);
  }
  // Queries [begin, end) that see at least one key of [j0, j1).
  int64_t query_begin(int64_t j0) const {
    return right < 0 ? 0 : std::clamp<int64_t>(j0 - offset - right, 0, seqlen_q);
  }
  int64_t query_end(int64_t j1) const {
    return left < 0 ? seqlen_q : std::clamp<int64_t>(j1 - offset + left, 0, seqlen_q);
  }
};

// ---- packing: strided storage <-> dense acc-type tiles -----------------------------------

// dst[r * Dp + c] = scale * src(row r, dim c) for r < rows, c < D; zero padding up to
// rows_padded x Dp.
template <class T, class Acc>
void pack_rows(const T* src, int64_t stride_t, int64_t stride_d, int rows, int rows_padded,
               int D, int Dp, Acc scale, Acc* dst) {
  for (int r = 0; r < rows_padded; ++r) {
    Acc* out = dst + static_cast<int64_t>(r) * Dp;
    if (r >= rows) {
      std::fill_n(out, Dp, Acc(0));
      continue;
    }
    const T* in = src + r * stride_t;
    if (stride_d == 1) {  // the usual layout: a loop the compiler vectorises
      for (int c = 0; c < D; ++c) out[c] = scale * to_acc(in[c]);
    } else {
      for (int c = 0; c < D; ++c) out[c] = scale * to_acc(in[c * stride_d]);
    }
    std::fill(out + D, out + Dp, Acc(0));
  }
}

// dst[c * Np + r] = src(row r, dim c): the transposed tile (k^T, v^T), zero-padded. Reads
// go along the rows of src (contiguous in the usual layout), writes down the columns of dst.
template <class T, class Acc>
void pack_transposed(const T* src, int64_t stride_t, int64_t stride_d, int rows, int Np, int D,
                     int Dp, Acc* dst) {
  std::fill_n(dst, static_cast<int64_t>(Dp) * Np, Acc(0));
  for (int r = 0; r < rows; ++r) {
    const T* in = src + r * stride_t;
    for (int c = 0; c < D; ++c) dst[static_cast<int64_t>(c) * Np + r] = to_acc(in[c * stride_d]);
  }
}

template <class T, class Acc>
void store_rows(const Acc* src, int Dp, int rows, int D, Acc scale, T* dst, int64_t stride_t,
                int64_t stride_d) {
  for (int r = 0; r < rows; ++r) {
    const Acc* in = src + static_cast<int64_t>(r) * Dp;
    T* out = dst + r * stride_t;
    for (int c = 0; c < D; ++c) out[c * stride_d] = from_acc<T>(scale * in[c]);
  }
}

// ---- tile primitives, portable scalar path -----------------------------------------------
// gemm:            C[m][n] (+)= sum_k A[m * a_rs + k * a_ks] * B[k * ldb + n]
// online_softmax:  forward's update of one score tile S (M x N, row-major) into the
//                  running max m, sum l and output tile O (M x Dp); S becomes p.
// softmax_grad:    backward's p = exp(S - lse) into S and ds = p (dP - D) into dP.
// begin[r], end[r] are row r's allowed keys relative to the tile (begin >= end: none).

template <class Acc>
struct ScalarOps {
  static void gemm(int M, int N, int K, const Acc* A, int64_t a_rs, int64_t a_ks, const Acc* B,
                   int64_t ldb, Acc* C, int64_t ldc, bool accumulate) {
    for (int m = 0; m < M; ++m) {
      Acc* c = C + m * ldc;
      if (!accumulate) std::fill_n(c, N, Acc(0));
      for (int k = 0; k < K; ++k) {
        const Acc a = A[m * a_rs + k * a_ks];
        const Acc* b = B + k * ldb;
        for (int n = 0; n < N; ++n) c[n] += a * b[n];
      }
    }
  }

  static void online_softmax(Acc* S, int M, int N, const int* begin, const int* end, Acc* m,
                             Acc* l, Acc* O, int Dp) {
    for (int r = 0; r < M; ++r) {
      Acc* s = S + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r]) {
        std::fill_n(s, N, Acc(0));
        continue;
      }
      Acc row_max = -std::numeric_limits<Acc>::infinity();
      for (int j = begin[r]; j < end[r]; ++j) row_max = std::max(row_max, s[j]);
      const Acc m_new = std::max(m[r], row_max);
      const Acc alpha = std::exp(m[r] - m_new);  // 0 while the row had no key yet
      Acc sum = 0;
      for (int j = 0; j < N; ++j) {
        s[j] = j >= begin[r] && j < end[r] ? std::exp(s[j] - m_new) : Acc(0);
        sum += s[j];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      Acc* o = O + static_cast<int64_t>(r) * Dp;
      for (int c = 0; c < Dp; ++c) o[c] *= alpha;
    }
  }

  static void softmax_grad(Acc* S, Acc* dP, int M, int N, const int* begin, const int* end,
                           const Acc* lse, const Acc* D) {
    for (int r = 0; r < M; ++r) {
      Acc* s = S + static_cast<int64_t>(r) * N;
      Acc* dp = dP + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r] || std::isinf(lse[r])) {
        std::fill_n(s, N, Acc(0));
        std::fill_n(dp, N, Acc(0));
        continue;
      }
      for (int j = 0; j < N; ++j) {
        const Acc p = j >= begin[r] && j < end[r] ? std::exp(s[j] - lse[r]) : Acc(0);
        s[j] = p;
        dp[j] = p * (dp[j] - D[r]);
      }
    }
  }
};

// ---- tile primitives, AVX2 / FMA path (float acc type) -----------------------------------

#if defined(FASTLLM_ATTENTION_CPU_AVX2)
FASTLLM_AVX2_BEGIN

// exp of 8 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial),
// relative error about 2 ulp. Inputs below -88.38 (and -inf) give exactly 0, which is what
// a masked score needs.
FASTLLM_INLINE __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, log2e, _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  // 2^fx built in the exponent field; fx = -127 (the clamped bottom) gives +0.
  const __m256i pow2 = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// Rows of the micro-kernel: 6 x 16 floats of C stay in 12 registers, enough independent
// FMA chains to cover the FMA latency (about 5 cycles) on both FMA ports (10 in flight), and
// each k step is 12 FMAs for 2 vector loads and 6 broadcasts. 4 x 16 (8 chains) ran at 80%.
constexpr int kMicroRows = 6;

// C[0..R)[0..8 NV) (+)= A B over K, with the C block in R * NV registers.
template <int R, int NV>
FASTLLM_INLINE void gemm_tile_avx2(int K, const float* A, int64_t a_rs, int64_t a_ks,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  __m256 c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * a_rs + k * a_ks);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
  }
}

template <int R>
FASTLLM_INLINE void gemm_rows_avx2(int N, int K, const float* A, int64_t a_rs, int64_t a_ks,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  int n = 0;
  for (; n + 16 <= N; n += 16) {
    gemm_tile_avx2<R, 2>(K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
  }
  if (n < N) gemm_tile_avx2<R, 1>(K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
}

struct Avx2Ops {
  // N must be a multiple of 8 (tiles pad to kColPad).
  static void gemm(int M, int N, int K, const float* A, int64_t a_rs, int64_t a_ks,
                   const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    int m = 0;
    for (; m + kMicroRows <= M; m += kMicroRows) {
      gemm_rows_avx2<kMicroRows>(N, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc,
                                 accumulate);
    }
    A += m * a_rs;
    C += m * ldc;
    switch (M - m) {
      case 0: return;
      case 1: return gemm_rows_avx2<1>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      case 2: return gemm_rows_avx2<2>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      case 3: return gemm_rows_avx2<3>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      case 4: return gemm_rows_avx2<4>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      default: return gemm_rows_avx2<5>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
    }
  }

  // N and Dp are multiples of 8.
  static void online_softmax(float* S, int M, int N, const int* begin, const int* end,
                             float* m, float* l, float* O, int Dp) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < M; ++r) {
      float* s = S + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r]) {
        std::fill_n(s, N, 0.0f);
        continue;
      }
      std::fill(s, s + begin[r], neg_inf);
      std::fill(s + end[r], s + N, neg_inf);
      __m256 vmax = _mm256_set1_ps(neg_inf);
      for (int j = 0; j < N; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float m_new = std::max(m[r], _mm_cvtss_f32(h));
      const float alpha = std::exp(m[r] - m_new);  // 0 while the row had no key yet
      const __m256 vm = _mm256_set1_ps(m_new);
      __m256 vsum = _mm256_setzero_ps();
      for (int j = 0; j < N; j += 8) {
        const __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, p);
        vsum = _mm256_add_ps(vsum, p);
      }
      l[r] = l[r] * alpha + cpu::avx2::hsum(vsum);
      m[r] = m_new;
      if (alpha != 1.0f) {
        float* o = O + static_cast<int64_t>(r) * Dp;
        const __m256 va = _mm256_set1_ps(alpha);
        for (int c = 0; c < Dp; c += 8) {
          _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), va));
        }
      }
    }
  }

  static void softmax_grad(float* S, float* dP, int M, int N, const int* begin, const int* end,
                           const float* lse, const float* D) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < M; ++r) {
      float* s = S + static_cast<int64_t>(r) * N;
      float* dp = dP + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r] || std::isinf(lse[r])) {
        std::fill_n(s, N, 0.0f);
        std::fill_n(dp, N, 0.0f);
        continue;
      }
      std::fill(s, s + begin[r], neg_inf);
      std::fill(s + end[r], s + N, neg_inf);
      const __m256 vlse = _mm256_set1_ps(lse[r]);
      const __m256 vd = _mm256_set1_ps(D[r]);
      for (int j = 0; j < N; j += 8) {
        const __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), vlse));
        _mm256_storeu_ps(s + j, p);
        _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), vd)));
      }
    }
  }
};

FASTLLM_AVX2_END
#endif  // FASTLLM_ATTENTION_CPU_AVX2

// ---- the tiled algorithm, generic over dtype and instruction path ------------------------

template <class T>
const T* head_ptr(const void* base, const Strides4& s, int64_t b, int64_t t, int64_t h) {
  return static_cast<const T*>(base) + b * s.b + t * s.t + h * s.h;
}
template <class T>
T* head_ptr(void* base, const Strides4& s, int64_t b, int64_t t, int64_t h) {
  return static_cast<T*>(base) + b * s.b + t * s.t + h * s.h;
}

// Rows [first, last) of a query tile that see at least one key of a key tile. The band is
// monotone in the query, so they are contiguous; the tile products skip the other rows,
// which is what makes causal and windowed attention cost about half / the window.
struct ActiveRows {
  int first, last;
  int count() const { return last - first; }
};

// Allowed keys of query rows [i0, i0 + rows) relative to key tile [j0, j0 + nk).
ActiveRows tile_bands(const Mask& mask, int64_t i0, int rows, int64_t j0, int nk, int* begin,
                      int* end) {
  ActiveRows active{rows, rows};
  for (int r = 0; r < rows; ++r) {
    begin[r] = static_cast<int>(std::clamp<int64_t>(mask.key_begin(i0 + r) - j0, 0, nk));
    end[r] = static_cast<int>(std::clamp<int64_t>(mask.key_end(i0 + r) - j0, 0, nk));
    if (begin[r] < end[r]) {
      active.first = std::min(active.first, r);
      active.last = r + 1;
    }
  }
  if (active.first == rows) active.first = active.last = 0;
  return active;
}

// Logit soft-capping (Gemma 2, Grok): s <- softcap * tanh(s / softcap) on n scores, and with
// dcap != nullptr the derivative dcap = 1 - tanh^2 that backward multiplies ds by. Scalar:
// it only runs when softcap > 0.
template <class Acc>
void apply_softcap(Acc* s, int64_t n, Acc softcap, Acc* dcap) {
  for (int64_t e = 0; e < n; ++e) {
    const Acc t = std::tanh(s[e] / softcap);
    s[e] = softcap * t;
    if (dcap != nullptr) dcap[e] = Acc(1) - t * t;
  }
}

template <class T, class Ops>
void attention_fwd_typed(const FwdParams& p) {
  using Acc = AccOf<T>;
  const Mask mask(p);
  const int D = static_cast<int>(p.head_dim);
  const int Dp = round_up(D, kColPad);
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t q_blocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t tasks = p.batch * p.num_heads * q_blocks;
  const Acc scale = static_cast<Acc>(p.softmax_scale);
  const Acc softcap = static_cast<Acc>(p.softcap);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
#pragma omp parallel
  {
    std::vector<Acc> q_tile(kBlockQ * Dp), kt_tile(Dp * kBlockK), v_tile(kBlockK * Dp);
    std::vector<Acc> s_tile(kBlockQ * kBlockK), o_tile(kBlockQ * Dp), m(kBlockQ), l(kBlockQ);
    int begin[kBlockQ], end[kBlockQ];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t h = task / q_blocks % p.num_heads;
      const int64_t b = task / q_blocks / p.num_heads;
      const int64_t hk = h / group;
      const int64_t i0 = qb * kBlockQ;
      const int mq = static_cast<int>(std::min<int64_t>(kBlockQ, p.seqlen_q - i0));
      pack_rows(head_ptr<T>(p.q, p.stride_q, b, i0, h), p.stride_q.t, p.stride_q.d, mq, mq, D, Dp,
                scale, q_tile.data());
      std::fill_n(o_tile.data(), mq * Dp, Acc(0));
      std::fill_n(m.data(), mq, neg_inf);
      std::fill_n(l.data(), mq, Acc(0));
      // Keys any row of the tile may see (the band is monotone in i).
      const int64_t k_begin = mask.key_begin(i0);
      const int64_t k_end = mask.key_end(i0 + mq - 1);
      for (int64_t j0 = k_begin / kBlockK * kBlockK; j0 < k_end; j0 += kBlockK) {
        const int nk = static_cast<int>(std::min<int64_t>(kBlockK, p.seqlen_k - j0));
        const int Np = round_up(nk, kColPad);
        pack_transposed(head_ptr<T>(p.k, p.stride_k, b, j0, hk), p.stride_k.t, p.stride_k.d, nk,
                        Np, D, Dp, kt_tile.data());
        pack_rows(head_ptr<T>(p.v, p.stride_v, b, j0, hk), p.stride_v.t, p.stride_v.d, nk, Np, D,
                  Dp, Acc(1), v_tile.data());
        const ActiveRows rows = tile_bands(mask, i0, mq, j0, nk, begin, end);
        const int r0 = rows.first;
        Acc* s = s_tile.data() + r0 * Np;
        Acc* o = o_tile.data() + r0 * Dp;
        Ops::gemm(rows.count(), Np, Dp, q_tile.data() + r0 * Dp, Dp, 1, kt_tile.data(), Np, s, Np,
                  false);
        if (softcap > 0) apply_softcap<Acc>(s, int64_t{rows.count()} * Np, softcap, nullptr);
        Ops::online_softmax(s, rows.count(), Np, begin + r0, end + r0, m.data() + r0,
                            l.data() + r0, o, Dp);
        Ops::gemm(rows.count(), Dp, Np, s, Np, 1, v_tile.data(), Dp, o, Dp, true);
      }
      Acc* lse = static_cast<Acc*>(p.lse) + (b * p.num_heads + h) * p.seqlen_q + i0;
      for (int r = 0; r < mq; ++r) {
        const bool any_key = l[r] > 0;
        lse[r] = any_key ? m[r] + std::log(l[r]) : neg_inf;
        const Acc inv_l = any_key ? Acc(1) / l[r] : Acc(0);
        T* out = head_ptr<T>(p.out, p.stride_out, b, i0 + r, h);
        for (int c = 0; c < D; ++c) {
          out[c * p.stride_out.d] = from_acc<T>(o_tile[r * Dp + c] * inv_l);
        }
      }
    }
  }
}

// The recomputed tile of backward: S <- p, dP <- ds for query tile (q_tile, dout_tile, rows
// [i0, i0 + mq)) against key tile (kt_tile, vt_tile, keys [j0, j0 + nk)).
// Only the tile's active rows are computed (and returned); the products that follow must use
// just those rows.
template <class Ops, class Acc>
ActiveRows recompute_ds(const Mask& mask, int64_t i0, int mq, int64_t j0, int nk, int Np, int Dp,
                        const Acc* q_tile, const Acc* dout_tile, const Acc* kt_tile,
                        const Acc* vt_tile, const Acc* lse, const Acc* delta, Acc softcap,
                        Acc* s_tile, Acc* dp_tile, Acc* dcap_tile, int* begin, int* end) {
  const ActiveRows rows = tile_bands(mask, i0, mq, j0, nk, begin, end);
  const int r0 = rows.first;
  const int64_t n = int64_t{rows.count()} * Np;
  Ops::gemm(rows.count(), Np, Dp, q_tile + r0 * Dp, Dp, 1, kt_tile, Np, s_tile + r0 * Np, Np,
            false);
  if (softcap > 0) apply_softcap(s_tile + r0 * Np, n, softcap, dcap_tile + r0 * Np);
  Ops::gemm(rows.count(), Np, Dp, dout_tile + r0 * Dp, Dp, 1, vt_tile, Np, dp_tile + r0 * Np, Np,
            false);
  Ops::softmax_grad(s_tile + r0 * Np, dp_tile + r0 * Np, rows.count(), Np, begin + r0, end + r0,
                    lse + r0, delta + r0);
  if (softcap > 0) {
    for (int64_t e = 0; e < n; ++e) dp_tile[r0 * Np + e] *= dcap_tile[r0 * Np + e];
  }
  return rows;
}

template <class T, class Ops>
void attention_bwd_typed(const BwdParams& p) {
  using Acc = AccOf<T>;
  const Mask mask(p);
  const int D = static_cast<int>(p.head_dim);
  const int Dp = round_up(D, kColPad);
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t q_blocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t k_blocks = (p.seqlen_k + kBlockK - 1) / kBlockK;
  const Acc scale = static_cast<Acc>(p.softmax_scale);
  const Acc softcap = static_cast<Acc>(p.softcap);
  const Acc* lse_all = static_cast<const Acc*>(p.lse);

  // D_i = <dout_i, out_i>, (B, H, Tq).
  std::vector<Acc> delta(p.batch * p.num_heads * p.seqlen_q);
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t i = row % p.seqlen_q;
    const int64_t h = row / p.seqlen_q % p.num_heads;
    const int64_t b = row / p.seqlen_q / p.num_heads;
    const T* o = head_ptr<T>(p.out, p.stride_out, b, i, h);
    const T* dout = head_ptr<T>(p.dout, p.stride_dout, b, i, h);
    Acc sum = 0;
    for (int c = 0; c < D; ++c) {
      sum += to_acc(o[c * p.stride_out.d]) * to_acc(dout[c * p.stride_dout.d]);
    }
    delta[row] = sum;
  }

#pragma omp parallel
  {
    std::vector<Acc> q_tile(kBlockQ * Dp), dout_tile(kBlockQ * Dp), kt_tile(Dp * kBlockK);
    std::vector<Acc> vt_tile(Dp * kBlockK), k_tile(kBlockK * Dp), s_tile(kBlockQ * kBlockK);
    std::vector<Acc> dp_tile(kBlockQ * kBlockK), dk_tile(kBlockK * Dp), dv_tile(kBlockK * Dp);
    std::vector<Acc> dq_tile(kBlockQ * Dp), dcap_tile(softcap > 0 ? kBlockQ * kBlockK : 0);
    int begin[kBlockQ], end[kBlockQ];

    // dk, dv: one task per (batch, kv head, key block).
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.batch * p.num_kv_heads * k_blocks; ++task) {
      const int64_t kb = task % k_blocks;
      const int64_t hk = task / k_blocks % p.num_kv_heads;
      const int64_t b = task / k_blocks / p.num_kv_heads;
      const int64_t j0 = kb * kBlockK;
      const int nk = static_cast<int>(std::min<int64_t>(kBlockK, p.seqlen_k - j0));
      const int Np = round_up(nk, kColPad);
      pack_transposed(head_ptr<T>(p.k, p.stride_k, b, j0, hk), p.stride_k.t, p.stride_k.d, nk, Np,
                      D, Dp, kt_tile.data());
      pack_transposed(head_ptr<T>(p.v, p.stride_v, b, j0, hk), p.stride_v.t, p.stride_v.d, nk, Np,
                      D, Dp, vt_tile.data());
      std::fill_n(dk_tile.data(), Np * Dp, Acc(0));
      std::fill_n(dv_tile.data(), Np * Dp, Acc(0));
      const int64_t q_begin = mask.query_begin(j0);
      const int64_t q_end = mask.query_end(j0 + nk);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = q_begin / kBlockQ * kBlockQ; i0 < q_end; i0 += kBlockQ) {
          const int mq = static_cast<int>(std::min<int64_t>(kBlockQ, p.seqlen_q - i0));
          pack_rows(head_ptr<T>(p.q, p.stride_q, b, i0, h), p.stride_q.t, p.stride_q.d, mq, mq, D,
                    Dp, scale, q_tile.data());
          pack_rows(head_ptr<T>(p.dout, p.stride_dout, b, i0, h), p.stride_dout.t,
                    p.stride_dout.d, mq, mq, D, Dp, Acc(1), dout_tile.data());
          const int64_t row0 = (b * p.num_heads + h) * p.seqlen_q + i0;
          const ActiveRows rows = recompute_ds<Ops>(
              mask, i0, mq, j0, nk, Np, Dp, q_tile.data(), dout_tile.data(), kt_tile.data(),
              vt_tile.data(), lse_all + row0, delta.data() + row0, softcap, s_tile.data(),
              dp_tile.data(), dcap_tile.data(), begin, end);
          // dv += p^T dout, dk += ds^T (scale q): p and ds read transposed in place.
          const int r0 = rows.first;
          Ops::gemm(Np, Dp, rows.count(), s_tile.data() + r0 * Np, 1, Np,
                    dout_tile.data() + r0 * Dp, Dp, dv_tile.data(), Dp, true);
          Ops::gemm(Np, Dp, rows.count(), dp_tile.data() + r0 * Np, 1, Np,
                    q_tile.data() + r0 * Dp, Dp, dk_tile.data(), Dp, true);
        }
      }
      store_rows(dk_tile.data(), Dp, nk, D, Acc(1), head_ptr<T>(p.dk, p.stride_dk, b, j0, hk),
                 p.stride_dk.t, p.stride_dk.d);
      store_rows(dv_tile.data(), Dp, nk, D, Acc(1), head_ptr<T>(p.dv, p.stride_dv, b, j0, hk),
                 p.stride_dv.t, p.stride_dv.d);
    }

    // dq: one task per (batch, head, query block); dq_tile = dq / scale.
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.batch * p.num_heads * q_blocks; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t h = task / q_blocks % p.num_heads;
      const int64_t b = task / q_blocks / p.num_heads;
      const int64_t hk = h / group;
      const int64_t i0 = qb * kBlockQ;
      const int mq = static_cast<int>(std::min<int64_t>(kBlockQ, p.seqlen_q - i0));
      pack_rows(head_ptr<T>(p.q, p.stride_q, b, i0, h), p.stride_q.t, p.stride_q.d, mq, mq, D, Dp,
                scale, q_tile.data());
      pack_rows(head_ptr<T>(p.dout, p.stride_dout, b, i0, h), p.stride_dout.t, p.stride_dout.d,
                mq, mq, D, Dp, Acc(1), dout_tile.data());
      std::fill_n(dq_tile.data(), mq * Dp, Acc(0));
      const int64_t row0 = (b * p.num_heads + h) * p.seqlen_q + i0;
      const int64_t k_begin = mask.key_begin(i0);
      const int64_t k_end = mask.key_end(i0 + mq - 1);
      for (int64_t j0 = k_begin / kBlockK * kBlockK; j0 < k_end; j0 += kBlockK) {
        const int nk = static_cast<int>(std::min<int64_t>(kBlockK, p.seqlen_k - j0));
        const int Np = round_up(nk, kColPad);
        const T* k = head_ptr<T>(p.k, p.stride_k, b, j0, hk);
        pack_transposed(k, p.stride_k.t, p.stride_k.d, nk, Np, D, Dp, kt_tile.data());
        pack_transposed(head_ptr<T>(p.v, p.stride_v, b, j0, hk), p.stride_v.t, p.stride_v.d, nk,
                        Np, D, Dp, vt_tile.data());
        pack_rows(k, p.stride_k.t, p.stride_k.d, nk, Np, D, Dp, Acc(1), k_tile.data());
        const ActiveRows rows = recompute_ds<Ops>(
            mask, i0, mq, j0, nk, Np, Dp, q_tile.data(), dout_tile.data(), kt_tile.data(),
            vt_tile.data(), lse_all + row0, delta.data() + row0, softcap, s_tile.data(),
            dp_tile.data(), dcap_tile.data(), begin, end);
        const int r0 = rows.first;
        Ops::gemm(rows.count(), Dp, Np, dp_tile.data() + r0 * Np, Np, 1, k_tile.data(), Dp,
                  dq_tile.data() + r0 * Dp, Dp, true);
      }
      store_rows(dq_tile.data(), Dp, mq, D, scale, head_ptr<T>(p.dq, p.stride_dq, b, i0, h),
                 p.stride_dq.t, p.stride_dq.d);
    }
  }
}

// ---- validation and dispatch -------------------------------------------------------------

void check_problem(const char* fn, const Problem& p) {
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument(std::string(fn) + ": " + what);
  };
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) {
    fail("batch, seqlen_q and seqlen_k must be >= 0, got " + std::to_string(p.batch) + ", " +
         std::to_string(p.seqlen_q) + ", " + std::to_string(p.seqlen_k));
  }
  if (p.num_heads < 1 || p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads != 0) {
    fail("num_kv_heads must divide num_heads, got num_heads=" + std::to_string(p.num_heads) +
         ", num_kv_heads=" + std::to_string(p.num_kv_heads));
  }
  if (p.head_dim < 1 || p.head_dim > 1024) {
    fail("head_dim must be in [1, 1024], got " + std::to_string(p.head_dim));
  }
  if (!(p.softcap >= 0)) fail("softcap must be >= 0 (0 = off), got " + std::to_string(p.softcap));
  if (p.window_left < -1 || p.window_right < -1) {
    fail("window_size must be (-1 or >= 0, -1 or >= 0), got (" + std::to_string(p.window_left) +
         ", " + std::to_string(p.window_right) + ")");
  }
}

// The float-acc dtypes run the AVX2 tiles when the CPU has them; float64 runs scalar.
template <class T>
void attention_fwd_dtype(const FwdParams& p) {
#if defined(FASTLLM_ATTENTION_CPU_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::cpu_isa() == cpu::CpuIsa::kAvx2) return attention_fwd_typed<T, Avx2Ops>(p);
  }
#endif
  attention_fwd_typed<T, ScalarOps<AccOf<T>>>(p);
}

template <class T>
void attention_bwd_dtype(const BwdParams& p) {
#if defined(FASTLLM_ATTENTION_CPU_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::cpu_isa() == cpu::CpuIsa::kAvx2) return attention_bwd_typed<T, Avx2Ops>(p);
  }
#endif
  attention_bwd_typed<T, ScalarOps<AccOf<T>>>(p);
}

}  // namespace

void attention_fwd_cpu(const FwdParams& p) {
  check_problem("attention_fwd_cpu", p);
  if (p.batch == 0 || p.seqlen_q == 0) return;
  cpu::dispatch_dtype(p.dtype, "attention_fwd_cpu", [&](auto tag) {
    attention_fwd_dtype<typename decltype(tag)::type>(p);
  });
}

void attention_bwd_cpu(const BwdParams& p) {
  check_problem("attention_bwd_cpu", p);
  if (p.batch == 0) return;
  cpu::dispatch_dtype(p.dtype, "attention_bwd_cpu", [&](auto tag) {
    attention_bwd_dtype<typename decltype(tag)::type>(p);
  });
}

}  // namespace attention
}  // namespace fastllm
