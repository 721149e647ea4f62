// cross_entropy_fwd_cpu / cross_entropy_bwd_cpu (csrc/cross_entropy/cross_entropy.h) against a
// double-precision reference written straight from the math in cross_entropy.h: every dtype,
// with and without class weights, label smoothing, z-loss and soft-capping, ignored rows,
// vocabularies from 1 to 70001 (tails of every length), row strides larger than the vocab,
// a per-row and a broadcast (stride 0) upstream gradient, the in-place backward
// (grad_logits == logits), bad targets, and 1, 2 or 3 OpenMP threads; the forward's correct
// bits (token accuracy), ties of the (capped) logits included.
// ctest runs this binary twice: on the best instruction set of the machine and with
// FASTLLM_CPU_ISA=scalar.
//
// Logits rows are padded with NaN up to their stride, and the gradient buffer carries NaN
// guard elements after its end, so a kernel that reads padding or writes past the rows is
// caught.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cross_entropy/cross_entropy.h"
#include "dtypes.h"

namespace {

using namespace fastllm_test;  // check.h, dtypes.h
using fastllm::cross_entropy::BwdParams;
using fastllm::cross_entropy::FwdParams;

constexpr int64_t kIgnore = -100;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// float32: float accumulation and a ~1 ulp vector exp; bfloat16 / float16: the gradient is
// rounded to the dtype.
template <class T>
constexpr double kTol = per_dtype<T>(2e-5, 0x1p-8, 0x1p-10, 1e-12);

struct Options {
  bool weighted = false;
  double label_smoothing = 0;
  double z_loss = 0;
  double softcap = 0;
};

struct Reference {
  std::vector<double> loss, lse, grad;  // grad: (rows, vocab)
};

// The math of cross_entropy.h, in double, on the values the kernel sees.
Reference reference(const std::vector<double>& x, const std::vector<int64_t>& target,
                    const std::vector<double>& w, const std::vector<double>& g, int64_t rows,
                    int64_t vocab, const Options& o) {
  Reference r;
  r.loss.assign(rows, 0);
  r.lse.assign(rows, 0);
  r.grad.assign(rows * vocab, 0);
  double w_sum = 0;
  for (int64_t c = 0; c < vocab; ++c) w_sum += o.weighted ? w[c] : 1.0;
  const double ls = o.label_smoothing;
  for (int64_t i = 0; i < rows; ++i) {
    std::vector<double> z(vocab), tanh_x(vocab);
    double m = -INFINITY;
    for (int64_t c = 0; c < vocab; ++c) {
      tanh_x[c] = o.softcap > 0 ? std::tanh(x[i * vocab + c] / o.softcap) : 0;
      z[c] = o.softcap > 0 ? o.softcap * tanh_x[c] : x[i * vocab + c];
      m = std::max(m, z[c]);
    }
    double s = 0;
    for (double v : z) s += std::exp(v - m);
    const double lse = m + std::log(s);
    r.lse[i] = lse;
    const int64_t t = target[i];
    if (t == kIgnore) continue;
    const double w_t = o.weighted ? w[t] : 1.0;
    double smooth = 0;
    for (int64_t c = 0; c < vocab; ++c) smooth += (o.weighted ? w[c] : 1.0) * (lse - z[c]);
    r.loss[i] = (1 - ls) * w_t * (lse - z[t]) + ls * smooth / vocab + o.z_loss * lse * lse;
    for (int64_t c = 0; c < vocab; ++c) {
      const double p = std::exp(z[c] - lse);
      const double w_c = o.weighted ? w[c] : 1.0;
      double d = g[i] * ((1 - ls) * w_t * (p - (c == t)) + ls * (p * w_sum / vocab - w_c / vocab) +
                         2 * o.z_loss * lse * p);
      if (o.softcap > 0) d *= 1 - tanh_x[c] * tanh_x[c];
      r.grad[i * vocab + c] = d;
    }
  }
  return r;
}

// Runs forward and backward on one problem and checks every output against the reference.
// grad_tol: the gradient's relative tolerance (default: the dtype's).
// The fields forward and backward params share: logits rows of T, targets, options.
template <class T, class Params>
void set_inputs(Params& p, const T* logits, int64_t row_stride, const int64_t* target,
                const AccOf<T>* class_weight, int64_t rows, int64_t vocab, const Options& o) {
  p.logits = logits;
  p.logits_row_stride = row_stride;
  p.target = target;
  p.class_weight = class_weight;
  p.rows = rows;
  p.vocab = vocab;
  p.ignore_index = kIgnore;
  p.label_smoothing = o.label_smoothing;
  p.z_loss = o.z_loss;
  p.softcap = o.softcap;
  p.dtype = DTypeInfo<T>::kDType;
}

template <class T>
void check_problem(int64_t rows, int64_t vocab, const Options& o, uint32_t seed,
                   bool broadcast_grad, bool in_place, double scale = 2.0, double grad_tol = 0) {
  using Acc = AccOf<T>;
  const char* name = DTypeInfo<T>::kName;
  const int64_t stride = vocab + 3;  // rows with padding between them
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> x(rows * stride, from_acc<T>(static_cast<Acc>(kNaN)));
  std::vector<double> xd(rows * vocab);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < vocab; ++c) {
      x[i * stride + c] = from_acc<T>(static_cast<Acc>(normal(gen)));
      xd[i * vocab + c] = static_cast<double>(to_acc(x[i * stride + c]));
    }
  }
  std::vector<int64_t> target(rows);
  for (int64_t i = 0; i < rows; ++i) {
    target[i] = i % 4 == 1 ? kIgnore : static_cast<int64_t>(gen() % vocab);
  }
  std::vector<Acc> w(vocab);
  std::vector<double> wd(vocab);
  for (int64_t c = 0; c < vocab; ++c) {
    w[c] = static_cast<Acc>(0.5 + (gen() % 100) / 100.0);
    wd[c] = static_cast<double>(w[c]);
  }
  std::vector<Acc> g(rows);
  std::vector<double> gd(rows);
  for (int64_t i = 0; i < rows; ++i) {
    g[i] = static_cast<Acc>(broadcast_grad ? 0.75 : 0.5 + (gen() % 10) / 10.0);
    gd[i] = static_cast<double>(broadcast_grad ? g[0] : g[i]);
  }

  std::vector<Acc> loss(rows, static_cast<Acc>(kNaN)), lse(rows, static_cast<Acc>(kNaN));
  int64_t bad_row = -7;
  // Some rows get their target at the row max, every third of those tied with class 0.
  for (int64_t i = 2; i < rows; i += 3) {
    if (target[i] == kIgnore) continue;
    T* row = x.data() + i * stride;
    int64_t top = 0;
    for (int64_t c = 1; c < vocab; ++c) top = to_acc(row[c]) > to_acc(row[top]) ? c : top;
    target[i] = top;
    if (i % 9 == 2 && top > 0) {
      row[0] = row[top];
      xd[i * vocab] = xd[i * vocab + top];
    }
  }
  std::unique_ptr<bool[]> correct(new bool[rows]);
  const Acc* class_weight = o.weighted ? w.data() : nullptr;
  FwdParams p;
  set_inputs(p, x.data(), stride, target.data(), class_weight, rows, vocab, o);
  p.loss = loss.data();
  p.lse = lse.data();
  p.correct = correct.get();
  p.bad_target_row = &bad_row;
  fastllm::cross_entropy::cross_entropy_fwd_cpu(p);
  CHECK(bad_row == -1, "%s: bad_target_row = %lld with every target valid", name,
        static_cast<long long>(bad_row));
  // correct: the target's capped logit is the row max, the caps computed as the kernels do
  // (in Acc, std::tanh), so that ties of the capped logits (1e4 logits at softcap 3) count.
  const Acc inv_softcap = o.softcap > 0 ? static_cast<Acc>(1.0 / o.softcap) : Acc(0);
  const auto capped = [&](T v) {
    const Acc a = to_acc(v);
    return o.softcap > 0 ? static_cast<Acc>(o.softcap) * std::tanh(a * inv_softcap) : a;
  };
  for (int64_t i = 0; i < rows; ++i) {
    bool want = false;
    if (target[i] != kIgnore) {
      Acc m = std::numeric_limits<Acc>::lowest();
      for (int64_t c = 0; c < vocab; ++c) m = std::max(m, capped(x[i * stride + c]));
      want = capped(x[i * stride + target[i]]) == m;
    }
    CHECK(correct[i] == want, "%s %lldx%lld: correct[%lld] = %d, expected %d", name,
          static_cast<long long>(rows), static_cast<long long>(vocab),
          static_cast<long long>(i), int(correct[i]), int(want));
  }

  // Out of place: a contiguous gradient with NaN guards after it; in place: over x.
  const int64_t guard = 5;
  std::vector<T> dx(rows * vocab + guard, from_acc<T>(static_cast<Acc>(kNaN)));
  BwdParams b;
  set_inputs(b, x.data(), stride, target.data(), class_weight, rows, vocab, o);
  b.grad_loss = g.data();
  b.grad_loss_stride = broadcast_grad ? 0 : 1;
  b.lse = lse.data();
  b.grad_logits = in_place ? static_cast<void*>(x.data()) : static_cast<void*>(dx.data());
  b.grad_row_stride = in_place ? stride : vocab;
  fastllm::cross_entropy::cross_entropy_bwd_cpu(b);

  const Reference ref = reference(xd, target, wd, gd, rows, vocab, o);
  const double tol = kTol<T>;
  long bad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const double l = static_cast<double>(loss[i]);
    if (!(std::fabs(l - ref.loss[i]) <= tol * (1 + std::fabs(ref.loss[i]))) && bad++ < 3) {
      CHECK(false, "%s %lldx%lld: loss[%lld] = %.9g, reference %.9g", name,
            static_cast<long long>(rows), static_cast<long long>(vocab),
            static_cast<long long>(i), l, ref.loss[i]);
    }
    const double s = static_cast<double>(lse[i]);
    if (!(std::fabs(s - ref.lse[i]) <= tol * (1 + std::fabs(ref.lse[i]))) && bad++ < 3) {
      CHECK(false, "%s: lse[%lld] = %.9g, reference %.9g", name, static_cast<long long>(i), s,
            ref.lse[i]);
    }
    // A gradient is a difference of terms as large as g * w * (1 + 2 z_loss |lse|): its
    // rounding error is relative to those, not to the (possibly tiny) difference.
    const double terms = gd[i] * 1.5 * (1 + 2 * o.z_loss * std::fabs(ref.lse[i]));
    const double gtol = grad_tol > 0 ? grad_tol : tol;
    for (int64_t c = 0; c < vocab; ++c) {
      const T stored = in_place ? x[i * stride + c] : dx[i * vocab + c];
      const double d = static_cast<double>(to_acc(stored));
      const double want = ref.grad[i * vocab + c];
      if (!(std::fabs(d - want) <= gtol * (std::fabs(want) + 0.05 * terms)) && bad++ < 3) {
        CHECK(false, "%s %lldx%lld: grad[%lld, %lld] = %.9g, reference %.9g", name,
              static_cast<long long>(rows), static_cast<long long>(vocab),
              static_cast<long long>(i), static_cast<long long>(c), d, want);
      }
    }
    if (in_place) {
      for (int64_t c = vocab; c < stride; ++c) {
        CHECK(std::isnan(static_cast<double>(to_acc(x[i * stride + c]))),
              "%s: in-place backward wrote the padding after row %lld", name,
              static_cast<long long>(i));
      }
    }
  }
  if (!in_place) {
    for (int64_t k = 0; k < guard; ++k) {
      CHECK(std::isnan(static_cast<double>(to_acc(dx[rows * vocab + k]))),
            "%s: backward wrote past the gradient's end", name);
    }
  }
}

const Options kVariants[] = {
    {},
    {true, 0.0, 0.0, 0.0},
    {false, 0.1, 0.0, 0.0},
    {true, 0.2, 0.0, 0.0},
    {false, 0.0, 1e-2, 0.0},
    {false, 0.0, 0.0, 5.0},
    {true, 0.1, 1e-3, 3.0},
};

template <class T>
void run_all_variants() {
  const int64_t shapes[][2] = {{1, 1}, {3, 2}, {5, 7}, {4, 8}, {3, 33}, {9, 1000}, {2, 4099},
                               {2, 70001}};
  uint32_t seed = 1;
  for (const auto& shape : shapes) {
    if (std::is_same_v<T, double> && shape[1] > 5000) continue;  // the slow scalar exp
    for (const Options& o : kVariants) {
      const bool broadcast = seed % 2 == 0, in_place = seed % 3 == 0;
      check_problem<T>(shape[0], shape[1], o, seed++, broadcast, in_place);
    }
  }
}

TEST_CASE_PER_DTYPE(all_variants, run_all_variants)

TEST_CASE(thread_counts) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    check_problem<float>(37, 3000, Options{true, 0.1, 1e-3, 0.0}, 100 + threads, false, false);
  }
  omp_set_num_threads(saved);
}

// Logits of magnitude 1e4: the loss and lse keep float accuracy (no cancellation); the
// gradient's p = exp(z - lse) inherits the rounding of the float lse (ulp(1e4) ~ 1e-3).
TEST_CASE(large_logits) {
  for (const Options& o : kVariants) {
    check_problem<float>(6, 1000, o, 200, false, false, /*scale=*/1e4, /*grad_tol=*/2e-3);
  }
}

// Forward and backward of contiguous float32 logits (rows, vocab) with default options but
// z_loss, an upstream gradient of 1 per row, and the forward's bad_target_row.
struct Float32Run {
  std::vector<float> loss, lse, dx;
  int64_t bad_row = -7;
};

Float32Run run_float32(const std::vector<float>& x, const std::vector<int64_t>& target,
                       int64_t rows, int64_t vocab, double z_loss) {
  Float32Run r;
  r.loss.resize(rows);
  r.lse.resize(rows);
  r.dx.resize(rows * vocab);
  const std::vector<float> g(rows, 1.0f);
  Options o;
  o.z_loss = z_loss;
  FwdParams p;
  set_inputs<float>(p, x.data(), vocab, target.data(), nullptr, rows, vocab, o);
  p.loss = r.loss.data();
  p.lse = r.lse.data();
  p.bad_target_row = &r.bad_row;
  fastllm::cross_entropy::cross_entropy_fwd_cpu(p);
  BwdParams b;
  set_inputs<float>(b, x.data(), vocab, target.data(), nullptr, rows, vocab, o);
  b.grad_loss = g.data();
  b.lse = r.lse.data();
  b.grad_logits = r.dx.data();
  b.grad_row_stride = vocab;
  fastllm::cross_entropy::cross_entropy_bwd_cpu(b);
  return r;
}

// Targets out of range: the forward reports the first such row and gives it a NaN loss; the
// backward gives it NaN gradients; neither reads logits at the bad index.
TEST_CASE(bad_targets) {
  const int64_t rows = 5, vocab = 40;
  const std::vector<float> x(rows * vocab, 0.5f);
  const std::vector<int64_t> target = {1, kIgnore, 40, -1, 2};
  const Float32Run r = run_float32(x, target, rows, vocab, /*z_loss=*/0.0);
  const std::vector<float>& loss = r.loss;
  CHECK(r.bad_row == 2, "bad_target_row = %lld, expected 2", static_cast<long long>(r.bad_row));
  CHECK(std::isnan(loss[2]) && std::isnan(loss[3]), "bad rows must have a NaN loss");
  CHECK(loss[1] == 0.0f, "an ignored row's loss must be 0, got %g", loss[1]);
  CHECK(std::isfinite(loss[0]) && std::isfinite(loss[4]), "valid rows must have finite losses");
  for (int64_t c = 0; c < vocab; ++c) {
    CHECK(std::isnan(r.dx[2 * vocab + c]) && std::isnan(r.dx[3 * vocab + c]),
          "bad rows must have NaN gradients (column %lld)", static_cast<long long>(c));
    CHECK(r.dx[vocab + c] == 0.0f, "an ignored row's gradient must be 0");
  }
}

// -inf logits (masked classes) add nothing and get exactly zero gradient.
TEST_CASE(masked_logits) {
  const int64_t rows = 3, vocab = 50;
  std::vector<float> x(rows * vocab);
  for (int64_t k = 0; k < rows * vocab; ++k) x[k] = k % 3 == 0 ? -INFINITY : 0.01f * (k % 17);
  const std::vector<int64_t> target = {1, 2, 4};
  const Float32Run r = run_float32(x, target, rows, vocab, /*z_loss=*/1e-3);
  for (int64_t i = 0; i < rows; ++i) {
    CHECK(std::isfinite(r.loss[i]) && std::isfinite(r.lse[i]), "row %lld: loss %g, lse %g",
          static_cast<long long>(i), r.loss[i], r.lse[i]);
  }
  for (int64_t k = 0; k < rows * vocab; ++k) {
    if (k % 3 == 0) {
      CHECK(r.dx[k] == 0.0f, "masked logit %lld has gradient %g", static_cast<long long>(k),
            r.dx[k]);
    } else {
      CHECK(std::isfinite(r.dx[k]), "gradient %lld is %g", static_cast<long long>(k), r.dx[k]);
    }
  }
}

}  // namespace

TEST_MAIN()
