// Launcher of the test-only kernel of sanitizer_faults.cu: host-memory faults that the SIMT
// emulation cannot see by itself (the access lands in memory the process owns) and that the
// sanitized build (fastllm/_emu.py, load(sanitize=True)) must report.
// tests/test_emu_sanitizers.py runs it through torch.ops.fastllm_emu_test.sanitizer_fault.
#pragma once

#include "common/cuda_compat.h"

namespace fastllm {
namespace emu_test {

enum class SanitizerFault : int {
  kNone = 0,              // out[t] = x[t]: in bounds and aligned, must run clean
  kReadPastEnd,           // out[t] = x[t + 1]: the last thread reads one float past x (ASan)
  kMisalignedVectorLoad,  // thread 0 reads a float4 at x + 1, 4 bytes past a 16-byte boundary
                          // (UBSan; on a GPU: misaligned address error)
};

// One block of n threads over x and out of n floats each (n <= 1024; the op asks n >= 8, so
// that only the alignment of kMisalignedVectorLoad is wrong); out[t] for t > 0 is x[t]
// except under kReadPastEnd. Returns cudaGetLastError() after the launch.
cudaError_t launch_sanitizer_fault(SanitizerFault fault, const float* x, float* out, int n);

}  // namespace emu_test
}  // namespace fastllm
