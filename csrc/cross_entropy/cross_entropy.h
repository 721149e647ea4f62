// Cross-entropy kernels: the torch-free interface shared by the CPU kernels
// (cross_entropy_cpu.cpp), the CUDA kernels (cross_entropy.cu), the torch glue
// (cross_entropy_ops.cpp) and the C++ tests. Nothing here includes torch or CUDA headers.
//
// Math, per row i of logits x (length V = vocab), target t = target[i]:
//   z      = softcap > 0 ? softcap * tanh(x / softcap) : x          (logit soft-capping)
//   lse    = log(sum_c exp(z_c))                                    (online max/sum, one read)
//   ce     = lse - z_t                        (times class_weight[t] when a weight is given)
//   smooth = lse - mean_c(z_c)                (label smoothing's uniform part; with a class
//            weight: sum_c w_c (lse - z_c) / V, torch's definition)
//   loss_i = (1 - ls) * ce + ls * smooth + z_loss * lse^2
//   rows with t == ignore_index: loss_i = 0 and zero gradient.
//   correct_i = t != ignore_index, t in [0, V), z_t == max_c z_c, z_t finite and lse not NaN:
//            the target is a top-1 prediction (ties count as correct; a row with a NaN logit
//            or an infinite target logit, whose loss is NaN or inf, never is). The forward
//            has both numbers at hand: token accuracy costs one compare per row and no
//            pass over the logits.
// Gradient with respect to x_c, for upstream g_i = grad_loss[i] (per-row):
//   dL/dz_c = g_i * [ (1-ls) * wt * (p_c - [c == t]) + ls * (p_c * W_s - w_c / V)
//                     + 2 * z_loss * lse * p_c ],   p_c = exp(z_c - lse)
//   (wt = class_weight[t] or 1; W_s = sum_c w_c / V, or 1 without weights)
//   dL/dx_c = dL/dz_c * (1 - (z_c / softcap)^2) when softcap > 0.
//   p comes from the lse forward saved, except for rows with |lse| >= 256, whose rounding
//   (half an ulp of the acc type) would be a visible relative error of p: every backend
//   recomputes their max m and log(sum exp(z - m)) from the logits and takes
//   p_c = exp((z_c - m) - log_sum).
// Reductions (mean over non-ignored rows / sum / none) are done by the caller on the
// per-row losses, so the same kernels serve every reduction and the upstream gradient
// arrives per row.
//
// Glossary: rows = tokens (N), vocab = classes (V). Logits rows have unit column stride and
// their own row stride; grad_logits may alias logits (in-place backward).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace fastllm {
namespace cross_entropy {

struct FwdParams {
  const void* logits = nullptr;       // (rows, vocab) in `dtype`
  int64_t logits_row_stride = 0;
  const int64_t* target = nullptr;    // (rows,)
  const void* class_weight = nullptr; // (vocab,) acc type, or nullptr
  void* loss = nullptr;               // (rows,) acc type: per-row loss, 0 for ignored rows
  void* lse = nullptr;                // (rows,) acc type: logsumexp of the (capped) logits
  bool* correct = nullptr;            // (rows,) or nullptr: correct_i above (false if ignored)
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;               // 0 = no soft-capping
  DType dtype = DType::kFloat32;
  // Out: the first row whose target is neither ignore_index nor in [0, vocab), or -1.
  // (CPU kernels fill it, for C++ callers; the torch glue checks the targets of CPU tensors
  // itself before any kernel runs, cross_entropy_glue.h.)
  int64_t* bad_target_row = nullptr;
};

struct BwdParams {
  const void* grad_loss = nullptr;    // (rows,) acc type, upstream gradient per row
  int64_t grad_loss_stride = 1;       // 0 broadcasts one value to every row
  const void* logits = nullptr;       // (rows, vocab) in `dtype`
  int64_t logits_row_stride = 0;
  const int64_t* target = nullptr;
  const void* class_weight = nullptr;
  const void* lse = nullptr;          // (rows,) acc type, from forward
  void* grad_logits = nullptr;        // (rows, vocab) in `dtype`; may equal logits (in place)
  int64_t grad_row_stride = 0;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;
  DType dtype = DType::kFloat32;
  // A block of classes (CPU kernels only; linear cross-entropy's class-blocked backward,
  // fastllm/ops/linear_cross_entropy.py): the `vocab` columns of this call are classes
  // class_offset .. class_offset + vocab - 1 of num_classes (0: num_classes = vocab, the
  // whole row). target and class_weight index all num_classes classes, a target outside the
  // block has no column here, and the label-smoothing constants (W_s, 1 / V) are the whole
  // row's. A block cannot recompute its row's log-sum-exp, so lse_split ((rows, 2) acc type:
  // hi, lo with p_c = exp((z_c - hi) - lo)), when given, stands in for every row's
  // (the caller recomputes the |lse| >= 256 rows over the whole row); without it a block
  // takes hi = lse, lo = 0 for every row.
  int64_t class_offset = 0;
  int64_t num_classes = 0;
  const void* lse_split = nullptr;
};

void cross_entropy_fwd_cpu(const FwdParams& p);
void cross_entropy_bwd_cpu(const BwdParams& p);

}  // namespace cross_entropy
}  // namespace fastllm
