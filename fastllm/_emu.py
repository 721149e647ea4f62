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

Sanitized build: ``load(sanitize=True)`` (or ``FASTLLM_EMU_SANITIZE=1``) builds and loads
``fastllm_emu_ext_sanitized`` instead, compiled with AddressSanitizer and UndefinedBehavior-
Sanitizer (``SANITIZE_CFLAGS``) in a build directory of its own, so that out-of-bounds,
misaligned and otherwise undefined host accesses of the emulated kernels are reported. The
process must have ASan's runtime loaded first: run it with ``sanitizer_environment()``
(``LD_PRELOAD`` of gcc's libasan, ``ASAN_OPTIONS``, ``UBSAN_OPTIONS``). One process holds
one of the two builds (they register the same ``torch.ops.fastllm_emu``).

Environment: ``FASTLLM_EMU_BUILD_DIR`` (build cache), ``MAX_JOBS`` (parallel compiles),
``FASTLLM_EMU_SANITIZE`` (the sanitized build), ``FASTLLM_SIMT_SEED`` /
``FASTLLM_SIMT_THREADS`` / ``FASTLLM_SIMT_STACK_KIB`` / ``FASTLLM_SIMT_TIMEOUT_S`` (read by
the runtime, see docs/simt_emulation.md).
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

# The sanitized build (load(sanitize=True)): AddressSanitizer finds host accesses outside
# any allocation (a kernel indexing past a tensor: torch's CPU tensors are malloc'ed, so they
# get ASan's redzones) and UndefinedBehaviorSanitizer misaligned accesses (a vector load from
# an address its type cannot have on a GPU either), signed overflow in index arithmetic,
# out-of-range shifts... -O1 -g1 (line tables only): reports with file:line, and half the
# compile time of -g (the build is still ~5x the plain one's CPU time).
SANITIZED_EXTENSION_NAME = "fastllm_emu_ext_sanitized"
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
SANITIZE_CFLAGS = [f for f in CFLAGS if f != "-O2"] + ["-O1", "-g1"] + SANITIZE_FLAGS
SANITIZE_LDFLAGS = LDFLAGS + SANITIZE_FLAGS
SANITIZE_ENV = "FASTLLM_EMU_SANITIZE"

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_module_sanitized: Optional[bool] = None  # which build _module is


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


def build_directory(sanitize: bool = False) -> Path:
    """Per checkout and per torch/Python version, so checkouts do not rebuild each other; the
    sanitized build beside the plain one (``<dir>-sanitized``)."""
    plain = _plain_build_directory()
    return plain.with_name(plain.name + "-sanitized") if sanitize else plain


def _plain_build_directory() -> Path:
    explicit = os.environ.get("FASTLLM_EMU_BUILD_DIR")
    if explicit:
        return Path(explicit)
    import torch

    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    checkout = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_{checkout}"
    return base / "fastllm_emu" / tag


def _sanitize_requested(sanitize: Optional[bool]) -> bool:
    if sanitize is not None:
        return sanitize
    value = os.environ.get(SANITIZE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{SANITIZE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def _asan_runtime_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("libasan" in line for line in maps)
    except OSError:
        return False


def compiler_runtime(library: str) -> str:
    """Path of one of the host compiler's runtime libraries (``libasan.so``, ``libubsan.so``),
    from ``$CXX -print-file-name`` (gcc's libraries are versioned per compiler)."""
    import shutil
    import subprocess

    compiler = os.environ.get("CXX") or shutil.which("c++") or "g++"
    path = subprocess.run([compiler, f"-print-file-name={library}"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"fastllm._emu: {compiler} has no {library} (its sanitizer runtime)")
    return os.path.realpath(path)


def sanitizer_environment(base: Optional[dict] = None) -> dict:
    """The environment in which a child process can load the sanitized build (a copy of
    ``base``, default os.environ): ASan's runtime preloaded (it must come before every other
    library), leak detection off (Python and torch keep their allocations until exit), every
    report fatal with a stack trace, and fiber stacks large enough for ASan's redzones."""
    env = dict(os.environ if base is None else base)
    preload = [compiler_runtime("libasan.so"), compiler_runtime("libubsan.so")]
    others = [p for p in env.get("LD_PRELOAD", "").split() if p not in preload]
    env["LD_PRELOAD"] = " ".join(preload + others)
    env["ASAN_OPTIONS"] = ":".join([
        "detect_leaks=0",
        # The emulation catches SIGSEGV/SIGBUS itself (wild accesses, guard pages) and hands
        # what is not a kernel's fault back to ASan.
        "allow_user_segv_handler=1",
        "abort_on_error=0",
        "print_stacktrace=1",
    ])
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    env[SANITIZE_ENV] = "1"
    # Fiber stacks with room for ASan's redzones (every family's kernels pass with 64 KiB at
    # -O1; 256 KiB leaves a margin). Not more: ASan clears a fiber's whole stack shadow at
    # each switch into it (its swapcontext interceptor), 1024 KiB made the tests 3x slower.
    env.setdefault("FASTLLM_SIMT_STACK_KIB", "256")
    return env


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


def load(verbose: bool = False, sanitize: Optional[bool] = None) -> ModuleType:
    """Builds (incrementally, with ninja) and imports fastllm_emu_ext; registers the
    emulated ops with fastllm's op layer (backend "cuda_emu"). Idempotent.

    sanitize: the ASan + UBSan build instead (None: ``FASTLLM_EMU_SANITIZE=1``); the process
    must run with ``sanitizer_environment()``."""
    global _module, _module_sanitized
    sanitize = _sanitize_requested(sanitize)
    if sanitize and not _asan_runtime_loaded():
        # Without it, importing the instrumented library would abort the process.
        raise RuntimeError(
            "fastllm._emu.load(sanitize=True): AddressSanitizer's runtime is not loaded; "
            "run the process with fastllm._emu.sanitizer_environment() (LD_PRELOAD="
            f"{compiler_runtime('libasan.so')} and ASAN_OPTIONS=detect_leaks=0 at least)"
        )
    with _lock:
        if _module is not None:
            if _module_sanitized != sanitize:
                raise RuntimeError(
                    f"fastllm._emu: the {'sanitized' if _module_sanitized else 'plain'} build is "
                    f"already loaded; a process holds one build (both register fastllm_emu)"
                )
            return _module
        from torch.utils import cpp_extension

        build_dir = build_directory(sanitize)
        build_dir.mkdir(parents=True, exist_ok=True)
        include_dirs = [str(ROOT / "csrc"), str(cuda_include_dir())]
        if TEST_KERNEL_DIR.is_dir():
            include_dirs.append(str(TEST_KERNEL_DIR))
        module = cpp_extension.load(
            name=SANITIZED_EXTENSION_NAME if sanitize else EXTENSION_NAME,
            sources=_compiled_sources(build_dir),
            extra_cflags=SANITIZE_CFLAGS if sanitize else CFLAGS,
            extra_ldflags=SANITIZE_LDFLAGS if sanitize else LDFLAGS,
            extra_include_paths=include_dirs,
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=verbose,
        )
        from fastllm.ops import FAMILIES

        for family in FAMILIES.values():
            family.register_emulated("fastllm_emu")
        _module, _module_sanitized = module, sanitize
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
