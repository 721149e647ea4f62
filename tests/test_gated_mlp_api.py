"""The gated-MLP family's contract beyond numerics: gradcheck, opcheck, torch.compile, the
GatedMLP module (and its parity with Hugging Face's LlamaMLP), error messages, meta
tensors and the CPU instruction-set paths.

Tests that take `backend` run on the native kernels (tests/conftest.py)."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import fastllm
import fastllm.functional as F
from fastllm import _build
from fastllm.ops import gated_mlp as mlp_ops
from tests.hostile import run_isolated

FAMILY = "gated_mlp"

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_TORCH_ACT = {
    "silu": TF.silu,
    "gelu": TF.gelu,
    "gelu_tanh": functools.partial(TF.gelu, approximate="tanh"),
}


def fastllm_act(activation, gate, up=None):
    if activation == "silu":
        return F.swiglu(gate, up)
    return F.geglu(gate, up, approximate="tanh" if activation == "gelu_tanh" else "none")


# ------------------------------------------------------------------ gradcheck (float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_mlp_gradcheck_cpu_float64(backend, activation):
    gate = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(functools.partial(fastllm_act, activation), (gate, up))
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(functools.partial(fastllm_act, activation), (x,))
    # the halves of one tensor given as two strided views
    assert torch.autograd.gradcheck(
        lambda x: fastllm_act(activation, *x.chunk(2, dim=-1)), (x,)
    )


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples():
    g = torch.randn(4, 3, 33)
    u = torch.randn(4, 3, 33)
    x = torch.randn(5, 2 * 17)
    return [
        (g, u, "silu"),
        (g.to(torch.bfloat16), u.to(torch.bfloat16), "gelu"),
        (x, None, "gelu_tanh"),
        (x.to(torch.float16), None, "silu"),
        (x[:, :17], x[:, 17:], "gelu"),
    ]


@pytest.mark.parametrize("idx", range(len(_opcheck_samples())))
def test_gated_mlp_opcheck_native(backend, idx):
    gate, up, activation = _opcheck_samples()[idx]
    gate = gate.detach().requires_grad_(True)
    up = None if up is None else up.detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.fastllm.gated_mlp_fwd, (gate, up, activation))


def test_gated_mlp_opcheck_native_backward_op(backend):
    g, u = torch.randn(5, 40), torch.randn(5, 40)
    dy = torch.randn(5, 40)
    torch.library.opcheck(torch.ops.fastllm.gated_mlp_bwd, (dy, g, u, "silu"))
    x = torch.randn(5, 80)
    torch.library.opcheck(torch.ops.fastllm.gated_mlp_bwd, (dy, x, None, "gelu"))


# ------------------------------------------------------------------------ torch.compile


class Block(torch.nn.Module):
    """Two GatedMLPs and a one-tensor swiglu between them."""

    def __init__(self, d):
        super().__init__()
        self.mlp = fastllm.nn.GatedMLP(d, 3 * d, activation="silu")
        self.gelu_mlp = fastllm.nn.GatedMLP(d, 2 * d, activation="gelu_tanh", bias=True)
        self.fused = torch.nn.Linear(d, 2 * d)

    def forward(self, x):
        h = x + self.mlp(x)
        h = h + F.swiglu(self.fused(h))
        return h + self.gelu_mlp(h)


def test_gated_mlp_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = Block(24)
    x = torch.randn(2, 5, 24, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, ref in zip([x.grad] + [p.grad for p in model.parameters()], grads):
        torch.testing.assert_close(g, ref)


# ------------------------------------------------------------------- GatedMLP module


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_mlp_module_matches_unfused(backend, activation, bias):
    mlp = fastllm.nn.GatedMLP(16, 40, activation=activation, bias=bias)
    assert [name for name, _ in mlp.named_parameters()] == [
        f"{proj}.{p}" for proj in ("gate_proj", "up_proj", "down_proj")
        for p in (("weight", "bias") if bias else ("weight",))
    ]
    assert mlp.gate_proj.weight.shape == (40, 16) and mlp.down_proj.weight.shape == (16, 40)
    x = torch.randn(3, 4, 16, requires_grad=True)
    out = mlp(x)
    ref = mlp.down_proj(_TORCH_ACT[activation](mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(out, ref)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, mlp.gate_proj.weight))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, mlp.gate_proj.weight))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert f"activation={activation!r}" in repr(mlp)


def test_gated_mlp_module_dtype_and_device_arguments():
    mlp = fastllm.nn.GatedMLP(8, 12, dtype=torch.bfloat16, device="meta")
    assert all(p.dtype == torch.bfloat16 and p.is_meta for p in mlp.parameters())
    out = mlp(torch.empty(2, 8, dtype=torch.bfloat16, device="meta"))
    assert out.shape == (2, 8) and out.is_meta


@pytest.mark.parametrize("hidden_act, activation", [
    ("silu", "silu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"),
])
def test_gated_mlp_equals_hf_llama_mlp(backend, hidden_act, activation):
    """GatedMLP loads a LlamaMLP state_dict as it is and computes the same function."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act=hidden_act,
                         mlp_bias=False)
    theirs = llama.LlamaMLP(config).double()
    ours = fastllm.nn.GatedMLP(32, 88, activation=activation).double()
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x))
    g_ours = torch.autograd.grad(ours(x).sum(), (x, ours.up_proj.weight))
    g_theirs = torch.autograd.grad(theirs(x).sum(), (x, theirs.up_proj.weight))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["native", "reference"], indirect=True)
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: F.swiglu(torch.randn(4, 8), torch.randn(4, 7)), ValueError,
         r"swiglu: up must have the shape of gate \[4, 8\], got \[4, 7\]"),
        (lambda: F.swiglu(torch.randn(4, 7)), ValueError,
         r"swiglu: gate must have an even last dimension when up is None .* got shape \[4, 7\]"),
        (lambda: F.geglu(torch.randn(4, 8), approximate="fast"), ValueError,
         r"geglu: approximate must be 'none' or 'tanh', got 'fast'"),
        (lambda: F.geglu(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError,
         r"geglu: up must have the dtype of gate torch.float32, got torch.float16"),
        (lambda: F.swiglu(torch.arange(8).reshape(2, 4)), TypeError,
         r"swiglu: gate must be float32, bfloat16, float16 or float64, got torch.int64"),
        (lambda: F.swiglu(torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError,
         r"swiglu: up must be on gate's device (cpu|cuda:0), got meta"),
        (lambda: F.swiglu(torch.tensor(1.0), torch.tensor(2.0)), ValueError,
         r"swiglu: gate must have at least one dimension"),
        (lambda: F.swiglu([1.0, 2.0]), TypeError, r"swiglu: gate must be a Tensor, got list"),
        (lambda: fastllm.nn.GatedMLP(4, 8, activation="relu"), ValueError,
         r"GatedMLP: activation must be 'silu', 'gelu' or 'gelu_tanh', got 'relu'"),
        (lambda: fastllm.nn.GatedMLP(4, 8)(torch.randn(2, 4).double()), RuntimeError,
         r"dtype"),
    ],
)
def test_gated_mlp_bad_input_is_named(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: torch.ops.fastllm.gated_mlp_fwd(torch.randn(4, 8), torch.randn(4, 7), "silu"),
         r"up must have the shape of gate \[4, 8\], got \[4, 7\]"),
        (lambda: torch.ops.fastllm.gated_mlp_fwd(torch.randn(4, 7), None, "silu"),
         r"gate must have an even last dimension when up is None"),
        (lambda: torch.ops.fastllm.gated_mlp_fwd(torch.randn(4, 8), None, "relu"),
         r"activation must be 'silu', 'gelu' or 'gelu_tanh', got 'relu'"),
        (lambda: torch.ops.fastllm.gated_mlp_bwd(torch.randn(4, 3), torch.randn(4, 8), None,
                                                 "gelu"),
         r"grad_out must have the shape of out \[4, 4\], got \[4, 3\]"),
        (lambda: torch.ops.fastllm.gated_mlp_bwd(torch.randn(4, 8).half(), torch.randn(4, 8),
                                                 torch.randn(4, 8), "gelu"),
         r"grad_out must have the dtype of gate"),
    ],
)
def test_gated_mlp_bad_input_direct_op_call_is_named(backend, call, match):
    """Direct callers of torch.ops.fastllm.* get the same checks from the C++ glue."""
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        call()


def test_gated_mlp_meta_tensors_give_shapes():
    """Meta tensors run the checked fake rules: the right shapes, no data read."""
    x = torch.empty(2, 3, 64, device="meta")
    assert F.swiglu(x).shape == (2, 3, 32)
    assert F.geglu(x, x, approximate="tanh").shape == (2, 3, 64)
    with pytest.raises(ValueError, match="even last dimension"):
        F.swiglu(torch.empty(2, 3, 7, device="meta"))


# ----------------------------------------------------------- CPU instruction-set paths

_ISA_SCRIPT = """
import functools, torch, torch.nn.functional as TF
import fastllm.functional as F
torch.manual_seed(0)
acts = {"silu": TF.silu, "gelu": TF.gelu, "gelu_tanh": functools.partial(TF.gelu, approximate="tanh")}
for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3),
                   (torch.float64, 1e-12)):
    for name, act in acts.items():
        for shape in ((3, 97), (2, 11008), (1, 7), (5, 1)):
            g = (torch.randn(shape) * 3).to(dtype).requires_grad_()
            u = torch.randn(shape).to(dtype).requires_grad_()
            if name == "silu":
                out = F.swiglu(g, u)
            else:
                out = F.geglu(g, u, approximate="tanh" if name == "gelu_tanh" else "none")
            dy = torch.randn(shape).to(dtype)
            grads = torch.autograd.grad(out, (g, u), dy)
            g64, u64 = (t.detach().double().requires_grad_() for t in (g, u))
            ref = act(g64) * u64
            ref_grads = torch.autograd.grad(ref, (g64, u64), dy.double())
            for a, b in zip((out, *grads), (ref, *ref_grads)):
                torch.testing.assert_close(a.detach().double(), b.detach(), rtol=tol, atol=tol)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_gated_mlp_lower_cpu_paths_match_torch(backend, isa):
    """FASTLLM_CPU_ISA=avx2 caps the kernels at AVX2 (the default on this machine is AVX-512
    where the CPU has it) and =scalar runs the portable loops; chosen once per process, hence
    the child process. (tests/cpp runs the C++ kernel tests on all three paths too.)"""
    out = run_isolated(_ISA_SCRIPT, env={"FASTLLM_CPU_ISA": isa, "FASTLLM_BACKEND": "native"})
    assert out.strip().endswith("ok")


def test_gated_mlp_family_is_registered():
    assert fastllm.ops.FAMILIES["gated_mlp"] is mlp_ops.IMPLS
    assert {"swiglu", "geglu"} <= set(F.__all__)


# ------------------------------------------------------------------ CUDA build (no GPU needed)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """gated_mlp.cu builds with the package's flags (ptxas fails on any spill or local-memory
    use) for sm_80 and sm_90, and ptxas -v reports 0 bytes of spills for every kernel: 2
    directions x 3 dtypes x 3 activations x 2 vector widths, per architecture."""
    cmd = [
        "nvcc", "-c", str(_build.ROOT / "csrc" / "gated_mlp" / "gated_mlp.cu"),
        "-o", str(tmp_path / "gated_mlp.o"), f"-I{_build.CSRC}",
        *_build.NVCC_FLAGS, *_build.gencode_flags(["80", "90"]),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(spills) == 72 and all(s == ("0", "0") for s in spills), result.stderr[-4000:]


# ------------------------------------------------------------------- fastllm bench mlp


def test_bench_mlp_quick_run(tmp_path):
    """`fastllm bench mlp --quick` through the real command line: every contender of a
    forward+backward case timed, every number finite and positive."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "fastllm", "bench", "mlp", "--quick", "--device", "cpu",
         "--no-thp-rerun", "--json", str(out), "--only", "swiglu-fwd+bwd-*-bfloat16"],
        cwd=_build.ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["contender"] for r in results] == ["fastllm", "torch eager", "torch.compile"]
    for r in results:
        assert r["error"] is None, r
        for key in ("time_s", "gbs", "copy_gbs", "speedup_vs_eager", "speedup_vs_compile"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["contender"], key, r[key])
    assert "== mlp ==" in run.stdout and "swiglu" in run.stdout


def test_bench_mlp_contenders_agree(backend):
    from fastllm.bench import load_family
    from fastllm.bench.common import COMPILE

    for case in load_family("mlp").cases(quick=True):
        inputs = case.make_inputs(torch.device("cpu"))
        results = []
        for contender in case.contenders:
            if contender == COMPILE:
                continue  # compiles for seconds; the command-line run above covers it
            out = case.function(contender, backend)(*inputs.args)
            grads = (torch.autograd.grad(out, inputs.differentiable, inputs.grad_outputs)
                     if case.backward else ())
            results.append((out.detach(), *grads))
        tol = 1e-5 if case.dtype == torch.float32 else 2e-2
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
