"""Helpers shared by fastllm's Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through the interpreter)."""
    return triton.knobs.runtime.interpret


@triton.jit
def round_to_dtype(x, dtype: tl.constexpr, ROUND_BF16_IN_SOFTWARE: tl.constexpr):
    """Rounds float32 `x` to `dtype`, to nearest with ties to even (what torch does)."""
    if ROUND_BF16_IN_SOFTWARE and dtype == tl.bfloat16:
        # Works around the Triton interpreter (TRITON_INTERPRET=1), whose float32 -> bfloat16
        # cast truncates (triton/runtime/interpreter.py, _convert_float with no rounding mode).
        # Same bit trick as c10::BFloat16's round_to_nearest_even, NaN kept as a quiet NaN.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def tanh(y):
    """tanh in float32 from exp (Triton has no tl.tanh, and libdevice.tanh returns None
    under the interpreter, TRITON_INTERPRET=1). (1 - e) / (1 + e) with e = exp(-2|y|) loses
    relative accuracy as |y| -> 0, so |y| < 0.25 uses the odd Taylor series to y^9, whose
    truncation error there is below 1e-8 relative."""
    abs_y = tl.abs(y)
    e = tl.exp(-2.0 * abs_y)
    tanh_abs = (1.0 - e) / (1.0 + e)
    y2 = y * y
    series = y * (
        1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
            -0.05396825396825397 + y2 * 0.021869488536155203)))
    )
    return tl.where(abs_y < 0.25, series, tl.where(y < 0.0, -tanh_abs, tanh_abs))
