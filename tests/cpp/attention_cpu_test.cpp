// attention_fwd_cpu / attention_bwd_cpu (csrc/attention/attention.h) against a naive
// double-precision reference written straight from the math in attention.h: out, lse, dq, dk
// and dv for float32, bfloat16, float16 and float64, over
//   - masks: causal and not, sliding windows, Tq != Tk both ways (Tq > Tk causal has fully
//     masked rows: out = 0, lse = -inf, zero gradients), no keys and no queries;
//   - shapes: lengths 1 to 300 over several key / query blocks, GQA (H=4, Hkv=2) and MQA
//     (Hkv=1), head dims 32, 64, 96, 128 (and 33, which the kernel pads);
//   - layouts of every input and output: contiguous (B, T, H, D), head-major with padded
//     rows, a head dim stride of 2; lse (B, H, Tq) / (H, total_q) with and without padding
//     between its rows;
//   - packed variable-length batches (cu_seqlens_q / _k, lengths 0, 1 and up to 300, Tq_b
//     both above and below Tk_b), seqused_k below the stored key count (padded and packed
//     keys, packed queries against a padded cache), whose unused keys must get dk = dv = 0;
//   - logit soft-capping, ALiBi with (H,) and (B, H) slopes, dropout (the reference draws
//     the same hash from attention.h), each alone and combined with the others and with GQA,
//     windows and varlen;
//   - key_padding_mask (right padding, random keys, a fully padded sequence) and attn_bias
//     (full, or (B, 1, 1, Tk) broadcast with -inf entries and all -inf rows), with dbias,
//     alone and with causal, windows, softcap, ALiBi, dropout and GQA;
// and: both backward schemes (1 and 16 OpenMP threads); bitwise equal results for 1 and 3
// threads (with every feature on; they also run different backward schemes);
// dropout's mask element for element and its kept fraction (v = identity makes out = z p
// visible), same seed -> same bits,
// another seed -> other output; bad problems rejected with the argument named.
// ctest runs this binary on the best instruction set of the machine (AVX-512 where the CPU
// has it) and with FASTLLM_CPU_ISA=scalar; FASTLLM_CPU_ISA=avx2 runs the AVX2 path.
//
// Storage outside a tensor's elements is NaN, so a kernel that reads it shows up as NaN, and
// one that writes it is caught by written_outside() (lse included).
//
// Tolerances: |x - ref| <= tol * max(max|ref|, 1) + tol * |ref| per tensor, tol a few units
// of the dtype's rounding (the inputs are exactly representable, so only the final rounding
// and the fp32 accumulation differ from the reference) -- 2e-5 for float32. The floor of 1:
// inputs are standard normal, so the summed terms are O(1) even where the exact result is 0
// (one key: p = 1 and ds = 0, but the kernel's p is 1 to within a few ulp).
#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention/attention.h"
#include "check.h"
#include "common/cpu_features.h"
#include "dtypes.h"

namespace {

using fastllm::attention::BwdParams;
using fastllm::attention::FwdParams;
using fastllm::attention::Strides4;
using namespace fastllm_test;  // check.h, dtypes.h

// A few units of each dtype's rounding (see the file comment).
template <class T>
constexpr double kTol = per_dtype<T>(2e-5, 1.0 / 64, 1.0 / 256, 1e-12);

enum class Layout { kContiguous, kHeadMajorPadded, kDimStride2 };

// A (B, T, heads, D) tensor of T stored in one of the layouts; unused storage is NaN.
template <class T>
struct Tensor {
  int64_t B, L, Hx, D;
  Strides4 stride;
  std::vector<T> data;

  Tensor(int64_t B_, int64_t L_, int64_t Hx_, int64_t D_, Layout layout)
      : B(B_), L(L_), Hx(Hx_), D(D_) {
    switch (layout) {
      case Layout::kContiguous:
        stride = {L * Hx * D, Hx * D, D, 1};
        break;
      case Layout::kHeadMajorPadded:
        stride = {Hx * L * (D + 3), D + 3, L * (D + 3), 1};
        break;
      case Layout::kDimStride2:
        stride = {L * Hx * 2 * D, Hx * 2 * D, 2 * D, 2};
        break;
    }
    const int64_t size = std::max<int64_t>(1, B * stride.b);
    data.assign(size, from_acc<T>(std::numeric_limits<AccOf<T>>::quiet_NaN()));
  }
  int64_t index(int64_t b, int64_t t, int64_t h, int64_t d) const {
    return b * stride.b + t * stride.t + h * stride.h + d * stride.d;
  }
  double get(int64_t b, int64_t t, int64_t h, int64_t d) const {
    return static_cast<double>(to_acc(data[index(b, t, h, d)]));
  }
  void set(int64_t b, int64_t t, int64_t h, int64_t d, double v) {
    data[index(b, t, h, d)] = from_acc<T>(static_cast<AccOf<T>>(v));
  }
  // Storage positions that are not elements of the tensor but no longer hold NaN.
  long written_outside() const {
    std::vector<char> inside(data.size(), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < L; ++t)
        for (int64_t h = 0; h < Hx; ++h)
          for (int64_t d = 0; d < D; ++d) inside[index(b, t, h, d)] = 1;
    long written = 0;
    for (size_t e = 0; e < data.size(); ++e) written += !inside[e] && !std::isnan(to_acc(data[e]));
    return written;
  }
  void fill_random(std::mt19937& rng) {
    std::normal_distribution<double> normal(0.0, 1.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < L; ++t)
        for (int64_t h = 0; h < Hx; ++h)
          for (int64_t d = 0; d < D; ++d) set(b, t, h, d, normal(rng));
  }
};

enum class Alibi { kOff, kPerHead, kPerBatchHead };
// key_padding_mask (padded batches only): sequence 0 keeps every key, the last one none, the
// others a prefix (right padding) or random keys.
enum class Kpm { kOff, kRight, kRandom };
// attn_bias: a full (B, H, Tq, Tk) tensor, or (B, 1, 1, Tk) broadcast as stride-0 dims with
// -inf entries (sequence 1: -inf everywhere, so its rows give zeros, never NaN).
enum class Bias { kOff, kFull, kKeysInf };

struct Case {
  int64_t B = 0, Tq = 0, Tk = 0;  // taken from seqlens_q / _k when given
  int64_t H = 0, Hkv = 0, D = 0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  Layout layout = Layout::kContiguous;
  double softcap = 0;
  std::vector<int> seqlens_q = {};  // non-empty: packed queries, one length per sequence
  std::vector<int> seqlens_k = {};  // non-empty: packed keys / values
  std::vector<int> seqused_k = {};  // non-empty: keys used per sequence
  Alibi alibi = Alibi::kOff;
  double dropout_p = 0;
  int64_t seed = 0;
  int64_t lse_pad = 0;  // unused elements after each lse row
  Kpm kpm = Kpm::kOff;
  Bias bias = Bias::kOff;
};

std::string join(const std::vector<int>& v) {
  std::string s = "{";
  for (size_t e = 0; e < v.size(); ++e) {
    if (e > 0) s += ',';
    s += std::to_string(v[e]);
  }
  return s + "}";
}

std::string describe(const Case& c, const char* dtype) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "%s B=%lld Tq=%lld Tk=%lld H=%lld Hkv=%lld D=%lld causal=%d window=(%lld,%lld) "
                "layout=%d softcap=%g seqlens_q=%s seqlens_k=%s seqused_k=%s alibi=%d "
                "dropout=%g seed=%lld lse_pad=%lld kpm=%d bias=%d",
                dtype, (long long)c.B, (long long)c.Tq, (long long)c.Tk, (long long)c.H,
                (long long)c.Hkv, (long long)c.D, (int)c.causal, (long long)c.window_left,
                (long long)c.window_right, (int)c.layout, c.softcap, join(c.seqlens_q).c_str(),
                join(c.seqlens_k).c_str(), join(c.seqused_k).c_str(), (int)c.alibi, c.dropout_p,
                (long long)c.seed, (long long)c.lse_pad, (int)c.kpm, (int)c.bias);
  return buf;
}

// Per-sequence lengths and where a case's rows live: a padded tensor is (B, T, heads, D), a
// packed one (1, total, heads, D) with sequence b's rows from cu[b].
struct Geometry {
  int64_t B, Tq, Tk;  // Tq, Tk: the maxima (Problem::seqlen_q / _k)
  std::vector<int32_t> cu_q, cu_k, used_k;  // empty when not packed / not given
  std::vector<int64_t> len_q, len_k_stored, len_k;
  int64_t lse_stride_b, lse_stride_h, lse_size;

  explicit Geometry(const Case& c) {
    B = c.seqlens_q.empty() ? c.B : static_cast<int64_t>(c.seqlens_q.size());
    Tq = c.Tq, Tk = c.Tk;
    auto prefix = [](const std::vector<int>& lens, int64_t& max_len) {
      std::vector<int32_t> cu{0};
      max_len = 0;
      for (int n : lens) cu.push_back(cu.back() + n), max_len = std::max<int64_t>(max_len, n);
      return cu;
    };
    if (!c.seqlens_q.empty()) cu_q = prefix(c.seqlens_q, Tq);
    if (!c.seqlens_k.empty()) cu_k = prefix(c.seqlens_k, Tk);
    used_k.assign(c.seqused_k.begin(), c.seqused_k.end());
    for (int64_t b = 0; b < B; ++b) {
      len_q.push_back(cu_q.empty() ? Tq : cu_q[b + 1] - cu_q[b]);
      len_k_stored.push_back(cu_k.empty() ? Tk : cu_k[b + 1] - cu_k[b]);
      len_k.push_back(used_k.empty() ? len_k_stored[b] : used_k[b]);
    }
    lse_stride_h = q_rows() + c.lse_pad;
    lse_stride_b = cu_q.empty() ? c.H * lse_stride_h : 0;
    lse_size = std::max<int64_t>(1, (cu_q.empty() ? B : 1) * c.H * lse_stride_h);
  }
  // The (batch, t) of a query / key tensor holding row i of sequence b.
  using Row = std::pair<int64_t, int64_t>;
  Row q_row(int64_t b, int64_t i) const { return cu_q.empty() ? Row{b, i} : Row{0, cu_q[b] + i}; }
  Row k_row(int64_t b, int64_t j) const { return cu_k.empty() ? Row{b, j} : Row{0, cu_k[b] + j}; }
  int64_t lse_index(int64_t b, int64_t h, int64_t i) const {
    return b * lse_stride_b + h * lse_stride_h + (cu_q.empty() ? 0 : cu_q[b]) + i;
  }
  // Tensor shapes (batch, rows).
  int64_t q_batch() const { return cu_q.empty() ? B : 1; }
  int64_t q_rows() const { return cu_q.empty() ? Tq : cu_q.back(); }
  int64_t k_batch() const { return cu_k.empty() ? B : 1; }
  int64_t k_rows() const { return cu_k.empty() ? Tk : cu_k.back(); }
};

// The mask of attention.h for a sequence of Tq_b queries and Tk_b keys, written
// independently of the kernel's.
bool allowed(const Case& c, int64_t Tq_b, int64_t Tk_b, int64_t i, int64_t j) {
  const int64_t diag = i + Tk_b - Tq_b;
  int64_t right = c.window_right;
  if (c.causal) right = right < 0 ? 0 : std::min<int64_t>(right, 0);
  if (right >= 0 && j > diag + right) return false;
  if (c.window_left >= 0 && j < diag - c.window_left) return false;
  return true;
}

// ALiBi slopes: (H,) geometric like the ALiBi paper's, or (B, H) all different.
std::vector<float> alibi_slopes(const Case& c, int64_t B) {
  std::vector<float> slopes;
  if (c.alibi == Alibi::kPerHead) {
    for (int64_t h = 0; h < c.H; ++h) slopes.push_back(std::exp2(-8.0f * (h + 1) / c.H));
  } else if (c.alibi == Alibi::kPerBatchHead) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < c.H; ++h) slopes.push_back(0.03f * (1 + h) + 0.11f * b);
  }
  return slopes;
}

// Max |x - ref| against atol * max|ref| + rtol * |ref|, reported once per tensor.
struct Compare {
  std::string what;
  double tol;
  double ref_max = 0;
  std::vector<std::pair<double, double>> pairs;  // (got, ref)

  Compare(std::string what_, double tol_) : what(std::move(what_)), tol(tol_) {}
  void add(double got, double ref) {
    pairs.emplace_back(got, ref);
    ref_max = std::max(ref_max, std::fabs(ref));
  }
  // Reports the count of elements out of tolerance and the worst of them (NaN counts as worst).
  void check() const {
    long bad = 0;
    double worst_excess = -1, worst_got = 0, worst_ref = 0;
    for (auto [got, ref] : pairs) {
      const double bound = tol * std::max(ref_max, 1.0) + tol * std::fabs(ref);
      const double err = std::fabs(got - ref);
      if (err <= bound) continue;
      ++bad;
      const double excess = std::isnan(err) ? INFINITY : err - bound;
      if (excess > worst_excess) worst_excess = excess, worst_got = got, worst_ref = ref;
    }
    CHECK(bad == 0, "%s: %ld of %zu elements off, worst got %.9g want %.9g (max|ref| %.3g)",
          what.c_str(), bad, pairs.size(), worst_got, worst_ref, ref_max);
  }
};

// The inputs of a case (random, seeded by the case) and the kernels' outputs.
template <class T>
struct Run {
  Geometry g;
  std::vector<float> slopes;
  Tensor<T> q, k, v, dout, out, dq, dk, dv;
  std::vector<AccOf<T>> lse;  // NaN where no lse row lives
  std::vector<uint8_t> kpm;   // (B, Tk) or empty
  std::vector<T> bias;        // Bias::kFull: (B, H, Tq, Tk); kKeysInf: (B, Tk); or empty
  int64_t bias_stride_b = 0, bias_stride_h = 0, bias_stride_q = 0, bias_stride_k = 0;
  std::vector<T> dbias;       // (B, H, Tq, Tk) when bias is on

  explicit Run(const Case& c)
      : g(c),
        slopes(alibi_slopes(c, g.B)),
        q(g.q_batch(), g.q_rows(), c.H, c.D, c.layout),
        k(g.k_batch(), g.k_rows(), c.Hkv, c.D, c.layout),
        v(g.k_batch(), g.k_rows(), c.Hkv, c.D, c.layout),
        dout(g.q_batch(), g.q_rows(), c.H, c.D, c.layout),
        out(g.q_batch(), g.q_rows(), c.H, c.D, c.layout),
        dq(g.q_batch(), g.q_rows(), c.H, c.D, c.layout),
        dk(g.k_batch(), g.k_rows(), c.Hkv, c.D, c.layout),
        dv(g.k_batch(), g.k_rows(), c.Hkv, c.D, c.layout),
        lse(g.lse_size, std::numeric_limits<AccOf<T>>::quiet_NaN()) {
    std::mt19937 rng(1234 + g.Tq * 7 + g.Tk * 13 + c.D);
    q.fill_random(rng);
    k.fill_random(rng);
    v.fill_random(rng);
    dout.fill_random(rng);
    const int64_t B = g.B, Tq = g.Tq, Tk = g.Tk;
    if (c.kpm != Kpm::kOff) {
      kpm.assign(B * Tk, 0);
      std::uniform_int_distribution<int64_t> length(1, std::max<int64_t>(Tk, 1));
      std::bernoulli_distribution coin(0.6);
      for (int64_t b = 0; b + 1 < B; ++b) {
        const int64_t n = b == 0 ? Tk : length(rng);
        for (int64_t j = 0; j < Tk; ++j) {
          kpm[b * Tk + j] = c.kpm == Kpm::kRight ? j < n : b == 0 || coin(rng);
        }
      }
    }
    std::normal_distribution<double> normal(0.0, 1.0);
    if (c.bias == Bias::kFull) {
      bias.resize(B * c.H * Tq * Tk);
      for (T& x : bias) x = from_acc<T>(static_cast<AccOf<T>>(normal(rng)));
      bias_stride_b = c.H * Tq * Tk, bias_stride_h = Tq * Tk, bias_stride_q = Tk;
      bias_stride_k = 1;
    } else if (c.bias == Bias::kKeysInf) {
      bias.resize(B * Tk);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < Tk; ++j) {
          const bool masked = b == 1 || j % 3 == 0;
          bias[b * Tk + j] = from_acc<T>(static_cast<AccOf<T>>(
              masked ? -INFINITY : normal(rng)));
        }
      bias_stride_b = Tk, bias_stride_k = 1;
    }
    if (c.bias != Bias::kOff) dbias.assign(B * c.H * Tq * Tk, from_acc<T>(AccOf<T>(0)));
  }
  double bias_at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (bias.empty()) return 0;
    return static_cast<double>(to_acc(bias[b * bias_stride_b + h * bias_stride_h +
                                           i * bias_stride_q + j * bias_stride_k]));
  }
};

// The forwards' FwdParams::no_backward (run_kernels): true lets the decode kernel take the
// cases it is eligible for (the backward then still runs, on the forward's out and lse).
bool g_no_backward = false;

// attention_fwd_cpu, then attention_bwd_cpu on its out and lse. `prepare` may change the
// inputs first.
template <class T>
Run<T> run_kernels(const Case& c, const std::function<void(Run<T>&)>& prepare = nullptr) {
  Run<T> run(c);
  if (prepare) prepare(run);
  const Geometry& geo = run.g;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));

  FwdParams f;
  f.batch = geo.B, f.seqlen_q = geo.Tq, f.seqlen_k = geo.Tk, f.num_heads = c.H;
  f.num_kv_heads = c.Hkv, f.head_dim = c.D, f.softmax_scale = scale, f.causal = c.causal;
  f.window_left = c.window_left, f.window_right = c.window_right, f.softcap = c.softcap;
  f.dtype = DTypeInfo<T>::kDType;
  f.no_backward = g_no_backward;
  f.cu_seqlens_q = geo.cu_q.empty() ? nullptr : geo.cu_q.data();
  f.cu_seqlens_k = geo.cu_k.empty() ? nullptr : geo.cu_k.data();
  f.seqused_k = geo.used_k.empty() ? nullptr : geo.used_k.data();
  f.alibi_slopes = run.slopes.empty() ? nullptr : run.slopes.data();
  f.alibi_stride_b = c.alibi == Alibi::kPerBatchHead ? c.H : 0;
  f.dropout_p = c.dropout_p, f.dropout_seed = &c.seed;
  f.lse_stride_b = geo.lse_stride_b, f.lse_stride_h = geo.lse_stride_h;
  f.q = run.q.data.data(), f.stride_q = run.q.stride;
  f.k = run.k.data.data(), f.stride_k = run.k.stride;
  f.v = run.v.data.data(), f.stride_v = run.v.stride;
  f.out = run.out.data.data(), f.stride_out = run.out.stride;
  f.lse = run.lse.data();
  if (!run.kpm.empty()) {
    f.key_padding_mask = run.kpm.data(), f.kpm_stride_b = geo.Tk, f.kpm_stride_k = 1;
  }
  if (!run.bias.empty()) {
    f.attn_bias = run.bias.data();
    f.bias_stride_b = run.bias_stride_b, f.bias_stride_h = run.bias_stride_h;
    f.bias_stride_q = run.bias_stride_q, f.bias_stride_k = run.bias_stride_k;
  }
  fastllm::attention::attention_fwd_cpu(f);

  BwdParams b;
  static_cast<fastllm::attention::Problem&>(b) = f;
  b.q = f.q, b.stride_q = f.stride_q, b.k = f.k, b.stride_k = f.stride_k, b.v = f.v;
  b.stride_v = f.stride_v, b.out = run.out.data.data(), b.stride_out = run.out.stride;
  b.dout = run.dout.data.data(), b.stride_dout = run.dout.stride, b.lse = run.lse.data();
  b.dq = run.dq.data.data(), b.stride_dq = run.dq.stride;
  b.dk = run.dk.data.data(), b.stride_dk = run.dk.stride;
  b.dv = run.dv.data.data(), b.stride_dv = run.dv.stride;
  b.dbias = run.dbias.empty() ? nullptr : run.dbias.data();
  fastllm::attention::attention_bwd_cpu(b);
  return run;
}

template <class T>
void run_case(const Case& c) {
  const std::string name = describe(c, DTypeInfo<T>::kName);
  const Run<T> run = run_kernels<T>(c);
  const auto& [g, slopes, q, k, v, dout, out, dq, dk, dv, lse, kpm, bias_, sb, sh, sq, sk,
               dbias] = run;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));

  const double tol = kTol<T>;
  Compare c_out{name + " out", tol}, c_lse{name + " lse", tol}, c_dq{name + " dq", tol},
      c_dk{name + " dk", tol}, c_dv{name + " dv", tol}, c_dbias{name + " dbias", tol};
  std::vector<double> ref_dbias(dbias.size(), 0.0);
  long lse_inf_mismatch = 0;
  const int64_t group = c.H / c.Hkv;
  const uint32_t threshold = fastllm::attention::dropout_threshold(c.dropout_p);
  std::vector<char> lse_row(lse.size(), 0);
  // Reference dk, dv per (b, j, hk, d) over the stored keys (zero past seqused_k).
  std::vector<double> ref_dk(g.B * g.Tk * c.Hkv * c.D, 0.0), ref_dv(ref_dk.size(), 0.0);
  auto kv_index = [&](int64_t b, int64_t j, int64_t hk, int64_t d) {
    return ((b * g.Tk + j) * c.Hkv + hk) * c.D + d;
  };
  std::vector<double> p(g.Tk), z(g.Tk), dcap(g.Tk), o(c.D), dqi(c.D);
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t Tq_b = g.len_q[b], Tk_b = g.len_k[b];
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t hk = h / group;
      const int64_t slope_at = (c.alibi == Alibi::kPerBatchHead ? b * c.H : 0) + h;
      const double slope = c.alibi == Alibi::kOff ? 0.0 : slopes[slope_at];
      const uint32_t head_key = fastllm::attention::dropout_head_key(c.seed, b, h, c.H);
      for (int64_t i = 0; i < Tq_b; ++i) {
        const auto [qb, qt] = g.q_row(b, i);
        const uint32_t row_key = fastllm::attention::dropout_row_key(head_key, i);
        double m = -INFINITY;
        for (int64_t j = 0; j < Tk_b; ++j) {
          const auto [kb, kt] = g.k_row(b, j);
          p[j] = -INFINITY;
          dcap[j] = 1.0;
          z[j] = 1.0;
          if (c.dropout_p > 0) {
            const bool keep = fastllm::attention::dropout_keep(
                row_key, fastllm::attention::dropout_col_key(j), threshold);
            z[j] = keep ? 1.0 / (1.0 - c.dropout_p) : 0.0;
          }
          if (!allowed(c, Tq_b, Tk_b, i, j)) continue;
          if (!kpm.empty() && kpm[b * g.Tk + j] == 0) continue;
          double s = 0;
          for (int64_t d = 0; d < c.D; ++d) s += q.get(qb, qt, h, d) * k.get(kb, kt, hk, d);
          p[j] = s * scale;
          if (c.softcap > 0) {
            const double t = std::tanh(p[j] / c.softcap);
            p[j] = c.softcap * t;
            dcap[j] = 1 - t * t;
          }
          p[j] -= slope * std::fabs(static_cast<double>(i + Tk_b - Tq_b - j));
          p[j] += run.bias_at(b, h, i, j);
          m = std::max(m, p[j]);
        }
        double l = 0;
        for (int64_t j = 0; j < Tk_b; ++j) {
          p[j] = std::isinf(m) ? 0.0 : std::exp(p[j] - m);
          l += p[j];
        }
        for (int64_t j = 0; j < Tk_b; ++j) p[j] = l > 0 ? p[j] / l : 0.0;
        const double ref_lse = l > 0 ? m + std::log(l) : -INFINITY;
        const int64_t lse_at = g.lse_index(b, h, i);
        lse_row[lse_at] = 1;
        const double got_lse = static_cast<double>(lse[lse_at]);
        if (std::isinf(ref_lse)) {
          lse_inf_mismatch += !(std::isinf(got_lse) && got_lse < 0);
        } else {
          c_lse.add(got_lse, ref_lse);
        }
        double delta = 0;
        for (int64_t d = 0; d < c.D; ++d) {
          o[d] = 0;
          for (int64_t j = 0; j < Tk_b; ++j) {
            const auto [kb, kt] = g.k_row(b, j);
            o[d] += z[j] * p[j] * v.get(kb, kt, hk, d);
          }
          c_out.add(out.get(qb, qt, h, d), o[d]);
          delta += o[d] * dout.get(qb, qt, h, d);
        }
        for (int64_t d = 0; d < c.D; ++d) dqi[d] = 0;
        for (int64_t j = 0; j < Tk_b; ++j) {
          if (p[j] == 0) continue;
          const auto [kb, kt] = g.k_row(b, j);
          double dpj = 0;
          for (int64_t d = 0; d < c.D; ++d) dpj += dout.get(qb, qt, h, d) * v.get(kb, kt, hk, d);
          const double ds = p[j] * (z[j] * dpj - delta) * dcap[j];
          if (!dbias.empty()) {
            ref_dbias[((b * c.H + h) * g.Tq + i) * g.Tk + j] = p[j] * (z[j] * dpj - delta);
          }
          for (int64_t d = 0; d < c.D; ++d) {
            ref_dv[kv_index(b, j, hk, d)] += z[j] * p[j] * dout.get(qb, qt, h, d);
            ref_dk[kv_index(b, j, hk, d)] += scale * ds * q.get(qb, qt, h, d);
            dqi[d] += scale * ds * k.get(kb, kt, hk, d);
          }
        }
        for (int64_t d = 0; d < c.D; ++d) c_dq.add(dq.get(qb, qt, h, d), dqi[d]);
      }
    }
  }
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t j = 0; j < g.len_k_stored[b]; ++j) {
      const auto [kb, kt] = g.k_row(b, j);
      for (int64_t hk = 0; hk < c.Hkv; ++hk)
        for (int64_t d = 0; d < c.D; ++d) {
          c_dk.add(dk.get(kb, kt, hk, d), ref_dk[kv_index(b, j, hk, d)]);
          c_dv.add(dv.get(kb, kt, hk, d), ref_dv[kv_index(b, j, hk, d)]);
        }
    }
  CHECK(lse_inf_mismatch == 0, "%s: %ld fully masked rows without lse = -inf", name.c_str(),
        lse_inf_mismatch);
  for (size_t e = 0; e < dbias.size(); ++e) {
    c_dbias.add(static_cast<double>(to_acc(dbias[e])), ref_dbias[e]);
  }
  for (const Compare* cmp : {&c_out, &c_lse, &c_dq, &c_dk, &c_dv, &c_dbias}) cmp->check();
  for (const Tensor<T>* t : {&out, &dq, &dk, &dv}) {
    CHECK(t->written_outside() == 0, "%s: %ld writes outside an output's elements",
          name.c_str(), t->written_outside());
  }
  long lse_outside = 0;
  for (size_t e = 0; e < lse.size(); ++e) lse_outside += !lse_row[e] && !std::isnan(lse[e]);
  CHECK(lse_outside == 0, "%s: %ld writes outside lse's rows", name.c_str(), lse_outside);
}

constexpr Layout kC = Layout::kContiguous;
constexpr Layout kP = Layout::kHeadMajorPadded;
constexpr Layout kS = Layout::kDimStride2;

// B, Tq, Tk, H, Hkv, D, causal, window_left, window_right, layout[, softcap].
const Case kCases[] = {
    {2, 97, 97, 4, 2, 64, false, -1, -1, kC},    // GQA, one partial block
    {2, 97, 97, 4, 2, 64, true, -1, -1, kP},     // causal
    {1, 1, 97, 4, 1, 32, true, -1, -1, kC},      // MQA decode: one query sees every key
    {1, 97, 1, 2, 1, 96, true, -1, -1, kS},      // Tq > Tk: rows 0..95 fully masked
    {1, 130, 70, 2, 2, 128, true, -1, -1, kP},   // Tq > Tk over several blocks
    {1, 70, 150, 4, 2, 64, true, -1, -1, kS},    // Tq < Tk, bottom-right aligned
    {1, 200, 200, 2, 1, 64, true, -1, -1, kC},   // several query and key blocks
    {1, 150, 150, 2, 2, 32, false, 16, 0, kC},   // sliding window, causal-like
    {1, 150, 130, 4, 2, 64, false, 8, 20, kP},   // two-sided window, Tq > Tk
    {1, 129, 129, 4, 4, 33, true, 40, -1, kS},   // odd head dim (padded), window + causal
    {2, 65, 1, 2, 1, 32, false, -1, -1, kC},     // a single key
    {1, 97, 97, 4, 2, 64, false, -1, -1, kC, 1.5},  // softcap
    {1, 80, 150, 2, 1, 32, true, 50, -1, kP, 0.7},  // softcap, causal, window, Tq < Tk
    {1, 300, 280, 2, 1, 64, true, -1, -1, kC},      // several 128-query tiles, Tq > Tk
    {1, 5, 0, 2, 1, 32, false, -1, -1, kC},         // no keys: out = 0, lse = -inf, dq = 0
    {1, 0, 5, 2, 1, 32, false, -1, -1, kC},         // no queries: dk = dv = 0
    {.B = 2, .Tq = 60, .Tk = 90, .H = 3, .Hkv = 1, .D = 32, .causal = true, .layout = kP,
     .lse_pad = 5},  // lse rows with gaps
};

// Packed variable-length batches and seqused_k (the KV cache).
const Case kVarlenCases[] = {
    // Lengths 1 and 0 (keys without queries: dk = dv = 0), Tq_b > Tk_b (fully masked rows)
    // and < Tk_b, several blocks, causal GQA.
    {.H = 4, .Hkv = 2, .D = 64, .causal = true, .layout = kC,
     .seqlens_q = {1, 0, 300, 77, 128}, .seqlens_k = {1, 5, 280, 150, 129}},
    // A sequence without keys (out = 0, lse = -inf), not causal, MQA, lse padding.
    {.H = 2, .Hkv = 1, .D = 32, .layout = kP, .seqlens_q = {65, 3, 200},
     .seqlens_k = {0, 70, 200}, .lse_pad = 2},
    // Two-sided window, softcap, odd head dim, dim stride 2.
    {.H = 2, .Hkv = 2, .D = 33, .window_left = 16, .window_right = 4, .layout = kS,
     .softcap = 1.5, .seqlens_q = {130, 97}, .seqlens_k = {97, 130}},
    // Decode against a padded cache: one query per sequence, seqused_k = full, 37, 0; MQA.
    {.B = 3, .Tq = 1, .Tk = 150, .H = 4, .Hkv = 1, .D = 64, .causal = true, .layout = kC,
     .seqused_k = {150, 37, 0}},
    // Prefill chunk against a padded cache, causal + left window, gaps in lse.
    {.B = 3, .Tq = 20, .Tk = 150, .H = 2, .Hkv = 1, .D = 32, .causal = true, .window_left = 30,
     .layout = kP, .seqused_k = {150, 20, 5}, .lse_pad = 1},
    // Packed queries and keys with seqused_k below the packed key counts.
    {.H = 4, .Hkv = 2, .D = 64, .causal = true, .layout = kC, .seqlens_q = {10, 64, 1},
     .seqlens_k = {100, 64, 70}, .seqused_k = {90, 1, 70}},
    // Packed queries against a padded cache.
    {.Tk = 100, .H = 2, .Hkv = 1, .D = 32, .causal = true, .layout = kS, .seqlens_q = {5, 1},
     .seqused_k = {100, 40}},
};

// Dropout, not causal, GQA.
const Case kDropout{.B = 2, .Tq = 97, .Tk = 97, .H = 4, .Hkv = 2, .D = 64, .layout = kC,
                    .dropout_p = 0.2, .seed = 42};
// Everything: varlen with seqused_k, ALiBi (H,), softcap, window, GQA, dropout.
const Case kAllFeatures{.H = 4, .Hkv = 2, .D = 64, .causal = true, .window_left = 70,
                        .layout = kC, .softcap = 1.5, .seqlens_q = {1, 0, 200, 64},
                        .seqlens_k = {3, 10, 180, 64}, .seqused_k = {3, 10, 150, 64},
                        .alibi = Alibi::kPerHead, .dropout_p = 0.1, .seed = 7};

// ALiBi and dropout, alone and combined with everything else.
const Case kBiasDropoutCases[] = {
    // ALiBi (H,), causal, GQA.
    {.B = 2, .Tq = 97, .Tk = 97, .H = 4, .Hkv = 2, .D = 64, .causal = true, .layout = kC,
     .alibi = Alibi::kPerHead},
    // ALiBi (B, H), not causal, Tq < Tk (the distance is bottom-right aligned).
    {.B = 2, .Tq = 70, .Tk = 150, .H = 2, .Hkv = 1, .D = 32, .layout = kP,
     .alibi = Alibi::kPerBatchHead},
    // ALiBi (B, H), varlen, causal, window, softcap, GQA.
    {.H = 4, .Hkv = 2, .D = 64, .causal = true, .window_left = 50, .layout = kS, .softcap = 2.0,
     .seqlens_q = {1, 130, 40}, .seqlens_k = {50, 130, 0}, .alibi = Alibi::kPerBatchHead},
    // ALiBi (B, H) with slopes up to 0.28, not causal, 300 keys: a row's scores rise by
    // ~18 per 64-key tile towards its diagonal, so the online softmax raises its running max
    // (and rescales) several times per row -- forward keeps a stale max until a score
    // exceeds it by 8.
    {.B = 3, .Tq = 300, .Tk = 300, .H = 2, .Hkv = 2, .D = 32, .layout = kC,
     .alibi = Alibi::kPerBatchHead},
    kDropout,
    // Dropout, causal with fully masked rows (Tq > Tk), MQA, a 64-bit seed.
    {.B = 1, .Tq = 130, .Tk = 70, .H = 2, .Hkv = 1, .D = 32, .causal = true, .layout = kP,
     .dropout_p = 0.5, .seed = 0x123456789abcdefLL},
    kAllFeatures,
};

// key_padding_mask and attn_bias (padded batches), alone and with everything else.
const Case kMaskCases[] = {
    // Right padding over several key blocks (skipped and narrowed blocks), GQA.
    {.B = 4, .Tq = 97, .Tk = 200, .H = 4, .Hkv = 2, .D = 64, .layout = kC, .kpm = Kpm::kRight},
    // Random keys (blocks with masked keys inside), causal, a full bias, softcap, MQA.
    {.B = 3, .Tq = 130, .Tk = 130, .H = 2, .Hkv = 1, .D = 32, .causal = true, .layout = kP,
     .softcap = 1.5, .kpm = Kpm::kRandom, .bias = Bias::kFull},
    // A broadcast bias with -inf (rows of sequence 1 all -inf), right padding, ALiBi,
    // dropout, a window, odd head dim.
    {.B = 3, .Tq = 70, .Tk = 150, .H = 2, .Hkv = 2, .D = 33, .window_left = 60, .layout = kS,
     .alibi = Alibi::kPerHead, .dropout_p = 0.1, .seed = 3, .kpm = Kpm::kRight,
     .bias = Bias::kKeysInf},
};

template <class T>
void run_all_cases() {
  for (const Case& c : kCases) run_case<T>(c);
  for (const Case& c : kVarlenCases) run_case<T>(c);
  for (const Case& c : kBiasDropoutCases) run_case<T>(c);
  for (const Case& c : kMaskCases) run_case<T>(c);
}

TEST_CASE_PER_DTYPE(attention, run_all_cases)

// Backward has two schemes (single pass per (batch, kv head) with one thread or many
// (batch, kv head) pairs, two passes otherwise): one thread runs every case through the
// first, 16 threads through the second.
TEST_CASE(attention_backward_schemes) {
  const int threads = omp_get_max_threads();
  for (int n : {1, 16}) {
    omp_set_num_threads(n);
    run_all_cases<float>();
    run_all_cases<BFloat16>();
    run_all_cases<Half>();
  }
  omp_set_num_threads(threads);
}

template <class A>
bool same_bits(const A& a, const A& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(a[0]) * a.size()) == 0;
}

// Every tile is computed by one thread in a fixed order, so the results do not depend on the
// number of threads, bit for bit (dk / dv of a GQA group included). One thread runs the
// single-pass backward, three threads the two-pass one here: their bits agree too.
// bfloat16 (float16) runs the AMX path where the CPU has AMX-BF16 (AMX-FP16): its own tiles
// and backward schemes.
template <class T>
void check_bitwise_same_for_any_thread_count(const char* dtype) {
  const Case cases[] = {{2, 200, 170, 4, 2, 64, true, -1, -1, kC}, kAllFeatures, kMaskCases[1],
                        kMaskCases[2]};
  const int threads = omp_get_max_threads();
  for (const Case& c : cases) {
    omp_set_num_threads(1);
    const Run<T> one = run_kernels<T>(c);
    omp_set_num_threads(3);
    const Run<T> three = run_kernels<T>(c);
    omp_set_num_threads(threads);
    const std::string name = describe(c, dtype);
    CHECK(same_bits(one.out.data, three.out.data), "%s: out differs", name.c_str());
    CHECK(same_bits(one.lse, three.lse), "%s: lse differs", name.c_str());
    CHECK(same_bits(one.dq.data, three.dq.data), "%s: dq differs", name.c_str());
    CHECK(same_bits(one.dk.data, three.dk.data), "%s: dk differs", name.c_str());
    CHECK(same_bits(one.dv.data, three.dv.data), "%s: dv differs", name.c_str());
    CHECK(same_bits(one.dbias, three.dbias), "%s: dbias differs", name.c_str());
  }
}

// float32 forwards without a backward (no input requiring grad): the decode kernel where a
// case is eligible, else the tile kernels (the split path on a CPU with AMX-BF16,
// attention_cpu_amx.h split3; the vector path elsewhere): every case, and its bits at any
// thread count.
TEST_CASE(attention_float32_forward_without_backward) {
  g_no_backward = true;
  run_all_cases<float>();
  check_bitwise_same_for_any_thread_count<float>("float32 (no backward)");
  g_no_backward = false;
}

TEST_CASE(attention_bitwise_same_for_any_thread_count) {
  check_bitwise_same_for_any_thread_count<float>("float32");
  check_bitwise_same_for_any_thread_count<BFloat16>("bfloat16");
  check_bitwise_same_for_any_thread_count<Half>("float16");
}

#if defined(__x86_64__) || defined(__i386__)
// The AMX path configures the tile registers of each thread it runs on and must hand them
// back as it found them: a thread that had tiles configured (another library's GEMM, e.g.
// torch's oneDNN on the same OpenMP thread) gets its configuration back, one that had none
// gets them released. One OpenMP thread: the kernel runs on this thread.
__attribute__((target("amx-tile"))) void store_tile_config(uint8_t* dst) { _tile_storeconfig(dst); }
__attribute__((target("amx-tile"))) void load_tile_config(const uint8_t* src) {
  _tile_loadconfig(src);
}
__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

TEST_CASE(attention_amx_restores_tile_configuration) {
  if (!fastllm::cpu::cpu_amx()) {
    std::printf("  (no AMX path on this CPU or under FASTLLM_CPU_ISA: nothing to restore)\n");
    return;
  }
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  alignas(64) uint8_t theirs[64] = {};
  theirs[0] = 1;  // palette 1: tile 0 of 8 rows x 32 bytes, tile 1 of 16 x 16
  theirs[16] = 32;
  theirs[18] = 16;
  theirs[48] = 8;
  theirs[49] = 16;
  const uint8_t none[64] = {};
  for (const bool configured : {true, false}) {
    // bfloat16 on AMX-BF16; float16 on AMX-FP16 where the CPU has it (else its AVX-512 path,
    // which must leave the tiles alone too).
    for (const bool half : {false, true}) {
      if (configured) {
        load_tile_config(theirs);
      } else {
        release_tiles();
      }
      if (half) {
        run_kernels<Half>(kAllFeatures);
      } else {
        run_kernels<BFloat16>(kAllFeatures);
      }
      alignas(64) uint8_t after[64];
      store_tile_config(after);
      CHECK(std::memcmp(after, configured ? theirs : none, 64) == 0,
            "%s: tile configuration %s after attention (palette %d)",
            half ? "float16" : "bfloat16", configured ? "not restored" : "not released",
            after[0]);
    }
  }
  release_tiles();
  omp_set_num_threads(threads);
}
#endif

// With v_j = e_j (the identity, D = Tk), out_ij = z_ij p_ij: the dropped elements are
// exactly the zeros of out (softmax of these scores never underflows), so the kernel's mask
// is visible. It must be attention.h's dropout_keep element for element (the vectorised
// hashes of the AVX2 / AVX-512 paths included: Tk = 100 leaves a 36-key tile, partial
// vectors of both widths), and its kept fraction 1 - p: n = 2 * 2 * 200 * 100 = 80000
// draws, the standard deviation of the fraction is below 0.002, the bound 0.01 is 5 of them.
TEST_CASE(attention_dropout_mask) {
  for (double p : {0.1, 0.5, 0.9}) {
    const Case c{.B = 2, .Tq = 200, .Tk = 100, .H = 2, .Hkv = 2, .D = 100, .layout = kC,
                 .dropout_p = p, .seed = 2024};
    const Run<float> run = run_kernels<float>(c, [](Run<float>& r) {
      for (int64_t b = 0; b < r.v.B; ++b)
        for (int64_t j = 0; j < r.v.L; ++j)
          for (int64_t h = 0; h < r.v.Hx; ++h)
            for (int64_t d = 0; d < r.v.D; ++d) r.v.set(b, j, h, d, j == d ? 1.0 : 0.0);
    });
    const uint32_t threshold = fastllm::attention::dropout_threshold(p);
    long dropped = 0, total = 0, wrong = 0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h) {
        const uint32_t head_key = fastllm::attention::dropout_head_key(c.seed, b, h, c.H);
        for (int64_t i = 0; i < c.Tq; ++i) {
          const uint32_t row_key = fastllm::attention::dropout_row_key(head_key, i);
          for (int64_t j = 0; j < c.Tk; ++j) {
            const bool is_dropped = run.out.get(b, i, h, j) == 0;
            const bool keep = fastllm::attention::dropout_keep(
                row_key, fastllm::attention::dropout_col_key(j), threshold);
            dropped += is_dropped, ++total, wrong += is_dropped == keep;
          }
        }
      }
    CHECK(wrong == 0, "dropout_p=%g: %ld of %ld elements disagree with dropout_keep", p, wrong,
          total);
    const double kept = 1.0 - static_cast<double>(dropped) / total;
    CHECK(std::fabs(kept - (1 - p)) < 0.01, "dropout_p=%g: kept fraction %.4f, want %.4f +- 0.01",
          p, kept, 1 - p);
  }
}

// The mask is a function of the seed: the same seed reproduces every bit, another changes it.
TEST_CASE(attention_dropout_seed) {
  Case c = kDropout;
  const Run<float> first = run_kernels<float>(c);
  const Run<float> again = run_kernels<float>(c);
  CHECK(same_bits(first.out.data, again.out.data), "same seed: out differs");
  CHECK(same_bits(first.dq.data, again.dq.data), "same seed: dq differs");
  CHECK(same_bits(first.dk.data, again.dk.data), "same seed: dk differs");
  CHECK(same_bits(first.dv.data, again.dv.data), "same seed: dv differs");
  c.seed += 1;
  const Run<float> other = run_kernels<float>(c);
  CHECK(!same_bits(first.out.data, other.out.data), "seeds 42 and 43 give the same out");
  CHECK(same_bits(first.lse, other.lse), "lse must not depend on the dropout seed");
}

// f(params) must throw std::invalid_argument whose message contains `needle`.
template <class Params>
void expect_rejected(const Params& params, const char* needle, const char* what) {
  bool threw = false;
  std::string message = "(no exception)";
  try {
    if constexpr (std::is_same_v<Params, FwdParams>) {
      fastllm::attention::attention_fwd_cpu(params);
    } else {
      fastllm::attention::attention_bwd_cpu(params);
    }
  } catch (const std::invalid_argument& e) {
    message = e.what();
    threw = message.find(needle) != std::string::npos;
  }
  CHECK(threw, "%s must throw naming %s, got: %s", what, needle, message.c_str());
}

TEST_CASE(attention_rejects_bad_problems) {
  FwdParams f;
  f.batch = 1, f.seqlen_q = 4, f.seqlen_k = 4, f.num_heads = 3, f.num_kv_heads = 2;
  f.head_dim = 64, f.lse_stride_b = 12, f.lse_stride_h = 4;
  expect_rejected(f, "num_kv_heads must divide num_heads", "H=3, Hkv=2");
  f.num_kv_heads = 1;
  FwdParams bad = f;
  bad.head_dim = 0;
  expect_rejected(bad, "head_dim", "head_dim=0");
  bad = f, bad.dropout_p = 1.0;
  expect_rejected(bad, "dropout_p", "dropout_p=1");
  bad = f, bad.dropout_p = -0.1;
  expect_rejected(bad, "dropout_p", "dropout_p=-0.1");
  bad = f, bad.dropout_p = 0.1;
  expect_rejected(bad, "dropout_seed", "dropout without a seed");
  bad = f, bad.lse_stride_h = 0;
  expect_rejected(bad, "lse_stride_h", "lse_stride_h=0 with 3 heads");
  bad = f, bad.batch = 2, bad.lse_stride_b = 0;
  expect_rejected(bad, "lse_stride_b", "lse_stride_b=0 for a padded batch of 2");
  const int32_t cu_long[] = {0, 2, 7};  // sequence 1 has 5 > seqlen 4 rows
  bad = f, bad.batch = 2, bad.cu_seqlens_q = cu_long;
  expect_rejected(bad, "cu_seqlens_q[2]", "a query sequence longer than seqlen_q");
  bad = f, bad.batch = 2, bad.cu_seqlens_k = cu_long;
  expect_rejected(bad, "cu_seqlens_k[2]", "a key sequence longer than seqlen_k");
  const int32_t used[] = {5};
  bad = f, bad.seqused_k = used;
  expect_rejected(bad, "seqused_k[0]", "seqused_k above the stored keys");
  BwdParams g;
  static_cast<fastllm::attention::Problem&>(g) = f;
  g.dropout_p = 0.1;
  expect_rejected(g, "dropout_seed", "backward: dropout without a seed");
}

}  // namespace

TEST_MAIN()
