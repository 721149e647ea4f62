// Torch glue of the cross-entropy family, shared by its devices (cross_entropy_ops.cpp for
// the CPU, cross_entropy_cuda_ops.cpp for CUDA and its SIMT emulation): argument checks whose
// messages name the argument, allocation of the outputs, the filling of cross_entropy.h's
// FwdParams / BwdParams, and the schema-shaped entry points of the fastllm::cross_entropy_*
// ops (csrc/schemas.h), each a template over a device's Kernels (the pattern of
// common/torch_glue.h):
//
//   struct Kernels {
//     static void check_dtype(const char* op, const char* arg, DType dtype);
//     static void fwd(const char* op, FwdParams& p, const at::Tensor& logits);
//     static void bwd(const char* op, BwdParams& p, const at::Tensor& logits);
//   };
//
// They are called only with rows > 0.
//
// The ops work on 2-D logits (rows, vocab) with a 1-D int64 target (rows,) and return the
// per-row loss and log-sum-exp in the accumulation dtype (float32; float64 for float64
// logits), and whether each row's target is a top-1 class (bool, for token accuracy).
// Layouts with the class dimension elsewhere, reductions and dtype of the returned loss are
// handled by the Python layer (fastllm/ops/cross_entropy.py).
//
// The checks are those of the ops' Python checks (fastllm/ops/cross_entropy.py, _CHECKS and
// _VALUE_CHECKS), which the Triton ops and the fakes run: every backend accepts the same
// arguments and refuses the others with the same message.
//
// A target that is neither ignore_index nor in [0, vocab) raises an IndexError naming the
// row and the value on CPU tensors, whichever kernels run (the C++ CPU ones, or the CUDA
// ones under the SIMT emulation): check_target_values reads the targets before any kernel
// runs. On CUDA tensors the kernels give that row a NaN loss and NaN gradient instead:
// checking on the host would need a device-to-host synchronisation on every call.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "common/torch_glue.h"
#include "cross_entropy/cross_entropy.h"

namespace fastllm {
namespace cross_entropy {

struct Checked {
  at::Tensor logits;   // (rows, vocab), unit column stride
  at::Tensor target;   // (rows,) int64 contiguous
  at::Tensor weight;   // (classes,) acc dtype contiguous, or undefined
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t classes = 0;  // what target and weight index: vocab, or a block's num_classes
  DType dtype = DType::kFloat32;
};

// The checks every op shares; messages name the argument, expected and actual values.
// num_classes > 0: the logits are a block of a row of num_classes classes (the CPU's block
// backward op), which target and weight index.
inline Checked check_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                   const c10::optional<at::Tensor>& weight, double label_smoothing,
                   double z_loss, double softcap, int64_t num_classes = 0) {
  Checked c;
  c.dtype = to_fastllm_dtype(logits.scalar_type(), op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, vocab), got shape ",
              shape_str(logits.sizes()));
  c.rows = logits.size(0);
  c.vocab = logits.size(1);
  TORCH_CHECK(c.vocab >= 1, op, ": logits must have at least one class, got shape ",
              shape_str(logits.sizes()));
  c.classes = num_classes > 0 ? num_classes : c.vocab;
  TORCH_CHECK(target.dim() == 1 && target.size(0) == c.rows, op, ": target must have shape [",
              c.rows, "] (one class index per row of logits), got ", shape_str(target.sizes()));
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                   ": target must be int64 class indices, got ", target.scalar_type());
  check_same_device(logits, "logits", target, "target", op);
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == c.classes, op, ": weight must have shape [", c.classes,
                "] (one weight per class), got ", shape_str(w.sizes()));
    to_fastllm_dtype(w.scalar_type(), op, "weight");
    check_same_device(logits, "logits", w, "weight", op);
    c.weight = w.to(acc_dtype(logits.scalar_type())).contiguous();
  }
  // Written so that NaN fails every test.
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0 && std::isfinite(z_loss), op,
              ": z_loss must be finite and non-negative, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0 && softcap <= std::numeric_limits<float>::max(), op,
              ": softcap must be non-negative (0 disables it) and finite in float32, got ",
              softcap);
  c.logits = as_rows(logits, c.vocab);
  c.target = target.contiguous();
  return c;
}

// On CPU tensors: every target is ignore_index or in [0, classes), else an IndexError naming
// the first bad row and its value. (CUDA tensors: see the top of the file.)
inline void check_target_values(const char* op, const Checked& c, int64_t ignore_index) {
  if (!c.target.device().is_cpu()) return;
  const int64_t* target = c.target.data_ptr<int64_t>();
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t t = target[r];
    TORCH_CHECK_INDEX(t == ignore_index || (t >= 0 && t < c.classes), op, ": target[", r, "] = ", t,
                      " is out of range for ", c.classes, " classes (ignore_index=", ignore_index,
                      ")");
  }
}

// The per-row tensors backward receives from forward: (rows,) in `dtype`.
inline at::Tensor check_per_row(const char* op, const at::Tensor& t, const char* name,
                         const Checked& c, const at::Tensor& logits, bool any_float_dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c.rows, op, ": ", name, " must have shape [", c.rows,
              "] (one value per row of logits), got ", shape_str(t.sizes()));
  check_same_device(logits, "logits", t, name, op);
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  if (any_float_dtype) {
    to_fastllm_dtype(t.scalar_type(), op, name);
    return t.to(acc);
  }
  TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ",
                   t.scalar_type());
  return t.contiguous();
}

// The in-place backwards write the gradient into the logits' own storage, so no copy may
// stand in for them (unit stride along the classes), and no two elements may share memory.
inline void check_inplace_layout(const char* op, const at::Tensor& logits, const Checked& c) {
  TORCH_CHECK(c.vocab == 1 || logits.stride(1) == 1, op,
              ": logits must have unit stride along the vocab dimension to receive the gradient "
              "in place, got strides ", shape_str(logits.strides()));
  TORCH_CHECK(c.rows <= 1 || logits.stride(0) >= c.vocab, op,
              ": logits rows must not overlap in memory to receive the gradient in place, got "
              "shape ", shape_str(logits.sizes()), " with strides ", shape_str(logits.strides()));
}

// The fields forward and backward params share: logits, target, class weight, options.
template <class Params>
void set_row_params(Params& p, const Checked& c, int64_t ignore_index, double label_smoothing,
                    double z_loss, double softcap) {
  p.logits = c.logits.data_ptr();
  p.logits_row_stride = row_stride(c.logits);
  p.target = c.target.data_ptr<int64_t>();
  p.class_weight = c.weight.defined() ? c.weight.data_ptr() : nullptr;
  p.rows = c.rows;
  p.vocab = c.vocab;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.dtype = c.dtype;
}

// ---- schema-shaped entry points --------------------------------------------------

// -> (loss, lse, correct): correct (rows,) bool, the target is a top-1 class of its row
// (cross_entropy.h), what token accuracy counts.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  const char* op = "cross_entropy_fwd";
  Checked c = check_args(op, logits, target, weight, label_smoothing, z_loss, softcap);
  const auto stat_options = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({c.rows}, stat_options);
  at::Tensor lse = at::empty({c.rows}, stat_options);
  at::Tensor correct = at::empty({c.rows}, logits.options().dtype(at::kBool));
  check_target_values(op, c, ignore_index);
  if (c.rows == 0) return {loss, lse, correct};

  FwdParams p;
  set_row_params(p, c, ignore_index, label_smoothing, z_loss, softcap);
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  p.correct = correct.data_ptr<bool>();
  Kernels::check_dtype(op, "logits", p.dtype);
  Kernels::fwd(op, p, logits);
  return {loss, lse, correct};
}

// A block of classes (cross_entropy.h, BwdParams; the CPU's block backward op, whose row's
// class count is the Checked's `classes`): its first class and the rows' lse split or
// nullptr.
struct ClassBlock {
  int64_t class_offset = 0;
  const void* lse_split = nullptr;
};

// Shared by the out-of-place and the in-place backwards: writes the gradient to grad_rows,
// a (rows, vocab) tensor with unit column stride (which may be the logits themselves).
template <class Kernels>
void cross_entropy_bwd_into(const char* op, const at::Tensor& grad_rows,
                            const at::Tensor& grad_loss, const Checked& c,
                            const at::Tensor& logits, const at::Tensor& lse,
                            int64_t ignore_index, double label_smoothing, double z_loss,
                            double softcap, const ClassBlock& block = ClassBlock{}) {
  at::Tensor g = check_per_row(op, grad_loss, "grad_loss", c, logits, /*any_float_dtype=*/true);
  at::Tensor lse_c = check_per_row(op, lse, "lse", c, logits, /*any_float_dtype=*/false);
  check_target_values(op, c, ignore_index);
  if (c.rows == 0) return;
  BwdParams p;
  p.grad_loss = g.data_ptr();
  // An expanded scalar (the gradient of a mean or sum) arrives with stride 0.
  p.grad_loss_stride = g.stride(0);
  set_row_params(p, c, ignore_index, label_smoothing, z_loss, softcap);
  p.lse = lse_c.data_ptr();
  p.grad_logits = grad_rows.data_ptr();
  p.grad_row_stride = row_stride(grad_rows);
  p.class_offset = block.class_offset;
  p.num_classes = c.classes;
  p.lse_split = block.lse_split;
  Kernels::check_dtype(op, "logits", p.dtype);
  Kernels::bwd(op, p, logits);
}

template <class Kernels>
at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                             const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                             const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
                             double z_loss, double softcap) {
  const char* op = "cross_entropy_bwd";
  Checked c = check_args(op, logits, target, weight, label_smoothing, z_loss, softcap);
  at::Tensor grad_logits = empty_contiguous_like(op, logits);
  cross_entropy_bwd_into<Kernels>(op, grad_logits, grad_loss, c, logits, lse, ignore_index,
                            label_smoothing, z_loss, softcap);
  return grad_logits;
}

template <class Kernels>
void cross_entropy_bwd_inplace(const at::Tensor& grad_loss, const at::Tensor& logits,
                               const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                               const at::Tensor& lse, int64_t ignore_index,
                               double label_smoothing, double z_loss, double softcap) {
  const char* op = "cross_entropy_bwd_inplace";
  Checked c = check_args(op, logits, target, weight, label_smoothing, z_loss, softcap);
  check_inplace_layout(op, logits, c);
  cross_entropy_bwd_into<Kernels>(op, logits, grad_loss, c, logits, lse, ignore_index,
                            label_smoothing, z_loss, softcap);
}

template <class Kernels>
void register_cross_entropy_ops(torch::Library& m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd<Kernels>);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd<Kernels>);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace<Kernels>);
}

}  // namespace cross_entropy
}  // namespace fastllm
