"""Builds and loads ``fastllm_emu_ext``: fastllm's CUDA kernels compiled by the host C++
compiler against the SIMT emulation (``csrc/common/simt_emu.h``), so that they execute on
CPU tensors in the tests. Test-only; needs a source checkout, a C++ compiler, ninja and
CUDA's headers (``cuda_fp16.h``; no GPU, no CUDA runtime).

    from fastllm import _emu

    ext = _emu.load()                  # builds on first use (cached), then imports
    out, mean, rstd = torch.ops.fastllm_emu.layer_norm_fwd(x, [1000], w, b, 1e-5)
    with _emu.schedule_seed(3):        # random thread interleavings, reproducible
        ...

The extension holds:
  - the CUDA kernel sources (``_build.CUDA_KERNEL_SOURCES``), each compiled as C++ through
    a generated one-line wrapper ``.cpp`` (torch's builder sends ``.cu`` files to nvcc);
  - the CPU kernels and each family's glue, compiled with ``-DFASTLLM_SIMT_EMU``, which
    registers the CUDA implementations for CPU tensors in ``torch.ops.fastllm_emu``;
  - the emulation runtime and ``csrc/emu/registration_emu.cpp`` (schemas + Python controls);
  - the test kernels of ``tests/emu_kernels`` (``torch.ops.fastllm_emu_test``), when the
    checkout has them.

Environment: ``FASTLLM_EMU_BUILD_DIR`` (build cache), ``MAX_JOBS`` (parallel compiles),
``FASTLLM_SIMT_SEED`` / ``FASTLLM_SIMT_THREADS`` / ``FASTLLM_SIMT_STACK_KIB`` /
``FASTLLM_SIMT_TIMEOUT_S`` (read by the runtime, see docs/simt_emulation.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

from fastllm import _build

EXTENSION_NAME = "fastllm_emu_ext"
ROOT = _build.ROOT
# The emulation runtime and the extension's registration.
EMU_SOURCES = ["csrc/common/simt_emu.cpp", "csrc/emu/registration_emu.cpp"]
# Each family's torch glue; under FASTLLM_SIMT_EMU it registers the CUDA implementations.
GLUE_SOURCES = [s for s in _build.GLUE_SOURCES if s != "csrc/registration.cpp"]
TEST_KERNEL_DIR = ROOT / "tests" / "emu_kernels"

CFLAGS = [
    "-O2",
    "-fopenmp",
    "-DFASTLLM_SIMT_EMU",
    # CUDA code reinterprets pointers freely (vector loads); nvcc does not exploit aliasing.
    "-fno-strict-aliasing",
    # Large stack frames probe every page, so a fiber's stack overflow hits its guard page.
    "-fstack-clash-protection",
    # `#pragma unroll` is for nvcc.
    "-Wno-unknown-pragmas",
    # No symbol of the emulated kernels may interpose fastllm._C's (same names).
    "-fvisibility=hidden",
]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: Optional[ModuleType] = None


def cuda_include_dir() -> Path:
    """CUDA's headers (only the host-capable cuda_fp16.h / cuda_bf16.h and the types they
    include are used)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        candidates.insert(0, CUDA_HOME)
    except ImportError:
        pass
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    raise RuntimeError(
        "fastllm._emu needs CUDA's headers (cuda_fp16.h, cuda_bf16.h) to compile the CUDA "
        "kernels for the host; set CUDA_HOME to a CUDA toolkit (no GPU needed)"
    )


def kernel_sources() -> list[str]:
    """Repository-relative sources of the extension, from fastllm/_build.py's lists (plus
    the emulation's own files and the test kernels)."""
    sources = list(_build.CUDA_KERNEL_SOURCES) + list(_build.CPU_KERNEL_SOURCES)
    sources += GLUE_SOURCES + EMU_SOURCES
    if TEST_KERNEL_DIR.is_dir():
        for path in sorted(TEST_KERNEL_DIR.iterdir()):
            if path.suffix in (".cu", ".cpp"):
                sources.append(str(path.relative_to(ROOT)))
    return sources


def build_directory() -> Path:
    """Per checkout and per torch/Python version, so checkouts do not rebuild each other."""
    explicit = os.environ.get("FASTLLM_EMU_BUILD_DIR")
    if explicit:
        return Path(explicit)
    import torch

    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    checkout = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_{checkout}"
    return base / "fastllm_emu" / tag


def _write_if_changed(path: Path, text: str) -> None:
    # Rewriting an unchanged file would make ninja recompile it.
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _compiled_sources(build_dir: Path) -> list[str]:
    """Absolute paths for torch's builder; each .cu goes through a wrapper .cpp."""
    wrapper_dir = build_dir / "cu_as_cpp"
    wrapper_dir.mkdir(parents=True, exist_ok=True)
    compiled = []
    for rel in kernel_sources():
        path = ROOT / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"fastllm._emu: source {rel} (from fastllm/_build.py) is missing"
            )
        if path.suffix != ".cu":
            compiled.append(str(path))
            continue
        wrapper = wrapper_dir / (rel.replace("/", "__") + ".cpp")
        _write_if_changed(
            wrapper,
            f"// Generated by fastllm/_emu.py: {rel} compiled as C++ for the SIMT emulation.\n"
            f'#include "{path}"\n',
        )
        compiled.append(str(wrapper))
    return compiled


def load(verbose: bool = False) -> ModuleType:
    """Builds (incrementally, with ninja) and imports fastllm_emu_ext; registers the
    emulated ops with fastllm's op layer (backend "cuda_emu"). Idempotent."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension

        build_dir = build_directory()
        build_dir.mkdir(parents=True, exist_ok=True)
        include_dirs = [str(ROOT / "csrc"), str(cuda_include_dir())]
        if TEST_KERNEL_DIR.is_dir():
            include_dirs.append(str(TEST_KERNEL_DIR))
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=_compiled_sources(build_dir),
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            extra_include_paths=include_dirs,
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=verbose,
        )
        from fastllm.ops import FAMILIES

        for family in FAMILIES.values():
            family.register_emulated("fastllm_emu")
        _module = module
        return module


@contextlib.contextmanager
def schedule_seed(seed: Optional[int]) -> Iterator[None]:
    """Runs the block with the emulation's schedule seed set to ``seed`` (None: in order),
    restoring the previous setting afterwards."""
    ext = load()
    previous = ext.schedule_seed()
    ext.set_schedule_seed(seed)
    try:
        yield
    finally:
        ext.set_schedule_seed(previous)


@contextlib.contextmanager
def grid_cap(blocks: Optional[int]) -> Iterator[None]:
    """Runs the block with the emulated launchers' grids capped at ``blocks`` blocks (None:
    sized as on a GPU), restoring the previous cap afterwards. Under a small cap every block
    of a kernel that loops over rows (grid-stride or a chunk of rows per block) takes
    several rows in turn, as on a GPU with more rows than blocks; which launchers honour it:
    CudaLaunch::max_blocks in csrc/common/torch_glue.h."""
    ext = load()
    previous = ext.grid_cap()
    ext.set_grid_cap(blocks)
    try:
        yield
    finally:
        ext.set_grid_cap(previous)
