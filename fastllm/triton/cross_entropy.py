"""Cross-entropy in Triton: forward and backward kernels over (rows, vocab) logits and their
launchers.

Math, per row x of length V (vocab), target t, arithmetic in float32:
    z      = softcap * tanh(x / softcap) when softcap > 0, else x     (logit soft-capping)
    lse    = log(sum_c exp(z_c))
    ce     = w_t * (lse - z_t)                        (w = class weight, or 1 without one)
    smooth = sum_c w_c * (lse - z_c) / V              (torch's label-smoothing term)
    loss   = (1 - ls) * ce + ls * smooth + z_loss * lse^2
Rows whose target is ignore_index get loss 0 and a zero gradient; a target that is neither
ignore_index nor in [0, V) gives that row a NaN loss and a NaN gradient (there is no cheap
error path out of a GPU kernel; the NaN cannot pass unnoticed). On CPU tensors (the
interpreter) the op's value check raises an IndexError before the kernel runs. Backward,
with p = exp(z - lse), W_s = sum_c w_c / V (1 without weights) and g the row's upstream
gradient:
    dL/dz_c = g * [(1 - ls) * w_t * (p_c - [c == t]) + ls * (p_c * W_s - w_c / V)
                   + 2 * z_loss * lse * p_c]
    dL/dx_c = dL/dz_c * (1 - tanh(x_c / softcap)^2) when soft-capping.
This is the math of csrc/cross_entropy/cross_entropy.h; the launchers mirror the schemas in
csrc/schemas.h. Reductions over rows (mean over non-ignored rows, sum) are the caller's, on
the per-row losses, so one pair of kernels serves every reduction.

Kernels:
    cross_entropy_fwd_kernel  one program per row. It reads the row once, in BLOCK_V chunks,
        keeping a running max m and sum(exp(z - m)) rescaled whenever m grows (online
        logsumexp), so any vocab size streams through a fixed register budget. For label
        smoothing it also keeps sum_c w_c * (z_c - m), rebased with m, so that lse - mean(z)
        comes out as a difference of O(1) numbers even when the logits share a large
        offset. lse is written for every row, ignored ones included; correct (token
        accuracy) is z_t == the row max, one compare per row.
    cross_entropy_exact_lse_kernel  one program per row, before the backward: the row's
        log-sum-exp as hi + lo, p = exp((z - hi) - lo). The float32 lse the forward saved is
        rounded to half an ulp, a relative error of every p of the row: below 2^-17 for
        |lse| < 256 (EXACT_LSE_MIN), where hi = lse and lo = 0, but 5e-4 at 1e4, and a tie of
        two logits at 1e8 would get p = 1 instead of 1/2. From EXACT_LSE_MIN on, the program
        reads the row (hi = its max, lo = log(sum exp(z - max)), as the forward's online
        pass), so such a row costs one more read and the others nothing but the launch. The
        C++ CPU and CUDA kernels do the same within their backward.
    cross_entropy_bwd_kernel  one program per (row, BLOCK_V chunk): the gradient of a chunk
        needs only that chunk's logits and per-row scalars (lse, target, g), so short rows and
        long rows alike fill the GPU, and writing over the logits in place is safe because each
        element is read and then written by the same program. Ignored rows write zeros
        without reading the logits.
Constexpr flags select the variants at compile time: HAS_WEIGHT (class weights),
HAS_SMOOTHING (label_smoothing > 0: the forward skips the smoothing sums, and a -inf logit
cannot turn a 0 * inf into NaN), HAS_SOFTCAP (softcap > 0).

Shapes: rows (N) = tokens, vocab (V) = classes. logits (N, V) with unit column stride and any
row stride, float32/bfloat16/float16; target (N,) int64; weight (V,) float32 or None; loss and
lse (N,) float32; correct (N,) bool; grad_loss (N,) float, any stride (0 for one value
broadcast to every row); grad_logits (N, V) contiguous in the logits' dtype, or the logits'
own storage (in place).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

# The interpreter's float32 -> bfloat16 cast truncates; norm.py holds the workaround.
from fastllm.triton._common import interpreted, round_to_dtype, tanh

# Longest vocab chunk held in registers at once: 4096 float32 values over 8 warps is 16 per
# thread for each live chunk-sized tensor (x, z, exp, weight).
MAX_BLOCK_V = 4096
# |lse| from which backward recomputes a row's log-sum-exp from its logits (see above).
EXACT_LSE_MIN: tl.constexpr = tl.constexpr(256.0)


@triton.jit
def _soft_capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(x / softcap) when soft-capping, else x (float32)."""
    if HAS_SOFTCAP:
        return softcap * tanh(x / softcap)
    else:
        return x


@triton.jit
def _target_weight(weight_ptr, target, target_in_range, HAS_WEIGHT: tl.constexpr):
    """w_t as float32: the target's class weight (0 for an out-of-range target), 1 without
    weights."""
    target_weight = 1.0
    if HAS_WEIGHT:
        target_weight = tl.load(weight_ptr + target, mask=target_in_range, other=0.0).to(tl.float32)
    return target_weight


@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr,  # (N, V), row stride stride_logits_row
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) float32; None unless HAS_WEIGHT
    loss_ptr,  # (N,) float32
    lse_ptr,  # (N,) float32
    correct_ptr,  # (N,) bool
    stride_logits_row,
    vocab,  # V
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,  # power of two
):
    """Writes loss, lse and correct of row program_id(0)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_logits_row

    # Online logsumexp over the row. The running max starts at the most negative finite
    # float32 rather than -inf so that a chunk of -inf logits (padded vocab) never forms
    # -inf - (-inf) = NaN in the rescaling.
    running_max = -3.4028234663852886e38
    sum_exp = 0.0  # sum_c exp(z_c - running_max) over the columns seen
    sum_weight = 0.0  # sum_c w_c over the columns seen (their count without weights)
    sum_weighted_z = 0.0  # sum_c w_c * (z_c - running_max) over the columns seen
    for block_start in range(0, vocab, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab
        x = tl.load(logits_row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = _soft_capped(x, softcap, HAS_SOFTCAP)
        z = tl.where(col_mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                block_weight = tl.sum(w, axis=0)
                block_weighted_z = tl.sum(w * tl.where(col_mask, z - new_max, 0.0), axis=0)
            else:
                block_weight = tl.minimum(vocab - block_start, BLOCK_V).to(tl.float32)
                block_weighted_z = tl.sum(tl.where(col_mask, z - new_max, 0.0), axis=0)
            # Rebase the columns seen so far from the old max to the new one. Nothing to
            # rebase before the first block (sum_weight 0), where the initial max minus a
            # max above 1e31 would overflow to -inf and 0 * -inf give NaN.
            rebase = tl.where(sum_weight != 0.0, sum_weight * (running_max - new_max), 0.0)
            sum_weighted_z += rebase + block_weighted_z
            sum_weight += block_weight
        running_max = new_max
    log_sum_exp = tl.log(sum_exp)  # lse - running_max
    lse = running_max + log_sum_exp

    target = tl.load(target_ptr + row)
    target_in_range = (target >= 0) & (target < vocab)
    x_target = tl.load(logits_row_ptr + target, mask=target_in_range, other=0.0).to(tl.float32)
    z_target = _soft_capped(x_target, softcap, HAS_SOFTCAP)
    target_weight = _target_weight(weight_ptr, target, target_in_range, HAS_WEIGHT)
    # lse - z_t without forming lse first: exact cancellation when z_t is near the max.
    loss = (1.0 - label_smoothing) * target_weight * ((running_max - z_target) + log_sum_exp)
    if HAS_SMOOTHING:
        loss += label_smoothing * (sum_weight * log_sum_exp - sum_weighted_z) / vocab
    loss += z_loss * lse * lse
    loss = tl.where(target_in_range, loss, float("nan"))
    loss = tl.where(target == ignore_index, 0.0, loss)
    # Token accuracy: z_target and the running max come from the same _soft_capped, so a
    # top-1 target compares exactly equal (ties count); a NaN logit makes lse NaN.
    correct = (target_in_range & (target != ignore_index) & (z_target == running_max)
               & (tl.abs(z_target) < float("inf")) & (lse == lse))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(correct_ptr + row, correct)


@triton.jit
def cross_entropy_exact_lse_kernel(
    logits_ptr,  # (N, V), row stride stride_logits_row
    lse_ptr,  # (N,) float32, from the forward
    lse_hi_ptr,  # (N,) float32 out
    lse_lo_ptr,  # (N,) float32 out
    stride_logits_row,
    vocab,  # V
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,  # power of two
):
    """Writes hi, lo of row program_id(0): (lse, 0), or for EXACT_LSE_MIN <= |lse| < inf the
    row's max and log(sum exp(z - max)). A non-finite lse (an inf or NaN logit) stays: p is
    NaN then, as torch's."""
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    hi = lse
    lo = 0.0
    if (tl.abs(lse) >= EXACT_LSE_MIN) & (tl.abs(lse) < float("inf")):
        logits_row_ptr = logits_ptr + row * stride_logits_row
        running_max = -3.4028234663852886e38  # as in the forward
        sum_exp = 0.0
        for block_start in range(0, vocab, BLOCK_V):
            cols = block_start + tl.arange(0, BLOCK_V)
            col_mask = cols < vocab
            x = tl.load(logits_row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            z = tl.where(col_mask, _soft_capped(x, softcap, HAS_SOFTCAP), float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            running_max = new_max
        hi = running_max
        lo = tl.log(sum_exp)
    tl.store(lse_hi_ptr + row, hi)
    tl.store(lse_lo_ptr + row, lo)


@triton.jit
def cross_entropy_bwd_kernel(
    grad_loss_ptr,  # (N,) float, stride stride_grad_loss (0 = broadcast)
    logits_ptr,  # (N, V), row stride stride_logits_row
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) float32; None unless HAS_WEIGHT
    weight_sum_ptr,  # (1,) float32 = sum(weight); None unless HAS_WEIGHT and HAS_SMOOTHING
    lse_ptr,  # (N,) float32, from the forward
    lse_hi_ptr,  # (N,) float32, from cross_entropy_exact_lse_kernel
    lse_lo_ptr,  # (N,) float32, from cross_entropy_exact_lse_kernel
    grad_logits_ptr,  # (N, V) in the logits' dtype, row stride stride_grad_row; may be logits_ptr
    stride_grad_loss,
    stride_logits_row,
    stride_grad_row,
    vocab,  # V
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,  # power of two
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """Writes the gradient of row program_id(0), columns [program_id(1) * BLOCK_V, ...)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab
    grad_row_ptr = grad_logits_ptr + row * stride_grad_row
    target = tl.load(target_ptr + row)
    if target == ignore_index:
        zeros = tl.zeros([BLOCK_V], dtype=grad_logits_ptr.dtype.element_ty)
        tl.store(grad_row_ptr + cols, zeros, mask=col_mask)
    else:
        target_in_range = (target >= 0) & (target < vocab)
        grad_loss = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        lse_hi = tl.load(lse_hi_ptr + row)
        lse_lo = tl.load(lse_lo_ptr + row)
        target_weight = _target_weight(weight_ptr, target, target_in_range, HAS_WEIGHT)
        # dL/dz_c = p_c * p_coef - [c == t] * target_coef - w_c * smooth_coef
        target_coef = grad_loss * (1.0 - label_smoothing) * target_weight
        p_coef = target_coef + grad_loss * 2.0 * z_loss * lse
        if HAS_SMOOTHING:
            mean_weight = 1.0
            if HAS_WEIGHT:
                mean_weight = tl.load(weight_sum_ptr) / vocab
            p_coef += grad_loss * label_smoothing * mean_weight
            smooth_coef = grad_loss * label_smoothing / vocab

        x = tl.load(logits_ptr + row * stride_logits_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = x
        if HAS_SOFTCAP:
            tanh_x = tanh(x / softcap)
            z = softcap * tanh_x
        grad = tl.exp((z - lse_hi) - lse_lo) * p_coef - tl.where(cols == target, target_coef, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                grad -= tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * smooth_coef
            else:
                grad -= smooth_coef
        if HAS_SOFTCAP:
            grad *= 1.0 - tanh_x * tanh_x
        grad = tl.where(target_in_range, grad, float("nan"))
        grad = round_to_dtype(grad, grad_logits_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE)
        tl.store(grad_row_ptr + cols, grad, mask=col_mask)


# ---- launchers: schema-shaped; fastllm/ops checks the arguments (OpFamily.check) --------


def _check_dtype(op: str, logits: torch.Tensor) -> None:
    """The kernels compute in float32, so they return float32 statistics; float64 logits
    (whose lse the ops return in float64) are refused by name, as the CUDA glue does."""
    if logits.dtype == torch.float64:
        raise TypeError(
            f"{op} (Triton): logits must be float32, bfloat16 or float16, got torch.float64 "
            "(float64 runs on the 'native' or 'reference' backend)"
        )


def _has_unit_column_stride(logits: torch.Tensor) -> bool:
    """Whether the kernels can read `logits` as is (one column needs no particular stride)."""
    return logits.shape[1] <= 1 or logits.stride(1) == 1


def _with_unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    """`logits` itself when its columns are contiguous, else a contiguous copy."""
    return logits if _has_unit_column_stride(logits) else logits.contiguous()


def _variant_flags(weight: Optional[torch.Tensor], label_smoothing: float, softcap: float) -> dict:
    """The constexpr flags both kernels select their variant by."""
    return dict(
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap > 0.0,
    )


def _block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of `vocab` logits."""
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    num_warps = min(max(block_v // 512, 1), 8)
    return block_v, num_warps


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastllm::cross_entropy_fwd -> (loss, lse, correct): loss and lse (N,) float32, loss 0 on
    ignored rows; correct (N,) bool, the target is a top-1 class (token accuracy)."""
    _check_dtype("cross_entropy_fwd", logits)
    logits = _with_unit_column_stride(logits)
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    correct = torch.empty(rows, dtype=torch.bool, device=logits.device)
    block_v, num_warps = _block_config(vocab)
    torch.library.wrap_triton(cross_entropy_fwd_kernel)[(rows,)](
        logits,
        target.contiguous(),
        None if weight is None else weight.contiguous(),
        loss,
        lse,
        correct,
        logits.stride(0),
        vocab,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        **_variant_flags(weight, label_smoothing, softcap),
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return loss, lse, correct


def _launch_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    grad_logits: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> None:
    """Writes the gradient into `grad_logits` ((N, V), unit column stride; may be `logits`)."""
    rows, vocab = logits.shape
    weight_sum = None
    if weight is not None:
        weight = weight.contiguous()
        if label_smoothing > 0.0:  # only the smoothing term needs sum(w)
            weight_sum = weight.sum(dtype=torch.float32).reshape(1)
    block_v, num_warps = _block_config(vocab)
    lse = lse.contiguous()
    lse_hi = torch.empty_like(lse)
    lse_lo = torch.empty_like(lse)
    torch.library.wrap_triton(cross_entropy_exact_lse_kernel)[(rows,)](
        logits,
        lse,
        lse_hi,
        lse_lo,
        logits.stride(0),
        vocab,
        softcap,
        HAS_SOFTCAP=softcap > 0.0,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    torch.library.wrap_triton(cross_entropy_bwd_kernel)[(rows, triton.cdiv(vocab, block_v))](
        grad_loss,
        logits,
        target.contiguous(),
        weight,
        weight_sum,
        lse,
        lse_hi,
        lse_lo,
        grad_logits,
        grad_loss.stride(0),
        logits.stride(0),
        grad_logits.stride(0),
        vocab,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        **_variant_flags(weight, label_smoothing, softcap),
        BLOCK_V=block_v,
        ROUND_BF16_IN_SOFTWARE=interpreted(),
        num_warps=num_warps,
    )


def cross_entropy_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> torch.Tensor:
    """fastllm::cross_entropy_bwd -> grad_logits, (N, V) contiguous in the logits' dtype."""
    _check_dtype("cross_entropy_bwd", logits)
    logits = _with_unit_column_stride(logits)
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_bwd(
        grad_loss, logits, target, weight, lse, grad_logits,
        ignore_index, label_smoothing, z_loss, softcap,
    )
    return grad_logits


def cross_entropy_bwd_inplace(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> None:
    """fastllm::cross_entropy_bwd_inplace: overwrites `logits` (unit column stride, rows
    apart: the op's checks refuse anything else, as the C++ glue does) with its gradient."""
    _check_dtype("cross_entropy_bwd_inplace", logits)
    _launch_bwd(
        grad_loss, logits, target, weight, lse, logits,
        ignore_index, label_smoothing, z_loss, softcap,
    )
