// How the CPU kernels split their rows over OpenMP threads: each thread takes one contiguous
// block of rows (a row stays in that thread's cache while it is worked on), and small
// problems use fewer threads, since under a family's minimum of elements per thread the
// fork/join costs more than the work.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace fastllm {
namespace cpu {

// Threads for `rows` rows of `cols` elements: at most one per row and one per
// min_elements_per_thread elements, at least one.
inline int threads_for(int64_t rows, int64_t cols, int64_t min_elements_per_thread) {
  const int64_t by_work = rows * cols / min_elements_per_thread;
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({omp_get_max_threads(), rows, by_work})));
}

// First row (or column) of block `t` when `len` is split into `n` contiguous blocks.
inline int64_t block_begin(int64_t len, int t, int n) { return len * t / n; }

}  // namespace cpu
}  // namespace fastllm
