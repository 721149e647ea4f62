"""GPT-2 on fastllm's kernels, readable top to bottom (after nanoGPT's model.py).

Token + learned position embeddings, ``n_layer`` pre-LayerNorm blocks (fused causal attention,
GELU-tanh MLP), a final LayerNorm and an LM head tied to the token embedding. Parameter names
are Hugging Face's ``GPT2LMHeadModel`` names (``transformer.h.0.attn.c_attn.weight``, ...);
the weights are ``torch.nn.Linear``'s (out, in), the transpose of HF's ``Conv1D``, which
fastllm/models/hf.py converts.

Shapes: B batch, T tokens, C = n_embd, H = n_head, D = C / H, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
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
from fastllm.nn import LayerNorm


@dataclass
class GPTConfig(ModelConfig):
    block_size: int = 1024  # the position table: longest sequence
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embeddings, attention probabilities and residuals (training only)
    bias: bool = True  # biases in the Linears and LayerNorms (GPT-2 has them)
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    head_dim: int = field(init=False)  # derived: n_embd / n_head

    names = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
        # small ones for tests and CPU experiments
        "gpt-mini": dict(n_layer=6, n_head=6, n_embd=192),
        "gpt-micro": dict(n_layer=4, n_head=4, n_embd=128),
        "gpt-nano": dict(n_layer=3, n_head=3, n_embd=48),
    }

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        self.head_dim = self.n_embd // self.n_head


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = torch.nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = torch.nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = torch.nn.Dropout(config.dropout)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor],
                layer_cache: Optional[LayerCache] = None) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(dim=2)  # (B, T, H, D) each: the kernel's layout, no transposes
        if layer_cache is not None:  # generation: append k, v at cache_seqlens, attend the cache
            k_cache, v_cache, cache_seqlens = layer_cache
            y = attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                       causal=True)  # (B, T, H, D)
        else:
            y = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                          dropout_p=self.dropout if self.training else 0.0)  # (B, T, H, D)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))


class MLP(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = torch.nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = torch.nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = torch.nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor],
                layer_cache: Optional[LayerCache] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), key_padding_mask, layer_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(CausalLM):
    """``GPT(config)``; ``forward(input_ids, attention_mask=None, position_ids=None,
    labels=None, num_items_in_batch=None, return_logits=False) -> CausalLMOutput``.

    - input_ids: int64/int32 (B, T), T <= block_size, ids in [0, vocab_size).
    - attention_mask: (B, T) integer or bool, 1 for tokens, 0 for padding (padded keys are
      excluded through the fused attention's ``key_padding_mask``; padded rows' outputs are
      meaningless).
    - position_ids: (B, T) positions in [0, block_size) (default ``0 .. T-1``; pass them for
      left padding).
    - labels: (B, T), in [0, vocab_size) or ``-100`` (ignored); the model shifts them
      (position t predicts ``labels[:, t+1]``). With labels the loss is fused with the LM
      head, so ``logits`` is None unless ``return_logits=True`` (which computes them as well,
      at full memory cost). The loss is float32 (:class:`fastllm.models.config.CausalLMOutput`).

    Bad arguments raise errors naming them; values are checked on CPU tensors outside
    torch.compile (fastllm/models/config.py).
    - num_items_in_batch: see :func:`fastllm.models.config.causal_lm_loss`.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.transformer = torch.nn.ModuleDict(dict(
            wte=torch.nn.Embedding(config.vocab_size, config.n_embd),
            wpe=torch.nn.Embedding(config.block_size, config.n_embd),
            drop=torch.nn.Dropout(config.dropout),
            h=torch.nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: 0.02 / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                std = config.initializer_range / math.sqrt(2 * config.n_layer)
                torch.nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        num_items_in_batch: Union[None, int, Tensor] = None,
        return_logits: bool = False,
    ) -> CausalLMOutput:
        cfg = self.config
        check_input_ids("GPT", input_ids, cfg.block_size, positions_name="block_size",
                        vocab_size=cfg.vocab_size)
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids),
                        ("labels", labels)):
            check_like_input_ids("GPT", name, t, input_ids)
        check_index_values("GPT", "position_ids", position_ids, cfg.block_size, "block_size")
        check_index_values("GPT", "labels", labels, cfg.vocab_size, "vocab_size",
                           ignore_index=IGNORE_INDEX)
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)  # (T,)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()

        tok, pos = self.transformer.wte(input_ids), self.transformer.wpe(position_ids)
        x = self.transformer.drop(tok + pos)  # (B, T, C)
        for block in self.transformer.h:  # (B, T, C)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, key_padding_mask, use_reentrant=False)
            else:
                x = block(x, key_padding_mask)
        x = self.transformer.ln_f(x)

        return self._lm_output(x, labels, num_items_in_batch, return_logits)

    # -- generation (fastllm/models/generation.py) --------------------------------------------

    def _kv_cache_layout(self) -> tuple[int, int, int]:
        """(layers, Hkv, D) of the generation KV cache."""
        return self.config.n_layer, self.config.n_head, self.config.head_dim

    def _max_positions(self) -> Optional[int]:
        return self.config.block_size

    def _forward_cached(self, input_ids: Tensor, caches: list[tuple[Tensor, Tensor]],
                        cache_seqlens: Tensor) -> Tensor:
        """Final hidden states (B, T, C) of ``input_ids`` (B, T) appended to the KV caches:
        sequence b's token t sits at slot and position ``cache_seqlens[b] + t``."""
        B, T = input_ids.shape
        position_ids = cache_seqlens.long()[:, None] + torch.arange(T, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        for block, (k_cache, v_cache) in zip(self.transformer.h, caches):
            x = block(x, None, (k_cache, v_cache, cache_seqlens))
        return self.transformer.ln_f(x)
