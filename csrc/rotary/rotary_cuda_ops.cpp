// CUDA glue of the rotary family: the fastllm::rotary_* schemas (csrc/schemas.h) on CUDA
// tensors, running the kernel of rotary.cu (launcher in rotary_cuda.h). Checks, allocation,
// parameter filling and the entry points are shared with the CPU glue (rotary_glue.h); this
// file only says which launcher runs. On CUDA tensors no value is read on the host: the
// kernel clamps positions into cos / sin's rows (rotary.h).
//
// Built three ways (common/torch_glue.h):
//   - fastllm._C without CUDA: nothing;
//   - fastllm._C with FASTLLM_WITH_CUDA: the CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the same implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "rotary/rotary.h"
#include "rotary/rotary_glue.h"

#if defined(FASTLLM_GLUE_HAS_CUDA)
#include "rotary/rotary_cuda.h"

namespace fastllm {
namespace rotary {

// CudaKernels with the grid capped at CudaLaunch::max_blocks (the emulation's test control),
// so that tests exercise the kernel's loop over rows, which a GPU takes only beyond ~1M rows.
struct RotaryCudaKernels : CudaKernels<launch_rotary_cuda, launch_rotary_cuda> {
  static void fwd(const char* op, Params& p, const at::Tensor& like) {
    const CudaLaunch launch(like);
    p.max_blocks = launch.max_blocks();
    check_launch(op, launch_rotary_cuda(p, launch.stream()));
  }
};

FASTLLM_CUDA_LIBRARY_IMPL(m) { register_rotary_ops<RotaryCudaKernels>(m); }

}  // namespace rotary
}  // namespace fastllm

#endif  // FASTLLM_GLUE_HAS_CUDA
