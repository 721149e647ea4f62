"""The backend switch: which implementation fastllm's ops run.

Backends:
  ``"native"``     hand-written kernels by device: C++ CPU kernels for CPU tensors, CUDA C++
                   kernels for CUDA tensors (the default);
  ``"triton"``     the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
  ``"reference"``  plain PyTorch, anywhere;
  ``"cuda_emu"``   test-only: the CUDA kernels' own source, compiled for the host and run on
                   CPU tensors through fastllm's SIMT emulation (see ``fastllm/_emu.py``).

Choose with ``FASTLLM_BACKEND=<name>`` in the environment, or for a block of code with
``with fastllm.use_backend(name): ...`` (which wins over the environment). The choice for a
given tensor (its device, its dtype) is made in one place, ``OpFamily.select`` in
fastllm/ops/_family.py.

Under ``"native"`` on the CPU, each kernel family then picks an instruction-set path once
per process (the best this CPU has, capped by
``FASTLLM_CPU_ISA=scalar|avx2|avx512|avx512bf16|amx``); ``cpu_kernel_path(family, dtype)`` says
which. ``cpu_fresh_pages()`` says whether those kernels advise huge pages on their large fresh
outputs (``FASTLLM_CPU_HUGE_PAGES=0|1|auto``), ``cpu_output_stores()`` when they write large
outputs with non-temporal stores (``FASTLLM_CPU_STREAM_STORES=0|1|auto``).
``cpu_output_cache()`` reports the memory those kernels keep for their large outputs
(``FASTLLM_CPU_OUTPUT_CACHE_MB``), ``empty_cpu_output_cache()`` gives it back.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

BACKENDS = ("native", "triton", "reference", "cuda_emu")
DEFAULT_BACKEND = "native"

# Stack of active `use_backend` blocks (innermost last). Process-wide, like torch's own
# `sdpa_kernel` context manager.
_override: list[str] = []


def _environ_get(name: str) -> str | None:
    """``os.environ.get(name)`` at a tenth of its cost on POSIX (~0.06 us instead of 0.6: a
    miss there raises and catches a KeyError inside the mapping), read from the same dict
    that ``os.environ``'s assignments and ``putenv`` calls update; every call of every op
    reads FASTLLM_BACKEND."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get(name)
    value = data.get(name.encode())
    return None if value is None else os.fsdecode(value)


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend`` block, else ``FASTLLM_BACKEND``,
    else ``"native"``."""
    if _override:
        return _override[-1]
    env = _environ_get("FASTLLM_BACKEND")
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


def cpu_kernel_path(family: str, dtype: "torch.dtype") -> str:
    """The instruction-set path that the native CPU kernels of ``family`` run for ``dtype``
    in this process: ``"amx-bf16"``, ``"amx-fp16"``, ``"amx-bf16x6"`` (attention's float32
    as bfloat16 parts on AMX-BF16 tiles), ``"avx512-bf16"`` (attention's bfloat16 products on
    AVX512-BF16's vdpbf16ps, on CPUs without AMX), ``"avx512"``, ``"avx2"`` or
    ``"scalar"``; ``"amx-bf16x6-emu"`` / ``"amx-fp16-emu"`` when the test-only
    ``FASTLLM_CPU_EMULATE_AMX=1`` runs those tile paths with emulated products on a CPU
    without the tiles.
    ``family``: ``"attention"``, ``"norm"`` (layer_norm, rms_norm and their add_ variants),
    ``"cross_entropy"`` (linear_cross_entropy too), ``"rotary"`` or ``"gated_mlp"``. Decided by this CPU and ``FASTLLM_CPU_ISA``, as the kernels decide it (the table is
    csrc/common/cpu_kernel_paths.cpp). Raises ValueError for an unknown family, TypeError for
    a dtype other than float32, bfloat16, float16 or float64, RuntimeError when fastllm._C
    is not built."""
    import torch

    from fastllm import _native

    _native.require()
    return torch.ops.fastllm.cpu_kernel_path(family, dtype)


def cpu_fresh_pages() -> str:
    """How the native CPU kernels treat the pages of their large fresh outputs (a
    cross-entropy gradient, a norm's output: 4 MiB and more) in this process:
    ``"huge pages advised (MADV_HUGEPAGE)"``, or ``"left to the system (...)"`` with the
    reason. ``FASTLLM_CPU_HUGE_PAGES=1`` advises them, ``=0`` never; unset, empty or ``auto``
    advises them unless the OS reports free memory to a hypervisor (virtio-balloon free page
    reporting), which discards it, so that huge pages faulted in there, once the memory has
    been free for a second or more, fill 5-11x slower than 4 KiB pages (see
    csrc/common/cpu_memory.h). Decided once per process. Raises ValueError for
    another value of ``FASTLLM_CPU_HUGE_PAGES``, RuntimeError when fastllm._C is not built."""
    import torch

    from fastllm import _native

    _native.require()
    return torch.ops.fastllm.cpu_fresh_pages()


def cpu_output_stores() -> str:
    """How the native CPU kernels store their large outputs in this process. A plain store
    reads each output line from memory before writing it; a non-temporal store writes whole
    lines around the cache, a third less memory traffic for a norm's forward (see
    csrc/common/cpu_memory.h). ``FASTLLM_CPU_STREAM_STORES=1`` streams every output whose
    rows start on 64-byte boundaries, ``=0`` none; unset, empty or ``auto`` streams outputs
    of at least half the last-level cache (at most 16 MiB) whose pages are in memory already
    (a reused buffer; fresh pages fault in through the cache anyway). Streaming changes no
    value. Decided once per process; so far the norm
    kernels (forward outputs and the backward's input gradient) use it. Raises ValueError
    for another value of ``FASTLLM_CPU_STREAM_STORES``, RuntimeError when fastllm._C is not
    built."""
    import torch

    from fastllm import _native

    _native.require()
    return torch.ops.fastllm.cpu_output_stores()


def cpu_output_cache() -> dict:
    """The native CPU kernels' output cache in this process, as a dict of ints.

    glibc maps large allocations afresh and unmaps them when freed, so without it a large
    output (a cross-entropy gradient, a norm's or a gated MLP's output, a rotary output, an
    attention output or gradient: 4 MiB and more) is fresh memory on every training step,
    and the first store to each of its pages faults -- most of the time of a cross-entropy
    forward + backward at 4096 x 32000 (see csrc/common/cpu_output_cache.h). Like
    torch.cuda's caching allocator, the kernels keep the blocks of such outputs when they
    are freed and hand them to the next output of their size, its pages already in memory.

    Keys: ``limit_bytes`` (the most free memory kept: ``FASTLLM_CPU_OUTPUT_CACHE_MB`` MiB,
    default 2048; 0 turns the cache off), ``free_bytes`` / ``free_blocks`` (kept, unused: the
    memory held beyond the program's tensors), ``live_bytes`` / ``live_blocks`` (held by
    tensors now), ``hits`` (outputs that took a kept block) and ``misses`` (outputs that
    mapped a new one). Raises ValueError for a bad ``FASTLLM_CPU_OUTPUT_CACHE_MB``,
    RuntimeError when fastllm._C is not built."""
    import torch

    from fastllm import _native

    _native.require()
    keys = ("limit_bytes", "free_bytes", "free_blocks", "live_bytes", "live_blocks", "hits",
            "misses")
    return dict(zip(keys, torch.ops.fastllm.cpu_output_cache()))


def empty_cpu_output_cache() -> int:
    """Gives the free blocks of the CPU output cache (``cpu_output_cache()``) back to the
    system, as ``torch.cuda.empty_cache()`` does on the GPU; returns their bytes. Outputs
    still held by tensors are not affected (their blocks are kept again when freed)."""
    import torch

    from fastllm import _native

    _native.require()
    return int(torch.ops.fastllm.empty_cpu_output_cache())
