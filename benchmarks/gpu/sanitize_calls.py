"""One small forward + backward of every fastllm kernel family, for compute-sanitizer
(benchmarks/gpu/check.py's sanitizer stage runs this under memcheck and racecheck):

    compute-sanitizer --tool memcheck python benchmarks/gpu/sanitize_calls.py --backend native

Shapes are small (a sanitizer slows kernels down by orders of magnitude) but odd, so every
kernel runs its edge paths: ragged last tiles, a row count that is not a multiple of the
block, head dims 64 and 128, causal and not, a padded varlen batch, GQA. Each call's
result is compared with the plain-PyTorch reference backend loosely (a sanitizer run looks
for bad accesses and races; the tests judge accuracy), and the process exits 1 if a call
raised or gave non-finite or far-off values. ``--list`` prints the calls without running
them (no GPU needed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

CALLS: dict[str, Callable[[torch.device], tuple]] = {}


def call(name: str):
    def register(fn):
        CALLS[name] = fn
        return fn
    return register


def _leaf(*shape, dtype=torch.bfloat16, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(True)


@call("layer_norm")
def _layer_norm(device):
    import fastllm.functional as F

    x = _leaf(37, 1000, device=device)
    w = _leaf(1000, dtype=torch.float32, device=device)
    b = _leaf(1000, dtype=torch.float32, device=device)
    return F.layer_norm(x, (1000,), w, b), (x, w, b)


@call("rms_norm")
def _rms_norm(device):
    import fastllm.functional as F

    x = _leaf(37, 4099, dtype=torch.float16, device=device)
    w = _leaf(4099, dtype=torch.float32, device=device)
    return F.rms_norm(x, (4099,), w), (x, w)


@call("add_rms_norm")
def _add_rms_norm(device):
    import fastllm.functional as F

    x = _leaf(3, 11, 512, device=device)
    r = _leaf(3, 11, 512, device=device)
    w = _leaf(512, dtype=torch.float32, device=device)
    y, h = F.add_rms_norm(x, r, (512,), w)
    return y.float().sum() + h.float().sum(), (x, r, w)


@call("add_layer_norm")
def _add_layer_norm(device):
    import fastllm.functional as F

    x = _leaf(29, 768, dtype=torch.float32, device=device)
    r = _leaf(29, 768, dtype=torch.float32, device=device)
    w = _leaf(768, dtype=torch.float32, device=device)
    b = _leaf(768, dtype=torch.float32, device=device)
    y, h = F.add_layer_norm(x, r, (768,), w, b)
    return y.sum() + h.sum(), (x, r, w, b)


@call("cross_entropy")
def _cross_entropy(device):
    import fastllm.functional as F

    logits = _leaf(45, 32003, device=device)
    target = torch.randint(0, 32003, (45,), device=device)
    target[::7] = -100
    return F.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4), (logits,)


@call("linear_cross_entropy")
def _linear_cross_entropy(device):
    import fastllm.functional as F

    hidden = _leaf(70, 256, device=device)
    weight = _leaf(5000, 256, device=device, scale=256**-0.5)
    target = torch.randint(0, 5000, (70,), device=device)
    return F.linear_cross_entropy(hidden, weight, target), (hidden, weight)


@call("attention")
def _attention(device):
    import fastllm.functional as F

    q = _leaf(2, 77, 4, 64, device=device)
    k = _leaf(2, 77, 2, 64, device=device)  # GQA
    v = _leaf(2, 77, 2, 64, device=device)
    return F.attention(q, k, v, causal=True), (q, k, v)


@call("attention_d128")
def _attention_d128(device):
    import fastllm.functional as F

    q = _leaf(1, 130, 2, 128, dtype=torch.float16, device=device)
    k = _leaf(1, 200, 2, 128, dtype=torch.float16, device=device)
    v = _leaf(1, 200, 2, 128, dtype=torch.float16, device=device)
    return F.attention(q, k, v), (q, k, v)


@call("attention_masked")
def _attention_masked(device):
    import fastllm.functional as F

    q = _leaf(3, 2, 70, 64, device=device)  # SDPA layout (B, H, T, D)
    k = _leaf(3, 2, 70, 64, device=device)
    v = _leaf(3, 2, 70, 64, device=device)
    mask = torch.ones(3, 1, 1, 70, dtype=torch.bool, device=device)
    mask[0, ..., 50:] = False
    mask[2, ..., 5:] = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v)


@call("rotary")
def _rotary(device):
    import fastllm.functional as F

    x = _leaf(2, 33, 4, 128, device=device)
    angles = torch.arange(64, device=device)[:, None] * torch.rand(64, device=device)
    return F.apply_rotary(x, angles.cos(), angles.sin()), (x,)


@call("swiglu")
def _swiglu(device):
    import fastllm.functional as F

    gate = _leaf(37, 1100, device=device)
    up = _leaf(37, 1100, device=device)
    return F.swiglu(gate, up), (gate, up)


@call("geglu")
def _geglu(device):
    import fastllm.functional as F

    gate = _leaf(19, 513, dtype=torch.float32, device=device)
    up = _leaf(19, 513, dtype=torch.float32, device=device)
    return F.geglu(gate, up), (gate, up)


def run_one(name: str, backend: str, device: torch.device) -> str:
    """Forward and backward of call ``name`` on ``backend``; the same on the reference
    backend from the same inputs; '' when they agree loosely, else what went wrong."""
    import fastllm

    torch.manual_seed(0)
    with fastllm.use_backend(backend):
        out, leaves = CALLS[name](device)
        loss = out.float().sum() if out.dim() else out.float()
        grads = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    torch.manual_seed(0)
    with fastllm.use_backend("reference"):
        ref_out, ref_leaves = CALLS[name](device)
        ref_loss = ref_out.float().sum() if ref_out.dim() else ref_out.float()
        ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    problems = []
    for label, ours, ref in [("out", out, ref_out), *[
            (f"grad{i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))]]:
        ours, ref = ours.detach().double(), ref.detach().double()
        if not torch.isfinite(ours).all():
            problems.append(f"{label}: non-finite values")
            continue
        scale = ref.abs().max().item() + 1e-6
        err = (ours - ref).abs().max().item() / scale
        if err > 0.05:  # far beyond any rounding: a wrong answer, not an accuracy question
            problems.append(f"{label}: max error {err:.3g} of the reference's max")
    return "; ".join(problems)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=("native", "triton"),
                        help="repeatable (default: native)")
    parser.add_argument("--only", action="append", choices=sorted(CALLS), help="repeatable")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--list", action="store_true", help="print the calls and exit")
    args = parser.parse_args(argv)
    backends = args.backend or ["native"]
    names = args.only or list(CALLS)
    if args.list:
        print(" ".join(f"{b}:{n}" for b in backends for n in names))
        return 0
    device = torch.device(args.device)
    failed = 0
    for backend in backends:
        for name in names:
            try:
                problem = run_one(name, backend, device)
            except Exception as exc:  # noqa: BLE001 - report every call, then fail
                problem = f"{type(exc).__name__}: {exc}"
            print(f"{backend}:{name}: {problem or 'ok'}", flush=True)
            failed += bool(problem)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
