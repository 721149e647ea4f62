"""Triton kernels of fastllm and their launchers (no autograd here; see fastllm/ops).

FASTLLM_CHECK_BOUNDS=1 bounds-checks every memory access of the kernels when they run in
Triton's interpreter (TRITON_INTERPRET=1); see fastllm/triton/_bounds.py and
docs/debugging.md.
"""

from fastllm.triton import _bounds

_bounds.enable_from_environment()
