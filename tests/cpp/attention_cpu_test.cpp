// attention_fwd_cpu / attention_bwd_cpu (csrc/attention/attention.h) against a naive
// double-precision reference written straight from the math in attention.h: out, lse, dq, dk
// and dv for float32, bfloat16, float16 and float64; causal and not, sliding windows,
// Tq != Tk both ways (Tq > Tk causal has fully masked rows: out = 0, lse = -inf, zero
// gradients), lengths 1 and 97 and several key / query blocks, GQA (H=4, Hkv=2) and MQA
// (Hkv=1), head dims 32, 64, 96, 128 (and 33, which the kernel pads), and three layouts of
// every input and output: contiguous (B, T, H, D), head-major with padded rows, and a head dim
// stride of 2; logit soft-capping; no keys (Tk = 0) and no queries (Tq = 0); one OpenMP thread;
// bitwise equal results for 1 and 3 threads; bad problems rejected with the argument named.
// ctest runs this binary twice: on the best instruction set of the machine and with
// FASTLLM_CPU_ISA=scalar.
//
// Storage outside a tensor's elements is NaN, so a kernel that reads it shows up as NaN, and
// one that writes it is caught by written_outside().
//
// Tolerances: |x - ref| <= tol * max(max|ref|, 1) + tol * |ref| per tensor, tol a few units
// of the dtype's rounding (the inputs are exactly representable, so only the final rounding
// and the fp32 accumulation differ from the reference) -- 2e-5 for float32. The floor of 1:
// inputs are standard normal, so the summed terms are O(1) even where the exact result is 0
// (one key: p = 1 and ds = 0, but the kernel's p is 1 to within a few ulp).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention/attention.h"
#include "check.h"
#include "common/cpu_dtypes.h"

namespace {

using fastllm::DType;
using fastllm::attention::BwdParams;
using fastllm::attention::FwdParams;
using fastllm::attention::Strides4;
using fastllm::cpu::AccOf;
using fastllm::cpu::BFloat16;
using fastllm::cpu::from_acc;
using fastllm::cpu::Half;
using fastllm::cpu::to_acc;

template <class T>
struct DTypeInfo;
template <>
struct DTypeInfo<float> {
  static constexpr DType kDType = DType::kFloat32;
  static constexpr const char* kName = "float32";
  static constexpr double kTol = 2e-5;
};
template <>
struct DTypeInfo<BFloat16> {
  static constexpr DType kDType = DType::kBFloat16;
  static constexpr const char* kName = "bfloat16";
  static constexpr double kTol = 1.0 / 64;
};
template <>
struct DTypeInfo<Half> {
  static constexpr DType kDType = DType::kFloat16;
  static constexpr const char* kName = "float16";
  static constexpr double kTol = 1.0 / 256;
};
template <>
struct DTypeInfo<double> {
  static constexpr DType kDType = DType::kFloat64;
  static constexpr const char* kName = "float64";
  static constexpr double kTol = 1e-12;
};

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

struct Case {
  int64_t B, Tq, Tk, H, Hkv, D;
  bool causal;
  int64_t window_left, window_right;
  Layout layout;
  double softcap = 0;
};

std::string describe(const Case& c, const char* dtype) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "%s B=%lld Tq=%lld Tk=%lld H=%lld Hkv=%lld D=%lld causal=%d window=(%lld,%lld) "
                "layout=%d softcap=%g",
                dtype, (long long)c.B, (long long)c.Tq, (long long)c.Tk, (long long)c.H,
                (long long)c.Hkv, (long long)c.D, (int)c.causal, (long long)c.window_left,
                (long long)c.window_right, (int)c.layout, c.softcap);
  return buf;
}

// The mask of attention.h, written independently of the kernel's.
bool allowed(const Case& c, int64_t i, int64_t j) {
  const int64_t diag = i + c.Tk - c.Tq;
  int64_t right = c.window_right;
  if (c.causal) right = right < 0 ? 0 : std::min<int64_t>(right, 0);
  if (right >= 0 && j > diag + right) return false;
  if (c.window_left >= 0 && j < diag - c.window_left) return false;
  return true;
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
  Tensor<T> q, k, v, dout, out, dq, dk, dv;
  std::vector<AccOf<T>> lse;

  explicit Run(const Case& c)
      : q(c.B, c.Tq, c.H, c.D, c.layout),
        k(c.B, c.Tk, c.Hkv, c.D, c.layout),
        v(c.B, c.Tk, c.Hkv, c.D, c.layout),
        dout(c.B, c.Tq, c.H, c.D, c.layout),
        out(c.B, c.Tq, c.H, c.D, c.layout),
        dq(c.B, c.Tq, c.H, c.D, c.layout),
        dk(c.B, c.Tk, c.Hkv, c.D, c.layout),
        dv(c.B, c.Tk, c.Hkv, c.D, c.layout),
        lse(std::max<int64_t>(1, c.B * c.H * c.Tq), 12345) {
    std::mt19937 rng(1234 + c.Tq * 7 + c.Tk * 13 + c.D);
    q.fill_random(rng);
    k.fill_random(rng);
    v.fill_random(rng);
    dout.fill_random(rng);
  }
};

// attention_fwd_cpu, then attention_bwd_cpu on its out and lse.
template <class T>
Run<T> run_kernels(const Case& c) {
  Run<T> run(c);
  auto& [q, k, v, dout, out, dq, dk, dv, lse] = run;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));

  FwdParams f;
  f.batch = c.B, f.seqlen_q = c.Tq, f.seqlen_k = c.Tk, f.num_heads = c.H, f.num_kv_heads = c.Hkv;
  f.head_dim = c.D, f.softmax_scale = scale, f.causal = c.causal;
  f.window_left = c.window_left, f.window_right = c.window_right, f.softcap = c.softcap;
  f.dtype = DTypeInfo<T>::kDType;
  f.q = q.data.data(), f.stride_q = q.stride, f.k = k.data.data(), f.stride_k = k.stride;
  f.v = v.data.data(), f.stride_v = v.stride, f.out = out.data.data(), f.stride_out = out.stride;
  f.lse = lse.data();
  fastllm::attention::attention_fwd_cpu(f);

  BwdParams g;
  static_cast<fastllm::attention::Problem&>(g) = f;
  g.q = f.q, g.stride_q = f.stride_q, g.k = f.k, g.stride_k = f.stride_k, g.v = f.v;
  g.stride_v = f.stride_v, g.out = out.data.data(), g.stride_out = out.stride;
  g.dout = dout.data.data(), g.stride_dout = dout.stride, g.lse = lse.data();
  g.dq = dq.data.data(), g.stride_dq = dq.stride, g.dk = dk.data.data(), g.stride_dk = dk.stride;
  g.dv = dv.data.data(), g.stride_dv = dv.stride;
  fastllm::attention::attention_bwd_cpu(g);
  return run;
}

template <class T>
void run_case(const Case& c) {
  const std::string name = describe(c, DTypeInfo<T>::kName);
  const Run<T> run = run_kernels<T>(c);
  const auto& [q, k, v, dout, out, dq, dk, dv, lse] = run;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));

  const double tol = DTypeInfo<T>::kTol;
  Compare c_out{name + " out", tol}, c_lse{name + " lse", tol}, c_dq{name + " dq", tol},
      c_dk{name + " dk", tol}, c_dv{name + " dv", tol};
  long lse_inf_mismatch = 0;
  const int64_t group = c.H / c.Hkv;
  std::vector<double> ref_dk(c.B * c.Tk * c.Hkv * c.D, 0.0), ref_dv(ref_dk.size(), 0.0);
  auto kv_index = [&](int64_t b, int64_t j, int64_t hk, int64_t d) {
    return ((b * c.Tk + j) * c.Hkv + hk) * c.D + d;
  };
  std::vector<double> p(c.Tk), dcap(c.Tk, 1.0), o(c.D), dqi(c.D);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < c.Tq; ++i) {
        double m = -INFINITY;
        for (int64_t j = 0; j < c.Tk; ++j) {
          p[j] = -INFINITY;
          if (!allowed(c, i, j)) continue;
          double s = 0;
          for (int64_t d = 0; d < c.D; ++d) s += q.get(b, i, h, d) * k.get(b, j, hk, d);
          p[j] = s * scale;
          if (c.softcap > 0) {
            const double t = std::tanh(p[j] / c.softcap);
            p[j] = c.softcap * t;
            dcap[j] = 1 - t * t;
          }
          m = std::max(m, p[j]);
        }
        double l = 0;
        for (int64_t j = 0; j < c.Tk; ++j) {
          p[j] = std::isinf(m) ? 0.0 : std::exp(p[j] - m);
          l += p[j];
        }
        for (int64_t j = 0; j < c.Tk; ++j) p[j] = l > 0 ? p[j] / l : 0.0;
        const double ref_lse = l > 0 ? m + std::log(l) : -INFINITY;
        const double got_lse = static_cast<double>(lse[(b * c.H + h) * c.Tq + i]);
        if (std::isinf(ref_lse)) {
          lse_inf_mismatch += !(std::isinf(got_lse) && got_lse < 0);
        } else {
          c_lse.add(got_lse, ref_lse);
        }
        double delta = 0;
        for (int64_t d = 0; d < c.D; ++d) {
          o[d] = 0;
          for (int64_t j = 0; j < c.Tk; ++j) o[d] += p[j] * v.get(b, j, hk, d);
          c_out.add(out.get(b, i, h, d), o[d]);
          delta += o[d] * dout.get(b, i, h, d);
        }
        for (int64_t d = 0; d < c.D; ++d) dqi[d] = 0;
        for (int64_t j = 0; j < c.Tk; ++j) {
          if (p[j] == 0) continue;
          double dpj = 0;
          for (int64_t d = 0; d < c.D; ++d) dpj += dout.get(b, i, h, d) * v.get(b, j, hk, d);
          const double ds = p[j] * (dpj - delta) * dcap[j];
          for (int64_t d = 0; d < c.D; ++d) {
            ref_dv[kv_index(b, j, hk, d)] += p[j] * dout.get(b, i, h, d);
            ref_dk[kv_index(b, j, hk, d)] += scale * ds * q.get(b, i, h, d);
            dqi[d] += scale * ds * k.get(b, j, hk, d);
          }
        }
        for (int64_t d = 0; d < c.D; ++d) c_dq.add(dq.get(b, i, h, d), dqi[d]);
      }
    }
  }
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t j = 0; j < c.Tk; ++j)
      for (int64_t hk = 0; hk < c.Hkv; ++hk)
        for (int64_t d = 0; d < c.D; ++d) {
          c_dk.add(dk.get(b, j, hk, d), ref_dk[kv_index(b, j, hk, d)]);
          c_dv.add(dv.get(b, j, hk, d), ref_dv[kv_index(b, j, hk, d)]);
        }
  CHECK(lse_inf_mismatch == 0, "%s: %ld fully masked rows without lse = -inf", name.c_str(),
        lse_inf_mismatch);
  for (const Compare* cmp : {&c_out, &c_lse, &c_dq, &c_dk, &c_dv}) cmp->check();
  for (const Tensor<T>* t : {&out, &dq, &dk, &dv}) {
    CHECK(t->written_outside() == 0, "%s: %ld writes outside an output's elements",
          name.c_str(), t->written_outside());
  }
}

constexpr Layout kC = Layout::kContiguous;
constexpr Layout kP = Layout::kHeadMajorPadded;
constexpr Layout kS = Layout::kDimStride2;

// B, Tq, Tk, H, Hkv, D, causal, window_left, window_right, layout.
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
};

TEST_CASE(attention_float32) {
  for (const Case& c : kCases) run_case<float>(c);
}

TEST_CASE(attention_bfloat16) {
  for (const Case& c : kCases) run_case<BFloat16>(c);
}

TEST_CASE(attention_float16) {
  for (const Case& c : kCases) run_case<Half>(c);
}

TEST_CASE(attention_float64) {
  for (const Case& c : kCases) run_case<double>(c);
}

TEST_CASE(attention_one_thread) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  run_case<float>({1, 97, 150, 4, 2, 64, true, -1, -1, kP});
  omp_set_num_threads(threads);
}

// Every tile is computed by one thread in a fixed order, so the results do not depend on the
// number of threads, bit for bit (dk / dv of a GQA group included).
TEST_CASE(attention_bitwise_same_for_any_thread_count) {
  const Case c{2, 200, 170, 4, 2, 64, true, -1, -1, kC};
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const Run<float> one = run_kernels<float>(c);
  omp_set_num_threads(3);
  const Run<float> three = run_kernels<float>(c);
  omp_set_num_threads(threads);
  auto same = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(a[0]) * a.size()) == 0;
  };
  CHECK(same(one.out.data, three.out.data), "out differs between 1 and 3 threads");
  CHECK(same(one.lse, three.lse), "lse differs between 1 and 3 threads");
  CHECK(same(one.dq.data, three.dq.data), "dq differs between 1 and 3 threads");
  CHECK(same(one.dk.data, three.dk.data), "dk differs between 1 and 3 threads");
  CHECK(same(one.dv.data, three.dv.data), "dv differs between 1 and 3 threads");
}

TEST_CASE(attention_rejects_bad_problems) {
  FwdParams f;
  f.batch = 1, f.seqlen_q = 4, f.seqlen_k = 4, f.num_heads = 3, f.num_kv_heads = 2;
  f.head_dim = 64;
  bool threw = false;
  try {
    fastllm::attention::attention_fwd_cpu(f);
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("num_kv_heads must divide num_heads") != std::string::npos;
  }
  CHECK(threw, "H=3, Hkv=2 must throw naming num_kv_heads");
  f.num_kv_heads = 1;
  f.head_dim = 0;
  threw = false;
  try {
    fastllm::attention::attention_fwd_cpu(f);
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("head_dim") != std::string::npos;
  }
  CHECK(threw, "head_dim=0 must throw naming head_dim");
}

}  // namespace

TEST_MAIN()
