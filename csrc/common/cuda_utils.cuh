// Device helpers every CUDA kernel family shares (norm.cu, cross_entropy.cu, attention's
// csrc/attention/cuda/): element conversion, 16-byte vector packs, warp and block sums, the
// unroll macros, and the host-side dtype switch of the launchers. Include it after
// common/cuda_compat.h's promise: it uses only what both nvcc and the host build against the
// SIMT emulation (FASTLLM_SIMT_EMU, common/simt_emu.h) provide, and no torch header.
//
//   FASTLLM_UNROLL / FASTLLM_NO_UNROLL   `#pragma unroll` / `unroll 1` under nvcc's device
//                                        pass, nothing elsewhere (the host compiler warns)
//   kWarpSize, kFullWarpMask, kInf       the warp and the float infinity every kernel names
//   to_float(x), from_float<T>(f)        T = float, __nv_bfloat16, __half; rounding to
//                                        nearest even
//   Vec<T, N>                            N elements of T accessed as one aligned vector
//   kMaxVecWidth<T>                      elements of T in one 16-byte access
//   load_floats / store_floats           N consecutive elements <-> floats, in 16-byte
//                                        accesses at most
//   warp_allreduce_sum(v)                butterfly sum over the 32 lanes, same bits in all
//   block_allreduce_sum(v, smem, warps)  sum over the block's warps, same bits in all threads
//   dispatch_cuda_dtype(dtype, launch)   launch(TypeTag<T>{}) for T = float / bf16 / fp16
//   ceil_div(a, b)                       host-side grid arithmetic
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cuda_compat.h"
#include "common/dtype.h"

#if defined(__CUDA_ARCH__)
#define FASTLLM_UNROLL _Pragma("unroll")
#define FASTLLM_NO_UNROLL _Pragma("unroll 1")
#else
#define FASTLLM_UNROLL
#define FASTLLM_NO_UNROLL
#endif

namespace fastllm {

template <>
struct DTypeOf<__nv_bfloat16> : std::integral_constant<DType, DType::kBFloat16> {};
template <>
struct DTypeOf<__half> : std::integral_constant<DType, DType::kFloat16> {};

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- element access ------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}

template <class T>
constexpr int kMaxVecWidth = 16 / static_cast<int>(sizeof(T));

template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads N consecutive elements as floats, in accesses of at most 16 bytes; p must be
// aligned to the access size (min(N, 16 / sizeof(T)) elements).
template <int N, class T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  constexpr int kChunk = N < kMaxVecWidth<T> ? N : kMaxVecWidth<T>;
  static_assert(N % kChunk == 0, "N must be a multiple of the access width");
  FASTLLM_UNROLL
  for (int c = 0; c < N; c += kChunk) {
    const Vec<T, kChunk> v = *reinterpret_cast<const Vec<T, kChunk>*>(p + c);
    FASTLLM_UNROLL
    for (int i = 0; i < kChunk; ++i) out[c + i] = to_float(v.v[i]);
  }
}

// Stores N floats as consecutive elements (round to nearest even), same alignment rule.
template <int N, class T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  constexpr int kChunk = N < kMaxVecWidth<T> ? N : kMaxVecWidth<T>;
  static_assert(N % kChunk == 0, "N must be a multiple of the access width");
  FASTLLM_UNROLL
  for (int c = 0; c < N; c += kChunk) {
    Vec<T, kChunk> v;
    FASTLLM_UNROLL
    for (int i = 0; i < kChunk; ++i) v.v[i] = from_float<T>(in[c + i]);
    *reinterpret_cast<Vec<T, kChunk>*>(p + c) = v;
  }
}

// ---- reductions ----------------------------------------------------------------------

// Butterfly sum: every lane ends with the same bits (float addition is commutative).
// All 32 lanes must call it.
__device__ __forceinline__ float warp_allreduce_sum(float v) {
  FASTLLM_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

// Sum of v over the first `warps` warps of the block: warp sums, then every thread adds
// them in warp order, so all threads get the same bits. Every thread of those warps must
// call it (it holds a barrier). smem: `warps` floats, which the caller must not reuse
// before another barrier.
__device__ __forceinline__ float block_allreduce_sum(float v, float* smem, int warps) {
  v = warp_allreduce_sum(v);
  if (threadIdx.x % kWarpSize == 0) smem[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += smem[w];
  return total;
}

// ---- host side -----------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The dtype switch of a launcher: launch(TypeTag<T>{}) with T the CUDA storage type of
// `dtype` (float, __nv_bfloat16, __half). float64 has no CUDA kernels (the glue refuses it
// with a message); here it is cudaErrorInvalidValue.
template <class Launch>
cudaError_t dispatch_cuda_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(TypeTag<float>{});
    case DType::kBFloat16: return launch(TypeTag<__nv_bfloat16>{});
    case DType::kFloat16: return launch(TypeTag<__half>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastllm
