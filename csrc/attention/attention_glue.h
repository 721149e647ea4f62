// Torch glue of the attention family, shared by its devices (attention_ops.cpp for the CPU,
// attention_cuda_ops.cpp for CUDA and its SIMT emulation): argument checks whose messages
// name the argument with the expected and actual value, allocation of the outputs, the
// filling of attention.h's FwdParams / BwdParams from tensors, and the schema-shaped entry
// points of fastllm::attention_fwd / attention_bwd (csrc/schemas.h), each a template over a
// device's Kernels (the pattern of common/torch_glue.h):
//
//   struct Kernels {
//     static constexpr bool kSupportsMasks;            // attn_bias / key_padding_mask
//     static at::Tensor input(const at::Tensor& t);    // an input as the kernels read it
//     static void check_supported(const char* op, const at::Tensor& q);
//     static void fwd(const char* op, FwdParams& p, const at::Tensor& q);
//     static void bwd(const char* op, BwdParams& p, const at::Tensor& lse);
//   };
//
// fwd / bwd are called only for problems with queries and keys (empty ones are filled here);
// backward hands over lse, whose layout CUDA's D_i workspace copies.
//
// Shapes (attention.h's glossary): padded q (B, Tq, H, D), k / v (B, Tk, Hkv, D); packed
// (variable-length) q (total_q, H, D), k / v (total_k, Hkv, D) with int32 cu_seqlens_q /
// cu_seqlens_k (B + 1,) given together, and max_seqlen_q / max_seqlen_k the longest
// sequences. lse: (B, H, Tq) / (H, total_q) in the acc dtype (float32; float64 for float64).
//
// Value checks (cu_seqlens increasing from 0 to the token count, lengths within the maxima,
// seqused_k within the keys) read tensor values, so they run only where that costs no device
// synchronisation: on CPU tensors (the CPU kernels, and the CUDA kernels under the SIMT
// emulation). On a GPU the kernels clamp the values instead (attention_common.cuh,
// sequence_info): a bad value gives a wrong row, never an access outside the tensors.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "attention/attention.h"
#include "common/torch_glue.h"

namespace fastllm {
namespace attention {

// The largest head dim of every backend (FlashAttention's limit).
constexpr int64_t kMaxHeadDim = 256;

// The schema's options (FASTLLM_ATTENTION_OPTIONS in csrc/schemas.h), in its order.
struct Options {
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k, seqused_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  double softmax_scale = 0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0;
  std::optional<at::Tensor> alibi_slopes;
  double dropout_p = 0;
  std::optional<at::Tensor> dropout_seed;
  std::optional<at::Tensor> attn_bias, key_padding_mask;
};

// The options as the schema's functions take them, and passed on.
#define FASTLLM_ATTENTION_OPTION_PARAMS                                                     \
  const std::optional<at::Tensor>&cu_seqlens_q, const std::optional<at::Tensor>&cu_seqlens_k, \
      const std::optional<at::Tensor>&seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, \
      double softmax_scale, bool causal, int64_t window_left, int64_t window_right,          \
      double softcap, const std::optional<at::Tensor>&alibi_slopes, double dropout_p,         \
      const std::optional<at::Tensor>&dropout_seed, const std::optional<at::Tensor>&attn_bias, \
      const std::optional<at::Tensor>&key_padding_mask
#define FASTLLM_ATTENTION_OPTION_ARGS                                                    \
  cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, \
      window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed, attn_bias,    \
      key_padding_mask

inline Options make_options(FASTLLM_ATTENTION_OPTION_PARAMS) {
  return Options{FASTLLM_ATTENTION_OPTION_ARGS};
}

// Everything a kernel call needs, with the tensors the params point into kept alive.
struct Prepared {
  Problem problem;
  bool packed = false;
  at::Tensor cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dropout_seed;
  at::Tensor attn_bias, key_padding_mask;
};

inline Strides4 strides_of(const at::Tensor& t, bool packed) {
  Strides4 s;
  if (packed) {  // (total, heads, D)
    s.b = 0;
    s.t = t.stride(0);
    s.h = t.stride(1);
    s.d = t.stride(2);
  } else {  // (B, T, heads, D)
    s.b = t.stride(0);
    s.t = t.stride(1);
    s.h = t.stride(2);
    s.d = t.stride(3);
  }
  return s;
}

inline at::Tensor check_lengths_tensor(const char* op, const char* name, const at::Tensor& t,
                                       int64_t expected_len, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                   t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == expected_len, op, ": ", name, " must have shape [",
              expected_len, "], got ", shape_str(t.sizes()));
  check_same_device(q, "q", t, name, op);
  return t.contiguous();
}

// cu_seqlens values: 0 first, non-decreasing, `total` last, each length <= max_len.
inline void check_cu_seqlens_values(const char* op, const char* name, const at::Tensor& cu,
                                    int64_t total, int64_t max_len, const char* max_name) {
  const at::Tensor c = cu.cpu();
  const int32_t* v = c.data_ptr<int32_t>();
  const int64_t n = c.numel();
  TORCH_CHECK(v[0] == 0, op, ": ", name, "[0] must be 0, got ", v[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(v[i] >= v[i - 1], op, ": ", name, " must be non-decreasing, got ", name, "[",
                i - 1, "] = ", v[i - 1], " > ", name, "[", i, "] = ", v[i]);
    TORCH_CHECK(v[i] - v[i - 1] <= max_len, op, ": sequence ", i - 1, " has ", v[i] - v[i - 1],
                " tokens (from ", name, ") but ", max_name, " = ", max_len);
  }
  TORCH_CHECK(v[n - 1] == total, op, ": ", name, "[-1] must equal the number of packed tokens ",
              total, ", got ", v[n - 1]);
}

// Checks q, k, v and the options; fills the Problem (no data pointers yet).
inline Prepared prepare(const char* op, bool check_values, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, const Options& o) {
  Prepared r;
  Problem& p = r.problem;
  p.dtype = to_fastllm_dtype(q.scalar_type(), op, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ",
                   q.scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), op, ": v must have q's dtype ",
                   q.scalar_type(), ", got ", v.scalar_type());
  check_same_device(q, "q", k, "k", op);
  check_same_device(q, "q", v, "v", op);

  const bool has_cu_q = o.cu_seqlens_q.has_value() && o.cu_seqlens_q->defined();
  const bool has_cu_k = o.cu_seqlens_k.has_value() && o.cu_seqlens_k->defined();
  TORCH_CHECK(has_cu_q == has_cu_k, op,
              ": cu_seqlens_q and cu_seqlens_k must be given together (packed variable-length "
              "batches), got only ", has_cu_q ? "cu_seqlens_q" : "cu_seqlens_k");
  r.packed = has_cu_q;
  const int64_t rank = r.packed ? 3 : 4;
  const char* layout = r.packed ? "(total_tokens, heads, head_dim) with cu_seqlens"
                                : "(batch, seqlen, heads, head_dim)";
  TORCH_CHECK(q.dim() == rank, op, ": q must be ", layout, ", got shape ", shape_str(q.sizes()));
  TORCH_CHECK(k.dim() == rank, op, ": k must be ", layout, ", got shape ", shape_str(k.sizes()));
  TORCH_CHECK(v.dim() == rank, op, ": v must be ", layout, ", got shape ", shape_str(v.sizes()));
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got k ",
              shape_str(k.sizes()), " and v ", shape_str(v.sizes()));

  const int64_t D = q.size(-1);
  p.head_dim = D;
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, op, ": head_dim (q's last dim) must be in [1, ",
              kMaxHeadDim, "], got ", D);
  TORCH_CHECK(k.size(-1) == D, op, ": k must have q's head_dim ", D, ", got ", k.size(-1));
  p.num_heads = q.size(-2);
  p.num_kv_heads = k.size(-2);
  TORCH_CHECK(p.num_kv_heads >= 1 && p.num_heads % p.num_kv_heads == 0, op,
              ": the number of query heads (q.shape[-2] = ", p.num_heads,
              ") must be a multiple of the number of kv heads (k.shape[-2] = ", p.num_kv_heads,
              ")");

  if (r.packed) {
    const int64_t batch = o.cu_seqlens_q->numel() - 1;
    TORCH_CHECK(batch >= 0, op, ": cu_seqlens_q must have B + 1 >= 1 entries, got shape ",
                shape_str(o.cu_seqlens_q->sizes()));
    p.batch = batch;
    r.cu_seqlens_q = check_lengths_tensor(op, "cu_seqlens_q", *o.cu_seqlens_q, batch + 1, q);
    r.cu_seqlens_k = check_lengths_tensor(op, "cu_seqlens_k", *o.cu_seqlens_k, batch + 1, q);
    TORCH_CHECK(o.max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0, got ", o.max_seqlen_q);
    TORCH_CHECK(o.max_seqlen_k >= 0, op, ": max_seqlen_k must be >= 0, got ", o.max_seqlen_k);
    // No sequence is longer than the tokens packed: a larger maximum (a model's context
    // length, say) would only size the grid and the loops for nothing.
    p.seqlen_q = std::min<int64_t>(o.max_seqlen_q, q.size(0));
    p.seqlen_k = std::min<int64_t>(o.max_seqlen_k, k.size(0));
    if (check_values) {
      check_cu_seqlens_values(op, "cu_seqlens_q", r.cu_seqlens_q, q.size(0), o.max_seqlen_q,
                              "max_seqlen_q");
      check_cu_seqlens_values(op, "cu_seqlens_k", r.cu_seqlens_k, k.size(0), o.max_seqlen_k,
                              "max_seqlen_k");
    }
    p.cu_seqlens_q = r.cu_seqlens_q.data_ptr<int32_t>();
    p.cu_seqlens_k = r.cu_seqlens_k.data_ptr<int32_t>();
    p.total_q = q.size(0);
    p.total_k = k.size(0);
  } else {
    p.batch = q.size(0);
    TORCH_CHECK(k.size(0) == p.batch, op, ": k must have q's batch size ", p.batch, ", got ",
                k.size(0));
    p.seqlen_q = q.size(1);
    p.seqlen_k = k.size(1);
  }

  if (o.seqused_k.has_value() && o.seqused_k->defined()) {
    r.seqused_k = check_lengths_tensor(op, "seqused_k", *o.seqused_k, p.batch, q);
    if (check_values && p.batch > 0) {
      const at::Tensor used = r.seqused_k.cpu();
      const int32_t* u = used.data_ptr<int32_t>();
      const at::Tensor cuk = r.packed ? r.cu_seqlens_k.cpu() : at::Tensor();
      for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t avail =
            r.packed ? cuk.data_ptr<int32_t>()[b + 1] - cuk.data_ptr<int32_t>()[b] : p.seqlen_k;
        TORCH_CHECK(u[b] >= 0 && u[b] <= avail, op, ": seqused_k[", b, "] must be in [0, ",
                    avail, "] (the keys of sequence ", b, "), got ", u[b]);
      }
    }
    p.seqused_k = r.seqused_k.data_ptr<int32_t>();
  }

  if (o.alibi_slopes.has_value() && o.alibi_slopes->defined()) {
    const at::Tensor& a = *o.alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ",
                     a.scalar_type());
    const bool per_head = a.dim() == 1 && a.size(0) == p.num_heads;
    const bool per_batch = a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.num_heads;
    TORCH_CHECK(per_head || per_batch, op, ": alibi_slopes must have shape [", p.num_heads,
                "] or [", p.batch, ", ", p.num_heads, "], got ", shape_str(a.sizes()));
    check_same_device(q, "q", a, "alibi_slopes", op);
    r.alibi_slopes = a.contiguous();
    p.alibi_slopes = r.alibi_slopes.data_ptr<float>();
    p.alibi_stride_b = per_batch ? p.num_heads : 0;
  }

  TORCH_CHECK(o.dropout_p >= 0.0 && o.dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              o.dropout_p);
  p.dropout_p = o.dropout_p;
  if (o.dropout_p > 0.0) {
    TORCH_CHECK(o.dropout_seed.has_value() && o.dropout_seed->defined(), op,
                ": dropout_p = ", o.dropout_p, " > 0 needs dropout_seed (an int64 tensor of one "
                "element)");
    const at::Tensor& s = *o.dropout_seed;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, op, ": dropout_seed must be int64, got ",
                     s.scalar_type());
    TORCH_CHECK(s.numel() == 1, op, ": dropout_seed must have one element, got shape ",
                shape_str(s.sizes()));
    check_same_device(q, "q", s, "dropout_seed", op);
    r.dropout_seed = s.contiguous();
    p.dropout_seed = r.dropout_seed.data_ptr<int64_t>();
  }

  if (o.attn_bias.has_value() && o.attn_bias->defined()) {
    const at::Tensor& a = *o.attn_bias;
    TORCH_CHECK(!r.packed, op, ": attn_bias needs padded (B, T, heads, head_dim) inputs, not "
                "packed ones with cu_seqlens");
    TORCH_CHECK_TYPE(a.scalar_type() == q.scalar_type(), op, ": attn_bias must have q's dtype ",
                     q.scalar_type(), ", got ", a.scalar_type());
    const std::vector<int64_t> want = {p.batch, p.num_heads, p.seqlen_q, p.seqlen_k};
    TORCH_CHECK(a.sizes() == at::IntArrayRef(want), op, ": attn_bias must have shape ",
                shape_str(want), " (B, H, Tq, Tk; broadcast dims as stride-0 views, e.g. "
                "bias.expand(...)), got ", shape_str(a.sizes()));
    check_same_device(q, "q", a, "attn_bias", op);
    r.attn_bias = a;
    p.attn_bias = a.data_ptr();
    p.bias_stride_b = a.stride(0);
    p.bias_stride_h = a.stride(1);
    p.bias_stride_q = a.stride(2);
    p.bias_stride_k = a.stride(3);
  }
  if (o.key_padding_mask.has_value() && o.key_padding_mask->defined()) {
    const at::Tensor& m = *o.key_padding_mask;
    TORCH_CHECK(!r.packed, op, ": key_padding_mask needs padded (B, T, heads, head_dim) inputs, "
                "not packed ones with cu_seqlens (they carry their lengths)");
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op,
                     ": key_padding_mask must be bool (True = take part), got ", m.scalar_type());
    const std::vector<int64_t> want = {p.batch, p.seqlen_k};
    TORCH_CHECK(m.sizes() == at::IntArrayRef(want), op, ": key_padding_mask must have shape ",
                shape_str(want), " (B, Tk), got ", shape_str(m.sizes()));
    check_same_device(q, "q", m, "key_padding_mask", op);
    r.key_padding_mask = m;
    p.key_padding_mask = reinterpret_cast<const uint8_t*>(m.data_ptr());
    p.kpm_stride_b = m.stride(0);
    p.kpm_stride_k = m.stride(1);
  }

  TORCH_CHECK(o.window_left >= -1, op, ": window_left must be >= 0 or -1 (unbounded), got ",
              o.window_left);
  TORCH_CHECK(o.window_right >= -1, op, ": window_right must be >= 0 or -1 (unbounded), got ",
              o.window_right);
  TORCH_CHECK(o.softcap >= 0.0 && o.softcap <= std::numeric_limits<float>::max(), op,
              ": softcap must be >= 0 (0 disables it) and finite in float32, got ", o.softcap);
  p.softmax_scale = o.softmax_scale;
  p.causal = o.causal;
  // A window wider than every distance between a query and a key is unbounded (-1): the
  // kernels hold window sizes in 32 bits.
  const int64_t widest = p.seqlen_q + p.seqlen_k;
  p.window_left = o.window_left > widest ? -1 : o.window_left;
  p.window_right = o.window_right > widest ? -1 : o.window_right;
  p.softcap = o.softcap;
  return r;
}

inline at::ScalarType lse_dtype(const at::Tensor& q) { return acc_dtype(q.scalar_type()); }

inline std::vector<int64_t> lse_shape(const Prepared& r, const at::Tensor& q) {
  if (r.packed) return {r.problem.num_heads, q.size(0)};
  return {r.problem.batch, r.problem.num_heads, r.problem.seqlen_q};
}

inline void set_lse_strides(Problem& p, const Prepared& r, const at::Tensor& lse) {
  if (r.packed) {
    p.lse_stride_b = 0;
    p.lse_stride_h = lse.stride(0);
  } else {
    p.lse_stride_b = lse.stride(0);
    p.lse_stride_h = lse.stride(1);
  }
}

// How a device's kernels want an input tensor (Kernels::input): the tensor itself when they
// can read its layout, else a copy (CUDA's 16-byte tile loads need aligned rows; the CPU
// kernels read any strides).
using KernelInput = at::Tensor (*)(const at::Tensor&);

// Points a kernel operand at `t`: its data and its (B, T, heads, D) strides.
template <class Ptr>
inline void bind(const at::Tensor& t, bool packed, Ptr& data, Strides4& strides) {
  data = t.data_ptr();
  strides = strides_of(t, packed);
}

// The params forward and backward share: the problem, q, k, v, out and lse (a FwdCall or
// BwdCall whose tensors are set).
template <class Call>
void bind_common(Call& c) {
  const bool packed = c.prepared.packed;
  auto& p = c.params;
  static_cast<Problem&>(p) = c.prepared.problem;
  bind(c.q, packed, p.q, p.stride_q);
  bind(c.k, packed, p.k, p.stride_k);
  bind(c.v, packed, p.v, p.stride_v);
  bind(c.out, packed, p.out, p.stride_out);
  p.lse = c.lse.data_ptr();
  set_lse_strides(p, c.prepared, c.lse);
}

struct FwdCall {
  Prepared prepared;
  FwdParams params;
  at::Tensor q, k, v;  // as the kernel reads them
  at::Tensor out, lse;
};

inline FwdCall prepare_fwd(const char* op, bool check_values, KernelInput kernel_input,
                           const at::Tensor& q_in, const at::Tensor& k_in,
                           const at::Tensor& v_in, const Options& o) {
  FwdCall c;
  c.prepared = prepare(op, check_values, q_in, k_in, v_in, o);
  c.q = kernel_input(q_in);
  c.k = kernel_input(k_in);
  c.v = kernel_input(v_in);
  // On the CPU a large output comes from the output cache (torch_glue.h's empty_output):
  // the kernels write every element of out, dq, dk and dv.
  c.out = empty_contiguous_like(op, c.q);
  c.lse = at::empty(lse_shape(c.prepared, c.q), c.q.options().dtype(lse_dtype(c.q)));
  bind_common(c);
  // Under autograd the inputs a backward differentiates require grad (inside a custom op's
  // autograd forward, grad mode is off but they still do); attn_bias takes other kernels.
  c.params.no_backward = !(q_in.requires_grad() || k_in.requires_grad() || v_in.requires_grad());
  return c;
}

// True when no kernel needs to run: no query row, or no key at all (every row then attends
// to nothing: out = 0, lse = -inf, zero gradients; see fill_empty_fwd / fill_empty_bwd).
inline bool empty_problem(const Problem& p) {
  return p.batch == 0 || p.seqlen_q == 0 || p.seqlen_k == 0 || p.num_heads == 0;
}

inline void fill_empty_fwd(FwdCall& c) {
  c.out.zero_();
  c.lse.fill_(-std::numeric_limits<double>::infinity());
}

struct BwdCall {
  Prepared prepared;
  BwdParams params;
  at::Tensor dout, q, k, v, out, lse;  // as the kernel reads them
  at::Tensor dq, dk, dv, dbias;
};

inline BwdCall prepare_bwd(const char* op, bool check_values, KernelInput kernel_input,
                           const at::Tensor& dout_in, const at::Tensor& q_in,
                           const at::Tensor& k_in, const at::Tensor& v_in,
                           const at::Tensor& out_in, const at::Tensor& lse_in,
                           const Options& o, bool bias_grad) {
  BwdCall c;
  c.prepared = prepare(op, check_values, q_in, k_in, v_in, o);
  const bool packed = c.prepared.packed;
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), op, ": out must have q's shape ",
              shape_str(q_in.sizes()), ", got ", shape_str(out_in.sizes()));
  TORCH_CHECK(dout_in.sizes() == q_in.sizes(), op, ": dout must have q's shape ",
              shape_str(q_in.sizes()), ", got ", shape_str(dout_in.sizes()));
  check_same_device(q_in, "q", out_in, "out", op);
  check_same_device(q_in, "q", dout_in, "dout", op);
  check_same_device(q_in, "q", lse_in, "lse", op);
  const std::vector<int64_t> want_lse = lse_shape(c.prepared, q_in);
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(want_lse), op, ": lse must have shape ",
              shape_str(want_lse), " (forward's lse), got ", shape_str(lse_in.sizes()));
  TORCH_CHECK_TYPE(lse_in.scalar_type() == lse_dtype(q_in), op, ": lse must be ",
                   lse_dtype(q_in), " (forward's lse), got ", lse_in.scalar_type());
  // Autograd may hand over a gradient in another float dtype or with zero strides.
  c.dout = kernel_input(dout_in.to(q_in.scalar_type()));
  c.out = kernel_input(out_in.to(q_in.scalar_type()));
  c.q = kernel_input(q_in);
  c.k = kernel_input(k_in);
  c.v = kernel_input(v_in);
  // Compact like forward's (a no-op for it): CUDA lays its D_i workspace out with lse's
  // strides.
  c.lse = lse_in.contiguous();
  c.dq = empty_contiguous_like(op, c.q);
  // The kernels write every row of dk / dv, zeros for stored keys past seqused_k.
  c.dk = empty_contiguous_like(op, c.k);
  c.dv = empty_contiguous_like(op, c.v);
  const Problem& pr = c.prepared.problem;
  TORCH_CHECK(!bias_grad || pr.attn_bias != nullptr, op,
              ": bias_grad=True needs attn_bias (the bias to differentiate)");
  if (bias_grad) {
    // Zeroed: the kernels store the scores they compute and may skip masked tiles.
    c.dbias =
        empty_output(op, {pr.batch, pr.num_heads, pr.seqlen_q, pr.seqlen_k}, c.q.options());
    c.dbias.zero_();
  } else {
    c.dbias = at::empty({0}, c.q.options());
  }
  bind_common(c);
  BwdParams& p = c.params;
  if (bias_grad) p.dbias = c.dbias.data_ptr();
  bind(c.dout, packed, p.dout, p.stride_dout);
  bind(c.dq, packed, p.dq, p.stride_dq);
  bind(c.dk, packed, p.dk, p.stride_dk);
  bind(c.dv, packed, p.dv, p.stride_dv);
  return c;
}

// A backend whose kernels do not take attn_bias / key_padding_mask (yet): an error naming them.
template <class Kernels>
void check_masks_supported(const char* op, const Problem& p) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      Kernels::kSupportsMasks || (p.attn_bias == nullptr && p.key_padding_mask == nullptr), op,
      ": attn_bias / key_padding_mask are not supported by these kernels yet");
}

inline void fill_empty_bwd(BwdCall& c) {
  c.dq.zero_();
  c.dk.zero_();
  c.dv.zero_();
}

// ---- schema-shaped entry points --------------------------------------------------

template <class Kernels>
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 FASTLLM_ATTENTION_OPTION_PARAMS) {
  const char* op = "attention";
  FwdCall c = prepare_fwd(op, q.is_cpu(), &Kernels::input, q, k, v,
                          make_options(FASTLLM_ATTENTION_OPTION_ARGS));
  Kernels::check_supported(op, q);
  check_masks_supported<Kernels>(op, c.params);
  if (empty_problem(c.params)) {
    fill_empty_fwd(c);
  } else {
    Kernels::fwd(op, c.params, c.q);
  }
  return {c.out, c.lse};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, FASTLLM_ATTENTION_OPTION_PARAMS,
    bool bias_grad) {
  const char* op = "attention_bwd";
  BwdCall c = prepare_bwd(op, q.is_cpu(), &Kernels::input, dout, q, k, v, out, lse,
                          make_options(FASTLLM_ATTENTION_OPTION_ARGS), bias_grad);
  Kernels::check_supported(op, q);
  check_masks_supported<Kernels>(op, c.params);
  if (empty_problem(c.params)) {
    fill_empty_bwd(c);
  } else {
    Kernels::bwd(op, c.params, c.lse);
  }
  return {c.dq, c.dk, c.dv, c.dbias};
}

template <class Kernels>
void register_attention_ops(torch::Library& m) {
  m.impl("attention_fwd", &attention_fwd<Kernels>);
  m.impl("attention_bwd", &attention_bwd<Kernels>);
}

}  // namespace attention
}  // namespace fastllm
