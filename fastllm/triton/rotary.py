"""Rotary position embeddings (RoPE) in Triton: one kernel for q and k (or one x), forward
and backward, and the launchers of the four schemas.

Math (csrc/rotary/rotary.h), per token at position p and head, in float32:
    out1 = x1 c - x2 s,  out2 = x2 c + x1 s,  c = cos[p, i], s = sin[p, i] (-sin: CONJUGATE)
    (x1, x2) = features (i, i + R / 2) (NeoX, default) or (2 i, 2 i + 1) (INTERLEAVED)
    features R..D-1 copied when out is not x (COPY_REST).
These launchers mirror the schemas of csrc/schemas.h (fastllm::rotary_fwd, rotary_fwd_inplace,
rotary_qk_fwd, rotary_qk_fwd_inplace); backward is the same op with conjugate=True.

A program owns BLOCK_M (row, head) items of q or of k (item = row * heads + head;
program_id(0) runs over q's blocks of items, then k's: GQA's q and k in one launch), each
item a (BLOCK_HALF,) vector of pairs with its own position's angles. Each token's position is
computed by the launcher with torch (fastllm/reference/rotary.py: token_positions, the
per-sequence offsets of cu_seqlens included) and clamped into cos's rows, so a bad position
never reads outside cos / sin (the CPU ops refuse it before: OpFamily.value_checks).
ROUND_BF16_IN_SOFTWARE: set only under TRITON_INTERPRET=1; see fastllm/triton/_common.py.

Shapes: x, q (B, T, H, D), k (B, T, Hkv, D) or packed (total, heads, D); cos, sin (max_T, R / 2).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastllm.reference.rotary import token_positions
from fastllm.triton._common import interpreted, round_to_dtype

# (row, head) items per program: 4 elements per thread on a GPU (8 warps; larger tiles or
# fewer warps spilled on sm_80 or sm_90, which tests/test_rotary.py checks); the interpreter
# pays per executed op, not per element, and gets large tiles (fewer programs).
TILE_ELEMENTS = 1024
NUM_WARPS = 8
_INTERPRETER_TILE_ELEMENTS = 1 << 16


@triton.jit
def _rotate_items(
    in_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    item0,  # first (row, head) item of this program: item = row * heads + head
    rows,
    heads,
    seqlen,
    stride_in_b, stride_in_t, stride_in_h,
    stride_out_b, stride_out_t, stride_out_h,
    stride_cos_row,
    stride_sin_row,
    half,  # R / 2
    head_dim,  # D
    CONJUGATE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_REST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """Rotates BLOCK_M (row, head) items of one operand (and copies their features R..D-1)."""
    item = item0 + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = item < rows * heads
    r = item // heads
    h = item - r * heads
    b = r // seqlen
    t = r - b * seqlen
    pos = tl.load(pos_ptr + r, mask=mask_m, other=0)
    i = tl.arange(0, BLOCK_HALF)
    mask = mask_m[:, None] & (i < half)[None, :]
    c = tl.load(cos_ptr + pos[:, None] * stride_cos_row + i[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptr + pos[:, None] * stride_sin_row + i[None, :], mask=mask, other=0.0)
    c = c.to(tl.float32)
    s = s.to(tl.float32)
    if CONJUGATE:
        s = -s
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    src = in_ptr + (b * stride_in_b + t * stride_in_t + h * stride_in_h)[:, None]
    dst = out_ptr + (b * stride_out_b + t * stride_out_t + h * stride_out_h)[:, None]
    x1 = tl.load(src + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    out1 = round_to_dtype(x1 * c - x2 * s, dtype, ROUND_BF16_IN_SOFTWARE)
    out2 = round_to_dtype(x2 * c + x1 * s, dtype, ROUND_BF16_IN_SOFTWARE)
    tl.store(dst + i1[None, :], out1, mask=mask)
    tl.store(dst + i2[None, :], out2, mask=mask)
    if COPY_REST:
        j = 2 * half + tl.arange(0, BLOCK_REST)
        mask_rest = mask_m[:, None] & (j < head_dim)[None, :]
        rest = tl.load(src + j[None, :], mask=mask_rest, other=0.0)
        tl.store(dst + j[None, :], rest, mask=mask_rest)


@triton.jit
def rotary_kernel(
    q_ptr,  # (B, T, H, D), strides stride_q_*
    q_out_ptr,  # q_ptr itself when in place
    k_ptr,  # (B, T, Hkv, D); q_ptr with k_heads = 0 for the one-tensor op
    k_out_ptr,
    cos_ptr,  # (max_T, R / 2), row stride stride_cos_row
    sin_ptr,
    pos_ptr,  # (rows,) int64, clamped into [0, max_T)
    rows,  # B T (or total)
    seqlen,  # T (packed: total, with batch strides 0)
    stride_q_b, stride_q_t, stride_q_h,
    stride_qo_b, stride_qo_t, stride_qo_h,
    stride_k_b, stride_k_t, stride_k_h,
    stride_ko_b, stride_ko_t, stride_ko_h,
    stride_cos_row,
    stride_sin_row,
    q_heads,
    k_heads,
    q_blocks,  # programs of q: program_id(0) < q_blocks rotates q, the others k
    half,
    head_dim,
    CONJUGATE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_REST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """BLOCK_M (row, head) items of q or of k (module docstring)."""
    pid = tl.program_id(0)
    if pid < q_blocks:
        _rotate_items(
            q_ptr, q_out_ptr, cos_ptr, sin_ptr, pos_ptr, pid.to(tl.int64) * BLOCK_M, rows,
            q_heads, seqlen, stride_q_b, stride_q_t, stride_q_h, stride_qo_b, stride_qo_t,
            stride_qo_h, stride_cos_row, stride_sin_row, half, head_dim, CONJUGATE, INTERLEAVED,
            COPY_REST, BLOCK_M, BLOCK_HALF, BLOCK_REST, ROUND_BF16_IN_SOFTWARE,
        )
    else:
        _rotate_items(
            k_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, (pid - q_blocks).to(tl.int64) * BLOCK_M,
            rows, k_heads, seqlen, stride_k_b, stride_k_t, stride_k_h, stride_ko_b, stride_ko_t,
            stride_ko_h, stride_cos_row, stride_sin_row, half, head_dim, CONJUGATE, INTERLEAVED,
            COPY_REST, BLOCK_M, BLOCK_HALF, BLOCK_REST, ROUND_BF16_IN_SOFTWARE,
        )


# ------------------------------------------------------------------------ launchers


def _strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; packed tensors have no batch dim (stride 0)."""
    return (0, t.stride(0), t.stride(1)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _unit_features(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _launch(q, q_out, k, k_out, cos, sin, position_ids, cu_seqlens, position_offset,
            interleaved, conjugate, copy_rest):
    packed = cu_seqlens is not None
    rows = q.shape[0] if packed else q.shape[0] * q.shape[1]
    q_heads = q.shape[-2]
    k_heads = 0 if k is None else k.shape[-2]
    if rows == 0 or q.shape[-1] == 0 or q_heads + k_heads == 0:
        return
    if k is None:
        k, k_out = q, q_out
    cos = cos if cos.shape[1] <= 1 or cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.shape[1] <= 1 or sin.stride(1) == 1 else sin.contiguous()
    pos = token_positions(q, position_ids, cu_seqlens, position_offset)
    pos = pos.clamp(0, cos.shape[0] - 1).reshape(-1).contiguous()  # (rows,)
    half = cos.shape[1]
    head_dim = q.shape[-1]
    block_half = triton.next_power_of_2(half)
    tile = _INTERPRETER_TILE_ELEMENTS if interpreted() else TILE_ELEMENTS
    block_m = min(max(1, tile // block_half), triton.next_power_of_2(rows * max(q_heads, k_heads)))
    q_blocks = triton.cdiv(rows * q_heads, block_m)
    grid = (q_blocks + triton.cdiv(rows * k_heads, block_m),)
    seqlen = q.shape[0] if packed else q.shape[1]
    options = dict(
        CONJUGATE=conjugate, INTERLEAVED=interleaved, COPY_REST=copy_rest and head_dim > 2 * half,
        BLOCK_M=block_m, BLOCK_HALF=block_half,
        BLOCK_REST=triton.next_power_of_2(max(head_dim - 2 * half, 1)),
        ROUND_BF16_IN_SOFTWARE=interpreted(),
    )
    if not interpreted():
        options["num_warps"] = NUM_WARPS
    torch.library.wrap_triton(rotary_kernel)[grid](
        q, q_out, k, k_out, cos, sin, pos, rows, seqlen,
        *_strides(q, packed), *_strides(q_out, packed), *_strides(k, packed),
        *_strides(k_out, packed), cos.stride(0), sin.stride(0), q_heads, k_heads, q_blocks,
        half, head_dim, **options,
    )


def rotary_fwd(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], position_offset: int, interleaved: bool, conjugate: bool,
) -> torch.Tensor:
    """fastllm::rotary_fwd -> out: x rotated, x's shape, contiguous."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_unit_features(x), out, None, None, cos, sin, position_ids, cu_seqlens,
            position_offset, interleaved, conjugate, True)
    return out


def rotary_fwd_inplace(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], position_offset: int, interleaved: bool, conjugate: bool,
) -> None:
    """fastllm::rotary_fwd_inplace: x rotated in place."""
    work = _unit_features(x)
    _launch(work, work, None, None, cos, sin, position_ids, cu_seqlens, position_offset,
            interleaved, conjugate, False)
    if work is not x:
        x.copy_(work)


def rotary_qk_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    position_offset: int, interleaved: bool, conjugate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastllm::rotary_qk_fwd -> (q_out, k_out): q and k rotated in one launch, contiguous."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(_unit_features(q), q_out, _unit_features(k), k_out, cos, sin, position_ids,
            cu_seqlens, position_offset, interleaved, conjugate, True)
    return q_out, k_out


def rotary_qk_fwd_inplace(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    position_offset: int, interleaved: bool, conjugate: bool,
) -> None:
    """fastllm::rotary_qk_fwd_inplace: q and k rotated in place, in one launch."""
    q_work, k_work = _unit_features(q), _unit_features(k)
    _launch(q_work, q_work, k_work, k_work, cos, sin, position_ids, cu_seqlens, position_offset,
            interleaved, conjugate, False)
    if q_work is not q:
        q.copy_(q_work)
    if k_work is not k:
        k.copy_(k_work)
