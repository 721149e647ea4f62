// CUDA glue of the norm family: the fastllm::*norm* schemas (csrc/schemas.h) on CUDA
// tensors, running the kernels of norm.cu (launchers in norm_cuda.h). Checks, allocation,
// parameter filling and the entry points are shared with the CPU glue (norm_glue.h); this
// file only says which launchers run, and gives backward its workspace.
//
// Built three ways (common/torch_glue.h):
//   - fastllm._C without CUDA: nothing;
//   - fastllm._C with FASTLLM_WITH_CUDA: the CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the same implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "norm/norm.h"
#include "norm/norm_glue.h"

#if defined(FASTLLM_GLUE_HAS_CUDA)
#include "norm/norm_cuda.h"

namespace fastllm {
namespace norm {
namespace {

// The launchers also take the grid limit (CudaLaunch::max_blocks), and backward a workspace
// for the partial dweight / dbias sums, sized by the SM count.
struct NormCudaKernels : CudaKernels<nullptr, nullptr> {
  static void fwd(const char* op, FwdParams& p, const at::Tensor& input) {
    const CudaLaunch launch(input);
    check_launch(op, launch_norm_fwd_cuda(p, launch.max_blocks(), launch.stream()));
  }
  static void bwd(const char* op, BwdParams& p, const at::Tensor& input) {
    const CudaLaunch launch(input);
    const int num_sms = launch.num_sms();
    const int64_t max_blocks = launch.max_blocks();
    const at::Tensor workspace = cuda_workspace(
        input, norm_bwd_cuda_workspace_floats(p.rows, p.cols, num_sms, max_blocks), at::kFloat);
    p.workspace = workspace.data_ptr<float>();
    check_launch(op, launch_norm_bwd_cuda(p, num_sms, max_blocks, launch.stream()));
  }
};

}  // namespace

FASTLLM_CUDA_LIBRARY_IMPL(m) { register_norm_ops<NormCudaKernels>(m); }

}  // namespace norm
}  // namespace fastllm

#endif  // FASTLLM_GLUE_HAS_CUDA
