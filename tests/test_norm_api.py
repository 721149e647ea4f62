"""The norm family's contract beyond numerics: gradcheck, opcheck, torch.compile,
drop-in modules and error messages.

Tests that take `backend` run on the native kernels (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import fastllm
import fastllm.functional as F
from tests.helpers import cpu_has_avx512_path, outputs_per_cpu_isa

FAMILY = "norm"


# ------------------------------------------------------------------ gradcheck (float64)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("affine", [True, False])
def test_norm_gradcheck_cpu_float64(backend, kind, affine):
    n = 13
    x = torch.randn(3, 2, n, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(n, dtype=torch.float64, requires_grad=True) if affine else None
    fns = {
        "layer_norm": (lambda x, r, w, b: F.layer_norm(x, [n], w, b), (x, None, w, b)),
        "rms_norm": (lambda x, r, w, b: F.rms_norm(x, [n], w), (x, None, w, None)),
        "add_layer_norm": (lambda x, r, w, b: F.add_layer_norm(x, r, [n], w, b), (x, r, w, b)),
        "add_rms_norm": (lambda x, r, w, b: F.add_rms_norm(x, r, [n], w), (x, r, w, None)),
    }
    fn, args = fns[kind]
    assert torch.autograd.gradcheck(fn, args)


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples():
    x = torch.randn(4, 3, 33)
    r = torch.randn(4, 3, 33)
    w = torch.randn(33)
    b = torch.randn(33)
    xb = x.to(torch.bfloat16)
    return [
        ("layer_norm_fwd", (x, [33], w, b, 1e-5)),
        ("layer_norm_fwd", (xb, [33], None, None, 1e-5)),
        ("layer_norm_fwd", (xb, [33], w, b, 1e-5)),
        ("add_layer_norm_fwd", (x, r, [33], w, b, 1e-5)),
        ("rms_norm_fwd", (x, [3, 33], torch.randn(3, 33), 1e-6)),
        ("add_rms_norm_fwd", (xb, r.to(torch.bfloat16), [33], w.to(torch.bfloat16), 1e-6)),
    ]


@pytest.mark.parametrize("idx", range(len(_opcheck_samples())))
def test_norm_opcheck_native(backend, idx):
    name, args = _opcheck_samples()[idx]
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.fastllm, name), args)


def test_norm_opcheck_native_backward_ops(backend):
    x = torch.randn(5, 40)
    w = torch.randn(40)
    out, mean, rstd = torch.ops.fastllm.layer_norm_fwd(x, [40], w, None, 1e-5)
    dy = torch.randn(5, 40)
    torch.library.opcheck(
        torch.ops.fastllm.layer_norm_bwd, (dy, None, x, [40], w, mean, rstd, True, True)
    )
    torch.library.opcheck(
        torch.ops.fastllm.layer_norm_bwd, (dy, dy, x, [40], None, mean, rstd, False, False)
    )
    out, rstd = torch.ops.fastllm.rms_norm_fwd(x, [40], w, 1e-6)
    torch.library.opcheck(torch.ops.fastllm.rms_norm_bwd, (dy, None, x, [40], w, rstd, True))


# ------------------------------------------------------------------------ torch.compile


class PreNormBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = fastllm.nn.LayerNorm(d)
        self.rms = fastllm.nn.RMSNorm(d)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, residual):
        h, residual = self.ln(x, residual)
        h = self.proj(h)
        h, residual = self.rms(h, residual)
        return self.rms(h) + torch.nn.functional.gelu(residual)


def test_norm_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = PreNormBlock(48)
    x = torch.randn(2, 7, 48, requires_grad=True)
    r = torch.randn(2, 7, 48, requires_grad=True)
    eager = model(x, r)
    eager.sum().backward()
    grads = [x.grad.clone(), r.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = r.grad = None
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x, r)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, ref in zip([x.grad, r.grad] + [p.grad for p in model.parameters()], grads):
        torch.testing.assert_close(g, ref)


# ------------------------------------------------------------------- drop-in modules


@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {}),
        (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {"bias": False}),
        (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False}),
        (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {}),
        (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
        (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {"elementwise_affine": False}),
    ],
)
def test_modules_are_drop_in(ours, theirs, kwargs):
    shape = (6, 10)
    a = ours(shape, dtype=torch.float32, **kwargs)
    t = theirs(shape, dtype=torch.float32, **kwargs)
    assert list(a.state_dict().keys()) == list(t.state_dict().keys())
    assert a.extra_repr() == t.extra_repr()
    for p in t.parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p))
    a.load_state_dict(t.state_dict())
    x = torch.randn(3, 6, 10)
    torch.testing.assert_close(a(x), t(x), rtol=1e-5, atol=1e-5)
    assert isinstance(a, theirs)


def test_module_residual_forward():
    ln = fastllm.nn.LayerNorm(32)
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    out, summed = ln(x, r)
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + r, [32], ln.weight, ln.bias))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["native", "reference"], indirect=True)
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: F.layer_norm(torch.randn(4, 8), [8], torch.randn(7)), ValueError,
         r"weight must have shape \[8\] \(normalized_shape\), got \[7\]"),
        (lambda: F.layer_norm(torch.randn(4, 8), [8], None, torch.randn(8, 1)), ValueError,
         r"bias must have shape \[8\]"),
        (lambda: F.layer_norm(torch.randn(4, 8), [9]), ValueError,
         r"normalized_shape \[9\] must match the trailing dimensions of input, got input of shape \[4, 8\]"),
        (lambda: F.rms_norm(torch.randn(4, 8), [2, 8]), ValueError,
         r"normalized_shape \[2, 8\] must match"),
        (lambda: F.layer_norm(torch.randn(4, 8), [8], eps=-1.0), ValueError,
         r"eps must be non-negative, got -1.0"),
        (lambda: F.rms_norm(torch.randn(4, 8), [8], eps=-1e-6), ValueError,
         r"eps must be non-negative"),
        (lambda: F.layer_norm(torch.randn(4, 8), [8], torch.randn(8, dtype=torch.float16)), TypeError,
         r"weight must have the input's dtype torch.float32 .* got torch.float16"),
        (lambda: F.layer_norm(torch.randn(4, 8), [8], torch.randn(8, device="meta")), ValueError,
         r"weight must be on input's device (cpu|cuda:0), got meta"),
        (lambda: F.layer_norm(torch.arange(8).reshape(1, 8), [8]), TypeError,
         r"input must be float32, bfloat16, float16 or float64, got torch.int64"),
        (lambda: F.add_rms_norm(torch.randn(4, 8), torch.randn(4, 7), [8]), ValueError,
         r"residual must have the shape of input \[4, 8\], got \[4, 7\]"),
        (lambda: F.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8).half(), [8]), TypeError,
         r"residual must have the dtype of input torch.float32, got torch.float16"),
    ],
)
def test_norm_bad_input_is_named(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: torch.ops.fastllm.layer_norm_fwd(torch.randn(4, 8), [8], torch.randn(7), None, 1e-5),
         r"weight must have shape \[8\] \(normalized_shape\), got \[7\]"),
        (lambda: torch.ops.fastllm.rms_norm_fwd(torch.randn(4, 8), [9], None, 1e-5),
         r"normalized_shape \[9\] must match the trailing dimensions of input"),
        (lambda: torch.ops.fastllm.rms_norm_fwd(torch.randn(4, 8), [8], None, -1.0),
         r"eps must be non-negative, got -1"),
        (lambda: torch.ops.fastllm.layer_norm_bwd(torch.randn(4, 8), None, torch.randn(4, 8), [8], None,
                                                  torch.randn(3), torch.randn(4), False, False),
         r"mean must have shape \[4\] \(input's leading dims, one value per row\), got \[3\]"),
        (lambda: torch.ops.fastllm.layer_norm_bwd(torch.randn(4, 7), None, torch.randn(4, 8), [8], None,
                                                  torch.randn(4), torch.randn(4), False, False),
         r"grad_out must have the shape of input \[4, 8\], got \[4, 7\]"),
        (lambda: torch.ops.fastllm.add_layer_norm_fwd(torch.randn(4, 8), torch.randn(4, 8).double(), [8],
                                                      None, None, 1e-5),
         r"residual must have the dtype of input"),
    ],
)
def test_norm_bad_input_direct_op_call_is_named(backend, call, match):
    """Direct callers of torch.ops.fastllm.* get the same checks from the C++ glue."""
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        call()


def test_backend_switch():
    assert fastllm.get_backend() in fastllm.BACKENDS
    with fastllm.use_backend("reference"):
        assert fastllm.get_backend() == "reference"
        with fastllm.use_backend("native"):
            assert fastllm.get_backend() == "native"
        assert fastllm.get_backend() == "reference"
    with pytest.raises(ValueError, match=r"backend must be one of native, triton, reference, cuda_emu; got 'cuda'"):
        with fastllm.use_backend("cuda"):
            pass


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("FASTLLM_BACKEND", "reference")
    assert fastllm.get_backend() == "reference"
    monkeypatch.setenv("FASTLLM_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTLLM_BACKEND must be one of"):
        fastllm.get_backend()


# ------------------------------------------ every CPU instruction-set path, forced


# Run in a child process per FASTLLM_CPU_ISA value (the path is chosen once per process):
# every op, dtype and affine flag within the 2x rule (tests/test_norm.check_kind) on shapes
# that leave every tail length of a 16- and an 8-lane vector, rows longer than the 1024-element
# sum blocks, and one element; then determinism: the same bits when run again on 2 threads,
# and outputs and input gradients (computed row by row) the same on 1 and 2 threads. The
# weight/bias gradients are summed per thread, so only their 2-thread reruns must match. The
# outputs go to OUT so the parent can tell the paths apart.
ISA_PATH_SCRIPT = r"""
import os, torch
from tests.test_norm import KINDS, check_kind, fastllm_impl, make_inputs, run
torch.set_num_threads(1)
torch.manual_seed(0)
for kind in KINDS:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for affine in (True, False):
            for shape in ((4, 97), (3, 1000), (5, 4099), (2, 16), (1, 1)):
                check_kind(kind, shape, dtype, affine)
outputs = []
for kind in KINDS:
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        (x, r, w, b), norm_shape = make_inputs(kind, (256, 1031), 1, dtype, True, "contiguous")
        grads_out = (torch.randn(256, 1031).to(dtype), torch.randn(256, 1031).to(dtype))
        runs = {}
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            outs, grads = run(fastllm_impl, kind, (x, r, w, b), norm_shape, 1e-5, grads_out)
            runs.setdefault(threads, []).append(outs + [g for g in grads if g is not None])
        (two_a, two_b), (one,) = runs[2], runs[1]
        assert all(torch.equal(u, v) for u, v in zip(two_a, two_b)), f"{kind} {dtype}: 2 threads"
        n_rowwise = len(outs) + (2 if kind.startswith("add_") else 1)  # outputs, dx (, dres)
        assert all(torch.equal(u, v) for u, v in zip(one[:n_rowwise], two_a[:n_rowwise])), (
            f"{kind} {dtype}: 1 vs 2 threads")
        outputs += one
torch.save(outputs, os.environ["OUT"])
print("ok")
"""


def test_every_cpu_isa_path_within_the_2x_rule_and_thread_deterministic(backend, tmp_path):
    """FASTLLM_CPU_ISA unset (the best path: AVX-512 on a CPU with F/BW/DQ/VL/BF16), =avx2 and
    =scalar, each in its own child (ISA_PATH_SCRIPT). On an AVX-512 CPU the unset run must
    differ from the AVX2 run in some bit (16-lane sums round differently), which shows that
    the AVX-512 path really ran."""
    results = outputs_per_cpu_isa(ISA_PATH_SCRIPT, tmp_path)
    differs = lambda a, b: any(not torch.equal(u, v) for u, v in zip(results[a], results[b]))
    assert differs("avx2", "scalar")
    if cpu_has_avx512_path():
        assert differs("", "avx2")
