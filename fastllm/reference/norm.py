"""Reference LayerNorm / RMSNorm (and the fused residual-add variants) in plain PyTorch.

They compute in float32 (float64 for float64 inputs) and round once to the input dtype,
which is what the fused kernels do, so they double as the accuracy yardstick in tests.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm_ref(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.to(_acc(input))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


def rms_norm_ref(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.to(_acc(input))
    y = x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(input.dtype)


def add_layer_norm_ref(input: Tensor, residual: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """``(layer_norm_ref(input + residual, *args, **kwargs), input + residual)``; the sum is
    rounded to the input dtype, as the fused kernel stores it."""
    summed = input + residual
    return layer_norm_ref(summed, *args, **kwargs), summed


def add_rms_norm_ref(input: Tensor, residual: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """``(rms_norm_ref(input + residual, *args, **kwargs), input + residual)``."""
    summed = input + residual
    return rms_norm_ref(summed, *args, **kwargs), summed
