// How fast AVX512-BF16's vdpbf16ps runs against a 16-lane float32 FMA on this core: the
// measurement behind the CPU attention kernel's bfloat16 path without AMX (path avx512-bf16,
// csrc/attention/attention_cpu_amx.h's DotEngine; csrc/common/cpu_features.h's
// cpu_avx512_dot()).
//
// Each loop runs 12 independent accumulator chains of one instruction on zmm registers (enough
// to cover either instruction's latency), operands in registers, and reports ns per
// instruction and GFLOP/s (an FMA: 16 multiply-adds = 32 flops; a vdpbf16ps: 32 = 64 flops).
// On the AMD EPYC Zen 4 core of 2026-12-05 (family 25 model 17): FMA 0.27 ns, 117 GFLOP/s;
// vdpbf16ps 0.27 ns, 234 GFLOP/s -- the same issue rate with twice the multiplies. (On the
// Sapphire Rapids of an earlier session vdpbf16ps took 0.52 ns, slower than the FMAs.)
//
// Build and run (x86-64, GCC >= 11; the measuring code carries its own target attributes, so
// no -m flags are needed), or through CMakeLists.txt (target vdpbf16ps_rate, also run by ctest,
// which only checks that it runs; it measures nothing on a CPU without AVX512-BF16):
//   g++ -O2 -o /tmp/vdpbf16ps_rate benchmarks/micro/vdpbf16ps_rate.cpp && /tmp/vdpbf16ps_rate
// The figures are wall-clock (steady_clock), best of 5 runs; pin the process (taskset) and
// keep the machine quiet for stable ones.
#include <immintrin.h>

#include <algorithm>
#include <cstdio>

#include "chain_timing.h"

namespace {

using chain_timing::kChains;
using chain_timing::kIterations;
using chain_timing::time_fma;

#define TARGET __attribute__((target("avx512f,avx512bf16,fma")))

TARGET double time_dpbf16(float* sink) {
  __m512i a = _mm512_set1_epi32(0x3f803f80), b = _mm512_set1_epi32(0x3f7f3f7f);
  __asm__ volatile("" : "+v"(a), "+v"(b));
#define DOT_STEP(i)                                                              \
  c##i = _mm512_dpbf16_ps(c##i, reinterpret_cast<const __m512bh&>(a),            \
                          reinterpret_cast<const __m512bh&>(b));
  CHAIN_TIMING_LOOP(DOT_STEP)
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bf16")) {
    std::printf("vdpbf16ps_rate: this CPU has no AVX512-BF16; nothing measured\n");
    return 0;
  }
  float sink = 0.0f;
  double fma = 1e30, dot = 1e30;
  for (int run = 0; run < 5; ++run) {
    fma = std::min(fma, time_fma(&sink));
    dot = std::min(dot, time_dpbf16(&sink));
  }
  const double instructions = static_cast<double>(kIterations) * kChains;
  std::printf("zmm FMA:       %.3f ns per instruction, %.1f GFLOP/s\n", fma / instructions * 1e9,
              instructions * 32 / fma * 1e-9);
  std::printf("zmm vdpbf16ps: %.3f ns per instruction, %.1f GFLOP/s\n", dot / instructions * 1e9,
              instructions * 64 / dot * 1e-9);
  std::printf("vdpbf16ps / FMA flop rate: %.2fx (sink %g)\n", (instructions * 64 / dot) /
              (instructions * 32 / fma), static_cast<double>(sink));
  return 0;
}
