"""The CUDA FlashAttention-2 kernels (csrc/attention/cuda/) executed on the CPU by the SIMT
emulation: torch.ops.fastllm_emu.attention_fwd / attention_bwd against the float64
reference (fastllm/reference/attention.py) under the 2x-PyTorch's-own-error rule
(tests/accuracy.py), "PyTorch's own" being the reference composed in the input's dtype.

Shapes are small (the emulation is ~1e3-1e4x slower than a GPU) but reach every compiled
variant: each head-dim instantiation (32, 64, 96, 128, 256; 80 runs the 96 kernel with
zero-filled columns), partial query / key blocks (lengths 1, 17, 97), several key
blocks with and without the per-element mask, GQA / MQA (dk / dv summed over the group),
causal, sliding windows, softcap, ALiBi, dropout, packed varlen, seqused_k, fully masked
rows, inputs the 16-byte copies cannot read in place, and random thread schedules (the
kernels are deterministic: same bits under every schedule)."""

from __future__ import annotations

import pytest
import torch

from fastllm.reference.attention import attention_ref
from tests.accuracy import assert_within_torch_error

DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def emu():
    from fastllm import _emu

    return _emu.load()


def _options(q, **kw):
    o = dict(
        cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=0, max_seqlen_k=0,
        softmax_scale=q.shape[-1] ** -0.5, causal=False, window_left=-1, window_right=-1,
        softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
    )
    o.update(kw)
    return o


def run_emulated(q, k, v, dout, o, backward=True):
    out, lse = torch.ops.fastllm_emu.attention_fwd(q, k, v, *o.values())
    if not backward:
        return out, lse
    dq, dk, dv = torch.ops.fastllm_emu.attention_bwd(dout, q, k, v, out, lse, *o.values())
    return out, lse, dq, dk, dv


def _reference(q, k, v, dout, o, compute_dtype=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(q, k, v, *o.values(), compute_dtype=compute_dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), lse.detach(), dq, dk, dv


def check(q, k, v, backward=True, **kw):
    """The accuracy rule on out, lse (and dq, dk, dv); returns the emulated results."""
    o = _options(q, **kw)
    dtype = q.dtype
    dout = torch.randn_like(q)
    got = run_emulated(q, k, v, dout, o, backward)
    ref = _reference(q.double(), k.double(), v.double(), dout.double(), o)
    low = _reference(q, k, v, dout, o, compute_dtype=dtype)
    lse32 = attention_ref(q.float(), k.float(), v.float(), *o.values())[1]
    names = ("out", "lse", "dq", "dk", "dv")[: len(got)]
    for name, a, t, r in zip(names, got, low, ref):
        if name == "lse":
            assert a.dtype == torch.float32
            finite = torch.isfinite(r)
            assert torch.equal(torch.isfinite(a), finite), "lse: rows without keys differ"
            assert (a[~finite] == float("-inf")).all(), "lse of a row without keys must be -inf"
            assert_within_torch_error(name, a[finite], lse32[finite], r[finite], torch.float32)
            continue
        assert a.dtype == dtype and a.shape == r.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert_within_torch_error(name, a, t, r, dtype)
    return got


def _qkv(b, tq, tk, h, hkv, d, dtype):
    q = torch.randn(b, tq, h, d, dtype=dtype)
    k = torch.randn(b, tk, hkv, d, dtype=dtype)
    v = torch.randn(b, tk, hkv, d, dtype=dtype)
    return q, k, v


# (B, Tq, Tk, H, Hkv, D): every backward head-dim kernel, partial and multiple blocks,
# Tq != Tk both ways, GQA and MQA, a head dim between compiled widths.
SHAPES = [
    (2, 17, 17, 2, 2, 32),
    (1, 1, 1, 2, 1, 64),
    (1, 97, 97, 2, 1, 64),
    (1, 33, 77, 4, 2, 96),
    (1, 77, 33, 2, 1, 128),
    (1, 70, 70, 2, 2, 80),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, causal, dtype):
    torch.manual_seed(0)
    check(*_qkv(*shape, dtype), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dim_256(dtype):
    # The backward splits dk / dv's columns between two warps per 16 keys here.
    torch.manual_seed(1)
    check(*_qkv(1, 40, 70, 2, 1, 256, dtype), causal=True)


FEATURES = {
    "window": dict(window_left=8, window_right=3),
    "window_causal": dict(window_left=20, causal=True),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi="heads", causal=True),
    "alibi_batch": dict(alibi="batch"),
    "dropout": dict(dropout_p=0.3),
    "all": dict(window_left=30, window_right=0, softcap=5.0, alibi="heads", causal=True,
                dropout_p=0.1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(feature, dtype):
    torch.manual_seed(2)
    kw = dict(FEATURES[feature])
    b, tq, tk, h, hkv, d = 2, 80, 97, 4, 2, 64
    q, k, v = _qkv(b, tq, tk, h, hkv, d, dtype)
    alibi = kw.pop("alibi", None)
    if alibi == "heads":
        kw["alibi_slopes"] = torch.rand(h) * 0.5
    elif alibi == "batch":
        kw["alibi_slopes"] = torch.rand(b, h) * 0.5
    if kw.get("dropout_p", 0) > 0:
        kw["dropout_seed"] = torch.tensor([1234567890123], dtype=torch.int64)
    check(q, k, v, **kw)


def _packed(lengths_q, lengths_k, h, hkv, d, dtype):
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    opts = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
                max_seqlen_k=max(lengths_k))
    return q, k, v, opts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(causal, dtype):
    torch.manual_seed(3)
    # A sequence without queries, Tq > Tk and Tq < Tk (sequences without keys: test_rows_without_keys).
    q, k, v, opts = _packed([5, 0, 70, 3, 17], [9, 4, 66, 1, 80], 4, 2, 64, dtype)
    check(q, k, v, causal=causal, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seqused_k(dtype):
    torch.manual_seed(4)
    q, k, v = _qkv(3, 20, 90, 2, 1, 32, dtype)
    dk = check(q, k, v, causal=True, seqused_k=torch.tensor([90, 41, 7], dtype=torch.int32))[3]
    assert (dk[1, 41:] == 0).all() and (dk[2, 7:] == 0).all(), "unused keys need zero gradients"
    q, k, v, opts = _packed([7, 30], [50, 65], 2, 2, 64, dtype)
    check(q, k, v, seqused_k=torch.tensor([12, 65], dtype=torch.int32), **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(dtype):
    torch.manual_seed(5)
    # Causal with Tq > Tk: rows i < Tq - Tk see no key; a window that leaves rows empty too.
    q, k, v = _qkv(1, 90, 20, 2, 1, 64, dtype)
    out, lse, dq, dk, dv = check(q, k, v, causal=True)
    assert (out[:, :70] == 0).all() and (lse[:, :, :70] == float("-inf")).all()
    assert (dq[:, :70] == 0).all()
    out, lse, dq, dk, dv = check(q, k, v, window_left=0, window_right=0)
    assert (out[:, :70] == 0).all() and (dq[:, :70] == 0).all()
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_without_keys(dtype):
    # Sequences with no key at all (packed: empty key range; padded: seqused_k = 0) give
    # out = 0, lse = -inf and zero gradients; checked directly (the reference needs keys).
    torch.manual_seed(8)
    q, k, v, opts = _packed([6, 9], [0, 20], 2, 1, 32, dtype)
    o = _options(q, **opts)
    out, lse, dq, dk, dv = run_emulated(q, k, v, torch.randn_like(q), o)
    assert (out[:6] == 0).all() and (lse[:, :6] == float("-inf")).all() and (dq[:6] == 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, 6:]).all()
    q, k, v = _qkv(2, 9, 20, 2, 2, 64, dtype)
    o = _options(q, causal=True, seqused_k=torch.tensor([0, 20], dtype=torch.int32))
    out, lse, dq, dk, dv = run_emulated(q, k, v, torch.randn_like(q), o)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    torch.manual_seed(6)
    # (B, H, T, D) storage viewed as (B, T, H, D): read in place by the tile copies.
    q = torch.randn(2, 3, 33, 64, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 3, 40, 64, dtype=dtype).transpose(1, 2)
    v = torch.randn(2, 40, 3, 64, dtype=dtype)
    check(q, k, v, causal=True)
    # A head-dim slice with an odd row stride and a head dim that is not the unit-stride
    # dim: copied by the glue before the kernels run.
    q = torch.randn(1, 21, 2, 65, dtype=dtype)[..., 1:]
    k = torch.randn(1, 64, 30, 2, dtype=dtype).permute(0, 2, 3, 1)
    v = torch.randn(1, 30, 2, 64, dtype=dtype)
    check(q, k, v)


def test_schedules_give_the_same_bits(emu):
    from fastllm import _emu

    torch.manual_seed(7)
    # Several query and key blocks, GQA, masked and unmasked tiles; D = 256 also runs the
    # backward whose warps share key rows.
    for shape in ((1, 70, 45, 4, 2, 32), (1, 20, 70, 2, 1, 256)):
        q, k, v = _qkv(*shape, torch.float16)
        o = _options(q, causal=True, softcap=3.0, window_left=25)
        dout = torch.randn_like(q)
        in_order = run_emulated(q, k, v, dout, o)
        for seed in (1, 2):
            with _emu.schedule_seed(seed):
                shuffled = run_emulated(q, k, v, dout, o)
            for a, b in zip(in_order, shuffled):
                assert torch.equal(a, b), f"schedule seed {seed} changed the results"


def test_unsupported_arguments_are_refused():
    q, k, v = _qkv(1, 8, 8, 2, 2, 64, torch.float32)
    o = _options(q)
    with pytest.raises(TypeError, match="float16 or bfloat16.*got q of Float"):
        torch.ops.fastllm_emu.attention_fwd(q, k, v, *o.values())
    q, k, v = _qkv(1, 8, 8, 2, 2, 20, torch.float16)
    with pytest.raises(RuntimeError, match="multiple of 8 up to 256, got 20"):
        torch.ops.fastllm_emu.attention_fwd(q, k, v, *_options(q).values())
    out = torch.zeros_like(q)
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="multiple of 8 up to 256, got 20"):
        torch.ops.fastllm_emu.attention_bwd(out, q, k, v, out, lse, *_options(q).values())
