// Torch glue of the cross-entropy family: argument checks, allocation, and the per-device
// implementations of the fastllm::cross_entropy_* schemas (csrc/schemas.h). The kernels
// behind it are torch-free: cross_entropy_cpu.cpp (CPU) and cross_entropy.cu (CUDA).
//
// The ops work on 2-D logits (rows, vocab) with a 1-D int64 target (rows,) and return the
// per-row loss and log-sum-exp in the accumulation dtype (float32; float64 for float64
// logits). Layouts with the class dimension elsewhere, reductions and dtype of the returned
// loss are handled by the Python layer (fastllm/ops/cross_entropy.py).
//
// A target that is neither ignore_index nor in [0, vocab) raises an IndexError naming the
// row and the value on CPU (the kernel reports the first such row). On CUDA the kernels
// give that row a NaN loss and NaN gradient instead: checking on the host would need a
// device-to-host synchronisation on every call.
//
// Built three ways:
//   - fastllm._C without CUDA: CPU implementations only;
//   - fastllm._C with FASTLLM_WITH_CUDA: CPU and CUDA implementations;
//   - the SIMT emulation build (FASTLLM_SIMT_EMU, tests only): the CUDA implementations,
//     compiled for the host, registered for CPU tensors in the `fastllm_emu` library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/torch_checks.h"
#include "cross_entropy/cross_entropy.h"

#if defined(FASTLLM_WITH_CUDA) && !defined(FASTLLM_SIMT_EMU)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#if defined(FASTLLM_WITH_CUDA) || defined(FASTLLM_SIMT_EMU)
#include "cross_entropy/cross_entropy_cuda.h"
#endif

namespace fastllm {
namespace cross_entropy {
namespace {

enum class Device { kCpu, kCuda };

struct Checked {
  at::Tensor logits;   // (rows, vocab), unit column stride
  at::Tensor target;   // (rows,) int64 contiguous
  at::Tensor weight;   // (vocab,) acc dtype contiguous, or undefined
  int64_t rows = 0;
  int64_t vocab = 0;
  DType dtype = DType::kFloat32;
};

// The checks every op shares; messages name the argument, expected and actual values.
Checked check_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                   const c10::optional<at::Tensor>& weight, double label_smoothing,
                   double z_loss, double softcap) {
  Checked c;
  c.dtype = to_fastllm_dtype(logits.scalar_type(), op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, vocab), got shape ",
              shape_str(logits.sizes()));
  c.rows = logits.size(0);
  c.vocab = logits.size(1);
  TORCH_CHECK(c.vocab >= 1, op, ": logits must have at least one class, got shape ",
              shape_str(logits.sizes()));
  TORCH_CHECK(target.dim() == 1 && target.size(0) == c.rows, op, ": target must have shape [",
              c.rows, "] (one class index per row of logits), got ", shape_str(target.sizes()));
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                   ": target must be int64 class indices, got ", target.scalar_type());
  check_same_device(logits, "logits", target, "target", op);
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == c.vocab, op, ": weight must have shape [", c.vocab,
                "] (one weight per class), got ", shape_str(w.sizes()));
    to_fastllm_dtype(w.scalar_type(), op, "weight");
    check_same_device(logits, "logits", w, "weight", op);
    c.weight = w.to(acc_dtype(logits.scalar_type())).contiguous();
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be non-negative, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be non-negative (0 disables it), got ", softcap);
  c.logits = as_rows(logits, c.vocab);
  c.target = target.contiguous();
  return c;
}

// The per-row tensors backward receives from forward: (rows,) in `dtype`.
at::Tensor check_per_row(const char* op, const at::Tensor& t, const char* name,
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

void run_fwd(Device dev, FwdParams& p, const at::Tensor& like) {
  if (dev == Device::kCpu) {
    int64_t bad_row = -1;
    p.bad_target_row = &bad_row;
    cross_entropy_fwd_cpu(p);
    p.bad_target_row = nullptr;
    if (bad_row >= 0) {
      TORCH_CHECK_INDEX(false, "cross_entropy: target[", bad_row, "] = ", p.target[bad_row],
                        " is out of range for ", p.vocab, " classes (ignore_index=",
                        p.ignore_index, ")");
    }
    return;
  }
#if defined(FASTLLM_SIMT_EMU)
  TORCH_CHECK_TYPE(p.dtype != DType::kFloat64,
                   "cross_entropy (emulated CUDA): logits must be float32, bfloat16 or float16, "
                   "got float64");
  (void)like;
  cudaError_t err = launch_cross_entropy_fwd_cuda(p, nullptr);
  TORCH_CHECK(err == cudaSuccess, "fastllm cross_entropy forward (emulated CUDA) failed: ",
              int(err));
#elif defined(FASTLLM_WITH_CUDA)
  TORCH_CHECK_TYPE(p.dtype != DType::kFloat64, "cross_entropy: logits must be float32, "
                   "bfloat16 or float16 on CUDA, got float64");
  c10::cuda::CUDAGuard guard(like.device());
  cudaError_t err = launch_cross_entropy_fwd_cuda(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastllm cross_entropy forward kernel launch failed: ",
              cudaGetErrorString(err));
#else
  (void)like;
  TORCH_CHECK(false, "fastllm was built without CUDA kernels");
#endif
}

void run_bwd(Device dev, const BwdParams& p, const at::Tensor& like) {
  if (dev == Device::kCpu) {
    cross_entropy_bwd_cpu(p);
    return;
  }
#if defined(FASTLLM_SIMT_EMU)
  TORCH_CHECK_TYPE(p.dtype != DType::kFloat64,
                   "cross_entropy (emulated CUDA): logits must be float32, bfloat16 or float16, "
                   "got float64");
  (void)like;
  cudaError_t err = launch_cross_entropy_bwd_cuda(p, nullptr);
  TORCH_CHECK(err == cudaSuccess, "fastllm cross_entropy backward (emulated CUDA) failed: ",
              int(err));
#elif defined(FASTLLM_WITH_CUDA)
  TORCH_CHECK_TYPE(p.dtype != DType::kFloat64, "cross_entropy: logits must be float32, "
                   "bfloat16 or float16 on CUDA, got float64");
  c10::cuda::CUDAGuard guard(like.device());
  cudaError_t err = launch_cross_entropy_bwd_cuda(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastllm cross_entropy backward kernel launch failed: ",
              cudaGetErrorString(err));
#else
  (void)like;
  TORCH_CHECK(false, "fastllm was built without CUDA kernels");
#endif
}

template <Device D>
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& weight,
                                                     int64_t ignore_index, double label_smoothing,
                                                     double z_loss, double softcap) {
  const char* op = "cross_entropy";
  Checked c = check_args(op, logits, target, weight, label_smoothing, z_loss, softcap);
  const auto stat_options = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({c.rows}, stat_options);
  at::Tensor lse = at::empty({c.rows}, stat_options);
  if (c.rows == 0) return {loss, lse};

  FwdParams p;
  p.logits = c.logits.data_ptr();
  p.logits_row_stride = row_stride(c.logits);
  p.target = c.target.data_ptr<int64_t>();
  p.class_weight = c.weight.defined() ? c.weight.data_ptr() : nullptr;
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  p.rows = c.rows;
  p.vocab = c.vocab;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.dtype = c.dtype;
  run_fwd(D, p, logits);
  return {loss, lse};
}

// Shared by the out-of-place and the in-place backward: writes the gradient to grad_rows,
// a (rows, vocab) tensor with unit column stride (which may be the logits themselves).
template <Device D>
void cross_entropy_bwd_into(const char* op, const at::Tensor& grad_rows,
                            const at::Tensor& grad_loss, const Checked& c,
                            const at::Tensor& logits, const at::Tensor& lse,
                            int64_t ignore_index, double label_smoothing, double z_loss,
                            double softcap) {
  at::Tensor g = check_per_row(op, grad_loss, "grad_loss", c, logits, /*any_float_dtype=*/true);
  at::Tensor lse_c = check_per_row(op, lse, "lse", c, logits, /*any_float_dtype=*/false);
  if (c.rows == 0) return;
  BwdParams p;
  p.grad_loss = g.data_ptr();
  // An expanded scalar (the gradient of a mean or sum) arrives with stride 0.
  p.grad_loss_stride = g.stride(0);
  p.logits = c.logits.data_ptr();
  p.logits_row_stride = row_stride(c.logits);
  p.target = c.target.data_ptr<int64_t>();
  p.class_weight = c.weight.defined() ? c.weight.data_ptr() : nullptr;
  p.lse = lse_c.data_ptr();
  p.grad_logits = grad_rows.data_ptr();
  p.grad_row_stride = row_stride(grad_rows);
  p.rows = c.rows;
  p.vocab = c.vocab;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.dtype = c.dtype;
  run_bwd(D, p, logits);
}

template <Device D>
at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                             const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                             const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
                             double z_loss, double softcap) {
  const char* op = "cross_entropy_bwd";
  Checked c = check_args(op, logits, target, weight, label_smoothing, z_loss, softcap);
  at::Tensor grad_logits =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  cross_entropy_bwd_into<D>(op, grad_logits, grad_loss, c, logits, lse, ignore_index,
                            label_smoothing, z_loss, softcap);
  return grad_logits;
}

template <Device D>
void cross_entropy_bwd_inplace(const at::Tensor& grad_loss, const at::Tensor& logits,
                               const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                               const at::Tensor& lse, int64_t ignore_index,
                               double label_smoothing, double z_loss, double softcap) {
  const char* op = "cross_entropy_bwd_inplace";
  Checked c = check_args(op, logits, target, weight, label_smoothing, z_loss, softcap);
  // The gradient goes into the logits' own storage, so no copy may stand in for them.
  TORCH_CHECK(c.vocab == 1 || logits.stride(1) == 1, op,
              ": logits must have unit stride along the vocab dimension to receive the gradient "
              "in place, got strides ", shape_str(logits.strides()));
  cross_entropy_bwd_into<D>(op, logits, grad_loss, c, logits, lse, ignore_index,
                            label_smoothing, z_loss, softcap);
}

#define FASTLLM_CROSS_ENTROPY_IMPLS(m, D)                           \
  m.impl("cross_entropy_fwd", &cross_entropy_fwd<D>);               \
  m.impl("cross_entropy_bwd", &cross_entropy_bwd<D>);               \
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace<D>);

}  // namespace

#if defined(FASTLLM_SIMT_EMU)
// Host build of the CUDA kernels: the CUDA implementations on CPU tensors.
TORCH_LIBRARY_IMPL(fastllm_emu, CPU, m) { FASTLLM_CROSS_ENTROPY_IMPLS(m, Device::kCuda) }
#else
TORCH_LIBRARY_IMPL(fastllm, CPU, m) { FASTLLM_CROSS_ENTROPY_IMPLS(m, Device::kCpu) }
#if defined(FASTLLM_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastllm, CUDA, m) { FASTLLM_CROSS_ENTROPY_IMPLS(m, Device::kCuda) }
#endif
#endif

}  // namespace cross_entropy
}  // namespace fastllm
