// The per-(head dim, dtype) launchers of the FlashAttention-2 kernels, declared without
// their definitions: attention_launch.cu dispatches to them, and each generated
// attention_{fwd,bwd_dkdv,bwd_dq}_hdim<D>_<dtype>.cu file (generate_instantiations.py)
// instantiates one of them from attention_fwd.cuh / attention_bwd.cuh, so the heavy
// templates compile in parallel, once each.
//
// kHeadDim is the compiled tile width: every runtime head dim D with D % 8 == 0 and
// D <= kHeadDim runs (columns past D are zero-filled). T is __half or __nv_bfloat16.
#pragma once

#include <cstdint>

#include "attention/attention.h"
#include "common/cuda_compat.h"

namespace fastllm {
namespace attention {
namespace cuda {

template <int kHeadDim, class T>
cudaError_t launch_attention_fwd(const FwdParams& p, uint32_t dropout_threshold,
                                 cudaStream_t stream);

// softmax_d: D_i = <dout_i, out_i>, fp32, laid out like lse.
template <int kHeadDim, class T>
cudaError_t launch_attention_bwd_dkdv(const BwdParams& p, const float* softmax_d,
                                      uint32_t dropout_threshold, cudaStream_t stream);
template <int kHeadDim, class T>
cudaError_t launch_attention_bwd_dq(const BwdParams& p, const float* softmax_d,
                                    uint32_t dropout_threshold, cudaStream_t stream);

}  // namespace cuda
}  // namespace attention
}  // namespace fastllm
