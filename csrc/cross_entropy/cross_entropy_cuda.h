// Launchers of the CUDA cross-entropy kernels (cross_entropy.cu). Torch-free: called by the
// torch glue (cross_entropy_cuda_ops.cpp) on a GPU, and by the host build of the same source on
// CPU tensors through the SIMT emulation (FASTLLM_SIMT_EMU).
#pragma once

#include "common/cuda_compat.h"
#include "cross_entropy/cross_entropy.h"

namespace fastllm {
namespace cross_entropy {

// float32/bfloat16/float16 logits (float64 is rejected by the glue). An out-of-range
// target (neither ignore_index nor in [0, vocab)) gives that row a NaN loss and NaN
// gradient, so it can never pass silently; p.bad_target_row is not used on CUDA.
cudaError_t launch_cross_entropy_fwd_cuda(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_cross_entropy_bwd_cuda(const BwdParams& p, cudaStream_t stream);

}  // namespace cross_entropy
}  // namespace fastllm
