// Launcher of the CUDA rotary kernel (rotary.cu). Torch-free: callable from the torch glue
// (rotary_cuda_ops.cpp) on a real GPU and from the host build of rotary.cu that runs the very
// same kernel on the CPU through the SIMT emulation (FASTLLM_SIMT_EMU, csrc/common/simt_emu.h).
#pragma once

#include "common/cuda_compat.h"
#include "rotary/rotary.h"

namespace fastllm {
namespace rotary {

// Returns the launch error (cudaSuccess on success) instead of throwing, so the glue can
// report it with the op's name. float32, bfloat16 and float16 (float64:
// cudaErrorInvalidValue); cos / sin float32 or the dtype of x. Forward and backward
// (p.conjugate) alike.
cudaError_t launch_rotary_cuda(const Params& p, cudaStream_t stream);

}  // namespace rotary
}  // namespace fastllm
