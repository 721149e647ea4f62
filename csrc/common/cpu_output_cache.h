// Large CPU outputs on reused memory.
//
// glibc maps every allocation above 32 MiB afresh and unmaps it on free (and trims freed
// memory at the top of its heap, so 4-32 MiB blocks often come back fresh too); torch's CPU
// allocator keeps nothing. So the (N, V) gradient that cross-entropy backward writes, or a
// norm's output, is fresh memory on every training step, and the first store to each of its
// pages faults: at 4096 x 32000 float32 (500 MiB) that first touch took 79-81 % of the
// forward + backward on a Zen 4 core (2.4 GB/s; record
// benchmarks/results/2026-12-07-cpu-1thread-cross_entropy-zen4-3processes.txt), and no kernel
// writing a fresh buffer can beat it. The CUDA side never sees this: torch's caching
// allocator hands the same blocks back step after step.
//
// This is the same idea for the CPU kernels' outputs of kOutputCacheMinBytes and more: a
// freed output's block (mmap'ed, a multiple of 2 MiB, 2 MiB aligned) is kept, and the next
// output of that size (or up to a quarter less) takes it back, its pages already in memory.
// Free blocks are kept up to a limit, FASTLLM_CPU_OUTPUT_CACHE_MB (default
// kOutputCacheDefaultMiB; 0 turns the cache off and every output comes from torch's
// allocator); past it, the blocks freed longest ago are unmapped. Live outputs are never
// counted against the limit, so the memory held beyond what the program holds is at most the
// limit -- as with torch.cuda's caching allocator, fastllm.backend.empty_cpu_output_cache()
// unmaps the free blocks (torch.cuda.empty_cache()), and cpu_output_cache() reports them.
//
// Free blocks are never given back to the system while cached, so the hypervisor's free page
// reporting (cpu_memory.h) never discards them either. Values: a block taken back holds its
// last user's data; every kernel that writes such an output writes all of it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include "common/cpu_memory.h"

namespace fastllm {
namespace cpu {

// Outputs from this size on come from the cache (the size from which the kernels advise
// huge pages: cpu_memory.h).
inline constexpr int64_t kOutputCacheMinBytes = kHugePagesMinBytes;
inline constexpr int64_t kOutputCacheDefaultMiB = 2048;
inline constexpr int64_t kOutputCacheBlock = int64_t{2} << 20;

// FASTLLM_CPU_OUTPUT_CACHE_MB as bytes: unset or empty -> the default; a decimal number of
// MiB >= 0 (0: off). Throws std::invalid_argument naming the variable and any other value.
inline int64_t detect_output_cache_limit() {
  const char* name = "FASTLLM_CPU_OUTPUT_CACHE_MB";
  const char* requested = std::getenv(name);
  if (requested == nullptr || *requested == '\0') return kOutputCacheDefaultMiB << 20;
  const std::string s(requested);
  const bool digits = s.size() <= 9 && std::all_of(s.begin(), s.end(), [](char ch) {
    return ch >= '0' && ch <= '9';
  });
  if (!digits) {
    throw std::invalid_argument(std::string(name) +
                                " must be a whole number of MiB (0 turns the cache off), got '" +
                                s + "'");
  }
  return static_cast<int64_t>(std::stoll(s)) << 20;
}

// detect_output_cache_limit(), decided once per process (a bad value throws again on the
// next call).
inline int64_t output_cache_limit() {
  static const int64_t decided = detect_output_cache_limit();
  return decided;
}

class OutputCache {
 public:
  struct Stats {
    int64_t limit_bytes = 0;
    int64_t free_bytes = 0;   // cached, unused
    int64_t free_blocks = 0;
    int64_t live_bytes = 0;   // blocks held by tensors now
    int64_t live_blocks = 0;
    int64_t hits = 0;         // outputs served from a free block
    int64_t misses = 0;       // outputs that mapped a new block
  };

  // One per shared library, never destroyed: a tensor freed while the process exits still
  // gives its block back.
  static OutputCache& instance() {
    static OutputCache* cache = [] {
      auto* created = new OutputCache(output_cache_limit());
#if defined(__linux__)
      // A fork() while another thread holds the lock would leave the child's copy locked for
      // good (a DataLoader worker's first large output would hang): the forking thread takes
      // it first, and the parent and the child each let it go.
      pthread_atfork([] { instance().mu_.lock(); }, [] { instance().mu_.unlock(); },
                     [] { instance().mu_.unlock(); });
#endif
      return created;
    }();
    return *cache;
  }

  explicit OutputCache(int64_t limit_bytes) : limit_(limit_bytes) {}
  OutputCache(const OutputCache&) = delete;
  OutputCache& operator=(const OutputCache&) = delete;

  // A block of at least `bytes`: a free one of the rounded size up to 5/4 of it (the
  // smallest such; of equal ones the latest freed), else a new mapping. nullptr when the
  // cache is off or the mapping fails (the caller then allocates elsewhere).
  void* take(int64_t bytes) {
    if (limit_ <= 0 || bytes <= 0) return nullptr;
    const int64_t need = round_up(bytes);
    const int64_t most = need + need / 4;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const Free& f = free_[i];
        if (f.size < need || f.size > most) continue;
        if (best == free_.size() || f.size < free_[best].size ||
            (f.size == free_[best].size && f.freed_at > free_[best].freed_at)) {
          best = i;
        }
      }
      if (best != free_.size()) {
        const Free f = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        free_bytes_ -= f.size;
        live_.emplace(f.p, f.size);
        live_bytes_ += f.size;
        ++hits_;
        return f.p;
      }
    }
    void* p = map_block(need);
    if (p == nullptr) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    live_.emplace(p, need);
    live_bytes_ += need;
    ++misses_;
    return p;
  }

  // Takes back a block from take(): kept while the free blocks stay within the limit, the
  // ones freed longest ago unmapped past it.
  void give_back(void* p) {
    std::vector<Free> unmap;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = live_.find(p);
      if (it == live_.end()) return;  // not ours: cannot happen through the deleter
      const int64_t size = it->second;
      live_.erase(it);
      live_bytes_ -= size;
      if (size > limit_) {
        unmap.push_back(Free{p, size, 0});  // never fits: the cached ones stay
      } else {
        free_.push_back(Free{p, size, ++clock_});
        free_bytes_ += size;
      }
      while (free_bytes_ > limit_ && !free_.empty()) {
        const auto oldest = std::min_element(
            free_.begin(), free_.end(),
            [](const Free& a, const Free& b) { return a.freed_at < b.freed_at; });
        free_bytes_ -= oldest->size;
        unmap.push_back(*oldest);
        free_.erase(oldest);
      }
    }
    for (const Free& f : unmap) unmap_block(f.p, f.size);
  }

  // Unmaps every free block; returns the bytes given back.
  int64_t release() {
    std::vector<Free> unmap;
    {
      std::lock_guard<std::mutex> lock(mu_);
      unmap.swap(free_);
      free_bytes_ = 0;
    }
    int64_t bytes = 0;
    for (const Free& f : unmap) {
      unmap_block(f.p, f.size);
      bytes += f.size;
    }
    return bytes;
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    Stats s;
    s.limit_bytes = limit_;
    s.free_bytes = free_bytes_;
    s.free_blocks = static_cast<int64_t>(free_.size());
    s.live_bytes = live_bytes_;
    s.live_blocks = static_cast<int64_t>(live_.size());
    s.hits = hits_;
    s.misses = misses_;
    return s;
  }

 private:
  struct Free {
    void* p;
    int64_t size;
    uint64_t freed_at;
  };

  static int64_t round_up(int64_t bytes) {
    return (bytes + kOutputCacheBlock - 1) / kOutputCacheBlock * kOutputCacheBlock;
  }

  // `size` bytes (a multiple of 2 MiB) of fresh anonymous memory on a 2 MiB boundary, so
  // that huge pages can back it where the kernels advise them; nullptr on failure.
  static void* map_block(int64_t size) {
#if defined(__linux__)
    const size_t span = static_cast<size_t>(size + kOutputCacheBlock);
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (begin + kOutputCacheBlock - 1) & ~uintptr_t(kOutputCacheBlock - 1);
    const uintptr_t end = begin + span;
    if (aligned > begin) munmap(raw, aligned - begin);
    const uintptr_t tail = aligned + static_cast<uintptr_t>(size);
    if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
    return reinterpret_cast<void*>(aligned);
#else
    (void)size;
    return nullptr;
#endif
  }

  static void unmap_block(void* p, int64_t size) {
#if defined(__linux__)
    munmap(p, static_cast<size_t>(size));
#else
    (void)p;
    (void)size;
#endif
  }

  const int64_t limit_;
  std::mutex mu_;
  std::vector<Free> free_;  // a few blocks: linear scans
  std::unordered_map<void*, int64_t> live_;
  int64_t free_bytes_ = 0;
  int64_t live_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace cpu
}  // namespace fastllm
