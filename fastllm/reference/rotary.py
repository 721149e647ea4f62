"""Reference rotary position embeddings (RoPE) in plain PyTorch.

Per token at position p and per head, on the first R = 2 * cos.shape[-1] features (the rest
pass through), with c = cos[p], s = sin[p] (R / 2 angles each):

    out1 = x1 * c - x2 * s,   out2 = x2 * c + x1 * s

where (x1, x2) are the features (i, i + R / 2) (NeoX / Hugging Face LLaMA's ``rotate_half``
layout, default) or (2 i, 2 i + 1) (GPT-J, ``interleaved=True``). ``conjugate=True`` rotates
by -angle (s negated): the inverse rotation, which is also the backward pass.

Computed in float32 (float64 for float64 inputs) and rounded once to x's dtype, which is what
the kernels do, so this doubles as the accuracy yardstick in tests.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def token_positions(
    x: Tensor,
    position_ids: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    position_offset: int,
) -> Tensor:
    """The int64 position of every token of x: (B, T) for x (B, T, H, D), (total,) for packed
    x (total, H, D) with cu_seqlens. ``position_ids`` None (positions ``offset + t``), (B,)
    per-sequence offsets (``offset + position_ids[b] + t``) or (B, T) positions (``offset +
    position_ids[b, t]``); t counts from each sequence's start. Not clamped."""
    if cu_seqlens is not None:
        total = x.shape[0]
        rows = torch.arange(total, device=x.device)
        cu = cu_seqlens.to(torch.int64)
        batch = cu.numel() - 1
        seq = torch.searchsorted(cu[1:], rows, right=True).clamp_(max=batch - 1)  # (total,)
        pos = rows - cu[seq]
        if position_ids is not None:
            pos = pos + position_ids.to(torch.int64)[seq]
        return pos + position_offset
    batch, seqlen = x.shape[0], x.shape[1]
    t = torch.arange(seqlen, device=x.device).expand(batch, seqlen)  # (B, T)
    if position_ids is None:
        return t + position_offset
    position_ids = position_ids.to(torch.int64)
    if position_ids.dim() == 1:
        return position_ids[:, None] + t + position_offset
    return position_ids + position_offset


def rotary_ref(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    position_offset: int = 0,
    interleaved: bool = False,
    conjugate: bool = False,
) -> Tensor:
    """x rotated (module docstring), a new tensor of x's shape and dtype, differentiable by
    autograd with respect to x. Positions outside cos's rows are clamped into them (what the
    GPU kernels do; the CPU ops refuse them before)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rotary_dim = 2 * cos.shape[-1]
    pos = token_positions(x, position_ids, cu_seqlens, position_offset)
    pos = pos.clamp(0, max(cos.shape[0] - 1, 0))
    c = cos[pos].to(acc).unsqueeze(-2)  # (..., 1, R / 2): broadcast over heads
    s = sin[pos].to(acc).unsqueeze(-2)
    if conjugate:
        s = -s
    xr = x[..., :rotary_dim].to(acc)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)
