"""What every model of ``fastllm.models`` shares: the config base with its ``from_name`` table,
the output dataclass (Hugging Face's field names), input checks, and the causal-LM loss.

Input checks name the model, the argument and the expected and actual value. Shapes and
dtypes are always checked; values (a token id outside the vocabulary, a position outside
the table, a label outside [0, V)) only where ``fastllm.ops._family.values_readable`` says
they may be read: on CPU tensors and outside torch.compile tracing. Reading a CUDA tensor's
values would synchronise with the device every step (there torch's embedding asserts on
the device and the fused loss gives a bad label's row a NaN), and a value check while
tracing would break ``torch.compile(fullgraph=True)``.

Shapes: B batch, T tokens, C hidden features, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor

from fastllm.functional import linear_cross_entropy
from fastllm.ops._family import values_readable

IGNORE_INDEX = -100

# One layer's generation cache: k_cache, v_cache (B, Tcache, Hkv, D) and cache_seqlens (B,)
# int32, as fastllm.functional.attention_with_kvcache takes them (fastllm/models/generation.py).
LayerCache = tuple[Tensor, Tensor, Tensor]


class ModelConfig:
    """Base of the dataclass configs. Each subclass holds a ``names`` table (name -> field
    overrides) read by :meth:`from_name`, and computes its derived fields in
    ``__post_init__``."""

    names: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_name(cls, name: str, **overrides):
        """The config registered under ``name``, with ``overrides`` applied on top."""
        if name not in cls.names:
            raise ValueError(
                f"{cls.__name__}.from_name: unknown name {name!r}; known: {sorted(cls.names)}"
            )
        return cls(**{**cls.names[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CausalLMOutput:
    """Output of the causal language models, named as Hugging Face's ``CausalLMOutput``.

    loss: the mean (or, with ``num_items_in_batch``, sum / num_items_in_batch) next-token
        cross-entropy when ``labels`` were given, else None. Always float32, whatever the
        model's dtype, as Hugging Face's causal LMs return it (they upcast the logits):
        micro-batch losses then add up without bfloat16 rounding. The fused kernel
        accumulates in float32; with bfloat16 / float16 hidden states the functional op
        still rounds its result to the input's dtype (torch's rule for
        ``fastllm.functional``), so the value carries that one rounding: up to half a
        bfloat16 ulp, |loss| * 2**-8, which Hugging Face's loss (float32 cross-entropy of
        bf16 logits) does not have.
    logits: (B, T, V); None when ``labels`` were given and ``return_logits`` was False (the
        fused loss never forms them).
    """

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


class InputValueError(ValueError, IndexError):
    """A token id, token type, position or label outside its table. A ValueError (a bad
    argument value) that is also an IndexError, the error torch's embedding and fastllm's
    cross-entropy raise for such an index (as numpy's AxisError is both)."""


def check_input_ids(model: str, input_ids: Tensor, max_positions: Optional[int] = None, *,
                    positions_name: str = "max_positions",
                    vocab_size: Optional[int] = None) -> None:
    """input_ids must be an integer (B, T) tensor of at most ``max_positions`` tokens (the
    config field ``positions_name``), with every id in [0, ``vocab_size``)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{model}: input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{model}: input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"{model}: input_ids must be (B, T), got {tuple(input_ids.shape)}")
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise ValueError(
            f"{model}: input_ids has {input_ids.shape[1]} tokens, more than the position table "
            f"holds ({positions_name}={max_positions})"
        )
    if vocab_size is not None:
        check_index_values(model, "input_ids", input_ids, vocab_size, "vocab_size")


def check_like_input_ids(model: str, name: str, t: Optional[Tensor], input_ids: Tensor, *,
                         floats: bool = False, batch_one: bool = False) -> None:
    """attention_mask / labels / position_ids / token_type_ids: None or an integer or bool
    tensor shaped like input_ids. ``floats``: float tensors are accepted too (Hugging Face's
    float 0/1 attention_mask); ``batch_one``: (1, T) is accepted too (broadcast over B)."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{model}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != input_ids.shape and not (batch_one and t.shape == (1, input_ids.shape[1])):
        also = f" or (1, {input_ids.shape[1]})" if batch_one else ""
        raise ValueError(
            f"{model}: {name} must have input_ids' shape {tuple(input_ids.shape)}{also}, got "
            f"{tuple(t.shape)}"
        )
    if t.is_complex() or (t.is_floating_point() and not floats):
        kinds = "an integer, bool or float" if floats else "an integer or bool"
        raise TypeError(f"{model}: {name} must be {kinds} tensor, got {t.dtype}")


def check_index_values(model: str, name: str, t: Union[None, int, Tensor], limit: Optional[int],
                       limit_name: str, ignore_index: Optional[int] = None) -> None:
    """Every value of ``t`` is in [0, ``limit``) (the config field ``limit_name``; no upper
    bound when ``limit`` is None) or equals ``ignore_index``: else an InputValueError naming
    the first offending element and its value. A tensor's values are read only where
    ``values_readable`` (module docstring); it costs a few passes over the (B, T) ids."""
    if t is None:
        return
    if isinstance(t, int):  # Llama's position offset
        bad_int = t != ignore_index and (t < 0 or (limit is not None and t >= limit))
        if bad_int:
            _raise_out_of_range(model, name, name, t, limit, limit_name, ignore_index)
        return
    if t.numel() == 0 or not values_readable(t):
        return
    bad = t < 0 if limit is None else (t < 0) | (t >= limit)
    if ignore_index is not None:
        bad &= t != ignore_index
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in bad.nonzero()[0])
    where = f"{name}[{', '.join(map(str, index))}]" if index else name
    _raise_out_of_range(model, name, where, int(t[index]), limit, limit_name, ignore_index)


def _raise_out_of_range(model: str, name: str, where: str, value: int, limit: Optional[int],
                        limit_name: str, ignore_index: Optional[int]) -> None:
    want = "must be >= 0" if limit is None else f"must be in [0, {limit}) ({limit_name}={limit})"
    ignored = "" if ignore_index is None else f" or {ignore_index} (ignored)"
    raise InputValueError(f"{model}: {where} = {value} out of range: {name} {want}{ignored}")


def causal_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    num_items_in_batch: Union[None, int, Tensor] = None,
    *,
    shift_labels: Optional[Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Next-token cross-entropy from the final hidden states, by the fused
    ``linear_cross_entropy`` (the (B*T, V) logits are never held).

    hidden (B, T, C), lm_head_weight (V, C), labels (B, T): position t predicts
    ``labels[:, t + 1]`` (the shift happens here, as in Hugging Face), ``ignore_index``
    (-100) is ignored. ``shift_labels`` (B, T), already shifted (Hugging Face's argument of
    that name), replace ``labels`` and the shift: position t predicts ``shift_labels[:, t]``.
    Without ``num_items_in_batch`` the loss is the mean over the non-ignored targets; with
    it, ``sum / num_items_in_batch``: pass the number of non-ignored (shifted) targets of the
    whole accumulated batch, and the summed micro-batch losses equal the full-batch loss.
    Returned in float32 (see :class:`CausalLMOutput`).
    """
    if shift_labels is None:
        hidden = hidden[:, :-1, :]  # (B, T-1, C)
        targets = labels[:, 1:].long()  # (B, T-1)
    else:
        targets = shift_labels.to(hidden.device).long()  # (B, T)
    if num_items_in_batch is None:
        loss = linear_cross_entropy(hidden, lm_head_weight, targets, ignore_index=ignore_index)
        return loss.float()
    total = linear_cross_entropy(
        hidden, lm_head_weight, targets, ignore_index=ignore_index, reduction="sum"
    )
    return total.float() / num_items_in_batch


class CausalLM(torch.nn.Module):
    """What the decoder-only models (GPT, Llama) share: their weight init, the gradient
    checkpointing switch, the LM head's loss / logits and Hugging Face weights."""

    config: ModelConfig
    gradient_checkpointing: bool = False

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, 0.0, self.config.initializer_range)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward instead of keeping them."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def _lm_output(self, x: Tensor, labels: Optional[Tensor],
                   num_items_in_batch: Union[None, int, Tensor],
                   return_logits: bool) -> CausalLMOutput:
        """The final hidden states ``x`` (B, T, C) through the LM head: the fused loss when
        ``labels`` are given, logits when there are no labels or ``return_logits``."""
        loss = logits = None
        if labels is not None:
            loss = causal_lm_loss(x, self.lm_head.weight, labels, num_items_in_batch)
        if labels is None or return_logits:
            logits = self.lm_head(x)  # (B, T, V)
        return CausalLMOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory) -> None:
        """Writes Hugging Face's layout of ``config.model_type`` (config.json +
        model.safetensors), atomically."""
        from fastllm.models.hf import save_pretrained

        save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None):
        """This model from a Hugging Face directory or an in-memory ``transformers`` model
        (``fastllm.models.from_pretrained``); a TypeError if the checkpoint is another family."""
        from fastllm.models.hf import from_pretrained

        model = from_pretrained(source, dtype=dtype, device=device)
        if not isinstance(model, cls):
            raise TypeError(
                f"{cls.__name__}.from_pretrained: {source!r} holds a {type(model).__name__}"
            )
        return model

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """The prompt followed by up to ``max_new_tokens`` new tokens, (B, T + n), with a
        pre-allocated KV cache: :func:`fastllm.models.generation.generate` lists the
        arguments (``attention_mask``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``eos_token_id``, ``generator``, ``streamer``)."""
        from fastllm.models.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def generate_stream(self, input_ids: Tensor, max_new_tokens: int, **kwargs):
        """:meth:`generate` as an iterator of each step's new tokens, (B,) each."""
        from fastllm.models.generation import generate_stream

        return generate_stream(self, input_ids, max_new_tokens, **kwargs)
