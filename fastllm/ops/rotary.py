"""Rotary position embeddings (RoPE): the public functions, their fake and autograd rules,
their Triton ops.

Per token at position p and per head, the first R = rotary_dim features of x are rotated
pairwise by the angles of the caches ``cos[p]``, ``sin[p]`` (R / 2 each); the other D - R
features pass through (partial rotary: GPT-NeoX, Phi):

    out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin

with the pairs (x1, x2) = features (i, i + R / 2) (NeoX / Hugging Face LLaMA's
``rotate_half``, default) or (2 i, 2 i + 1) (GPT-J, ``interleaved=True``). The rotation is
orthogonal: backward is the same kernel rotating by the opposite angle (``conjugate=True``,
sin negated), so nothing is saved for backward but cos, sin and the positions.

Schemas: csrc/schemas.h (FASTLLM_ROTARY_SCHEMAS): ``rotary_fwd`` (one tensor),
``rotary_qk_fwd`` (q and k in one pass, GQA allowed) and their mutating ``_inplace`` twins
(``Tensor(a!)``). Kernels: csrc/rotary/ (C++ CPU, CUDA), fastllm/triton/rotary.py (Triton);
reference: fastllm/reference/rotary.py. The backends and their choice:
fastllm/ops/_family.py.

Bad positions. On CPU tensors every position is checked against cos's rows (the C++ glue, or
``value_checks`` for Triton and the reference) and a position outside ``[0, max_T)`` is an
error naming cos / sin and the position. On CUDA tensors nothing is read on the host (that
would synchronise): the kernels clamp each position into ``[0, max_T)``, so an out-of-range
position is rotated by the angles of row 0 or row ``max_T - 1``, never read out of bounds.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastllm.ops._family import (
    OpFamily,
    OpSet,
    autograd_scope,
    check_float_tensor,
    refuse_double_backward,
    register_autograd,
)
from fastllm.reference import rotary as ref

_INT_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------- checks
# Metadata only (shapes, dtypes, devices), so they trace under torch.compile(fullgraph=True);
# the C++ glue repeats them for direct callers of the ops.


def _check_device(op: str, name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(
            f"{op}: {name} must be on {like_name}'s device {like.device}, got {t.device}"
        )


def _check_operand(op: str, name: str, t: Tensor, packed: bool) -> None:
    check_float_tensor(op, name, t)
    if packed and t.dim() != 3:
        raise ValueError(
            f"{op}: {name} must be (total, heads, D) when cu_seqlens is given, "
            f"got shape {list(t.shape)}"
        )
    if not packed and t.dim() != 4:
        raise ValueError(f"{op}: {name} must be (B, T, heads, D), got shape {list(t.shape)}")


def check_rotary_args(
    op: str,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    x_name: str = "x",
) -> None:
    """The checks every rotary schema shares (the first operand is ``x_name``)."""
    packed = cu_seqlens is not None
    _check_operand(op, x_name, x, packed)
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if cos.dim() != 2:
        raise ValueError(f"{op}: cos must be (max_T, rotary_dim / 2), got shape {list(cos.shape)}")
    if cos.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: cos must be float32 or {x_name}'s dtype {x.dtype}, got {cos.dtype}")
    if sin.shape != cos.shape:
        raise ValueError(
            f"{op}: sin must have the shape of cos {list(cos.shape)}, got {list(sin.shape)}"
        )
    if sin.dtype != cos.dtype:
        raise TypeError(f"{op}: sin must have the dtype of cos {cos.dtype}, got {sin.dtype}")
    _check_device(op, "cos", cos, x, x_name)
    _check_device(op, "sin", sin, x, x_name)
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim < 2:
        raise ValueError(
            f"{op}: cos must have at least one column (rotary_dim / 2), got shape {list(cos.shape)}"
        )
    if rotary_dim > x.shape[-1]:
        raise ValueError(
            f"{op}: rotary_dim = 2 * cos.shape[-1] = {rotary_dim} must be <= the head dim "
            f"D = {x.shape[-1]} of {x_name}"
        )
    batch = x.shape[0]
    if packed:
        if not isinstance(cu_seqlens, Tensor):
            raise TypeError(f"{op}: cu_seqlens must be a Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"{op}: cu_seqlens must be (B + 1,) with B >= 1, got shape {list(cu_seqlens.shape)}"
            )
        _check_device(op, "cu_seqlens", cu_seqlens, x, x_name)
        batch = cu_seqlens.shape[0] - 1
    if position_ids is not None:
        if not isinstance(position_ids, Tensor):
            raise TypeError(
                f"{op}: position_ids must be a Tensor or an int, got {type(position_ids).__name__}"
            )
        if position_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"{op}: position_ids must be int64 or int32, got {position_ids.dtype}")
        _check_device(op, "position_ids", position_ids, x, x_name)
        if position_ids.dim() == 1:
            if position_ids.shape[0] != batch:
                raise ValueError(
                    f"{op}: position_ids must be (B,) per-sequence offsets with B = {batch} or "
                    f"(B, T) positions, got shape {list(position_ids.shape)}"
                )
        elif packed or list(position_ids.shape) != [batch, x.shape[1]]:
            expected = "(B,) per-sequence offsets" + (
                " (the only form with cu_seqlens)" if packed
                else f" or (B, T) = {[batch, x.shape[1]]} positions"
            )
            raise ValueError(
                f"{op}: position_ids must be {expected}, got shape {list(position_ids.shape)}"
            )


def _check_k(op: str, q: Tensor, k: Tensor, packed: bool) -> None:
    _check_operand(op, "k", k, packed)
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: k must have the dtype of q {q.dtype}, got {k.dtype}")
    _check_device(op, "k", k, q, "q")
    same = [k.shape[i] for i in range(k.dim()) if i != k.dim() - 2] == [
        q.shape[i] for i in range(q.dim()) if i != q.dim() - 2
    ]
    if not same:
        raise ValueError(
            f"{op}: k must have q's shape {list(q.shape)} but for its number of heads, "
            f"got {list(k.shape)}"
        )


def _check_options(op: str, position_offset, interleaved, conjugate) -> None:
    if not isinstance(position_offset, int) or isinstance(position_offset, bool):
        raise TypeError(
            f"{op}: position_offset must be an int, got {type(position_offset).__name__}"
        )
    for name, value in (("interleaved", interleaved), ("conjugate", conjugate)):
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def _check_fwd(x, cos, sin, position_ids, cu_seqlens, position_offset, interleaved, conjugate):
    check_rotary_args("rotary_fwd", x, cos, sin, position_ids, cu_seqlens)
    _check_options("rotary_fwd", position_offset, interleaved, conjugate)


def _check_fwd_inplace(x, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
                       conjugate):
    check_rotary_args("rotary_fwd_inplace", x, cos, sin, position_ids, cu_seqlens)
    _check_options("rotary_fwd_inplace", position_offset, interleaved, conjugate)


def _check_qk(op, q, k, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
              conjugate):
    check_rotary_args(op, q, cos, sin, position_ids, cu_seqlens, x_name="q")
    _check_k(op, q, k, cu_seqlens is not None)
    _check_options(op, position_offset, interleaved, conjugate)


def _check_qk_fwd(q, k, *args):
    _check_qk("rotary_qk_fwd", q, k, *args)


def _check_qk_fwd_inplace(q, k, *args):
    _check_qk("rotary_qk_fwd_inplace", q, k, *args)
    if q is k:
        raise ValueError("rotary_qk_fwd_inplace: q and k must be different tensors")


# ---- value checks (CPU tensors outside tracing: OpFamily.check, values_readable) --------


def check_rotary_values(op: str, x: Tensor, cos: Tensor, position_ids: Optional[Tensor],
                        cu_seqlens: Optional[Tensor], position_offset: int) -> None:
    """cu_seqlens is 0, non-decreasing, ends at the packed tokens; every position used lies in
    [0, max_T) (the rows of cos / sin)."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        if cu[0] != 0:
            raise ValueError(f"{op}: cu_seqlens must start at 0, got {cu[0]}")
        for i in range(1, len(cu)):
            if cu[i] < cu[i - 1]:
                raise ValueError(
                    f"{op}: cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} < "
                    f"cu_seqlens[{i - 1}] = {cu[i - 1]}"
                )
        if cu[-1] != x.shape[0]:
            raise ValueError(
                f"{op}: cu_seqlens must end at the number of packed tokens {x.shape[0]}, "
                f"got {cu[-1]}"
            )
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        return
    pos = ref.token_positions(x, position_ids, cu_seqlens, position_offset)
    if pos.numel() == 0:
        return
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0:
        raise ValueError(
            f"{op}: positions must be >= 0, got position {lo} (from position_ids / the position "
            "offset)"
        )
    if hi >= cos.shape[0]:
        raise ValueError(
            f"{op}: cos and sin must have a row per position used: they have {cos.shape[0]} rows "
            f"(max_T), but position {hi} is used (from position_ids / the position offset and "
            "the sequence length); grow the cos / sin cache"
        )


def _values_fwd(x, cos, sin, position_ids, cu_seqlens, position_offset, *flags):
    check_rotary_values("rotary_fwd", x, cos, position_ids, cu_seqlens, position_offset)


def _values_fwd_inplace(x, cos, sin, position_ids, cu_seqlens, position_offset, *flags):
    check_rotary_values("rotary_fwd_inplace", x, cos, position_ids, cu_seqlens, position_offset)


def _values_qk_fwd(q, k, cos, sin, position_ids, cu_seqlens, position_offset, *flags):
    check_rotary_values("rotary_qk_fwd", q, cos, position_ids, cu_seqlens, position_offset)


def _values_qk_fwd_inplace(q, k, cos, sin, position_ids, cu_seqlens, position_offset, *flags):
    check_rotary_values("rotary_qk_fwd_inplace", q, cos, position_ids, cu_seqlens,
                        position_offset)


# ------------------------------------------------------------ fake and autograd rules


def _fake_fwd(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_inplace(*args):
    return None


def _fake_qk_fwd(q, k, *args):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _make_inplace_functions(fwd_inplace, qk_fwd_inplace, fwd, qk_fwd) -> tuple[type, type]:
    """autograd.Functions for ``inplace=True``: forward rotates x (q, k) in place with the
    set's mutating op and marks it dirty (FlashAttention's in-place rotary does the same);
    backward rotates the gradient back with the set's out-of-place op. (Classes made once per
    op set at import: torch.compile cannot trace class creation.)"""

    class RotaryInplace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin, position_ids, cu_seqlens, position_offset, interleaved):
            fwd_inplace(x, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
                        False)
            ctx.mark_dirty(x)
            ctx.save_for_backward(cos, sin, position_ids, cu_seqlens)
            ctx.options = (position_offset, interleaved)
            return x

        @staticmethod
        def backward(ctx, grad):
            refuse_double_backward("apply_rotary")
            cos, sin, position_ids, cu_seqlens = ctx.saved_tensors
            position_offset, interleaved = ctx.options
            grad_x = fwd(grad, cos, sin, position_ids, cu_seqlens, position_offset, interleaved,
                         True)
            return grad_x, None, None, None, None, None, None

    class RotaryQKInplace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, cos, sin, position_ids, cu_seqlens, position_offset, interleaved):
            qk_fwd_inplace(q, k, cos, sin, position_ids, cu_seqlens, position_offset,
                           interleaved, False)
            ctx.mark_dirty(q, k)
            ctx.save_for_backward(cos, sin, position_ids, cu_seqlens)
            ctx.options = (position_offset, interleaved)
            return q, k

        @staticmethod
        def backward(ctx, grad_q, grad_k):
            refuse_double_backward("apply_rotary_qk")
            cos, sin, position_ids, cu_seqlens = ctx.saved_tensors
            position_offset, interleaved = ctx.options
            grad_q, grad_k = qk_fwd(grad_q, grad_k, cos, sin, position_ids, cu_seqlens,
                                    position_offset, interleaved, True)
            return grad_q, grad_k, None, None, None, None, None, None

    return RotaryInplace, RotaryQKInplace


def _register_autograd(ops: OpSet) -> None:
    """Backward of one op set: the set's own forward op with conjugate flipped. cos and sin
    are not differentiated (caches, as in FlashAttention). Also attaches
    ``ops.inplace_function`` / ``ops.qk_inplace_function`` (what ``inplace=True`` runs under
    autograd)."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[-7:-3])  # cos, sin, position_ids, cu_seqlens
        ctx.options = inputs[-3:]  # position_offset, interleaved, conjugate

    def backward(ctx, grad_out):
        cos, sin, position_ids, cu_seqlens = ctx.saved_tensors
        position_offset, interleaved, conjugate = ctx.options
        grad_x = ops.rotary_fwd(grad_out, cos, sin, position_ids, cu_seqlens, position_offset,
                                interleaved, not conjugate)
        return grad_x, None, None, None, None, None, None, None

    def backward_qk(ctx, grad_q, grad_k):
        cos, sin, position_ids, cu_seqlens = ctx.saved_tensors
        position_offset, interleaved, conjugate = ctx.options
        grad_q, grad_k = ops.rotary_qk_fwd(grad_q, grad_k, cos, sin, position_ids, cu_seqlens,
                                           position_offset, interleaved, not conjugate)
        return grad_q, grad_k, None, None, None, None, None, None, None

    register_autograd(ops.rotary_fwd, backward, setup_context=setup)
    register_autograd(ops.rotary_qk_fwd, backward_qk, setup_context=setup)
    ops.inplace_function, ops.qk_inplace_function = _make_inplace_functions(
        ops.rotary_fwd_inplace, ops.rotary_qk_fwd_inplace, ops.rotary_fwd, ops.rotary_qk_fwd
    )


# ------------------------------------------------------------------------ op family


def _triton_kernels() -> dict:
    from fastllm.triton import rotary as kernels

    return {
        "fastllm::rotary_fwd_triton": kernels.rotary_fwd,
        "fastllm::rotary_fwd_inplace_triton": kernels.rotary_fwd_inplace,
        "fastllm::rotary_qk_fwd_triton": kernels.rotary_qk_fwd,
        "fastllm::rotary_qk_fwd_inplace_triton": kernels.rotary_qk_fwd_inplace,
    }


SCHEMAS = ("rotary_fwd", "rotary_fwd_inplace", "rotary_qk_fwd", "rotary_qk_fwd_inplace")

IMPLS = OpFamily(
    "rotary",
    schemas=SCHEMAS,
    checks={
        "rotary_fwd": _check_fwd,
        "rotary_fwd_inplace": _check_fwd_inplace,
        "rotary_qk_fwd": _check_qk_fwd,
        "rotary_qk_fwd_inplace": _check_qk_fwd_inplace,
    },
    value_checks={
        "rotary_fwd": _values_fwd,
        "rotary_fwd_inplace": _values_fwd_inplace,
        "rotary_qk_fwd": _values_qk_fwd,
        "rotary_qk_fwd_inplace": _values_qk_fwd_inplace,
    },
    fakes={
        "rotary_fwd": _fake_fwd,
        "rotary_fwd_inplace": _fake_inplace,
        "rotary_qk_fwd": _fake_qk_fwd,
        "rotary_qk_fwd_inplace": _fake_inplace,
    },
    autograd=_register_autograd,
    triton_kernels=_triton_kernels,
    mutates_args={"rotary_fwd_inplace": ("x",), "rotary_qk_fwd_inplace": ("q", "k")},
)


# --------------------------------------------------------------------------- public API


def _positions(op: str, position_ids) -> tuple[Optional[Tensor], int]:
    """(position_ids tensor or None, int offset) from the public ``position_ids``."""
    if position_ids is None:
        return None, 0
    if isinstance(position_ids, bool):
        raise TypeError(f"{op}: position_ids must be None, an int or an int tensor, got bool")
    if isinstance(position_ids, int):
        return None, position_ids
    if isinstance(position_ids, Tensor):
        return position_ids, 0
    raise TypeError(
        f"{op}: position_ids must be None, an int or an int tensor, got "
        f"{type(position_ids).__name__}"
    )


def _check_public(op: str, x: Tensor, cos: Tensor, rotary_dim: Optional[int], interleaved,
                  inplace, x_name: str) -> None:
    for name, value in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    if rotary_dim is None:
        return
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool):
        raise TypeError(f"{op}: rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim <= 0 or rotary_dim % 2 != 0:
        raise ValueError(f"{op}: rotary_dim must be a positive even number, got {rotary_dim}")
    if isinstance(x, Tensor) and x.dim() >= 1 and rotary_dim > x.shape[-1]:
        raise ValueError(
            f"{op}: rotary_dim must be <= the head dim D = {x.shape[-1]} of {x_name}, "
            f"got {rotary_dim}"
        )
    if isinstance(cos, Tensor) and cos.dim() == 2 and rotary_dim != 2 * cos.shape[-1]:
        raise ValueError(
            f"{op}: rotary_dim must be 2 * cos.shape[-1] = {2 * cos.shape[-1]} (cos holds one "
            f"angle per rotated pair), got rotary_dim = {rotary_dim}"
        )


def apply_rotary(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    position_ids: Union[None, int, Tensor] = None,
    interleaved: bool = False,
    rotary_dim: Optional[int] = None,
    inplace: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Rotary position embeddings: x with its first ``rotary_dim`` features of every head
    rotated by the angles of its token's position.

    Args:
        x: ``(B, T, H, D)``, or packed ``(total, H, D)`` with ``cu_seqlens``. Any strides (a
            q sliced out of a fused qkv projection is read in place) as long as the last dim
            is contiguous (otherwise it is copied once).
        cos, sin: ``(max_T, rotary_dim // 2)`` caches (``cos[p, i] = cos(p * inv_freq[i])``,
            e.g. :class:`fastllm.nn.RotaryEmbedding`'s), float32 or x's dtype.
        position_ids: None (positions ``0 .. T - 1``, per sequence when packed), an int
            offset ``o`` (positions ``o .. o + T - 1``: decoding with a KV cache), a ``(B,)``
            int tensor of per-sequence offsets (token t of sequence b at ``offset[b] + t``), or
            a ``(B, T)`` int tensor of positions (Hugging Face's ``position_ids``; padded
            layout only). int32 or int64.
        interleaved: False: pairs ``(i, i + rotary_dim / 2)`` (NeoX, Hugging Face LLaMA's
            ``rotate_half``); True: pairs ``(2 i, 2 i + 1)`` (GPT-J).
        rotary_dim: the rotated features (default and only allowed value:
            ``2 * cos.shape[-1]``); features ``rotary_dim ..`` pass through unchanged
            (partial rotary: GPT-NeoX, Phi).
        inplace: rotate x in place and return it; works under autograd (x is marked dirty,
            its gradient is rotated back in backward), like FlashAttention's in-place rotary.
        cu_seqlens: ``(B + 1,)`` int32 sequence offsets of a packed x.

    Returns x's shape and dtype; computed in float32 (float64 for float64 on the CPU) and
    rounded once. Differentiable in x (backward: the inverse rotation; cos and sin are not
    differentiated) and torch.compile-able. Positions outside ``[0, max_T)``: an error on
    CPU tensors; clamped on CUDA (see the module docstring).
    """
    op = "apply_rotary"
    _check_public(op, x, cos, rotary_dim, interleaved, inplace, "x")
    position_ids, offset = _positions(op, position_ids)
    check_rotary_args(op, x, cos, sin, position_ids, cu_seqlens)
    ops = IMPLS.select(x)
    if ops is None:
        IMPLS.check("rotary_fwd", x, cos, sin, position_ids, cu_seqlens, offset, interleaved,
                    False)
        out = ref.rotary_ref(x, cos, sin, position_ids, cu_seqlens, offset, interleaved)
        return x.copy_(out) if inplace else out
    if not inplace:
        with autograd_scope(x, cos, sin):
            return ops.rotary_fwd(x, cos, sin, position_ids, cu_seqlens, offset, interleaved,
                                  False)
    if torch.is_grad_enabled() and x.requires_grad:
        return ops.inplace_function.apply(x, cos, sin, position_ids, cu_seqlens, offset,
                                          interleaved)
    ops.rotary_fwd_inplace(x, cos, sin, position_ids, cu_seqlens, offset, interleaved, False)
    return x


def apply_rotary_qk(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    position_ids: Union[None, int, Tensor] = None,
    interleaved: bool = False,
    rotary_dim: Optional[int] = None,
    inplace: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """:func:`apply_rotary` of q ``(B, T, H, D)`` and k ``(B, T, Hkv, D)`` (packed:
    ``(total, H, D)``, ``(total, Hkv, D)``) in one kernel pass: the same positions, the same
    angles; H and Hkv may differ (GQA / MQA). Returns ``(q_rot, k_rot)`` (with
    ``inplace=True``: q and k themselves, rotated in place). Arguments as
    :func:`apply_rotary`; q and k share dtype and device."""
    op = "apply_rotary_qk"
    _check_public(op, q, cos, rotary_dim, interleaved, inplace, "q")
    position_ids, offset = _positions(op, position_ids)
    check_rotary_args(op, q, cos, sin, position_ids, cu_seqlens, x_name="q")
    _check_k(op, q, k, cu_seqlens is not None)
    if inplace and q is k:
        raise ValueError(f"{op}: q and k must be different tensors with inplace=True")
    ops = IMPLS.select(q)
    if ops is None:
        IMPLS.check("rotary_qk_fwd", q, k, cos, sin, position_ids, cu_seqlens, offset,
                    interleaved, False)
        q_out = ref.rotary_ref(q, cos, sin, position_ids, cu_seqlens, offset, interleaved)
        k_out = ref.rotary_ref(k, cos, sin, position_ids, cu_seqlens, offset, interleaved)
        return (q.copy_(q_out), k.copy_(k_out)) if inplace else (q_out, k_out)
    if not inplace:
        with autograd_scope(q, k, cos, sin):
            return ops.rotary_qk_fwd(q, k, cos, sin, position_ids, cu_seqlens, offset,
                                     interleaved, False)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        if torch.compiler.is_compiling() or q._is_view() or k._is_view():
            # Autograd refuses a Function that modifies a view in place and returns more than
            # one tensor: q and k as views (of a fused qkv, say) take one pass each (and under
            # torch.compile, which cannot trace _is_view).
            for t in (q, k):
                ops.inplace_function.apply(t, cos, sin, position_ids, cu_seqlens, offset,
                                           interleaved)
            return q, k
        return ops.qk_inplace_function.apply(q, k, cos, sin, position_ids, cu_seqlens, offset,
                                             interleaved)
    ops.rotary_qk_fwd_inplace(q, k, cos, sin, position_ids, cu_seqlens, offset, interleaved,
                              False)
    return q, k
