"""Reference attention in plain PyTorch: every feature of the fused kernels, written for
clarity (it forms the full (Tq, Tk) score matrix per sequence). Used by the tests, the
benchmarks and as the ``"reference"`` backend; differentiable by autograd.

The contract it implements is csrc/attention/attention.h's (the kernels' single source of
truth), per sequence b, query head h, kv head h // (H // Hkv), query row i, key j:
    s_ij = scale * <q_i, k_j>;  s <- softcap * tanh(s / softcap) if softcap > 0
    s_ij -= slope_{b,h} * |i + Tk_b - Tq_b - j|                    (ALiBi, if given)
    s_ij += attn_bias[b, h, i, j]                                  (additive bias, if given)
    allowed(i, j): key_padding_mask[b, j] (if given) and lo(i) <= j <= hi(i),
    bottom-right aligned (d = Tk_b - Tq_b):
        lo = i + d - window_left (0 if window_left < 0),
        hi = i + d + window_right (Tk_b - 1 if window_right < 0; causal caps it at i + d)
    lse_i = logsumexp_j s_ij;  p = softmax(s);  out_i = sum_j z_ij p_ij v_j
with z_ij = keep_ij / (1 - dropout_p) (1 without dropout) and keep_ij from
``dropout_keep_mask`` (the same integer hash as every backend). A row with no allowed key
gives out = 0 and lse = -inf, and no NaN in any gradient.

Shapes: padded q (B, Tq, H, D), k / v (B, Tk, Hkv, D), lse (B, H, Tq); packed (varlen)
q (total_q, H, D), k / v (total_k, Hkv, D) with int32 cu_seqlens (B + 1,), lse (H, total_q).
Arithmetic in float32 (float64 for float64 inputs); out is returned in q's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- dropout hash
def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix(x: Tensor) -> Tensor:
    """The "lowbias32" integer mixer of attention.h, on int64 tensors holding uint32s."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    t = p * 4294967296.0
    return 4294967295 if t >= 4294967295.0 else int(t)


def dropout_keep_mask(
    seed: Tensor, b: int, num_heads: int, seqlen_q: int, seqlen_k: int
) -> Tensor:
    """keep (num_heads, seqlen_q, seqlen_k) bool for sequence b; ``seed`` an int64 tensor of
    one element. Mirrors dropout_head_key / row_key / col_key / keep of attention.h; the
    threshold is applied by the caller (``dropout_threshold``)."""
    dev = seed.device
    s = seed.reshape(()).to(torch.int64)
    seed_lo = s & _MASK32
    seed_hi = (s >> 32) & _MASK32
    k0 = _mix(seed_lo ^ _mix(seed_hi))
    heads = torch.arange(num_heads, device=dev, dtype=torch.int64) + b * num_heads
    head_key = _mix(k0 ^ (heads & _MASK32))  # (H,)
    rows = torch.arange(seqlen_q, device=dev, dtype=torch.int64)
    row_key = _mix(head_key[:, None] ^ rows[None, :])  # (H, Tq)
    cols = torch.arange(seqlen_k, device=dev, dtype=torch.int64)
    col_key = _mix(cols ^ 0x9E3779B9)  # (Tk,)
    return _mix(row_key[:, :, None] ^ col_key[None, None, :])  # (H, Tq, Tk) hashes


# --------------------------------------------------------------------------- attention
def _allowed(tq: int, tk: int, causal: bool, window_left: int, window_right: int, device) -> Tensor:
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    d = tk - tq
    right = window_right
    if causal:
        right = 0 if right < 0 else min(right, 0)
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if window_left >= 0:
        allowed &= j >= i + d - window_left
    if right >= 0:
        allowed &= j <= i + d + right
    return allowed


def _sequence(
    q: Tensor,  # (Tq_b, H, D) in acc dtype
    k: Tensor,  # (Tk_b, Hkv, D)
    v: Tensor,
    b: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    slopes: Optional[Tensor],  # (H,) or None
    dropout_p: float,
    dropout_seed: Optional[Tensor],
    bias: Optional[Tensor] = None,  # (H, Tq, Tk) in acc dtype, or None
    key_mask: Optional[Tensor] = None,  # (Tk,) bool, or None
) -> tuple[Tensor, Tensor]:
    tq, h, _ = q.shape
    tk, hkv, _ = k.shape
    group = h // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = softmax_scale * torch.einsum("ihd,jhd->hij", q, k)  # (H, Tq, Tk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        dist = (i + (tk - tq) - j).abs().to(s.dtype)
        s = s - slopes.to(s.dtype)[:, None, None] * dist
    if bias is not None:
        s = s + bias
    allowed = _allowed(tq, tk, causal, window_left, window_right, q.device)
    if key_mask is not None:
        allowed = allowed & key_mask[None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    # Softmax with fully-masked rows made safe for autograd: shift by a detached finite max.
    if tk == 0:  # no key at all: amax has nothing to reduce
        m = s.new_zeros(h, tq, 1)
    else:
        m = s.amax(dim=-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    has_key = l > 0
    l_safe = torch.where(has_key, l, torch.ones_like(l))
    p = e / l_safe
    lse = torch.where(has_key, m + torch.log(l_safe), torch.full_like(l, float("-inf")))
    if dropout_p > 0:
        keep = dropout_keep_mask(dropout_seed, b, h, tq, tk) >= dropout_threshold(dropout_p)
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    out = torch.einsum("hij,jhd->ihd", p, v)
    return out, lse.squeeze(-1)  # (Tq, H, D), (H, Tq)


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    *,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) for the arguments of ``torch.ops.fastllm.attention_fwd`` (same order).
    ``attn_bias`` (B, H, Tq, Tk) (any strides) and ``key_padding_mask`` (B, Tk) bool apply to
    padded batches only. ``compute_dtype`` overrides the arithmetic dtype (tests use q's own low-precision dtype
    to measure "PyTorch's own error" in it)."""
    acc = compute_dtype or _acc(q)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if dropout_p > 0 and dropout_seed is None:
        raise ValueError("attention_ref: dropout_p > 0 needs dropout_seed")
    packed = cu_seqlens_q is not None
    if packed:
        batch = cu_seqlens_q.numel() - 1
        cq = cu_seqlens_q.tolist()
        ck = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    else:
        batch = q.shape[0]
    used = seqused_k.tolist() if seqused_k is not None else None
    num_heads = q.shape[-2]
    outs, lses = [], []
    for b in range(batch):
        if packed:
            qb = q[cq[b] : cq[b + 1]]
            kb, vb = (k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]) if ck else (k[b], v[b])
        else:
            qb, kb, vb = q[b], k[b], v[b]
        bias_b = attn_bias[b].to(acc) if attn_bias is not None else None
        mask_b = key_padding_mask[b] if key_padding_mask is not None else None
        if used is not None:
            kb, vb = kb[: used[b]], vb[: used[b]]
            bias_b = bias_b[..., : used[b]] if bias_b is not None else None
            mask_b = mask_b[: used[b]] if mask_b is not None else None
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        out, lse = _sequence(
            qb.to(acc), kb.to(acc), vb.to(acc), b, softmax_scale, causal, window_left,
            window_right, softcap, slopes, dropout_p, dropout_seed, bias_b, mask_b,
        )
        outs.append(out)
        lses.append(lse)
    if packed:
        out = torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape, dtype=acc)
        lse = torch.cat(lses, dim=1) if lses else q.new_zeros((num_heads, 0), dtype=acc)
    else:
        out = torch.stack(outs) if outs else q.new_zeros(q.shape, dtype=acc)
        lse = torch.stack(lses) if lses else q.new_zeros((0, num_heads, q.shape[1]), dtype=acc)
    return out.to(q.dtype), lse


def sdpa_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch's scaled_dot_product_attention semantics ((B, H, L, S) layout, top-left causal,
    boolean "True = take part" or additive masks) in the acc dtype, except that a query row
    whose keys are all masked gives zeros (torch's math path gives NaN)."""
    acc = _acc(query)
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    s = scale * (q @ k.transpose(-2, -1))
    L, S = q.shape[-2], k.shape[-2]
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask.to(acc)
    s = s.masked_fill(~allowed, float("-inf"))
    if S == 0:  # no keys: every row gets zeros (as a fully masked row)
        return (s.sum(dim=-1, keepdim=True) * v.sum(dim=-2, keepdim=True)).to(query.dtype)
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))
    return (p @ v).to(query.dtype)
