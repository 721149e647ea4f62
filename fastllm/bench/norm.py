"""The norm family's benchmark cases: LayerNorm, RMSNorm and their fused residual-add
variants, forward and forward+backward, fastllm against torch eager and torch.compile.

Shape glossary: N rows (tokens), D the normalised (hidden) size; x, residual, out,
summed are (N, D); weight, bias are (D,). Parameters have the input's dtype (a bf16
model's norm weights are bf16).

The contenders compute the same thing:
  fastllm        fastllm.functional.<op> on the backend being benchmarked;
  torch eager    torch.nn.functional.layer_norm / rms_norm; the add variants are the
                 unfused ``summed = x + residual`` followed by the norm, returning
                 ``(norm(summed), summed)`` like fastllm's fused op;
  torch.compile  the eager function through inductor (static shapes, compiled once per
                 case, the compilation and its first call are not timed);
  liger          CUDA only, where Liger-Kernel is installed: its layer norm / RMSNorm
                 (liger_kernel.transformers.functional, its defaults). Liger has no fused
                 residual-add + norm counterpart: the add variants have no liger row.

Forward+backward times one forward and one backward together. The backward starts from
precomputed output gradients (no ``out.sum()``, whose gradient would be a zero-stride
expand) and runs with ``torch.autograd.grad``: the gradients are returned, not accumulated
into ``.grad``, so no zeroing is needed between calls and nothing extra is allocated. (With
``backward()`` the add variants would pay for one extra copy that is not the op's: x and
residual receive the same gradient tensor, and autograd clones it for the second leaf.)

Effective bandwidth counts the bytes an implementation cannot avoid, each once
(e = bytes per element, n = N * D, A = 1 for the add variants else 0, B = 1 for layer
norm, which has a bias, else 0):
  forward           read x (+ residual)                    (1 + A) * n * e
                    write out (+ summed)                   (1 + A) * n * e
                    read weight (+ bias)                   (1 + B) * D * e
                    total                                  (2 + 2A) * n * e + (1 + B) * D * e
  forward+backward  the forward's bytes, plus
                    read grad_out (+ grad_summed)          (1 + A) * n * e
                    read x (the add variants: summed)      n * e
                    write grad_x (which is grad_residual)  n * e
                    read weight                            D * e
                    write grad_weight (+ grad_bias)        (1 + B) * D * e
                    total                                  (5 + 3A) * n * e + (3 + 2B) * D * e
The saved per-row statistics (mean, rstd: N floats each) are not counted: an
implementation may recompute them, and they are a 1/D fraction of one tensor.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import fastllm.functional as fastllm_functional
from fastllm.bench.common import (
    CPU, DEFAULT_SHAPES, CallInputs, Case, liger_functional, liger_peer, pick_shapes,
)

FAMILY = "norm"
PARAM_COLUMNS = ("op", "mode", "shape", "dtype")
KERNEL_FAMILY = "norm"

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
MODES = ("fwd", "fwd+bwd")
SHAPES = ((4096, 1024), (8192, 4096))
QUICK_SHAPES = ((256, 512),)
LLAMA3_8B_SHAPES = ((4096, 4096),)  # (tokens, hidden): one 4096-token sequence of LLaMA-3-8B
DTYPES = (torch.float32, torch.bfloat16)

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; rms_norm uses eps=None on both sides


# ------------------------------------------------------------------ the contenders
# One function per op and contender, taking the op's tensors positionally so that
# torch.compile sees plain tensor arguments.


def torch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, LAYER_NORM_EPS)


def torch_rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    return F.rms_norm(x, x.shape[-1:], weight)


def torch_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor):
    summed = x + residual
    return F.layer_norm(summed, x.shape[-1:], weight, bias, LAYER_NORM_EPS), summed


def torch_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor):
    summed = x + residual
    return F.rms_norm(summed, x.shape[-1:], weight), summed


def fastllm_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return fastllm_functional.layer_norm(x, x.shape[-1:], weight, bias, LAYER_NORM_EPS)


def fastllm_rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    return fastllm_functional.rms_norm(x, x.shape[-1:], weight)


def fastllm_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor):
    return fastllm_functional.add_layer_norm(x, residual, x.shape[-1:], weight, bias, LAYER_NORM_EPS)


def fastllm_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor):
    return fastllm_functional.add_rms_norm(x, residual, x.shape[-1:], weight)


def liger_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return liger_functional().liger_layer_norm(x, weight, bias, LAYER_NORM_EPS)


def liger_rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    """Liger's defaults (casting_mode "llama", and in_place: its backward writes dx over
    the incoming gradient); eps as torch's rms_norm with eps=None takes it."""
    return liger_functional().liger_rms_norm(x, weight, torch.finfo(x.dtype).eps)


# Liger-Kernel has no fused residual-add + layer norm, and its fused add + RMSNorm returns
# other outputs: the add variants get no liger row.
_LIGER_FUNCTIONS = {"layer_norm": liger_layer_norm, "rms_norm": liger_rms_norm}

_TORCH_FUNCTIONS = {
    "layer_norm": torch_layer_norm,
    "rms_norm": torch_rms_norm,
    "add_layer_norm": torch_add_layer_norm,
    "add_rms_norm": torch_add_rms_norm,
}
_FASTLLM_FUNCTIONS = {
    "layer_norm": fastllm_layer_norm,
    "rms_norm": fastllm_rms_norm,
    "add_layer_norm": fastllm_add_layer_norm,
    "add_rms_norm": fastllm_add_rms_norm,
}


@dataclasses.dataclass(frozen=True)
class NormCase(Case):
    kernel_outputs_cached = True  # out, residual_out and grad_input (csrc: empty_output)
    op: str  # one of OPS
    mode: str  # one of MODES
    shape: tuple[int, int]  # (N, D)
    dtype: torch.dtype

    @property
    def has_residual(self) -> bool:
        return self.op.startswith("add_")

    @property
    def has_bias(self) -> bool:
        return self.op.endswith("layer_norm")

    def torch_function(self) -> Callable:
        return _TORCH_FUNCTIONS[self.op]

    def fastllm_function(self) -> Callable:
        return _FASTLLM_FUNCTIONS[self.op]

    def peers(self, device: torch.device) -> dict[str, Callable]:
        """Liger-Kernel's layer norm / RMSNorm on CUDA where it is installed."""
        return liger_peer(device, _LIGER_FUNCTIONS[self.op]) if self.op in _LIGER_FUNCTIONS else {}

    def bytes_moved(self) -> int:
        """The totals of the module docstring."""
        n_rows, d = self.shape
        e = self.dtype.itemsize
        a, b = int(self.has_residual), int(self.has_bias)
        if self.backward:
            return (5 + 3 * a) * n_rows * d * e + (3 + 2 * b) * d * e
        return (2 + 2 * a) * n_rows * d * e + (1 + b) * d * e

    def largest_output_bytes(self) -> int:
        n_rows, d = self.shape
        return n_rows * d * self.dtype.itemsize

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """out (and summed); forward+backward also grad_x (which is grad_residual: one tensor
        can be both) and the parameters' gradients."""
        n_rows, d = self.shape
        e = self.dtype.itemsize
        outputs = (n_rows * d * e,) * (2 if self.has_residual else 1)
        if self.backward:
            outputs += (n_rows * d * e,) + (d * e,) * (2 if self.has_bias else 1)
        return outputs

    def make_inputs(self, device: torch.device) -> CallInputs:
        """The op's arguments x, (residual,) weight, (bias); forward+backward: the gradients
        are taken of all of them, from precomputed gradients of out (and of summed)."""
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*size: int, requires_grad: bool = self.backward) -> Tensor:
            return torch.randn(
                *size, generator=generator, device=device, dtype=self.dtype,
                requires_grad=requires_grad,
            )

        n_rows, d = self.shape
        args = [randn(n_rows, d)]
        if self.has_residual:
            args.append(randn(n_rows, d))
        args.append(randn(d))
        if self.has_bias:
            args.append(randn(d))
        if not self.backward:
            return CallInputs(tuple(args))
        grad_outputs = tuple(
            randn(n_rows, d, requires_grad=False) for _ in range(2 if self.has_residual else 1)
        )
        return CallInputs(tuple(args), differentiable=tuple(args), grad_outputs=grad_outputs)


def cases(quick: bool = False, shapes: str = DEFAULT_SHAPES,
          device: torch.device = CPU) -> list[NormCase]:
    """Every case, in table order: shape, dtype, op, mode. ``quick``: one small shape;
    ``shapes``: fastllm.bench.common.SHAPE_SETS. The cases do not depend on ``device``."""
    return [
        NormCase(op, mode, shape, dtype)
        for shape, dtype, op, mode in itertools.product(
            pick_shapes(shapes, quick, SHAPES, QUICK_SHAPES, LLAMA3_8B_SHAPES), DTYPES, OPS, MODES
        )
    ]
