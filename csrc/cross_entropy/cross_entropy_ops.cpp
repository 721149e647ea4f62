// CPU glue of the cross-entropy family: the fastllm::cross_entropy_* schemas
// (csrc/schemas.h) on CPU tensors, running the torch-free kernels of cross_entropy_cpu.cpp.
// Checks, allocation, parameter filling and the entry points are shared with the CUDA glue
// (cross_entropy_glue.h); this file only says which CPU kernels run.
//
// Registers nothing in the SIMT emulation build (FASTLLM_CPU_LIBRARY_IMPL): that build
// registers the CUDA implementation for CPU tensors (cross_entropy_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <limits>

#include "common/cpu_features.h"
#include "common/gemm_cpu.h"
#include "common/torch_glue.h"
#include "cross_entropy/cross_entropy.h"
#include "cross_entropy/cross_entropy_glue.h"

namespace fastllm {
namespace cross_entropy {

namespace {

// fastllm::cross_entropy_bwd_block_inplace: the gradient of classes
// class_offset .. class_offset + V_b - 1 of num_classes written over their (rows, V_b)
// logits, for rows whose lse (and, for |lse| >= 256, lse_split) forward took over all
// num_classes classes; linear cross-entropy's class-blocked backward
// (fastllm/ops/linear_cross_entropy.py). CPU tensors only.
void cross_entropy_bwd_block_inplace(const at::Tensor& grad_loss, const at::Tensor& logits,
                                     const at::Tensor& target,
                                     const c10::optional<at::Tensor>& weight,
                                     const at::Tensor& lse,
                                     const c10::optional<at::Tensor>& lse_split,
                                     int64_t class_offset, int64_t num_classes,
                                     int64_t ignore_index, double label_smoothing,
                                     double z_loss, double softcap) {
  const char* op = "cross_entropy_bwd_block_inplace";
  Checked c =
      check_args(op, logits, target, weight, label_smoothing, z_loss, softcap, num_classes);
  check_inplace_layout(op, logits, c);
  TORCH_CHECK(class_offset >= 0 && num_classes >= class_offset + c.vocab, op,
              ": the block's classes [class_offset, class_offset + ", c.vocab,
              ") must lie in [0, num_classes), got class_offset=", class_offset,
              ", num_classes=", num_classes);
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  at::Tensor split;
  if (lse_split.has_value() && lse_split->defined()) {
    split = *lse_split;
    TORCH_CHECK(split.dim() == 2 && split.size(0) == c.rows && split.size(1) == 2, op,
                ": lse_split must have shape [", c.rows, ", 2] (hi, lo per row), got ",
                shape_str(split.sizes()));
    TORCH_CHECK_TYPE(split.scalar_type() == acc, op, ": lse_split must be ", acc, ", got ",
                     split.scalar_type());
    check_same_device(logits, "logits", split, "lse_split", op);
    split = split.contiguous();
  }
  using Kernels = CpuKernels<cross_entropy_fwd_cpu, cross_entropy_bwd_cpu>;
  cross_entropy_bwd_into<Kernels>(op, c.logits, grad_loss, c, logits, lse, ignore_index,
                                  label_smoothing, z_loss, softcap,
                                  {class_offset, split.defined() ? split.data_ptr() : nullptr});
}

// The checks of fastllm's own GEMMs' operands (linear_mm_out, linear_weight_grad_out).
using NamedTensors = std::initializer_list<std::pair<const at::Tensor*, const char*>>;

// The AVX-512 or AVX2 path, which the GEMMs need (`fallback`: what to use without it).
void check_own_gemm_path(const char* op, const char* fallback) {
  TORCH_CHECK(cpu::cpu_avx512() || cpu::cpu_isa() == cpu::CpuIsa::kAvx2, op,
              ": needs the AVX-512 or AVX2 path (AVX2/FMA/F16C at least, not capped below "
              "by FASTLLM_CPU_ISA); use ", fallback, " on this CPU");
}

// float32, all on the first one's device.
void check_float32_same_device(const char* op, NamedTensors tensors) {
  const auto& [first, first_name] = *tensors.begin();
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                     t->scalar_type());
    check_same_device(*first, first_name, *t, name, op);
  }
}

// 2-D tensors whose rows are contiguous elements (any row stride) and do not overlap, as the
// GEMMs read and write them.
void check_separate_rows(const char* op, NamedTensors tensors) {
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, op, ": ", name,
                " must have contiguous rows (stride(1) == 1), got strides ",
                shape_str(t->strides()));
    TORCH_CHECK(t->size(0) <= 1 || t->stride(0) >= t->size(1), op, ": ", name,
                " must have rows that do not overlap (stride(0) >= size(1)), got strides ",
                shape_str(t->strides()));
  }
}

// A 2-D tensor's row stride as the GEMMs take it (a single row: its length).
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// fastllm::linear_mm_out: out = a @ (b.T if b_transposed else b) (+ bias), float32 on the
// CPU with AVX-512 or AVX2 (common/gemm_cpu.h), for linear cross-entropy's chunks
// (fastllm/ops/linear_cross_entropy.py), which use torch.mm where these paths are absent.
void linear_mm_out(const at::Tensor& a, const at::Tensor& b, bool b_transposed,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& out) {
  const char* op = "linear_mm_out";
  check_own_gemm_path(op, "torch.mm");
  const bool has_bias = bias.has_value() && bias->defined();
  check_float32_same_device(op, {{&a, "a"}, {&b, "b"}, {&out, "out"},
                                 {has_bias ? &*bias : &a, "bias"}});
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2, op,
              ": a, b and out must be 2-D, got a ", shape_str(a.sizes()), ", b ",
              shape_str(b.sizes()), ", out ", shape_str(out.sizes()));
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t N = b_transposed ? b.size(0) : b.size(1);
  TORCH_CHECK((b_transposed ? b.size(1) : b.size(0)) == K, op, ": b must be ",
              b_transposed ? "(N, K)" : "(K, N)", " with K = a.size(1) = ", K, ", got b ",
              shape_str(b.sizes()), " (b_transposed=", b_transposed, ")");
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, op, ": out must have shape [", M, ", ", N,
              "], got ", shape_str(out.sizes()));
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == N), op,
              ": bias must have shape [", N, "], got ", shape_str(bias->sizes()));
  TORCH_CHECK(M <= std::numeric_limits<int>::max(), op, ": a has ", M, " rows, at most ",
              std::numeric_limits<int>::max(), " are supported");
  check_separate_rows(op, {{&a, "a"}, {&b, "b"}, {&out, "out"}});
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, a);
  at::assert_no_overlap(out, b);
  at::Tensor bias_c;
  if (has_bias) {
    bias_c = bias->contiguous();
    at::assert_no_overlap(out, bias_c);
  }
  if (M == 0 || N == 0) return;
  cpu::gemm_f32(M, N, K, a.data_ptr<float>(), row_stride(a), b.data_ptr<float>(),
                row_stride(b), b_transposed, has_bias ? bias_c.data_ptr<float>() : nullptr,
                out.data_ptr<float>(), row_stride(out));
}

// fastllm::linear_weight_grad_out: out = grad.T @ input, or out += grad.T @ input when
// accumulate, float32 on the CPU with AVX-512 or AVX2 (common/gemm_cpu.h's gemm_f32_at), for
// linear cross-entropy's chunks' weight gradient (fastllm/ops/linear_cross_entropy.py), which
// use torch's addmm where these paths are absent.
void linear_weight_grad_out(const at::Tensor& grad, const at::Tensor& input, bool accumulate,
                            const at::Tensor& out) {
  const char* op = "linear_weight_grad_out";
  check_own_gemm_path(op, "torch.addmm");
  check_float32_same_device(op, {{&grad, "grad"}, {&input, "input"}, {&out, "out"}});
  TORCH_CHECK(grad.dim() == 2 && input.dim() == 2 && out.dim() == 2, op,
              ": grad, input and out must be 2-D, got grad ", shape_str(grad.sizes()),
              ", input ", shape_str(input.sizes()), ", out ", shape_str(out.sizes()));
  const int64_t K = grad.size(0), M = grad.size(1), N = input.size(1);
  TORCH_CHECK(input.size(0) == K, op, ": input must have grad.size(0) = ", K,
              " rows, got input ", shape_str(input.sizes()));
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, op, ": out must have shape [", M, ", ", N,
              "] (grad.size(1), input.size(1)), got ", shape_str(out.sizes()));
  check_separate_rows(op, {{&grad, "grad"}, {&input, "input"}, {&out, "out"}});
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, grad);
  at::assert_no_overlap(out, input);
  cpu::gemm_f32_at(M, N, K, grad.data_ptr<float>(), row_stride(grad), input.data_ptr<float>(),
                   row_stride(input), out.data_ptr<float>(), row_stride(out), accumulate);
}

}  // namespace

FASTLLM_CPU_LIBRARY_IMPL(m) {
  register_cross_entropy_ops<CpuKernels<cross_entropy_fwd_cpu, cross_entropy_bwd_cpu>>(m);
  m.impl("cross_entropy_bwd_block_inplace", &cross_entropy_bwd_block_inplace);
  m.impl("linear_mm_out", &linear_mm_out);
  m.impl("linear_weight_grad_out", &linear_weight_grad_out);
}

}  // namespace cross_entropy
}  // namespace fastllm
