"""Cross-entropy: the public function, its fake and autograd rules, its Triton ops.

The kernels (C++ CPU, CUDA, Triton) work on 2-D logits ``(rows, vocab)`` and return the
per-row loss and log-sum-exp in float32 (float64 for float64 logits); everything torch's
``cross_entropy`` adds on top — the class dimension at dim 1, the reductions and their
weighted mean, the loss in the input's dtype — happens here, on metadata and on per-row
vectors, so that one pair of kernels serves every reduction.

Schemas: csrc/schemas.h (FASTLLM_CROSS_ENTROPY_SCHEMAS). Kernels: csrc/cross_entropy/
(C++ CPU, CUDA), fastllm/triton/cross_entropy.py (Triton); reference:
fastllm/reference/cross_entropy.py. The backends and their choice: fastllm/ops/_family.py.
The chunked linear + cross-entropy built on these ops: fastllm/ops/linear_cross_entropy.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastllm.ops._family import OpFamily, OpSet, acc_dtype, check_float_tensor, check_same_device
from fastllm.reference import cross_entropy as ref

_REDUCTIONS = ("none", "mean", "sum")


# --------------------------------------------------------------------------- checks
# Metadata-only checks shared by every backend (the C++ glue repeats them for direct callers
# of torch.ops.fastllm.*) and by linear_cross_entropy. Values are never looked at here: a
# target out of range is reported by the op itself, so these trace under
# torch.compile(fullgraph=True).


def check_options(
    op: str, reduction: str, label_smoothing: float, z_loss: float, softcap: float
) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"{op}: z_loss must be non-negative, got {z_loss}")
    if softcap < 0:
        raise ValueError(f"{op}: softcap must be non-negative (0 disables it), got {softcap}")


def check_class_weight(op: str, weight: Optional[Tensor], vocab: int, like: Tensor) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != vocab:
        raise ValueError(
            f"{op}: weight must have shape [{vocab}] (one weight per class), "
            f"got {list(weight.shape)}"
        )
    check_float_tensor(op, "weight", weight)
    check_same_device(op, "weight", weight, like)


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


def _as_rows(op: str, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """torch's layouts -> (logits (rows, vocab), target (rows,), shape of the per-row loss).

    input (C,) with target (); input (N, C) with target (N,); input (N, C, d1, ...) with
    target (N, d1, ...): the class dimension is dim 1, as in torch.nn.functional.cross_entropy.
    """
    if input.dim() == 0:
        raise ValueError(f"{op}: input must have a class dimension, got a 0-d tensor")
    if input.dim() == 1:
        expected: list[int] = []
    else:
        expected = [input.shape[0]] + list(input.shape[2:])
    if list(target.shape) != expected:
        class_dim = "0" if input.dim() == 1 else "1"
        raise ValueError(
            f"{op}: target must have shape {expected} (input's shape {list(input.shape)} without "
            f"the class dimension {class_dim}), got {list(target.shape)}"
        )
    vocab = input.shape[0] if input.dim() == 1 else input.shape[1]
    if input.dim() <= 2:
        logits = input.reshape(-1, vocab)
    else:
        logits = input.movedim(1, -1).reshape(-1, vocab)  # copies: classes become contiguous
    return logits, target.reshape(-1), expected


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
            loss, lse = fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
            ctx.save_for_backward(logits, target, weight, lse)
            ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            logits, target, weight, lse = ctx.saved_tensors
            bwd_inplace(grad_loss, logits, target, weight, lse, *ctx.options)
            # The C++ op's schema marks logits as mutated, but nothing bumps their version for
            # an op without an autograd kernel; do it, so that autograd's saved-tensor check
            # catches any later use of the overwritten logits.
            torch.autograd.graph.increment_version(logits)
            return logits, None, None, None, None, None, None

    return CrossEntropyInplaceBackward


def _check_rows(op: str, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                label_smoothing: float, z_loss: float, softcap: float) -> None:
    """The ops' own arguments: logits (rows, vocab), target int64 (rows,), weight (vocab,)."""
    check_float_tensor(op, "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (rows, vocab), got shape {list(logits.shape)}")
    check_options(op, "none", label_smoothing, z_loss, softcap)
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be int64, got {target.dtype}")
    if list(target.shape) != [logits.shape[0]]:
        raise ValueError(
            f"{op}: target must have shape [{logits.shape[0]}] (one per row of logits), "
            f"got {list(target.shape)}"
        )
    check_same_device(op, "target", target, logits)
    check_class_weight(op, weight, logits.shape[1], logits)


def _check_row_vector(op: str, name: str, t: Tensor, logits: Tensor, dtype: torch.dtype) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if list(t.shape) != [logits.shape[0]] or t.dtype != dtype:
        raise ValueError(
            f"{op}: {name} must be {dtype} of shape [{logits.shape[0]}] (one per row of "
            f"logits), got {t.dtype} of shape {list(t.shape)}"
        )
    check_same_device(op, name, t, logits)


def _check_cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                             softcap):
    _check_rows("cross_entropy_fwd", logits, target, weight, label_smoothing, z_loss, softcap)


def _check_backward(op, grad_loss, logits, target, weight, lse, ignore_index, label_smoothing,
                    z_loss, softcap):
    _check_rows(op, logits, target, weight, label_smoothing, z_loss, softcap)
    check_float_tensor(op, "grad_loss", grad_loss)
    if list(grad_loss.shape) != [logits.shape[0]]:
        raise ValueError(
            f"{op}: grad_loss must have shape [{logits.shape[0]}] (one per row of logits), "
            f"got {list(grad_loss.shape)}"
        )
    check_same_device(op, "grad_loss", grad_loss, logits)
    _check_row_vector(op, "lse", lse, logits, acc_dtype(logits))


def _check_cross_entropy_bwd(*args):
    _check_backward("cross_entropy_bwd", *args)


def _check_cross_entropy_bwd_inplace(*args):
    _check_backward("cross_entropy_bwd_inplace", *args)


_CHECKS = {
    "cross_entropy_fwd": _check_cross_entropy_fwd,
    "cross_entropy_bwd": _check_cross_entropy_bwd,
    "cross_entropy_bwd_inplace": _check_cross_entropy_bwd_inplace,
}


# Fake (meta) rules, the same for every op set. (The Triton ops need them too: triton_op's
# own fake would run the interpreter on fake tensors.)


def _fake_cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                            softcap):
    rows = logits.shape[0]
    acc = acc_dtype(logits)
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc)


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
    """d(loss per row)/d(logits) through the set's own backward op; lse is not
    differentiable, and neither are the class weights (as in torch). Also attaches
    ``ops.inplace_backward_function``, what ``inplace_backward=True`` runs."""

    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap = inputs
        _loss, lse = output
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_loss, _grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        grad_logits = None
        if grad_loss is not None and ctx.needs_input_grad[0]:
            grad_logits = ops.cross_entropy_bwd(
                grad_loss, logits, target, weight, lse, *ctx.options
            )
        return grad_logits, None, None, None, None, None, None

    torch.library.register_autograd(ops.cross_entropy_fwd, backward, setup_context=setup_context)
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
    fakes=_FAKES,
    autograd=_register_autograd,
    triton_kernels=_triton_kernels,
    mutates_args={"cross_entropy_bwd_inplace": ("logits",)},
)


# ---------------------------------------------------------------------- reductions


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
    return (weight.to(dtype)[safe_target] * valid).sum()


def reduce_rows(
    loss_rows: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    vocab: int,
) -> Tensor:
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    # 0 / 0 = nan when every row is ignored, as in torch.
    return loss_rows.sum() / mean_denominator(target, weight, ignore_index, vocab, loss_rows.dtype)


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
) -> Tensor:
    """Cross-entropy of logits and class-index targets with torch's semantics
    (``torch.nn.functional.cross_entropy``), from one fused pass over each row of logits:

    - ``input`` ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` (class dimension 1, as torch; a
      language model's ``(B, T, V)`` logits are passed as ``logits.view(-1, V)``), float32,
      bfloat16, float16 or float64; ``target`` int64 (or uint8) of input's shape without
      the class dimension. Floating ``target`` (class probabilities) runs torch's own op.
    - ``weight`` (C,): class weights; ``reduction="mean"`` then divides by the summed weights
      of the non-ignored targets, and label smoothing is weighted as in torch.
    - rows whose target is ``ignore_index`` add nothing; with every row ignored, ``mean``
      is nan (and the gradient zero), as in torch.
    - ``z_loss``: adds ``z_loss * logsumexp(z)**2`` per (non-ignored) row, the PaLM
      auxiliary loss that keeps the softmax normaliser near 1.
    - ``softcap``: the logits are soft-capped first, ``z = softcap * tanh(x / softcap)``
      (Gemma 2); with ``z_loss`` the z term uses the log-sum-exp of the capped logits.
    - ``inplace_backward=True``: backward writes the gradient over the logits' storage
      instead of allocating a second (N, C) tensor, so the logits must not be needed
      afterwards (a second backward through the graph raises). Only when asked.

    Arithmetic is in float32 (float64 for float64 input); the loss comes back in the input's
    dtype. A target outside ``[0, C)`` that is not ``ignore_index`` raises an IndexError
    naming the row on CPU; CUDA kernels give that row a NaN loss (no device synchronisation).
    """
    op = "cross_entropy"
    check_float_tensor(op, "input", input)
    check_options(op, reduction, label_smoothing, z_loss, softcap)
    if isinstance(target, Tensor) and target.is_floating_point():
        # Class probabilities: torch's own op (no fused kernel; z-loss / soft-capping are
        # defined here for class-index targets only).
        if z_loss != 0 or softcap != 0:
            raise ValueError(
                f"{op}: z_loss and softcap need class-index targets, got a {target.dtype} "
                "target (class probabilities)"
            )
        return torch.nn.functional.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    target = class_index_target(op, target, input)
    logits, rows_target, loss_shape = _as_rows(op, input, target)
    vocab = logits.shape[1]
    check_class_weight(op, weight, vocab, input)

    ops = IMPLS.select(input)
    if ops is None:
        loss = ref.cross_entropy_ref(
            logits, rows_target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
        )
        return loss.reshape(loss_shape) if reduction == "none" else loss

    options = (ignore_index, float(label_smoothing), float(z_loss), float(softcap))
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        if logits.stride(-1) != 1:
            logits = logits.contiguous()  # the gradient needs row-major storage to land in
        loss_rows = ops.inplace_backward_function.apply(logits, rows_target, weight, *options)
    else:
        loss_rows, _lse = ops.cross_entropy_fwd(logits, rows_target, weight, *options)
    loss = reduce_rows(loss_rows, rows_target, weight, ignore_index, reduction, vocab)
    if reduction == "none":
        loss = loss.reshape(loss_shape)
    return loss.to(input.dtype)


