"""fastllm's attention alone in a plain loop of calls (no peers): the median time and GFLOP/s
of one shape, forward or forward + backward, for the quick before/after comparison of a
kernel change (run it on the two builds in alternation). Peers and ratios: ``fastllm bench
attention``. The AVX2 path's transposed packing (csrc/attention/attention_cpu.cpp,
Avx2Ops::transpose_floats) was measured with it, record
benchmarks/results/2026-12-06-cpu-attention-avx2-transpose-ab-zen5.txt.

    PYTHONPATH=. OMP_NUM_THREADS=1 [FASTLLM_CPU_ISA=avx2] \\
        python benchmarks/micro/attention_loop.py [B,H,T,D] [fwd|fwd+bwd] [seconds]

q, k, v are (B, T, H, D) float32, full (not causal) attention; FLOPs as the bench counts them
(4 B H T^2 D forward, 3.5 times that forward + backward).
"""

from __future__ import annotations

import sys
import time

import torch

import fastllm.functional as F


def main() -> None:
    torch.manual_seed(0)
    shape = sys.argv[1] if len(sys.argv) > 1 else "2,8,1024,64"
    mode = sys.argv[2] if len(sys.argv) > 2 else "fwd"
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    if mode not in ("fwd", "fwd+bwd"):
        raise SystemExit(f"mode must be fwd or fwd+bwd, got {mode!r}")
    batch, heads, seqlen, head_dim = map(int, shape.split(","))
    backward = mode == "fwd+bwd"
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, requires_grad=backward)
               for _ in range(3))
    dout = torch.randn(batch, seqlen, heads, head_dim)

    def call() -> None:
        if backward:
            torch.autograd.grad(F.attention(q, k, v, causal=False), (q, k, v), dout)
        else:
            with torch.no_grad():
                F.attention(q, k, v, causal=False)

    call()
    times = []
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (3.5 if backward else 1)
    print(f"{mode} {shape}: {median * 1e3:.2f} ms {flops / median / 1e9:.1f} GFLOP/s "
          f"n={len(times)}")


if __name__ == "__main__":
    main()
