// FlashAttention-2 forward on tensor cores (sm_80+): out and the fp32 log-sum-exp of every
// query row, for fp16 / bf16 q, k, v. Instantiated per (head dim, dtype) by the generated
// attention_fwd_hdim*_*.cu files; dispatched by attention_launch.cu.
//
// Math (attention.h): s_ij = softmax_scale * <q_i, k_j> (soft-capped, ALiBi-biased,
// masked), lse_i = log sum_j exp(s_ij), out_i = sum_j z_ij exp(s_ij - lse_i) v_j (z_ij:
// dropout's keep / (1 - p), 1 without dropout). Rows with no allowed key: out = 0,
// lse = -inf.
//
// Algorithm (Dao 2023, FlashAttention-2): one thread block owns kBlockM = 64 query rows of
// one (b, h) and streams the allowed key blocks of kBlockN keys through shared memory. Each
// of the 4 warps owns 16 query rows, so the online softmax (running row max m, running sum
// l, rescaled output accumulator O) lives in that warp's registers and needs only quad
// shuffles, never a block barrier:
//   S = Q K_j^T (mma, fp32) -> mask / softcap / ALiBi -> m_new = max(m, rowmax S),
//   P = exp(S - m_new), l = l * exp(m - m_new) + rowsum P, O = O * exp(m - m_new) + P V_j
// and at the end O / l, lse = m + log l. P goes from the S accumulator straight into the
// A operand of P V (no shared memory round trip). Only the key blocks that hold an allowed
// key for some row of the query block are visited (causal / sliding window skip the rest),
// and the per-element mask runs only on blocks that straddle the mask's edges or the end
// of the sequence.
// attn_bias and key_padding_mask: only in the kMasks = true instantiation (the launcher picks
// it when either is given, so problems without them run the code they always ran); the bias
// is read from global memory per element of the S fragment, the mask per key column; key
// blocks with no key that takes part are skipped (next_live_key_block: one __syncthreads_or
// per block looked at). A row whose allowed scores are all -inf keeps the exponent shift 0
// (never exp(-inf - (-inf))) and ends with l = 0: out 0, lse -inf.
//
// Pipeline: Q (once) and K_j are copied with cp.async; V_j's copy is issued before S is
// computed and lands while the softmax runs; K_{j+1}'s copy is issued as soon as every warp
// is done with K_j and lands during P V_j. Three barriers per key block.
//
// Shared memory (elements of T, pitch kHeadDim + 8): Q 64 rows, K kBlockN rows, V kBlockN
// rows: 52 KiB at D = 128, 66 KiB at D = 256 (kBlockN = 32 there, so the fp32 O
// accumulator, 128 floats per thread, fits the register file without spills).
//
// Grid: (ceil(max Tq / 64), H, B); blocks past their sequence's end exit at once.
// Glossary: attention_common.cuh (B, H, Hkv, D, kHeadDim, Tq_b, Tk_b, i, j, T).
#pragma once

#include "attention/cuda/attention_common.cuh"

namespace fastllm {
namespace attention {
namespace cuda {

template <int kHeadDim>
struct FwdConfig {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kPitch = smem_pitch<kHeadDim>();
  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kPitch;
  static constexpr size_t kSmemBytes = kSmemElems * 2;
  static_assert(kHeadDim % 16 == 0, "head dim tiles are multiples of 16");
};

// Two resident blocks per SM asked of ptxas: with the thread count alone, nvcc 13.0 capped
// the D = 32 kernel at 128 registers and spilled.
template <int kHeadDim, class T, bool kMasks>
__global__ void __launch_bounds__(FwdConfig<kHeadDim>::kThreads, 2)
    attention_fwd_kernel(const FwdParams p, const uint32_t dropout_threshold) {
  using Cfg = FwdConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch;
  constexpr int kNTiles = kBlockN / 8;       // n-tiles of S per warp
  constexpr int kDTiles = kHeadDim / 8;      // n-tiles of O per warp

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = sequence_info(p, b);
  const int i0 = m_block * kBlockM;
  if (i0 >= seq.seqlen_q) return;  // the whole block leaves: no barrier is skipped
  const int rows = min(kBlockM, seq.seqlen_q - i0);
  const int hk = h / static_cast<int>(p.num_heads / p.num_kv_heads);
  const int head_dim = static_cast<int>(p.head_dim);
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;

  const T* q = static_cast<const T*>(p.q) + head_offset(p.stride_q, packed_q, seq.q_row0, b, h) +
               i0 * p.stride_q.t;
  const T* k = static_cast<const T*>(p.k) + head_offset(p.stride_k, packed_k, seq.k_row0, b, hk);
  const T* v = static_cast<const T*>(p.v) + head_offset(p.stride_v, packed_k, seq.k_row0, b, hk);
  T* out = static_cast<T*>(p.out) + head_offset(p.stride_out, packed_q, seq.q_row0, b, h) +
           i0 * p.stride_out.t;
  float* lse = static_cast<float*>(p.lse) + lse_offset(p, seq, b, h) + i0;

  const ScoreMod mod = make_score_mod(p, seq, b, h);
  int j_min, j_max;
  mod.key_range(i0, i0 + rows - 1, j_min, j_max);
  if (j_max < j_min) {  // no row of this block has an allowed key (uniform: no barrier skipped)
    store_zero_rows<kHeadDim, Cfg::kThreads>(out, p.stride_out.t, rows, head_dim);
    for (int r = threadIdx.x; r < rows; r += Cfg::kThreads) lse[r] = -kInf;
    return;
  }
  const int n_last = j_max / kBlockN;
  // With a key padding mask, fully padded key blocks are skipped (a barrier per block looked
  // at); a query block that sees no key that takes part is a row block without keys.
  const int n_first = next_live_key_block<kBlockN, Cfg::kThreads, kMasks>(
      p, b, seq.seqlen_k, j_min / kBlockN, n_last);
  if (kMasks && n_first > n_last) {
    store_zero_rows<kHeadDim, Cfg::kThreads>(out, p.stride_out.t, rows, head_dim);
    for (int r = threadIdx.x; r < rows; r += Cfg::kThreads) lse[r] = -kInf;
    return;
  }

  FASTLLM_EXTERN_SHARED(uint4, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kPitch;
  T* sV = sK + kBlockN * kPitch;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * 16;
  // This thread's two query rows (C rows g and g + 8 of the warp), inside the sequence.
  const int row_i[2] = {i0 + warp_row0 + g, i0 + warp_row0 + g + 8};

  const Dropout dropout = make_dropout(p, dropout_threshold, b, h);
  uint32_t row_key[2] = {0u, 0u};
  if (dropout.enabled) {
    row_key[0] = dropout_row_key(dropout.head_key, row_i[0]);
    row_key[1] = dropout_row_key(dropout.head_key, row_i[1]);
  }

  load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.stride_q.t, rows, head_dim);
  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k + n_first * kBlockN * p.stride_k.t,
                                                    p.stride_k.t, seq.seqlen_k - n_first * kBlockN,
                                                    head_dim);
  cp_async_commit();

  float o[kDTiles][4];
  zero_acc(o);
  float row_max[2] = {-kInf, -kInf};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end

  int n_next;  // the key block after n_block (fully padded ones skipped)
  FASTLLM_NO_UNROLL
  for (int n_block = n_first; n_block <= n_last; n_block = n_next) {
    const int j0 = n_block * kBlockN;
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v + j0 * p.stride_v.t, p.stride_v.t,
                                                      seq.seqlen_k - j0, head_dim);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K_j have landed (V_j may still be in flight)
    __syncthreads();

    float s[kNTiles][4];
    zero_acc(s);
    gemm_rows_by_rows<T, kHeadDim>(s, sQ, warp_row0, sK, 0);

    // Scores, mask, and the new running max of each of the thread's two rows.
    const bool masked = mod.tile_needs_mask(i0, i0 + kBlockM - 1, j0, j0 + kBlockN - 1);
    float tile_max[2] = {-kInf, -kInf};
    if constexpr (!kMasks) {
      FASTLLM_UNROLL
      for (int nt = 0; nt < kNTiles; ++nt) {
        FASTLLM_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + nt * 8 + 2 * t + e % 2;
          float unused_cap_grad;
          s[nt][e] = masked ? mod.score(s[nt][e], row_i[e / 2], j, unused_cap_grad)
                            : mod.score_unmasked(s[nt][e], row_i[e / 2], j, unused_cap_grad);
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
        }
      }
    } else {
      // The same plus the bias (after softcap and ALiBi) and the key padding mask (a key
      // that does not take part is masked like one outside the window).
      const T* bias_rows[2] = {nullptr, nullptr};
      if (p.attn_bias != nullptr) {
        const T* bias = bias_of_head<T>(p, b, h);
        bias_rows[0] = bias + bias_row_offset(p, row_i[0]);
        bias_rows[1] = bias + bias_row_offset(p, row_i[1]);
      }
      FASTLLM_UNROLL
      for (int nt = 0; nt < kNTiles; ++nt) {
        FASTLLM_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int j = j0 + nt * 8 + 2 * t + c;
          const bool live = key_takes_part(p, b, seq.seqlen_k, j);
          const int64_t bias_col = bias_col_offset(p, j);
          FASTLLM_UNROLL
          for (int r = 0; r < 2; ++r) {
            const int e = 2 * r + c;
            float unused_cap_grad;
            float v = mod.score_unmasked(s[nt][e], row_i[r], j, unused_cap_grad);
            if (p.attn_bias != nullptr) v += to_float(bias_rows[r][bias_col]);
            if (!live || (masked && !mod.allowed(row_i[r], j))) v = -kInf;
            s[nt][e] = v;
            tile_max[r] = fmaxf(tile_max[r], v);
          }
        }
      }
    }
    float shift[2];  // exp's argument offset: the new max, or 0 while a row has no key yet
    FASTLLM_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      shift[r] = new_max == -kInf ? 0.f : new_max;
      // exp(-inf) = 0 drops the (empty) old state of a row's first allowed block.
      const float rescale = exp2f((row_max[r] - shift[r]) * kLog2e);
      row_max[r] = new_max;
      row_sum[r] *= rescale;
      FASTLLM_UNROLL
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][2 * r] *= rescale;
        o[dt][2 * r + 1] *= rescale;
      }
    }
    FASTLLM_UNROLL
    for (int nt = 0; nt < kNTiles; ++nt) {
      FASTLLM_UNROLL
      for (int e = 0; e < 4; ++e) {
        const float prob = exp2f((s[nt][e] - shift[e / 2]) * kLog2e);
        row_sum[e / 2] += prob;  // lse is that of the undropped probabilities
        s[nt][e] = dropout.enabled
                       ? prob * dropout.factor(row_key[e / 2], j0 + nt * 8 + 2 * t + e % 2)
                       : prob;
      }
    }

    cp_async_wait<0>();  // V_j has landed
    __syncthreads();     // ... for every thread; and every warp is done reading K_j
    n_next = next_live_key_block<kBlockN, Cfg::kThreads, kMasks>(p, b, seq.seqlen_k,
                                                                  n_block + 1, n_last);
    if (n_next <= n_last) {
      const int j1 = n_next * kBlockN;
      load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k + j1 * p.stride_k.t, p.stride_k.t,
                                                        seq.seqlen_k - j1, head_dim);
    }
    cp_async_commit();  // possibly empty: keeps wait<1> above counting right

    gemm_acc_by_rows<T, kHeadDim, kBlockN / 16>(o, s, sV);
    __syncthreads();  // every warp is done reading V_j before the next copy overwrites it
  }

  // Normalise, write lse and out. Rows that never saw an allowed key have l = 0: out 0,
  // lse -inf.
  float inv_sum[2];
  FASTLLM_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    inv_sum[r] = l > 0.f ? 1.f / l : 0.f;
    const int local_row = warp_row0 + g + 8 * r;
    if (t == 0 && local_row < rows) lse[local_row] = l > 0.f ? row_max[r] + logf(l) : -kInf;
  }
  FASTLLM_UNROLL
  for (int dt = 0; dt < kDTiles; ++dt) {
    o[dt][0] *= inv_sum[0];
    o[dt][1] *= inv_sum[0];
    o[dt][2] *= inv_sum[1];
    o[dt][3] *= inv_sum[1];
  }
  store_warp_rows<kHeadDim, kHeadDim>(o, 1.f, sQ + warp_row0 * kPitch,
                                      out + warp_row0 * p.stride_out.t, p.stride_out.t,
                                      rows - warp_row0, 0, head_dim);
}

// Launches the forward kernel for one (head dim, dtype); defined here, instantiated by the
// generated attention_fwd_hdim*_*.cu files.
template <int kHeadDim, class T>
cudaError_t launch_attention_fwd(const FwdParams& p, uint32_t dropout_threshold,
                                 cudaStream_t stream) {
  using Cfg = FwdConfig<kHeadDim>;
  if (has_masks(p)) {
    return launch_tile_kernel<Cfg>(attention_fwd_kernel<kHeadDim, T, true>, p.seqlen_q,
                                   Cfg::kBlockM, p.num_heads, p.batch, stream, p,
                                   dropout_threshold);
  }
  return launch_tile_kernel<Cfg>(attention_fwd_kernel<kHeadDim, T, false>, p.seqlen_q,
                                 Cfg::kBlockM, p.num_heads, p.batch, stream, p,
                                 dropout_threshold);
}

}  // namespace cuda
}  // namespace attention
}  // namespace fastllm
