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
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <dirent.h>
#include <sys/mman.h>
#endif

namespace fastllm {
namespace cpu {

inline constexpr int64_t kHugePagesMinBytes = int64_t{4} << 20;

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
  const char* requested = std::getenv("FASTLLM_CPU_HUGE_PAGES");
  const bool automatic =
      requested == nullptr || *requested == '\0' || std::strcmp(requested, "auto") == 0;
  if (!automatic && std::strcmp(requested, "1") == 0) return HugePages::kForced;
  if (!automatic && std::strcmp(requested, "0") == 0) return HugePages::kOff;
  if (!automatic) {
    throw std::invalid_argument(
        std::string("FASTLLM_CPU_HUGE_PAGES must be '0', '1' or 'auto' (or unset), got '") +
        requested + "'");
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

}  // namespace cpu
}  // namespace fastllm
