// fastllm's thin wrappers of the tensor-core and asynchronous-copy instructions (sm_80+).
// CUDA kernels use these instead of writing the PTX themselves, so that the same kernel
// also runs in the host build: under nvcc each wrapper is one inline-PTX instruction; under
// FASTLLM_SIMT_EMU it follows the PTX ISA's fragment layouts, exchanging the operands
// within the (emulated) warp. tests/test_simt_emu.py checks each wrapper against a plain
// matrix product / the documented layout.
//
//   mma_m16n8k16<T>(d, a, b, c)   D (16x8, f32) = A (16x16, T) * B (16x8, T) + C (16x8, f32),
//                                  T = __half or __nv_bfloat16  (mma.sync.aligned.m16n8k16
//                                  .row.col.f32.{f16,bf16}.{f16,bf16}.f32)
//   ldmatrix_x{1,2,4}[_trans](r, smem_row)   1, 2 or 4 8x8 matrices of 16-bit elements from
//                                  shared memory (ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans]
//                                  .shared.b16)
//   cp_async_16(smem, gmem, valid) 16-byte global -> shared copy that completes later
//                                  (cp.async.cg.shared.global; valid = false writes zeros)
//   cp_async_commit()              closes the group of copies issued since the last commit
//   cp_async_wait<N>()             waits until at most N committed groups are in flight
//   cp_async_wait_all()            waits for every copy issued so far
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"; lane = %laneid, g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group")).
// A 32-bit register holds two 16-bit elements, the lower-indexed one in the low half.
//   A (16x16, row-major): a[0] = A[g][2t, 2t+1]       a[1] = A[g+8][2t, 2t+1]
//                         a[2] = A[g][2t+8, 2t+9]     a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, "col"):      b[0] = B[2t, 2t+1][g]       b[1] = B[2t+8, 2t+9][g]
//   C, D (16x8, f32):     c[0], c[1] = C[g][2t, 2t+1] c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix: lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m (16 contiguous,
// 16-byte aligned bytes each; lanes of unused matrices are ignored). Register r[m] of lane
// l receives matrix m's elements [l/4][2(l%4), 2(l%4)+1]; with .trans, elements
// [2(l%4)][l/4] and [2(l%4)+1][l/4] (the fragment of the transposed matrix). ldmatrix_x4 of
// a 16x16 row-major tile (lanes 0-15: rows 0-15 at column 0, lanes 16-31: rows 0-15 at
// column 8) yields exactly mma's A fragment.
//
// All lanes of the warp must execute mma and ldmatrix together (.sync.aligned).
#pragma once

#include <cstdint>

#include "common/cuda_compat.h"

namespace fastllm {

#if !defined(FASTLLM_SIMT_EMU)

template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(sizeof(T) == 0, "mma_m16n8k16<T>: T must be __half or __nv_bfloat16");
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2],
                                                     const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4],
                                                            const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2],
                                                            const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(shared_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(shared_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row)));
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src,
                                            bool valid = true) {
  // src-size 0 reads nothing and zero-fills the 16 destination bytes.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem_dst)),
               "l"(gmem_src), "r"(valid ? 16 : 0));
}
// The "memory" clobbers keep the compiler from moving shared-memory accesses across the
// commit / wait points.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

#else  // FASTLLM_SIMT_EMU: the same instructions as warp exchanges

namespace mma_emu {

constexpr unsigned kFullWarp = 0xffffffffu;

// The .sync.aligned instructions need all 32 lanes; a partial last warp cannot run them.
inline void require_full_warp(const char* op) {
  if (simt::detail::existing_lanes() != kFullWarp) {
    simt::detail::device_fault(std::string(op) +
                               " needs all 32 lanes of the warp, but the block's last warp is "
                               "partial (blockDim is not a multiple of 32)");
  }
}

template <class T>
inline float element_to_float(uint16_t bits);
template <>
inline float element_to_float<__half>(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}
template <>
inline float element_to_float<__nv_bfloat16>(uint16_t bits) {
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return __bfloat162float(__nv_bfloat16(raw));
}

// Element `half` (0: low, 1: high) of a packed register.
inline uint16_t half_of(uint32_t reg, int half) {
  return static_cast<uint16_t>(reg >> (16 * half));
}

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

// Gathers A, B, C from the 32 lanes' fragments (layout at the top of this file), computes
// D = A * B + C with float accumulation (products of 16-bit floats are exact in float), and
// scatters D in C's layout.
template <class T>
void mma_m16n8k16_combine(const simt::WarpExchange& ex) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaOperands& in = *static_cast<const MmaOperands*>(ex.in[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      a[g][2 * t + e] = element_to_float<T>(half_of(in.a[0], e));
      a[g + 8][2 * t + e] = element_to_float<T>(half_of(in.a[1], e));
      a[g][2 * t + 8 + e] = element_to_float<T>(half_of(in.a[2], e));
      a[g + 8][2 * t + 8 + e] = element_to_float<T>(half_of(in.a[3], e));
      b[2 * t + e][g] = element_to_float<T>(half_of(in.b[0], e));
      b[2 * t + 8 + e][g] = element_to_float<T>(half_of(in.b[1], e));
      c[g][2 * t + e] = in.c[e];
      c[g + 8][2 * t + e] = in.c[2 + e];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    float* d = static_cast<float*>(ex.out[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2);
      const int col = 2 * t + i % 2;
      float acc = c[row][col];
      for (int k = 0; k < 16; ++k) acc = std::fma(a[row][k], b[k][col], acc);
      d[i] = acc;
    }
  }
}

template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "mma_m16n8k16<T>: T must be __half or __nv_bfloat16");
  constexpr const char* kOp = std::is_same<T, __half>::value ? "mma_m16n8k16<__half>"
                                                              : "mma_m16n8k16<__nv_bfloat16>";
  require_full_warp(kOp);
  const MmaOperands in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  float out[4];
  simt::detail::warp_exchange(kOp, kFullWarp, &in, out, mma_m16n8k16_combine<T>);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

template <int kNum, bool kTrans>
void ldmatrix_combine(const simt::WarpExchange& ex) {
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* r = static_cast<uint32_t*>(ex.out[lane]);
    for (int m = 0; m < kNum; ++m) {
      // Element [row][col] of matrix m lives in the row whose address lane 8m + row gave.
      auto element = [&](int row, int col) {
        const void* row_address = *static_cast<const void* const*>(ex.in[8 * m + row]);
        return static_cast<uint32_t>(static_cast<const uint16_t*>(row_address)[col]);
      };
      const int q = lane / 4, p = 2 * (lane % 4);
      r[m] = kTrans ? element(p, q) | element(p + 1, q) << 16
                    : element(q, p) | element(q, p + 1) << 16;
    }
  }
}

template <int kNum, bool kTrans>
inline void ldmatrix(uint32_t (&r)[kNum], const void* smem_row) {
  constexpr const char* kNames[2][5] = {
      {"", "ldmatrix_x1", "ldmatrix_x2", "", "ldmatrix_x4"},
      {"", "ldmatrix_x1_trans", "ldmatrix_x2_trans", "", "ldmatrix_x4_trans"}};
  const char* op = kNames[kTrans][kNum];
  require_full_warp(op);
  const unsigned lane = simt::detail::lane_id();
  if (lane < 8u * kNum && reinterpret_cast<uintptr_t>(smem_row) % 16 != 0) {
    simt::detail::device_fault(std::string(op) + ": the row address of every lane must be 16-byte "
                               "aligned");
  }
  uint32_t out[kNum];
  simt::detail::warp_exchange(op, kFullWarp, &smem_row, out, ldmatrix_combine<kNum, kTrans>);
  for (int m = 0; m < kNum; ++m) r[m] = out[m];
}

}  // namespace mma_emu

template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4]) {
  mma_emu::mma_m16n8k16<T>(d, a, b, c);
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  mma_emu::ldmatrix<1, false>(r, smem_row);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  mma_emu::ldmatrix<2, false>(r, smem_row);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  mma_emu::ldmatrix<4, false>(r, smem_row);
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
  mma_emu::ldmatrix<1, true>(r, smem_row);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  mma_emu::ldmatrix<2, true>(r, smem_row);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  mma_emu::ldmatrix<4, true>(r, smem_row);
}

// The copy's destination holds 0xFF bytes until a wait of the issuing thread covers it
// (reading it earlier is the bug this exposes; copies never waited for never land); the
// source is read when the copy is issued.
inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid = true) {
  simt::detail::async_copy(smem_dst, gmem_src, 16, /*zero_fill=*/!valid);
}
inline void cp_async_commit() { simt::detail::async_copy_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait<N>: N must be >= 0");
  simt::detail::async_copy_wait(N);
}
inline void cp_async_wait_all() { simt::detail::async_copy_wait(-1); }

#endif  // FASTLLM_SIMT_EMU

}  // namespace fastllm
