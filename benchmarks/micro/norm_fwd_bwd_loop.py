"""Forward + backward time of fastllm's four norm ops in a plain loop of calls (no peers):
the quick before/after comparison of a norm kernel change, such as the backward's
next-row-group prefetch of 16-bit rows (csrc/norm/norm_cpu_simd.h, kPrefetchNextGroup: its
comment's loop figures came from this script, run on the tree without and with the change).
Peers and ratios: ``fastllm bench norm``.

    GLIBC_TUNABLES=glibc.malloc.trim_threshold=1099511627776:glibc.malloc.mmap_threshold=33554432 \\
    PYTHONPATH=. OMP_NUM_THREADS=1 [FASTLLM_CPU_ISA=avx2] python benchmarks/micro/norm_fwd_bwd_loop.py

(the GLIBC_TUNABLES are the bench's kept heap as it was when the prefetch's figures were taken;
fastllm.bench.common.HEAP_TUNABLES has since turned glibc's thread cache and fast bins off
too). Prints the
best of 5 timings of 30 calls (3 at 8192 x 4096) per op, shape and dtype, in ms.
"""

from __future__ import annotations

import time

import torch

import fastllm.functional as F

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")


def main() -> None:
    torch.manual_seed(0)
    for rows, cols in ((4096, 1024), (8192, 4096)):
        for dtype in (torch.float32, torch.bfloat16):
            for name in OPS:
                x = torch.randn(rows, cols, dtype=dtype, requires_grad=True)
                r = torch.randn(rows, cols, dtype=dtype, requires_grad=True)
                w = torch.randn(cols, dtype=dtype, requires_grad=True)
                b = torch.randn(cols, dtype=dtype, requires_grad=True)
                dy = torch.randn(rows, cols, dtype=dtype)

                def call():
                    if name == "layer_norm":
                        outs, ins = (F.layer_norm(x, (cols,), w, b, 1e-5),), (x, w, b)
                    elif name == "rms_norm":
                        outs, ins = (F.rms_norm(x, (cols,), w, 1e-6),), (x, w)
                    elif name == "add_layer_norm":
                        outs, ins = F.add_layer_norm(x, r, (cols,), w, b, 1e-5), (x, r, w, b)
                    else:
                        outs, ins = F.add_rms_norm(x, r, (cols,), w, 1e-6), (x, r, w)
                    return torch.autograd.grad(outs, ins, (dy,) * len(outs))

                for _ in range(5):
                    call()
                reps = 30 if rows == 4096 else 3
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(reps):
                        call()
                    best = min(best, (time.perf_counter() - start) / reps)
                print(f"{name:15s} {rows}x{cols} {str(dtype).removeprefix('torch.'):9s} "
                      f"{best * 1e3:8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
