// CPU glue of the attention family: the fastllm::attention_fwd / attention_bwd schemas
// (csrc/schemas.h) on CPU tensors, running the torch-free kernels of attention_cpu.cpp.
// Checks, allocation and parameter filling are shared with the CUDA glue
// (attention_glue.h); the CPU also checks the values of cu_seqlens and seqused_k, which
// costs nothing here.
//
// Not compiled into the SIMT emulation's registrations: that build registers the CUDA
// implementation for CPU tensors (attention_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <stdexcept>
#include <tuple>

#include "attention/attention.h"
#include "attention/attention_glue.h"

namespace fastllm {
namespace attention {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu_op(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        FASTLLM_ATTENTION_OPTION_PARAMS) {
  FwdCall c = prepare_fwd("attention", /*check_values=*/true, as_is, q, k, v,
                          make_options(FASTLLM_ATTENTION_OPTION_ARGS));
  if (empty_problem(c.params)) {
    fill_empty_fwd(c);
  } else {
    try {
      attention_fwd_cpu(c.params);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, "attention: ", e.what());
    }
  }
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, FASTLLM_ATTENTION_OPTION_PARAMS) {
  BwdCall c = prepare_bwd("attention_bwd", /*check_values=*/true, as_is, dout, q, k, v, out,
                          lse, make_options(FASTLLM_ATTENTION_OPTION_ARGS));
  if (empty_problem(c.params)) {
    fill_empty_bwd(c);
  } else {
    try {
      attention_bwd_cpu(c.params);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, "attention_bwd: ", e.what());
    }
  }
  return {c.dq, c.dk, c.dv};
}

}  // namespace

#if !defined(FASTLLM_SIMT_EMU)
TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu_op);
  m.impl("attention_bwd", &attention_bwd_cpu_op);
}
#endif

}  // namespace attention
}  // namespace fastllm
