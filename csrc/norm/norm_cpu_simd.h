// The vector paths of norm_cpu.cpp, written once: norm_cpu.cpp includes this file inside its
// AVX2 region (namespace avx2_path: W = 8 floats or 4 doubles, cpu_avx2.h; and
// avx2_even_odd_path, the bfloat16 forward on 16 floats in even/odd order,
// cpu_avx2_even_odd.h) and inside its AVX-512 region (namespace avx512_path: W = 16 floats,
// cpu_avx512.h), after each has defined the names used here: Vec<T> and kLanes<T> (the
// vector of T's accumulation type and its lanes), ParamOf<T> (the element type of the
// forward's weight and bias arrays: T's accumulation type, or EvenOddFloat), kSlots,
// broadcast, fmadd, fnmadd, hsum (of one vector), keep_first, loadn, storen and
// for_each_chunk<W>, and store_stream and copy_stream (non-temporal stores of a full vector).
// The partial vector at a row's end loads with its padding lanes at zero.
// No include guard: it is meant to be included more than once.

// kSums vector sums over [0, n) in blocks of kSumBlock: body(j, m, acc) adds the terms of
// chunk [j, j + m) into acc[0..kSums), one of kSlots sets of block accumulators.
template <int W, int kSums, class V, class Body>
FASTLLM_INLINE void sum_row_simd(int64_t n, V (&sums)[kSums], Body&& body) {
  for (V& sum : sums) sum = V{};
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    V block[kSlots][kSums] = {};
    for_each_chunk<W>(std::min(kSumBlock, n - j0),
                      [&](int64_t j, int m, int k) FASTLLM_INLINE_LAMBDA {
                        body(j0 + j, m, block[k]);
                      });
    for (int i = 0; i < kSums; ++i) {
      sums[i] += (block[0][i] + block[1][i]) + (block[2][i] + block[3][i]);
    }
  }
}

// See kPrefetchMinBytes. A prefetch never faults, so fetching one row past the last is fine.
FASTLLM_INLINE void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

// Whether chunk slot k of for_each_chunk starts a new 64-byte line of T elements (the
// group of kSlots chunks starts at a multiple of kSlots * W elements).
template <class T, int W>
FASTLLM_INLINE constexpr bool starts_cache_line(int k) {
  return (static_cast<int64_t>(k) * W * sizeof(T)) % 64 == 0;
}

// Stores the first m lanes of v to p: non-temporally where `stream` is set and the vector is
// full (norm_cpu.cpp checked that the rows allow it: common/cpu_memory.h, stream_outputs).
template <class T, class V>
FASTLLM_INLINE void store_out(T* p, V v, int m, bool stream) {
  if (stream && m == kLanes<T>) {
    store_stream(p, v);
  } else {
    storen(p, v, m);
  }
}

// dst[0, n) = src[0, n): the full vectors by non-temporal stores (dst's row starts on a
// 64-byte boundary: stream_outputs' rows), the rest plainly. The kernels stream one row at a
// time, never several rows' vectors in turn: on a Zen 3 core (EPYC, family 25 model 1) y =
// 1.5 x into a reused 16 MiB buffer ran at 40-55 GB/s streaming row after row (19-25 plain),
// but at 3.5-4.1 GB/s streaming 4 rows of 1024 floats in turn, 8 floats of each at a step
// (17-24 plain) -- the backward's 4-row sweep -- and at 15-21 through a scratch block streamed
// out row by row (benchmarks/micro/stream_stores.cpp, record benchmarks/results/
// 2026-12-06-cpu-stream-stores-zen3.txt); `fastllm bench norm`'s float32 4096 x 1024
// forward+backward went 25.0 -> 10.1 ms (add_layer_norm), 11.8 -> 7.03 (layer_norm) on that
// core (...-norm-zen3-before-3processes.txt, ...-norm-zen3-stream-row-by-row-3processes.txt).
// (The Zen 4 guest streamed 4 rows in turn without that loss: record
// ...-norm-zen4-avx2-held-stream-stores-ab-6pairs.txt.)
template <int W, class T>
FASTLLM_INLINE void stream_row(T* dst, const T* src, int64_t n) {
  int64_t j = 0;
  for (; j + W <= n; j += W) copy_stream<static_cast<int>(W * sizeof(T))>(dst + j, src + j);
  if (j < n) std::memcpy(dst + j, src + j, sizeof(T) * (n - j));
}

// stream: the outputs (out, residual_out) are stored non-temporally. The add_* ops then keep
// the row's s in a scratch row instead of reading it back from residual_out, which a
// non-temporal store has sent past the cache.
template <class T>
void norm_fwd_rows(const FwdParams& p, int64_t row_begin, int64_t row_end, bool stream) {
  using Acc = AccOf<T>;
  using V = Vec<T>;
  constexpr int W = kLanes<T>;
  const int64_t n = p.cols;
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  const ParamOf<T>* w = static_cast<const ParamOf<T>*>(p.weight);
  const ParamOf<T>* b = static_cast<const ParamOf<T>*>(p.bias);
  const bool prefetch_rows =
      p.rows * std::max<int64_t>(p.x_row_stride, n) * static_cast<int64_t>(sizeof(T)) >=
      kPrefetchMinBytes;
  std::unique_ptr<T[]> s_scratch;
  if (stream && p.residual != nullptr) s_scratch.reset(new T[n]);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
    const T* res = p.residual == nullptr
                       ? nullptr
                       : static_cast<const T*>(p.residual) + r * p.residual_row_stride;
    T* s_out = res == nullptr ? nullptr : static_cast<T*>(p.residual_out) + r * n;
    // Where the statistics pass stores s: residual_out, or the scratch row when streaming.
    T* s_row = s_scratch ? s_scratch.get() : s_out;
    // s, chunk by chunk: x, or x + residual rounded to T as stored to residual_out.
    auto load_s = [&](int64_t j, int m) FASTLLM_INLINE_LAMBDA {
      if (res == nullptr) return loadn(x + j, m);
      const V sum = loadn(x + j, m) + loadn(res + j, m);
      storen(s_row + j, sum, m);
      if constexpr (std::is_same_v<T, Acc>) return sum;
      return loadn(s_row + j, m);
    };

    Acc mean = 0, var = 0;
    if (p.rms) {
      V sum_sq[1];
      sum_row_simd<W>(n, sum_sq, [&](int64_t j, int m, V* acc) FASTLLM_INLINE_LAMBDA {
        const V v = load_s(j, m);
        acc[0] = fmadd(v, v, acc[0]);
      });
      var = hsum(sum_sq[0]) * inv_n;
    } else {
      const int head = static_cast<int>(std::min<int64_t>(n, W));
      V head_sum = loadn(x, head);
      if (res != nullptr) head_sum += loadn(res, head);
      const Acc shift = hsum(head_sum) / static_cast<Acc>(head);
      const V shift_v = broadcast(shift);
      V sums[2];  // d, d^2 with d = s - shift
      sum_row_simd<W>(n, sums, [&](int64_t j, int m, V* acc) FASTLLM_INLINE_LAMBDA {
        V d = load_s(j, m) - shift_v;
        if (m < W) d = keep_first(d, m);  // a padding lane is 0 - shift, not 0
        acc[0] += d;
        acc[1] = fmadd(d, d, acc[1]);
      });
      const Acc mean_d = hsum(sums[0]) * inv_n;
      const Acc mean_dd = hsum(sums[1]) * inv_n;
      mean = shift + mean_d;
      var = mean_dd - mean_d * mean_d;
      if (!(mean_dd <= kShiftedVarLimit * var)) {  // also catches var <= 0 and NaN
        const T* s = res == nullptr ? x : s_row;
        const V mean_v = broadcast(mean);
        V sum_sq[1];
        sum_row_simd<W>(n, sum_sq, [&](int64_t j, int m, V* acc) FASTLLM_INLINE_LAMBDA {
          V d = loadn(s + j, m) - mean_v;
          if (m < W) d = keep_first(d, m);
          acc[0] = fmadd(d, d, acc[0]);
        });
        var = hsum(sum_sq[0]) * inv_n;
      }
      static_cast<Acc*>(p.mean)[r] = mean;
    }
    const Acc rstd = Acc(1) / std::sqrt(var + static_cast<Acc>(p.eps));
    static_cast<Acc*>(p.rstd)[r] = rstd;

    const T* s = res == nullptr ? x : s_row;
    T* s_copy = s_scratch ? s_out : nullptr;  // streaming: the scratch row to residual_out
    const V mean_v = broadcast(mean);
    const V rstd_v = broadcast(rstd);
    T* y = static_cast<T*>(p.out) + r * n;
    const T* next_x = prefetch_rows ? x + p.x_row_stride : nullptr;
    const T* next_res = prefetch_rows && res != nullptr ? res + p.residual_row_stride : nullptr;
    // One loop per weight/bias combination, so the common affine case is a single FMA.
    auto write_y = [&](auto affine) FASTLLM_INLINE_LAMBDA {
      for_each_chunk<W>(n, [&](int64_t j, int m, int k) FASTLLM_INLINE_LAMBDA {
        if (next_x != nullptr && starts_cache_line<T, W>(k)) {
          prefetch(next_x + j);
          if (next_res != nullptr) prefetch(next_res + j);
        }
        store_out(y + j, affine((loadn(s + j, m) - mean_v) * rstd_v, j, m), m, stream);
      });
      // The scratch row's bits, on to residual_out: after y's row, not beside it (one
      // non-temporal stream at a time, stream_row).
      if (s_copy != nullptr) stream_row<W>(s_copy, s, n);
    };
    if (w != nullptr && b != nullptr) {
      write_y([&](V xhat, int64_t j, int m) FASTLLM_INLINE_LAMBDA {
        return fmadd(xhat, loadn(w + j, m), loadn(b + j, m));
      });
    } else if (w != nullptr) {
      write_y([&](V xhat, int64_t j, int m) FASTLLM_INLINE_LAMBDA { return xhat * loadn(w + j, m); });
    } else if (b != nullptr) {
      write_y([&](V xhat, int64_t j, int m) FASTLLM_INLINE_LAMBDA { return xhat + loadn(b + j, m); });
    } else {
      write_y([&](V xhat, int64_t, int) FASTLLM_INLINE_LAMBDA { return xhat; });
    }
  }
}

// What the column sweep of backward needs of one row.
// dx = rstd * (g - mean_g - xhat * mean_g_xhat) = fma(g, rstd, dx_bias) - xhat * dx_xhat.
template <class T>
struct BwdRowTerms {
  const T* x;
  const T* dy;
  const T* dres;
  T* dx;
  Vec<T> mean, rstd, dx_bias, dx_xhat;
};

// The column sweep of backward over kRows rows at once: dx of every row, and the rows'
// summed contribution to the dweight/dbias partials, which are thus read and written once
// per kRows rows. All loads of a chunk come before its stores: dx rows typically sit at a
// multiple of 4 KiB from the x / dy rows, and a load issued behind a store to the same
// address modulo 4 KiB waits for it (4K aliasing). Plain stores: a streamed dx goes out row
// by row after the sweep (norm_bwd_rows, stream_row).
template <int kRows, class T>
void norm_bwd_sweep(const BwdRowTerms<T>* rows, const AccOf<T>* w, int64_t n,
                         AccOf<T>* dw_partial, AccOf<T>* db_partial) {
  using V = Vec<T>;
  constexpr int W = kLanes<T>;
  for_each_chunk<W>(n, [&](int64_t j, int m, int) FASTLLM_INLINE_LAMBDA {
    V xhat[kRows], dy[kRows], dx[kRows];
    for (int i = 0; i < kRows; ++i) {
      xhat[i] = (loadn(rows[i].x + j, m) - rows[i].mean) * rows[i].rstd;
      dy[i] = loadn(rows[i].dy + j, m);
      dx[i] = rows[i].dx_bias;
      if (rows[i].dres != nullptr) dx[i] += loadn(rows[i].dres + j, m);
    }
    const V wv = w != nullptr ? loadn(w + j, m) : broadcast(AccOf<T>(1));
    V dw_sum = {}, db_sum = {};
    for (int i = 0; i < kRows; ++i) {
      dx[i] = fnmadd(xhat[i], rows[i].dx_xhat, fmadd(dy[i] * wv, rows[i].rstd, dx[i]));
      dw_sum = fmadd(dy[i], xhat[i], dw_sum);
      db_sum += dy[i];
    }
    for (int i = 0; i < kRows; ++i) storen(rows[i].dx + j, dx[i], m);
    if (dw_partial != nullptr) storen(dw_partial + j, loadn(dw_partial + j, m) + dw_sum, m);
    if (db_partial != nullptr) storen(db_partial + j, loadn(db_partial + j, m) + db_sum, m);
  });
}

// Whether backward's first pass over a row (its two sums) prefetches the same row of the
// next group (x, dy and dresidual_out, kRowGroup rows on): for 16-bit rows. At 4096 x 1024,
// fwd+bwd on one Zen 5 core (kept heap, benchmarks/micro/norm_fwd_bwd_loop.py without and
// with it), bfloat16 took 0.71-0.97x the time without on the AVX-512 path and 0.90-0.95x on
// AVX2 (the first pass's loads stalled: perf put 30 % of backward's samples on them), float32
// 1.04-1.16x on AVX-512 and 0.93-1.05x on AVX2.
template <class T>
inline constexpr bool kPrefetchNextGroup = sizeof(T) == 2;

// stream: dx is stored non-temporally -- a row group's dx rows are swept into a scratch
// block (plain stores: it stays in the cache) and then streamed out row after row
// (stream_row: streaming the sweep's 4 rows in turn ran 4x slower on Zen 3).
template <class T>
void norm_bwd_rows(const BwdParams& p, int64_t row_begin, int64_t row_end,
                        AccOf<T>* dw_partial, AccOf<T>* db_partial, bool stream) {
  using Acc = AccOf<T>;
  using V = Vec<T>;
  constexpr int W = kLanes<T>;
  const int64_t n = p.cols;
  const Acc* w = static_cast<const Acc*>(p.weight);
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  BwdRowTerms<T> rows[kRowGroup];
  std::unique_ptr<T[]> dx_scratch;
  if (stream) dx_scratch.reset(new T[kRowGroup * n]);
  for (int64_t group = row_begin; group < row_end; group += kRowGroup) {
    const int group_rows = static_cast<int>(std::min<int64_t>(kRowGroup, row_end - group));
    for (int i = 0; i < group_rows; ++i) {
      const int64_t r = group + i;
      BwdRowTerms<T>& t = rows[i];
      t.x = static_cast<const T*>(p.x) + r * p.x_row_stride;
      t.dy = static_cast<const T*>(p.dy) + r * p.dy_row_stride;
      t.dres = p.dresidual_out == nullptr
                   ? nullptr
                   : static_cast<const T*>(p.dresidual_out) + r * p.dresidual_out_row_stride;
      t.dx = stream ? dx_scratch.get() + i * n : static_cast<T*>(p.dx) + r * n;
      t.mean = broadcast(p.rms ? Acc(0) : static_cast<const Acc*>(p.mean)[r]);
      const Acc rstd = bwd_rstd<Acc>(p, r);
      t.rstd = broadcast(rstd);
      // Padding lanes have dy = 0, hence g = 0: they add nothing to either sum.
      V sums[2];  // g, g * (x - mean)
      const bool fetch_next = kPrefetchNextGroup<T> && r + kRowGroup < row_end;
      const T* next_x = fetch_next ? t.x + kRowGroup * p.x_row_stride : nullptr;
      const T* next_dy = fetch_next ? t.dy + kRowGroup * p.dy_row_stride : nullptr;
      const T* next_dres = fetch_next && t.dres != nullptr
                               ? t.dres + kRowGroup * p.dresidual_out_row_stride
                               : nullptr;
      sum_row_simd<W>(n, sums, [&](int64_t j, int m, V* acc) FASTLLM_INLINE_LAMBDA {
        if (fetch_next && (j * static_cast<int64_t>(sizeof(T))) % 64 == 0) {
          prefetch(next_x + j);
          prefetch(next_dy + j);
          if (next_dres != nullptr) prefetch(next_dres + j);
        }
        V g = loadn(t.dy + j, m);
        if (w != nullptr) g *= loadn(w + j, m);
        acc[0] += g;
        acc[1] = fmadd(g, loadn(t.x + j, m) - t.mean, acc[1]);
      });
      const Acc mean_g = p.rms ? Acc(0) : hsum(sums[0]) * inv_n;
      const Acc mean_g_xhat = hsum(sums[1]) * rstd * inv_n;
      t.dx_bias = broadcast(-rstd * mean_g);
      t.dx_xhat = broadcast(rstd * mean_g_xhat);
    }
    if (group_rows == kRowGroup) {
      norm_bwd_sweep<kRowGroup>(rows, w, n, dw_partial, db_partial);
    } else {
      for (int i = 0; i < group_rows; ++i) {
        norm_bwd_sweep<1>(rows + i, w, n, dw_partial, db_partial);
      }
    }
    if (stream) {
      for (int i = 0; i < group_rows; ++i) {
        stream_row<W>(static_cast<T*>(p.dx) + (group + i) * n, rows[i].dx, n);
      }
    }
  }
}
