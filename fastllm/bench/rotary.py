"""The rotary family's benchmark cases (``fastllm bench rotary``): rotary position embeddings
of q and k together (GQA: H query heads, Hkv key heads), forward and forward+backward,
fastllm against torch eager and torch.compile.

Shape glossary: B batch, T tokens, H query heads, Hkv key heads, D head dim; q (B, T, H, D),
k (B, T, Hkv, D), cos / sin (T, D / 2) float32 caches, positions 0 .. T - 1.

The contenders compute the same thing:
  fastllm        fastllm.functional.apply_rotary_qk(q, k, cos, sin): one kernel for q and k
                 (backward: the same kernel rotating back);
  torch eager    Hugging Face LLaMA's formulation written out here in plain torch (so the
                 benchmark does not need transformers): cos / sin repeated to D and cast to
                 the dtype, ``q * cos + rotate_half(q) * sin`` and the same for k, where
                 rotate_half(x) = cat(-x2, x1): several kernels and temporaries per tensor;
  torch.compile  the eager function through inductor (static shapes, compiled once per case,
                 the compilation and its first call are not timed), which fuses it;
  liger          CUDA only, where Liger-Kernel is installed: ``liger_rotary_pos_emb`` on
                 (B, H, T, D) views of the same tensors, as Hugging Face calls it (no copy:
                 its kernel rotates the contiguous (B, T, H, D) storage in place).

Effective bandwidth counts the bytes an implementation cannot avoid, each once (e = bytes
per element, n = B T (H + Hkv) D, c = the T D / 2 float32 angles of cos and sin each):
  forward           read q and k, write both rotated, read cos and sin        2 n e + 8 c
  forward+backward  the forward's, plus read both gradients and write those
                    of q and k, reading cos and sin again                    4 n e + 16 c
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch
from torch import Tensor

import fastllm.functional as fastllm_functional
from fastllm.bench.common import (
    CPU, DEFAULT_SHAPES, LIGER, CallInputs, Case, liger_module, liger_peer, pick_shapes,
)

FAMILY = "rotary"
PARAM_COLUMNS = ("op", "mode", "shape", "dtype")
KERNEL_FAMILY = "rotary"

MODES = ("fwd", "fwd+bwd")
SHAPES = ((4, 1024, 32, 8, 128),)  # LLaMA-3-8B's heads at T = 1024
QUICK_SHAPES = ((1, 64, 4, 2, 128),)
LLAMA3_8B_SHAPES = ((1, 4096, 32, 8, 128),)  # LLaMA-3-8B's heads, one 4096-token sequence
DTYPES = (torch.float32, torch.bfloat16)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def torch_rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` with ``LlamaRotaryEmbedding``'s cos / sin for
    positions 0 .. T - 1, in the (B, T, H, D) layout."""
    t = q.shape[1]
    c = torch.cat((cos[:t], cos[:t]), dim=-1).to(q.dtype).unsqueeze(-2)  # (T, 1, D)
    s = torch.cat((sin[:t], sin[:t]), dim=-1).to(q.dtype).unsqueeze(-2)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def fastllm_rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return fastllm_functional.apply_rotary_qk(q, k, cos, sin)


def liger_rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Liger-Kernel's ``liger_rotary_pos_emb``, as Hugging Face's LLaMA calls it: q, k as
    (B, H, T, D) views (``RotaryCase.contender_inputs``: the transposes of the same
    contiguous (B, T, H, D) tensors, which its kernel rotates in place without a copy),
    cos / sin (T, D) with the halves repeated (its kernel reads the first half of each
    row). Its forward (backward) overwrites q and k (the incoming gradients)."""
    return liger_module("liger_kernel.transformers.rope").liger_rotary_pos_emb(q, k, cos, sin)


@dataclasses.dataclass(frozen=True)
class RotaryCase(Case):
    mode: str  # one of MODES
    shape: tuple[int, int, int, int, int]  # (B, T, H, Hkv, D)
    dtype: torch.dtype
    op: str = "rotary-qk"
    kernel_outputs_cached = True  # the rotated q, k and their gradients (csrc: empty_output)

    def torch_function(self) -> Callable:
        return torch_rotary_qk

    def fastllm_function(self) -> Callable:
        return fastllm_rotary_qk

    def peers(self, device: torch.device) -> dict[str, Callable]:
        """Liger-Kernel's rotary on CUDA where it is installed."""
        return liger_peer(device, liger_rotary_qk)

    def contender_inputs(self, contender: str, inputs: CallInputs) -> CallInputs:
        """Liger's layout of the same tensors: q, k and the gradients transposed to
        (B, H, T, D) views, cos / sin repeated to (T, D) once here."""
        if contender != LIGER:
            return inputs
        q, k, cos, sin = inputs.args
        args = (q.transpose(1, 2), k.transpose(1, 2), torch.cat((cos, cos), dim=-1),
                torch.cat((sin, sin), dim=-1))
        if not self.backward:
            return CallInputs(args)
        return CallInputs(args, differentiable=inputs.differentiable,
                          grad_outputs=tuple(g.transpose(1, 2) for g in inputs.grad_outputs))

    def _elements(self) -> tuple[int, int]:
        b, t, h, hkv, d = self.shape
        return b * t * (h + hkv) * d, t * d // 2

    def bytes_moved(self) -> int:
        """The totals of the module docstring."""
        n, c = self._elements()
        e = self.dtype.itemsize
        return 4 * n * e + 16 * c if self.backward else 2 * n * e + 8 * c

    def largest_output_bytes(self) -> int:
        b, t, h, _, d = self.shape
        return b * t * h * d * self.dtype.itemsize

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """The rotated q and k; forward+backward also their gradients."""
        b, t, h, hkv, d = self.shape
        e = self.dtype.itemsize
        return (b * t * h * d * e, b * t * hkv * d * e) * (2 if self.backward else 1)

    def make_inputs(self, device: torch.device) -> CallInputs:
        """q, k and the caches; forward+backward: the gradients of q and k from precomputed
        ones of the outputs."""
        b, t, h, hkv, d = self.shape
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int, requires_grad: bool = False) -> Tensor:
            return torch.randn(*shape, generator=generator, device=device, dtype=self.dtype,
                               requires_grad=requires_grad)

        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
        freqs = torch.outer(torch.arange(t, device=device).float(), inv_freq)  # (T, D / 2)
        cos, sin = freqs.cos(), freqs.sin()
        q, k = randn(b, t, h, d, requires_grad=self.backward), randn(b, t, hkv, d,
                                                                      requires_grad=self.backward)
        if not self.backward:
            return CallInputs((q, k, cos, sin))
        return CallInputs((q, k, cos, sin), differentiable=(q, k),
                          grad_outputs=(randn(b, t, h, d), randn(b, t, hkv, d)))


def cases(quick: bool = False, shapes: str = DEFAULT_SHAPES,
          device: torch.device = CPU) -> list[RotaryCase]:
    """Every case, in table order: shape, dtype, mode. ``quick``: one small shape;
    ``shapes``: fastllm.bench.common.SHAPE_SETS. The cases do not depend on ``device``."""
    return [
        RotaryCase(mode, shape, dtype)
        for shape, dtype, mode in itertools.product(
            pick_shapes(shapes, quick, SHAPES, QUICK_SHAPES, LLAMA3_8B_SHAPES), DTYPES, MODES
        )
    ]
