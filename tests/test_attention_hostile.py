"""Hostile inputs for the attention family, on every backend (tests/hostile.py).

Three parts: a table of bad arguments for each public function and for the raw ops, each of
which must raise a clear error; extreme values (scores near the dtype's limits, inf, NaN)
compared with torch; and a seeded random fuzz of forward and backward against the float64
reference. Cases that could crash the process run in a child process.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastllm.functional as F
from fastllm.ops import attention as attn_ops
from fastllm.reference.attention import attention_ref
from accuracy import assert_within_torch_error
from helpers import attention_options, packed_qkv, qkv
from hostile import PUBLIC_BACKENDS, RAW_BACKENDS, case_ids, expect_clear_error, raw_ops, run_isolated
from test_attention import check_against_reference

FAMILY = "attention"

# float16 runs on every backend (the CUDA kernels take float16 / bfloat16 only; bfloat16 dot
# products are wrong in triton's interpreter).
DT = torch.float16


def _qkv(b=1, tq=5, tk=7, h=2, hkv=2, d=16, dtype=DT):
    return qkv(b, tq, tk, h, hkv, d, dtype)


def _packed(lengths=(3, 5), h=2, hkv=2, d=16):
    return packed_qkv(list(lengths), list(lengths), h, hkv, d, DT)


# ------------------------------------------------------------------ public: bad arguments
# (name, call, words the error must contain)


def _cu(values):
    return torch.tensor(values, dtype=torch.int32)


ATTENTION_CASES = [
    ("q int", lambda: F.attention(torch.ones(1, 5, 2, 16, dtype=torch.int32), *_qkv()[1:]), ("q",)),
    ("k dtype", lambda: F.attention(_qkv()[0], _qkv()[1].float(), _qkv()[2]), ("k", "dtype")),
    ("q 3-D unpacked", lambda: F.attention(_qkv()[0][0], *_qkv()[1:]), ("q must be",)),
    ("head dim 0", lambda: F.attention(*_qkv(d=0)), ("head_dim",)),
    ("head dim 300", lambda: F.attention(*_qkv(d=264)), ("head_dim", "264")),
    ("k head dim", lambda: F.attention(_qkv(d=32)[0], *_qkv(d=16)[1:]), ("head_dim",)),
    ("heads 3 kv 2", lambda: F.attention(_qkv(h=3)[0], *_qkv(hkv=2)[1:]), ("heads", "3", "2")),
    ("k v shapes", lambda: F.attention(_qkv()[0], _qkv()[1], _qkv(tk=6)[2]), ("k and v",)),
    ("batch", lambda: F.attention(_qkv(b=2)[0], *_qkv(b=1)[1:]), ("batch",)),
    ("window", lambda: F.attention(*_qkv(), window_size=(-5, 0)), ("window_size",)),
    ("window not pair", lambda: F.attention(*_qkv(), window_size=3), ("window_size",)),
    ("dropout 1", lambda: F.attention(*_qkv(), dropout_p=1.0), ("dropout_p",)),
    ("dropout nan", lambda: F.attention(*_qkv(), dropout_p=math.nan), ("dropout_p",)),
    ("softcap -1", lambda: F.attention(*_qkv(), softcap=-1.0), ("softcap",)),
    ("softcap nan", lambda: F.attention(*_qkv(), softcap=math.nan), ("softcap",)),
    ("alibi shape", lambda: F.attention(*_qkv(), alibi_slopes=torch.ones(3)), ("alibi_slopes",)),
    ("alibi dtype", lambda: F.attention(*_qkv(), alibi_slopes=torch.ones(2, dtype=DT)),
     ("alibi_slopes", "float32")),
    ("cu q only", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([0, 3, 8])), ("together",)),
    ("cu int64", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([0, 3, 8]).long(),
                                     cu_seqlens_k=_cu([0, 3, 8]).long()), ("int32",)),
    ("cu list", lambda: F.attention(*_packed()[:3], cu_seqlens_q=[0, 3, 8],
                                    cu_seqlens_k=[0, 3, 8]), ("cu_seqlens_q",)),
    ("cu decreasing", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([0, 5, 3, 8]),
                                          cu_seqlens_k=_cu([0, 5, 3, 8]), max_seqlen_q=8,
                                          max_seqlen_k=8), ("non-decreasing",)),
    ("cu first", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([1, 3, 8]),
                                     cu_seqlens_k=_cu([0, 3, 8])), ("cu_seqlens_q[0]",)),
    ("cu last", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([0, 3, 7]),
                                    cu_seqlens_k=_cu([0, 3, 8])), ("cu_seqlens_q[-1]", "8")),
    ("cu lengths", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([0, 3, 8]),
                                       cu_seqlens_k=_cu([0, 3, 8]), max_seqlen_q=4,
                                       max_seqlen_k=5), ("max_seqlen_q",)),
    ("cu batch", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([0, 3, 8]),
                                     cu_seqlens_k=_cu([0, 8])), ("cu_seqlens_k",)),
    ("max_seqlen <0", lambda: F.attention(*_packed()[:3], cu_seqlens_q=_cu([0, 3, 8]),
                                          cu_seqlens_k=_cu([0, 3, 8]), max_seqlen_q=-1,
                                          max_seqlen_k=5), ("max_seqlen_q",)),
    ("seqused big", lambda: F.attention(*_qkv(), seqused_k=_cu([8])), ("seqused_k[0]", "7")),
    ("seqused neg", lambda: F.attention(*_qkv(), seqused_k=_cu([-1])), ("seqused_k[0]",)),
    ("seqused shape", lambda: F.attention(*_qkv(), seqused_k=_cu([1, 2])), ("seqused_k",)),
    ("seqused dtype", lambda: F.attention(*_qkv(), seqused_k=torch.tensor([1])), ("seqused_k",)),
    ("k on meta", lambda: F.attention(_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), ("k", "device")),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_ids(ATTENTION_CASES))
def test_attention_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


def _cache(b=2, t=8, hkv=2, d=16):
    return torch.zeros(b, t, hkv, d, dtype=DT), torch.zeros(b, t, hkv, d, dtype=DT)


def _kvcache(cache_seqlens, t_new=1, **kw):
    q = torch.randn(2, 1, 2, 16, dtype=DT)
    k_cache, v_cache = _cache()
    new = torch.randn(2, t_new, 2, 16, dtype=DT)
    return F.attention_with_kvcache(q, k_cache, v_cache, new, new.clone(), cache_seqlens, **kw)


KVCACHE_CASES = [
    ("int negative", lambda: _kvcache(-1), ("cache_seqlens", "-1")),
    ("tensor negative", lambda: _kvcache(torch.tensor([-3, 2], dtype=torch.int32)),
     ("cache_seqlens[0]", "-3")),
    ("beyond cache", lambda: _kvcache(torch.tensor([2, 9], dtype=torch.int32)),
     ("cache_seqlens[1]", "9")),
    ("no room for k_new", lambda: _kvcache(7, t_new=2), ("cache_seqlens", "[0, 6]")),
    ("float lengths", lambda: _kvcache(torch.tensor([1.0, 2.0])), ("cache_seqlens",)),
    ("bool length", lambda: _kvcache(True), ("cache_seqlens",)),
    ("shape", lambda: _kvcache(torch.tensor([1, 2, 3], dtype=torch.int32)), ("cache_seqlens",)),
    ("missing", lambda: _kvcache(None), ("cache_seqlens",)),
    ("k_new alone", lambda: F.attention_with_kvcache(
        torch.randn(2, 1, 2, 16, dtype=DT), *_cache(), torch.randn(2, 1, 2, 16, dtype=DT), None,
        1), ("k_new and v_new",)),
    ("k_new heads", lambda: F.attention_with_kvcache(
        torch.randn(2, 1, 2, 16, dtype=DT), *_cache(), torch.randn(2, 1, 1, 16, dtype=DT),
        torch.randn(2, 1, 1, 16, dtype=DT), 1), ("k_new",)),
    ("cache meta", lambda: F.attention_with_kvcache(
        torch.randn(2, 1, 2, 16, dtype=DT), *(c.to("meta") for c in _cache()), None, None, 1),
     ("k_cache", "device")),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", KVCACHE_CASES, ids=case_ids(KVCACHE_CASES))
def test_kvcache_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_kvcache_bad_lengths_leave_the_cache_untouched(backend):
    q = torch.randn(2, 1, 2, 16, dtype=DT)
    k_cache, v_cache = _cache()
    k_cache.normal_()
    before = k_cache.clone()
    new = torch.randn(2, 1, 2, 16, dtype=DT)
    with pytest.raises(ValueError):
        F.attention_with_kvcache(q, k_cache, v_cache, new, new, torch.tensor([1, -1]))
    assert torch.equal(k_cache, before)


def test_kvcache_unreadable_lengths_give_nan_rows_and_keep_the_cache():
    """Where the lengths cannot be read without a sync (a GPU; here: under tracing, the same
    code path), an out-of-range sequence gets NaN and its cache stays as it was; the others
    are exact."""
    torch.manual_seed(0)
    q = torch.randn(2, 1, 2, 16, dtype=torch.float32)
    k_cache, v_cache = (torch.randn(2, 8, 2, 16) for _ in range(2))
    before = k_cache.clone()
    new = torch.randn(2, 1, 2, 16)
    lengths = torch.tensor([3, 8], dtype=torch.int32)  # row 1 has no room for the new token

    def step(q, k_cache, v_cache, new, lengths):
        return F.attention_with_kvcache(q, k_cache, v_cache, new, new, lengths)

    out = torch.compile(step, backend="eager", fullgraph=True)(q, k_cache, v_cache, new, lengths)
    assert torch.isnan(out[1]).all()
    assert torch.equal(k_cache[1], before[1])
    assert torch.equal(k_cache[0, 3], new[0, 0])
    expected = F.attention(q[:1], k_cache[:1, :4], v_cache[:1, :4], causal=True)
    torch.testing.assert_close(out[:1], expected)


def _sdpa_args(dtype=torch.float32):
    q = torch.randn(1, 2, 3, 16, dtype=dtype)
    k = torch.randn(1, 2, 5, 16, dtype=dtype)
    return q, k, torch.randn_like(k)


SDPA_CASES = [
    ("int64 mask", lambda: F.scaled_dot_product_attention(
        *_sdpa_args(), attn_mask=torch.zeros(3, 5, dtype=torch.int64)), ("attn_mask", "int64")),
    ("mask shape", lambda: F.scaled_dot_product_attention(
        *_sdpa_args(), attn_mask=torch.zeros(4, 5, dtype=torch.bool)), ("attn_mask", "(4, 5)")),
    ("mask too big", lambda: F.scaled_dot_product_attention(
        *_sdpa_args(), attn_mask=torch.zeros(3, 1, 2, 3, 5)), ("attn_mask",)),
    ("mask list", lambda: F.scaled_dot_product_attention(*_sdpa_args(), attn_mask=[[True]]),
     ("attn_mask",)),
    ("mask and causal", lambda: F.scaled_dot_product_attention(
        *_sdpa_args(), attn_mask=torch.ones(3, 5, dtype=torch.bool), is_causal=True),
     ("attn_mask", "is_causal")),
    ("gqa off", lambda: F.scaled_dot_product_attention(
        torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)),
     ("enable_gqa",)),
    ("key dim", lambda: F.scaled_dot_product_attention(
        torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), ("key",)),
    ("2-D", lambda: F.scaled_dot_product_attention(
        torch.randn(3, 16), torch.randn(5, 16), torch.randn(5, 16)), ("query",)),
    ("dropout", lambda: F.scaled_dot_product_attention(*_sdpa_args(), dropout_p=-0.5),
     ("dropout_p",)),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", SDPA_CASES, ids=case_ids(SDPA_CASES))
def test_sdpa_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


@pytest.mark.parametrize("backend", ["reference", "native"], indirect=True)
def test_sdpa_broadcast_masks_match_torch(backend):
    from tests.test_attention_masks import MASK_BACKENDS

    if backend not in MASK_BACKENDS:  # masks reach the kernels as attn_bias / key_padding_mask
        pytest.skip(f"attention: backend {backend!r} has no masked kernels yet")
    q, k, v = _sdpa_args(torch.float64)
    for mask in (torch.rand(3, 5) > 0.3, torch.randn(3, 1), torch.randn(1, 2, 1, 5)):
        mask = mask.to(torch.float64) if mask.is_floating_point() else mask
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   expected)


# ----------------------------------------------------------------- raw ops: bad arguments


def _raw(**overrides):
    q, k, v = _qkv()
    return (q, k, v), attention_options(q, **overrides)


def _raw_packed(cu, total=8, **overrides):
    q, k, v, options = _packed()
    options.update(cu_seqlens_q=_cu(cu), cu_seqlens_k=_cu(cu), **overrides)
    return (q[:total], k[:total], v[:total]), attention_options(q, **options)


RAW_FWD_CASES = [
    ("window_left -5", lambda: _raw(window_left=-5), ("window_left", "-5")),
    ("window_right -2", lambda: _raw(window_right=-2), ("window_right",)),
    ("softcap -1", lambda: _raw(softcap=-1.0), ("softcap",)),
    ("dropout no seed", lambda: _raw(dropout_p=0.5), ("dropout_seed",)),
    ("dropout seed dtype", lambda: _raw(dropout_p=0.5, dropout_seed=torch.ones(1)),
     ("dropout_seed", "int64")),
    ("dropout 1", lambda: _raw(dropout_p=1.0), ("dropout_p",)),
    ("cu decreasing", lambda: _raw_packed([0, 5, 3, 8], max_seqlen_q=8, max_seqlen_k=8),
     ("non-decreasing",)),
    ("cu past the tokens", lambda: _raw_packed([0, 3, 4000], max_seqlen_q=4000,
                                               max_seqlen_k=4000), ("cu_seqlens_q[-1]", "8")),
    ("cu negative", lambda: _raw_packed([0, -3, 8], max_seqlen_q=11, max_seqlen_k=11),
     ("non-decreasing",)),
    ("seqused big", lambda: _raw(seqused_k=_cu([100])), ("seqused_k[0]",)),
    ("seqused neg", lambda: _raw(seqused_k=_cu([-100])), ("seqused_k[0]",)),
    ("alibi 3", lambda: _raw(alibi_slopes=torch.ones(3)), ("alibi_slopes",)),
]


def _shape_case(make_qkv, words):
    def build():
        q, k, v = make_qkv()
        # (options from a 1-wide head: attention_options divides by sqrt(head_dim))
        return (q, k, v), attention_options(torch.empty(1, 1, 1, 1), softmax_scale=1.0)
    return build, words


RAW_SHAPE_CASES = [
    ("heads 3 kv 2", *_shape_case(lambda: (_qkv(h=3)[0], *_qkv(hkv=2)[1:]), ("heads",))),
    ("head dims", *_shape_case(lambda: (_qkv(d=32)[0], *_qkv(d=16)[1:]), ("head_dim",))),
    ("head dim 0", *_shape_case(lambda: _qkv(d=0), ("head_dim",))),
    ("head dim 264", *_shape_case(lambda: _qkv(d=264), ("head_dim",))),
    ("k v shapes", *_shape_case(lambda: (*_qkv()[:2], _qkv(tk=3)[2]), ("k and v",))),
    ("dtypes", *_shape_case(lambda: (_qkv()[0], *(t.float() for t in _qkv()[1:])), ("dtype",))),
]


@pytest.mark.parametrize("backend", RAW_BACKENDS)
@pytest.mark.parametrize("case", RAW_FWD_CASES + RAW_SHAPE_CASES,
                         ids=case_ids(RAW_FWD_CASES + RAW_SHAPE_CASES))
def test_raw_attention_fwd_bad_arguments(backend, case, request):
    if backend == "cuda_emu":
        request.getfixturevalue("emulated_cuda")
    ops = raw_ops(attn_ops.IMPLS, backend)
    _, build, words = case
    (q, k, v), options = build()
    expect_clear_error(lambda: ops.attention_fwd(q, k, v, *options.values()), *words)


@pytest.mark.parametrize("backend", RAW_BACKENDS)
def test_raw_attention_bwd_bad_arguments(backend, request):
    if backend == "cuda_emu":
        request.getfixturevalue("emulated_cuda")
    ops = raw_ops(attn_ops.IMPLS, backend)
    (q, k, v), o = _raw()
    out, lse = ops.attention_fwd(q, k, v, *o.values())
    dout = torch.randn_like(q)
    bwd = ops.attention_bwd
    cases = [
        (lambda: bwd(dout[:, :3], q, k, v, out, lse, *o.values()), ("dout",)),
        (lambda: bwd(dout, q, k, v, out[:, :3], lse, *o.values()), ("out",)),
        (lambda: bwd(dout, q, k, v, out, lse[..., :3], *o.values()), ("lse",)),
        (lambda: bwd(dout, q, k, v, out, lse.double(), *o.values()), ("lse",)),
        (lambda: bwd(dout, q, k, v, out, lse, *dict(o, window_left=-7).values()),
         ("window_left",)),
    ]
    for call, words in cases:
        expect_clear_error(call, *words)


@pytest.mark.parametrize("backend", RAW_BACKENDS)
def test_raw_bad_cu_seqlens_cannot_crash(backend):
    """The case that once aborted the process ('double free or corruption'): cu_seqlens past
    the packed tokens, straight to the raw op. In a child: a crash fails this test only."""
    run_isolated(f"""
        import torch, pytest
        from fastllm import _emu
        if {backend!r} == "cuda_emu":
            _emu.load()
        from fastllm.ops import attention as attn_ops
        from helpers import attention_options
        ops = {{"native": attn_ops.IMPLS.native, "triton": attn_ops.IMPLS.triton,
                "cuda_emu": attn_ops.IMPLS.emulated}}[{backend!r}]
        q = torch.randn(8, 2, 16, dtype=torch.float16)
        cu = torch.tensor([0, 3, 4000], dtype=torch.int32)
        o = attention_options(q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4000,
                              max_seqlen_k=4000)
        try:
            ops.attention_fwd(q, q, q, *o.values())
        except (ValueError, RuntimeError) as e:
            assert "cu_seqlens_q[-1]" in str(e), e
        else:
            raise AssertionError("no error")
    """)


def test_triton_kernel_clamps_bad_cu_seqlens():
    """The Triton launcher called without the op's checks (as a GPU runs it: values are not
    read there) stays inside its tensors: rows outside the clamped sequences are zeros."""
    kernels = pytest.importorskip("fastllm.triton.attention")
    q = torch.randn(8, 2, 16, dtype=torch.float16)
    cu = _cu([0, 3, 4000])
    o = attention_options(q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4000,
                          max_seqlen_k=4000)
    out, lse = kernels.attention_fwd(q, q, q, *o.values())
    # Sequence 1 is clamped to the 5 tokens that exist: exactly the valid packing's answer.
    good = attention_options(q, cu_seqlens_q=_cu([0, 3, 8]), cu_seqlens_k=_cu([0, 3, 8]),
                             max_seqlen_q=5, max_seqlen_k=5)
    expected, _ = attention_ref(q, q, q, *good.values())
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------- extreme values


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("special", ["nan_q", "inf_k", "neg_inf_k", "huge_v"])
def test_attention_special_values_match_torch(backend, special):
    """NaN / inf inputs give what torch's attention gives (NaN where torch has NaN)."""
    q, k, v = _qkv(tq=4, tk=6)
    if special == "nan_q":
        q[0, 1, 0, 3] = float("nan")
    elif special == "inf_k":
        k[0, 2, 1, 0] = float("inf")
    elif special == "neg_inf_k":
        k[0, 2, 1, 0] = float("-inf")
    else:
        v[0, 3, 0, :] = 6e4
    out = F.attention(q, k, v)
    # torch's math: softmax(q k^T / sqrt(D)) v in float64. (torch's fused CPU kernel drops a
    # NaN score instead of propagating it; the math, and fastllm, propagate it.)
    qd, kd, vd = (t.transpose(1, 2).double() for t in (q, k, v))
    probs = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    expected = (probs @ vd).transpose(1, 2)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), "NaN pattern differs from torch"
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(out[finite].double(), expected[finite], atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("magnitude", [3e2, 1e4, 6e4])
def test_attention_random_large_scores(backend, magnitude):
    """Random q, k of large magnitude (scores up to ~1e9 in float16's range): finite, and
    within the accuracy rule of the float64 reference, forward and backward."""
    q, k, v = _qkv(tq=6, tk=9)
    scale = magnitude / max(q.abs().max().item(), k.abs().max().item())
    q, k = (q.float() * scale).to(DT), (k.float() * scale).to(DT)
    dout = torch.randn_like(q)
    o = attention_options(q, softmax_scale=1.0)

    def run(fn, leaves):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        out, _ = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))

    got = run(lambda *t: attn_ops.attention_fwd(*t, *o.values()), (q, k, v))
    ref = run(lambda *t: attention_ref(*t, *o.values()), [t.double() for t in (q, k, v)])
    # torch's own error here: float16 attention that computes in float32, as flash kernels
    # (torch's float16 math overflows the scores); scores near 1e9 round in float32 too.
    own = run(lambda *t: attention_ref(*t, *o.values(), compute_dtype=torch.float32),
              (q, k, v))
    for name, a, t, r in zip(("out", "dv"), got[::3], own[::3], ref[::3]):
        assert_within_torch_error(name, a, t.to(DT), r, DT)
    # dq and dk: the fused backward's dS = P (dP - D) cancels (here P is one-hot and dS is
    # exactly 0), so its float32 rounding of dP - D (~ eps32 |dout| |v|) is multiplied by
    # |k| (|q|): that, not float16's slack, bounds the error of every flash-style backward.
    cancel = 8 * torch.finfo(torch.float32).eps * dout.abs().max() * v.abs().max()
    for name, a, r, other in (("dq", got[1], ref[1], k), ("dk", got[2], ref[2], q)):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        bound = float(cancel * other.abs().max()) + 1e-3
        assert (a.double() - r).abs().max() <= bound, f"{name}: error above {bound:.3g}"


# ------------------------------------------------------------------------------------ fuzz


@st.composite
def _problems(draw):
    kv_heads = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(1, 19)),
        seqlen_k=draw(st.integers(1, 19)),
        kv_heads=kv_heads,
        heads=kv_heads * draw(st.integers(1, 2)),
        head_dim=8 * draw(st.integers(1, 4)),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (3, 0), (2, 5)])),
        softcap=draw(st.sampled_from([0.0, 5.0])),
        packed=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 8.0])),
    )


def _fuzz_one(p):
    if p["packed"]:
        lengths_q = [max(1, p["seqlen_q"] - 3 * i) for i in range(p["batch"])]
        lengths_k = [max(1, p["seqlen_k"] - 2 * i) for i in range(p["batch"])]
        q, k, v, options = packed_qkv(lengths_q, lengths_k, p["heads"], p["kv_heads"],
                                      p["head_dim"], DT)
        q, k = q * p["scale"], k * p["scale"]
    else:
        q, k, v = qkv(p["batch"], p["seqlen_q"], p["seqlen_k"], p["heads"], p["kv_heads"],
                      p["head_dim"], DT, scale=p["scale"])
        options = {}
    left, right = p["window"]
    check_against_reference(q, k, v, causal=p["causal"], window_left=left, window_right=right,
                            softcap=p["softcap"], **options)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=_problems())
def test_attention_fuzz(backend, problem):
    torch.manual_seed(0)
    _fuzz_one(problem)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, e.g. building a model on the meta device) run the
    checked fake rules: the right shapes, no data read."""
    q = torch.empty(2, 1, 2, 16, device="meta")
    cache = torch.empty(2, 8, 2, 16, device="meta")
    assert F.attention(q, cache, cache, causal=True).shape == q.shape
    lengths = torch.empty(2, dtype=torch.int32, device="meta")
    out = F.attention_with_kvcache(q, cache, cache.clone(), q, q, lengths)
    assert out.shape == q.shape and out.is_meta
    x = torch.empty(2, 2, 3, 16, device="meta")
    assert F.scaled_dot_product_attention(x, x, x).shape == x.shape
    expect_clear_error(lambda: F.attention(q, cache, cache, window_size=(-3, 0)), "window_size")


def _mha_call(**kw):
    from fastllm.nn import MultiheadAttention

    mha = MultiheadAttention(16, 2, batch_first=True)
    x = kw.pop("x", torch.randn(2, 5, 16))
    return lambda: mha(x, x, x, need_weights=False, **kw)


# torch.nn.MultiheadAttention raises AssertionError / RuntimeError for these: the module keeps
# torch's exception types (code that catches them keeps working) with messages naming the
# argument.
MHA_CASES = [
    ("embed dim", dict(x=torch.randn(2, 5, 12)), ("query", "16")),
    ("padding mask shape", dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ("key_padding_mask",)),
    ("padding mask int", dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.int64)),
     ("key_padding_mask",)),
    ("attn mask 4-D", dict(attn_mask=torch.zeros(1, 1, 5, 5, dtype=torch.bool)), ("attn_mask",)),
    ("attn mask shape", dict(attn_mask=torch.zeros(4, 5, dtype=torch.bool)), ("attn_mask",)),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", MHA_CASES, ids=case_ids(MHA_CASES))
def test_multihead_attention_bad_arguments(backend, case):
    _, kw, words = case
    expect_clear_error(_mha_call(**kw), *words, errors=(AssertionError, RuntimeError))


# ------------------------------------------------ found by a probe with unseen cases


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
def test_huge_max_seqlen_costs_nothing(backend):
    """A max_seqlen far above the packed tokens (a model's context length, say) is clamped to
    them: it used to size native's loops (2**40 ran for minutes)."""
    q, k, v, options = _packed(lengths=(3, 4))
    expected = F.attention(q, k, v, **options)
    options.update(max_seqlen_q=2**40, max_seqlen_k=2**40)
    torch.testing.assert_close(F.attention(q, k, v, **options), expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("width", [2**31, 2**32, 2**40])
def test_huge_window_is_unbounded(backend, width):
    """A window wider than every query-key distance is no window (the CUDA kernels used to
    truncate 2**32 to 0 in 32 bits)."""
    q, k, v = _qkv(tq=4, tk=4)
    expected = F.attention(q, k, v)
    torch.testing.assert_close(F.attention(q, k, v, window_size=(width, width)), expected,
                               atol=0, rtol=0)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_strided_cu_seqlens(backend):
    q, k, v, options = _packed(lengths=(3, 4))
    strided = torch.tensor([0, 9, 3, 9, 7, 9], dtype=torch.int32)[::2]
    got = F.attention(q, k, v, cu_seqlens_q=strided, cu_seqlens_k=strided.clone(),
                      max_seqlen_q=4, max_seqlen_k=4)
    torch.testing.assert_close(got, F.attention(q, k, v, **options), atol=0, rtol=0)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_sdpa_empty_lengths_match_torch(backend):
    q, k = torch.randn(1, 2, 3, 16, dtype=DT), torch.randn(1, 2, 4, 16, dtype=DT)
    out = F.scaled_dot_product_attention(q[:, :, :0], k, k)
    assert out.shape == (1, 2, 0, 16)
    # No keys: fastllm's rule for a row without keys (zeros; torch's math gives NaN).
    out = F.scaled_dot_product_attention(q, k[:, :, :0], k[:, :, :0])
    assert out.shape == (1, 2, 3, 16) and not out.any()


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_probe_argument_errors(backend):
    q, k, v = _qkv()
    expect_clear_error(lambda: F.attention(q, k, v, softcap=1e300), "softcap", "float32")
    expect_clear_error(lambda: F.attention(q, k, v, seqused_k=[1]), "seqused_k")
    slopes = torch.rand(2, requires_grad=True)
    if backend != "reference":  # the reference differentiates them (plain autograd)
        expect_clear_error(lambda: F.attention(q, k, v, alibi_slopes=slopes), "alibi_slopes")


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
def test_double_backward_is_refused_not_wrong(backend):
    q, k, v = (t.float() if backend != "cuda_emu" else t for t in _qkv())
    q.requires_grad_()
    out = F.attention(q, k, v)
    expect_clear_error(lambda: torch.autograd.grad(out.sum(), q, create_graph=True),
                       "double backward")
