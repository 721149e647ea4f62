// Torch glue of sanitizer_faults.cu: torch.ops.fastllm_emu_test.sanitizer_fault, a fragment of
// the fastllm_emu_test library of emu_test_ops.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "sanitizer_faults.h"

namespace fastllm {
namespace emu_test {
namespace {

at::Tensor sanitizer_fault(const at::Tensor& x, int64_t fault) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "sanitizer_fault: x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(x.numel() >= 8 && x.numel() <= 1024,
              "sanitizer_fault: x must have 8 to 1024 elements, got ", x.numel());
  TORCH_CHECK(fault >= 0 && fault <= static_cast<int64_t>(SanitizerFault::kMisalignedVectorLoad),
              "sanitizer_fault: fault must be a SanitizerFault (0..2), got ", fault);
  at::Tensor out = at::empty_like(x);
  const cudaError_t err = launch_sanitizer_fault(static_cast<SanitizerFault>(fault),
                                                 x.data_ptr<float>(), out.data_ptr<float>(),
                                                 static_cast<int>(x.numel()));
  TORCH_CHECK(err == cudaSuccess, "fastllm_emu_test::sanitizer_fault: launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastllm_emu_test, m) {
  m.def("sanitizer_fault(Tensor x, int fault) -> Tensor", &sanitizer_fault);
}

}  // namespace emu_test
}  // namespace fastllm
