// Fresh output buffers of the CPU kernels.
//
// A large tensor that torch has just allocated is fresh anonymous memory: the kernel's first
// store to each 4 KiB page faults, and the OS clears the page before the store proceeds. On
// the 2-core dev machine that first touch ran at 3.2 GB/s, a quarter of the copy bandwidth,
// and it, not the kernel's arithmetic, bounded ops such as cross-entropy backward that write
// a fresh (N, V) gradient. Advising transparent huge pages (MADV_HUGEPAGE) on the buffer
// before the first store turns 512 faults into one, and measured 1.8x faster (154 -> 87 ms
// for 500 MiB; MADV_POPULATE_WRITE was slower, 240 ms, and non-temporal stores 2.7x slower).
// torch's own THP_MEM_ALLOC_ENABLE=1 does the same for all its large allocations; this is the
// same advice for the one buffer a kernel is about to fill, so it also holds without it.
//
// Buffers of 16 MiB (a 4096 x 1024 float32 activation) are fresh too: glibc trims the top of
// its heap once 32 MiB are free there, so an autograd step's outputs keep coming back as new
// pages. layer_norm forward + backward at that size faulted ~3270 times per step (eager torch
// ~2450) and took 12 ms; with the advice from kHugePagesMinBytes = 4 MiB, ~200 faults and
// ~6 ms (eager 7.5-9 ms), on the shared 2-core dev machine.
//
// Only whole 2 MiB pages inside the buffer are advised, so no memory outside it changes (a
// heap range that is later reused by other allocations merely stays backed by huge pages);
// smaller buffers are left alone; the advice is a hint, and its failure (e.g.
// transparent_hugepage=never) is ignored.
//
// Not under a hypervisor that takes free memory back. With virtio-balloon free page
// reporting (VIRTIO_BALLOON_F_REPORTING; Firecracker and other KVM guests), the guest kernel
// reports free blocks of 2^page_reporting_order pages to the host a second or two after they
// are freed, and the host discards them; the next touch of such a block faults in the host
// too. Huge pages are carved from exactly those blocks, so on a Zen 4 guest of that kind
// (page_reporting_order 9: every free 2 MiB block; record
// benchmarks/results/2026-12-06-cpu-fresh-pages-zen4.txt) filling 512 MiB on huge pages ran
// at 10-16 GB/s (1-2 threads) when the memory had been freed just before and at 0.37-0.79
// GB/s once it had been free for 1-3 s, against 2.5-4.2 GB/s on 4 KiB pages either way;
// cross-entropy forward + backward at 4096 x 32000 float32 (one thread) took 110-128 ms with
// the advice and 270-283 without when its calls were at most 1 s apart, 506 and 1870 ms
// against 304 and 282 when 2 and 4 s apart (a training step's distance). fastllm bench
// alternates its contenders, so it sees both: with the advice the norms at 8192 x 4096 ran
// 2.2-3.2x faster than without, the cross-entropy forward + backward 0.27-2.3x as fast.
// Where free page reporting is on, the kernels therefore leave the pages to the system:
// never the loss (6.6x above), at the cost of the tight loops' gain. (Tried and left:
// advising and faulting the huge pages in one by one before the kernel writes, timed, with
// 4 KiB pages for the rest of a buffer from the first slow one on. It avoided the loss but
// not the 4 KiB pages' cost: a buffer that fell back frees 4 KiB pages, which seldom rejoin
// into free 2 MiB blocks before they are reported, so the next call falls back too.)
// FASTLLM_CPU_HUGE_PAGES=1 advises anyway (tight loops over large outputs), =0 never,
// unset / empty / auto decides as above.
//
// Since the output cache (cpu_output_cache.h), a kernel's output of this size is fresh only
// when no kept block fits it (the first call of a loop, or the cache off); the advice and
// the reporting above then matter for that first touch alone.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <dirent.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastllm {
namespace cpu {

inline constexpr int64_t kHugePagesMinBytes = int64_t{4} << 20;

// A 0 / 1 / auto switch read from the environment variable `name`: unset, empty or "auto"
// -> kAuto, "1" -> kOn, "0" -> kOff. Throws std::invalid_argument naming the variable and
// any other value.
enum class EnvSwitch { kAuto, kOn, kOff };
inline EnvSwitch env_switch(const char* name) {
  const char* requested = std::getenv(name);
  if (requested == nullptr || *requested == '\0' || std::strcmp(requested, "auto") == 0) {
    return EnvSwitch::kAuto;
  }
  if (std::strcmp(requested, "1") == 0) return EnvSwitch::kOn;
  if (std::strcmp(requested, "0") == 0) return EnvSwitch::kOff;
  throw std::invalid_argument(std::string(name) +
                              " must be '0', '1' or 'auto' (or unset), got '" + requested + "'");
}

// Whether the kernels advise huge pages on their fresh outputs, and why.
enum class HugePages { kAdvised, kForced, kOff, kFreePageReporting, kUnsupported };

// True when a virtio-balloon device under `sysfs` (the sysfs mount, "/sys") has negotiated
// free page reporting: feature bit 5 (VIRTIO_BALLOON_F_REPORTING) of a device bound to the
// virtio_balloon driver, read from its `features` file (one '0' / '1' per bit, bit 0 first).
inline bool free_page_reporting(const std::string& sysfs = "/sys") {
#if defined(__linux__)
  constexpr size_t kReportingBit = 5;
  const std::string driver = sysfs + "/bus/virtio/drivers/virtio_balloon";
  DIR* dir = opendir(driver.c_str());
  if (dir == nullptr) return false;
  bool reporting = false;
  while (const dirent* entry = readdir(dir)) {
    if (std::strncmp(entry->d_name, "virtio", 6) != 0) continue;  // bound devices: virtioN
    std::ifstream features(driver + "/" + entry->d_name + "/features");
    std::string bits;
    if (features >> bits && bits.size() > kReportingBit && bits[kReportingBit] == '1') {
      reporting = true;
      break;
    }
  }
  closedir(dir);
  return reporting;
#else
  (void)sysfs;
  return false;
#endif
}

// FASTLLM_CPU_HUGE_PAGES (read on each call) and, for auto, free_page_reporting(sysfs).
// Throws std::invalid_argument naming a value other than 0, 1, auto or empty.
inline HugePages detect_huge_pages(const std::string& sysfs = "/sys") {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  switch (env_switch("FASTLLM_CPU_HUGE_PAGES")) {
    case EnvSwitch::kOn: return HugePages::kForced;
    case EnvSwitch::kOff: return HugePages::kOff;
    case EnvSwitch::kAuto: break;
  }
  return free_page_reporting(sysfs) ? HugePages::kFreePageReporting : HugePages::kAdvised;
#else
  (void)sysfs;
  return HugePages::kUnsupported;
#endif
}

// detect_huge_pages(), decided once per process (a bad value throws again on the next call).
inline HugePages huge_pages() {
  static const HugePages decided = detect_huge_pages();
  return decided;
}

// What huge_pages() means, for the cpu_fresh_pages op (registration.cpp) and the bench's header.
inline const char* huge_pages_description(HugePages h) {
  switch (h) {
    case HugePages::kAdvised: return "huge pages advised (MADV_HUGEPAGE)";
    case HugePages::kForced: return "huge pages advised (MADV_HUGEPAGE; FASTLLM_CPU_HUGE_PAGES=1)";
    case HugePages::kOff: return "left to the system (FASTLLM_CPU_HUGE_PAGES=0)";
    case HugePages::kFreePageReporting:
      return "left to the system (free page reporting to the hypervisor: virtio-balloon)";
    case HugePages::kUnsupported: return "left to the system (no MADV_HUGEPAGE here)";
  }
  return "unknown";
}

inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const HugePages h = huge_pages();  // first: a bad FASTLLM_CPU_HUGE_PAGES throws for any size
  if (h != HugePages::kAdvised && h != HugePages::kForced) return;
  if (p == nullptr || bytes < kHugePagesMinBytes) return;
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) &
                        ~(kHugePage - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// ---- Non-temporal stores for large outputs already in memory ------------------------------
//
// A plain store to a line that is not in the cache first reads the line from memory (read
// for ownership), so a memory-bound kernel moves each output byte twice. A non-temporal
// (streaming) store writes whole lines around the cache and saves that read. On the Zen 4
// guest (one thread; benchmarks/micro/stream_stores.cpp, record
// benchmarks/results/2026-12-06-cpu-stream-stores-zen4.txt) y = 1.5 * x into a reused buffer
// ran at 26-29 GB/s with plain stores and 42-49 with streaming ones over 16 MiB, 21-22 and
// 31-32 over 128 MiB; the norms' float32 4096 x 1024 cases 1.07-1.24x faster (record
// ...-1thread-norm-zen4-stream-stores-ab-10pairs.txt). Which outputs:
//   - large ones: each at least half the last-level cache, at most 16 MiB (the cache could
//     not keep such an output for the next op anyway, and writing it through the cache
//     evicts the inputs as well); smaller outputs stay in the cache for whoever reads them
//     (an add_* norm's two bfloat16 outputs of 8 MiB each streamed measured no faster);
//   - whose pages are in memory already (a buffer the allocator has reused: glibc hands a
//     16 MiB activation freed a step before back from its heap). Fresh pages are left to plain
//     stores: the page fault clears the page through the cache just before the store, and a
//     non-temporal store to a cached line first evicts it (on a fresh 500 MiB cross-entropy
//     gradient with huge pages, non-temporal stores measured 2.7x slower, header above; on
//     fresh 4 KiB pages from 10 % slower to 7 % faster in stream_stores.cpp); first touch
//     bounds such a buffer either way. Residency is sampled with mincore() at the
//     first, middle and last page: a reused heap block is resident throughout, a fresh
//     mapping nowhere, a heap block past a trimmed top at its end.
// A kernel streams one row at a time: 4 rows' vectors streamed in turn ran 3-6x slower than
// plain stores on a Zen 3 core (csrc/norm/norm_cpu_simd.h, stream_row).
// FASTLLM_CPU_STREAM_STORES=1 streams every output whose rows allow it (tests force the path
// with it on small shapes), =0 never, unset / empty / auto decides as above. The kernels
// stream only full vectors of rows that start on 64-byte boundaries (torch's CPU allocator
// aligns to 64) and fence (sfence) before the threads join, so the stores are visible to
// the code after the kernel like plain ones.

// Where the last-level cache size is unknown: what a 32 MiB L3 gives.
inline constexpr int64_t kStreamStoresDefaultMinBytes = int64_t{16} << 20;

using StreamStores = EnvSwitch;

// FASTLLM_CPU_STREAM_STORES (read on each call; env_switch: a bad value throws).
inline StreamStores detect_stream_stores() { return env_switch("FASTLLM_CPU_STREAM_STORES"); }

// detect_stream_stores(), decided once per process (a bad value throws again on the next call).
inline StreamStores stream_stores() {
  static const StreamStores decided = detect_stream_stores();
  return decided;
}

// The largest cache level's size that the kernel reports for cpu 0 under `sysfs` (the
// sysfs mount: <sysfs>/devices/system/cpu/cpu0/cache/index*/{level,size}, size as "32768K"),
// 0 where it reports none. Not sysconf(_SC_LEVEL3_CACHE_SIZE): glibc 2.36 computes that from
// CPUID itself and gave 320 MiB for the 32 MiB L3 of the Zen 4 guest.
inline int64_t last_level_cache_bytes(const std::string& sysfs = "/sys") {
  const std::string cache = sysfs + "/devices/system/cpu/cpu0/cache/index";
  int best_level = 0;
  int64_t best_bytes = 0;
  for (int index = 0; index < 16; ++index) {
    std::ifstream level_file(cache + std::to_string(index) + "/level");
    std::ifstream size_file(cache + std::to_string(index) + "/size");
    int level = 0;
    int64_t size = 0;
    std::string unit;
    if (!(level_file >> level) || !(size_file >> size) || size <= 0) continue;
    size_file >> unit;  // the suffix directly after the number, if any
    if (unit == "K") size <<= 10;
    if (unit == "M") size <<= 20;
    if (unit == "G") size <<= 30;
    if (level > best_level || (level == best_level && size > best_bytes)) {
      best_level = level;
      best_bytes = size;
    }
  }
  return best_bytes;
}

// The size from which auto streams an output: half the last-level cache (sysfs),
// at most kStreamStoresDefaultMinBytes -- a VM shares a large L3 with tenants it cannot see,
// and 16 MiB is where the gain was measured -- and that where the size is unknown.
inline int64_t stream_stores_min_bytes_for(int64_t cache_bytes) {
  return cache_bytes > 0 ? std::min(cache_bytes / 2, kStreamStoresDefaultMinBytes)
                         : kStreamStoresDefaultMinBytes;
}
inline int64_t stream_stores_min_bytes() {
  static const int64_t bytes = stream_stores_min_bytes_for(last_level_cache_bytes());
  return bytes;
}

// Whether the pages of [p, p + bytes) are in memory, sampled at the first, middle and last
// page (mincore). False where that cannot be asked.
inline bool pages_resident(const void* p, int64_t bytes) {
#if defined(__linux__)
  if (p == nullptr || bytes <= 0) return false;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t last = begin + static_cast<uintptr_t>(bytes) - 1;
  for (const uintptr_t at : {begin, begin + (last - begin) / 2, last}) {
    unsigned char in_core = 0;
    if (mincore(reinterpret_cast<void*>(at & ~(page - 1)), 1, &in_core) != 0 ||
        (in_core & 1) == 0) {
      return false;
    }
  }
  return true;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

// Whether a kernel call writing `outputs` (nullptr entries: absent), `bytes` each, stores
// them non-temporally; the kernel must also check that its rows start on 64-byte boundaries.
inline bool stream_outputs(std::initializer_list<const void*> outputs, int64_t bytes) {
  const StreamStores mode = stream_stores();  // first: a bad value throws for any size
  if (mode == StreamStores::kOff || bytes <= 0) return false;
  bool any = false;
  for (const void* p : outputs) {
    if (p == nullptr) continue;
    if (reinterpret_cast<uintptr_t>(p) % 64 != 0) return false;
    any = true;
  }
  if (!any) return false;
  if (mode == StreamStores::kOn) return true;
  if (bytes < stream_stores_min_bytes()) return false;
  for (const void* p : outputs) {
    if (p != nullptr && !pages_resident(p, bytes)) return false;
  }
  return true;
}

// Orders the calling thread's non-temporal stores before what follows (x86: they are weakly
// ordered); the kernels call it before their threads join.
inline void fence_streaming_stores() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

// What stream_stores() means, for the cpu_output_stores op (registration.cpp) and the bench's
// header.
inline std::string stream_stores_description(StreamStores mode) {
  switch (mode) {
    case StreamStores::kOn:
      return "non-temporal stores for every output with 64-byte aligned rows "
             "(FASTLLM_CPU_STREAM_STORES=1)";
    case StreamStores::kOff: return "plain stores (FASTLLM_CPU_STREAM_STORES=0)";
    case StreamStores::kAuto: break;
  }
  auto size = [](int64_t bytes) {
    const int64_t mib = int64_t{1} << 20;
    return bytes % mib == 0 ? std::to_string(bytes / mib) + " MiB"
                            : std::to_string(bytes >> 10) + " KiB";
  };
  const int64_t cache = last_level_cache_bytes();
  return "non-temporal stores for outputs from " + size(stream_stores_min_bytes()) + " (" +
         (cache > 0 ? "last-level cache " + size(cache) : "last-level cache size unknown") +
         ") where the output's pages are in memory already; plain stores otherwise";
}

}  // namespace cpu
}  // namespace fastllm
