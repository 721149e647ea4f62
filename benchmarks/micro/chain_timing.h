// The timing loop the microbenchmarks of this directory share: kChains independent accumulator
// chains of one zmm instruction (enough to cover the latency of an FMA or a vdpbf16ps), run
// kIterations times with the operands in registers, and time_fma(), the 16-lane float32 FMA
// rate that their figures are read against. Header-only, included by vdpbf16ps_rate.cpp and
// attention_fp32_inner.cpp (each still builds with one g++ command: the include is relative).
#pragma once

#include <immintrin.h>

#include <chrono>

namespace chain_timing {

constexpr long kIterations = 20'000'000;
constexpr int kChains = 12;

// The 12 chains as named registers (an array of them stays in memory under GCC -O2).
#define CHAIN_TIMING_FOR_CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define CHAIN_TIMING_DECLARE(i) __m512 c##i = _mm512_set1_ps(1e-3f * (i));
#define CHAIN_TIMING_STORE(i) _mm512_storeu_ps(out + 16 * (i), c##i);

// In a function returning double: seconds for kIterations x kChains of STEP(i) (which updates
// c<i>); the chains' lanes are added into *sink, which keeps them alive.
#define CHAIN_TIMING_LOOP(STEP)                                                          \
  CHAIN_TIMING_FOR_CHAINS(CHAIN_TIMING_DECLARE)                                          \
  const auto start = std::chrono::steady_clock::now();                                   \
  for (long n = 0; n < chain_timing::kIterations; ++n) {                                 \
    CHAIN_TIMING_FOR_CHAINS(STEP)                                                        \
    __asm__ volatile("" : "+v"(c0));                                                     \
  }                                                                                      \
  const double seconds =                                                                 \
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();   \
  float out[16 * chain_timing::kChains];                                                 \
  CHAIN_TIMING_FOR_CHAINS(CHAIN_TIMING_STORE)                                            \
  for (float x : out) *sink += x;                                                        \
  return seconds;

// Seconds for kIterations x kChains 16-lane FMAs (32 FLOPs each).
__attribute__((target("avx512f,fma"))) inline double time_fma(float* sink) {
  __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  __asm__ volatile("" : "+v"(a), "+v"(b));
#define CHAIN_TIMING_FMA_STEP(i) c##i = _mm512_fmadd_ps(a, b, c##i);
  CHAIN_TIMING_LOOP(CHAIN_TIMING_FMA_STEP)
#undef CHAIN_TIMING_FMA_STEP
}

}  // namespace chain_timing
