// bfloat16 rows on AVX2 without lane-crossing shuffles: 16 values per step, held as two
// vectors of 8 floats, one with the even elements and one with the odd ones (x86 only).
//
// cpu_avx2.h widens 8 bfloat16 to 8 floats with vpmovzxwd and narrows them back with
// vextracti128 + vpackusdw: three shuffles per 8 values, and the shuffle ports, not the
// arithmetic, bound a bfloat16 norm forward (50-63 % of the copy bandwidth on one Zen 4
// core restricted to AVX2, where torch.compile's code, which narrows 16 at a time, was
// up to 18 % faster: benchmarks/results/, *-norm-bf16-avx2-held-before-3processes.txt).
// Here one 32-byte load holds 16 bfloat16 as 8 32-bit words, element 2i in the low half of
// word i and element 2i + 1 in the high half: a shift left by 16 makes the even elements
// floats, a mask the odd ones, and the store joins the two rounded halves with an or. No
// shuffle at all; the rounding is cpu_avx2.h's (nearest even, NaN -> 0x7FC0),
// bit for bit. Elementwise math and sums do not care about the order of the lanes; a float
// array read beside the rows (a norm's weight and bias) is prepared once in the same order:
// EvenOddFloat, whose blocks of 16 hold the 8 even and then the 8 odd values of the block
// (to_even_odd; the last block padded with zeros).
//
// The names mirror cpu_avx2.h (Vec, kLanes, broadcast, fmadd, fnmadd, hsum, keep_first,
// load, loadn, store, storen, for_each_chunk), so code written over those names, such as
// norm/norm_cpu_simd.h and gated_mlp/gated_mlp_cpu_simd.h, compiles on this layout too. Only
// for AVX2 code regions (see cpu_avx2.h).
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_avx2.h"
#include "common/cpu_dtypes.h"

FASTLLM_AVX2_BEGIN

namespace fastllm {
namespace cpu {
namespace avx2_even_odd {

// 16 floats: elements 0, 2, .., 14 of a block in `even`, 1, 3, .., 15 in `odd`.
struct Vec16 {
  __m256 even, odd;
};

template <class T>
using Vec = Vec16;
template <class T>
inline constexpr int kLanes = 16;
using avx2::kSlots;

// One float of an array in even/odd order (to_even_odd); the same size as a float, so
// pointer arithmetic on it counts elements of the original array.
struct EvenOddFloat {
  float value;
};

FASTLLM_INLINE Vec16 operator+(Vec16 a, Vec16 b) {
  return {_mm256_add_ps(a.even, b.even), _mm256_add_ps(a.odd, b.odd)};
}
FASTLLM_INLINE Vec16 operator-(Vec16 a, Vec16 b) {
  return {_mm256_sub_ps(a.even, b.even), _mm256_sub_ps(a.odd, b.odd)};
}
FASTLLM_INLINE Vec16 operator*(Vec16 a, Vec16 b) {
  return {_mm256_mul_ps(a.even, b.even), _mm256_mul_ps(a.odd, b.odd)};
}
FASTLLM_INLINE Vec16 operator-(Vec16 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_xor_ps(a.even, sign), _mm256_xor_ps(a.odd, sign)};
}
FASTLLM_INLINE Vec16& operator+=(Vec16& a, Vec16 b) { return a = a + b; }

FASTLLM_INLINE Vec16 broadcast(float v) {
  const __m256 b = _mm256_set1_ps(v);
  return {b, b};
}
// a * b + c and c - a * b, one rounding.
FASTLLM_INLINE Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) {
  return {_mm256_fmadd_ps(a.even, b.even, c.even), _mm256_fmadd_ps(a.odd, b.odd, c.odd)};
}
FASTLLM_INLINE Vec16 fnmadd(Vec16 a, Vec16 b, Vec16 c) {
  return {_mm256_fnmadd_ps(a.even, b.even, c.even), _mm256_fnmadd_ps(a.odd, b.odd, c.odd)};
}
FASTLLM_INLINE float hsum(Vec16 v) { return avx2::hsum(_mm256_add_ps(v.even, v.odd)); }

// Elements n.. of the block set to zero (0 <= n <= 16).
FASTLLM_INLINE Vec16 keep_first(Vec16 v, int n) {
  const __m256i twice = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);  // even lane i: 2i
  const __m256i keep_even = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), twice);
  const __m256i keep_odd = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 1), twice);
  return {_mm256_and_ps(v.even, _mm256_castsi256_ps(keep_even)),
          _mm256_and_ps(v.odd, _mm256_castsi256_ps(keep_odd))};
}

FASTLLM_INLINE Vec16 load(const BFloat16* p) {
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(words, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(~0xFFFF)))};
}

// v rounded to bfloat16 (nearest even), in the high half of each 32-bit lane with the low
// half holding rounding residue: the caller shifts or masks it away. Without a NaN select:
// exact for every NaN whose low 16 bits are zero (the rounding increment, at most 0x8000,
// cannot carry out of them) -- bfloat16 values widened, and every NaN that arithmetic on them
// and on canonical NaNs produces (x86 keeps an operand NaN's payload, or makes 0xFFC00000);
// a caller that cannot rule other NaNs out takes round_high.
FASTLLM_INLINE __m256i round_high_nan_free(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lowest_kept));
}
// The same for any v: a NaN gives 0x7FC0.
FASTLLM_INLINE __m256i round_high(__m256 v) {
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(round_high_nan_free(v), _mm256_set1_epi32(0x7FC00000), is_nan);
}
// The even and the odd lanes' roundings (round_high's form) joined: 16 bfloat16 in memory order.
FASTLLM_INLINE __m256i join_high(__m256i even, __m256i odd) {
  return _mm256_or_si256(_mm256_srli_epi32(even, 16),
                         _mm256_and_si256(odd, _mm256_set1_epi32(~0xFFFF)));
}
// The 16 bfloat16 values of v in memory order.
FASTLLM_INLINE __m256i to_bfloat16(Vec16 v) {
  return join_high(round_high(v.even), round_high(v.odd));
}
// The same without the NaN select (round_high_nan_free's condition on v's NaNs).
FASTLLM_INLINE __m256i to_bfloat16_nan_free(Vec16 v) {
  return join_high(round_high_nan_free(v.even), round_high_nan_free(v.odd));
}
FASTLLM_INLINE void store(BFloat16* p, Vec16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bfloat16(v));
}
// A non-temporal store of all 16 (common/cpu_memory.h: stream_outputs); p is 32-byte aligned.
FASTLLM_INLINE void store_stream(BFloat16* p, Vec16 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bfloat16(v));
}

FASTLLM_INLINE Vec16 load(const EvenOddFloat* p) {
  const float* f = &p->value;
  return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}

// The first n elements at p (1 <= n <= 16); the others zero. bfloat16: through a zeroed
// block below 16. EvenOddFloat: to_even_odd padded the last block with zeros, so the whole
// block is read.
FASTLLM_INLINE Vec16 loadn(const BFloat16* p, int n) {
  if (n == 16) return load(p);
  BFloat16 tail[16] = {};
  std::memcpy(tail, p, sizeof(BFloat16) * std::min(n, 16));  // min: a bound GCC can see
  return load(tail);
}
FASTLLM_INLINE Vec16 loadn(const EvenOddFloat* p, int) { return load(p); }

// Stores the first n elements of v to p (1 <= n <= 16).
FASTLLM_INLINE void storen(BFloat16* p, Vec16 v, int n) {
  if (n == 16) return store(p, v);
  BFloat16 tail[16];
  store(tail, v);
  std::memcpy(p, tail, sizeof(BFloat16) * std::min(n, 16));
}

template <int W, class Body>
FASTLLM_INLINE void for_each_chunk(int64_t len, Body&& body) {
  static_assert(W == 16, "even/odd vectors hold 16 floats");
  avx2::for_each_chunk<16>(len, body);
}

// The elements needed to hold n floats in even/odd order: n rounded up to a block.
inline int64_t even_odd_size(int64_t n) { return (n + 15) / 16 * 16; }

// dst[0, even_odd_size(n)) <- src[0, n) in even/odd order, the last block's missing
// elements zero.
inline void to_even_odd(const float* src, int64_t n, EvenOddFloat* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    for (int i = 0; i < 16; ++i) {
      const int64_t j = j0 + (i < 8 ? 2 * i : 2 * (i - 8) + 1);
      dst[j0 + i].value = j < n ? src[j] : 0.0f;
    }
  }
}

}  // namespace avx2_even_odd
}  // namespace cpu
}  // namespace fastllm

FASTLLM_AVX2_END

#endif  // x86
