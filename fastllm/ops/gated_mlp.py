"""SwiGLU / GeGLU, the gated-MLP activations: the public functions, their fake and autograd
rules, their Triton ops.

``out = act(gate) * up`` with act = silu (SwiGLU: LLaMA, Mistral, Qwen), gelu or its tanh
approximation (GeGLU: Gemma, T5 v1.1). Forward reads gate and up once and writes out once;
backward reads grad_out, gate and up once and writes both gradients once, recomputing the
activation from gate: nothing is saved for backward beyond the inputs themselves.

The one-tensor form ``swiglu(x)`` takes the output of a fused gate+up projection: the first
half of x's last dim is the gate, the second half the up projection (``gate, up =
x.chunk(2, -1)``, Hugging Face's and Liger-Kernel's order). The halves are read in place
(strided views, no copy), and backward writes the gradient of x as one tensor.

Schemas: csrc/schemas.h (FASTLLM_GATED_MLP_SCHEMAS). Kernels: csrc/gated_mlp/ (C++ CPU,
CUDA), fastllm/triton/gated_mlp.py (Triton); reference: fastllm/reference/gated_mlp.py. The
backends and their choice: fastllm/ops/_family.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastllm.ops._family import (
    OpFamily,
    OpSet,
    autograd_scope,
    check_float_tensor,
    register_autograd,
)
from fastllm.reference import gated_mlp as ref

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


# --------------------------------------------------------------------------- checks
# Metadata only (shapes, dtypes, devices, the activation's name), so they trace under
# torch.compile(fullgraph=True); the C++ glue repeats them for direct callers of the ops.


def _check_device(op: str, name: str, t: Tensor, gate: Tensor) -> None:
    if t.device != gate.device:
        raise ValueError(f"{op}: {name} must be on gate's device {gate.device}, got {t.device}")


def check_gated_args(op: str, gate: Tensor, up: Optional[Tensor], activation: str) -> None:
    check_float_tensor(op, "gate", gate)
    if gate.dim() == 0:
        raise ValueError(f"{op}: gate must have at least one dimension, got a scalar")
    if up is None:
        if gate.shape[-1] % 2 != 0:
            raise ValueError(
                f"{op}: gate must have an even last dimension when up is None (its first half "
                f"is the gate, its second half the up projection), got shape {list(gate.shape)}"
            )
    else:
        check_float_tensor(op, "up", up)
        if up.shape != gate.shape:
            raise ValueError(
                f"{op}: up must have the shape of gate {list(gate.shape)}, got {list(up.shape)}"
            )
        if up.dtype != gate.dtype:
            raise TypeError(f"{op}: up must have the dtype of gate {gate.dtype}, got {up.dtype}")
        _check_device(op, "up", up, gate)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}"
        )


def _out_shape(gate: Tensor, up: Optional[Tensor]) -> list[int]:
    shape = list(gate.shape)
    if up is None:
        shape[-1] //= 2
    return shape


def _check_fwd(gate, up, activation):
    check_gated_args("gated_mlp_fwd", gate, up, activation)


def _check_bwd(grad_out, gate, up, activation):
    op = "gated_mlp_bwd"
    check_gated_args(op, gate, up, activation)
    check_float_tensor(op, "grad_out", grad_out)
    if list(grad_out.shape) != _out_shape(gate, up):
        raise ValueError(
            f"{op}: grad_out must have the shape of out {_out_shape(gate, up)}, "
            f"got {list(grad_out.shape)}"
        )
    if grad_out.dtype != gate.dtype:
        raise TypeError(
            f"{op}: grad_out must have the dtype of gate {gate.dtype}, got {grad_out.dtype}"
        )
    _check_device(op, "grad_out", grad_out, gate)


# ------------------------------------------------------------ fake and autograd rules


def _fake_fwd(gate, up, activation):
    return gate.new_empty(_out_shape(gate, up))


def _fake_bwd(grad_out, gate, up, activation):
    grad_gate = torch.empty_like(gate, memory_format=torch.contiguous_format)
    if up is None:
        return grad_gate, gate.new_empty(0)
    return grad_gate, torch.empty_like(up, memory_format=torch.contiguous_format)


def _register_autograd(ops: OpSet) -> None:
    """Backward of one op set, with that set's own backward op."""

    def setup(ctx, inputs, output):
        gate, up, activation = inputs
        ctx.activation = activation
        ctx.save_for_backward(gate, up)

    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ops.gated_mlp_bwd(grad_out, gate, up, ctx.activation)
        return grad_gate, grad_up if up is not None else None, None

    register_autograd(ops.gated_mlp_fwd, backward, setup_context=setup)


# ------------------------------------------------------------------------ op family


def _triton_kernels() -> dict:
    from fastllm.triton import gated_mlp as kernels

    return {
        "fastllm::gated_mlp_fwd_triton": kernels.gated_mlp_fwd,
        "fastllm::gated_mlp_bwd_triton": kernels.gated_mlp_bwd,
    }


IMPLS = OpFamily(
    "gated_mlp",
    schemas=("gated_mlp_fwd", "gated_mlp_bwd"),
    checks={"gated_mlp_fwd": _check_fwd, "gated_mlp_bwd": _check_bwd},
    fakes={"gated_mlp_fwd": _fake_fwd, "gated_mlp_bwd": _fake_bwd},
    autograd=_register_autograd,
    triton_kernels=_triton_kernels,
)


# --------------------------------------------------------------------------- public API


def gated_activation(op: str, gate: Tensor, up: Optional[Tensor], activation: str) -> Tensor:
    """``act(gate) * up`` for activation ``"silu"``, ``"gelu"`` or ``"gelu_tanh"`` on the
    backend in force; ``op`` names the caller in error messages. (swiglu and geglu are this;
    ``fastllm.nn.GatedMLP`` calls it with its activation's name.)"""
    check_gated_args(op, gate, up, activation)
    ops = IMPLS.select(gate)
    if ops is None:
        return ref.gated_mlp_ref(gate, up, activation)
    with autograd_scope(gate, up):
        return ops.gated_mlp_fwd(gate, up, activation)


def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """SwiGLU's activation: ``silu(gate) * up`` (``silu(g) = g * sigmoid(g)``), fused.

    ``gate`` and ``up`` have the same shape ``(..., N)``, dtype and device; the output too.
    With one tensor, ``swiglu(x)`` splits x's last dim ``(..., 2N)`` in two halves: the first
    is the gate, the second the up projection (``gate, up = x.chunk(2, dim=-1)``: Hugging
    Face's and Liger-Kernel's order for a fused ``gate_up_proj``); the output is ``(..., N)``.

    float32, bfloat16, float16 (and float64 on the CPU), computed in float32 (float64) and
    rounded once. Any strides: the halves of one tensor and other row-strided views are read
    in place. Differentiable (backward recomputes silu from gate) and torch.compile-able.
    """
    return gated_activation("swiglu", gate, up, "silu")


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """GeGLU's activation: ``gelu(gate, approximate=approximate) * up``, fused.

    ``approximate`` is torch's: ``"none"`` for the exact ``g * Phi(g)`` (erf), ``"tanh"`` for
    ``0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))`` (Gemma's ``gelu_pytorch_tanh``).
    Shapes, the one-tensor form ``geglu(x)`` and dtypes as :func:`swiglu`.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return gated_activation("geglu", gate, up, "gelu" if approximate == "none" else "gelu_tanh")
