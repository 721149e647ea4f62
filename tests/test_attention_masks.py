"""Attention with a key padding mask and an additive bias (issue 11), numerics and errors.

Every backend against the float64 reference (fastllm/reference/attention.py) under the
2x-PyTorch's-own-error rule (tests/accuracy.py), "PyTorch's own" being the reference composed
in the input's dtype: out, dq, dk, dv and the bias gradient (summed over the bias's broadcast
dims), for right / left / random padding, fully padded sequences, every bias broadcast
pattern, -inf biases (rows with no finite score give zeros, never NaN), and the bias and mask
together with causal, sliding windows, softcap, ALiBi, dropout and GQA.
"""

from __future__ import annotations

import pytest
import torch

import fastllm
import fastllm.functional as F
from fastllm.ops import attention as attn_ops
from fastllm.reference.attention import attention_ref
from tests.accuracy import assert_within_torch_error
from tests.helpers import attention_options, dropout_seed, generator, qkv
from tests.hostile import expect_clear_error

FAMILY = "attention"
BACKENDS = ("reference", "native", "triton", "cuda_emu")
# The backends whose kernels take attn_bias / key_padding_mask (every one now; a new backend
# starts outside this set, and the glue refuses masks for it with NotImplementedError).
MASK_BACKENDS = {"reference", "native", "triton", "cuda_emu"}

DTYPES = {
    "reference": (torch.float32, torch.bfloat16),
    "native": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    # tl.dot on bfloat16 is wrong in triton 3.8's interpreter (tests/test_attention.py).
    "triton": (torch.float32, torch.float16),
    "cuda_emu": (torch.bfloat16, torch.float16),
}
# (B, Tq, Tk, H, Hkv, D): small for the interpreted / emulated kernels.
SHAPES = {
    "reference": [(3, 13, 13, 2, 2, 16)],
    "native": [(3, 37, 37, 4, 2, 64), (3, 17, 45, 2, 2, 32), (2, 70, 130, 2, 1, 80)],
    "triton": [(3, 17, 23, 2, 1, 32)],
    "cuda_emu": [(3, 17, 23, 2, 1, 32)],
}


def _need_masks(backend: str) -> None:
    if backend not in MASK_BACKENDS:
        pytest.skip(f"attention: backend {backend!r} has no masked kernels yet")


def padding_mask(kind: str, batch: int, tk: int, gen: torch.Generator) -> torch.Tensor:
    """(B, Tk) bool, True = take part. Sequence 0 keeps every key, the last one none."""
    lengths = [tk] + [int(x) for x in torch.randint(1, tk + 1, (batch - 2,), generator=gen)] + [0]
    mask = torch.zeros(batch, tk, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if kind == "right":
            mask[b, :n] = True
        elif kind == "left":
            mask[b, tk - n:] = True
        else:  # random keys
            mask[b] = torch.rand(tk, generator=gen) < (n / max(tk, 1))
    return mask


def check_masked(q, k, v, bias=None, kpm=None, **kw):
    """Runs the selected backend through the op's autograd with ``bias`` (any broadcastable
    shape, a leaf) and ``kpm``; applies the accuracy rule to out, dq, dk, dv and dbias."""
    dtype = q.dtype
    scores = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    dout = torch.randn_like(q)
    seed = dropout_seed(5) if kw.get("dropout_p", 0) > 0 else None

    def run(fn, leaves, grad):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype)))

    def options(b, t):
        o = attention_options(t, dropout_seed=seed, key_padding_mask=kpm, **kw)
        o["attn_bias"] = None if b is None else b.to(t.dtype).expand(scores)
        return o

    leaves = (q, k, v) if bias is None else (q, k, v, bias)

    def ours(q_, k_, v_, b=None):
        return attn_ops.attention_fwd(q_, k_, v_, *options(b, q_).values())[0]

    def reference(q_, k_, v_, b=None, compute_dtype=None):
        return attention_ref(q_, k_, v_, *options(b, q_).values(), compute_dtype=compute_dtype)[0]

    got = run(ours, leaves, dout)
    ref = run(reference, [t.double() for t in leaves], dout.double())
    own = run(lambda *t: reference(*t, compute_dtype=dtype), leaves, dout)
    for name, a, t, r in zip(("out", "dq", "dk", "dv", "dbias"), got, own, ref):
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype} != {t.dtype}"
        assert_within_torch_error(name, a, t, r, dtype)
    return got


@pytest.mark.parametrize("kind", ["right", "left", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(backend, kind, causal):
    _need_masks(backend)
    gen = generator(0)
    for dtype in DTYPES[backend]:
        for shape in SHAPES[backend]:
            torch.manual_seed(1)
            q, k, v = qkv(*shape, dtype)
            kpm = padding_mask(kind, shape[0], shape[2], gen)
            out, *_ = check_masked(q, k, v, kpm=kpm, causal=causal)
            # The fully padded sequence: zeros, not NaN.
            assert torch.equal(out[-1], torch.zeros_like(out[-1]))


BIAS_SHAPES = {
    "full": lambda B, H, Tq, Tk: (B, H, Tq, Tk),
    "heads": lambda B, H, Tq, Tk: (1, H, Tq, Tk),  # T5's relative-position bias
    "batch": lambda B, H, Tq, Tk: (B, 1, Tq, Tk),
    "keys": lambda B, H, Tq, Tk: (B, 1, 1, Tk),  # BERT's additive padding mask
    "square": lambda B, H, Tq, Tk: (Tq, Tk),
    "head_keys": lambda B, H, Tq, Tk: (H, 1, Tk),
}


@pytest.mark.parametrize("pattern", sorted(BIAS_SHAPES))
def test_attn_bias_broadcast_and_grad(backend, pattern):
    _need_masks(backend)
    for dtype in DTYPES[backend]:
        for B, Tq, Tk, H, Hkv, D in SHAPES[backend]:
            torch.manual_seed(2)
            q, k, v = qkv(B, Tq, Tk, H, Hkv, D, dtype)
            bias = 2 * torch.randn(BIAS_SHAPES[pattern](B, H, Tq, Tk), dtype=dtype)
            check_masked(q, k, v, bias=bias)


FEATURES = {
    "causal": dict(causal=True),
    "window": dict(window_left=6, window_right=2),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25])),
    "dropout": dict(dropout_p=0.25),
    "all": dict(causal=True, window_left=9, softcap=4.0, alibi_slopes=torch.tensor([0.3, 0.1])),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_bias_and_mask_with_features(backend, feature):
    _need_masks(backend)
    gen = generator(3)
    for dtype in DTYPES[backend]:
        B, Tq, Tk, H, Hkv, D = SHAPES[backend][0]
        torch.manual_seed(4)
        q, k, v = qkv(B, Tq, Tk, H, Hkv, D, dtype)
        kw = dict(FEATURES[feature])
        if "alibi_slopes" in kw:
            kw["alibi_slopes"] = kw["alibi_slopes"][:1].repeat(H)
        bias = torch.randn(1, H, Tq, Tk, dtype=dtype)
        kpm = padding_mask("right", B, Tk, gen)
        check_masked(q, k, v, bias=bias, kpm=kpm, **kw)


def test_minus_inf_bias_rows_give_zeros(backend):
    """-inf biases exclude keys; a row whose every allowed score is -inf gets out = 0, lse =
    -inf and zero gradients (no exp(-inf - (-inf)))."""
    _need_masks(backend)
    dtype = DTYPES[backend][-1]
    B, Tq, Tk, H, Hkv, D = SHAPES[backend][0]
    torch.manual_seed(6)
    q, k, v = qkv(B, Tq, Tk, H, Hkv, D, dtype)
    bias = torch.randn(B, H, Tq, Tk, dtype=dtype)
    bias[:, :, ::3, 1::2] = float("-inf")  # some keys excluded
    bias[0, :, 2] = float("-inf")  # row 2 of sequence 0: nothing left
    bias[1, 0] = float("-inf")  # a whole head
    out, dq, dk, dv, dbias = check_masked(q, k, v, bias=bias)
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    for t in (dq, dk, dv, dbias):
        assert torch.isfinite(t).all()
    assert torch.equal(dbias[0, :, 2], torch.zeros_like(dbias[0, :, 2]))
    lse = attn_ops.attention_fwd(q, k, v, *attention_options(q, attn_bias=bias).values())[1]
    assert (lse[0, :, 2] == float("-inf")).all() and (lse[1, 0] == float("-inf")).all()


def test_public_attention_with_masks(backend):
    """fastllm.functional.attention: bias in another float dtype and any broadcastable shape,
    gradient at the bias's own shape; the same numbers as the op."""
    _need_masks(backend)
    dtype = DTYPES[backend][-1]
    B, Tq, Tk, H, Hkv, D = SHAPES[backend][0]
    torch.manual_seed(7)
    q, k, v = qkv(B, Tq, Tk, H, Hkv, D, dtype)
    bias = torch.randn(H, Tq, Tk, dtype=torch.float32, requires_grad=True)
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    kpm[0, Tk // 2:] = False
    out = F.attention(q, k, v, attn_bias=bias, key_padding_mask=kpm, causal=True)
    out.float().square().sum().backward()
    assert bias.grad is not None and bias.grad.shape == bias.shape and bias.grad.dtype == bias.dtype
    op_out = attn_ops.attention_fwd(q, k, v, *attention_options(
        q, attn_bias=bias.detach().to(dtype).expand(B, H, Tq, Tk), key_padding_mask=kpm,
        causal=True).values())[0]
    assert torch.equal(out, op_out)


# ------------------------------------------------------------------------------- errors


def _small(dtype=torch.float32):
    return qkv(2, 5, 7, 2, 1, 8, dtype)


@pytest.mark.parametrize("case", ["kpm_dtype", "kpm_shape", "kpm_type", "bias_shape",
                                  "bias_dtype", "bias_rank", "bias_packed", "kpm_packed"])
def test_mask_errors_name_the_argument(case):
    q, k, v = _small()
    packed = (q.reshape(-1, 2, 8), k.reshape(-1, 1, 8), v.reshape(-1, 1, 8))
    cu_q = torch.tensor([0, 5, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 14], dtype=torch.int32)
    calls = {
        "kpm_dtype": (lambda: F.attention(q, k, v, key_padding_mask=torch.ones(2, 7)),
                      ("key_padding_mask", "bool")),
        "kpm_shape": (lambda: F.attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
                      ("key_padding_mask", "[2, 7]")),
        "kpm_type": (lambda: F.attention(q, k, v, key_padding_mask=[[True] * 7] * 2),
                     ("key_padding_mask",)),
        "bias_shape": (lambda: F.attention(q, k, v, attn_bias=torch.zeros(2, 3, 5, 7)),
                       ("attn_bias", "(2, 2, 5, 7)")),
        "bias_dtype": (lambda: F.attention(q, k, v, attn_bias=torch.zeros(5, 7, dtype=torch.int64)),
                       ("attn_bias", "floating")),
        "bias_rank": (lambda: F.attention(q, k, v, attn_bias=torch.zeros(1, 2, 2, 5, 7)),
                      ("attn_bias",)),
        "bias_packed": (lambda: F.attention(*packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                            attn_bias=torch.zeros(5, 7)), ("attn_bias", "packed")),
        "kpm_packed": (lambda: F.attention(*packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           key_padding_mask=torch.ones(2, 7, dtype=torch.bool)),
                       ("key_padding_mask", "packed")),
    }
    fn, words = calls[case]
    with fastllm.use_backend("reference"):
        expect_clear_error(fn, *words)


@pytest.mark.parametrize("backend_name", ["reference", "native", "triton"])
def test_raw_op_mask_checks(backend_name):
    """The op's own checks (every backend, the fakes too): bias must be (B, H, Tq, Tk) in q's
    dtype, the mask (B, Tk) bool, bias_grad needs a bias."""
    q, k, v = _small()
    ops = None if backend_name == "reference" else {
        "native": attn_ops.IMPLS.native, "triton": attn_ops.IMPLS.triton}[backend_name]
    if backend_name != "reference" and ops is None:
        pytest.skip(attn_ops.IMPLS.unavailable(backend_name))

    def fwd(**kw):
        o = attention_options(q, **kw).values()
        if ops is None:
            return attn_ops.IMPLS.check("attention_fwd", q, k, v, *o)
        return ops.attention_fwd(q, k, v, *o)

    expect_clear_error(lambda: fwd(attn_bias=torch.zeros(2, 2, 5, 7, dtype=torch.float64)),
                       "attn_bias", "dtype")
    expect_clear_error(lambda: fwd(attn_bias=torch.zeros(1, 2, 5, 7)), "attn_bias", "[2, 2, 5, 7]")
    expect_clear_error(lambda: fwd(key_padding_mask=torch.ones(2, 7, dtype=torch.uint8)),
                       "key_padding_mask", "bool")
    expect_clear_error(lambda: fwd(key_padding_mask=torch.ones(7, dtype=torch.bool)),
                       "key_padding_mask", "[2, 7]")
    out = torch.zeros_like(q)
    lse = torch.zeros(2, 2, 5)
    o = list(attention_options(q).values())
    if ops is None:
        call = lambda: attn_ops.IMPLS.check("attention_bwd", out, q, k, v, out, lse, *o, True)
    else:
        call = lambda: ops.attention_bwd(out, q, k, v, out, lse, *o, True)
    expect_clear_error(call, "bias_grad", "attn_bias")


def test_opcheck_and_compile_with_masks():
    """opcheck (schema, fakes, autograd registration) and torch.compile(fullgraph=True) with
    a bias that requires grad and a padding mask, on the default backend."""
    if "native" not in MASK_BACKENDS or attn_ops.IMPLS.native is None:
        pytest.skip("attention: the native kernels take no masks yet")
    torch.manual_seed(8)
    q, k, v = qkv(2, 9, 11, 2, 1, 16, torch.float32)
    bias = torch.randn(1, 2, 9, 11).expand(2, 2, 9, 11)
    kpm = torch.rand(2, 11) > 0.3
    o = attention_options(q, attn_bias=bias, key_padding_mask=kpm, causal=True)
    torch.library.opcheck(torch.ops.fastllm.attention_fwd.default, (q, k, v, *o.values()))
    out, lse = torch.ops.fastllm.attention_fwd(q, k, v, *o.values())
    torch.library.opcheck(torch.ops.fastllm.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, *o.values(), True))

    def fn(q_, k_, v_, b_):
        return F.attention(q_, k_, v_, attn_bias=b_, key_padding_mask=kpm, causal=True)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias[:1].contiguous())]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c = compiled(*leaves)
    out_c.sum().backward()
    grads_c = [t.grad for t in leaves]
    leaves_e = [t.detach().clone().requires_grad_() for t in leaves]
    out_e = fn(*leaves_e)
    out_e.sum().backward()
    assert torch.allclose(out_c, out_e)
    for a, b in zip(grads_c, (t.grad for t in leaves_e)):
        assert torch.allclose(a, b, atol=1e-6)
