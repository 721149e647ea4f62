// Which instruction set the CPU kernels run, decided once per process at run time.
//
// The package is compiled with portable flags (no -mavx2), so one binary runs on any x86-64
// or ARM CPU; kernels that have an AVX2 path compile it per function (cpu_avx2.h) and pick it
// here when the CPU has AVX2, FMA and F16C (libgcc's __builtin_cpu_supports also checks that
// the OS saves the YMM registers).
//
// FASTLLM_CPU_ISA=scalar forces the portable path, so the tests cover it on AVX2 machines;
// FASTLLM_CPU_ISA=avx2 (or unset) means "the best this CPU has". Anything else is an error.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastllm {
namespace cpu {

enum class CpuIsa { kScalar, kAvx2 };

inline bool cpu_has_avx2_fma_f16c() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

inline CpuIsa detect_cpu_isa() {
  const char* requested = std::getenv("FASTLLM_CPU_ISA");
  if (requested != nullptr && std::strcmp(requested, "scalar") == 0) return CpuIsa::kScalar;
  if (requested != nullptr && *requested != '\0' && std::strcmp(requested, "avx2") != 0) {
    throw std::invalid_argument(std::string("FASTLLM_CPU_ISA must be 'scalar' or 'avx2', got '") +
                                requested + "'");
  }
  return cpu_has_avx2_fma_f16c() ? CpuIsa::kAvx2 : CpuIsa::kScalar;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

}  // namespace cpu
}  // namespace fastllm
