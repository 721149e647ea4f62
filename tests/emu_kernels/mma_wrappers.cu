// Test-only kernels for the wrappers of common/mma.h: one warp runs mma_m16n8k16 (operands
// loaded by the documented fragment layout, or staged in shared memory and loaded with
// ldmatrix), ldmatrix alone, and cp.async copies with commit groups. tests/test_simt_emu.py
// compares them with a plain matrix product / the documented layouts, and compiles this
// file with nvcc for sm_80 and sm_90 (zero spills), so the PTX path builds too.
// Shapes: A (16, 16), B (16, 8), C and D (16, 8); g = lane / 4, t = lane % 4.
#include "emu_test_kernels.h"

#include "common/mma.h"

namespace fastllm {
namespace emu_test {
namespace {

constexpr int kMaxLdmatrixRows = 64;
constexpr int kMaxCopyFloats = 512;

__device__ __forceinline__ uint32_t pack(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
}

// a, b: raw 16-bit elements (the element type only picks the instruction).
template <class T>
__global__ void mma_m16n8k16_kernel(const uint16_t* a, const uint16_t* b, const float* c,
                                    float* d, bool via_ldmatrix) {
  alignas(16) __shared__ uint16_t a_smem[16 * 16];
  alignas(16) __shared__ uint16_t b_smem[16 * 8];
  const int lane = static_cast<int>(threadIdx.x);
  const int g = lane / 4;
  const int t = lane % 4;
  uint32_t a_frag[4];
  uint32_t b_frag[2];
  if (via_ldmatrix) {
    for (int i = lane; i < 16 * 16; i += 32) a_smem[i] = a[i];
    for (int i = lane; i < 16 * 8; i += 32) b_smem[i] = b[i];
    __syncwarp();
    // Lanes 0-15 point at rows 0-15, column 0; lanes 16-31 at rows 0-15, column 8.
    ldmatrix_x4(a_frag, &a_smem[(lane % 16) * 16 + (lane / 16) * 8]);
    // B is row-major (k, n): the transposed 8x8 loads give the "col" fragment.
    ldmatrix_x2_trans(b_frag, &b_smem[(lane % 16) * 8]);
  } else {
    a_frag[0] = pack(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
    a_frag[1] = pack(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
    a_frag[2] = pack(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
    a_frag[3] = pack(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
    b_frag[0] = pack(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]);
    b_frag[1] = pack(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
  }
  const float c_frag[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                           c[(g + 8) * 8 + 2 * t + 1]};
  float d_frag[4];
  mma_m16n8k16<T>(d_frag, a_frag, b_frag, c_frag);
  d[g * 8 + 2 * t] = d_frag[0];
  d[g * 8 + 2 * t + 1] = d_frag[1];
  d[(g + 8) * 8 + 2 * t] = d_frag[2];
  d[(g + 8) * 8 + 2 * t + 1] = d_frag[3];
}

template <int kNum>
__device__ __forceinline__ void store_registers(const uint32_t (&r)[kNum], uint32_t* out,
                                                int lane) {
  for (int m = 0; m < kNum; ++m) out[lane * kNum + m] = r[m];
}

__global__ void ldmatrix_kernel(const uint16_t* tile, int rows, const int* row_of_lane,
                                uint32_t* out, int num, bool trans) {
  alignas(16) __shared__ uint16_t tile_smem[kMaxLdmatrixRows * 8];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < rows * 8; i += 32) tile_smem[i] = tile[i];
  __syncwarp();
  const uint16_t* row = &tile_smem[row_of_lane[lane] * 8];
  if (num == 1) {
    uint32_t r[1];
    if (trans) {
      ldmatrix_x1_trans(r, row);
    } else {
      ldmatrix_x1(r, row);
    }
    store_registers(r, out, lane);
  } else if (num == 2) {
    uint32_t r[2];
    if (trans) {
      ldmatrix_x2_trans(r, row);
    } else {
      ldmatrix_x2(r, row);
    }
    store_registers(r, out, lane);
  } else {
    uint32_t r[4];
    if (trans) {
      ldmatrix_x4_trans(r, row);
    } else {
      ldmatrix_x4(r, row);
    }
    store_registers(r, out, lane);
  }
}

__global__ void cp_async_kernel(const float* x, float* out, int n, int n_valid, int wait) {
  alignas(16) __shared__ float staged[kMaxCopyFloats];
  const int lane = static_cast<int>(threadIdx.x);
  const int chunks = n / 4;
  const int first_group_chunks = chunks / 2;
  for (int c = lane; c < first_group_chunks; c += 32) {
    cp_async_16(&staged[4 * c], &x[4 * c], 4 * c < n_valid);
  }
  cp_async_commit();
  for (int c = first_group_chunks + lane; c < chunks; c += 32) {
    cp_async_16(&staged[4 * c], &x[4 * c], 4 * c < n_valid);
  }
  cp_async_commit();
  if (wait == 1) {
    cp_async_wait<1>();
  } else if (wait == 2) {
    cp_async_wait<0>();
  } else if (wait == 3) {
    cp_async_wait_all();
  }
  __syncwarp();
  for (int i = lane; i < n; i += 32) out[i] = staged[i];
}

}  // namespace

cudaError_t launch_mma_m16n8k16(const void* a, const void* b, const float* c, float* d, bool bf16,
                                bool via_ldmatrix) {
  const auto* a16 = static_cast<const uint16_t*>(a);
  const auto* b16 = static_cast<const uint16_t*>(b);
  if (bf16) {
    FASTLLM_LAUNCH_KERNEL(mma_m16n8k16_kernel<__nv_bfloat16>, 1, 32, 0, nullptr, a16, b16, c, d,
                          via_ldmatrix);
  } else {
    FASTLLM_LAUNCH_KERNEL(mma_m16n8k16_kernel<__half>, 1, 32, 0, nullptr, a16, b16, c, d,
                          via_ldmatrix);
  }
  return cudaGetLastError();
}

cudaError_t launch_ldmatrix(const uint16_t* tile, int rows, const int* row_of_lane,
                            uint32_t* out, int num, bool trans) {
  if (rows < 1 || rows > kMaxLdmatrixRows || (num != 1 && num != 2 && num != 4)) {
    return cudaErrorInvalidValue;
  }
  FASTLLM_LAUNCH_KERNEL(ldmatrix_kernel, 1, 32, 0, nullptr, tile, rows, row_of_lane, out, num,
                        trans);
  return cudaGetLastError();
}

cudaError_t launch_cp_async(const float* x, float* out, int n, int n_valid, int wait) {
  if (n % 4 != 0 || n < 0 || n > kMaxCopyFloats) return cudaErrorInvalidValue;
  FASTLLM_LAUNCH_KERNEL(cp_async_kernel, 1, 32, 0, nullptr, x, out, n, n_valid, wait);
  return cudaGetLastError();
}

}  // namespace emu_test
}  // namespace fastllm
