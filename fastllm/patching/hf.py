"""What fastllm knows about each Hugging Face family, and the per-instance forwards it installs.

One table row per ``config.model_type``: the class names of its RMSNorm, of its attention
modules that apply rotary embeddings, of its gated MLP, and of its causal-LM head model.
Families not in the table are refused (before anything changes); ``nn.LayerNorm`` inside any
known family is swapped through the generic path.

Rotary and the fused loss cannot be reached by module swap (transformers applies rotary with a
module-level function inside the attention's forward, and computes the logits inside the
head model's forward), so they get a *per-instance* ``forward`` (an instance attribute, undone
by deleting it) instead; the class and its functions are never touched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastllm.functional import apply_rotary_qk, cross_entropy

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Family:
    rms_norm: tuple[str, ...] = ()  # weight * x / rms(x), attribute variance_epsilon
    rotary_attention: tuple[str, ...] = ()  # q/k/v/o_proj, rotary from position_embeddings
    sliding_window_kwarg: bool = False  # passes sliding_window= to the attention interface
    gated_mlp: tuple[str, ...] = ()  # gate_proj / up_proj / down_proj, act_fn
    causal_lm: tuple[str, ...] = ()  # head models whose loss is ForCausalLM's
    notes: str = ""


FAMILIES: dict[str, Family] = {
    "llama": Family(rms_norm=("LlamaRMSNorm",), rotary_attention=("LlamaAttention",),
                    gated_mlp=("LlamaMLP",), causal_lm=("LlamaForCausalLM",)),
    "mistral": Family(rms_norm=("MistralRMSNorm",), rotary_attention=("MistralAttention",),
                      sliding_window_kwarg=True, gated_mlp=("MistralMLP",),
                      causal_lm=("MistralForCausalLM",)),
    "qwen2": Family(rms_norm=("Qwen2RMSNorm",), rotary_attention=("Qwen2Attention",),
                    sliding_window_kwarg=True, gated_mlp=("Qwen2MLP",),
                    causal_lm=("Qwen2ForCausalLM",)),
    "gpt2": Family(causal_lm=("GPT2LMHeadModel",)),
    "bert": Family(notes="MLM / NSP / classification losses are the heads' own"),
    "bart": Family(notes="the seq2seq loss is computed inside BART's head model"),
    "marian": Family(notes="the seq2seq loss is computed inside Marian's head model"),
    "mbart": Family(notes="the seq2seq loss is computed inside mBART's head model"),
    # T5's relative-position bias reaches the fused attention as its trainable attn_bias
    "t5": Family(rms_norm=("T5LayerNorm",),
                 notes="the seq2seq loss is computed inside T5's head model"),
}

# hidden_act -> fastllm.nn.GatedMLP activation
GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu",
                     "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def model_type(model: torch.nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def is_pretrained_model(module: torch.nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


# ----- rotary: the attention modules' forward ------------------------------------------------

def _eager_attention(module):
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def rotary_attention_forward(self, hidden_states: Tensor, position_embeddings=None,
                             attention_mask: Optional[Tensor] = None, cache=None, **kwargs):
    """LlamaAttention's forward (Mistral's, Qwen2's) with fastllm's fused rotary of q and k in
    one pass on their (B, T, H, D) layout; the cache update and the attention call are
    transformers' own (through the model's configured attention implementation)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    B, T = hidden_states.shape[:-1]
    q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, H, D)
    k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
    v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)

    cos, sin = position_embeddings  # (Bp, T, R): transformers' gathered, duplicated halves
    Bp, R = cos.shape[0], cos.shape[-1]
    cos_table = cos[..., : R // 2].reshape(Bp * T, R // 2)  # as a (positions, R/2) table
    sin_table = sin[..., : R // 2].reshape(Bp * T, R // 2)
    positions = None if Bp == 1 else torch.arange(Bp * T, device=q.device).view(Bp, T)
    q, k = apply_rotary_qk(q, k, cos_table, sin_table, position_ids=positions, rotary_dim=R)

    key_states, value_states = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D) views
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx,
                                                kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                      _eager_attention(self))
    extra = {}
    if self._fastllm_sliding_window_kwarg:
        extra["sliding_window"] = getattr(self, "sliding_window",
                                          getattr(self.config, "sliding_window", None))
    attn_output, attn_weights = interface(
        self, q.transpose(1, 2), key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **extra, **kwargs,
    )
    attn_output = attn_output.reshape(B, T, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


# ----- the causal-LM loss ------------------------------------------------------------------

def causal_lm_loss_function(logits: Tensor, labels: Tensor, vocab_size: int,
                            num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                            shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ``ForCausalLMLoss`` contract on fastllm's cross-entropy: labels shifted
    here (unless ``shift_labels`` are given), ``ignore_index`` ignored, the mean over the
    counted tokens or ``sum / num_items_in_batch``; float32 logits math, float32 loss."""
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        loss = cross_entropy(logits, targets, ignore_index=ignore_index)
    else:
        loss = cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss.float()


def fused_causal_lm_forward(self, input_ids=None, attention_mask=None, labels=None,
                            logits_to_keep=0, **kwargs):
    """The head model's forward with the loss fused into the LM head in training: with
    ``labels`` and ``self.training`` the logits are never formed (``logits`` is None, unless
    the patch was made with ``keep_logits=True``, which keeps transformers' forward and only
    swaps its loss); otherwise transformers' own forward runs (with fastllm's loss
    function)."""
    original = type(self).forward
    if labels is None or not self.training:
        return original(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastllm.models.config import causal_lm_loss

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    base = getattr(self, self.base_model_prefix)
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    loss = causal_lm_loss(outputs[0], self.lm_head.weight, labels.to(outputs[0].device),
                          num_items_in_batch, shift_labels=shift_labels,
                          ignore_index=ignore_index)
    # the base model's other outputs, under the names the head model's output shares with it
    # (transformers 5 renamed past_key_values to cache)
    extra = {k: v for k, v in outputs.items()
             if k in ("cache", "past_key_values", "hidden_states", "attentions")}
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)
