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
    munmap(x, n * sizeof(float));
    munmap(y, n * sizeof(float));
  }
  return 0;
}
