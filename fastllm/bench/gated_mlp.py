"""The gated-MLP family's benchmark cases (``fastllm bench mlp``): SwiGLU's fused activation
``silu(gate) * up``, forward and forward+backward, fastllm against torch eager and
torch.compile.

Shape glossary: N rows (tokens), I the intermediate size (LLaMA-7B's 11008); gate, up, out
are (N, I).

The contenders compute the same thing:
  fastllm        fastllm.functional.swiglu(gate, up) on the backend being benchmarked;
  torch eager    ``torch.nn.functional.silu(gate) * up``: two kernels, the silu result
                 written and read back, and saved for backward;
  torch.compile  the eager function through inductor (static shapes, compiled once per
                 case, the compilation and its first call are not timed), which fuses it;
  liger          CUDA only, where Liger-Kernel is installed: its LigerSiLUMulFunction.

Forward+backward times one forward and one backward together, from a precomputed gradient
of out, with ``torch.autograd.grad`` (shared plumbing, fastllm.bench.common.Case).

Effective bandwidth counts the bytes an implementation cannot avoid, each once (e = bytes
per element, n = N * I):
  forward           read gate and up, write out                            3 * n * e
  forward+backward  the forward's, plus read grad_out, gate and up and
                    write grad_gate and grad_up                            8 * n * e
(Recomputing silu in backward costs no bytes; saving it would cost a write and a read.)
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

FAMILY = "mlp"  # the command line's name (`fastllm bench mlp`); the op family is gated_mlp
PARAM_COLUMNS = ("op", "mode", "shape", "dtype")
KERNEL_FAMILY = "gated_mlp"

MODES = ("fwd", "fwd+bwd")
SHAPES = ((8192, 11008),)
QUICK_SHAPES = ((256, 1024),)
LLAMA3_8B_SHAPES = ((4096, 14336),)  # one 4096-token sequence, LLaMA-3-8B's intermediate size
DTYPES = (torch.float32, torch.bfloat16)


def torch_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def fastllm_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return fastllm_functional.swiglu(gate, up)


def liger_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Liger-Kernel's LigerSiLUMulFunction (through its functional ``liger_swiglu``)."""
    return liger_functional().liger_swiglu(gate, up)


@dataclasses.dataclass(frozen=True)
class GatedMLPCase(Case):
    kernel_outputs_cached = True  # out and the gradients of gate and up (csrc: empty_output)
    mode: str  # one of MODES
    shape: tuple[int, int]  # (N, I)
    dtype: torch.dtype
    op: str = "swiglu"

    def torch_function(self) -> Callable:
        return torch_swiglu

    def fastllm_function(self) -> Callable:
        return fastllm_swiglu

    def peers(self, device: torch.device) -> dict[str, Callable]:
        """Liger-Kernel's SwiGLU on CUDA where it is installed."""
        return liger_peer(device, liger_swiglu)

    def bytes_moved(self) -> int:
        """The totals of the module docstring."""
        n = self.shape[0] * self.shape[1]
        return (8 if self.backward else 3) * n * self.dtype.itemsize

    def largest_output_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """out; forward+backward also the gradients of gate and up."""
        return (self.largest_output_bytes(),) * (3 if self.backward else 1)

    def make_inputs(self, device: torch.device) -> CallInputs:
        """gate and up; forward+backward: their gradients from a precomputed one of out."""
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(requires_grad: bool) -> Tensor:
            return torch.randn(*self.shape, generator=generator, device=device,
                               dtype=self.dtype, requires_grad=requires_grad)

        gate, up = randn(self.backward), randn(self.backward)
        if not self.backward:
            return CallInputs((gate, up))
        return CallInputs((gate, up), differentiable=(gate, up), grad_outputs=(randn(False),))


def cases(quick: bool = False, shapes: str = DEFAULT_SHAPES,
          device: torch.device = CPU) -> list[GatedMLPCase]:
    """Every case, in table order: shape, dtype, mode. ``quick``: one small shape;
    ``shapes``: fastllm.bench.common.SHAPE_SETS. The cases do not depend on ``device``."""
    return [
        GatedMLPCase(mode, shape, dtype)
        for shape, dtype, mode in itertools.product(
            pick_shapes(shapes, quick, SHAPES, QUICK_SHAPES, LLAMA3_8B_SHAPES), DTYPES, MODES
        )
    ]
