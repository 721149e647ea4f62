// Plain against non-temporal (streaming) stores for a memory-bound kernel's output, into a
// buffer whose pages are in memory already and into fresh ones: the measurement behind the
// CPU kernels' non-temporal stores (csrc/common/cpu_memory.h: stream_outputs).
//
// The kernel is y = 1.5 * x over float32 vectors of 8 (AVX2); GB/s counts x read and y
// written once. A plain store reads each line of y from memory before writing it (read for
// ownership); a streaming store does not, so up to a third of the traffic goes. "reused": y
// is the same buffer every run (its pages stay in memory); "fresh": y is a new anonymous
// mapping every run, so every page faults and is cleared by the OS first.
// On the AMD EPYC Zen 4 guest of 2026-12-06 (one thread, two runs; record
// benchmarks/results/2026-12-06-cpu-stream-stores-zen4.txt): reused 16 MiB 26-29 GB/s plain,
// 42-49 streaming (x stays in the 32 MiB L3 then), reused 128 MiB 21-22 and 31-32; fresh 16
// and 128 MiB 4.1-4.5 GB/s either way (the page faults bound them; streaming 10 % slower to
// 7 % faster).
// The last rows of each size write y in groups of 4 rows of 1024 floats, as the norms'
// backward sweep does: streaming the 4 rows in turn (8 floats of each at a step) against
// sweeping them into a scratch block and streaming it out row by row. On the Zen 3 guest
// (AMD EPYC family 25 model 1, one thread, record benchmarks/results/
// 2026-12-06-cpu-stream-stores-zen3.txt): reused 16 MiB, 3.5-4.1 GB/s streaming in turn
// against 17-24 plain, 15-21 streaming through the scratch block; 128 MiB 4.0 / 13.7 / 20.6.
//
// Build and run (x86-64, GCC >= 11; the measuring code carries its own target attribute), or
// through CMakeLists.txt (target stream_stores, also run by ctest, which only checks that it
// runs; it measures nothing on a CPU without AVX2):
//   g++ -O2 -o /tmp/stream_stores benchmarks/micro/stream_stores.cpp && /tmp/stream_stores
// Arguments: the sizes in MiB (default 16 128). Best of 7 runs, wall-clock (steady_clock).
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

__attribute__((target("avx2"))) void scale(const float* x, float* y, size_t n, bool stream) {
  const __m256 a = _mm256_set1_ps(1.5f);
  if (stream) {
    for (size_t i = 0; i < n; i += 8) _mm256_stream_ps(y + i, _mm256_mul_ps(_mm256_load_ps(x + i), a));
    _mm_sfence();
  } else {
    for (size_t i = 0; i < n; i += 8) _mm256_store_ps(y + i, _mm256_mul_ps(_mm256_load_ps(x + i), a));
  }
}

// y = 1.5 x over rows of 1024 floats in groups of 4 rows, the norms' backward sweep: "in
// turn" stores the 4 rows' vectors one after another at each step of 8 floats (4 streams
// open at once); "scratch" sweeps the group into a 16 KiB block with plain stores and then
// copies it out row after row (streaming: one stream at a time; csrc/norm/norm_cpu_simd.h,
// stream_row).
__attribute__((target("avx2"))) void scale_rows(const float* x, float* y, size_t n, bool stream,
                                                bool scratch) {
  constexpr size_t kCols = 1024, kGroup = 4;
  alignas(64) static float block[kGroup * kCols];
  const __m256 a = _mm256_set1_ps(1.5f);
  for (size_t r = 0; r + kGroup <= n / kCols; r += kGroup) {
    float* out = scratch ? block : y + r * kCols;
    for (size_t j = 0; j < kCols; j += 8) {
      for (size_t i = 0; i < kGroup; ++i) {
        const __m256 v = _mm256_mul_ps(_mm256_load_ps(x + (r + i) * kCols + j), a);
        if (stream && !scratch) {
          _mm256_stream_ps(out + i * kCols + j, v);
        } else {
          _mm256_store_ps(out + i * kCols + j, v);
        }
      }
    }
    if (scratch) {
      for (size_t e = 0; e < kGroup * kCols; e += 8) {
        const __m256 v = _mm256_load_ps(block + e);
        if (stream) {
          _mm256_stream_ps(y + r * kCols + e, v);
        } else {
          _mm256_store_ps(y + r * kCols + e, v);
        }
      }
    }
  }
  if (stream) _mm_sfence();
}

float* map_fresh(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  return static_cast<float*>(p);
}

// Best seconds of `runs` calls; fresh: a new mapping for y each call (mapped and unmapped
// outside the timed region).
double best_seconds(const float* x, float* reused, size_t n, bool stream, bool fresh, int runs) {
  double best = 1e30;
  for (int r = 0; r < runs; ++r) {
    float* y = fresh ? map_fresh(n * sizeof(float)) : reused;
    const auto t0 = std::chrono::steady_clock::now();
    scale(x, y, n, stream);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
    if (fresh) munmap(y, n * sizeof(float));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("no AVX2 on this CPU: nothing measured\n");
    return 0;
  }
  std::vector<size_t> mib;
  for (int i = 1; i < argc; ++i) mib.push_back(std::strtoul(argv[i], nullptr, 10));
  if (mib.empty()) mib = {16, 128};
  constexpr int kRuns = 7;
  for (const size_t m : mib) {
    const size_t n = m * (size_t{1} << 20) / sizeof(float) / 8 * 8;
    float* x = map_fresh(n * sizeof(float));
    float* y = map_fresh(n * sizeof(float));
    std::memset(x, 0, n * sizeof(float));
    std::memset(y, 0, n * sizeof(float));
    for (const bool fresh : {false, true}) {
      for (const bool stream : {false, true}) {
        const double s = best_seconds(x, y, n, stream, fresh, kRuns);
        std::printf("%4zu MiB  %-6s  %-9s  %8.3f ms  %6.1f GB/s\n", m, fresh ? "fresh" : "reused",
                    stream ? "streaming" : "plain", s * 1e3, 2.0 * n * sizeof(float) / s / 1e9);
      }
    }
    for (const bool scratch : {false, true}) {
      for (const bool stream : {false, true}) {
        double best = 1e30;
        for (int r = 0; r < kRuns; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          scale_rows(x, y, n, stream, scratch);
          best = std::min(
              best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::printf("%4zu MiB  reused  %-9s  %8.3f ms  %6.1f GB/s  (4 rows of 1024 %s)\n", m,
                    stream ? "streaming" : "plain", best * 1e3,
                    2.0 * n * sizeof(float) / best / 1e9,
                    scratch ? "into a scratch block, then out row by row" : "in turn");
      }
    }
    munmap(x, n * sizeof(float));
    munmap(y, n * sizeof(float));
  }
  return 0;
}
