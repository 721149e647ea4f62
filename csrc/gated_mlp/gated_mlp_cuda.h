// Launchers of the CUDA gated-MLP kernels (gated_mlp.cu). Torch-free: callable from the torch
// glue (gated_mlp_cuda_ops.cpp) on a real GPU and from the host build of gated_mlp.cu that runs
// the very same kernels on the CPU through the SIMT emulation (FASTLLM_SIMT_EMU,
// csrc/common/simt_emu.h).
#pragma once

#include "common/cuda_compat.h"
#include "gated_mlp/gated_mlp.h"

namespace fastllm {
namespace gated_mlp {

// Both return the launch error (cudaSuccess on success) instead of throwing, so the glue can
// report it with the op's name. float32, bfloat16 and float16 (float64: cudaErrorInvalidValue).
cudaError_t launch_gated_mlp_fwd_cuda(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_gated_mlp_bwd_cuda(const BwdParams& p, cudaStream_t stream);

}  // namespace gated_mlp
}  // namespace fastllm
