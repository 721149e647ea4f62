"""The cross-entropy family's benchmark cases: the fused cross-entropy on (N, V) logits and
linear + cross-entropy on (N, H) hidden states and a (V, H) output projection, forward and
forward+backward, fastllm against torch eager and torch.compile — and, for linear +
cross-entropy, torch's own chunked ``F.linear_cross_entropy`` too.

Shape glossary: N rows (tokens), V classes (vocabulary), H hidden size; logits (N, V),
target (N,) int64 with every 16th row ignored (ignore_index=-100, like padding), hidden
(N, H), linear_weight (V, H). reduction="mean" everywhere (what training uses).

The contenders compute the same thing:
  fastllm                    fastllm.functional.cross_entropy / linear_cross_entropy on the
                             backend being benchmarked (linear: default chunk size);
  fastllm inplace_backward   cross-entropy forward+backward only: the same with
                             ``inplace_backward=True``, the gradient written over the logits
                             (Liger-Kernel's behaviour, and flash-attn's option of that
                             name): no fresh (N, V) gradient, so no page faults on it. It
                             gets its own copy of the logits, made once while its call is
                             built, so that the other contenders see the original values;
                             later calls compute on the gradient it left there, which costs
                             the kernels the same (values in [-1, 1]);
  torch eager                F.cross_entropy(logits, target); linear: the unfused
                             F.cross_entropy(F.linear(hidden, weight), target);
  torch.compile              the eager function through inductor (static shapes, compiled
                             once per case, compilation and its first call not timed);
  torch linear_cross_entropy linear cases only: torch's F.linear_cross_entropy with
                             ``options=LinearCrossEntropyOptions()``, its chunked path (the
                             default options=None is the unfused composition, i.e. eager);
  liger                      CUDA only, where Liger-Kernel is installed: its
                             LigerCrossEntropyFunction / LigerFusedLinearCrossEntropyFunction
                             (through liger_kernel.transformers.functional, its defaults).

Forward+backward times one forward and one backward (``torch.autograd.grad`` of the loss
with respect to the logits, or to hidden and weight), gradients returned, not accumulated.

Peak memory is the increase of the process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs after malloc_trim) over one untimed call: it sees every CPU allocation
torch makes, which torch's own memory statistics do not on the CPU
(fastllm.bench.common.peak_memory_bytes). The inputs (logits; hidden and weight) exist
before the call and are not counted; outputs (the gradients) are.

Effective bandwidth counts the bytes an implementation cannot avoid, each once (e = bytes
per element): cross-entropy forward reads the logits, N * V * e; forward+backward also
writes their gradient, 2 * N * V * e (the targets, N * 8 bytes, are not counted). Linear +
cross-entropy is bound by its three GEMMs (2 * N * H * V flops each), not by memory: its
GB/s column counts hidden and weight read and (fwd+bwd) their gradients written, and is
small on purpose.
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
    CPU, DEFAULT_SHAPES, CallInputs, Case, cpu_isa_features, fastllm_variant, liger_functional,
    liger_peer, pick_shapes,
)

FAMILY = "cross_entropy"
PARAM_COLUMNS = ("op", "mode", "shape", "dtype")
KERNEL_FAMILY = "cross_entropy"

TORCH_LINEAR_CROSS_ENTROPY = "torch linear_cross_entropy"
FASTLLM_INPLACE_BACKWARD = fastllm_variant("inplace_backward")

MODES = ("fwd", "fwd+bwd")
DTYPES = (torch.float32, torch.bfloat16)
# (N, V). The (8192, 128256) would need about 20 GB for torch eager's forward and
# backward in float32 (logits, log-probabilities and two gradients of 4.2 GB each): N is
# scaled down to 2048 to fit a 24 GB machine.
CROSS_ENTROPY_SHAPES = ((4096, 32000), (2048, 128256))
QUICK_CROSS_ENTROPY_SHAPES = ((256, 8000),)
# (N, H, V)
LINEAR_SHAPES = ((4096, 1024, 32000),)
QUICK_LINEAR_SHAPES = ((256, 256, 8000),)
# LLaMA-3-8B: one 4096-token sequence, vocabulary 128256 (and hidden 4096 for the linear)
LLAMA3_8B_CROSS_ENTROPY_SHAPES = ((4096, 128256),)
LLAMA3_8B_LINEAR_SHAPES = ((4096, 4096, 128256),)
IGNORED_EVERY = 16


# ------------------------------------------------------------------ the contenders


def torch_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


def fastllm_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return fastllm_functional.cross_entropy(logits, target)


def fastllm_cross_entropy_inplace_backward(logits: Tensor, target: Tensor) -> Tensor:
    return fastllm_functional.cross_entropy(logits, target, inplace_backward=True)


def torch_linear_cross_entropy_unfused(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight), target)


def torch_linear_cross_entropy_chunked(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    options = torch.nn.LinearCrossEntropyOptions()
    return F.linear_cross_entropy(hidden, weight, target, options=options)


def fastllm_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return fastllm_functional.linear_cross_entropy(hidden, weight, target)


def liger_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Liger's defaults: its forward writes the logits' gradient over the logits (so later
    calls see other values; a memory-bound kernel's time does not depend on them)."""
    return liger_functional().liger_cross_entropy(logits, target)


def liger_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """Liger's defaults: chunked, the gradients computed in the forward (accumulated in the
    inputs' dtype)."""
    return liger_functional().liger_fused_linear_cross_entropy(hidden, weight, target)


@dataclasses.dataclass(frozen=True)
class CrossEntropyCase(Case):
    op: str  # "cross_entropy" or "linear_cross_entropy"
    mode: str  # one of MODES
    shape: tuple[int, ...]  # (N, V) or (N, H, V)
    dtype: torch.dtype

    @property
    def linear(self) -> bool:
        return self.op == "linear_cross_entropy"

    def torch_function(self) -> Callable:
        return torch_linear_cross_entropy_unfused if self.linear else torch_cross_entropy

    def fastllm_function(self) -> Callable:
        return fastllm_linear_cross_entropy if self.linear else fastllm_cross_entropy

    def peers(self, device: torch.device) -> dict[str, Callable]:
        """torch's chunked linear_cross_entropy (linear cases); Liger-Kernel's on CUDA where
        it is installed."""
        if self.linear:
            return {TORCH_LINEAR_CROSS_ENTROPY: torch_linear_cross_entropy_chunked,
                    **liger_peer(device, liger_linear_cross_entropy)}
        return liger_peer(device, liger_cross_entropy)

    def fastllm_variants(self) -> dict[str, Callable]:
        """Cross-entropy forward+backward: fastllm with ``inplace_backward=True``."""
        if self.linear or not self.backward:
            return {}
        return {FASTLLM_INPLACE_BACKWARD: fastllm_cross_entropy_inplace_backward}

    def contender_inputs(self, contender: str, inputs: CallInputs) -> CallInputs:
        """The in-place variant's own copy of the logits (it overwrites them)."""
        if contender != FASTLLM_INPLACE_BACKWARD:
            return inputs
        logits, target = inputs.args
        own = logits.detach().clone().requires_grad_(True)
        return CallInputs((own, target), differentiable=(own,))

    def _rows_vocab(self) -> tuple[int, int]:
        return (self.shape[0], self.shape[2]) if self.linear else self.shape

    def bytes_moved(self) -> int:
        """The totals of the module docstring."""
        e = self.dtype.itemsize
        times = 2 if self.backward else 1
        if self.linear:
            n_rows, hidden, vocab = self.shape
            return times * (n_rows + vocab) * hidden * e
        n_rows, vocab = self.shape
        return times * n_rows * vocab * e

    def largest_output_bytes(self) -> int:
        """torch eager's (N, V) logits / log-probabilities / gradient."""
        n_rows, vocab = self._rows_vocab()
        return n_rows * vocab * self.dtype.itemsize

    @property
    def kernel_outputs_cached(self) -> bool:  # type: ignore[override]
        """The logits' gradient comes from the output cache; linear's dX and dW do not."""
        return not self.linear

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """The loss (a scalar); forward+backward also the gradient of the logits (none for
        the in-place variant: it writes it over them), or of hidden and weight."""
        e = self.dtype.itemsize
        if not self.backward or contender == FASTLLM_INPLACE_BACKWARD:
            return ()
        if self.linear:
            n_rows, hidden, vocab = self.shape
            return (n_rows * hidden * e, vocab * hidden * e)
        n_rows, vocab = self.shape
        return (n_rows * vocab * e,)

    def make_inputs(self, device: torch.device) -> CallInputs:
        """logits, target; or hidden, weight, target. Forward+backward: the gradients are
        taken of the logits, or of hidden and weight."""
        generator = torch.Generator(device=device).manual_seed(0)
        n_rows, vocab = self._rows_vocab()
        target = torch.randint(0, vocab, (n_rows,), generator=generator, device=device)
        target[::IGNORED_EVERY] = -100
        if self.linear:
            _, hidden_size, _ = self.shape
            hidden = torch.randn(n_rows, hidden_size, generator=generator, device=device)
            weight = torch.randn(vocab, hidden_size, generator=generator, device=device)
            weight /= hidden_size**0.5  # logits of order 1, as in a trained model
            hidden = hidden.to(self.dtype).requires_grad_(self.backward)
            weight = weight.to(self.dtype).requires_grad_(self.backward)
            return CallInputs((hidden, weight, target), differentiable=(hidden, weight))
        logits = torch.randn(n_rows, vocab, generator=generator, device=device, dtype=self.dtype)
        logits.requires_grad_(self.backward)
        return CallInputs((logits, target), differentiable=(logits,))


def cases(quick: bool = False, shapes: str = DEFAULT_SHAPES,
          device: torch.device = CPU) -> list[CrossEntropyCase]:
    """Every case, in table order: op, shape, dtype, mode. ``quick``: small shapes;
    ``shapes``: fastllm.bench.common.SHAPE_SETS. Linear + cross-entropy at the default shapes
    is float32 only on a CPU without bfloat16 dot products (AMX, or AVX512-BF16's vdpbf16ps:
    the avx512 feature group): its time is three GEMMs, which such a CPU runs in bfloat16
    through slow emulation, timing torch's GEMM, not fastllm. At LLaMA-3-8B's shape, on a CPU
    with either and on a GPU it is float32 and bfloat16."""
    ce_shapes = pick_shapes(shapes, quick, CROSS_ENTROPY_SHAPES, QUICK_CROSS_ENTROPY_SHAPES,
                            LLAMA3_8B_CROSS_ENTROPY_SHAPES)
    linear_shapes = pick_shapes(shapes, quick, LINEAR_SHAPES, QUICK_LINEAR_SHAPES,
                                LLAMA3_8B_LINEAR_SHAPES)
    features = cpu_isa_features() or {}
    every_dtype = device.type != "cpu" or bool(features.get("amx") or features.get("avx512"))
    return [
        CrossEntropyCase("cross_entropy", mode, shape, dtype)
        for shape, dtype, mode in itertools.product(ce_shapes, DTYPES, MODES)
    ] + [
        CrossEntropyCase("linear_cross_entropy", mode, shape, dtype)
        for shape in linear_shapes
        for dtype, mode in itertools.product(
            DTYPES if every_dtype or shape in LLAMA3_8B_LINEAR_SHAPES else (torch.float32,), MODES)
    ]
