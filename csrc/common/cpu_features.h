// Which instruction set the CPU kernels run, decided once per process at run time.
//
// The package is compiled with portable flags (no -mavx2), so one binary runs on any x86-64
// or ARM CPU; kernels that have an AVX2 path compile it per function (cpu_avx2.h) and pick it
// here when the CPU has AVX2, FMA and F16C (libgcc's __builtin_cpu_supports also checks that
// the OS saves the YMM registers).
//
// AVX-512 (F, BW, DQ, VL and BF16) is a level above AVX2 that only some kernels implement
// (attention), so it is asked for separately (cpu_avx512()) and cpu_isa() stays kAvx2 on such
// a CPU: a kernel without an AVX-512 path keeps running its AVX2 one.
//
// FASTLLM_CPU_ISA=scalar forces the portable path and FASTLLM_CPU_ISA=avx2 caps the kernels at
// AVX2, so the tests cover every path on an AVX-512 machine; unset (or empty) means "the best
// this CPU has". Anything else is an error.
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

inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
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

// True when the kernels that have an AVX-512 path may run it: the best level is allowed
// (FASTLLM_CPU_ISA unset) and the CPU has AVX-512 F/BW/DQ/VL/BF16 (which implies AVX2).
inline bool detect_cpu_avx512() {
  const char* requested = std::getenv("FASTLLM_CPU_ISA");
  const bool capped = requested != nullptr && *requested != '\0';
  return !capped && cpu_isa() == CpuIsa::kAvx2 && cpu_has_avx512_bf16();
}

inline bool cpu_avx512() {
  static const bool avx512 = detect_cpu_avx512();
  return avx512;
}

}  // namespace cpu
}  // namespace fastllm
