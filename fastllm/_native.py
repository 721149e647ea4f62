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


def error() -> str:
    """Why fastllm._C did not load ("" when it did)."""
    return "" if _error is None else str(_error)


def require() -> None:
    if _error is not None:
        raise RuntimeError(
            "fastllm's compiled kernels (fastllm._C) are not available: "
            f"{_error}. Build them with `pip install --no-build-isolation -e .`, or select "
            "another backend with FASTLLM_BACKEND=reference|triton."
        )
