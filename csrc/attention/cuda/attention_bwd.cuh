// FlashAttention-2 backward on tensor cores (sm_80+): dq, dk, dv for fp16 / bf16 and head dims up to 256, with dk
// and dv summed over the query heads of each GQA / MQA group. Instantiated per (head dim,
// dtype, kernel) by the generated attention_bwd_*_hdim*_*.cu files; dispatched by
// attention_launch.cu.
//
// Math (attention.h), with P recomputed from the saved lse (p_ij = exp(s_ij - lse_i)) and
// z_ij = dropout's keep / (1 - p) (1 without dropout):
//   D_i   = <dout_i, out_i>                                   (attention_bwd_dot_kernel)
//   dv_j  = sum_{h in group, i} z_ij p_ij dout_i
//   dp_ij = z_ij <dout_i, v_j>,  ds_ij = p_ij (dp_ij - D_i) [* (1 - tanh^2) with softcap]
//   dk_j  = scale * sum_{h in group, i} ds_ij q_i
//   dq_i  = scale * sum_j ds_ij k_j
// A row with lse = -inf (no allowed key, or every allowed score -inf) has p = 0, hence
// zero gradients. attn_bias / key_padding_mask: as in forward (attention_fwd.cuh), in the
// kMasks = true instantiations only; key blocks without a key that takes part are skipped.
// dbias_ij = p_ij (z_ij dp_ij - D_i) (before softcap's derivative) is stored by the dq
// kernel, the one that visits each (b, h, i, j) once in row-major fragments (pairs of
// adjacent keys).
//
// Deterministic, no atomics: three kernels, each output written by exactly one block.
//   1. attention_bwd_dot_kernel (attention_launch.cu): D_i into an fp32 workspace shaped
//      like lse.
//   2. attention_bwd_dkdv_kernel: one block per (key block of 64 keys, kv head, b); each of
//      its 4 warps owns 16 keys and keeps their dk, dv accumulators in registers while the
//      block walks every query head of the group and every query block that can see the
//      keys (kBlockM queries at a time through shared memory). It works on transposed
//      tiles, S^T = K Q^T, so that P^T and dS^T come out of the accumulators already as
//      A operands of dV += P^T dO and dK += dS^T Q.
//   3. attention_bwd_dq_kernel: one block per (query block of 64 rows, head, b), the
//      forward's shape: S = Q K^T, dP = dO V^T, dS, dQ += dS K over the visible key blocks.
// FlashAttention-2 instead adds dq into an fp32 buffer with atomics from the dk/dv pass;
// recomputing S and dP in a separate pass costs 7 instead of 5 matrix products but gives
// the same bits on every run (and under every emulated schedule) and needs no dq buffer.
//
// Tiles: dkdv kBlockN = 64 keys x kBlockM = 64 queries (32 for D in (64, 128], 16 for
// D = 256, so that dk + dv, 2 * D / kSplit fp32 accumulators per thread, fit the registers;
// at D = 256 two warps share 16 keys and split the columns, kSplit = 2, 8 warps), shared
// memory K, V (64 rows) + Q, dO (kBlockM rows) + lse, D: 57 KiB at D = 128, 86 KiB at 256;
// dq kBlockM = 64 x kBlockN = 64 (32 for D > 64), shared Q, dO (64 rows) + K, V (kBlockN
// rows): 52 KiB at D = 128, 101 KiB at 256.
// Glossary: attention_common.cuh (B, H, Hkv, D, kHeadDim, Tq_b, Tk_b, i, j, T).
#pragma once

#include "attention/cuda/attention_common.cuh"

namespace fastllm {
namespace attention {
namespace cuda {

// Resident blocks per SM asked of ptxas. With the thread count alone, nvcc 13.0 aimed at
// its own occupancy target for some instantiations (168 registers) and spilled; 1 lets
// every kernel use up to 255 registers (256 threads at D = 256: 255 as well).
constexpr int kBwdMinBlocksPerSm = 1;

// The lse of a row for recomputing p = exp(s - lse): +inf for rows without an allowed key
// (lse = -inf) and for padding rows past the sequence, so that p = 0 there, not NaN.
__device__ __forceinline__ float lse_for_recompute(const float* lse, int local_row,
                                                   int valid_rows) {
  if (local_row >= valid_rows) return kInf;
  const float v = lse[local_row];
  return v == -kInf ? kInf : v;
}

// ---- 2. dk, dv --------------------------------------------------------------------------

template <int kHeadDim>
struct BwdDkdvConfig {
  static constexpr int kBlockN = 64;  // keys per block (16 per warp row group)
  static constexpr int kBlockM = kHeadDim <= 64 ? 64 : (kHeadDim <= 128 ? 32 : 16);
  // Warps sharing 16 keys, each accumulating kAccCols of the head dim's columns of dk, dv
  // (2 at D = 256: 256 fp32 accumulators per thread would not fit the registers). They
  // both compute the 16 keys' full S^T and dP^T tiles.
  static constexpr int kSplit = kHeadDim <= 128 ? 1 : 2;
  static constexpr int kAccCols = kHeadDim / kSplit;
  static constexpr int kWarps = 4 * kSplit;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kPitch = smem_pitch<kHeadDim>();
  static constexpr size_t kSmemBytes =
      (2 * kBlockN + 2 * kBlockM) * kPitch * 2 + 2 * kBlockM * sizeof(float);
  static_assert(kHeadDim % 16 == 0 && kAccCols % 16 == 0, "head dim tiles are multiples of 16");
};

template <int kHeadDim, class T, bool kMasks>
__global__ void __launch_bounds__(BwdDkdvConfig<kHeadDim>::kThreads, kBwdMinBlocksPerSm)
    attention_bwd_dkdv_kernel(const BwdParams p, const float* __restrict__ softmax_d,
                              const uint32_t dropout_threshold) {
  using Cfg = BwdDkdvConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch;
  constexpr int kMTiles = kBlockM / 8;  // n-tiles of S^T per warp (query columns)
  constexpr int kAccCols = Cfg::kAccCols;
  constexpr int kDTiles = kAccCols / 8;

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = sequence_info(p, b);
  const int j0 = n_block * kBlockN;
  if (j0 >= seq.keys_stored) return;
  const int stored_keys = min(kBlockN, seq.keys_stored - j0);
  const int j_last = min(j0 + kBlockN, seq.seqlen_k) - 1;  // last used key of the block
  const int group = static_cast<int>(p.num_heads / p.num_kv_heads);
  const int head_dim = static_cast<int>(p.head_dim);
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;

  FASTLLM_EXTERN_SHARED(uint4, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kPitch;
  T* sQ = sV + kBlockN * kPitch;
  T* sdO = sQ + kBlockM * kPitch;
  float* sLse = reinterpret_cast<float*>(sdO + kBlockM * kPitch);
  float* sD = sLse + kBlockM;

  const int64_t k_off = head_offset(p.stride_k, packed_k, seq.k_row0, b, hk) + j0 * p.stride_k.t;
  const int64_t v_off = head_offset(p.stride_v, packed_k, seq.k_row0, b, hk) + j0 * p.stride_v.t;
  // Keys past Tk_b (seqused_k) are zero-filled: masked anyway, and their gradient is 0.
  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, static_cast<const T*>(p.k) + k_off,
                                                    p.stride_k.t, seq.seqlen_k - j0, head_dim);
  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, static_cast<const T*>(p.v) + v_off,
                                                    p.stride_v.t, seq.seqlen_k - j0, head_dim);
  cp_async_commit();

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int warp_key0 = (warp / Cfg::kSplit) * 16;
  const int acc_col0 = (warp % Cfg::kSplit) * kAccCols;  // of this warp's dk, dv columns
  // This thread's two keys (rows g, g + 8 of the warp's S^T tile), inside the sequence.
  const int key_j[2] = {j0 + warp_key0 + g, j0 + warp_key0 + g + 8};

  float dk[kDTiles][4], dv[kDTiles][4];
  zero_acc(dk);
  zero_acc(dv);

  // A key block with no key that takes part (key padding mask) has dk = dv = 0: skipped.
  const bool block_live = next_live_key_block<kBlockN, Cfg::kThreads, kMasks>(
                              p, b, seq.seqlen_k, n_block, n_block) == n_block;

  FASTLLM_NO_UNROLL
  for (int h = hk * group; h < (hk + 1) * group && j0 < seq.seqlen_k && block_live; ++h) {
    const ScoreMod mod = make_score_mod(p, seq, b, h);
    const Dropout dropout = make_dropout(p, dropout_threshold, b, h);
    uint32_t col_key[2] = {0u, 0u};
    if (dropout.enabled) {
      col_key[0] = dropout_col_key(key_j[0]);
      col_key[1] = dropout_col_key(key_j[1]);
    }
    int i_min, i_max;
    mod.query_range(j0, j_last, seq.seqlen_q, i_min, i_max);
    if (i_max < i_min) continue;
    const T* q = static_cast<const T*>(p.q) + head_offset(p.stride_q, packed_q, seq.q_row0, b, h);
    const T* dout =
        static_cast<const T*>(p.dout) + head_offset(p.stride_dout, packed_q, seq.q_row0, b, h);
    const float* lse = static_cast<const float*>(p.lse) + lse_offset(p, seq, b, h);
    const float* d_row = softmax_d + lse_offset(p, seq, b, h);

    FASTLLM_NO_UNROLL
    for (int m_block = i_min / kBlockM; m_block <= i_max / kBlockM; ++m_block) {
      const int i0 = m_block * kBlockM;
      const int rows = min(kBlockM, seq.seqlen_q - i0);
      load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q + i0 * p.stride_q.t, p.stride_q.t,
                                                        rows, head_dim);
      load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(
          sdO, dout + i0 * p.stride_dout.t, p.stride_dout.t, rows, head_dim);
      cp_async_commit();
      for (int r = threadIdx.x; r < kBlockM; r += Cfg::kThreads) {
        sLse[r] = lse_for_recompute(lse + i0, r, rows);
        sD[r] = r < rows ? d_row[i0 + r] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();  // Q, dO, lse, D (and K, V the first time) visible to every thread

      // dP^T = V dO^T and S^T = K Q^T (keys x queries), then per element P^T, dS^T =
      // P^T (z dP^T - D) (* cap') and P^T <- z P^T. dP^T comes first so that the soft cap's
      // derivative is used as soon as the score yields it, never held in an array.
      float dst[kMTiles][4], pt[kMTiles][4];
      zero_acc(dst);
      gemm_rows_by_rows<T, kHeadDim>(dst, sV, warp_key0, sdO, 0);
      zero_acc(pt);
      gemm_rows_by_rows<T, kHeadDim>(pt, sK, warp_key0, sQ, 0);
      const bool masked = mod.tile_needs_mask(i0, i0 + kBlockM - 1, j0, j0 + kBlockN - 1);
      if constexpr (!kMasks) {
        FASTLLM_UNROLL
        for (int mt = 0; mt < kMTiles; ++mt) {
          FASTLLM_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int local_i = mt * 8 + 2 * t + e % 2;
            const int i = i0 + local_i, j = key_j[e / 2];
            float cap_grad;
            const float s = masked ? mod.score(pt[mt][e], i, j, cap_grad)
                                   : mod.score_unmasked(pt[mt][e], i, j, cap_grad);
            const float prob = exp2f((s - sLse[local_i]) * kLog2e);
            float z = 1.f;
            if (dropout.enabled) {
              const uint32_t row_key = dropout_row_key(dropout.head_key, i);
              z = dropout_keep(row_key, col_key[e / 2], dropout.threshold) ? dropout.rescale
                                                                           : 0.f;
            }
            dst[mt][e] = prob * (z * dst[mt][e] - sD[local_i]) * cap_grad;
            pt[mt][e] = prob * z;
          }
        }
      } else {
        // The same with the bias (after softcap and ALiBi) and the key padding mask (this
        // thread's two keys, the rows of its S^T elements). dbias is the dq kernel's.
        const T* bias = p.attn_bias != nullptr ? bias_of_head<T>(p, b, h) : nullptr;
        FASTLLM_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int j = key_j[r];
          const bool live = key_takes_part(p, b, seq.seqlen_k, j);
          const T* bias_key = bias != nullptr ? bias + bias_col_offset(p, j) : nullptr;
          FASTLLM_UNROLL
          for (int mt = 0; mt < kMTiles; ++mt) {
            FASTLLM_UNROLL
            for (int c = 0; c < 2; ++c) {
              const int e = 2 * r + c;
              const int local_i = mt * 8 + 2 * t + c;
              const int i = i0 + local_i;
              float cap_grad;
              float s = mod.score_unmasked(pt[mt][e], i, j, cap_grad);
              if (bias_key != nullptr) s += to_float(bias_key[bias_row_offset(p, i)]);
              if (!live || (masked && !mod.allowed(i, j))) s = -kInf;
              const float prob = exp2f((s - sLse[local_i]) * kLog2e);
              float z = 1.f;
              if (dropout.enabled) {
                const uint32_t row_key = dropout_row_key(dropout.head_key, i);
                z = dropout_keep(row_key, col_key[r], dropout.threshold) ? dropout.rescale : 0.f;
              }
              dst[mt][e] = prob * (z * dst[mt][e] - sD[local_i]) * cap_grad;
              pt[mt][e] = prob * z;
            }
          }
        }
      }
      gemm_acc_by_rows<T, kHeadDim, kBlockM / 16, kAccCols>(dv, pt, sdO, acc_col0);
      gemm_acc_by_rows<T, kHeadDim, kBlockM / 16, kAccCols>(dk, dst, sQ, acc_col0);
      __syncthreads();  // every warp is done with Q, dO, lse, D before they are reloaded
    }
  }

  // K and V's copies have landed even if no query block was visited, and every warp is
  // done reading them; each warp now stages its dk / dv columns in its keys' rows of sK /
  // sV (no other warp touches those rows and columns).
  cp_async_wait<0>();
  __syncthreads();
  const int valid_rows = stored_keys - warp_key0;
  const int64_t dk_off = head_offset(p.stride_dk, packed_k, seq.k_row0, b, hk) +
                         (j0 + warp_key0) * p.stride_dk.t;
  const int64_t dv_off = head_offset(p.stride_dv, packed_k, seq.k_row0, b, hk) +
                         (j0 + warp_key0) * p.stride_dv.t;
  store_warp_rows<kHeadDim, kAccCols>(dk, static_cast<float>(p.softmax_scale),
                                      sK + warp_key0 * kPitch, static_cast<T*>(p.dk) + dk_off,
                                      p.stride_dk.t, valid_rows, acc_col0, head_dim);
  store_warp_rows<kHeadDim, kAccCols>(dv, 1.f, sV + warp_key0 * kPitch,
                                      static_cast<T*>(p.dv) + dv_off, p.stride_dv.t, valid_rows,
                                      acc_col0, head_dim);
}

// ---- 3. dq ------------------------------------------------------------------------------

template <int kHeadDim>
struct BwdDqConfig {
  static constexpr int kBlockM = 64;  // queries per block (16 per warp)
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kPitch = smem_pitch<kHeadDim>();
  static constexpr size_t kSmemBytes = (2 * kBlockM + 2 * kBlockN) * kPitch * 2;
  static_assert(kHeadDim % 16 == 0, "head dim tiles are multiples of 16");
};

template <int kHeadDim, class T, bool kMasks>
__global__ void __launch_bounds__(BwdDqConfig<kHeadDim>::kThreads, kBwdMinBlocksPerSm)
    attention_bwd_dq_kernel(const BwdParams p, const float* __restrict__ softmax_d,
                            const uint32_t dropout_threshold) {
  using Cfg = BwdDqConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch;
  constexpr int kNTiles = kBlockN / 8;
  constexpr int kDTiles = kHeadDim / 8;

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = sequence_info(p, b);
  const int i0 = m_block * kBlockM;
  if (i0 >= seq.seqlen_q) return;
  const int rows = min(kBlockM, seq.seqlen_q - i0);
  const int hk = h / static_cast<int>(p.num_heads / p.num_kv_heads);
  const int head_dim = static_cast<int>(p.head_dim);
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;

  T* dq = static_cast<T*>(p.dq) + head_offset(p.stride_dq, packed_q, seq.q_row0, b, h) +
          i0 * p.stride_dq.t;
  const ScoreMod mod = make_score_mod(p, seq, b, h);
  int j_min, j_max;
  mod.key_range(i0, i0 + rows - 1, j_min, j_max);
  if (j_max < j_min) {  // uniform: no barrier is skipped
    store_zero_rows<kHeadDim, Cfg::kThreads>(dq, p.stride_dq.t, rows, head_dim);
    return;
  }
  const int n_last = j_max / kBlockN;
  // Fully padded key blocks (key padding mask) are skipped, as in forward.
  const int n_first = next_live_key_block<kBlockN, Cfg::kThreads, kMasks>(
      p, b, seq.seqlen_k, j_min / kBlockN, n_last);
  if (kMasks && n_first > n_last) {
    store_zero_rows<kHeadDim, Cfg::kThreads>(dq, p.stride_dq.t, rows, head_dim);
    return;
  }

  FASTLLM_EXTERN_SHARED(uint4, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kPitch;
  T* sK = sdO + kBlockM * kPitch;
  T* sV = sK + kBlockN * kPitch;

  const T* q = static_cast<const T*>(p.q) + head_offset(p.stride_q, packed_q, seq.q_row0, b, h) +
               i0 * p.stride_q.t;
  const T* dout = static_cast<const T*>(p.dout) +
                  head_offset(p.stride_dout, packed_q, seq.q_row0, b, h) + i0 * p.stride_dout.t;
  const T* k = static_cast<const T*>(p.k) + head_offset(p.stride_k, packed_k, seq.k_row0, b, hk);
  const T* v = static_cast<const T*>(p.v) + head_offset(p.stride_v, packed_k, seq.k_row0, b, hk);
  load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.stride_q.t, rows, head_dim);
  load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sdO, dout, p.stride_dout.t, rows, head_dim);
  cp_async_commit();

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * 16;
  const int row_i[2] = {i0 + warp_row0 + g, i0 + warp_row0 + g + 8};
  const float* lse = static_cast<const float*>(p.lse) + lse_offset(p, seq, b, h) + i0;
  const float* d_row = softmax_d + lse_offset(p, seq, b, h) + i0;
  float row_lse[2], row_d[2];
  uint32_t row_key[2] = {0u, 0u};
  const Dropout dropout = make_dropout(p, dropout_threshold, b, h);
  FASTLLM_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int local_row = warp_row0 + g + 8 * r;
    row_lse[r] = lse_for_recompute(lse, local_row, rows);
    row_d[r] = local_row < rows ? d_row[local_row] : 0.f;
    if (dropout.enabled) row_key[r] = dropout_row_key(dropout.head_key, row_i[r]);
  }

  float dq_acc[kDTiles][4];
  zero_acc(dq_acc);

  FASTLLM_NO_UNROLL
  for (int n_block = n_first; n_block <= n_last;
       n_block = next_live_key_block<kBlockN, Cfg::kThreads, kMasks>(p, b, seq.seqlen_k,
                                                                     n_block + 1, n_last)) {
    const int j0 = n_block * kBlockN;
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k + j0 * p.stride_k.t, p.stride_k.t,
                                                      seq.seqlen_k - j0, head_dim);
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v + j0 * p.stride_v.t, p.stride_v.t,
                                                      seq.seqlen_k - j0, head_dim);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();  // K_j, V_j (and Q, dO the first time) visible to every thread

    // dP = dO V^T first, then S = Q K^T and per element dS = P (z dP - D) (* cap'), with
    // the soft cap's derivative used as soon as the score yields it.
    float ds[kNTiles][4], s_acc[kNTiles][4];
    zero_acc(ds);
    gemm_rows_by_rows<T, kHeadDim>(ds, sdO, warp_row0, sV, 0);
    zero_acc(s_acc);
    gemm_rows_by_rows<T, kHeadDim>(s_acc, sQ, warp_row0, sK, 0);
    const bool masked = mod.tile_needs_mask(i0, i0 + kBlockM - 1, j0, j0 + kBlockN - 1);
    if constexpr (!kMasks) {
      FASTLLM_UNROLL
      for (int nt = 0; nt < kNTiles; ++nt) {
        FASTLLM_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + nt * 8 + 2 * t + e % 2, r = e / 2;
          float cap_grad;
          const float s = masked ? mod.score(s_acc[nt][e], row_i[r], j, cap_grad)
                                 : mod.score_unmasked(s_acc[nt][e], row_i[r], j, cap_grad);
          const float prob = exp2f((s - row_lse[r]) * kLog2e);
          const float z = dropout.enabled ? dropout.factor(row_key[r], j) : 1.f;
          ds[nt][e] = prob * (z * ds[nt][e] - row_d[r]) * cap_grad;
        }
      }
    } else {
      // The same with the bias and the key padding mask, and dbias_ij = p_ij (z dP_ij - D_i)
      // (before the soft cap's derivative) stored when asked for: this kernel visits each
      // (b, h, i, j) once, and its two adjacent columns per row make 4-byte stores when Tk
      // is even.
      const T* bias = p.attn_bias != nullptr ? bias_of_head<T>(p, b, h) : nullptr;
      T* dbias = p.dbias != nullptr ? static_cast<T*>(p.dbias) +
                                          (static_cast<int64_t>(b) * p.num_heads + h) *
                                              p.seqlen_q * p.seqlen_k
                                    : nullptr;
      FASTLLM_UNROLL
      for (int nt = 0; nt < kNTiles; ++nt) {
        FASTLLM_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int i = row_i[r];
          float grad[2];
          FASTLLM_UNROLL
          for (int c = 0; c < 2; ++c) {
            const int e = 2 * r + c;
            const int j = j0 + nt * 8 + 2 * t + c;
            float cap_grad;
            float s = mod.score_unmasked(s_acc[nt][e], i, j, cap_grad);
            if (bias != nullptr) s += to_float(bias[bias_row_offset(p, i) + bias_col_offset(p, j)]);
            if (!key_takes_part(p, b, seq.seqlen_k, j) || (masked && !mod.allowed(i, j))) {
              s = -kInf;
            }
            const float prob = exp2f((s - row_lse[r]) * kLog2e);
            const float z = dropout.enabled ? dropout.factor(row_key[r], j) : 1.f;
            grad[c] = prob * (z * ds[nt][e] - row_d[r]);
            ds[nt][e] = grad[c] * cap_grad;
          }
          const int j = j0 + nt * 8 + 2 * t;  // even
          if (dbias != nullptr && i < seq.seqlen_q && j < p.seqlen_k) {
            T* dst = dbias + static_cast<int64_t>(i) * p.seqlen_k + j;
            if (p.seqlen_k % 2 == 0) {  // j + 1 < Tk, and the pair is 4-byte aligned
              *reinterpret_cast<uint32_t*>(dst) = pack2<T>(grad[0], grad[1]);
            } else {
              dst[0] = from_float<T>(grad[0]);
              if (j + 1 < p.seqlen_k) dst[1] = from_float<T>(grad[1]);
            }
          }
        }
      }
    }
    gemm_acc_by_rows<T, kHeadDim, kBlockN / 16>(dq_acc, ds, sK);
    __syncthreads();  // every warp is done with K_j, V_j before they are overwritten
  }

  store_warp_rows<kHeadDim, kHeadDim>(dq_acc, static_cast<float>(p.softmax_scale),
                                      sQ + warp_row0 * kPitch, dq + warp_row0 * p.stride_dq.t,
                                      p.stride_dq.t, rows - warp_row0, 0, head_dim);
}

// ---- launchers --------------------------------------------------------------------------

// Defined here, instantiated by the generated attention_bwd_{dkdv,dq}_hdim*_*.cu files.
template <int kHeadDim, class T>
cudaError_t launch_attention_bwd_dkdv(const BwdParams& p, const float* softmax_d,
                                      uint32_t dropout_threshold, cudaStream_t stream) {
  using Cfg = BwdDkdvConfig<kHeadDim>;
  if (has_masks(p)) {
    return launch_tile_kernel<Cfg>(attention_bwd_dkdv_kernel<kHeadDim, T, true>, p.seqlen_k,
                                   Cfg::kBlockN, p.num_kv_heads, p.batch, stream, p, softmax_d,
                                   dropout_threshold);
  }
  return launch_tile_kernel<Cfg>(attention_bwd_dkdv_kernel<kHeadDim, T, false>, p.seqlen_k,
                                 Cfg::kBlockN, p.num_kv_heads, p.batch, stream, p, softmax_d,
                                 dropout_threshold);
}

template <int kHeadDim, class T>
cudaError_t launch_attention_bwd_dq(const BwdParams& p, const float* softmax_d,
                                    uint32_t dropout_threshold, cudaStream_t stream) {
  using Cfg = BwdDqConfig<kHeadDim>;
  if (has_masks(p)) {
    return launch_tile_kernel<Cfg>(attention_bwd_dq_kernel<kHeadDim, T, true>, p.seqlen_q,
                                   Cfg::kBlockM, p.num_heads, p.batch, stream, p, softmax_d,
                                   dropout_threshold);
  }
  return launch_tile_kernel<Cfg>(attention_bwd_dq_kernel<kHeadDim, T, false>, p.seqlen_q,
                                 Cfg::kBlockM, p.num_heads, p.batch, stream, p, softmax_d,
                                 dropout_threshold);
}

}  // namespace cuda
}  // namespace attention
}  // namespace fastllm
