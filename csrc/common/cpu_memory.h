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
#pragma once

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastllm {
namespace cpu {

inline constexpr int64_t kHugePagesMinBytes = int64_t{4} << 20;

inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
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
