// The AVX2 gated-MLP kernels' reciprocal (csrc/gated_mlp/gated_mlp_cpu.cpp, avx2_path::recip:
// 1 / d for d in [1, 2], the sigmoid's 1 / (1 + exp(-|z|))) against the rounded quotient 1.0f / d,
// over every float d in [1, 2]: _mm256_rcp_ps's 12-bit estimate with one Newton step (what the
// kernel had) and with two (what it has). On a Zen 3 core (AMD EPYC family 25 model 1) one
// step left 906503 of the 2^23 + 1 values off the rounded quotient, by up to 1.86 units of
// 2^-24, d = 1 among them (rcp_ps(1) = 0.999755859, and one step gives 1 - 2^-24); two steps
// left one, within 0.5. The estimate is the CPU's own, so the counts may differ elsewhere.
//
// Build and run (x86-64, GCC >= 11; the measuring code carries its own target attribute), or
// through CMakeLists.txt (target avx2_recip_sweep, also run by ctest, which checks that it
// runs and that two steps give d = 1 exactly; it measures nothing on a CPU without AVX2/FMA):
//   g++ -O2 -o /tmp/avx2_recip_sweep benchmarks/micro/avx2_recip_sweep.cpp && /tmp/avx2_recip_sweep
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

namespace {

struct Sweep {
  int64_t off = 0;       // results that are not the rounded quotient
  double max_ulp = 0.0;  // the largest error, in units of 2^-24
  float first_off = 0.0f;
};

__attribute__((target("avx2,fma"))) float recip(float d, int steps) {
  const __m256 vd = _mm256_set1_ps(d), one = _mm256_set1_ps(1.0f);
  __m256 r = _mm256_rcp_ps(vd);
  for (int s = 0; s < steps; ++s) r = _mm256_fmadd_ps(_mm256_fnmadd_ps(vd, r, one), r, r);
  return _mm256_cvtss_f32(r);
}

Sweep sweep(int steps) {
  Sweep result;
  for (uint32_t bits = 0x3f800000u; bits <= 0x40000000u; ++bits) {
    float d;
    std::memcpy(&d, &bits, sizeof d);
    const float got = recip(d, steps);
    if (got != 1.0f / d) {
      if (result.off++ == 0) result.first_off = d;
    }
    const double ulp = std::fabs(got - 1.0 / d) / std::ldexp(1.0, -24);
    result.max_ulp = std::fmax(result.max_ulp, ulp);
  }
  return result;
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("no AVX2 / FMA on this CPU: nothing measured\n");
    return 0;
  }
  std::printf("rcp_ps(1) = %.9g\n", recip(1.0f, 0));
  for (const int steps : {1, 2}) {
    const Sweep s = sweep(steps);
    std::printf("%d Newton step%s: %lld of the 2^23 + 1 floats in [1, 2] off the rounded "
                "quotient (first d = %.9g), max error %.2f units of 2^-24\n",
                steps, steps == 1 ? " " : "s", static_cast<long long>(s.off), s.first_off,
                s.max_ulp);
  }
  return recip(1.0f, 2) == 1.0f ? 0 : 1;
}
