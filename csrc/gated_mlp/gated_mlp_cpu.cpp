// SwiGLU / GeGLU on the CPU: gated_mlp_fwd_cpu and gated_mlp_bwd_cpu of gated_mlp.h, for
// float32, bfloat16, float16 and float64. Torch-free: C++17, OpenMP and x86 intrinsics.
//
// Math (gated_mlp.h holds the contract), per element, in Acc (float, or double for float64),
// rounded to T once per stored value:
//   forward   out = act(g) * u
//   backward  grad_gate = dy * u * act'(g),  grad_up = dy * act(g)    (act recomputed from g)
//
// Design. Element-wise and memory-bound once vectorised: forward reads two values and writes
// one per element, backward reads three and writes two, each exactly once; the activation
// (an exp, or a polynomial erf and an exp) costs less than the memory traffic on a core.
//   - Threads: the (rows, cols) problem is cut, in row-major order, into one contiguous range
//     of elements per OpenMP thread, each range a multiple of a cache line of elements: whole
//     rows when there are many (an MLP's 8192 x 11008), parts of rows when there are fewer
//     rows than threads (a decoding step's 1 x 11008). Small problems run on fewer threads
//     (kMinElementsPerThread): the fork/join would cost more than the work.
//   - Three instruction paths, chosen at run time (common/cpu_features.h): AVX-512 (16 floats
//     per vector, masked tails), AVX2/FMA/F16C (8 floats, tails through a small buffer), both
//     compiled from the one generic body gated_mlp_cpu_simd.h (bfloat16 on AVX2: 16 floats
//     as even and odd elements, common/cpu_avx2_even_odd.h, 10-11 % less time forward and
//     forward+backward than 8 widened by shuffles, on a Zen 4 core held to AVX2); and a
//     portable scalar path on std::exp / std::erfc / the same formulas, which is also the
//     float64 path on every CPU (float64 is the gradcheck dtype here, not a speed one).
//   - The vector paths take exp from the shared helpers (cpu_avx2.h's exp_ps, cpu_avx512.h's
//     exp2) and Phi(g) (gelu) from fitted polynomials (gated_mlp_cpu_simd.h): a few ulp of
//     float where it matters, see there.
//
// Glossary: rows = M, cols = N (one half's width), T = storage dtype, Acc = accumulation
// type, W = vector lanes, g = gate, u = up, dy = the gradient of out.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/cpu_dispatch.h"
#include "common/cpu_dtypes.h"
#include "common/cpu_features.h"
#include "common/cpu_parallel.h"
#include "gated_mlp/gated_mlp.h"

#if defined(__x86_64__) || defined(__i386__)
#include "common/cpu_avx2.h"
#include "common/cpu_avx2_even_odd.h"
#include "common/cpu_avx512.h"
#define FASTLLM_GATED_MLP_CPU_X86 1
#endif

namespace fastllm {
namespace gated_mlp {
namespace {

// Storage types, to_acc / from_acc, dispatch_dtype, block_begin (common/cpu_*.h).
using namespace cpu;

// About 128 KiB of float32 moved per thread: below that, one thread is faster.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 14;
// Thread ranges start at multiples of this many elements (a 64-byte line of bfloat16).
constexpr int64_t kRangeAlign = 32;

// The constants of gated_mlp.h's math.
// (double: the float64 path uses them as they are, the float paths round them once.)
constexpr double kGeluTanhK0 = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kGeluTanhK1 = 0.044715;
constexpr double kGeluTanhClamp = 10.0;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

// ---- portable scalar path -----------------------------------------------------------------

// The header's formulas in Acc with the C library's exp / erfc (erfc: Phi keeps its relative
// accuracy for g < 0, where 1 + erf would cancel).
template <class Acc>
Acc normal_cdf(Acc g) {
  return Acc(0.5) * std::erfc(-g * Acc(0.70710678118654752440));
}

template <Activation A, class Acc>
Acc gate_arg(Acc g) {
  if constexpr (A == Activation::kSilu) {
    return g;
  } else {
    return Acc(2) * Acc(kGeluTanhK0) * (g + Acc(kGeluTanhK1) * g * g * g);
  }
}

// s = sigmoid(z) and 1 - s from t = exp(-|z|), as the vector paths (gated_mlp_cpu_simd.h).
template <class Acc>
void sigmoid(Acc z, Acc& s, Acc& one_minus_s) {
  const Acc t = std::exp(-std::fabs(z));
  const Acc r = Acc(1) / (Acc(1) + t);
  s = z < 0 ? t * r : r;
  one_minus_s = z < 0 ? r : t * r;
}

template <Activation A, class Acc>
Acc act_scalar(Acc g) {
  if constexpr (A == Activation::kGelu) {
    return g * normal_cdf(g);
  } else {
    Acc s, one_minus_s;
    sigmoid(gate_arg<A>(g), s, one_minus_s);
    return g * s;
  }
}

template <Activation A, class Acc>
void act_and_grad_scalar(Acc g, Acc& act, Acc& grad) {
  if constexpr (A == Activation::kGelu) {
    const Acc cdf = normal_cdf(g);
    act = g * cdf;
    grad = cdf + g * std::exp(Acc(-0.5) * g * g) * Acc(kInvSqrt2Pi);
  } else {
    Acc s, one_minus_s;
    sigmoid(gate_arg<A>(g), s, one_minus_s);
    act = g * s;
    Acc dz = 1;
    if constexpr (A == Activation::kGeluTanh) {
      const Acc gc = std::min(Acc(kGeluTanhClamp), std::max(Acc(-kGeluTanhClamp), g));
      dz = Acc(2) * Acc(kGeluTanhK0) * (Acc(1) + Acc(3) * Acc(kGeluTanhK1) * gc * gc);
    }
    grad = s + act * one_minus_s * dz;
  }
}

template <Activation A, class T>
void fwd_span_scalar(const T* g, const T* u, T* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = from_acc<T>(act_scalar<A>(to_acc(g[j])) * to_acc(u[j]));
}

template <Activation A, class T>
void bwd_span_scalar(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  using Acc = AccOf<T>;
  for (int64_t j = 0; j < n; ++j) {
    Acc act, grad;
    act_and_grad_scalar<A>(to_acc(g[j]), act, grad);
    const Acc dyj = to_acc(dy[j]);
    dg[j] = from_acc<T>(dyj * to_acc(u[j]) * grad);
    du[j] = from_acc<T>(dyj * act);
  }
}

// ---- AVX2 / FMA / F16C path ---------------------------------------------------------------

#if defined(FASTLLM_GATED_MLP_CPU_X86)
FASTLLM_AVX2_BEGIN
namespace avx2_path {

using V = __m256;
using M = __m256;  // all-ones lanes
constexpr int W = 8;
using cpu::avx2::fmadd;
using cpu::avx2::fnmadd;
using cpu::avx2::load;
using cpu::avx2::loadn;
using cpu::avx2::store;
using cpu::avx2::storen;

FASTLLM_INLINE V bcast(float v) { return _mm256_set1_ps(v); }
FASTLLM_INLINE V vmin(V a, V b) { return _mm256_min_ps(a, b); }
FASTLLM_INLINE V vmax(V a, V b) { return _mm256_max_ps(a, b); }
FASTLLM_INLINE V vabs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
FASTLLM_INLINE M less(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
FASTLLM_INLINE V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
// cpu_avx2.h's exp, which gives 0 below -87.68 and keeps NaN. Every caller's
// argument is <= 0 (exp(-|z|), exp(-g^2 / 2), erfc's exp(-r)), so exp_ps's clamp at the top
// of the range never applies.
FASTLLM_INLINE V exp_v(V x) { return cpu::avx2::exp_ps(x); }

// 1 / d for d in [1, 2]: the 12-bit estimate and two Newton steps. One step left 906503 of
// the floats in [1, 2] off the rounded quotient, by up to 1.86 units of 2^-24 -- d = 1 among
// them: rcp_ps(1) is 0.999755859 on Zen 3 and one step gives 1 - 2^-24, so silu(g) = g s came
// out an ulp under g for every g above ~17 (tests/test_gated_mlp_hostile.py's fuzz failed on
// that AVX2-only CPU); two steps leave one, within 0.5 (benchmarks/micro/avx2_recip_sweep.cpp,
// record benchmarks/results/2026-12-06-cpu-avx2-recip-sweep-zen3.txt). Two FMAs more per 8
// values, in kernels bound by memory.
FASTLLM_INLINE V recip(V d) {
  const V one = _mm256_set1_ps(1.0f);
  V r = _mm256_rcp_ps(d);
  r = fmadd(fnmadd(d, r, one), r, r);
  return fmadd(fnmadd(d, r, one), r, r);
}

#include "gated_mlp/gated_mlp_cpu_simd.h"

}  // namespace avx2_path

// bfloat16 on AVX2: the same kernels on 16 floats held as the even and the odd elements of a
// block (cpu_avx2_even_odd.h), which widens and rounds bfloat16 without the 8-lane path's
// shuffles (10-11 % of its time, forward and forward+backward, SwiGLU 8192 x 11008, output
// page faults included). Every operand and result here is an
// element of the same position, so nothing is reordered; each primitive is avx2_path's on
// both halves.
namespace avx2_even_odd_path {

using cpu::avx2_even_odd::Vec16;
using V = Vec16;
struct M {  // all-ones lanes, of each half
  __m256 even, odd;
};
constexpr int W = 16;
using cpu::avx2_even_odd::fmadd;
using cpu::avx2_even_odd::fnmadd;
using cpu::avx2_even_odd::load;
using cpu::avx2_even_odd::loadn;
using cpu::avx2_even_odd::store;
using cpu::avx2_even_odd::storen;

FASTLLM_INLINE V bcast(float v) { return cpu::avx2_even_odd::broadcast(v); }
FASTLLM_INLINE V vmin(V a, V b) {
  return {avx2_path::vmin(a.even, b.even), avx2_path::vmin(a.odd, b.odd)};
}
FASTLLM_INLINE V vmax(V a, V b) {
  return {avx2_path::vmax(a.even, b.even), avx2_path::vmax(a.odd, b.odd)};
}
FASTLLM_INLINE V vabs(V a) { return {avx2_path::vabs(a.even), avx2_path::vabs(a.odd)}; }
FASTLLM_INLINE M less(V a, V b) {
  return {avx2_path::less(a.even, b.even), avx2_path::less(a.odd, b.odd)};
}
FASTLLM_INLINE V select(M m, V a, V b) {
  return {avx2_path::select(m.even, a.even, b.even), avx2_path::select(m.odd, a.odd, b.odd)};
}
FASTLLM_INLINE V exp_v(V x) { return {avx2_path::exp_v(x.even), avx2_path::exp_v(x.odd)}; }
FASTLLM_INLINE V recip(V d) { return {avx2_path::recip(d.even), avx2_path::recip(d.odd)}; }

#include "gated_mlp/gated_mlp_cpu_simd.h"

}  // namespace avx2_even_odd_path
FASTLLM_AVX2_END

// ---- AVX-512 path -------------------------------------------------------------------------

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN
namespace avx512_path {

using V = __m512;
using M = __mmask16;
constexpr int W = 16;

using cpu::avx512::fmadd;
using cpu::avx512::fnmadd;

FASTLLM_INLINE V bcast(float v) { return _mm512_set1_ps(v); }
FASTLLM_INLINE V vmin(V a, V b) { return _mm512_min_ps(a, b); }
FASTLLM_INLINE V vmax(V a, V b) { return _mm512_max_ps(a, b); }
FASTLLM_INLINE V vabs(V a) { return _mm512_abs_ps(a); }
FASTLLM_INLINE M less(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
FASTLLM_INLINE V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
// cpu_avx512.h's exp_nonpositive, 2^t at t = x log2(e): relative error about 1.5e-7 plus the
// rounding of t, 2^-24 |t| (9e-7 at x = -10, 8e-6 at the bottom of float's range, where what
// it scales is negligible next to the terms it is added to). Every caller's argument is <= 0
// (x may be -inf).
FASTLLM_INLINE V exp_v(V x) { return cpu::avx512::exp_nonpositive(x); }

// Loads and stores of float, BFloat16 and Half as 16 floats, masked tails (cpu_avx512.h).
using cpu::avx512::load;
using cpu::avx512::loadn;
using cpu::avx512::store;
using cpu::avx512::storen;

// 1 / d for d in [1, 2]: the 14-bit estimate and one Newton step.
FASTLLM_INLINE V recip(V d) {
  const V r = _mm512_rcp14_ps(d);
  return fmadd(fnmadd(d, r, _mm512_set1_ps(1.0f)), r, r);
}

#include "gated_mlp/gated_mlp_cpu_simd.h"

}  // namespace avx512_path
FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END
#endif  // FASTLLM_GATED_MLP_CPU_X86

// ---- dispatch over threads, instruction sets and activations ------------------------------

// A value outside gated_mlp.h's Activation.
[[noreturn]] void invalid_activation(Activation a) {
  throw std::invalid_argument("activation must be kSilu, kGelu or kGeluTanh, got " +
                              std::to_string(static_cast<int32_t>(a)));
}

// The span kernels of the best instruction set for T on this CPU.
template <Activation A, class T>
struct Spans {
  void (*fwd)(const T*, const T*, T*, int64_t) = &fwd_span_scalar<A, T>;
  void (*bwd)(const T*, const T*, const T*, T*, T*, int64_t) = &bwd_span_scalar<A, T>;
  Spans() {
#if defined(FASTLLM_GATED_MLP_CPU_X86)
    if constexpr (!std::is_same_v<T, double>) {
      if (cpu::cpu_avx512()) {
        fwd = &avx512_path::fwd_span<A, T>;
        bwd = &avx512_path::bwd_span<A, T>;
      } else if (cpu::cpu_isa() == cpu::CpuIsa::kAvx2) {
        if constexpr (std::is_same_v<T, BFloat16>) {
          fwd = &avx2_even_odd_path::fwd_span<A, T>;
          bwd = &avx2_even_odd_path::bwd_span<A, T>;
        } else {
          fwd = &avx2_path::fwd_span<A, T>;
          bwd = &avx2_path::bwd_span<A, T>;
        }
      }
    }
#endif
  }
};

// Runs span(row, col_begin, col_end) over the (rows, cols) problem, one contiguous row-major
// range of elements per thread (the file comment).
template <class Span>
void for_each_thread_range(int64_t rows, int64_t cols, Span&& span) {
  const int64_t total = rows * cols;
  const int64_t chunks = (total + kRangeAlign - 1) / kRangeAlign;
  const int threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({omp_get_max_threads(), chunks, total / kMinElementsPerThread})));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t begin = std::min(total, block_begin(chunks, t, nt) * kRangeAlign);
    const int64_t end = std::min(total, block_begin(chunks, t + 1, nt) * kRangeAlign);
    for (int64_t e = begin; e < end;) {
      const int64_t row = e / cols;
      const int64_t col = e - row * cols;
      const int64_t col_end = std::min(cols, col + (end - e));
      span(row, col, col_end);
      e += col_end - col;
    }
  }
}

template <Activation A, class T>
void fwd_typed(const FwdParams& p) {
  const Spans<A, T> spans;
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  for_each_thread_range(p.rows, p.cols, [&](int64_t r, int64_t c0, int64_t c1) {
    spans.fwd(gate + r * p.gate_row_stride + c0, up + r * p.up_row_stride + c0,
              out + r * p.out_row_stride + c0, c1 - c0);
  });
}

template <Activation A, class T>
void bwd_typed(const BwdParams& p) {
  const Spans<A, T> spans;
  const T* dy = static_cast<const T*>(p.grad_out);
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* dgate = static_cast<T*>(p.grad_gate);
  T* dup = static_cast<T*>(p.grad_up);
  for_each_thread_range(p.rows, p.cols, [&](int64_t r, int64_t c0, int64_t c1) {
    spans.bwd(dy + r * p.grad_out_row_stride + c0, gate + r * p.gate_row_stride + c0,
              up + r * p.up_row_stride + c0, dgate + r * p.grad_gate_row_stride + c0,
              dup + r * p.grad_up_row_stride + c0, c1 - c0);
  });
}

}  // namespace

void gated_mlp_fwd_cpu(const FwdParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  cpu::dispatch_dtype(p.dtype, "gated_mlp_fwd_cpu", [&](auto type) {
    dispatch_activation(
        p.activation,
        [&](auto act) { fwd_typed<decltype(act)::value, typename decltype(type)::type>(p); },
        [&] { invalid_activation(p.activation); });
  });
}

void gated_mlp_bwd_cpu(const BwdParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  cpu::dispatch_dtype(p.dtype, "gated_mlp_bwd_cpu", [&](auto type) {
    dispatch_activation(
        p.activation,
        [&](auto act) { bwd_typed<decltype(act)::value, typename decltype(type)::type>(p); },
        [&] { invalid_activation(p.activation); });
  });
}

}  // namespace gated_mlp
}  // namespace fastllm
