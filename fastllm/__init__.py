"""fastllm: hand-written CUDA, Triton and C++ CPU kernels for the hottest non-GEMM parts
of a Transformer, as PyTorch custom ops and drop-in modules."""

from fastllm import functional, nn
from fastllm.backend import BACKENDS, get_backend, use_backend
from fastllm.patching import Patch, patch

__version__ = "0.1.0"

__all__ = ["functional", "nn", "patch", "Patch", "use_backend", "get_backend", "BACKENDS", "__version__"]
