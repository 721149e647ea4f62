"""Attention family, API: the torch SDPA drop-in (layouts, masks, top-left causal, GQA),
decoding with a KV cache against full attention, gradcheck in float64, opcheck of both ops,
torch.compile(fullgraph=True) of a module that uses attention, and bad input errors that
name the argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastllm
import fastllm.functional as F
from fastllm.ops import attention as attn_ops
from fastllm.reference.attention import attention_ref, sdpa_ref
from tests.accuracy import assert_within_torch_error

pytestmark = pytest.mark.skipif(attn_ops.IMPLS.native is None, reason="fastllm._C is not built")


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
def test_sdpa_matches_torch(dtype, L, S, is_causal):
    """torch's top-left causal alignment, for L == S, L < S and L > S."""
    q, k, v = torch.randn(2, 4, L, 64), torch.randn(2, 4, S, 64), torch.randn(2, 4, S, 64)
    _sdpa_check(q, k, v, dtype, is_causal=is_causal)


def test_sdpa_layouts_scale_gqa():
    _sdpa_check(torch.randn(3, 19, 32), torch.randn(3, 23, 32), torch.randn(3, 23, 32),
                torch.float32, scale=0.3)  # 3-D: one head
    _sdpa_check(torch.randn(2, 2, 4, 9, 32), torch.randn(2, 2, 4, 11, 32),
                torch.randn(2, 2, 4, 11, 32), torch.float32)  # 5-D: two batch dims
    _sdpa_check(torch.randn(2, 8, 13, 64), torch.randn(2, 2, 13, 64), torch.randn(2, 2, 13, 64),
                torch.float32, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "additive", "key_padding"])
def test_sdpa_masks(kind):
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


def test_sdpa_fully_masked_row_is_zero():
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    q.requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 2] == 0).all()


def test_sdpa_errors():
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
def test_kvcache_decode_matches_full_attention(dtype):
    """Prefill a prompt of different length per sequence, then decode token by token: each
    step's output equals the corresponding row of full causal attention over the sequence."""
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
            full = F.attention(q_all[i : i + 1, :n], k_all[i : i + 1, :n], v_all[i : i + 1, :n],
                               causal=True)
            torch.testing.assert_close(out[i, 0], full[0, -1])
        seqlens += 1
    assert torch.equal(k_cache[0, : total[0]], k_all[0, : total[0]])


def test_kvcache_int_seqlens_and_errors():
    q = torch.randn(2, 1, 4, 32)
    kc, vc = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 4, 32)
    out = F.attention_with_kvcache(q, kc, vc, cache_seqlens=7)
    full = F.attention(q, kc[:, :7], vc[:, :7], causal=True)
    torch.testing.assert_close(out, full)
    with pytest.raises(ValueError, match="cache_seqlens"):
        F.attention_with_kvcache(q, kc, vc)
    with pytest.raises(RuntimeError, match=r"seqused_k\[1\] must be in \[0, 10\]"):
        F.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 11], dtype=torch.int32))


# --------------------------------------------------------------------------- autograd / compile
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: F.attention(q, k, v, causal=causal, softcap=3.0, alibi_slopes=slopes,
                                    window_size=(4, -1)),
        (q, k, v),
    )


def test_opcheck():
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


def test_torch_compile_fullgraph():
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


def test_reference_backend_matches_native():
    q, k, v = torch.randn(2, 11, 4, 32), torch.randn(2, 11, 2, 32), torch.randn(2, 11, 2, 32)
    native = F.attention(q, k, v, causal=True)
    with fastllm.use_backend("reference"):
        reference = F.attention(q, k, v, causal=True)
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
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
