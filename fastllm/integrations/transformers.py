"""fastllm's fused attention as a Hugging Face ``transformers`` attention implementation.

    import fastllm.integrations.transformers as fastllm_hf
    fastllm_hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastllm")

``register()`` adds ``"fastllm"`` to transformers' own extension points, the two registries
every modern model reads its attention through:

- ``AttentionInterface``: :func:`fastllm_attention_forward` runs
  ``fastllm.functional.attention`` on the model's (B, H, T, D) q / k / v (as strided views, no
  copy, GQA without ``repeat_kv``).
- ``AttentionMaskInterface``: :func:`fastllm_mask`. Without a mask function of its own an
  implementation gets *no* mask at all (transformers skips mask creation for names it does
  not know, silently losing causality and padding). Ours keeps the O(B * Tk) padding mask
  instead of expanding it to (B, 1, Tq, Tk) where the pattern is plain causal or
  bidirectional: ``(B, Tk)`` bool for bidirectional padding and ``(B, 1, Tk)`` bool for
  causal padding (the rank says which, so the attention never guesses causality from module
  flags); any other pattern (sliding windows, packed sequences, static caches, chunked or
  custom masks) is transformers' own 4D boolean mask, applied as an additive bias.

Nothing in ``transformers`` is overwritten: ``register()`` only adds a key, the models keep
running ``"sdpa"`` / ``"eager"`` until a model is switched (``from_pretrained(...,
attn_implementation="fastllm")`` or ``model.set_attn_implementation("fastllm")``, which
``fastllm.patch`` does per instance).

Per-call features the fused kernels do not have fall back to the model's own eager attention
for that call, with a debug log: ``output_attentions=True`` (the kernels never form the
weights).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fastllm.functional import attention
from fastllm.ops.attention import MAX_HEAD_DIM

logger = logging.getLogger(__name__)

NAME = "fastllm"

# The transformers releases whose model code fastllm's patches were tested against. The
# attention / mask interfaces exist from 4.53, but the attention modules' forwards that
# fastllm.patch re-implements (rotary) changed in 5.x; FASTLLM_ALLOW_UNTESTED_TRANSFORMERS=1
# lets a user try another version at their own risk.
TESTED_TRANSFORMERS = ("5.25", "6.0")  # [min, max)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed_version() -> str:
    """The installed transformers' version (an ImportError naming the extra if missing)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fastllm's transformers integration needs `transformers` (pip install 'fastllm[hf]')"
        ) from e
    return transformers.__version__


def check_version(version: Optional[str] = None) -> str:
    """The installed transformers version if it is in :data:`TESTED_TRANSFORMERS`; else a
    RuntimeError naming the version and the range (set ``FASTLLM_ALLOW_UNTESTED_TRANSFORMERS=1``
    to go ahead anyway)."""
    if version is None:
        version = installed_version()
    low, high = TESTED_TRANSFORMERS
    ok = _version_tuple(low) <= _version_tuple(version) < _version_tuple(high)
    if not ok and os.environ.get("FASTLLM_ALLOW_UNTESTED_TRANSFORMERS") != "1":
        raise RuntimeError(
            f"fastllm: transformers {version} is outside the tested range >= {low}, < {high}; "
            f"nothing was changed. Set FASTLLM_ALLOW_UNTESTED_TRANSFORMERS=1 to try it anyway."
        )
    return version


# ----- the mask function -------------------------------------------------------------------

def fastllm_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[Tensor] = None,
    **kwargs,
) -> Optional[Tensor]:
    """transformers' mask-interface call: the compact padding mask where the pattern allows it
    (see the module docstring), else transformers' own ``sdpa_mask`` (4D bool or None)."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    causal = mask_function is mu.causal_mask_function
    bidirectional = mask_function is mu.bidirectional_mask_function
    # fastllm's causal attention aligns the last query with the last key (KV-cache
    # convention); transformers places queries by offset. They agree when the queries are the
    # last q_length of the keys, which a static cache (tensor offsets, trailing empty slots)
    # breaks.
    aligned = (isinstance(q_offset, int) and isinstance(kv_offset, int)
               and q_offset + q_length == kv_offset + kv_length)
    if (causal and aligned) or (bidirectional and kv_offset == 0):
        if attention_mask is None:
            return None
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset: kv_offset + kv_length].bool()  # (B, Tk)
        if padding.shape[0] != batch_size:
            padding = padding.expand(batch_size, -1)
        return padding[:, None, :] if causal else padding  # (B, 1, Tk) causal, (B, Tk) not
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                        q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, **kwargs)


# ----- the attention function --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _log_fallback_once(reason: str) -> None:
    logger.debug("fastllm attention runs transformers' eager attention: %s", reason)


def _dense_mask(mask: Optional[Tensor], causal: bool, tq: int, tk: int, batch: int,
                device) -> Optional[Tensor]:
    """Any mask this module produces (or transformers' 4D one) as a (B, 1, Tq, Tk) bool."""
    if mask is not None and mask.dim() == 4:
        return mask if mask.dtype == torch.bool else None
    keep = torch.ones(batch, 1, tq, tk, dtype=torch.bool, device=device)
    if causal:  # bottom-right aligned
        keep = keep & torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    if mask is not None:
        keep = keep & mask.reshape(mask.shape[0], 1, 1, tk)
    return keep


def _eager_fallback(module, query, key, value, mask, causal, dropout, scaling, **kwargs):
    """The model's own ``eager_attention_forward`` (read from its modeling module), with our
    mask expanded to the additive float mask it takes."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"fastllm attention: {type(module).__name__} has no eager attention to fall back "
            f"to for output_attentions=True"
        )
    B, _, tq, _ = query.shape
    tk = key.shape[2]
    if mask is not None and mask.dim() == 4 and mask.is_floating_point():
        float_mask = mask
    else:
        keep = _dense_mask(mask, causal, tq, tk, B, query.device)
        float_mask = torch.zeros(keep.shape, dtype=query.dtype, device=query.device)
        float_mask.masked_fill_(~keep, torch.finfo(query.dtype).min)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return eager(module, query, key, value, float_mask, dropout=dropout, scaling=scaling,
                 **kwargs)


def fastllm_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-interface call: query (B, H, Tq, D), key / value
    (B, Hkv, Tk, D) -> ((B, Tq, H, D), None), through ``fastllm.functional.attention``.

    Causality: a compact mask from :func:`fastllm_mask` says it by its rank; with no mask the
    module's ``is_causal`` (or the call's ``is_causal``) decides, as in transformers' sdpa
    attention; a 4D mask already holds it. ``position_bias`` (T5-style) and float 4D masks
    are added to the scores through the fused kernels' ``attn_bias``.
    """
    if kwargs.get("output_attentions"):
        _log_fallback_once("output_attentions=True (the fused kernels never form the weights)")
        causal = _causal(module, attention_mask, is_causal, query.shape[2])
        return _eager_fallback(module, query, key, value, attention_mask, causal, dropout,
                               scaling, position_bias=position_bias, softcap=softcap, **kwargs)

    causal = _causal(module, attention_mask, is_causal, query.shape[2])
    if not _fused_can_run(query, value):
        _log_fallback_once(f"head dims {query.shape[-1]}/{value.shape[-1]} (fused: equal, "
                           f"<= {MAX_HEAD_DIM})")
        return _eager_fallback(module, query, key, value, attention_mask, causal, dropout,
                               scaling, position_bias=position_bias, softcap=softcap, **kwargs)
    key_padding_mask = attn_bias = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # (B, Tk) bidirectional padding
            key_padding_mask = attention_mask
        elif attention_mask.dim() == 3:  # (B, 1, Tk) causal padding
            key_padding_mask = attention_mask[:, 0, :]
        elif attention_mask.dtype == torch.bool:  # transformers' (B, 1, Tq, Tk)
            attn_bias = torch.zeros(attention_mask.shape, dtype=query.dtype,
                                    device=query.device)
            attn_bias.masked_fill_(~attention_mask, float("-inf"))
        else:  # an additive float mask
            attn_bias = attention_mask
    if position_bias is not None:
        attn_bias = position_bias if attn_bias is None else attn_bias + position_bias
    q = query.transpose(1, 2)  # (B, Tq, H, D) view
    k = key.transpose(1, 2)  # (B, Tk, Hkv, D) view
    v = value.transpose(1, 2)
    out = attention(
        q, k, v, causal=causal, softmax_scale=scaling, dropout_p=dropout,
        softcap=float(softcap or 0.0), attn_bias=attn_bias, key_padding_mask=key_padding_mask,
    )  # (B, Tq, H, D)
    return out, None


def _fused_can_run(query: Tensor, value: Tensor) -> bool:
    return query.shape[-1] == value.shape[-1] and query.shape[-1] <= MAX_HEAD_DIM


def _causal(module, attention_mask, is_causal, q_length: int) -> bool:
    if attention_mask is not None:
        if attention_mask.dim() == 3:
            return True
        if attention_mask.dim() == 2 or attention_mask.dim() == 4:
            return False
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and q_length > 1


# ----- registration ------------------------------------------------------------------------

def register() -> None:
    """Adds ``"fastllm"`` to transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
    (idempotent). Afterwards ``attn_implementation="fastllm"`` works in ``from_pretrained``,
    model constructors and ``set_attn_implementation``."""
    check_version()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fastllm_attention_forward)
    AttentionMaskInterface.register(NAME, fastllm_mask)

