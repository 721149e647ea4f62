"""MultiheadAttention: a drop-in replacement for torch.nn.MultiheadAttention whose attention
core runs fastllm's fused kernels (``fastllm.functional.attention``, through the SDPA
drop-in's helper ``fastllm.ops.attention._fused_sdpa``, which takes a causal hint, a key
padding mask and a bias at once).

Math (per batch element n and head h, with E = embed_dim, H = num_heads, D = E // H):
    q = query @ W_q^T + b_q,  k = key @ W_k^T + b_k,  v = value @ W_v^T + b_v
    O_h = softmax(q_h k_h^T / sqrt(D) + mask) v_h           (dropout on the probabilities)
    out = concat_h(O_h) @ W_o^T + b_o

It subclasses torch's module, so the constructor, parameters (``in_proj_weight`` or
``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``), ``state_dict``
keys, ``repr`` and ``isinstance`` checks are torch's own; only ``forward`` differs.

Shape glossary:
    N  batch size           L  target (query) length    S  source (key/value) length
    E  embed_dim            H  num_heads                D  head_dim = E // H
    kdim / vdim             feature sizes of key / value (default E)
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as torch_F

from fastllm.ops.attention import _fused_sdpa

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _log_fallback_once(reason: str) -> None:
    logger.debug("fastllm.nn.MultiheadAttention runs torch's implementation: %s", reason)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in ``torch.nn.MultiheadAttention`` whose attention runs fastllm's fused kernels.

    .. important::
        ``need_weights=True`` is torch's default, and the fused kernels never form the
        (L, S) attention weights. A call that needs them -- including the plain
        ``mha(x, x, x)`` -- runs **torch's own implementation** (``super().forward``), with
        torch's numerics and dropout. Pass ``need_weights=False`` to get the fused path::

            out, _ = mha(x, x, x, need_weights=False)

        The fallback is logged once per process at DEBUG level on the ``fastllm.nn.attention``
        logger rather than warned about: it is correct behaviour the caller asked for, and a
        warning on torch's default call would fire in nearly every existing program.

    Constructor arguments, parameters and ``state_dict`` keys are torch's (it subclasses
    ``torch.nn.MultiheadAttention``); checkpoints load both ways unchanged.

    The fused path (``need_weights=False``) supports everything torch's ``forward`` does:
    ``batch_first`` True/False and unbatched (2-D) inputs; self-attention (one packed
    projection when ``query is key is value``), encoder-decoder (``key is value``) and general
    cross-attention, with ``kdim``/``vdim`` != ``embed_dim`` (separate projection weights);
    ``key_padding_mask`` (N, S) and ``attn_mask`` (L, S) or (N * H, L, S), boolean (MHA's
    convention: ``True`` = may *not* attend -- the opposite of ``scaled_dot_product_attention``)
    or additive float, merged as torch merges them; ``add_bias_kv`` and ``add_zero_attn``;
    dropout on the attention probabilities in training mode only.

    Masks run the fused kernels too, with torch's semantics (its merge of the two masks
    included): a boolean ``key_padding_mask`` becomes the kernels' own (N, S) key mask
    (O(N * S) memory, nothing (L, S)-sized is formed); ``attn_mask`` becomes an additive bias
    of its own shape ((L, S) or (N * H, L, S); a boolean one as 0 / -inf); a float
    ``key_padding_mask`` is added to that bias as (N, 1, 1, S), as torch adds them. A float
    mask that requires grad gets its gradient, as with torch. With ``is_causal=True`` and no
    ``key_padding_mask`` (torch then ignores ``attn_mask`` and trusts the hint) the causal
    kernel runs with no mask at all.

    Differences from torch, all on inputs where torch fails or gives NaN:

    - ``is_causal=True`` with ``attn_mask=None`` means causal attention, as if ``attn_mask``
      were the top-left (L, S) causal mask (torch raises "Need attn_mask if specifying the
      is_causal hint"). This holds on the fallback path too.
    - A query whose keys are all masked gets a zero attention output (hence
      ``out_proj.bias``) where torch's ``need_weights=True`` path gives NaN.
    - Dropout draws fastllm's own random mask (reproducible under ``torch.manual_seed``),
      not torch's; it has the same distribution.

    Also run by torch: nested-tensor inputs.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        fallback = None
        if need_weights:
            fallback = "need_weights=True (pass need_weights=False for the fused kernels)"
        elif query.is_nested or key.is_nested or value.is_nested:
            fallback = "nested-tensor inputs"
        if fallback is not None:
            if not torch.compiler.is_compiling():
                _log_fallback_once(fallback)
            if is_causal and attn_mask is None and query.dim() in (2, 3):
                attn_mask = _causal_ignore_mask(query, key, self.batch_first)
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _fused_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
        is_causal: bool,
    ) -> Tensor:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        # Unbatched inputs get a leading batch dim; torch ignores batch_first for them.
        batch_first = self.batch_first or not batched
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch_dim, seq_dim = (0, 1) if batch_first else (1, 0)
        batch, tgt_len, src_len = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
        num_heads = self.num_heads

        if is_causal and key_padding_mask is None:
            # torch's rule: the hint alone decides, attn_mask is not read.
            attn_mask = None
        elif is_causal and attn_mask is not None:
            # torch merges attn_mask with key_padding_mask and then ignores the hint.
            is_causal = False
        # Left: is_causal with a key_padding_mask and no attn_mask (fastllm's extension, as
        # if attn_mask were the top-left (L, S) causal mask): the causal kernel reads no mask.
        q, k, v = self._in_projection(query, key, value)
        q, k, v = (_split_heads(t, num_heads, batch_first) for t in (q, k, v))  # (N, H, T, D)

        extra_keys = 0
        if self.bias_k is not None and self.bias_v is not None:
            bias_k = _split_heads(self.bias_k, num_heads, True)  # (1, H, 1, D)
            bias_v = _split_heads(self.bias_v, num_heads, True)
            k = torch.cat([k, bias_k.expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v, bias_v.expand(batch, -1, -1, -1)], dim=2)
            extra_keys += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, num_heads, 1, self.head_dim)], dim=2)
            extra_keys += 1

        if is_causal and extra_keys and key_padding_mask is not None:
            # As if attn_mask were the (L, S) causal mask: torch pads it with "allowed" for
            # the appended keys, which the top-left causal kernel would hide from the first
            # rows. (Without key_padding_mask torch runs SDPA's is_causal over them, as here.)
            attn_mask, is_causal = _causal_ignore_mask(query, key, batch_first), False
        attn_bias, keep = _fused_masks(
            attn_mask, key_padding_mask, batch, num_heads, tgt_len, src_len, extra_keys,
            q.dtype,
        )
        dropout_p = self.dropout if self.training else 0.0
        out = _fused_sdpa(
            q, k, v, self.head_dim ** -0.5, dropout_p, is_causal, attn_bias, keep
        )  # (N, H, L, D)

        if batch_first:
            out = out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, batch, self.embed_dim)
        out = torch_F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(0)

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor):
        """q, k, v with E features each, in the inputs' own layout. Self-attention projects
        once with the packed weight and returns strided views of that one result (the
        kernels take any strides, so nothing is copied)."""
        embed_dim, bias = self.embed_dim, self.in_proj_bias
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            if key is value:
                if query is key:
                    qkv = torch_F.linear(query, weight, bias)
                    return qkv.unflatten(-1, (3, embed_dim)).unbind(-2)
                w_q, w_kv = weight.split([embed_dim, 2 * embed_dim])
                b_q, b_kv = (None, None) if bias is None else bias.split([embed_dim, 2 * embed_dim])
                k, v = torch_F.linear(key, w_kv, b_kv).unflatten(-1, (2, embed_dim)).unbind(-2)
                return torch_F.linear(query, w_q, b_q), k, v
            w_q, w_k, w_v = weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        return (
            torch_F.linear(query, w_q, b_q),
            torch_F.linear(key, w_k, b_k),
            torch_F.linear(value, w_v, b_v),
        )

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
    ) -> bool:
        """torch's shape checks (same exception types, so code that catches them still
        works), with messages that name the argument. Returns whether the input is batched."""
        if query.dim() not in (2, 3):
            raise AssertionError(
                "query should be unbatched 2D or batched 3D tensor but received "
                f"{query.dim()}-D query tensor"
            )
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise AssertionError(
                f"For {query.dim()}-D `query`, expected `key` and `value` to be {query.dim()}-D "
                f"but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        for name, t, features in (
            ("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)
        ):
            if t.shape[-1] != features:
                raise AssertionError(
                    f"{name} must have {features} features (last dim), got shape {tuple(t.shape)}"
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(
                f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match value's "
                f"{tuple(value.shape[:-1])}"
            )
        if batched:
            batch_dim, seq_dim = (0, 1) if self.batch_first else (1, 0)
            batch = query.shape[batch_dim]
            if key.shape[batch_dim] != batch:
                raise AssertionError(
                    f"key and value must have query's batch size {batch}, "
                    f"got {key.shape[batch_dim]}"
                )
        else:
            batch, seq_dim = 1, 0
        tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]

        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise AssertionError(f"only bool and floating types of {name} are supported")
        if key_padding_mask is not None:
            expected = (batch, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise AssertionError(
                    f"key_padding_mask must be {'(N, S)' if batched else '(S,)'} = {expected}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                expected = (tgt_len, src_len)
            elif attn_mask.dim() == 3:
                expected = (batch * self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, "
                    f"but should be {expected}."
                )
        if (
            key_padding_mask is not None
            and attn_mask is not None
            and key_padding_mask.dtype != attn_mask.dtype
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. "
                "Use same type for both instead.",
                stacklevel=2,
            )
        return batched


def _split_heads(x: Tensor, num_heads: int, batch_first: bool) -> Tensor:
    """(N, T, E) if batch_first else (T, N, E) -> (N, H, T, D), a view."""
    x = x.unflatten(-1, (num_heads, -1))
    return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)


def _causal_ignore_mask(query: Tensor, key: Tensor, batch_first: bool) -> Tensor:
    """The top-left (L, S) causal mask in MHA's convention (True = may not attend)."""
    seq_dim = 1 if (batch_first and query.dim() == 3) else 0
    tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
    return torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).triu_(1)


def _fused_masks(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    batch: int,
    num_heads: int,
    tgt_len: int,
    src_len: int,
    extra_keys: int,
    dtype: torch.dtype,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """MHA's masks -> the fused kernels' (attn_bias, key_padding_mask), torch's semantics.

    MHA's boolean masks say True = may *not* attend; the kernels' key_padding_mask says
    True = takes part. So:

    - a boolean ``key_padding_mask`` (N, S) becomes the kernels' (N, S) mask (negated):
      O(N * S), whatever else is given;
    - ``attn_mask`` (L, S) or (N * H, L, S) becomes a bias of its own shape ((1, 1, L, S) or
      (N, H, L, S), a view when it is float, else 0 / -inf in ``dtype``);
    - a float ``key_padding_mask`` is an additive (N, 1, 1, S) bias, summed with
      ``attn_mask``'s bias when both are given (torch adds them too).

    torch converts every boolean mask to -inf and adds; the results are the same (up to
    fully masked rows, which give zeros here and NaN in torch). ``extra_keys``
    (bias_k / bias_v, zero attention) are appended keys every query may attend to.
    """
    bias = keep = None
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, num_heads, tgt_len, src_len)
        else:
            attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
            bias = bias.masked_fill_(attn_mask, float("-inf"))
        else:
            bias = attn_mask
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            keep = ~key_padding_mask  # (N, S)
        else:
            padding = key_padding_mask.view(batch, 1, 1, src_len)
            bias = padding if bias is None else bias + padding
    if extra_keys:
        if bias is not None:
            bias = torch_F.pad(bias, (0, extra_keys))
        if keep is not None:
            keep = torch.cat([keep, keep.new_ones(batch, extra_keys)], dim=1)
    return bias, keep
