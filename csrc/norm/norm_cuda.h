// Launchers of the CUDA norm kernels (norm.cu). Torch-free: callable from the torch glue
// (norm_cuda_ops.cpp) on a real GPU and from the host build of norm.cu that runs the very same
// kernels on the CPU through the SIMT emulation (FASTLLM_SIMT_EMU, csrc/common/simt_emu.h).
#pragma once

#include "common/cuda_compat.h"
#include "norm/norm.h"

namespace fastllm {
namespace norm {

// num_sms: the device's SM count, which sizes the backward's partial sums. max_blocks: the
// most blocks a grid whose blocks loop over rows may have: CUDA's grid.x limit, or less
// (the SIMT emulation's tests lower it so that every block loops; CudaLaunch::max_blocks).

// Floats of scratch memory launch_norm_bwd_cuda needs for the partial weight/bias sums.
int64_t norm_bwd_cuda_workspace_floats(int64_t rows, int64_t cols, int num_sms,
                                       int64_t max_blocks);

// Both return the launch error (cudaSuccess on success) instead of throwing, so the glue
// can report it with the op's name.
cudaError_t launch_norm_fwd_cuda(const FwdParams& p, int64_t max_blocks, cudaStream_t stream);
cudaError_t launch_norm_bwd_cuda(const BwdParams& p, int num_sms, int64_t max_blocks,
                                 cudaStream_t stream);

}  // namespace norm
}  // namespace fastllm
