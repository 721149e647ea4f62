// Launchers of the test-only CUDA kernels in tests/emu_kernels/ (torch-free, like every
// fastllm launcher). They run in the SIMT emulation build (fastllm_emu_ext, see
// fastllm/_emu.py), where emu_test_ops.cpp exposes them as torch.ops.fastllm_emu_test.*,
// and they compile under nvcc too (tests/test_simt_emu.py checks mma_wrappers.cu).
//
// Each launcher returns cudaGetLastError() after its launch.
#pragma once

#include <cstdint>

#include "common/cuda_compat.h"

namespace fastllm {
namespace emu_test {

// ---- broken_kernels.cu: faults the emulation must catch --------------------------------

// out[i] = x[i] + x[i - 1] (x[-1] = 0) through a static shared array, one block of n
// threads. Without the barrier a thread may read its neighbour's slot before it is written.
cudaError_t launch_shift_add(const float* x, float* out, int n, bool with_barrier);

// One block of 128 threads computes sum(x) and then sum(x * x) (x: 128 floats) with the
// same shared buffer of per-warp partial sums; every thread stores both totals at
// out[2t], out[2t + 1]. Without the trailing barrier a warp may overwrite its partial sum
// for the second reduction before another warp has read the first one.
cudaError_t launch_two_block_sums(const float* x, float* out, bool with_trailing_barrier);

// rows warps (one per block) sum their 32 values with __shfl_down_sync, then broadcast the
// total from src_lane: only src_lane = 0 holds the total.
cudaError_t launch_warp_broadcast_sum(const float* x, float* out, int rows, int src_lane);

// One block of `threads` threads with smem_floats floats of dynamic shared memory: thread t
// stores x[t] at s[t] (t < smem_floats), then reads (or, with write, stores 1 at)
// s[t + offset] for t < smem_floats and writes what it read to out[t].
cudaError_t launch_dynamic_smem_access(const float* x, float* out, int threads, int smem_floats,
                                       int offset, bool write);

// Kernels that fail in one way each (see FaultKind); `scratch` is 16 zeroed ints.
enum class FaultKind : int {
  kBarrierInBranch = 0,       // __syncthreads() reached by half of the block
  kShuffleWithExitedLanes,    // full-mask shuffle after half of the warp returned
  kMismatchedCollectives,     // half of the warp in __ballot_sync, half in __shfl_xor_sync
  kBarrierVersusWarpSync,     // lane 0 at __syncthreads(), lanes 1-31 in __syncwarp()
  kSpinOnAtomic,              // waits for a flag nobody sets
  kDeviceAssert,              // assert(false)
  kWildWrite,                 // stores 4 TiB past an argument
  kStackOverflow,             // a 1 MiB local array
  kMaskWithoutCaller,         // lane 1 calls __shfl_sync with mask 0x1
  kBadShuffleWidth,           // width 3
};
cudaError_t launch_faulty(FaultKind kind, int* scratch);

// ---- warp_intrinsics.cu: shuffles and votes against a plain exchange ------------------

// One block of `threads` threads; the lanes in `mask` (of every warp) execute
// out[t] = shuffle(mask, values[t], lane_args[t], width) with mode 0: __shfl_sync, 1:
// __shfl_up_sync, 2: __shfl_down_sync, 3: __shfl_xor_sync; the other lanes store -7.
cudaError_t launch_warp_shuffle(const int* values, const int* lane_args, int* out, int threads,
                                int mode, int width, unsigned mask);

// out[t] = {__ballot_sync, __any_sync, __all_sync, __reduce_add_sync, __activemask()} of
// predicates[t] for the lanes in mask; other lanes store zeros.
cudaError_t launch_warp_vote(const int* predicates, unsigned* out, int threads, unsigned mask);

// ---- mma_wrappers.cu: common/mma.h ----------------------------------------------------

// d (16x8 f32) = a (16x16) * b (16x8) + c with one warp: a and b are __half or
// __nv_bfloat16 (bf16 = true), row-major. via_ldmatrix = false loads the fragments from
// global memory by the documented layout; true stages a and b in shared memory and loads
// them with ldmatrix_x4 (a) and ldmatrix_x2_trans (b).
cudaError_t launch_mma_m16n8k16(const void* a, const void* b, const float* c, float* d, bool bf16,
                                bool via_ldmatrix);

// One warp: lane l passes the address of tile row row_of_lane[l] (tile: (rows, 8) 16-bit
// elements, staged in shared memory) to ldmatrix_x{num}[_trans]; out[l * num + m] = r[m].
cudaError_t launch_ldmatrix(const uint16_t* tile, int rows, const int* row_of_lane,
                            uint32_t* out, int num, bool trans);

// One warp copies n floats (n % 4 == 0, n <= 512) to shared memory with cp_async_16, in
// two commit groups (first and second half of the 16-byte chunks; chunks past n_valid
// are zero-filled), then reads shared memory back into out after:
//   wait = 0: no wait at all (a bug), 1: cp_async_wait<1>() (first group only),
//   2: cp_async_wait<0>(), 3: cp_async_wait_all().
cudaError_t launch_cp_async(const float* x, float* out, int n, int n_valid, int wait);

}  // namespace emu_test
}  // namespace fastllm
