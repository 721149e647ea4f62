// CPU glue of the cross-entropy family: the fastllm::cross_entropy_* schemas
// (csrc/schemas.h) on CPU tensors, running the torch-free kernels of cross_entropy_cpu.cpp.
// Checks, allocation, parameter filling and the entry points are shared with the CUDA glue
// (cross_entropy_glue.h); this file only says which CPU kernels run.
//
// Registers nothing in the SIMT emulation build (FASTLLM_CPU_LIBRARY_IMPL): that build
// registers the CUDA implementation for CPU tensors (cross_entropy_cuda_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

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

}  // namespace

FASTLLM_CPU_LIBRARY_IMPL(m) {
  register_cross_entropy_ops<CpuKernels<cross_entropy_fwd_cpu, cross_entropy_bwd_cpu>>(m);
  m.impl("cross_entropy_bwd_block_inplace", &cross_entropy_bwd_block_inplace);
}

}  // namespace cross_entropy
}  // namespace fastllm
