// AVX2/FMA/F16C building blocks of the CPU kernels (x86 only).
//
// A kernel works on vectors of its accumulation type: 8 floats (__m256) for float32,
// bfloat16 and float16 storage, 4 doubles (__m256d) for float64. The loads widen the stored
// dtype to that vector and the stores round back, bit for bit as cpu_dtypes.h does
// (bf16: round to nearest even, NaN -> 0x7FC0; fp16: the F16C instruction, also round to
// nearest even). loadn/storen also take the partial vector at the end of a row, so one
// loop body covers any length.
//
// The package is built without -mavx2: everything here, and every kernel function that
// calls it, is compiled for AVX2 by sitting between FASTLLM_AVX2_BEGIN and FASTLLM_AVX2_END,
// and may only run after cpu_isa() (cpu_features.h) returned CpuIsa::kAvx2. GCC keeps the
// target of a function template (and of the lambdas in it) from where it is defined, so
// templates defined in such a region are AVX2 code wherever they are instantiated.
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/cpu_dtypes.h"

// The AVX2 region, and forced inlining for the small helpers (FASTLLM_INLINE) and the loop
// bodies handed to for_each_chunk (FASTLLM_INLINE_LAMBDA, after a lambda's parameter list).
#define FASTLLM_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define FASTLLM_AVX2_END _Pragma("GCC pop_options")
#define FASTLLM_INLINE inline __attribute__((always_inline))
#define FASTLLM_INLINE_LAMBDA __attribute__((always_inline))

FASTLLM_AVX2_BEGIN

namespace fastllm {
namespace cpu {
namespace avx2 {

// The vector a storage type T is computed in, and its number of lanes.
template <class T>
struct VecOf {
  using type = __m256;
};
template <>
struct VecOf<double> {
  using type = __m256d;
};
template <class T>
using Vec = typename VecOf<T>::type;
template <class T>
inline constexpr int kLanes = static_cast<int>(sizeof(Vec<T>) / sizeof(AccOf<T>));

FASTLLM_INLINE __m256 broadcast(float v) { return _mm256_set1_ps(v); }
FASTLLM_INLINE __m256d broadcast(double v) { return _mm256_set1_pd(v); }

// a * b + c and c - a * b, one rounding.
FASTLLM_INLINE __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
FASTLLM_INLINE __m256d fmadd(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
FASTLLM_INLINE __m256 fnmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }
FASTLLM_INLINE __m256d fnmadd(__m256d a, __m256d b, __m256d c) {
  return _mm256_fnmadd_pd(a, b, c);
}

FASTLLM_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// The largest of the 8 lanes (_mm_max_ps's NaN rule: a NaN in the second operand wins).
FASTLLM_INLINE float hmax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
FASTLLM_INLINE double hsum(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

// Lanes n.. set to zero (0 <= n <= lanes).
FASTLLM_INLINE __m256 keep_first(__m256 v, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
  return _mm256_and_ps(v, _mm256_castsi256_ps(keep));
}
FASTLLM_INLINE __m256d keep_first(__m256d v, int n) {
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i keep = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lane);
  return _mm256_and_pd(v, _mm256_castsi256_pd(keep));
}

// 8 floats -> 8 bfloat16, round to nearest even, NaN -> 0x7FC0 (as to_bfloat16).
FASTLLM_INLINE __m128i to_bfloat16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lowest_kept);
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
  // Every lane is < 2^16, so the unsigned-saturating pack is an exact narrowing.
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

FASTLLM_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
FASTLLM_INLINE __m256d load(const double* p) { return _mm256_loadu_pd(p); }
FASTLLM_INLINE __m256 load(const BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
FASTLLM_INLINE __m256 load(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

FASTLLM_INLINE void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FASTLLM_INLINE void store(double* p, __m256d v) { _mm256_storeu_pd(p, v); }
FASTLLM_INLINE void store(BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bfloat16(v));
}
FASTLLM_INLINE void store(Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// A non-temporal store of a full vector (common/cpu_memory.h: stream_outputs); p is aligned
// to the 32 (float, double) or 16 (bfloat16, float16) bytes stored.
FASTLLM_INLINE void store_stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
FASTLLM_INLINE void store_stream(double* p, __m256d v) { _mm256_stream_pd(p, v); }
FASTLLM_INLINE void store_stream(BFloat16* p, __m256 v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bfloat16(v));
}
FASTLLM_INLINE void store_stream(Half* p, __m256 v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// Copies kBytes (32 or 16: one vector's elements) from src to dst, which is aligned to
// kBytes, non-temporally, as bits.
template <int kBytes>
FASTLLM_INLINE void copy_stream(void* dst, const void* src) {
  if constexpr (kBytes == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  } else {
    static_assert(kBytes == 16, "a vector of 32 or 16 bytes");
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
}

// The first n elements at p (1 <= n <= lanes); lanes n.. are zero. With n == lanes known at
// compile time this is one plain load.
template <class T>
FASTLLM_INLINE Vec<T> loadn(const T* p, int n) {
  if (n == kLanes<T>) return load(p);
  T tail[kLanes<T>] = {};
  std::memcpy(tail, p, sizeof(T) * std::min(n, kLanes<T>));  // min: a bound GCC can see
  return load(tail);
}

// Stores the first n lanes of v to p (1 <= n <= lanes).
template <class T>
FASTLLM_INLINE void storen(T* p, Vec<T> v, int n) {
  if (n == kLanes<T>) return store(p, v);
  T tail[kLanes<T>];
  store(tail, v);
  std::memcpy(p, tail, sizeof(T) * std::min(n, kLanes<T>));
}

// Accumulator slots of for_each_chunk, and the total of all lanes of all slots.
inline constexpr int kSlots = 4;

template <class V>
FASTLLM_INLINE auto hsum(const V (&slots)[kSlots]) {
  return hsum((slots[0] + slots[1]) + (slots[2] + slots[3]));
}

// Calls body(j, n, k) on consecutive chunks [j, j + n) that cover [0, len): full chunks
// (n == lanes) kSlots at a time with k = 0..kSlots-1, so reductions can keep kSlots
// independent accumulators and hide the add latency, then one partial chunk (n < lanes,
// k = 0). Bodies are lambdas marked FASTLLM_INLINE_LAMBDA: GCC leaves a large body out of
// line otherwise, which costs a call per chunk and sends its vectors through memory.
template <int kLanes, class Body>
FASTLLM_INLINE void for_each_chunk(int64_t len, Body&& body) {
  static_assert(kSlots == 4, "the unrolled calls below are the kSlots slots");
  int64_t j = 0;
  for (; j + 4 * kLanes <= len; j += 4 * kLanes) {
    body(j, kLanes, 0);
    body(j + kLanes, kLanes, 1);
    body(j + 2 * kLanes, kLanes, 2);
    body(j + 3 * kLanes, kLanes, 3);
  }
  for (; j + kLanes <= len; j += kLanes) body(j, kLanes, 0);
  if (j < len) body(j, static_cast<int>(len - j), 0);
}

// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact
// product), e^r by a degree-5 polynomial (minimax for the relative error on that interval:
// 0.77 ulp; with the rounding of its steps at most 2 ulp over every float x in (-87.33,
// 88.37), against 1.25 for the degree-7 Cephes polynomial it replaced, which took three more
// instructions), 2^n built in the exponent bits. n is rounded by adding 1.5 * 2^23, which
// leaves it as an integer in the sum's low bits, so no separate round and convert are
// needed. x is clamped to [-100, 88.38]: where n + 127 (the biased exponent) is not
// positive, below x = -87.68, the integer max with 0 makes 2^n, and the result, exactly 0
// (the softmax terms of -inf logits must be exactly 0); NaN in, NaN out (the clamps keep x
// when NaN). That max in place of the compare and mask that zeroed x < ln(FLT_MIN) before,
// with the shorter polynomial: 2.8 -> 2.1 ns per 8 values, the AVX2 cross-entropy float32
// forward 58.6 -> 45.9 ms at 4096 x 32000 (one Zen 4 core, benchmarks/results/
// 2026-12-05-cpu-1thread-cross_entropy-avx2-held-exp5-3processes.txt).
FASTLLM_INLINE __m256 exp_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-100.0f);
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 round_magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  x = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
  const __m256 n_plus_magic = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), round_magic);
  const __m256 n = _mm256_sub_ps(n_plus_magic, round_magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(8.290272206068039e-3f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.189816117286682e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.666763871908188e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.999914765357971e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(9.999997019767761e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  // The sum's bits are those of 1.5 * 2^23 plus n: rebias n by 127 into the exponent field.
  const __m256i biased = _mm256_add_epi32(_mm256_castps_si256(n_plus_magic),
                                          _mm256_set1_epi32(127 - 0x4B400000));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_max_epi32(biased, _mm256_setzero_si256()), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

}  // namespace avx2
}  // namespace cpu
}  // namespace fastllm

FASTLLM_AVX2_END

#endif  // x86
