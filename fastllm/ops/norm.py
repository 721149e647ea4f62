"""LayerNorm / RMSNorm: the public functions, their fake and autograd rules, their Triton ops.

The forward ops return the per-row statistics (mean, rstd) that backward needs, so the
backward never recomputes them; the fused residual-add variants also return the sum,
which is both the next block's residual and what backward differentiates through.

Schemas: csrc/schemas.h (FASTLLM_NORM_SCHEMAS). Kernels: csrc/norm/ (C++ CPU, CUDA),
fastllm/triton/norm.py (Triton); reference: fastllm/reference/norm.py. The backends and
their choice: fastllm/ops/_family.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastllm.ops._family import (
    OpFamily,
    OpSet,
    acc_dtype,
    autograd_scope,
    check_float_tensor,
    check_same_device,
    register_autograd,
)
from fastllm.reference import norm as ref

_Shape = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- checks
# Shape/dtype/device checks shared by every backend. They look at metadata only, never at
# tensor values, so they trace under torch.compile(fullgraph=True). The C++ glue
# (csrc/norm/norm_glue.h) makes the same checks, in the same order, for direct callers of
# torch.ops.fastllm.* and the emulated ops, and raises the same exception types: TypeError
# for a wrong type or dtype, ValueError for a wrong shape or value. (A device or
# shape-of-input mismatch found by the shared C++ helpers check_same_device / check_like of
# csrc/common/torch_glue.h is a RuntimeError there.)


def _shape(s: int | Sequence[int]) -> list[int]:
    if isinstance(s, int):
        return [s]
    return [int(d) for d in s]


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _check_tensor(op: str, name: str, t: object, what: str = "a Tensor") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be {what}, got {_type_name(t)}")


def _is_int(d: object) -> bool:
    return isinstance(d, (int, torch.SymInt)) and not isinstance(d, bool)


def _check_normalized_shape(op: str, normalized_shape: object) -> list[int]:
    """normalized_shape as a list of ints: an int, or a list / tuple / torch.Size of ints."""
    if _is_int(normalized_shape):
        return [normalized_shape]  # type: ignore[list-item]
    if not isinstance(normalized_shape, (list, tuple)) or not all(
        _is_int(d) for d in normalized_shape
    ):
        raise TypeError(
            f"{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        )
    return [int(d) for d in normalized_shape]


def _check_eps(op: str, eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: eps must be a float, got {_type_name(eps)}")
    if not eps >= 0:  # NaN too
        raise ValueError(f"{op}: eps must be non-negative, got {eps}")


def check_norm_args(
    op: str,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    *,
    rms: bool,
) -> None:
    """The checks of a forward call (and of the forward arguments of a backward call); the
    add_* variants check their residual after these (check_residual)."""
    _check_eps(op, eps)
    _check_tensor(op, "input", input)
    check_float_tensor(op, "input", input)
    shape = _check_normalized_shape(op, normalized_shape)
    if len(shape) == 0:
        raise ValueError(f"{op}: normalized_shape must have at least one dimension, got []")
    if input.dim() < len(shape) or list(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{op}: normalized_shape {shape} must match the trailing dimensions of input, "
            f"got input of shape {list(input.shape)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_tensor(op, name, p, "a Tensor or None")
        if list(p.shape) != shape:
            raise ValueError(
                f"{op}: {name} must have shape {shape} (normalized_shape), got {list(p.shape)}"
            )
        check_same_device(op, name, p, input)
        check_float_tensor(op, name, p)
        if not rms and not (
            p.dtype == input.dtype
            or (p.dtype == torch.float32 and input.dtype in (torch.bfloat16, torch.float16))
        ):
            raise TypeError(
                f"{op}: {name} must have the input's dtype {input.dtype} "
                f"(or float32 with a bfloat16/float16 input), got {p.dtype}"
            )


def check_residual(op: str, residual: Tensor, input: Tensor) -> None:
    """The residual of the add_* variants: a tensor like the input."""
    _check_like_input(op, "residual", residual, input)


def _check_like_input(op: str, name: str, t: object, input: Tensor) -> None:
    """``t`` must have the input's shape, dtype and device (residual, gradients)."""
    _check_tensor(op, name, t)
    if t.shape != input.shape:
        raise ValueError(
            f"{op}: {name} must have the shape of input {list(input.shape)}, got {list(t.shape)}"
        )
    if t.dtype != input.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of input {input.dtype}, got {t.dtype}")
    check_same_device(op, name, t, input)


def default_rms_eps(input: Tensor) -> float:
    """torch.rms_norm's eps=None: the float32 epsilon for float32/bfloat16/float16 inputs
    (torch's kernel computes in float32), the float64 one for float64."""
    return torch.finfo(acc_dtype(input)).eps


# ------------------------------------------------------------ fake and autograd rules


def _stats_like(input: Tensor, normalized_shape: Sequence[int]) -> Tensor:
    leading = input.shape[: input.dim() - len(normalized_shape)]
    return input.new_empty(leading, dtype=acc_dtype(input))


def _param_grad_like(
    input: Tensor, normalized_shape: Sequence[int], param: Optional[Tensor], wanted: bool
) -> Tensor:
    if not wanted:
        return input.new_empty(0)
    dtype = param.dtype if param is not None else input.dtype
    return input.new_empty(_shape(normalized_shape), dtype=dtype)


def _check_grads_and_stats(
    op: str, grad_out: Tensor, grad_residual_out: Optional[Tensor], input: Tensor,
    normalized_shape: Sequence[int], weight: Optional[Tensor],
    stats: Sequence[tuple[str, Tensor]], weight_grad: bool,
) -> None:
    """The backward's own arguments, after check_norm_args of its forward ones: gradients
    like the input, per-row statistics as the forward returns them (the input's leading
    dims, in the accumulation dtype)."""
    _check_like_input(op, "grad_out", grad_out, input)
    if grad_residual_out is not None:
        _check_like_input(op, "grad_residual_out", grad_residual_out, input)
    leading = list(input.shape[: input.dim() - len(_shape(normalized_shape))])
    for name, t in stats:
        _check_tensor(op, name, t)
        if list(t.shape) != leading:
            raise ValueError(
                f"{op}: {name} must have shape {leading} (input's leading dims, one value per "
                f"row), got {list(t.shape)}"
            )
        if t.dtype != acc_dtype(input):
            raise TypeError(
                f"{op}: {name} must be {str(acc_dtype(input)).removeprefix('torch.')} (the "
                f"accumulation dtype of {input.dtype} input), got {t.dtype}"
            )
        check_same_device(op, name, t, input)
    if weight_grad and weight is None:
        raise ValueError(f"{op}: weight_grad=True needs a weight, got weight=None")


def _check_layer_norm_fwd(input, normalized_shape, weight, bias, eps):
    check_norm_args("layer_norm_fwd", input, normalized_shape, weight, bias, eps, rms=False)


def _check_add_layer_norm_fwd(input, residual, normalized_shape, weight, bias, eps):
    check_norm_args("add_layer_norm_fwd", input, normalized_shape, weight, bias, eps, rms=False)
    check_residual("add_layer_norm_fwd", residual, input)


def _check_layer_norm_bwd(grad_out, grad_residual_out, input, normalized_shape, weight, mean,
                          rstd, weight_grad, bias_grad):
    op = "layer_norm_bwd"
    check_norm_args(op, input, normalized_shape, weight, None, 0.0, rms=False)
    _check_grads_and_stats(op, grad_out, grad_residual_out, input, normalized_shape, weight,
                           (("mean", mean), ("rstd", rstd)), weight_grad)


def _check_rms_norm_fwd(input, normalized_shape, weight, eps):
    check_norm_args("rms_norm_fwd", input, normalized_shape, weight, None, eps, rms=True)


def _check_add_rms_norm_fwd(input, residual, normalized_shape, weight, eps):
    check_norm_args("add_rms_norm_fwd", input, normalized_shape, weight, None, eps, rms=True)
    check_residual("add_rms_norm_fwd", residual, input)


def _check_rms_norm_bwd(grad_out, grad_residual_out, input, normalized_shape, weight, rstd,
                        weight_grad):
    op = "rms_norm_bwd"
    check_norm_args(op, input, normalized_shape, weight, None, 0.0, rms=True)
    _check_grads_and_stats(op, grad_out, grad_residual_out, input, normalized_shape, weight,
                           (("rstd", rstd),), weight_grad)


_CHECKS = {
    "layer_norm_fwd": _check_layer_norm_fwd,
    "add_layer_norm_fwd": _check_add_layer_norm_fwd,
    "layer_norm_bwd": _check_layer_norm_bwd,
    "rms_norm_fwd": _check_rms_norm_fwd,
    "add_rms_norm_fwd": _check_add_rms_norm_fwd,
    "rms_norm_bwd": _check_rms_norm_bwd,
}


# Fake (meta) rules: the same for every op set. (The Triton ops need them too: triton_op's
# own fake would run the interpreter on fake tensors.)


def _out_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_layer_norm_fwd(input, normalized_shape, weight, bias, eps):
    stats = _stats_like(input, normalized_shape)
    return _out_like(input), stats, torch.empty_like(stats)


def _fake_add_layer_norm_fwd(input, residual, normalized_shape, weight, bias, eps):
    stats = _stats_like(input, normalized_shape)
    return _out_like(input), _out_like(input), stats, torch.empty_like(stats)


def _fake_layer_norm_bwd(grad_out, grad_residual_out, input, normalized_shape, weight, mean,
                         rstd, weight_grad, bias_grad):
    return (
        _out_like(input),
        _param_grad_like(input, normalized_shape, weight, weight_grad),
        _param_grad_like(input, normalized_shape, weight, bias_grad),
    )


def _fake_rms_norm_fwd(input, normalized_shape, weight, eps):
    return _out_like(input), _stats_like(input, normalized_shape)


def _fake_add_rms_norm_fwd(input, residual, normalized_shape, weight, eps):
    return _out_like(input), _out_like(input), _stats_like(input, normalized_shape)


def _fake_rms_norm_bwd(grad_out, grad_residual_out, input, normalized_shape, weight, rstd,
                       weight_grad):
    return _out_like(input), _param_grad_like(input, normalized_shape, weight, weight_grad)


_FAKES = {
    "layer_norm_fwd": _fake_layer_norm_fwd,
    "add_layer_norm_fwd": _fake_add_layer_norm_fwd,
    "layer_norm_bwd": _fake_layer_norm_bwd,
    "rms_norm_fwd": _fake_rms_norm_fwd,
    "add_rms_norm_fwd": _fake_add_rms_norm_fwd,
    "rms_norm_bwd": _fake_rms_norm_bwd,
}


def _register_autograd(ops: OpSet) -> None:
    """Backward formulas of one op set, expressed with that set's own backward ops."""

    def grad_or_zeros(grad: Optional[Tensor], like: Tensor) -> Tensor:
        return torch.zeros_like(like) if grad is None else grad

    def bias_grad(db: Tensor, bias: Optional[Tensor]) -> Tensor:
        # The backward op returns the bias gradient in the weight's dtype; a bias of its
        # own dtype (e.g. float32 with a bfloat16 input and no weight) gets it in that dtype.
        return db.to(bias.dtype) if bias is not None else db

    def setup_layer_norm(ctx, inputs, output):
        input, normalized_shape, weight, bias, _eps = inputs
        out, mean, rstd = output
        ctx.normalized_shape = normalized_shape
        ctx.bias_meta = bias.new_empty(0) if bias is not None else None
        ctx.save_for_backward(input, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward_layer_norm(ctx, grad_out, _grad_mean, _grad_rstd):
        input, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = ops.layer_norm_bwd(
            grad_or_zeros(grad_out, input), None, input, ctx.normalized_shape, weight,
            mean, rstd, bool(need[2]), bool(need[3]),
        )
        return dx, None, dw if need[2] else None, bias_grad(db, ctx.bias_meta) if need[3] else None, None

    def setup_add_layer_norm(ctx, inputs, output):
        _input, _residual, normalized_shape, weight, bias, _eps = inputs
        out, summed, mean, rstd = output
        ctx.normalized_shape = normalized_shape
        ctx.bias_meta = bias.new_empty(0) if bias is not None else None
        ctx.save_for_backward(summed, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward_add_layer_norm(ctx, grad_out, grad_summed, _grad_mean, _grad_rstd):
        summed, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = ops.layer_norm_bwd(
            grad_or_zeros(grad_out, summed), grad_summed, summed, ctx.normalized_shape,
            weight, mean, rstd, bool(need[3]), bool(need[4]),
        )
        return dx, dx, None, dw if need[3] else None, bias_grad(db, ctx.bias_meta) if need[4] else None, None

    def setup_rms_norm(ctx, inputs, output):
        input, normalized_shape, weight, _eps = inputs
        out, rstd = output
        ctx.normalized_shape = normalized_shape
        ctx.save_for_backward(input, weight, rstd)
        ctx.mark_non_differentiable(rstd)

    def backward_rms_norm(ctx, grad_out, _grad_rstd):
        input, weight, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw = ops.rms_norm_bwd(
            grad_or_zeros(grad_out, input), None, input, ctx.normalized_shape, weight, rstd,
            bool(need[2]),
        )
        return dx, None, dw if need[2] else None, None

    def setup_add_rms_norm(ctx, inputs, output):
        _input, _residual, normalized_shape, weight, _eps = inputs
        out, summed, rstd = output
        ctx.normalized_shape = normalized_shape
        ctx.save_for_backward(summed, weight, rstd)
        ctx.mark_non_differentiable(rstd)

    def backward_add_rms_norm(ctx, grad_out, grad_summed, _grad_rstd):
        summed, weight, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw = ops.rms_norm_bwd(
            grad_or_zeros(grad_out, summed), grad_summed, summed, ctx.normalized_shape,
            weight, rstd, bool(need[3]),
        )
        return dx, dx, None, dw if need[3] else None, None

    for op, backward, setup in (
        (ops.layer_norm_fwd, backward_layer_norm, setup_layer_norm),
        (ops.add_layer_norm_fwd, backward_add_layer_norm, setup_add_layer_norm),
        (ops.rms_norm_fwd, backward_rms_norm, setup_rms_norm),
        (ops.add_rms_norm_fwd, backward_add_rms_norm, setup_add_rms_norm),
    ):
        register_autograd(op, backward, setup_context=setup)


# ------------------------------------------------------------------------ op family


def _triton_kernels() -> dict:
    from fastllm.triton import norm as kernels

    return {
        "fastllm::layer_norm_fwd_triton": kernels.layer_norm_fwd,
        "fastllm::add_layer_norm_fwd_triton": kernels.add_layer_norm_fwd,
        "fastllm::layer_norm_bwd_triton": kernels.layer_norm_bwd,
        "fastllm::rms_norm_fwd_triton": kernels.rms_norm_fwd,
        "fastllm::add_rms_norm_fwd_triton": kernels.add_rms_norm_fwd,
        "fastllm::rms_norm_bwd_triton": kernels.rms_norm_bwd,
    }


IMPLS = OpFamily(
    "norm",
    schemas=(
        "layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd",
        "rms_norm_fwd", "add_rms_norm_fwd", "rms_norm_bwd",
    ),
    checks=_CHECKS,
    fakes=_FAKES,
    autograd=_register_autograd,
    triton_kernels=_triton_kernels,
    # The CUDA kernels take float32 / bfloat16 / float16; float64 CUDA tensors are
    # normalised by the reference, as torch's own norms accept them.
    cuda_dtype_fallback={torch.float64: "reference"},
)


# --------------------------------------------------------------------------- public API


def layer_norm(
    input: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Statistics accumulate in float32 (float64 for float64 input); the output has the
    input's dtype. ``weight``/``bias`` have the input's dtype, or float32 with a
    bfloat16/float16 input. Non-contiguous inputs are accepted.
    """
    check_norm_args("layer_norm", input, normalized_shape, weight, bias, eps, rms=False)
    shape = _shape(normalized_shape)
    ops = IMPLS.select(input)
    if ops is None:
        return ref.layer_norm_ref(input, shape, weight, bias, eps)
    with autograd_scope(input, weight, bias):
        return ops.layer_norm_fwd(input, shape, weight, bias, eps)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Root-mean-square normalisation, as ``torch.nn.functional.rms_norm``:
    ``x / sqrt(mean(x^2) + eps) * weight``. ``eps=None`` uses
    ``torch.finfo(torch.float32).eps`` for float32/bfloat16/float16 input (what torch's
    kernel does) and the float64 epsilon for float64 input.
    """
    if eps is None:
        _check_tensor("rms_norm", "input", input)
        eps = default_rms_eps(input)
    check_norm_args("rms_norm", input, normalized_shape, weight, None, eps, rms=True)
    shape = _shape(normalized_shape)
    ops = IMPLS.select(input)
    if ops is None:
        return ref.rms_norm_ref(input, shape, weight, eps)
    with autograd_scope(input, weight):
        return ops.rms_norm_fwd(input, shape, weight, eps)[0]


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """The pre-norm block pattern in one fused pass: returns
    ``(layer_norm(input + residual), input + residual)``. The sum is rounded to the input
    dtype before it is normalised, exactly as the unfused code would do.
    """
    check_norm_args("add_layer_norm", input, normalized_shape, weight, bias, eps, rms=False)
    check_residual("add_layer_norm", residual, input)
    shape = _shape(normalized_shape)
    ops = IMPLS.select(input)
    if ops is None:
        return ref.add_layer_norm_ref(input, residual, shape, weight, bias, eps)
    with autograd_scope(input, residual, weight, bias):
        out, summed, _, _ = ops.add_layer_norm_fwd(input, residual, shape, weight, bias, eps)
    return out, summed


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _Shape,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(input + residual), input + residual)`` in one fused pass."""
    if eps is None:
        _check_tensor("add_rms_norm", "input", input)
        eps = default_rms_eps(input)
    check_norm_args("add_rms_norm", input, normalized_shape, weight, None, eps, rms=True)
    check_residual("add_rms_norm", residual, input)
    shape = _shape(normalized_shape)
    ops = IMPLS.select(input)
    if ops is None:
        return ref.add_rms_norm_ref(input, residual, shape, weight, eps)
    with autograd_scope(input, residual, weight):
        out, summed, _ = ops.add_rms_norm_fwd(input, residual, shape, weight, eps)
    return out, summed
