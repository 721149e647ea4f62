// How close the float32 attention forward's inner loop can come to the core's FMA peak: the
// AVX-512 path's own key step (csrc/attention/attention_cpu_avx512.h's Ops: the score product
// s = q k^T, the online softmax, the product o += p v), run on packed tiles that stay in cache
// -- no packing of q, k and v, no masks, no output -- against the 16-lane FMA rate of the same
// core. The measurement behind the README's reading of the float32 forward on AMD EPYC Zen 4
// (the full forwards at 1.15-1.19x torch's SDPA, under the 1.2x of issue 16): the products
// alone run near the FMA peak, the softmax between them costs what is left.
//
// Shapes as the kernel's tiles: 128 query rows per task, keys in tiles of 64, a slice of T keys
// with head dim D (B2 H8 T1024 D64 and B1 H8 T4096 D128 of `fastllm bench attention`); FLOPs
// 4 T^2 D per slice. Wall-clock (steady_clock), best of 5 runs; pin the process (taskset) and
// keep the machine quiet for stable figures. On the Zen 4 core of 2026-12-05 (family 25 model
// 17): FMA peak 117 GFLOP/s; products alone 113 (T1024 D64) and 114 (T4096 D128), 96-97 % of
// it; with the softmax 104 and 109 (89 % / 93 %), while the whole kernel (`fastllm bench
// attention`, full forward) runs 94 and 104, and torch's SDPA 81 and 90: 1.2x SDPA would
// need 94 % of this loop's rate at T1024 D64 and all of it at T4096 D128.
//
// Build and run (x86-64, GCC >= 11; the kernel headers carry their own target attributes):
//   g++ -O2 -std=c++20 -Icsrc -o /tmp/afi benchmarks/micro/attention_fp32_inner.cpp && /tmp/afi
// or through CMakeLists.txt (target attention_fp32_inner, also run by ctest, which only checks
// that it runs; it measures nothing on a CPU without AVX-512).

// GCC 12's AVX-512 intrinsics start from undefined vectors (_mm512_undefined_*), which its
// uninitialized-use warnings flag where the kernel's code is instantiated for this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "attention/attention_cpu_avx512.h"
#include "chain_timing.h"
#include "common/cpu_aligned.h"

namespace {

using fastllm::attention::avx512::Ops;

constexpr int kRows = 128;  // query rows per task (attention_cpu.cpp's kBlockQ)
constexpr int kKeys = 64;   // keys per tile (kBlockK)

// Seconds for one slice of T keys at head dim D: every query tile of the slice against every
// key tile, with the online softmax between the products or without it.
double time_slice(int T, int D, bool softmax, const float* q, const float* kt, const float* v,
                  float* s, float* o, float* m, float* l, const int* begin, const int* end) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < T / kRows; ++i) {
    std::fill_n(o, kRows * D, 0.0f);
    std::fill_n(m, kRows, -std::numeric_limits<float>::infinity());
    std::fill_n(l, kRows, 0.0f);
    for (int j = 0; j < T / kKeys; ++j) {
      Ops::gemm(kRows, kKeys, D, q, D, 1, kt + static_cast<int64_t>(j) * D * kKeys, kKeys, s,
                kKeys, false);
      if (softmax) Ops::online_softmax(s, kRows, kKeys, begin, end, m, l, o, D);
      Ops::gemm(kRows, D, kKeys, s, kKeys, 1, v + static_cast<int64_t>(j) * kKeys * D, D, o, D,
                true);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void measure(int T, int D) {
  fastllm::cpu::AlignedVector<float> q(kRows * D), kt(static_cast<size_t>(T) * D),
      v(static_cast<size_t>(T) * D), s(kRows * kKeys), o(kRows * D), m(kRows), l(kRows);
  // Scores of a few units (q, k ~ U(-0.5, 0.5) times 1/sqrt(D)), as the kernel meets them.
  uint32_t state = 12345;
  auto uniform = [&state] {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / 16777216.0f - 0.5f;
  };
  for (auto& x : q) x = uniform() * 4.0f / std::sqrt(static_cast<float>(D));
  for (auto& x : kt) x = uniform() * 4.0f;
  for (auto& x : v) x = uniform();
  std::vector<int> begin(kRows, 0), end(kRows, kKeys);
  const double flops = 4.0 * T * static_cast<double>(T) * D;
  for (bool softmax : {false, true}) {
    double best = 1e30;
    const int slices = std::max(1, (1 << 22) / (T / kRows * T / kKeys * kRows * D / 16));
    for (int run = 0; run < 5; ++run) {
      double seconds = 0.0;
      for (int r = 0; r < slices; ++r) {
        seconds += time_slice(T, D, softmax, q.data(), kt.data(), v.data(), s.data(),
                              o.data(), m.data(), l.data(), begin.data(), end.data());
      }
      best = std::min(best, seconds / slices);
    }
    std::printf("T %4d D %3d, %-22s %6.1f GFLOP/s\n", T, D,
                softmax ? "products + softmax:" : "products alone:", flops / best * 1e-9);
  }
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl")) {
    std::printf("attention_fp32_inner: this CPU has no AVX-512; nothing measured\n");
    return 0;
  }
  float sink = 0.0f;
  double peak = 0.0;
  for (int run = 0; run < 5; ++run) {
    const double seconds = chain_timing::time_fma(&sink);
    peak = std::max(peak, chain_timing::kIterations * chain_timing::kChains * 32.0 / seconds *
                              1e-9);
  }
  std::printf("16-lane FMA peak:                   %6.1f GFLOP/s (sink %g)\n", peak,
              static_cast<double>(sink));
  measure(1024, 64);
  measure(4096, 128);
  return 0;
}
