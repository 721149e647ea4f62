// CPU glue of the cross-entropy family: the fastllm::cross_entropy_* schemas
// (csrc/schemas.h) on CPU tensors, running the torch-free kernels of cross_entropy_cpu.cpp.
// Checks, allocation, parameter filling and the entry points are shared with the CUDA glue
// (cross_entropy_glue.h); this file only says which CPU kernels run.
//
// Registers nothing in the SIMT emulation build (FASTLLM_CPU_LIBRARY_IMPL): that build
// registers the CUDA implementation for CPU tensors (cross_entropy_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "cross_entropy/cross_entropy.h"
#include "cross_entropy/cross_entropy_glue.h"

namespace fastllm {
namespace cross_entropy {

FASTLLM_CPU_LIBRARY_IMPL(m) {
  register_cross_entropy_ops<CpuKernels<cross_entropy_fwd_cpu, cross_entropy_bwd_cpu>>(m);
}

}  // namespace cross_entropy
}  // namespace fastllm
