"""LLaMA (and Mistral, Qwen2) on fastllm's kernels, readable top to bottom.

Token embedding, ``num_hidden_layers`` pre-RMSNorm blocks (rotary + grouped-query fused
causal attention, optionally within a sliding window; SwiGLU ``GatedMLP``), a final RMSNorm
and an LM head, tied to the embedding or not. Parameter names are Hugging Face's
``LlamaForCausalLM`` names (``model.layers.0.self_attn.q_proj.weight``, ...), so HF LLaMA /
Mistral / Qwen2 state dicts load as they are.

Variants: ``qkv_bias`` (Qwen2: biases on q/k/v, not o), ``attention_bias`` (LLaMA's: on all
four), ``sliding_window`` (Mistral: a query sees itself and the ``sliding_window - 1`` keys
before it, as HF), ``rope_scaling`` (HF's dict, e.g. Llama 3's ``{"rope_type": "llama3",
...}``).

Shapes: B batch, T tokens, C = hidden_size, H query heads, Hkv key/value heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastllm.functional import attention, attention_with_kvcache
from fastllm.models.config import (
    CausalLM,
    CausalLMOutput,
    IGNORE_INDEX,
    LayerCache,
    ModelConfig,
    check_index_values,
    check_input_ids,
    check_like_input_ids,
)
from fastllm.nn import GatedMLP, RMSNorm, RotaryEmbedding

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class LlamaConfig(ModelConfig):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads (no GQA)
    head_dim: Optional[int] = None  # None: hidden_size / num_attention_heads
    max_position_embeddings: int = 2048  # initial rotary cache rows (grows on demand)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF-style dict, e.g. _LLAMA3_SCALING
    attention_bias: bool = False  # bias on q, k, v and o projections (LLaMA's flag)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    model_type: str = "llama"  # the HF family save_pretrained writes: llama, mistral, qwen2

    names = {
        "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-5,
                           max_position_embeddings=4096),
        "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                             rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
                             tie_word_embeddings=True),
        "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             rms_norm_eps=1e-5, rope_theta=100000.0,
                             max_position_embeddings=8192, tie_word_embeddings=True),
        "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           rms_norm_eps=1e-5, sliding_window=4096, model_type="mistral"),
        "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                           num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           rope_theta=1000000.0, qkv_bias=True, tie_word_embeddings=True,
                           max_position_embeddings=32768, model_type="qwen2"),
        # tiny ones for tests and CPU experiments
        "llama-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128),
        "mistral-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, sliding_window=5,
                             model_type="mistral"),
        "qwen2-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           max_position_embeddings=128, qkv_bias=True,
                           tie_word_embeddings=True, model_type="qwen2"),
    }

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"LlamaConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                    f"num_attention_heads ({self.num_attention_heads}) or head_dim given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"LlamaConfig: model_type must be 'llama', 'mistral' or 'qwen2', "
                             f"got {self.model_type!r}")

    @property
    def window_size(self) -> tuple[int, int]:
        """The fused attention's (left, right) window: HF's key j visible from query i when
        ``i - sliding_window < j <= i``."""
        return (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)


class LlamaAttention(torch.nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        H, Hkv, D, C = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                        config.hidden_size)
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = torch.nn.Linear(C, H * D, bias=qkv_bias)
        self.k_proj = torch.nn.Linear(C, Hkv * D, bias=qkv_bias)
        self.v_proj = torch.nn.Linear(C, Hkv * D, bias=qkv_bias)
        self.o_proj = torch.nn.Linear(H * D, C, bias=config.attention_bias)

    def forward(self, x: Tensor, rotary: RotaryEmbedding, position_ids,
                key_padding_mask: Optional[Tensor],
                layer_cache: Optional[LayerCache] = None) -> Tensor:
        B, T, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if layer_cache is not None:
            # Generation: the call rotates q and k at their slots cache_seqlens[b] + t (slot ==
            # position, generation.py), appends k, v and attends the cache.
            k_cache, v_cache, cache_seqlens = layer_cache
            y = attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                       causal=True, window_size=cfg.window_size,
                                       rotary_cos=rotary.cos_cached,
                                       rotary_sin=rotary.sin_cached,
                                       rotary_interleaved=rotary.interleaved)  # (B, T, H, D)
            return self.o_proj(y.reshape(B, T, -1))
        q, k = rotary(q, k, position_ids)
        y = attention(q, k, v, causal=True, window_size=cfg.window_size,
                      key_padding_mask=key_padding_mask,
                      dropout_p=cfg.attention_dropout if self.training else 0.0)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, -1))


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, activation="silu",
                            bias=config.mlp_bias)

    def forward(self, x: Tensor, rotary: RotaryEmbedding, position_ids,
                key_padding_mask: Optional[Tensor],
                layer_cache: Optional[LayerCache] = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, position_ids, key_padding_mask,
                               layer_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(torch.nn.Module):
    """The decoder stack without the LM head (HF's ``LlamaModel``)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = torch.nn.ModuleList(
            [LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          base=config.rope_theta, scaling=config.rope_scaling)


class Llama(CausalLM):
    """``Llama(config)``; ``forward(input_ids, attention_mask=None, position_ids=None,
    labels=None, num_items_in_batch=None, return_logits=False) -> CausalLMOutput``.

    Arguments as :class:`fastllm.models.GPT` (``position_ids`` may also be an int offset).
    With ``labels`` the loss is fused with the LM head and ``logits`` is None unless
    ``return_logits=True``; the loss is float32. Unlike GPT's learned position table, the
    rotary positions have no upper limit: sequences longer than
    ``max_position_embeddings`` run (the rotary tables grow), as in Hugging Face; positions
    must be >= 0.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.model = LlamaModel(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Union[None, int, Tensor] = None,
        labels: Optional[Tensor] = None,
        num_items_in_batch: Union[None, int, Tensor] = None,
        return_logits: bool = False,
    ) -> CausalLMOutput:
        cfg = self.config
        # No length limit: the rotary tables grow on demand, as Hugging Face's rotary
        # embedding computes any position (max_position_embeddings is only a start size).
        check_input_ids("Llama", input_ids, vocab_size=cfg.vocab_size)
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            check_like_input_ids("Llama", name, t, input_ids)
        if isinstance(position_ids, Tensor):
            check_like_input_ids("Llama", "position_ids", position_ids, input_ids)
        elif position_ids is not None and (isinstance(position_ids, bool)
                                           or not isinstance(position_ids, int)):
            raise TypeError(f"Llama: position_ids must be None, an int offset or a (B, T) "
                            f"tensor, got {type(position_ids).__name__}")
        check_index_values("Llama", "position_ids", position_ids, None, "")
        check_index_values("Llama", "labels", labels, cfg.vocab_size, "vocab_size",
                           ignore_index=IGNORE_INDEX)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        rotary = self.model.rotary_emb

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rotary, position_ids, key_padding_mask,
                               use_reentrant=False)
            else:
                x = layer(x, rotary, position_ids, key_padding_mask)
        x = self.model.norm(x)

        return self._lm_output(x, labels, num_items_in_batch, return_logits)

    # -- generation (fastllm/models/generation.py) --------------------------------------------

    def _kv_cache_layout(self) -> tuple[int, int, int]:
        """(layers, Hkv, D) of the generation KV cache."""
        cfg = self.config
        return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim

    def _max_positions(self) -> Optional[int]:
        return None  # the rotary caches grow on demand

    def _forward_cached(self, input_ids: Tensor, caches: list[tuple[Tensor, Tensor]],
                        cache_seqlens: Tensor) -> Tensor:
        """Final hidden states (B, T, C) of ``input_ids`` (B, T) appended to the KV caches:
        sequence b's token t sits at slot and position ``cache_seqlens[b] + t``."""
        rotary = self.model.rotary_emb
        # cos / sin rows for every slot of the cache, built as normal tensors: buffers made
        # under generate's inference mode could not be saved for backward in later training.
        with torch.inference_mode(False):
            rotary.extend(caches[0][0].shape[1])
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer, (k_cache, v_cache) in zip(self.model.layers, caches):
            x = layer(x, rotary, None, None, (k_cache, v_cache, cache_seqlens))
        return self.model.norm(x)
