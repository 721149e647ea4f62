// CUDA kernels of the fused cross-entropy: forward (per-row loss and logsumexp, one read of
// the logits) and backward (the logits' gradient, one read and one write, optionally in
// place over the logits). Torch-free; the glue is cross_entropy_cuda_ops.cpp. The same source
// also builds for the host against the SIMT emulation (FASTLLM_SIMT_EMU), so it uses only
// what csrc/common/cuda_compat.h promises: launches through FASTLLM_LAUNCH_KERNEL, static
// shared arrays, barriers reached by every thread of the block, warp shuffles executed by
// all 32 lanes, no inline PTX.
//
// Math (cross_entropy.h), per row of V logits x, target t, accumulated in float:
//   z = softcap > 0 ? softcap * tanh(x / softcap) : x     (tanh: see precise_tanh)
//   forward, in ONE pass over the row: each thread keeps an online (max m, sum_exp s) with
//     s = sum exp(z_c - m), one exp per logit (accumulate_logit), plus, with label
//     smoothing, sum(w) and sum(w * (z - m)) around the same running max, rebased when it
//     grows (w = the class weight, or 1); the threads' states are merged by warp shuffles
//     and, when a block owns the row, one shared-memory step. Then
//       lse = m + log(s),  loss = (1 - ls) * w_t * (lse - z_t) + ls * smooth + z_loss * lse^2,
//       smooth = sum_c w_c (lse - z_c) / V = (log(s) * sum(w) - sum(w * (z - m))) / V
//     (around m, a large common offset of the logits cancels before the sums, and every
//     term of sum(w * (z - m)) is <= 0: logits near the float maximum overflow it, if at
//     all, to +inf, as torch's own sum does, never to -inf or NaN);
//     0 for rows with t == ignore_index, NaN for a target outside [0, V) (the CUDA way of
//     refusing it: it cannot pass silently). lse is written for every row, and correct
//     (token accuracy) = z_t == m for non-ignored rows in range: one compare per row.
//   backward, p_c = exp(z_c - lse), g = grad_loss[row] (stride 0 broadcasts one value),
//     with lse as the saved float, or, for rows with |lse| >= kExactLseMin, recomputed as
//     max + log(sum exp(z - max)) from the logits (exact_lse):
//     dz_c = g * ((1 - ls) * w_t + ls * W_s + 2 * z_loss * lse) * p_c
//            - g * ls * w_c / V - [c == t] * g * (1 - ls) * w_t,     W_s = sum(w) / V (or 1)
//     dx_c = dz_c * (1 - tanh^2) with softcap; zeros for ignored rows, NaN for a target out
//     of range. Each thread reads an element before it writes the same element, so
//     grad_logits may be the logits' own storage (in-place backward).
//
// Variants, and why:
//   - Warp per row (V <= 1024): 8 rows per 256-thread block, reductions by shuffles only,
//     no barriers; a block per row would leave most of its threads idle on small rows.
//   - Block per row (V > 1024): 128 threads up to V = 4096, 256 above; warp shuffles, then
//     one shared-memory merge per row, double-buffered so a single barrier per row
//     suffices. The row is streamed, not held in registers, so every V (up to 2^30) runs
//     the same kernel.
//   - Persistent grid: at most one wave of resident blocks (SM count x blocks per SM
//     guaranteed by the register budget), striding over the rows. Millions of rows need
//     no huge grid, and the backward's W_s is computed once per block, not once per row.
//   - 16-byte vector accesses (4 float or 8 bf16/fp16 elements): every row is split into a
//     scalar head up to its first 16-byte boundary, aligned packs and a scalar tail, so
//     rows whose stride is not a multiple of the vector width (V = 50257) are vectorised
//     too. Backward reads the logits and writes the gradient with the same packs, which
//     needs both rows at the same offset from a 16-byte boundary (checked once by the
//     launcher; always true in place); otherwise it falls back to element accesses.
//   - Ignored rows: forward still computes their lse (it is an output); backward writes
//     their zero gradient without reading the logits.
//   - Rows with a large log-sum-exp: the saved float lse is rounded to half an ulp, which
//     is a relative error of every p (2^-17 below |lse| = 256, 5e-4 at 1e4; at 1e8 a tie of
//     two logits gets p = 1 instead of 1/2); from kExactLseMin on, backward reads such a row
//     twice and forms p = exp((z - max) - log(sum exp(z - max))) exactly, with the
//     forward's online statistics. Other rows pay one comparison.
//
// Glossary: rows = N (tokens), vocab = V (classes), T = logits dtype (float, __nv_bfloat16,
// __half); loss, lse, grad_loss and class_weight are float. t = target[row], ls = label
// smoothing, w_t = class_weight[t] (1 without weights), "rank" = a thread's index among
// the threads that own its row (lane or threadIdx.x), "pack" = kPackElems<T> consecutive
// elements accessed as one 16-byte vector.
#include <cstdint>
#include <limits>

#include "common/cuda_compat.h"
#include "common/cuda_utils.cuh"
#include "cross_entropy/cross_entropy_cuda.h"

namespace fastllm {
namespace cross_entropy {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Rows up to this many classes are owned by one warp, larger ones by a block.
constexpr int64_t kMaxWarpPerRowVocab = 1024;
// Every block has at most kBlockThreads threads: warp-per-row blocks hold
// kBlockThreads / 32 rows; a row block has kMinRowThreads (rows up to
// kMinRowThreads * kElemsPerThread classes) or kBlockThreads threads.
constexpr int kBlockThreads = 256;
constexpr int kMinRowThreads = 128;
constexpr int64_t kElemsPerThread = 32;
constexpr int kMaxWarps = kBlockThreads / kWarpSize;
// Register budget, through __launch_bounds__(kBlockThreads, kMinBlocksPerSm): at most 48
// registers per thread, so kResidentThreadsPerSm threads are resident on every SM of
// sm_80+ (64K registers). Without an explicit budget ptxas aimed at 32 or 40 registers
// and spilled a few bytes in some instantiations.
constexpr int kMinBlocksPerSm = 5;
constexpr int kResidentThreadsPerSm = kMinBlocksPerSm * kBlockThreads;

// ---- element access (common/cuda_utils.cuh has the conversions and vector packs) ------

constexpr int kAccessBytes = 16;
template <class T>
constexpr int kPackElems = kMaxVecWidth<T>;

// A chunk of a row handed to a row visitor: elements [first(), first() + N), N = 1 (head,
// tail, unaligned rows) or kPackElems<T>. Packs are addressed as element `index` of a Vec
// array starting at the (16-byte aligned) element `base`: nvcc keeps such an access one
// 16-byte load / store, while a Vec pointer cast from `row + first()` was stored in 2- or
// 4-byte pieces inside the row loop.
template <int N>
struct Chunk {
  static constexpr int kSize = N;
  int base;
  int index;
  __device__ __forceinline__ int first() const { return base + index * N; }
};

// Elements before the first 16-byte boundary of a row (the scalar head): fewer than a pack,
// at most vocab. row must be aligned to sizeof(T), as every tensor's data is.
template <class T>
__device__ __forceinline__ int aligned_head(const T* row, int vocab) {
  const int misalignment = static_cast<int>(reinterpret_cast<uintptr_t>(row) % kAccessBytes);
  const int head = misalignment == 0 ? 0 : (kAccessBytes - misalignment) / int(sizeof(T));
  return head < vocab ? head : vocab;
}

// Calls visit(Chunk<n>) for this thread's chunks of a row, dealt round-robin to the
// nthreads threads of the row (coalesced). Vectorised: the head [0, head) and the tail
// after the last whole pack are shorter than a pack, hence than nthreads (>= 32), so each
// thread has at most one element of each; the packs start at element head, 16-byte
// aligned. Not vectorised (head < 0): element by element. The loops are kept rolled:
// unrolled, they overflow the register budget (ptxas spilled); one 16-byte access in
// flight per thread, with >= 1280 resident threads per SM, is the latency hiding.
template <class T, class Visit>
__device__ __forceinline__ void for_each_chunk(int vocab, int head, int rank, int nthreads,
                                               Visit&& visit) {
  if (head < 0) {
    FASTLLM_NO_UNROLL
    for (int c = rank; c < vocab; c += nthreads) visit(Chunk<1>{c, 0});
    return;
  }
  constexpr int kPack = kPackElems<T>;
  if (rank < head) visit(Chunk<1>{rank, 0});
  const int packs = (vocab - head) / kPack;
  FASTLLM_NO_UNROLL
  for (int k = rank; k < packs; k += nthreads) visit(Chunk<kPack>{head, k});
  const int tail = head + packs * kPack;
  if (rank < vocab - tail) visit(Chunk<1>{tail + rank, 0});
}

template <int N, class T>
__device__ __forceinline__ Vec<T, N> load_chunk(const T* row, Chunk<N> chunk) {
  return reinterpret_cast<const Vec<T, N>*>(row + chunk.base)[chunk.index];
}

template <int N, class T>
__device__ __forceinline__ void store_chunk(T* row, Chunk<N> chunk, const Vec<T, N>& v) {
  reinterpret_cast<Vec<T, N>*>(row + chunk.base)[chunk.index] = v;
}

// ---- row statistics ------------------------------------------------------------------

// A thread's (or a merged group's) share of a row: online max / sum of exp(z - max), and,
// with label smoothing, the weight seen and the weighted sum of z - max around the same
// max (w = 1 without a class weight; both stay 0 without label smoothing).
struct RowStats {
  float max;
  float sum_exp;
  float sum_w;   // sum w
  float sum_wz;  // sum w * (z - finite_shift(max))
};

__device__ __forceinline__ RowStats empty_row_stats() { return {-kInf, 0.f, 0.f, 0.f}; }

// exp(v - max) stays finite for max = -inf (every value so far was -inf): subtract 0 then.
__device__ __forceinline__ float finite_shift(float max) { return max == -kInf ? 0.f : max; }

// sum_wz moved from around old_max to around new_max >= old_max. Nothing to move when no
// weight was seen, where the shift difference may overflow to -inf (0 * inf = NaN).
__device__ __forceinline__ float rebased_sum_wz(const RowStats& s, float new_max) {
  return s.sum_w == 0.f
             ? s.sum_wz
             : fmaf(s.sum_w, finite_shift(s.max) - finite_shift(new_max), s.sum_wz);
}

// Online softmax step for one logit, one exp: exp(-|z - max|) is the new term when z does
// not raise the max, else the factor that rescales the old sum. Before the first finite
// logit (max = -inf, sum_exp = 0) the shift is 0, so -inf logits add exp(-inf) = 0 and the
// first finite one sets sum_exp = 0 * e + 1. A NaN z makes sum_exp NaN (fmaxf drops NaN
// from max, so this is how a NaN logit reaches lse). With label smoothing (`smoothing`,
// uniform over the grid), w * (z - max) joins the smoothing sum, rebased first if z raised
// the max.
__device__ __forceinline__ void accumulate_logit(RowStats& s, float z, bool smoothing,
                                                 float w) {
  const float e = expf(-fabsf(z - finite_shift(s.max)));
  s.sum_exp = z > s.max ? fmaf(s.sum_exp, e, 1.f) : s.sum_exp + e;
  const float max = fmaxf(s.max, z);
  if (smoothing) {
    s.sum_wz = fmaf(w, z - finite_shift(max), rebased_sum_wz(s, max));
    s.sum_w += w;
  }
  s.max = max;
}

__device__ __forceinline__ RowStats merge_row_stats(const RowStats& a, const RowStats& b) {
  const float max = fmaxf(a.max, b.max);
  const float shift = finite_shift(max);
  return {max, a.sum_exp * expf(a.max - shift) + b.sum_exp * expf(b.max - shift),
          a.sum_w + b.sum_w, rebased_sum_wz(a, max) + rebased_sum_wz(b, max)};
}

// Butterfly merge over the warp: every lane ends with the state of the whole warp. The
// smoothing sums travel only with label smoothing (uniform over the grid).
__device__ __forceinline__ RowStats warp_merge_row_stats(RowStats s, bool smoothing) {
  FASTLLM_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    RowStats other;
    other.max = __shfl_xor_sync(kFullWarpMask, s.max, offset);
    other.sum_exp = __shfl_xor_sync(kFullWarpMask, s.sum_exp, offset);
    other.sum_w = 0.f;
    other.sum_wz = 0.f;
    if (smoothing) {
      other.sum_w = __shfl_xor_sync(kFullWarpMask, s.sum_w, offset);
      other.sum_wz = __shfl_xor_sync(kFullWarpMask, s.sum_wz, offset);
    }
    s = merge_row_stats(s, other);
  }
  return s;
}

// tanh(y), and 1 - |tanh(y)| without cancellation (the softcap derivative is
// 1 - tanh^2 = (1 - |tanh|)(1 + |tanh|), where 1 - tanh*tanh would lose every digit for large
// |y|). Not tanhf: --use_fast_math compiles it to tanh.approx.f32, whose 2^-11 relative
// error moves a logit capped at 30 by up to 0.015, far above float32 rounding. Here:
// |y| < 0.6, y + y^3 P(y^2) (P fitted for relative error, about 1 ulp); above,
// 1 - 2 / (exp(2|y|) + 1), which saturates to 1 without overflow trouble.
struct TanhResult {
  float value;
  float complement;  // 1 - |value|
};

__device__ __forceinline__ TanhResult precise_tanh(float y) {
  const float a = fabsf(y);
  float magnitude;
  float complement;
  if (a < 0.6f) {
    const float u = a * a;
    float p = -5.9090466e-3f;
    p = fmaf(p, u, 2.0808801e-2f);
    p = fmaf(p, u, -5.3787984e-2f);
    p = fmaf(p, u, 1.3331978e-1f);
    p = fmaf(p, u, -3.3333302e-1f);
    magnitude = fmaf(a * u, p, a);
    complement = 1.f - magnitude;
  } else {
    complement = 2.f / (expf(2.f * a) + 1.f);
    magnitude = 1.f - complement;
  }
  return {copysignf(magnitude, y), complement};
}

// z = softcap * tanh(x / softcap), or x without soft-capping (softcap == 0).
__device__ __forceinline__ float soft_cap(float x, float softcap, float inv_softcap) {
  return softcap > 0.f ? softcap * precise_tanh(x * inv_softcap).value : x;
}

// This thread's share of a row's statistics: its chunks of the row (for_each_chunk), with the
// label-smoothing sums when `smoothing` (uniform over the grid).
template <class T>
__device__ __forceinline__ RowStats thread_row_stats(const T* x, int vocab, int rank,
                                                     int nthreads, float softcap,
                                                     float inv_softcap, const float* class_weight,
                                                     bool smoothing) {
  RowStats s = empty_row_stats();
  for_each_chunk<T>(vocab, aligned_head(x, vocab), rank, nthreads, [&](auto chunk) {
    constexpr int n = decltype(chunk)::kSize;
    const Vec<T, n> pack = load_chunk(x, chunk);
    FASTLLM_UNROLL
    for (int i = 0; i < n; ++i) {
      const float z = soft_cap(to_float(pack.v[i]), softcap, inv_softcap);
      const float w = smoothing && class_weight != nullptr ? class_weight[chunk.first() + i]
                                                           : 1.f;
      accumulate_logit(s, z, smoothing, w);
    }
  });
  return s;
}

// Block and row-group geometry shared by both kernels: a row is owned by one warp
// (kWarpPerRow) or by the whole block; rows are visited grid-stride.
template <bool kWarpPerRow>
struct RowGroup {
  int rank;          // index of this thread among the threads of its row
  int nthreads;      // threads per row
  int64_t first_row;
  int64_t row_step;

  __device__ __forceinline__ static RowGroup current() {
    const int tid = static_cast<int>(threadIdx.x);
    const int64_t rows_per_block = kWarpPerRow ? blockDim.x / kWarpSize : 1;
    RowGroup g;
    g.rank = kWarpPerRow ? tid % kWarpSize : tid;
    g.nthreads = kWarpPerRow ? kWarpSize : static_cast<int>(blockDim.x);
    g.first_row = int64_t(blockIdx.x) * rows_per_block + (kWarpPerRow ? tid / kWarpSize : 0);
    g.row_step = int64_t(gridDim.x) * rows_per_block;
    return g;
  }
};

// ---- kernel arguments ----------------------------------------------------------------

// What the forward and backward kernels share: the logits rows, the targets and the options,
// in the types the kernels compute with (FwdArgs / BwdArgs add their outputs).
template <class T>
struct RowArgs {
  const T* logits;  // backward: may equal grad_logits, so no __restrict__
  int64_t logits_row_stride;
  const int64_t* target;
  const float* class_weight;  // nullptr: no class weight
  int64_t rows;
  int vocab;
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
  float softcap;  // 0: no soft-capping
  float inv_softcap;
  float inv_vocab;
};

// ---- forward -------------------------------------------------------------------------

template <class T>
struct FwdArgs : RowArgs<T> {
  float* loss;
  float* lse;
  bool* correct;  // nullptr: not wanted
};

// Final per-row combination, by the thread of rank 0 holding the merged stats.
template <class T>
__device__ __forceinline__ void write_row_loss(const FwdArgs<T>& a, int64_t row, int64_t target,
                                               float z_target, const RowStats& s) {
  const float log_sum_exp = logf(s.sum_exp);
  const float lse = s.max + log_sum_exp;
  a.lse[row] = lse;
  float loss;
  bool correct = false;
  if (target == a.ignore_index) {
    loss = 0.f;
  } else if (target < 0 || target >= a.vocab) {
    loss = kNaN;
  } else {
    // Token accuracy: z_target and every z behind s.max come from soft_cap, so a top-1
    // target compares exactly equal (ties count; a NaN logit makes lse NaN, which fails
    // the last test).
    correct = z_target == s.max && fabsf(z_target) < kInf && fabsf(lse) <= kInf;
    const float weight_t = a.class_weight != nullptr ? a.class_weight[target] : 1.f;
    // (max - z_t) + log(s) rather than lse - z_t: no cancellation of two large numbers.
    loss = (1.f - a.label_smoothing) * weight_t * ((s.max - z_target) + log_sum_exp);
    // Terms added only when enabled, so an infinite smooth part (a -inf logit) cannot turn
    // a disabled term into 0 * inf = NaN.
    if (a.label_smoothing > 0.f) {
      const float smooth = (log_sum_exp * s.sum_w - s.sum_wz) * a.inv_vocab;
      loss += a.label_smoothing * smooth;
    }
    if (a.z_loss != 0.f) loss += a.z_loss * lse * lse;
  }
  a.loss[row] = loss;
  if (a.correct != nullptr) a.correct[row] = correct;
}

template <class T, bool kWarpPerRow>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    cross_entropy_fwd_kernel(const FwdArgs<T> a) {
  // Block per row: the warps' merged stats, double-buffered by row parity so one barrier per
  // row suffices (a warp can only overwrite a buffer after the barrier of the next row,
  // which warp 0 reaches after it finished reading it).
  __shared__ RowStats warp_stats[2][kWarpPerRow ? 1 : kMaxWarps];
  const RowGroup<kWarpPerRow> group = RowGroup<kWarpPerRow>::current();
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const bool smoothing = a.label_smoothing > 0.f;

  int parity = 0;
  for (int64_t row = group.first_row; row < a.rows; row += group.row_step, parity ^= 1) {
    const T* x = a.logits + row * a.logits_row_stride;
    int64_t target = 0;
    float z_target = 0.f;
    if (group.rank == 0) {
      target = a.target[row];
      if (target >= 0 && target < a.vocab) {
        z_target = soft_cap(to_float(x[target]), a.softcap, a.inv_softcap);
      }
    }

    RowStats s = thread_row_stats(x, a.vocab, group.rank, group.nthreads, a.softcap,
                                  a.inv_softcap, a.class_weight, smoothing);

    s = warp_merge_row_stats(s, smoothing);
    if constexpr (!kWarpPerRow) {
      if (lane == 0) warp_stats[parity][warp] = s;
      __syncthreads();
      if (warp == 0) {
        const int warps = static_cast<int>(blockDim.x) / kWarpSize;
        s = lane < warps ? warp_stats[parity][lane] : empty_row_stats();
        s = warp_merge_row_stats(s, smoothing);
      }
    }
    if (group.rank == 0) write_row_loss(a, row, target, z_target, s);
  }
}

// ---- backward ------------------------------------------------------------------------

template <class T>
struct BwdArgs : RowArgs<T> {
  const float* grad_loss;
  int64_t grad_loss_stride;  // 0: one value for every row
  const float* lse;
  T* grad_logits;  // may equal logits (in place)
  int64_t grad_row_stride;
  bool vectorized;  // logits and grad rows sit at the same offset from a 16-byte boundary
};

// sum(class_weight) / V over the whole block; every thread of the block must call it.
__device__ __forceinline__ float block_mean_weight(const float* class_weight, int vocab,
                                                   float inv_vocab) {
  __shared__ float warp_sums[kMaxWarps];
  float sum = 0.f;
  for (int c = static_cast<int>(threadIdx.x); c < vocab; c += static_cast<int>(blockDim.x)) {
    sum += class_weight[c];
  }
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  return block_allreduce_sum(sum, warp_sums, warps) * inv_vocab;
}

// Backward's log-sum-exp of a row as hi + lo, p_c = exp((z_c - hi) - lo): the saved lse and
// 0, or, from |lse| = kExactLseMin on, the row's max and log(sum exp(z - max)) recomputed
// from its logits (the top of the file says why), known to every thread of the row. A
// non-finite lse (an inf or NaN logit) stays: p is NaN then, as torch's. The condition
// depends on the row only, so in a block per row every thread of the block reaches the
// barriers inside, or none does. shared_stats: kMaxWarps + 1 entries (block per row).
constexpr float kExactLseMin = 256.f;

struct LseSplit {
  float hi, lo;
};

template <class T, bool kWarpPerRow>
__device__ __forceinline__ LseSplit exact_lse(const BwdArgs<T>& a, const T* x, float lse,
                                              const RowGroup<kWarpPerRow>& group,
                                              RowStats* shared_stats) {
  if (!(fabsf(lse) >= kExactLseMin && fabsf(lse) < kInf)) return {lse, 0.f};
  RowStats s = thread_row_stats(x, a.vocab, group.rank, group.nthreads, a.softcap,
                                a.inv_softcap, nullptr, /*smoothing=*/false);
  s = warp_merge_row_stats(s, /*smoothing=*/false);
  if constexpr (!kWarpPerRow) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (lane == 0) shared_stats[warp] = s;
    __syncthreads();
    if (warp == 0) {
      const int warps = static_cast<int>(blockDim.x) / kWarpSize;
      s = lane < warps ? shared_stats[lane] : empty_row_stats();
      s = warp_merge_row_stats(s, /*smoothing=*/false);
      if (lane == 0) shared_stats[kMaxWarps] = s;
    }
    // Every thread reads the merged stats after this barrier and before the next row's
    // first one, so neither buffer is overwritten while it is read.
    __syncthreads();
    s = shared_stats[kMaxWarps];
  }
  return {s.max, logf(s.sum_exp)};
}

template <class T, bool kWarpPerRow>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    cross_entropy_bwd_kernel(const BwdArgs<T> a) {
  __shared__ RowStats row_stats[kWarpPerRow ? 1 : kMaxWarps + 1];
  const RowGroup<kWarpPerRow> group = RowGroup<kWarpPerRow>::current();
  const bool has_weight = a.class_weight != nullptr;
  // W_s, once per block (the condition is uniform over the grid, so all threads reach the
  // barrier inside).
  const float mean_weight =
      has_weight ? block_mean_weight(a.class_weight, a.vocab, a.inv_vocab) : 1.f;

  for (int64_t row = group.first_row; row < a.rows; row += group.row_step) {
    const T* x = a.logits + row * a.logits_row_stride;
    T* dx = a.grad_logits + row * a.grad_row_stride;
    const int head = a.vectorized ? aligned_head(dx, a.vocab) : -1;
    const int64_t target = a.target[row];

    if (target == a.ignore_index) {
      for_each_chunk<T>(a.vocab, head, group.rank, group.nthreads, [&](auto chunk) {
        constexpr int n = decltype(chunk)::kSize;
        Vec<T, n> zeros;
        FASTLLM_UNROLL
        for (int i = 0; i < n; ++i) zeros.v[i] = from_float<T>(0.f);
        store_chunk(dx, chunk, zeros);
      });
      continue;
    }

    const float g = a.grad_loss[row * a.grad_loss_stride];
    const float lse = a.lse[row];
    const LseSplit split = exact_lse(a, x, lse, group, row_stats);
    const bool target_ok = target >= 0 && target < a.vocab;
    const float weight_t = has_weight && target_ok ? a.class_weight[target] : 1.f;
    const float ls = a.label_smoothing;
    // dz_c = coef_p * p_c - coef_w * w_c - [c == t] * coef_t.
    const float coef_p = target_ok ? g * ((1.f - ls) * weight_t + ls * mean_weight +
                                          2.f * a.z_loss * lse)
                                   : kNaN;
    const float coef_w = g * ls * a.inv_vocab;
    const float coef_t = g * (1.f - ls) * weight_t;
    const int t = static_cast<int>(target);  // compared with c only when target_ok

    for_each_chunk<T>(a.vocab, head, group.rank, group.nthreads, [&](auto chunk) {
      constexpr int n = decltype(chunk)::kSize;
      const int c = chunk.first();
      const Vec<T, n> in = load_chunk(x, chunk);
      Vec<T, n> out;
      FASTLLM_UNROLL
      for (int i = 0; i < n; ++i) {
        const float xi = to_float(in.v[i]);
        const TanhResult capped =
            a.softcap > 0.f ? precise_tanh(xi * a.inv_softcap) : TanhResult{0.f, 0.f};
        const float z = a.softcap > 0.f ? a.softcap * capped.value : xi;
        float dz = coef_p * expf((z - split.hi) - split.lo);
        dz -= has_weight ? coef_w * a.class_weight[c + i] : coef_w;
        if (c + i == t) dz -= coef_t;
        if (a.softcap > 0.f) dz *= capped.complement * (2.f - capped.complement);
        out.v[i] = from_float<T>(dz);
      }
      store_chunk(dx, chunk, out);
    });
  }
}

// ---- host side -----------------------------------------------------------------------

struct LaunchShape {
  bool warp_per_row;
  int threads;
  unsigned blocks;
};

// One wave of resident blocks at most (a persistent grid): the blocks stride over the rows,
// each row's work is the same, so the waves stay balanced, the grid stays small for any
// number of rows, and the backward's W_s is computed once per block.
cudaError_t launch_shape(int64_t rows, int64_t vocab, LaunchShape* shape) {
  int device = 0;
  int num_sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  int64_t rows_per_block = 1;
  if (vocab <= kMaxWarpPerRowVocab) {
    shape->warp_per_row = true;
    shape->threads = kBlockThreads;
    rows_per_block = kBlockThreads / kWarpSize;
  } else {
    shape->warp_per_row = false;
    shape->threads = vocab <= kMinRowThreads * kElemsPerThread ? kMinRowThreads : kBlockThreads;
  }
  const int64_t resident = int64_t(num_sms) * (kResidentThreadsPerSm / shape->threads);
  const int64_t needed = ceil_div(rows, rows_per_block);
  shape->blocks = static_cast<unsigned>(needed < resident ? needed : resident);
  return cudaSuccess;
}

// The shared kernel arguments of forward's or backward's params.
template <class T, class Params>
RowArgs<T> row_args(const Params& p) {
  RowArgs<T> a;
  a.logits = static_cast<const T*>(p.logits);
  a.logits_row_stride = p.logits_row_stride;
  a.target = p.target;
  a.class_weight = static_cast<const float*>(p.class_weight);
  a.rows = p.rows;
  a.vocab = static_cast<int>(p.vocab);
  a.ignore_index = p.ignore_index;
  a.label_smoothing = static_cast<float>(p.label_smoothing);
  a.z_loss = static_cast<float>(p.z_loss);
  a.softcap = static_cast<float>(p.softcap);
  a.inv_softcap = p.softcap > 0.0 ? static_cast<float>(1.0 / p.softcap) : 0.f;
  a.inv_vocab = static_cast<float>(1.0 / static_cast<double>(p.vocab));
  return a;
}

// Launches the warp-per-row or the block-per-row instantiation of a kernel, as launch_shape
// decides for the problem.
template <class Args>
cudaError_t launch_rows(void (*warp_per_row_kernel)(Args), void (*block_per_row_kernel)(Args),
                        const Args& a, cudaStream_t stream) {
  LaunchShape shape;
  const cudaError_t err = launch_shape(a.rows, a.vocab, &shape);
  if (err != cudaSuccess) return err;
  auto kernel = shape.warp_per_row ? warp_per_row_kernel : block_per_row_kernel;
  FASTLLM_LAUNCH_KERNEL(kernel, shape.blocks, shape.threads, 0, stream, a);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  FwdArgs<T> a;
  static_cast<RowArgs<T>&>(a) = row_args<T>(p);
  a.loss = static_cast<float*>(p.loss);
  a.lse = static_cast<float*>(p.lse);
  a.correct = p.correct;
  return launch_rows(cross_entropy_fwd_kernel<T, true>, cross_entropy_fwd_kernel<T, false>, a,
                     stream);
}

template <class T>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  BwdArgs<T> a;
  static_cast<RowArgs<T>&>(a) = row_args<T>(p);
  a.grad_loss = static_cast<const float*>(p.grad_loss);
  a.grad_loss_stride = p.grad_loss_stride;
  a.lse = static_cast<const float*>(p.lse);
  a.grad_logits = static_cast<T*>(p.grad_logits);
  a.grad_row_stride = p.grad_row_stride;
  // Row i of both tensors has the same offset from a 16-byte boundary for every i iff the
  // base addresses and the row strides (in bytes) agree modulo 16.
  const uintptr_t base_gap =
      reinterpret_cast<uintptr_t>(p.logits) - reinterpret_cast<uintptr_t>(p.grad_logits);
  const int64_t stride_gap =
      (p.logits_row_stride - p.grad_row_stride) * static_cast<int64_t>(sizeof(T));
  a.vectorized = base_gap % kAccessBytes == 0 && stride_gap % kAccessBytes == 0;
  return launch_rows(cross_entropy_bwd_kernel<T, true>, cross_entropy_bwd_kernel<T, false>, a,
                     stream);
}

}  // namespace

cudaError_t launch_cross_entropy_fwd_cuda(const FwdParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.vocab < 1 || p.vocab > kMaxCudaVocab || p.logits == nullptr || p.target == nullptr ||
      p.loss == nullptr || p.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch_cuda_dtype(p.dtype, [&](auto type) {
    return launch_fwd<typename decltype(type)::type>(p, stream);
  });
}

cudaError_t launch_cross_entropy_bwd_cuda(const BwdParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.vocab < 1 || p.vocab > kMaxCudaVocab || p.grad_loss == nullptr || p.logits == nullptr ||
      p.target == nullptr || p.lse == nullptr || p.grad_logits == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch_cuda_dtype(p.dtype, [&](auto type) {
    return launch_bwd<typename decltype(type)::type>(p, stream);
  });
}

}  // namespace cross_entropy
}  // namespace fastllm
