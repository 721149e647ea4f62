"""GFLOP/s of the three products of one linear cross-entropy chunk, torch's GEMM (MKL /
oneDNN) against fastllm's own (fastllm::linear_mm_out and, for dW, linear_weight_grad_out;
AVX-512 and AVX2 CPUs), per chunk size: what fastllm/ops/linear_cross_entropy.py's _own_gemm
and _MIN_CHUNK_ROWS_OWN_GEMM rest on.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/micro/linear_mm_rates.py \
        [--hidden 1024] [--vocab 32000] [--rows 256 160 132 128] [--seconds 1.5] [--rounds 2]

logits = x (C, H) @ W.T (the weight (V, H) transposed), dX = dlogits (C, V) @ W, dW += dlogits.T
@ x (added into a (V, H) float32 sum that lives in memory, as the chunks' dW does: torch's
addmm_ against linear_weight_grad_out with accumulate). Each rate is the best of --rounds
timings of >= --seconds of calls, the contenders alternating.
"""

from __future__ import annotations

import argparse
import time

import torch


def rate(fn, flops: float, seconds: float) -> float:
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return flops / ((time.perf_counter() - start) / calls) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 160, 132, 128])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import fastllm  # noqa: F401  (registers torch.ops.fastllm)
    from fastllm.backend import cpu_kernel_path

    path = cpu_kernel_path("cross_entropy", torch.float32)
    if path not in ("avx512", "avx2"):
        raise SystemExit(
            f"linear_mm_out needs the avx512 or avx2 path; this process has {path!r}")
    mm_out = torch.ops.fastllm.linear_mm_out
    grad_out = torch.ops.fastllm.linear_weight_grad_out
    H, V = args.hidden, args.vocab
    torch.manual_seed(0)
    W = torch.randn(V, H)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), H {H}, V {V}, "
          f"fastllm path {path}; "
          "GFLOP/s, best of the rounds")
    print(f"{'rows':>5}  {'logits torch':>12} {'ours':>6}  {'dX torch':>8} {'ours':>6}  "
          f"{'dW torch':>8} {'ours':>6}")
    for C in args.rows:
        x, dl = torch.randn(C, H), torch.randn(C, V)
        logits, dx, dw = torch.empty(C, V), torch.empty(C, H), torch.zeros(V, H)
        flops = 2.0 * C * H * V
        cases = {
            "logits torch": lambda: torch.mm(x, W.t(), out=logits),
            "logits ours": lambda: mm_out(x, W, True, None, logits),
            "dX torch": lambda: torch.mm(dl, W, out=dx),
            "dX ours": lambda: mm_out(dl, W, False, None, dx),
            "dW torch": lambda: dw.addmm_(dl.t(), x),
            "dW ours": lambda: grad_out(dl, x, True, dw),
        }
        best = {name: 0.0 for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                best[name] = max(best[name], rate(fn, flops, args.seconds))
        print(f"{C:>5}  {best['logits torch']:>12.1f} {best['logits ours']:>6.1f}  "
              f"{best['dX torch']:>8.1f} {best['dX ours']:>6.1f}  {best['dW torch']:>8.1f} "
              f"{best['dW ours']:>6.1f}",
              flush=True)


if __name__ == "__main__":
    main()
