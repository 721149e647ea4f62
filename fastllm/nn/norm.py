"""LayerNorm and RMSNorm modules: drop-in replacements for torch.nn.LayerNorm and
torch.nn.RMSNorm.

They subclass torch's modules, so constructor arguments (``elementwise_affine``,
``bias``, ``device``, ``dtype``), parameters, ``state_dict`` keys, ``extra_repr`` and
``isinstance`` checks are torch's own; only ``forward`` runs fastllm's kernels.
Both also offer ``forward(input, residual)`` returning ``(norm(input + residual),
input + residual)`` from one fused pass, for pre-norm residual blocks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastllm import functional as F


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        if residual is None:
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.add_layer_norm(
            input, residual, self.normalized_shape, self.weight, self.bias, self.eps
        )


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        if residual is None:
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps)
