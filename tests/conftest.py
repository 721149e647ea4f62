import os

# Triton kernels execute on CPU tensors through the interpreter; triton reads this when
# kernels are decorated, so it must be set before fastllm (and triton) are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastllm  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def emulated_cuda():
    """Builds (once, cached) and loads the host build of the CUDA kernels."""
    from fastllm import _emu

    return _emu.load()
