// Test-only kernels that run each warp shuffle and vote once per lane, so that
// tests/test_simt_emu.py can compare the emulation with a plain exchange written from
// CUDA's documentation. Shape: threads = threads of the one block (any number; the last
// warp may be partial).
#include "emu_test_kernels.h"

namespace fastllm {
namespace emu_test {
namespace {

constexpr int kNotInMask = -7;

__global__ void warp_shuffle_kernel(const int* values, const int* lane_args, int* out, int mode,
                                    int width, unsigned mask) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % 32;
  if (((mask >> lane) & 1u) == 0) {
    out[t] = kNotInMask;
    return;
  }
  const int v = values[t];
  const int arg = lane_args[t];
  int r = 0;
  switch (mode) {
    case 0: r = __shfl_sync(mask, v, arg, width); break;
    case 1: r = __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width); break;
    case 2: r = __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width); break;
    default: r = __shfl_xor_sync(mask, v, arg, width); break;
  }
  out[t] = r;
}

__global__ void warp_vote_kernel(const int* predicates, unsigned* out, unsigned mask) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % 32;
  unsigned* o = out + 5 * t;
  if (((mask >> lane) & 1u) == 0) {
    for (int i = 0; i < 5; ++i) o[i] = 0;
    return;
  }
  const int p = predicates[t];
  o[0] = __ballot_sync(mask, p);
  o[1] = static_cast<unsigned>(__any_sync(mask, p));
  o[2] = static_cast<unsigned>(__all_sync(mask, p));
  o[3] = __reduce_add_sync(mask, static_cast<unsigned>(p));
  o[4] = __activemask();
}

}  // namespace

cudaError_t launch_warp_shuffle(const int* values, const int* lane_args, int* out, int threads,
                                int mode, int width, unsigned mask) {
  FASTLLM_LAUNCH_KERNEL(warp_shuffle_kernel, 1, threads, 0, nullptr, values, lane_args, out, mode,
                        width, mask);
  return cudaGetLastError();
}

cudaError_t launch_warp_vote(const int* predicates, unsigned* out, int threads, unsigned mask) {
  FASTLLM_LAUNCH_KERNEL(warp_vote_kernel, 1, threads, 0, nullptr, predicates, out, mask);
  return cudaGetLastError();
}

}  // namespace emu_test
}  // namespace fastllm
