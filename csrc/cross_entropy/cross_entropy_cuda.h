// Launchers of the CUDA cross-entropy kernels (cross_entropy.cu). Torch-free: called by the
// torch glue (cross_entropy_cuda_ops.cpp) on a GPU, and by the host build of the same source on
// CPU tensors through the SIMT emulation (FASTLLM_SIMT_EMU).
#pragma once

#include "common/cuda_compat.h"
#include "cross_entropy/cross_entropy.h"

namespace fastllm {
namespace cross_entropy {

// Class indices are int in the kernels; the bound leaves room for index arithmetic that runs
// up to one block of threads past the end of a row. The glue refuses larger vocabularies by
// name; the launchers return cudaErrorInvalidValue for them.
constexpr int64_t kMaxCudaVocab = int64_t(1) << 30;

// float32/bfloat16/float16 logits (float64 is rejected by the glue), 1 <= vocab <=
// kMaxCudaVocab. An out-of-range target (neither ignore_index nor in [0, vocab)) gives that
// row a NaN loss and NaN gradient, so it can never pass silently; p.bad_target_row is not
// used on CUDA.
cudaError_t launch_cross_entropy_fwd_cuda(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_cross_entropy_bwd_cuda(const BwdParams& p, cudaStream_t stream);

}  // namespace cross_entropy
}  // namespace fastllm
