// Building blocks shared by the CUDA FlashAttention-2 kernels (attention_fwd.cuh,
// attention_bwd.cuh): per-sequence offsets, the score modifications and mask of
// attention.h, global -> shared tile copies, and tensor-core fragment loads.
//
// Tensor cores only through csrc/common/mma.h (mma.sync m16n8k16, ldmatrix, cp.async), so
// the same source runs on sm_80+ and, in the tests, under the SIMT emulation on the CPU.
//
// Tiles in shared memory are row-major, `rows x kHeadDim` 16-bit elements, with a row pitch
// of kHeadDim + 8 elements: the 16 padding bytes shift consecutive rows by 4 banks, so the
// 8 row addresses of one ldmatrix matrix hit 8 different 16-byte bank groups (no conflicts)
// for every head dim that is a multiple of 16 (kHeadDim / 8 + 1 is odd).
//
// Fragment vocabulary (mma.h has the PTX layouts): a warp computes 16 x 8 output tiles
// ("n-tiles"); C/D element e of lane (g = lane / 4, t = lane % 4) is at row g + 8 * (e / 2),
// column 2t + e % 2. Two adjacent n-tiles of C, rounded to 16 bits, are exactly an A
// fragment of a 16 x 16 tile, which is how P (and dS) feed the second matrix product
// without a trip through shared memory (the FlashAttention-2 register reuse).
//
// Glossary: B batch, H / Hkv query / kv heads, D head dim (runtime; kHeadDim the kernel's
// compiled tile width, D <= kHeadDim, D % 8 == 0: columns D..kHeadDim-1 are zero-filled),
// Tq_b / Tk_b this sequence's query / key counts, i query row, j key, T element type.
#pragma once

#include <cstdint>

#include "attention/attention.h"
#include "common/cuda_compat.h"
#include "common/cuda_utils.cuh"
#include "common/mma.h"

namespace fastllm {
namespace attention {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
// 16-byte copies: 8 elements of a 16-bit type.
constexpr int kChunkElems = 8;

// Row pitch (elements) of a shared tile with kHeadDim columns; see the file comment.
template <int kHeadDim>
constexpr int smem_pitch() {
  return kHeadDim + 8;
}

// ---- per-sequence geometry ------------------------------------------------------------

// Where sequence b lives and how long it is (attention.h, "Per-sequence lengths").
struct SeqInfo {
  int64_t q_row0 = 0;    // first packed query row (0 for padded batches)
  int64_t k_row0 = 0;    // first packed key row
  int seqlen_q = 0;      // Tq_b
  int seqlen_k = 0;      // Tk_b: keys used (seqused_k wins)
  int keys_stored = 0;   // keys the tensors hold for b (>= Tk_b; their gradients are
                         // zero beyond Tk_b)
};

// The rows [first, first + length) of sequence b in a packed tensor of `total` rows, from
// cu_seqlens clamped to the tensor and to the longest sequence `max_len` (Problem::total_q).
__device__ __forceinline__ void packed_rows(const int32_t* cu_seqlens, int b, int64_t total,
                                            int64_t max_len, int64_t* first, int* length) {
  const int64_t start = min(max(static_cast<int64_t>(cu_seqlens[b]), int64_t(0)), total);
  const int64_t end = min(max(static_cast<int64_t>(cu_seqlens[b + 1]), start), total);
  *first = start;
  *length = static_cast<int>(min(end - start, max_len));
}

__device__ __forceinline__ SeqInfo sequence_info(const Problem& p, int b) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    packed_rows(p.cu_seqlens_q, b, p.total_q, p.seqlen_q, &s.q_row0, &s.seqlen_q);
  } else {
    s.seqlen_q = static_cast<int>(p.seqlen_q);
  }
  if (p.cu_seqlens_k != nullptr) {
    packed_rows(p.cu_seqlens_k, b, p.total_k, p.seqlen_k, &s.k_row0, &s.seqlen_k);
  } else {
    s.seqlen_k = static_cast<int>(p.seqlen_k);
  }
  s.keys_stored = s.seqlen_k;
  if (p.seqused_k != nullptr) s.seqlen_k = min(max(p.seqused_k[b], 0), s.keys_stored);
  return s;
}

// Element offset of row 0 of (b, head) in a (B, T, heads, D) tensor.
__device__ __forceinline__ int64_t head_offset(const Strides4& st, bool packed, int64_t row0,
                                               int b, int head) {
  return (packed ? row0 * st.t : static_cast<int64_t>(b) * st.b) +
         static_cast<int64_t>(head) * st.h;
}

// Offset of row 0 of (b, h) in lse-shaped arrays (lse and backward's D_i workspace).
__device__ __forceinline__ int64_t lse_offset(const Problem& p, const SeqInfo& s, int b,
                                              int h) {
  return static_cast<int64_t>(b) * p.lse_stride_b + static_cast<int64_t>(h) * p.lse_stride_h +
         s.q_row0;
}

// ---- scores and mask ------------------------------------------------------------------

// The score of one (query i, key j) pair of one (b, h) and whether j is allowed for i, as
// attention.h defines them; positions are inside the sequence.
struct ScoreMod {
  float scale;        // softmax_scale
  float softcap;      // 0 = off
  float inv_softcap;  // 1 / softcap
  float alibi_slope;  // 0 = off; bias -slope * |i + diag - j|
  int diag;           // Tk_b - Tq_b (bottom-right alignment)
  int seqlen_k;       // Tk_b
  int window_left;    // -1 = unbounded
  int window_right;   // -1 = unbounded; causal already folded in

  __device__ __forceinline__ bool allowed(int i, int j) const {
    return j < seqlen_k && (window_left < 0 || j >= i + diag - window_left) &&
           (window_right < 0 || j <= i + diag + window_right);
  }

  // s_ij from the dot product <q_i, k_j>, without the mask (for tiles that lie inside the
  // allowed region). cap_grad receives the derivative of the soft cap (1 - tanh^2; 1
  // without softcap), which backward needs.
  __device__ __forceinline__ float score_unmasked(float dot, int i, int j,
                                                  float& cap_grad) const {
    float s = dot * scale;
    cap_grad = 1.f;
    if (softcap > 0.f) {
      const float th = tanhf(s * inv_softcap);
      s = softcap * th;
      cap_grad = 1.f - th * th;
    }
    if (alibi_slope != 0.f) s -= alibi_slope * fabsf(static_cast<float>(i + diag - j));
    return s;
  }
  // The same, -inf when j is masked for i.
  __device__ __forceinline__ float score(float dot, int i, int j, float& cap_grad) const {
    const float s = score_unmasked(dot, i, j, cap_grad);
    return allowed(i, j) ? s : -kInf;
  }

  // Allowed keys of the query rows [i_first, i_last]: [*j_min, *j_max] (empty when
  // j_max < j_min). lo(i) and hi(i) grow with i.
  __device__ __forceinline__ void key_range(int i_first, int i_last, int& j_min,
                                            int& j_max) const {
    j_min = window_left < 0 ? 0 : max(0, i_first + diag - window_left);
    j_max = window_right < 0 ? seqlen_k - 1 : min(seqlen_k - 1, i_last + diag + window_right);
  }
  // Query rows in [0, seqlen_q) that allow some key of [j_first, j_last].
  __device__ __forceinline__ void query_range(int j_first, int j_last, int seqlen_q,
                                              int& i_min, int& i_max) const {
    i_min = window_right < 0 ? 0 : max(0, j_first - diag - window_right);
    i_max = window_left < 0 ? seqlen_q - 1 : min(seqlen_q - 1, j_last - diag + window_left);
  }
  // True unless every pair of rows [i_first, i_last] x keys [j_first, j_last] is allowed
  // (then the tile skips the per-element mask).
  __device__ __forceinline__ bool tile_needs_mask(int i_first, int i_last, int j_first,
                                                  int j_last) const {
    return j_last >= seqlen_k || (window_left >= 0 && j_first < i_last + diag - window_left) ||
           (window_right >= 0 && j_last > i_first + diag + window_right);
  }
};

__device__ __forceinline__ ScoreMod make_score_mod(const Problem& p, const SeqInfo& s, int b,
                                                   int h) {
  ScoreMod m;
  m.scale = static_cast<float>(p.softmax_scale);
  m.softcap = static_cast<float>(p.softcap);
  m.inv_softcap = p.softcap > 0 ? static_cast<float>(1.0 / p.softcap) : 0.f;
  m.alibi_slope =
      p.alibi_slopes != nullptr ? p.alibi_slopes[static_cast<int64_t>(b) * p.alibi_stride_b + h]
                                : 0.f;
  m.diag = s.seqlen_k - s.seqlen_q;
  m.seqlen_k = s.seqlen_k;
  m.window_left = static_cast<int>(p.window_left < 0 ? -1 : p.window_left);
  int right = static_cast<int>(p.window_right < 0 ? -1 : p.window_right);
  if (p.causal) right = right < 0 ? 0 : min(right, 0);
  m.window_right = right;
  return m;
}

// ---- attn_bias and key_padding_mask (attention.h; padded batches only) -----------------
// Both are read straight from global memory, per element of the accumulator fragments (each
// thread knows the (i, j) of its elements, as for the mask above), only by the kernels'
// kMasks = true instantiation (chosen at launch by has_masks), so problems without them run
// the code and register allocation they always had (a runtime branch in one kernel raised
// the register count past an occupancy step in forward and spilled in dq at D = 256). Inside
// it, the bias and the mask are runtime options. The bias is added after softcap and ALiBi,
// then the mask sets -inf.

// Whether any of the two optional inputs is given.
__host__ __device__ __forceinline__ bool has_masks(const Problem& p) {
  return p.attn_bias != nullptr || p.key_padding_mask != nullptr;
}

// Whether key j takes part for sequence b: j < Tk_b and, with a key padding mask, its byte is
// nonzero (read only for j < Tk_b, so never past the mask).
__device__ __forceinline__ bool key_takes_part(const Problem& p, int b, int seqlen_k, int j) {
  return j < seqlen_k &&
         (p.key_padding_mask == nullptr ||
          p.key_padding_mask[static_cast<int64_t>(b) * p.kpm_stride_b +
                             static_cast<int64_t>(j) * p.kpm_stride_k] != 0);
}

// Row 0 of the bias of (b, query head h); element (i, j) at [i * bias_stride_q +
// j * bias_stride_k]. Callers clamp i to [0, Tq) and j to [0, Tk) (the padding rows and
// columns of a tile read a valid element whose value the mask or lse discards).
template <class T>
__device__ __forceinline__ const T* bias_of_head(const Problem& p, int b, int h) {
  return static_cast<const T*>(p.attn_bias) + static_cast<int64_t>(b) * p.bias_stride_b +
         static_cast<int64_t>(h) * p.bias_stride_h;
}
__device__ __forceinline__ int64_t bias_row_offset(const Problem& p, int i) {
  return static_cast<int64_t>(min(i, static_cast<int>(p.seqlen_q) - 1)) * p.bias_stride_q;
}
__device__ __forceinline__ int64_t bias_col_offset(const Problem& p, int j) {
  return static_cast<int64_t>(min(j, static_cast<int>(p.seqlen_k) - 1)) * p.bias_stride_k;
}

// The first key block n' in [n, n_last] (kBlockN keys each) with a key that takes part
// (key_takes_part), else n_last + 1; n itself without a key padding mask (no barrier then;
// no code at all with kMasks = false).
// With one: one __syncthreads_or per block looked at, so every thread of the block must call
// it, and all get the same answer. Fully padded key blocks are skipped this way (their
// probabilities are exactly 0, so the results are the same bits).
template <int kBlockN, int kThreads, bool kMasks>
__device__ __forceinline__ int next_live_key_block(const Problem& p, int b, int seqlen_k, int n,
                                                   int n_last) {
  if constexpr (kMasks) {
    if (p.key_padding_mask == nullptr) return n;
    for (; n <= n_last; ++n) {
      bool live = false;
      for (int c = threadIdx.x; c < kBlockN; c += kThreads) {
        live = live || key_takes_part(p, b, seqlen_k, n * kBlockN + c);
      }
      if (__syncthreads_or(live)) break;
    }
  }
  return n;
}

// ---- element conversion ---------------------------------------------------------------

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- global <-> shared tiles ----------------------------------------------------------

// Asynchronously copies rows [0, kRows) x columns [0, kHeadDim) of a tile whose row r
// starts at gmem + r * row_stride into `smem` (pitch smem_pitch<kHeadDim>()), by all
// kThreads threads. Rows >= valid_rows and columns >= head_dim are zero-filled (the copy
// reads nothing there), so padded rows and columns contribute nothing to dot products.
template <int kRows, int kHeadDim, int kThreads, class T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride,
                                                int valid_rows, int head_dim) {
  constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
  FASTLLM_UNROLL
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kChunkElems;
    const bool valid = row < valid_rows && col < head_dim;
    // An invalid copy reads nothing, but still names a mapped address.
    const T* src = valid ? gmem + row * row_stride + col : gmem;
    cp_async_16(smem + row * smem_pitch<kHeadDim>() + col, src, valid);
  }
}

// Writes a warp's 16 x kCols fp32 accumulator (n-tiles of 8 columns, C layout), times
// `scale`, as T to columns [col0, col0 + kCols) of 16 rows: through the same columns of the
// warp's 16 rows of a shared tile (`smem_rows`, pitch smem_pitch<kHeadDim>(), which no other
// warp touches at those columns), then to global memory in 16-byte stores of the valid rows
// and columns (< head_dim).
template <int kHeadDim, int kCols, class T>
__device__ __forceinline__ void store_warp_rows(const float (&acc)[kCols / 8][4], float scale,
                                                T* smem_rows, T* gmem, int64_t row_stride,
                                                int valid_rows, int col0, int head_dim) {
  constexpr int kPitch = smem_pitch<kHeadDim>();
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  __syncwarp();  // every lane is done reading these rows as an mma operand
  FASTLLM_UNROLL
  for (int nt = 0; nt < kCols / 8; ++nt) {
    const int col = col0 + nt * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(smem_rows + g * kPitch + col) =
        pack2<T>(acc[nt][0] * scale, acc[nt][1] * scale);
    *reinterpret_cast<uint32_t*>(smem_rows + (g + 8) * kPitch + col) =
        pack2<T>(acc[nt][2] * scale, acc[nt][3] * scale);
  }
  __syncwarp();
  constexpr int kChunksPerRow = kCols / kChunkElems;
  FASTLLM_UNROLL
  for (int c = lane; c < 16 * kChunksPerRow; c += kWarpSize) {
    const int row = c / kChunksPerRow;
    const int col = col0 + (c % kChunksPerRow) * kChunkElems;
    if (row < valid_rows && col < head_dim) {
      *reinterpret_cast<uint4*>(gmem + row * row_stride + col) =
          *reinterpret_cast<const uint4*>(smem_rows + row * kPitch + col);
    }
  }
}

// Writes zeros to rows [row_begin, row_end) of a (rows, head_dim) slice, 16 bytes at a time,
// by all kThreads threads (rows of a query block with no allowed key at all).
template <int kHeadDim, int kThreads, class T>
__device__ __forceinline__ void store_zero_rows(T* gmem, int64_t row_stride, int rows,
                                                int head_dim) {
  constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  for (int c = threadIdx.x; c < rows * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kChunkElems;
    if (col < head_dim) *reinterpret_cast<uint4*>(gmem + row * row_stride + col) = uint4{0, 0, 0, 0};
  }
}

// ---- fragments ------------------------------------------------------------------------

// A fragment of the 16 x 16 block at (row0, col0) of a row-major shared tile.
template <int kPitch, class T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* smem, int row0, int col0) {
  const int lane = threadIdx.x % kWarpSize;
  ldmatrix_x4(a, smem + (row0 + lane % 16) * kPitch + col0 + (lane / 16) * 8);
}

// B fragments of two n-tiles (n0..n0+7, n0+8..n0+15) for k = k0..k0+15, where B[k][n] =
// M[n][k] and M is a row-major shared tile (B is M transposed: K in Q K^T).
template <int kPitch, class T>
__device__ __forceinline__ void load_b_transposed(uint32_t (&b)[2][2], const T* smem, int n0,
                                                  int k0) {
  const int lane = threadIdx.x % kWarpSize;
  const int m = lane / 8, r = lane % 8;
  uint32_t x[4];
  ldmatrix_x4(x, smem + (n0 + (m / 2) * 8 + r) * kPitch + k0 + (m % 2) * 8);
  b[0][0] = x[0];
  b[0][1] = x[1];
  b[1][0] = x[2];
  b[1][1] = x[3];
}

// B fragments of two n-tiles (n0..n0+15) for k = k0..k0+15, where B[k][n] = M[k][n] and M
// is a row-major shared tile (V in P V: ldmatrix .trans).
template <int kPitch, class T>
__device__ __forceinline__ void load_b(uint32_t (&b)[2][2], const T* smem, int k0, int n0) {
  const int lane = threadIdx.x % kWarpSize;
  const int m = lane / 8, r = lane % 8;
  uint32_t x[4];
  ldmatrix_x4_trans(x, smem + (k0 + (m % 2) * 8 + r) * kPitch + n0 + (m / 2) * 8);
  b[0][0] = x[0];
  b[0][1] = x[1];
  b[1][0] = x[2];
  b[1][1] = x[3];
}

// The A fragment of columns 16c..16c+15 of a warp's 16 x N fp32 accumulator (n-tiles 2c,
// 2c+1), rounded to T.
template <class T, int kTiles>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[kTiles][4],
                                         int c) {
  a[0] = pack2<T>(acc[2 * c][0], acc[2 * c][1]);
  a[1] = pack2<T>(acc[2 * c][2], acc[2 * c][3]);
  a[2] = pack2<T>(acc[2 * c + 1][0], acc[2 * c + 1][1]);
  a[3] = pack2<T>(acc[2 * c + 1][2], acc[2 * c + 1][3]);
}

template <int kTiles>
__device__ __forceinline__ void zero_acc(float (&acc)[kTiles][4]) {
  FASTLLM_UNROLL
  for (int i = 0; i < kTiles; ++i) {
    FASTLLM_UNROLL
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  }
}

// acc (16 x 8 * kNTiles) += A_tile (16 x kHeadDim, rows row0.. of smem_a) *
// B_tile^T (B[k][n] = smem_b[n0 + n][k], rows n0..n0 + 8 * kNTiles - 1): the S = Q K^T
// shape, contracting over the head dim.
template <class T, int kHeadDim, int kNTiles>
__device__ __forceinline__ void gemm_rows_by_rows(float (&acc)[kNTiles][4], const T* smem_a,
                                                  int row0, const T* smem_b, int n0) {
  constexpr int kPitch = smem_pitch<kHeadDim>();
  static_assert(kNTiles % 2 == 0, "n-tiles come in pairs");
  FASTLLM_UNROLL
  for (int k0 = 0; k0 < kHeadDim; k0 += 16) {
    uint32_t a[4];
    load_a<kPitch>(a, smem_a, row0, k0);
    FASTLLM_UNROLL
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[2][2];
      load_b_transposed<kPitch>(b, smem_b, n0 + np * 16, k0);
      mma_m16n8k16<T>(acc[2 * np], a, b[0], acc[2 * np]);
      mma_m16n8k16<T>(acc[2 * np + 1], a, b[1], acc[2 * np + 1]);
    }
  }
}

// acc (16 x kCols) += P (16 x 16 * kKSteps, fp32 accumulator in registers, rounded to T)
// * M (rows k of a row-major shared tile, columns [col0, col0 + kCols)): the O += P V shape.
template <class T, int kHeadDim, int kKSteps, int kCols = kHeadDim>
__device__ __forceinline__ void gemm_acc_by_rows(float (&acc)[kCols / 8][4],
                                                 const float (&p)[2 * kKSteps][4],
                                                 const T* smem_b, int col0 = 0) {
  constexpr int kPitch = smem_pitch<kHeadDim>();
  FASTLLM_UNROLL
  for (int kk = 0; kk < kKSteps; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, p, kk);
    FASTLLM_UNROLL
    for (int dp = 0; dp < kCols / 16; ++dp) {
      uint32_t b[2][2];
      load_b<kPitch>(b, smem_b, kk * 16, col0 + dp * 16);
      mma_m16n8k16<T>(acc[2 * dp], a, b[0], acc[2 * dp]);
      mma_m16n8k16<T>(acc[2 * dp + 1], a, b[1], acc[2 * dp + 1]);
    }
  }
}

// Sum / max over the 4 lanes of a quad (the lanes that share a C row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullWarpMask, v, 1);
  v += __shfl_xor_sync(kFullWarpMask, v, 2);
  return v;
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullWarpMask, v, 1));
  v = fmaxf(v, __shfl_xor_sync(kFullWarpMask, v, 2));
  return v;
}

// Dropout's keep decision for (row key of query i, key j), attention.h's hash.
struct Dropout {
  bool enabled;
  uint32_t threshold;
  float rescale;  // 1 / (1 - dropout_p)
  uint32_t head_key;

  __device__ __forceinline__ float factor(uint32_t row_key, int j) const {
    return dropout_keep(row_key, dropout_col_key(j), threshold) ? rescale : 0.f;
  }
};

__device__ __forceinline__ Dropout make_dropout(const Problem& p, uint32_t threshold, int b,
                                                int h) {
  Dropout d;
  d.enabled = p.dropout_p > 0;
  d.threshold = threshold;
  d.rescale = d.enabled ? static_cast<float>(1.0 / (1.0 - p.dropout_p)) : 1.f;
  d.head_key = d.enabled ? dropout_head_key(*p.dropout_seed, b, h, p.num_heads) : 0u;
  return d;
}

// ---- launchers ----------------------------------------------------------------------

// Launches a tile kernel over a grid of (one block per Cfg's `block_rows` of the `len` rows,
// heads, batch) blocks of Cfg::kThreads threads with Cfg::kSmemBytes of dynamic shared memory,
// opting in first when that is above the default 48 KiB.
template <class Cfg, class Kernel, class... Args>
cudaError_t launch_tile_kernel(Kernel kernel, int64_t len, int block_rows, int64_t heads,
                               int64_t batch, cudaStream_t stream, const Args&... args) {
  if (Cfg::kSmemBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg::kSmemBytes));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>((len + block_rows - 1) / block_rows),
                  static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  FASTLLM_LAUNCH_KERNEL(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, args...);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attention
}  // namespace fastllm
