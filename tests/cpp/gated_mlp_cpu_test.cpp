// gated_mlp_fwd_cpu / gated_mlp_bwd_cpu (csrc/gated_mlp/gated_mlp.h) against a double-precision
// reference written straight from the math in gated_mlp.h: every dtype and activation, odd
// widths (1, 7, 97, 4099 ...), row strides larger than cols (the halves of one tensor
// included), 1, 2 or 3 OpenMP threads, and the special values (+-inf, NaN, gates large
// enough to saturate every activation).
// ctest runs this binary on the best instruction set of the machine (AVX-512 where it has
// it), with FASTLLM_CPU_ISA=avx2 and with FASTLLM_CPU_ISA=scalar.
//
// Every row of every operand is followed by NaN padding and every output by NaN guard
// elements, so a kernel that reads padding or writes outside its rows is caught.
//
// Tolerances: an output rounded to T may be off by one unit in the last place of T (rtol)
// plus the error of the float arithmetic (a few ulp of the activation, atol relative to the
// magnitude of the terms).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "dtypes.h"
#include "gated_mlp/gated_mlp.h"

namespace {

using namespace fastllm_test;  // check.h, dtypes.h
using fastllm::gated_mlp::Activation;
using fastllm::gated_mlp::BwdParams;
using fastllm::gated_mlp::FwdParams;

constexpr Activation kActivations[] = {Activation::kSilu, Activation::kGelu,
                                       Activation::kGeluTanh};

// Float arithmetic error allowed, relative to the size of the terms.
template <class T>
constexpr double acc_tol() {
  return std::is_same_v<AccOf<T>, double> ? 1e-13 : 2e-6;
}

// act(g) and act'(g) in double, from gated_mlp.h.
void reference(Activation a, double g, double& act, double& grad) {
  const double k0 = std::sqrt(2.0 / M_PI), k1 = 0.044715;
  if (a == Activation::kGelu) {
    const double cdf = 0.5 * std::erfc(-g / std::sqrt(2.0));
    act = g * cdf;
    grad = cdf + g * std::exp(-0.5 * g * g) / std::sqrt(2.0 * M_PI);
    return;
  }
  const double z = a == Activation::kSilu ? g : 2.0 * k0 * (g + k1 * g * g * g);
  const double e = std::exp(-z);  // inf for z < -709: s = 0, 1 - s = 1
  const double s = 1.0 / (1.0 + e);
  const double gc = std::fmin(10.0, std::fmax(-10.0, g));
  const double dz = a == Activation::kSilu ? 1.0 : 2.0 * k0 * (1.0 + 3.0 * k1 * gc * gc);
  act = g * s;
  grad = s + act * (z > 0 ? e * s : 1.0 - s) * dz;
}

struct Rng {
  uint64_t state;
  double uniform() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(state >> 11) * 0x1p-53;
  }
  double normal() { return (uniform() + uniform() + uniform() + uniform() - 2.0) * std::sqrt(3.0); }
};

template <class T>
T nan_of() {
  return from_acc<T>(std::numeric_limits<AccOf<T>>::quiet_NaN());
}

// A (rows, ld) matrix whose first `cols` columns are scale * N(0, 1) (or `values`, cycled)
// and whose padding is NaN, plus kGuard NaN elements after it.
constexpr int64_t kGuard = 16;

template <class T>
std::vector<T> matrix(Rng& rng, int64_t rows, int64_t cols, int64_t ld, double scale,
                      const std::vector<double>& values = {}) {
  std::vector<T> m(static_cast<size_t>(rows * ld + kGuard), nan_of<T>());
  int64_t k = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j, ++k) {
      const double v = values.empty() ? scale * rng.normal() : values[k % values.size()];
      m[r * ld + j] = from_acc<T>(static_cast<AccOf<T>>(v));
    }
  }
  return m;
}

// Outputs: every element NaN before the kernel runs.
template <class T>
std::vector<T> output(int64_t rows, int64_t ld) {
  return std::vector<T>(static_cast<size_t>(rows * ld + kGuard), nan_of<T>());
}

// got vs want: equal specials (inf with its sign, NaN), else within the tolerance.
bool close(double got, double want, double rtol, double atol) {
  if (std::isnan(want) || std::isinf(want)) return std::isnan(want) ? std::isnan(got) : got == want;
  return std::fabs(got - want) <= rtol * std::fabs(want) + atol;
}

struct Layout {
  int64_t rows, cols;
  bool packed;  // gate and up are the halves of one (rows, 2 cols) matrix (+ padding)
  int64_t pad;  // extra elements at the end of every row of every operand
};

template <class T>
void run_case(const Layout& l, Activation a, uint64_t seed, double scale,
              const std::vector<double>& gate_values = {}) {
  char what_buf[200];
  std::snprintf(what_buf, sizeof(what_buf), "%s %s rows=%lld cols=%lld packed=%d pad=%lld threads=%d",
                DTypeInfo<T>::kName, fastllm::gated_mlp::activation_name(a),
                static_cast<long long>(l.rows), static_cast<long long>(l.cols), l.packed,
                static_cast<long long>(l.pad), omp_get_max_threads());
  const std::string what = what_buf;
  Rng rng{seed};
  const int64_t rows = l.rows, cols = l.cols;
  const int64_t ld_in = (l.packed ? 2 * cols : cols) + l.pad;
  const int64_t ld = cols + l.pad;
  // gate and up: one packed matrix, or two (up with a different padding).
  std::vector<T> gate_m = matrix<T>(rng, rows, l.packed ? 2 * cols : cols, ld_in, scale);
  if (!gate_values.empty()) {
    const std::vector<T> special = matrix<T>(rng, rows, cols, ld_in, scale, gate_values);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) gate_m[r * ld_in + j] = special[r * ld_in + j];
    }
  }
  const std::vector<T> up_m = l.packed ? std::vector<T>() : matrix<T>(rng, rows, cols, ld + 3, 1.0);
  const T* gate = gate_m.data();
  const T* up = l.packed ? gate_m.data() + cols : up_m.data();
  const int64_t ld_up = l.packed ? ld_in : ld + 3;
  const std::vector<T> dy = matrix<T>(rng, rows, cols, ld, 1.0);

  std::vector<T> out = output<T>(rows, ld);
  FwdParams f;
  f.gate = gate;
  f.gate_row_stride = ld_in;
  f.up = up;
  f.up_row_stride = ld_up;
  f.out = out.data();
  f.out_row_stride = ld;
  f.rows = rows;
  f.cols = cols;
  f.activation = a;
  f.dtype = DTypeInfo<T>::kDType;
  fastllm::gated_mlp::gated_mlp_fwd_cpu(f);

  // Backward writes both gradients into one packed matrix, or into two.
  const int64_t ld_grad = l.packed ? 2 * cols + l.pad : ld;
  std::vector<T> grads = output<T>(rows, ld_grad), grad_up_m = output<T>(rows, ld);
  T* grad_gate = grads.data();
  T* grad_up = l.packed ? grads.data() + cols : grad_up_m.data();
  BwdParams b;
  b.grad_out = dy.data();
  b.grad_out_row_stride = ld;
  b.gate = gate;
  b.gate_row_stride = ld_in;
  b.up = up;
  b.up_row_stride = ld_up;
  b.grad_gate = grad_gate;
  b.grad_gate_row_stride = ld_grad;
  b.grad_up = grad_up;
  b.grad_up_row_stride = ld_grad;
  b.rows = rows;
  b.cols = cols;
  b.activation = a;
  b.dtype = DTypeInfo<T>::kDType;
  fastllm::gated_mlp::gated_mlp_bwd_cpu(b);

  const double rtol = DTypeInfo<T>::kRoundRtol, round_atol = DTypeInfo<T>::kRoundAtol;
  const double atol = acc_tol<T>();
  long reported = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols && reported < 5; ++j) {
      const double g = to_acc(gate[r * ld_in + j]), u = to_acc(up[r * ld_up + j]);
      const double d = to_acc(dy[r * ld + j]);
      double act, grad;
      reference(a, g, act, grad);
      // Size of the terms: |act| <= |g|, |act'| <= 1.13 + |g| (gelu_tanh's z' grows with g^2,
      // but (1 - s) is tiny where it is large).
      const double mag = (std::fabs(g) + 1.0) * std::fabs(u);
      const double checks[3][2] = {{act * u, to_acc(out[r * ld + j])},
                                   {d * u * grad, to_acc(grad_gate[r * ld_grad + j])},
                                   {d * act, to_acc(grad_up[r * ld_grad + j])}};
      const double scales[3] = {mag, mag * std::fabs(d), (std::fabs(g) + 1.0) * std::fabs(d)};
      const char* names[3] = {"out", "grad_gate", "grad_up"};
      for (int k = 0; k < 3; ++k) {
        // A value beyond T's range is inf in T, as torch's own arithmetic gives it.
        const double want_in_t = to_acc(from_acc<T>(static_cast<AccOf<T>>(checks[k][0])));
        const double want = std::isinf(want_in_t) ? want_in_t : checks[k][0];
        const bool ok = close(checks[k][1], want, rtol, atol * scales[k] + round_atol);
        CHECK(ok, "%s: %s[%lld, %lld] = %.9g, want %.9g (gate %.9g, up %.9g, dy %.9g)",
              what.c_str(), names[k], static_cast<long long>(r), static_cast<long long>(j),
              checks[k][1], want, g, u, d);
        reported += !ok;
      }
    }
  }
  // Padding and guards untouched.
  auto untouched = [&](const std::vector<T>& m, int64_t ld_m, int64_t first_pad, const char* name) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = first_pad; j < ld_m; ++j) {
        CHECK(std::isnan(to_acc(m[r * ld_m + j])), "%s: %s written at [%lld, %lld] (padding)",
              what.c_str(), name, static_cast<long long>(r), static_cast<long long>(j));
      }
    }
    for (int64_t i = rows * ld_m; i < rows * ld_m + kGuard; ++i) {
      CHECK(std::isnan(to_acc(m[i])), "%s: %s written past its end", what.c_str(), name);
    }
  };
  untouched(out, ld, cols, "out");
  untouched(grads, ld_grad, l.packed ? 2 * cols : cols, "grad_gate");
  if (!l.packed) untouched(grad_up_m, ld, cols, "grad_up");
}

template <class T>
void run_shapes() {
  const Layout layouts[] = {{1, 1, false, 0},   {1, 1, true, 0},    {3, 7, false, 2},
                            {3, 7, true, 5},    {5, 97, false, 0},  {4, 97, true, 3},
                            {2, 4099, false, 1}, {7, 33, true, 0},  {65, 300, false, 0},
                            {64, 1000, true, 0}};
  uint64_t seed = 1;
  for (const Layout& l : layouts) {
    for (Activation a : kActivations) run_case<T>(l, a, seed++, 2.0);
  }
}

TEST_CASE_PER_DTYPE(shapes_and_layouts, run_shapes)

// Each thread takes a range of elements: ranges that split rows, and ones of whole rows.
template <class T>
void run_thread_counts() {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (const Layout& l : {Layout{1, 100000, false, 0}, Layout{3, 40000, true, 7},
                            Layout{2001, 17, false, 1}}) {
      for (Activation a : kActivations) run_case<T>(l, a, 77 + threads, 3.0);
    }
  }
  omp_set_num_threads(saved);
}

TEST_CASE_PER_DTYPE(thread_counts, run_thread_counts)

// Large gates (where every activation saturates), the range ends of each piece of the
// vector paths' approximations, +-inf and NaN: the reference's value, inf or NaN.
template <class T>
void run_special_values() {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> values = {-inf, inf, nan, 0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6,
                                0.5, -0.5, 1.3037, -1.3037, 5.6568, -5.6568, 5.66, -5.66,
                                8.0, -8.0, 9.9, -9.9, 10.1, -10.1, 20.0, -20.0, 87.0, -87.0,
                                88.5, -88.5, 89.0, -89.0, 200.0, -200.0, 1e4, -1e4};
  if (!std::is_same_v<T, fastllm_test::Half>) {
    for (double v : {1e30, -1e30, 3e38, -3e38}) values.push_back(v);
  }
  for (Activation a : kActivations) {
    run_case<T>(Layout{3, static_cast<int64_t>(values.size()), false, 1}, a, 5, 1.0, values);
    run_case<T>(Layout{2, static_cast<int64_t>(values.size()), true, 0}, a, 6, 1.0, values);
  }
}

TEST_CASE_PER_DTYPE(special_values, run_special_values)

TEST_CASE(empty_problems_touch_nothing) {
  std::vector<float> out(4, std::nanf(""));
  FwdParams f;
  f.out = out.data();
  f.rows = 0;
  f.cols = 4;
  fastllm::gated_mlp::gated_mlp_fwd_cpu(f);
  f.rows = 1;
  f.cols = 0;
  fastllm::gated_mlp::gated_mlp_fwd_cpu(f);
  for (float v : out) CHECK(std::isnan(v), "empty forward wrote its output");
}

}  // namespace

TEST_MAIN()
