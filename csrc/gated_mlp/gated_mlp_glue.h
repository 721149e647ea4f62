// Torch glue of the gated-MLP family, shared by its devices (gated_mlp_ops.cpp for the CPU,
// gated_mlp_cuda_ops.cpp for CUDA and its SIMT emulation): argument checks whose messages name
// the argument, allocation of the outputs, the filling of gated_mlp.h's FwdParams /
// BwdParams, and the schema-shaped entry points of fastllm::gated_mlp_fwd / _bwd
// (csrc/schemas.h), templates over a device's Kernels (the pattern of common/torch_glue.h).
// The kernels are called only with rows > 0 and cols > 0 (empty problems are handled here).
//
// Shapes: two-tensor form, gate and up (..., N), out (..., N); one-tensor form (up = None),
// gate (..., 2N) holding the gate half then the up half (x[..., :N], x[..., N:], the chunk
// order of Hugging Face's and Liger-Kernel's fused gate_up projections), out (..., N), and
// backward returns grad_gate (..., 2N) with both halves' gradients and an empty grad_up.
// Inputs may have any strides: (rows, cols) views with unit column stride are passed to the
// kernels as they are (the halves of one tensor included), other layouts are copied once.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/torch_glue.h"
#include "gated_mlp/gated_mlp.h"

namespace fastllm {
namespace gated_mlp {

inline Activation parse_activation(const char* op, c10::string_view activation) {
  for (Activation a : {Activation::kSilu, Activation::kGelu, Activation::kGeluTanh}) {
    if (activation == activation_name(a)) return a;
  }
  TORCH_CHECK(false, op, ": activation must be 'silu', 'gelu' or 'gelu_tanh', got '",
              std::string(activation), "'");
  return Activation::kSilu;
}

// gate / up as (rows, cols) views, checked.
struct Halves {
  const void* gate = nullptr;
  const void* up = nullptr;
  int64_t gate_row_stride = 0;
  int64_t up_row_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<int64_t> out_shape;  // (..., N)
  DType dtype = DType::kFloat32;
  at::Tensor keep_gate, keep_up;    // the viewed (or copied) storage, alive for the call
};

inline Halves check_halves(const char* op, const at::Tensor& gate,
                           const c10::optional<at::Tensor>& up) {
  Halves h;
  h.dtype = to_fastllm_dtype(gate.scalar_type(), op, "gate");
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dimension, got a scalar");
  const bool packed = !up.has_value() || !up->defined();
  const int64_t last = gate.size(-1);
  if (packed) {
    TORCH_CHECK(last % 2 == 0, op, ": gate must have an even last dimension when up is None "
                "(its first half is the gate, its second half the up projection), got shape ",
                shape_str(gate.sizes()));
    h.cols = last / 2;
  } else {
    check_like(op, gate, "gate", *up, "up");
    h.cols = last;
  }
  h.out_shape = gate.sizes().vec();
  h.out_shape.back() = h.cols;
  h.rows = h.cols == 0 ? 0 : gate.numel() / last;
  if (h.rows == 0 || h.cols == 0) return h;
  if (packed) {
    h.keep_gate = as_rows(gate, 2 * h.cols);
    h.gate = h.keep_gate.data_ptr();
    h.up = static_cast<const char*>(h.gate) + h.cols * gate.element_size();
    h.gate_row_stride = h.up_row_stride = row_stride(h.keep_gate);
  } else {
    h.keep_gate = as_rows(gate, h.cols);
    h.keep_up = as_rows(*up, h.cols);
    h.gate = h.keep_gate.data_ptr();
    h.up = h.keep_up.data_ptr();
    h.gate_row_stride = row_stride(h.keep_gate);
    h.up_row_stride = row_stride(h.keep_up);
  }
  return h;
}

template <class Kernels>
at::Tensor gated_mlp_fwd(const at::Tensor& gate, const c10::optional<at::Tensor>& up,
                         c10::string_view activation) {
  const char* op = "gated_mlp_fwd";
  const Activation act = parse_activation(op, activation);
  Halves h = check_halves(op, gate, up);
  at::Tensor out = empty_output(op, h.out_shape, gate.options());
  if (h.rows == 0 || h.cols == 0) return out;
  Kernels::check_dtype(op, "gate", h.dtype);
  FwdParams p;
  p.gate = h.gate;
  p.gate_row_stride = h.gate_row_stride;
  p.up = h.up;
  p.up_row_stride = h.up_row_stride;
  p.out = out.data_ptr();
  p.out_row_stride = h.cols;
  p.rows = h.rows;
  p.cols = h.cols;
  p.activation = act;
  p.dtype = h.dtype;
  Kernels::fwd(op, p, gate);
  return out;
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> gated_mlp_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                                 const c10::optional<at::Tensor>& up,
                                                 c10::string_view activation) {
  const char* op = "gated_mlp_bwd";
  const Activation act = parse_activation(op, activation);
  Halves h = check_halves(op, gate, up);
  TORCH_CHECK(grad_out.sizes().equals(h.out_shape), op, ": grad_out must have the shape of out ",
              shape_str(h.out_shape), ", got ", shape_str(grad_out.sizes()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == gate.scalar_type(), op,
                   ": grad_out must have the dtype of gate ", gate.scalar_type(), ", got ",
                   grad_out.scalar_type());
  check_same_device(gate, "gate", grad_out, "grad_out", op);
  const bool packed = !up.has_value() || !up->defined();
  at::Tensor grad_gate = empty_contiguous_like(op, gate);
  at::Tensor grad_up =
      packed ? at::empty({0}, gate.options()) : empty_contiguous_like(op, *up);
  if (h.rows == 0 || h.cols == 0) return {grad_gate, grad_up};
  Kernels::check_dtype(op, "gate", h.dtype);
  const at::Tensor dy = as_rows(grad_out, h.cols);
  BwdParams p;
  p.grad_out = dy.data_ptr();
  p.grad_out_row_stride = row_stride(dy);
  p.gate = h.gate;
  p.gate_row_stride = h.gate_row_stride;
  p.up = h.up;
  p.up_row_stride = h.up_row_stride;
  p.grad_gate = grad_gate.data_ptr();
  if (packed) {
    p.grad_up = static_cast<char*>(p.grad_gate) + h.cols * gate.element_size();
    p.grad_gate_row_stride = p.grad_up_row_stride = 2 * h.cols;
  } else {
    p.grad_up = grad_up.data_ptr();
    p.grad_gate_row_stride = p.grad_up_row_stride = h.cols;
  }
  p.rows = h.rows;
  p.cols = h.cols;
  p.activation = act;
  p.dtype = h.dtype;
  Kernels::bwd(op, p, gate);
  return {grad_gate, grad_up};
}

template <class Kernels>
void register_gated_mlp_ops(torch::Library& m) {
  m.impl("gated_mlp_fwd", &gated_mlp_fwd<Kernels>);
  m.impl("gated_mlp_bwd", &gated_mlp_bwd<Kernels>);
}

}  // namespace gated_mlp
}  // namespace fastllm
