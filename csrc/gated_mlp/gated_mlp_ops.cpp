// CPU glue of the gated-MLP family: the fastllm::gated_mlp_* schemas (csrc/schemas.h) on CPU
// tensors, running the torch-free kernels of gated_mlp_cpu.cpp. Checks, allocation, parameter
// filling and the entry points are shared with the CUDA glue (gated_mlp_glue.h); this file
// only says which CPU kernels run.
//
// Registers nothing in the SIMT emulation build (FASTLLM_CPU_LIBRARY_IMPL): that build
// registers the CUDA implementation for CPU tensors (gated_mlp_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "gated_mlp/gated_mlp.h"
#include "gated_mlp/gated_mlp_glue.h"

namespace fastllm {
namespace gated_mlp {

FASTLLM_CPU_LIBRARY_IMPL(m) {
  register_gated_mlp_ops<CpuKernels<gated_mlp_fwd_cpu, gated_mlp_bwd_cpu>>(m);
}

}  // namespace gated_mlp
}  // namespace fastllm
