"""Triton kernels of fastllm and their launchers (no autograd here; see fastllm/ops).

FASTLLM_CHECK_BOUNDS=1 bounds-checks every memory access of the kernels when they run in
Triton's interpreter (TRITON_INTERPRET=1); see fastllm/triton/_bounds.py and
docs/debugging.md. FASTLLM_INTERPRET_EXACT_DOT=1 makes the interpreter's tl.dot round alike
in any operand shape (fastllm/triton/_interpret_dot.py; the tests turn both on).
"""

from fastllm.triton import _bounds, _interpret_dot

_bounds.enable_from_environment()
_interpret_dot.enable_from_environment()
