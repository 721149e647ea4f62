// norm_fwd_cpu / norm_bwd_cpu (csrc/norm/norm.h) against a double-precision reference
// written straight from the math in norm.h: every dtype, layer and rms norm, with and without
// weight / bias / residual / dresidual_out / dweight / dbias, odd shapes (1x1, 3x1000,
// 7x65536, 5x97 ...), row strides larger than cols, and 1, 2 or 3 OpenMP threads.
// ctest runs this binary twice: on the best instruction set of the machine and with
// FASTLLM_CPU_ISA=scalar.
//
// Inputs are padded with NaN between rows and outputs carry NaN guard elements after their
// end, so a kernel that reads a row's padding or writes past an output is caught.
//
// Tolerances: an output rounded to T may be off by one unit in the last place of T (rtol,
// relative to the value) plus the error of accumulating in float / double (atol, relative
// to the magnitude of the terms that were summed).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "dtypes.h"
#include "norm/norm.h"

namespace {

using namespace fastllm_test;  // check.h, dtypes.h
using fastllm::norm::BwdParams;
using fastllm::norm::FwdParams;

// Accumulation error allowed, relative to the magnitude of what was summed.
template <class T>
constexpr double acc_tol() {
  return std::is_same_v<AccOf<T>, double> ? 1e-11 : 3e-5;
}

// Deterministic pseudo-random numbers, roughly N(0, 1) (sum of four uniforms).
struct Rng {
  uint64_t state;
  double uniform() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(state >> 11) * 0x1p-53;
  }
  double normal() {
    return (uniform() + uniform() + uniform() + uniform() - 2.0) * std::sqrt(3.0);
  }
};

template <class T>
T nan_of() {
  return from_acc<T>(std::numeric_limits<AccOf<T>>::quiet_NaN());
}

template <class T>
bool is_nan(T v) {
  return std::isnan(to_acc(v));
}

constexpr int64_t kGuard = 16;

struct Case {
  int64_t rows, cols;
  int64_t pad;  // extra elements between input rows (row stride = cols + pad * k)
  bool rms, weight, bias, residual, dres, dweight, dbias;
  double eps;
  std::string describe(const char* dtype) const {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%s %s rows=%lld cols=%lld pad=%lld weight=%d bias=%d residual=%d dres=%d "
                  "dweight=%d dbias=%d threads=%d",
                  dtype, rms ? "rms" : "layer", static_cast<long long>(rows),
                  static_cast<long long>(cols), static_cast<long long>(pad), weight, bias, residual,
                  dres, dweight, dbias, omp_get_max_threads());
    return buf;
  }
};

// Inputs: rows of `cols` values at the given row stride, the padding NaN.
template <class T>
std::vector<T> random_rows(Rng& rng, int64_t rows, int64_t cols, int64_t stride, double mean,
                           double scale) {
  std::vector<T> v(static_cast<size_t>(rows * stride), nan_of<T>());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      v[r * stride + j] = from_acc<T>(static_cast<AccOf<T>>(mean + scale * rng.normal()));
    }
  }
  return v;
}

// Outputs: n elements plus kGuard NaN guard elements, all NaN before the kernel runs.
template <class T>
std::vector<T> output(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n + kGuard), nan_of<T>());
}

template <class T>
void check_guard(const std::vector<T>& v, int64_t n, const char* name, const std::string& what) {
  for (int64_t i = n; i < n + kGuard; ++i) {
    CHECK(is_nan(v[i]), "%s: %s written past its end at %lld", what.c_str(), name,
          static_cast<long long>(i - n));
  }
}

// |got - want| <= rtol * |want| + atol * scale + abs_tol, NaN never passes.
bool close(double got, double want, double rtol, double atol, double scale, double abs_tol = 0) {
  return std::fabs(got - want) <= rtol * std::fabs(want) + atol * scale + abs_tol;
}

// The forward and backward of one case, compared with the double-precision reference.
template <class T>
void run_case(const Case& c, uint64_t seed) {
  using Acc = AccOf<T>;
  const std::string what = c.describe(DTypeInfo<T>::kName);
  const int64_t rows = c.rows, cols = c.cols, n = rows * cols;
  const double round_rtol = DTypeInfo<T>::kRoundRtol;
  const double atol = acc_tol<T>();
  Rng rng{seed};

  const int64_t ld_x = cols + c.pad, ld_res = cols + 2 * c.pad, ld_dy = cols + 3 * c.pad;
  const int64_t ld_dres = cols + c.pad;
  const std::vector<T> x = random_rows<T>(rng, rows, cols, ld_x, 0.5, 1.5);
  const std::vector<T> res = random_rows<T>(rng, rows, cols, ld_res, -0.25, 1.0);
  const std::vector<T> dy = random_rows<T>(rng, rows, cols, ld_dy, 0.0, 1.0);
  const std::vector<T> dres = random_rows<T>(rng, rows, cols, ld_dres, 0.1, 0.5);
  std::vector<Acc> w(cols), b(cols);
  for (auto& v : w) v = static_cast<Acc>(1.0 + 0.5 * rng.normal());
  for (auto& v : b) v = static_cast<Acc>(0.3 * rng.normal());
  const bool use_bias = c.bias && !c.rms;

  // ---- forward
  std::vector<T> out = output<T>(n), res_out = output<T>(n);
  std::vector<Acc> mean = output<Acc>(rows), rstd = output<Acc>(rows);
  FwdParams f;
  f.x = x.data();
  f.x_row_stride = ld_x;
  f.residual = c.residual ? res.data() : nullptr;
  f.residual_row_stride = ld_res;
  f.weight = c.weight ? w.data() : nullptr;
  f.bias = use_bias ? b.data() : nullptr;
  f.out = out.data();
  f.residual_out = c.residual ? res_out.data() : nullptr;
  f.mean = c.rms ? nullptr : mean.data();
  f.rstd = rstd.data();
  f.rows = rows;
  f.cols = cols;
  f.eps = c.eps;
  f.rms = c.rms;
  f.dtype = DTypeInfo<T>::kDType;
  fastllm::norm::norm_fwd_cpu(f);

  // The reference forward, row by row, in double. s is rounded to T exactly as the kernel
  // must round it, so residual_out is compared bit for bit.
  // xhat_mag: |s| + |mean| in units of std, the size of what (s - mean) * rstd cancels.
  std::vector<double> s_ref(n), xhat_ref(n), xhat_mag(n), mean_ref(rows), rstd_ref(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t j = 0; j < cols; ++j) {
      double s = to_acc(x[r * ld_x + j]);
      if (c.residual) {
        s = to_acc(from_acc<T>(static_cast<Acc>(s + to_acc(res[r * ld_res + j]))));
      }
      s_ref[r * cols + j] = s;
      sum += s;
    }
    const double mu = c.rms ? 0.0 : sum / cols;
    double sq = 0;
    for (int64_t j = 0; j < cols; ++j) sq += (s_ref[r * cols + j] - mu) * (s_ref[r * cols + j] - mu);
    const double inv_std = 1.0 / std::sqrt(sq / cols + static_cast<double>(static_cast<Acc>(c.eps)));
    mean_ref[r] = mu;
    rstd_ref[r] = inv_std;
    for (int64_t j = 0; j < cols; ++j) {
      xhat_ref[r * cols + j] = (s_ref[r * cols + j] - mu) * inv_std;
      xhat_mag[r * cols + j] = (std::fabs(s_ref[r * cols + j]) + std::fabs(mu)) * inv_std;
    }
    const double std_dev = std::sqrt(sq / cols);
    if (!c.rms) {
      CHECK(close(mean[r], mu, 0, atol, std::fabs(mu) + std_dev), "%s: mean[%lld] = %.9g, want %.9g",
            what.c_str(), static_cast<long long>(r), static_cast<double>(mean[r]), mu);
    }
    CHECK(close(rstd[r], inv_std, atol, 0, 0), "%s: rstd[%lld] = %.9g, want %.9g", what.c_str(),
          static_cast<long long>(r), static_cast<double>(rstd[r]), inv_std);
  }
  long reported = 0;
  for (int64_t i = 0; i < n && reported < 5; ++i) {
    const int64_t j = i % cols;
    const double wj = c.weight ? w[j] : 1.0, bj = use_bias ? b[j] : 0.0;
    const double want = xhat_ref[i] * wj + bj;
    const double got = to_acc(out[i]);
    const bool ok = close(got, want, round_rtol, atol, xhat_mag[i] * std::fabs(wj) + std::fabs(bj),
                          DTypeInfo<T>::kRoundAtol);
    CHECK(ok, "%s: out[%lld, %lld] = %.9g, want %.9g", what.c_str(), static_cast<long long>(i / cols),
          static_cast<long long>(j), got, want);
    reported += !ok;
    if (c.residual) {
      const T want_s = from_acc<T>(static_cast<Acc>(s_ref[i]));
      const bool same = std::memcmp(&res_out[i], &want_s, sizeof(T)) == 0;
      CHECK(same, "%s: residual_out[%lld, %lld] = %.9g, want %.9g", what.c_str(),
            static_cast<long long>(i / cols), static_cast<long long>(j), to_acc(res_out[i]), s_ref[i]);
      reported += !same;
    }
  }
  check_guard(out, n, "out", what);
  if (c.residual) check_guard(res_out, n, "residual_out", what);
  check_guard(rstd, rows, "rstd", what);
  if (!c.rms) check_guard(mean, rows, "mean", what);

  // ---- backward, on what forward normalised (residual_out for the add_* variants)
  std::vector<T> dx = output<T>(n);
  std::vector<Acc> dw = output<Acc>(cols), db = output<Acc>(cols);
  BwdParams g;
  g.dy = dy.data();
  g.dy_row_stride = ld_dy;
  g.dresidual_out = c.dres ? dres.data() : nullptr;
  g.dresidual_out_row_stride = ld_dres;
  g.x = c.residual ? res_out.data() : x.data();
  g.x_row_stride = c.residual ? cols : ld_x;
  g.weight = c.weight ? w.data() : nullptr;
  g.mean = c.rms ? nullptr : mean.data();
  g.rstd = rstd.data();
  g.dx = dx.data();
  g.dweight = c.dweight ? dw.data() : nullptr;
  g.dbias = c.dbias ? db.data() : nullptr;
  g.rows = rows;
  g.cols = cols;
  g.rms = c.rms;
  g.dtype = DTypeInfo<T>::kDType;
  fastllm::norm::norm_bwd_cpu(g);

  std::vector<double> dw_ref(cols, 0.0), db_ref(cols, 0.0), dw_scale(cols, 0.0), db_scale(cols, 0.0);
  reported = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const double gj = to_acc(dy[r * ld_dy + j]) * (c.weight ? w[j] : 1.0);
      sum_g += gj;
      sum_g_xhat += gj * xhat_ref[r * cols + j];
    }
    const double mean_g = c.rms ? 0.0 : sum_g / cols, mean_g_xhat = sum_g_xhat / cols;
    for (int64_t j = 0; j < cols; ++j) {
      const double dyj = to_acc(dy[r * ld_dy + j]);
      const double xh = xhat_ref[r * cols + j];
      const double gj = dyj * (c.weight ? w[j] : 1.0);
      const double dres_j = c.dres ? to_acc(dres[r * ld_dres + j]) : 0.0;
      const double want = rstd_ref[r] * (gj - mean_g - xh * mean_g_xhat) + dres_j;
      const double scale =
          rstd_ref[r] * (std::fabs(gj) + std::fabs(mean_g) + xhat_mag[r * cols + j] * std::fabs(mean_g_xhat)) +
          std::fabs(dres_j);
      const double got = to_acc(dx[r * cols + j]);
      const bool ok =
          reported >= 5 || close(got, want, round_rtol, atol, scale, DTypeInfo<T>::kRoundAtol);
      CHECK(ok, "%s: dx[%lld, %lld] = %.9g, want %.9g", what.c_str(), static_cast<long long>(r),
            static_cast<long long>(j), got, want);
      reported += !ok;
      dw_ref[j] += dyj * xh;
      dw_scale[j] += std::fabs(dyj) * xhat_mag[r * cols + j];
      db_ref[j] += dyj;
      db_scale[j] += std::fabs(dyj);
    }
  }
  check_guard(dx, n, "dx", what);
  reported = 0;
  for (int64_t j = 0; j < cols && reported < 5; ++j) {
    if (c.dweight) {
      const bool ok = close(dw[j], dw_ref[j], 0, atol, dw_scale[j]);
      CHECK(ok, "%s: dweight[%lld] = %.9g, want %.9g", what.c_str(), static_cast<long long>(j),
            static_cast<double>(dw[j]), dw_ref[j]);
      reported += !ok;
    }
    if (c.dbias) {
      const bool ok = close(db[j], db_ref[j], 0, atol, db_scale[j]);
      CHECK(ok, "%s: dbias[%lld] = %.9g, want %.9g", what.c_str(), static_cast<long long>(j),
            static_cast<double>(db[j]), db_ref[j]);
      reported += !ok;
    }
  }
  if (c.dweight) check_guard(dw, cols, "dweight", what);
  if (c.dbias) check_guard(db, cols, "dbias", what);
  for (int64_t j = 0; j < cols && !c.dweight; ++j) CHECK(std::isnan(dw[j]), "%s: dweight written", what.c_str());
  for (int64_t j = 0; j < cols && !c.dbias; ++j) CHECK(std::isnan(db[j]), "%s: dbias written", what.c_str());
}

// Every combination of the optional operands on shapes small enough for that; the large
// shapes with everything on and everything off.
template <class T>
void run_all_variants() {
  struct Shape {
    int64_t rows, cols, pad;
    bool all_flags;
  };
  const Shape shapes[] = {{1, 1, 0, true},   {1, 8, 0, true},    {2, 7, 3, true},
                          {3, 1000, 0, true}, {5, 97, 13, true},  {4, 33, 1, true},
                          {17, 256, 8, true}, {7, 65536, 0, false}, {300, 333, 5, false}};
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    for (bool rms : {false, true}) {
      for (int flags = 0; flags < 64; ++flags) {
        if (!s.all_flags && flags != 0 && flags != 63) continue;
        Case c{s.rows, s.cols, s.pad,
               rms,
               (flags & 1) != 0,
               (flags & 2) != 0,
               (flags & 4) != 0,
               (flags & 8) != 0,
               (flags & 16) != 0,
               (flags & 32) != 0 && !rms,
               1e-5};
        if (rms && (flags & 2)) continue;  // rms has no bias: that variant is flags & ~2
        run_case<T>(c, seed++);
      }
    }
  }
}

TEST_CASE_PER_DTYPE(all_variants, run_all_variants)

// dweight / dbias are per-thread partial sums reduced at the end: check them at 1, 2 and 3
// threads on row counts that do not split evenly, and that a second run gives the same bits.
template <class T>
void run_thread_counts() {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{1025}, int64_t{3001}}) {
      Case c{rows, 64, 0, false, true, true, true, true, true, true, 1e-5};
      run_case<T>(c, 1000 + rows);
      c.rms = true;
      c.bias = false;
      c.dbias = false;
      run_case<T>(c, 2000 + rows);
    }
    // Determinism: the same call twice gives bit-identical dweight and dbias.
    const int64_t rows = 4099, cols = 40;
    Rng rng{7};
    const std::vector<T> x = random_rows<T>(rng, rows, cols, cols, 0.0, 1.0);
    const std::vector<T> dy = random_rows<T>(rng, rows, cols, cols, 0.0, 1.0);
    std::vector<AccOf<T>> w(cols, 1.25), mean(rows, 0.1), rstd(rows, 0.9);
    std::vector<T> dx(rows * cols);
    std::vector<AccOf<T>> dw[2] = {std::vector<AccOf<T>>(cols), std::vector<AccOf<T>>(cols)};
    std::vector<AccOf<T>> db[2] = {std::vector<AccOf<T>>(cols), std::vector<AccOf<T>>(cols)};
    for (int run = 0; run < 2; ++run) {
      BwdParams g;
      g.dy = dy.data();
      g.dy_row_stride = cols;
      g.x = x.data();
      g.x_row_stride = cols;
      g.weight = w.data();
      g.mean = mean.data();
      g.rstd = rstd.data();
      g.dx = dx.data();
      g.dweight = dw[run].data();
      g.dbias = db[run].data();
      g.rows = rows;
      g.cols = cols;
      g.dtype = DTypeInfo<T>::kDType;
      fastllm::norm::norm_bwd_cpu(g);
    }
    CHECK(std::memcmp(dw[0].data(), dw[1].data(), cols * sizeof(AccOf<T>)) == 0,
          "%s: dweight differs between two identical runs at %d threads", DTypeInfo<T>::kName,
          threads);
    CHECK(std::memcmp(db[0].data(), db[1].data(), cols * sizeof(AccOf<T>)) == 0,
          "%s: dbias differs between two identical runs at %d threads", DTypeInfo<T>::kName, threads);
  }
  omp_set_num_threads(saved);
}

TEST_CASE(float32_thread_counts) { run_thread_counts<float>(); }
TEST_CASE(bfloat16_thread_counts) { run_thread_counts<BFloat16>(); }
TEST_CASE(float64_thread_counts) { run_thread_counts<double>(); }

// Rows that are hard for the variance: a large mean with a tiny spread (cancellation in
// E[x^2] - E[x]^2), an outlier in the first elements (far from the row's mean), a constant
// row (var = 0), and eps = 0 on a non-constant row.
template <class T>
void run_hard_rows() {
  using Acc = AccOf<T>;
  const int64_t cols = 1000;
  struct Row {
    const char* name;
    double (*value)(int64_t j, Rng& rng);
    double eps;
  };
  const Row hard_rows[] = {
      {"large mean", [](int64_t, Rng& rng) { return 3000.0 + 0.5 * rng.normal(); }, 1e-5},
      {"outlier first", [](int64_t j, Rng& rng) { return j == 0 ? 1e4 : rng.normal(); }, 1e-5},
      {"outlier block first", [](int64_t j, Rng& rng) { return j < 8 ? -500.0 : 0.1 * rng.normal(); }, 1e-5},
      {"constant", [](int64_t, Rng&) { return 2.5; }, 1e-5},
      {"eps zero", [](int64_t, Rng& rng) { return rng.normal(); }, 0.0},
  };
  for (const Row& row : hard_rows) {
    Rng rng{42};
    std::vector<T> x(2 * cols);
    for (int64_t i = 0; i < 2 * cols; ++i) x[i] = from_acc<T>(static_cast<Acc>(row.value(i % cols, rng)));
    std::vector<T> out(2 * cols);
    std::vector<Acc> mean(2), rstd(2);
    FwdParams f;
    f.x = x.data();
    f.x_row_stride = cols;
    f.out = out.data();
    f.mean = mean.data();
    f.rstd = rstd.data();
    f.rows = 2;
    f.cols = cols;
    f.eps = row.eps;
    f.dtype = DTypeInfo<T>::kDType;
    fastllm::norm::norm_fwd_cpu(f);
    for (int64_t r = 0; r < 2; ++r) {
      double mu = 0, sq = 0;
      for (int64_t j = 0; j < cols; ++j) mu += to_acc(x[r * cols + j]);
      mu /= cols;
      for (int64_t j = 0; j < cols; ++j) sq += (to_acc(x[r * cols + j]) - mu) * (to_acc(x[r * cols + j]) - mu);
      const double var = sq / cols;
      const double want_rstd = 1.0 / std::sqrt(var + static_cast<double>(static_cast<Acc>(row.eps)));
      // The cancellation-prone rows must still give var to a few ulps of the acc type
      // relative to var itself, not relative to mean^2.
      CHECK(close(mean[r], mu, 0, acc_tol<T>(), std::fabs(mu) + std::sqrt(var)),
            "%s %s: mean = %.9g, want %.9g",
            DTypeInfo<T>::kName, row.name, static_cast<double>(mean[r]), mu);
      CHECK(close(rstd[r], want_rstd, acc_tol<T>(), 0, 0), "%s %s: rstd = %.9g, want %.9g",
            DTypeInfo<T>::kName, row.name, static_cast<double>(rstd[r]), want_rstd);
    }
  }
}

TEST_CASE(float32_hard_rows) { run_hard_rows<float>(); }
TEST_CASE(bfloat16_hard_rows) { run_hard_rows<BFloat16>(); }
TEST_CASE(float64_hard_rows) { run_hard_rows<double>(); }

}  // namespace

TEST_MAIN()
