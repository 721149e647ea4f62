// Argument checks for the torch glue: every message names the argument and the expected
// vs actual value (e.g. "weight must have shape [1000], got [999]").
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

#include "common/dtype.h"

namespace fastllm {

inline std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

inline DType to_fastllm_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg,
                       " must be float32, bfloat16, float16 or float64, got ", t);
  }
  return DType::kFloat32;
}

// The accumulation dtype of an input dtype: double for float64, float otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name,
              "'s device ", ref.device(), ", got ", t.device());
}

// View `t` as (rows, cols) with unit column stride, copying only when no such view exists.
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  at::Tensor r = t.reshape({-1, cols});
  if (cols > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

inline int64_t row_stride(const at::Tensor& r) { return r.size(0) > 1 ? r.stride(0) : r.size(1); }

}  // namespace fastllm
