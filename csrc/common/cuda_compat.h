// The one header every .cu file includes first. Under nvcc it pulls in the CUDA runtime and
// the fp16/bf16 types; in the host build of the same .cu files (FASTLLM_SIMT_EMU, used by
// the tests to execute the CUDA kernels on the CPU) it pulls in the SIMT emulation instead.
//
// Kernels and launchers use only what both sides provide:
//   - FASTLLM_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, args...) instead of
//     the <<<...>>> syntax (which is not C++);
//   - FASTLLM_EXTERN_SHARED(type, name) instead of `extern __shared__ type name[]`;
//   - static `__shared__ T name[N]` arrays, __syncthreads(), __syncwarp(), warp shuffles,
//     votes, atomics and the math intrinsics as in CUDA;
//   - tensor-core / async-copy instructions only through csrc/common/mma.h.
#pragma once

#if defined(FASTLLM_SIMT_EMU)
#include "common/simt_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define FASTLLM_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)

#define FASTLLM_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif
