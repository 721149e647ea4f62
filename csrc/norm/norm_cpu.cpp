// LayerNorm / RMSNorm on the CPU: norm_fwd_cpu and norm_bwd_cpu of norm.h, for float32,
// bfloat16, float16 and float64 rows. Torch-free: C++17, OpenMP and x86 intrinsics.
//
// Math (norm.h holds the contract), per row of N = cols elements, computed in Acc (float,
// or double for float64) and rounded to T once per stored value:
//   forward   s = x, or s = round_to_T(x + residual), stored to residual_out (add_* ops)
//             layer: mean = sum(s) / N,  var = sum((s - mean)^2) / N
//             rms:   mean = 0,           var = sum(s^2) / N
//             rstd = 1 / sqrt(var + eps),  y = (s - mean) * rstd * w + b
//   backward  xhat = (x - mean) * rstd,  g = dy * w
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  [+ dresidual_out]
//             (rms: no mean(g) term),  dw = sum_rows(dy * xhat),  db = sum_rows(dy)
// rms is layer norm with mean = 0 and no bias, so one kernel serves both.
//
// Design. The op is memory-bound once it is vectorised, so every row is read from memory
// once and written once, and the arithmetic per element is kept low enough that two cores
// stay at memory speed:
//   - OpenMP gives each thread one contiguous block of rows. A row (256 KiB at N = 65536
//     float32) stays in L1/L2 while it is worked on; every further pass reads the cache.
//   - Forward takes mean and variance in one pass over the row, as sums of d = s - shift and
//     d^2 with shift = the mean of the row's first W elements (the shifted-data algorithm):
//     E[d^2] - E[d]^2 cancels only as much as (mean - shift)^2 is large against var. A row
//     whose shift is too far off (E[d^2] > kShiftedVarLimit * var, e.g. an outlier up front)
//     gets the variance again from a centred pass, as in the two-pass algorithm, so no row
//     suffers the cancellation of E[x^2] - E[x]^2 when |mean| >> std. The scalar path is
//     the plain two-pass algorithm.
//   - Row sums are blocked: kSumBlock elements are summed in fresh accumulators, then the
//     block totals are added, so rounding error grows with the block size and the number of
//     blocks rather than with N.
//   - The add_* ops form s in the statistics pass and read it back from the just-written
//     residual_out, so they normalise exactly the rounded s that backward will see.
//   - Backward sweeps groups of rows together: per-row sums first, then one pass over the
//     columns writing dx for the whole group and adding the group's dweight/dbias terms to
//     the thread's Acc partial rows, in blocks of 64 rows whose sums are then added to the
//     thread's totals (a two-level sum). The threads then add up the totals column block by
//     column block in thread order: deterministic for a given thread count, no atomics,
//     any number of rows.
//   - Three instruction paths, chosen at run time (common/cpu_features.h): AVX-512 vectors of
//     16 floats where the CPU has F/BW/DQ/VL/BF16 (cpu_avx512(); float64 rows stay on AVX2),
//     AVX2/FMA/F16C vectors of 8 floats or 4 doubles, both from one source
//     (norm_cpu_simd.h) and with partial vectors at row tails, and a portable scalar path for
//     every other CPU, which is also the plainest statement of the algorithm.
//     FASTLLM_CPU_ISA=avx2 / =scalar force the lower ones. The AVX2 path's bfloat16 forward
//     runs the same source on 16 floats in even/odd order (common/cpu_avx2_even_odd.h: no
//     shuffles to widen and round bfloat16, which bound it: 1.2-1.4x faster, from 0.85-1.02x
//     torch.compile to 1.13-1.18x on a Zen 4 core with torch held to AVX2 as well).
//   - Outputs (out, residual_out, dx) of 4 MiB and more get huge pages advised before they
//     are written (fresh pages cost more than the kernel), except where the OS hands free
//     memory back to a hypervisor (common/cpu_memory.h). Outputs that are large and whose
//     pages are in memory already (a reused heap block) are stored non-temporally by the
//     vector paths (cpu_memory.h: stream_outputs), which saves reading each output line
//     before writing it: a third of the forward's memory traffic. The add_* forward then
//     keeps s in a scratch row for the output pass instead of reading residual_out back.
//   - Small problems use fewer threads: under kMinElementsPerThread elements per thread the
//     fork/join costs more than the work. Large inputs are prefetched a row ahead
//     (kPrefetchMinBytes); backward's 16-bit rows a row group ahead, whatever their size
//     (norm_cpu_simd.h, kPrefetchNextGroup).
//
// Glossary: rows = M (product of the leading dims), cols = N (normalized size),
// T = storage dtype, Acc = accumulation type, W = vector lanes, s = the row normalised.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <type_traits>

#include "common/cpu_dispatch.h"
#include "common/cpu_dtypes.h"
#include "common/cpu_features.h"
#include "common/cpu_memory.h"
#include "common/cpu_parallel.h"
#include "norm/norm.h"

#if defined(__x86_64__) || defined(__i386__)
#include "common/cpu_avx2.h"
#include "common/cpu_avx2_even_odd.h"
#include "common/cpu_avx512.h"
#define FASTLLM_NORM_CPU_AVX2 1
#endif

namespace fastllm {
namespace norm {
namespace {

// Storage types, to_acc / from_acc, dispatch_dtype, threads_for / block_begin
// (common/cpu_*.h).
using namespace cpu;

// About 128 KiB of float32 in and out per thread: below that, one thread is faster.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 15;
// Elements per block of a blocked row sum.
constexpr int64_t kSumBlock = 1024;
// Above this ratio of E[d^2] to var, forward redoes the variance as a centred pass.
constexpr int kShiftedVarLimit = 4;
// Rows per backward column sweep.
constexpr int kRowGroup = 4;
// The AVX2 forward fetches the next row in software while it writes the current one from
// the cache: the hardware streamer stops at 4 KiB pages, and a row is often a page or a
// few. On the 2-core dev machine that made inputs coming from DRAM (8192 x 4096) 15-40%
// faster, but float32 inputs that sit in the L3 (4096 x 1024, 16 MiB) 10% slower (the
// prefetches add load and fill-buffer traffic that stream does not need): so only inputs of
// at least kPrefetchMinBytes are prefetched.
constexpr int64_t kPrefetchMinBytes = int64_t{32} << 20;

// The rstd that backward scales row r's gradients by. A layer-norm row of one element
// normalises to 0 whatever its rstd, so its gradients are exactly dx = dresidual_out and
// dweight += 0: rstd = 0 gives them, where the stored rstd (~316 at eps = 1e-5) multiplied
// the rounding residue of g - mean_g (dy * w - mean_g contracted into an fma) into dx.
template <class Acc>
Acc bwd_rstd(const BwdParams& p, int64_t r) {
  if (!p.rms && p.cols == 1) return Acc(0);
  return static_cast<const Acc*>(p.rstd)[r];
}

// ---- portable scalar path ---------------------------------------------------------------

// Sum of term(j) over [0, n) in blocks of kSumBlock.
template <class Acc, class Term>
Acc sum_row_scalar(int64_t n, Term&& term) {
  Acc total = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    Acc block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t j = j0; j < j1; ++j) block += term(j);
    total += block;
  }
  return total;
}

// The scalar paths store plainly: `stream` (the vector paths' non-temporal stores) is ignored.
template <class T>
void norm_fwd_rows_scalar(const FwdParams& p, int64_t row_begin, int64_t row_end, bool) {
  using Acc = AccOf<T>;
  const int64_t n = p.cols;
  const Acc* w = static_cast<const Acc*>(p.weight);
  const Acc* b = static_cast<const Acc*>(p.bias);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* s = static_cast<const T*>(p.x) + r * p.x_row_stride;
    if (p.residual != nullptr) {
      const T* res = static_cast<const T*>(p.residual) + r * p.residual_row_stride;
      T* s_out = static_cast<T*>(p.residual_out) + r * n;
      for (int64_t j = 0; j < n; ++j) s_out[j] = from_acc<T>(to_acc(s[j]) + to_acc(res[j]));
      s = s_out;
    }
    const Acc mean =
        p.rms ? Acc(0) : sum_row_scalar<Acc>(n, [&](int64_t j) { return to_acc(s[j]); }) / n;
    const Acc var = sum_row_scalar<Acc>(n, [&](int64_t j) {
                      const Acc d = to_acc(s[j]) - mean;
                      return d * d;
                    }) / n;
    const Acc rstd = Acc(1) / std::sqrt(var + static_cast<Acc>(p.eps));
    if (!p.rms) static_cast<Acc*>(p.mean)[r] = mean;
    static_cast<Acc*>(p.rstd)[r] = rstd;
    T* y = static_cast<T*>(p.out) + r * n;
    for (int64_t j = 0; j < n; ++j) {
      Acc v = (to_acc(s[j]) - mean) * rstd;
      if (w != nullptr) v *= w[j];
      if (b != nullptr) v += b[j];
      y[j] = from_acc<T>(v);
    }
  }
}

template <class T>
void norm_bwd_rows_scalar(const BwdParams& p, int64_t row_begin, int64_t row_end,
                          AccOf<T>* dw_partial, AccOf<T>* db_partial, bool) {
  using Acc = AccOf<T>;
  const int64_t n = p.cols;
  const Acc* w = static_cast<const Acc*>(p.weight);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + r * p.dy_row_stride;
    const Acc mean = p.rms ? Acc(0) : static_cast<const Acc*>(p.mean)[r];
    const Acc rstd = bwd_rstd<Acc>(p, r);
    auto g = [&](int64_t j) { return w != nullptr ? to_acc(dy[j]) * w[j] : to_acc(dy[j]); };
    auto xhat = [&](int64_t j) { return (to_acc(x[j]) - mean) * rstd; };
    const Acc mean_g = p.rms ? Acc(0) : sum_row_scalar<Acc>(n, g) / n;
    const Acc mean_g_xhat = sum_row_scalar<Acc>(n, [&](int64_t j) { return g(j) * xhat(j); }) / n;
    const T* dres = p.dresidual_out == nullptr
                        ? nullptr
                        : static_cast<const T*>(p.dresidual_out) + r * p.dresidual_out_row_stride;
    T* dx = static_cast<T*>(p.dx) + r * n;
    for (int64_t j = 0; j < n; ++j) {
      Acc d = (g(j) - mean_g - xhat(j) * mean_g_xhat) * rstd;
      if (dres != nullptr) d += to_acc(dres[j]);
      dx[j] = from_acc<T>(d);
      if (dw_partial != nullptr) dw_partial[j] += to_acc(dy[j]) * xhat(j);
      if (db_partial != nullptr) db_partial[j] += to_acc(dy[j]);
    }
  }
}

// ---- AVX2 / FMA / F16C path -------------------------------------------------------------
// The same math on vectors of W lanes. for_each_chunk hands each body either a full vector
// (with one of kSlots accumulator slots) or the row's partial tail, whose padding lanes
// load as zero.

#if defined(FASTLLM_NORM_CPU_AVX2)
FASTLLM_AVX2_BEGIN
namespace avx2_path {

template <class T>
using Vec = cpu::avx2::Vec<T>;
template <class T>
inline constexpr int kLanes = cpu::avx2::kLanes<T>;
template <class T>
using ParamOf = AccOf<T>;
using cpu::avx2::broadcast;
using cpu::avx2::copy_stream;
using cpu::avx2::fmadd;
using cpu::avx2::fnmadd;
using cpu::avx2::for_each_chunk;
using cpu::avx2::hsum;
using cpu::avx2::keep_first;
using cpu::avx2::kSlots;
using cpu::avx2::loadn;
using cpu::avx2::store_stream;
using cpu::avx2::storen;

#include "norm/norm_cpu_simd.h"

}  // namespace avx2_path

// The bfloat16 forward on AVX2 CPUs: the same code on 16 floats held as the even and the
// odd elements of a block (cpu_avx2_even_odd.h), which widens and rounds bfloat16 without
// shuffles; weight and bias are read in that order from copies norm_fwd_typed makes. The
// backward stays on avx2_path: in this layout its four-row sweep holds twice the vectors
// (they spill) and measured no faster. It is not instantiated here, and could not be: it
// reads float arrays (weight, the dweight / dbias partials), which this namespace cannot load.
namespace avx2_even_odd_path {

using cpu::avx2_even_odd::EvenOddFloat;
using cpu::avx2_even_odd::Vec;
using cpu::avx2_even_odd::kLanes;
template <class T>
using ParamOf = EvenOddFloat;
using cpu::avx2_even_odd::broadcast;
using cpu::avx2::copy_stream;  // bits: the even/odd order is a register layout
using cpu::avx2_even_odd::fmadd;
using cpu::avx2_even_odd::fnmadd;
using cpu::avx2_even_odd::for_each_chunk;
using cpu::avx2_even_odd::hsum;
using cpu::avx2_even_odd::keep_first;
using cpu::avx2_even_odd::kSlots;
using cpu::avx2_even_odd::loadn;
using cpu::avx2_even_odd::store_stream;
using cpu::avx2_even_odd::storen;

#include "norm/norm_cpu_simd.h"

}  // namespace avx2_even_odd_path
FASTLLM_AVX2_END

// ---- AVX-512 path -------------------------------------------------------------------------
// The same code on 16 floats (float32, bfloat16 and float16 rows; float64 stays on AVX2), for
// CPUs with AVX-512 F/BW/DQ/VL/BF16 (cpu_avx512()): half the loop iterations, masked tails
// instead of the AVX2 path's copies through a small buffer, and vcvtneps2bf16 rounding of
// bfloat16 outputs (exactly c10's, cpu_avx512.h).

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN
namespace avx512_path {

template <class T>
using Vec = __m512;
template <class T>
inline constexpr int kLanes = 16;
template <class T>
using ParamOf = float;
using cpu::avx512::broadcast;
using cpu::avx512::copy_stream;
using cpu::avx512::fmadd;
using cpu::avx512::fnmadd;
using cpu::avx512::hsum;
using cpu::avx512::keep_first;
using cpu::avx512::kSlots;
using cpu::avx512::loadn;
using cpu::avx512::store_stream;
using cpu::avx512::storen;
template <int W, class Body>
FASTLLM_INLINE void for_each_chunk(int64_t len, Body&& body) {
  static_assert(W == 16, "AVX-512 vectors hold 16 floats");
  cpu::avx512::for_each_chunk(len, body);
}

#include "norm/norm_cpu_simd.h"

}  // namespace avx512_path
FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END
#endif  // FASTLLM_NORM_CPU_AVX2

// ---- dispatch over threads and instruction sets -----------------------------------------

// Whether rows of `cols` elements of `bytes` each start on 64-byte boundaries, as the vector
// paths' non-temporal stores need (each full vector is then aligned to its own size; the
// outputs' base is checked by stream_outputs).
bool rows_stream(int64_t cols, size_t bytes) {
  return (cols * static_cast<int64_t>(bytes)) % 64 == 0;
}

template <class T>
void norm_fwd_typed(const FwdParams& p) {
  void (*rows_fn)(const FwdParams&, int64_t, int64_t, bool) = &norm_fwd_rows_scalar<T>;
  FwdParams params = p;  // what rows_fn reads: p, or p with other weight / bias arrays
#if defined(FASTLLM_NORM_CPU_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::cpu_avx512()) rows_fn = &avx512_path::norm_fwd_rows<T>;
  }
  // bfloat16 on AVX2: the even/odd layout, its weight and bias copied into that order.
  std::unique_ptr<cpu::avx2_even_odd::EvenOddFloat[]> even_odd;
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (rows_fn == &norm_fwd_rows_scalar<T> && cpu::cpu_isa() == cpu::CpuIsa::kAvx2) {
      namespace eo = cpu::avx2_even_odd;
      const int64_t size = eo::even_odd_size(p.cols);
      even_odd.reset(new eo::EvenOddFloat[2 * size]);
      if (p.weight != nullptr) {
        eo::to_even_odd(static_cast<const float*>(p.weight), p.cols, even_odd.get());
        params.weight = even_odd.get();
      }
      if (p.bias != nullptr) {
        eo::to_even_odd(static_cast<const float*>(p.bias), p.cols, even_odd.get() + size);
        params.bias = even_odd.get() + size;
      }
      rows_fn = &avx2_even_odd_path::norm_fwd_rows<T>;
    }
  }
  if (rows_fn == &norm_fwd_rows_scalar<T> && cpu::cpu_isa() == cpu::CpuIsa::kAvx2) {
    rows_fn = &avx2_path::norm_fwd_rows<T>;
  }
#endif
  const int64_t out_bytes = p.rows * p.cols * static_cast<int64_t>(sizeof(T));
  // Large outputs in memory already: non-temporal stores; fresh ones: huge pages (cpu_memory.h).
  // (stream_outputs first: a bad FASTLLM_CPU_STREAM_STORES throws for any shape.)
  const bool stream = cpu::stream_outputs({p.out, p.residual_out}, out_bytes) &&
                      rows_fn != &norm_fwd_rows_scalar<T> && rows_stream(p.cols, sizeof(T));
  advise_huge_pages(p.out, out_bytes);
  advise_huge_pages(p.residual_out, out_bytes);
  const int threads = threads_for(p.rows, p.cols, kMinElementsPerThread);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    rows_fn(params, block_begin(p.rows, t, nt), block_begin(p.rows, t + 1, nt), stream);
    if (stream) cpu::fence_streaming_stores();
  }
}

template <class T>
void norm_bwd_typed(const BwdParams& p) {
  using Acc = AccOf<T>;
  void (*rows_fn)(const BwdParams&, int64_t, int64_t, Acc*, Acc*, bool) =
      &norm_bwd_rows_scalar<T>;
#if defined(FASTLLM_NORM_CPU_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::cpu_avx512()) rows_fn = &avx512_path::norm_bwd_rows<T>;
  }
  if (rows_fn == &norm_bwd_rows_scalar<T> && cpu::cpu_isa() == cpu::CpuIsa::kAvx2) {
    rows_fn = &avx2_path::norm_bwd_rows<T>;
  }
#endif
  const int64_t n = p.cols;
  const int64_t dx_bytes = p.rows * n * static_cast<int64_t>(sizeof(T));
  const bool stream = cpu::stream_outputs({p.dx}, dx_bytes) &&  // as in norm_fwd_typed
                      rows_fn != &norm_bwd_rows_scalar<T> && rows_stream(n, sizeof(T));
  advise_huge_pages(p.dx, dx_bytes);
  const int max_threads = threads_for(p.rows, n, kMinElementsPerThread);
  Acc* dweight = static_cast<Acc*>(p.dweight);
  Acc* dbias = static_cast<Acc*>(p.dbias);
  // Thread t's partial rows, `stride` apart: its dweight and dbias totals (slots 4t, 4t+1)
  // and the sums of its current block of rows (4t+2, 4t+3). Summing kParamGradBlockRows
  // rows at a time and then adding the block into the total keeps the rounding error of
  // a long column sum close to a pairwise sum's, not a running sum's. The stride is 256
  // bytes more than a multiple of 4 KiB, so the rows never alias modulo 4 KiB. Each thread
  // zeroes its own partials, so they start in its cache.
  constexpr int64_t kParamGradBlockRows = 64;
  const int64_t stride = (n * sizeof(Acc) + 4095) / 4096 * 4096 / sizeof(Acc) + 256 / sizeof(Acc);
  const bool param_grads = dweight != nullptr || dbias != nullptr;
  std::unique_ptr<Acc[]> partials;
  if (param_grads) partials.reset(new Acc[4 * max_threads * stride]);
#pragma omp parallel num_threads(max_threads) if (max_threads > 1)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t row_begin = block_begin(p.rows, t, nt);
    const int64_t row_end = block_begin(p.rows, t + 1, nt);
    if (!param_grads) {
      rows_fn(p, row_begin, row_end, nullptr, nullptr, stream);
      if (stream) cpu::fence_streaming_stores();
    } else {
      Acc* slot_ptr[4];
      for (int k = 0; k < 4; ++k) slot_ptr[k] = partials.get() + (4 * t + k) * stride;
      Acc* dw_total = dweight != nullptr ? slot_ptr[0] : nullptr;
      Acc* db_total = dbias != nullptr ? slot_ptr[1] : nullptr;
      Acc* dw_block = dweight != nullptr ? slot_ptr[2] : nullptr;
      Acc* db_block = dbias != nullptr ? slot_ptr[3] : nullptr;
      if (dw_total != nullptr) std::fill_n(dw_total, n, Acc(0));
      if (db_total != nullptr) std::fill_n(db_total, n, Acc(0));
      for (int64_t b = row_begin; b < row_end; b += kParamGradBlockRows) {
        if (dw_block != nullptr) std::fill_n(dw_block, n, Acc(0));
        if (db_block != nullptr) std::fill_n(db_block, n, Acc(0));
        rows_fn(p, b, std::min(b + kParamGradBlockRows, row_end), dw_block, db_block, stream);
        for (int64_t j = 0; dw_total != nullptr && j < n; ++j) dw_total[j] += dw_block[j];
        for (int64_t j = 0; db_total != nullptr && j < n; ++j) db_total[j] += db_block[j];
      }
      if (stream) cpu::fence_streaming_stores();
#pragma omp barrier
      // Thread t sums columns [col_begin, col_end) over all threads' totals, in thread order.
      const int64_t col_begin = block_begin(n, t, nt);
      const int64_t col_end = block_begin(n, t + 1, nt);
      for (int slot = 0; slot < 2; ++slot) {
        Acc* dst = slot == 0 ? dweight : dbias;
        if (dst == nullptr) continue;
        std::copy(partials.get() + slot * stride + col_begin,
                  partials.get() + slot * stride + col_end, dst + col_begin);
        for (int u = 1; u < nt; ++u) {
          const Acc* src = partials.get() + (4 * u + slot) * stride;
          for (int64_t j = col_begin; j < col_end; ++j) dst[j] += src[j];
        }
      }
    }
  }
}

}  // namespace

void norm_fwd_cpu(const FwdParams& p) {
  cpu::dispatch_dtype(p.dtype, "norm_fwd_cpu", [&](auto tag) {
    norm_fwd_typed<typename decltype(tag)::type>(p);
  });
}

void norm_bwd_cpu(const BwdParams& p) {
  cpu::dispatch_dtype(p.dtype, "norm_bwd_cpu", [&](auto tag) {
    norm_bwd_typed<typename decltype(tag)::type>(p);
  });
}

}  // namespace norm
}  // namespace fastllm
