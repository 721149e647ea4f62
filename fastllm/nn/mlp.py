"""GatedMLP: the feed-forward block of LLaMA-style models, on fastllm's fused activation.

``down_proj(act(gate_proj(x)) * up_proj(x))`` with act = silu (SwiGLU: LLaMA, Mistral,
Qwen), gelu or gelu_tanh (GeGLU: Gemma, T5 v1.1). The projections are ``torch.nn.Linear``
submodules named as Hugging Face's ``LlamaMLP`` names them (``gate_proj``, ``up_proj``,
``down_proj``), so a ``LlamaMLP`` state_dict loads as it is and PEFT ``target_modules`` carry
over; the activation and its product with ``up_proj(x)`` are one fused op
(``fastllm.functional.swiglu`` / ``geglu``), whose backward recomputes the activation instead
of saving it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastllm.ops.gated_mlp import ACTIVATIONS, gated_activation


class GatedMLP(torch.nn.Module):
    """``GatedMLP(hidden_size, intermediate_size, activation="silu", bias=False)``.

    Args:
        hidden_size: input and output features (H).
        intermediate_size: features of the gate and up projections (I).
        activation: ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"`` (Hugging Face's
            ``hidden_act`` ``"silu"``, ``"gelu"``, ``"gelu_pytorch_tanh"``).
        bias: whether the three projections have a bias (LLaMA's ``mlp_bias``).
        device, dtype: of the parameters, as for ``torch.nn.Linear``.

    Shapes: x (..., H) -> (..., H); gate_proj / up_proj weights (I, H), down_proj (H, I).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"GatedMLP: activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        hidden = gated_activation("GatedMLP", self.gate_proj(x), self.up_proj(x), self.activation)
        return self.down_proj(hidden)  # (..., I) -> (..., H)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
