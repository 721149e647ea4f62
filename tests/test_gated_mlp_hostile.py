"""Hostile inputs for the gated-MLP family, on every backend (tests/hostile.py).

Three parts: a table of bad arguments for the public functions, the module and the raw ops,
each of which must raise a clear error; extreme values (gates large enough to saturate every
activation, inf, NaN) compared with torch's float64 math; and a seeded random fuzz of
forward and backward (shapes, layouts, dtypes, magnitudes) against the float64 reference.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastllm
import fastllm.functional as F
from fastllm.ops import gated_mlp as mlp_ops
from hostile import PUBLIC_BACKENDS, RAW_BACKENDS, case_ids, expect_clear_error, raw_ops
from test_gated_mlp import check_kind

FAMILY = "gated_mlp"


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# ------------------------------------------------------------------ public: bad arguments
# (name, call, words the error must contain)

PUBLIC_CASES = [
    ("shape mismatch", lambda: F.swiglu(_t(4, 8), _t(4, 7)), ("up", "[4, 8]", "[4, 7]")),
    ("leading mismatch", lambda: F.geglu(_t(3, 8), _t(4, 8)), ("up", "shape")),
    ("broadcastable up", lambda: F.swiglu(_t(4, 8), _t(1, 8)), ("up", "shape")),
    ("odd last dim", lambda: F.swiglu(_t(4, 7)), ("gate", "even", "[4, 7]")),
    ("odd one-dim", lambda: F.geglu(_t(5)), ("gate", "even")),
    ("scalar gate", lambda: F.swiglu(torch.tensor(1.0)), ("gate", "dimension")),
    ("bad approximate", lambda: F.geglu(_t(2, 4), approximate="erf"), ("approximate", "'erf'")),
    ("approximate None", lambda: F.geglu(_t(2, 4), approximate=None), ("approximate",)),
    ("int gate", lambda: F.swiglu(torch.ones(2, 4, dtype=torch.int32)), ("gate", "int32")),
    ("bool up", lambda: F.swiglu(_t(2, 4), torch.ones(2, 4, dtype=torch.bool)), ("up",)),
    ("complex gate", lambda: F.swiglu(torch.ones(2, 4, dtype=torch.complex64)), ("gate",)),
    ("dtype mismatch", lambda: F.swiglu(_t(2, 4), _t(2, 4, dtype=torch.bfloat16)),
     ("up", "dtype", "bfloat16")),
    ("device mismatch", lambda: F.geglu(_t(2, 4), _t(2, 4, device="meta")), ("up", "device")),
    ("gate not tensor", lambda: F.swiglu([[1.0, 2.0]]), ("gate", "Tensor")),
    ("up not tensor", lambda: F.swiglu(_t(2, 2), 3.0), ("up", "Tensor")),
    ("module activation", lambda: fastllm.nn.GatedMLP(4, 8, activation="swish"),
     ("activation", "'swish'")),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", PUBLIC_CASES, ids=case_ids(PUBLIC_CASES))
def test_public_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


# ---------------------------------------------------------------------- raw ops: bad arguments

RAW_FWD_CASES = [
    ("shape mismatch", (_t(4, 8), _t(4, 7), "silu"), ("up", "[4, 7]")),
    ("odd last dim", (_t(4, 7), None, "gelu"), ("gate", "even")),
    ("scalar gate", (torch.tensor(1.0), None, "silu"), ("gate", "dimension")),
    ("activation", (_t(4, 8), None, "swish"), ("activation", "'swish'")),
    ("activation case", (_t(4, 8), None, "SiLU"), ("activation", "'SiLU'")),
    ("int gate", (torch.ones(2, 4, dtype=torch.int64), None, "silu"), ("gate", "float32")),
    ("dtype mismatch", (_t(2, 4), _t(2, 4, dtype=torch.float16), "gelu"), ("up", "dtype")),
]


@pytest.mark.parametrize("backend", RAW_BACKENDS)
@pytest.mark.parametrize("case", RAW_FWD_CASES, ids=case_ids(RAW_FWD_CASES))
def test_raw_fwd_bad_arguments(backend, case, request):
    if backend == "cuda_emu":
        request.getfixturevalue("emulated_cuda")
    ops = raw_ops(mlp_ops.IMPLS, backend)
    _, args, words = case
    expect_clear_error(lambda: ops.gated_mlp_fwd(*args), *words)


@pytest.mark.parametrize("backend", RAW_BACKENDS)
def test_raw_bwd_bad_arguments(backend, request):
    if backend == "cuda_emu":
        request.getfixturevalue("emulated_cuda")
    ops = raw_ops(mlp_ops.IMPLS, backend)
    g, u, x = _t(3, 6), _t(3, 6), _t(3, 12)
    bwd = ops.gated_mlp_bwd
    cases = [
        (lambda: bwd(_t(3, 5), g, u, "silu"), ("grad_out", "[3, 6]", "[3, 5]")),
        (lambda: bwd(_t(3, 12), x, None, "silu"), ("grad_out", "[3, 6]")),
        (lambda: bwd(_t(3, 6).double(), g, u, "gelu"), ("grad_out", "dtype")),
        (lambda: bwd(_t(3, 6), g, u, "tanh"), ("activation",)),
        (lambda: bwd(_t(3, 6), g, _t(3, 5), "silu"), ("up",)),
    ]
    for call, words in cases:
        expect_clear_error(call, *words)


def test_emulated_cuda_refuses_float64(emulated_cuda):
    ops = raw_ops(mlp_ops.IMPLS, "cuda_emu")
    expect_clear_error(lambda: ops.gated_mlp_fwd(_t(2, 4).double(), None, "silu"), "gate",
                       "float64")


# ------------------------------------------------------------------------- extreme values

_TORCH_ACT = {
    "swiglu": TF.silu,
    "geglu": TF.gelu,
    "geglu_tanh": functools.partial(TF.gelu, approximate="tanh"),
}
INF, NAN = float("inf"), float("nan")
# Gates where each activation saturates (|g| = 10 ... 1e4), the borders of the kernels'
# approximations, +-inf and NaN.
SPECIAL_GATES = [-INF, INF, NAN, 0.0, -0.0, 1e-20, -1e-20, 0.5, -0.5, 1.3, -1.3, 5.66, -5.66,
                 9.9, -9.9, 10.5, -10.5, 20.0, -20.0, 88.5, -88.5, 100.0, -100.0, 1e4, -1e4]


def _torch_math(kind, gate, up, dy):
    """torch's float64 math: act(gate) * up and its gradients."""
    g = gate.double().requires_grad_()
    u = up.double().requires_grad_()
    out = _TORCH_ACT[kind](g) * u
    return (out, *torch.autograd.grad(out, (g, u), dy.double()))


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "geglu_tanh"])
def test_special_values_match_torch(backend, kind):
    """inf / NaN / saturating gates give what torch's float64 math gives: NaN exactly where
    it has NaN (act(-inf), and the derivative at +-inf), +-inf where it has inf, and values
    within float32 rounding elsewhere. (torch's own float32 gelu returns NaN at +inf.)"""
    gate = torch.tensor(SPECIAL_GATES).repeat(2, 1)
    up = torch.randn_like(gate)
    up[1, :3] = torch.tensor([INF, 0.0, 2.0])  # inf * 0 and 0 * inf
    dy = torch.randn_like(gate)
    leaves = [t.clone().requires_grad_() for t in (gate, up)]
    kwargs = {} if kind == "swiglu" else {"approximate": "tanh" if kind == "geglu_tanh" else "none"}
    fn = F.swiglu if kind == "swiglu" else F.geglu
    out = fn(*leaves, **kwargs)
    got = (out, *torch.autograd.grad(out, leaves, dy))
    for name, a, e in zip(("out", "grad_gate", "grad_up"), got, _torch_math(kind, gate, up, dy)):
        a = a.detach().double()
        e = e.detach()
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN pattern differs"
        finite = ~torch.isnan(e)
        torch.testing.assert_close(a[finite], e[finite], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "geglu_tanh"])
def test_huge_finite_gates_saturate_without_nan(backend, kind):
    """Gates near float32's limit (g^3 overflows): the kernels still give act(g) = g or 0
    and derivatives 1 or 0, as float64 math does (torch's own float32 gelu_tanh backward
    gives NaN there)."""
    gate = torch.tensor([[1e30, -1e30, 3e38, -3e38, 1e13, -1e13]])
    up = torch.ones_like(gate)
    dy = torch.ones_like(gate)
    leaves = [t.clone().requires_grad_() for t in (gate, up)]
    kwargs = {} if kind == "swiglu" else {"approximate": "tanh" if kind == "geglu_tanh" else "none"}
    out = (F.swiglu if kind == "swiglu" else F.geglu)(*leaves, **kwargs)
    grad_gate, grad_up = torch.autograd.grad(out, leaves, dy)
    expected_act = torch.where(gate > 0, gate, torch.zeros_like(gate))
    torch.testing.assert_close(out, expected_act)
    torch.testing.assert_close(grad_up, expected_act)
    torch.testing.assert_close(grad_gate, (gate > 0).float())


SATURATED_SILU = """
    import os, torch
    from fastllm import functional as F
    torch.manual_seed(0)
    # 3 rows of 37 gates from 18 up (odd width: every path's vector loop and its tail).
    gate = torch.cat([torch.linspace(18.0, 88.0, 30), torch.tensor([46.229881286621094, 100.0,
                      1e3, 1e4, 3e4, 1e6, 2e7])]).repeat(3, 1)
    up = torch.randn(3, 37) * 30
    torch.save({"out": F.swiglu(gate, up), "gate": gate, "up": up}, os.environ["OUT"])
    print("ok")
"""


def test_saturated_silu_is_exact_on_every_isa_path(tmp_path):
    """Above g = 18 float32's sigmoid(g) rounds to 1, so silu(g) = g and swiglu is the one
    rounding of g * up, on every instruction-set path. The AVX2 path's reciprocal (rcp_ps
    and one Newton step) gave 1 - 2^-24 for 1 / 1 on Zen 3, an ulp off every such output:
    the fuzz below caught it on that AVX2-only CPU (elsewhere it runs the AVX-512 path)."""
    from tests.helpers import outputs_per_cpu_isa

    for isa, got in outputs_per_cpu_isa(SATURATED_SILU, tmp_path).items():
        expected = got["gate"] * got["up"]  # float32: one rounding
        assert torch.equal(got["out"], expected), (
            f"FASTLLM_CPU_ISA={isa!r}: max diff {(got['out'] - expected).abs().max().item():.3g}")


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_extremes(backend, dtype):
    """Large gates and ups in bf16 / fp16: float64 math rounded once to the dtype (products
    beyond float16's range are inf, as torch's float16 arithmetic gives them). Not torch's
    own low-precision ops: its bfloat16 gelu_tanh backward is NaN at 1e30. The reference
    backend is plain torch autograd in float32, whose gelu_tanh backward overflows (g^3) above
    |g| = 7e12 like torch's: it gets 1e4."""
    big = 6e4 if dtype == torch.float16 else 1e4 if backend == "reference" else 1e30
    gate = torch.tensor([[big, -big, 300.0, -300.0, 30.0, -30.0, 1.0, -2.5]]).to(dtype)
    up = torch.tensor([[2.0, 2.0, 300.0, 300.0, -3.0, 3.0, big, big]]).to(dtype)
    dy = torch.ones_like(gate)
    for kind in ("swiglu", "geglu", "geglu_tanh"):
        leaves = [t.clone().requires_grad_() for t in (gate, up)]
        kwargs = {} if kind == "swiglu" else {
            "approximate": "tanh" if kind == "geglu_tanh" else "none"}
        out = (F.swiglu if kind == "swiglu" else F.geglu)(*leaves, **kwargs)
        got = (out, *torch.autograd.grad(out, leaves, dy))
        for name, a, e in zip(("out", "grad_gate", "grad_up"), got,
                              _torch_math(kind, gate, up, dy)):
            torch.testing.assert_close(a.double(), e.detach().to(dtype).double(), rtol=1e-2,
                                       atol=1e-3, msg=lambda m: f"{kind} {name}: {m}")


# ------------------------------------------------------------------------------------ fuzz


@st.composite
def _problems(draw):
    return dict(
        kind=draw(st.sampled_from(["swiglu", "geglu", "geglu_tanh"])),
        rows=draw(st.integers(0, 6)),
        cols=draw(st.integers(1, 70)),
        batch=draw(st.integers(1, 3)),
        form=draw(st.sampled_from(["two", "one", "halves", "transposed"])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0, 30.0])),
    )


def _fuzz_one(p):
    shape = (p["batch"], p["rows"], p["cols"])
    dtype = p["dtype"]

    def rand(s):
        return (torch.randn(s) * p["scale"]).to(dtype)

    if p["form"] == "two":
        inputs = (rand(shape), rand(shape))
    elif p["form"] == "one":
        inputs = (rand(shape[:-1] + (2 * p["cols"],)),)
    elif p["form"] == "halves":
        inputs = tuple(rand(shape[:-1] + (2 * p["cols"],)).chunk(2, dim=-1))
    else:
        inputs = (rand((p["rows"], p["batch"], p["cols"])).transpose(0, 1), rand(shape))
    check_kind(p["kind"], inputs)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=_problems())
def test_gated_mlp_fuzz(backend, problem):
    torch.manual_seed(0)
    _fuzz_one(problem)


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
def test_double_backward_is_refused_not_wrong(backend):
    """The kernels' backward has no derivative of its own: create_graph=True used to give a
    gradient detached from the graph (a gradient penalty then silently wrong)."""
    dtype = torch.float16 if backend == "cuda_emu" else torch.float32
    gate = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    out = F.swiglu(gate, torch.randn(3, 8, dtype=dtype)).sum()
    expect_clear_error(lambda: torch.autograd.grad(out, gate, create_graph=True),
                       "double backward")
