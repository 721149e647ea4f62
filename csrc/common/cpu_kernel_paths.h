// Which CPU path each kernel family runs in this process, for a dtype: the answer behind
// torch.ops.fastllm.cpu_kernel_path (fastllm.backend.cpu_kernel_path, `fastllm bench`'s path
// column). Torch-free.
//
//   cpu_kernel_path(family, dtype)  "amx-bf16", "avx512", "avx2" or "scalar": the path the
//                                   family's CPU kernels take for dtype, under this CPU and
//                                   FASTLLM_CPU_ISA (common/cpu_features.h). An unknown family
//                                   throws std::invalid_argument naming it and the valid ones.
//   kCpuKernelFamilies              the families it knows, in table order.
//
// The table is csrc/common/cpu_kernel_paths.cpp: one line per family, mirroring that family's
// dispatch in csrc/<family>/<family>_cpu.cpp. A kernel that gains or changes a path edits its
// line there in the same commit (tests/test_bench_isa.py checks every line at every level).
#pragma once

#include <string_view>

#include "common/dtype.h"

namespace fastllm {
namespace cpu {

inline constexpr std::string_view kCpuKernelFamilies[] = {
    "attention", "norm", "cross_entropy", "rotary", "gated_mlp"};

const char* cpu_kernel_path(std::string_view family, DType dtype);

}  // namespace cpu
}  // namespace fastllm
