// The vector paths of cross_entropy_cpu.cpp, written once: cross_entropy_cpu.cpp includes
// this file inside its AVX2 region (namespace avx2_path: W = 8 floats) and inside its AVX-512
// region (namespace avx512_path: W = 16 floats), after each has defined the names used here:
// V and W (the vector and its lanes); kSlots, loadn, storen and for_each_chunk(len, body);
// broadcast, fmadd and fnmadd (+, - and * are GCC's vector operators); hsum (of a vector or
// of kSlots) and hmax (of kSlots); tanh_vec, exp_nonpositive (e^d for d <= 0, -inf or
// NaN) and scaled_exp_16bit (coef * e^d, as accurate as 16-bit gradients need);
// load_even_odd and store_even_odd_nan_free (2 W bfloat16 as two vectors); the row-tail
// helpers max_first, sub_first and add_exp_first (an operation on the first n lanes, the
// others left as they were or 0). The software prefetch distances and prefetch() are
// cross_entropy_cpu.cpp's, ahead of both regions. No include guard: it is meant to be
// included twice.

// Whether chunk slot k of for_each_chunk starts a 64-byte line of T (one prefetch per line).
template <class T>
FASTLLM_INLINE constexpr bool starts_line(int k) {
  return (static_cast<int64_t>(k) * W * static_cast<int64_t>(sizeof(T))) % 64 == 0;
}
template <class T>
FASTLLM_INLINE void prefetch_fwd(const T* chunk, int k) {
  if (starts_line<T>(k)) prefetch(chunk + kFwdPrefetchAhead / sizeof(T));
}
template <class T>
FASTLLM_INLINE void prefetch_bwd(const T* chunk, int k) {
  if (starts_line<T>(k)) prefetch(chunk + kPrefetchAhead / sizeof(T));
}

// body(even, odd, j, k) on [0, len) of bfloat16 values (len a multiple of 2 W x kSlots),
// 2 W at a time from element j in the even/odd layout (load_even_odd), k = 0..kSlots-1 as
// for_each_chunk's slots.
template <class T, class Body>
FASTLLM_INLINE void for_each_even_odd(const T* x, int64_t len, Body&& body) {
  for (int64_t j0 = 0; j0 < len; j0 += 2 * W * kSlots) {
#pragma GCC unroll 4
    for (int k = 0; k < kSlots; ++k) {
      const int64_t j = j0 + 2 * W * k;
      V even, odd;
      load_even_odd(reinterpret_cast<const cpu::BFloat16*>(x + j), even, odd);
      body(even, odd, j, k);
    }
  }
}

// The scalar path's algorithm on vectors. The forward's online max is kept per block of
// kBlock logits rather than per element: a first sweep over the block takes its max, the
// running sum is rescaled once if the max grew, and a second sweep, which finds the block in
// L1, adds exp(z - max). That costs one max per element instead of a compare and an
// unpredictable branch per vector, and the row is still read from memory once. Four
// independent accumulator slots (for_each_chunk's k) hide the latency of the running sums;
// the partial vector at a row's end leaves its padding lanes out of the max, the exp-sum
// and the smoothing sum. The smoothing sum's vectors hold w_c (z_c - m) with the running
// max m of their block; when a block raises m, the weight seen so far times (m_old - m_new)
// goes into a double, so that their total is sum_c w_c (z_c - m) for the row's max m.

template <class T, bool kSoftcap, Smoothing kSmooth>
int64_t fwd_rows(const FwdParams& p, const Consts<float>& c, int64_t row_begin,
                 int64_t row_end) {
  // bfloat16 logits without class-weighted smoothing: each block's whole groups of 2 W x
  // kSlots logits (its head) load 2 W at a time in the even/odd layout (load_even_odd; no
  // widening shuffle) in both sweeps, the order of the lanes being nothing to a max or a sum;
  // the rest of the block, if any, takes the generic loop. 4096 x 32000 on a Zen 5 core
  // (record benchmarks/results/2026-12-07-cpu-cross-entropy-bf16-forward-even-odd-ab-
  // zen5.txt): AVX2 path 32.4-32.5 -> 28.2-28.3 ms, AVX-512 path 14.7 -> 11.9.
  constexpr bool kEvenOddForward =
      std::is_same_v<T, cpu::BFloat16> && kSmooth != Smoothing::kWeighted;
  const int64_t vocab = p.vocab;
  const V softcap = broadcast(c.softcap);
  const V inv_softcap = broadcast(c.inv_softcap);
  const V minus_inf = broadcast(-INFINITY);
  int64_t bad_row = -1;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
    float m = -FLT_MAX;  // running max of the capped logits
    V s[kSlots], smoothing_sum[kSlots];  // s: sum of exp(z - m), lane-wise partials
    for (int k = 0; k < kSlots; ++k) {
      s[k] = broadcast(0.0f);
      smoothing_sum[k] = broadcast(0.0f);
    }
    // The rebasing of smoothing_sum, and the class weight of the blocks before this one.
    double smoothing_rebase = 0, weight_seen = 0;
    for (int64_t begin = 0; begin < vocab; begin += kBlock) {
      const T* xb = x + begin;
      const int64_t len = std::min(kBlock, vocab - begin);
      const int64_t head = kEvenOddForward ? len / (2 * W * kSlots) * (2 * W * kSlots) : 0;
      const T* xt = xb + head;  // the generic loop's part of the block
      // The block's max, on the raw logits: tanh is increasing, so capping commutes with it.
      V block_max[kSlots];
      for (int k = 0; k < kSlots; ++k) block_max[k] = minus_inf;
      if constexpr (kEvenOddForward) {
        for_each_even_odd(xb, head, [&](V even, V odd, int64_t, int k) FASTLLM_INLINE_LAMBDA {
          block_max[k] = max_first(max_first(block_max[k], even, W), odd, W);
        });
      }
      for_each_chunk(len - head, [&](int64_t j, int n, int k) FASTLLM_INLINE_LAMBDA {
        block_max[k] = max_first(block_max[k], loadn(xt + j, n), n);
      });
      const float new_max = capped_logit(hmax(block_max), c);
      if (new_max > m) {
        const V rescale = broadcast(std::exp(m - new_max));
        for (int k = 0; k < kSlots; ++k) s[k] = s[k] * rescale;
        if (kSmooth != Smoothing::kNone) {
          smoothing_rebase += weight_seen * (static_cast<double>(m) - new_max);
        }
        m = new_max;
      }
      const V m_v = broadcast(m);
      if constexpr (kEvenOddForward) {
        for_each_even_odd(xb, head, [&](V even, V odd, int64_t j, int k) FASTLLM_INLINE_LAMBDA {
          if (k * 2 * W * sizeof(T) % 64 == 0) prefetch(xb + j + kFwdPrefetchAhead / sizeof(T));
          if (kSoftcap) {
            even = softcap * tanh_vec(even * inv_softcap);
            odd = softcap * tanh_vec(odd * inv_softcap);
          }
          if (kSmooth == Smoothing::kUniform) {
            smoothing_sum[k] = smoothing_sum[k] + (even - m_v) + (odd - m_v);
          }
          s[k] = add_exp_first(add_exp_first(s[k], even, m_v, W), odd, m_v, W);
        });
      }
      const float* wt = kSmooth == Smoothing::kWeighted ? c.weight + begin + head : nullptr;
      V block_weight = broadcast(0.0f);
      for_each_chunk(len - head, [&](int64_t j, int n, int k) FASTLLM_INLINE_LAMBDA {
        prefetch_fwd(xt + j, k);
        V z = loadn(xt + j, n);  // padding lanes load as 0
        if (kSoftcap) z = softcap * tanh_vec(z * inv_softcap);
        if (kSmooth != Smoothing::kNone) {
          const V z_rel = sub_first(z, m_v, n);
          if (kSmooth == Smoothing::kUniform) {
            smoothing_sum[k] = smoothing_sum[k] + z_rel;
          } else {
            const V w = loadn(wt + j, n);  // padding lanes load as 0
            smoothing_sum[k] = fmadd(w, z_rel, smoothing_sum[k]);
            block_weight = block_weight + w;
          }
        }
        s[k] = add_exp_first(s[k], z, m_v, n);
      });
      if (kSmooth == Smoothing::kUniform) weight_seen += static_cast<double>(len);
      if (kSmooth == Smoothing::kWeighted) weight_seen += hsum(block_weight);
    }
    const float log_sum = std::log(hsum(s));
    const double smooth =
        kSmooth == Smoothing::kNone ? 0.0 : hsum(smoothing_sum) + smoothing_rebase;
    if (fwd_row_end(p, c, r, x, m, log_sum, smooth) && bad_row < 0) bad_row = r;
  }
  return bad_row;
}

// A row's backward constants as vectors, for logit_grad.
struct BwdVecs {
  V lse_hi, lse_lo, coef_p, coef_w, softcap, inv_softcap;
};

// The gradient at one vector of logits x, as the scalar path's: coef_p e^(z - lse) - coef_w w
// (w the class weights' vector with kWeighted, else 1), z = x or softcap tanh(x / softcap),
// and with soft-capping times 1 - tanh^2; 16-bit gradients take the shorter exp.
template <class T, bool kSoftcap, bool kWeighted>
FASTLLM_INLINE V logit_grad(V x, V w, const BwdVecs& v) {
  V z = x, tanh_x = x;
  if (kSoftcap) {
    tanh_x = tanh_vec(x * v.inv_softcap);
    z = v.softcap * tanh_x;
  }
  V d = sizeof(T) == 2 ? scaled_exp_16bit((z - v.lse_hi) - v.lse_lo, v.coef_p)
                       : v.coef_p * exp_nonpositive((z - v.lse_hi) - v.lse_lo);
  d = kWeighted ? fnmadd(v.coef_w, w, d) : d - v.coef_w;
  if (kSoftcap) d = d * fnmadd(tanh_x, tanh_x, broadcast(1.0f));
  return d;
}

// The backward's row loop for bfloat16 logits (all rows but those with class-weighted label
// smoothing, whose w_c term is per element; with soft-capping, the generic loop's tanh and its
// derivative on each half), on the row's first elements, 2 W x kSlots at a time; returns how
// many it did (bwd_rows does the rest with the generic loop). 2 W values per step in the
// even/odd layout of cpu_avx2_even_odd.h (load_even_odd / store_even_odd_nan_free): one load
// split into the even and the odd elements by a shift and a mask, one store joining their
// roundings by an or, no widening or narrowing shuffle (vpmovzxwd, vextracti128 + vpackusdw on
// AVX2; vpmovzxwd, and vcvtneps2bf16 behind its denormal/NaN test, on AVX-512) -- and rounding
// without a NaN select, which is exact as the row's four constants, the only floats besides
// the finite softcap and its inverse that do not come from bfloat16 logits, are not NaN (else
// the row is left to the generic loop). Bfloat16 backward in place at 4096 x 32000 on a Zen 5
// core (record benchmarks/results/2026-12-07-cpu-cross-entropy-avx2-bf16-backward-ab-
// zen5.txt): AVX2 path 57-61 ms with the generic loop as it was, 46 with scaled_exp_16bit, 43
// without the NaN select as well, 35-37 with this loop; AVX-512 path 20.1-20.8 -> 16.7-17.5.
template <class T, bool kSoftcap, bool kWeighted>
int64_t bwd_row_head(const T* x, T* dx, int64_t len, const BwdRow<float>& row,
                     const BwdVecs& v) {
  if constexpr (std::is_same_v<T, cpu::BFloat16> && !kWeighted) {
    if (std::isnan(row.split.hi) || std::isnan(row.split.lo) || std::isnan(row.k.coef_p) ||
        std::isnan(row.k.coef_w)) {
      return 0;
    }
    const int64_t head = len / (2 * W * kSlots) * (2 * W * kSlots);
    for_each_even_odd(x, head, [&](V even, V odd, int64_t j, int k) FASTLLM_INLINE_LAMBDA {
      if (k * 2 * W * sizeof(T) % 64 == 0) prefetch(x + j + kPrefetchAhead / sizeof(T));
      store_even_odd_nan_free(dx + j, logit_grad<T, kSoftcap, false>(even, V{}, v),
                              logit_grad<T, kSoftcap, false>(odd, V{}, v));
    });
    return head;
  } else {
    return 0;
  }
}

template <class T, bool kSoftcap, bool kWeighted>
void bwd_rows(const BwdParams& p, const Consts<float>& c, int64_t num_classes,
              int64_t row_begin, int64_t row_end) {
  const int64_t vocab = p.vocab;
  const float* weight = c.weight != nullptr ? c.weight + p.class_offset : nullptr;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
    T* dx = static_cast<T*>(p.grad_logits) + r * p.grad_row_stride;
    const BwdRow<float> row = bwd_row<T, kWeighted>(p, c, num_classes, r, x);
    if (row.fill) {
      const V v = broadcast(row.fill_value);
      for_each_chunk(vocab, [&](int64_t j, int n, int) FASTLLM_INLINE_LAMBDA {
        storen(dx + j, v, n);
      });
      continue;
    }
    const BwdVecs v{broadcast(row.split.hi), broadcast(row.split.lo), broadcast(row.k.coef_p),
                    broadcast(row.k.coef_w), broadcast(c.softcap), broadcast(c.inv_softcap)};
    // bfloat16 rows' own loop for the first elements (a multiple of 2 W x kSlots), if any.
    const int64_t head = bwd_row_head<T, kSoftcap, kWeighted>(x, dx, vocab, row, v);
    const T* x_rest = x + head;
    T* dx_rest = dx + head;
    const float* weight_rest = kWeighted ? weight + head : nullptr;
    for_each_chunk(vocab - head, [&](int64_t j, int n, int k) FASTLLM_INLINE_LAMBDA {
      prefetch_bwd(x_rest + j, k);
      const V w = kWeighted ? loadn(weight_rest + j, n) : V{};
      storen(dx_rest + j, logit_grad<T, kSoftcap, kWeighted>(loadn(x_rest + j, n), w, v), n);
    });
    if (row.t >= 0) dx[row.t] = from_acc<T>(row.grad_t);
  }
}
