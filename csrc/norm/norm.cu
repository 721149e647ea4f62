// CUDA kernels of the LayerNorm / RMSNorm family: forward (optionally fused with a residual
// add) and backward (dx, and deterministic dweight / dbias). Torch-free; the glue is
// norm_cuda_ops.cpp. The same source also builds for the host against the SIMT emulation
// (FASTLLM_SIMT_EMU), so it uses only what csrc/common/cuda_compat.h promises: launches
// through FASTLLM_LAUNCH_KERNEL, static shared arrays, barriers reached by every thread of
// the block, warp shuffles executed by all 32 lanes, no inline PTX.
//
// Math (norm.h), per row of N = cols elements, accumulated in float:
//   s = x, or round_to_dtype(x + residual) (written to residual_out; backward gets s as x)
//   layer norm: mean = sum(s)/N, var = sum((s - mean)^2)/N, rstd = 1/sqrt(var + eps),
//               y = (s - mean) * rstd * w + b
//   rms norm:   rstd = 1/sqrt(sum(s^2)/N + eps), y = s * rstd * w
//   backward, xhat = (x - mean) * rstd (rms: x * rstd), g = dy * w:
//               dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ dresidual_out]
//               (rms: no mean(g) term); dw = sum_rows(dy * xhat), db = sum_rows(dy)
//
// Variants, and why:
//   - Register kernels (cols <= 8192; table kRowBuckets): each thread keeps its slice of the
//     row in registers, so the row is read from memory once and mean / variance come from
//     two passes over registers (corrected two-pass variance). Up to 512 cols one warp owns a row (4 rows per 128-thread block,
//     reductions by warp shuffles only, no barriers); above, a block of 128..512 threads
//     owns a row (warp shuffles, then one shared-memory step).
//   - Looped kernels (cols > 8192, or cols > 1024 whose rows cannot be accessed in 16-byte
//     vectors): the row does not fit in registers. Forward: one block per row, a single
//     pass of per-thread Welford statistics merged across the block (Chan et al.), then a
//     second pass that normalises (re-reading the row, mostly from L2). Backward: a
//     row-statistics kernel (mean(g), mean(g * xhat) per row), then a column-tile kernel
//     in which each thread owns fixed columns over a chunk of rows and writes dx.
//   - dweight / dbias, deterministic and without float atomics: the rows are cut into
//     contiguous chunks, one per "partial" (a block of the register kernel, a row of blocks
//     of the column-tile kernel); each partial writes its column sums to the workspace,
//     then norm_bwd_param_grads_kernel adds the partials in a fixed order. The number of
//     partials follows num_sms (enough blocks to fill the GPU, no more), which bounds the
//     workspace and the reduction's work.
//   - Every grid whose blocks loop over rows (the forward kernels and the row-statistics
//     kernel stride over rows; the partials own chunks of rows) has at most max_blocks
//     blocks: CUDA's grid limit on a GPU; the SIMT emulation's tests lower it
//     (fastllm._emu.grid_cap) so that each block takes several rows in turn and the
//     barriers guarding shared memory from one row to the next are exercised.
//   - Vector accesses of 16 bytes (8 bf16/fp16 or 4 float per access) when every pointer is
//     16-byte aligned and cols and the row strides are multiples of the vector width
//     (checked at run time); otherwise element-wise accesses.
//
// Glossary: rows = M (product of the leading dims), cols = N (normalized size),
// T = storage dtype (float, __nv_bfloat16, __half); weight, bias, mean, rstd, dweight,
// dbias and the workspace are float. E = elements of a row per thread, VW = vector width
// in elements, "partial" = one chunk of rows whose dweight/dbias column sums are stored
// separately in the workspace: (num_partials, 2, cols) floats = {dw, db} per partial.
#include <cstdint>

#include "common/cuda_compat.h"
#include "common/cuda_utils.cuh"
#include "norm/norm_cuda.h"

namespace fastllm {
namespace norm {
namespace {

// Column indices are int; the launchers reject longer rows so index arithmetic (which
// can run up to one tile past the end of the row) never overflows.
constexpr int64_t kMaxCols = int64_t(1) << 30;
constexpr int64_t kMaxGridX = 2147483647;

// Block size of the looped kernels (one row per block).
constexpr int kLoopedThreads = 512;
constexpr int kLoopedWarps = kLoopedThreads / kWarpSize;
// Column-tile backward kernel: each thread owns kTileElemsPerThread columns of a tile.
constexpr int kTileThreads = 256;
constexpr int kTileElemsPerThread = 16;
constexpr int kTileCols = kTileThreads * kTileElemsPerThread;
// dweight/dbias partials: enough blocks for ~1024 resident threads per SM.
constexpr int kBwdThreadsPerSm = 1024;
// Partial reduction: a block adds kReduceSlices interleaved runs of partials for
// kReduceCols columns, then folds the runs in shared memory.
constexpr int kReduceCols = 32;
constexpr int kReduceSlices = 8;

// Register kernels: a row of up to max_cols elements is spread over threads_per_row
// threads holding elems_per_thread elements each. Blocks have at least 128 threads, so
// warp-per-row buckets put 4 rows in a block.
struct RowBucket {
  int max_cols;
  int elems_per_thread;
  int threads_per_row;
};
constexpr RowBucket kRowBuckets[] = {
    {128, 4, 32}, {256, 8, 32}, {512, 16, 32}, {1024, 8, 128},
    {2048, 16, 128}, {4096, 16, 256}, {8192, 16, 512},
};
constexpr int kNumRowBuckets = sizeof(kRowBuckets) / sizeof(kRowBuckets[0]);
// Register buckets up to this size also have an element-wise (unaligned) variant; larger
// unaligned rows take the looped kernels.
constexpr int kMaxScalarRegisterCols = 1024;

constexpr int row_block_threads(int threads_per_row) {
  return threads_per_row < 128 ? 128 : threads_per_row;
}
template <int kThreadsPerRow>
constexpr int kRowBlockThreads = row_block_threads(kThreadsPerRow);
// Backward register kernels: resident blocks per SM that cap a thread at 128 of the SM's
// 64K registers (see norm_bwd_registers_kernel).
template <int kBlockThreads>
constexpr int kBwdMinBlocksPerSm = 65536 / (128 * kBlockThreads);

// ---- element access (common/cuda_utils.cuh has the conversions and vector packs) ------

template <int N>
__device__ __forceinline__ void fill(float (&v)[N], float value) {
  FASTLLM_UNROLL
  for (int i = 0; i < N; ++i) v[i] = value;
}

// ---- reductions ----------------------------------------------------------------------

// Sums each of the N values over the kWarpsPerRow warps that own one row; every thread of
// the row gets the same bits. With several warps per row the block holds exactly one row
// and every thread of it must call this (it contains barriers). smem: N * kWarpsPerRow.
template <int kWarpsPerRow, int N>
__device__ __forceinline__ void row_allreduce_sum(float (&v)[N], float* smem) {
  FASTLLM_UNROLL
  for (int n = 0; n < N; ++n) v[n] = warp_allreduce_sum(v[n]);
  if constexpr (kWarpsPerRow > 1) {
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
      FASTLLM_UNROLL
      for (int n = 0; n < N; ++n) smem[n * kWarpsPerRow + warp] = v[n];
    }
    __syncthreads();
    FASTLLM_UNROLL
    for (int n = 0; n < N; ++n) {
      float total = 0.f;
      FASTLLM_UNROLL
      for (int w = 0; w < kWarpsPerRow; ++w) total += smem[n * kWarpsPerRow + w];
      v[n] = total;
    }
    __syncthreads();  // smem may be reused by the next reduction
  }
}

// Count, mean and sum of squared deviations (M2) of a set of values.
struct MeanM2 {
  float count;
  float mean;
  float m2;
};

// Chan et al.'s parallel merge of two sets' statistics; stable for any split of the data.
// delta * (delta * (a.count * b_share)): merging an empty set (a lane past the row's end)
// adds delta * 0 = 0, where (delta * delta) * 0 gave NaN once delta^2 overflowed (|mean| >
// 1.8e19 in float).
__device__ __forceinline__ MeanM2 merge_mean_m2(const MeanM2& a, const MeanM2& b) {
  const float count = a.count + b.count;
  const float b_share = count > 0.f ? b.count / count : 0.f;
  const float delta = b.mean - a.mean;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * (delta * (a.count * b_share))};
}

// Merges the statistics of every thread of the block. The merge is not commutative in
// floating point, so warps reduce onto lane 0 and every thread then merges the warps'
// results in the same order: all threads get the same bits. smem: 3 * kWarps floats.
template <int kWarps>
__device__ __forceinline__ MeanM2 block_allreduce_mean_m2(MeanM2 s, float* smem) {
  FASTLLM_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const MeanM2 other = {__shfl_down_sync(kFullWarpMask, s.count, offset),
                          __shfl_down_sync(kFullWarpMask, s.mean, offset),
                          __shfl_down_sync(kFullWarpMask, s.m2, offset)};
    s = merge_mean_m2(s, other);  // meaningful on lane 0 only
  }
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    smem[warp] = s.count;
    smem[kWarps + warp] = s.mean;
    smem[2 * kWarps + warp] = s.m2;
  }
  __syncthreads();
  MeanM2 total = {0.f, 0.f, 0.f};
  for (int w = 0; w < kWarps; ++w) {
    total = merge_mean_m2(total, {smem[w], smem[kWarps + w], smem[2 * kWarps + w]});
  }
  __syncthreads();
  return total;
}

// ---- forward -------------------------------------------------------------------------

template <class T>
struct FwdArgs {
  const T* x;
  int64_t x_row_stride;
  const T* residual;  // nullptr: no residual add
  int64_t residual_row_stride;
  const float* weight;  // nullptr: ones
  const float* bias;    // nullptr: zeros
  T* out;               // (rows, cols) contiguous
  T* residual_out;      // (rows, cols) contiguous; written iff residual != nullptr
  float* mean;          // (rows,); nullptr for rms
  float* rstd;          // (rows,)
  int64_t rows;
  int cols;
  float inv_cols;
  float eps;
  bool rms;
};

// Loads the kVecWidth elements of s at (row, col): x, or round(x + residual), which is also
// stored to residual_out.
template <int kVecWidth, class T>
__device__ __forceinline__ void load_fwd_input(const FwdArgs<T>& a, int64_t row, int col,
                                               float (&s)[kVecWidth]) {
  load_floats(a.x + row * a.x_row_stride + col, s);
  if (a.residual != nullptr) {
    float r[kVecWidth];
    load_floats(a.residual + row * a.residual_row_stride + col, r);
    FASTLLM_UNROLL
    for (int i = 0; i < kVecWidth; ++i) s[i] = to_float(from_float<T>(s[i] + r[i]));
    store_floats(a.residual_out + row * a.cols + col, s);
  }
}

// Stores y = (s - mean) * rstd * w + b for the kVecWidth elements at (row, col).
template <int kVecWidth, class T>
__device__ __forceinline__ void store_fwd_output(const FwdArgs<T>& a, int64_t row, int col,
                                                 const float (&s)[kVecWidth], float mean,
                                                 float rstd) {
  float w[kVecWidth];
  float b[kVecWidth];
  if (a.weight != nullptr) {
    load_floats(a.weight + col, w);
  } else {
    fill(w, 1.f);
  }
  if (a.bias != nullptr) {
    load_floats(a.bias + col, b);
  } else {
    fill(b, 0.f);
  }
  float y[kVecWidth];
  FASTLLM_UNROLL
  for (int i = 0; i < kVecWidth; ++i) y[i] = (s[i] - mean) * rstd * w[i] + b[i];
  store_floats(a.out + row * a.cols + col, y);
}

// Row in registers: thread t of a row holds the kVecWidth-element vectors starting at
// columns (j * kThreadsPerRow + t) * kVecWidth, j < kVecsPerThread (coalesced per j).
template <class T, int kVecWidth, int kVecsPerThread, int kThreadsPerRow>
__global__ void __launch_bounds__(kRowBlockThreads<kThreadsPerRow>)
    norm_fwd_registers_kernel(const FwdArgs<T> a) {
  constexpr int kRowsPerBlock = kRowBlockThreads<kThreadsPerRow> / kThreadsPerRow;
  constexpr int kWarpsPerRow = kThreadsPerRow / kWarpSize;
  __shared__ float reduce_smem[2 * kWarpsPerRow];
  const int thread_in_row = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int row_in_block = static_cast<int>(threadIdx.x) / kThreadsPerRow;

  // Uniform over the threads of a row, so the barriers of row_allreduce_sum are safe.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + row_in_block; row < a.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    float s[kVecsPerThread][kVecWidth];
    float sum[1] = {0.f};
    FASTLLM_UNROLL
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int col = (j * kThreadsPerRow + thread_in_row) * kVecWidth;
      if (col < a.cols) {
        load_fwd_input(a, row, col, s[j]);
      } else {
        fill(s[j], 0.f);
      }
      FASTLLM_UNROLL
      for (int i = 0; i < kVecWidth; ++i) sum[0] += a.rms ? s[j][i] * s[j][i] : s[j][i];
    }
    row_allreduce_sum<kWarpsPerRow>(sum, reduce_smem);
    float mean = 0.f;
    float var;  // rms: the mean of squares
    if (a.rms) {
      var = sum[0] * a.inv_cols;
    } else {
      // Second pass over the registers, the corrected two-pass algorithm (Chan, Golub &
      // LeVeque): var = (sum(d^2) - sum(d)^2 / N) / N with d = s - mean. The sum(d) term
      // cancels the rounding error of mean to first order (a constant row gets var = 0).
      mean = sum[0] * a.inv_cols;
      float dev[2] = {0.f, 0.f};  // sum(d^2), sum(d)
      FASTLLM_UNROLL
      for (int j = 0; j < kVecsPerThread; ++j) {
        const int col = (j * kThreadsPerRow + thread_in_row) * kVecWidth;
        if (col < a.cols) {
          FASTLLM_UNROLL
          for (int i = 0; i < kVecWidth; ++i) {
            const float d = s[j][i] - mean;
            dev[0] += d * d;
            dev[1] += d;
          }
        }
      }
      row_allreduce_sum<kWarpsPerRow>(dev, reduce_smem);
      // sum(d^2) - sum(d)^2 / N is >= 0 in exact arithmetic; rounding can take it below 0
      // (then 0). A sum(d^2) that overflowed (|x| ~ 1e19 in float; the correction may
      // overflow too) gives var = inf, hence rstd = 0, as torch's kernels give. NaN (from
      // an inf or NaN input) stays NaN, which fmaxf(NaN, 0) = 0 had turned into a
      // plausible-looking wrong row.
      float m2 = dev[0] - dev[1] * a.inv_cols * dev[1];
      if (m2 < 0.f) m2 = 0.f;
      if (dev[0] == kInf) m2 = kInf;
      var = m2 * a.inv_cols;
    }
    const float rstd = rsqrtf(var + a.eps);
    if (thread_in_row == 0) {
      if (a.mean != nullptr) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    FASTLLM_UNROLL
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int col = (j * kThreadsPerRow + thread_in_row) * kVecWidth;
      if (col < a.cols) store_fwd_output(a, row, col, s[j], mean, rstd);
    }
  }
}

// One block per row, looping over it: Welford statistics in one pass, then normalise.
template <class T, int kVecWidth>
__global__ void __launch_bounds__(kLoopedThreads) norm_fwd_looped_kernel(const FwdArgs<T> a) {
  __shared__ float reduce_smem[3 * kLoopedWarps];
  constexpr int kStride = kLoopedThreads * kVecWidth;
  const int first_col = static_cast<int>(threadIdx.x) * kVecWidth;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    MeanM2 stats = {0.f, 0.f, 0.f};
    float sum_sq[1] = {0.f};
    FASTLLM_NO_UNROLL
    for (int col = first_col; col < a.cols; col += kStride) {
      // Statistics pass: per-thread running statistics, merged vector by vector.
      float s[kVecWidth];
      load_fwd_input(a, row, col, s);
      if (a.rms) {
        FASTLLM_UNROLL
        for (int i = 0; i < kVecWidth; ++i) sum_sq[0] += s[i] * s[i];
      } else {
        // Exact two-pass statistics of the vector, then one merge per vector.
        float vec_sum = 0.f;
        FASTLLM_UNROLL
        for (int i = 0; i < kVecWidth; ++i) vec_sum += s[i];
        const float vec_mean = vec_sum * (1.f / kVecWidth);
        float vec_m2 = 0.f;
        FASTLLM_UNROLL
        for (int i = 0; i < kVecWidth; ++i) vec_m2 += (s[i] - vec_mean) * (s[i] - vec_mean);
        stats = merge_mean_m2(stats, {float(kVecWidth), vec_mean, vec_m2});
      }
    }
    float mean = 0.f;
    float var;
    if (a.rms) {
      row_allreduce_sum<kLoopedWarps>(sum_sq, reduce_smem);
      var = sum_sq[0] * a.inv_cols;
    } else {
      stats = block_allreduce_mean_m2<kLoopedWarps>(stats, reduce_smem);
      mean = stats.mean;
      var = stats.m2 * a.inv_cols;
    }
    const float rstd = rsqrtf(var + a.eps);
    if (threadIdx.x == 0) {
      if (a.mean != nullptr) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    // Normalising pass. With a residual, s is re-read from residual_out, which this very thread
    // wrote above (same columns), so no barrier is needed.
    FASTLLM_NO_UNROLL
    for (int col = first_col; col < a.cols; col += kStride) {
      float s[kVecWidth];
      if (a.residual != nullptr) {
        load_floats(a.residual_out + row * a.cols + col, s);
      } else {
        load_floats(a.x + row * a.x_row_stride + col, s);
      }
      store_fwd_output(a, row, col, s, mean, rstd);
    }
  }
}

// ---- backward ------------------------------------------------------------------------

template <class T>
struct BwdArgs {
  const T* dy;
  int64_t dy_row_stride;
  const T* dresidual_out;  // nullptr: nothing added to dx
  int64_t dresidual_out_row_stride;
  const T* x;
  int64_t x_row_stride;
  const float* weight;  // nullptr: ones
  const float* mean;    // nullptr for rms
  const float* rstd;
  T* dx;                 // (rows, cols) contiguous
  float* partials;       // (num_partials, 2, cols) or nullptr when neither dw nor db is needed
  float* row_grad_means; // looped path: (rows, 2) = mean(g), mean(g * xhat) per row
  int64_t rows;
  int64_t rows_per_partial;
  int cols;
  float inv_cols;
  bool rms;
};

// Loads x and dy at (row, col) and returns xhat = (x - mean) * rstd and dy as floats.
template <int kVecWidth, class T>
__device__ __forceinline__ void load_bwd_inputs(const BwdArgs<T>& a, int64_t row, int col,
                                                float mean, float rstd,
                                                float (&xhat)[kVecWidth],
                                                float (&dy)[kVecWidth]) {
  load_floats(a.x + row * a.x_row_stride + col, xhat);
  load_floats(a.dy + row * a.dy_row_stride + col, dy);
  FASTLLM_UNROLL
  for (int i = 0; i < kVecWidth; ++i) xhat[i] = (xhat[i] - mean) * rstd;
}

// Stores dx = rstd * (g - mean_g - xhat * mean_gxhat) [+ dresidual_out] at (row, col).
template <int kVecWidth, class T>
__device__ __forceinline__ void store_dx(const BwdArgs<T>& a, int64_t row, int col, float rstd,
                                         float mean_g, float mean_gxhat,
                                         const float (&xhat)[kVecWidth],
                                         const float (&g)[kVecWidth]) {
  float dx[kVecWidth];
  FASTLLM_UNROLL
  for (int i = 0; i < kVecWidth; ++i) dx[i] = rstd * (g[i] - mean_g - xhat[i] * mean_gxhat);
  if (a.dresidual_out != nullptr) {
    float dres[kVecWidth];
    load_floats(a.dresidual_out + row * a.dresidual_out_row_stride + col, dres);
    FASTLLM_UNROLL
    for (int i = 0; i < kVecWidth; ++i) dx[i] += dres[i];
  }
  store_floats(a.dx + row * a.cols + col, dx);
}

// Loads the weight vector at col (ones without weight or past the end of the row).
template <int kVecWidth>
__device__ __forceinline__ void load_weight(const float* weight, int col, int cols,
                                            float (&w)[kVecWidth]) {
  if (weight != nullptr && col < cols) {
    load_floats(weight + col, w);
  } else {
    fill(w, 1.f);
  }
}

// Row in registers (same layout as the forward kernel). Block b handles the contiguous
// rows [b * rows_per_partial, (b + 1) * rows_per_partial) and is partial b of dw/db: each
// thread sums dy * xhat and dy of its columns over the rows it sees, and with several rows
// per block the row groups' sums are folded in shared memory in a fixed order. The weight
// is re-read per row (an L1 hit) rather than held in registers.
// The minimum-blocks bound caps registers at 128 per thread: without it ptxas spent
// 140-255 registers on the 128-thread variants (and spilled on the element-wise E = 16 one)
// for no gain in a memory-bound kernel.
template <class T, int kVecWidth, int kVecsPerThread, int kThreadsPerRow>
__global__ void __launch_bounds__(kRowBlockThreads<kThreadsPerRow>,
                                  kBwdMinBlocksPerSm<kRowBlockThreads<kThreadsPerRow>>)
    norm_bwd_registers_kernel(const BwdArgs<T> a) {
  constexpr int kBlockThreads = kRowBlockThreads<kThreadsPerRow>;
  constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  constexpr int kWarpsPerRow = kThreadsPerRow / kWarpSize;
  constexpr int kRowCapacity = kVecsPerThread * kThreadsPerRow * kVecWidth;
  __shared__ float reduce_smem[2 * kWarpsPerRow];
  __shared__ float fold_smem[kRowsPerBlock > 1 ? 2 * kRowCapacity : 1];
  const int thread_in_row = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int row_in_block = static_cast<int>(threadIdx.x) / kThreadsPerRow;

  float dw[kVecsPerThread][kVecWidth];
  float db[kVecsPerThread][kVecWidth];
  FASTLLM_UNROLL
  for (int j = 0; j < kVecsPerThread; ++j) {
    fill(dw[j], 0.f);
    fill(db[j], 0.f);
  }

  const int64_t row_begin = int64_t(blockIdx.x) * a.rows_per_partial;
  const int64_t row_end =
      a.rows - row_begin < a.rows_per_partial ? a.rows : row_begin + a.rows_per_partial;
  // Uniform over the threads of a row, so the barriers of row_allreduce_sum are safe.
  for (int64_t row = row_begin + row_in_block; row < row_end; row += kRowsPerBlock) {
    const float mean = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float xhat[kVecsPerThread][kVecWidth];
    float g[kVecsPerThread][kVecWidth];
    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
    FASTLLM_UNROLL
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int col = (j * kThreadsPerRow + thread_in_row) * kVecWidth;
      if (col < a.cols) {
        float w[kVecWidth];
        load_weight(a.weight, col, a.cols, w);
        load_bwd_inputs(a, row, col, mean, rstd, xhat[j], g[j]);
        FASTLLM_UNROLL
        for (int i = 0; i < kVecWidth; ++i) {
          const float dy = g[j][i];
          dw[j][i] += dy * xhat[j][i];
          db[j][i] += dy;
          g[j][i] = dy * w[i];
          sums[0] += g[j][i];
          sums[1] += g[j][i] * xhat[j][i];
        }
      } else {
        fill(xhat[j], 0.f);
        fill(g[j], 0.f);
      }
    }
    row_allreduce_sum<kWarpsPerRow>(sums, reduce_smem);
    const float mean_g = a.rms ? 0.f : sums[0] * a.inv_cols;
    const float mean_gxhat = sums[1] * a.inv_cols;
    FASTLLM_UNROLL
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int col = (j * kThreadsPerRow + thread_in_row) * kVecWidth;
      if (col < a.cols) store_dx(a, row, col, rstd, mean_g, mean_gxhat, xhat[j], g[j]);
    }
  }

  if (a.partials == nullptr) return;  // uniform over the block
  float* dw_partial = a.partials + int64_t(blockIdx.x) * 2 * a.cols;
  float* db_partial = dw_partial + a.cols;
  if constexpr (kRowsPerBlock == 1) {
    FASTLLM_UNROLL
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int col = (j * kThreadsPerRow + thread_in_row) * kVecWidth;
      if (col < a.cols) {
        store_floats(dw_partial + col, dw[j]);
        store_floats(db_partial + col, db[j]);
      }
    }
  } else {
    // Row group 0's sums, + group 1's, + ...: a fixed order, so the result is deterministic.
    for (int group = 0; group < kRowsPerBlock; ++group) {
      if (row_in_block == group) {
        FASTLLM_UNROLL
        for (int j = 0; j < kVecsPerThread; ++j) {
          FASTLLM_UNROLL
          for (int i = 0; i < kVecWidth; ++i) {
            const int c = (j * kThreadsPerRow + thread_in_row) * kVecWidth + i;
            fold_smem[c] = group == 0 ? dw[j][i] : fold_smem[c] + dw[j][i];
            fold_smem[kRowCapacity + c] =
                group == 0 ? db[j][i] : fold_smem[kRowCapacity + c] + db[j][i];
          }
        }
      }
      __syncthreads();
    }
    for (int c = static_cast<int>(threadIdx.x); c < a.cols; c += kBlockThreads) {
      dw_partial[c] = fold_smem[c];
      db_partial[c] = fold_smem[kRowCapacity + c];
    }
  }
}

// Looped path, step 1: mean(g) and mean(g * xhat) of each row (one block per row).
template <class T, int kVecWidth>
__global__ void __launch_bounds__(kLoopedThreads)
    norm_bwd_row_grad_means_kernel(const BwdArgs<T> a) {
  __shared__ float reduce_smem[2 * kLoopedWarps];
  constexpr int kStride = kLoopedThreads * kVecWidth;
  const int first_col = static_cast<int>(threadIdx.x) * kVecWidth;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float mean = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
    FASTLLM_NO_UNROLL
    for (int col = first_col; col < a.cols; col += kStride) {
      float xhat[kVecWidth];
      float dy[kVecWidth];
      float w[kVecWidth];
      load_bwd_inputs(a, row, col, mean, rstd, xhat, dy);
      load_weight(a.weight, col, a.cols, w);
      FASTLLM_UNROLL
      for (int i = 0; i < kVecWidth; ++i) {
        const float g = dy[i] * w[i];
        sums[0] += g;
        sums[1] += g * xhat[i];
      }
    }
    row_allreduce_sum<kLoopedWarps>(sums, reduce_smem);
    if (threadIdx.x == 0) {
      a.row_grad_means[2 * row] = a.rms ? 0.f : sums[0] * a.inv_cols;
      a.row_grad_means[2 * row + 1] = sums[1] * a.inv_cols;
    }
  }
}

// Looped path, step 2: block (tile, chunk) writes dx for kTileCols columns of the rows
// [chunk * rows_per_partial, ...) and is partial `chunk` of dw/db for those columns.
template <class T, int kVecWidth>
__global__ void __launch_bounds__(kTileThreads) norm_bwd_column_tiles_kernel(const BwdArgs<T> a) {
  constexpr int kVecsPerThread = kTileElemsPerThread / kVecWidth;
  const int tile_begin = static_cast<int>(blockIdx.x) * kTileCols;
  const int thread = static_cast<int>(threadIdx.x);

  float w[kVecsPerThread][kVecWidth];
  float dw[kVecsPerThread][kVecWidth];
  float db[kVecsPerThread][kVecWidth];
  FASTLLM_UNROLL
  for (int j = 0; j < kVecsPerThread; ++j) {
    load_weight(a.weight, tile_begin + (j * kTileThreads + thread) * kVecWidth, a.cols, w[j]);
    fill(dw[j], 0.f);
    fill(db[j], 0.f);
  }

  const int64_t row_begin = int64_t(blockIdx.y) * a.rows_per_partial;
  const int64_t row_end =
      a.rows - row_begin < a.rows_per_partial ? a.rows : row_begin + a.rows_per_partial;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float mean = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    const float mean_g = a.row_grad_means[2 * row];
    const float mean_gxhat = a.row_grad_means[2 * row + 1];
    FASTLLM_UNROLL
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int col = tile_begin + (j * kTileThreads + thread) * kVecWidth;
      if (col < a.cols) {
        float xhat[kVecWidth];
        float g[kVecWidth];
        load_bwd_inputs(a, row, col, mean, rstd, xhat, g);
        FASTLLM_UNROLL
        for (int i = 0; i < kVecWidth; ++i) {
          const float dy = g[i];
          dw[j][i] += dy * xhat[i];
          db[j][i] += dy;
          g[i] = dy * w[j][i];
        }
        store_dx(a, row, col, rstd, mean_g, mean_gxhat, xhat, g);
      }
    }
  }

  if (a.partials == nullptr) return;
  float* dw_partial = a.partials + int64_t(blockIdx.y) * 2 * a.cols;
  float* db_partial = dw_partial + a.cols;
  FASTLLM_UNROLL
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int col = tile_begin + (j * kTileThreads + thread) * kVecWidth;
    if (col < a.cols) {
      store_floats(dw_partial + col, dw[j]);
      store_floats(db_partial + col, db[j]);
    }
  }
}

// dweight[c] = sum_p partials[p][0][c], dbias[c] = sum_p partials[p][1][c], in a fixed
// order: slice s adds partials s, s + kReduceSlices, ...; then the slices are added in order.
__global__ void __launch_bounds__(kReduceCols * kReduceSlices)
    norm_bwd_param_grads_kernel(const float* partials, int64_t num_partials, int cols,
                                float* dweight, float* dbias) {
  __shared__ float dw_smem[kReduceSlices][kReduceCols];
  __shared__ float db_smem[kReduceSlices][kReduceCols];
  const int lane = static_cast<int>(threadIdx.x) % kReduceCols;
  const int slice = static_cast<int>(threadIdx.x) / kReduceCols;
  const int col = static_cast<int>(blockIdx.x) * kReduceCols + lane;
  float dw = 0.f;
  float db = 0.f;
  if (col < cols) {
    for (int64_t p = slice; p < num_partials; p += kReduceSlices) {
      const float* partial = partials + p * 2 * cols;
      dw += partial[col];
      db += partial[cols + col];
    }
  }
  dw_smem[slice][lane] = dw;
  db_smem[slice][lane] = db;
  __syncthreads();
  if (slice == 0 && col < cols) {
    FASTLLM_UNROLL
    for (int s = 1; s < kReduceSlices; ++s) {
      dw += dw_smem[s][lane];
      db += db_smem[s][lane];
    }
    if (dweight != nullptr) dweight[col] = dw;
    if (dbias != nullptr) dbias[col] = db;
  }
}

// ---- host side -----------------------------------------------------------------------

int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

// A grid of `blocks` blocks that loop over rows, at most max_blocks (CUDA's limit, or the
// emulation's test cap): with fewer blocks each one loops over more rows.
unsigned grid_x(int64_t blocks, int64_t max_blocks) {
  return static_cast<unsigned>(min_i64(blocks, min_i64(max_blocks, kMaxGridX)));
}

// 16-byte alignment covers every access width used (<= 16 bytes), and the row starts
// stay aligned when strides and cols are multiples of the vector width.
bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Index into kRowBuckets of the register kernel for cols, or -1 (looped kernels).
int row_bucket_index(int64_t cols) {
  for (int i = 0; i < kNumRowBuckets; ++i) {
    if (cols <= kRowBuckets[i].max_cols) return i;
  }
  return -1;
}

template <int kIndex>
struct RowBucketTag {
  static constexpr RowBucket value = kRowBuckets[kIndex];
};

// Calls f(RowBucketTag<index>{}) so f can instantiate the bucket's kernel.
template <class F>
cudaError_t with_row_bucket(int index, F&& f) {
  static_assert(kNumRowBuckets == 7, "update the switch below with kRowBuckets");
  switch (index) {
    case 0: return f(RowBucketTag<0>{});
    case 1: return f(RowBucketTag<1>{});
    case 2: return f(RowBucketTag<2>{});
    case 3: return f(RowBucketTag<3>{});
    case 4: return f(RowBucketTag<4>{});
    case 5: return f(RowBucketTag<5>{});
    default: return f(RowBucketTag<6>{});
  }
}

// How the backward pass cuts the rows into partials.
struct BwdPartition {
  int64_t num_partials;
  int64_t rows_per_partial;
};

BwdPartition partition_rows(int64_t rows, int64_t max_partials) {
  const int64_t rows_per_partial = ceil_div(rows, max_i64(1, min_i64(rows, max_partials)));
  return {ceil_div(rows, rows_per_partial), rows_per_partial};
}

// The partitions have at most max_blocks partials (a partial is a block, or a row of blocks).
BwdPartition registers_partition(int64_t rows, int bucket_index, int num_sms,
                                 int64_t max_blocks) {
  const RowBucket& b = kRowBuckets[bucket_index];
  const int block_threads = row_block_threads(b.threads_per_row);
  const int rows_per_block = block_threads / b.threads_per_row;
  const int64_t resident = int64_t(num_sms) * (kBwdThreadsPerSm / block_threads);
  return partition_rows(
      rows, min_i64(min_i64(ceil_div(rows, rows_per_block), resident), max_blocks));
}

BwdPartition column_tiles_partition(int64_t rows, int64_t cols, int num_sms,
                                    int64_t max_blocks) {
  const int64_t tiles = ceil_div(cols, kTileCols);
  const int64_t blocks = int64_t(num_sms) * (kBwdThreadsPerSm / kTileThreads);
  return partition_rows(rows, min_i64(ceil_div(blocks, tiles), max_blocks));
}

// Floats of the looped path's workspace that hold the partials (row_grad_means follow).
int64_t column_tiles_partial_floats(int64_t rows, int64_t cols, int num_sms,
                                    int64_t max_blocks) {
  return column_tiles_partition(rows, cols, num_sms, max_blocks).num_partials * 2 * cols;
}

template <class T>
FwdArgs<T> make_fwd_args(const FwdParams& p) {
  FwdArgs<T> a;
  a.x = static_cast<const T*>(p.x);
  a.x_row_stride = p.x_row_stride;
  a.residual = static_cast<const T*>(p.residual);
  a.residual_row_stride = p.residual_row_stride;
  a.weight = static_cast<const float*>(p.weight);
  a.bias = static_cast<const float*>(p.bias);
  a.out = static_cast<T*>(p.out);
  a.residual_out = static_cast<T*>(p.residual_out);
  a.mean = static_cast<float*>(p.mean);
  a.rstd = static_cast<float*>(p.rstd);
  a.rows = p.rows;
  a.cols = static_cast<int>(p.cols);
  a.inv_cols = 1.f / static_cast<float>(p.cols);
  a.eps = static_cast<float>(p.eps);
  a.rms = p.rms;
  return a;
}

template <class T>
bool fwd_vectorizable(const FwdArgs<T>& a, int vec_width) {
  const bool has_residual = a.residual != nullptr;
  return a.cols % vec_width == 0 && a.x_row_stride % vec_width == 0 && aligned_16(a.x) &&
         aligned_16(a.out) && aligned_16(a.weight) && aligned_16(a.bias) &&
         (!has_residual || (a.residual_row_stride % vec_width == 0 && aligned_16(a.residual) &&
                            aligned_16(a.residual_out)));
}

template <class T>
cudaError_t launch_fwd_looped(const FwdArgs<T>& a, int64_t max_blocks, cudaStream_t stream) {
  constexpr int kVecWidth = kMaxVecWidth<T>;
  const unsigned grid = grid_x(a.rows, max_blocks);
  if (fwd_vectorizable(a, kVecWidth)) {
    auto kernel = norm_fwd_looped_kernel<T, kVecWidth>;
    FASTLLM_LAUNCH_KERNEL(kernel, grid, kLoopedThreads, 0, stream, a);
  } else {
    auto kernel = norm_fwd_looped_kernel<T, 1>;
    FASTLLM_LAUNCH_KERNEL(kernel, grid, kLoopedThreads, 0, stream, a);
  }
  return cudaGetLastError();
}

template <class T, int kElemsPerThread, int kThreadsPerRow>
cudaError_t launch_fwd_registers(const FwdArgs<T>& a, int64_t max_blocks, cudaStream_t stream) {
  constexpr int kVecWidth =
      kElemsPerThread < kMaxVecWidth<T> ? kElemsPerThread : kMaxVecWidth<T>;
  constexpr int kBlockThreads = kRowBlockThreads<kThreadsPerRow>;
  const unsigned grid = grid_x(ceil_div(a.rows, kBlockThreads / kThreadsPerRow), max_blocks);
  if (fwd_vectorizable(a, kVecWidth)) {
    auto kernel =
        norm_fwd_registers_kernel<T, kVecWidth, kElemsPerThread / kVecWidth, kThreadsPerRow>;
    FASTLLM_LAUNCH_KERNEL(kernel, grid, kBlockThreads, 0, stream, a);
  } else if constexpr (kElemsPerThread * kThreadsPerRow <= kMaxScalarRegisterCols) {
    auto kernel = norm_fwd_registers_kernel<T, 1, kElemsPerThread, kThreadsPerRow>;
    FASTLLM_LAUNCH_KERNEL(kernel, grid, kBlockThreads, 0, stream, a);
  } else {
    return launch_fwd_looped(a, max_blocks, stream);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_fwd(const FwdParams& p, int64_t max_blocks, cudaStream_t stream) {
  const FwdArgs<T> a = make_fwd_args<T>(p);
  const int bucket = row_bucket_index(p.cols);
  if (bucket < 0) return launch_fwd_looped(a, max_blocks, stream);
  return with_row_bucket(bucket, [&](auto tag) {
    constexpr RowBucket b = decltype(tag)::value;
    return launch_fwd_registers<T, b.elems_per_thread, b.threads_per_row>(a, max_blocks, stream);
  });
}

template <class T>
BwdArgs<T> make_bwd_args(const BwdParams& p) {
  BwdArgs<T> a;
  a.dy = static_cast<const T*>(p.dy);
  a.dy_row_stride = p.dy_row_stride;
  a.dresidual_out = static_cast<const T*>(p.dresidual_out);
  a.dresidual_out_row_stride = p.dresidual_out_row_stride;
  a.x = static_cast<const T*>(p.x);
  a.x_row_stride = p.x_row_stride;
  a.weight = static_cast<const float*>(p.weight);
  a.mean = static_cast<const float*>(p.mean);
  a.rstd = static_cast<const float*>(p.rstd);
  a.dx = static_cast<T*>(p.dx);
  a.partials = p.dweight != nullptr || p.dbias != nullptr ? p.workspace : nullptr;
  a.row_grad_means = nullptr;
  a.rows = p.rows;
  a.rows_per_partial = p.rows;
  a.cols = static_cast<int>(p.cols);
  a.inv_cols = 1.f / static_cast<float>(p.cols);
  a.rms = p.rms;
  return a;
}

template <class T>
bool bwd_vectorizable(const BwdArgs<T>& a, int vec_width) {
  const bool has_dresidual = a.dresidual_out != nullptr;
  return a.cols % vec_width == 0 && a.dy_row_stride % vec_width == 0 &&
         a.x_row_stride % vec_width == 0 && aligned_16(a.dy) && aligned_16(a.x) &&
         aligned_16(a.dx) && aligned_16(a.weight) && aligned_16(a.partials) &&
         (!has_dresidual ||
          (a.dresidual_out_row_stride % vec_width == 0 && aligned_16(a.dresidual_out)));
}

// Adds the partials into dweight / dbias (when requested).
cudaError_t launch_param_grads(const BwdParams& p, int64_t num_partials, cudaStream_t stream) {
  if (p.dweight == nullptr && p.dbias == nullptr) return cudaSuccess;
  const int cols = static_cast<int>(p.cols);
  // One block per kReduceCols columns: these blocks do not loop over rows, so no cap.
  const unsigned grid = grid_x(ceil_div(cols, kReduceCols), kMaxGridX);
  FASTLLM_LAUNCH_KERNEL(norm_bwd_param_grads_kernel, grid,
                        kReduceCols * kReduceSlices, 0, stream, p.workspace, num_partials, cols,
                        static_cast<float*>(p.dweight), static_cast<float*>(p.dbias));
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_bwd_looped(const BwdParams& p, BwdArgs<T> a, int num_sms, int64_t max_blocks,
                              cudaStream_t stream) {
  constexpr int kVecWidth = kMaxVecWidth<T>;
  const BwdPartition part = column_tiles_partition(p.rows, p.cols, num_sms, max_blocks);
  a.rows_per_partial = part.rows_per_partial;
  a.row_grad_means =
      p.workspace + column_tiles_partial_floats(p.rows, p.cols, num_sms, max_blocks);
  const unsigned row_grid = grid_x(a.rows, max_blocks);
  const dim3 tile_grid(static_cast<unsigned>(ceil_div(a.cols, kTileCols)),
                       static_cast<unsigned>(part.num_partials));
  if (bwd_vectorizable(a, kVecWidth)) {
    auto row_kernel = norm_bwd_row_grad_means_kernel<T, kVecWidth>;
    auto tile_kernel = norm_bwd_column_tiles_kernel<T, kVecWidth>;
    FASTLLM_LAUNCH_KERNEL(row_kernel, row_grid, kLoopedThreads, 0, stream, a);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    FASTLLM_LAUNCH_KERNEL(tile_kernel, tile_grid, kTileThreads, 0, stream, a);
  } else {
    auto row_kernel = norm_bwd_row_grad_means_kernel<T, 1>;
    auto tile_kernel = norm_bwd_column_tiles_kernel<T, 1>;
    FASTLLM_LAUNCH_KERNEL(row_kernel, row_grid, kLoopedThreads, 0, stream, a);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    FASTLLM_LAUNCH_KERNEL(tile_kernel, tile_grid, kTileThreads, 0, stream, a);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_param_grads(p, part.num_partials, stream);
}

template <class T, int kElemsPerThread, int kThreadsPerRow>
cudaError_t launch_bwd_registers(const BwdParams& p, BwdArgs<T> a, int bucket, int num_sms,
                                 int64_t max_blocks, cudaStream_t stream) {
  constexpr int kVecWidth =
      kElemsPerThread < kMaxVecWidth<T> ? kElemsPerThread : kMaxVecWidth<T>;
  constexpr int kBlockThreads = kRowBlockThreads<kThreadsPerRow>;
  const BwdPartition part = registers_partition(p.rows, bucket, num_sms, max_blocks);
  a.rows_per_partial = part.rows_per_partial;
  const unsigned grid = static_cast<unsigned>(part.num_partials);
  if (bwd_vectorizable(a, kVecWidth)) {
    auto kernel =
        norm_bwd_registers_kernel<T, kVecWidth, kElemsPerThread / kVecWidth, kThreadsPerRow>;
    FASTLLM_LAUNCH_KERNEL(kernel, grid, kBlockThreads, 0, stream, a);
  } else if constexpr (kElemsPerThread * kThreadsPerRow <= kMaxScalarRegisterCols) {
    auto kernel = norm_bwd_registers_kernel<T, 1, kElemsPerThread, kThreadsPerRow>;
    FASTLLM_LAUNCH_KERNEL(kernel, grid, kBlockThreads, 0, stream, a);
  } else {
    return launch_bwd_looped(p, a, num_sms, max_blocks, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_param_grads(p, part.num_partials, stream);
}

template <class T>
cudaError_t launch_bwd(const BwdParams& p, int num_sms, int64_t max_blocks, cudaStream_t stream) {
  const BwdArgs<T> a = make_bwd_args<T>(p);
  const int bucket = row_bucket_index(p.cols);
  if (bucket < 0) return launch_bwd_looped(p, a, num_sms, max_blocks, stream);
  return with_row_bucket(bucket, [&](auto tag) {
    constexpr RowBucket b = decltype(tag)::value;
    return launch_bwd_registers<T, b.elems_per_thread, b.threads_per_row>(
        p, a, bucket, num_sms, max_blocks, stream);
  });
}

}  // namespace

int64_t norm_bwd_cuda_workspace_floats(int64_t rows, int64_t cols, int num_sms,
                                       int64_t max_blocks) {
  if (rows <= 0 || cols <= 0) return 0;
  num_sms = num_sms < 1 ? 1 : num_sms;
  max_blocks = max_blocks < 1 ? 1 : max_blocks;
  int64_t floats = 0;
  const int bucket = row_bucket_index(cols);
  if (bucket >= 0) {
    floats = registers_partition(rows, bucket, num_sms, max_blocks).num_partials * 2 * cols;
  }
  // Rows above kMaxScalarRegisterCols take the looped path when they are not aligned.
  if (cols > kMaxScalarRegisterCols) {
    floats = max_i64(
        floats, column_tiles_partial_floats(rows, cols, num_sms, max_blocks) + 2 * rows);
  }
  return floats;
}

cudaError_t launch_norm_fwd_cuda(const FwdParams& p, int64_t max_blocks, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  if (p.cols > kMaxCols || p.x == nullptr || p.out == nullptr || p.rstd == nullptr ||
      (!p.rms && p.mean == nullptr) || (p.residual != nullptr && p.residual_out == nullptr)) {
    return cudaErrorInvalidValue;
  }
  max_blocks = max_blocks < 1 ? 1 : max_blocks;
  return dispatch_cuda_dtype(p.dtype, [&](auto type) {
    return launch_fwd<typename decltype(type)::type>(p, max_blocks, stream);
  });
}

cudaError_t launch_norm_bwd_cuda(const BwdParams& p, int num_sms, int64_t max_blocks,
                                 cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  if (p.cols > kMaxCols || p.dy == nullptr || p.x == nullptr || p.rstd == nullptr ||
      p.dx == nullptr || (!p.rms && p.mean == nullptr) || p.workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  num_sms = num_sms < 1 ? 1 : num_sms;
  max_blocks = max_blocks < 1 ? 1 : max_blocks;
  return dispatch_cuda_dtype(p.dtype, [&](auto type) {
    return launch_bwd<typename decltype(type)::type>(p, num_sms, max_blocks, stream);
  });
}

}  // namespace norm
}  // namespace fastllm
