"""Attention family, API: the torch SDPA drop-in (layouts, masks, top-left causal, GQA),
decoding with a KV cache against full attention, dropout seeded by torch's generator,
gradcheck in float64, opcheck of both ops, torch.compile(fullgraph=True) of a module that
uses attention, bad input errors that name the argument (the public functions, the emulated
CUDA ops, the Triton launchers), the registered Triton op against its launchers, and
fastllm.nn.MultiheadAttention against torch.nn.MultiheadAttention: outputs and every
gradient (inputs and parameters) with the same state_dict, every layout, projection kind and
mask kind; the need_weights=True fallback; dropout; state_dict; torch.compile; errors.

Tests that take `backend` run on the native kernels (tests/conftest.py). Tests with masks
(SDPA's attn_mask, MHA's key_padding_mask / attn_mask), which reach the kernels as attn_bias /
key_padding_mask, run on MASKED_BACKENDS: the reference always (it holds the routing of the
masks to the math), a kernel backend once tests/test_attention_masks.py lists it in
MASK_BACKENDS (until then it is skipped with that reason, never silently passed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastllm
import fastllm.functional as F
from fastllm.nn.attention import MultiheadAttention
from fastllm.ops import attention as attn_ops
from fastllm.reference import attention as ref_attention
from fastllm.reference.attention import sdpa_ref
from tests.accuracy import assert_within_torch_error
from tests.helpers import attention_options, dropout_seed, generator, qkv
from tests.test_attention_masks import MASK_BACKENDS

FAMILY = "attention"
# Where the masked tests run (the `backend` fixture skips, naming the reason, a backend that
# is not available here; need_masks skips one whose kernels do not take masks yet).
MASKED_BACKENDS = ("reference", "native")
masked_backends = pytest.mark.parametrize("backend", MASKED_BACKENDS, indirect=True)


def need_masks(backend: str) -> None:
    if backend not in MASK_BACKENDS:
        pytest.skip(
            f"attention: backend {backend!r} has no masked kernels yet (not in "
            "tests/test_attention_masks.py MASK_BACKENDS)"
        )



# --------------------------------------------------------------------------- SDPA drop-in
def _sdpa_check(query, key, value, dtype, **kw):
    q, k, v = (t.to(dtype).requires_grad_() for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sdpa_ref(qd, kd, vd, kw.get("attn_mask"), kw.get("is_causal", False), kw.get("scale"),
                   kw.get("enable_gqa", False))
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    mask = kw.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    low = TF.scaled_dot_product_attention(
        ql, kl, vl, attn_mask=mask, is_causal=kw.get("is_causal", False), scale=kw.get("scale"),
        enable_gqa=kw.get("enable_gqa", False),
    )
    low_grads = torch.autograd.grad(low, (ql, kl, vl), dout)
    assert out.shape == low.shape and out.dtype == low.dtype
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (low, *low_grads),
                             (ref, *ref_grads)):
        assert_within_torch_error(name, a, t, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,S", [(33, 33), (17, 45), (45, 17)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(backend, dtype, L, S, is_causal):
    """torch's top-left causal alignment, for L == S, L < S and L > S."""
    q, k, v = torch.randn(2, 4, L, 64), torch.randn(2, 4, S, 64), torch.randn(2, 4, S, 64)
    _sdpa_check(q, k, v, dtype, is_causal=is_causal)


def test_sdpa_layouts_scale_gqa(backend):
    _sdpa_check(torch.randn(3, 19, 32), torch.randn(3, 23, 32), torch.randn(3, 23, 32),
                torch.float32, scale=0.3)  # 3-D: one head
    _sdpa_check(torch.randn(2, 2, 4, 9, 32), torch.randn(2, 2, 4, 11, 32),
                torch.randn(2, 2, 4, 11, 32), torch.float32)  # 5-D: two batch dims
    _sdpa_check(torch.randn(2, 8, 13, 64), torch.randn(2, 2, 13, 64), torch.randn(2, 2, 13, 64),
                torch.float32, enable_gqa=True, is_causal=True)


@masked_backends
@pytest.mark.parametrize("kind", ["bool", "additive", "key_padding"])
def test_sdpa_masks(backend, kind):
    need_masks(backend)
    L, S = 21, 30
    q, k, v = torch.randn(2, 4, L, 32), torch.randn(2, 4, S, 32), torch.randn(2, 4, S, 32)
    if kind == "bool":
        mask = torch.rand(L, S) > 0.3
        mask[:, 0] = True  # torch gives NaN for fully masked rows; fastllm gives zeros
    elif kind == "additive":
        mask = torch.randn(2, 4, L, S)
    else:
        mask = torch.ones(2, 1, 1, S, dtype=torch.bool)
        mask[1, ..., 20:] = False
    _sdpa_check(q, k, v, torch.float32, attn_mask=mask)


@masked_backends
def test_sdpa_fully_masked_row_is_zero(backend):
    need_masks(backend)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    q.requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 2] == 0).all()


# SDPA's attn_mask, every broadcast shape: name -> (query, key/value, mask, enable_gqa). Every
# row keeps key 0 (torch gives NaN for a fully masked row; test_sdpa_fully_masked_rows_*).
SDPA_MASK_SHAPES = {
    "L_S": ((2, 3, 13, 16), (2, 3, 19, 16), (13, 19), False),
    "N_1_1_S": ((2, 3, 13, 16), (2, 3, 19, 16), (2, 1, 1, 19), False),
    "1_1_1_S": ((2, 3, 13, 16), (2, 3, 19, 16), (1, 1, 1, 19), False),
    "N_H_L_S": ((2, 3, 13, 16), (2, 3, 19, 16), (2, 3, 13, 19), False),
    "1_1_L_S": ((2, 3, 13, 16), (2, 3, 19, 16), (1, 1, 13, 19), False),
    "N_1_L_S": ((2, 3, 13, 16), (2, 3, 19, 16), (2, 1, 13, 19), False),
    "1_H_1_S": ((2, 3, 13, 16), (2, 3, 19, 16), (1, 3, 1, 19), False),
    "L_1": ((2, 3, 13, 16), (2, 3, 19, 16), (13, 1), False),
    "3d_N_L_S": ((2, 13, 16), (2, 19, 16), (2, 13, 19), False),
    "3d_N_1_S": ((2, 13, 16), (2, 19, 16), (2, 1, 19), False),
    "3d_L_S": ((2, 13, 16), (2, 19, 16), (13, 19), False),
    "5d_N_M_1_1_S": ((2, 2, 3, 13, 16), (2, 2, 3, 19, 16), (2, 2, 1, 1, 19), False),
    "5d_1_M_H_L_S": ((2, 2, 3, 13, 16), (2, 2, 3, 19, 16), (1, 2, 3, 13, 19), False),
    "5d_N_1_1_L_S": ((2, 2, 3, 13, 16), (2, 2, 3, 19, 16), (2, 1, 1, 13, 19), False),
    "gqa_N_1_1_S": ((2, 6, 13, 16), (2, 2, 19, 16), (2, 1, 1, 19), True),
    "gqa_N_H_L_S": ((2, 6, 13, 16), (2, 2, 19, 16), (2, 6, 13, 19), True),
}


def _sdpa_mask(shape, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A mask of ``shape``: bool (True = take part; key 0 always, varied lengths for
    (N, 1, 1, S)-like masks) or additive (finite values and -inf where the bool one is
    False)."""
    keep = torch.rand(shape, generator=gen) > 0.3
    keep[..., 0] = True
    if kind == "bool":
        return keep
    return torch.randn(shape, generator=gen, dtype=torch.float64).masked_fill(~keep, float("-inf"))


def _sdpa_masked_check(query, key, value, mask, dtype, dout=None, **kw):
    """Ours in ``dtype`` against torch's SDPA in ``dtype``, both judged against the float64
    reference (the 2x rule): out, dq, dk, dv and, for a float mask (made a leaf requiring
    grad), its gradient. Returns our (out, grads) for further checks."""
    q, k, v = (t.to(dtype) for t in (query, key, value))
    float_mask = mask.dtype != torch.bool
    m = mask.to(dtype) if float_mask else mask

    def run(fn, tensors, mask_):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        if float_mask:
            mask_ = mask_.detach().clone().requires_grad_()
            leaves.append(mask_)
        out = fn(*leaves[:3], attn_mask=mask_, **kw)
        grad = (dout if dout is not None else torch.ones_like(out)).to(out.dtype)
        return out.detach(), torch.autograd.grad(out, leaves, grad)

    torch.manual_seed(1)
    dout = dout if dout is not None else torch.randn(*q.shape[:-1], value.shape[-1])
    ours = run(F.scaled_dot_product_attention, (q, k, v), m)
    theirs = run(TF.scaled_dot_product_attention, (q, k, v), m)

    def reference(q_, k_, v_, attn_mask, **kw_):
        return sdpa_ref(q_, k_, v_, attn_mask, kw_.get("is_causal", False), kw_.get("scale"),
                        kw_.get("enable_gqa", False))

    expected = run(reference, [t.double() for t in (q, k, v)],
                   m.double() if float_mask else m)
    names = ("out", "dq", "dk", "dv", "dmask")
    for name, a, t, r in zip(names, (ours[0], *ours[1]), (theirs[0], *theirs[1]),
                             (expected[0], *expected[1])):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert_within_torch_error(name, a, t, r, dtype)
    return ours


@pytest.mark.parametrize("backend", MASKED_BACKENDS + ("triton",), indirect=True)
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("case", list(SDPA_MASK_SHAPES))
def test_sdpa_mask_broadcast_shapes_match_torch(backend, case, kind):
    """Every broadcast shape of a boolean mask (key padding, (L, S), per head ...) and of an
    additive one with its gradient, on 3-D, 4-D and 5-D inputs and with GQA."""
    need_masks(backend)
    q_shape, kv_shape, mask_shape, gqa = SDPA_MASK_SHAPES[case]
    gen = generator(3)
    q, k, v = (torch.randn(s, generator=gen) for s in (q_shape, kv_shape, kv_shape))
    mask = _sdpa_mask(mask_shape, kind, gen)
    _sdpa_masked_check(q, k, v, mask, torch.float32, enable_gqa=gqa)


@masked_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
def test_sdpa_masks_match_torch_in_dtype(backend, dtype, kind):
    """bfloat16 too, with a scale and a BERT-style padding mask ((N, 1, 1, S), varied
    lengths), a per-head boolean mask or a T5-style (1, H, L, S) bias with its gradient."""
    need_masks(backend)
    gen = generator(4)
    q, k, v = (torch.randn(3, 4, 37, 32, generator=gen) for _ in range(3))
    if kind == "key_padding":
        mask = torch.arange(37)[None, :] < torch.tensor([37, 20, 1])[:, None]
        mask = mask[:, None, None, :]  # (N, 1, 1, S)
    else:
        mask = _sdpa_mask((1, 4, 37, 37) if kind == "additive" else (3, 4, 37, 37), kind, gen)
    _sdpa_masked_check(q, k, v, mask, dtype, scale=0.2)


@masked_backends
@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
def test_sdpa_fully_masked_rows_give_zeros(backend, kind):
    """Rows with no allowed key (every entry False or -inf; a fully padded sequence) give
    zeros and zero dq, where torch gives NaN; the other rows (and dk, dv, the mask's
    gradient) follow torch's math on them within the 2x rule. torch's own error is measured
    with the fully masked rows given their keys back and no upstream gradient, which is the
    same math on every other row."""
    need_masks(backend)
    gen = generator(5)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=gen) for _ in range(3))
    if kind == "key_padding":
        mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
        mask[1] = False  # sequence 1: every key is padding
        empty = torch.zeros(2, 3, 11, dtype=torch.bool)
        empty[1] = True
    else:
        mask = _sdpa_mask((2, 3, 11, 11), "bool", gen)
        mask[0, 1, 4] = False
        mask[1, :, 7] = False
        empty = ~mask.any(dim=-1)
        if kind == "additive":
            mask = torch.randn(2, 3, 11, 11, generator=gen, dtype=torch.float64).masked_fill(
                ~mask, float("-inf"))
    dout = torch.randn(2, 3, 11, 16, generator=gen)
    float_mask = mask.dtype != torch.bool
    # ours, with an upstream gradient on the empty rows too
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    m = mask.float().requires_grad_() if float_mask else mask
    out = F.scaled_dot_product_attention(*leaves, attn_mask=m)
    grads = torch.autograd.grad(out, leaves + ([m] if float_mask else []), dout)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()
    if float_mask:
        assert (grads[3][empty] == 0).all()
    # the float64 reference (zeros on empty rows, as ours)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    m64 = mask.double().requires_grad_() if float_mask else mask
    ref_out = sdpa_ref(*leaves64, m64)
    ref_grads = torch.autograd.grad(ref_out, leaves64 + ([m64] if float_mask else []),
                                    dout.double())
    # torch's own error: the empty rows get their keys back and no upstream gradient
    if float_mask:
        given_back = torch.where(empty[..., None], torch.zeros_like(mask), mask).float()
    elif kind == "key_padding":
        given_back = mask | empty[:, :1, :, None]
    else:
        given_back = mask | empty[..., None]
    tl = [t.clone().requires_grad_() for t in (q, k, v)]
    tm = given_back.requires_grad_() if float_mask else given_back
    their_out = TF.scaled_dot_product_attention(*tl, attn_mask=tm)
    their_grads = torch.autograd.grad(
        their_out, tl + ([tm] if float_mask else []), dout.masked_fill(empty[..., None], 0))
    their_out = torch.where(empty[..., None], ref_out.float(), their_out.detach())
    names = ("out", "dq", "dk", "dv", "dmask")
    for name, a, t, r in zip(names, (out, *grads), (their_out, *their_grads),
                             (ref_out, *ref_grads)):
        if name == "dmask":  # torch's gradient on the given-back entries is not the math's
            t = torch.where(empty[..., None].expand_as(t), r.float(), t)
        assert_within_torch_error(name, a.detach(), t, r.detach(), torch.float32)


class _Spy:
    """Records what reaches the attention op (attn_bias, key_padding_mask, causal, dropout_p)
    and makes the plain paths raise: the fused path must be the one taken."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = attn_ops.attention_fwd

        def attention_fwd(q, k, v, *options):
            self.calls.append({"bias": options[13], "kpm": options[14], "causal": options[6],
                               "dropout_p": options[11], "window_right": options[8]})
            return real(q, k, v, *options)

        def plain(*args, **kwargs):
            raise AssertionError("the plain-PyTorch SDPA path ran")

        monkeypatch.setattr(attn_ops, "attention_fwd", attention_fwd)
        monkeypatch.setattr(ref_attention, "sdpa_ref", plain)
        monkeypatch.setattr(attn_ops, "_reference_sdpa_dropout", plain)

    def last(self):
        assert len(self.calls) == 1, f"expected one attention op call, got {len(self.calls)}"
        return self.calls.pop()


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_sdpa_masks_take_the_fused_path(monkeypatch, dropout_p):
    """Boolean and additive masks reach the op as key_padding_mask (B, S) or attn_bias
    costing the mask's own elements, never the plain path (dropout included)."""
    spy = _Spy(monkeypatch)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)

    def run(mask, **kw):
        with fastllm.use_backend("reference"):  # the routing is the same on every backend
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **kw)
        return spy.last()

    kpm = torch.rand(2, 1, 1, 7) > 0.5
    call = run(kpm)
    assert call["bias"] is None and call["kpm"].shape == (2, 7) and call["dropout_p"] == dropout_p
    assert torch.equal(call["kpm"], kpm[:, 0, 0, :])
    call = run(kpm[:1])  # (1, 1, 1, S): a stride-0 view over the batch
    assert call["bias"] is None and call["kpm"].shape == (2, 7) and call["kpm"].stride(0) == 0
    for shape in [(5, 7), (2, 3, 5, 7), (1, 3, 1, 7), (2, 1, 5, 7)]:
        mask = torch.rand(shape) > 0.5
        call = run(mask)
        bias = call["bias"]
        assert call["kpm"] is None and bias.shape == (2, 3, 5, 7) and bias.dtype == q.dtype
        # the mask's own elements, a stride-0 view of its broadcast dims
        assert bias.untyped_storage().nbytes() == mask.numel() * bias.element_size()
        assert torch.equal(bias == 0, mask.expand(2, 3, 5, 7))
    additive = torch.randn(1, 3, 5, 7)
    call = run(additive)
    assert call["kpm"] is None and call["bias"].data_ptr() == additive.data_ptr()
    # 3-D inputs: (N, 1, S) is a key padding mask
    with fastllm.use_backend("reference"):
        F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], attn_mask=kpm[:, 0])
    call = spy.last()
    assert call["bias"] is None and call["kpm"].shape == (2, 7)


def test_sdpa_errors(backend):
    q = torch.randn(1, 4, 8, 32)
    with pytest.raises(ValueError, match="enable_gqa"):
        F.scaled_dot_product_attention(q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32))
    with pytest.raises(ValueError, match="embedding dim 32"):
        F.scaled_dot_product_attention(q, torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16))
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool),
                                       is_causal=True)


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvcache_prefill_then_decode_matches_full_attention(backend, dtype):
    """Prefill a prompt of different length per sequence, then decode token by token: each
    step's output equals the corresponding row of full causal attention over the sequence
    (float32: to float32's rounding; bfloat16: decoding keeps p in float32 where the full
    attention's products round it to bfloat16, so both rows are held to the accuracy rule
    against the float64 row, torch's bfloat16 SDPA giving torch's own error)."""
    b, h, hkv, d, t_max = 3, 4, 2, 64, 40
    prompt = [5, 11, 1]
    steps = 6
    total = [p + steps for p in prompt]
    q_all = torch.randn(b, max(total), h, d, dtype=dtype)
    k_all = torch.randn(b, max(total), hkv, d, dtype=dtype)
    v_all = torch.randn(b, max(total), hkv, d, dtype=dtype)
    k_cache = torch.zeros(b, t_max, hkv, d, dtype=dtype)
    v_cache = torch.zeros(b, t_max, hkv, d, dtype=dtype)
    seqlens = torch.zeros(b, dtype=torch.int32)
    # Prefill sequence by sequence (different lengths), one token per step afterwards.
    for i, p in enumerate(prompt):
        sl = torch.zeros(b, dtype=torch.int32)
        F.attention_with_kvcache(q_all[i : i + 1, :p], k_cache[i : i + 1], v_cache[i : i + 1],
                                 k_all[i : i + 1, :p], v_all[i : i + 1, :p], cache_seqlens=sl[:1])
    seqlens += torch.tensor(prompt, dtype=torch.int32)
    for s in range(steps):
        pos = seqlens.long()
        idx = torch.arange(b)
        q1 = q_all[idx, pos].unsqueeze(1)
        out = F.attention_with_kvcache(q1, k_cache, v_cache, k_all[idx, pos].unsqueeze(1),
                                       v_all[idx, pos].unsqueeze(1), cache_seqlens=seqlens)
        for i in range(b):
            n = int(pos[i]) + 1
            qkv_i = [t[i : i + 1, :n] for t in (q_all, k_all, v_all)]
            full = F.attention(*qkv_i, causal=True)
            if dtype == torch.float32:
                torch.testing.assert_close(out[i, 0], full[0, -1])
                continue
            exact = TF.scaled_dot_product_attention(
                *[t.double().transpose(1, 2) for t in qkv_i], is_causal=True, enable_gqa=True)
            torch_own = TF.scaled_dot_product_attention(
                *[t.transpose(1, 2) for t in qkv_i], is_causal=True, enable_gqa=True)
            for name, row in (("decoded", out[i, 0]), ("full", full[0, -1])):
                assert_within_torch_error(name, row, torch_own[0, :, -1], exact[0, :, -1], dtype)
        seqlens += 1
    assert torch.equal(k_cache[0, : total[0]], k_all[0, : total[0]])


def test_kvcache_int_seqlens_and_errors(backend):
    q = torch.randn(2, 1, 4, 32)
    kc, vc = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 4, 32)
    out = F.attention_with_kvcache(q, kc, vc, cache_seqlens=7)
    full = F.attention(q, kc[:, :7], vc[:, :7], causal=True)
    torch.testing.assert_close(out, full)
    with pytest.raises(ValueError, match="cache_seqlens"):
        F.attention_with_kvcache(q, kc, vc)
    # The argument the caller passed is the one named (not seqused_k, which it becomes).
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] must be in \[0, 10\]"):
        F.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 11], dtype=torch.int32))


# --------------------------------------------------------------------------- autograd / compile
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(backend, causal):
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: F.attention(q, k, v, causal=causal, softcap=3.0, alibi_slopes=slopes,
                                    window_size=(4, -1)),
        (q, k, v),
    )


def test_opcheck(backend):
    q, k, v = torch.randn(2, 9, 4, 32), torch.randn(2, 13, 2, 32), torch.randn(2, 13, 2, 32)
    fwd_args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, None, 0,
                0, 0.2, True, -1, -1, 0.0, None, 0.0, None)
    torch.library.opcheck(torch.ops.fastllm.attention_fwd.default, fwd_args)
    out, lse = torch.ops.fastllm.attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                None, None, None, 0, 0, 0.2, True, -1, -1, 0.0, None, 0.0, None)
    torch.library.opcheck(torch.ops.fastllm.attention_bwd.default, bwd_args)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    cuk = torch.tensor([0, 6, 13], dtype=torch.int32)
    varlen = (q[0].detach().requires_grad_(), k[0].detach().requires_grad_(),
              v[0].detach().requires_grad_(), cu, cuk, None, 5, 7, 0.2, False, -1, -1, 0.0, None,
              0.0, None)
    torch.library.opcheck(torch.ops.fastllm.attention_fwd.default, varlen)


class _Block(torch.nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.attention(q, k, v, causal=True)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.proj(y.reshape(b, t, c) + z.transpose(1, 2).reshape(b, t, c))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    block = _Block()
    x = torch.randn(2, 24, 64, requires_grad=True)
    eager = block(x)
    eager.sum().backward()
    g_eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g_eager, rtol=1e-5, atol=1e-5)


def test_reference_backend_matches_native(backend):
    q, k, v = torch.randn(2, 11, 4, 32), torch.randn(2, 11, 2, 32), torch.randn(2, 11, 2, 32)
    native = F.attention(q, k, v, causal=True)
    with fastllm.use_backend("reference"):
        reference = F.attention(q, k, v, causal=True)
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument(backend):
    q, k, v = torch.randn(1, 4, 6, 32), torch.randn(1, 4, 4, 32), torch.randn(1, 4, 4, 32)
    with pytest.raises(RuntimeError, match=r"multiple of the number of kv heads \(k.shape\[-2\] = 4\)"):
        F.attention(q, k, v)
    with pytest.raises(RuntimeError, match="k must have q's head_dim 32, got 16"):
        F.attention(q, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16))
    with pytest.raises(RuntimeError, match=r"head_dim \(q's last dim\) must be in \[1, 256\], got 300"):
        F.attention(torch.randn(1, 2, 2, 300), torch.randn(1, 2, 2, 300), torch.randn(1, 2, 2, 300))
    with pytest.raises(TypeError, match="k must have q's dtype"):
        F.attention(q[:, :, :4], k.double(), v)
    with pytest.raises(TypeError, match="q must be float32, bfloat16, float16 or float64"):
        F.attention(q.int(), k, v)
    with pytest.raises(ValueError, match="window_size entries"):
        F.attention(q[:, :, :4], k, v, window_size=(-2, 0))
    q3, k3, v3 = torch.randn(10, 2, 32), torch.randn(12, 2, 32), torch.randn(12, 2, 32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        F.attention(q3, k3, v3, cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                    cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q\[-1\] must equal the number of packed tokens 10, got 9"):
        F.attention(q3, k3, v3, cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                    cu_seqlens_k=cu_k)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        F.attention(q3, k3, v3, cu_seqlens_q=torch.tensor([0, 4, 10]), cu_seqlens_k=cu_k)
    with pytest.raises(RuntimeError, match="max_seqlen_q = 3"):
        F.attention(q3, k3, v3, cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                    cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=7)
    with pytest.raises(RuntimeError, match=r"alibi_slopes must have shape \[2\] or \[2, 2\]"):
        F.attention(q3, k3, v3, cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                    cu_seqlens_k=cu_k, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        F.attention(q[:, :, :4], k, v, dropout_p=1.0)


# --------------------------------------------------------------------------- dropout
def test_dropout_reproducible_from_torch_seed(backend):
    q, k, v = qkv(1, 16, 16, 2, 2, 32, torch.float32)
    torch.manual_seed(7)
    a = F.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    b = F.attention(q, k, v, dropout_p=0.2)
    c = F.attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------- the kernels' own entry points (no op layer)
def test_registered_triton_op_with_autograd(triton_attention_kernels):
    """The launchers as fastllm/ops registers them (torch.library.triton_op, autograd through
    the backward op) give the launchers' own results."""
    from fastllm.ops import attention as attention_ops

    ops = attention_ops.IMPLS.triton
    if ops is None:
        pytest.skip("the Triton attention ops are not registered")
    attention_fwd, attention_bwd = triton_attention_kernels
    q, k, v = qkv(2, 19, 23, 4, 2, 32, torch.float32)
    opts = attention_options(q, causal=True, dropout_p=0.2, dropout_seed=dropout_seed(7)).values()
    out, lse = attention_fwd(q, k, v, *opts)
    dout = torch.randn_like(out)
    grads = attention_bwd(dout, q, k, v, out, lse, *opts)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op_out, op_lse = ops.attention_fwd(*leaves, *opts)
    op_out.backward(dout)
    assert torch.equal(op_out, out) and torch.equal(op_lse, lse)
    for name, leaf, grad in zip(("dq", "dk", "dv"), leaves, grads):
        assert torch.equal(leaf.grad, grad), name


def test_cuda_emu_unsupported_arguments_are_refused(emulated_attention_kernels):
    attention_fwd, attention_bwd = emulated_attention_kernels
    q, k, v = qkv(1, 8, 8, 2, 2, 64, torch.float32)
    o = attention_options(q)
    with pytest.raises(TypeError, match="float16 or bfloat16.*got q of Float"):
        attention_fwd(q, k, v, *o.values())
    q, k, v = qkv(1, 8, 8, 2, 2, 20, torch.float16)
    with pytest.raises(RuntimeError, match="multiple of 8 up to 256, got 20"):
        attention_fwd(q, k, v, *attention_options(q).values())
    out = torch.zeros_like(q)
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="multiple of 8 up to 256, got 20"):
        attention_bwd(out, q, k, v, out, lse, *attention_options(q).values())


def test_triton_rejects_bad_dtype_and_head_dim(triton_attention_kernels):
    attention_fwd, _ = triton_attention_kernels
    q, k, v = qkv(1, 4, 4, 1, 1, 16, torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention_fwd(q, k, v, *attention_options(q).values())
    q, k, v = qkv(1, 4, 4, 1, 1, 264, torch.float32)
    with pytest.raises(ValueError, match="at most 256"):
        attention_fwd(q, k, v, *attention_options(q).values())


# ===================================== fastllm.nn.MultiheadAttention vs torch.nn's own

EMBED, HEADS, BATCH, TGT, SRC = 24, 3, 2, 5, 7
KDIM, VDIM = 10, 14


def _pair(dtype=torch.float32, **kwargs):
    """(torch's module, ours) holding the same parameters."""
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **kwargs)
    ours = MultiheadAttention(EMBED, HEADS, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _seq(layout: str, length: int, features: int, dtype) -> torch.Tensor:
    shape = {
        "batch_first": (BATCH, length, features),
        "seq_first": (length, BATCH, features),
        "unbatched": (length, features),
    }[layout]
    return torch.randn(shape, dtype=dtype)


def _masks(mask: str, layout: str, src_len: int, dtype):
    """Keyword arguments (key_padding_mask / attn_mask / is_causal) for one mask kind. Key 0
    is never masked, so no query row is fully masked (torch's weights path gives NaN there)."""
    batch = 1 if layout == "unbatched" else BATCH
    kpm = torch.zeros(batch, src_len, dtype=torch.bool)
    kpm[-1, -3:] = True
    attn = torch.rand(batch * HEADS, TGT, src_len) < 0.4
    attn[..., 0] = False
    if layout == "unbatched":
        kpm = kpm[0]

    def additive(m):  # a float mask mixing -inf and finite biases
        return torch.randn(m.shape, dtype=dtype).masked_fill(m, float("-inf"))

    causal = torch.ones(TGT, src_len, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm},
        "kpm_float": {"key_padding_mask": additive(kpm)},
        "attn2d_bool": {"attn_mask": attn[0]},
        "attn2d_float": {"attn_mask": additive(attn[0])},
        "attn3d_bool": {"attn_mask": attn},
        "attn3d_float": {"attn_mask": additive(attn)},
        "both_bool": {"attn_mask": attn[0], "key_padding_mask": kpm},
        "both_float": {"attn_mask": additive(attn), "key_padding_mask": additive(kpm)},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal_kpm": {"attn_mask": causal, "is_causal": True, "key_padding_mask": kpm},
    }[mask]


def _inputs(kind: str, layout: str, dtype):
    """(query, key, value, module kwargs) for one projection kind."""
    x = _seq(layout, TGT, EMBED, dtype)
    if kind == "self":
        return x, x, x, {}
    if kind == "encoder_decoder":  # key is value: torch's split packed projection
        memory = _seq(layout, SRC, EMBED, dtype)
        return x, memory, memory, {}
    if kind == "cross":  # three different tensors of the same width
        return x, _seq(layout, SRC, EMBED, dtype), _seq(layout, SRC, EMBED, dtype), {}
    if kind == "kv_dims":  # kdim / vdim != embed_dim: separate projection weights
        key, value = _seq(layout, SRC, KDIM, dtype), _seq(layout, SRC, VDIM, dtype)
        return x, key, value, {"kdim": KDIM, "vdim": VDIM}
    raise ValueError(kind)


def _run(module, query, key, value, grad_out, **kwargs):
    """Output and the gradients of (query, key, value, *parameters) for one upstream grad.
    Inputs that are the same tensor stay the same tensor (the self-attention fast paths)."""
    leaves = {}
    for t in (query, key, value):
        if id(t) not in leaves:
            leaves[id(t)] = t.detach().clone().requires_grad_()
    q, k, v = (leaves[id(t)] for t in (query, key, value))
    module.zero_grad(set_to_none=True)
    out, weights = module(q, k, v, need_weights=False, **kwargs)
    assert weights is None
    out.backward(grad_out)
    grads = {"query": q.grad, "key": k.grad, "value": v.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def _to(kwargs, dtype):
    return {
        k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in kwargs.items()
    }


def _cast(tensors, dtype):
    """Cast keeping identity: tensors that were the same object stay one object."""
    cast = {}
    for t in tensors:
        if id(t) not in cast:
            cast[id(t)] = t.to(dtype)
    return [cast[id(t)] for t in tensors]


def _compare(kind, layout, mask, module_kwargs=None, dtype=torch.float32):
    """Ours in ``dtype`` against torch in ``dtype``, both judged against torch in float64
    (tests/accuracy.py: ours may err at most twice as much as torch itself)."""
    query, key, value, kv_kwargs = _inputs(kind, layout, torch.float64)
    src_len = key.shape[1 if layout == "batch_first" else 0]
    kwargs = _masks(mask, layout, src_len, torch.float64)
    module_kwargs = {**kv_kwargs, **(module_kwargs or {}), "batch_first": layout == "batch_first"}
    reference, _ = _pair(torch.float64, **module_kwargs)
    theirs, ours = _pair(dtype, **module_kwargs)
    theirs.load_state_dict(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    grad_out = torch.randn(query.shape, dtype=torch.float64)

    ref_out, ref_grads = _run(reference, query, key, value, grad_out, **kwargs)
    q, k, v, g = _cast([query, key, value, grad_out], dtype)
    their_out, their_grads = _run(theirs, q, k, v, g, **_to(kwargs, dtype))
    our_out, our_grads = _run(ours, q, k, v, g, **_to(kwargs, dtype))
    assert our_out.shape == their_out.shape == query.shape
    assert_within_torch_error("out", our_out, their_out, ref_out, dtype)
    assert our_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_within_torch_error(
            f"grad {name}", our_grads[name], their_grads[name], ref_grads[name], dtype
        )


LAYOUTS = ["batch_first", "seq_first", "unbatched"]
KINDS = ["self", "encoder_decoder", "cross", "kv_dims"]
MASKS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_bool",
         "attn3d_float", "both_bool", "both_float", "causal", "causal_kpm"]


# ------------------------------------------------------- outputs and gradients vs torch


def _need_masks_for(backend: str, mask: str) -> None:
    if mask != "none":
        need_masks(backend)


@masked_backends
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_torch_float32(backend, layout, kind, mask):
    _need_masks_for(backend, mask)
    _compare(kind, layout, mask)


@pytest.mark.parametrize("mask", ["none", "both_float", "causal"])
@pytest.mark.parametrize("kind", ["self", "kv_dims"])
@masked_backends
def test_matches_torch_float64(backend, kind, mask):
    _need_masks_for(backend, mask)
    _compare(kind, "seq_first", mask, dtype=torch.float64)


@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn3d_float", "causal", "causal_kpm"])
@pytest.mark.parametrize("kind", ["self", "kv_dims"])
@pytest.mark.parametrize("layout", ["batch_first", "unbatched"])
@masked_backends
def test_bias_kv_and_zero_attn(backend, layout, kind, mask):
    _need_masks_for(backend, mask)
    _compare(kind, layout, mask, {"add_bias_kv": True, "add_zero_attn": True})
    _compare(kind, layout, mask, {"add_bias_kv": True})
    _compare(kind, layout, mask, {"add_zero_attn": True})


@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn2d_float"])
@masked_backends
def test_without_bias(backend, mask):
    _need_masks_for(backend, mask)
    _compare("self", "batch_first", mask, {"bias": False})


@pytest.mark.parametrize("kpm", [False, True])
@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
@masked_backends
def test_is_causal_without_attn_mask_is_top_left_causal(backend, layout, kpm):
    """An extension: torch raises for is_causal=True without attn_mask; we apply the top-left
    causal mask, on the fused path and on the need_weights=True fallback alike."""
    _need_masks_for(backend, "kpm" if kpm else "none")
    query, key, value, _ = _inputs("cross", layout, torch.float32)
    kwargs = _masks("causal_kpm" if kpm else "causal", layout, SRC, torch.float32)
    theirs, ours = _pair(batch_first=layout == "batch_first")
    expected, expected_weights = theirs(query, key, value, **kwargs)
    kwargs.pop("attn_mask")
    out, _ = ours(query, key, value, need_weights=False, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out, weights = ours(query, key, value, **kwargs)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


@masked_backends
def test_fully_masked_query_gives_zero_attention_not_nan(backend):
    need_masks(backend)
    _, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, TGT, EMBED)
    kpm = torch.zeros(BATCH, TGT, dtype=torch.bool)
    kpm[1] = True  # every key of batch element 1 is padding
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out[1], ours.out_proj.bias.detach().expand(TGT, EMBED))
    assert torch.isfinite(out).all()


# ----------------------------------------------------- need_weights=True: torch's own path


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_need_weights_falls_back_to_torch(layout, average):
    theirs, ours = _pair(batch_first=layout == "batch_first", dropout=0.25)
    query, key, value, _ = _inputs("cross", layout, torch.float32)
    kwargs = _masks("both_bool", layout, SRC, torch.float32)
    for train in (False, True):
        theirs.train(train)
        ours.train(train)
        torch.manual_seed(1)
        expected = theirs(query, key, value, average_attn_weights=average, **kwargs)
        torch.manual_seed(1)
        got = ours(query, key, value, average_attn_weights=average, **kwargs)  # default: True
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------------------ dropout


def test_dropout_is_identity_in_eval(backend):
    theirs, ours = _pair(batch_first=True, dropout=0.5)
    theirs.eval()
    ours.eval()
    x = torch.randn(BATCH, TGT, EMBED)
    torch.testing.assert_close(
        ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0]
    )


@masked_backends
@pytest.mark.parametrize("mask", ["none", "kpm_bool"])
def test_dropout_in_training(backend, mask):
    """Deterministic under torch.manual_seed, different across draws, and unbiased: the
    mean over many draws converges to the eval output (inverted dropout)."""
    _need_masks_for(backend, mask)
    _, ours = _pair(batch_first=True, dropout=0.3)
    x = torch.randn(BATCH, TGT, EMBED)
    kwargs = _masks(mask, "batch_first", TGT, torch.float32)
    ours.eval()
    expected = ours(x, x, x, need_weights=False, **kwargs)[0].detach()
    ours.train()
    with torch.no_grad():
        torch.manual_seed(7)
        first = ours(x, x, x, need_weights=False, **kwargs)[0]
        torch.manual_seed(7)
        again = ours(x, x, x, need_weights=False, **kwargs)[0]
        draws = torch.stack([ours(x, x, x, need_weights=False, **kwargs)[0] for _ in range(200)])
    assert first.shape == expected.shape
    assert torch.equal(first, again)
    assert not torch.allclose(first, expected)
    assert not torch.equal(draws[0], draws[1])
    stderr = draws.std(dim=0) / draws.shape[0] ** 0.5
    assert ((draws.mean(dim=0) - expected).abs() <= 5 * stderr + 1e-5).all()


def test_dropout_backward_in_training(backend):
    """Training-mode backward runs and stays finite (the kernel replays its dropout mask
    from the saved seed)."""
    _, ours = _pair(batch_first=True, dropout=0.2)
    ours.train()
    x = torch.randn(BATCH, TGT, EMBED, requires_grad=True)
    out, _ = ours(x, x, x, need_weights=False)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


# --------------------------------------------------------------- drop-in: state, repr


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"kdim": KDIM, "vdim": VDIM}, {"add_bias_kv": True},
     {"batch_first": True, "dropout": 0.1, "add_zero_attn": True}],
)
def test_drop_in_state_dict_repr_isinstance(kwargs):
    theirs, ours = _pair(**kwargs)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    fresh_torch = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    fresh_torch.load_state_dict(ours.state_dict())  # ours -> torch
    fresh_ours = MultiheadAttention(EMBED, HEADS, **kwargs)
    fresh_ours.load_state_dict(fresh_torch.state_dict())  # torch -> ours
    for name, value in theirs.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[name], value)
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout",
                 "batch_first", "add_zero_attn", "_qkv_same_embed_dim"):
        assert getattr(ours, attr) == getattr(theirs, attr)


# ------------------------------------------------------------------------ torch.compile


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(EMBED)
        self.attn = MultiheadAttention(EMBED, HEADS, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        h = self.norm(x)
        if key_padding_mask is None:
            h, _ = self.attn(h, h, h, need_weights=False, is_causal=True)
        else:
            h, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        return x + h


@pytest.mark.parametrize("masked", [False, True])
def test_mha_torch_compile_fullgraph_matches_eager(backend, masked):
    if masked:
        need_masks(backend)
    torch._dynamo.reset()
    model = Block()
    x = torch.randn(BATCH, TGT, EMBED, requires_grad=True)
    kpm = None
    if masked:
        kpm = _masks("kpm_bool", "batch_first", TGT, torch.float32)["key_padding_mask"]
    eager = model(x, kpm)
    eager.sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x, kpm)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for got, expected in zip([x.grad] + [p.grad for p in model.parameters()], grads):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------- errors


def test_constructor_errors_are_torchs():
    with pytest.raises(AssertionError, match="divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="greater than 0"):
        MultiheadAttention(0, 2)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("query_4d", AssertionError, "unbatched 2D or batched 3D"),
        ("key_2d", AssertionError, "expected `key` and `value`"),
        ("query_features", AssertionError, "query must have 24 features"),
        ("key_value_length", AssertionError, "do not match value"),
        ("batch", AssertionError, "batch size"),
        ("int_mask", AssertionError, "only bool and floating types of attn_mask"),
        ("attn_mask_shape", RuntimeError, "should be"),
        ("attn_mask_4d", RuntimeError, "dimension 4 is not supported"),
        ("kpm_shape", AssertionError, "key_padding_mask must be"),
    ],
)
def test_forward_errors(case, error, match):
    _, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, TGT, EMBED)
    args, kwargs = [x, x, x], {}
    if case == "query_4d":
        args = [x[None]] * 3
    elif case == "key_2d":
        args = [x, x[0], x[0]]
    elif case == "query_features":
        args = [x[..., :-1], x, x]
    elif case == "key_value_length":
        args = [x, x, x[:, :-1]]
    elif case == "batch":
        args = [x, x[:1], x[:1]]
    elif case == "int_mask":
        kwargs = {"attn_mask": torch.zeros(TGT, TGT, dtype=torch.int64)}
    elif case == "attn_mask_shape":
        kwargs = {"attn_mask": torch.zeros(TGT, TGT + 1, dtype=torch.bool)}
    elif case == "attn_mask_4d":
        kwargs = {"attn_mask": torch.zeros(1, 1, TGT, TGT, dtype=torch.bool)}
    elif case == "kpm_shape":
        kwargs = {"key_padding_mask": torch.zeros(BATCH, TGT + 1, dtype=torch.bool)}
    with pytest.raises(error, match=match):
        ours(*args, need_weights=False, **kwargs)


@masked_backends
def test_mismatched_mask_types_warn_like_torch(backend):
    need_masks(backend)
    _, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, TGT, EMBED)
    kwargs = {
        "attn_mask": torch.zeros(TGT, TGT),
        "key_padding_mask": torch.zeros(BATCH, TGT, dtype=torch.bool),
    }
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ours(x, x, x, need_weights=False, **kwargs)


@pytest.mark.parametrize("mask", MASKS + ["causal_kpm_hint"])
@pytest.mark.parametrize("layout", ["batch_first", "unbatched"])
def test_mha_masks_take_the_fused_path(monkeypatch, layout, mask):
    """Every mask kind reaches the op as the kernels' key_padding_mask (N, S) (a boolean
    key_padding_mask, negated) and / or an attn_bias of the attn_mask's own size, never the
    plain path; with torch's is_causal rules (the hint alone without key_padding_mask)."""
    spy = _Spy(monkeypatch)
    _, ours = _pair(batch_first=layout == "batch_first")
    x = _seq(layout, TGT, EMBED, torch.float32)
    kwargs = _masks("causal_kpm" if mask == "causal_kpm_hint" else mask, layout, TGT,
                    torch.float32)
    if mask == "causal_kpm_hint":  # fastllm's extension: no attn_mask
        kwargs.pop("attn_mask")
    with fastllm.use_backend("reference"):
        ours(x, x, x, need_weights=False, **kwargs)
    call = spy.last()
    kpm, attn = kwargs.get("key_padding_mask"), kwargs.get("attn_mask")
    if kpm is not None and kpm.dtype == torch.bool:
        assert torch.equal(call["kpm"], ~kpm.reshape(call["kpm"].shape))
    else:
        assert call["kpm"] is None
    causal_hint = kwargs.get("is_causal", False) and (kpm is None or attn is None)
    assert call["causal"] == causal_hint
    bias = call["bias"]
    if attn is None or causal_hint:
        expected = 0 if kpm is None or kpm.dtype == torch.bool else kpm.numel()
    else:
        expected = attn.numel() if kpm is None or kpm.dtype == torch.bool else None
    if expected == 0:
        assert bias is None
    elif expected is not None:  # (float key padding mask + attn_mask: summed, their broadcast)
        assert bias.untyped_storage().nbytes() == expected * bias.element_size()


def test_masked_sdpa_and_mha_trace_fullgraph():
    """The mask routing (shape logic only, no values read) traces under
    torch.compile(fullgraph=True), a float mask's gradient included; on the reference backend
    (aot_eager), since it runs wherever the kernels take masks or not."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 3, 6, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 6, 6, requires_grad=True)
    kpm = torch.rand(2, 1, 1, 6) > 0.3
    kpm[..., 0] = True

    def fn(q, k, v, bias, kpm):
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                + F.scaled_dot_product_attention(q, k, v, attn_mask=kpm))

    with fastllm.use_backend("reference"):
        eager = fn(q, k, v, bias, kpm)
        grads = torch.autograd.grad(eager.sum(), (q, k, v, bias))
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out = compiled(q, k, v, bias, kpm)
        got = torch.autograd.grad(out.sum(), (q, k, v, bias))
    torch.testing.assert_close(out, eager)
    for a, b in zip(got, grads):
        torch.testing.assert_close(a, b)
    # the module: boolean key_padding_mask and attn_mask (a bias) at once (mixed mask types
    # would trace torch's deprecation warning, which dynamo cannot)
    torch._dynamo.reset()
    _, mha = _pair(batch_first=True)
    x = torch.randn(BATCH, TGT, EMBED)
    kwargs = _masks("both_bool", "batch_first", TGT, torch.float32)

    def module_call(x, key_padding_mask, attn_mask):
        return mha(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                   need_weights=False)[0]

    with fastllm.use_backend("reference"):
        eager = module_call(x, kwargs["key_padding_mask"], kwargs["attn_mask"])
        compiled = torch.compile(module_call, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(
            compiled(x, kwargs["key_padding_mask"], kwargs["attn_mask"]), eager)


@pytest.mark.skipif(attn_ops.IMPLS.native is None, reason="fastllm._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_attention_leaves_torch_gemms_unaffected(dtype):
    """bfloat16 (float16) attention on the CPU runs on AMX tiles where the CPU has AMX-BF16
    (AMX-FP16); it configures the tile registers of its threads and must hand them back, so
    torch's own GEMMs in that dtype (oneDNN, on the same threads and, where the CPU has AMX,
    the same tiles) give the same bits before, between and after attention calls, forward
    and backward. (The C++ test attention_amx_restores_tile_configuration checks the
    configuration itself.)"""
    gen = generator(0)
    a = torch.randn(96, 200, generator=gen).to(dtype)
    b = torch.randn(200, 136, generator=gen).to(dtype)
    expected = a @ b
    q, k, v = (torch.randn(2, 150, 4, 64, generator=gen).to(dtype).requires_grad_()
               for _ in range(3))
    for causal in (False, True):
        out = F.attention(q, k, v, causal=causal)
        assert torch.equal(a @ b, expected), f"torch's GEMM changed after attention ({causal=})"
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert torch.equal(a @ b, expected), f"torch's GEMM changed after backward ({causal=})"
        assert all(torch.isfinite(g).all() for g in grads)
