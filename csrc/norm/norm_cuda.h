// Launchers of the CUDA norm kernels (norm.cu). Torch-free: callable from the torch glue
// (norm_cuda_ops.cpp) on a real GPU and from the host build of norm.cu that runs the very same
// kernels on the CPU through the SIMT emulation (FASTLLM_SIMT_EMU, csrc/common/simt_emu.h).
#pragma once

#include "common/cuda_compat.h"
#include "norm/norm.h"

namespace fastllm {
namespace norm {

// Floats of scratch memory launch_norm_bwd_cuda needs for the partial weight/bias sums.
int64_t norm_bwd_cuda_workspace_floats(int64_t rows, int64_t cols, int num_sms);

// Both return the launch error (cudaSuccess on success) instead of throwing, so the glue
// can report it with the op's name.
cudaError_t launch_norm_fwd_cuda(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_norm_bwd_cuda(const BwdParams& p, int num_sms, cudaStream_t stream);

}  // namespace norm
}  // namespace fastllm
