"""SwiGLU / GeGLU in Triton: forward and backward kernels and their launchers.

Math (csrc/gated_mlp/gated_mlp.h), per element, in float32, with g = gate, u = up:
    forward   out = act(g) * u
    backward  grad_gate = dy * u * act'(g),  grad_up = dy * act(g)   (act recomputed from g)
    silu       act = g * s,  s = sigmoid(z),  z = g
    gelu_tanh  act = g * s,  the same s with z = 2 k0 (g + k1 g^3)
               ((1 + tanh(u)) / 2 = sigmoid(2 u): no 1 + tanh cancellation for g < 0)
    both       act' = s + act (1 - s) z'(gc), z' = 1 or 2 k0 (1 + 3 k1 gc^2),
               gc = clamp(g, -10, 10); s and 1 - s from t = exp(-|z|), r = 1 / (1 + t):
               s = r, 1 - s = t r for z >= 0, the other way round for z < 0
    gelu       act = g * Phi(g), Phi(g) = (1 + erf(g / sqrt 2)) / 2,
               act' = Phi(g) + g exp(-g^2 / 2) / sqrt(2 pi)
These launchers mirror the schemas of csrc/schemas.h (fastllm::gated_mlp_fwd / _bwd).

One kernel per direction; ACTIVATION is a constexpr (0 silu, 1 gelu, 2 gelu_tanh, the
values of gated_mlp.h's Activation). A program owns a (BLOCK_M, BLOCK_N) tile of the
(rows, cols) problem: several rows of short problems, a slice of a long row otherwise, so
every width runs full tiles. Operands are (rows, cols) views with unit column stride and
their own row strides: the halves of one (rows, 2 cols) tensor (the one-tensor form) are
two such views of the same storage, read in place.
ROUND_BF16_IN_SOFTWARE: set only under TRITON_INTERPRET=1; see fastllm/triton/_common.py.

Shapes: rows (M) = product of the leading dims, cols (N) = the width of one half.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastllm.triton._common import interpreted, round_to_dtype

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}

# Elements per program: a few per thread on a GPU (8 warps); the interpreter pays per
# executed op, not per element, and gets large tiles (fewer programs) to keep tests fast.
TILE_ELEMENTS = 4096
MAX_BLOCK_N = 1024
_INTERPRETER_TILE_ELEMENTS = 1 << 16
_INTERPRETER_MAX_BLOCK_N = 1 << 14

# The math's constants (tl.constexpr: a jitted function may read no other globals on a GPU).
GELU_TANH_K0 = tl.constexpr(math.sqrt(2.0 / math.pi))
GELU_TANH_K1 = tl.constexpr(0.044715)
GELU_TANH_CLAMP = tl.constexpr(10.0)
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))


@triton.jit
def _gate_arg(g, ACTIVATION: tl.constexpr):
    """z of the sigmoid-gated activations: g (silu), 2 k0 (g + k1 g^3) (gelu_tanh)."""
    if ACTIVATION == 2:
        # Tensors first: under the interpreter a constexpr on the left wraps the product.
        return (g + (g * g * g) * GELU_TANH_K1) * (2.0 * GELU_TANH_K0)
    else:
        return g


@triton.jit
def _normal_cdf(g):
    return 0.5 * (1.0 + tl.math.erf(g * INV_SQRT_2))


@triton.jit
def _sigmoid(z):
    """(s, 1 - s) for s = sigmoid(z), neither cancelling, no exp overflowing."""
    t = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + t)
    negative = z < 0.0
    return tl.where(negative, t * r, r), tl.where(negative, r, t * r)


@triton.jit
def _act(g, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return g * _normal_cdf(g)
    else:
        s, _ = _sigmoid(_gate_arg(g, ACTIVATION))
        return g * s


@triton.jit
def _act_and_grad(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g))."""
    if ACTIVATION == 1:
        cdf = _normal_cdf(g)
        pdf = tl.exp(-0.5 * g * g) * INV_SQRT_2PI
        return g * cdf, cdf + g * pdf
    else:
        s, one_minus_s = _sigmoid(_gate_arg(g, ACTIVATION))
        act = g * s
        if ACTIVATION == 2:
            gc = tl.minimum(tl.maximum(g, -GELU_TANH_CLAMP), GELU_TANH_CLAMP)
            dz = (gc * gc * (3.0 * GELU_TANH_K1) + 1.0) * (2.0 * GELU_TANH_K0)
            grad = s + act * one_minus_s * dz
        else:
            grad = s + act * one_minus_s
        return act, grad


@triton.jit
def _tile(rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row and column offsets and their (BLOCK_M, BLOCK_N) mask."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    return row[:, None], col[None, :], mask


@triton.jit
def gated_mlp_fwd_kernel(
    gate_ptr,  # (M, N), row stride stride_gate_row
    up_ptr,  # (M, N), row stride stride_up_row
    out_ptr,  # (M, N) contiguous
    stride_gate_row,
    stride_up_row,
    rows,  # M
    cols,  # N
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """out = act(gate) * up on one tile."""
    row, col, mask = _tile(rows, cols, BLOCK_M, BLOCK_N)
    g = tl.load(gate_ptr + row * stride_gate_row + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up_row + col, mask=mask, other=0.0).to(tl.float32)
    out = _act(g, ACTIVATION) * u
    out = round_to_dtype(out, out_ptr.dtype.element_ty, ROUND_BF16_IN_SOFTWARE)
    tl.store(out_ptr + row * cols + col, out, mask=mask)


@triton.jit
def gated_mlp_bwd_kernel(
    grad_out_ptr,  # (M, N), row stride stride_grad_out_row
    gate_ptr,  # (M, N), row stride stride_gate_row
    up_ptr,  # (M, N), row stride stride_up_row
    grad_gate_ptr,  # (M, N), row stride stride_grad_row
    grad_up_ptr,  # (M, N), row stride stride_grad_row
    stride_grad_out_row,
    stride_gate_row,
    stride_up_row,
    stride_grad_row,
    rows,  # M
    cols,  # N
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROUND_BF16_IN_SOFTWARE: tl.constexpr,
):
    """grad_gate = dy * up * act'(gate), grad_up = dy * act(gate) on one tile."""
    row, col, mask = _tile(rows, cols, BLOCK_M, BLOCK_N)
    dy = tl.load(grad_out_ptr + row * stride_grad_out_row + col, mask=mask, other=0.0)
    g = tl.load(gate_ptr + row * stride_gate_row + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up_row + col, mask=mask, other=0.0).to(tl.float32)
    dy = dy.to(tl.float32)
    act, grad = _act_and_grad(g, ACTIVATION)
    dtype = grad_gate_ptr.dtype.element_ty
    grad_gate = round_to_dtype(dy * u * grad, dtype, ROUND_BF16_IN_SOFTWARE)
    grad_up = round_to_dtype(dy * act, dtype, ROUND_BF16_IN_SOFTWARE)
    tl.store(grad_gate_ptr + row * stride_grad_row + col, grad_gate, mask=mask)
    tl.store(grad_up_ptr + row * stride_grad_row + col, grad_up, mask=mask)


# ------------------------------------------------------------------------ launchers


def _as_rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` as (rows, cols) with unit column stride, copied only when no such view exists."""
    r = t.reshape(-1, cols)
    return r if cols <= 1 or r.stride(1) == 1 else r.contiguous()


def _halves(gate: torch.Tensor, up: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) views of the gate and up operands (the halves of gate if up is None)."""
    if up is None:
        cols = gate.shape[-1] // 2
        both = _as_rows(gate, 2 * cols)
        return both[:, :cols], both[:, cols:]
    cols = gate.shape[-1]
    return _as_rows(gate, cols), _as_rows(up, cols)


def _grid_and_blocks(rows: int, cols: int) -> tuple[tuple[int, int], dict]:
    tile, max_n = (
        (_INTERPRETER_TILE_ELEMENTS, _INTERPRETER_MAX_BLOCK_N) if interpreted()
        else (TILE_ELEMENTS, MAX_BLOCK_N)
    )
    block_n = min(triton.next_power_of_2(cols), max_n)
    block_m = min(max(1, tile // block_n), triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    options = dict(BLOCK_M=block_m, BLOCK_N=block_n, ROUND_BF16_IN_SOFTWARE=interpreted())
    if not interpreted():
        options["num_warps"] = 8 if block_m * block_n >= 4096 else 4
    return grid, options


def gated_mlp_fwd(gate: torch.Tensor, up: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """fastllm::gated_mlp_fwd -> out = act(gate) * up, (..., N) contiguous."""
    out_shape = list(gate.shape)
    if up is None:
        out_shape[-1] //= 2
    out = torch.empty(out_shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g, u = _halves(gate, up)
    rows, cols = g.shape
    grid, options = _grid_and_blocks(rows, cols)
    torch.library.wrap_triton(gated_mlp_fwd_kernel)[grid](
        g, u, out, g.stride(0), u.stride(0), rows, cols,
        ACTIVATION=ACTIVATION_CODES[activation], **options,
    )
    return out


def gated_mlp_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """fastllm::gated_mlp_bwd -> (grad_gate, grad_up): gate's and up's shapes, contiguous;
    with up None, grad_gate holds both halves' gradients and grad_up is empty."""
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_up = (
        gate.new_empty(0) if up is None else torch.empty(up.shape, dtype=up.dtype, device=up.device)
    )
    if grad_out.numel() == 0:
        return grad_gate, grad_up
    g, u = _halves(gate, up)
    rows, cols = g.shape
    dy = _as_rows(grad_out, cols)
    dg, du = _halves(grad_gate, None if up is None else grad_up)
    grid, options = _grid_and_blocks(rows, cols)
    torch.library.wrap_triton(gated_mlp_bwd_kernel)[grid](
        dy, g, u, dg, du, dy.stride(0), g.stride(0), u.stride(0), dg.stride(0), rows, cols,
        ACTIVATION=ACTIVATION_CODES[activation], **options,
    )
    return grad_gate, grad_up
