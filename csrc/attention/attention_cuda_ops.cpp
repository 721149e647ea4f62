// CUDA glue of the attention family: the fastllm::attention_fwd / attention_bwd schemas
// (csrc/schemas.h) on CUDA tensors, running the FlashAttention-2 kernels of
// csrc/attention/cuda/ (launchers in attention_cuda.h). Checks, allocation, parameter
// filling and the entry points are shared with the CPU glue (attention_glue.h); this file
// only says how CUDA takes its inputs and launches a kernel.
//
// No device synchronisation: the values of cu_seqlens / seqused_k are trusted (as in
// FlashAttention), and the dropout seed stays on the device (the kernels read it).
//
// The kernels take fp16 / bf16 and head dims that are multiples of 8 up to 256; anything
// else is refused with a message naming the argument. Inputs whose layout the 16-byte tile
// copies cannot read directly (strides not multiples of 8 elements, misaligned data,
// non-unit head-dim stride) are copied to contiguous tensors first (CudaKernels::input).
//
// Built three ways (common/torch_glue.h):
//   - fastllm._C without CUDA: nothing;
//   - fastllm._C with FASTLLM_WITH_CUDA: the CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the same implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "attention/attention.h"
#include "attention/attention_glue.h"
#include "common/torch_glue.h"

#if defined(FASTLLM_GLUE_HAS_CUDA)
#include "attention/attention_cuda.h"

namespace fastllm {
namespace attention {
namespace {

// A launcher's layout requirement that the params miss (attention_cuda_*_unsupported):
// an error naming it.
void check_layout(const char* op, const char* unsupported) {
  TORCH_CHECK(unsupported == nullptr, op, kCudaBackend, ": ", unsupported);
}

struct AttentionCudaKernels {
  static constexpr bool kSupportsMasks = true;

  // The tensor itself when the kernels' 16-byte copies can read it in place: unit stride
  // along the head dim, every other stride a multiple of 8 elements, 16-byte aligned data.
  static at::Tensor input(const at::Tensor& t) {
    bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(-1) == 1;
    for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
    return ok ? t : t.contiguous();
  }

  // fp16 / bf16 and a head dim the kernels were compiled for, else an error naming q.
  static void check_supported(const char* op, const at::Tensor& q) {
    TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                     kCudaBackend,
                     ": the CUDA kernels need q, k, v in float16 or bfloat16, got q of ",
                     q.scalar_type(), " (the CPU and reference backends take float32 / float64)");
    const int64_t head_dim = q.size(-1);
    TORCH_CHECK(head_dim % 8 == 0 && head_dim <= 256, op, kCudaBackend,
                ": the CUDA kernels need head_dim (q's last dim) to be a multiple of 8 up to "
                "256, got ", head_dim);
  }

  static void fwd(const char* op, FwdParams& p, const at::Tensor& q) {
    const CudaLaunch launch(q);
    check_layout(op, attention_cuda_fwd_unsupported(p));
    check_launch(op, launch_attention_fwd_cuda(p, launch.stream()));
  }

  static void bwd(const char* op, BwdParams& p, const at::Tensor& lse) {
    const CudaLaunch launch(lse);
    // The D_i workspace is laid out like lse, with lse's strides (prepare_bwd made them
    // compact).
    const at::Tensor workspace = cuda_workspace(
        lse, static_cast<int64_t>(attention_cuda_bwd_workspace_bytes(lse.numel())), at::kByte);
    check_layout(op, attention_cuda_bwd_unsupported(p));
    check_launch(op, launch_attention_bwd_cuda(p, workspace.data_ptr(), launch.stream()));
  }
};

}  // namespace

FASTLLM_CUDA_LIBRARY_IMPL(m) { register_attention_ops<AttentionCudaKernels>(m); }

}  // namespace attention
}  // namespace fastllm

#endif  // FASTLLM_GLUE_HAS_CUDA
