// Torch glue of the norm family, shared by its devices (norm_ops.cpp for the CPU,
// norm_cuda_ops.cpp for CUDA and its SIMT emulation): argument checks whose messages name
// the argument, allocation of the outputs, the filling of norm.h's FwdParams / BwdParams,
// and the schema-shaped entry points of the fastllm::*norm* ops (csrc/schemas.h), each a
// template over a device's Kernels (the pattern of common/torch_glue.h):
//
//   struct Kernels {
//     static void check_dtype(const char* op, const char* arg, DType dtype);
//     static void fwd(const char* op, FwdParams& p, const at::Tensor& input);
//     static void bwd(const char* op, BwdParams& p, const at::Tensor& input);
//   };
//
// They are called only with rows > 0 and cols > 0: an empty problem (no row, or rows of no
// element, e.g. input (4, 0)) is answered here, as torch's norms answer it: an empty output,
// mean 0 and rstd NaN (1 / sqrt(0 / 0 + eps)) per row, zero parameter gradients.
// Shapes: input (..., *normalized_shape), rows = product of the leading dims, cols = product
// of normalized_shape; weight / bias normalized_shape; mean / rstd the leading dims, in the
// acc dtype (float32; float64 for float64 input).
//
// The checks are fastllm/ops/norm.py's, in the same order and with the same exception
// types (TypeError for a dtype, ValueError for a shape or value), so that every backend
// refuses the same arguments the same way; the shared check_same_device / check_like
// (common/torch_glue.h) raise RuntimeError for a device or a shape-of-input mismatch.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "common/torch_glue.h"
#include "norm/norm.h"

namespace fastllm {
namespace norm {

struct Checked {
  at::Tensor x2d;         // (rows, cols), unit column stride; undefined when empty()
  at::Tensor weight;      // (cols,) acc dtype contiguous, or undefined
  at::Tensor bias;        // (cols,) acc dtype contiguous, or undefined
  int64_t rows = 0;       // product of input's leading dims
  int64_t cols = 0;       // product of normalized_shape
  DType dtype = DType::kFloat32;

  bool empty() const { return rows == 0 || cols == 0; }
};

// A Tensor argument passed None reaches the glue undefined.
inline void check_defined(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a Tensor, got None");
}

// Checks input / weight / bias against normalized_shape the way torch's layer_norm and
// rms_norm do, with messages that name the argument.
inline Checked check_norm_args(const char* op, const at::Tensor& input,
                               at::IntArrayRef normalized_shape,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, bool rms) {
  Checked c;
  check_defined(op, input, "input");
  c.dtype = to_fastllm_dtype(input.scalar_type(), op, "input");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(nd >= 1, op, ": normalized_shape must have at least one dimension, got []");
  TORCH_CHECK_VALUE(
      input.dim() >= nd && input.sizes().slice(input.dim() - nd).equals(normalized_shape), op,
      ": normalized_shape ", shape_str(normalized_shape),
      " must match the trailing dimensions of input, got input of shape ",
      shape_str(input.sizes()));
  c.rows = 1;
  for (int64_t s : input.sizes().slice(0, input.dim() - nd)) c.rows *= s;
  c.cols = 1;
  for (int64_t s : normalized_shape) c.cols *= s;
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  auto check_param = [&](const c10::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    const at::Tensor& p = *t;
    TORCH_CHECK_VALUE(p.sizes().equals(normalized_shape), op, ": ", name, " must have shape ",
                      shape_str(normalized_shape), " (normalized_shape), got ",
                      shape_str(p.sizes()));
    check_same_device(input, "input", p, name, op);
    to_fastllm_dtype(p.scalar_type(), op, name);
    if (!rms) {
      // torch's layer_norm takes a parameter of the input's dtype, or float32 with a
      // low-precision input; rms_norm takes any floating dtype.
      const bool ok = p.scalar_type() == input.scalar_type() ||
                      (p.scalar_type() == at::kFloat &&
                       (input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf));
      TORCH_CHECK_TYPE(ok, op, ": ", name, " must have the input's dtype ", input.scalar_type(),
                       " (or float32 with a bfloat16/float16 input), got ", p.scalar_type());
    }
    // Each conversion only where needed: every ATen call here costs a dispatch (~0.3-0.5 us),
    // which a small call, e.g. one decoded token's (1, 1024) row, would pay several times.
    at::Tensor q = p;
    if (q.scalar_type() != acc) q = q.to(acc);
    if (!q.is_contiguous()) q = q.contiguous();
    if (q.dim() != 1) q = q.reshape({c.cols});
    return q;
  };
  c.weight = check_param(weight, "weight");
  c.bias = check_param(bias, "bias");
  if (!c.empty()) c.x2d = as_rows(input, c.cols);
  return c;
}

inline void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be non-negative, got ", eps);  // NaN too
}

// Shape of the per-row statistics: input's leading dims (torch keeps size-1 trailing
// dims; we return the leading dims only, which is what the autograd formulas need).
inline std::vector<int64_t> stats_shape(const at::Tensor& input, int64_t nd) {
  auto s = input.sizes().slice(0, input.dim() - nd);
  return std::vector<int64_t>(s.begin(), s.end());
}

// A statistic given to backward (mean, rstd) must be what forward returned for `input`.
inline void check_stats(const char* op, const at::Tensor& stat, const char* name,
                        const at::Tensor& input, int64_t nd) {
  const std::vector<int64_t> leading = stats_shape(input, nd);
  TORCH_CHECK_VALUE(stat.sizes().equals(leading), op, ": ", name, " must have shape ",
                    shape_str(leading), " (input's leading dims, one value per row), got ",
                    shape_str(stat.sizes()));
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  TORCH_CHECK_TYPE(stat.scalar_type() == acc, op, ": ", name, " must be ",
                   acc == at::kDouble ? "float64" : "float32", " (the accumulation dtype of ",
                   input.scalar_type(), " input), got ", stat.scalar_type());
  check_same_device(input, "input", stat, name, op);
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_impl(
    const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_eps(op, eps);
  Checked c = check_norm_args(op, input, normalized_shape, weight, bias, rms);
  if (residual.has_value()) {
    check_defined(op, *residual, "residual");
    check_like(op, input, "input", *residual, "residual");
  }
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  auto stat_shape = stats_shape(input, static_cast<int64_t>(normalized_shape.size()));

  at::Tensor out = empty_contiguous_like(op, input);
  at::Tensor residual_out =
      residual.has_value() ? empty_contiguous_like(op, input) : at::Tensor();
  at::Tensor rstd = at::empty(stat_shape, input.options().dtype(acc));
  at::Tensor mean = rms ? at::Tensor() : at::empty(stat_shape, input.options().dtype(acc));
  Kernels::check_dtype(op, "input", c.dtype);
  if (c.empty()) {
    if (!rms) mean.zero_();
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out, residual_out, mean, rstd};
  }

  FwdParams p;
  at::Tensor res2d;
  if (residual.has_value()) {
    res2d = as_rows(*residual, c.cols);
    p.residual = res2d.data_ptr();
    p.residual_row_stride = row_stride(res2d);
    p.residual_out = residual_out.data_ptr();
  }
  p.x = c.x2d.data_ptr();
  p.x_row_stride = row_stride(c.x2d);
  p.weight = c.weight.defined() ? c.weight.data_ptr() : nullptr;
  p.bias = c.bias.defined() ? c.bias.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.mean = rms ? nullptr : mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.rows = c.rows;
  p.cols = c.cols;
  p.eps = eps;
  p.rms = rms;
  p.dtype = c.dtype;
  Kernels::fwd(op, p, input);
  return {out, residual_out, mean, rstd};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_impl(
    const char* op, const at::Tensor& grad_out,
    const c10::optional<at::Tensor>& grad_residual_out, const at::Tensor& input,
    at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool weight_grad,
    bool bias_grad, bool rms) {
  Checked c = check_norm_args(op, input, normalized_shape, weight, c10::nullopt, rms);
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  check_defined(op, grad_out, "grad_out");
  check_like(op, input, "input", grad_out, "grad_out");
  const bool has_dresidual = grad_residual_out.has_value() && grad_residual_out->defined();
  if (has_dresidual) check_like(op, input, "input", *grad_residual_out, "grad_residual_out");
  if (!rms) {
    check_defined(op, mean.value_or(at::Tensor()), "mean");
    check_stats(op, *mean, "mean", input, nd);
  }
  check_defined(op, rstd, "rstd");
  check_stats(op, rstd, "rstd", input, nd);
  TORCH_CHECK_VALUE(!weight_grad || c.weight.defined(), op,
                    ": weight_grad=True needs a weight, got weight=None");
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  at::Tensor dx = empty_contiguous_like(op, input);
  at::Tensor dw_acc = weight_grad ? at::empty({c.cols}, input.options().dtype(acc)) : at::Tensor();
  at::Tensor db_acc = bias_grad ? at::empty({c.cols}, input.options().dtype(acc)) : at::Tensor();
  Kernels::check_dtype(op, "input", c.dtype);
  if (c.empty()) {
    if (weight_grad) dw_acc.zero_();
    if (bias_grad) db_acc.zero_();
  } else {
    BwdParams p;
    at::Tensor dres2d;
    if (has_dresidual) {
      dres2d = as_rows(*grad_residual_out, c.cols);
      p.dresidual_out = dres2d.data_ptr();
      p.dresidual_out_row_stride = row_stride(dres2d);
    }
    const at::Tensor rstd_c = rstd.contiguous();
    const at::Tensor mean_c = rms ? at::Tensor() : mean->contiguous();
    const at::Tensor dy2d = as_rows(grad_out, c.cols);
    p.dy = dy2d.data_ptr();
    p.dy_row_stride = row_stride(dy2d);
    p.x = c.x2d.data_ptr();
    p.x_row_stride = row_stride(c.x2d);
    p.weight = c.weight.defined() ? c.weight.data_ptr() : nullptr;
    p.mean = rms ? nullptr : mean_c.data_ptr();
    p.rstd = rstd_c.data_ptr();
    p.dx = dx.data_ptr();
    p.dweight = weight_grad ? dw_acc.data_ptr() : nullptr;
    p.dbias = bias_grad ? db_acc.data_ptr() : nullptr;
    p.rows = c.rows;
    p.cols = c.cols;
    p.rms = rms;
    p.dtype = c.dtype;
    Kernels::bwd(op, p, input);
  }
  // Gradients of the parameters come back in the parameter's dtype.
  at::Tensor dw = weight_grad ? dw_acc.to(weight->scalar_type()).reshape(normalized_shape)
                              : at::empty({0}, input.options());
  at::Tensor db = bias_grad ? db_acc.to(weight.has_value() && weight->defined()
                                            ? weight->scalar_type()
                                            : input.scalar_type())
                                  .reshape(normalized_shape)
                            : at::empty({0}, input.options());
  return {dx, dw, db};
}

// ---- schema-shaped entry points --------------------------------------------------

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps) {
  auto r = norm_fwd_impl<Kernels>("layer_norm_fwd", input, c10::nullopt, normalized_shape, weight,
                                  bias, eps, /*rms=*/false);
  return {std::get<0>(r), std::get<2>(r), std::get<3>(r)};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& input, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps) {
  return norm_fwd_impl<Kernels>("add_layer_norm_fwd", input, residual, normalized_shape, weight,
                                bias, eps, /*rms=*/false);
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    bool weight_grad, bool bias_grad) {
  return norm_bwd_impl<Kernels>("layer_norm_bwd", grad_out, grad_residual_out, input,
                                normalized_shape, weight, mean, rstd, weight_grad, bias_grad,
                                /*rms=*/false);
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& input,
                                                at::IntArrayRef normalized_shape,
                                                const c10::optional<at::Tensor>& weight,
                                                double eps) {
  auto r = norm_fwd_impl<Kernels>("rms_norm_fwd", input, c10::nullopt, normalized_shape, weight,
                                  c10::nullopt, eps, /*rms=*/true);
  return {std::get<0>(r), std::get<3>(r)};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
    const at::Tensor& input, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const c10::optional<at::Tensor>& weight, double eps) {
  auto r = norm_fwd_impl<Kernels>("add_rms_norm_fwd", input, residual, normalized_shape, weight,
                                  c10::nullopt, eps, /*rms=*/true);
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r)};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out,
                                                const c10::optional<at::Tensor>& grad_residual_out,
                                                const at::Tensor& input,
                                                at::IntArrayRef normalized_shape,
                                                const c10::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd, bool weight_grad) {
  auto r = norm_bwd_impl<Kernels>("rms_norm_bwd", grad_out, grad_residual_out, input,
                                  normalized_shape, weight, c10::nullopt, rstd, weight_grad,
                                  /*bias_grad=*/false, /*rms=*/true);
  return {std::get<0>(r), std::get<1>(r)};
}

template <class Kernels>
void register_norm_ops(torch::Library& m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd<Kernels>);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd<Kernels>);
  m.impl("layer_norm_bwd", &layer_norm_bwd<Kernels>);
  m.impl("rms_norm_fwd", &rms_norm_fwd<Kernels>);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd<Kernels>);
  m.impl("rms_norm_bwd", &rms_norm_bwd<Kernels>);
}

}  // namespace norm
}  // namespace fastllm
