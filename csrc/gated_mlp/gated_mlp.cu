// CUDA kernels of the gated-MLP family (SwiGLU / GeGLU): forward out = act(gate) * up and
// backward (grad_gate, grad_up), each one pass over memory. Torch-free; the glue is
// gated_mlp_cuda_ops.cpp. The same source also builds for the host against the SIMT emulation
// (FASTLLM_SIMT_EMU), so it uses only what csrc/common/cuda_compat.h promises: launches through
// FASTLLM_LAUNCH_KERNEL, no shared memory, no barriers, no inline PTX.
//
// Math (gated_mlp.h), per element, in float, with g = gate, u = up, dy = the gradient of out:
//   forward   out = act(g) * u
//   backward  grad_gate = dy * u * act'(g),  grad_up = dy * act(g)  (act recomputed from g)
//   silu, gelu_tanh  act = g * s, s = sigmoid(z), z = g or 2 k0 (g + k1 g^3);
//                    act' = s + act * (1 - s) * z'(clamp(g, -10, 10)); s and 1 - s from
//                    t = exp(-|z|) and r = 1 / (1 + t) (s = r, 1 - s = t r for z >= 0, the
//                    other way round for z < 0: no cancellation, no overflow)
//   gelu             act = g * Phi(g), Phi(g) = erfc(-g / sqrt 2) / 2 (erfc keeps Phi's
//                    relative accuracy for g < 0), act' = Phi(g) + g exp(-g^2 / 2) / sqrt(2 pi)
// Under --use_fast_math expf is ex2.approx (2 ulp, underflow to 0) and a plain `/` an
// approximate division; the reciprocal of 1 + t in [1, 2] is __frcp_rn, IEEE-rounded. erfcf
// is not approximated by --use_fast_math.
//
// Variants, and why:
//   - One kernel per direction, templated on the dtype, the activation (a compile-time
//     branch: no per-element switch) and the vector width VW: 16-byte accesses (4 float, 8
//     bf16 / fp16 per thread) when every pointer is 16-byte aligned and cols and every row
//     stride are multiples of VW (checked at run time; the halves of one tensor with an even
//     number of vectors per half qualify), element-wise accesses otherwise.
//   - Grid: x over column tiles of kThreads * VW elements, y over rows; a block loops over
//     the rows y, y + gridDim.y, ... (gridDim.y <= 65535), so any row count launches and the
//     per-row pointers need no division. Element-wise and memory-bound: no shared memory, a
//     handful of registers, no spills.
//
// Glossary: rows = M, cols = N (one half's width), T = storage dtype (float, __nv_bfloat16,
// __half), VW = vector width in elements.
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "common/cuda_compat.h"
#include "common/cuda_utils.cuh"
#include "gated_mlp/gated_mlp_cuda.h"

namespace fastllm {
namespace gated_mlp {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

constexpr float kGeluTanhK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluTanhK1 = 0.044715f;
constexpr float kGeluTanhClamp = 10.0f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;  // 1 / sqrt(2 pi)
constexpr float kInvSqrt2 = 0.7071067811865476f;

// z of the sigmoid-gated activations.
template <Activation A>
__device__ __forceinline__ float gate_arg(float g) {
  if constexpr (A == Activation::kSilu) {
    return g;
  } else {
    return 2.f * kGeluTanhK0 * (g + kGeluTanhK1 * (g * g * g));
  }
}

// s = sigmoid(z) and 1 - s (header comment).
__device__ __forceinline__ void sigmoid(float z, float& s, float& one_minus_s) {
  const float t = expf(-fabsf(z));
  const float r = __frcp_rn(1.f + t);
  s = z < 0.f ? t * r : r;
  one_minus_s = z < 0.f ? r : t * r;
}

template <Activation A>
__device__ __forceinline__ float act_of(float g) {
  if constexpr (A == Activation::kGelu) {
    return g * (0.5f * erfcf(-g * kInvSqrt2));
  } else {
    float s, one_minus_s;
    sigmoid(gate_arg<A>(g), s, one_minus_s);
    return g * s;
  }
}

template <Activation A>
__device__ __forceinline__ void act_and_grad(float g, float& act, float& grad) {
  if constexpr (A == Activation::kGelu) {
    const float cdf = 0.5f * erfcf(-g * kInvSqrt2);
    act = g * cdf;
    grad = fmaf(g, expf(-0.5f * g * g) * kInvSqrt2Pi, cdf);
  } else {
    float s, one_minus_s;
    sigmoid(gate_arg<A>(g), s, one_minus_s);
    act = g * s;
    float dz = 1.f;
    if constexpr (A == Activation::kGeluTanh) {
      const float gc = fminf(kGeluTanhClamp, fmaxf(-kGeluTanhClamp, g));
      dz = 2.f * kGeluTanhK0 * fmaf(3.f * kGeluTanhK1, gc * gc, 1.f);
    }
    grad = fmaf(act * one_minus_s, dz, s);
  }
}

// The VW columns of this thread: the first one, or -1 past the row's end.
template <int VW>
__device__ __forceinline__ int64_t first_col(int64_t cols) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VW;
  return col < cols ? col : -1;
}

template <class T, Activation A, int VW>
__global__ void __launch_bounds__(kThreads)
    gated_mlp_fwd_kernel(const FwdParams p) {
  const int64_t col = first_col<VW>(p.cols);
  if (col < 0) return;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    float g[VW], u[VW], out[VW];
    load_floats<VW>(static_cast<const T*>(p.gate) + row * p.gate_row_stride + col, g);
    load_floats<VW>(static_cast<const T*>(p.up) + row * p.up_row_stride + col, u);
    FASTLLM_UNROLL
    for (int i = 0; i < VW; ++i) out[i] = act_of<A>(g[i]) * u[i];
    store_floats<VW>(static_cast<T*>(p.out) + row * p.out_row_stride + col, out);
  }
}

template <class T, Activation A, int VW>
__global__ void __launch_bounds__(kThreads)
    gated_mlp_bwd_kernel(const BwdParams p) {
  const int64_t col = first_col<VW>(p.cols);
  if (col < 0) return;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    float dy[VW], g[VW], u[VW], grad_gate[VW], grad_up[VW];
    load_floats<VW>(static_cast<const T*>(p.grad_out) + row * p.grad_out_row_stride + col, dy);
    load_floats<VW>(static_cast<const T*>(p.gate) + row * p.gate_row_stride + col, g);
    load_floats<VW>(static_cast<const T*>(p.up) + row * p.up_row_stride + col, u);
    FASTLLM_UNROLL
    for (int i = 0; i < VW; ++i) {
      float act, grad;
      act_and_grad<A>(g[i], act, grad);
      grad_gate[i] = dy[i] * u[i] * grad;
      grad_up[i] = dy[i] * act;
    }
    store_floats<VW>(static_cast<T*>(p.grad_gate) + row * p.grad_gate_row_stride + col, grad_gate);
    store_floats<VW>(static_cast<T*>(p.grad_up) + row * p.grad_up_row_stride + col, grad_up);
  }
}

// ---- launchers --------------------------------------------------------------------------

bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every (pointer, row stride) pair allows VW-element 16-byte accesses at cols.
template <int VW>
bool vectorizable(int64_t cols, std::initializer_list<std::pair<const void*, int64_t>> operands) {
  if (cols % VW != 0) return false;
  for (const auto& [ptr, stride] : operands) {
    if (!aligned_16(ptr) || stride % VW != 0) return false;
  }
  return true;
}

// One launch of kernels' vectorised or element-wise variant over the (rows, cols) problem.
template <class Params, class Kernels>
cudaError_t launch(const Params& p, bool vector, cudaStream_t stream, Kernels kernels) {
  const int64_t vw = vector ? Kernels::kVectorWidth : 1;
  const int64_t blocks_x = ceil_div(ceil_div(p.cols, vw), kThreads);
  if (blocks_x > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks_x),
                  static_cast<unsigned>(p.rows < kMaxGridY ? p.rows : kMaxGridY));
  const auto kernel = vector ? kernels.vector() : kernels.scalar();
  FASTLLM_LAUNCH_KERNEL(kernel, grid, kThreads, 0, stream, p);
  return cudaGetLastError();
}

// The kernels of one (T, A): the vectorised and the element-wise variant.
template <class T, Activation A>
struct FwdKernels {
  static constexpr int kVectorWidth = kMaxVecWidth<T>;
  auto vector() const { return gated_mlp_fwd_kernel<T, A, kVectorWidth>; }
  auto scalar() const { return gated_mlp_fwd_kernel<T, A, 1>; }
};
template <class T, Activation A>
struct BwdKernels {
  static constexpr int kVectorWidth = kMaxVecWidth<T>;
  auto vector() const { return gated_mlp_bwd_kernel<T, A, kVectorWidth>; }
  auto scalar() const { return gated_mlp_bwd_kernel<T, A, 1>; }
};

}  // namespace

cudaError_t launch_gated_mlp_fwd_cuda(const FwdParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  return dispatch_cuda_dtype(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const bool vector = vectorizable<kMaxVecWidth<T>>(
        p.cols, {{p.gate, p.gate_row_stride}, {p.up, p.up_row_stride}, {p.out, p.out_row_stride}});
    return dispatch_activation(
        p.activation,
        [&](auto act) { return launch(p, vector, stream, FwdKernels<T, decltype(act)::value>{}); },
        [] { return cudaErrorInvalidValue; });
  });
}

cudaError_t launch_gated_mlp_bwd_cuda(const BwdParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  return dispatch_cuda_dtype(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const bool vector = vectorizable<kMaxVecWidth<T>>(
        p.cols, {{p.grad_out, p.grad_out_row_stride}, {p.gate, p.gate_row_stride},
                 {p.up, p.up_row_stride}, {p.grad_gate, p.grad_gate_row_stride},
                 {p.grad_up, p.grad_up_row_stride}});
    return dispatch_activation(
        p.activation,
        [&](auto act) { return launch(p, vector, stream, BwdKernels<T, decltype(act)::value>{}); },
        [] { return cudaErrorInvalidValue; });
  });
}

}  // namespace gated_mlp
}  // namespace fastllm
