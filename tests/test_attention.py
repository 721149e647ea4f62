"""Attention family, numerics: every backend (C++ CPU kernels, Triton under the interpreter,
the CUDA kernels under the SIMT emulation) against the float64 reference
(fastllm/reference/attention.py) with the 2x-PyTorch's-own-error rule (tests/accuracy.py),
where "PyTorch's own" is the plain composition computed in the input's dtype (as
FlashAttention's tests do). Outputs, lse and dq / dk / dv, for causal and not, Tq != Tk,
odd lengths, GQA / MQA, head dims 32..128, sliding windows, softcap, ALiBi, dropout,
packed variable-length batches, seqused_k, fully masked rows and non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch

import fastllm
import fastllm.functional as F
from fastllm.ops import attention as attn_ops
from fastllm.reference.attention import attention_ref, dropout_keep_mask, dropout_threshold
from tests.accuracy import assert_within_torch_error

# The interpreted Triton and emulated CUDA kernels are slow: small shapes for them.
DTYPES = {
    "native": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    # tl.dot on bfloat16 is wrong in triton 3.8's interpreter: bf16 is only compiled.
    "triton": (torch.float32, torch.float16),
    "cuda_emu": (torch.bfloat16, torch.float16),
}
# (B, Tq, Tk, H, Hkv, D)
SHAPES = {
    "native": [
        (2, 97, 97, 4, 4, 64),
        (1, 1, 1, 2, 1, 32),
        (2, 33, 77, 6, 2, 96),  # GQA, Tq < Tk
        (1, 77, 33, 4, 1, 128),  # MQA, Tq > Tk: causal leaves rows without keys
        (1, 300, 257, 2, 2, 33),  # odd head dim
        (1, 1023, 1023, 1, 1, 32),  # many key blocks, a partial last one
    ],
    "triton": [(1, 17, 17, 2, 2, 32), (1, 9, 23, 4, 2, 64), (1, 23, 9, 2, 1, 32)],
    "cuda_emu": [(1, 17, 17, 2, 2, 32), (1, 9, 23, 4, 2, 64), (1, 23, 9, 2, 1, 64)],
}


@pytest.fixture(params=["native", "triton", "cuda_emu"])
def backend(request):
    name = request.param
    if name == "native" and attn_ops.IMPLS.native is None:
        pytest.skip("fastllm._C is not built")
    if name == "triton" and attn_ops.IMPLS.triton is None:
        pytest.skip(attn_ops.IMPLS.triton_unavailable)
    if name == "cuda_emu":
        request.getfixturevalue("emulated_cuda")
        if attn_ops.IMPLS.emulated is None:
            attn_ops.register_emulated("fastllm_emu")
    with fastllm.use_backend(name):
        yield name


def _options(**kw):
    """Keyword options -> the schema's option tuple (after q, k, v)."""
    o = dict(
        cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=0, max_seqlen_k=0,
        softmax_scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0,
        alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
    )
    o.update(kw)
    return o


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse.detach(), dq, dk, dv


def check_against_reference(q, k, v, **kw):
    """Runs the selected backend, the float64 reference and the in-dtype composition, and
    applies the accuracy rule to out, lse and every gradient."""
    o = _options(**kw)
    if o["softmax_scale"] is None:
        o["softmax_scale"] = q.shape[-1] ** -0.5
    dtype = q.dtype
    dout = torch.randn_like(q)

    def ours(q, k, v):
        return attn_ops.attention_fwd(q, k, v, *o.values())

    def reference(q, k, v):
        return attention_ref(q.double(), k.double(), v.double(), *o.values())

    def theirs(q, k, v):
        return attention_ref(q, k, v, *o.values(), compute_dtype=dtype)

    got = _grads(ours, q, k, v, dout)
    ref = _grads(reference, q, k, v, dout.double())
    low = _grads(theirs, q, k, v, dout)
    for name, a, t, r in zip(("out", "lse", "dq", "dk", "dv"), got, low, ref):
        if name == "lse":
            finite = torch.isfinite(r)
            assert torch.equal(torch.isfinite(a), finite), "lse: -inf rows differ"
            assert (a[~finite] == float("-inf")).all()
            a, t, r = a[finite], t[finite], r[finite]
            # lse is float32 for every low-precision dtype: PyTorch's own is float32 too.
            if dtype != torch.float64:
                t = attention_ref(q.float(), k.float(), v.float(), *o.values())[1][finite]
            assert_within_torch_error(name, a, t, r, torch.float32 if dtype != torch.float64 else dtype)
            continue
        assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
        assert_within_torch_error(name, a, t, r, dtype)
    return got


def _qkv(b, tq, tk, h, hkv, d, dtype, scale=1.0):
    q = torch.randn(b, tq, h, d, dtype=dtype) * scale
    k = torch.randn(b, tk, hkv, d, dtype=dtype) * scale
    v = torch.randn(b, tk, hkv, d, dtype=dtype)
    return q, k, v


# --------------------------------------------------------------------------- padded batches
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(backend, causal):
    for dtype in DTYPES[backend]:
        for shape in SHAPES[backend]:
            q, k, v = _qkv(*shape, dtype)
            check_against_reference(q, k, v, causal=causal)


FEATURES = {
    "window": dict(window_left=8, window_right=3),
    "window_causal": dict(window_left=5, causal=True),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi="heads", causal=True),
    "alibi_batch": dict(alibi="batch"),
    "all": dict(window_left=11, window_right=0, softcap=5.0, alibi="heads", causal=True),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_attention_features(backend, feature):
    kw = dict(FEATURES[feature])
    alibi = kw.pop("alibi", None)
    shape = SHAPES[backend][2]
    b, h = shape[0], shape[3]
    for dtype in DTYPES[backend]:
        q, k, v = _qkv(*shape, dtype, scale=2.0)
        if alibi == "heads":
            kw["alibi_slopes"] = torch.rand(h) * 0.5
        elif alibi == "batch":
            kw["alibi_slopes"] = torch.rand(b, h) * 0.5
        check_against_reference(q, k, v, **kw)


def test_attention_fully_masked_rows_give_zeros(backend):
    """Causal with Tq > Tk (bottom-right): the first Tq - Tk rows see no key."""
    dtype = DTYPES[backend][-1]
    q, k, v = _qkv(1, 12, 5, 2, 1, 32, dtype)
    out, lse, dq, dk, dv = check_against_reference(q, k, v, causal=True)
    assert (out[:, :7] == 0).all() and (dq[:, :7] == 0).all()
    assert (lse[:, :, :7] == float("-inf")).all()
    # A window that excludes every key of some rows.
    q, k, v = _qkv(1, 6, 20, 2, 2, 32, dtype)
    check_against_reference(q, k, v, window_left=0, window_right=0)


def test_attention_non_contiguous(backend):
    dtype = DTYPES[backend][-1]
    b, t, h, d = 2, 19, 4, 32
    # (B, H, T, D) storage seen as (B, T, H, D), and q/k/v sliced out of one packed tensor.
    q = torch.randn(b, h, t, d, dtype=dtype).transpose(1, 2)
    qkv = torch.randn(b, t, 3, h, d, dtype=dtype)
    check_against_reference(q, qkv[:, :, 1], qkv[:, :, 2], causal=True)
    # Strided head dim (every other element).
    wide = torch.randn(b, t, h, 2 * d, dtype=dtype)
    check_against_reference(wide[..., ::2], qkv[:, :, 1], qkv[:, :, 2])


# --------------------------------------------------------------------------- varlen / seqused_k
def _packed(lengths_q, lengths_k, h, hkv, d, dtype):
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    return q, k, v, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
                         max_seqlen_k=max(lengths_k))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_varlen(backend, causal):
    gen = torch.Generator().manual_seed(1)
    top = 300 if backend == "native" else 40
    lengths_q = [1, top] + torch.randint(1, top, (3,), generator=gen).tolist()
    lengths_k = [1, top - 1] + torch.randint(1, top, (3,), generator=gen).tolist()
    for dtype in DTYPES[backend]:
        q, k, v, kw = _packed(lengths_q, lengths_k, 4, 2, 64, dtype)
        out, lse, *_ = check_against_reference(q, k, v, causal=causal, **kw)
        assert lse.shape == (4, q.shape[0])


def test_attention_varlen_features(backend):
    dtype = DTYPES[backend][-1]
    q, k, v, kw = _packed([5, 17, 9], [13, 17, 2], 4, 1, 32, dtype)
    check_against_reference(q, k, v, causal=True, window_left=4, softcap=3.0,
                            alibi_slopes=torch.rand(3, 4), **kw)


def test_attention_seqused_k(backend):
    dtype = DTYPES[backend][-1]
    q, k, v = _qkv(3, 4, 24, 4, 2, 32, dtype)
    used = torch.tensor([24, 7, 1], dtype=torch.int32)
    for causal in (False, True):
        out, lse, dq, dk, dv = check_against_reference(q, k, v, causal=causal, seqused_k=used)
        assert (dk[1, 7:] == 0).all() and (dv[2, 1:] == 0).all()


# --------------------------------------------------------------------------- dropout
def test_dropout_mask_matches_reference(backend):
    dtype = DTYPES[backend][-1]
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)
    q, k, v = _qkv(2, 21, 29, 4, 2, 32, dtype)
    check_against_reference(q, k, v, dropout_p=0.3, dropout_seed=seed, causal=True)
    q, k, v, kw = _packed([7, 1, 12], [9, 4, 12], 2, 2, 32, dtype)
    check_against_reference(q, k, v, dropout_p=0.5, dropout_seed=seed, **kw)


def test_dropout_hash_statistics():
    seed = torch.tensor([42], dtype=torch.int64)
    keep = dropout_keep_mask(seed, 0, 8, 128, 128) >= dropout_threshold(0.25)
    assert abs(keep.double().mean().item() - 0.75) < 0.01
    other = dropout_keep_mask(seed + 1, 0, 8, 128, 128) >= dropout_threshold(0.25)
    assert (keep != other).double().mean().item() > 0.3  # another seed, another mask


def test_dropout_reproducible_from_torch_seed():
    q, k, v = _qkv(1, 16, 16, 2, 2, 32, torch.float32)
    torch.manual_seed(7)
    a = F.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    b = F.attention(q, k, v, dropout_p=0.2)
    c = F.attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- KV cache
def test_kvcache_decode_matches_full_attention(backend):
    """Decode two tokens per step into caches of different lengths per sequence: the
    outputs equal the last rows of full causal attention over each sequence."""
    dtype = DTYPES[backend][-1]
    b, h, hkv, d, t_cache = 2, 4, 2, 32, 24
    lengths = torch.tensor([5, 13], dtype=torch.int32)
    k_seq = torch.randn(b, t_cache, hkv, d, dtype=dtype)
    v_seq = torch.randn(b, t_cache, hkv, d, dtype=dtype)
    k_cache, v_cache = k_seq.clone(), v_seq.clone()
    idx = torch.arange(b)[:, None]
    pos = lengths.long()[:, None] + torch.arange(2)
    k_cache[idx, pos] = 0  # the new tokens' slots hold stale values until written
    q = torch.randn(b, 2, h, d, dtype=dtype)
    out = F.attention_with_kvcache(q, k_cache, v_cache, k_seq[idx, pos], v_seq[idx, pos],
                                   cache_seqlens=lengths)
    for i in range(b):
        n = int(lengths[i]) + 2
        with fastllm.use_backend("reference"):
            full = F.attention(q[i : i + 1].double(), k_seq[i : i + 1, :n].double(),
                               v_seq[i : i + 1, :n].double(), causal=True)
        low, _ = attention_ref(q[i : i + 1], k_seq[i : i + 1, :n], v_seq[i : i + 1, :n],
                               causal=True, compute_dtype=dtype)
        assert_within_torch_error("out", out[i : i + 1], low, full, dtype)
    assert torch.equal(k_cache[idx, pos], k_seq[idx, pos])
