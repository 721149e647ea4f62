// LayerNorm / RMSNorm kernels: the torch-free interface shared by the CPU kernels
// (norm_cpu.cpp), the CUDA kernels (norm.cu), the torch glue (norm_ops.cpp) and the
// C++ tests. Nothing here includes torch or CUDA headers.
//
// Math, per row x of length N (cols):
//   layer norm: mean = sum(x)/N, var = sum((x-mean)^2)/N, rstd = 1/sqrt(var + eps)
//               y = (x - mean) * rstd * w + b
//   rms norm:   rstd = 1/sqrt(sum(x^2)/N + eps),  y = x * rstd * w
//   add_* variants first form s = round_to_dtype(x + residual), write it to
//   residual_out and normalise s (so backward sees exactly what forward normalised).
// Backward, with xhat = (x - mean) * rstd (rms: x * rstd), g = dy * w:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (rms: no mean(g) term)
//   dw = sum_rows(dy * xhat), db = sum_rows(dy); dx += dresidual_out when given.
// Arithmetic accumulates in the "acc type": double for kFloat64 inputs, float otherwise.
// weight, bias, mean, rstd, dweight and dbias are in the acc type (the glue casts).
//
// Glossary: rows = product of the leading dims (M), cols = normalized size (N).
// Layout: every row-major 2D operand has unit column stride and its own row stride
// (in elements); outputs written by the kernels are contiguous (row stride = cols).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace fastllm {
namespace norm {

struct FwdParams {
  const void* x = nullptr;          // (rows, cols) in `dtype`
  int64_t x_row_stride = 0;
  const void* residual = nullptr;   // (rows, cols) in `dtype`, add_* only, else nullptr
  int64_t residual_row_stride = 0;
  const void* weight = nullptr;     // (cols,) acc type, or nullptr (= ones)
  const void* bias = nullptr;       // (cols,) acc type, or nullptr (= zeros); layer norm only
  void* out = nullptr;              // (rows, cols) contiguous, `dtype`
  void* residual_out = nullptr;     // (rows, cols) contiguous, `dtype`; add_* only
  void* mean = nullptr;             // (rows,) acc type; layer norm only, nullptr for rms
  void* rstd = nullptr;             // (rows,) acc type
  int64_t rows = 0;
  int64_t cols = 0;
  double eps = 1e-5;
  bool rms = false;                 // true: RMSNorm (no mean, no bias)
  DType dtype = DType::kFloat32;
};

struct BwdParams {
  const void* dy = nullptr;             // (rows, cols) in `dtype`
  int64_t dy_row_stride = 0;
  const void* dresidual_out = nullptr;  // (rows, cols) in `dtype` or nullptr; added to dx
  int64_t dresidual_out_row_stride = 0;
  const void* x = nullptr;              // (rows, cols) in `dtype`: what forward normalised
  int64_t x_row_stride = 0;
  const void* weight = nullptr;         // (cols,) acc type, or nullptr (= ones)
  const void* mean = nullptr;           // (rows,) acc type; layer norm only
  const void* rstd = nullptr;           // (rows,) acc type
  void* dx = nullptr;                   // (rows, cols) contiguous, `dtype`
  void* dweight = nullptr;              // (cols,) acc type, fully reduced over rows, or nullptr
  void* dbias = nullptr;                // (cols,) acc type, fully reduced over rows, or nullptr
  float* workspace = nullptr;           // CUDA only (no kFloat64 there): see
                                        // norm_bwd_cuda_workspace_floats
  int64_t rows = 0;
  int64_t cols = 0;
  bool rms = false;
  DType dtype = DType::kFloat32;
};

// CPU kernels (OpenMP over rows; AVX2/FMA when the CPU has it, scalar otherwise).
// All four dtypes.
void norm_fwd_cpu(const FwdParams& p);
void norm_bwd_cpu(const BwdParams& p);

}  // namespace norm
}  // namespace fastllm
