"""What every model of ``fastllm.models`` shares: the config base with its ``from_name`` table,
the output dataclass (Hugging Face's field names), input checks, and the causal-LM loss.

Shapes: B batch, T tokens, C hidden features, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor

from fastllm.functional import linear_cross_entropy

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
        cross-entropy when ``labels`` were given, else None.
    logits: (B, T, V); None when ``labels`` were given and ``return_logits`` was False (the
        fused loss never forms them).
    """

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


def check_input_ids(model: str, input_ids: Tensor, max_positions: Optional[int] = None) -> None:
    """input_ids must be an integer (B, T) tensor of at most ``max_positions`` tokens."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{model}: input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{model}: input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"{model}: input_ids must be (B, T), got {tuple(input_ids.shape)}")
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise ValueError(
            f"{model}: input_ids has {input_ids.shape[1]} tokens, more than the position table "
            f"holds ({max_positions})"
        )


def check_like_input_ids(model: str, name: str, t: Optional[Tensor], input_ids: Tensor) -> None:
    """attention_mask / labels / position_ids: None or an integer/bool tensor shaped like
    input_ids."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{model}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != input_ids.shape:
        raise ValueError(
            f"{model}: {name} must have input_ids' shape {tuple(input_ids.shape)}, got "
            f"{tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{model}: {name} must be an integer or bool tensor, got {t.dtype}")


def causal_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    num_items_in_batch: Union[None, int, Tensor] = None,
) -> Tensor:
    """Next-token cross-entropy from the final hidden states, by the fused
    ``linear_cross_entropy`` (the (B*T, V) logits are never held).

    hidden (B, T, C), lm_head_weight (V, C), labels (B, T): position t predicts
    ``labels[:, t + 1]`` (the shift happens here, as in Hugging Face), ``-100`` is ignored.
    Without ``num_items_in_batch`` the loss is the mean over the non-ignored targets; with
    it, ``sum / num_items_in_batch``: pass the number of non-ignored (shifted) targets of the
    whole accumulated batch, and the summed micro-batch losses equal the full-batch loss.
    """
    hidden = hidden[:, :-1, :]  # (B, T-1, C)
    targets = labels[:, 1:].long()  # (B, T-1)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, lm_head_weight, targets, ignore_index=IGNORE_INDEX)
    total = linear_cross_entropy(
        hidden, lm_head_weight, targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / num_items_in_batch


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
