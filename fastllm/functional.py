"""fastllm's public functions, with ``torch.nn.functional``-like signatures.

Each runs on the backend chosen by ``fastllm.use_backend`` / ``FASTLLM_BACKEND``
(see fastllm/backend.py) and is differentiable and ``torch.compile``-able.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from fastllm.ops import attention as _attention
from fastllm.ops import cross_entropy as _cross_entropy
from fastllm.ops import norm as _norm

_Shape = Union[int, Sequence[int]]


def layer_norm(
    input: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Statistics accumulate in float32 (float64 for float64 input); the output has the
    input's dtype. ``weight``/``bias`` have the input's dtype, or float32 with a
    bfloat16/float16 input. Non-contiguous inputs are accepted.
    """
    return _norm.layer_norm(input, normalized_shape, weight, bias, eps)


def rms_norm(
    input: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Root-mean-square normalisation, as ``torch.nn.functional.rms_norm``:
    ``x / sqrt(mean(x^2) + eps) * weight``. ``eps=None`` uses
    ``torch.finfo(torch.float32).eps`` for float32/bfloat16/float16 input (what torch's
    kernel does) and the float64 epsilon for float64 input.
    """
    return _norm.rms_norm(input, normalized_shape, weight, eps)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """The pre-norm block pattern in one fused pass: returns
    ``(layer_norm(input + residual), input + residual)``. The sum is rounded to the input
    dtype before it is normalised, exactly as the unfused code would do.
    """
    return _norm.add_layer_norm(input, residual, normalized_shape, weight, bias, eps)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(input + residual), input + residual)`` in one fused pass."""
    return _norm.add_rms_norm(input, residual, normalized_shape, weight, eps)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    *,
    inplace_backward: bool = False,
) -> Tensor:
    """Cross-entropy of logits and class-index targets with torch's semantics
    (``torch.nn.functional.cross_entropy``), from one fused pass over each row of logits:

    - ``input`` ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` (class dimension 1, as torch; a
      language model's ``(B, T, V)`` logits are passed as ``logits.view(-1, V)``), float32,
      bfloat16, float16 or float64; ``target`` int64 (or uint8) of input's shape without
      the class dimension. Floating ``target`` (class probabilities) runs torch's own op.
    - ``weight`` (C,): class weights; ``reduction="mean"`` then divides by the summed weights
      of the non-ignored targets, and label smoothing is weighted as in torch.
    - rows whose target is ``ignore_index`` add nothing; with every row ignored, ``mean``
      is nan (and the gradient zero), as in torch.
    - ``z_loss``: adds ``z_loss * logsumexp(z)**2`` per (non-ignored) row, the PaLM
      auxiliary loss that keeps the softmax normaliser near 1.
    - ``softcap``: the logits are soft-capped first, ``z = softcap * tanh(x / softcap)``
      (Gemma 2); with ``z_loss`` the z term uses the log-sum-exp of the capped logits.
    - ``inplace_backward=True``: backward writes the gradient over the logits' storage
      instead of allocating a second (N, C) tensor, so the logits must not be needed
      afterwards (a second backward through the graph raises). Only when asked.

    Arithmetic is in float32 (float64 for float64 input); the loss comes back in the input's
    dtype. A target outside ``[0, C)`` that is not ``ignore_index`` raises an IndexError
    naming the row on CPU; CUDA kernels give that row a NaN loss (no device synchronisation).
    """
    return _cross_entropy.cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        inplace_backward,
    )


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    ignore_index: Optional[int] = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without ever
    holding the ``(N, num_classes)`` logits: the rows are processed ``chunk_size`` at a time
    (default: chunks whose logits take about as much memory as ``input``), with torch's GEMMs
    and the fused cross-entropy kernels. Gradients flow to ``input``, ``linear_weight`` and
    ``linear_bias``.

    ``input`` is ``(..., in_features)`` with ``target`` of shape ``input.shape[:-1]``;
    ``linear_weight`` ``(num_classes, in_features)`` and ``linear_bias`` ``(num_classes,)``
    in the input's dtype. Keyword arguments as ``torch.nn.functional.linear_cross_entropy``
    (``weight`` = class weights, ``ignore_index=None`` means -100) plus ``z_loss``,
    ``softcap`` and ``chunk_size`` (rows per chunk).

    With ``reduction`` "mean" or "sum" the forward also computes the gradients (the upstream
    gradient of a scalar loss only scales them), so training costs the same three GEMMs as the
    unfused path. With "none", backward recomputes each chunk's logits (one more GEMM).
    """
    return _cross_entropy.linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
    )


__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "cross_entropy",
    "linear_cross_entropy",
]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
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
    - A query row with no allowed key gets zeros (and zero gradients), never NaN.
    - ``return_lse=True`` returns ``(out, lse)``, lse float32 ``(B, H, Tq)`` (packed:
      ``(H, total_q)``), natural log, ``-inf`` for rows without keys; not differentiable.
    """
    return _attention.attention(
        q, k, v, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse, seqused_k=seqused_k,
    )


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
    query, ``(..., Hkv, S, E)`` key, ``(..., Hkv, S, Ev)`` value (3-D inputs are one head),
    ``is_causal`` aligned top-left exactly like torch's, ``enable_gqa`` as torch.

    Without ``attn_mask`` it runs the fused kernels on transposed views (no copies). With a
    boolean (True = take part) or additive ``attn_mask`` — or ``Ev != E`` — it runs a slower
    plain-PyTorch path with O(L * S) memory that gives the same results. One deliberate
    difference from torch: a query row whose keys are all masked gives zeros, not NaN.
    ``dropout_p > 0`` uses fastllm's dropout mask (torch's own on the masked path), so the
    dropped entries differ from torch's for the same seed.
    """
    return _attention.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
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
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Decoding with a KV cache, as FlashAttention's ``flash_attn_with_kvcache``.

    ``q`` ``(B, Tq, H, D)`` (Tq = 1 for one decoding step); ``k_cache`` / ``v_cache``
    ``(B, Tcache, Hkv, D)`` hold ``cache_seqlens[b]`` valid positions for sequence b
    (int32 ``(B,)`` or one int). When ``k_new`` / ``v_new`` ``(B, Tnew, Hkv, D)`` are given
    they are written into the caches in place at positions ``cache_seqlens[b] ...``, and
    the queries attend over the ``cache_seqlens[b] + Tnew`` keys of their sequence (causal:
    bottom-right aligned, so new token t sees the cache and new tokens up to t). The caller
    advances ``cache_seqlens``. Returns out (and lse with ``return_lse=True``).
    """
    return _attention.attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal, softmax_scale, window_size,
        alibi_slopes, softcap, return_lse,
    )
