// Gated-MLP activations (SwiGLU, GeGLU): the torch-free interface shared by the CPU kernels
// (gated_mlp_cpu.cpp), the CUDA kernels (gated_mlp.cu), the torch glue (gated_mlp_ops.cpp)
// and the C++ tests. Nothing here includes torch or CUDA headers.
//
// Math, per element, with g = gate, u = up, dy = the gradient of out:
//   forward   out = act(g) * u
//   backward  grad_gate = dy * u * act'(g),  grad_up = dy * act(g)
// The activations (written so that inf and NaN come out where torch's float64 math puts
// them: act(-inf) = NaN, act(+inf) = +inf, act'(+-inf) = NaN; finite gates never give NaN):
//   silu       act(g) = g * s,  s = sigmoid(z),  z = g
//   gelu_tanh  act(g) = g * (1 + tanh(z / 2)) / 2 = g * s  with the same s and
//              z = 2 k0 (g + k1 g^3),  k0 = sqrt(2 / pi),  k1 = 0.044715
//              for both:  act'(g) = s + act(g) * (1 - s) * z'(gc)
//              z' = 1 (silu), 2 k0 (1 + 3 k1 gc^2) (gelu_tanh), gc = clamp(g, -10, 10);
//              s and 1 - s from t = exp(-|z|) in [0, 1] and r = 1 / (1 + t): s = r,
//              1 - s = t r for z >= 0 and s = t r, 1 - s = r for z < 0, so neither
//              cancels, no exp overflows, and s is exactly 0 or 1 where act saturates.
//              Above g = 10, 1 - s = 0 exactly in float and double, so z'(gc) gives the
//              same 0 as z'(g); below g = -10 the term is under 1e-35. The clamp keeps g^2
//              from overflowing to inf, where 0 * inf would give NaN for a finite gate
//              whose derivative is 0 or 1.
//   gelu       act(g) = g * Phi(g),  Phi(g) = (1 + erf(g / sqrt(2))) / 2,
//              act'(g) = Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi)
// Backward recomputes act(g) from g: nothing is saved between the passes but the inputs.
// Arithmetic is in the "acc type": double for kFloat64, float otherwise; every stored value
// is rounded to `dtype` once.
//
// Glossary: rows = product of the leading dims (M), cols = the width of one half (N, e.g. the
// intermediate size 11008). Every operand is a (rows, cols) matrix of `dtype` with unit
// column stride and its own row stride (in elements), so the two halves of one (rows, 2 cols)
// tensor, gate = x[:, :cols] and up = x[:, cols:], are plain views (row stride 2 cols), and so
// are the halves of its gradient.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"

namespace fastllm {
namespace gated_mlp {

enum class Activation : int32_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// The schema's spelling of each activation (csrc/schemas.h).
constexpr const char* activation_name(Activation a) {
  switch (a) {
    case Activation::kSilu: return "silu";
    case Activation::kGelu: return "gelu";
    case Activation::kGeluTanh: return "gelu_tanh";
  }
  return "unknown activation";
}

// Calls fn(std::integral_constant<Activation, a>{}) for the runtime activation a (so that
// kernels branch on it at compile time), or invalid() for a value outside the enum; returns
// what they return.
template <class Fn, class Invalid>
auto dispatch_activation(Activation a, Fn&& fn, Invalid&& invalid) {
  switch (a) {
    case Activation::kSilu:
      return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu:
      return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
  }
  return invalid();
}

struct FwdParams {
  const void* gate = nullptr;  // (rows, cols)
  int64_t gate_row_stride = 0;
  const void* up = nullptr;    // (rows, cols)
  int64_t up_row_stride = 0;
  void* out = nullptr;         // (rows, cols)
  int64_t out_row_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  Activation activation = Activation::kSilu;
  DType dtype = DType::kFloat32;
};

struct BwdParams {
  const void* grad_out = nullptr;  // (rows, cols)
  int64_t grad_out_row_stride = 0;
  const void* gate = nullptr;      // (rows, cols)
  int64_t gate_row_stride = 0;
  const void* up = nullptr;        // (rows, cols)
  int64_t up_row_stride = 0;
  void* grad_gate = nullptr;       // (rows, cols)
  int64_t grad_gate_row_stride = 0;
  void* grad_up = nullptr;         // (rows, cols)
  int64_t grad_up_row_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  Activation activation = Activation::kSilu;
  DType dtype = DType::kFloat32;
};

// CPU kernels: OpenMP threads over contiguous ranges of rows; AVX-512 or AVX2/FMA for the
// float acc type when the CPU has it (common/cpu_features.h), a portable scalar path
// otherwise and for float64. All four dtypes. Outputs must not overlap the inputs.
void gated_mlp_fwd_cpu(const FwdParams& p);
void gated_mlp_bwd_cpu(const BwdParams& p);

}  // namespace gated_mlp
}  // namespace fastllm
