"""A shape-independent ``tl.dot`` for Triton's interpreter (``FASTLLM_INTERPRET_EXACT_DOT=1``).

Under ``TRITON_INTERPRET=1`` a ``tl.dot`` is ``numpy.matmul``, i.e. the BLAS numpy loaded,
whose float32 rounding of an element may depend on the operands' shapes and order: OpenBLAS's
Haswell sgemm (which it also runs on CPUs it does not know, such as AMD Zen 5, and which
machines set through ``OPENBLAS_CORETYPE`` on purpose) rounds ``q @ k.T`` over a 64-row
block, over 16-row pieces of it and as ``(k @ q.T).T`` differently. The attention backward
kernels recompute the forward's scores with dots of other shapes (``k @ q.T`` in dk / dv) and
rely on getting the same floats, as a GPU's MMA gives them (each element's sum runs over k in
the same steps whatever the tile); at scores of ~1e8, where one float32 ulp is 8, a
difference of a few ulps moves ``exp2(s - lse)`` by e^4.

With the switch on, float16 and float32 dots (float32 accumulator) are computed in float64 --
every float16 or float32 product is exact there, and the sum's own rounding (2^-53 relative)
almost never reaches the float32 result -- and rounded once to float32 before the accumulator
is added, as before: the same float32 result in any shape or order. Other dots (8-bit floats,
integers, bfloat16, which the interpreter does not compute right anyway) are left as they
are. The tests turn it on (tests/conftest.py); it is read when fastllm.triton is imported.

    FASTLLM_INTERPRET_EXACT_DOT=1 pytest tests
    from fastllm.triton import _interpret_dot
    _interpret_dot.enable()                     # or disable()
"""

from __future__ import annotations

import os

import numpy as np

ENV_VAR = "FASTLLM_INTERPRET_EXACT_DOT"
_original = None


def _builder_class():
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not callable(getattr(builder, "create_dot", None)):
        raise RuntimeError(
            f"{ENV_VAR}: this triton's interpreter has no InterpreterBuilder.create_dot to hook "
            "(another triton version)"
        )
    return builder, interpreter.TensorHandle


def enable() -> None:
    """Hooks InterpreterBuilder.create_dot (idempotent)."""
    global _original
    builder, tensor_handle = _builder_class()
    if _original is not None:
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        floats = (np.float16, np.float32)
        if (a.data.dtype in floats and b.data.dtype in floats
                and d.data.dtype == np.float32):
            product = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64))
            return tensor_handle(product.astype(np.float32) + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _original = original


def disable() -> None:
    global _original
    if _original is None:
        return
    builder, _ = _builder_class()
    builder.create_dot = _original
    _original = None


def enabled() -> bool:
    return _original is not None


def enable_from_environment() -> None:
    """Enables the hook if FASTLLM_INTERPRET_EXACT_DOT is 1 under TRITON_INTERPRET=1 (0 or
    unset: off; anything else is an error, so that a typo does not silently leave it off)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "0"):
        return
    if value != "1":
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {value!r}")
    if os.environ.get("TRITON_INTERPRET", "").strip() == "1":
        enable()
