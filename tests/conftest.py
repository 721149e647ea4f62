"""Fixtures shared by every op family's tests.

`backend` is the one way a test picks a backend. A test module names the family it tests,
``FAMILY = "norm"`` (a key of ``fastllm.ops.FAMILIES``), and a kernel-numerics
module lists the backends its tests run on, ``BACKENDS = ("native", "triton", "cuda_emu")``:
every test of that module that takes `backend` runs once per entry. A test may instead
parametrise it itself, ``@pytest.mark.parametrize("backend", [...], indirect=True)``; a test
that takes it in a module without BACKENDS runs on "native", the library's default.
"""

import os

# FASTLLM_TEST_DEVICE=cuda runs the tests on a GPU (benchmarks/gpu/run.sh does): torch's
# default device becomes cuda, so the tensors a test makes are CUDA tensors; "native" then
# runs the CUDA kernels, "triton" the compiled Triton kernels, and "cuda_emu" (the CUDA
# kernels under the SIMT emulation) becomes the real thing: its tests run the CUDA kernels
# on the GPU, under "native". Unset or "cpu": the CPU, as in CI.
TEST_DEVICE = os.environ.get("FASTLLM_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"FASTLLM_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
ON_GPU = TEST_DEVICE == "cuda"

if not ON_GPU:
    # Triton kernels execute on CPU tensors through the interpreter; triton reads this when
    # kernels are decorated, so it must be set before fastllm (and triton) are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # ... and every interpreted load and store is checked against the launch's tensors
    # (fastllm/triton/_bounds.py, docs/debugging.md; ~1 % of the interpreter's time).
    os.environ.setdefault("FASTLLM_CHECK_BOUNDS", "1")
    # ... and its tl.dot rounds alike in any operand shape, as a GPU's MMA does (numpy's BLAS
    # need not: fastllm/triton/_interpret_dot.py), which the backward kernels' recomputed
    # scores rely on.
    os.environ.setdefault("FASTLLM_INTERPRET_EXACT_DOT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastllm  # noqa: E402
from fastllm.ops import FAMILIES  # noqa: E402


def pytest_configure(config):
    if not ON_GPU:
        return
    if not torch.cuda.is_available():
        if config.option.collectonly:
            return  # a dry run (benchmarks/gpu/run.sh --dry-run): what would run, on the CPU
        raise pytest.UsageError(
            "FASTLLM_TEST_DEVICE=cuda: torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
        )
    torch.set_default_device("cuda")


def pytest_collection_modifyitems(config, items):
    if not ON_GPU:
        return
    skip = pytest.mark.skip(reason="a test of the SIMT emulation's own controls: nothing to "
                            "run on a GPU")
    for item in items:
        if item.get_closest_marker("emulation_only"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def emulated_cuda():
    """Builds (once, cached) and loads the host build of the CUDA kernels, which registers
    them as each family's `IMPLS.emulated` (backend "cuda_emu")."""
    if ON_GPU:
        pytest.skip("on a GPU the CUDA kernels run for real (backend 'native'), not emulated")
    from fastllm import _emu

    return _emu.load()


def _parametrizes_backend(metafunc) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs["argnames"]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "backend" in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames or _parametrizes_backend(metafunc):
        return
    backends = getattr(metafunc.module, "BACKENDS", None)
    if backends:
        if ON_GPU and "native" in backends:
            # "native" on CUDA tensors is the CUDA kernels that "cuda_emu" emulates
            backends = tuple(b for b in backends if b != "cuda_emu")
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request):
    """Runs the test under ``fastllm.use_backend(name)``, or skips it, naming the reason, when
    the module's family has no implementation for that backend here."""
    name = getattr(request, "param", "native")
    family = request.module.FAMILY
    if ON_GPU and name == "cuda_emu":
        name = "native"  # the CUDA kernels themselves, on the GPU's tensors
    if name == "cuda_emu":
        request.getfixturevalue("emulated_cuda")
    reason = FAMILIES[family].unavailable(name, torch.device(TEST_DEVICE))
    if reason is not None:
        pytest.skip(f"{family}: {reason}")
    if name == "cuda_emu":
        from fastllm import _emu

        # Random thread interleavings between barriers (seeded): a missing barrier or a
        # wrong shuffle partner changes the answer instead of passing by luck.
        with _emu.schedule_seed(1), fastllm.use_backend(name):
            yield name
        return
    with fastllm.use_backend(name):
        yield name


# Attention's kernels called directly (no op layer, no autograd): the tests that hold one
# implementation to the contract beyond what the backend tests reach.


@pytest.fixture
def emulated_attention_kernels(request):
    """(attention_fwd, attention_bwd): the CUDA kernels under the SIMT emulation (on a GPU:
    the CUDA kernels themselves, the same implementation registered under ``fastllm``)."""
    if ON_GPU:
        return torch.ops.fastllm.attention_fwd, torch.ops.fastllm.attention_bwd
    request.getfixturevalue("emulated_cuda")
    return torch.ops.fastllm_emu.attention_fwd, torch.ops.fastllm_emu.attention_bwd


@pytest.fixture
def triton_attention_kernels():
    """(attention_fwd, attention_bwd): the Triton launchers of fastllm/triton/attention.py."""
    kernels = pytest.importorskip("fastllm.triton.attention")
    return kernels.attention_fwd, kernels.attention_bwd
