// The table of cpu_kernel_paths.h: which path each kernel family's CPU dispatch picks for a
// dtype in this process. Each line restates the dispatch of the file named beside it, with
// the predicates of common/cpu_features.h that the kernel itself calls (so FASTLLM_CPU_ISA
// caps the answer exactly as it caps the kernel); keep the two in step.
#include "common/cpu_kernel_paths.h"

#include <iterator>
#include <stdexcept>
#include <string>

#include "common/cpu_features.h"

namespace fastllm {
namespace cpu {
namespace {

constexpr const char* kAmxBf16 = "amx-bf16";  // bfloat16 tile products (cpu_amx())
constexpr const char* kAmxFp16 = "amx-fp16";  // float16 tile products (cpu_amx_fp16())
// float32 as three bfloat16 parts, six bfloat16 tile products per float32 one (cpu_amx()):
// attention
constexpr const char* kAmxBf16x6 = "amx-bf16x6";
// bfloat16 products on AVX512-BF16's vdpbf16ps (cpu_avx512_dot()): attention
constexpr const char* kAvx512Bf16 = "avx512-bf16";
// the two tile paths with their products emulated on AVX-512 (FASTLLM_CPU_EMULATE_AMX, tests
// only: cpu_features.h's amx_emulation())
constexpr const char* kAmxBf16x6Emu = "amx-bf16x6-emu";
constexpr const char* kAmxFp16Emu = "amx-fp16-emu";
constexpr const char* kAvx512 = "avx512";
constexpr const char* kAvx2 = "avx2";
constexpr const char* kScalar = "scalar";

// The vector paths most kernels have: AVX-512 (F/BW/DQ/VL/BF16) where the kernel has one and
// the process may run it, else AVX2/FMA/F16C, else the portable scalar loop.
const char* vector_path(bool kernel_has_avx512) {
  if (kernel_has_avx512 && cpu_avx512()) return kAvx512;
  if (cpu_isa() == CpuIsa::kAvx2) return kAvx2;
  return kScalar;
}

bool is_f64(DType dtype) { return dtype == DType::kFloat64; }

struct FamilyPath {
  std::string_view family;
  const char* (*path)(DType dtype);
};

// One line per family, in kCpuKernelFamilies' order.
constexpr FamilyPath kTable[] = {
    // attention/attention_cpu.cpp attention_{fwd,bwd}_cpu: bfloat16 (AMX-BF16) and float16
    // (AMX-FP16) on AMX tiles where allowed, float32 split into bfloat16 parts on AMX-BF16;
    // bfloat16 on vdpbf16ps without AMX (cpu_avx512_dot); float32 split / float16 tile paths
    // with emulated products where asked (tests only: cpu_amx_split_emulated, _fp16_emulated);
    // with_best_ops otherwise: float64 scalar; AVX-512, AVX2 tiles.
    {"attention",
     [](DType d) {
       // (the emulation first: its flag is checked on every machine)
       if (d == DType::kFloat32 && cpu_amx_split_emulated()) return kAmxBf16x6Emu;
       if (d == DType::kFloat16 && cpu_amx_fp16_emulated()) return kAmxFp16Emu;
       if (d == DType::kBFloat16 && cpu_amx()) return kAmxBf16;
       if (d == DType::kBFloat16 && cpu_avx512_dot()) return kAvx512Bf16;
       if (d == DType::kFloat32 && cpu_amx()) return kAmxBf16x6;
       if (d == DType::kFloat16 && cpu_amx_fp16()) return kAmxFp16;
       return is_f64(d) ? kScalar : vector_path(true);
     }},
    // norm/norm_cpu.cpp norm_{fwd,bwd}_typed (layer_norm, rms_norm, add_*): AVX-512 for the
    // float-acc dtypes, AVX2 for float64 (4 doubles) and below.
    {"norm", [](DType d) { return vector_path(!is_f64(d)); }},
    // cross_entropy/cross_entropy_cpu.cpp pick_path: float64 scalar; AVX-512, AVX2 otherwise.
    {"cross_entropy", [](DType d) { return is_f64(d) ? kScalar : vector_path(true); }},
    // rotary/rotary_cpu.cpp pick_rotate_head: float64 scalar; AVX-512, AVX2 otherwise.
    {"rotary", [](DType d) { return is_f64(d) ? kScalar : vector_path(true); }},
    // gated_mlp/gated_mlp_cpu.cpp Spans: float64 scalar; AVX-512, AVX2 otherwise.
    {"gated_mlp", [](DType d) { return is_f64(d) ? kScalar : vector_path(true); }},
};

static_assert(std::size(kTable) == std::size(kCpuKernelFamilies),
              "cpu_kernel_paths.cpp: one table line per family of kCpuKernelFamilies");

}  // namespace

const char* cpu_kernel_path(std::string_view family, DType dtype) {
  for (const FamilyPath& line : kTable) {
    if (line.family == family) return line.path(dtype);
  }
  std::string valid;
  for (std::string_view name : kCpuKernelFamilies) {
    valid += (valid.empty() ? "'" : ", '") + std::string(name) + "'";
  }
  throw std::invalid_argument("cpu_kernel_path: family must be one of " + valid + ", got '" +
                              std::string(family) + "'");
}

}  // namespace cpu
}  // namespace fastllm
