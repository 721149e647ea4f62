// CUDA glue of the gated-MLP family: the fastllm::gated_mlp_* schemas (csrc/schemas.h) on CUDA
// tensors, running the kernels of gated_mlp.cu (launchers in gated_mlp_cuda.h). Checks,
// allocation, parameter filling and the entry points are shared with the CPU glue
// (gated_mlp_glue.h); this file only says which launchers run.
//
// Built three ways (common/torch_glue.h):
//   - fastllm._C without CUDA: nothing;
//   - fastllm._C with FASTLLM_WITH_CUDA: the CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the same implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "gated_mlp/gated_mlp.h"
#include "gated_mlp/gated_mlp_glue.h"

#if defined(FASTLLM_GLUE_HAS_CUDA)
#include "gated_mlp/gated_mlp_cuda.h"

namespace fastllm {
namespace gated_mlp {

FASTLLM_CUDA_LIBRARY_IMPL(m) {
  register_gated_mlp_ops<CudaKernels<launch_gated_mlp_fwd_cuda, launch_gated_mlp_bwd_cuda>>(m);
}

}  // namespace gated_mlp
}  // namespace fastllm

#endif  // FASTLLM_GLUE_HAS_CUDA
