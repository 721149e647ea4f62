"""Hostile inputs for the rotary family, on every backend (tests/hostile.py).

Three parts: a table of bad arguments for the public functions, the module and the raw ops,
each of which must raise a clear error; extreme values (huge, inf, NaN features; positions at
the ends of the caches) against torch's float64 math; and a seeded random fuzz of forward and
backward (shapes, layouts, positions, dtypes) against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastllm
import fastllm.functional as F
from fastllm.ops import rotary as rotary_ops
from hostile import PUBLIC_BACKENDS, RAW_BACKENDS, case_ids, expect_clear_error, raw_ops
from test_rotary import caches, check_qk, torch_rotary

FAMILY = "rotary"

_C, _S = caches(16, 32)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# ------------------------------------------------------------------ public: bad arguments
# (name, call, words the error must contain)

PUBLIC_CASES = [
    ("cache too short", lambda: F.apply_rotary(_t(2, 17, 2, 32), _C, _S),
     ("cos", "16 rows", "position 16")),
    ("offset beyond cache", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, position_ids=15),
     ("cos", "position 16")),
    ("per-seq beyond cache", lambda: F.apply_rotary(_t(2, 3, 1, 32), _C, _S,
                                                    position_ids=torch.tensor([0, 14])),
     ("cos", "position 16")),
    ("per-token beyond cache", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S,
                                                      position_ids=torch.tensor([[3, 99]])),
     ("cos", "position 99")),
    ("negative position", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S,
                                                 position_ids=torch.tensor([[3, -2]])),
     ("position", "-2")),
    ("packed beyond cache", lambda: F.apply_rotary(_t(20, 1, 32), _C, _S,
                                                   cu_seqlens=_i32(0, 3, 20)),
     ("cos", "position 16")),
    ("odd rotary_dim", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, rotary_dim=7),
     ("rotary_dim", "7")),
    ("rotary_dim > D", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, rotary_dim=40),
     ("rotary_dim", "32", "40")),
    ("rotary_dim vs cos", lambda: F.apply_rotary(_t(1, 2, 1, 64), _C, _S, rotary_dim=16),
     ("rotary_dim", "32", "16")),
    ("rotary_dim bool", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, rotary_dim=True),
     ("rotary_dim", "bool")),
    ("cos wider than D", lambda: F.apply_rotary(_t(1, 2, 1, 16), _C, _S), ("rotary_dim", "16")),
    ("cos 1-D", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C[0], _S[0]), ("cos", "max_T")),
    ("cos empty columns", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C[:, :0], _S[:, :0]),
     ("cos", "column")),
    ("sin shape", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S[:8]), ("sin", "[16, 16]")),
    ("sin dtype", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S.bfloat16()),
     ("sin", "dtype", "bfloat16")),
    ("cos float64 for float32", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C.double(),
                                                       _S.double()), ("cos", "float64")),
    ("cos int", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C.int(), _S.int()), ("cos", "int32")),
    ("cos not tensor", lambda: F.apply_rotary(_t(1, 2, 1, 32), 1.0, _S), ("cos", "Tensor")),
    ("x int", lambda: F.apply_rotary(torch.ones(1, 2, 1, 32, dtype=torch.int64), _C, _S),
     ("x", "int64")),
    ("x complex", lambda: F.apply_rotary(torch.ones(1, 2, 1, 32, dtype=torch.complex64), _C, _S),
     ("x",)),
    ("x 3-D unpacked", lambda: F.apply_rotary(_t(2, 1, 32), _C, _S), ("x", "(B, T, heads, D)")),
    ("x 4-D packed", lambda: F.apply_rotary(_t(2, 2, 1, 32), _C, _S, cu_seqlens=_i32(0, 2)),
     ("x", "(total, heads, D)")),
    ("x not tensor", lambda: F.apply_rotary([[1.0]], _C, _S), ("x", "Tensor")),
    ("position_ids float", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S,
                                                  position_ids=torch.zeros(1, 2)),
     ("position_ids", "float32")),
    ("position_ids shape", lambda: F.apply_rotary(_t(2, 3, 1, 32), _C, _S,
                                                  position_ids=torch.zeros(3, 2).long()),
     ("position_ids", "[3, 2]")),
    ("position_ids 3-D", lambda: F.apply_rotary(_t(2, 3, 1, 32), _C, _S,
                                                position_ids=torch.zeros(2, 3, 1).long()),
     ("position_ids", "[2, 3, 1]")),
    ("position_ids (B, T) packed", lambda: F.apply_rotary(
        _t(4, 1, 32), _C, _S, position_ids=torch.zeros(1, 4).long(), cu_seqlens=_i32(0, 4)),
     ("position_ids", "cu_seqlens")),
    ("position_ids bool", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, position_ids=True),
     ("position_ids", "bool")),
    ("position_ids list", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, position_ids=[0, 1]),
     ("position_ids", "list")),
    ("cu_seqlens int64", lambda: F.apply_rotary(_t(4, 1, 32), _C, _S,
                                                cu_seqlens=torch.tensor([0, 4])),
     ("cu_seqlens", "int32")),
    ("cu_seqlens 2-D", lambda: F.apply_rotary(_t(4, 1, 32), _C, _S,
                                              cu_seqlens=_i32(0, 4).reshape(1, 2)),
     ("cu_seqlens", "(B + 1,)")),
    ("cu_seqlens single", lambda: F.apply_rotary(_t(4, 1, 32), _C, _S, cu_seqlens=_i32(0)),
     ("cu_seqlens", "(B + 1,)")),
    ("cu_seqlens start", lambda: F.apply_rotary(_t(4, 1, 32), _C, _S, cu_seqlens=_i32(1, 4)),
     ("cu_seqlens", "start at 0")),
    ("cu_seqlens decreasing", lambda: F.apply_rotary(_t(4, 1, 32), _C, _S,
                                                     cu_seqlens=_i32(0, 3, 2, 4)),
     ("cu_seqlens", "non-decreasing")),
    ("cu_seqlens end", lambda: F.apply_rotary(_t(4, 1, 32), _C, _S, cu_seqlens=_i32(0, 3)),
     ("cu_seqlens", "4", "3")),
    ("device cos", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C.to("meta"), _S.to("meta")),
     ("cos", "device")),
    ("device position_ids", lambda: F.apply_rotary(
        _t(1, 2, 1, 32), _C, _S, position_ids=torch.zeros(1, 2, dtype=torch.long, device="meta")),
     ("position_ids", "device")),
    ("inplace not bool", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, inplace=1),
     ("inplace", "int")),
    ("interleaved not bool", lambda: F.apply_rotary(_t(1, 2, 1, 32), _C, _S, interleaved="yes"),
     ("interleaved", "str")),
    ("k heads only differ", lambda: F.apply_rotary_qk(_t(1, 2, 2, 32), _t(1, 2, 1, 16), _C, _S),
     ("k", "[1, 2, 2, 32]", "[1, 2, 1, 16]")),
    ("k dtype", lambda: F.apply_rotary_qk(_t(1, 2, 2, 32), _t(1, 2, 1, 32).half(), _C, _S),
     ("k", "dtype", "float16")),
    ("k device", lambda: F.apply_rotary_qk(_t(1, 2, 2, 32), _t(1, 2, 1, 32, device="meta"),
                                           _C, _S), ("k", "device")),
    ("q is k in place", lambda: (lambda q: F.apply_rotary_qk(q, q, _C, _S, inplace=True))(
        _t(1, 2, 2, 32)), ("q", "k", "different")),
    ("module odd dim", lambda: fastllm.nn.RotaryEmbedding(7), ("dim", "7")),
    ("module scaling type", lambda: fastllm.nn.RotaryEmbedding(8, scaling="llama3"),
     ("scaling", "str")),
    ("module scaling keys", lambda: fastllm.nn.RotaryEmbedding(8, scaling={"type": "linear"}),
     ("scaling", "factor")),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", PUBLIC_CASES, ids=case_ids(PUBLIC_CASES))
def test_public_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


# ---------------------------------------------------------------------- raw ops: bad arguments

RAW_CASES = [
    ("cache too short", "rotary_fwd", (_t(2, 17, 2, 32), _C, _S, None, None, 0, False, False),
     ("cos", "position 16")),
    ("offset beyond", "rotary_fwd_inplace", (_t(1, 2, 1, 32), _C, _S, None, None, 15, False,
                                             True), ("cos", "position 16")),
    ("negative offset", "rotary_fwd", (_t(1, 2, 1, 32), _C, _S, None, None, -1, False, False),
     ("position", "-1")),
    ("rotary_dim > D", "rotary_fwd", (_t(1, 2, 1, 16), _C, _S, None, None, 0, False, False),
     ("rotary_dim", "16")),
    ("sin shape", "rotary_qk_fwd", (_t(1, 2, 2, 32), _t(1, 2, 1, 32), _C, _S[:, :4], None, None,
                                    0, False, False), ("sin", "[16, 4]")),
    ("k shape", "rotary_qk_fwd", (_t(1, 2, 2, 32), _t(1, 3, 1, 32), _C, _S, None, None, 0,
                                  False, False), ("k", "[1, 3, 1, 32]")),
    ("k dtype in place", "rotary_qk_fwd_inplace", (_t(1, 2, 2, 32), _t(1, 2, 1, 32).double(),
                                                   _C, _S, None, None, 0, False, False),
     ("k", "dtype")),
    ("cu_seqlens end", "rotary_fwd", (_t(4, 1, 32), _C, _S, None, _i32(0, 5), 0, False, False),
     ("cu_seqlens", "4")),
    ("position_ids shape", "rotary_qk_fwd", (_t(2, 2, 2, 32), _t(2, 2, 1, 32), _C, _S,
                                             torch.zeros(3).long(), None, 0, False, False),
     ("position_ids", "[3]")),
    ("position_ids dtype", "rotary_fwd", (_t(2, 2, 2, 32), _C, _S, torch.zeros(2, 2), None, 0,
                                          False, False), ("position_ids", "float32")),
    ("per-token beyond", "rotary_fwd", (_t(1, 2, 2, 32), _C, _S, torch.tensor([[0, 16]]), None,
                                        0, False, False), ("cos", "position 16")),
    ("cos dtype", "rotary_fwd", (_t(1, 2, 2, 32), _C.half(), _S.half(), None, None, 0, False,
                                 False), ("cos", "float16")),
]


@pytest.mark.parametrize("backend", RAW_BACKENDS)
@pytest.mark.parametrize("case", RAW_CASES, ids=case_ids(RAW_CASES))
def test_raw_bad_arguments(backend, case, request):
    if backend == "cuda_emu":
        request.getfixturevalue("emulated_cuda")
    ops = raw_ops(rotary_ops.IMPLS, backend)
    _, schema, args, words = case
    expect_clear_error(lambda: getattr(ops, schema)(*args), *words)


def test_emulated_cuda_refuses_float64(emulated_cuda):
    ops = raw_ops(rotary_ops.IMPLS, "cuda_emu")
    expect_clear_error(
        lambda: ops.rotary_fwd(_t(1, 2, 1, 32).double(), _C, _S, None, None, 0, False, False),
        "x", "float64")


# ------------------------------------------------------------------------- extreme values

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_special_values_match_torch(backend):
    """Huge, inf and NaN features give what torch's float64 math gives (NaN where it has NaN:
    inf * 0 at angle 0's sin, inf - inf), at the first and the last cached position."""
    cos, sin = caches(8, 8)
    x = torch.randn(1, 2, 3, 8)
    x[0, 0, 0] = torch.tensor([INF, 1.0, -INF, 2.0, 3e38, -3e38, NAN, 0.0])
    x[0, 1, 1] = torch.tensor([1e30, -1e30, 1e-40, -0.0, INF, INF, 5.0, 1.0])
    pos = torch.tensor([[0, 7]])
    got = F.apply_rotary(x, cos, sin, position_ids=pos)
    expected = torch_rotary(x.double(), cos.double(), sin.double(), pos)
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), "NaN pattern differs"
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(got.double()[finite], expected[finite].to(torch.float32).double(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_extremes(backend, dtype):
    """Features near the dtype's largest finite value: float32 math rounded once (float16's
    max rotated by 45 degrees stays finite; the overflow of x1 c - x2 s is inf as in torch's
    float32 math rounded to the dtype)."""
    big = torch.finfo(dtype).max
    cos, sin = caches(4, 4)
    x = torch.tensor([[[[big, big, -big, 1.0], [big / 2, -big / 2, 0.5, 2.0]]]]).to(dtype)
    got = F.apply_rotary(x, cos, sin, position_ids=3)
    expected = torch_rotary(x.float(), cos, sin, offset=3).to(dtype)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-2, atol=1e-3,
                               equal_nan=True)


# ------------------------------------------------------------------------------------ fuzz


@st.composite
def _problems(draw):
    half = draw(st.integers(1, 40))
    return dict(
        batch=draw(st.integers(1, 3)),
        seqlen=draw(st.integers(0, 9)),
        heads=draw(st.integers(1, 4)),
        kv_heads=draw(st.integers(0, 3)),
        half=half,
        extra=draw(st.integers(0, 9)),
        interleaved=draw(st.booleans()),
        positions=draw(st.sampled_from(["none", "int", "per_seq", "per_token", "packed"])),
        layout=draw(st.sampled_from(["contiguous", "fused", "transposed"])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
    )


def _fuzz_one(p):
    b, t, h, hkv = p["batch"], p["seqlen"], p["heads"], p["kv_heads"]
    d = 2 * p["half"] + p["extra"]
    max_t = 2 * t + 8
    cos, sin = caches(max_t, 2 * p["half"])
    dtype = p["dtype"]
    packed = p["positions"] == "packed"
    lead = (b * t,) if packed else (b, t)
    k_heads = max(hkv, 1)
    if p["layout"] == "fused":
        qkv = torch.randn(*lead, h + k_heads, d).to(dtype)
        q, k = qkv[..., :h, :], qkv[..., h:, :]
    elif p["layout"] == "transposed" and not packed:
        q = torch.randn(b, h, t, d).to(dtype).transpose(1, 2)
        k = torch.randn(b, k_heads, t, d).to(dtype).transpose(1, 2)
    else:
        q, k = torch.randn(*lead, h, d).to(dtype), torch.randn(*lead, k_heads, d).to(dtype)
    kwargs = dict(interleaved=p["interleaved"], k_none=hkv == 0)
    if p["positions"] == "int":
        kwargs["offset"] = t + 3
    elif p["positions"] == "per_seq":
        kwargs["position_ids"] = torch.randint(0, t + 8, (b,))
    elif p["positions"] == "per_token":
        kwargs["position_ids"] = torch.randint(0, max_t, (b, t))
    elif packed:
        kwargs["cu_seqlens"] = torch.arange(0, b * t + 1, max(t, 1), dtype=torch.int32)[: b + 1]
        if kwargs["cu_seqlens"].numel() != b + 1:
            kwargs["cu_seqlens"] = torch.zeros(b + 1, dtype=torch.int32)
        kwargs["position_ids"] = torch.randint(0, t + 8, (b,))
    check_qk(q, k, cos, sin, **kwargs)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=_problems())
def test_rotary_fuzz(backend, problem):
    torch.manual_seed(0)
    _fuzz_one(problem)


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
def test_double_backward_is_refused_not_wrong(backend):
    dtype = torch.float16 if backend == "cuda_emu" else torch.float32
    x = torch.randn(1, 3, 2, 32, dtype=dtype, requires_grad=True)
    out = F.apply_rotary(x, _C, _S).square().sum()
    expect_clear_error(lambda: torch.autograd.grad(out, x, create_graph=True), "double backward")
