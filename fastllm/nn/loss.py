"""CrossEntropyLoss and LinearCrossEntropyLoss: drop-in replacements for
torch.nn.CrossEntropyLoss and torch.nn.LinearCrossEntropyLoss.

They subclass torch's modules, so constructor arguments, the ``weight`` buffer, the owned
``linear`` layer, ``state_dict`` keys and ``isinstance`` checks are torch's own; ``forward``
runs fastllm's fused kernels. Extra keyword-only options: ``z_loss`` and ``softcap`` (both),
``inplace_backward`` (CrossEntropyLoss) and ``chunk_size`` (LinearCrossEntropyLoss), with
the semantics of fastllm.functional.cross_entropy (the z-loss is averaged over the
non-ignored tokens, never weighted by the class weights), and ``return_z_loss`` /
``return_token_accuracy`` (both): ``forward`` then returns a
``fastllm.functional.CrossEntropyOutput(loss, z_loss, token_accuracy)`` named tuple, as
Liger-Kernel's losses return their logged outputs. Arguments are checked when ``forward``
runs, with errors naming them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastllm import functional as F


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float = 0.0,
        inplace_backward: bool = False,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy

    def forward(self, input: Tensor, target: Tensor) -> Tensor | F.CrossEntropyOutput:
        return F.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            self.z_loss, self.softcap, inplace_backward=self.inplace_backward,
            return_z_loss=self.return_z_loss, return_token_accuracy=self.return_token_accuracy,
        )

    def extra_repr(self) -> str:
        extras = [f"{k}={getattr(self, k)}" for k in ("z_loss", "softcap") if getattr(self, k)]
        extras += [f"{k}=True" for k in ("inplace_backward", "return_z_loss",
                                          "return_token_accuracy") if getattr(self, k)]
        return ", ".join(extras)


class _LinearCrossEntropyLossCompat(torch.nn.modules.loss._WeightedLoss):
    """torch.nn.LinearCrossEntropyLoss's constructor, attributes and ``state_dict`` (the
    owned ``linear`` layer, the ``weight`` buffer), for a torch that lacks the module. Its
    K-dimensional form (``out_features != ()``) needs torch's own chunked function, which
    such a torch lacks too: forward raises."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(
                f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(
                f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)
        self.options = options

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError(
            f"LinearCrossEntropyLoss: out_features={self.out_features} (K-dimensional) needs "
            f"torch.nn.functional.linear_cross_entropy, which torch {torch.__version__} lacks; "
            "use out_features=()")

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")


_TorchLinearCrossEntropyLoss = getattr(torch.nn, "LinearCrossEntropyLoss",
                                       _LinearCrossEntropyLossCompat)


class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss):
    """Owns ``self.linear`` (``Linear(in_features, num_classes, bias=bias)``) like torch's
    module and computes ``cross_entropy(self.linear(input), target)`` chunk by chunk.
    ``options`` (torch's chunking options) is accepted and ignored: ``chunk_size`` picks the
    chunking here. K-dimensional losses (``out_features != ()``) run torch's own module."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: float = 0.0,
        chunk_size: Optional[int] = None,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
    ) -> None:
        super().__init__(
            in_features, num_classes, out_features=out_features, bias=bias, device=device,
            dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options,
        )
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy

    def forward(self, input: Tensor, target: Tensor) -> Tensor | F.CrossEntropyOutput:
        if self.out_features != ():
            if self.z_loss or self.softcap or self.return_z_loss or self.return_token_accuracy:
                raise ValueError(
                    "LinearCrossEntropyLoss: z_loss, softcap, return_z_loss and "
                    "return_token_accuracy need out_features=(), got "
                    f"out_features={self.out_features}"
                )
            return super().forward(input, target)
        return F.linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            chunk_size=self.chunk_size, return_z_loss=self.return_z_loss,
            return_token_accuracy=self.return_token_accuracy,
        )
