// Test-only kernels with the bugs CUDA kernels typically have on their first run, and
// their correct twins. tests/test_simt_emu.py checks that the SIMT emulation catches each
// fault: a wrong answer (missing barriers, wrong shuffle lane) or an error naming the
// threads involved (deadlock, out-of-bounds shared memory, bad address, stack overflow...).
// Shapes: n, threads = threads of the one block; rows = number of one-warp blocks.
#include "emu_test_kernels.h"

#include <cassert>

namespace fastllm {
namespace emu_test {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxShiftAddThreads = 1024;

__global__ void shift_add_kernel(const float* x, float* out, bool with_barrier) {
  __shared__ float slots[kMaxShiftAddThreads];
  const int t = static_cast<int>(threadIdx.x);
  slots[t] = x[t];
  // The bug under test: without this barrier thread t may read slot t - 1 before thread
  // t - 1 wrote it. In-order execution hides it (thread t - 1 runs first), a random
  // schedule does not.
  if (with_barrier) __syncthreads();
  out[t] = x[t] + (t > 0 ? slots[t - 1] : 0.f);
}

constexpr int kTwoSumsThreads = 128;

__device__ float block_sum(float v, float* warp_sums, bool with_trailing_barrier) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kTwoSumsThreads / 32; ++w) total += warp_sums[w];
  // The bug under test: without this barrier the next call's write of warp_sums may land
  // before a slower warp read this call's values (write after read). In-order execution
  // hides it; a schedule that lets some warps run far ahead does not.
  if (with_trailing_barrier) __syncthreads();
  return total;
}

__global__ void two_block_sums_kernel(const float* x, float* out, bool with_trailing_barrier) {
  __shared__ float warp_sums[kTwoSumsThreads / 32];
  const int t = static_cast<int>(threadIdx.x);
  const float v = x[t];
  out[2 * t] = block_sum(v, warp_sums, with_trailing_barrier);
  out[2 * t + 1] = block_sum(v * v, warp_sums, with_trailing_barrier);
}

__global__ void warp_broadcast_sum_kernel(const float* x, float* out, int src_lane) {
  const int lane = static_cast<int>(threadIdx.x);
  float v = x[blockIdx.x * 32 + lane];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  // Only lane 0 holds the total; any other source lane is the "wrong lane" bug.
  out[blockIdx.x * 32 + lane] = __shfl_sync(kFullMask, v, src_lane);
}

__global__ void dynamic_smem_access_kernel(const float* x, float* out, int smem_floats, int offset,
                                           bool write) {
  FASTLLM_EXTERN_SHARED(float, s);
  const int t = static_cast<int>(threadIdx.x);
  if (t < smem_floats) s[t] = x[t];
  __syncthreads();
  if (t < smem_floats) {
    if (write) {
      s[t + offset] = 1.f;
    } else {
      out[t] = s[t + offset];
    }
  }
}

__global__ void faulty_kernel(FaultKind kind, int* scratch) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % 32;
  switch (kind) {
    case FaultKind::kBarrierInBranch:
      if (t < 16) __syncthreads();
      break;
    case FaultKind::kShuffleWithExitedLanes: {
      if (lane >= 16) return;
      scratch[lane] = __shfl_xor_sync(kFullMask, lane, 1);
      break;
    }
    case FaultKind::kMismatchedCollectives:
      if (lane < 16) {
        scratch[0] = static_cast<int>(__ballot_sync(kFullMask, 1));
      } else {
        scratch[1] = __shfl_xor_sync(kFullMask, lane, 1);
      }
      break;
    case FaultKind::kBarrierVersusWarpSync:
      if (lane == 0) {
        __syncthreads();
      } else {
        __syncwarp();
      }
      break;
    case FaultKind::kSpinOnAtomic:
      while (atomicAdd(&scratch[0], 0) == 0) {
      }
      break;
    case FaultKind::kDeviceAssert:
      // scratch holds 16 ints for 64 threads: under a random schedule any thread may assert
      // first, and scratch[t] read past the buffer (AddressSanitizer found it).
      assert(scratch[t % 16] == 42);
      break;
    case FaultKind::kWildWrite:
      if (t == 3) reinterpret_cast<volatile int*>(scratch)[int64_t(1) << 40] = 1;
      break;
    case FaultKind::kStackOverflow:
      break;  // stack_overflow_kernel
    case FaultKind::kMaskWithoutCaller:
      if (lane < 2) scratch[lane] = __shfl_sync(0x1u, lane, 0);
      break;
    case FaultKind::kBadShuffleWidth:
      scratch[lane] = __shfl_xor_sync(kFullMask, lane, 1, 3);
      break;
  }
}

// A kernel of its own: the array takes its stack space at the kernel's entry.
__global__ void stack_overflow_kernel(int* scratch) {
  volatile char local[1 << 20];
  local[threadIdx.x] = 1;
  scratch[0] = local[threadIdx.x];
}

}  // namespace

cudaError_t launch_shift_add(const float* x, float* out, int n, bool with_barrier) {
  if (n < 1 || n > kMaxShiftAddThreads) return cudaErrorInvalidValue;
  FASTLLM_LAUNCH_KERNEL(shift_add_kernel, 1, n, 0, nullptr, x, out, with_barrier);
  return cudaGetLastError();
}

cudaError_t launch_two_block_sums(const float* x, float* out, bool with_trailing_barrier) {
  FASTLLM_LAUNCH_KERNEL(two_block_sums_kernel, 1, kTwoSumsThreads, 0, nullptr, x, out,
                        with_trailing_barrier);
  return cudaGetLastError();
}

cudaError_t launch_warp_broadcast_sum(const float* x, float* out, int rows, int src_lane) {
  FASTLLM_LAUNCH_KERNEL(warp_broadcast_sum_kernel, rows, 32, 0, nullptr, x, out, src_lane);
  return cudaGetLastError();
}

cudaError_t launch_dynamic_smem_access(const float* x, float* out, int threads, int smem_floats,
                                       int offset, bool write) {
  FASTLLM_LAUNCH_KERNEL(dynamic_smem_access_kernel, 1, threads, smem_floats * sizeof(float),
                        nullptr, x, out, smem_floats, offset, write);
  return cudaGetLastError();
}

cudaError_t launch_faulty(FaultKind kind, int* scratch) {
  if (kind == FaultKind::kStackOverflow) {
    FASTLLM_LAUNCH_KERNEL(stack_overflow_kernel, 1, 32, 0, nullptr, scratch);
    return cudaGetLastError();
  }
  FASTLLM_LAUNCH_KERNEL(faulty_kernel, 2, 64, 0, nullptr, kind, scratch);
  return cudaGetLastError();
}

}  // namespace emu_test
}  // namespace fastllm
