// AVX-512 building blocks of the CPU kernels (x86 only): the region that compiles a function
// for AVX-512 F/BW/DQ/VL/BF16 (plus AVX2/FMA/F16C), and the vector math shared by kernels.
//
// Like cpu_avx2.h: the package is built without -mavx512f, so everything here, and every
// kernel function that calls it, sits between FASTLLM_AVX512_BEGIN and FASTLLM_AVX512_END and
// may only run after cpu_avx512() (cpu_features.h) returned true.
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "common/cpu_avx2.h"  // FASTLLM_INLINE

#define FASTLLM_AVX512_BEGIN \
  _Pragma("GCC push_options")  \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c\")")
#define FASTLLM_AVX512_END _Pragma("GCC pop_options")

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the unused merge source, which
// -Wmaybe-uninitialized flags once inlined (GCC bug 105593).
#define FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define FASTLLM_AVX512_NO_UNDEFINED_WARNING_END _Pragma("GCC diagnostic pop")

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN

namespace fastllm {
namespace cpu {
namespace avx512 {

// 2^t of 16 floats: t = n + r with n = floor(t) and r = t - n in [0, 1) (one vreduceps,
// exact), 2^r by a degree-5 polynomial fitted for minimal relative error on [0, 1), times
// 2^n by vscalefps (which multiplies by 2^floor of its operand, so t goes in as is and n is
// never formed), which also underflows to 0 (t below about -150) and overflows to +inf (t
// above 128) correctly.
// Relative error at most 1.5e-7 for t in [-125, 128) (measured in float arithmetic; about
// 1 ulp). 7 instructions, 2 fewer than rounding to nearest, subtracting and a degree-6
// polynomial on [-1/2, 1/2]: they share the FMA ports with the tile products, and softmax
// spends ~12 instructions per 16 scores against 128 FMAs of products. t must be finite (r
// would be NaN).
// Softmax computes e^(s - m) as 2^(s log2(e) - m log2(e)): one FMA forms t from the score.
FASTLLM_INLINE __m512 exp2(__m512 t) {
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 y = _mm512_set1_ps(1.877575940883218e-3f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.989341867675128e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.58263165618528e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.4015361754824097e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.931530731418604e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.999999250645686e-1f));
  return _mm512_scalef_ps(y, t);
}

inline constexpr float kLog2e = 1.44269504088896341f;

// ---- loads and stores of the storage types (cpu_dtypes.h) as 16 floats ----------------
// load(p) / loadn(p, n): 16 (or the first n < 16) elements of float, BFloat16 or Half as
// floats, the other lanes 0; store(p, v) / storen(p, v, n): the same, rounded to the storage
// type as c10 rounds (bfloat16: round to nearest even, NaN -> 0x7FC0, not vcvtneps2bf16,
// which flushes denormals; float16: F16C's round to nearest even). Tails are masked: no
// access past the n elements.

// The first n lanes (n <= 16).
FASTLLM_INLINE __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

// ---- arithmetic under the names cpu_avx2.h gives it, so that a family's vector code,
// written once, compiles for both widths ----------------------------------------------------
FASTLLM_INLINE __m512 broadcast(float v) { return _mm512_set1_ps(v); }
// a * b + c and c - a * b, one rounding.
FASTLLM_INLINE __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
FASTLLM_INLINE __m512 fnmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
FASTLLM_INLINE float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
// Lanes n.. set to zero (0 <= n <= 16).
FASTLLM_INLINE __m512 keep_first(__m512 v, int n) {
  return _mm512_maskz_mov_ps(first_lanes(n), v);
}

// 16 bfloat16 / float16 bit patterns <-> 16 floats.
FASTLLM_INLINE __m512 widen(BFloat16*, __m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
FASTLLM_INLINE __m512 widen(Half*, __m256i bits) { return _mm512_cvtph_ps(bits); }
// v rounded to bfloat16 (nearest even, denormals too) in the high half of each lane, the low
// half holding rounding residue; no NaN select: exact for a NaN whose low 16 bits are zero
// (see cpu_avx2_even_odd.h's round_high_nan_free).
FASTLLM_INLINE __m512i round_high_nan_free(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lowest_kept));
}
// Round to nearest even as c10::BFloat16 (NaN -> 0x7FC0), and as F16C for float16.
// bfloat16: vcvtneps2bf16 rounds every other float exactly as c10 does (checked over all 2^32
// bit patterns), but flushes denormals to 0 and keeps a NaN's payload, so a vector with a
// denormal or NaN lane takes the integer rounding below instead (narrow_exact).
FASTLLM_INLINE __m256i narrow_exact(BFloat16*, __m512 v) {
  __m512i rounded = _mm512_srli_epi32(round_high_nan_free(v), 16);
  rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded,
                                    _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}
FASTLLM_INLINE __m256i narrow(BFloat16* tag, __m512 v) {
  constexpr int kDenormalOrNan = 0x20 | 0x01 | 0x80;  // vfpclassps: denormal, QNaN, SNaN
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, kDenormalOrNan) != 0, 0)) {
    return narrow_exact(tag, v);
  }
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}
FASTLLM_INLINE __m256i narrow(Half*, __m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

FASTLLM_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
FASTLLM_INLINE __m512 loadn(const float* p, int n) {
  return _mm512_maskz_loadu_ps(first_lanes(n), p);
}
FASTLLM_INLINE void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
FASTLLM_INLINE void storen(float* p, __m512 v, int n) {
  _mm512_mask_storeu_ps(p, first_lanes(n), v);
}

template <class T>
FASTLLM_INLINE __m512 load(const T* p) {
  return widen(static_cast<T*>(nullptr), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <class T>
FASTLLM_INLINE __m512 loadn(const T* p, int n) {
  return widen(static_cast<T*>(nullptr), _mm256_maskz_loadu_epi16(first_lanes(n), p));
}
template <class T>
FASTLLM_INLINE void store(T* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(static_cast<T*>(nullptr), v));
}
template <class T>
FASTLLM_INLINE void storen(T* p, __m512 v, int n) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), narrow(static_cast<T*>(nullptr), v));
}

// A non-temporal store of all 16 lanes (common/cpu_memory.h: stream_outputs); p is aligned
// to the 64 (float) or 32 (bfloat16, float16) bytes stored.
FASTLLM_INLINE void store_stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
template <class T>
FASTLLM_INLINE void store_stream(T* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(static_cast<T*>(nullptr), v));
}
// Copies kBytes (64 or 32: 16 float32 or 16-bit elements) from src to dst, which is aligned
// to kBytes, non-temporally, as bits.
template <int kBytes>
FASTLLM_INLINE void copy_stream(void* dst, const void* src) {
  if constexpr (kBytes == 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
  } else {
    static_assert(kBytes == 32, "a vector of 64 or 32 bytes");
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }
}

// Lanes l of the 16 columns [j, j + 16) with begin <= j + l < end.
FASTLLM_INLINE __mmask16 band_mask(int j, int begin, int end) {
  const __m512i col = _mm512_add_epi32(
      _mm512_set1_epi32(j),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(begin)) &
         _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(end));
}

// ---- row loops and reductions ------------------------------------------------------------

// Accumulator slots of for_each_chunk.
inline constexpr int kSlots = 4;

// Calls body(j, n, k) on consecutive chunks [j, j + n) that cover [0, len): full chunks of 16
// (n == 16) kSlots at a time with k = 0..kSlots-1, so reductions can keep kSlots independent
// accumulators, then one partial chunk (n < 16, k = 0; loadn / storen mask it). Defined here,
// in the AVX-512 region, because GCC will not inline an AVX-512 body into cpu_avx2.h's
// AVX2-only for_each_chunk. Bodies are lambdas marked FASTLLM_INLINE_LAMBDA.
template <class Body>
FASTLLM_INLINE void for_each_chunk(int64_t len, Body&& body) {
  static_assert(kSlots == 4, "the unrolled calls below are the kSlots slots");
  int64_t j = 0;
  for (; j + 64 <= len; j += 64) {
    body(j, 16, 0);
    body(j + 16, 16, 1);
    body(j + 32, 16, 2);
    body(j + 48, 16, 3);
  }
  for (; j + 16 <= len; j += 16) body(j, 16, 0);
  if (j < len) body(j, static_cast<int>(len - j), 0);
}

FASTLLM_INLINE float hsum(const __m512 (&slots)[kSlots]) {
  return _mm512_reduce_add_ps(
      _mm512_add_ps(_mm512_add_ps(slots[0], slots[1]), _mm512_add_ps(slots[2], slots[3])));
}
FASTLLM_INLINE float hmax(const __m512 (&slots)[kSlots]) {
  return _mm512_reduce_max_ps(
      _mm512_max_ps(_mm512_max_ps(slots[0], slots[1]), _mm512_max_ps(slots[2], slots[3])));
}

// e^d for d <= 0, or NaN (kept): 2^(d log2 e) by exp2, with t clamped at -150, where
// vscalefps already gives 0 (exp2 needs a finite t, and d may be -inf). A positive d is
// fine too (overflow to +inf above 88.7), but not d = +inf (NaN). Relative error about
// 1.5e-7 plus the rounding of t, 2^-24 |t|.
FASTLLM_INLINE __m512 exp_nonpositive(__m512 d) {
  const __m512 t = _mm512_mul_ps(d, _mm512_set1_ps(kLog2e));
  return exp2(_mm512_max_ps(_mm512_set1_ps(-150.0f), t));
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fastllm

FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END

#endif  // x86
