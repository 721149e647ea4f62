// CPU glue of the rotary family: the fastllm::rotary_* schemas (csrc/schemas.h) on CPU
// tensors, running the torch-free kernel of rotary_cpu.cpp. Checks, allocation, parameter
// filling and the entry points are shared with the CUDA glue (rotary_glue.h); this file only
// says which CPU kernel runs (forward and backward are one kernel: conjugate flips the sign).
//
// Registers nothing in the SIMT emulation build (FASTLLM_CPU_LIBRARY_IMPL): that build
// registers the CUDA implementation for CPU tensors (rotary_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "rotary/rotary.h"
#include "rotary/rotary_glue.h"

namespace fastllm {
namespace rotary {

FASTLLM_CPU_LIBRARY_IMPL(m) { register_rotary_ops<CpuKernels<rotary_cpu, rotary_cpu>>(m); }

}  // namespace rotary
}  // namespace fastllm
