// CPU glue of the norm family: the fastllm::*norm* schemas (csrc/schemas.h) on CPU tensors,
// running the torch-free kernels of norm_cpu.cpp. Checks, allocation, parameter filling and
// the entry points are shared with the CUDA glue (norm_glue.h); this file only says which
// CPU kernels run.
//
// Registers nothing in the SIMT emulation build (FASTLLM_CPU_LIBRARY_IMPL): that build
// registers the CUDA implementation for CPU tensors (norm_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "norm/norm.h"
#include "norm/norm_glue.h"

namespace fastllm {
namespace norm {

FASTLLM_CPU_LIBRARY_IMPL(m) { register_norm_ops<CpuKernels<norm_fwd_cpu, norm_bwd_cpu>>(m); }

}  // namespace norm
}  // namespace fastllm
