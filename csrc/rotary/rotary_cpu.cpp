// Rotary position embeddings on the CPU: rotary_cpu of rotary.h, for float32, bfloat16,
// float16 and float64. Torch-free: C++17, OpenMP and x86 intrinsics.
//
// Math (rotary.h holds the contract), per token and head, in Acc (float, or double for
// float64), rounded to T once per stored value:
//   out1 = x1 c - x2 s,  out2 = x2 c + x1 s   (s negated when conjugate: the backward pass)
//
// Design. Element-wise and memory-bound: every feature of q and k is read once and written
// once; the angles (cos / sin at the token's position) are shared by all H + Hkv heads of the
// token, so the token is the unit of work:
//   - Threads: rows (tokens) in contiguous blocks per OpenMP thread (common/cpu_parallel.h);
//     small problems run on fewer threads (kMinElementsPerThread).
//   - Per row, fill_angles widens the row's cos / sin (float32 or x's dtype) once into a
//     buffer of Acc, with s negated for conjugate, and for the interleaved layout duplicated
//     and signed per lane (rotary_cpu_simd.h), so that every head is one multiply and one FMA
//     per vector with no shuffles but one in-lane pair swap.
//   - Three instruction paths, chosen at run time (common/cpu_features.h): AVX-512 (16 floats,
//     masked tails), AVX2/FMA/F16C (8 floats, tails through a small buffer), both compiled
//     from rotary_cpu_simd.h; and a portable scalar loop, which is also the float64 path.
//   - Pass-through features (R < D) are copied as bytes when out != in.
//
// Glossary: rows = B T (or total), R = rotary_dim, half = R / 2, T = storage dtype, Acc =
// accumulation type, W = vector lanes.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_dtypes.h"
#include "common/cpu_features.h"
#include "common/cpu_parallel.h"
#include "rotary/rotary.h"

#if defined(__x86_64__) || defined(__i386__)
#include "common/cpu_avx2.h"
#include "common/cpu_avx512.h"
#define FASTLLM_ROTARY_CPU_X86 1
#endif

namespace fastllm {
namespace rotary {
namespace {

using namespace cpu;

// About 64 KiB of float32 moved per thread: below that, one thread is faster.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 14;

// ---- portable scalar path -----------------------------------------------------------------

// The same buffers as the vector paths: out1 = x1 c - x2 s, out2 = x2 c + x1 s (NeoX), or
// out[j] = x[j] c[j] + x[j ^ 1] s[j] (interleaved, signed duplicated buffers).
template <class T, class Acc>
void rotate_head_scalar(const T* in, T* out, const Acc* c, const Acc* s, int64_t half,
                        bool interleaved) {
  if (interleaved) {
    for (int64_t j = 0; j < 2 * half; j += 2) {
      const Acc x0 = to_acc(in[j]), x1 = to_acc(in[j + 1]);
      out[j] = from_acc<T>(x0 * c[j] + x1 * s[j]);
      out[j + 1] = from_acc<T>(x1 * c[j + 1] + x0 * s[j + 1]);
    }
    return;
  }
  for (int64_t i = 0; i < half; ++i) {
    const Acc x1 = to_acc(in[i]), x2 = to_acc(in[half + i]);
    out[i] = from_acc<T>(x1 * c[i] - x2 * s[i]);
    out[half + i] = from_acc<T>(x2 * c[i] + x1 * s[i]);
  }
}

// ---- AVX2 / FMA / F16C path ---------------------------------------------------------------

#if defined(FASTLLM_ROTARY_CPU_X86)
FASTLLM_AVX2_BEGIN
namespace avx2_path {

using V = __m256;
constexpr int W = 8;
using cpu::avx2::fmadd;
using cpu::avx2::fnmadd;
using cpu::avx2::load;
using cpu::avx2::loadn;
using cpu::avx2::store;
using cpu::avx2::storen;

FASTLLM_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
FASTLLM_INLINE V swap_pairs(V x) { return _mm256_permute_ps(x, 0xB1); }

#include "rotary/rotary_cpu_simd.h"

}  // namespace avx2_path
FASTLLM_AVX2_END

// ---- AVX-512 path -------------------------------------------------------------------------

FASTLLM_AVX512_BEGIN
FASTLLM_AVX512_NO_UNDEFINED_WARNING_BEGIN
namespace avx512_path {

using V = __m512;
constexpr int W = 16;

using cpu::avx512::fmadd;
using cpu::avx512::fnmadd;

FASTLLM_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
FASTLLM_INLINE V swap_pairs(V x) { return _mm512_permute_ps(x, 0xB1); }

// Loads and stores of float, BFloat16 and Half as 16 floats, masked tails (cpu_avx512.h).
using cpu::avx512::load;
using cpu::avx512::loadn;
using cpu::avx512::store;
using cpu::avx512::storen;

#include "rotary/rotary_cpu_simd.h"

}  // namespace avx512_path
FASTLLM_AVX512_NO_UNDEFINED_WARNING_END
FASTLLM_AVX512_END
#endif  // FASTLLM_ROTARY_CPU_X86

// ---- dispatch over threads and instruction sets -------------------------------------------

template <class T>
using RotateHead = void (*)(const T*, T*, const AccOf<T>*, const AccOf<T>*, int64_t, bool);

// The head kernel of the best instruction set for T on this CPU.
template <class T>
RotateHead<T> pick_rotate_head() {
#if defined(FASTLLM_ROTARY_CPU_X86)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::cpu_avx512()) return &avx512_path::rotate_head<T>;
    if (cpu::cpu_isa() == cpu::CpuIsa::kAvx2) return &avx2_path::rotate_head<T>;
  }
#endif
  return &rotate_head_scalar<T, AccOf<T>>;
}

// c / s of the row at position pos in the layout rotate_head expects (file comment).
template <class Acc, class Angle>
void fill_angles(const Params& p, int64_t pos, Acc* c, Acc* s) {
  const int64_t half = p.rotary_dim / 2;
  const Angle* cos_row = static_cast<const Angle*>(p.cos) + pos * p.cos_row_stride;
  const Angle* sin_row = static_cast<const Angle*>(p.sin) + pos * p.sin_row_stride;
  const Acc sign = p.conjugate ? Acc(-1) : Acc(1);
  for (int64_t i = 0; i < half; ++i) {
    const Acc ci = to_acc(cos_row[i]);
    const Acc si = sign * to_acc(sin_row[i]);
    if (p.interleaved) {
      c[2 * i] = c[2 * i + 1] = ci;
      s[2 * i] = -si;
      s[2 * i + 1] = si;
    } else {
      c[i] = ci;
      s[i] = si;
    }
  }
}

template <class T>
void rotary_typed(const Params& p) {
  using Acc = AccOf<T>;
  const RotateHead<T> rotate = pick_rotate_head<T>();
  const int64_t rows = p.cu_seqlens != nullptr ? p.seqlen : p.batch * p.seqlen;
  const int64_t half = p.rotary_dim / 2;
  const int64_t rest = p.head_dim - p.rotary_dim;
  const int threads =
      threads_for(rows, (p.q.heads + p.k.heads) * p.head_dim, kMinElementsPerThread);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<Acc> angles(2 * static_cast<size_t>(p.rotary_dim));
    Acc* c = angles.data();
    Acc* s = c + p.rotary_dim;
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    for (int64_t r = block_begin(rows, t, nt); r < block_begin(rows, t + 1, nt); ++r) {
      const int64_t pos = position_of_row(p, r);
      if (p.cos_dtype == DType::kFloat32) {
        fill_angles<Acc, float>(p, pos, c, s);
      } else {
        fill_angles<Acc, T>(p, pos, c, s);
      }
      for (const Operand* o : {&p.q, &p.k}) {
        const T* in_row = static_cast<const T*>(o->in) + row_offset(p, *o, r, true);
        T* out_row = static_cast<T*>(o->out) + row_offset(p, *o, r, false);
        for (int64_t h = 0; h < o->heads; ++h) {
          const T* in = in_row + h * o->in_head_stride;
          T* out = out_row + h * o->out_head_stride;
          rotate(in, out, c, s, half, p.interleaved);
          if (p.copy_rest && rest > 0) {
            std::memcpy(out + p.rotary_dim, in + p.rotary_dim, sizeof(T) * rest);
          }
        }
      }
    }
  }
}

}  // namespace

void rotary_cpu(const Params& p) {
  if (p.batch <= 0 || p.seqlen <= 0 || p.head_dim <= 0) return;
  cpu::dispatch_dtype(p.dtype, "rotary_cpu",
                      [&](auto type) { rotary_typed<typename decltype(type)::type>(p); });
}

}  // namespace rotary
}  // namespace fastllm
