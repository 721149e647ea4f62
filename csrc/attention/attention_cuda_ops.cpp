// CUDA glue of the attention family: the fastllm::attention_fwd / attention_bwd schemas
// (csrc/schemas.h) on CUDA tensors, running the FlashAttention-2 kernels of
// csrc/attention/cuda/ (launchers in attention_cuda.h). Checks, allocation and parameter
// filling are shared with the CPU glue (attention_glue.h).
//
// No device synchronisation: the values of cu_seqlens / seqused_k are trusted (as in
// FlashAttention), and the dropout seed stays on the device (the kernels read it).
//
// The kernels take fp16 / bf16 and head dims that are multiples of 8 up to 256; anything
// else is refused with a message naming the argument. Inputs whose layout the 16-byte tile
// copies cannot read directly (strides not multiples of 8 elements, misaligned data,
// non-unit head-dim stride) are copied to contiguous tensors first (vector_readable, the
// KernelInput handed to attention_glue.h).
//
// Built three ways:
//   - fastllm._C without CUDA: nothing;
//   - fastllm._C with FASTLLM_WITH_CUDA: the CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the same implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "attention/attention.h"
#include "attention/attention_glue.h"

#if defined(FASTLLM_WITH_CUDA) || defined(FASTLLM_SIMT_EMU)
#include "attention/attention_cuda.h"

#if !defined(FASTLLM_SIMT_EMU)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastllm {
namespace attention {
namespace {

#if defined(FASTLLM_SIMT_EMU)
constexpr const char* kBackend = " (emulated CUDA)";
#else
constexpr const char* kBackend = "";
#endif

// The tensor itself when the kernels' 16-byte copies can read it in place: unit stride along
// the head dim, every other stride a multiple of 8 elements, 16-byte aligned data.
at::Tensor vector_readable(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(-1) == 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
  return ok ? t : t.contiguous();
}

// fp16 / bf16 and a head dim the kernels were compiled for, else an error naming q.
void check_supported(const char* op, const at::Tensor& q) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                   kBackend, ": the CUDA kernels need q, k, v in float16 or bfloat16, got q of ",
                   q.scalar_type(), " (the CPU and reference backends take float32 / float64)");
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(head_dim % 8 == 0 && head_dim <= 256, op, kBackend,
              ": the CUDA kernels need head_dim (q's last dim) to be a multiple of 8 up to 256, "
              "got ", head_dim);
}

cudaStream_t current_stream(const at::Tensor& like) {
#if defined(FASTLLM_SIMT_EMU)
  (void)like;
  return nullptr;
#else
  return at::cuda::getCurrentCUDAStream(like.device().index());
#endif
}

void check_launch(const char* op, cudaError_t err, const char* unsupported) {
  TORCH_CHECK(unsupported == nullptr, op, kBackend, ": ", unsupported);
  TORCH_CHECK(err == cudaSuccess, op, kBackend, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda_op(const at::Tensor& q,
                                                         const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         FASTLLM_ATTENTION_OPTION_PARAMS) {
  const char* op = "attention";
  FwdCall c = prepare_fwd(op, /*check_values=*/false, vector_readable, q, k, v,
                          make_options(FASTLLM_ATTENTION_OPTION_ARGS));
  check_supported(op, q);
  if (empty_problem(c.params)) {
    fill_empty_fwd(c);
    return {c.out, c.lse};
  }
#if !defined(FASTLLM_SIMT_EMU)
  c10::cuda::CUDAGuard guard(q.device());
#endif
  const char* unsupported = attention_cuda_fwd_unsupported(c.params);
  const cudaError_t err =
      unsupported ? cudaErrorInvalidValue : launch_attention_fwd_cuda(c.params, current_stream(q));
  check_launch(op, err, unsupported);
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, FASTLLM_ATTENTION_OPTION_PARAMS) {
  const char* op = "attention_bwd";
  BwdCall c = prepare_bwd(op, /*check_values=*/false, vector_readable, dout, q, k, v, out, lse,
                          make_options(FASTLLM_ATTENTION_OPTION_ARGS));
  check_supported(op, q);
  if (empty_problem(c.params)) {
    fill_empty_bwd(c);
    return {c.dq, c.dk, c.dv};
  }
  const BwdParams& p = c.params;
  // The D_i workspace is laid out like lse, with lse's strides (prepare_bwd made them compact).
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(attention_cuda_bwd_workspace_bytes(c.lse.numel()))},
      q.options().dtype(at::kByte));
#if !defined(FASTLLM_SIMT_EMU)
  c10::cuda::CUDAGuard guard(q.device());
#endif
  const char* unsupported = attention_cuda_bwd_unsupported(p);
  const cudaError_t err = unsupported ? cudaErrorInvalidValue
                                      : launch_attention_bwd_cuda(p, workspace.data_ptr(),
                                                                  current_stream(q));
  check_launch(op, err, unsupported);
  return {c.dq, c.dk, c.dv};
}

}  // namespace

#if defined(FASTLLM_SIMT_EMU)
// Host build of the CUDA kernels: the CUDA implementations on CPU tensors.
TORCH_LIBRARY_IMPL(fastllm_emu, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cuda_op);
  m.impl("attention_bwd", &attention_bwd_cuda_op);
}
#else
TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda_op);
  m.impl("attention_bwd", &attention_bwd_cuda_op);
}
#endif

}  // namespace attention
}  // namespace fastllm

#endif  // FASTLLM_WITH_CUDA || FASTLLM_SIMT_EMU
