"""Whether a freed block is refitted by the next request of the same size, under the glibc
malloc settings of the environment: the page faults of four rounds of allocate, fill, free
of one block, with ``malloc``, with ``posix_memalign(64)`` (torch's CPU allocator's call,
c10's 64-byte alignment) and with ``torch.empty(...).fill_(1)`` itself, each size in a fresh
process of its own (no heap history). A round
with no faults reused resident memory; one with size / 4 KiB faults got fresh pages.

Run it under the bench's kept heap (fastllm.bench.common.HEAP_TUNABLES), under its two
thresholds alone (the setting before the thread cache and fast bins were turned off) and
under glibc's defaults::

    T=glibc.malloc.trim_threshold=1099511627776:glibc.malloc.mmap_threshold=33554432
    GLIBC_TUNABLES=$T:glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0 \
        python benchmarks/micro/heap_refit_probe.py
    GLIBC_TUNABLES=$T python benchmarks/micro/heap_refit_probe.py
    python benchmarks/micro/heap_refit_probe.py

On the Zen 5 machine of 2026-12-06 (Debian glibc 2.36), under the two thresholds alone,
``malloc`` refitted every size from 8 to 31 MiB from its second round on, while
``posix_memalign(64)`` and ``torch.empty`` were page-faulted afresh in every round at every
one of those sizes (presumably because the aligned request, size + alignment + a minimum
chunk, is larger than the block it frees, and the remainder split off behind the block stays
allocated in glibc's thread cache or fast bins, so the freed block neither fits the next
request nor joins the heap's top; not traced in glibc, but turning both off makes all three
refit every size from the second round, which is why the bench's setting does). 32 MiB, with
glibc's chunk header above the fixed 32 MiB mmap threshold, is a fresh mapping in every round
under every setting (benchmarks/results/2026-12-06-cpu-heap-refit-probe-zen5.txt).
"""

import ctypes
import ctypes.util
import os
import resource
import subprocess
import sys

SIZES_MIB = (8, 16, 24, 31, 32)
ROUNDS = 4
ALIGNMENT = 64
CALLS = ("malloc", "posix_memalign", "torch.empty")


def child(how: str, mib: int) -> list[int]:
    """The page faults of ROUNDS rounds of allocate + fill + free of one block, this process."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                    ctypes.c_size_t]
    size = mib << 20
    if how == "torch.empty":
        import torch

        torch.set_num_threads(1)
    faults = []
    for _ in range(ROUNDS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if how == "torch.empty":  # torch's CPU allocator (posix_memalign underneath), fill_
            torch.empty(size // 4, dtype=torch.float32).fill_(1)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            continue
        if how == "malloc":
            block = ctypes.c_void_p(libc.malloc(size))
        else:
            block = ctypes.c_void_p()
            if libc.posix_memalign(ctypes.byref(block), ALIGNMENT, size) != 0:
                raise MemoryError(f"posix_memalign({ALIGNMENT}, {size}) failed")
        libc.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(*child(sys.argv[2], int(sys.argv[3])))
        return
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"page faults of {ROUNDS} rounds of allocate + fill + free, each size in a fresh "
          "process (size / 4 KiB = fresh pages)")
    for how in CALLS:
        cells = []
        for mib in SIZES_MIB:
            out = subprocess.run([sys.executable, __file__, "--child", how, str(mib)],
                                 capture_output=True, text=True, check=True).stdout.split()
            cells.append(f"{mib} MiB [{', '.join(out)}]")
        label = f"posix_memalign({ALIGNMENT})" if how == "posix_memalign" else how
        print(f"{label:>18}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
