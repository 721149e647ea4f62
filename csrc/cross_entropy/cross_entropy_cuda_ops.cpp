// CUDA glue of the cross-entropy family: the fastllm::cross_entropy_* schemas
// (csrc/schemas.h) on CUDA tensors, running the kernels of cross_entropy.cu (launchers in
// cross_entropy_cuda.h). Checks, allocation, parameter filling and the entry points are
// shared with the CPU glue (cross_entropy_glue.h); this file only says which launchers run.
// An out-of-range target gives its row a NaN loss and gradient on CUDA tensors (no device
// synchronisation to report it); under the SIMT emulation, on CPU tensors, the glue raises
// an IndexError naming it first (check_target_values in cross_entropy_glue.h).
//
// Built three ways (common/torch_glue.h):
//   - fastllm._C without CUDA: nothing;
//   - fastllm._C with FASTLLM_WITH_CUDA: the CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the same implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "cross_entropy/cross_entropy.h"
#include "cross_entropy/cross_entropy_glue.h"

#if defined(FASTLLM_GLUE_HAS_CUDA)
#include "cross_entropy/cross_entropy_cuda.h"

namespace fastllm {
namespace cross_entropy {

FASTLLM_CUDA_LIBRARY_IMPL(m) {
  register_cross_entropy_ops<
      CudaKernels<launch_cross_entropy_fwd_cuda, launch_cross_entropy_bwd_cuda>>(m);
}

}  // namespace cross_entropy
}  // namespace fastllm

#endif  // FASTLLM_GLUE_HAS_CUDA
