// Torch glue of the rotary family, shared by its devices (rotary_ops.cpp for the CPU,
// rotary_cuda_ops.cpp for CUDA and its SIMT emulation): argument checks whose messages name
// the argument, allocation of the outputs, the filling of rotary.h's Params, and the
// schema-shaped entry points of fastllm::rotary_fwd, rotary_fwd_inplace, rotary_qk_fwd and
// rotary_qk_fwd_inplace (csrc/schemas.h), templates over a device's Kernels (the pattern of
// common/torch_glue.h). Backward is the same op with conjugate = true (rotary.h).
//
// Shapes: x, q (B, T, H, D) and k (B, T, Hkv, D), or packed (total, H, D) with cu_seqlens
// (B + 1,) int32; cos, sin (max_T, R / 2) float32 or x's dtype, R = rotary_dim <= D;
// position_ids (B,) per-sequence offsets or (B, T) positions, int32 or int64. Inputs may have
// any strides with a unit feature stride (q sliced out of a fused qkv projection is read in
// place); other layouts are copied once (and, in place, copied back). Out-of-place outputs
// are contiguous. On CPU tensors the values are checked too (cu_seqlens, every position
// within cos's rows); on CUDA the kernels clamp positions instead (rotary.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "common/torch_glue.h"
#include "rotary/rotary.h"

namespace fastllm {
namespace rotary {

// The problem without its operands: positions, angles, layout; and the tensors kept alive.
struct Problem {
  Params p;
  bool packed = false;
  at::Tensor keep_cos, keep_sin, keep_positions, keep_cu_seqlens;
};

// A dtype as Python spells it ("torch.float16"; c10 prints "Half").
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline void check_operand(const char* op, const char* name, const at::Tensor& t, bool packed) {
  to_fastllm_dtype(t.scalar_type(), op, name);
  if (packed) {
    TORCH_CHECK(t.dim() == 3, op, ": ", name,
                " must be (total, heads, D) when cu_seqlens is given, got shape ",
                shape_str(t.sizes()));
  } else {
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be (B, T, heads, D), got shape ",
                shape_str(t.sizes()));
  }
}

// cu_seqlens' values on the CPU: 0, non-decreasing, ending at total.
inline void check_cu_seqlens_values(const char* op, const at::Tensor& cu, int64_t total) {
  const at::Tensor c = cu.contiguous();
  const int32_t* v = c.data_ptr<int32_t>();
  const int64_t n = c.numel();
  TORCH_CHECK_VALUE(v[0] == 0, op, ": cu_seqlens must start at 0, got ", v[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(v[i] >= v[i - 1], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[",
                i, "] = ", v[i], " < cu_seqlens[", i - 1, "] = ", v[i - 1]);
  }
  TORCH_CHECK_VALUE(v[n - 1] == total, op, ": cu_seqlens must end at the number of packed tokens ",
              total, ", got ", v[n - 1]);
}

// Every position the problem uses lies in [0, cos_rows) (CPU tensors only).
inline void check_position_values(const char* op, const Params& p) {
  int64_t lo = 0, hi = -1;
  bool any = false;
  // Per sequence: its length and the range of its positions.
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t start = p.cu_seqlens != nullptr ? p.cu_seqlens[b] : b * p.seqlen;
    const int64_t len = p.cu_seqlens != nullptr ? p.cu_seqlens[b + 1] - start : p.seqlen;
    if (len <= 0) continue;
    int64_t first, last;
    if (p.mode == PositionMode::kPerToken) {
      first = last = position_of_row(p, start);
      for (int64_t r = start + 1; r < start + len; ++r) {
        const int64_t pos = position_of_row(p, r);
        first = std::min(first, pos);
        last = std::max(last, pos);
      }
    } else {
      first = position_of_row(p, start);
      last = first + len - 1;
    }
    lo = any ? std::min(lo, first) : first;
    hi = any ? std::max(hi, last) : last;
    any = true;
  }
  if (!any) return;
  TORCH_CHECK_VALUE(lo >= 0, op, ": positions must be >= 0, got position ", lo,
              " (from position_ids / the position offset)");
  TORCH_CHECK_VALUE(hi < p.cos_rows, op,
                    ": cos and sin must have a row per position used: they have ",
              p.cos_rows, " rows (max_T), but position ", hi,
              " is used (from position_ids / the position offset and the sequence length); "
              "grow the cos / sin cache");
}

// Checks everything but the operands' own layout and fills p's angles, positions and
// options. `x` is the first operand (q), which sets the dtype, device and shape rules.
inline Problem prepare(const char* op, const at::Tensor& x, const at::Tensor& cos,
                       const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                       const c10::optional<at::Tensor>& cu_seqlens, int64_t position_offset,
                       bool interleaved, bool conjugate) {
  Problem pr;
  Params& p = pr.p;
  pr.packed = cu_seqlens.has_value() && cu_seqlens->defined();
  const char* xname = "x";
  check_operand(op, xname, x, pr.packed);
  p.dtype = to_fastllm_dtype(x.scalar_type(), op, xname);
  // cos / sin
  TORCH_CHECK(cos.dim() == 2, op, ": cos must be (max_T, rotary_dim / 2), got shape ",
              shape_str(cos.sizes()));
  TORCH_CHECK_TYPE(cos.scalar_type() == at::kFloat || cos.scalar_type() == x.scalar_type(), op,
                   ": cos must be float32 or x's dtype ", dtype_name(x.scalar_type()), ", got ",
                   dtype_name(cos.scalar_type()));
  check_like(op, cos, "cos", sin, "sin");
  check_same_device(x, "x", cos, "cos", op);
  const int64_t head_dim = x.size(-1);
  const int64_t rotary_dim = 2 * cos.size(1);
  TORCH_CHECK(rotary_dim >= 2, op, ": cos must have at least one column (rotary_dim / 2), got "
              "shape ", shape_str(cos.sizes()));
  TORCH_CHECK(rotary_dim <= head_dim, op, ": rotary_dim = 2 * cos.shape[-1] = ", rotary_dim,
              " must be <= the head dim D = ", head_dim, " of x");
  p.head_dim = head_dim;
  p.rotary_dim = rotary_dim;
  p.cos_rows = cos.size(0);
  p.cos_dtype = to_fastllm_dtype(cos.scalar_type(), op, "cos");
  pr.keep_cos = cos.size(1) > 1 && cos.stride(1) != 1 ? cos.contiguous() : cos;
  pr.keep_sin = sin.size(1) > 1 && sin.stride(1) != 1 ? sin.contiguous() : sin;
  p.cos = pr.keep_cos.data_ptr();
  p.sin = pr.keep_sin.data_ptr();
  p.cos_row_stride = pr.keep_cos.stride(0);
  p.sin_row_stride = pr.keep_sin.stride(0);
  // layout
  if (pr.packed) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
                     dtype_name(cu.scalar_type()));
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, op,
                ": cu_seqlens must be (B + 1,) with B >= 1, got shape ", shape_str(cu.sizes()));
    check_same_device(x, "x", cu, "cu_seqlens", op);
    p.batch = cu.size(0) - 1;
    p.seqlen = x.size(0);
    if (cu.device().is_cpu()) check_cu_seqlens_values(op, cu, x.size(0));
  } else {
    p.batch = x.size(0);
    p.seqlen = x.size(1);
  }
  // positions
  p.position_offset = position_offset;
  if (position_ids.has_value() && position_ids->defined()) {
    const at::Tensor& pos = *position_ids;
    TORCH_CHECK_TYPE(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt, op,
                     ": position_ids must be int64 or int32, got ", dtype_name(pos.scalar_type()));
    check_same_device(x, "x", pos, "position_ids", op);
    if (pos.dim() == 1) {
      TORCH_CHECK(pos.size(0) == p.batch, op,
                  ": position_ids must be (B,) per-sequence offsets with B = ", p.batch,
                  " or (B, T) positions, got shape ", shape_str(pos.sizes()));
      p.mode = PositionMode::kPerSeq;
    } else {
      TORCH_CHECK(!pr.packed && pos.dim() == 2 && pos.size(0) == p.batch &&
                      pos.size(1) == p.seqlen,
                  op, ": position_ids must be (B,) per-sequence offsets or (B, T) = [", p.batch,
                  ", ", p.seqlen, "] positions", pr.packed ? " ((B,) only with cu_seqlens)" : "",
                  ", got shape ", shape_str(pos.sizes()));
      p.mode = PositionMode::kPerToken;
    }
    pr.keep_positions = pos.to(at::kLong);
    p.positions = pr.keep_positions.data_ptr<int64_t>();
    p.positions_batch_stride = pr.keep_positions.stride(0);
    p.positions_token_stride = p.mode == PositionMode::kPerToken ? pr.keep_positions.stride(1) : 0;
  }
  if (pr.packed) {
    pr.keep_cu_seqlens = cu_seqlens->contiguous();
    p.cu_seqlens = pr.keep_cu_seqlens.data_ptr<int32_t>();
  }
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  return pr;
}

// Whether an operand of rows x heads x D has a unit feature stride (or D == 1).
inline bool unit_features(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

inline void set_in(Operand& o, const at::Tensor& t, bool packed) {
  o.in = t.data_ptr();
  o.heads = t.size(-2);
  if (packed) {
    o.in_row_stride = t.stride(0);
    o.in_head_stride = t.stride(1);
  } else {
    o.in_batch_stride = t.stride(0);
    o.in_row_stride = t.stride(1);
    o.in_head_stride = t.stride(2);
  }
}

inline void set_out(Operand& o, const at::Tensor& t, bool packed) {
  o.out = t.data_ptr();
  if (packed) {
    o.out_row_stride = t.stride(0);
    o.out_head_stride = t.stride(1);
  } else {
    o.out_batch_stride = t.stride(0);
    o.out_row_stride = t.stride(1);
    o.out_head_stride = t.stride(2);
  }
}

// k must match q but for its number of heads.
inline void check_k(const char* op, const at::Tensor& q, const at::Tensor& k, bool packed) {
  check_operand(op, "k", k, packed);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k must have the dtype of q ",
                   dtype_name(q.scalar_type()), ", got ", dtype_name(k.scalar_type()));
  check_same_device(q, "q", k, "k", op);
  const bool same = packed ? k.size(0) == q.size(0) && k.size(2) == q.size(2)
                           : k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                                 k.size(3) == q.size(3);
  TORCH_CHECK(same, op, ": k must have q's shape ", shape_str(q.sizes()),
              " but for its number of heads, got ", shape_str(k.sizes()));
}

inline bool empty_problem(const Params& p) {
  return p.batch == 0 || p.seqlen == 0 || p.head_dim == 0 || p.q.heads + p.k.heads == 0;
}

template <class Kernels>
void run(const char* op, Problem& pr, const at::Tensor& like) {
  Params& p = pr.p;
  if (empty_problem(p)) return;
  if (like.device().is_cpu()) check_position_values(op, p);
  Kernels::check_dtype(op, "x", p.dtype);
  Kernels::fwd(op, p, like);
}

template <class Kernels>
at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const c10::optional<at::Tensor>& position_ids,
                      const c10::optional<at::Tensor>& cu_seqlens, int64_t position_offset,
                      bool interleaved, bool conjugate) {
  const char* op = "rotary_fwd";
  Problem pr = prepare(op, x, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
                       conjugate);
  const at::Tensor in = unit_features(x) ? x : x.contiguous();
  at::Tensor out = empty_contiguous_like(op, x);
  set_in(pr.p.q, in, pr.packed);
  set_out(pr.p.q, out, pr.packed);
  pr.p.copy_rest = true;
  run<Kernels>(op, pr, x);
  return out;
}

template <class Kernels>
void rotary_fwd_inplace(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const c10::optional<at::Tensor>& position_ids,
                        const c10::optional<at::Tensor>& cu_seqlens, int64_t position_offset,
                        bool interleaved, bool conjugate) {
  const char* op = "rotary_fwd_inplace";
  Problem pr = prepare(op, x, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
                       conjugate);
  const bool direct = unit_features(x);
  at::Tensor work = direct ? x : x.contiguous();
  set_in(pr.p.q, work, pr.packed);
  set_out(pr.p.q, work, pr.packed);
  run<Kernels>(op, pr, x);
  if (!direct) x.copy_(work);
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> rotary_qk_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
    const c10::optional<at::Tensor>& position_ids, const c10::optional<at::Tensor>& cu_seqlens,
    int64_t position_offset, bool interleaved, bool conjugate) {
  const char* op = "rotary_qk_fwd";
  Problem pr = prepare(op, q, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
                       conjugate);
  check_k(op, q, k, pr.packed);
  const at::Tensor q_in = unit_features(q) ? q : q.contiguous();
  const at::Tensor k_in = unit_features(k) ? k : k.contiguous();
  at::Tensor q_out = empty_contiguous_like(op, q);
  at::Tensor k_out = empty_contiguous_like(op, k);
  set_in(pr.p.q, q_in, pr.packed);
  set_out(pr.p.q, q_out, pr.packed);
  set_in(pr.p.k, k_in, pr.packed);
  set_out(pr.p.k, k_out, pr.packed);
  pr.p.copy_rest = true;
  run<Kernels>(op, pr, q);
  return {q_out, k_out};
}

template <class Kernels>
void rotary_qk_fwd_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                           const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                           const c10::optional<at::Tensor>& cu_seqlens, int64_t position_offset,
                           bool interleaved, bool conjugate) {
  const char* op = "rotary_qk_fwd_inplace";
  Problem pr = prepare(op, q, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
                       conjugate);
  check_k(op, q, k, pr.packed);
  TORCH_CHECK(!q.is_same(k), op, ": q and k must be different tensors");
  const bool q_direct = unit_features(q), k_direct = unit_features(k);
  at::Tensor q_work = q_direct ? q : q.contiguous();
  at::Tensor k_work = k_direct ? k : k.contiguous();
  set_in(pr.p.q, q_work, pr.packed);
  set_out(pr.p.q, q_work, pr.packed);
  set_in(pr.p.k, k_work, pr.packed);
  set_out(pr.p.k, k_work, pr.packed);
  run<Kernels>(op, pr, q);
  if (!q_direct) q.copy_(q_work);
  if (!k_direct) k.copy_(k_work);
}

template <class Kernels>
void register_rotary_ops(torch::Library& m) {
  m.impl("rotary_fwd", &rotary_fwd<Kernels>);
  m.impl("rotary_fwd_inplace", &rotary_fwd_inplace<Kernels>);
  m.impl("rotary_qk_fwd", &rotary_qk_fwd<Kernels>);
  m.impl("rotary_qk_fwd_inplace", &rotary_qk_fwd_inplace<Kernels>);
}

}  // namespace rotary
}  // namespace fastllm
