"""Cross-entropy: the public function, its fake and autograd rules, its Triton ops.

The kernels (C++ CPU, CUDA, Triton) work on 2-D logits ``(rows, vocab)`` and return the
per-row loss and log-sum-exp in float32 (float64 for float64 logits), and a per-row bool,
whether the target is a top-1 class (token accuracy, see "logged outputs"); everything torch's
``cross_entropy`` adds on top — the class dimension at dim 1, the reductions and their
weighted mean, the loss in the input's dtype — happens here, on metadata and on per-row
vectors, so that one pair of kernels serves every reduction.

Schemas: csrc/schemas.h (FASTLLM_CROSS_ENTROPY_SCHEMAS). Kernels: csrc/cross_entropy/
(C++ CPU, CUDA), fastllm/triton/cross_entropy.py (Triton); reference:
fastllm/reference/cross_entropy.py. The backends and their choice: fastllm/ops/_family.py.
The chunked linear + cross-entropy built on these ops: fastllm/ops/linear_cross_entropy.py.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from fastllm.ops._family import (
    OpFamily,
    OpSet,
    acc_dtype,
    check_float_tensor,
    check_same_device,
    refuse_double_backward,
    register_autograd,
    values_readable,
)
from fastllm.reference import cross_entropy as ref

_REDUCTIONS = ("none", "mean", "sum")
_FLOAT32_MAX = torch.finfo(torch.float32).max
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------- checks
# Metadata checks, shared by the public functions (cross_entropy, linear_cross_entropy) and
# the ops' own checks (_CHECKS, run by every Triton op and every fake). They mirror
# csrc/cross_entropy/cross_entropy_glue.h, which checks the same things for the native and
# emulated ops, with the same messages. They never read values, so they trace under
# torch.compile(fullgraph=True); the target range is a value check (check_target_values).


def _is_number(value) -> bool:
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(
        value, bool
    )


def check_options(
    op: str, reduction: str, label_smoothing: float, z_loss: float, softcap: float
) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss),
                        ("softcap", softcap)):
        if not _is_number(value):
            raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    # Written so that NaN fails every test.
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= z_loss < math.inf:
        raise ValueError(f"{op}: z_loss must be finite and non-negative, got {z_loss}")
    if not 0.0 <= softcap <= _FLOAT32_MAX:  # the kernels compute in float32
        raise ValueError(
            f"{op}: softcap must be non-negative (0 disables it) and finite in float32, got "
            f"{softcap}"
        )


def check_ignore_index(op: str, ignore_index: int) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(ignore_index, int) and not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"{op}: ignore_index must fit in int64, got {ignore_index}")


def check_class_weight(op: str, weight: Optional[Tensor], vocab: int, like: Tensor) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{op}: weight must be a Tensor or None, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != vocab:
        raise ValueError(
            f"{op}: weight must have shape [{vocab}] (one weight per class), "
            f"got {list(weight.shape)}"
        )
    check_float_tensor(op, "weight", weight)
    check_same_device(op, "weight", weight, like)


def check_weight_not_differentiable(op: str, weight: Optional[Tensor]) -> None:
    """Class weights get no gradient, as in torch, which refuses them when they require one;
    so does this (rather than leaving weight.grad silently unset)."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op}: weight (the class weights) is not differentiable, got a weight that "
            "requires grad (pass weight.detach())"
        )


def class_index_target(op: str, target: Tensor, like: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a Tensor, got {type(target).__name__}")
    if target.dtype == torch.uint8:  # torch accepts Byte class indices too
        target = target.long()
    if target.dtype != torch.int64:
        raise TypeError(
            f"{op}: target must be int64 class indices (or uint8), got {target.dtype}"
        )
    check_same_device(op, "target", target, like)
    return target


def check_target_values(op: str, target: Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is ignore_index or in [0, vocab): else an IndexError naming the first bad
    one by its index in ``target`` and its value, the error of the C++ glue on CPU tensors.
    Reads values: only where ``values_readable`` (on CUDA tensors the kernels give such a row
    a NaN loss instead of synchronising with the device)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in bad.nonzero()[0])
    where = f"target[{', '.join(map(str, index))}]" if index else "target"
    raise IndexError(
        f"{op}: {where} = {int(target[index])} is out of range for {vocab} classes "
        f"(ignore_index={ignore_index})"
    )


def _as_rows(op: str, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """torch's layouts -> (logits (rows, vocab), target (rows,), shape of the per-row loss).

    input (C,) with target (); input (N, C) with target (N,); input (N, C, d1, ...) with
    target (N, d1, ...): the class dimension is dim 1, as in torch.nn.functional.cross_entropy.
    """
    if input.dim() == 0:
        raise ValueError(f"{op}: input must have a class dimension, got a 0-d tensor")
    class_dim = 0 if input.dim() == 1 else 1
    vocab = input.shape[class_dim]
    if input.dim() == 1:
        expected: list[int] = []
    else:
        expected = [input.shape[0]] + list(input.shape[2:])
    if list(target.shape) != expected:
        raise ValueError(
            f"{op}: target must have shape {expected} (input's shape {list(input.shape)} without "
            f"the class dimension {class_dim}), got {list(target.shape)}"
        )
    rows = math.prod(expected)
    if input.dim() <= 2:
        logits = input.reshape(rows, vocab)
    else:
        logits = input.movedim(1, -1).reshape(rows, vocab)  # copies: classes become contiguous
    return logits, target.reshape(rows), expected


def zero_classes_loss(logits: Tensor, target: Tensor, ignore_index: int, reduction: str,
                      label_smoothing: float) -> Tensor:
    """The loss over logits (rows, 0), as torch defines it: no target can be in range, so
    every row must be ignored (the caller raised on CPU; elsewhere a non-ignored row gets
    NaN, the kernels' rule); an ignored row's loss is 0, or NaN with label smoothing (torch
    divides the smoothing sum by the zero class count). Differentiable (an empty gradient)
    through ``logits.sum()``, which is exactly 0."""
    valid = target != ignore_index
    ignored_loss = math.nan if label_smoothing > 0 else 0.0
    dtype = acc_dtype(logits)
    loss_rows = torch.where(valid, math.nan, ignored_loss).to(dtype) + logits.sum().to(dtype)
    return reduce_rows(loss_rows, reduction, valid.sum().to(dtype))


# ------------------------------------------------------------ fake and autograd rules


def _make_inplace_backward_function(fwd: Any, bwd_inplace: Any) -> type:
    """Forward through ``fwd``; backward writes d(loss)/d(logits) over the saved logits with
    ``bwd_inplace`` and returns them as the gradient, so the logits' storage is reused
    instead of allocating a (rows, vocab) gradient. A second backward through the same graph
    fails autograd's saved-tensor version check instead of reading overwritten logits.
    (A class per op set, made once at import: torch.compile cannot trace class creation.)"""

    class CrossEntropyInplaceBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
            loss, lse, correct = fwd(
                logits, target, weight, ignore_index, label_smoothing, z_loss, softcap
            )
            ctx.save_for_backward(logits, target, weight, lse)
            ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
            ctx.mark_non_differentiable(lse, correct)
            return loss, lse, correct

        @staticmethod
        def backward(ctx, grad_loss, _grad_lse, _grad_correct):
            refuse_double_backward("cross_entropy")
            logits, target, weight, lse = ctx.saved_tensors
            bwd_inplace(grad_loss, logits, target, weight, lse, *ctx.options)
            # The C++ op's schema marks logits as mutated, but nothing bumps their version for
            # an op without an autograd kernel; do it, so that autograd's saved-tensor check
            # catches any later use of the overwritten logits.
            torch.autograd.graph.increment_version(logits)
            return logits, None, None, None, None, None, None

    return CrossEntropyInplaceBackward


def _check_rows(op: str, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                ignore_index: int, label_smoothing: float, z_loss: float,
                softcap: float) -> None:
    """The ops' own arguments, in the glue's order (check_args in cross_entropy_glue.h):
    logits (rows, vocab) float, target int64 (rows,), weight (vocab,) float, the options."""
    check_float_tensor(op, "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (rows, vocab), got shape {list(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(
            f"{op}: logits must have at least one class, got shape {list(logits.shape)}"
        )
    check_row_target(op, target, logits, "logits")
    check_class_weight(op, weight, logits.shape[1], logits)
    check_ignore_index(op, ignore_index)
    check_options(op, "none", label_smoothing, z_loss, softcap)


def check_row_target(op: str, target: Any, rows_of: Tensor, name: str) -> None:
    """The raw ops' target: int64 class indices, one per row of ``rows_of`` (named ``name``),
    on its device. (Also linear_cross_entropy's raw ops.)"""
    rows = rows_of.shape[0]
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a Tensor, got {type(target).__name__}")
    if list(target.shape) != [rows]:
        raise ValueError(
            f"{op}: target must have shape [{rows}] (one class index per row of {name}), "
            f"got {list(target.shape)}"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be int64 class indices, got {target.dtype}")
    check_same_device(op, "target", target, rows_of)


def _check_row_vector(op: str, name: str, t: Tensor, logits: Tensor,
                      dtype: Optional[torch.dtype]) -> None:
    """grad_loss (any float dtype: dtype None) or lse (exactly ``dtype``): (rows,)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if list(t.shape) != [logits.shape[0]]:
        raise ValueError(
            f"{op}: {name} must have shape [{logits.shape[0]}] (one value per row of logits), "
            f"got {list(t.shape)}"
        )
    check_same_device(op, name, t, logits)
    if dtype is None:
        check_float_tensor(op, name, t)
    elif t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype} (forward's {name}), got {t.dtype}")


def _check_cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                             softcap):
    _check_rows("cross_entropy_fwd", logits, target, weight, ignore_index, label_smoothing,
                z_loss, softcap)


def _check_backward(op, grad_loss, logits, target, weight, lse, ignore_index, label_smoothing,
                    z_loss, softcap, in_place=False):
    _check_rows(op, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    if in_place:
        # The gradient goes into the logits' own storage, so no copy may stand in for them,
        # and no two elements may share memory.
        rows, vocab = logits.shape
        if vocab > 1 and logits.stride(1) != 1:
            raise ValueError(
                f"{op}: logits must have unit stride along the vocab dimension to receive the "
                f"gradient in place, got strides {list(logits.stride())}"
            )
        if rows > 1 and logits.stride(0) < vocab:
            raise ValueError(
                f"{op}: logits rows must not overlap in memory to receive the gradient in "
                f"place, got shape {list(logits.shape)} with strides {list(logits.stride())}"
            )
    _check_row_vector(op, "grad_loss", grad_loss, logits, None)
    _check_row_vector(op, "lse", lse, logits, acc_dtype(logits))


def _check_cross_entropy_bwd(*args):
    _check_backward("cross_entropy_bwd", *args)


def _check_cross_entropy_bwd_inplace(*args):
    _check_backward("cross_entropy_bwd_inplace", *args, in_place=True)


_CHECKS = {
    "cross_entropy_fwd": _check_cross_entropy_fwd,
    "cross_entropy_bwd": _check_cross_entropy_bwd,
    "cross_entropy_bwd_inplace": _check_cross_entropy_bwd_inplace,
}


# Value checks, run by the Triton ops on CPU tensors (OpFamily.check); the C++ glue runs the
# same for the native and emulated ops, and the public functions run check_target_values
# before choosing any backend (the reference included), naming the target's own index.


def _check_fwd_values(logits, target, weight, ignore_index, *options):
    check_target_values("cross_entropy_fwd", target, logits.shape[1], ignore_index)


def _check_bwd_values(grad_loss, logits, target, weight, lse, ignore_index, *options):
    check_target_values("cross_entropy_bwd", target, logits.shape[1], ignore_index)


def _check_bwd_inplace_values(grad_loss, logits, target, weight, lse, ignore_index, *options):
    check_target_values("cross_entropy_bwd_inplace", target, logits.shape[1], ignore_index)


_VALUE_CHECKS = {
    "cross_entropy_fwd": _check_fwd_values,
    "cross_entropy_bwd": _check_bwd_values,
    "cross_entropy_bwd_inplace": _check_bwd_inplace_values,
}


# Fake (meta) rules, the same for every op set. (The Triton ops need them too: triton_op's
# own fake would run the interpreter on fake tensors.)


def _fake_cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                            softcap):
    rows = logits.shape[0]
    acc = acc_dtype(logits)
    return (logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc),
            logits.new_empty((rows,), dtype=torch.bool))


def _fake_cross_entropy_bwd(grad_loss, logits, target, weight, lse, ignore_index,
                            label_smoothing, z_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_cross_entropy_bwd_inplace(grad_loss, logits, target, weight, lse, ignore_index,
                                    label_smoothing, z_loss, softcap):
    return None


_FAKES = {
    "cross_entropy_fwd": _fake_cross_entropy_fwd,
    "cross_entropy_bwd": _fake_cross_entropy_bwd,
    "cross_entropy_bwd_inplace": _fake_cross_entropy_bwd_inplace,
}


def _register_autograd(ops: OpSet) -> None:
    """d(loss per row)/d(logits) through the set's own backward op; lse and correct are not
    differentiable, and neither are the class weights (as in torch). Also attaches
    ``ops.inplace_backward_function``, what ``inplace_backward=True`` runs."""

    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap = inputs
        _loss, lse, correct = output
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.mark_non_differentiable(lse, correct)

    def backward(ctx, grad_loss, _grad_lse, _grad_correct):
        logits, target, weight, lse = ctx.saved_tensors
        grad_logits = None
        if grad_loss is not None and ctx.needs_input_grad[0]:
            grad_logits = ops.cross_entropy_bwd(
                grad_loss, logits, target, weight, lse, *ctx.options
            )
        return grad_logits, None, None, None, None, None, None

    register_autograd(ops.cross_entropy_fwd, backward, setup_context=setup_context)
    ops.inplace_backward_function = _make_inplace_backward_function(
        ops.cross_entropy_fwd, ops.cross_entropy_bwd_inplace
    )


# ------------------------------------------------------------------------ op family


def _triton_kernels() -> dict:
    from fastllm.triton import cross_entropy as kernels

    return {
        "fastllm::cross_entropy_fwd_triton": kernels.cross_entropy_fwd,
        "fastllm::cross_entropy_bwd_triton": kernels.cross_entropy_bwd,
        "fastllm::cross_entropy_bwd_inplace_triton": kernels.cross_entropy_bwd_inplace,
    }


IMPLS = OpFamily(
    "cross_entropy",
    schemas=("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_inplace"),
    checks=_CHECKS,
    value_checks=_VALUE_CHECKS,
    fakes=_FAKES,
    autograd=_register_autograd,
    triton_kernels=_triton_kernels,
    mutates_args={"cross_entropy_bwd_inplace": ("logits",)},
    # The CUDA kernels compute in float32; float64 CUDA tensors run the reference, as torch
    # runs them.
    cuda_dtype_fallback={torch.float64: "reference"},
)


# ---------------------------------------------------------------------- reductions
# The kernels return per-row losses; the reductions are formed here from tensors, with no
# host synchronisation:
#
#   none:  loss_i = w_i * ce_i + z_loss * lse_i^2                   (0 on ignored rows)
#   sum:   sum_i loss_i
#   mean:  sum_i w_i * ce_i / sum_i w_i  +  z_loss * sum_i lse_i^2 / n_valid
#
# over the non-ignored rows i, with w_i = weight[target_i] (1 without class weights) and ce_i
# the (label-smoothed) cross-entropy of row i. The cross-entropy part of the mean is torch's
# weighted mean; the z-loss part is averaged over the non-ignored tokens whatever the class
# weights, as in PaLM and Liger-Kernel (so scaling every class weight by 2 changes nothing).
# The kernels add z_loss * lse_i^2 to each row unweighted; with class weights and z-loss,
# mean_weighting runs them with the class weights scaled by n_valid / sum_i w_i and divides
# the sum of their rows by n_valid, which is exactly the mean above, gradients included.


def mean_denominator(
    target: Tensor, weight: Optional[Tensor], ignore_index: int, vocab: int, dtype: torch.dtype
) -> Tensor:
    """What torch's mean divides by: the number of non-ignored rows, or the sum of their
    class weights. Targets are clamped before the gather so that an out-of-range one (which
    the op itself reports) is never used as an index here."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).clamp(0, vocab - 1)
    return (weight.detach().to(dtype)[safe_target] * valid).sum()


def mean_weighting(
    target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str, z_loss: float,
    vocab: int, dtype: torch.dtype,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(the class weights the kernels run with, what the sum of their per-row losses is
    divided by: None unless reduction="mean"); see the comment above. Every ignored row ->
    0 / 0 = NaN, as in torch; with every target weight 0 the scale is inf and the mean NaN,
    torch's 0 / 0 as well."""
    if reduction != "mean":
        return weight, None
    denominator = mean_denominator(target, weight, ignore_index, vocab, dtype)
    if weight is None or z_loss == 0:
        return weight, denominator
    n_valid = (target != ignore_index).sum().to(dtype)
    return weight.detach().to(dtype) * (n_valid / denominator), n_valid


def reduce_rows(loss_rows: Tensor, reduction: str, denominator: Optional[Tensor]) -> Tensor:
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / denominator  # 0 / 0 = nan when every row is ignored, as in torch


# ------------------------------------------------------------- logged outputs
# What training loops log beside the loss (Liger-Kernel's return_z_loss and
# return_token_accuracy), formed from the forward's per-row lse and correct outputs: no
# extra pass over the logits.
#
#   z_loss term:    z_loss * lse_i^2 per non-ignored row (0 elsewhere), reduced as the loss:
#                   none -> per row, sum -> sum, mean -> / n_valid (the z part of the mean
#                   above, never weighted by the class weights). Detached: it is for logging,
#                   its gradient is already part of the loss's (as in Liger-Kernel).
#   token accuracy: correct_i = the target's (capped) logit equals the row's maximum (a
#                   top-1 prediction; ties count as correct, where argmax(-1) == target
#                   would take the first maximum; a NaN logit in the row or an infinite
#                   target logit: never), False on ignored rows; none -> per row
#                   (0. / 1.), mean and sum -> sum(correct) / n_valid (a fraction either
#                   way, as Liger-Kernel); NaN when every row is ignored, like the mean loss.


class CrossEntropyOutput(NamedTuple):
    """What ``cross_entropy`` and ``linear_cross_entropy`` (and the nn losses) return when
    ``return_z_loss`` or ``return_token_accuracy`` is set: a named tuple, so
    ``loss, z, acc = out`` and ``out.token_accuracy`` both work. Fields not asked for are
    None. ``loss`` includes the z-loss term, as without the flags."""

    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None


def check_return_flags(op: str, return_z_loss: bool, return_token_accuracy: bool) -> None:
    for name, value in (("return_z_loss", return_z_loss),
                        ("return_token_accuracy", return_token_accuracy)):
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def logged_outputs(loss: Tensor, lse: Tensor, correct: Tensor, target: Tensor,
                   ignore_index: int, reduction: str, z_loss: float, return_z_loss: bool,
                   return_token_accuracy: bool, shape: list[int],
                   dtype: torch.dtype) -> CrossEntropyOutput:
    """The CrossEntropyOutput of a loss already reduced (and shaped), from the forward's
    per-row lse and correct over the rows of ``target``; see the comment above. The z term
    comes back in ``dtype`` (the loss's), the accuracy in lse's dtype (float32, or float64)."""
    valid = target != ignore_index
    n_valid = valid.sum().to(lse.dtype)
    z_term = accuracy = None
    if return_z_loss:
        # Only when enabled: 0 * lse^2 would be NaN for a row of -inf logits.
        z_rows = (torch.where(valid, z_loss * lse.detach().square(), 0.0) if z_loss > 0
                  else torch.zeros_like(lse))
        z_term = reduce_rows(z_rows, reduction, n_valid)
        if reduction == "none":
            z_term = z_term.reshape(shape)
        z_term = z_term.to(dtype)
    if return_token_accuracy:
        accuracy = reduce_rows(correct.to(lse.dtype), reduction, n_valid)
        if reduction == "none":
            accuracy = accuracy.reshape(shape)
        elif reduction == "sum":
            accuracy = accuracy / n_valid
    return CrossEntropyOutput(loss, z_term, accuracy)


# --------------------------------------------------------------------------- public API


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    *,
    inplace_backward: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> Tensor | CrossEntropyOutput:
    """Cross-entropy of logits and class-index targets with torch's semantics
    (``torch.nn.functional.cross_entropy``), from one fused pass over each row of logits:

    - ``input`` ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` (class dimension 1, as torch; a
      language model's ``(B, T, V)`` logits are passed as ``logits.view(-1, V)``), float32,
      bfloat16, float16 or float64; ``target`` int64 (or uint8) of input's shape without
      the class dimension. Floating ``target`` (class probabilities, input's shape) runs
      torch's own op. Zero rows give what torch gives: an empty loss, a NaN mean, a zero
      sum; so do zero classes (``C = 0``), where every target must be ``ignore_index``
      (each row's loss is then 0, or NaN with label smoothing, as in torch).
    - ``weight`` (C,): class weights (any float dtype; not differentiable, as in torch);
      ``reduction="mean"`` then divides the cross-entropy by the summed weights of the
      non-ignored targets, and label smoothing is weighted as in torch.
    - rows whose target is ``ignore_index`` add nothing; with every row ignored, ``mean``
      is nan (and the gradient zero), as in torch.
    - ``z_loss``: the PaLM auxiliary loss ``z_loss * lse**2`` per non-ignored row (``lse``
      the row's log-sum-exp), which keeps the softmax normaliser near 1. It is not weighted
      by the class weights: ``none`` gives ``w_t * ce + z_loss * lse**2`` per row, ``sum``
      their sum, and ``mean`` is ``sum(w_t * ce) / sum(w_t) + z_loss * sum(lse**2) / n``
      over the ``n`` non-ignored rows (as PaLM and Liger-Kernel define it).
    - ``softcap``: the logits are soft-capped first, ``z = softcap * tanh(x / softcap)``
      (Gemma 2); with ``z_loss`` the z term uses the log-sum-exp of the capped logits.
    - ``inplace_backward=True``: backward writes the gradient over the logits' storage
      instead of allocating a second (N, C) tensor, so the logits must not be needed
      afterwards (a second backward through the graph raises). Only when asked.
    - ``return_z_loss`` / ``return_token_accuracy``: return a ``CrossEntropyOutput(loss,
      z_loss, token_accuracy)`` named tuple instead of the loss (Liger-Kernel's outputs for
      logging; fields not asked for are None), both computed from the forward's per-row
      outputs, with no extra pass over the logits. ``z_loss`` is the z term alone, the part
      of ``loss`` above (``z_loss * lse**2`` per non-ignored row; sum; or divided by the
      number ``n`` of non-ignored rows for ``mean``), in the loss's dtype, zeros when
      ``z_loss=0``, and detached (for logging: its gradient is already in ``loss``'s).
      ``token_accuracy``: a row is correct when its target's logit (soft-capped, with
      ``softcap``) equals the row's maximum, i.e. the target is a top-1 prediction; ties
      count as correct (``argmax(-1) == target`` would take the first maximum), a row with
      a NaN logit or an infinite (capped) target logit never is. ``mean`` and ``sum`` give the
      fraction of the non-ignored rows that are correct (NaN when every row is ignored, like
      the mean loss), ``none`` each row's 0. or 1. (0. on ignored rows), in float32
      (float64 for float64 input); not differentiable.

    Arithmetic is in float32 (float64 for float64 input); the loss comes back in the input's
    dtype. A target outside ``[0, C)`` that is not ``ignore_index`` raises an IndexError
    naming its index and value on CPU tensors, on every backend; on CUDA tensors the kernels
    give that row a NaN loss and gradient instead (no device synchronisation). Bad
    arguments raise an error naming the argument, the expected and the actual value.
    """
    op = "cross_entropy"
    check_float_tensor(op, "input", input)
    check_options(op, reduction, label_smoothing, z_loss, softcap)
    check_ignore_index(op, ignore_index)
    if not isinstance(inplace_backward, bool):
        raise TypeError(
            f"{op}: inplace_backward must be a bool, got {type(inplace_backward).__name__}"
        )
    check_return_flags(op, return_z_loss, return_token_accuracy)
    logged = return_z_loss or return_token_accuracy
    if isinstance(target, Tensor) and target.is_floating_point():
        # Class probabilities: torch's own op (no fused kernel; z-loss / soft-capping are
        # defined here for class-index targets only).
        if logged:
            raise ValueError(
                f"{op}: return_z_loss and return_token_accuracy need class-index targets, got "
                f"a {target.dtype} target (class probabilities)"
            )
        if z_loss != 0 or softcap != 0:
            raise ValueError(
                f"{op}: z_loss and softcap need class-index targets, got a {target.dtype} "
                "target (class probabilities)"
            )
        if target.shape != input.shape:
            raise ValueError(
                f"{op}: target (class probabilities) must have input's shape "
                f"{list(input.shape)}, got {list(target.shape)}"
            )
        return torch.nn.functional.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    target = class_index_target(op, target, input)
    logits, rows_target, loss_shape = _as_rows(op, input, target)
    vocab = logits.shape[1]
    check_class_weight(op, weight, vocab, input)
    check_weight_not_differentiable(op, weight)
    if values_readable(input, target):
        check_target_values(op, target, vocab, ignore_index)
    if vocab == 0:
        loss = zero_classes_loss(logits, rows_target, ignore_index, reduction, label_smoothing)
        loss = (loss.reshape(loss_shape) if reduction == "none" else loss).to(input.dtype)
        if not logged:
            return loss
        rows = logits.shape[0]  # no class: lse = -inf, and no row is correct
        lse = logits.new_full((rows,), -math.inf, dtype=acc_dtype(input))
        correct = logits.new_zeros((rows,), dtype=torch.bool)
        return logged_outputs(loss, lse, correct, rows_target, ignore_index, reduction, z_loss,
                              return_z_loss, return_token_accuracy, loss_shape, input.dtype)

    ops = IMPLS.select(input)
    if ops is None:
        out = ref.cross_entropy_ref(
            logits, rows_target, weight, ignore_index, reduction, label_smoothing, z_loss,
            softcap, return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        )
        if not logged:
            return out.reshape(loss_shape) if reduction == "none" else out
        if reduction == "none":
            out = tuple(None if t is None else t.reshape(loss_shape) for t in out)
        loss, z_term, accuracy = out
        return CrossEntropyOutput(loss, z_term if return_z_loss else None,
                                  accuracy if return_token_accuracy else None)

    kernel_weight, denominator = mean_weighting(
        rows_target, weight, ignore_index, reduction, z_loss, vocab, acc_dtype(input)
    )
    options = (ignore_index, float(label_smoothing), float(z_loss), float(softcap))
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        rows = logits.shape[0]
        if logits.stride(-1) != 1 or (rows > 1 and logits.stride(0) < vocab):
            # The gradient needs row-major storage of its own to land in.
            logits = logits.contiguous()
        loss_rows, lse, correct = ops.inplace_backward_function.apply(
            logits, rows_target, kernel_weight, *options
        )
    else:
        loss_rows, lse, correct = ops.cross_entropy_fwd(
            logits, rows_target, kernel_weight, *options
        )
    loss = reduce_rows(loss_rows, reduction, denominator)
    if reduction == "none":
        loss = loss.reshape(loss_shape)
    loss = loss.to(input.dtype)
    if not logged:
        return loss
    return logged_outputs(loss, lse, correct, rows_target, ignore_index, reduction, z_loss,
                          return_z_loss, return_token_accuracy, loss_shape, input.dtype)
