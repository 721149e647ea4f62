// CPU glue of the attention family: the fastllm::attention_fwd / attention_bwd schemas
// (csrc/schemas.h) on CPU tensors, running the torch-free kernels of attention_cpu.cpp.
// Checks, allocation, parameter filling and the entry points are shared with the CUDA glue
// (attention_glue.h); this file only says which CPU kernels run and how they take inputs.
//
// Registers nothing in the SIMT emulation build (FASTLLM_CPU_LIBRARY_IMPL): that build
// registers the CUDA implementation for CPU tensors (attention_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/attention.h"
#include "attention/attention_glue.h"
#include "common/torch_glue.h"

namespace fastllm {
namespace attention {
namespace {

// The CPU kernels read any strides and every dtype.
struct AttentionCpuKernels : CpuKernels<attention_fwd_cpu, attention_bwd_cpu> {
  static constexpr bool kSupportsMasks = true;
  static at::Tensor input(const at::Tensor& t) { return t; }
  static void check_supported(const char* /*op*/, const at::Tensor& /*q*/) {}
};

}  // namespace

FASTLLM_CPU_LIBRARY_IMPL(m) { register_attention_ops<AttentionCpuKernels>(m); }

}  // namespace attention
}  // namespace fastllm
