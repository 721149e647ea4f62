"""Whether a freed block is refitted by the next request of the same size, under this
process's glibc malloc settings: the page faults of four rounds of allocate, fill, free, per
size, with ``malloc`` and with ``posix_memalign(64)`` (torch's CPU allocator's call). A
round with no faults reused resident memory; one with size / 4 KiB faults got fresh pages.

Run it under the bench's kept heap and under glibc's defaults::

    GLIBC_TUNABLES=glibc.malloc.trim_threshold=1099511627776:glibc.malloc.mmap_threshold=33554432 \\
        python benchmarks/micro/heap_refit_probe.py
    python benchmarks/micro/heap_refit_probe.py

On the Zen 5 machine of 2026-12-06 (glibc 2.36), under the kept heap and under glibc's
defaults alike, ``malloc`` refitted every size from its second round at the latest, while
``posix_memalign(64)`` paid the full faults in every round at 16 MiB (24 and 31 MiB refitted;
8 MiB did after the malloc rounds, and in every other round when it ran first in a process):
the aligned request does not refit the block it freed, so a bare loop of one 16 MiB torch
tensor is page-faulted afresh on every call even with the heap kept
(benchmarks/results/2026-12-06-cpu-heap-refit-probe-zen5.txt). Inside ``fastllm bench``'s
processes the heap holds other free blocks that fit, and the norm cases' 16 MiB outputs paid
no faults per call (benchmarks/micro/bench_call_faults.py): the kept heap makes refits likely,
not certain.
"""

import ctypes
import ctypes.util
import os
import resource

SIZES_MIB = (8, 16, 24, 31)
ROUNDS = 4
ALIGNMENT = 64


def main() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                    ctypes.c_size_t]

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def allocate(how: str, size: int) -> ctypes.c_void_p:
        if how == "malloc":
            return ctypes.c_void_p(libc.malloc(size))
        block = ctypes.c_void_p()
        if libc.posix_memalign(ctypes.byref(block), ALIGNMENT, size) != 0:
            raise MemoryError(f"posix_memalign({ALIGNMENT}, {size}) failed")
        return block

    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"page faults of {ROUNDS} rounds of allocate + fill + free (size / 4 KiB = fresh)")
    for how in ("malloc", f"posix_memalign({ALIGNMENT})"):
        cells = []
        for mib in SIZES_MIB:
            size = mib << 20
            rounds = []
            for _ in range(ROUNDS):
                before = faults()
                block = allocate("malloc" if how == "malloc" else "memalign", size)
                libc.memset(block, 1, size)
                libc.free(block)
                rounds.append(faults() - before)
            cells.append(f"{mib} MiB {rounds}")
        print(f"{how:>18}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
