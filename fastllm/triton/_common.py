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
