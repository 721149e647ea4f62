// Fused attention on the CPU: attention_fwd_cpu and attention_bwd_cpu of attention.h, for
// float32, bfloat16, float16 and float64. Torch-free: C++17, OpenMP and x86 intrinsics.
//
// Math (attention.h holds the contract: mask, per-sequence lengths, dropout hash): per
// (batch b, query head h), s = scale * q k^T, soft-capped when softcap > 0, plus the ALiBi
// bias -slope * |i + Tk_b - Tq_b - j| when slopes are given; online softmax; p is dropped
// (kept p scaled by 1 / (1 - dropout_p)) when dropout_p > 0;
// out = p v, lse = logsumexp(s) of the undropped scores. Backward recomputes p = exp(s - lse)
// and forms dv = (z p)^T dout, dp = z (dout v^T), ds = p (dp - D), dq = scale ds k,
// dk = scale ds^T q, with z the dropout factor (1 without dropout) and D_i = <dout_i, out_i>.
//
// Variants, all in both passes and both instruction paths:
//   - padded batches (B, T, H, D), or packed variable-length ones (cu_seqlens_q / _k, rows of
//     sequence b at cu_seqlens[b] + i), and seqused_k (only the first seqused_k[b] keys, the
//     KV cache); the mask, ALiBi and the dropout hash all use positions inside sequence b;
//   - causal (bottom-right aligned) and sliding-window masks, soft-capping, ALiBi, dropout,
//     GQA / MQA. A feature that is off costs one branch per tile;
//   - (padded batches) an additive attn_bias of any strides (stride 0 = broadcast), added
//     to the score tile after the softcap and ALiBi, with its gradient dbias = ds (before the
//     softcap's derivative) stored by the dq tile loop, which both backward schemes share, so
//     each element is written once; and a key_padding_mask, summarised once per call per
//     (batch, key block) (KeyBlocks): blocks without live keys are skipped, blocks whose
//     live keys are one range narrow the rows' bands (and the score columns formed), other
//     blocks set their masked scores to -inf. A row whose scores are all -inf gets out = 0,
//     lse = -inf and zero gradients (the online softmax shifts by 0 when its max is -inf).
//
// Design (FlashAttention-2 on a CPU):
//   - Tiles of kBlockQ queries x kBlockK keys. The Tq x Tk score matrix never exists; extra
//     memory is a few tiles per thread, the thread's packed copies of one (batch, kv head)'s
//     tiles (TileCache, at most kTileCacheBytes each) and, in backward, D_i = <dout_i, out_i>
//     (B, H, Tq) plus, in the single-pass scheme, one (Tk, D) fp32 dk and dv per thread.
//     The dropout mask is never stored either: its keep decision is a hash of (seed, b, h, i,
//     j), recomputed per tile from one key per row and one per column.
//   - Each tile of q, k, v (and dout) is first packed into acc-type buffers: any dtype and
//     any strides (padded or packed rows) become one dense layout, q is pre-multiplied by the
//     scale, and key counts / head dims are zero-padded to the vector width, so one GEMM
//     primitive serves all products. Key tiles (and backward's q / dout tiles) are packed
//     once per thread and (batch, kv head) and reused by the thread's next tasks (TileCache):
//     re-packing them per task cost ~15% of forward.
//   - Every product is C (+)= A B with B row-major (the packed k^T, v, v^T or dout) and A
//     read through a row and a column stride, so p^T and ds^T in backward are read in place.
//     The AVX-512 micro-kernel keeps 24 zmm accumulators (6 x 64 floats of C) and runs at
//     ~170 GFLOP/s per core on the dev machine (Sapphire Rapids; torch's sgemm: ~150); the
//     AVX2 one keeps a 6 x 16 block in 12 ymm registers.
//   - Forward: parallel over (batch, head, query block), query blocks counted on the longest
//     sequence (blocks past a sequence's end do nothing); online softmax keeps per-row max m
//     and sum l and rescales the fp32 output tile when m grows (the AVX-512 path only when a
//     score exceeds m by more than 8, see online_softmax_row); key blocks that the mask
//     excludes for every row of the tile are skipped (causal / window, key padding).
//   - Backward: D first, then one of two schemes with the same tiles, products and summation
//     orders (so the same bits for any thread count):
//       single pass: one task per (batch, kv head) loops over the group's query heads and
//       query blocks and forms dq, dk and dv from one recomputation of p and ds (5 tile
//       products); dk / dv of the slice accumulate in per-thread fp32 rows;
//       two passes: dk/dv parallel over (batch, kv head, key block), then dq parallel over
//       (batch, head, query block), recomputing p and ds in both (7 products), for problems
//       with too few (batch, kv head) pairs to keep the threads busy (MQA, batch 1).
//     No atomics, no per-thread dq copies. Keys stored past seqused_k get dk = dv = 0.
//   - Four instruction paths, chosen at run time (common/cpu_features.h): AVX-512
//     (attention_cpu_avx512.h) and AVX2/FMA for the float acc type, a portable scalar path
//     (also the float64 path), and for bfloat16 on CPUs with AMX-BF16 (float16 on CPUs with
//     AMX-FP16 as well: Granite Rapids and later) the AMX path (its own section below,
//     attention_cpu_amx.h): tiles packed as stored, the products on the AMX tile unit, p and
//     ds rounded to the input's type before theirs (as FlashAttention and torch's CPU kernel
//     do), everything else float32. Elsewhere (but see vdpbf16ps below) bfloat16 / float16
//     inputs are widened to fp32 tiles when packed and computed like float32 (fp32
//     products, no rounding of p). float16 stays there on AMX-BF16-only machines (Sapphire
//     Rapids): rounding float16 inputs to bfloat16 would lose 3 bits torch keeps, and
//     splitting them into two bfloat16 parts would triple the products.
//     On CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and later), bfloat16 runs the
//     same AMX-path templates with their products on vdpbf16ps instead of tiles
//     (attention_cpu_amx.h's DotEngine, path "avx512-bf16"): the same packed operands, p
//     and ds rounded alike; on a Zen 4 core 1.7-1.9x the widened float32 path. On Sapphire
//     Rapids vdpbf16ps measured 0.52 ns per instruction (123 GFLOP/s against ~185 for two
//     FMA ports), so CPUs with AMX-BF16 take it only when FASTLLM_CPU_ISA=avx512bf16 asks.
//     For tests, FASTLLM_CPU_EMULATE_AMX=1 runs the float32 split and float16 tile paths on
//     a CPU without their tiles the same way, with DotEngine's emulated products (paths
//     "amx-bf16x6-emu", "amx-fp16-emu"; never for production).
//   - Decoding (a forward without backward with at most kDecodeMaxRows query rows per
//     (batch, kv head): a token or a few against a KV cache) takes a kernel of its own on
//     AVX-512 and AVX2 (attention_cpu_decode.inc; its section below): scores straight from
//     the cached rows in storage order, an online softmax over 64-key chunks, each sequence's
//     keys split into ranges joined at the end.
//
//   - Every scratch buffer (packed tiles, score, p and output tiles, the backward's row
//     buffers) is a cpu::AlignedVector: 64-byte aligned, so its 64-byte rows are whole cache
//     lines. As std::vectors they were 16-byte aligned (an mmapped one 16 bytes into its
//     page), so vector loads and stores and AMX tile rows split across two lines, by an amount
//     that changed from process to process: bf16 B1 H8 T4096 D128 fwd took 104-133 ms by
//     process before, 78-85 after (SDPA 112-118 in the same processes; outputs bit-equal).
//
// Glossary: B, Tq, Tk, H, Hkv, D as in attention.h (Tq, Tk the maxima of packed batches);
// Tq_b / Tk_b the query / used key counts of sequence b; T = storage dtype, Acc = acc type;
// mq / nk = the rows of a query / key tile, Np = nk padded to kColPad, Dp = D padded to
// kColPad (the padding is zeros, so it adds nothing to any product).
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_aligned.h"
#include "common/cpu_dispatch.h"
#include "common/cpu_dtypes.h"
#include "common/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include "attention/attention_cpu_amx.h"
#include "attention/attention_cpu_avx512.h"
#include "common/cpu_avx2.h"
#include "common/gemm_avx2.h"
#define FASTLLM_ATTENTION_CPU_X86 1
#endif

namespace fastllm {
namespace attention {
namespace {

// Storage types, to_acc / from_acc, dispatch_dtype (common/cpu_*.h).
using namespace cpu;

// Tiles of 128 queries x 64 keys. Packing a key tile costs O(kBlockK * D) per query tile, so
// taller query tiles amortise it better (64 rows measured clearly slower than 128 on the dev
// machine; 256 was no better than 128 and halves the parallel tasks). A thread's tiles (q,
// dout, s, dp, k, v, accumulators) take about 400 KiB at D = 128: L2-resident on current
// x86 server cores (1-2 MiB L2).
constexpr int kBlockQ = 128;
constexpr int kBlockK = 64;
// The vector width that tiles pad their key count and head dim to (16 floats: AVX-512).
constexpr int kColPad = 16;

int round_up(int64_t n, int to) { return static_cast<int>((n + to - 1) / to * to); }

// ---- sequences, rows and the mask ----------------------------------------------------------

// Lengths of sequence b (attention.h's per-sequence lengths).
struct SeqLens {
  int64_t q;         // Tq_b
  int64_t k;         // Tk_b: the keys used (seqused_k wins over the stored count)
  int64_t k_stored;  // the key rows stored for b (dk / dv are written for all of them)
};

SeqLens seq_lens(const Problem& p, int64_t b) {
  const int64_t q =
      p.cu_seqlens_q != nullptr ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.seqlen_q;
  const int64_t k_stored =
      p.cu_seqlens_k != nullptr ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.seqlen_k;
  const int64_t k = p.seqused_k != nullptr ? p.seqused_k[b] : k_stored;
  return {q, k, k_stored};
}

// Where lse row (b, h, 0) lives (attention.h's lse indexing).
int64_t lse_offset(const Problem& p, int64_t b, int64_t h) {
  return b * p.lse_stride_b + h * p.lse_stride_h +
         (p.cu_seqlens_q != nullptr ? p.cu_seqlens_q[b] : 0);
}

// Task `task` of a loop over (batch, head, query block) with q_blocks blocks of kBlockQ rows
// per (batch, head): its batch b, head h, first row i0, sequence b's lengths and the rows mq
// of the block (0: the block lies past the sequence's queries, nothing to do).
struct QueryBlock {
  int64_t b, h, i0;
  SeqLens len;
  int mq;
};

QueryBlock query_block(const Problem& p, int64_t task, int64_t q_blocks) {
  QueryBlock t;
  if (p.attn_bias != nullptr && p.bias_stride_b == 0) {
    // A bias shared by the batch (a T5 relative-position bias, (1, H, Tq, Tk)): a head's
    // tasks for every sequence in a row, so that its bias rows are read from memory once and
    // then from L2 (batch-major, a float32 B8 H12 T512 bias was read 8 times from memory:
    // ~15 % of the call).
    t.b = task / q_blocks % p.batch;
    t.h = task / q_blocks / p.batch;
  } else {
    t.h = task / q_blocks % p.num_heads;
    t.b = task / q_blocks / p.num_heads;
  }
  t.i0 = task % q_blocks * kBlockQ;
  t.len = seq_lens(p, t.b);
  t.mq = t.i0 >= t.len.q ? 0 : static_cast<int>(std::min<int64_t>(kBlockQ, t.len.q - t.i0));
  return t;
}

// A (B, T, heads, D) tensor seen as rows of D elements: row (b, t, h) of a padded batch at
// b * stride.b + t * stride.t + h * stride.h, of a packed one at (cu_seqlens[b] + t) *
// stride.t + h * stride.h. E is the element type, const for inputs.
template <class E>
struct Rows {
  E* base;
  Strides4 stride;
  const int32_t* cu_seqlens;  // nullptr: padded

  Rows(std::conditional_t<std::is_const_v<E>, const void*, void*> data, const Strides4& s,
       const int32_t* cu)
      : base(static_cast<E*>(data)), stride(s), cu_seqlens(cu) {}
  E* row(int64_t b, int64_t t, int64_t h) const {
    const int64_t first = cu_seqlens != nullptr ? cu_seqlens[b] * stride.t : b * stride.b;
    return base + first + t * stride.t + h * stride.h;
  }
};

// The band of keys [begin, end) a query row of one sequence may see (attention.h's mask).
struct Mask {
  int64_t offset;  // Tk_b - Tq_b
  int64_t left;    // -1: unbounded
  int64_t right;   // -1: unbounded
  int64_t seqlen_q, seqlen_k;

  Mask(const Problem& p, const SeqLens& len)
      : offset(len.k - len.q),
        left(p.window_left),
        right(p.causal ? (p.window_right < 0 ? 0 : std::min<int64_t>(p.window_right, 0))
                       : p.window_right),
        seqlen_q(len.q),
        seqlen_k(len.k) {}

  int64_t key_begin(int64_t i) const {
    return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, seqlen_k);
  }
  int64_t key_end(int64_t i) const {
    return right < 0 ? seqlen_k : std::clamp<int64_t>(i + offset + right + 1, 0, seqlen_k);
  }
  // Queries [begin, end) that see at least one key of [j0, j1).
  int64_t query_begin(int64_t j0) const {
    return right < 0 ? 0 : std::clamp<int64_t>(j0 - offset - right, 0, seqlen_q);
  }
  int64_t query_end(int64_t j1) const {
    return left < 0 ? seqlen_q : std::clamp<int64_t>(j1 - offset + left, 0, seqlen_q);
  }
};

// ---- packing: strided storage <-> dense acc-type tiles -----------------------------------

// dst[r * Dp + c] = scale * row (b, t0 + r, h)[c] for r < rows, c < D; zero padding up to
// rows_padded x Dp.
template <class Ops, class T, class Acc>
void pack_rows(const Rows<const T>& src, int64_t b, int64_t t0, int64_t h, int rows,
               int rows_padded, int D, int Dp, Acc scale, Acc* dst) {
  const T* first = src.row(b, t0, h);
  const int64_t stride_d = src.stride.d;
  for (int r = 0; r < rows_padded; ++r) {
    Acc* out = dst + static_cast<int64_t>(r) * Dp;
    if (r >= rows) {
      std::fill_n(out, Dp, Acc(0));
      continue;
    }
    const T* in = first + r * src.stride.t;
    if (stride_d == 1) {  // the usual layout: the path's vector widening
      Ops::load_scaled(in, D, scale, out);
    } else {
      for (int c = 0; c < D; ++c) out[c] = scale * to_acc(in[c * stride_d]);
    }
    std::fill(out + D, out + Dp, Acc(0));
  }
}

// dst[c * Np + r] = row (b, t0 + r, h)[c]: the transposed tile (k^T, v^T), zero-padded.
// Reads go along the rows of src (contiguous in the usual layout), writes down the columns
// of dst. An instruction path may transpose float tiles itself (Ops::transpose_floats, the
// AVX-512 gathers); it returns false where it does not apply.
template <class Ops, class T, class Acc>
void pack_transposed(const Rows<const T>& src, int64_t b, int64_t t0, int64_t h, int rows,
                     int Np, int D, int Dp, Acc* dst) {
  const T* first = src.row(b, t0, h);
  const int64_t stride_d = src.stride.d;
  if constexpr (requires { &Ops::transpose_floats; }) {
    if constexpr (std::is_same_v<T, float>) {
      if (Ops::transpose_floats(first, src.stride.t, stride_d, rows, Np, D, Dp, dst)) return;
    } else if (stride_d == 1) {
      // 16-bit rows: widened into float rows first, then transposed as floats (a scalar
      // widening per element took ~10 % of the AVX-512 float16 forward + backward).
      thread_local cpu::UninitAlignedVector<float> widened;  // written before read
      if (widened.size() < static_cast<size_t>(rows) * D) widened.resize(rows * D);
      for (int r = 0; r < rows; ++r) {
        Ops::load_scaled(first + r * src.stride.t, D, 1.0f, widened.data() + r * D);
      }
      if (Ops::transpose_floats(widened.data(), D, 1, rows, Np, D, Dp, dst)) return;
    }
  }
  std::fill_n(dst, static_cast<int64_t>(Dp) * Np, Acc(0));
  for (int r = 0; r < rows; ++r) {
    const T* in = first + r * src.stride.t;
    for (int c = 0; c < D; ++c) dst[static_cast<int64_t>(c) * Np + r] = to_acc(in[c * stride_d]);
  }
}

// row (b, t0 + r, h)[c] = scale * src[r * Dp + c] for r < rows, c < D. Contiguous rows take
// the instruction path's vector conversion (Ops::store_scaled: rounded as from_acc rounds);
// the scalar float16 rounding took ~7 cycles an element, a quarter of the float16 AMX
// forward's time (B2 H8 T1024 D64, one thread) and a third of its backward's.
template <class Ops, class T, class Acc>
void store_rows(const Acc* src, int Dp, int rows, int D, Acc scale, const Rows<T>& dst,
                int64_t b, int64_t t0, int64_t h) {
  T* first = dst.row(b, t0, h);
  const int64_t stride_d = dst.stride.d;
  for (int r = 0; r < rows; ++r) {
    const Acc* in = src + static_cast<int64_t>(r) * Dp;
    T* out = first + r * dst.stride.t;
    if (stride_d == 1) {
      Ops::store_scaled(in, D, scale, out);
    } else {
      for (int c = 0; c < D; ++c) out[c * stride_d] = from_acc<T>(scale * in[c]);
    }
  }
}

// A thread's packed tiles of one (batch, kv head) slice -- the k^T / v tiles of every key
// block, or the q / dout tiles of every query block of the group's heads -- packed on first
// use and reused by the thread's following tasks on the same slice. Tasks run in (batch,
// head, block) order, so a thread packs a slice's tiles about once instead of once per task
// (packing took ~15% of forward when each query block repacked its keys). Packing is a pure
// copy, so results do not depend on which thread packed. A slice larger than
// kTileCacheBytes is not cached: its tiles are repacked into one scratch tile at each use.
constexpr int64_t kTileCacheBytes = int64_t{32} << 20;

template <class Acc>
class TileCache {
 public:
  TileCache(int64_t tiles, int64_t tile_elems)
      : tile_elems_(tile_elems),
        cached_(tiles * tile_elems * static_cast<int64_t>(sizeof(Acc)) <= kTileCacheBytes),
        data_(cached_ ? tiles * tile_elems : tile_elems),
        packed_(cached_ ? tiles : 0, 0) {}

  // True when the slice's tiles are kept (consecutive tiles then lie back to back).
  bool cached() const { return cached_; }

  // Tile `tile` of slice `slice`; pack(Acc* dst) fills it when it is not packed yet.
  template <class Pack>
  const Acc* get(int64_t slice, int64_t tile, Pack&& pack) {
    if (!cached_) {
      pack(data_.data());
      return data_.data();
    }
    if (slice != slice_) {
      std::fill(packed_.begin(), packed_.end(), 0);
      slice_ = slice;
    }
    Acc* dst = data_.data() + tile * tile_elems_;
    if (!packed_[tile]) {
      pack(dst);
      packed_[tile] = 1;
    }
    return dst;
  }

 private:
  int64_t tile_elems_;
  bool cached_;
  cpu::UninitAlignedVector<Acc> data_;  // a tile is read only once pack() has written it
  std::vector<char> packed_;
  int64_t slice_ = -1;
};

// ---- tile primitives, portable scalar path -----------------------------------------------
// gemm:            C[m][n] (+)= sum_k A[m * a_rs + k * a_ks] * B[k * ldb + n]
// online_softmax:  forward's update of one score tile S (M x N, row-major) into the
//                  running max m, sum l and output tile O (M x Dp); S becomes p.
// softmax_grad:    backward's p = exp(S - lse) into S and ds = p (dP - D) into dP.
// begin[r], end[r] are row r's allowed keys relative to the tile (begin >= end: none).

template <class Acc>
struct ScalarOps {
  // out[c] = scale * in[c] in Acc for c < n.
  template <class T>
  static void load_scaled(const T* in, int n, Acc scale, Acc* out) {
    for (int c = 0; c < n; ++c) out[c] = scale * to_acc(in[c]);
  }
  // row[c] += in[c] in Acc for c < n.
  template <class T>
  static void add_to(const T* in, int n, Acc* row) {
    for (int c = 0; c < n; ++c) row[c] += to_acc(in[c]);
  }
  // out[c] = T(scale * in[c]) for c < n.
  template <class T>
  static void store_scaled(const Acc* in, int n, Acc scale, T* out) {
    for (int c = 0; c < n; ++c) out[c] = from_acc<T>(scale * in[c]);
  }

  static void gemm(int M, int N, int K, const Acc* A, int64_t a_rs, int64_t a_ks, const Acc* B,
                   int64_t ldb, Acc* C, int64_t ldc, bool accumulate) {
    for (int m = 0; m < M; ++m) {
      Acc* c = C + m * ldc;
      if (!accumulate) std::fill_n(c, N, Acc(0));
      for (int k = 0; k < K; ++k) {
        const Acc a = A[m * a_rs + k * a_ks];
        const Acc* b = B + k * ldb;
        for (int n = 0; n < N; ++n) c[n] += a * b[n];
      }
    }
  }

  static void online_softmax(Acc* S, int M, int N, const int* begin, const int* end, Acc* m,
                             Acc* l, Acc* O, int Dp) {
    for (int r = 0; r < M; ++r) {
      Acc* s = S + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r]) {
        std::fill_n(s, N, Acc(0));
        continue;
      }
      Acc row_max = -std::numeric_limits<Acc>::infinity();
      for (int j = begin[r]; j < end[r]; ++j) row_max = std::max(row_max, s[j]);
      const Acc m_new = std::max(m[r], row_max);
      // 0 while the row had no finite score yet; a max of -inf (every score so far -inf, an
      // additive mask) shifts by 0, so exp(-inf - shift) = 0, never exp(-inf + inf) = NaN.
      const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
      const Acc alpha = m[r] == neg_inf ? Acc(0) : std::exp(m[r] - m_new);
      const Acc shift = m_new == neg_inf ? Acc(0) : m_new;
      Acc sum = 0;
      for (int j = 0; j < N; ++j) {
        s[j] = j >= begin[r] && j < end[r] ? std::exp(s[j] - shift) : Acc(0);
        sum += s[j];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      Acc* o = O + static_cast<int64_t>(r) * Dp;
      for (int c = 0; c < Dp; ++c) o[c] *= alpha;
    }
  }

  static void softmax_grad(Acc* S, Acc* dP, int M, int N, const int* begin, const int* end,
                           const Acc* lse, const Acc* D) {
    for (int r = 0; r < M; ++r) {
      Acc* s = S + static_cast<int64_t>(r) * N;
      Acc* dp = dP + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r] || std::isinf(lse[r])) {
        std::fill_n(s, N, Acc(0));
        std::fill_n(dp, N, Acc(0));
        continue;
      }
      for (int j = 0; j < N; ++j) {
        const Acc p = j >= begin[r] && j < end[r] ? std::exp(s[j] - lse[r]) : Acc(0);
        s[j] = p;
        dp[j] = p * (dp[j] - D[r]);
      }
    }
  }
};

// ---- tile primitives, AVX2 / FMA path (float acc type) -----------------------------------

#if defined(FASTLLM_ATTENTION_CPU_X86)
FASTLLM_AVX2_BEGIN

// Rows of the micro-kernel: 6 x 16 floats of C stay in 12 registers, enough independent
// FMA chains to cover the FMA latency (about 5 cycles) on both FMA ports (10 in flight), and
// each k step is 12 FMAs for 2 vector loads and 6 broadcasts. 4 x 16 (8 chains) ran at 80%.
constexpr int kMicroRows = 6;

// C[0..R)[0..8 NV) (+)= A B over K, with the C block in R * NV registers.
template <int R, int NV>
FASTLLM_INLINE void gemm_tile_avx2(int K, const float* A, int64_t a_rs, int64_t a_ks,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  __m256 c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * a_rs + k * a_ks);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
  }
}

template <int R>
FASTLLM_INLINE void gemm_rows_avx2(int N, int K, const float* A, int64_t a_rs, int64_t a_ks,
                                   const float* B, int64_t ldb, float* C, int64_t ldc,
                                   bool accumulate) {
  int n = 0;
  for (; n + 16 <= N; n += 16) {
    gemm_tile_avx2<R, 2>(K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
  }
  if (n < N) gemm_tile_avx2<R, 1>(K, A, a_rs, a_ks, B + n, ldb, C + n, ldc, accumulate);
}

struct Avx2Ops {
  // out[c] = scale * float(in[c]) for c < n.
  template <class T>
  static void load_scaled(const T* in, int n, float scale, float* out) {
    const __m256 vscale = _mm256_set1_ps(scale);
    int c = 0;
    for (; c + 8 <= n; c += 8) {
      _mm256_storeu_ps(out + c, _mm256_mul_ps(cpu::avx2::load(in + c), vscale));
    }
    for (; c < n; ++c) out[c] = scale * to_acc(in[c]);
  }
  // row[c] += float(in[c]) for c < n.
  template <class T>
  static void add_to(const T* in, int n, float* row) {
    int c = 0;
    for (; c + 8 <= n; c += 8) {
      _mm256_storeu_ps(row + c, _mm256_add_ps(_mm256_loadu_ps(row + c), cpu::avx2::load(in + c)));
    }
    for (; c < n; ++c) row[c] += to_acc(in[c]);
  }
  // out[c] = T(scale * in[c]) for c < n (cpu::avx2's rounding: from_acc's).
  template <class T>
  static void store_scaled(const float* in, int n, float scale, T* out) {
    const __m256 vscale = _mm256_set1_ps(scale);
    int c = 0;
    for (; c + 8 <= n; c += 8) {
      cpu::avx2::store(out + c, _mm256_mul_ps(_mm256_loadu_ps(in + c), vscale));
    }
    if (c < n) {
      cpu::avx2::storen(out + c, _mm256_mul_ps(cpu::avx2::loadn(in + c, n - c), vscale), n - c);
    }
  }

  // dst[c * Np + r] = first[r * stride_t + c] (pack_transposed's tiles: k^T, and in backward
  // k^T and v^T; 16-bit rows widened to floats first), zero-padded, by 8 x 8 register
  // transposes (cpu::avx2::transpose_rows); false for strided columns (pack_transposed's
  // scalar loop then). The scalar loop was 5 % of the float32 forward's kernel time at B2 H8
  // T1024 D64 on a Zen 5 core held to AVX2 (perf); the forward went 43.0 -> 41.4 ms
  // (benchmarks/results/2026-12-06-cpu-attention-avx2-transpose-ab-zen5.txt).
  static bool transpose_floats(const float* first, int64_t stride_t, int64_t stride_d,
                               int rows, int Np, int D, int Dp, float* dst) {
    if (stride_d != 1) return false;
    cpu::avx2::transpose_rows(first, stride_t, rows, Np, D, Dp, dst, [](int, int) {});
    return true;
  }

  // N must be a multiple of 8 (tiles pad to kColPad).
  static void gemm(int M, int N, int K, const float* A, int64_t a_rs, int64_t a_ks,
                   const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
    int m = 0;
    for (; m + kMicroRows <= M; m += kMicroRows) {
      gemm_rows_avx2<kMicroRows>(N, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc,
                                 accumulate);
    }
    A += m * a_rs;
    C += m * ldc;
    switch (M - m) {
      case 0: return;
      case 1: return gemm_rows_avx2<1>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      case 2: return gemm_rows_avx2<2>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      case 3: return gemm_rows_avx2<3>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      case 4: return gemm_rows_avx2<4>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      default: return gemm_rows_avx2<5>(N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
    }
  }

  // N and Dp are multiples of 8. The AVX-512 path's scheme (attention_cpu_avx512.h's
  // online_softmax) on 8 lanes: columns outside [begin[r], end[r]) are set to -inf and come
  // out of the exp as exact zeros; the running max is only raised when a score exceeds it by
  // more than 8 (so p <= e^8; the common step skips the horizontal max, alpha and the
  // rescale of the output row); the rows' sums of p are added to l 8 at a time by one
  // transposing reduction. Before (a max and a sum reduced per row, every row rescaled when
  // its max moved at all) this function took 22 % of the float32 forward's gemm time at B2 H8
  // T1024 D64 on one Zen 4 core held to AVX2, 17 % after (perf); the full forwards went
  // 1.02-1.06x -> 1.08-1.12x torch's SDPA on its AVX2 code (benchmarks/results/
  // 2026-12-05-*-attention-fp32-avx2-held-*). (With the row's trip count fixed at 64 keys, as
  // the AVX-512 path has it, the unrolled loop spilled: 16 ymm registers do not hold the
  // exp's constants 8 times over.)
  static void online_softmax(float* S, int M, int N, const int* begin, const int* end,
                             float* m, float* l, float* O, int Dp) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r0 = 0; r0 < M; r0 += 8) {
      const int rows = std::min(8, M - r0);
      __m256 sums[8];
      for (int i = 0; i < 8; ++i) {
        const int r = r0 + i;
        sums[i] = _mm256_setzero_ps();
        if (i >= rows) continue;
        float* s = S + static_cast<int64_t>(r) * N;
        float* o = O + static_cast<int64_t>(r) * Dp;
        if (begin[r] >= end[r]) {
          std::fill_n(s, N, 0.0f);
        } else {
          std::fill(s, s + begin[r], neg_inf);
          std::fill(s + end[r], s + N, neg_inf);
          sums[i] = online_softmax_row(s, N, m[r], l[r], o, Dp);
        }
      }
      float row_sum[8];
      _mm256_storeu_ps(row_sum, row_sums(sums));
      for (int i = 0; i < rows; ++i) l[r0 + i] += row_sum[i];
    }
  }

  // Lane i = the sum of the 8 lanes of v[i]: pairs of rows, then quads, within 128-bit
  // halves, then across them. (The AVX2 decode kernel's too, avx2_decode::DecodeVec.)
  FASTLLM_INLINE static __m256 row_sums(const __m256 (&v)[8]) {
    __m256 pairs[4], quads[2];
    for (int i = 0; i < 4; ++i) {
      pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                               _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    }
    for (int i = 0; i < 2; ++i) {
      quads[i] = _mm256_add_ps(_mm256_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                               _mm256_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
    }
    // quads[k]: half h holds rows 4k .. 4k + 3 summed over half h's lanes.
    return _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                         _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
  }

  // One row of online_softmax (its masked columns already -inf). Returns the row's p summed
  // per lane; l is only rescaled here.
  FASTLLM_INLINE static __m256 online_softmax_row(float* s, int N, float& m, float& l,
                                                  float* o, int Dp) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    __m256 vmax = _mm256_set1_ps(neg_inf);
    for (int j = 0; j < N; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
    constexpr float kMaxGrowth = 8.0f;
    if (_mm256_movemask_ps(_mm256_cmp_ps(vmax, _mm256_set1_ps(m + kMaxGrowth), _CMP_GT_OQ))) {
      const float m_new = std::max(m, cpu::avx2::hmax(vmax));
      // 0 while the row had no finite score yet.
      const float alpha = m == neg_inf ? 0.0f : std::exp(m - m_new);
      l *= alpha;
      const __m256 va = _mm256_set1_ps(alpha);
      for (int c = 0; c < Dp; c += 8) {
        _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), va));
      }
      m = m_new;
    }
    // A max of -inf (every score so far -inf) shifts by 0: p = e^(-inf) = 0, not NaN.
    const __m256 vm = _mm256_set1_ps(m == neg_inf ? 0.0f : m);
    __m256 vsum = _mm256_setzero_ps();
    for (int j = 0; j < N; j += 8) {
      const __m256 p = cpu::avx2::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
      _mm256_storeu_ps(s + j, p);
      vsum = _mm256_add_ps(vsum, p);
    }
    return vsum;
  }

  // x <- z x on the first nk columns of a rows x Np tile (ScoreMods::drop): attention.h's
  // keep hash on 8 uint32 lanes, the same bits as dropout_keep. AVX2 has no unsigned
  // compare: u >= threshold iff max_epu32(u, threshold) == u.
  static void dropout(float* x, int rows, int Np, int nk, const uint32_t* row_keys,
                      const uint32_t* col_keys, uint32_t threshold, float keep_scale) {
    const __m256i vthreshold = _mm256_set1_epi32(static_cast<int32_t>(threshold));
    const __m256i mul1 = _mm256_set1_epi32(static_cast<int32_t>(0x7feb352du));
    const __m256i mul2 = _mm256_set1_epi32(static_cast<int32_t>(0x846ca68bu));
    const __m256 vscale = _mm256_set1_ps(keep_scale);
    const int nk_vec = nk / 8 * 8;
    for (int r = 0; r < rows; ++r) {
      float* row = x + static_cast<int64_t>(r) * Np;
      const __m256i row_key = _mm256_set1_epi32(static_cast<int32_t>(row_keys[r]));
      for (int c = 0; c < nk_vec; c += 8) {
        __m256i u = _mm256_xor_si256(
            row_key, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_keys + c)));
        u = _mm256_xor_si256(u, _mm256_srli_epi32(u, 16));
        u = _mm256_mullo_epi32(u, mul1);
        u = _mm256_xor_si256(u, _mm256_srli_epi32(u, 15));
        u = _mm256_mullo_epi32(u, mul2);
        u = _mm256_xor_si256(u, _mm256_srli_epi32(u, 16));
        const __m256 keep = _mm256_castsi256_ps(
            _mm256_cmpeq_epi32(_mm256_max_epu32(u, vthreshold), u));
        _mm256_storeu_ps(row + c,
                         _mm256_and_ps(keep, _mm256_mul_ps(_mm256_loadu_ps(row + c), vscale)));
      }
      for (int c = nk_vec; c < nk; ++c) {
        row[c] = dropout_keep(row_keys[r], col_keys[c], threshold) ? row[c] * keep_scale : 0.0f;
      }
    }
  }

  static void softmax_grad(float* S, float* dP, int M, int N, const int* begin, const int* end,
                           const float* lse, const float* D) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < M; ++r) {
      float* s = S + static_cast<int64_t>(r) * N;
      float* dp = dP + static_cast<int64_t>(r) * N;
      if (begin[r] >= end[r] || std::isinf(lse[r])) {
        std::fill_n(s, N, 0.0f);
        std::fill_n(dp, N, 0.0f);
        continue;
      }
      std::fill(s, s + begin[r], neg_inf);
      std::fill(s + end[r], s + N, neg_inf);
      const __m256 vlse = _mm256_set1_ps(lse[r]);
      const __m256 vd = _mm256_set1_ps(D[r]);
      for (int j = 0; j < N; j += 8) {
        const __m256 p = cpu::avx2::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vlse));
        _mm256_storeu_ps(s + j, p);
        _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), vd)));
      }
    }
  }
};

// The decode kernel (attention_cpu_decode.inc) on AVX2: 8 keys at a time.
namespace avx2_decode {

struct DecodeVec {
  using R = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kPvCols = 2;  // 4 rows x 16 columns: 8 of the 16 registers
  static constexpr bool kBf16Dot = false;
  FASTLLM_INLINE static R zero() { return _mm256_setzero_ps(); }
  FASTLLM_INLINE static R set1(float x) { return _mm256_set1_ps(x); }
  FASTLLM_INLINE static R add(R a, R b) { return _mm256_add_ps(a, b); }
  FASTLLM_INLINE static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  FASTLLM_INLINE static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  // (max(a, b) with b NaN gives NaN, as the AVX-512 path's max does.)
  FASTLLM_INLINE static R max(R a, R b) { return _mm256_max_ps(a, b); }
  FASTLLM_INLINE static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  FASTLLM_INLINE static R loadu(const float* p) { return _mm256_loadu_ps(p); }
  FASTLLM_INLINE static void storeu(float* p, R v) { _mm256_storeu_ps(p, v); }
  template <class T>
  FASTLLM_INLINE static R load(const T* p) { return cpu::avx2::load(p); }
  template <class T>
  FASTLLM_INLINE static R loadn(const T* p, int n) { return cpu::avx2::loadn(p, n); }
  FASTLLM_INLINE static void store_first(float* p, R v, int n) { cpu::avx2::storen(p, v, n); }
  // v with the lanes j + i outside [b, e) set to fill.
  FASTLLM_INLINE static R band(R v, int j, int b, int e, float fill) {
    const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(j),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i in = _mm256_andnot_si256(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(b), col),  // not col < b
        _mm256_cmpgt_epi32(_mm256_set1_epi32(e), col));  // col < e
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(in));
  }
  FASTLLM_INLINE static float reduce_max(R v) { return cpu::avx2::hmax(v); }
  FASTLLM_INLINE static float reduce_add(R v) { return cpu::avx2::hsum(v); }
  FASTLLM_INLINE static R row_sums(const R (&v)[8]) { return Avx2Ops::row_sums(v); }
  FASTLLM_INLINE static R exp(R x) { return cpu::avx2::exp_ps(x); }
  // (Never called: kBf16Dot is false.)
  static void score_bf16(const cpu::BFloat16*, const cpu::BFloat16*, int64_t, int, int, R,
                         float*) {}
};
using DecodeOps = Avx2Ops;

#include "attention/attention_cpu_decode.inc"

}  // namespace avx2_decode

FASTLLM_AVX2_END
#endif  // FASTLLM_ATTENTION_CPU_X86

// ---- the tiled algorithm, generic over dtype and instruction path ------------------------

// Rows [first, last) of a query tile that see at least one key of a key tile. The band is
// monotone in the query, so they are contiguous; the tile products skip the other rows,
// which is what makes causal and windowed attention cost about half / the window.
struct ActiveRows {
  int first, last;
  int count() const { return last - first; }
};

// The key padding mask of one key tile (KeyBlocks::tile): its live keys lie in [lo, hi)
// (relative to the tile); mixed: some key inside that range is masked too (then mask points
// at the tile's first mask byte, stride apart), else every key of [lo, hi) takes part.
// Without a mask: [0, kBlockK), not mixed.
struct KeyTile {
  int lo = 0, hi = kBlockK;
  const uint8_t* mask = nullptr;  // key_padding_mask, non-null iff mixed (and given)
  int64_t stride = 0;

  // The columns of a score tile that the products must form: [0, round_up(hi)), at most Np.
  int columns(int Np) const { return std::min(Np, round_up(hi, kColPad)); }

  // s[r][c] <- -inf for the masked keys c < ns of [lo, hi) (mixed tiles only; the band
  // already excludes the columns outside [lo, hi)). Rows of Ns scores.
  template <class Acc>
  void mask_scores(Acc* s, int rows, int Ns, int ns) const {
    if (mask == nullptr) return;
    const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
    for (int c = lo; c < std::min(hi, ns); ++c) {
      if (mask[c * stride] != 0) continue;
      for (int r = 0; r < rows; ++r) s[static_cast<int64_t>(r) * Ns + c] = neg_inf;
    }
  }
};

// key_padding_mask summarised per (batch, key block), O(B Tk) once per call: a block with no
// live key is skipped whole (right padding: the blocks past a sequence's length cost
// nothing), a block whose live keys are one range [lo, hi) narrows the rows' bands to it
// (exact zeros, no per-element work: every block of right or left padding), and only other
// blocks set their masked scores to -inf (KeyTile::mask_scores). An attn_bias broadcast over
// heads and queries (strides 0: BERT's additive (B, 1, 1, Tk) padding mask) counts too: a
// key whose bias is -inf is dead for every row of its sequence, so dropping it from the
// bands changes nothing (p = 0 and ds = 0 either way) but skips its blocks; such keys inside
// a mixed block get their -inf from the bias itself. T: the bias's storage type.
class KeyBlocks {
 public:
  template <class T>
  KeyBlocks(const Problem& p, int64_t k_blocks, const T* bias) : p_(p), k_blocks_(k_blocks) {
    const bool key_bias =
        bias != nullptr && p.bias_stride_q == 0 && p.bias_stride_h == 0;
    if (p.key_padding_mask == nullptr && !key_bias) return;
    auto live_key = [&](int64_t b, int64_t j) {
      if (p.key_padding_mask != nullptr &&
          p.key_padding_mask[b * p.kpm_stride_b + j * p.kpm_stride_k] == 0) {
        return false;
      }
      return !key_bias || to_acc(bias[b * p.bias_stride_b + j * p.bias_stride_k]) !=
                              -std::numeric_limits<AccOf<T>>::infinity();
    };
    lo_.resize(p.batch * k_blocks);
    hi_.resize(p.batch * k_blocks);
    mixed_.resize(p.batch * k_blocks);
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int64_t j0 = kb * kBlockK;
        const int nk = static_cast<int>(std::min<int64_t>(kBlockK, p.seqlen_k - j0));
        int lo = nk, hi = 0, live = 0;
        for (int c = 0; c < nk; ++c) {
          if (!live_key(b, j0 + c)) continue;
          lo = std::min(lo, c);
          hi = c + 1;
          ++live;
        }
        const int64_t e = b * k_blocks + kb;
        lo_[e] = lo < hi ? lo : 0;
        hi_[e] = lo < hi ? hi : 0;
        mixed_[e] = live > 0 && live < hi - lo;
      }
    }
  }

  // True when some block has a summary (key_padding_mask or a per-key bias); false: every
  // block is whole (tile() returns [0, kBlockK), not mixed) and none is dead.
  bool summarised() const { return !lo_.empty(); }

  // True when no key of block kb of sequence b takes part.
  bool dead(int64_t b, int64_t kb) const {
    return !lo_.empty() && hi_[b * k_blocks_ + kb] == 0;
  }
  KeyTile tile(int64_t b, int64_t kb) const {
    KeyTile t;
    if (lo_.empty()) return t;
    const int64_t e = b * k_blocks_ + kb;
    t.lo = lo_[e];
    t.hi = hi_[e];
    if (mixed_[e] && p_.key_padding_mask != nullptr) {
      t.mask = p_.key_padding_mask + b * p_.kpm_stride_b + kb * kBlockK * p_.kpm_stride_k;
      t.stride = p_.kpm_stride_k;
    }
    return t;
  }

 private:
  const Problem& p_;
  int64_t k_blocks_;
  std::vector<int> lo_, hi_;
  std::vector<char> mixed_;
};

// Allowed keys of query rows [i0, i0 + rows) relative to key tile [j0, j0 + nk), within the
// tile's live keys [kt.lo, kt.hi).
ActiveRows tile_bands(const Mask& mask, int64_t i0, int rows, int64_t j0, int nk,
                      const KeyTile& kt, int* begin, int* end) {
  ActiveRows active{rows, rows};
  const int lo = std::min(kt.lo, nk), hi = std::min(kt.hi, nk);
  for (int r = 0; r < rows; ++r) {
    begin[r] = static_cast<int>(std::clamp<int64_t>(mask.key_begin(i0 + r) - j0, lo, hi));
    end[r] = static_cast<int>(std::clamp<int64_t>(mask.key_end(i0 + r) - j0, lo, hi));
    if (begin[r] < end[r]) {
      active.first = std::min(active.first, r);
      active.last = r + 1;
    }
  }
  if (active.first == rows) active.first = active.last = 0;
  return active;
}

// dropout_col_key of keys [j0, j0 + nk): one mix per key, shared by every row and head.
void dropout_col_keys(int64_t j0, int nk, uint32_t* keys) {
  for (int c = 0; c < nk; ++c) keys[c] = dropout_col_key(j0 + c);
}

// What attention.h does to the scores of one (batch, query head) besides the product:
// soft-capping and ALiBi before the softmax, dropout after it. The soft-cap and ALiBi loops
// are scalar (the compiler vectorises the ALiBi one): they only run when their feature is
// on, and cost O(tile) against the O(tile * D) products. Dropout's hash (about 10 integer
// operations per element) is not negligible at that scale: the AVX2 and AVX-512 paths
// vectorise it (Ops::dropout): dropout_p > 0 then adds ~7% to forward and ~9% to backward
// (B2 H8 T1024 D64 fp32), against ~140% and ~125% with the scalar hash.
template <class Acc>
struct ScoreMods {
  Acc softcap;           // 0: off
  bool alibi;
  Acc alibi_slope;
  int64_t diagonal;      // Tk_b - Tq_b: ALiBi's distance is |i + diagonal - j|
  bool dropout;
  uint32_t head_key;     // dropout_head_key(seed, b, h, H)
  uint32_t threshold;    // dropout_threshold(dropout_p)
  Acc keep_scale;        // 1 / (1 - dropout_p)
  const void* bias;      // attn_bias (storage type), nullptr: off
  int64_t bias_offset;   // of element (b, h, 0, 0)
  int64_t bias_stride_q, bias_stride_k;

  ScoreMods(const Problem& p, int64_t b, int64_t h, const SeqLens& len)
      : softcap(static_cast<Acc>(p.softcap)),
        alibi(p.alibi_slopes != nullptr),
        alibi_slope(alibi ? static_cast<Acc>(p.alibi_slopes[b * p.alibi_stride_b + h]) : Acc(0)),
        diagonal(len.k - len.q),
        dropout(p.dropout_p > 0),
        head_key(dropout ? dropout_head_key(*p.dropout_seed, b, h, p.num_heads) : 0),
        threshold(dropout ? dropout_threshold(p.dropout_p) : 0),
        keep_scale(static_cast<Acc>(1.0 / (1.0 - p.dropout_p))),
        bias(p.attn_bias),
        bias_offset(b * p.bias_stride_b + h * p.bias_stride_h),
        bias_stride_q(p.bias_stride_q),
        bias_stride_k(p.bias_stride_k) {}

  // s[r][c] += attn_bias[b, h, i + r, j0 + c] for c < nk (after transform: the bias follows
  // the softcap and ALiBi); rows of Ns scores. T is the bias's storage type (q's); contiguous
  // bias rows go through the path's vector loads (Ops::add_to: this file's generic code is
  // built for baseline x86-64, 4 lanes; a few % of a float32 T5-bias forward).
  template <class T, class Ops>
  void add_bias(Acc* s, int rows, int Ns, int nk, int64_t i, int64_t j0) const {
    if (bias == nullptr) return;
    const T* first = static_cast<const T*>(bias) + bias_offset + i * bias_stride_q +
                     j0 * bias_stride_k;
    for (int r = 0; r < rows; ++r) {
      const T* in = first + r * bias_stride_q;
      Acc* row = s + static_cast<int64_t>(r) * Ns;
      if (bias_stride_k == 1) {
        Ops::add_to(in, nk, row);
      } else {
        for (int c = 0; c < nk; ++c) row[c] += to_acc(in[c * bias_stride_k]);
      }
    }
  }

  // Scores s (rows x Np; row r is query i + r, column c key j0 + c) before the softmax:
  // s <- softcap * tanh(s / softcap), then s -= slope * |i + r + diagonal - j0 - c|. With
  // dcap != nullptr it also gets the cap's derivative 1 - tanh^2 that backward multiplies
  // ds by (the ALiBi bias is constant: no factor).
  void transform(Acc* s, Acc* dcap, int rows, int Np, int64_t i, int64_t j0) const {
    const int64_t n = int64_t{rows} * Np;
    if (softcap > 0) {
      for (int64_t e = 0; e < n; ++e) {
        const Acc t = std::tanh(s[e] / softcap);
        s[e] = softcap * t;
        if (dcap != nullptr) dcap[e] = Acc(1) - t * t;
      }
    }
    if (alibi) {
      for (int r = 0; r < rows; ++r) {
        // Exact in float for distances below 2^24.
        const Acc distance0 = static_cast<Acc>(i + r + diagonal - j0);
        Acc* row = s + static_cast<int64_t>(r) * Np;
        for (int c = 0; c < Np; ++c) {
          row[c] -= alibi_slope * std::abs(distance0 - static_cast<Acc>(c));
        }
      }
    }
  }

  // dropout_row_key of queries [i0, i0 + rows).
  void row_keys(int64_t i0, int rows, uint32_t* keys) const {
    for (int r = 0; r < rows; ++r) keys[r] = dropout_row_key(head_key, i0 + r);
  }

  // x <- z x on the first nk columns of a rows x Np tile, z = keep / (1 - dropout_p); the
  // padding columns are masked (0) already. An instruction path may hash a vector of
  // columns at a time (Ops::dropout, the same bits); here one element at a time.
  template <class Ops>
  void drop(Acc* x, int rows, int Np, int nk, const uint32_t* row_keys,
            const uint32_t* col_keys) const {
    if constexpr (requires { &Ops::dropout; }) {
      Ops::dropout(x, rows, Np, nk, row_keys, col_keys, threshold, keep_scale);
    } else {
      for (int r = 0; r < rows; ++r) {
        Acc* row = x + static_cast<int64_t>(r) * Np;
        for (int c = 0; c < nk; ++c) {
          row[c] = dropout_keep(row_keys[r], col_keys[c], threshold) ? row[c] * keep_scale
                                                                     : Acc(0);
        }
      }
    }
  }
};

// The end of a forward query tile (rows [i0, i0 + mq) of (b, h)): lse = m + log(l), and
// out = o / l from the tile's Dp-wide float rows; a row without keys gets lse = -inf, out = 0.
template <class Ops, class T, class Acc>
void store_query_tile(const FwdParams& p, int64_t b, int64_t h, int64_t i0, int mq,
                      const Acc* m, const Acc* l, const Acc* o, int Dp, const Rows<T>& out) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  Acc* lse = static_cast<Acc*>(p.lse) + lse_offset(p, b, h) + i0;
  for (int r = 0; r < mq; ++r) {
    const bool any_key = l[r] > 0;
    lse[r] = any_key ? m[r] + std::log(l[r]) : neg_inf;
    store_rows<Ops>(o + r * Dp, Dp, 1, static_cast<int>(p.head_dim),
                    any_key ? Acc(1) / l[r] : Acc(0), out, b, i0 + r, h);
  }
}

// The end of backward's ds for `rows` rows of Ns columns: dbias rows (dbias_ld apart; nullptr:
// none) get ds before the softcap's derivative, for the ns real keys; then ds *= dcap
// (nullptr: no softcap).
template <class T, class Acc>
void finish_ds(Acc* dp, const Acc* dcap, int rows, int Ns, int ns, T* dbias, int64_t dbias_ld) {
  if (dbias != nullptr) {
    for (int r = 0; r < rows; ++r) {
      T* out = dbias + r * dbias_ld;
      const Acc* in = dp + static_cast<int64_t>(r) * Ns;
      for (int c = 0; c < ns; ++c) out[c] = from_acc<T>(in[c]);
    }
  }
  if (dcap != nullptr) {
    for (int64_t e = 0; e < int64_t{rows} * Ns; ++e) dp[e] *= dcap[e];
  }
}

template <class T, class Ops>
void attention_fwd_typed(const FwdParams& p) {
  using Acc = AccOf<T>;
  const int D = static_cast<int>(p.head_dim);
  const int Dp = round_up(D, kColPad);
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t q_blocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t k_blocks = (p.seqlen_k + kBlockK - 1) / kBlockK;
  const int64_t tasks = p.batch * p.num_heads * q_blocks;
  const Acc scale = static_cast<Acc>(p.softmax_scale);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const Rows<const T> q(p.q, p.stride_q, p.cu_seqlens_q), k(p.k, p.stride_k, p.cu_seqlens_k),
      v(p.v, p.stride_v, p.cu_seqlens_k);
  const Rows<T> out(p.out, p.stride_out, p.cu_seqlens_q);
  const KeyBlocks key_blocks(p, k_blocks, static_cast<const T*>(p.attn_bias));
#pragma omp parallel
  {
    cpu::AlignedVector<Acc> q_tile(kBlockQ * Dp), s_tile(kBlockQ * kBlockK), o_tile(kBlockQ * Dp);
    std::vector<Acc> m(kBlockQ), l(kBlockQ);
    TileCache<Acc> kt_tiles(k_blocks, Dp * kBlockK), v_tiles(k_blocks, kBlockK * Dp);
    int begin[kBlockQ], end[kBlockQ];
    uint32_t row_keys[kBlockQ], col_keys[kBlockK];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const QueryBlock t = query_block(p, task, q_blocks);
      if (t.mq == 0) continue;
      const int64_t b = t.b, h = t.h, hk = h / group, i0 = t.i0;
      const SeqLens len = t.len;
      const int mq = t.mq;
      const Mask mask(p, len);
      const ScoreMods<Acc> mods(p, b, h, len);
      pack_rows<Ops>(q, b, i0, h, mq, mq, D, Dp, scale, q_tile.data());
      if (mods.dropout) mods.row_keys(i0, mq, row_keys);
      std::fill_n(o_tile.data(), mq * Dp, Acc(0));
      std::fill_n(m.data(), mq, neg_inf);
      std::fill_n(l.data(), mq, Acc(0));
      // Keys any row of the tile may see (the band is monotone in i).
      const int64_t k_begin = mask.key_begin(i0);
      const int64_t k_end = mask.key_end(i0 + mq - 1);
      for (int64_t j0 = k_begin / kBlockK * kBlockK; j0 < k_end; j0 += kBlockK) {
        if (key_blocks.dead(b, j0 / kBlockK)) continue;
        const KeyTile key_tile = key_blocks.tile(b, j0 / kBlockK);
        const int nk = static_cast<int>(std::min<int64_t>(kBlockK, len.k - j0));
        const int Np = round_up(nk, kColPad);
        // The score columns formed: those up to the last live key (Np without a mask).
        const int Ns = key_tile.columns(Np);
        const int64_t slice = b * p.num_kv_heads + hk;
        const Acc* kt_tile = kt_tiles.get(slice, j0 / kBlockK, [&](Acc* dst) {
          pack_transposed<Ops>(k, b, j0, hk, nk, Np, D, Dp, dst);
        });
        const Acc* v_tile = v_tiles.get(slice, j0 / kBlockK, [&](Acc* dst) {
          pack_rows<Ops>(v, b, j0, hk, nk, Np, D, Dp, Acc(1), dst);
        });
        const ActiveRows rows = tile_bands(mask, i0, mq, j0, nk, key_tile, begin, end);
        const int r0 = rows.first;
        const int ns = std::min(nk, Ns);  // the real keys among the Ns columns
        Acc* s = s_tile.data() + r0 * Ns;
        Acc* o = o_tile.data() + r0 * Dp;
        Ops::gemm(rows.count(), Ns, Dp, q_tile.data() + r0 * Dp, Dp, 1, kt_tile, Np, s, Ns, false);
        mods.transform(s, nullptr, rows.count(), Ns, i0 + r0, j0);
        mods.template add_bias<T, Ops>(s, rows.count(), Ns, ns, i0 + r0, j0);
        key_tile.mask_scores(s, rows.count(), Ns, ns);
        Ops::online_softmax(s, rows.count(), Ns, begin + r0, end + r0, m.data() + r0,
                            l.data() + r0, o, Dp);
        if (mods.dropout) {  // after the softmax: l (and lse) keep the undropped sum
          dropout_col_keys(j0, nk, col_keys);
          mods.template drop<Ops>(s, rows.count(), Ns, ns, row_keys + r0, col_keys);
        }
        Ops::gemm(rows.count(), Dp, Ns, s, Ns, 1, v_tile, Dp, o, Dp, true);
      }
      store_query_tile<Ops>(p, b, h, i0, mq, m.data(), l.data(), o_tile.data(), Dp, out);
    }
  }
}

// A thread's tiles in backward: q, dout, kt, vt point at the packed input tiles of the
// current product (in the thread's TileCaches, or q_own / dout_own in the dq pass).
template <class Acc>
struct BwdTiles {
  const Acc *q = nullptr, *dout = nullptr, *kt = nullptr, *vt = nullptr;
  cpu::AlignedVector<Acc> q_own, dout_own, s, dp, dcap, dk, dv, dq;
  int begin[kBlockQ], end[kBlockQ];
  uint32_t row_keys[kBlockQ], col_keys[kBlockK];

  BwdTiles(int Dp, bool softcap)
      : q_own(kBlockQ * Dp),
        dout_own(kBlockQ * Dp),
        s(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK),
        dcap(softcap ? kBlockQ * kBlockK : 0),
        dk(kBlockK * Dp),
        dv(kBlockK * Dp),
        dq(kBlockQ * Dp) {}
};

// The recomputed tile of backward: t.s <- p (undropped), t.dp <- ds for the query tile in
// t.q, t.dout (rows [i0, i0 + mq)) against the key tile in t.kt, t.vt (keys [j0, j0 + nk),
// packed Np columns wide, of which the first Ns = kt.columns(Np) are formed: t.s and t.dp
// are rows of Ns); t.row_keys / t.col_keys hold the tile's dropout keys when dropout is on.
// Only the tile's active rows are computed (and returned); the products that follow must
// use just those. dbias != nullptr (element (i0, j0) of (b, h)'s dbias, rows dbias_ld
// apart): ds before the softcap's derivative is stored there.
template <class Ops, class T, class Acc>
ActiveRows recompute_ds(const Mask& mask, const ScoreMods<Acc>& mods, const KeyTile& kt,
                        int64_t i0, int mq, int64_t j0, int nk, int Np, int Dp, const Acc* lse,
                        const Acc* delta, BwdTiles<Acc>& t, T* dbias, int64_t dbias_ld) {
  const ActiveRows rows = tile_bands(mask, i0, mq, j0, nk, kt, t.begin, t.end);
  const int Ns = kt.columns(Np);
  const int ns = std::min(nk, Ns);
  const int r0 = rows.first;
  Acc* s = t.s.data() + r0 * Ns;
  Acc* dp = t.dp.data() + r0 * Ns;
  Acc* dcap = mods.softcap > 0 ? t.dcap.data() + r0 * Ns : nullptr;
  Ops::gemm(rows.count(), Ns, Dp, t.q + r0 * Dp, Dp, 1, t.kt, Np, s, Ns, false);
  mods.transform(s, dcap, rows.count(), Ns, i0 + r0, j0);
  mods.template add_bias<T, Ops>(s, rows.count(), Ns, ns, i0 + r0, j0);
  kt.mask_scores(s, rows.count(), Ns, ns);
  Ops::gemm(rows.count(), Ns, Dp, t.dout + r0 * Dp, Dp, 1, t.vt, Np, dp, Ns, false);
  if (mods.dropout) mods.template drop<Ops>(dp, rows.count(), Ns, ns, t.row_keys + r0, t.col_keys);
  Ops::softmax_grad(s, dp, rows.count(), Ns, t.begin + r0, t.end + r0, lse + r0, delta + r0);
  finish_ds(dp, dcap, rows.count(), Ns, ns, dbias == nullptr ? nullptr : dbias + r0 * dbias_ld,
            dbias_ld);
  return rows;
}

// dv += (z p)^T dout and dk += ds^T (scale q) for the tile recompute_ds just formed (Ns
// score columns), into the key tile's rows dk / dv (Ns x Dp; the rows past Ns, keys no row
// sees, get nothing); p and ds are read transposed in place.
template <class Ops, class Acc>
void accumulate_dk_dv(const ScoreMods<Acc>& mods, const ActiveRows& rows, int nk, int Ns,
                      int Dp, BwdTiles<Acc>& t, Acc* dk, Acc* dv) {
  const int r0 = rows.first;
  Acc* p_tile = t.s.data() + r0 * Ns;
  if (mods.dropout) {
    mods.template drop<Ops>(p_tile, rows.count(), Ns, std::min(nk, Ns), t.row_keys + r0,
                            t.col_keys);
  }
  Ops::gemm(Ns, Dp, rows.count(), p_tile, 1, Ns, t.dout + r0 * Dp, Dp, dv, Dp, true);
  Ops::gemm(Ns, Dp, rows.count(), t.dp.data() + r0 * Ns, 1, Ns, t.q + r0 * Dp, Dp, dk, Dp,
            true);
}

// What every backward task reads: the problem's sizes, its tensors as rows, and D.
template <class T>
struct BwdInputs {
  using Acc = AccOf<T>;
  const BwdParams& p;
  const int D, Dp;
  const int64_t group, q_blocks, k_blocks;
  const Acc scale;
  const Rows<const T> q, k, v, out, dout;
  const Rows<T> dq, dk, dv;
  const std::vector<Acc> delta;  // D_i = <dout_i, out_i>, see softmax_delta
  const KeyBlocks key_blocks;

  explicit BwdInputs(const BwdParams& params)
      : p(params),
        D(static_cast<int>(p.head_dim)),
        Dp(round_up(D, kColPad)),
        group(p.num_heads / p.num_kv_heads),
        q_blocks((p.seqlen_q + kBlockQ - 1) / kBlockQ),
        k_blocks((p.seqlen_k + kBlockK - 1) / kBlockK),
        scale(static_cast<Acc>(p.softmax_scale)),
        q(p.q, p.stride_q, p.cu_seqlens_q),
        k(p.k, p.stride_k, p.cu_seqlens_k),
        v(p.v, p.stride_v, p.cu_seqlens_k),
        out(p.out, p.stride_out, p.cu_seqlens_q),
        dout(p.dout, p.stride_dout, p.cu_seqlens_q),
        dq(p.dq, p.stride_dq, p.cu_seqlens_q),
        dk(p.dk, p.stride_dk, p.cu_seqlens_k),
        dv(p.dv, p.stride_dv, p.cu_seqlens_k),
        delta(softmax_delta(p, D, out, dout)),
        key_blocks(p, k_blocks, static_cast<const T*>(p.attn_bias)) {}

  // lse and D of the query rows from i0 on of (b, h).
  const Acc* lse(int64_t b, int64_t h, int64_t i0) const {
    return static_cast<const Acc*>(p.lse) + lse_offset(p, b, h) + i0;
  }
  const Acc* delta_rows(int64_t b, int64_t h, int64_t i0) const {
    return delta.data() + (b * p.num_heads + h) * p.seqlen_q + i0;
  }

 private:
  // D_i = <dout_i, out_i>, (B, H, Tq); rows past a sequence's end unused.
  static std::vector<Acc> softmax_delta(const BwdParams& p, int D, const Rows<const T>& out,
                                        const Rows<const T>& dout) {
    const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
    std::vector<Acc> delta(rows);
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t i = row % p.seqlen_q;
      const int64_t h = row / p.seqlen_q % p.num_heads;
      const int64_t b = row / p.seqlen_q / p.num_heads;
      if (i >= seq_lens(p, b).q) continue;
      const T* o = out.row(b, i, h);
      const T* g = dout.row(b, i, h);
      Acc sum = 0;
      for (int c = 0; c < D; ++c) sum += to_acc(o[c * out.stride.d]) * to_acc(g[c * dout.stride.d]);
      delta[row] = sum;
    }
    return delta;
  }
};

// Which of backward's two schemes runs. They use the same tiles, products and summation
// orders, hence give the same bits:
//   - single pass (5 tile products): one task per (batch, kv head) forms dq, dk and dv;
//     used with one thread, or when those tasks keep every thread busy, and while the
//     per-thread dk / dv rows (Tk x Dp each) stay within kTileCacheBytes;
//   - two passes (7 products, s and dp recomputed twice): dk/dv per (batch, kv head, key
//     block), then dq per (batch, head, query block); enough tasks for any batch and head
//     count (MQA, batch 1).
template <class T>
bool bwd_single_pass_fits(const BwdInputs<T>& in) {
  const int64_t threads = omp_get_max_threads();
  return (threads == 1 || in.p.batch * in.p.num_kv_heads >= 4 * threads) &&
         in.k_blocks * kBlockK * in.Dp * static_cast<int64_t>(sizeof(AccOf<T>)) <=
             kTileCacheBytes;
}

// How a backward task uses a query tile: the dq tile loop packs it into the thread's own
// rows (kOwn), and in the single-pass scheme, which also forms dk / dv from it, in the
// transposed layout too where the thread's products read that (kOwnForDkDv); the dk/dv
// pass takes it from the thread's cache of the slice's query tiles (kCached).
enum class QueryUse { kOwn, kOwnForDkDv, kCached };

// A key tile's recomputed p and ds, as the thread's recompute left them: the active rows,
// the keys nk, the score columns Ns formed, and the block of rows [lo, hi) the tile products
// cover (the active rows, or whole 32-row blocks around them on the AMX path).
struct TileDone {
  ActiveRows rows;
  int nk, Ns, lo, hi;
};

// A thread's backward state: its tiles, and the packed tiles of the (batch, kv head) it
// works on: q (pre-scaled) and dout of its query heads for the dk/dv pass, k^T and v^T for
// both passes, k for the dq pass. The schemes below drive it (as they drive AmxBwdThread)
// through pack_keys, pack_queries, recompute, dq_product, accumulate and the stores.
template <class T, class Ops>
struct BwdThread {
  using Elem = T;
  using Acc = AccOf<T>;
  const BwdInputs<T>& in;
  BwdTiles<Acc> t;
  TileCache<Acc> q_tiles, dout_tiles, kt_tiles, vt_tiles, k_tiles;
  const Acc* k_tile = nullptr;  // k of the current key tile (the B of dq)

  explicit BwdThread(const BwdInputs<T>& inputs)
      : in(inputs),
        t(in.Dp, in.p.softcap > 0),
        q_tiles(in.group * in.q_blocks, kBlockQ * in.Dp),
        dout_tiles(in.group * in.q_blocks, kBlockQ * in.Dp),
        kt_tiles(in.k_blocks, in.Dp * kBlockK),
        vt_tiles(in.k_blocks, in.Dp * kBlockK),
        k_tiles(in.k_blocks, kBlockK * in.Dp) {}

  uint32_t* row_keys() { return t.row_keys; }
  uint32_t* col_keys() { return t.col_keys; }

  // t.kt, t.vt (and, for_dq, k_tile) <- the key tile [j0, j0 + nk) of (b, hk).
  void pack_keys(int64_t b, int64_t hk, int64_t j0, int nk, bool for_dq) {
    const int64_t slice = b * in.p.num_kv_heads + hk;
    const int Np = round_up(nk, kColPad);
    t.kt = kt_tiles.get(slice, j0 / kBlockK, [&](Acc* dst) {
      pack_transposed<Ops>(in.k, b, j0, hk, nk, Np, in.D, in.Dp, dst);
    });
    t.vt = vt_tiles.get(slice, j0 / kBlockK, [&](Acc* dst) {
      pack_transposed<Ops>(in.v, b, j0, hk, nk, Np, in.D, in.Dp, dst);
    });
    if (for_dq) {
      k_tile = k_tiles.get(slice, j0 / kBlockK, [&](Acc* dst) {
        pack_rows<Ops>(in.k, b, j0, hk, nk, Np, in.D, in.Dp, Acc(1), dst);
      });
    }
  }

  // t.q (pre-scaled), t.dout <- the query tile [i0, i0 + mq) of head h.
  void pack_queries(int64_t b, int64_t h, int64_t i0, int mq, QueryUse use) {
    const int D = in.D, Dp = in.Dp;
    if (use != QueryUse::kCached) {
      pack_rows<Ops>(in.q, b, i0, h, mq, mq, D, Dp, in.scale, t.q_own.data());
      pack_rows<Ops>(in.dout, b, i0, h, mq, mq, D, Dp, Acc(1), t.dout_own.data());
      t.q = t.q_own.data();
      t.dout = t.dout_own.data();
      return;
    }
    const int64_t hk = h / in.group;
    const int64_t slice = b * in.p.num_kv_heads + hk;
    const int64_t tile = (h - hk * in.group) * in.q_blocks + i0 / kBlockQ;
    t.q = q_tiles.get(slice, tile, [&](Acc* dst) {
      pack_rows<Ops>(in.q, b, i0, h, mq, mq, D, Dp, in.scale, dst);
    });
    t.dout = dout_tiles.get(slice, tile, [&](Acc* dst) {
      pack_rows<Ops>(in.dout, b, i0, h, mq, mq, D, Dp, Acc(1), dst);
    });
  }

  TileDone recompute(const Mask& mask, const ScoreMods<Acc>& mods, const KeyTile& key_tile,
                     int64_t i0, int mq, int64_t j0, int nk, const Acc* lse, const Acc* delta,
                     T* dbias, int64_t dbias_ld) {
    const int Np = round_up(nk, kColPad);
    const ActiveRows rows = recompute_ds<Ops>(mask, mods, key_tile, i0, mq, j0, nk, Np, in.Dp,
                                              lse, delta, t, dbias, dbias_ld);
    return {rows, nk, key_tile.columns(Np), rows.first, rows.last};
  }

  // The dq tile (t.dq = dq / scale) and the key tile's dq product.
  void begin_dq(int mq) { std::fill_n(t.dq.data(), mq * in.Dp, Acc(0)); }
  void dq_product(const TileDone& done) {
    const int r0 = done.rows.first, Ns = done.Ns, Dp = in.Dp;
    Ops::gemm(done.rows.count(), Dp, Ns, t.dp.data() + r0 * Ns, Ns, 1, k_tile, Dp,
              t.dq.data() + r0 * Dp, Dp, true);
  }
  void store_dq(int mq, int64_t b, int64_t i0, int64_t h) {
    store_rows<Ops>(t.dq.data(), in.Dp, mq, in.D, in.scale, in.dq, b, i0, h);
  }

  // dk / dv accumulators: a key block's rows (kBlockK x Dp), block after block in the
  // single-pass scheme's slice rows.
  int64_t block_elems() const { return int64_t{kBlockK} * in.Dp; }
  Acc* dk_block() { return t.dk.data(); }
  Acc* dv_block() { return t.dv.data(); }
  void zero_block(int nk_stored) {
    std::fill_n(t.dk.data(), round_up(nk_stored, kColPad) * in.Dp, Acc(0));
    std::fill_n(t.dv.data(), round_up(nk_stored, kColPad) * in.Dp, Acc(0));
  }
  void accumulate(const ScoreMods<Acc>& mods, const TileDone& done, Acc* dk, Acc* dv) {
    accumulate_dk_dv<Ops>(mods, done.rows, done.nk, done.Ns, in.Dp, t, dk, dv);
  }
  // The first n keys of the block at j0 (rows of dk, dv) into the gradients.
  void store_block(const Acc* dk, const Acc* dv, int n, int64_t b, int64_t j0, int64_t hk) {
    store_rows<Ops>(dk, in.Dp, n, in.D, Acc(1), in.dk, b, j0, hk);
    store_rows<Ops>(dv, in.Dp, n, in.D, Acc(1), in.dv, b, j0, hk);
  }
};

// dq of the query tile [i0, i0 + kBlockQ) of head h, against every key tile the mask lets it
// see; after each tile's dq product, per_key_tile(done, j0) runs with the tile's p and ds
// still in the thread (the single-pass scheme accumulates dk / dv there, for_dk_dv).
template <class Thread, class PerKeyTile>
void bwd_dq_tile(Thread& th, int64_t b, int64_t h, int64_t i0, const SeqLens& len,
                 const Mask& mask, const ScoreMods<typename Thread::Acc>& mods, bool for_dk_dv,
                 PerKeyTile&& per_key_tile) {
  using Acc = typename Thread::Acc;
  const auto& in = th.in;
  const int64_t hk = h / in.group;
  const int mq = static_cast<int>(std::min<int64_t>(kBlockQ, len.q - i0));
  th.pack_queries(b, h, i0, mq, for_dk_dv ? QueryUse::kOwnForDkDv : QueryUse::kOwn);
  if (mods.dropout) mods.row_keys(i0, mq, th.row_keys());
  th.begin_dq(mq);
  const Acc* lse = in.lse(b, h, i0);
  const Acc* delta = in.delta_rows(b, h, i0);
  const int64_t k_begin = mask.key_begin(i0);
  const int64_t k_end = mask.key_end(i0 + mq - 1);
  using T = typename Thread::Elem;
  // The tile's dbias rows, written here only (not in the dk/dv pass): once per element.
  T* dbias = in.p.dbias == nullptr
                 ? nullptr
                 : static_cast<T*>(in.p.dbias) +
                       ((b * in.p.num_heads + h) * in.p.seqlen_q + i0) * in.p.seqlen_k;
  for (int64_t j0 = k_begin / kBlockK * kBlockK; j0 < k_end; j0 += kBlockK) {
    if (in.key_blocks.dead(b, j0 / kBlockK)) continue;
    const KeyTile key_tile = in.key_blocks.tile(b, j0 / kBlockK);
    const int nk = static_cast<int>(std::min<int64_t>(kBlockK, len.k - j0));
    th.pack_keys(b, hk, j0, nk, /*for_dq=*/true);
    if (mods.dropout) dropout_col_keys(j0, nk, th.col_keys());
    const TileDone done = th.recompute(mask, mods, key_tile, i0, mq, j0, nk, lse, delta,
                                       dbias == nullptr ? nullptr : dbias + j0, in.p.seqlen_k);
    if (done.rows.count() == 0) continue;
    th.dq_product(done);
    per_key_tile(done, j0);
  }
  th.store_dq(mq, b, i0, h);
}

// The single-pass scheme (a worksharing loop of the enclosing parallel region): dq, dk, dv,
// one task per (batch, kv head); dk / dv of the whole slice accumulate in the thread's fp32
// rows, block by block, in the order of the two-pass dk/dv loop (heads of the group, then
// query blocks), so both schemes give the same bits.
template <class Thread>
void bwd_single_pass(Thread& th) {
  using Acc = typename Thread::Acc;
  const auto& in = th.in;
  const BwdParams& p = in.p;
  const int64_t block = th.block_elems();
  cpu::AlignedVector<Acc> dk_rows(in.k_blocks * block), dv_rows(in.k_blocks * block);
#pragma omp for schedule(dynamic)
  for (int64_t task = 0; task < p.batch * p.num_kv_heads; ++task) {
    const int64_t hk = task % p.num_kv_heads;
    const int64_t b = task / p.num_kv_heads;
    const SeqLens len = seq_lens(p, b);
    const Mask mask(p, len);
    const int64_t blocks = (len.k_stored + kBlockK - 1) / kBlockK;
    std::fill_n(dk_rows.data(), blocks * block, Acc(0));
    std::fill_n(dv_rows.data(), blocks * block, Acc(0));
    for (int64_t h = hk * in.group; h < (hk + 1) * in.group; ++h) {
      const ScoreMods<Acc> mods(p, b, h, len);
      for (int64_t i0 = 0; i0 < len.q; i0 += kBlockQ) {
        bwd_dq_tile(th, b, h, i0, len, mask, mods, /*for_dk_dv=*/true,
                    [&](const TileDone& done, int64_t j0) {
                      const int64_t e = j0 / kBlockK * block;
                      th.accumulate(mods, done, dk_rows.data() + e, dv_rows.data() + e);
                    });
      }
    }
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int n = static_cast<int>(std::min<int64_t>(kBlockK, len.k_stored - kb * kBlockK));
      th.store_block(dk_rows.data() + kb * block, dv_rows.data() + kb * block, n, b,
                     kb * kBlockK, hk);
    }
  }
}

// The dk/dv pass of the two-pass scheme (a worksharing loop of the enclosing parallel
// region): one task per (batch, kv head, key block), over the query tiles of the group's
// heads that see the block; keys stored past the used ones get zero gradients.
template <class Thread>
void bwd_dk_dv_pass(Thread& th) {
  using T = typename Thread::Elem;
  using Acc = typename Thread::Acc;
  const auto& in = th.in;
  const BwdParams& p = in.p;
#pragma omp for schedule(dynamic)
  for (int64_t task = 0; task < p.batch * p.num_kv_heads * in.k_blocks; ++task) {
    const int64_t kb = task % in.k_blocks;
    const int64_t hk = task / in.k_blocks % p.num_kv_heads;
    const int64_t b = task / in.k_blocks / p.num_kv_heads;
    const SeqLens len = seq_lens(p, b);
    const int64_t j0 = kb * kBlockK;
    if (j0 >= len.k_stored) continue;
    // Keys [j0, j0 + nk) are used, the rest of the block's stored keys get zero gradients.
    const int nk_stored = static_cast<int>(std::min<int64_t>(kBlockK, len.k_stored - j0));
    const int nk = static_cast<int>(std::clamp<int64_t>(len.k - j0, 0, kBlockK));
    const Mask mask(p, len);
    th.zero_block(nk_stored);
    // A block without live keys (key_padding_mask) has zero gradients.
    const bool dead = in.key_blocks.dead(b, kb);
    const KeyTile key_tile = in.key_blocks.tile(b, kb);
    if (!dead && nk > 0) th.pack_keys(b, hk, j0, nk, /*for_dq=*/false);
    if (p.dropout_p > 0) dropout_col_keys(j0, nk, th.col_keys());
    const int64_t q_begin = mask.query_begin(j0);
    const int64_t q_end = nk > 0 && !dead ? mask.query_end(j0 + nk) : 0;
    for (int64_t h = hk * in.group; h < (hk + 1) * in.group; ++h) {
      const ScoreMods<Acc> mods(p, b, h, len);
      for (int64_t i0 = q_begin / kBlockQ * kBlockQ; i0 < q_end; i0 += kBlockQ) {
        const int mq = static_cast<int>(std::min<int64_t>(kBlockQ, len.q - i0));
        th.pack_queries(b, h, i0, mq, QueryUse::kCached);
        if (mods.dropout) mods.row_keys(i0, mq, th.row_keys());
        const TileDone done =
            th.recompute(mask, mods, key_tile, i0, mq, j0, nk, in.lse(b, h, i0),
                         in.delta_rows(b, h, i0), static_cast<T*>(nullptr), 0);
        if (done.rows.count() == 0) continue;
        th.accumulate(mods, done, th.dk_block(), th.dv_block());
      }
    }
    th.store_block(th.dk_block(), th.dv_block(), nk_stored, b, j0, hk);
  }
}

// The dq pass of the two-pass scheme (a worksharing loop of the enclosing parallel region):
// one task per (batch, head, query block).
template <class Thread>
void bwd_dq_pass(Thread& th) {
  using Acc = typename Thread::Acc;
  const BwdParams& p = th.in.p;
  const int64_t q_blocks = th.in.q_blocks;
#pragma omp for schedule(dynamic)
  for (int64_t task = 0; task < p.batch * p.num_heads * q_blocks; ++task) {
    const QueryBlock t = query_block(p, task, q_blocks);
    if (t.mq == 0) continue;
    bwd_dq_tile(th, t.b, t.h, t.i0, t.len, Mask(p, t.len), ScoreMods<Acc>(p, t.b, t.h, t.len),
                /*for_dk_dv=*/false, [](const TileDone&, int64_t) {});
  }
}

// Backward: D first, then one of the two schemes (bwd_single_pass_fits) in one parallel
// region, each thread with its own Thread (BwdThread, or AmxBwdThread).
template <class Thread, class T>
void attention_bwd_with(const BwdParams& p) {
  const BwdInputs<T> in(p);
  const bool single_pass = bwd_single_pass_fits(in);
#pragma omp parallel
  {
    Thread th(in);
    if (single_pass) {
      bwd_single_pass(th);
    } else {
      bwd_dk_dv_pass(th);
      bwd_dq_pass(th);
    }
  }
}

// ---- the bfloat16 and float16 paths on AMX tiles ------------------------------------------
// The same tiles, masks, score modifications, online softmax and backward schemes as the
// generic algorithm above, with the products on the AMX tile unit (attention_cpu_amx.h):
// bfloat16 on AMX-BF16, float16 on AMX-FP16 (tdpfp16ps, Granite Rapids and later). The
// templates take the product engine: amx::TileEngine, or amx::DotEngine (bfloat16 on
// vdpbf16ps, for AVX512-BF16 CPUs without AMX; the same operands, so the same roundings of p
// and ds). The inputs
// are packed as they are stored (no widening), q is not pre-scaled (its rounding would add an
// error torch's kernels do not have: the scale multiplies the float32 scores), p and ds are
// rounded to the input's type for their products. The score tile, the softmax and every
// feature stay float32 and run the AVX-512 primitives. Products cover whole 16-row (32-row
// where query rows are the K of a product) blocks around a tile's active rows; the rows of a
// block outside them get p = ds = 0, so they add nothing.
//
// Forward schemes measured against this one and not kept (bfloat16 and float16, B1 H8 T4096
// D64 / D128 and B2 H8 T1024 D64, one thread, alternating calls in one process, equal
// outputs; Granite Rapids-class core): queueing the next 16-row strip's q k^T jobs and the
// previous strip's p v jobs between the softmax's rows, so that the tile unit would work
// under the vector code: 0.79-0.94x (0.89-0.92x with the jobs issued before the rows instead,
// 0.80-0.95x two or three strips ahead; 0.82-0.92x again on 2026-12-05 with one K step of a
// job per softmax row, slower with the jobs' tile rows prefetched into L1) -- the products
// themselves run beside the softmax (the interleaved step without its tile loads and stores,
// operands left in the tiles, took 0.6-0.7x today's step), but no vector work runs beside a
// tile load or store (benchmarks/micro/amx_dot_rate.cpp); the query tile in 16-, 32- or
// 64-row slices through all three steps: 0.88-1.00x; 256- or 512-row query tiles: 0.98-1.02x
// at D = 64, 1.00-1.05x at D = 128. Replacing the softmax by a bare conversion of the scores
// took 11 % (D = 128) to 19 % (D = 64) off the forward's time (measured before the softmax
// lost a multiplication and a compare per score vector); the rest is the products with their
// tile loads and stores, which a 64- or 128-deep product cannot amortise as a GEMM's long K
// does (attention_cpu_amx.h's costs).
#if defined(FASTLLM_ATTENTION_CPU_X86)

// Storage bits of a bfloat16 / float16 row.
template <class T>
const uint16_t* bits(const T* row) {
  static_assert(sizeof(T) == 2, "the tile paths take 16-bit elements");
  return reinterpret_cast<const uint16_t*>(row);
}

// Packs the key rows [j, j + nk) of (b, hk) of src with pack(first, stride_t, stride_d, dst),
// a packer of 16-bit rows (amx::pack_column_pairs, pack_row_pairs): bfloat16 / float16 rows
// as stored; float rows (the split path) as their three bfloat16 parts, split into staging
// first (nk rows of Dk elements, parts `part` apart; skipped when `staged`: src's rows are
// there already), each part packed to dst + q * part.
template <class T, class Pack>
void pack_key_rows(const Rows<const T>& src, int64_t b, int64_t j, int64_t hk, int nk, int D,
                   int Dk, uint16_t* staging, int64_t part, bool staged, uint16_t* dst,
                   Pack&& pack) {
  if constexpr (std::is_same_v<T, float>) {
    if (!staged) {
      amx::split_rows(src.row(b, j, hk), src.stride.t, src.stride.d, nk, nk, D, Dk, staging,
                      part);
    }
    for (int q = 0; q < amx::kSplitParts; ++q) pack(staging + q * part, Dk, 1, dst + q * part);
  } else {
    (void)D, (void)Dk, (void)staging, (void)part, (void)staged;
    pack(bits(src.row(b, j, hk)), src.stride.t, src.stride.d, dst);
  }
}

// C (+)= A B on the path's products, for storage type T: the engine's 16-bit product, or (T =
// float, the split path) the engine's six (amx::gemm_split on AMX tiles; emulated by
// amx::gemm_split_dot, tests only) with A's parts a_part and B's b_part apart, B's K in
// segments of b_seg_k rows b_seg elements apart (see gemm_split).
template <class T, class Engine>
void tile_product(int M, int N, int K, const uint16_t* A, int64_t lda, int64_t a_part,
                  const uint16_t* B, int64_t ldb, int64_t b_part, int b_seg_k, int64_t b_seg,
                  float* C, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    Engine::gemm_split(M, N, K, A, lda, a_part, B, ldb, b_part, b_seg_k, b_seg, C, ldc,
                       accumulate);
  } else {
    (void)a_part, (void)b_part, (void)b_seg_k, (void)b_seg;
    Engine::template gemm<T>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

// T = float: the split path (attention_cpu_amx.h, split3): every float32 operand -- q, k, v
// and p -- as three bfloat16 parts, each product as six bfloat16 tile products, p from the
// float32 path's exp2; otherwise as for bfloat16 (an attn_bias of float32 elements takes the
// general path's add_bias instead of the fused softmax's). Its backward is
// AmxBwdThread<float>.
template <class T, class Engine = amx::TileEngine>
void attention_fwd_amx(const FwdParams& p) {
  using Ops = avx512::Ops;
  constexpr bool kSplit = std::is_same_v<T, float>;
  using E = std::conditional_t<kSplit, BFloat16, T>;  // the tiles' element type
  constexpr int kParts = kSplit ? amx::kSplitParts : 1;
  const int D = static_cast<int>(p.head_dim);
  const int Dk = round_up(D, 32);  // the K of q k^T and the N of p v
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t q_blocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t k_blocks = (p.seqlen_k + kBlockK - 1) / kBlockK;
  const int64_t tasks = p.batch * p.num_heads * q_blocks;
  const float scale = static_cast<float>(p.softmax_scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const Rows<const T> q(p.q, p.stride_q, p.cu_seqlens_q), k(p.k, p.stride_k, p.cu_seqlens_k),
      v(p.v, p.stride_v, p.cu_seqlens_k);
  const Rows<T> out(p.out, p.stride_out, p.cu_seqlens_q);
  const KeyBlocks key_blocks(p, k_blocks, static_cast<const T*>(p.attn_bias));
#pragma omp parallel
  {
    [[maybe_unused]] typename Engine::Scope tile_scope;  // DotEngine: nothing to configure
    // A split operand's parts lie q_part, p_part and tile_part elements apart.
    const int64_t q_part = int64_t{kBlockQ} * Dk, p_part = int64_t{kBlockQ} * 2 * kBlockK,
                  tile_part = int64_t{Dk} * kBlockK;
    cpu::AlignedVector<uint16_t> q_tile(kParts * q_part), p_tile(kParts * p_part);
    cpu::AlignedVector<float> s_tile(kBlockQ * 2 * kBlockK), o_tile(kBlockQ * Dk);
    std::vector<float> m(kBlockQ), l(kBlockQ);
    TileCache<uint16_t> kt_tiles(k_blocks, kParts * tile_part),
        v_tiles(k_blocks, kParts * tile_part);
    // The split path's key rows as parts, before their packing (kBlockK rows of Dk each).
    cpu::AlignedVector<uint16_t> key_parts(kSplit ? kParts * tile_part : 0);
    // C (+)= A B (tile_product), A's parts a_part and B's tile_part apart; with keys (p v: K
    // is keys), B's K in segments of kBlockK keys, a cached tile apart (the key block pair's
    // 128 keys).
    auto product = [&](bool keys, int M, int N, int K, const uint16_t* A, int64_t lda,
                       int64_t a_part, const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
                       bool accumulate) {
      tile_product<T, Engine>(M, N, K, A, lda, a_part, B, ldb, tile_part, keys ? kBlockK : K,
                              kParts * tile_part, C, ldc, accumulate);
    };
    int begin[kBlockQ], end[kBlockQ];
    uint32_t row_keys[kBlockQ], col_keys[kBlockK];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const QueryBlock t = query_block(p, task, q_blocks);
      if (t.mq == 0) continue;
      const int64_t b = t.b, h = t.h, hk = h / group, i0 = t.i0;
      const SeqLens len = t.len;
      const int mq = t.mq;
      const Mask mask(p, len);
      const ScoreMods<float> mods(p, b, h, len);
      // No feature modifies the scores but an attn_bias with contiguous keys: the fused
      // softmax, which adds the bias itself (a mixed key padding block still takes the
      // general path).
      const bool plain = !(mods.softcap > 0) && !mods.alibi && !mods.dropout &&
                         (mods.bias == nullptr || (mods.bias_stride_k == 1 && !kSplit));
      // Element (i0, 0) of (b, h)'s bias; rows bias_stride_q apart.
      const uint16_t* bias_rows = nullptr;
      if constexpr (!kSplit) {
        if (mods.bias != nullptr) {
          bias_rows = bits(static_cast<const T*>(mods.bias) + mods.bias_offset +
                           i0 * mods.bias_stride_q);
        }
      }
      if constexpr (kSplit) {
        amx::split_rows(q.row(b, i0, h), q.stride.t, q.stride.d, mq, round_up(mq, 16), D, Dk,
                        q_tile.data(), q_part);
      } else {
        amx::pack_rows(bits(q.row(b, i0, h)), q.stride.t, q.stride.d, mq, round_up(mq, 16), D,
                       Dk, q_tile.data());
      }
      if (mods.dropout) mods.row_keys(i0, mq, row_keys);
      std::fill_n(o_tile.data(), round_up(mq, 16) * Dk, 0.0f);
      std::fill_n(m.data(), mq, neg_inf);
      std::fill_n(l.data(), mq, 0.0f);
      const int64_t k_begin = mask.key_begin(i0);
      const int64_t k_end = mask.key_end(i0 + mq - 1);
      const int64_t slice = b * p.num_kv_heads + hk;
      auto kt_of = [&](int64_t j) {
        return kt_tiles.get(slice, j / kBlockK, [&](uint16_t* dst) {
          const int nk = static_cast<int>(std::min<int64_t>(kBlockK, len.k - j));
          pack_key_rows(k, b, j, hk, nk, D, Dk, key_parts.data(), tile_part, false, dst,
                        [&](const uint16_t* first, int64_t st, int64_t sd, uint16_t* out) {
                          amx::pack_column_pairs(first, st, sd, nk, kBlockK, D, Dk, out);
                        });
        });
      };
      auto v_of = [&](int64_t j) {
        return v_tiles.get(slice, j / kBlockK, [&](uint16_t* dst) {
          const int nk = static_cast<int>(std::min<int64_t>(kBlockK, len.k - j));
          pack_key_rows(v, b, j, hk, nk, D, Dk, key_parts.data(), tile_part, false, dst,
                        [&](const uint16_t* first, int64_t st, int64_t sd, uint16_t* out) {
                          amx::pack_row_pairs(first, st, sd, nk, kBlockK, D, Dk, out);
                        });
        });
      };
      for (int64_t j0 = k_begin / kBlockK * kBlockK; j0 < k_end; j0 += kBlockK) {
        // Two key blocks at once where nothing but the band masks them: the p v product is
        // then 128 keys deep, which halves the output tile's loads and stores around it
        // (D = 64: ~10 % faster, B1 H8 T4096, one thread; D = 128: within the noise of the
        // shared machine, best of 3 runs 110 ms paired against 109-141 ms single). Head dims
        // above 128 keep single blocks (their doubled key tiles would leave the L2 share).
        if (plain && Dk <= 128 && !key_blocks.summarised() && kt_tiles.cached() && v_tiles.cached() &&
            j0 + kBlockK < std::min(k_end, len.k)) {
          const int nk = static_cast<int>(std::min<int64_t>(2 * kBlockK, len.k - j0));
          const int Ns = round_up(nk, kColPad);
          const uint16_t* kt0 = kt_of(j0);
          const uint16_t* kt1 = kt_of(j0 + kBlockK);
          // A cached slice keeps its tiles back to back: the two blocks' value rows are one
          // 128-key operand from v0 on.
          const uint16_t* v0 = v_of(j0);
          v_of(j0 + kBlockK);
          KeyTile pair_tile;
          pair_tile.hi = 2 * kBlockK;
          const ActiveRows rows = tile_bands(mask, i0, mq, j0, nk, pair_tile, begin, end);
          if (rows.count() > 0) {
            const int lo = rows.first / 16 * 16, hi = round_up(rows.last, 16);
            product(false, hi - lo, kBlockK, Dk, q_tile.data() + lo * Dk, Dk, q_part, kt0,
                    2 * kBlockK, s_tile.data() + lo * Ns, Ns, false);
            product(false, hi - lo, Ns - kBlockK, Dk, q_tile.data() + lo * Dk, Dk, q_part, kt1,
                    2 * kBlockK, s_tile.data() + lo * Ns + kBlockK, Ns, false);
            amx::online_softmax_to_p<E, kSplit>(
                s_tile.data(), Ns, lo, hi, rows.first, rows.last, begin, end, scale, m.data(),
                l.data(), o_tile.data(), Dk, Dk, p_tile.data(), 2 * kBlockK,
                bias_rows == nullptr ? nullptr : bias_rows + j0, mods.bias_stride_q, nk, p_part);
            product(true, hi - lo, Dk, 2 * kBlockK, p_tile.data() + lo * 2 * kBlockK, 2 * kBlockK,
                    p_part, v0, 2 * Dk, o_tile.data() + lo * Dk, Dk, true);
          }
          j0 += kBlockK;
          continue;
        }
        if (key_blocks.dead(b, j0 / kBlockK)) continue;
        const KeyTile key_tile = key_blocks.tile(b, j0 / kBlockK);
        const int nk = static_cast<int>(std::min<int64_t>(kBlockK, len.k - j0));
        const int Ns = key_tile.columns(round_up(nk, kColPad));
        const uint16_t* kt_tile = kt_of(j0);
        const uint16_t* v_tile = v_of(j0);
        const ActiveRows rows = tile_bands(mask, i0, mq, j0, nk, key_tile, begin, end);
        if (rows.count() == 0) continue;
        const int r0 = rows.first, lo = r0 / 16 * 16, hi = round_up(rows.last, 16);
        const int ns = std::min(nk, Ns);
        float* s = s_tile.data() + r0 * Ns;
        product(false, hi - lo, Ns, Dk, q_tile.data() + lo * Dk, Dk, q_part, kt_tile, 2 * kBlockK,
                s_tile.data() + lo * Ns, Ns, false);
        if (plain && key_tile.mask == nullptr) {
          amx::online_softmax_to_p<E, kSplit>(s_tile.data(), Ns, lo, hi, r0, rows.last, begin,
                                              end, scale, m.data(), l.data(), o_tile.data(), Dk,
                                              Dk, p_tile.data(), kBlockK,
                                              bias_rows == nullptr ? nullptr : bias_rows + j0,
                                              mods.bias_stride_q, ns, p_part);
          product(true, hi - lo, Dk, kBlockK, p_tile.data() + lo * kBlockK, kBlockK, p_part, v_tile,
                  2 * Dk, o_tile.data() + lo * Dk, Dk, true);
          continue;
        }
        amx::scale_scores(s_tile.data(), Ns, r0, rows.last, scale);
        mods.transform(s, nullptr, rows.count(), Ns, i0 + r0, j0);
        mods.template add_bias<T, Ops>(s, rows.count(), Ns, ns, i0 + r0, j0);
        key_tile.mask_scores(s, rows.count(), Ns, ns);
        Ops::online_softmax(s, rows.count(), Ns, begin + r0, end + r0, m.data() + r0,
                            l.data() + r0, o_tile.data() + r0 * Dk, Dk);
        if (mods.dropout) {
          dropout_col_keys(j0, nk, col_keys);
          mods.template drop<Ops>(s, rows.count(), Ns, ns, row_keys + r0, col_keys);
        }
        amx::convert_rows<E, kSplit>(s_tile.data(), Ns, lo, hi, r0, rows.last, Ns, kBlockK,
                                     p_tile.data(), kBlockK, p_part);
        product(true, hi - lo, Dk, kBlockK, p_tile.data() + lo * kBlockK, kBlockK, p_part, v_tile,
                2 * Dk, o_tile.data() + lo * Dk, Dk, true);
      }
      store_query_tile<Ops>(p, b, h, i0, mq, m.data(), l.data(), o_tile.data(), Dk, out);
    }
  }
}

// ---- decoding (attention_cpu_decode.inc, on AVX-512 and AVX2) ---------------------------

// Whether the decode kernel takes this forward: no backward follows (FwdParams::no_backward),
// at most kDecodeMaxRows query rows per (batch, kv head) (one or a few decoded
// tokens per sequence), contiguous head dims, and no feature but the mask (causal, sliding
// window, KV cache lengths, packed sequences).
bool decode_eligible(const FwdParams& p) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  const bool eligible =
      p.no_backward && (cpu::cpu_avx512() || cpu::cpu_isa() == cpu::CpuIsa::kAvx2) &&
      p.dtype != DType::kFloat64 &&
      p.seqlen_q * group <= kDecodeMaxRows && !(p.softcap > 0) &&
      p.alibi_slopes == nullptr && p.attn_bias == nullptr && p.key_padding_mask == nullptr &&
      !(p.dropout_p > 0) && p.stride_q.d == 1 && p.stride_k.d == 1 && p.stride_v.d == 1 &&
      p.stride_out.d == 1;
  if (!eligible || p.cu_seqlens_q == nullptr) return eligible;
  // Packed queries: every sequence's rows, not only max_seqlen_q's bound (which the glue
  // checks on CPU tensors), must fit the kernel's row arrays.
  for (int64_t b = 0; b < p.batch; ++b) {
    if (seq_lens(p, b).q * group > kDecodeMaxRows) return false;
  }
  return true;
}

// The decode kernel's key ranges per sequence: about kDecodeTasks tasks over the batch (a
// decoded token of one sequence still keeps the threads busy; each range's state joined after
// them, as flash-decoding does), none shorter than kDecodeMinKeys keys. The count depends on
// the problem only, never on the thread count, so neither does the result.
constexpr int64_t kDecodeTasks = 16, kDecodeMinKeys = 256;

// A thread's decode scratch: the task's rows, and its q rows as floats, scores, row states
// and the join's row.
template <class T>
struct DecodeScratch {
  DecodeRows<T> rows;
  std::array<cpu::UninitAlignedVector<float>, 6> floats;
};

// K: the decode kernel of an instruction set (avx512::Decode or avx2_decode::Decode).
template <class T, class K>
void attention_fwd_decode(const FwdParams& p) {
  const int D = static_cast<int>(p.head_dim), Dp = round_up(D, 16);
  const int64_t group = p.num_heads / p.num_kv_heads;
  const Rows<const T> q(p.q, p.stride_q, p.cu_seqlens_q), k(p.k, p.stride_k, p.cu_seqlens_k),
      v(p.v, p.stride_v, p.cu_seqlens_k);
  const Rows<T> out(p.out, p.stride_out, p.cu_seqlens_q);
  int64_t max_q = 0, max_k = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqLens len = seq_lens(p, b);
    max_q = std::max(max_q, len.q);
    max_k = std::max(max_k, len.k);
  }
  // A sequence's rows: head h's decoded tokens i at row h * len.q + i (kv head by kv head).
  const int64_t max_rows = p.num_heads * max_q;
  const int64_t splits = std::clamp<int64_t>((kDecodeTasks + p.batch - 1) / p.batch, 1,
                                             std::max<int64_t>(1, max_k / kDecodeMinKeys));
  auto lse_of = [&](int64_t b, const SeqLens& len, int64_t r) {
    return static_cast<float*>(p.lse) + lse_offset(p, b, r / len.q) + r % len.q;
  };
  // Each key range's state (split sequences only): range s of sequence b at row
  // (b * splits + s) * max_rows.
  cpu::UninitAlignedVector<float> part_m, part_l, part_acc;
  if (splits > 1) {
    part_m.resize(p.batch * splits * max_rows);
    part_l.resize(p.batch * splits * max_rows);
    part_acc.resize(p.batch * splits * max_rows * Dp);
  }
  // One task (one short sequence) runs on the calling thread: waking the others cost more.
#pragma omp parallel if (p.batch * splits > 1)
  {
    // The thread's scratch, kept between calls (a decoded token's call is a few us: their
    // allocations were a tenth of it).
    static thread_local DecodeScratch<T> scratch;
    DecodeRows<T>& rows = scratch.rows;
    auto& [qf, scores, own_m, own_l, own_acc, o] = scratch.floats;
    if (o.size() < static_cast<size_t>(Dp)) o.resize(Dp);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.batch * splits; ++task) {
      const int64_t b = task / splits, s = task % splits;
      const SeqLens len = seq_lens(p, b);
      const Mask mask(p, len);
      rows.clear();
      int64_t kb = len.k, ke = 0;
      for (int64_t hk = 0; hk < p.num_kv_heads; ++hk) {
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (int64_t i = 0; i < len.q; ++i) {
            rows.q.push_back(q.row(b, i, h));
            rows.begin.push_back(mask.key_begin(i));
            rows.end.push_back(mask.key_end(i));
            if (rows.begin.back() < rows.end.back()) {
              kb = std::min(kb, rows.begin.back());
              ke = std::max(ke, rows.end.back());
            }
          }
        }
        rows.first.push_back(rows.count());
      }
      const int count = rows.count();
      if (count == 0) continue;
      // This task's keys: range s of [kb, ke) cut into `splits` ranges of whole 16-key blocks.
      const int64_t n = std::max<int64_t>(ke - kb, 0);
      const int64_t step = ((n + splits - 1) / splits + 15) / 16 * 16;
      const int64_t lo = std::min(kb + s * step, kb + n), hi = std::min(lo + step, kb + n);
      // The thread's buffer `buffer`, at least n floats.
      auto at_least = [](cpu::UninitAlignedVector<float>& buffer, int64_t n) {
        if (buffer.size() < static_cast<size_t>(n)) buffer.resize(n);
        return buffer.data();
      };
      float *m, *l, *acc;
      if (splits > 1) {
        const int64_t first = (b * splits + s) * max_rows;
        m = part_m.data() + first;
        l = part_l.data() + first;
        acc = part_acc.data() + first * Dp;
      } else {
        m = at_least(own_m, count);
        l = at_least(own_l, count);
        acc = at_least(own_acc, int64_t{count} * Dp);
      }
      float* qrows = at_least(qf, int64_t{count} * Dp);
      float* score_rows = at_least(scores, int64_t{count} * kDecodeChunk);
      const DecodeKeys<T> keys{k.row(b, 0, 0), k.stride.t, k.stride.h, v.row(b, 0, 0),
                               v.stride.t, v.stride.h, D, static_cast<float>(p.softmax_scale)};
      K::keys(rows, keys, lo, hi, m, l, acc, qrows, score_rows);
      if (splits > 1) continue;
      for (int r = 0; r < count; ++r) {
        K::join(1, m + r, l + r, acc + static_cast<int64_t>(r) * Dp, 0, D, o.data(),
                out.row(b, r % len.q, r / len.q), lse_of(b, len, r));
      }
    }
    if (splits > 1) {
      // Each row joins its sequence's ranges (the loop above ends in a barrier).
#pragma omp for schedule(static)
      for (int64_t task = 0; task < p.batch * max_rows; ++task) {
        const int64_t b = task / max_rows, r = task % max_rows;
        const SeqLens len = seq_lens(p, b);
        if (r >= p.num_heads * len.q) continue;
        const int64_t first = b * splits * max_rows + r;
        K::join(static_cast<int>(splits), part_m.data() + first, part_l.data() + first,
                part_acc.data() + first * Dp, max_rows, D, o.data(),
                out.row(b, r % len.q, r / len.q), lse_of(b, len, r));
      }
    }
  }
}

// The decode kernel of the best instruction set this CPU has (decode_eligible: AVX-512 or
// AVX2).
template <class T>
void decode_with_best(const FwdParams& p) {
  if (cpu::cpu_avx512()) return attention_fwd_decode<T, avx512::Decode>(p);
  attention_fwd_decode<T, avx2_decode::Decode>(p);
}

// row (b, t0 + c, h)[d] = scale * src[d * ld + c] for c < rows, d < D: dk^T / dv^T stored
// (src: round_up(D, 16) rows of ld >= round_up(rows, 16) floats).
template <class T>
void store_transposed(const float* src, int64_t ld, int rows, int D, float scale,
                      const Rows<T>& dst, int64_t b, int64_t t0, int64_t h) {
  if (dst.stride.d == 1) {
    return amx::store_transposed_rows(src, ld, rows, D, scale, dst.row(b, t0, h), dst.stride.t);
  }
  for (int c = 0; c < rows; ++c) {
    T* o = dst.row(b, t0 + c, h);
    for (int d = 0; d < D; ++d) o[d * dst.stride.d] = from_acc<T>(scale * src[d * ld + c]);
  }
}

// A thread's backward state on the AMX path (BwdThread's counterpart, driven by the same
// schemes): its tiles, and the packed tiles of the (batch, kv head) it works on. Query
// tiles are packed as rows (the A of s and dp) and, for the dk^T / dv^T products,
// transposed; key tiles as k^T and v^T (the B of s and dp, pairs of columns) and k in pairs
// of rows (the B of dq). dk and dv accumulate transposed, a key block as Dk x kBlockK floats.
//
// T = float: the split path (attention_fwd_amx<float>'s): every operand as three bfloat16
// parts, each product as gemm_split's six, so the recomputed scores are the forward's, bit
// for bit. A packed operand's parts lie q_part (query rows: kBlockQ x Dk, or transposed Dk x
// kBlockQ), key_part (Dk x kBlockK) or score_part (kBlockQ x kBlockK: ds rows, p and ds
// pairs) apart.
template <class T, class Engine = amx::TileEngine>
struct AmxBwdThread {
  using Elem = T;
  using Acc = float;
  using Ops = avx512::Ops;
  static constexpr bool kSplit = std::is_same_v<T, float>;
  using E = std::conditional_t<kSplit, BFloat16, T>;  // the tiles' element type
  static constexpr int kParts = kSplit ? amx::kSplitParts : 1;
  typename Engine::Scope tile_scope;  // first: the tiles are configured before any product
  const BwdInputs<T>& in;
  const int Dk;
  const int64_t q_part, key_part, score_part;
  cpu::AlignedVector<float> s, dp, dcap, dq, dkt, dvt;
  cpu::AlignedVector<uint16_t> q_own, dout_own, ds_rows, ds_pairs, p_pairs;
  // The split path's key rows as parts before their packing.
  cpu::AlignedVector<uint16_t> staging;
  TileCache<uint16_t> q_tiles, dout_tiles, qt_tiles, doutt_tiles, kt_tiles, vt_tiles, k_tiles;
  const uint16_t *q = nullptr, *dout = nullptr, *qt = nullptr, *doutt = nullptr,
                 *kt = nullptr, *vt = nullptr, *kp = nullptr;
  int begin[kBlockQ], end[kBlockQ];
  uint32_t row_keys_[kBlockQ], col_keys_[kBlockK];
  // The last recompute wrote ds_rows, p_pairs and ds_pairs itself (no feature modified the
  // scores, so p needs no dropout before its conversion).
  bool fused = false;

  explicit AmxBwdThread(const BwdInputs<T>& inputs)
      : in(inputs),
        Dk(round_up(in.D, 32)),
        q_part(int64_t{kBlockQ} * Dk),
        key_part(int64_t{Dk} * kBlockK),
        score_part(int64_t{kBlockQ} * kBlockK),
        s(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK),
        dcap(in.p.softcap > 0 ? kBlockQ * kBlockK : 0),
        dq(kBlockQ * Dk),
        dkt(Dk * kBlockK),
        dvt(Dk * kBlockK),
        q_own(kParts * q_part),
        dout_own(kParts * q_part),
        ds_rows(kParts * score_part),
        ds_pairs(kParts * score_part),
        p_pairs(kParts * score_part),
        staging(kSplit ? kParts * key_part : 0),
        q_tiles(in.group * in.q_blocks, kParts * q_part),
        dout_tiles(in.group * in.q_blocks, kParts * q_part),
        qt_tiles(in.group * in.q_blocks, kParts * q_part),
        doutt_tiles(in.group * in.q_blocks, kParts * q_part),
        kt_tiles(in.k_blocks, kParts * key_part),
        vt_tiles(in.k_blocks, kParts * key_part),
        k_tiles(in.k_blocks, kParts * key_part) {}

  // C (+)= A B (tile_product), A's and B's parts a_part and b_part apart, B's K in one
  // segment.
  static void product(int M, int N, int K, const uint16_t* A, int64_t lda, int64_t a_part,
                      const uint16_t* B, int64_t ldb, int64_t b_part, float* C, int64_t ldc,
                      bool accumulate) {
    tile_product<T, Engine>(M, N, K, A, lda, a_part, B, ldb, b_part, K, 0, C, ldc, accumulate);
  }

  uint32_t* row_keys() { return row_keys_; }
  uint32_t* col_keys() { return col_keys_; }

  // kt, vt, kp <- the key tile [j0, j0 + nk) of (b, hk) (kp also when not for_dq: one cached
  // tile, packed once per slice either way).
  void pack_keys(int64_t b, int64_t hk, int64_t j0, int nk, bool /*for_dq*/) {
    const int64_t slice = b * in.p.num_kv_heads + hk;
    const int64_t tile = j0 / kBlockK;
    auto column_pairs = [&](const uint16_t* first, int64_t st, int64_t sd, uint16_t* out) {
      amx::pack_column_pairs(first, st, sd, nk, kBlockK, in.D, Dk, out);
    };
    auto row_pairs = [&](const uint16_t* first, int64_t st, int64_t sd, uint16_t* out) {
      amx::pack_row_pairs(first, st, sd, nk, kBlockK, in.D, Dk, out);
    };
    // The split path splits k's rows once for both its packs (staging then holds them).
    bool k_staged = false;
    auto pack_k = [&](uint16_t* dst, auto&& pack) {
      pack_key_rows(in.k, b, j0, hk, nk, in.D, Dk, staging.data(), key_part, k_staged, dst,
                    pack);
      k_staged = true;
    };
    kt = kt_tiles.get(slice, tile, [&](uint16_t* dst) { pack_k(dst, column_pairs); });
    kp = k_tiles.get(slice, tile, [&](uint16_t* dst) { pack_k(dst, row_pairs); });
    vt = vt_tiles.get(slice, tile, [&](uint16_t* dst) {
      pack_key_rows(in.v, b, j0, hk, nk, in.D, Dk, staging.data(), key_part, false, dst,
                    column_pairs);
    });
  }

  // q, dout (rows) and, unless for dq alone, qt, doutt <- query tile [i0, i0 + mq) of head
  // h; cached per slice (the dk/dv pass) or packed into the thread's own rows.
  void pack_queries(int64_t b, int64_t h, int64_t i0, int mq, QueryUse use) {
    const int64_t hk = h / in.group;
    const int64_t slice = b * in.p.num_kv_heads + hk;
    const int64_t tile = (h - hk * in.group) * in.q_blocks + i0 / kBlockQ;
    auto rows_of = [&](const Rows<const T>& src, uint16_t* dst) {
      if constexpr (kSplit) {
        amx::split_rows(src.row(b, i0, h), src.stride.t, src.stride.d, mq, round_up(mq, 32),
                        in.D, Dk, dst, q_part);
      } else {
        amx::pack_rows(bits(src.row(b, i0, h)), src.stride.t, src.stride.d, mq,
                       round_up(mq, 32), in.D, Dk, dst);
      }
    };
    auto transposed_of = [&](const Rows<const T>& src, uint16_t* dst) {
      if constexpr (kSplit) {
        amx::split_transposed(src.row(b, i0, h), src.stride.t, src.stride.d, mq, in.D, Dk,
                              kBlockQ, dst, q_part);
      } else {
        amx::pack_transposed(bits(src.row(b, i0, h)), src.stride.t, src.stride.d, mq, in.D, Dk,
                             kBlockQ, dst);
      }
    };
    if (use == QueryUse::kCached) {
      q = q_tiles.get(slice, tile, [&](uint16_t* dst) { rows_of(in.q, dst); });
      dout = dout_tiles.get(slice, tile, [&](uint16_t* dst) { rows_of(in.dout, dst); });
    } else {
      rows_of(in.q, q_own.data());
      rows_of(in.dout, dout_own.data());
      q = q_own.data();
      dout = dout_own.data();
    }
    if (use != QueryUse::kOwn) {
      qt = qt_tiles.get(slice, tile, [&](uint16_t* dst) { transposed_of(in.q, dst); });
      doutt = doutt_tiles.get(slice, tile, [&](uint16_t* dst) { transposed_of(in.dout, dst); });
    }
  }

  // recompute_ds on AMX: s <- p (undropped), dp <- ds for the packed query tile (rows i0 ..
  // i0 + mq) against the packed key tile; the products cover the 32-row blocks [lo, hi)
  // around the active rows.
  TileDone recompute(const Mask& mask, const ScoreMods<float>& mods, const KeyTile& key_tile,
                     int64_t i0, int mq, int64_t j0, int nk, const float* lse,
                     const float* delta, T* dbias, int64_t dbias_ld) {
    const ActiveRows rows = tile_bands(mask, i0, mq, j0, nk, key_tile, begin, end);
    const int Ns = key_tile.columns(round_up(nk, kColPad));
    if (rows.count() == 0) return {rows, nk, Ns, 0, 0};
    const int ns = std::min(nk, Ns);
    const int r0 = rows.first;
    const int lo = r0 / 32 * 32, hi = round_up(rows.last, 32);
    float* sr = s.data() + r0 * Ns;
    float* dpr = dp.data() + r0 * Ns;
    float* dcapr = mods.softcap > 0 ? dcap.data() + r0 * Ns : nullptr;
    product(hi - lo, Ns, Dk, q + lo * Dk, Dk, q_part, kt, 2 * kBlockK, key_part,
            s.data() + lo * Ns, Ns, false);
    fused = !(mods.softcap > 0) && !mods.alibi && !mods.dropout && mods.bias == nullptr &&
            key_tile.mask == nullptr;
    if (fused) {  // no feature modifies the scores: p and ds go straight to their operands
      product(hi - lo, Ns, Dk, dout + lo * Dk, Dk, q_part, vt, 2 * kBlockK, key_part,
              dp.data() + lo * Ns, Ns, false);
      amx::softmax_grad_to_operands<E, kSplit>(
          s.data(), dp.data(), Ns, lo, hi, r0, rows.last, begin, end,
          static_cast<float>(in.scale), lse, delta, ds_rows.data(), kBlockK, p_pairs.data(),
          ds_pairs.data(), score_part, score_part);
      return {rows, nk, Ns, lo, hi};
    }
    amx::scale_scores(s.data(), Ns, r0, rows.last, static_cast<float>(in.scale));
    mods.transform(sr, dcapr, rows.count(), Ns, i0 + r0, j0);
    mods.template add_bias<T, Ops>(sr, rows.count(), Ns, ns, i0 + r0, j0);
    key_tile.mask_scores(sr, rows.count(), Ns, ns);
    product(hi - lo, Ns, Dk, dout + lo * Dk, Dk, q_part, vt, 2 * kBlockK, key_part,
            dp.data() + lo * Ns, Ns, false);
    if (mods.dropout) mods.template drop<Ops>(dpr, rows.count(), Ns, ns, row_keys_ + r0, col_keys_);
    Ops::softmax_grad(sr, dpr, rows.count(), Ns, begin + r0, end + r0, lse + r0, delta + r0);
    finish_ds(dpr, dcapr, rows.count(), Ns, ns,
              dbias == nullptr ? nullptr : dbias + r0 * dbias_ld, dbias_ld);
    return {rows, nk, Ns, lo, hi};
  }

  // The dq tile (dq = dq / scale, whole 32-row blocks) and the key tile's dq product.
  void begin_dq(int mq) { std::fill_n(dq.data(), round_up(mq, 32) * Dk, 0.0f); }
  void dq_product(const TileDone& done) {
    const int lo = done.lo, hi = done.hi, Ns = done.Ns;
    if (!fused) {
      amx::convert_rows<E, kSplit>(dp.data(), Ns, lo, hi, done.rows.first, done.rows.last, Ns,
                                   kBlockK, ds_rows.data(), kBlockK, score_part);
    }
    product(hi - lo, Dk, kBlockK, ds_rows.data() + lo * kBlockK, kBlockK, score_part, kp, 2 * Dk,
            key_part, dq.data() + lo * Dk, Dk, true);
  }
  void store_dq(int mq, int64_t b, int64_t i0, int64_t h) {
    store_rows<avx512::Ops>(dq.data(), Dk, mq, in.D, in.scale, in.dq, b, i0, h);
  }

  // dk^T / dv^T accumulators: a key block as Dk x kBlockK floats, block after block in the
  // single-pass scheme's slice rows.
  int64_t block_elems() const { return int64_t{Dk} * kBlockK; }
  float* dk_block() { return dkt.data(); }
  float* dv_block() { return dvt.data(); }
  void zero_block(int /*nk_stored*/) {
    std::fill(dkt.begin(), dkt.end(), 0.0f);
    std::fill(dvt.begin(), dvt.end(), 0.0f);
  }
  // dv^T += dout^T (z p) and dk^T += q^T ds (unscaled: dk = scale q^T ds, applied on store)
  // for the tile recompute just formed; rows [lo, hi) of the query tile.
  void accumulate(const ScoreMods<float>& mods, const TileDone& done, float* dkt_tile,
                  float* dvt_tile) {
    const ActiveRows& rows = done.rows;
    const int r0 = rows.first, lo = done.lo, hi = done.hi, Ns = done.Ns;
    if (!fused) {
      if (mods.dropout) {
        mods.template drop<Ops>(s.data() + r0 * Ns, rows.count(), Ns, std::min(done.nk, Ns),
                                row_keys_ + r0, col_keys_);
      }
      amx::convert_row_pairs<E, kSplit>(s.data(), Ns, lo, hi, r0, rows.last, Ns,
                                        p_pairs.data(), score_part);
      amx::convert_row_pairs<E, kSplit>(dp.data(), Ns, lo, hi, r0, rows.last, Ns,
                                        ds_pairs.data(), score_part);
    }
    product(Dk, Ns, hi - lo, doutt + lo, kBlockQ, q_part, p_pairs.data() + lo * Ns, 2 * Ns,
            score_part, dvt_tile, kBlockK, true);
    product(Dk, Ns, hi - lo, qt + lo, kBlockQ, q_part, ds_pairs.data() + lo * Ns, 2 * Ns,
            score_part, dkt_tile, kBlockK, true);
  }
  // The first n keys of the block at j0 (columns of dk^T, dv^T) into the gradients.
  void store_block(const float* dk, const float* dv, int n, int64_t b, int64_t j0, int64_t hk) {
    store_transposed(dk, kBlockK, n, in.D, static_cast<float>(in.scale), in.dk, b, j0, hk);
    store_transposed(dv, kBlockK, n, in.D, 1.0f, in.dv, b, j0, hk);
  }
};

#endif  // FASTLLM_ATTENTION_CPU_X86

// ---- validation and dispatch -------------------------------------------------------------

void check_problem(const char* fn, const Problem& p) {
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument(std::string(fn) + ": " + what);
  };
  auto str = [](auto x) { return std::to_string(x); };
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0) {
    fail("batch, seqlen_q and seqlen_k must be >= 0, got " + str(p.batch) + ", " +
         str(p.seqlen_q) + ", " + str(p.seqlen_k));
  }
  if (p.num_heads < 1 || p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads != 0) {
    fail("num_kv_heads must divide num_heads, got num_heads=" + str(p.num_heads) +
         ", num_kv_heads=" + str(p.num_kv_heads));
  }
  if (p.head_dim < 1 || p.head_dim > 1024) {
    fail("head_dim must be in [1, 1024], got " + str(p.head_dim));
  }
  if (!(p.softcap >= 0)) fail("softcap must be >= 0 (0 = off), got " + str(p.softcap));
  if (p.window_left < -1 || p.window_right < -1) {
    fail("window_size must be (-1 or >= 0, -1 or >= 0), got (" + str(p.window_left) + ", " +
         str(p.window_right) + ")");
  }
  if (!(p.dropout_p >= 0 && p.dropout_p < 1)) {
    fail("dropout_p must be in [0, 1), got " + str(p.dropout_p));
  }
  if (p.dropout_p > 0 && p.dropout_seed == nullptr) {
    fail("dropout_seed must be given when dropout_p > 0 (dropout_p = " + str(p.dropout_p) + ")");
  }
  if (p.alibi_slopes != nullptr && p.alibi_stride_b < 0) {
    fail("alibi_stride_b must be >= 0, got " + str(p.alibi_stride_b));
  }
  // lse rows of different heads (or padded sequences) must not alias: a stride left at its
  // default 0 would make every thread write the same row.
  const bool any_query = p.batch > 0 && p.seqlen_q > 0;
  if (p.lse_stride_h < 0 || (any_query && p.num_heads > 1 && p.lse_stride_h == 0)) {
    fail("lse_stride_h must be >= 1 when num_heads > 1, got " + str(p.lse_stride_h));
  }
  if (p.lse_stride_b < 0 ||
      (any_query && p.cu_seqlens_q == nullptr && p.batch > 1 && p.lse_stride_b == 0)) {
    fail("lse_stride_b must be >= 1 for a padded batch of B > 1, got " + str(p.lse_stride_b));
  }
  // Cheap O(B) sanity of the per-sequence lengths, which bound every loop and row address
  // (the torch glue checks the values fully).
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqLens len = seq_lens(p, b);
    if (len.q < 0 || len.q > p.seqlen_q) {
      fail("cu_seqlens_q[" + str(b + 1) + "] - cu_seqlens_q[" + str(b) + "] must be in [0, " +
           "seqlen_q = " + str(p.seqlen_q) + "], got " + str(len.q));
    }
    if (len.k_stored < 0 || len.k_stored > p.seqlen_k) {
      fail("cu_seqlens_k[" + str(b + 1) + "] - cu_seqlens_k[" + str(b) + "] must be in [0, " +
           "seqlen_k = " + str(p.seqlen_k) + "], got " + str(len.k_stored));
    }
    if (len.k < 0 || len.k > len.k_stored) {
      fail("seqused_k[" + str(b) + "] must be in [0, " + str(len.k_stored) +
           "] (the keys stored for sequence " + str(b) + "), got " + str(len.k));
    }
  }
}

// Calls run(TypeTag<Ops>{}) with the best tile operations for storage type T on this CPU:
// the float-acc dtypes run the AVX-512 or AVX2 tiles when the CPU has them; float64 and
// other CPUs run scalar.
template <class T, class Run>
void with_best_ops(Run&& run) {
#if defined(FASTLLM_ATTENTION_CPU_X86)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::cpu_avx512()) return run(TypeTag<avx512::Ops>{});
    if (cpu::cpu_isa() == cpu::CpuIsa::kAvx2) return run(TypeTag<Avx2Ops>{});
  }
#endif
  run(TypeTag<ScalarOps<AccOf<T>>>{});
}

}  // namespace

void attention_fwd_cpu(const FwdParams& p) {
  check_problem("attention_fwd_cpu", p);
  if (p.batch == 0 || p.seqlen_q == 0) return;
#if defined(FASTLLM_ATTENTION_CPU_X86)
  if (decode_eligible(p)) {
    switch (p.dtype) {
      case DType::kFloat32: return decode_with_best<float>(p);
      case DType::kBFloat16: return decode_with_best<BFloat16>(p);
      case DType::kFloat16: return decode_with_best<Half>(p);
      default: break;
    }
  }
  // Tests only (FASTLLM_CPU_EMULATE_AMX): the float32 split and float16 tile paths without
  // their tiles, on vector products (amx::DotEngine), where the CPU lacks them.
  if (p.dtype == DType::kFloat32 && cpu::cpu_amx_split_emulated()) {
    return attention_fwd_amx<float, amx::DotEngine>(p);
  }
  if (p.dtype == DType::kFloat16 && cpu::cpu_amx_fp16_emulated()) {
    return attention_fwd_amx<Half, amx::DotEngine>(p);
  }
  if (p.dtype == DType::kBFloat16 && cpu::cpu_amx()) {
    return attention_fwd_amx<BFloat16>(p);
  }
  if (p.dtype == DType::kBFloat16 && cpu::cpu_avx512_dot()) {
    return attention_fwd_amx<BFloat16, amx::DotEngine>(p);
  }
  // float32 split into bfloat16 parts, as its backward (AmxBwdThread<float>): the backward
  // recomputes the scores against this lse, so both must form them alike (scores rounded by
  // the split products in one and by FMAs in the other cost dv 6x torch's error at scale-2
  // inputs, D96).
  if (p.dtype == DType::kFloat32 && cpu::cpu_amx()) {
    return attention_fwd_amx<float>(p);
  }
  if (p.dtype == DType::kFloat16 && cpu::cpu_amx_fp16()) {
    return attention_fwd_amx<Half>(p);
  }
#endif
  cpu::dispatch_dtype(p.dtype, "attention_fwd_cpu", [&](auto type) {
    using T = typename decltype(type)::type;
    with_best_ops<T>([&](auto ops) { attention_fwd_typed<T, typename decltype(ops)::type>(p); });
  });
}

void attention_bwd_cpu(const BwdParams& p) {
  check_problem("attention_bwd_cpu", p);
  if (p.batch == 0) return;
#if defined(FASTLLM_ATTENTION_CPU_X86)
  // Tests only (FASTLLM_CPU_EMULATE_AMX), as in forward.
  if (p.dtype == DType::kFloat16 && cpu::cpu_amx_fp16_emulated()) {
    return attention_bwd_with<AmxBwdThread<Half, amx::DotEngine>, Half>(p);
  }
  if (p.dtype == DType::kFloat32 && cpu::cpu_amx_split_emulated()) {
    return attention_bwd_with<AmxBwdThread<float, amx::DotEngine>, float>(p);
  }
  if (p.dtype == DType::kBFloat16 && cpu::cpu_amx()) {
    return attention_bwd_with<AmxBwdThread<BFloat16>, BFloat16>(p);
  }
  if (p.dtype == DType::kBFloat16 && cpu::cpu_avx512_dot()) {
    return attention_bwd_with<AmxBwdThread<BFloat16, amx::DotEngine>, BFloat16>(p);
  }
  if (p.dtype == DType::kFloat16 && cpu::cpu_amx_fp16()) {
    return attention_bwd_with<AmxBwdThread<Half>, Half>(p);
  }
  if (p.dtype == DType::kFloat32 && cpu::cpu_amx()) {
    return attention_bwd_with<AmxBwdThread<float>, float>(p);
  }
#endif
  cpu::dispatch_dtype(p.dtype, "attention_bwd_cpu", [&](auto type) {
    using T = typename decltype(type)::type;
    with_best_ops<T>([&](auto ops) {
      attention_bwd_with<BwdThread<T, typename decltype(ops)::type>, T>(p);
    });
  });
}

}  // namespace attention
}  // namespace fastllm
