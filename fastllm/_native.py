"""Loads the compiled extension fastllm._C (which registers the C++ CPU and CUDA
implementations of the ``torch.ops.fastllm`` schemas)."""

from __future__ import annotations

import importlib

_error: Exception | None = None
try:
    importlib.import_module("fastllm._C")
except ImportError as exc:  # not built: the reference and Triton backends still work
    _error = exc

AVAILABLE = _error is None


def unavailable_reason() -> str | None:
    """Why fastllm's compiled kernels cannot run (None when fastllm._C loaded)."""
    if _error is None:
        return None
    return (
        "fastllm's compiled kernels (fastllm._C) are not available: "
        f"{_error}. Build them with `pip install --no-build-isolation -e .`, or select "
        "another backend with FASTLLM_BACKEND=reference|triton."
    )


def require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
