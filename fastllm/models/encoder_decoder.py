"""Encoder-decoder Transformers for translation and summarisation (BART, mBART, Marian) on
fastllm's kernels, readable top to bottom.

    encoder:  x = embed_scale * tokens[ids] + positions     (+ LayerNorm: BART)   # (B, S, C)
              each layer: x = LN(x + self_attn(x, key_padding_mask=attention_mask))
                          x = LN(x + fc2(act(fc1(x))))
    decoder:  y = embed_scale * tokens[dec_ids] + positions (+ LayerNorm: BART)   # (B, T, C)
              each layer: y = LN(y + causal self_attn(y, key_padding_mask=decoder_attention_mask))
                          y = LN(y + cross_attn(q=y, k=v=x, key_padding_mask=attention_mask))
                          y = LN(y + fc2(act(fc1(y))))
    head:     logits = y @ lm_head.T + final_logits_bias                         # (B, T, V)

Post-LayerNorm for BART and Marian (the residual add and the LayerNorm are one fused
``add_layer_norm``); pre-LayerNorm for mBART (``normalize_before``: ``x + f(LN(x))``, and a
final ``layer_norm`` after each stack). Padding never becomes a (T x T) mask: each attention
takes the fused kernel's ``key_padding_mask`` (B, Tk), True = real token. What the families
differ in is config, not code:

- BART: learned positions with an offset of 2 (the table has ``max_position_embeddings + 2``
  rows, HF's quirk), ``layernorm_embedding``, GELU, no embedding scale by default.
- mBART: BART's embeddings with ``scale_embedding``, pre-LN layers, final LayerNorms, and
  its own ``shift_tokens_right`` (the last real label, the language id, starts the decoder).
- Marian: fixed sinusoidal positions (sin in the first half of the features, cos in the
  second; not a parameter, so not in the checkpoint), ``scale_embedding`` (sqrt(d_model)),
  no embedding LayerNorm, swish (or what ``activation_function`` says).
- Both: embeddings shared by encoder, decoder and LM head (``share_encoder_decoder_embeddings``
  and ``tie_word_embeddings``; Marian may have separate ones and a ``decoder_vocab_size``),
  and a ``final_logits_bias`` buffer (1, V) added to the logits (zeros in most checkpoints).

Parameter names are Hugging Face's ``BartForConditionalGeneration`` / ``MBartFor...`` /
``MarianMTModel`` names
(``model.shared.weight``, ``model.encoder.layers.0.self_attn.q_proj.weight``, ...,
``lm_head.weight``, ``final_logits_bias``), so fastllm/models/hf.py converts nothing.

Shapes: B batch, S source tokens, T target tokens, C = d_model, H heads, D = C / H,
V target vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastllm.functional import attention, attention_with_kvcache, linear_cross_entropy
from fastllm.models.config import (
    IGNORE_INDEX,
    ModelConfig,
    check_index_values,
    check_input_ids,
    check_like_input_ids,
)
from fastllm.nn import LayerNorm

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": torch_F.gelu,  # exact (erf), BART's
    "gelu_new": lambda x: torch_F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch_F.gelu(x, approximate="tanh"),
    "relu": torch_F.relu,
    "swish": torch_F.silu,  # Marian's
    "silu": torch_F.silu,
}


@dataclass
class EncoderDecoderConfig(ModelConfig):
    model_type: str = "bart"  # "bart" | "mbart" | "marian": the HF layout save_pretrained writes
    vocab_size: int = 50265  # source vocabulary (and target, when shared)
    decoder_vocab_size: Optional[int] = None  # target vocabulary; None: vocab_size
    max_position_embeddings: int = 1024  # longest source and longest target sequence
    d_model: int = 768  # C
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    activation_function: str = "gelu"  # see _ACTIVATIONS
    dropout: float = 0.1  # embeddings and residual branches (training only)
    attention_dropout: float = 0.0  # attention probabilities
    activation_dropout: float = 0.0  # after the MLP activation
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5  # HF's nn.LayerNorm default (not configurable there)
    scale_embedding: bool = False  # token embeddings * sqrt(d_model) (Marian: True)
    position_embedding: str = "learned"  # "learned" (BART, offset 2) | "sinusoidal" (Marian)
    layernorm_embedding: bool = True  # LayerNorm after the embeddings (BART; Marian: False)
    normalize_before: bool = False  # pre-LN layers + a final layer_norm per stack (mBART)
    share_encoder_decoder_embeddings: bool = True  # one ``model.shared`` table for both sides
    tie_word_embeddings: bool = True  # lm_head.weight is the decoder's token embedding
    pad_token_id: int = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    # the first decoder token (BART: </s>; Marian: <pad>; mBART: None, its labels' language
    # id starts the decoder in training, generate needs one: default bos_token_id, as HF)
    decoder_start_token_id: Optional[int] = 2
    # Hugging Face generation settings, kept so save_pretrained writes them back; generate()
    # does not apply them (pass them to HF's generate as None for token-identical output)
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[int] = None
    target_vocab_size: int = field(init=False)  # derived: decoder_vocab_size or vocab_size
    position_offset: int = field(init=False)  # derived: 2 for BART's learned table, else 0

    names = {
        "bart-base": dict(d_model=768, encoder_layers=6, decoder_layers=6,
                          encoder_attention_heads=12, decoder_attention_heads=12,
                          encoder_ffn_dim=3072, decoder_ffn_dim=3072),
        "bart-large": dict(d_model=1024, encoder_layers=12, decoder_layers=12,
                           encoder_attention_heads=16, decoder_attention_heads=16,
                           encoder_ffn_dim=4096, decoder_ffn_dim=4096),
        # facebook/mbart-large-cc25
        "mbart-large": dict(model_type="mbart", vocab_size=250027, d_model=1024,
                            encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                            decoder_attention_heads=16, encoder_ffn_dim=4096,
                            decoder_ffn_dim=4096, scale_embedding=True, normalize_before=True,
                            decoder_start_token_id=None),
        # Helsinki-NLP/opus-mt-* (e.g. opus-mt-en-de; the vocabulary differs per pair)
        "marian-opus": dict(model_type="marian", vocab_size=58101, max_position_embeddings=512,
                            d_model=512, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=8, decoder_attention_heads=8,
                            encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                            activation_function="swish", scale_embedding=True,
                            position_embedding="sinusoidal", layernorm_embedding=False,
                            pad_token_id=58100, bos_token_id=0, eos_token_id=0,
                            decoder_start_token_id=58100),
        # small ones for tests and CPU experiments (bart-mini: fastllm pretrain --arch bart)
        "bart-mini": dict(max_position_embeddings=512, d_model=192, encoder_layers=3,
                          decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=768, decoder_ffn_dim=768),
        "bart-tiny": dict(vocab_size=99, max_position_embeddings=64, d_model=32,
                          encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37),
        "marian-tiny": dict(model_type="marian", vocab_size=99, max_position_embeddings=64,
                            d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=37, decoder_ffn_dim=37,
                            activation_function="swish", scale_embedding=True,
                            position_embedding="sinusoidal", layernorm_embedding=False,
                            pad_token_id=98, bos_token_id=0, eos_token_id=0,
                            decoder_start_token_id=98),
    }

    def __post_init__(self):
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads != 0:
                raise ValueError(f"EncoderDecoderConfig: d_model ({self.d_model}) must be a "
                                 f"multiple of {side}_attention_heads ({heads})")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"EncoderDecoderConfig: activation_function must be one of "
                             f"{sorted(_ACTIVATIONS)}, got {self.activation_function!r}")
        if self.position_embedding not in ("learned", "sinusoidal"):
            raise ValueError(f"EncoderDecoderConfig: position_embedding must be 'learned' or "
                             f"'sinusoidal', got {self.position_embedding!r}")
        if self.model_type not in ("bart", "mbart", "marian"):
            raise ValueError(f"EncoderDecoderConfig: model_type must be 'bart', 'mbart' or "
                             f"'marian', got {self.model_type!r}")
        if self.share_encoder_decoder_embeddings and self.decoder_vocab_size not in (
                None, self.vocab_size):
            raise ValueError(f"EncoderDecoderConfig: shared embeddings need decoder_vocab_size "
                             f"== vocab_size ({self.vocab_size}), got {self.decoder_vocab_size}")
        self.target_vocab_size = self.decoder_vocab_size or self.vocab_size
        self.position_offset = 2 if self.position_embedding == "learned" else 0


@dataclass
class Seq2SeqLMOutput:
    """Output of :class:`EncoderDecoder`, named as Hugging Face's ``Seq2SeqLMOutput``.

    loss: the mean (or, with ``num_items_in_batch``, sum / num_items_in_batch) cross-entropy
        of the decoder outputs against ``labels`` (not shifted), else None.
    logits: (B, T, V) with ``final_logits_bias``; None when ``labels`` were given and
        ``return_logits`` was False (the fused loss never forms them).
    encoder_last_hidden_state: (B, S, C); pass it back as ``encoder_outputs`` to skip the
        encoder.
    """

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    encoder_last_hidden_state: Optional[Tensor] = None


def shift_tokens_right(labels: Tensor, pad_token_id: int,
                       decoder_start_token_id: Optional[int]) -> Tensor:
    """Hugging Face's: the decoder inputs of ``labels`` (B, T): ``decoder_start_token_id``
    then ``labels[:, :-1]``, with ``-100`` replaced by ``pad_token_id``. mBART's
    (``decoder_start_token_id=None``): each row starts with its last non-pad label (the
    language id) instead."""
    labels = labels.masked_fill(labels == IGNORE_INDEX, pad_token_id)
    if decoder_start_token_id is None:
        last = labels.ne(pad_token_id).sum(dim=1, keepdim=True) - 1  # (B, 1)
        start = labels.gather(1, last.clamp(min=0))  # (B, 1)
    else:
        start = labels.new_full((labels.shape[0], 1), decoder_start_token_id)
    return torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)


# ----- embeddings ------------------------------------------------------------------------

class LearnedPositionalEmbedding(nn.Embedding):
    """BART's table: position p is row ``p + 2`` (two rows fairseq reserved)."""

    def __init__(self, num_positions: int, embedding_dim: int, offset: int = 2):
        super().__init__(num_positions + offset, embedding_dim)
        self.offset = offset

    def forward(self, position_ids: Tensor) -> Tensor:
        return super().forward(position_ids + self.offset)


def sinusoidal_table(num_positions: int, dim: int) -> Tensor:
    """Marian's fixed table (num_positions, dim) float32: ``sin(p / 10000^(2i/dim))`` in the
    first ``ceil(dim / 2)`` features, the matching ``cos`` in the rest (not interleaved),
    computed in float64 as HF's numpy code does."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (P, dim)
    return torch.cat([torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])], dim=1).float()


class SinusoidalPositionalEmbedding(nn.Module):
    """Marian's positions: a fixed table, a non-persistent buffer named ``weight`` (HF's
    checkpoints leave it out; it is recomputed)."""

    def __init__(self, num_positions: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("weight", sinusoidal_table(num_positions, embedding_dim),
                             persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        return torch_F.embedding(position_ids, self.weight)


# ----- layers ----------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with HF's projection names. Keys and values come from ``x``
    (self-attention) or from ``source`` (cross-attention: the encoder output), or are
    passed precomputed as ``kv`` (generation's cross-attention), or are appended to a
    generation cache (``layer_cache``, decoder self-attention)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        B, S, _ = source.shape
        k = self.k_proj(source).view(B, S, self.n_heads, self.head_dim)  # (B, S, H, D)
        v = self.v_proj(source).view(B, S, self.n_heads, self.head_dim)  # (B, S, H, D)
        return k, v

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], *, causal: bool = False,
                source: Optional[Tensor] = None, kv: Optional[tuple[Tensor, Tensor]] = None,
                layer_cache: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
        B, T, C = x.shape
        # HF scales q by D**-0.5 before q k^T: the kernel's default softmax scale
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        if layer_cache is not None:  # generation: append k, v at cache_seqlens, attend the cache
            k_cache, v_cache, cache_seqlens = layer_cache
            k, v = self.project_kv(x)
            y = attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                       causal=causal)  # (B, T, H, D)
        else:
            k, v = kv if kv is not None else self.project_kv(x if source is None else source)
            y = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                          dropout_p=self.dropout if self.training else 0.0)  # (B, T, H, D)
        return self.out_proj(y.reshape(B, T, C))


def _add_norm(norm: LayerNorm, h: Tensor, residual: Tensor) -> Tensor:
    """Post-LN: ``norm(residual + h)`` in one fused pass. Under autocast ``h`` (a Linear's
    output) is bf16 while the residual may be fp32: both go in their promoted dtype."""
    if h.dtype != residual.dtype:
        dtype = torch.promote_types(h.dtype, residual.dtype)
        h, residual = h.to(dtype), residual.to(dtype)
    out, _ = norm(h, residual)
    return out


class EncoderLayer(nn.Module):
    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        C = config.d_model
        self.self_attn = Attention(C, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = LayerNorm(C, eps=config.layer_norm_eps)
        self.activation_fn = _ACTIVATIONS[config.activation_function]
        self.fc1 = nn.Linear(C, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, C)
        self.final_layer_norm = LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.normalize_before = config.normalize_before

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation_fn(self.fc1(x))))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        if self.normalize_before:  # pre-LN (mBART)
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), key_padding_mask))
            return x + self.dropout(self.mlp(self.final_layer_norm(x)))  # (B, S, C)
        h = self.self_attn(x, key_padding_mask)  # (B, S, C)
        x = _add_norm(self.self_attn_layer_norm, self.dropout(h), x)
        return _add_norm(self.final_layer_norm, self.dropout(self.mlp(x)), x)  # (B, S, C)


class DecoderLayer(nn.Module):
    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        C, H = config.d_model, config.decoder_attention_heads
        self.self_attn = Attention(C, H, config.attention_dropout)
        self.self_attn_layer_norm = LayerNorm(C, eps=config.layer_norm_eps)
        self.encoder_attn = Attention(C, H, config.attention_dropout)
        self.encoder_attn_layer_norm = LayerNorm(C, eps=config.layer_norm_eps)
        self.activation_fn = _ACTIVATIONS[config.activation_function]
        self.fc1 = nn.Linear(C, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, C)
        self.final_layer_norm = LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.normalize_before = config.normalize_before

    def mlp(self, y: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation_fn(self.fc1(y))))

    def forward(self, y: Tensor, self_padding_mask: Optional[Tensor], memory: Optional[Tensor],
                memory_padding_mask: Optional[Tensor],
                layer_cache: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                cross_kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        if self.normalize_before:  # pre-LN (mBART)
            h = self.self_attn(self.self_attn_layer_norm(y), self_padding_mask, causal=True,
                               layer_cache=layer_cache)
            y = y + self.dropout(h)  # (B, T, C)
            h = self.encoder_attn(self.encoder_attn_layer_norm(y), memory_padding_mask,
                                  source=memory, kv=cross_kv)
            y = y + self.dropout(h)  # (B, T, C)
            return y + self.dropout(self.mlp(self.final_layer_norm(y)))  # (B, T, C)
        h = self.self_attn(y, self_padding_mask, causal=True, layer_cache=layer_cache)
        y = _add_norm(self.self_attn_layer_norm, self.dropout(h), y)  # (B, T, C)
        h = self.encoder_attn(y, memory_padding_mask, source=memory, kv=cross_kv)
        y = _add_norm(self.encoder_attn_layer_norm, self.dropout(h), y)  # (B, T, C)
        return _add_norm(self.final_layer_norm, self.dropout(self.mlp(y)), y)  # (B, T, C)


class Stack(nn.Module):
    """The encoder or the decoder: embeddings, then the layers (HF's ``model.encoder`` /
    ``model.decoder``). ``embed_tokens`` is the shared table when the embeddings are shared."""

    def __init__(self, config: EncoderDecoderConfig, embed_tokens: nn.Embedding,
                 layer: type[nn.Module], n_layers: int):
        super().__init__()
        C = config.d_model
        self.embed_scale = math.sqrt(C) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens
        if config.position_embedding == "learned":
            self.embed_positions = LearnedPositionalEmbedding(config.max_position_embeddings, C,
                                                              config.position_offset)
        else:
            self.embed_positions = SinusoidalPositionalEmbedding(config.max_position_embeddings, C)
        self.layernorm_embedding = (LayerNorm(C, eps=config.layer_norm_eps)
                                    if config.layernorm_embedding else None)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([layer(config) for _ in range(n_layers)])
        # pre-LN stacks end with a LayerNorm (mBART)
        self.layer_norm = LayerNorm(C, eps=config.layer_norm_eps) if config.normalize_before \
            else None
        self.gradient_checkpointing = False

    def embed(self, ids: Tensor, position_ids: Tensor) -> Tensor:
        x = self.embed_tokens(ids) * self.embed_scale + self.embed_positions(position_ids)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout(x)  # (B, T, C)

    def forward(self, ids: Tensor, *layer_args: Any) -> Tensor:
        x = self.embed(ids, torch.arange(ids.shape[1], device=ids.device))  # (B, T, C)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, *layer_args, use_reentrant=False)
            else:
                x = layer(x, *layer_args)
        return self.final_norm(x)

    def final_norm(self, x: Tensor) -> Tensor:
        return x if self.layer_norm is None else self.layer_norm(x)


class Seq2SeqModel(nn.Module):
    """HF's ``BartModel`` / ``MBartModel`` / ``MarianModel`` (the ``model.`` prefix): shared table,
    encoder, decoder."""

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        C, pad = config.d_model, config.pad_token_id
        if config.share_encoder_decoder_embeddings:
            self.shared = nn.Embedding(config.vocab_size, C, padding_idx=pad)
            encoder_tokens = decoder_tokens = self.shared
        else:
            self.shared = None
            encoder_tokens = nn.Embedding(config.vocab_size, C, padding_idx=pad)
            decoder_tokens = nn.Embedding(config.target_vocab_size, C, padding_idx=pad)
        self.encoder = Stack(config, encoder_tokens, EncoderLayer, config.encoder_layers)
        self.decoder = Stack(config, decoder_tokens, DecoderLayer, config.decoder_layers)


class EncoderDecoder(nn.Module):
    """``EncoderDecoder(config)``: BART / mBART / Marian with an LM head. ``forward(input_ids,
    attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, labels=None,
    num_items_in_batch=None, return_logits=False, encoder_outputs=None) -> Seq2SeqLMOutput``.

    - input_ids: int64/int32 (B, S) source tokens, S <= max_position_embeddings; may be
      None when ``encoder_outputs`` is given.
    - attention_mask: (B, S), 1 for tokens, 0 for padding: the key padding mask of the
      encoder's self-attention and of the decoder's cross-attention.
    - decoder_input_ids: (B, T); None with ``labels``: ``shift_tokens_right(labels,
      pad_token_id, decoder_start_token_id)``, as HF (mBART: its language-id variant).
    - decoder_attention_mask: (B, T), 1 for tokens, 0 for (right) padding: the key padding
      mask of the decoder's causal self-attention (padded rows' outputs are meaningless).
    - labels: (B, T), ``-100`` ignored, aligned with the decoder outputs (no shift). The loss
      is fused with the LM head (``linear_cross_entropy`` with ``final_logits_bias`` as its
      bias), so ``logits`` is None unless ``return_logits=True``.
    - num_items_in_batch: the number of non-ignored labels of the whole accumulated batch:
      the loss becomes ``sum / num_items_in_batch`` and the micro-batches' losses add up to
      the full batch's.
    - encoder_outputs: the encoder's last hidden state (B, S, C) (a tensor, a
      ``Seq2SeqLMOutput`` / HF ``BaseModelOutput``, or a tuple whose first item it is).
    """

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        self.config = config
        self.model = Seq2SeqModel(config)
        self.lm_head = nn.Linear(config.d_model, config.target_vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.target_vocab_size))
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """HF's BART / mBART / Marian init: normal(0, init_std) Linears and Embeddings, zero biases
        and padding row."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def tie_weights(self) -> None:
        """lm_head.weight is the decoder's token embedding (``tie_word_embeddings``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recompute each layer's activations in backward instead of keeping them."""
        self.model.encoder.gradient_checkpointing = True
        self.model.decoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.encoder.gradient_checkpointing = False
        self.model.decoder.gradient_checkpointing = False

    # -- forward ------------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The encoder's last hidden state (B, S, C)."""
        c = self.config
        check_input_ids("EncoderDecoder", input_ids, c.max_position_embeddings,
                        positions_name="max_position_embeddings", vocab_size=c.vocab_size)
        check_like_input_ids("EncoderDecoder", "attention_mask", attention_mask, input_ids)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        return self.model.encoder(input_ids, key_padding_mask)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        decoder_input_ids: Optional[Tensor] = None,
        decoder_attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        num_items_in_batch: Union[None, int, Tensor] = None,
        return_logits: bool = False,
        encoder_outputs: Any = None,
    ) -> Seq2SeqLMOutput:
        name = "EncoderDecoder"
        c = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError(f"{name}: pass decoder_input_ids or labels (the decoder inputs "
                                 f"are then shift_tokens_right(labels))")
            _check_tokens(name, "labels", labels)
            decoder_input_ids = shift_tokens_right(labels, c.pad_token_id,
                                                   c.decoder_start_token_id)
        _check_tokens(name, "decoder_input_ids", decoder_input_ids)
        if decoder_input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"{name}: decoder_input_ids has {decoder_input_ids.shape[1]} tokens, "
                             f"more than the position table holds (max_position_embeddings="
                             f"{c.max_position_embeddings})")
        check_index_values(name, "decoder_input_ids", decoder_input_ids, c.target_vocab_size,
                           "target vocabulary size")
        check_index_values(name, "labels", labels, c.target_vocab_size,
                           "target vocabulary size", ignore_index=IGNORE_INDEX)
        for arg, t in (("decoder_attention_mask", decoder_attention_mask), ("labels", labels)):
            if t is not None and tuple(t.shape) != tuple(decoder_input_ids.shape):
                raise ValueError(f"{name}: {arg} must have decoder_input_ids' shape "
                                 f"{tuple(decoder_input_ids.shape)}, got {tuple(t.shape)}")
            check_like_input_ids(name, arg, t, decoder_input_ids)  # (its dtype)

        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError(f"{name}: pass input_ids or encoder_outputs")
            memory = self.encode(input_ids, attention_mask)  # (B, S, C)
        else:
            memory = _encoder_hidden_state(encoder_outputs)  # (B, S, C)
            if attention_mask is not None and \
                    tuple(attention_mask.shape) != tuple(memory.shape[:2]):
                raise ValueError(f"{name}: attention_mask must be (B, S) = "
                                 f"{tuple(memory.shape[:2])} like encoder_outputs, got "
                                 f"{tuple(attention_mask.shape)}")
        if memory.shape[0] != decoder_input_ids.shape[0]:
            raise ValueError(f"{name}: decoder_input_ids has batch {decoder_input_ids.shape[0]}, "
                             f"the source has {memory.shape[0]}")
        memory_padding_mask = None if attention_mask is None else attention_mask.bool()
        self_padding_mask = (None if decoder_attention_mask is None
                             else decoder_attention_mask.bool())

        y = self.model.decoder(decoder_input_ids, self_padding_mask, memory,
                               memory_padding_mask)  # (B, T, C)

        loss = logits = None
        if labels is not None:
            loss = self._loss(y, labels, num_items_in_batch)
        if labels is None or return_logits:
            logits = self._logits(y)  # (B, T, V)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=memory)

    def _head(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """lm_head.weight (V, C) and final_logits_bias (V,) in ``dtype`` (autocast: the
        hidden states' dtype)."""
        return self.lm_head.weight.to(dtype), self.final_logits_bias[0].to(dtype)

    def _logits(self, y: Tensor) -> Tensor:
        weight, bias = self._head(y.dtype)
        return torch_F.linear(y, weight, bias)  # (..., V)

    def _loss(self, y: Tensor, labels: Tensor,
              num_items_in_batch: Union[None, int, Tensor]) -> Tensor:
        """Cross-entropy of ``y @ lm_head.T + final_logits_bias`` against ``labels``, by the
        fused ``linear_cross_entropy`` (its ``linear_bias`` is the final_logits_bias, so the
        bias is honoured without forming the (B*T, V) logits)."""
        weight, bias = self._head(y.dtype)
        if num_items_in_batch is None:
            return linear_cross_entropy(y, weight, labels.long(), linear_bias=bias,
                                        ignore_index=IGNORE_INDEX)
        total = linear_cross_entropy(y, weight, labels.long(), linear_bias=bias,
                                     ignore_index=IGNORE_INDEX, reduction="sum")
        return total / num_items_in_batch

    # -- generation (fastllm/models/generation.py) --------------------------------------------

    def _decoder_cache_layout(self) -> tuple[int, int, int]:
        """(layers, H, D) of the decoder's self-attention KV cache."""
        c = self.config
        return c.decoder_layers, c.decoder_attention_heads, c.d_model // c.decoder_attention_heads

    def _cross_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention keys and values (B, S, H, D), computed once."""
        return [layer.encoder_attn.project_kv(memory) for layer in self.model.decoder.layers]

    def _forward_cached(self, decoder_input_ids: Tensor, caches: list[tuple[Tensor, Tensor]],
                        cache_seqlens: Tensor, cross_kv: list[tuple[Tensor, Tensor]],
                        memory_padding_mask: Optional[Tensor]) -> Tensor:
        """Final decoder states (B, T, C) of ``decoder_input_ids`` (B, T) appended to the
        self-attention caches at slot and position ``cache_seqlens[b] + t``."""
        T = decoder_input_ids.shape[1]
        decoder = self.model.decoder
        position_ids = cache_seqlens.long()[:, None] + torch.arange(
            T, device=decoder_input_ids.device)  # (B, T)
        y = decoder.embed(decoder_input_ids, position_ids)  # (B, T, C)
        for layer, (k_cache, v_cache), kv in zip(decoder.layers, caches, cross_kv):
            y = layer(y, None, None, memory_padding_mask, (k_cache, v_cache, cache_seqlens), kv)
        return decoder.final_norm(y)

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """``decoder_start_token_id`` followed by up to ``max_new_tokens`` new tokens,
        (B, 1 + n), as HF's ``generate`` returns for encoder-decoders: the source is encoded
        once, the decoder runs with a pre-allocated self-attention KV cache and cross-attention
        keys / values computed once. :func:`fastllm.models.generation.generate_seq2seq` lists
        the arguments (``attention_mask``, ``decoder_start_token_id``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``,
        ``pad_token_id``, ``generator``, ``streamer``)."""
        from fastllm.models.generation import generate_seq2seq

        return generate_seq2seq(self, input_ids, max_new_tokens, **kwargs)

    def generate_stream(self, input_ids: Tensor, max_new_tokens: int, **kwargs):
        """:meth:`generate` as an iterator of each step's new tokens, (B,) each."""
        from fastllm.models.generation import generate_seq2seq_stream

        return generate_seq2seq_stream(self, input_ids, max_new_tokens, **kwargs)

    # -- Hugging Face weights (fastllm/models/hf.py) ------------------------------------------

    def save_pretrained(self, save_directory) -> None:
        """Writes Hugging Face's ``BartForConditionalGeneration`` / ``MarianMTModel`` layout
        (config.json + model.safetensors), atomically."""
        from fastllm.models.hf import save_pretrained

        save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None) -> "EncoderDecoder":
        """From a Hugging Face BART / mBART / Marian directory or in-memory ``transformers`` model
        (``fastllm.models.from_pretrained``); a TypeError if it holds another family."""
        from fastllm.models.hf import from_pretrained

        model = from_pretrained(source, dtype=dtype, device=device)
        if not isinstance(model, cls):
            raise TypeError(f"{cls.__name__}.from_pretrained: {source!r} holds a "
                            f"{type(model).__name__}")
        return model


def _check_tokens(model: str, name: str, t: Any) -> None:
    """decoder_input_ids / labels: an int64 or int32 (B, T) tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{model}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{model}: {name} must be int64 or int32, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{model}: {name} must be (B, T), got {tuple(t.shape)}")


def _encoder_hidden_state(encoder_outputs: Any) -> Tensor:
    if isinstance(encoder_outputs, Tensor):
        memory = encoder_outputs
    elif isinstance(encoder_outputs, (tuple, list)) and encoder_outputs:
        memory = encoder_outputs[0]
    else:
        memory = getattr(encoder_outputs, "encoder_last_hidden_state", None)
        if memory is None:
            memory = getattr(encoder_outputs, "last_hidden_state", None)
    if not isinstance(memory, Tensor) or memory.dim() != 3:
        raise ValueError("EncoderDecoder: encoder_outputs must be the encoder's last hidden "
                         "state (B, S, C) (a tensor, an output with last_hidden_state, or a "
                         f"tuple starting with it), got {type(encoder_outputs).__name__}")
    return memory
