"""LayerNorm / RMSNorm in Triton: forward and backward kernels and their launchers.

Math, per row x of length N (cols), statistics and arithmetic in float32 (float64 for
float64 input: the accumulation dtype, that of the rstd pointer):
    layer norm: mean = sum(x) / N, var = sum((x - mean)^2) / N, rstd = 1 / sqrt(var + eps)
                y = (x - mean) * rstd * w + b
    rms norm:   rstd = 1 / sqrt(sum(x^2) / N + eps),  y = x * rstd * w
    add_* variants first form s = round_to_dtype(x + residual), store it as residual_out and
    normalise s, so the backward sees exactly the values the forward normalised.
Backward, with xhat = (x - mean) * rstd (rms: x * rstd) and g = dy * w:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (rms: no mean(g) term)
    dx += dresidual_out when given (the gradient flowing into residual_out)
    dw = sum_rows(dy * xhat), db = sum_rows(dy)
This is the math of csrc/norm/norm.h; these launchers mirror the schemas of csrc/schemas.h.

Variants, all selected by constexpr flags of one forward and one backward kernel:
    IS_RMS_NORM        rms norm instead of layer norm (no mean, no bias).
    HAS_RESIDUAL       the fused residual add of the pre-norm Transformer block; saves a
                       full read and write of the activations compared to a separate add.
    HAS_WEIGHT/BIAS    the affine parameters are optional, as in torch.
    ROW_FITS_BLOCK     rows of up to MAX_BLOCK_N columns (every common hidden size) are held
                       in registers and read once, in (BLOCK_M, BLOCK_N) tiles of several rows
                       when rows are short. Longer rows go one per program, looping over column
                       blocks and reading the row twice: the forward merges per-block statistics
                       with Chan's parallel variance formula (as safe as the two-pass form), the
                       backward first reduces mean(g) and mean(g * xhat), then writes dx.
    ROUND_BF16_IN_SOFTWARE  set only under TRITON_INTERPRET=1; see fastllm/triton/_common.py.
The forward program normalises BLOCK_M consecutive rows. Each backward program owns a
contiguous chunk of rows and one row of a (programs, N) partial-sum buffer (accumulation
dtype) for dw and
db; the launcher sums that buffer over programs. No atomics, so gradients are deterministic.

Shapes: rows (M) = product of the input's leading dims, cols (N) = prod(normalized_shape).
Operands are viewed as (M, N) with unit column stride and any row stride; the outputs out,
residual_out and dx are contiguous (M, N); mean and rstd are (M,) in the accumulation dtype
(float32; float64 for float64 input); weight and bias reach the kernels in it, (N,) contiguous.
"""

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fastllm.triton._common import interpreted, round_to_dtype

# Longest row held in registers at once (8 warps, 32 values per thread per row-sized tensor;
# the backward then needs about 250 registers per thread). Longer rows loop over column
# blocks of LOOP_BLOCK_N: narrower blocks keep the looping kernels under 80 registers, where
# ptxas spilled a few bytes in some variants with 8192- or 4096-wide blocks.
MAX_BLOCK_N = 8192
LOOP_BLOCK_N = 2048

# Short rows are processed several at a time, in (BLOCK_M, BLOCK_N) tiles of up to this many
# elements: fewer, fuller programs on a GPU, and far fewer program instances for the Triton
# interpreter, whose cost is per executed op rather than per element. Untuned on a GPU.
ROW_TILE_ELEMENTS = 2048

# The Triton interpreter (TRITON_INTERPRET=1, CPU tensors) pays per executed op, not per
# element, and has no registers to run out of: it gets larger tiles, which keeps the test
# suite fast, yet small enough that a backward program still steps through several tiles at
# (97, 1000); and a few backward programs, so that the chunking of rows and the partial-sum
# reduction are exercised as on a GPU.
_INTERPRETER_ROW_TILE_ELEMENTS = 16384
_INTERPRETER_LOOP_BLOCK_N = 8192
_INTERPRETER_BWD_PROGRAMS = 4


@triton.jit
def _column_block(block_start, cols, row_mask, BLOCK_N: tl.constexpr):
    """Columns [block_start, block_start + BLOCK_N) of a tile: their offsets, which exist
    (< cols), and the (BLOCK_M, BLOCK_N) mask with the tile's rows."""
    col_offsets = block_start + tl.arange(0, BLOCK_N)
    col_mask = col_offsets < cols
    return col_offsets, col_mask, row_mask[:, None] & col_mask[None, :]


@triton.jit
def _centre(mean, IS_RMS_NORM: tl.constexpr):
    """What the forward subtracts before scaling: the row means as (BLOCK_M, 1), 0 for rms."""
    if IS_RMS_NORM:
        return 0.0
    else:
        return mean[:, None]


@triton.jit
def _load_normalised_input(
    x_rows_ptr,
    residual_rows_ptr,
    residual_out_rows_ptr,
    col_offsets,
    mask,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RESIDUAL_OUT: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """A (BLOCK_M, BLOCK_N) tile of what gets normalised, in ACC_DTYPE, 0 where masked: x, or
    s = round(x + residual), stored to residual_out if STORE_RESIDUAL_OUT. The pointers are
    (BLOCK_M, 1) row starts."""
    x = tl.load(x_rows_ptr + col_offsets[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_RESIDUAL:
        residual = tl.load(residual_rows_ptr + col_offsets[None, :], mask=mask, other=0.0)
        # Round to the input dtype before normalising, as torch's eager `x + residual` does.
        s = round_to_dtype(
            x + residual.to(ACC_DTYPE), residual_out_rows_ptr.dtype.element_ty,
            ROUND_BF16_IN_SOFTWARE,
        )
        if STORE_RESIDUAL_OUT:
            tl.store(residual_out_rows_ptr + col_offsets[None, :], s, mask=mask)
        x = s.to(ACC_DTYPE)
    return x


@triton.jit
def _store_normalised(
    x,
    mean,
    rstd,
    weight_ptr,
    bias_ptr,
    out_rows_ptr,
    col_offsets,
    col_mask,
    mask,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """out = (x - mean) * rstd * w + b for one tile; mean and rstd are (BLOCK_M, 1), mean is
    0 for rms norm."""
    y = (x - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + col_offsets, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + col_offsets, mask=col_mask, other=0.0)[None, :]
    y = round_to_dtype(y, out_rows_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE)
    tl.store(out_rows_ptr + col_offsets[None, :], y, mask=mask)


@triton.jit
def norm_fwd_kernel(
    x_ptr,  # (M, N), row stride stride_x_row
    residual_ptr,  # (M, N), row stride stride_residual_row; None unless HAS_RESIDUAL
    weight_ptr,  # (N,) accumulation dtype; None unless HAS_WEIGHT
    bias_ptr,  # (N,) accumulation dtype; None unless HAS_BIAS
    out_ptr,  # (M, N) contiguous, x's dtype
    residual_out_ptr,  # (M, N) contiguous, x's dtype; None unless HAS_RESIDUAL
    mean_ptr,  # (M,) accumulation dtype; None for rms norm
    rstd_ptr,  # (M,) accumulation dtype (float32; float64 for float64 input)
    stride_x_row,
    stride_residual_row,
    rows,  # M
    cols,  # N
    eps,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program (1 unless ROW_FITS_BLOCK)
    BLOCK_N: tl.constexpr,  # power of two; >= N when ROW_FITS_BLOCK
    ROW_FITS_BLOCK: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """Normalises rows [pid * BLOCK_M, (pid + 1) * BLOCK_M); writes out, residual_out (add_*),
    mean (layer norm) and rstd."""
    ACC_DTYPE: tl.constexpr = rstd_ptr.dtype.element_ty
    row_offsets = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row_offsets < rows
    x_rows_ptr = x_ptr + row_offsets[:, None] * stride_x_row
    residual_rows_ptr = residual_ptr
    residual_out_rows_ptr = residual_out_ptr
    if HAS_RESIDUAL:
        residual_rows_ptr = residual_ptr + row_offsets[:, None] * stride_residual_row
        residual_out_rows_ptr = residual_out_ptr + row_offsets[:, None] * cols
    out_rows_ptr = out_ptr + row_offsets[:, None] * cols

    if ROW_FITS_BLOCK:
        col_offsets = tl.arange(0, BLOCK_N)
        col_mask = col_offsets < cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_normalised_input(
            x_rows_ptr, residual_rows_ptr, residual_out_rows_ptr, col_offsets, mask,
            HAS_RESIDUAL, True, ROUND_BF16_IN_SOFTWARE, ACC_DTYPE,
        )
        mean = 0.0
        if IS_RMS_NORM:
            var = tl.sum(x * x, axis=1) / cols
        else:
            mean = tl.sum(x, axis=1) / cols
            centred = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(centred * centred, axis=1) / cols
        rstd = 1.0 / tl.sqrt(var + eps)
        _store_normalised(
            x, _centre(mean, IS_RMS_NORM), rstd[:, None], weight_ptr, bias_ptr, out_rows_ptr,
            col_offsets, col_mask, mask, HAS_WEIGHT, HAS_BIAS, ROUND_BF16_IN_SOFTWARE,
        )
    else:
        # Pass 1: statistics of the whole row, one column block at a time.
        mean = 0.0
        if IS_RMS_NORM:
            sum_sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            for block_start in range(0, cols, BLOCK_N):
                col_offsets, _, mask = _column_block(block_start, cols, row_mask, BLOCK_N)
                x = _load_normalised_input(
                    x_rows_ptr, residual_rows_ptr, residual_out_rows_ptr, col_offsets, mask,
                    HAS_RESIDUAL, True, ROUND_BF16_IN_SOFTWARE, ACC_DTYPE,
                )
                sum_sq += x * x
            var = tl.sum(sum_sq, axis=1) / cols
        else:
            # Chan et al.: merge (count, mean, sum of squared deviations) of each block into
            # the running ones; avoids the cancellation of E[x^2] - E[x]^2.
            count = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
            mean = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
            m2 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
            for block_start in range(0, cols, BLOCK_N):
                col_offsets, _, mask = _column_block(block_start, cols, row_mask, BLOCK_N)
                x = _load_normalised_input(
                    x_rows_ptr, residual_rows_ptr, residual_out_rows_ptr, col_offsets, mask,
                    HAS_RESIDUAL, True, ROUND_BF16_IN_SOFTWARE, ACC_DTYPE,
                )
                block_count = tl.minimum(cols - block_start, BLOCK_N).to(ACC_DTYPE)
                block_mean = tl.sum(x, axis=1) / block_count
                centred = tl.where(mask, x - block_mean[:, None], 0.0)
                block_m2 = tl.sum(centred * centred, axis=1)
                merged_count = count + block_count
                delta = block_mean - mean
                mean += delta * (block_count / merged_count)
                m2 += block_m2 + delta * delta * (count * block_count / merged_count)
                count = merged_count
            var = m2 / cols
        rstd = 1.0 / tl.sqrt(var + eps)
        # Pass 2: normalise. The sum x + residual is recomputed (same rounding, same bits)
        # rather than read back from residual_out, whose stores other threads may not see yet.
        for block_start in range(0, cols, BLOCK_N):
            col_offsets, col_mask, mask = _column_block(block_start, cols, row_mask, BLOCK_N)
            x = _load_normalised_input(
                x_rows_ptr, residual_rows_ptr, residual_out_rows_ptr, col_offsets, mask,
                HAS_RESIDUAL, False, ROUND_BF16_IN_SOFTWARE, ACC_DTYPE,
            )
            _store_normalised(
                x, _centre(mean, IS_RMS_NORM), rstd[:, None], weight_ptr, bias_ptr, out_rows_ptr,
                col_offsets, col_mask, mask, HAS_WEIGHT, HAS_BIAS, ROUND_BF16_IN_SOFTWARE,
            )

    if not IS_RMS_NORM:
        tl.store(mean_ptr + row_offsets, mean, mask=row_mask)
    tl.store(rstd_ptr + row_offsets, rstd, mask=row_mask)


@triton.jit
def _load_xhat_and_grad(
    x_rows_ptr,
    dy_rows_ptr,
    weight_ptr,
    col_offsets,
    col_mask,
    mask,
    mean,
    rstd,
    HAS_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """xhat, dy and g = dy * w for one (BLOCK_M, BLOCK_N) tile, in ACC_DTYPE, 0 where masked.
    mean and rstd are (BLOCK_M, 1); mean is 0 for rms norm."""
    x = tl.load(x_rows_ptr + col_offsets[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    dy = tl.load(dy_rows_ptr + col_offsets[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy
    if HAS_WEIGHT:
        # Reloaded for every tile (an L1 hit) rather than kept in registers across rows: the
        # registers are what the backward runs short of.
        g = dy * tl.load(weight_ptr + col_offsets, mask=col_mask, other=0.0)[None, :]
    return xhat, dy, g


@triton.jit
def _store_grad_input(
    xhat,
    g,
    mean_g_xhat,
    mean_g,
    rstd,
    dresidual_out_rows_ptr,
    dx_rows_ptr,
    col_offsets,
    mask,
    HAS_DRESIDUAL: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out) for one tile."""
    dx = (g - (xhat * mean_g_xhat + mean_g)) * rstd
    if HAS_DRESIDUAL:
        dresidual_out = tl.load(dresidual_out_rows_ptr + col_offsets[None, :], mask=mask, other=0.0)
        dx += dresidual_out.to(dx.dtype)
    dx = round_to_dtype(dx, dx_rows_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE)
    tl.store(dx_rows_ptr + col_offsets[None, :], dx, mask=mask)


@triton.jit
def norm_bwd_kernel(
    dy_ptr,  # (M, N), row stride stride_dy_row
    dresidual_out_ptr,  # (M, N), row stride stride_dresidual_out_row; None unless HAS_DRESIDUAL
    x_ptr,  # (M, N), row stride stride_x_row: what the forward normalised
    weight_ptr,  # (N,) accumulation dtype; None unless HAS_WEIGHT
    mean_ptr,  # (M,) accumulation dtype; None for rms norm
    rstd_ptr,  # (M,) accumulation dtype (float32; float64 for float64 input)
    dx_ptr,  # (M, N) contiguous, x's dtype
    dweight_partial_ptr,  # (programs, N) accumulation dtype; None unless COMPUTE_DWEIGHT
    dbias_partial_ptr,  # (programs, N) accumulation dtype; None unless COMPUTE_DBIAS
    stride_dy_row,
    stride_dresidual_out_row,
    stride_x_row,
    rows,  # M
    cols,  # N
    rows_per_program,
    IS_RMS_NORM: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DWEIGHT: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per step through this program's chunk (1 unless ROW_FITS_BLOCK)
    BLOCK_N: tl.constexpr,  # power of two; >= N when ROW_FITS_BLOCK
    ROW_FITS_BLOCK: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """Writes dx for rows [pid * rows_per_program, (pid + 1) * rows_per_program) and row pid
    of the dw / db partial sums. With ROW_FITS_BLOCK the partial sums live in registers;
    otherwise they accumulate in place in that (zero-initialised) partial-buffer row."""
    ACC_DTYPE: tl.constexpr = rstd_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    dweight_partial_row_ptr = dweight_partial_ptr
    dbias_partial_row_ptr = dbias_partial_ptr
    if COMPUTE_DWEIGHT:
        dweight_partial_row_ptr = dweight_partial_ptr + pid * cols
    if COMPUTE_DBIAS:
        dbias_partial_row_ptr = dbias_partial_ptr + pid * cols

    if ROW_FITS_BLOCK:
        col_offsets = tl.arange(0, BLOCK_N)
        col_mask = col_offsets < cols
        dweight_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        dbias_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for row_block_start in range(row_start, row_end, BLOCK_M):
        row_offsets = row_block_start + tl.arange(0, BLOCK_M)
        row_mask = row_offsets < row_end
        rstd = tl.load(rstd_ptr + row_offsets, mask=row_mask, other=0.0)[:, None]
        if IS_RMS_NORM:
            mean = 0.0
        else:
            mean = tl.load(mean_ptr + row_offsets, mask=row_mask, other=0.0)[:, None]
        x_rows_ptr = x_ptr + row_offsets[:, None] * stride_x_row
        dy_rows_ptr = dy_ptr + row_offsets[:, None] * stride_dy_row
        dx_rows_ptr = dx_ptr + row_offsets[:, None] * cols
        dresidual_out_rows_ptr = dresidual_out_ptr
        if HAS_DRESIDUAL:
            dresidual_out_rows_ptr = (
                dresidual_out_ptr + row_offsets[:, None] * stride_dresidual_out_row
            )

        if ROW_FITS_BLOCK:
            mask = row_mask[:, None] & col_mask[None, :]
            xhat, dy, g = _load_xhat_and_grad(
                x_rows_ptr, dy_rows_ptr, weight_ptr, col_offsets, col_mask, mask, mean, rstd,
                HAS_WEIGHT, ACC_DTYPE,
            )
            # Accumulate before the row reductions: their barriers stop the compiler from
            # moving this up itself, and dy would otherwise stay live across them (spills).
            if COMPUTE_DWEIGHT:
                dweight_acc += dy * xhat
            if COMPUTE_DBIAS:
                dbias_acc += dy
            mean_g_xhat = tl.sum(g * xhat, axis=1)[:, None] / cols
            mean_g = 0.0
            if not IS_RMS_NORM:
                mean_g = tl.sum(g, axis=1)[:, None] / cols
            _store_grad_input(
                xhat, g, mean_g_xhat, mean_g, rstd, dresidual_out_rows_ptr, dx_rows_ptr,
                col_offsets, mask, HAS_DRESIDUAL, ROUND_BF16_IN_SOFTWARE,
            )
        else:
            # Pass 1: the two row reductions dx needs.
            sum_g_xhat = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            sum_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            for block_start in range(0, cols, BLOCK_N):
                block_col_offsets, block_col_mask, mask = _column_block(
                    block_start, cols, row_mask, BLOCK_N)
                xhat, dy, g = _load_xhat_and_grad(
                    x_rows_ptr, dy_rows_ptr, weight_ptr, block_col_offsets, block_col_mask, mask,
                    mean, rstd, HAS_WEIGHT, ACC_DTYPE,
                )
                sum_g_xhat += g * xhat
                sum_g += g
            mean_g_xhat = tl.sum(sum_g_xhat, axis=1)[:, None] / cols
            mean_g = 0.0
            if not IS_RMS_NORM:
                mean_g = tl.sum(sum_g, axis=1)[:, None] / cols
            # Pass 2: dx, and these rows' share of dw / db.
            for block_start in range(0, cols, BLOCK_N):
                block_col_offsets, block_col_mask, mask = _column_block(
                    block_start, cols, row_mask, BLOCK_N)
                xhat, dy, g = _load_xhat_and_grad(
                    x_rows_ptr, dy_rows_ptr, weight_ptr, block_col_offsets, block_col_mask, mask,
                    mean, rstd, HAS_WEIGHT, ACC_DTYPE,
                )
                _store_grad_input(
                    xhat, g, mean_g_xhat, mean_g, rstd, dresidual_out_rows_ptr, dx_rows_ptr,
                    block_col_offsets, mask, HAS_DRESIDUAL, ROUND_BF16_IN_SOFTWARE,
                )
                # The load and the store use one pointer tensor, hence one layout: each
                # thread re-reads only what it stored itself.
                if COMPUTE_DWEIGHT:
                    dweight_ptrs = dweight_partial_row_ptr + block_col_offsets
                    partial = tl.load(dweight_ptrs, mask=block_col_mask, other=0.0)
                    tl.store(dweight_ptrs, partial + tl.sum(dy * xhat, axis=0), mask=block_col_mask)
                if COMPUTE_DBIAS:
                    dbias_ptrs = dbias_partial_row_ptr + block_col_offsets
                    partial = tl.load(dbias_ptrs, mask=block_col_mask, other=0.0)
                    tl.store(dbias_ptrs, partial + tl.sum(dy, axis=0), mask=block_col_mask)

    if ROW_FITS_BLOCK:
        if COMPUTE_DWEIGHT:
            dweight_partial = tl.sum(dweight_acc, axis=0)
            tl.store(dweight_partial_row_ptr + col_offsets, dweight_partial, mask=col_mask)
        if COMPUTE_DBIAS:
            tl.store(dbias_partial_row_ptr + col_offsets, tl.sum(dbias_acc, axis=0), mask=col_mask)


# ---- launchers: schema-shaped, no argument checks (fastllm/ops validates) ----------------


def _as_rows(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(M, N) view of `t` with unit column stride; copies only when it has to."""
    rows_view = t.reshape(rows, cols)
    if cols > 1 and rows_view.stride(1) != 1:
        rows_view = rows_view.contiguous()
    return rows_view


def _acc_dtype(input: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _as_acc_param(
    param: Optional[torch.Tensor], cols: int, acc: torch.dtype
) -> Optional[torch.Tensor]:
    if param is None:
        return None
    return param.reshape(cols).to(acc).contiguous()


class _Tiles(NamedTuple):
    """How a program walks its rows; the forward and backward kernels take the same."""

    block_m: int
    block_n: int
    row_fits_block: bool
    num_warps: int

    def launch_options(self) -> dict:
        """The tile constexprs and num_warps, as keyword arguments of a kernel launch."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n,
                    ROW_FITS_BLOCK=self.row_fits_block, num_warps=self.num_warps)


def _tile_config(rows: int, cols: int, acc_bytes: int = 4) -> _Tiles:
    """The tiles for `rows` rows of `cols` elements, accumulated in `acc_bytes`-byte floats.
    A float64 row holds two registers per value, so float64 rows stay in registers only up
    to MAX_BLOCK_N / 2 columns: at 8192, ptxas (sm_80 / sm_90) spilled up to 5 KiB in the
    backward; the looping kernels have no spills."""
    in_interpreter = interpreted()
    row_fits_block = cols <= (MAX_BLOCK_N if acc_bytes <= 4 else MAX_BLOCK_N // 2)
    if row_fits_block:
        block_n = triton.next_power_of_2(cols)
        if in_interpreter:
            # Not beyond the rows there are; on a GPU that would only add specialisations.
            tile_rows = max(_INTERPRETER_ROW_TILE_ELEMENTS // block_n, 1)
            block_m = min(tile_rows, triton.next_power_of_2(max(rows, 1)))
        else:
            block_m = max(ROW_TILE_ELEMENTS // block_n, 1)
    else:
        block_n = _INTERPRETER_LOOP_BLOCK_N if in_interpreter else LOOP_BLOCK_N
        block_m = 1
    # 8 elements per thread up to 8 warps, as in FlashAttention's Triton layer norm. ptxas
    # reports no spills for any variant at N in {3, 1000, 4096, 8192, 9000, 65536} on sm_80
    # and sm_90; with 16 warps it traded a few spilled bytes for occupancy.
    num_warps = min(max(block_m * block_n // 256, 1), 8)
    return _Tiles(block_m, block_n, row_fits_block, num_warps)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_program_count(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return _INTERPRETER_BWD_PROGRAMS


def _norm_fwd(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    is_rms_norm: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """out, residual_out (None without residual), mean (None for rms norm), rstd."""
    cols = math.prod(normalized_shape)
    stats_shape = input.shape[: input.dim() - len(normalized_shape)]
    rows = math.prod(stats_shape)
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    acc = _acc_dtype(input)
    rstd = torch.empty(stats_shape, dtype=acc, device=input.device)
    mean = None
    if not is_rms_norm:
        mean = torch.empty(stats_shape, dtype=acc, device=input.device)
    residual_out = None
    if residual is not None:
        residual_out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if rows == 0 or cols == 0:
        # Nothing to normalise. Rows of no element get torch's statistics: mean 0 and
        # rstd = 1 / sqrt(0 / 0 + eps) = NaN.
        if mean is not None:
            mean.zero_()
        rstd.fill_(float("nan"))
        return out, residual_out, mean, rstd
    x = _as_rows(input, rows, cols)
    residual_rows = None if residual is None else _as_rows(residual, rows, cols)
    tiles = _tile_config(rows, cols, acc.itemsize)
    torch.library.wrap_triton(norm_fwd_kernel)[(triton.cdiv(rows, tiles.block_m),)](
        x,
        residual_rows,
        _as_acc_param(weight, cols, acc),
        _as_acc_param(bias, cols, acc),
        out,
        residual_out,
        mean,
        rstd,
        x.stride(0),
        residual_rows.stride(0) if residual_rows is not None else 0,
        rows,
        cols,
        eps,
        IS_RMS_NORM=is_rms_norm,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ROUND_BF16_IN_SOFTWARE=interpreted(),
        **tiles.launch_options(),
    )
    return out, residual_out, mean, rstd


def _norm_bwd(
    grad_out: torch.Tensor,
    grad_residual_out: Optional[torch.Tensor],
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    weight_grad: bool,
    bias_grad: bool,
    is_rms_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_input, grad_weight, grad_bias (the latter two empty when not requested)."""
    cols = math.prod(normalized_shape)
    rows = math.prod(input.shape[: input.dim() - len(normalized_shape)])
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    # Parameter gradients come back in the parameter's dtype (the input's for a bias
    # without weight), shaped like the parameter; an empty tensor when not requested.
    bias_dtype = weight.dtype if weight is not None else input.dtype
    if rows == 0 or cols == 0:  # nothing to differentiate: zero parameter gradients
        no_grad = torch.empty(0, dtype=input.dtype, device=input.device)
        grad_weight = grad_bias = no_grad
        if weight_grad:
            grad_weight = torch.zeros(normalized_shape, dtype=weight.dtype, device=input.device)
        if bias_grad:
            grad_bias = torch.zeros(normalized_shape, dtype=bias_dtype, device=input.device)
        return grad_input, grad_weight, grad_bias
    acc = _acc_dtype(input)
    x = _as_rows(input, rows, cols)
    dy = _as_rows(grad_out, rows, cols)
    dresidual_out = None if grad_residual_out is None else _as_rows(grad_residual_out, rows, cols)

    programs = min(rows, _bwd_program_count(input.device))
    rows_per_program = triton.cdiv(rows, max(programs, 1))
    tiles = _tile_config(rows_per_program, cols, acc.itemsize)
    # Rows that do not fit one block accumulate into the partial buffer in place.
    new_partial = torch.empty if tiles.row_fits_block else torch.zeros
    partial_shape = (programs, cols)
    dweight_partial = dbias_partial = None
    if weight_grad:
        dweight_partial = new_partial(partial_shape, dtype=acc, device=input.device)
    if bias_grad:
        dbias_partial = new_partial(partial_shape, dtype=acc, device=input.device)
    torch.library.wrap_triton(norm_bwd_kernel)[(programs,)](
        dy,
        dresidual_out,
        x,
        _as_acc_param(weight, cols, acc),
        None if is_rms_norm else mean.contiguous(),
        rstd.contiguous(),
        grad_input,
        dweight_partial,
        dbias_partial,
        dy.stride(0),
        dresidual_out.stride(0) if dresidual_out is not None else 0,
        x.stride(0),
        rows,
        cols,
        rows_per_program,
        IS_RMS_NORM=is_rms_norm,
        HAS_DRESIDUAL=dresidual_out is not None,
        HAS_WEIGHT=weight is not None,
        COMPUTE_DWEIGHT=weight_grad,
        COMPUTE_DBIAS=bias_grad,
        ROUND_BF16_IN_SOFTWARE=interpreted(),
        **tiles.launch_options(),
    )
    if weight_grad:
        grad_weight = dweight_partial.sum(0).to(weight.dtype).reshape(normalized_shape)
    else:
        grad_weight = torch.empty(0, dtype=input.dtype, device=input.device)
    if bias_grad:
        grad_bias = dbias_partial.sum(0).to(bias_dtype).reshape(normalized_shape)
    else:
        grad_bias = torch.empty(0, dtype=input.dtype, device=input.device)
    return grad_input, grad_weight, grad_bias


def layer_norm_fwd(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastllm::layer_norm_fwd -> (out, mean, rstd); mean/rstd over the leading dims, in the
    accumulation dtype (float32; float64 for float64 input)."""
    out, _, mean, rstd = _norm_fwd(
        input, None, normalized_shape, weight, bias, eps, is_rms_norm=False
    )
    return out, mean, rstd


def add_layer_norm_fwd(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastllm::add_layer_norm_fwd -> (out, residual_out, mean, rstd);
    residual_out = input + residual, rounded to the input dtype."""
    out, residual_out, mean, rstd = _norm_fwd(
        input, residual, normalized_shape, weight, bias, eps, is_rms_norm=False
    )
    return out, residual_out, mean, rstd


def layer_norm_bwd(
    grad_out: torch.Tensor,
    grad_residual_out: Optional[torch.Tensor],
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastllm::layer_norm_bwd -> (grad_input, grad_weight, grad_bias). `input` is what the
    forward normalised (residual_out for add_layer_norm)."""
    return _norm_bwd(
        grad_out, grad_residual_out, input, normalized_shape, weight, mean, rstd,
        weight_grad, bias_grad, is_rms_norm=False,
    )


def rms_norm_fwd(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastllm::rms_norm_fwd -> (out, rstd); rstd over the leading dims, in the accumulation
    dtype (float32; float64 for float64 input)."""
    out, _, _, rstd = _norm_fwd(input, None, normalized_shape, weight, None, eps, is_rms_norm=True)
    return out, rstd


def add_rms_norm_fwd(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastllm::add_rms_norm_fwd -> (out, residual_out, rstd);
    residual_out = input + residual, rounded to the input dtype."""
    out, residual_out, _, rstd = _norm_fwd(
        input, residual, normalized_shape, weight, None, eps, is_rms_norm=True
    )
    return out, residual_out, rstd


def rms_norm_bwd(
    grad_out: torch.Tensor,
    grad_residual_out: Optional[torch.Tensor],
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastllm::rms_norm_bwd -> (grad_input, grad_weight). `input` is what the forward
    normalised (residual_out for add_rms_norm)."""
    grad_input, grad_weight, _ = _norm_bwd(
        grad_out, grad_residual_out, input, normalized_shape, weight, None, rstd,
        weight_grad, False, is_rms_norm=True,
    )
    return grad_input, grad_weight
