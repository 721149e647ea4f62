// The AVX-512 tile primitives of the CPU attention kernel (attention_cpu.cpp): the same
// operations as its scalar and AVX2 paths, on 16-float vectors (x86 only; run only after
// cpu::cpu_avx512() returned true), plus a gather-based transpose for packing float k^T / v^T.
//   gemm:             C[m][n] (+)= sum_k A[m * a_rs + k * a_ks] * B[k * ldb + n]
//   online_softmax:   forward's update of a score tile S (M x N) into the running row max m,
//                     sum l and output tile O (M x Dp); S becomes p.
//   softmax_grad:     backward's p = exp(S - lse) into S and ds = p (dP - D) into dP.
//   transpose_floats: dst = the transposed, zero-padded tile of strided float rows.
//   dropout:          x <- z x with z the dropout factor of attention.h's keep hash.
// exp is computed as 2^((s - m) log2 e) (cpu::avx512::exp2), whose error (a few ulp) is far
// inside the kernel's tolerances. The difference comes first: s - m is exact for s near m
// (Sterbenz), while the fused s log2 e - m log2 e cancels the rounding error of m log2 e,
// about 2^-24 |m| -- with scores near 1e10 that is an exponent off by hundreds, and p = 0 or
// inf for the largest score (issue 10, defect 1).
// begin[r], end[r] are row r's allowed keys relative to the tile (begin >= end: none).
// N, ldb, ldc and Dp are multiples of 16 (the tiles pad to that with zeros). gemm is
// common/gemm_avx512.h's micro-kernel loop, shared with linear cross-entropy's GEMMs.
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_avx512.h"
#include "common/gemm_avx512.h"

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN

namespace fastllm {
namespace attention {

// ---- decoding: a few query rows against many keys ---------------------------------------
// The query rows of one sequence whose rows per kv head -- the group's heads times the
// decoded tokens -- are few (attention_cpu.cpp's decode_eligible). Each key row then meets
// only those rows, so packing it into tiles cost more than the products (a decoded token
// against 1000 cached keys, float32, H 9 / Hkv 3: 186 us, torch's SDPA 115): here the rows'
// scores come straight from the stored key rows, a vector's width of keys at a time, and each
// output row is the p-weighted sum of the stored value rows, up to 4 rows sharing each value
// load. The kernel's body (attention_cpu_decode.inc) is compiled for AVX-512 (16 keys at a
// time, bfloat16 keys scored by pairs with vdpbf16ps; below) and AVX2 (8 keys;
// attention_cpu.cpp).
//
// The keys are walked in storage order: a block of 16 keys is scored for every kv head
// before the next block, so that a cache stored (B, T, Hkv, D) -- a token's heads side by
// side -- is read front to back, each page once, instead of one head's 128 or 256 bytes out
// of every 1-2 KiB row per pass (LLaMA-3-8B's cache, 4096 keys, one thread: bfloat16 1.5-1.6
// -> 1.15-1.2 ms, float32 2.2-2.4 -> 1.45-1.5 ms with the cache in L3; 3.5-3.9 -> 1.7-1.8 ms
// bfloat16 with it evicted). The softmax is online over chunks of kDecodeChunk keys: a
// row's max, sum and unnormalised output are rescaled when a chunk raises its max (chunks of
// 32 or 128 keys ran 5-15 % slower; see kDecodeAhead for the prefetches).

// The most query rows of one (batch, kv head) that the decode kernel takes.
inline constexpr int kDecodeMaxRows = 16;

// Keys per step of the decode kernel's online softmax.
inline constexpr int64_t kDecodeChunk = 64;

// One sequence's decode rows, grouped by kv head: kv head hk's rows are [first[hk],
// first[hk + 1]); row r's keys are [begin[r], end[r]) (begin >= end: none).
template <class T>
struct DecodeRows {
  std::vector<int> first;
  std::vector<const T*> q;
  std::vector<int64_t> begin, end;

  int count() const { return static_cast<int>(q.size()); }
  int heads_kv() const { return static_cast<int>(first.size()) - 1; }
  void clear() {
    first.assign(1, 0);
    q.clear();
    begin.clear();
    end.clear();
  }
};

// Where one sequence's keys live: key row (j, hk) at k + j * k_stride + hk * k_head, D
// contiguous elements; value rows likewise.
template <class T>
struct DecodeKeys {
  const T* k;
  int64_t k_stride, k_head;
  const T* v;
  int64_t v_stride, v_head;
  int D;
  float scale;
};

// Keys ahead of the scores whose key and value rows the decode kernel prefetches into L2, for
// 16-bit caches. A cache that comes from memory (as in decoding, where the model's weights
// pass through the caches between two calls of a layer) is read at ~5-6 GB/s on one core of
// this machine, the hardware prefetchers restarting at every page, which a (B, T, Hkv, D)
// cache crosses every 2-10 keys: LLaMA-3-8B's bfloat16 / float16 cache, 4096 keys, evicted
// before each call: 3.1-3.5 -> 2.8-3.0 ms (in L3: within 5 %). float32 caches, twice the lines
// and prefetches, gained nothing cold and lost ~25 % warm: they take none. (16 keys ahead into
// L1, for every dtype, ran 10-20 % slower with the cache in L3; not measured cold.)
inline constexpr int64_t kDecodeAhead = 64;

namespace avx512 {

// attention.h's dropout_mix on 16 lanes.
FASTLLM_INLINE __m512i dropout_mix(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(0x7feb352du)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

struct Ops {
  // out[c] = scale * float(in[c]) for c < n.
  template <class T>
  static void load_scaled(const T* in, int n, float scale, float* out) {
    const __m512 vscale = _mm512_set1_ps(scale);
    int c = 0;
    for (; c + 16 <= n; c += 16) {
      _mm512_storeu_ps(out + c, _mm512_mul_ps(cpu::avx512::load(in + c), vscale));
    }
    if (c < n) {
      _mm512_mask_storeu_ps(out + c, cpu::avx512::first_lanes(n - c),
                            _mm512_mul_ps(cpu::avx512::loadn(in + c, n - c), vscale));
    }
  }

  // row[c] += float(in[c]) for c < n.
  template <class T>
  static void add_to(const T* in, int n, float* row) {
    int c = 0;
    for (; c + 16 <= n; c += 16) {
      _mm512_storeu_ps(row + c, _mm512_add_ps(_mm512_loadu_ps(row + c), cpu::avx512::load(in + c)));
    }
    if (c < n) {
      const __mmask16 live = cpu::avx512::first_lanes(n - c);
      _mm512_mask_storeu_ps(row + c, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, row + c),
                                                         cpu::avx512::loadn(in + c, n - c)));
    }
  }

  // out[c] = T(scale * in[c]) for c < n (cpu::avx512's rounding: from_acc's).
  template <class T>
  static void store_scaled(const float* in, int n, float scale, T* out) {
    const __m512 vscale = _mm512_set1_ps(scale);
    int c = 0;
    for (; c + 16 <= n; c += 16) {
      cpu::avx512::store(out + c, _mm512_mul_ps(_mm512_loadu_ps(in + c), vscale));
    }
    if (c < n) {
      cpu::avx512::storen(out + c, _mm512_mul_ps(cpu::avx512::loadn(in + c, n - c), vscale),
                          n - c);
    }
  }

  static void gemm(int M, int N, int K, const float* A, int64_t a_rs, int64_t a_ks,
                   const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    cpu::avx512::gemm(M, N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
  }

  // transpose_floats of contiguous rows: 16 x 16 blocks transposed in registers (16 loads
  // and 16 stores a block; the gathers below take ~3x as long), which is most of a decoded
  // token's attention (one query row against every cached key).
  static void transpose_float_rows(const float* first, int64_t stride_t, int rows, int Np,
                                   int D, int Dp, float* dst) {
    cpu::avx512::transpose_rows(first, stride_t, rows, Np, D, Dp, dst);
  }

  // dst[c * Np + r] = first[r * stride_t + c * stride_d] for r < rows, c < D, zeros in the
  // rest of the Dp x Np tile: one 16-row gather per column and row group, instead of a
  // scalar store per element. false (nothing written) when 15 rows do not fit the gather's
  // int32 offsets.
  static bool transpose_floats(const float* first, int64_t stride_t, int64_t stride_d,
                               int rows, int Np, int D, int Dp, float* dst) {
    if (stride_d == 1) {
      transpose_float_rows(first, stride_t, rows, Np, D, Dp, dst);
      return true;
    }
    if (stride_t < 0 || stride_t > std::numeric_limits<int32_t>::max() / 16) return false;
    const __m512i row_offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(stride_t)));
    for (int r0 = 0; r0 < Np; r0 += 16) {
      float* out = dst + r0;
      int c = 0;
      if (r0 < rows) {
        const __mmask16 live =
            rows - r0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (rows - r0)) - 1);
        const float* in = first + r0 * stride_t;
        for (; c < D; ++c) {
          _mm512_storeu_ps(out + static_cast<int64_t>(c) * Np,
                           _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, row_offsets,
                                                    in + c * stride_d, 4));
        }
      }
      for (; c < Dp; ++c) _mm512_storeu_ps(out + static_cast<int64_t>(c) * Np, _mm512_setzero_ps());
    }
    return true;
  }

  // Columns outside [begin[r], end[r]) (the mask and the tile's padding) read as -inf for
  // the max and are written as exact zeros. The rows' sums of p are added to l 16 rows at a
  // time (row_sums): one horizontal reduction per row was ~half of this function's time.
  static void online_softmax(float* S, int M, int N, const int* begin, const int* end,
                             float* m, float* l, float* O, int Dp) {
    for (int r0 = 0; r0 < M; r0 += 16) {
      const int rows = std::min(16, M - r0);
      __m512 sums[16];
      for (int i = 0; i < 16; ++i) {
        const int r = r0 + i;
        if (i >= rows) {
          sums[i] = _mm512_setzero_ps();
          continue;
        }
        float* s = S + static_cast<int64_t>(r) * N;
        float* o = O + static_cast<int64_t>(r) * Dp;
        if (begin[r] >= end[r]) {
          for (int j = 0; j < N; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
          sums[i] = _mm512_setzero_ps();
        } else if (begin[r] == 0 && end[r] == N && N == 64) {
          sums[i] = online_softmax_row<true, 4>(s, N, begin[r], end[r], m[r], l[r], o, Dp);
        } else if (begin[r] == 0 && end[r] == N) {
          sums[i] = online_softmax_row<true, 0>(s, N, begin[r], end[r], m[r], l[r], o, Dp);
        } else {
          sums[i] = online_softmax_row<false, 0>(s, N, begin[r], end[r], m[r], l[r], o, Dp);
        }
      }
      const __mmask16 live = rows == 16 ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
      _mm512_mask_storeu_ps(
          l + r0, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, l + r0), row_sums(sums)));
    }
  }

  // Lane i = the sum of the 16 lanes of v[i]: a transposing tree of 15 adds (pairs of rows,
  // then quads, within 128-bit chunks, then across chunks).
  FASTLLM_INLINE static __m512 row_sums(const __m512 (&v)[16]) {
    __m512 pairs[8], quads[4];
    for (int i = 0; i < 8; ++i) {  // chunk lanes: [a0+a2, b0+b2, a1+a3, b1+b3]
      pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                               _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    }
    for (int i = 0; i < 4; ++i) {  // chunk lanes: rows 4i .. 4i + 3, summed within the chunk
      quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                               _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
    }
    // Chunks [q0 c0+c1, q0 c2+c3, q1 c0+c1, q1 c2+c3], then chunk k = the rows of quads[k].
    const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                     _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
    const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                     _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88),
                         _mm512_shuffle_f32x4(h01, h23, 0xDD));
  }

  // One row of online_softmax. kFull: every column is allowed (no masks); kVectors > 0: the
  // row is 16 kVectors columns, a trip count the compiler unrolls (the usual 64-key tile).
  // Returns the row's p summed per lane (the caller adds it to l); l is only rescaled here.
  template <bool kFull, int kVectors>
  FASTLLM_INLINE static __m512 online_softmax_row(float* s, int N, int begin, int end, float& m,
                                                  float& l, float* o, int Dp) {
    if constexpr (kVectors > 0) N = 16 * kVectors;
    auto allowed = [&](int j) FASTLLM_INLINE_LAMBDA {
      if constexpr (kFull) return __mmask16(0xFFFF);
      return cpu::avx512::band_mask(j, begin, end);
    };
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int j = 0; j < N; j += 16) {
      vmax = _mm512_mask_max_ps(vmax, allowed(j), vmax, _mm512_loadu_ps(s + j));
    }
    // The running max m only has to bound the scores closely enough that p = e^(s - m) cannot
    // overflow: it is raised (with the rescale of l and the output row it implies) only when
    // a score exceeds it by more than kMaxGrowth, so p <= e^8 and the common step -- no
    // score far above the running max -- skips the horizontal max, alpha and the rescale.
    // (FlashAttention-4's conditional rescaling; lse = m + log(l) holds for any such m.)
    constexpr float kMaxGrowth = 8.0f;
    if (_mm512_cmp_ps_mask(vmax, _mm512_set1_ps(m + kMaxGrowth), _CMP_GT_OQ) != 0) {
      const float m_new = std::max(m, _mm512_reduce_max_ps(vmax));
      // 0 while the row had no key yet (m = -inf).
      const float alpha =
          m == -std::numeric_limits<float>::infinity()
              ? 0.0f
              : _mm512_cvtss_f32(
                    cpu::avx512::exp2(_mm512_set1_ps((m - m_new) * cpu::avx512::kLog2e)));
      l *= alpha;
      const __m512 valpha = _mm512_set1_ps(alpha);
      for (int c = 0; c < Dp; c += 16) {
        _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), valpha));
      }
      m = m_new;
    }
    const __m512 log2e = _mm512_set1_ps(cpu::avx512::kLog2e);
    // A max of -inf (every score so far -inf: an additive mask) shifts by 0, so p =
    // e^(-inf) = 0, never e^(-inf + inf) = NaN (FlashAttention's Check_inf).
    const __m512 vm = _mm512_set1_ps(m == -std::numeric_limits<float>::infinity() ? 0.0f : m);
    __m512 vsum = _mm512_setzero_ps();
    for (int j = 0; j < N; j += 16) {
      const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm), log2e);
      __m512 p = cpu::avx512::exp2(t);
      if constexpr (!kFull) p = _mm512_maskz_mov_ps(allowed(j), p);
      _mm512_storeu_ps(s + j, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    return vsum;
  }

  // x <- z x on the first nk columns of a rows x Np tile, z = keep / (1 - dropout_p), keep
  // decided by attention.h's hash: dropout_mix (lowbias32) on 16 uint32 lanes, the same bits
  // as the scalar dropout_keep, and the unsigned compare against the threshold straight into
  // the lane mask that zeroes the dropped products. Columns from nk on are left unchanged.
  static void dropout(float* x, int rows, int Np, int nk, const uint32_t* row_keys,
                      const uint32_t* col_keys, uint32_t threshold, float keep_scale) {
    const __m512i vthreshold = _mm512_set1_epi32(static_cast<int32_t>(threshold));
    const __m512 vscale = _mm512_set1_ps(keep_scale);
    for (int c = 0; c < nk; c += 16) {
      const __mmask16 live = nk - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nk - c)) - 1);
      const __m512i col_key = _mm512_maskz_loadu_epi32(live, col_keys + c);
      for (int r = 0; r < rows; ++r) {
        float* xr = x + static_cast<int64_t>(r) * Np + c;
        const __m512i u = dropout_mix(
            _mm512_xor_si512(_mm512_set1_epi32(static_cast<int32_t>(row_keys[r])), col_key));
        const __mmask16 keep = _mm512_cmpge_epu32_mask(u, vthreshold);
        _mm512_mask_storeu_ps(xr, live, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(xr), vscale));
      }
    }
  }

  static void softmax_grad(float* S, float* dP, int M, int N, const int* begin, const int* end,
                           const float* lse, const float* D) {
    for (int r = 0; r < M; ++r) {
      float* s = S + static_cast<int64_t>(r) * N;
      float* dp = dP + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r] || std::isinf(lse[r])) {
        for (int j = 0; j < N; j += 16) {
          _mm512_storeu_ps(s + j, _mm512_setzero_ps());
          _mm512_storeu_ps(dp + j, _mm512_setzero_ps());
        }
        continue;
      }
      const bool full = begin[r] == 0 && end[r] == N;
      const __m512 log2e = _mm512_set1_ps(cpu::avx512::kLog2e);
      const __m512 vlse = _mm512_set1_ps(lse[r]);
      const __m512 vd = _mm512_set1_ps(D[r]);
      for (int j = 0; j < N; j += 16) {
        const __mmask16 allowed =
            full ? __mmask16(0xFFFF) : cpu::avx512::band_mask(j, begin[r], end[r]);
        const __m512 p = _mm512_maskz_mov_ps(
            allowed,
            cpu::avx512::exp2(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vlse), log2e)));
        _mm512_storeu_ps(s + j, p);
        _mm512_storeu_ps(dp + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), vd)));
      }
    }
  }
};

// The decode kernel's vector operations on this path (attention_cpu_decode.inc's DecodeVec).
struct DecodeVec {
  using R = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kPvCols = 4;  // 4 rows x 64 columns of accumulators
  static constexpr bool kBf16Dot = true;
  FASTLLM_INLINE static R zero() { return _mm512_setzero_ps(); }
  FASTLLM_INLINE static R set1(float x) { return _mm512_set1_ps(x); }
  FASTLLM_INLINE static R add(R a, R b) { return _mm512_add_ps(a, b); }
  FASTLLM_INLINE static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  FASTLLM_INLINE static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  FASTLLM_INLINE static R max(R a, R b) { return _mm512_max_ps(a, b); }
  FASTLLM_INLINE static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  FASTLLM_INLINE static R loadu(const float* p) { return _mm512_loadu_ps(p); }
  FASTLLM_INLINE static void storeu(float* p, R v) { _mm512_storeu_ps(p, v); }
  template <class T>
  FASTLLM_INLINE static R load(const T* p) { return cpu::avx512::load(p); }
  template <class T>
  FASTLLM_INLINE static R loadn(const T* p, int n) { return cpu::avx512::loadn(p, n); }
  // The first n lanes of v to p.
  FASTLLM_INLINE static void store_first(float* p, R v, int n) {
    _mm512_mask_storeu_ps(p, cpu::avx512::first_lanes(n), v);
  }
  // v with the lanes j + i outside [b, e) set to fill.
  FASTLLM_INLINE static R band(R v, int j, int b, int e, float fill) {
    return _mm512_mask_blend_ps(cpu::avx512::band_mask(j, b, e), _mm512_set1_ps(fill), v);
  }
  FASTLLM_INLINE static float reduce_max(R v) { return _mm512_reduce_max_ps(v); }
  FASTLLM_INLINE static float reduce_add(R v) { return _mm512_reduce_add_ps(v); }
  FASTLLM_INLINE static R row_sums(const R (&v)[16]) { return Ops::row_sums(v); }
  // e^x, as 2^(x log2 e) (cpu::avx512::exp2: 0 for -inf, NaN kept).
  FASTLLM_INLINE static R exp(R x) {
    return cpu::avx512::exp2(_mm512_mul_ps(x, _mm512_set1_ps(cpu::avx512::kLog2e)));
  }
  // The scores of a bfloat16 row (D <= 128) against nk <= 16 bfloat16 keys, by pairs.
  FASTLLM_INLINE static void score_bf16(const cpu::BFloat16* q, const cpu::BFloat16* k,
                                        int64_t k_stride, int nk, int D, R scale, float* dst);
};
using DecodeOps = Ops;

// dst[jj] = scale q . k[jj] for the nk <= 16 bfloat16 keys at k + jj * k_stride, D <= 32 CP,
// by vdpbf16ps on pairs of elements (the products exact in float32, as torch's bfloat16
// GEMMs take them; no widening of the keys): q, its row (bfloat16), held in registers.
template <int CP>
FASTLLM_INLINE void decode_scores_bf16(const cpu::BFloat16* q, const cpu::BFloat16* k,
                                       int64_t k_stride, int nk, int D, __m512 scale,
                                       float* dst) {
  const int last = D - 32 * (CP - 1);  // elements of the last chunk of 32
  const __mmask32 last_mask = last == 32 ? ~__mmask32(0) : (__mmask32(1) << last) - 1;
  __m512bh qv[CP];
  for (int c = 0; c < CP; ++c) {
    const __m512i x = _mm512_maskz_loadu_epi16(c == CP - 1 ? last_mask : ~__mmask32(0), q + 32 * c);
    qv[c] = reinterpret_cast<const __m512bh&>(x);
  }
  __m512 dots[16];
  for (int jj = 0; jj < 16; ++jj) {
    __m512 acc = _mm512_setzero_ps();
    if (jj < nk) {
      const cpu::BFloat16* kr = k + jj * k_stride;
      for (int c = 0; c < CP; ++c) {
        const __m512i x = c == CP - 1 ? _mm512_maskz_loadu_epi16(last_mask, kr + 32 * c)
                                      : _mm512_loadu_si512(kr + 32 * c);
        acc = _mm512_dpbf16_ps(acc, qv[c], reinterpret_cast<const __m512bh&>(x));
      }
    }
    dots[jj] = acc;
  }
  _mm512_mask_storeu_ps(dst, cpu::avx512::first_lanes(nk),
                        _mm512_mul_ps(Ops::row_sums(dots), scale));
}

FASTLLM_INLINE void DecodeVec::score_bf16(const cpu::BFloat16* q, const cpu::BFloat16* k,
                                          int64_t k_stride, int nk, int D, R scale, float* dst) {
  switch ((D + 31) / 32) {
    case 1: return decode_scores_bf16<1>(q, k, k_stride, nk, D, scale, dst);
    case 2: return decode_scores_bf16<2>(q, k, k_stride, nk, D, scale, dst);
    case 3: return decode_scores_bf16<3>(q, k, k_stride, nk, D, scale, dst);
    default: return decode_scores_bf16<4>(q, k, k_stride, nk, D, scale, dst);
  }
}

#include "attention/attention_cpu_decode.inc"

}  // namespace avx512
}  // namespace attention
}  // namespace fastllm

FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END

#endif  // x86
