"""BERT (Devlin et al., 2018) from fastllm's layers: a post-LayerNorm bidirectional encoder.

    embeddings:  x = LayerNorm(word[ids] + position[pos] + token_type[tt]); dropout
    each layer:  a = attention(q, k, v, key_padding_mask)          # (B, T, H, D), fused
                 x = LayerNorm(dropout(o_proj(a)) + x)             # fused add + LayerNorm
                 x = LayerNorm(dropout(down(gelu(up(x)))) + x)     # fused add + LayerNorm
    pooler:      tanh(dense(x[:, 0]))                              # the [CLS] vector

Padding never becomes a (T x T) mask: ``attention_mask`` (B, T), 1 = real token, goes to
the fused kernel as its ``key_padding_mask``. Heads:

- ``BertForPreTraining``: masked-LM (transform dense + act + LayerNorm, decoder tied to the
  word embeddings + its own bias) and next-sentence prediction on the pooler. With
  ``labels`` the MLM loss is ``fastllm.functional.linear_cross_entropy`` over the transformed
  hidden states: the (N, V) logits never exist, and ``prediction_logits`` is None unless
  ``return_logits=True``.
- ``BertForSequenceClassification``: dropout + linear on the pooler; Hugging Face's
  ``problem_type`` rules (regression when ``num_labels == 1``).

Module and parameter names are Hugging Face's (``bert.encoder.layer.0.attention.self.query``
...), so ``state_dict`` keys are the checkpoint's own; ``from_pretrained`` and
``save_pretrained`` read and write the Hugging Face layout (config.json + model.safetensors).

Shapes: B batch, T sequence length, C hidden size, H heads, D head dim (C // H), V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fastllm.functional as F
from fastllm.models.config import (
    IGNORE_INDEX,
    check_index_values,
    check_input_ids,
    check_like_input_ids,
)
from fastllm.nn import LayerNorm

logger = logging.getLogger(__name__)

__all__ = [
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertModelOutput",
    "BertForPreTrainingOutput",
    "SequenceClassifierOutput",
]


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768  # C
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # H; head dim D = C // H
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # "gelu" (exact erf, BERT's), "gelu_new"/"gelu_pytorch_tanh", "relu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # sequence classification
    num_labels: int = 2
    classifier_dropout: Optional[float] = None  # None: hidden_dropout_prob (as HF)
    problem_type: Optional[str] = None  # None: inferred from num_labels and label dtype (HF)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BertConfig: hidden_act must be one of {sorted(_ACTIVATIONS)}, "
                f"got {self.hidden_act!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "BertConfig":
        if name not in BERT_CONFIGS:
            raise ValueError(
                f"BertConfig.from_name: unknown name {name!r}; known: {sorted(BERT_CONFIGS)}"
            )
        return cls(**{**BERT_CONFIGS[name], **overrides})

    @classmethod
    def from_hf(cls, config: Union[dict, Any]) -> "BertConfig":
        """From a Hugging Face ``config.json`` dict (or a ``transformers.BertConfig``)."""
        if not isinstance(config, dict):
            config = config.to_dict()
        model_type = config.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"BertConfig.from_hf: model_type must be 'bert', got {model_type!r}")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                "BertConfig.from_hf: only position_embedding_type='absolute' is supported, "
                f"got {position_type!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if "id2label" in config and config["id2label"]:
            kwargs["num_labels"] = len(config["id2label"])
        return cls(**kwargs)

    def to_hf(self, architecture: str) -> dict:
        """The Hugging Face ``config.json`` dict that ``transformers.BertConfig`` reads."""
        out = dataclasses.asdict(self)
        num_labels = out.pop("num_labels")
        out.update(
            model_type="bert",
            architectures=[architecture],
            position_embedding_type="absolute",
            id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
            label2id={f"LABEL_{i}": i for i in range(num_labels)},
            tie_word_embeddings=True,
        )
        return out


BERT_CONFIGS: dict[str, dict] = {
    "bert-base-uncased": dict(),
    "bert-large-uncased": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "all-minilm-l6-v2": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    # tests / CPU (bert-mini: google/bert_uncased_L-4_H-256_A-4's shape)
    "bert-mini": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
    ),
    "bert-tiny": dict(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128,
    ),
}

_ACTIVATIONS = {
    "gelu": lambda x: torch_F.gelu(x),
    "gelu_new": lambda x: torch_F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch_F.gelu(x, approximate="tanh"),
    "relu": torch_F.relu,
}


# ---------------------------------------------------------------------------------------
# Outputs (Hugging Face's names)
# ---------------------------------------------------------------------------------------


@dataclass
class BertModelOutput:
    last_hidden_state: Tensor  # (B, T, C)
    pooler_output: Optional[Tensor] = None  # (B, C)


@dataclass
class BertForPreTrainingOutput:
    loss: Optional[Tensor] = None  # MLM + NSP
    prediction_logits: Optional[Tensor] = None  # (B, T, V); None with labels unless return_logits
    seq_relationship_logits: Optional[Tensor] = None  # (B, 2)
    last_hidden_state: Optional[Tensor] = None  # (B, T, C)
    mlm_loss: Optional[Tensor] = None
    nsp_loss: Optional[Tensor] = None

    @property
    def logits(self) -> Optional[Tensor]:
        return self.prediction_logits


@dataclass
class SequenceClassifierOutput:
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None  # (B, num_labels)
    last_hidden_state: Optional[Tensor] = None  # (B, T, C)


# ---------------------------------------------------------------------------------------
# Input checks (shapes and dtypes; values on CPU outside torch.compile)
# ---------------------------------------------------------------------------------------


def _check_inputs(
    config: BertConfig,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    token_type_ids: Optional[Tensor],
    position_ids: Optional[Tensor],
) -> None:
    """The checks of fastllm/models/config.py, with BERT's allowances (Hugging Face's): a
    float 0/1 attention_mask, position_ids (1, T)."""
    model = "BertModel"
    check_input_ids(model, input_ids, config.max_position_embeddings,
                    positions_name="max_position_embeddings", vocab_size=config.vocab_size)
    check_like_input_ids(model, "attention_mask", attention_mask, input_ids, floats=True)
    check_like_input_ids(model, "token_type_ids", token_type_ids, input_ids)
    check_like_input_ids(model, "position_ids", position_ids, input_ids, batch_one=True)
    check_index_values(model, "token_type_ids", token_type_ids, config.type_vocab_size,
                       "type_vocab_size")
    check_index_values(model, "position_ids", position_ids, config.max_position_embeddings,
                       "max_position_embeddings")


def _promote(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` in their promoted dtype, as ``a + b`` would compute (the fused kernels
    take one dtype; under autocast a Linear's output is bf16 while the residual is fp32)."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


# ---------------------------------------------------------------------------------------
# Encoder (module names are Hugging Face's, so state_dict keys are the checkpoint's)
# ---------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor],
                position_ids: Optional[Tensor]) -> Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        words = self.word_embeddings(input_ids)  # (B, T, C)
        extra = self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        x, _ = self.LayerNorm(words, extra.expand_as(words))  # LayerNorm(words + extra) fused
        return self.dropout(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.key(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        v = self.value(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        y = F.attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                        key_padding_mask=key_padding_mask)  # (B, T, H, D)
        return y.reshape(B, T, C)


class BertSelfOutput(nn.Module):
    """dense + dropout, then LayerNorm(. + residual) in one fused pass (post-LN)."""

    def __init__(self, config: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        h = self.dropout(self.dense(h))  # (B, T, C)
        h, residual = _promote(h, residual)  # autocast: bf16 dense output, fp32 residual
        out, _ = self.LayerNorm(h, residual)  # (B, T, C)
        return out


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, key_padding_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))  # (B, T, intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        x = self.attention(x, key_padding_mask)  # (B, T, C)
        return self.output(self.intermediate(x), x)  # (B, T, C)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, C): the [CLS] token


# ---------------------------------------------------------------------------------------
# Weights: Hugging Face layout in both directions
# ---------------------------------------------------------------------------------------

# Tensors in Hugging Face checkpoints that are not parameters of ours: buffers and the
# tied copies (the decoder weight is the word embeddings, its bias is cls.predictions.bias).
_NOT_PARAMETERS = ("embeddings.position_ids", "cls.predictions.decoder.weight",
                   "cls.predictions.decoder.bias")
_HEAD_PREFIXES = ("cls.", "classifier.")


def _rename_legacy(key: str) -> str:
    # Original TF-converted checkpoints name LayerNorm's parameters gamma / beta.
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def _read_checkpoint(source) -> tuple[dict, dict[str, Tensor]]:
    """(config dict, state dict) from a Hugging Face directory or an in-memory model."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"from_pretrained: no config.json in {path!r}")
        with open(config_path) as f:
            config = json.load(f)
        weights = os.path.join(path, "model.safetensors")
        if os.path.isfile(weights):
            from safetensors.torch import load_file

            state = load_file(weights)
        elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu",
                               weights_only=True)
        else:
            raise FileNotFoundError(
                f"from_pretrained: neither model.safetensors nor pytorch_model.bin in {path!r}"
            )
        return config, state
    if isinstance(source, nn.Module) and hasattr(source, "config"):  # a transformers model
        return source.config.to_dict(), dict(source.state_dict())
    raise TypeError(
        "from_pretrained: source must be a Hugging Face model directory or a transformers "
        f"model, got {type(source).__name__}"
    )


class _BertPreTrainedModel(nn.Module):
    """Shared init, from_pretrained and save_pretrained for the BERT classes."""

    base_model_prefix = ""  # "bert." for the head models: where the encoder's keys live

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        """Hugging Face's BERT initialisation."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward (``torch.utils.checkpoint``)."""
        self._encoder().encoder.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Hugging Face's name for ``set_gradient_checkpointing(True)``."""
        self.set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.set_gradient_checkpointing(False)

    def _encoder(self) -> "BertModel":
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, source, *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None,
                        new_head: bool = False, **config_overrides):
        """Load a Hugging Face BERT checkpoint: a directory (config.json + model.safetensors
        or pytorch_model.bin) or an in-memory transformers ``BertModel`` /
        ``BertForPreTraining`` / ``BertForSequenceClassification`` (or any BERT with the same
        names). Strict: a tensor this model needs that the checkpoint lacks, or a tensor of
        the checkpoint this model has no place for, is an error that lists them. The one
        exception is Hugging Face's own: ``BertModel`` loads the encoder of a checkpoint
        with heads (``bert.`` prefix) and leaves the head tensors (``cls.``,
        ``classifier.``) unused.

        ``new_head=True`` is the fine-tuning start (Hugging Face's "newly initialized"
        weights, asked for explicitly here): the head tensors (``cls.``, ``classifier.``)
        this model needs and the checkpoint lacks keep their fresh initialisation, and the
        checkpoint's other heads are left unused; the encoder must still be complete.
        ``config_overrides`` replace config fields (``num_labels=3``, dropouts, ...).
        """
        hf_config, state = _read_checkpoint(source)
        config = dataclasses.replace(BertConfig.from_hf(hf_config), **config_overrides)
        model = cls(config)
        model.load_hf_state_dict(state, new_head=new_head)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def load_hf_state_dict(self, state: dict[str, Tensor], new_head: bool = False) -> None:
        """Load a Hugging Face BERT state dict (strict; see ``from_pretrained``)."""
        state = {_rename_legacy(k): v for k, v in state.items() if k not in _NOT_PARAMETERS
                 and not k.endswith(".embeddings.position_ids")}
        own = self.state_dict()
        has_prefix = any(k.startswith("bert.") for k in state)
        if self.base_model_prefix == "":
            if has_prefix:  # encoder of a checkpoint with heads: drop the heads (as HF)
                state = {k.removeprefix("bert."): v for k, v in state.items()
                         if not k.startswith(_HEAD_PREFIXES)}
        elif not has_prefix:  # a bare encoder checkpoint: its keys go under "bert."
            state = {(k if k.startswith(_HEAD_PREFIXES) else "bert." + k): v
                     for k, v in state.items()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if new_head:
            fresh = [k for k in missing if k.startswith(_HEAD_PREFIXES)]
            if fresh:
                logger.info("%s.from_pretrained: newly initialised head tensors: %s",
                            type(self).__name__, fresh)
            state = {**state, **{k: own[k] for k in fresh}}
            state = {k: v for k, v in state.items()
                     if not (k in unexpected and k.startswith(_HEAD_PREFIXES))}
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.from_pretrained: the checkpoint does not match the "
                f"model; missing tensors: {missing or 'none'}; unexpected tensors: "
                f"{unexpected or 'none'}"
            )
        wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
                 for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(f"{type(self).__name__}.from_pretrained: shape mismatch: {wrong}")
        self.load_state_dict(state, strict=True)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write config.json + model.safetensors in the Hugging Face layout (names and
        config fields), each to a temporary file renamed into place, so
        ``transformers.<same class>.from_pretrained(dir)`` loads it unchanged."""
        from fastllm.models.hf import write_hf_directory

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = self.config.to_hf(type(self).__name__)
        config["torch_dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        write_hf_directory(save_directory, state, config)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


class BertModel(_BertPreTrainedModel):
    """The encoder: ``forward(input_ids, attention_mask, token_type_ids, position_ids)`` ->
    ``BertModelOutput(last_hidden_state (B, T, C), pooler_output (B, C))``.

    ``attention_mask`` (B, T): 1 / True = a real token, 0 / False = padding (bool, int or
    float 0/1 as Hugging Face takes it); it becomes the fused attention's key padding mask.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    def _encoder(self) -> "BertModel":
        return self

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        attention_mask: Optional[Tensor] = None,  # (B, T)
        token_type_ids: Optional[Tensor] = None,  # (B, T)
        position_ids: Optional[Tensor] = None,  # (B, T) or (1, T)
    ) -> BertModelOutput:
        _check_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()  # (B, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        x = self.encoder(x, key_padding_mask)  # (B, T, C)
        pooled = self.pooler(x) if self.pooler is not None else None  # (B, C)
        return BertModelOutput(last_hidden_state=x, pooler_output=pooled)


def _loss_normaliser(loss_sum: Tensor, count: Union[int, Tensor, None], labels: Tensor,
                     ignore_index: int = -100) -> Tensor:
    """``loss_sum / count``; ``count`` None means this batch's non-ignored labels (the mean)."""
    if count is None:
        count = (labels != ignore_index).sum()
    if isinstance(count, Tensor):
        count = count.to(device=loss_sum.device, dtype=loss_sum.dtype)
    return loss_sum / count


def _check_labels(model: str, name: str, labels: Tensor, shape: tuple) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{model}: {name} must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{model}: {name} must have shape {tuple(shape)}, got "
                         f"{tuple(labels.shape)}")


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))  # (B, T, C)


class BertLMPredictionHead(nn.Module):
    """The MLM transform and the decoder bias; the decoder weight is the word embeddings."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(_BertPreTrainedModel):
    """BERT pre-training: masked-LM + next-sentence prediction (the paper's two losses).

    ``forward(input_ids, attention_mask, token_type_ids, position_ids, labels,
    next_sentence_label, num_items_in_batch, num_sentences_in_batch, return_logits)``:

    - ``labels`` (B, T): the MLM targets, -100 = not predicted. The MLM loss is
      ``linear_cross_entropy`` over the transformed hidden states with the tied decoder
      weight and bias; the (B * T, V) logits are never formed, so ``prediction_logits`` is
      None unless ``return_logits=True`` (which computes them in addition). Without labels
      the logits are returned.
    - ``next_sentence_label`` (B,): 0 = B follows A, 1 = random; cross-entropy on
      ``seq_relationship_logits`` (B, 2).
    - ``loss = mlm_loss + nsp_loss`` (either alone when only one label set is given).
    - Gradient accumulation: ``num_items_in_batch`` (the number of non-ignored MLM labels
      over the whole accumulated batch) makes the MLM term ``sum / num_items_in_batch``
      instead of this micro-batch's mean, and ``num_sentences_in_batch`` (the number of NSP
      labels over the accumulated batch) does the same for the NSP term; summing the
      micro-batches' losses then gives the full batch's loss and gradients exactly.
    """

    base_model_prefix = "bert."

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.apply(self._init_weights)

    def _encoder(self) -> BertModel:
        return self.bert

    @property
    def decoder_weight(self) -> Tensor:
        return self.bert.embeddings.word_embeddings.weight  # (V, C), tied

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        attention_mask: Optional[Tensor] = None,  # (B, T)
        token_type_ids: Optional[Tensor] = None,  # (B, T)
        position_ids: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,  # (B, T)
        next_sentence_label: Optional[Tensor] = None,  # (B,)
        num_items_in_batch: Union[int, Tensor, None] = None,
        num_sentences_in_batch: Union[int, Tensor, None] = None,
        return_logits: bool = False,
    ) -> BertForPreTrainingOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids)  # checks them
        model = "BertForPreTraining"
        if labels is not None:
            check_like_input_ids(model, "labels", labels, input_ids)
            check_index_values(model, "labels", labels, self.config.vocab_size, "vocab_size",
                               ignore_index=IGNORE_INDEX)
        if next_sentence_label is not None:
            _check_labels(model, "next_sentence_label", next_sentence_label,
                          tuple(input_ids.shape[:1]))
        x = out.last_hidden_state  # (B, T, C)
        h = self.cls.predictions.transform(x)  # (B, T, C)
        seq_logits = self.cls.seq_relationship(out.pooler_output)  # (B, 2)
        weight, bias = self.decoder_weight, self.cls.predictions.bias  # (V, C), (V,)
        if weight.dtype != h.dtype:  # autocast: the decoder runs in the autocast dtype
            weight, bias = weight.to(h.dtype), bias.to(h.dtype)

        mlm_loss = nsp_loss = None
        if labels is not None:
            mlm_sum = F.linear_cross_entropy(h, weight, labels, linear_bias=bias,
                                             reduction="sum")
            mlm_loss = _loss_normaliser(mlm_sum, num_items_in_batch, labels)
        if next_sentence_label is not None:
            nsp_sum = F.cross_entropy(seq_logits, next_sentence_label, reduction="sum")
            nsp_loss = _loss_normaliser(nsp_sum, num_sentences_in_batch, next_sentence_label)
        losses = [t for t in (mlm_loss, nsp_loss) if t is not None]
        loss = sum(losses[1:], losses[0]) if losses else None

        logits = None
        if labels is None or return_logits:
            logits = torch_F.linear(h, weight, bias)  # (B, T, V)
        return BertForPreTrainingOutput(loss=loss, prediction_logits=logits,
                                        seq_relationship_logits=seq_logits,
                                        last_hidden_state=x, mlm_loss=mlm_loss, nsp_loss=nsp_loss)


class BertForSequenceClassification(_BertPreTrainedModel):
    """Dropout + linear on the pooled [CLS] vector; ``labels`` (B,) gives Hugging Face's
    loss: regression (MSE) when ``num_labels == 1``, cross-entropy for integer labels,
    BCE-with-logits for float (B, num_labels) multi-labels (``config.problem_type``
    overrides the inference). ``num_items_in_batch`` (labels over the accumulated batch)
    turns the cross-entropy mean into ``sum / num_items_in_batch``."""

    base_model_prefix = "bert."

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None \
            else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init_weights)

    def _encoder(self) -> BertModel:
        return self.bert

    def _problem_type(self, labels: Tensor) -> str:
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,  # (B,) or (B, num_labels)
        num_items_in_batch: Union[int, Tensor, None] = None,
    ) -> SequenceClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(self.dropout(out.pooler_output))  # (B, num_labels)
        loss = None
        if labels is not None:
            B = input_ids.shape[0]
            problem = self._problem_type(labels)
            if problem == "regression":
                if labels.numel() != B * self.num_labels:
                    raise ValueError(f"labels must have {B * self.num_labels} values for "
                                     f"regression, got shape {tuple(labels.shape)}")
                target = labels.to(logits.dtype).reshape(logits.shape).squeeze(-1) \
                    if self.num_labels == 1 else labels.to(logits.dtype)
                loss = torch_F.mse_loss(logits.squeeze(-1) if self.num_labels == 1 else logits,
                                        target)
            elif problem == "single_label_classification":
                _check_labels("BertForSequenceClassification", "labels", labels, (B,))
                loss_sum = F.cross_entropy(logits, labels, reduction="sum")
                loss = _loss_normaliser(loss_sum, num_items_in_batch, labels)
            elif problem == "multi_label_classification":
                _check_labels("BertForSequenceClassification", "labels", labels,
                              tuple(logits.shape))
                loss = torch_F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                raise ValueError(f"config.problem_type: unknown {problem!r}")
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        last_hidden_state=out.last_hidden_state)
