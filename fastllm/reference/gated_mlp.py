"""Reference SwiGLU / GeGLU in plain PyTorch: ``act(gate) * up``.

They compute in float32 (float64 for float64 inputs) and round once to the input dtype, which
is what the fused kernels do, so they double as the accuracy yardstick in tests. The
activations are written out as formulas (not ``F.silu`` / ``F.gelu``) so that every dtype
gives the float64 math's special values: ``act(-inf) = NaN``, ``act(+inf) = +inf``, and NaN
gradients at +-inf (torch's vectorised float32 ``gelu`` returns NaN at +inf). Being plain
autograd, the float32 gelu_tanh backward overflows (``g**3``) to NaN for |gate| > 7e12, as
torch's own does; the kernels clamp there and give 0 or 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

GELU_TANH_K0 = math.sqrt(2.0 / math.pi)
GELU_TANH_K1 = 0.044715


def split_halves(gate: Tensor, up: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(gate, up)``; with ``up=None``, the two halves of gate's last dim (views): the first
    is the gate, the second the up projection."""
    if up is not None:
        return gate, up
    n = gate.shape[-1] // 2
    return gate[..., :n], gate[..., n:]


def activation_ref(g: Tensor, activation: str) -> Tensor:
    """silu, gelu (erf) or gelu_tanh of ``g``, in g's dtype."""
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu":
        return g * 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
    if activation == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(GELU_TANH_K0 * (g + GELU_TANH_K1 * g * g * g)))
    raise ValueError(f"activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}")


def gated_mlp_ref(gate: Tensor, up: Optional[Tensor], activation: str) -> Tensor:
    """``act(gate) * up`` (``up=None``: the halves of gate), differentiable by autograd."""
    g, u = split_halves(gate, up)
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (activation_ref(g.to(acc), activation) * u.to(acc)).to(gate.dtype)
