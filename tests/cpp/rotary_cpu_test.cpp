// rotary_cpu (csrc/rotary/rotary.h) against a double-precision reference written straight
// from the math in rotary.h: every dtype, both pair layouts, partial rotary, odd head dims
// (2, 10, 80, 130), q and k with different head counts, padded and packed rows, the three
// position modes, conjugate (backward), in place, strided heads and rows, 1, 2 or 3 OpenMP
// threads. ctest runs this binary on the best instruction set of the machine (AVX-512 where
// it has it), with FASTLLM_CPU_ISA=avx2 and with FASTLLM_CPU_ISA=scalar.
//
// Every output buffer is initialised to NaN and the gaps between heads and rows are left
// so: a kernel that writes outside its features, or reads NaN padding into them, is caught.
//
// Tolerances: an output rounded to T may be off by one unit in the last place of T (rtol)
// plus the float arithmetic's error on terms as large as |x1| + |x2|.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "check.h"
#include "dtypes.h"
#include "rotary/rotary.h"

namespace {

using namespace fastllm_test;  // check.h, dtypes.h
using fastllm::rotary::Operand;
using fastllm::rotary::Params;
using fastllm::rotary::PositionMode;

struct Case {
  int64_t batch, seqlen, heads, kv_heads, head_dim, rotary_dim;
  bool interleaved, conjugate, packed, inplace;
  PositionMode mode;
  int64_t gap;  // extra elements between heads (strided layouts)
};

template <class T>
void run_case(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const int64_t half = c.rotary_dim / 2;
  const int64_t rows = c.batch * c.seqlen;
  const int64_t max_t = 3 * c.seqlen + 5;
  std::vector<float> cos_v(max_t * half), sin_v(max_t * half);
  for (int64_t p = 0; p < max_t; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = p * std::pow(10000.0, -2.0 * i / c.rotary_dim);
      cos_v[p * half + i] = static_cast<float>(std::cos(angle));
      sin_v[p * half + i] = static_cast<float>(std::sin(angle));
    }
  }
  // positions
  std::vector<int32_t> cu(c.batch + 1);
  for (int64_t b = 0; b <= c.batch; ++b) cu[b] = static_cast<int32_t>(b * c.seqlen);
  std::vector<int64_t> positions(c.mode == PositionMode::kPerToken ? rows : c.batch);
  for (auto& v : positions) {
    v = c.mode == PositionMode::kPerToken ? static_cast<int64_t>(rng() % max_t)
                                          : static_cast<int64_t>(rng() % (2 * c.seqlen + 5));
  }
  auto position = [&](int64_t r) {
    const int64_t b = r / c.seqlen, t = r % c.seqlen;
    if (c.mode == PositionMode::kPerToken) return positions[r];
    if (c.mode == PositionMode::kPerSeq) return positions[b] + t;
    return t;
  };
  Params p;
  p.batch = c.batch;
  p.seqlen = c.packed ? rows : c.seqlen;
  p.head_dim = c.head_dim;
  p.rotary_dim = c.rotary_dim;
  p.copy_rest = !c.inplace;
  p.cos = cos_v.data();
  p.sin = sin_v.data();
  p.cos_row_stride = p.sin_row_stride = half;
  p.cos_rows = max_t;
  p.cos_dtype = DType::kFloat32;
  p.mode = c.mode;
  p.positions = positions.data();
  p.positions_batch_stride = c.mode == PositionMode::kPerToken ? c.seqlen : 1;
  p.positions_token_stride = 1;
  p.cu_seqlens = c.packed ? cu.data() : nullptr;
  p.interleaved = c.interleaved;
  p.conjugate = c.conjugate;
  p.dtype = DTypeInfo<T>::kDType;
  const double nan = std::nan("");
  struct Buffers {
    std::vector<T> in, out;
    std::vector<double> x;
  } q, k;
  for (auto [buf, o, heads] : {std::tuple{&q, &p.q, c.heads}, std::tuple{&k, &p.k, c.kv_heads}}) {
    const int64_t head_stride = c.head_dim + c.gap;
    const int64_t row_stride = heads * head_stride + c.gap;
    buf->in.assign(rows * row_stride, from_acc<T>(static_cast<AccOf<T>>(nan)));
    buf->x.assign(rows * row_stride, nan);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t d = 0; d < c.head_dim; ++d) {
          const int64_t at = r * row_stride + h * head_stride + d;
          buf->in[at] = from_acc<T>(static_cast<AccOf<T>>(2.0 * normal(rng)));
          buf->x[at] = to_acc(buf->in[at]);
        }
      }
    }
    buf->out = c.inplace ? buf->in : std::vector<T>(buf->in.size(),
                                                    from_acc<T>(static_cast<AccOf<T>>(nan)));
    o->heads = heads;
    o->in = buf->in.data();
    o->out = c.inplace ? static_cast<void*>(buf->in.data()) : buf->out.data();
    o->in_row_stride = o->out_row_stride = row_stride;
    o->in_batch_stride = o->out_batch_stride = c.seqlen * row_stride;
    o->in_head_stride = o->out_head_stride = head_stride;
  }
  fastllm::rotary::rotary_cpu(p);
  const double rtol = DTypeInfo<T>::kRoundRtol, atol = DTypeInfo<T>::kRoundAtol;
  const double acc = std::is_same_v<AccOf<T>, double> ? 1e-13 : 4e-7;
  for (auto [buf, heads] : {std::pair{&q, c.heads}, std::pair{&k, c.kv_heads}}) {
    const std::vector<T>& got = c.inplace ? buf->in : buf->out;
    const int64_t head_stride = c.head_dim + c.gap;
    const int64_t row_stride = heads * head_stride + c.gap;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = position(r);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = r * row_stride + h * head_stride;
        for (int64_t d = 0; d < c.head_dim; ++d) {
          double expected = buf->x[base + d];
          double scale = std::fabs(expected);
          if (d < c.rotary_dim) {
            const int64_t i = c.interleaved ? d / 2 : d % half;
            const bool first = c.interleaved ? d % 2 == 0 : d < half;
            const int64_t partner = c.interleaved ? (first ? d + 1 : d - 1)
                                                  : (first ? d + half : d - half);
            const double cs = cos_v[pos * half + i];
            const double sn = (c.conjugate ? -1.0 : 1.0) * sin_v[pos * half + i];
            const double x = buf->x[base + d], y = buf->x[base + partner];
            expected = first ? x * cs - y * sn : x * cs + y * sn;
            scale = std::fabs(x) + std::fabs(y);
          }
          const double v = to_acc(got[base + d]);
          CHECK(std::fabs(v - expected) <= rtol * std::fabs(expected) + atol + acc * scale,
                "%s row %lld head %lld feature %lld: got %g, expected %g", DTypeInfo<T>::kName,
                (long long)r, (long long)h, (long long)d, v, expected);
        }
        if (!c.inplace) {
          for (int64_t g = c.head_dim; g < head_stride; ++g) {
            CHECK(std::isnan(static_cast<double>(to_acc(got[base + g]))),
                  "%s: a gap element was written", DTypeInfo<T>::kName);
          }
        }
      }
    }
  }
}

template <class T>
void run_shapes() {
  uint32_t seed = 1;
  const PositionMode modes[] = {PositionMode::kNone, PositionMode::kPerSeq,
                                PositionMode::kPerToken};
  const int64_t dims[][2] = {{128, 128}, {80, 32}, {130, 130}, {10, 6}, {2, 2}, {64, 48}};
  for (const auto& dim : dims) {
    for (bool interleaved : {false, true}) {
      for (PositionMode mode : modes) {
        for (bool packed : {false, true}) {
          if (packed && mode == PositionMode::kPerToken) continue;
          const bool conjugate = (seed % 2) == 0, inplace = (seed % 3) == 0;
          run_case<T>(Case{2, 7, 3, 1, dim[0], dim[1], interleaved, conjugate, packed, inplace,
                           mode, static_cast<int64_t>(seed % 4)},
                      seed);
          ++seed;
        }
      }
    }
  }
}

TEST_CASE_PER_DTYPE(shapes_layouts_positions, run_shapes)

template <class T>
void run_thread_counts() {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    run_case<T>(Case{3, 97, 8, 2, 128, 128, false, false, false, false, PositionMode::kPerSeq,
                     0}, 11 + threads);
    run_case<T>(Case{1, 301, 4, 4, 64, 64, true, true, true, true, PositionMode::kNone, 1},
                21 + threads);
  }
  omp_set_num_threads(saved);
}

TEST_CASE_PER_DTYPE(thread_counts, run_thread_counts)

TEST_CASE(empty_problems_touch_nothing) {
  std::vector<float> out(4, std::nanf(""));
  Params p;
  Operand o;
  o.out = out.data();
  o.heads = 1;
  p.q = o;
  p.head_dim = p.rotary_dim = 4;
  p.batch = 0;
  p.seqlen = 3;
  fastllm::rotary::rotary_cpu(p);
  p.batch = 2;
  p.seqlen = 0;
  fastllm::rotary::rotary_cpu(p);
  for (float v : out) CHECK(std::isnan(v), "an empty problem wrote its output");
}

}  // namespace

TEST_MAIN()
