"""Attention: the public functions, their fake and autograd rules, their Triton ops.

Schemas: csrc/schemas.h (FASTLLM_ATTENTION_SCHEMAS), math in csrc/attention/attention.h.
Kernels: csrc/attention/ (C++ CPU, CUDA), fastllm/triton/attention.py (Triton); reference:
fastllm/reference/attention.py. The backends and their choice: fastllm/ops/_family.py. On
CUDA tensors under the default backend, float32 runs the Triton kernels and float64 the
reference (the CUDA kernels are float16 / bfloat16 tensor-core kernels).

Forward returns ``(out, lse)``; lse is not differentiable (as in FlashAttention). Backward
recomputes the scores from q, k, v and the saved lse (and the same dropout seed), so the
autograd graph keeps O(B * H * T) extra memory, never a (Tq, Tk) matrix.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from fastllm.ops._family import (
    OpFamily,
    OpSet,
    acc_dtype,
    autograd_scope,
    check_float_tensor,
    check_same_device,
    register_autograd,
    values_readable,
)
from fastllm.reference import attention as ref

# Argument positions of the options in both schemas (after q, k, v / dout, q, k, v, out, lse).
_NUM_OPTIONS = 15


def _lse_shape(q: Tensor, cu_seqlens_q: Optional[Tensor]) -> tuple[int, ...]:
    if cu_seqlens_q is not None:  # packed: (H, total_q)
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])  # (B, H, Tq)


# ------------------------------------------------------------------------- checks
# The raw ops' checks, as the C++ glue makes them (csrc/attention/attention_glue.h,
# `prepare`): every Triton call and every fake runs them (fastllm/ops/_family.py).

MAX_HEAD_DIM = 256  # every backend's limit (FlashAttention's)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _check_lengths_tensor(op: str, name: str, t: Any, expected_len: int, q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be an int32 Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != expected_len:
        raise ValueError(f"{op}: {name} must have shape [{expected_len}], got {_shape(t)}")
    check_same_device(op, name, t, q)


def _check_problem(op: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k,
                   seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                   window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                   attn_bias=None, key_padding_mask=None) -> int:
    """Checks q, k, v and the options; returns the batch size."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(op, name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        check_same_device(op, name, t, q)
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        given = "cu_seqlens_q" if cu_seqlens_q is not None else "cu_seqlens_k"
        raise ValueError(
            f"{op}: cu_seqlens_q and cu_seqlens_k must be given together (packed "
            f"variable-length batches), got only {given}"
        )
    packed = cu_seqlens_q is not None
    rank, layout = (3, "(total_tokens, heads, head_dim) with cu_seqlens") if packed else (
        4, "(batch, seqlen, heads, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {_shape(t)}")
    if k.shape != v.shape:
        raise ValueError(
            f"{op}: k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}"
        )
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: head_dim (q's last dim) must be in [1, {MAX_HEAD_DIM}], got {head_dim}"
        )
    if k.shape[-1] != head_dim:
        raise ValueError(f"{op}: k must have q's head_dim {head_dim}, got {k.shape[-1]}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"{op}: the number of query heads (q.shape[-2] = {heads}) must be a multiple of "
            f"the number of kv heads (k.shape[-2] = {kv_heads})"
        )
    if packed:
        if not isinstance(cu_seqlens_q, Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 1:
            raise ValueError(
                f"{op}: cu_seqlens_q must be int32 (B + 1,) with B + 1 >= 1 entries, got "
                f"{_shape(cu_seqlens_q) if isinstance(cu_seqlens_q, Tensor) else cu_seqlens_q!r}"
            )
        batch = cu_seqlens_q.shape[0] - 1
        _check_lengths_tensor(op, "cu_seqlens_q", cu_seqlens_q, batch + 1, q)
        _check_lengths_tensor(op, "cu_seqlens_k", cu_seqlens_k, batch + 1, q)
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if m < 0:
                raise ValueError(f"{op}: {name} must be >= 0, got {m}")
    else:
        batch = q.shape[0]
        if k.shape[0] != batch:
            raise ValueError(f"{op}: k must have q's batch size {batch}, got {k.shape[0]}")
    if seqused_k is not None:
        _check_lengths_tensor(op, "seqused_k", seqused_k, batch, q)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.dtype != torch.float32:
            got = alibi_slopes.dtype if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
            raise TypeError(f"{op}: alibi_slopes must be float32, got {got}")
        shape = _shape(alibi_slopes)
        if shape not in ([heads], [batch, heads]):
            raise ValueError(
                f"{op}: alibi_slopes must have shape [{heads}] or [{batch}, {heads}], got {shape}"
            )
        check_same_device(op, "alibi_slopes", alibi_slopes, q)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0:
        if dropout_seed is None:
            raise ValueError(
                f"{op}: dropout_p = {dropout_p} > 0 needs dropout_seed (an int64 tensor of one "
                "element)"
            )
        if dropout_seed.dtype != torch.int64:
            raise TypeError(f"{op}: dropout_seed must be int64, got {dropout_seed.dtype}")
        if dropout_seed.numel() != 1:
            raise ValueError(
                f"{op}: dropout_seed must have one element, got shape {_shape(dropout_seed)}"
            )
        check_same_device(op, "dropout_seed", dropout_seed, q)
    for name, w in (("window_left", window_left), ("window_right", window_right)):
        if w < -1:
            raise ValueError(f"{op}: {name} must be >= 0 or -1 (unbounded), got {w}")
    if not 0 <= softcap <= _FLOAT32_MAX:
        raise ValueError(
            f"{op}: softcap must be >= 0 (0 disables it) and finite in float32, got {softcap}"
        )
    if attn_bias is not None:
        if packed:
            raise ValueError(
                f"{op}: attn_bias needs padded (B, T, heads, head_dim) inputs, not packed ones "
                "with cu_seqlens"
            )
        if not isinstance(attn_bias, Tensor) or attn_bias.dtype != q.dtype:
            got = attn_bias.dtype if isinstance(attn_bias, Tensor) else type(attn_bias).__name__
            raise TypeError(f"{op}: attn_bias must have q's dtype {q.dtype}, got {got}")
        want = [batch, heads, q.shape[1], k.shape[1]]
        if _shape(attn_bias) != want:
            raise ValueError(
                f"{op}: attn_bias must have shape {want} (B, H, Tq, Tk; broadcast dims as "
                f"stride-0 views, e.g. bias.expand(...)), got {_shape(attn_bias)}"
            )
        check_same_device(op, "attn_bias", attn_bias, q)
    if key_padding_mask is not None:
        if packed:
            raise ValueError(
                f"{op}: key_padding_mask needs padded (B, T, heads, head_dim) inputs, not packed "
                "ones with cu_seqlens (they carry their lengths)"
            )
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = (key_padding_mask.dtype if isinstance(key_padding_mask, Tensor)
                   else type(key_padding_mask).__name__)
            raise TypeError(f"{op}: key_padding_mask must be bool (True = take part), got {got}")
        want = [batch, k.shape[1]]
        if _shape(key_padding_mask) != want:
            raise ValueError(
                f"{op}: key_padding_mask must have shape {want} (B, Tk), got "
                f"{_shape(key_padding_mask)}"
            )
        check_same_device(op, "key_padding_mask", key_padding_mask, q)
    return batch


def _check_attention_fwd(q, k, v, *options):
    _check_problem("attention_fwd", q, k, v, *options)


def _split_bwd_options(options: tuple) -> tuple[tuple, bool]:
    """(the shared options, bias_grad): attention_bwd's schema adds ``bias_grad=False``."""
    return options[:_NUM_OPTIONS], bool(options[_NUM_OPTIONS]) if len(options) > _NUM_OPTIONS else False


def _check_attention_bwd(dout, q, k, v, out, lse, *options):
    op = "attention_bwd"
    options, bias_grad = _split_bwd_options(options)
    _check_problem(op, q, k, v, *options)
    if bias_grad and options[13] is None:
        raise ValueError(f"{op}: bias_grad=True needs attn_bias (the bias to differentiate)")
    for name, t in (("out", out), ("dout", dout)):
        check_float_tensor(op, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape {_shape(q)}, got {_shape(t)}")
        check_same_device(op, name, t, q)
    if not isinstance(lse, Tensor):
        raise TypeError(f"{op}: lse must be a Tensor, got {type(lse).__name__}")
    want = list(_lse_shape(q, options[0]))
    if _shape(lse) != want:
        raise ValueError(f"{op}: lse must have shape {want} (forward's lse), got {_shape(lse)}")
    if lse.dtype != acc_dtype(q):
        raise TypeError(f"{op}: lse must be {acc_dtype(q)} (forward's lse), got {lse.dtype}")
    check_same_device(op, "lse", lse, q)


def _check_values(op: str, q: Tensor, k: Tensor, cu_seqlens_q, cu_seqlens_k, seqused_k,
                  max_seqlen_q, max_seqlen_k) -> None:
    """cu_seqlens from 0 to the token count, non-decreasing, lengths within the maxima;
    seqused_k within each sequence's keys (the C++ glue's check_cu_seqlens_values)."""
    avail = None
    if cu_seqlens_q is not None:
        for name, cu, total, max_len, max_name in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k"),
        ):
            c = cu.tolist()
            if c[0] != 0:
                raise ValueError(f"{op}: {name}[0] must be 0, got {c[0]}")
            for i in range(1, len(c)):
                if c[i] < c[i - 1]:
                    raise ValueError(
                        f"{op}: {name} must be non-decreasing, got {name}[{i - 1}] = {c[i - 1]} "
                        f"> {name}[{i}] = {c[i]}"
                    )
                if c[i] - c[i - 1] > max_len:
                    raise ValueError(
                        f"{op}: sequence {i - 1} has {c[i] - c[i - 1]} tokens (from {name}) but "
                        f"{max_name} = {max_len}"
                    )
            if c[-1] != total:
                raise ValueError(
                    f"{op}: {name}[-1] must equal the number of packed tokens {total}, got {c[-1]}"
                )
        ck = cu_seqlens_k.tolist()
        avail = [ck[b + 1] - ck[b] for b in range(len(ck) - 1)]
    if seqused_k is not None:
        used = seqused_k.tolist()
        for b, u in enumerate(used):
            limit = avail[b] if avail is not None else k.shape[1]
            if not 0 <= u <= limit:
                raise ValueError(
                    f"{op}: seqused_k[{b}] must be in [0, {limit}] (the keys of sequence {b}), "
                    f"got {u}"
                )


def _check_attention_fwd_values(q, k, v, cu_q, cu_k, used, max_q, max_k, *rest):
    _check_values("attention_fwd", q, k, cu_q, cu_k, used, max_q, max_k)


def _check_attention_bwd_values(dout, q, k, v, out, lse, cu_q, cu_k, used, max_q, max_k, *rest):
    _check_values("attention_bwd", q, k, cu_q, cu_k, used, max_q, max_k)


# ------------------------------------------------------------ fake and autograd rules
# Fake (meta) rules, the same for every op set.


def _fake_attention_fwd(q, k, v, cu_seqlens_q, *options):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=acc_dtype(q))
    return out, lse


def _dbias_shape(q: Tensor, k: Tensor, bias_grad: bool) -> tuple[int, ...]:
    """(B, H, Tq, Tk) when the bias gradient is asked for, else (0,)."""
    return (q.shape[0], q.shape[2], q.shape[1], k.shape[1]) if bias_grad else (0,)


def _fake_attention_bwd(dout, q, k, v, out, lse, *options):
    fmt = torch.contiguous_format
    _, bias_grad = _split_bwd_options(options)
    return (
        torch.empty_like(q, memory_format=fmt),
        torch.empty_like(k, memory_format=fmt),
        torch.empty_like(v, memory_format=fmt),
        q.new_empty(_dbias_shape(q, k, bias_grad)),
    )


def _register_autograd(ops: OpSet) -> None:
    """dq, dk, dv (and attn_bias's gradient when it requires one) through the set's own
    backward op; lse is not differentiable, and neither are the lengths, the ALiBi slopes,
    the seed or the key padding mask."""

    def setup_context(ctx, inputs, output):
        q, k, v, *options = inputs
        out, lse = output
        (cu_q, cu_k, used, max_q, max_k, scale, causal, wl, wr, softcap, alibi, p, seed, bias,
         kpm) = options
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, used, alibi, seed, bias, kpm)
        ctx.scalars = (max_q, max_k, scale, causal, wl, wr, softcap, p)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, used, alibi, seed, bias, kpm = ctx.saved_tensors
        max_q, max_k, scale, causal, wl, wr, softcap, p = ctx.scalars
        bias_grad = bias is not None and ctx.needs_input_grad[3 + 13]
        dq, dk, dv, dbias = ops.attention_bwd(
            dout, q, k, v, out, lse, cu_q, cu_k, used, max_q, max_k, scale, causal, wl, wr,
            softcap, alibi, p, seed, bias, kpm, bias_grad,
        )
        return (dq, dk, dv) + (None,) * 13 + (dbias if bias_grad else None, None)

    register_autograd(ops.attention_fwd, backward, setup_context=setup_context)


# ------------------------------------------------------------------------ op family


def _triton_kernels() -> dict:
    from fastllm.triton import attention as kernels

    return {
        "fastllm::attention_fwd_triton": kernels.attention_fwd,
        "fastllm::attention_bwd_triton": kernels.attention_bwd,
    }


IMPLS = OpFamily(
    "attention",
    schemas=("attention_fwd", "attention_bwd"),
    checks={"attention_fwd": _check_attention_fwd, "attention_bwd": _check_attention_bwd},
    value_checks={
        "attention_fwd": _check_attention_fwd_values,
        "attention_bwd": _check_attention_bwd_values,
    },
    fakes={"attention_fwd": _fake_attention_fwd, "attention_bwd": _fake_attention_bwd},
    autograd=_register_autograd,
    triton_kernels=_triton_kernels,
    # The CUDA kernels are float16 / bfloat16 tensor-core kernels.
    cuda_dtype_fallback={torch.float32: "triton", torch.float64: "reference"},
)


# Where attn_bias sits among attention_fwd's options (the schema's order, below).
_ATTN_BIAS = 13


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, *options: Any) -> tuple[Tensor, Tensor]:
    """(out, lse) from the selected backend, differentiable in q, k, v; ``options`` are the
    schema's, in its order (FASTLLM_ATTENTION_OPTIONS in csrc/schemas.h: cu_seqlens_q,
    cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
    window_right, softcap, alibi_slopes, dropout_p, dropout_seed, attn_bias,
    key_padding_mask)."""
    ops = IMPLS.select(q)
    if ops is None:
        IMPLS.check("attention_fwd", q, k, v, *options)  # the ops check their own
        return ref.attention_ref(q, k, v, *options)
    with autograd_scope(q, k, v, options[_ATTN_BIAS]):  # the differentiable inputs
        return ops.attention_fwd(q, k, v, *options)


# --------------------------------------------------------------------------- public API
# Metadata-only checks here (shapes, dtypes, options); values (cu_seqlens, seqused_k) are
# checked by the op itself, so these trace under torch.compile(fullgraph=True).

def _window(op: str, window_size: Any) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: window_size must be a pair (left, right), got {window_size!r}")
    if left < -1 or right < -1:
        raise ValueError(
            f"{op}: window_size entries must be >= 0 or -1 (unbounded), got {(left, right)}"
        )
    return left, right


def _new_dropout_seed(q: Tensor) -> Tensor:
    """A fresh int64 seed drawn from torch's generator of q's device: reproducible under
    torch.manual_seed, and traced (not baked in) by torch.compile."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)


def _max_seqlen(name: str, cu_seqlens: Any) -> int:
    # Reads values (a host sync / graph break): pass max_seqlen_* to avoid it.
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(
            f"attention: {name} must be an int32 tensor of shape (B + 1,), got "
            f"{tuple(cu_seqlens.shape) if isinstance(cu_seqlens, Tensor) else cu_seqlens!r}"
        )
    if cu_seqlens.is_meta:
        raise ValueError("attention: with meta tensors, pass max_seqlen_q and max_seqlen_k")
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    *,
    seqused_k: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
):
    """Fused (FlashAttention-style) attention: softmax(q k^T * scale) v without ever forming
    the (Tq, Tk) matrix, in forward and in backward (which recomputes it tile by tile).

    - ``q`` ``(B, Tq, H, D)``, ``k`` / ``v`` ``(B, Tk, Hkv, D)`` with ``H % Hkv == 0``
      (GQA / MQA: query head h uses kv head ``h // (H // Hkv)``; dk / dv are summed over
      the group). Any strides; float32, bfloat16, float16, float64. On CUDA, float16 /
      bfloat16 run the CUDA kernels (head dims a multiple of 8), float32 the Triton kernel,
      float64 the reference. Head dim up to 256. Out has q's shape and dtype.
    - ``causal=True`` with ``Tq != Tk`` is aligned bottom-right (the last query sees the
      last key: the KV-cache convention, as FlashAttention). ``scaled_dot_product_attention``
      below keeps torch's top-left alignment instead.
    - ``window_size=(left, right)``: query i sees keys ``[i + d - left, i + d + right]``
      (d = Tk - Tq; -1 = unbounded). ``softcap > 0``: scores become
      ``softcap * tanh(s / softcap)`` (Gemma 2). ``alibi_slopes`` float32 ``(H,)`` or
      ``(B, H)``: adds ``-slope * |i + Tk - Tq - j|`` to the scores.
    - ``dropout_p``: dropout on the attention probabilities (applied whenever > 0, as
      FlashAttention; modules pass 0 in eval). The mask is a hash of a seed drawn from
      torch's generator, recomputed in backward, never stored.
    - Packed variable-length batches: ``q`` ``(total_q, H, D)``, ``k`` / ``v``
      ``(total_k, Hkv, D)`` with int32 ``cu_seqlens_q`` / ``cu_seqlens_k`` ``(B + 1,)`` and
      ``max_seqlen_q`` / ``max_seqlen_k`` (computed from cu_seqlens when omitted, which reads
      values: pass them under torch.compile). ``seqused_k`` int32 ``(B,)``: use only the
      first ``seqused_k[b]`` keys of sequence b.
    - ``attn_bias``: an additive float bias on the scores (after the softcap and ALiBi),
      broadcastable to ``(B, H, Tq, Tk)`` (e.g. ``(1, H, Tq, Tk)`` T5 relative-position
      bias, ``(B, 1, 1, Tk)`` BERT's additive padding mask, ``(Tq, Tk)``); broadcast dims are
      read with stride 0, so it costs only its own storage. It gets a gradient when it
      requires one (summed over its broadcast dims; the backward forms a ``(B, H, Tq, Tk)``
      buffer for it). ``-inf`` entries exclude keys.
    - ``key_padding_mask``: bool ``(B, Tk)``, True = the key takes part (padding is False).
      O(B * Tk) memory. Both need padded (not packed) inputs.
    - A query row with no allowed key (or only ``-inf`` biases) gets zeros (and zero
      gradients), never NaN.
    - ``return_lse=True`` returns ``(out, lse)``, lse float32 ``(B, H, Tq)`` (packed:
      ``(H, total_q)``), natural log, ``-inf`` for rows without keys; not differentiable.
    """
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(op, name, t)
    window_left, window_right = _window(op, window_size)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if not 0 <= softcap <= _FLOAT32_MAX:  # (NaN too)
        raise ValueError(
            f"{op}: softcap must be >= 0 (0 disables it) and finite in float32, got {softcap}"
        )
    if alibi_slopes is not None and isinstance(alibi_slopes, Tensor) and alibi_slopes.requires_grad:
        raise ValueError(f"{op}: alibi_slopes get no gradient; pass them without requires_grad")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                    ("seqused_k", seqused_k)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be an int32 Tensor, got {type(t).__name__}")
    if attn_bias is not None:
        attn_bias = _broadcast_bias(op, attn_bias, q, k)
    if key_padding_mask is not None and not isinstance(key_padding_mask, Tensor):
        raise TypeError(
            f"{op}: key_padding_mask must be a bool Tensor (B, Tk), got "
            f"{type(key_padding_mask).__name__}"
        )
    if softmax_scale is None:  # (a head dim of 0 is reported by the op's checks)
        softmax_scale = q.shape[-1] ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must be given together")
        if max_seqlen_q is None:
            max_seqlen_q = _max_seqlen("cu_seqlens_q", cu_seqlens_q)
        if max_seqlen_k is None:
            max_seqlen_k = _max_seqlen("cu_seqlens_k", cu_seqlens_k)
    else:
        max_seqlen_q = max_seqlen_k = 0
    seed = _new_dropout_seed(q) if dropout_p > 0 else None
    out, lse = attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, int(max_seqlen_q), int(max_seqlen_k),
        float(softmax_scale), bool(causal), window_left, window_right, float(softcap),
        alibi_slopes, float(dropout_p), seed, attn_bias, key_padding_mask,
    )
    return (out, lse) if return_lse else out


def _broadcast_bias(op: str, attn_bias: Any, q: Tensor, k: Tensor) -> Tensor:
    """attn_bias as the op takes it: q's dtype (a differentiable cast of its own storage)
    and a (B, H, Tq, Tk) stride-0 view of its broadcast dims."""
    if not isinstance(attn_bias, Tensor) or not attn_bias.is_floating_point():
        got = attn_bias.dtype if isinstance(attn_bias, Tensor) else type(attn_bias).__name__
        raise TypeError(f"{op}: attn_bias must be a floating Tensor (added to the scores), got {got}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{op}: attn_bias needs padded q (B, Tq, H, D) and k (B, Tk, Hkv, D), got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)} (packed inputs take no bias)"
        )
    scores = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # (B, H, Tq, Tk)
    try:
        ok = attn_bias.dim() <= 4 and torch.broadcast_shapes(attn_bias.shape, scores) == scores
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{op}: attn_bias must broadcast to (B, H, Tq, Tk) = {scores}, got "
            f"{tuple(attn_bias.shape)}"
        )
    check_same_device(op, "attn_bias", attn_bias, q)
    if attn_bias.dtype != q.dtype:
        attn_bias = attn_bias.to(q.dtype)
    return attn_bias.expand(scores)


def _check_sdpa_mask(op: str, attn_mask: Any, query: Tensor, key: Tensor) -> None:
    """torch's rules: a boolean mask (True = take part) or a floating one added to the
    scores, broadcastable to (..., L, S)."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{op}: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            f"{op}: attn_mask must be bool (True = take part) or floating (added to the "
            f"scores), got {attn_mask.dtype}"
        )
    scores = tuple(query.shape[:-1]) + (key.shape[-2],)  # (..., L, S)
    try:
        broadcast = torch.broadcast_shapes(tuple(attn_mask.shape), scores)
    except RuntimeError:
        broadcast = None
    if broadcast != scores:
        raise ValueError(
            f"{op}: attn_mask must broadcast to the scores' shape {scores} (..., L, S), got "
            f"{tuple(attn_mask.shape)}"
        )
    check_same_device(op, "attn_mask", attn_mask, query)


def _needs_reference_sdpa(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """What the fused kernels cannot express: a value head dim Ev != E (the kernels take one
    head dim for q, k and v)."""
    return value.shape[-1] != query.shape[-1]


def _sdpa_mask_4d(attn_mask: Tensor, query: Tensor, batch: int) -> Tensor:
    """``attn_mask`` (broadcastable to the scores (..., H, L, S); (N, L, S) for 3-D inputs)
    as a 4-D (Bm, Hm, Lm, Sm) tensor with each dim 1 or the scores' (B, H, L, S), B being
    query's flattened batch dims, flattened exactly as query is. A view of the mask's own
    storage: its broadcast dims stay size 1. Only a mask that varies over some of several
    leading batch dims and broadcasts over others is copied, to (B, Hm, Lm, Sm) (the 4-D
    strided view cannot express it)."""
    m = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
    if query.dim() == 3:  # (N, L, S) scores: one head
        return m.unsqueeze(1)
    if all(n == 1 for n in m.shape[:-3]):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*query.shape[:-3], *m.shape[-3:]).reshape(batch, *m.shape[-3:])


def _sdpa_masks(attn_mask: Tensor, query: Tensor, batch: int, src_len: int):
    """(attn_bias, key_padding_mask) for ``attention`` from SDPA's ``attn_mask``.

    - boolean, depending on neither the head nor the query (shape (N, 1, 1, S), (S,), ...
      after broadcasting): a (B, S) key padding mask (a stride-0 view where it broadcasts);
    - any other boolean mask: an additive bias of query's dtype, 0 where True and -inf where
      False, at the mask's own (unexpanded) shape: it costs the mask's own elements;
    - floating: the bias itself (attention casts it to q's dtype, differentiably, and
      expands it; the gradient reaches attn_mask when it requires one)."""
    m = _sdpa_mask_4d(attn_mask, query, batch)  # (Bm, Hm, Lm, Sm)
    if m.dtype != torch.bool:
        return m, None
    if m.shape[1] == 1 and m.shape[2] == 1:
        return None, m[:, 0, 0, :].expand(batch, src_len)  # (B, S)
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(m, zero, torch.full_like(zero, float("-inf"))), None


def _fused_sdpa(
    q4: Tensor,
    k4: Tensor,
    v4: Tensor,
    scale: float,
    dropout_p: float,
    is_causal: bool,
    attn_bias: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """SDPA's math on (B, H, L, E) / (B, Hkv, S, E) tensors through the fused kernels:
    ``is_causal`` aligned top-left (torch's), optionally together with an additive
    ``attn_bias`` (4-D, broadcastable to (B, H, L, S)) and a bool ``key_padding_mask``
    (B, S), True = take part. Returns (B, H, L, E). (fastllm.nn.MultiheadAttention calls it
    too, with a causal hint and a key padding mask at once.)"""
    L, S = q4.shape[2], k4.shape[2]
    causal, window_right = False, -1
    if is_causal:
        # torch aligns the causal mask top-left (row i sees keys 0..i); the kernels align it
        # bottom-right. S > L: keys past L are never seen, so drop them and align both ends.
        # S < L: a right window of L - S from the bottom-right diagonal is the same mask.
        if S >= L:
            k4, v4, causal = k4[:, :, :L], v4[:, :, :L], True
            if attn_bias is not None:
                attn_bias = attn_bias[..., :L]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[:, :L]
        else:
            window_right = L - S
    # (B, H, T, E) -> (B, T, H, E) views: the kernels take any strides.
    out = attention(
        q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), causal=causal,
        softmax_scale=scale, window_size=(-1, window_right), dropout_p=dropout_p,
        attn_bias=attn_bias, key_padding_mask=key_padding_mask,
    )
    return out.transpose(1, 2)  # (B, H, L, E)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: ``(..., H, L, E)``
    query, ``(..., Hkv, S, E)`` key, ``(..., Hkv, S, Ev)`` value (3-D inputs are one head;
    leading batch dims are flattened), ``is_causal`` aligned top-left exactly like torch's,
    ``scale`` and ``enable_gqa`` as torch.

    It runs the fused kernels on transposed views (no copies of q, k, v), masks included.
    ``attn_mask`` broadcastable to ``(..., L, S)``, as torch takes it:

    - boolean (True = take part) that depends on neither the head nor the query, e.g.
      ``(N, 1, 1, S)`` (a key padding mask): passed as ``key_padding_mask`` ``(B, S)``,
      O(B * S) memory;
    - any other boolean mask (``(L, S)``, ``(N, H, L, S)``, ``(1, 1, L, S)`` ...): an
      additive bias of query's dtype (0 / -inf) at the mask's own, unexpanded shape, so it
      costs as many elements as the mask itself;
    - floating (added to the scores): passed as ``attn_bias``; it gets a gradient when it
      requires one, as with torch.

    ``attn_mask`` together with ``is_causal=True`` is refused, as torch refuses it. On the
    reference backend the same routing runs ``attention``'s reference (attention_ref).

    What still runs the plain-PyTorch path (O(L * S) memory, same results): ``Ev != E``
    (value's head dim differing from query's), with or without a mask; there,
    ``dropout_p > 0`` uses torch's own SDPA and dropout mask.

    Differences from torch: a query row whose keys are all masked (every entry False, or
    -inf) gives zeros and zero gradients, not NaN. ``dropout_p > 0`` uses fastllm's dropout
    mask (a hash of a seed drawn from torch's generator, masks or not), so the dropped
    entries differ from torch's for the same seed; the distribution is the same.
    """
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float_tensor(op, name, t)
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"{op}: query, key and value must be (..., L, E) / (..., S, E) / (..., S, Ev) with "
            f"the same number of dims (>= 3), got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"{op}: key must have query's embedding dim {query.shape[-1]}, got {key.shape[-1]}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"{op}: key and value must have the same length S, got {key.shape[-2]} and "
            f"{value.shape[-2]}"
        )
    if attn_mask is not None:
        _check_sdpa_mask(op, attn_mask, query, key)
    if attn_mask is not None and is_causal:
        # torch raises here too: the two masks would have to be merged by the caller.
        raise ValueError(f"{op}: attn_mask and is_causal=True cannot be given together")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if query.dim() == 3:  # (N, L, E): one head
        q4, k4, v4 = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    else:  # (..., H, L, E): flatten the leading batch dims
        # (explicit batch sizes: -1 is ambiguous when a tensor is empty)
        q4 = query.reshape(math.prod(query.shape[:-3]), *query.shape[-3:])
        k4 = key.reshape(math.prod(key.shape[:-3]), *key.shape[-3:])
        v4 = value.reshape(math.prod(value.shape[:-3]), *value.shape[-3:])
        if k4.shape[0] != q4.shape[0] or v4.shape[0] != q4.shape[0]:
            raise ValueError(
                f"{op}: query, key and value must have the same batch dims, got "
                f"{tuple(query.shape[:-3])}, {tuple(key.shape[:-3])}, {tuple(value.shape[:-3])}"
            )
    hq, hk = q4.shape[1], k4.shape[1]
    if hk != hq and not enable_gqa:
        raise ValueError(
            f"{op}: query has {hq} heads but key/value have {hk}; pass enable_gqa=True for "
            "grouped-query attention"
        )
    if hq % hk != 0 or v4.shape[1] != hk:
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of key heads ({hk}) and value must "
            f"have key's heads, got value heads {v4.shape[1]}"
        )
    if scale is None:
        scale = query.shape[-1] ** -0.5

    if _needs_reference_sdpa(query, key, value):
        # The plain path: Ev != E runs the reference composition, O(L * S) memory, with the
        # fused kernels' semantics (a fully masked row gives zeros).
        if dropout_p > 0:
            return _reference_sdpa_dropout(query, key, value, attn_mask, dropout_p, is_causal,
                                           scale, enable_gqa)
        return ref.sdpa_ref(query, key, value, attn_mask, is_causal, scale, enable_gqa)

    attn_bias = key_padding_mask = None
    if attn_mask is not None:
        attn_bias, key_padding_mask = _sdpa_masks(attn_mask, query, q4.shape[0], k4.shape[2])
    out = _fused_sdpa(q4, k4, v4, scale, dropout_p, is_causal, attn_bias, key_padding_mask)
    return out.reshape(query.shape[:-1] + (value.shape[-1],))


def _reference_sdpa_dropout(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The plain path (Ev != E) with dropout: torch's own math (its dropout mask, not
    fastllm's hash)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # A fully masked row must give zeros, not torch's NaN: give it one harmless key.
        attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
        empty_row = ~attn_mask.any(dim=-1, keepdim=True)
        attn_mask = torch.where(empty_row, torch.zeros_like(attn_mask), attn_mask)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
        return out.masked_fill(empty_row, 0)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    cache_seqlens: Union[int, Tensor, None] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    *,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    rotary_interleaved: bool = False,
    block_table: Optional[Tensor] = None,
):
    """Decoding with a KV cache, as FlashAttention's ``flash_attn_with_kvcache``.

    ``q`` ``(B, Tq, H, D)`` (Tq = 1 for one decoding step); ``k_cache`` / ``v_cache``
    ``(B, Tcache, Hkv, D)`` hold ``cache_seqlens[b]`` valid positions for sequence b
    (int32 ``(B,)`` or one int). When ``k_new`` / ``v_new`` ``(B, Tnew, Hkv, D)`` are given
    they are written into the caches in place at positions ``cache_seqlens[b] ...``, and
    the queries attend over the ``cache_seqlens[b] + Tnew`` keys of their sequence (causal:
    bottom-right aligned, so new token t sees the cache and new tokens up to t). The caller
    advances ``cache_seqlens``. Returns out (and lse with ``return_lse=True``).

    Rotary inside the call (``rotary_cos`` / ``rotary_sin`` ``(max_T, rotary_dim / 2)``
    caches, e.g. :class:`fastllm.nn.RotaryEmbedding`'s; ``rotary_interleaved`` picks the
    GPT-J layout): ``k_new`` is rotated at its positions ``cache_seqlens[b] + t`` before it
    is written, and ``q`` with it — at ``cache_seqlens[b] + t`` when ``causal`` or a window
    is set, else every query at ``cache_seqlens[b]`` (FlashAttention's convention). The
    caller's ``q`` and ``k_new`` are not modified. Needs ``k_new``.

    Paged cache (``block_table`` int32 ``(B, max_blocks)``, vLLM's / FlashAttention's layout):
    ``k_cache`` / ``v_cache`` are a pool ``(num_blocks, block_size, Hkv, D)`` and position p
    of sequence b lives in block ``block_table[b, p // block_size]`` at row
    ``p % block_size``; each sequence holds up to ``max_blocks * block_size`` positions. New
    keys are written into their blocks in place. The attention then reads the blocks of
    ``block_table`` through one gather (a copy of ``B * max_blocks * block_size`` rows per
    call; the kernels do not walk block tables themselves yet).

    ``cache_seqlens[b]`` must be in ``[0, capacity - Tnew]``: an int or CPU tensor out of
    that range (or a block id outside the pool) raises a ValueError naming the entry. On CUDA
    tensors (and under torch.compile) the values are not read, which would cost a host sync:
    a sequence with an out-of-range length (or block id) then keeps its cache untouched and
    gets NaN output (and lse).
    """
    op = "attention_with_kvcache"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_float_tensor(op, name, t)
    paged = block_table is not None
    cache_layout = "(num_blocks, block_size, Hkv, D)" if paged else "(B, Tcache, Hkv, D)"
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: q must be (B, Tq, H, D) and k_cache / v_cache {cache_layout} of one "
            f"shape, got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
            f"{tuple(v_cache.shape)}"
        )
    batch = q.shape[0]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_same_device(op, name, t, q)
    if paged:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
            got = block_table.dtype if isinstance(block_table, Tensor) else type(block_table).__name__
            raise TypeError(f"{op}: block_table must be an int32 Tensor (B, max_blocks), got {got}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(
                f"{op}: block_table must have shape (B={batch}, max_blocks), got "
                f"{tuple(block_table.shape)}"
            )
        check_same_device(op, "block_table", block_table, q)
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        cache_len = block_table.shape[1] * block_size  # positions per sequence
    else:
        cache_len = k_cache.shape[1]
        if k_cache.shape[0] != batch:
            raise ValueError(f"{op}: k_cache must have q's batch {batch}, got {k_cache.shape[0]}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: k_new and v_new must be given together")
    t_new = 0
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_float_tensor(op, name, t)
            check_same_device(op, name, t, q)
        t_new = k_new.shape[1] if k_new.dim() == 4 else -1
        expected = (batch, t_new) + tuple(k_cache.shape[2:])
        if tuple(k_new.shape) != expected or tuple(v_new.shape) != expected:
            raise ValueError(
                f"{op}: k_new and v_new must be (B, Tnew, Hkv, D) = (B={batch}, Tnew, "
                f"{', '.join(map(str, k_cache.shape[2:]))}), got {tuple(k_new.shape)} and "
                f"{tuple(v_new.shape)}"
            )
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError(f"{op}: rotary_cos and rotary_sin must be given together")
        if k_new is None:
            raise ValueError(
                f"{op}: rotary_cos / rotary_sin rotate k_new (and q) before the cache write; "
                "pass k_new and v_new"
            )
    room = cache_len - t_new  # the largest valid cache_seqlens
    if cache_seqlens is None:
        raise ValueError(f"{op}: cache_seqlens (int32 (B,) or an int) is required")
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, Tensor)):
        raise TypeError(
            f"{op}: cache_seqlens must be an int or an integer tensor of shape ({batch},), got "
            f"{type(cache_seqlens).__name__}"
        )
    capacity = f"{'max_blocks * block_size' if paged else 'Tcache'} {cache_len} - Tnew {t_new}"
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= room:
            raise ValueError(
                f"{op}: cache_seqlens must be in [0, {room}] ({capacity}), got {cache_seqlens}"
            )
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or cache_seqlens.shape != (batch,):
        raise ValueError(
            f"{op}: cache_seqlens must be an int32 / int64 tensor of shape ({batch},), got "
            f"{cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}"
        )
    check_same_device(op, "cache_seqlens", cache_seqlens, q)
    cache_seqlens = cache_seqlens.to(torch.int32)
    valid = None  # (B,) bool where the values cannot be read (a GPU, or tracing)
    lengths = None  # cache_seqlens' values, where they can be read
    readable = values_readable(cache_seqlens, *((block_table,) if paged else ())) and not q.is_meta
    if readable:
        lengths = cache_seqlens.tolist()
        for b, n in enumerate(lengths):
            if not 0 <= n <= room:
                raise ValueError(
                    f"{op}: cache_seqlens[{b}] must be in [0, {room}] ({capacity}), got {n}"
                )
        if paged and block_table.numel() > 0:
            bad = (block_table < 0) | (block_table >= num_blocks)
            if bool(bad.any()):
                b, j = (int(x) for x in bad.nonzero()[0])
                raise ValueError(
                    f"{op}: block_table[{b}, {j}] must be a block of the pool, in [0, "
                    f"{num_blocks}), got {int(block_table[b, j])}"
                )
    else:
        # No host sync: a sequence with an out-of-range length (or block id) keeps its cache
        # as it was and gets NaN (as a CUDA cross-entropy row with an out-of-range target).
        valid = (cache_seqlens >= 0) & (cache_seqlens <= room)
        cache_seqlens = torch.where(valid, cache_seqlens, torch.zeros_like(cache_seqlens))
        if paged:
            in_pool = (block_table >= 0) & (block_table < num_blocks)
            valid = valid & in_pool.all(dim=1)
            block_table = torch.where(in_pool, block_table, torch.zeros_like(block_table))
    if rotary:
        q, k_new = _rotate_for_cache(q, k_new, rotary_cos, rotary_sin, rotary_interleaved,
                                     cache_seqlens, causal or tuple(window_size) != (-1, -1))
    seqused_k = cache_seqlens
    if k_new is not None:
        uniform = lengths is not None and len(set(lengths)) == 1
        with torch.no_grad():
            if lengths is not None and not paged and (batch <= 4 or uniform):
                # Lengths known (CPU tensors, not traced), one or a few sequences or all of one
                # length: the new rows as slice copies, 2 small ops (2 per sequence) instead of
                # the index tensors and index_put_ below (a one-token call: ~20 us less).
                if uniform:
                    k_cache[:, lengths[0]:lengths[0] + t_new].copy_(k_new)
                    v_cache[:, lengths[0]:lengths[0] + t_new].copy_(v_new)
                else:
                    for b, n in enumerate(lengths):
                        k_cache[b, n:n + t_new].copy_(k_new[b])
                        v_cache[b, n:n + t_new].copy_(v_new[b])
            else:
                # Append in place at each sequence's end (index_put_ is traced by
                # torch.compile).
                pos = cache_seqlens.long()[:, None] + torch.arange(t_new, device=q.device)
                if paged:
                    blocks = block_table.long()
                    index = (blocks.gather(1, pos // block_size), pos % block_size)
                else:
                    index = (torch.arange(batch, device=q.device)[:, None].expand(batch, t_new),
                             pos)
                for cache, new in ((k_cache, k_new), (v_cache, v_new)):
                    new = new.to(cache.dtype)
                    if valid is not None:
                        new = torch.where(valid[:, None, None, None], new, cache[index])
                    cache.index_put_(index, new)
        seqused_k = cache_seqlens + t_new
    if paged:
        # (B, max_blocks, block_size, Hkv, D) -> (B, capacity, Hkv, D): the sequences' blocks.
        rows = block_table.long()
        k_cache = k_cache[rows].flatten(1, 2)
        v_cache = v_cache[rows].flatten(1, 2)
    result = attention(
        q, k_cache, v_cache, causal=causal, softmax_scale=softmax_scale,
        window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
        return_lse=return_lse, seqused_k=seqused_k,
    )
    if valid is None:
        return result
    out, lse = result if return_lse else (result, None)
    out = torch.where(valid[:, None, None, None], out, torch.full_like(out, float("nan")))
    if lse is None:
        return out
    return out, torch.where(valid[:, None, None], lse, torch.full_like(lse, float("nan")))


def _rotate_for_cache(q: Tensor, k_new: Tensor, cos: Tensor, sin: Tensor, interleaved: bool,
                      cache_seqlens: Tensor, per_token: bool) -> tuple[Tensor, Tensor]:
    """q and k_new rotated at their cache positions (attention_with_kvcache's docstring);
    new tensors, the caller's are left as they are."""
    from fastllm.ops.rotary import apply_rotary, apply_rotary_qk

    offsets = cache_seqlens  # (B,): token t of sequence b at cache_seqlens[b] + t
    if per_token and q.shape[1] == k_new.shape[1]:
        return apply_rotary_qk(q, k_new, cos, sin, position_ids=offsets, interleaved=interleaved)
    k_new = apply_rotary(k_new, cos, sin, position_ids=offsets, interleaved=interleaved)
    if per_token:  # Tq != Tnew: the queries are the last Tq tokens of the new ones
        q_pos = offsets[:, None] + (k_new.shape[1] - q.shape[1]) + torch.arange(
            q.shape[1], device=q.device, dtype=offsets.dtype)
    else:  # every query at the sequence's current position
        q_pos = offsets[:, None].expand(q.shape[0], q.shape[1])
    return apply_rotary(q, cos, sin, position_ids=q_pos.contiguous(), interleaved=interleaved), k_new
