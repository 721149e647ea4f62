// Launchers of the CUDA FlashAttention-2 kernels (csrc/attention/cuda/). Torch-free: called
// by the torch glue (attention_cuda_ops.cpp) on a GPU, and by the host build of the same
// sources on CPU tensors through the SIMT emulation (FASTLLM_SIMT_EMU).
//
// Supported: fp16 / bf16 (p.dtype), head dims D % 8 == 0 with D <= 256, every other feature
// of attention.h (causal, windows, softcap, ALiBi, varlen, seqused_k, dropout, GQA / MQA,
// attn_bias with any strides and its gradient dbias, key_padding_mask). Layout requirements,
// which the glue guarantees by copying an input that misses them: unit stride along D, all
// other strides multiples of 8 elements and 16-byte aligned base pointers, for every tensor
// (16-byte cp.async copies and stores); attn_bias and key_padding_mask are read per element
// and need neither (dbias is the glue's zeroed contiguous tensor). Each launcher returns
// cudaErrorInvalidValue when a requirement does not hold (attention_cuda_unsupported() says
// which, for the glue's message) and never synchronises. Problems with attn_bias or
// key_padding_mask run separate (kMasks) instantiations of the kernels, so the others keep
// their code and registers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "attention/attention.h"
#include "common/cuda_compat.h"

namespace fastllm {
namespace attention {

// nullptr when the forward kernels can run `p`, else why not (names the argument).
const char* attention_cuda_fwd_unsupported(const FwdParams& p);
const char* attention_cuda_bwd_unsupported(const BwdParams& p);

// out, lse (float32, p.lse strides).
cudaError_t launch_attention_fwd_cuda(const FwdParams& p, cudaStream_t stream);

// Bytes of the backward workspace: fp32 D_i = <dout_i, out_i> laid out like lse, i.e.
// lse_numel floats (the glue passes lse.numel()).
size_t attention_cuda_bwd_workspace_bytes(int64_t lse_numel);

// dq, dk, dv (dk / dv summed over each kv head's query heads; deterministic, no atomics)
// and dbias when p.dbias is set (written by the dq kernel).
// workspace: attention_cuda_bwd_workspace_bytes(lse.numel()) bytes, 16-byte aligned.
cudaError_t launch_attention_bwd_cuda(const BwdParams& p, void* workspace, cudaStream_t stream);

}  // namespace attention
}  // namespace fastllm
