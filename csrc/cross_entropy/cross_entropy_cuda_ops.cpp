// CUDA glue of the cross-entropy family: the fastllm::cross_entropy_* schemas
// (csrc/schemas.h) on CUDA tensors, running the kernels of cross_entropy.cu (launchers in
// cross_entropy_cuda.h). Checks, allocation, parameter filling and the entry points are
// shared with the CPU glue (cross_entropy_glue.h); this file only says which launchers run.
// An out-of-range target gives its row a NaN loss and gradient on CUDA tensors (no device
// synchronisation to report it); under the SIMT emulation, on CPU tensors, the glue raises
// an IndexError naming it first (check_target_values in cross_entropy_glue.h).
//
// Built three ways (common/torch_glue.h):
//   - fastllm._C without CUDA: nothing;
//   - fastllm._C with FASTLLM_WITH_CUDA: the CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the same implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/torch_glue.h"
#include "cross_entropy/cross_entropy.h"
#include "cross_entropy/cross_entropy_glue.h"

#if defined(FASTLLM_GLUE_HAS_CUDA)
#include "cross_entropy/cross_entropy_cuda.h"

namespace fastllm {
namespace cross_entropy {

// The common CUDA Kernels, with the kernels' vocabulary bound checked by name first (the
// launchers would only report an invalid argument).
struct CrossEntropyCudaKernels
    : CudaKernels<launch_cross_entropy_fwd_cuda, launch_cross_entropy_bwd_cuda> {
  using Base = CudaKernels<launch_cross_entropy_fwd_cuda, launch_cross_entropy_bwd_cuda>;

  template <class Params>
  static void check_vocab(const char* op, const Params& p) {
    TORCH_CHECK(p.vocab <= kMaxCudaVocab, op, kCudaBackend, ": logits must have at most ",
                kMaxCudaVocab, " classes on CUDA, got ", p.vocab);
  }
  template <class Params>
  static void fwd(const char* op, Params& p, const at::Tensor& like) {
    check_vocab(op, p);
    Base::fwd(op, p, like);
  }
  template <class Params>
  static void bwd(const char* op, Params& p, const at::Tensor& like) {
    check_vocab(op, p);
    Base::bwd(op, p, like);
  }
};

FASTLLM_CUDA_LIBRARY_IMPL(m) { register_cross_entropy_ops<CrossEntropyCudaKernels>(m); }

}  // namespace cross_entropy
}  // namespace fastllm

#endif  // FASTLLM_GLUE_HAS_CUDA
