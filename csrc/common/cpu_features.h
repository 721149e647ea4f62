// Which instruction set the CPU kernels run, decided once per process at run time.
//
// The package is compiled with portable flags (no -mavx2), so one binary runs on any x86-64
// or ARM CPU; kernels that have an AVX2 path compile it per function (cpu_avx2.h) and pick it
// here when the CPU has AVX2, FMA and F16C (libgcc's __builtin_cpu_supports also checks that
// the OS saves the YMM registers).
//
// Two levels above AVX2 are asked for separately, by the kernels that implement them, so
// cpu_isa() stays kAvx2 on such a CPU and a kernel without the higher path keeps its AVX2 one:
//   - cpu_avx512(): AVX-512 F, BW, DQ, VL and BF16 (attention, norms, cross-entropy, rotary,
//     gated MLP);
//   - cpu_avx512_dot(): the AVX-512 path's vdpbf16ps products (AVX512-BF16) for bfloat16
//     attention, on CPUs without AMX-BF16 (AMD Zen 4 and later: there vdpbf16ps issues at an
//     FMA's rate with twice its multiplies; on Sapphire Rapids it measured slower than the
//     FMAs, so a CPU with AMX-BF16 takes it only when FASTLLM_CPU_ISA=avx512bf16 asks);
//   - cpu_amx(): AMX-TILE and AMX-BF16 on top of AVX-512, and the kernel's permission to use
//     the tile data state (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM), asked once per process;
//     refused or not Linux -> false, and the AVX-512 path runs). Attention's bfloat16 tile
//     products;
//   - cpu_amx_fp16(): cpu_amx() and AMX-FP16 (Granite Rapids and later). Attention's float16
//     tile products (without it, float16 attention takes the AVX-512 path).
//
// FASTLLM_CPU_ISA caps the level, so the tests cover every path on the best machine: scalar
// (the portable path), avx2, avx512 (AVX-512 FMAs: neither AMX nor the vdpbf16ps products),
// avx512bf16 (AVX-512 with the vdpbf16ps products, no AMX) or amx (everything; the same as
// unset or empty). A cap above what the CPU has means the best it has. Anything else is an
// error naming the value.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fastllm {
namespace cpu {

enum class CpuIsa { kScalar, kAvx2 };

// The level FASTLLM_CPU_ISA allows (kAmx when unset or empty).
enum class IsaCap { kScalar, kAvx2, kAvx512, kAvx512Bf16, kAmx };

inline IsaCap requested_isa_cap() {
  const char* requested = std::getenv("FASTLLM_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return IsaCap::kAmx;
  if (std::strcmp(requested, "scalar") == 0) return IsaCap::kScalar;
  if (std::strcmp(requested, "avx2") == 0) return IsaCap::kAvx2;
  if (std::strcmp(requested, "avx512") == 0) return IsaCap::kAvx512;
  if (std::strcmp(requested, "avx512bf16") == 0) return IsaCap::kAvx512Bf16;
  if (std::strcmp(requested, "amx") == 0) return IsaCap::kAmx;
  throw std::invalid_argument(
      std::string("FASTLLM_CPU_ISA must be 'scalar', 'avx2', 'avx512', 'avx512bf16' or 'amx' "
                  "(or unset), got '") +
      requested + "'");
}

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

// AMX-TILE and AMX-BF16 (CPUID.(7, 0):EDX bits 24 and 22) with the tile state enabled by the
// OS in XCR0 (bits 17 and 18, XTILECFG and XTILEDATA).
inline bool cpu_has_amx_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if ((edx & (1u << 24)) == 0 || (edx & (1u << 22)) == 0) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || (ecx & (1u << 27)) == 0) return false;  // OSXSAVE
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  constexpr unsigned kTileState = (1u << 17) | (1u << 18);
  return (xcr0_lo & kTileState) == kTileState;
#else
  return false;
#endif
}

// AMX-FP16 (CPUID.(7, 1):EAX bit 21): tdpfp16ps, float16 tiles with float32 accumulation. Linux
// kernels older than 6.4 do not name it in /proc/cpuinfo, but the instruction is there.
inline bool cpu_has_amx_fp16() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || eax < 1) return false;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return (eax & (1u << 21)) != 0;
#else
  return false;
#endif
}

// Linux hands the AMX tile data state (XFEATURE_XTILEDATA = 18) to a process only after it
// asks (arch_prctl ARCH_REQ_XCOMP_PERM = 0x1023, Linux 5.16+); without the permission the
// first tile instruction faults. Asking again after a grant (torch's oneDNN may have asked
// already) succeeds.
inline bool request_amx_permission() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

inline CpuIsa detect_cpu_isa() {
  const IsaCap cap = requested_isa_cap();
  if (cap == IsaCap::kScalar) return CpuIsa::kScalar;
  return cpu_has_avx2_fma_f16c() ? CpuIsa::kAvx2 : CpuIsa::kScalar;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

// True when the kernels that have an AVX-512 path may run it: FASTLLM_CPU_ISA allows it and
// the CPU has AVX-512 F/BW/DQ/VL/BF16 (which implies AVX2).
inline bool detect_cpu_avx512() {
  return requested_isa_cap() >= IsaCap::kAvx512 && detect_cpu_isa() == CpuIsa::kAvx2 &&
         cpu_has_avx512_bf16();
}

inline bool cpu_avx512() {
  static const bool avx512 = detect_cpu_avx512();
  return avx512;
}

// True when bfloat16 attention may run its products on vdpbf16ps (when cpu_amx() is false:
// the AMX path comes first): FASTLLM_CPU_ISA allows it, the AVX-512 path is on (which
// includes AVX512-BF16), and either the CPU has no AMX-BF16 or FASTLLM_CPU_ISA=avx512bf16 asks
// for this path by name (see above).
inline bool detect_cpu_avx512_dot() {
  const IsaCap cap = requested_isa_cap();
  return cap >= IsaCap::kAvx512Bf16 && detect_cpu_avx512() &&
         (cap == IsaCap::kAvx512Bf16 || !cpu_has_amx_bf16());
}

inline bool cpu_avx512_dot() {
  static const bool dot = detect_cpu_avx512_dot();
  return dot;
}

// True when the kernels that have an AMX path may run it: FASTLLM_CPU_ISA allows it, the
// AVX-512 path is on, the CPU and OS have AMX-BF16, and the kernel granted the permission.
inline bool detect_cpu_amx() {
  return requested_isa_cap() >= IsaCap::kAmx && detect_cpu_avx512() && cpu_has_amx_bf16() &&
         request_amx_permission();
}

inline bool cpu_amx() {
  static const bool amx = detect_cpu_amx();
  return amx;
}

// True when the float16 tile products may run: the AMX path is on and the CPU has AMX-FP16.
inline bool cpu_amx_fp16() {
  static const bool amx_fp16 = cpu_amx() && cpu_has_amx_fp16();
  return amx_fp16;
}

// Tests only: FASTLLM_CPU_EMULATE_AMX=1 lets attention's tile paths that this CPU cannot run
// -- float32 split into bfloat16 parts (amx-bf16x6) without AMX-BF16, float16 tiles
// (amx-fp16) without AMX-FP16 -- run with their products emulated by AVX-512 vector code on
// the same packed operands (paths "amx-bf16x6-emu", "amx-fp16-emu"), so that everything of
// those paths but the tile instructions is tested on any AVX-512 machine. Slower than the
// paths the CPU would otherwise take: never for production. Needs the vector path that
// carries them (the AVX-512 path with AVX512-BF16, FASTLLM_CPU_ISA at avx512bf16 or above);
// "0" or unset: off; anything else is an error naming the value.
inline bool requested_amx_emulation() {
  const char* requested = std::getenv("FASTLLM_CPU_EMULATE_AMX");
  if (requested == nullptr || *requested == '\0' || std::strcmp(requested, "0") == 0) {
    return false;
  }
  if (std::strcmp(requested, "1") == 0) return true;
  throw std::invalid_argument(
      std::string("FASTLLM_CPU_EMULATE_AMX must be '1' (emulate the AMX tile paths this CPU "
                  "lacks, for tests) or '0', got '") +
      requested + "'");
}

inline bool detect_amx_emulation() {
  return requested_amx_emulation() && requested_isa_cap() >= IsaCap::kAvx512Bf16 &&
         detect_cpu_avx512();
}

inline bool amx_emulation() {
  static const bool emulate = detect_amx_emulation();
  return emulate;
}

// float32 attention on the split path's emulated products (see above).
inline bool cpu_amx_split_emulated() { return amx_emulation() && !cpu_amx(); }

// float16 attention on the float16 tile path's emulated products (see above).
inline bool cpu_amx_fp16_emulated() { return amx_emulation() && !cpu_amx_fp16(); }

}  // namespace cpu
}  // namespace fastllm
