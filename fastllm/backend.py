"""The one place that decides which implementation an op runs.

Backends:
  ``"native"``     hand-written kernels by device: C++ CPU kernels for CPU tensors, CUDA C++
                   kernels for CUDA tensors (the default);
  ``"triton"``     the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
  ``"reference"``  plain PyTorch, anywhere;
  ``"cuda_emu"``   test-only: the CUDA kernels' own source, compiled for the host and run on
                   CPU tensors through fastllm's SIMT emulation (see ``fastllm/_emu.py``).

Choose with ``FASTLLM_BACKEND=<name>`` in the environment, or for a block of code with
``with fastllm.use_backend(name): ...`` (which wins over the environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Generic, Iterator, Optional, TypeVar

if TYPE_CHECKING:
    import torch

BACKENDS = ("native", "triton", "reference", "cuda_emu")
DEFAULT_BACKEND = "native"

# Stack of active `use_backend` blocks (innermost last). Process-wide, like torch's own
# `sdpa_kernel` context manager.
_override: list[str] = []


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend`` block, else ``FASTLLM_BACKEND``,
    else ``"native"``."""
    if _override:
        return _override[-1]
    env = os.environ.get("FASTLLM_BACKEND")
    if env:
        return _validate(env, "FASTLLM_BACKEND")
    return DEFAULT_BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block with backend ``name`` (see the module docstring)."""
    _override.append(_validate(name, "backend"))
    try:
        yield
    finally:
        _override.pop()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


OpsT = TypeVar("OpsT")


@dataclasses.dataclass
class Implementations(Generic[OpsT]):
    """The op sets of one op family, one per backend that has them (each family's
    fastllm/ops/<family>.py fills one in), and the choice among them."""

    family: str
    native: Optional[OpsT] = None      # torch.ops.fastllm.*: C++ CPU / CUDA kernels
    triton: Optional[OpsT] = None      # torch.ops.fastllm.*_triton
    emulated: Optional[OpsT] = None    # torch.ops.fastllm_emu.*, once fastllm._emu is loaded
    triton_unavailable: str = "backend 'triton' needs the triton package, which is not installed"

    def select(self, device: "torch.device", backend: Optional[str] = None) -> Optional[OpsT]:
        """The op set for tensors on ``device`` under ``backend`` (default: the one in
        force); None means the plain-PyTorch reference runs."""
        backend = get_backend() if backend is None else backend
        if backend == "reference":
            return None
        if backend == "cuda_emu":
            if self.emulated is None:
                raise RuntimeError(
                    f"backend 'cuda_emu' ({self.family}) needs the SIMT emulation extension: "
                    "call fastllm._emu.load() first (tests only)"
                )
            if device.type != "cpu":
                raise ValueError(f"backend 'cuda_emu' runs on CPU tensors, got {device}")
            return self.emulated
        if backend == "triton":
            if self.triton is None:
                raise RuntimeError(self.triton_unavailable)
            if device.type == "cpu" and not triton_interpret():
                raise RuntimeError(
                    "backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1; got a CPU "
                    "tensor without it (use a CUDA tensor or the 'native' backend)"
                )
            return self.triton
        # native
        if device.type not in ("cpu", "cuda"):
            return None  # no hand-written kernel for this device: the reference runs
        from fastllm import _native

        _native.require()
        return self.native
