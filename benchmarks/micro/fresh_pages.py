"""How fast fresh memory is first touched, on 4 KiB pages and on advised huge pages, by how
long the memory sat free before: the measurement behind FASTLLM_CPU_HUGE_PAGES=auto
(csrc/common/cpu_memory.h), which leaves the pages to the system where the OS reports free
memory to a hypervisor.

    PYTHONPATH=. python benchmarks/micro/fresh_pages.py [--mib 512] [--gaps 0 3] [--calls 5]
    PYTHONPATH=. python benchmarks/micro/fresh_pages.py --cross-entropy [--gaps 0 0.5 1 2 4]

Fill: each call maps --mib MiB of anonymous memory (aligned to 2 MiB), advises MADV_HUGEPAGE
or not, fills it with torch's fill_ (torch's threads: OMP_NUM_THREADS), unmaps it and sleeps
--gap s; the median GB/s of the calls after the first. --cross-entropy: fastllm's
cross-entropy forward + backward at 4096 x 32000 float32 (a fresh 500 MiB gradient per call)
with --gap s between calls, in a child process per FASTLLM_CPU_HUGE_PAGES setting (0, 1; the
kernels decide once per process); the median and the range of the calls after the first.
The header says whether virtio-balloon free page reporting is on (fastllm.backend.
cpu_fresh_pages() with the setting unset) and the kernel's transparent_hugepage mode.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import subprocess
import sys
import time

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def fill_rates(mib: int, huge: bool, gap: float, calls: int) -> list[float]:
    import torch

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    n = mib << 20
    rates = []
    for _ in range(calls):
        base = libc.mmap(None, n + HUGE, 3, 0x22, -1, 0)  # PROT_READ|WRITE, PRIVATE|ANONYMOUS
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        start = (base + HUGE - 1) & ~(HUGE - 1)
        if huge:
            libc.madvise(start, n, MADV_HUGEPAGE)
        view = torch.frombuffer((ctypes.c_char * n).from_address(start), dtype=torch.uint8)
        begin = time.perf_counter()
        view.fill_(1)
        rates.append(n / (time.perf_counter() - begin) / 1e9)
        del view
        libc.munmap(base, n + HUGE)
        time.sleep(gap)
    return rates[1:]


CROSS_ENTROPY = """
import sys, time, torch
from fastllm import functional as F
torch.manual_seed(0)
gap, calls = float(sys.argv[1]), int(sys.argv[2])
x = torch.randn(4096, 32000, requires_grad=True)
y = torch.randint(0, 32000, (4096,))
times = []
for _ in range(calls):
    begin = time.perf_counter()
    grad, = torch.autograd.grad(F.cross_entropy(x, y), (x,))
    times.append(time.perf_counter() - begin)
    del grad
    time.sleep(gap)
print(" ".join(f"{t * 1e3:.0f}" for t in times[1:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--gaps", type=float, nargs="+", default=None)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--cross-entropy", action="store_true")
    args = parser.parse_args()

    import torch

    env = {k: v for k, v in os.environ.items() if k != "FASTLLM_CPU_HUGE_PAGES"}
    auto = subprocess.run(
        [sys.executable, "-c", "from fastllm.backend import cpu_fresh_pages as f; print(f())"],
        env=env, capture_output=True, text=True).stdout.strip() or "unknown (fastllm._C?)"
    from fastllm.bench.common import _kernel_thp_mode

    print(f"# torch threads {torch.get_num_threads()}; transparent_hugepage: {_kernel_thp_mode()}; "
          f"FASTLLM_CPU_HUGE_PAGES unset: {auto}")
    if args.cross_entropy:
        for gap in args.gaps or [0.0, 0.5, 1.0, 2.0, 4.0]:
            for setting in ("0", "1"):
                out = subprocess.run(
                    [sys.executable, "-c", CROSS_ENTROPY, str(gap), str(args.calls + 1)],
                    env={**env, "FASTLLM_CPU_HUGE_PAGES": setting}, capture_output=True,
                    text=True, check=True).stdout.split()
                ms = sorted(int(t) for t in out)
                print(f"cross_entropy fwd+bwd 4096x32000 float32, gap {gap:g} s, "
                      f"FASTLLM_CPU_HUGE_PAGES={setting}: median {statistics.median(ms):.0f} ms "
                      f"({ms[0]}-{ms[-1]} over {len(ms)} calls)")
        return
    for gap in args.gaps or [0.0, 3.0]:
        for huge in (False, True):
            rates = fill_rates(args.mib, huge, gap, args.calls)
            print(f"fill {args.mib} MiB, {'MADV_HUGEPAGE' if huge else '4 KiB pages  '}, "
                  f"freed {gap:g} s before: median {statistics.median(rates):.2f} GB/s "
                  f"({min(rates):.2f}-{max(rates):.2f} over {len(rates)} calls)")


if __name__ == "__main__":
    main()
