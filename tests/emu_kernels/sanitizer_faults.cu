// Test-only kernel with the host-memory faults of sanitizer_faults.h. In the plain emulation
// build both faults go unnoticed: x[n] lies in the slack of x's allocation and x86 loads a
// misaligned float4 happily. The sanitized build must stop at each.
#include "sanitizer_faults.h"

namespace fastllm {
namespace emu_test {
namespace {

__global__ void sanitizer_fault_kernel(SanitizerFault fault, const float* x, float* out) {
  const int t = static_cast<int>(threadIdx.x);
  switch (fault) {
    case SanitizerFault::kNone:
      out[t] = x[t];
      break;
    case SanitizerFault::kReadPastEnd:
      out[t] = x[t + 1];  // the off-by-one under test
      break;
    case SanitizerFault::kMisalignedVectorLoad:
      if (t == 0) {
        const float4 v = *reinterpret_cast<const float4*>(x + 1);  // the misalignment under test
        out[0] = v.x + v.y + v.z + v.w;
      } else {
        out[t] = x[t];
      }
      break;
  }
}

}  // namespace

cudaError_t launch_sanitizer_fault(SanitizerFault fault, const float* x, float* out, int n) {
  if (n < 1 || n > 1024) return cudaErrorInvalidValue;
  FASTLLM_LAUNCH_KERNEL(sanitizer_fault_kernel, 1, n, 0, nullptr, fault, x, out);
  return cudaGetLastError();
}

}  // namespace emu_test
}  // namespace fastllm
