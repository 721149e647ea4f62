"""Drop-in ``nn.Module`` layers backed by fastllm's kernels."""

from fastllm.nn.attention import MultiheadAttention
from fastllm.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss
from fastllm.nn.mlp import GatedMLP
from fastllm.nn.norm import LayerNorm, RMSNorm
from fastllm.nn.rotary import RotaryEmbedding

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "MultiheadAttention",
    "GatedMLP",
    "RotaryEmbedding",
]
