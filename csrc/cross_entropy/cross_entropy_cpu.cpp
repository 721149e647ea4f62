// Cross-entropy on the CPU: cross_entropy_fwd_cpu and cross_entropy_bwd_cpu of
// cross_entropy.h, for float32, bfloat16, float16 and float64 logits. Torch-free: C++17,
// OpenMP and x86 intrinsics.
//
// Math (cross_entropy.h holds the contract), per row of V logits x, target t, computed in
// Acc (float, or double for float64 logits):
//   z      = softcap > 0 ? softcap * tanh(x / softcap) : x
//   lse    = log(sum_c exp(z_c))
//   loss   = (1 - ls) * w_t * (lse - z_t) + ls * sum_c w_c (lse - z_c) / V
//            + z_loss * lse^2              (w_c = 1 and w_sum = V without class weights,
//                                           w_sum = sum_c w_c with them; ls = smoothing)
//   dL/dz_c = g * ((1 - ls) * w_t + ls * w_sum / V + 2 * z_loss * lse) * p_c
//             - g * ls * w_c / V  - [c == t] * g * (1 - ls) * w_t,     p_c = exp(z_c - lse)
//   dL/dx_c = dL/dz_c * (1 - tanh^2(x_c / softcap))  with soft-capping.
// Rows whose target is ignore_index get loss 0 and a zero gradient row. correct (token
// accuracy) = the target's capped logit equals the row max m: one compare per row.
//
// Design. Per element, one exp (plus a tanh with soft-capping) in each direction, and as few
// passes over memory as the math allows:
//   - Forward reads each row from memory once. The log-sum-exp is an online reduction: a
//     running max m and a sum s of exp(z - m), rescaled by exp(m_old - m_new) when m grows
//     (per element in the scalar path, per L1-sized block in the vector paths,
//     cross_entropy_cpu_simd.h). The label-smoothing sum of w_c (z_c - m) rides along in
//     the same pass.
//   - Backward reads each row once (twice when |lse| is large, below) and writes the
//     gradient row once; it may write over the
//     logits (in-place backward), so the target's logit is read before the row is
//     overwritten and the target's gradient is written last.
//   - Running maxima start at the lowest finite float, not -inf, so -inf logits (masked
//     vocabulary) contribute exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
//   - Backward's p = exp(z - lse) from the saved float lse carries lse's rounding (half an
//     ulp) as a relative error of every p: 2^-17 below |lse| = 256, but 5e-4 at 1e4, and at
//     1e8 a 3-way tie gets p = 1 instead of 1/3. Rows with |lse| >= kExactLseMin get their
//     max m and log(sum exp(z - m)) recomputed from the logits (one more read of such a row,
//     none of the others), and p = exp((z - m) - log_sum) exactly (LseSplit).
//   - Precision when the logits share a large offset (|x| ~ 1e4, where a float's ulp is
//     1e-3): the loss is formed from the row max m and log(sum exp(z - m)) kept apart,
//     (m - z_t) + log_sum, and the smoothing sum is sum_c w_c (z_c - m) around the running
//     max (rebased when it grows, in double), so neither cancels: sum_c w_c (lse - z_c) =
//     w_sum * log_sum - sum_c w_c (z_c - m). Its terms are all <= 0, so logits near the
//     float maximum overflow it, if at all, to the right sign (+inf loss, as torch), never
//     to -inf or NaN.
//   - OpenMP gives each thread a contiguous block of rows; small problems use fewer threads.
//   - Three instruction paths, chosen at run time (common/cpu_features.h): AVX-512 on 16
//     floats where the CPU has F/BW/DQ/VL/BF16 (cpu_avx512(); exp as exp2 by vreduceps, a
//     degree-5 polynomial and vscalefps, about 1.5e-7 relative), AVX2/FMA/F16C on 8 floats
//     with cpu_avx2.h's exp (at most 2 ulp; 0 below -87.68) and a Cephes-style tanh,
//     and a portable scalar path built on std::exp / std::tanh, which is also the plainest
//     statement of the algorithm. FASTLLM_CPU_ISA=avx2 / =scalar force the lower ones.
//     float64 logits (used for gradcheck) always take the scalar path.
//   - Backward's gradient is usually a fresh tensor: its first touch (page faults, the OS
//     clearing each page) cost more than the kernel itself at 4096 x 32000, so the buffer
//     gets huge pages advised first, except where the OS hands free memory back to a
//     hypervisor (common/cpu_memory.h).
//   - A target outside [0, V) that is not ignore_index is never used as an index: forward
//     gives the row a NaN loss and reports the first such row in bad_target_row (for C++
//     callers: the torch glue checks the targets before calling); backward gives the row
//     NaN gradients.
//
// Glossary: rows = N (tokens), vocab = V (classes), T = storage dtype, Acc = accumulation
// type, W = vector lanes (8 or 16 floats), ls = label_smoothing, g = upstream gradient of a row.
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "common/cpu_dispatch.h"
#include "common/cpu_dtypes.h"
#include "common/cpu_features.h"
#include "common/cpu_memory.h"
#include "common/cpu_parallel.h"
#include "cross_entropy/cross_entropy.h"

#if defined(__x86_64__) || defined(__i386__)
#include "common/cpu_avx2.h"
#include "common/cpu_avx2_even_odd.h"
#include "common/cpu_avx512.h"
#define FASTLLM_CROSS_ENTROPY_CPU_AVX2 1
#endif

namespace fastllm {
namespace cross_entropy {
namespace {

// Storage types, to_acc / from_acc, dispatch_dtype, threads_for / block_begin
// (common/cpu_*.h).
using namespace cpu;

// About 16K logits per thread: each costs an exp, so the fork/join pays off early.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 14;

// Which label-smoothing sum the forward accumulates: none, sum_c z_c, or sum_c w_c z_c.
enum class Smoothing { kNone, kUniform, kWeighted };

// Per-call constants in the accumulation type.
template <class Acc>
struct Consts {
  const Acc* weight = nullptr;  // class weights (V,) or nullptr
  Acc ls = 0;                   // label smoothing
  Acc z_loss = 0;
  Acc softcap = 0;
  Acc inv_softcap = 0;
  Acc inv_vocab = 0;
  Acc weight_total = 0;         // w_sum: sum of the class weights, or V without them
};

template <class Acc>
Consts<Acc> make_consts(const void* weight, int64_t vocab, double ls, double z_loss,
                        double softcap) {
  Consts<Acc> c;
  c.weight = static_cast<const Acc*>(weight);
  c.ls = static_cast<Acc>(ls);
  c.z_loss = static_cast<Acc>(z_loss);
  c.softcap = static_cast<Acc>(softcap);
  c.inv_softcap = softcap > 0 ? static_cast<Acc>(1.0 / softcap) : Acc(0);
  c.inv_vocab = static_cast<Acc>(1.0 / static_cast<double>(vocab));
  double total = static_cast<double>(vocab);
  if (c.weight != nullptr) {
    total = 0;
    for (int64_t j = 0; j < vocab; ++j) total += static_cast<double>(c.weight[j]);
  }
  c.weight_total = static_cast<Acc>(total);
  return c;
}

bool target_in_range(int64_t t, int64_t vocab) { return t >= 0 && t < vocab; }

template <class Acc>
Acc capped_logit(Acc x, const Consts<Acc>& c) {
  return c.softcap > 0 ? c.softcap * std::tanh(x * c.inv_softcap) : x;
}

// The loss of a row from its max m and log(sum_c exp(z_c - m)), kept apart so that
// lse - z_t = (m - z_t) + log_sum does not cancel when the logits share a large offset, and
// smoothing_sum = sum_c (w_c *) (z_c - m) (the same reason; see the top of the file). Terms
// are added only when enabled, so that an infinite lse cannot turn a disabled term into
// 0 * inf = NaN.
template <class Acc>
Acc row_loss(const Consts<Acc>& c, Acc m, Acc log_sum, Acc z_t, Acc w_t, double smoothing_sum) {
  const Acc lse = m + log_sum;
  Acc loss = (Acc(1) - c.ls) * w_t * ((m - z_t) + log_sum);
  if (c.z_loss != 0) loss += c.z_loss * lse * lse;
  if (c.ls > 0) {
    const double smooth = (static_cast<double>(c.weight_total) * log_sum - smoothing_sum) *
                          static_cast<double>(c.inv_vocab);
    loss += c.ls * static_cast<Acc>(smooth);
  }
  return loss;
}

// correct_i of cross_entropy.h: the target's capped logit is the row max m. Both come from
// capped_logit (the vector paths cap the raw block max, the same function: tanh is
// increasing), so a top-1 target compares exactly equal; one compare per row.
template <class Acc>
bool target_is_max(Acc z_t, Acc m, Acc lse) {
  return z_t == m && std::isfinite(z_t) && !std::isnan(lse);
}

// The gradient of a row, dL/dz_c = coef_p * p_c - coef_w * w_c - [c == t] * coef_t (before
// the soft-capping factor).
template <class Acc>
struct GradCoefs {
  Acc coef_p, coef_w, coef_t;
};

template <class Acc>
GradCoefs<Acc> grad_coefs(const Consts<Acc>& c, Acc g, Acc lse, Acc w_t) {
  GradCoefs<Acc> k;
  k.coef_p = g * ((Acc(1) - c.ls) * w_t + c.ls * c.weight_total * c.inv_vocab +
                  Acc(2) * c.z_loss * lse);
  k.coef_w = g * c.ls * c.inv_vocab;
  k.coef_t = g * (Acc(1) - c.ls) * w_t;
  return k;
}

// Backward's log-sum-exp of a row as hi + lo, with p_c = exp((z_c - hi) - lo): the saved lse
// and 0, or, from |lse| = kExactLseMin on, the row's max and log(sum exp(z - max)) recomputed
// from its logits (the top of the file says why). A non-finite lse (an inf or NaN logit)
// stays as it is: p is then NaN, as torch's.
constexpr double kExactLseMin = 256.0;

template <class Acc>
struct LseSplit {
  Acc hi, lo;
};

template <class T>
LseSplit<AccOf<T>> lse_split(const T* x, int64_t vocab, const Consts<AccOf<T>>& c,
                             AccOf<T> lse) {
  using Acc = AccOf<T>;
  if (!std::isfinite(lse) || std::fabs(static_cast<double>(lse)) < kExactLseMin) {
    return {lse, Acc(0)};
  }
  Acc m = std::numeric_limits<Acc>::lowest();
  for (int64_t j = 0; j < vocab; ++j) m = std::max(m, capped_logit(to_acc(x[j]), c));
  double s = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    s += std::exp(static_cast<double>(capped_logit(to_acc(x[j]), c)) - m);
  }
  return {m, static_cast<Acc>(std::log(s))};
}

// Gradient of the target element, computed from its logit in Acc (scalar in both paths).
template <class Acc>
Acc target_grad(const Consts<Acc>& c, const GradCoefs<Acc>& k, Acc x_t, LseSplit<Acc> lse,
                Acc w_t_smooth) {
  Acc tanh_t = 0, z_t = x_t;
  if (c.softcap > 0) {
    tanh_t = std::tanh(x_t * c.inv_softcap);
    z_t = c.softcap * tanh_t;
  }
  Acc d = k.coef_p * std::exp((z_t - lse.hi) - lse.lo) - k.coef_w * w_t_smooth - k.coef_t;
  if (c.softcap > 0) d *= Acc(1) - tanh_t * tanh_t;
  return d;
}

// Backward's per-row set-up, shared by every path (cross_entropy.h's BwdParams, including a
// block of classes): a row whose target is ignore_index is filled with 0, one whose target
// is not a class with NaN; otherwise the row's lse split, the coefficients of dL/dz_c and,
// when the target's column is in this call, its column and gradient (read here, before
// the row is overwritten: dx may alias x).
template <class Acc>
struct BwdRow {
  bool fill = false;
  Acc fill_value = 0;
  LseSplit<Acc> split{};
  GradCoefs<Acc> k{};
  int64_t t = -1;  // the target's column in this call, or -1 (outside the block)
  Acc grad_t = 0;
};

template <class T, bool kWeighted>
BwdRow<AccOf<T>> bwd_row(const BwdParams& p, const Consts<AccOf<T>>& c, int64_t num_classes,
                         int64_t r, const T* x) {
  using Acc = AccOf<T>;
  BwdRow<Acc> row;
  const int64_t target = p.target[r];
  if (target == p.ignore_index || !target_in_range(target, num_classes)) {
    row.fill = true;
    row.fill_value =
        target == p.ignore_index ? Acc(0) : std::numeric_limits<Acc>::quiet_NaN();
    return row;
  }
  const Acc g = static_cast<const Acc*>(p.grad_loss)[r * p.grad_loss_stride];
  const Acc lse = static_cast<const Acc*>(p.lse)[r];
  if (p.lse_split != nullptr) {
    const Acc* split = static_cast<const Acc*>(p.lse_split) + 2 * r;
    row.split = {split[0], split[1]};
  } else if (num_classes != p.vocab) {
    row.split = {lse, Acc(0)};
  } else {
    row.split = lse_split(x, p.vocab, c, lse);
  }
  const Acc w_t = c.weight != nullptr ? c.weight[target] : Acc(1);
  row.k = grad_coefs(c, g, lse, w_t);
  const int64_t column = target - p.class_offset;
  if (column >= 0 && column < p.vocab) {
    row.t = column;
    row.grad_t = target_grad(c, row.k, to_acc(x[column]), row.split,
                             kWeighted ? c.weight[target] : Acc(1));
  }
  return row;
}

// Forward's per-row ending, shared by every path: from the row's max m (of the capped
// logits), log(sum_c exp(z_c - m)) and smoothing sum (sum_c w_c (z_c - m); 0 without
// smoothing), writes the row's lse, loss (0 for ignore_index, NaN for a target that is not
// a class) and token accuracy; returns whether the target was not a class.
template <class T>
bool fwd_row_end(const FwdParams& p, const Consts<AccOf<T>>& c, int64_t r, const T* x,
                 AccOf<T> m, AccOf<T> log_sum, double smoothing_sum) {
  using Acc = AccOf<T>;
  const Acc lse = m + log_sum;
  static_cast<Acc*>(p.lse)[r] = lse;
  Acc& loss = static_cast<Acc*>(p.loss)[r];
  const int64_t t = p.target[r];
  bool correct = false, bad = false;
  if (t == p.ignore_index) {
    loss = 0;
  } else if (!target_in_range(t, p.vocab)) {
    loss = std::numeric_limits<Acc>::quiet_NaN();
    bad = true;
  } else {
    const Acc w_t = c.weight != nullptr ? c.weight[t] : Acc(1);
    const Acc z_t = capped_logit(to_acc(x[t]), c);
    loss = row_loss(c, m, log_sum, z_t, w_t, smoothing_sum);
    correct = target_is_max(z_t, m, lse);
  }
  if (p.correct != nullptr) p.correct[r] = correct;
  return bad;
}

// ---- portable scalar path ---------------------------------------------------------------

template <class T, bool kSoftcap, Smoothing kSmooth>
int64_t fwd_rows_scalar(const FwdParams& p, const Consts<AccOf<T>>& c, int64_t row_begin,
                        int64_t row_end) {
  using Acc = AccOf<T>;
  const int64_t vocab = p.vocab;
  int64_t bad_row = -1;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
    // One running sum per row: double keeps its rounding error below the float result's
    // ulp for any vocab size (the AVX2 path gets there with 32 partial sums instead).
    // smoothing_sum = sum_c w_c (z_c - m) around the running max m, rebased when m grows;
    // weight_seen = sum_c w_c so far (w_c = 1 without class weights).
    Acc m = std::numeric_limits<Acc>::lowest();
    double s = 0, smoothing_sum = 0, weight_seen = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      Acc z = to_acc(x[j]);
      if (kSoftcap) z = c.softcap * std::tanh(z * c.inv_softcap);
      if (z > m) {
        s = s * std::exp(static_cast<double>(m) - z) + 1.0;
        if (kSmooth != Smoothing::kNone) {
          smoothing_sum += weight_seen * (static_cast<double>(m) - static_cast<double>(z));
        }
        m = z;
      } else {
        s += std::exp(z - m);
      }
      if (kSmooth != Smoothing::kNone) {
        const double w = kSmooth == Smoothing::kWeighted ? c.weight[j] : 1.0;
        smoothing_sum += w * (static_cast<double>(z) - m);
        weight_seen += w;
      }
    }
    const Acc log_sum = static_cast<Acc>(std::log(s));
    if (fwd_row_end(p, c, r, x, m, log_sum, smoothing_sum) && bad_row < 0) bad_row = r;
  }
  return bad_row;
}

// Writes a row of `value` (0 for ignored rows, NaN for rows with a bad target).
template <class T>
void fill_row(T* row, int64_t vocab, AccOf<T> value) {
  const T v = from_acc<T>(value);
  std::fill_n(row, vocab, v);
}

template <class T, bool kSoftcap, bool kWeighted>
void bwd_rows_scalar(const BwdParams& p, const Consts<AccOf<T>>& c, int64_t num_classes,
                     int64_t row_begin, int64_t row_end) {
  using Acc = AccOf<T>;
  const int64_t vocab = p.vocab;
  // the block's class weights (kWeighted: label smoothing's w_c term)
  const Acc* weight = c.weight != nullptr ? c.weight + p.class_offset : nullptr;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
    T* dx = static_cast<T*>(p.grad_logits) + r * p.grad_row_stride;
    const BwdRow<Acc> row = bwd_row<T, kWeighted>(p, c, num_classes, r, x);
    if (row.fill) {
      fill_row(dx, vocab, row.fill_value);
      continue;
    }
    const GradCoefs<Acc>& k = row.k;
    for (int64_t j = 0; j < vocab; ++j) {
      const Acc xj = to_acc(x[j]);
      Acc tanh_j = 0, z = xj;
      if (kSoftcap) {
        tanh_j = std::tanh(xj * c.inv_softcap);
        z = c.softcap * tanh_j;
      }
      Acc d = k.coef_p * std::exp((z - row.split.hi) - row.split.lo) -
              k.coef_w * (kWeighted ? weight[j] : Acc(1));
      if (kSoftcap) d *= Acc(1) - tanh_j * tanh_j;
      dx[j] = from_acc<T>(d);
    }
    if (row.t >= 0) dx[row.t] = from_acc<T>(row.grad_t);
  }
}

// ---- AVX2 / FMA / F16C and AVX-512 paths ------------------------------------------------
// One source for both (cross_entropy_cpu_simd.h holds the algorithm), on vectors of 8 floats
// with cpu_avx2.h's exp and a Cephes-style tanh, or of 16 floats (cpu_avx512.h).

#if defined(FASTLLM_CROSS_ENTROPY_CPU_AVX2)

// Logits per block of the forward: 8 KiB of float32, re-read from L1 by the second sweep.
constexpr int64_t kBlock = 2048;

// Software prefetch on both paths (prefetch_fwd / prefetch_bwd, cross_entropy_cpu_simd.h),
// kFwdPrefetchAhead bytes ahead while the forward computes the exp-sum of a block from L1
// (the next block, or the next row), and kPrefetchAhead bytes ahead of backward's loads: the
// loops are too slow per line for the hardware prefetcher to run far enough ahead. On the
// AVX-512 path it took the bfloat16 forward 42 -> 31 ms and the backward in place 86 -> 32
// ms at 4096 x 32000 (fp32: 56 -> 55, 55 -> 51; the dev machine of the time); distances of
// 8, 16 and 32 KiB measured the same. On the AVX2 path (one Zen 3 core, fastest of 15 s of
// calls, old and new builds pinned side by side, then swapped; record
// ...-cross-entropy-avx2-prefetch-ab-zen3.txt): float32 forward 65 -> 44 ms, backward in
// place 53 -> 49.5; bfloat16 forward 57 -> 49, backward unchanged at 89 (bound by its
// arithmetic); a forward distance of 4 KiB lost the float32 gain (55 ms), 8-16 KiB and 1-8
// KiB for the backward measured the same. A prefetch never faults, so one past the end of a
// row is fine. One per 64-byte line.
constexpr int64_t kFwdPrefetchAhead = 8192;
constexpr int64_t kPrefetchAhead = 2048;

// The empty asm with a memory clobber keeps each prefetch beside its own chunk: without it
// GCC hoists the kSlots prefetches of a group of chunks to the group's top, back to back,
// and the float32 forward at 4096 x 32000 ran at half the read bandwidth (AVX-512 path: 57
// ms against 28 ms with it, huge-page logits; 57 -> 50 ms on 4 KiB pages; bf16 24 -> 20.5
// ms; 1 thread).
FASTLLM_INLINE void prefetch(const void* p) {
  asm volatile("" ::: "memory");
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

FASTLLM_AVX2_BEGIN
namespace avx2_path {

using V = __m256;
constexpr int W = 8;
using cpu::avx2::broadcast;
using cpu::avx2::fmadd;
using cpu::avx2::fnmadd;
using cpu::avx2::hsum;
using cpu::avx2::kSlots;
using cpu::avx2::loadn;
using cpu::avx2::storen;

template <class Body>
FASTLLM_INLINE void for_each_chunk(int64_t len, Body&& body) {
  cpu::avx2::for_each_chunk<W>(len, body);
}
// The exp of cpu_avx2.h (at most 2 ulp; 0 below -87.68, so also for -inf).
FASTLLM_INLINE __m256 exp_nonpositive(__m256 d) { return cpu::avx2::exp_ps(d); }

// coef * e^d for d <= 0 (-inf or NaN), for gradients stored as 16-bit floats (the backward's
// p_c times its coefficient): within 3e-6 relative, where the half ulp of a bfloat16 is 2e-3
// and of a float16 2.4e-4. Shorter than coef * exp_nonpositive(d), whose 2 float ulp only
// float32 gradients need: one Cody-Waite step with ln 2 as one float (the second step's
// correction is under 3e-7 relative down to d = -100), a degree-4 polynomial for e^r on
// |r| <= ln2 / 2 (least-squares fit on the relative error, max 2.6e-6) evaluated as two
// independent halves (Estrin) rather than one chain of five FMAs, and coef folded into the
// power of two off that chain. bfloat16 backward in place at 4096 x 32000 on a Zen 5 core
// held to AVX2: 57 -> 46 ms from this function alone (record in bwd_row_head's comment).
FASTLLM_INLINE __m256 scaled_exp_16bit(__m256 d, __m256 coef) {
  const __m256 round_magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  d = _mm256_max_ps(_mm256_set1_ps(-100.0f), d);  // NaN stays: max_ps returns its second operand
  const __m256 n_plus_magic =
      _mm256_fmadd_ps(d, _mm256_set1_ps(1.44269504088896341f), round_magic);
  const __m256 n = _mm256_sub_ps(n_plus_magic, round_magic);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945f), d);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 low = _mm256_fmadd_ps(_mm256_set1_ps(0.9999634f), r, _mm256_set1_ps(0.9999993f));
  __m256 high = _mm256_fmadd_ps(_mm256_set1_ps(0.16790909f), r, _mm256_set1_ps(0.5000436f));
  high = _mm256_fmadd_ps(_mm256_set1_ps(0.04145859f), r2, high);
  const __m256 poly = _mm256_fmadd_ps(high, r2, low);
  // 2^n as exp_ps makes it (0 below 2^-126), times coef.
  const __m256i biased = _mm256_add_epi32(_mm256_castps_si256(n_plus_magic),
                                          _mm256_set1_epi32(127 - 0x4B400000));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_max_epi32(biased, _mm256_setzero_si256()), 23);
  return _mm256_mul_ps(poly, _mm256_mul_ps(coef, _mm256_castsi256_ps(pow2n)));
}

// tanh(x): Cephes' odd polynomial for |x| < 0.625, else (1 - e) / (1 + e) with
// e = exp(-2|x|) <= 0.29, which does not cancel; the sign is copied back from x. A vector
// whose lanes are all below 0.625 (NaN is not) returns the polynomial without the exp and the
// division: soft-capped logits are mostly far below the cap (Gemma 2's 30: |x| < 18.75).
FASTLLM_INLINE __m256 tanh_vec(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign_mask, x);
  const __m256 a2 = _mm256_mul_ps(a, a);
  __m256 small = _mm256_set1_ps(-5.70498872745e-3f);
  small = _mm256_fmadd_ps(small, a2, _mm256_set1_ps(2.06390887954e-2f));
  small = _mm256_fmadd_ps(small, a2, _mm256_set1_ps(-5.37397155531e-2f));
  small = _mm256_fmadd_ps(small, a2, _mm256_set1_ps(1.33314422036e-1f));
  small = _mm256_fmadd_ps(small, a2, _mm256_set1_ps(-3.33332819422e-1f));
  small = _mm256_fmadd_ps(_mm256_mul_ps(small, a2), a, a);
  const __m256 use_small = _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
  if (_mm256_movemask_ps(use_small) == 0xFF) {
    return _mm256_or_ps(small, _mm256_and_ps(sign_mask, x));
  }
  const __m256 e = cpu::avx2::exp_ps(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 large = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 t = _mm256_blendv_ps(large, small, use_small);
  return _mm256_or_ps(t, _mm256_and_ps(sign_mask, x));
}

// Lanes n.. replaced by `fill` (0 <= n <= 8).
FASTLLM_INLINE __m256 fill_from(__m256 v, int n, float fill) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(keep));
}
FASTLLM_INLINE __m256 max_first(__m256 acc, __m256 v, int n) {
  return _mm256_max_ps(acc, n < W ? fill_from(v, n, -INFINITY) : v);
}
FASTLLM_INLINE __m256 sub_first(__m256 a, __m256 b, int n) {
  const __m256 d = _mm256_sub_ps(a, b);
  return n < W ? cpu::avx2::keep_first(d, n) : d;
}
// acc + e^(z - m) on the first n lanes: the padding lanes' z is -inf, e^-inf = 0.
FASTLLM_INLINE __m256 add_exp_first(__m256 acc, __m256 z, __m256 m, int n) {
  if (n < W) z = fill_from(z, n, -INFINITY);
  return _mm256_add_ps(acc, cpu::avx2::exp_ps(_mm256_sub_ps(z, m)));
}

FASTLLM_INLINE float hmax(const __m256 (&v)[kSlots]) {
  return cpu::avx2::hmax(_mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])));
}

// 2 W bfloat16 at p as two vectors, the even and the odd elements: cpu_avx2_even_odd.h's
// layout, from one load without a shuffle; and back, rounded without the NaN select
// (cpu::avx2_even_odd::round_high_nan_free: the caller rules other NaNs out).
FASTLLM_INLINE void load_even_odd(const cpu::BFloat16* p, __m256& even, __m256& odd) {
  const cpu::avx2_even_odd::Vec16 v = cpu::avx2_even_odd::load(p);
  even = v.even;
  odd = v.odd;
}
FASTLLM_INLINE void store_even_odd_nan_free(cpu::BFloat16* p, __m256 even, __m256 odd) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      cpu::avx2_even_odd::to_bfloat16_nan_free({even, odd}));
}

#include "cross_entropy/cross_entropy_cpu_simd.h"

}  // namespace avx2_path
FASTLLM_AVX2_END

// What the AVX-512 path changes besides the width (for CPUs with AVX-512 F/BW/DQ/VL/BF16,
// cpu_avx512()): e^d is exp2 of d log2(e) (vreduceps + a degree-5 polynomial + vscalefps, 9
// instructions with the multiply and the clamp, against 15 for the AVX2 exp); a row's
// partial vector is masked (loads give 0, the sums skip the padding lanes); bfloat16
// gradients are rounded by vcvtneps2bf16 (exactly as c10 rounds, cpu_avx512.h). Stores are
// ordinary: a non-temporal store to a freshly faulted page measured 2.7x slower than a plain
// one on the dev machine (the kernel's page clearing leaves the lines in the cache).

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN
namespace avx512_path {

using V = __m512;
constexpr int W = 16;
using cpu::avx512::broadcast;
using cpu::avx512::exp_nonpositive;
using cpu::avx512::fmadd;
using cpu::avx512::fnmadd;
using cpu::avx512::for_each_chunk;
using cpu::avx512::hmax;
using cpu::avx512::hsum;
using cpu::avx512::kSlots;
using cpu::avx512::loadn;
using cpu::avx512::storen;

// The AVX2 path's tanh on 16 floats; NaN in, NaN out.
FASTLLM_INLINE __m512 tanh_vec(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 a2 = _mm512_mul_ps(a, a);
  __m512 small = _mm512_set1_ps(-5.70498872745e-3f);
  small = _mm512_fmadd_ps(small, a2, _mm512_set1_ps(2.06390887954e-2f));
  small = _mm512_fmadd_ps(small, a2, _mm512_set1_ps(-5.37397155531e-2f));
  small = _mm512_fmadd_ps(small, a2, _mm512_set1_ps(1.33314422036e-1f));
  small = _mm512_fmadd_ps(small, a2, _mm512_set1_ps(-3.33332819422e-1f));
  small = _mm512_fmadd_ps(_mm512_mul_ps(small, a2), a, a);
  const __mmask16 use_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  const __m512 sign = _mm512_and_ps(_mm512_set1_ps(-0.0f), x);
  if (use_small == 0xFFFF) return _mm512_or_ps(small, sign);  // as the AVX2 path's
  const __m512 e = exp_nonpositive(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 large = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 t = _mm512_mask_blend_ps(use_small, large, small);
  return _mm512_or_ps(t, sign);
}

FASTLLM_INLINE __mmask16 lanes(int n) {
  return n == W ? __mmask16(0xFFFF) : cpu::avx512::first_lanes(n);
}
FASTLLM_INLINE __m512 max_first(__m512 acc, __m512 v, int n) {
  return n == W ? _mm512_max_ps(acc, v) : _mm512_mask_max_ps(acc, lanes(n), acc, v);
}
FASTLLM_INLINE __m512 sub_first(__m512 a, __m512 b, int n) {
  return _mm512_maskz_sub_ps(lanes(n), a, b);
}
FASTLLM_INLINE __m512 add_exp_first(__m512 acc, __m512 z, __m512 m, int n) {
  const __m512 e = exp_nonpositive(_mm512_sub_ps(z, m));
  return n == W ? _mm512_add_ps(acc, e) : _mm512_mask_add_ps(acc, lanes(n), acc, e);
}
// coef * e^d for 16-bit gradients, as the AVX2 path's: 2^t with t = d log2(e) as exp2 takes
// it (clamped at -150), but t reduced to nearest (vreduceps) so that r = t - round(t) lies in
// [-1/2, 1/2], where a degree-4 polynomial (least-squares fit on the relative error, max
// 2.6e-6) in two halves replaces exp2's chain of five FMAs on [0, 1), and coef times
// 2^round(t) (vscalefps, off that chain) replaces its final scaling. Bfloat16 backward in
// place at 4096 x 32000 on a Zen 5 core: 21.2 -> 19.9 ms from this alone (the record named at
// bwd_row_head).
FASTLLM_INLINE __m512 scaled_exp_16bit(__m512 d, __m512 coef) {
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-150.0f),
                                 _mm512_mul_ps(d, _mm512_set1_ps(cpu::avx512::kLog2e)));
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r2 = _mm512_mul_ps(r, r);
  const __m512 low =
      _mm512_fmadd_ps(_mm512_set1_ps(0.6931217908859253f), r, _mm512_set1_ps(0.9999992847442627f));
  __m512 high =
      _mm512_fmadd_ps(_mm512_set1_ps(0.05591786280274391f), r, _mm512_set1_ps(0.240247443318367f));
  high = _mm512_fmadd_ps(_mm512_set1_ps(0.009570100344717503f), r2, high);
  const __m512 poly = _mm512_fmadd_ps(high, r2, low);
  return _mm512_mul_ps(poly, _mm512_scalef_ps(coef, _mm512_sub_ps(t, r)));
}

// As the AVX2 path's: 32 bfloat16 per load and store.
FASTLLM_INLINE void load_even_odd(const cpu::BFloat16* p, __m512& even, __m512& odd) {
  const __m512i words = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(~0xFFFF)));
}
FASTLLM_INLINE void store_even_odd_nan_free(cpu::BFloat16* p, __m512 even, __m512 odd) {
  using cpu::avx512::round_high_nan_free;
  const __m512i out =
      _mm512_or_si512(_mm512_srli_epi32(round_high_nan_free(even), 16),
                      _mm512_and_si512(round_high_nan_free(odd), _mm512_set1_epi32(~0xFFFF)));
  _mm512_storeu_si512(p, out);
}

#include "cross_entropy/cross_entropy_cpu_simd.h"

}  // namespace avx512_path
FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END
#endif  // FASTLLM_CROSS_ENTROPY_CPU_AVX2

// ---- dispatch over variants, threads and instruction sets --------------------------------

template <class T>
using FwdRowsFn = int64_t (*)(const FwdParams&, const Consts<AccOf<T>>&, int64_t, int64_t);
template <class T>
using BwdRowsFn = void (*)(const BwdParams&, const Consts<AccOf<T>>&, int64_t, int64_t,
                           int64_t);

// The instruction set the row functions run (common/cpu_features.h); float64 logits always
// take the scalar path.
enum class Path { kScalar, kAvx2, kAvx512 };

template <class T>
Path pick_path() {
#if defined(FASTLLM_CROSS_ENTROPY_CPU_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::cpu_avx512()) return Path::kAvx512;
    if (cpu::cpu_isa() == cpu::CpuIsa::kAvx2) return Path::kAvx2;
  }
#endif
  return Path::kScalar;
}

// The row functions instantiated for the run-time flags and instruction set.
template <class T, bool kSoftcap, Smoothing kSmooth>
FwdRowsFn<T> pick_fwd(Path path) {
#if defined(FASTLLM_CROSS_ENTROPY_CPU_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    if (path == Path::kAvx512) return &avx512_path::fwd_rows<T, kSoftcap, kSmooth>;
    if (path == Path::kAvx2) return &avx2_path::fwd_rows<T, kSoftcap, kSmooth>;
  }
#endif
  (void)path;
  return &fwd_rows_scalar<T, kSoftcap, kSmooth>;
}

template <class T, bool kSoftcap>
FwdRowsFn<T> pick_fwd_smoothing(Smoothing smooth, Path path) {
  switch (smooth) {
    case Smoothing::kNone: return pick_fwd<T, kSoftcap, Smoothing::kNone>(path);
    case Smoothing::kUniform: return pick_fwd<T, kSoftcap, Smoothing::kUniform>(path);
    case Smoothing::kWeighted: return pick_fwd<T, kSoftcap, Smoothing::kWeighted>(path);
  }
  return nullptr;
}

template <class T, bool kSoftcap, bool kWeighted>
BwdRowsFn<T> pick_bwd(Path path) {
#if defined(FASTLLM_CROSS_ENTROPY_CPU_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    if (path == Path::kAvx512) return &avx512_path::bwd_rows<T, kSoftcap, kWeighted>;
    if (path == Path::kAvx2) return &avx2_path::bwd_rows<T, kSoftcap, kWeighted>;
  }
#endif
  (void)path;
  return &bwd_rows_scalar<T, kSoftcap, kWeighted>;
}

template <class T, bool kSoftcap>
BwdRowsFn<T> pick_bwd_weighted(bool weighted, Path path) {
  return weighted ? pick_bwd<T, kSoftcap, true>(path) : pick_bwd<T, kSoftcap, false>(path);
}

template <class T>
void fwd_typed(const FwdParams& p) {
  using Acc = AccOf<T>;
  const Consts<Acc> c =
      make_consts<Acc>(p.class_weight, p.vocab, p.label_smoothing, p.z_loss, p.softcap);
  const Smoothing smooth = p.label_smoothing == 0.0 ? Smoothing::kNone
                           : p.class_weight == nullptr ? Smoothing::kUniform
                                                       : Smoothing::kWeighted;
  const Path path = pick_path<T>();
  const FwdRowsFn<T> rows_fn = p.softcap > 0 ? pick_fwd_smoothing<T, true>(smooth, path)
                                             : pick_fwd_smoothing<T, false>(smooth, path);
  int64_t bad_row = std::numeric_limits<int64_t>::max();
  const int threads = threads_for(p.rows, p.vocab, kMinElementsPerThread);
#pragma omp parallel num_threads(threads) reduction(min : bad_row)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t bad = rows_fn(p, c, block_begin(p.rows, t, nt), block_begin(p.rows, t + 1, nt));
    if (bad >= 0) bad_row = std::min(bad_row, bad);
  }
  if (p.bad_target_row != nullptr) {
    *p.bad_target_row = bad_row == std::numeric_limits<int64_t>::max() ? -1 : bad_row;
  }
}

template <class T>
void bwd_typed(const BwdParams& p) {
  using Acc = AccOf<T>;
  // a block of classes takes the whole row's constants (cross_entropy.h)
  const int64_t num_classes = p.num_classes > 0 ? p.num_classes : p.vocab;
  const Consts<Acc> c =
      make_consts<Acc>(p.class_weight, num_classes, p.label_smoothing, p.z_loss, p.softcap);
  const bool weighted = p.label_smoothing != 0.0 && p.class_weight != nullptr;
  const Path path = pick_path<T>();
  const BwdRowsFn<T> rows_fn = p.softcap > 0 ? pick_bwd_weighted<T, true>(weighted, path)
                                             : pick_bwd_weighted<T, false>(weighted, path);
  if (p.grad_logits != p.logits) {
    advise_huge_pages(p.grad_logits,
                      ((p.rows - 1) * p.grad_row_stride + p.vocab) * static_cast<int64_t>(sizeof(T)));
  }
  const int threads = threads_for(p.rows, p.vocab, kMinElementsPerThread);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    rows_fn(p, c, num_classes, block_begin(p.rows, t, nt), block_begin(p.rows, t + 1, nt));
  }
}

}  // namespace

void cross_entropy_fwd_cpu(const FwdParams& p) {
  if (p.bad_target_row != nullptr) *p.bad_target_row = -1;
  if (p.rows == 0) return;
  cpu::dispatch_dtype(p.dtype, "cross_entropy_fwd_cpu", [&](auto tag) {
    fwd_typed<typename decltype(tag)::type>(p);
  });
}

void cross_entropy_bwd_cpu(const BwdParams& p) {
  if (p.rows == 0) return;
  cpu::dispatch_dtype(p.dtype, "cross_entropy_bwd_cpu", [&](auto tag) {
    bwd_typed<typename decltype(tag)::type>(p);
  });
}

}  // namespace cross_entropy
}  // namespace fastllm
