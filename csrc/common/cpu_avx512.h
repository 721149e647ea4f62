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

// Lanes l of the 16 columns [j, j + 16) with begin <= j + l < end.
FASTLLM_INLINE __mmask16 band_mask(int j, int begin, int end) {
  const __m512i col = _mm512_add_epi32(
      _mm512_set1_epi32(j),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(begin)) &
         _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(end));
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fastllm

FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END

#endif  // x86
