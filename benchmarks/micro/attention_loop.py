"""fastllm's attention (or torch's SDPA) alone in a plain loop of calls: the median time and
GFLOP/s of one shape, forward or forward + backward, with the fastest call and the first
quartile, for the quick before/after comparison of a kernel change (run it on the two builds
in alternation). Peers and ratios: ``fastllm bench attention``. The AVX2 path's transposed
packing (csrc/attention/attention_cpu.cpp, Avx2Ops::transpose_floats) was measured with it,
record
benchmarks/results/2026-12-06-cpu-attention-avx2-transpose-ab-zen5.txt.

    PYTHONPATH=. OMP_NUM_THREADS=1 [FASTLLM_CPU_ISA=avx2] \\
        python benchmarks/micro/attention_loop.py [B,H,T,D] [fwd|fwd+bwd] [seconds] [fastllm|sdpa]

On a VM whose neighbours steal cycles in bursts (the Zen 3 guest of
benchmarks/results/2026-12-07-cpu-attention-fastllm-vs-sdpa-min-zen3.txt: medians of the same
build 46-75 GFLOP/s from one process to the next), the fastest call is the steadier figure:
run the two contenders at the same time, one pinned to each core (``taskset -c 0`` / ``-c 1``),
then swapped, so that both see the same bursts.

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
    contender = sys.argv[4] if len(sys.argv) > 4 else "fastllm"
    if mode not in ("fwd", "fwd+bwd"):
        raise SystemExit(f"mode must be fwd or fwd+bwd, got {mode!r}")
    if contender not in ("fastllm", "sdpa"):
        raise SystemExit(f"contender must be fastllm or sdpa, got {contender!r}")
    batch, heads, seqlen, head_dim = map(int, shape.split(","))
    backward = mode == "fwd+bwd"
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, requires_grad=backward)
               for _ in range(3))
    dout = torch.randn(batch, seqlen, heads, head_dim)

    if contender == "sdpa":  # (B, H, T, D), contiguous: as the bench gives its SDPA peer
        q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_(backward)
                   for x in (q, k, v))
        dout = dout.transpose(1, 2).contiguous()

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if contender == "fastllm":
            return F.attention(q, k, v, causal=False)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def call() -> None:
        if backward:
            torch.autograd.grad(attention(q, k, v), (q, k, v), dout)
        else:
            with torch.no_grad():
                attention(q, k, v)

    call()
    times = []
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    median, fastest, quartile = times[len(times) // 2], times[0], times[len(times) // 4]
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (3.5 if backward else 1)
    print(f"{mode} {shape}: {median * 1e3:.2f} ms {flops / median / 1e9:.1f} GFLOP/s "
          f"n={len(times)} ({contender}; fastest {fastest * 1e3:.2f} ms "
          f"{flops / fastest / 1e9:.1f} GFLOP/s, first quartile {quartile * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
