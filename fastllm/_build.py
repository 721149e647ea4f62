"""Single source of truth for how fastllm's C++/CUDA sources are built.

Imported by ``setup.py`` (the package build), by the tests (the ptxas spill check and
the host build of the CUDA sources for the SIMT emulation) and mirrored by
``CMakeLists.txt`` through ``python -m fastllm._build --print-sources``. Keep it free of
torch imports so it can be loaded before torch is importable.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# Torch-free kernel sources: plain C++ (CPU kernels) and CUDA C++ (GPU kernels).
CPU_KERNEL_SOURCES = [
    "csrc/norm/norm_cpu.cpp",
    "csrc/cross_entropy/cross_entropy_cpu.cpp",
    "csrc/attention/attention_cpu.cpp",
]
CUDA_KERNEL_SOURCES = ["csrc/norm/norm.cu", "csrc/cross_entropy/cross_entropy.cu"]
# Torch glue: schema registration and per-device implementations.
GLUE_SOURCES = [
    "csrc/registration.cpp",
    "csrc/norm/norm_ops.cpp",
    "csrc/cross_entropy/cross_entropy_ops.cpp",
]

DEFAULT_CUDA_ARCHS = "80;90"

# torch 2.14's headers need C++20; the torch-free kernel sources are C++17 as well.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
# AVX2/FMA kernels are compiled per function with target attributes and chosen at run
# time (see csrc/common/cpu_features.h), so the baseline flags stay portable.
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    # Every shipped kernel must have zero register spills: make ptxas fail on any.
    "-Xptxas=-v,-warn-spills,-warn-lmem-usage,--warning-as-error",
]


def cuda_archs() -> list[str]:
    """Architectures from FASTLLM_CUDA_ARCHS ("80;90" style, "+PTX" allowed on the last)."""
    raw = os.environ.get("FASTLLM_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    for arch in archs:
        base = arch.removesuffix("+PTX")
        if not base.isdigit() or int(base) < 70:
            raise ValueError(
                f"FASTLLM_CUDA_ARCHS must list compute capabilities like '80;90', got {raw!r}"
            )
    return archs


def gencode_flags(archs: list[str] | None = None) -> list[str]:
    flags = []
    archs = cuda_archs() if archs is None else archs
    for arch in archs:
        base = arch.removesuffix("+PTX")
        flags.append(f"-gencode=arch=compute_{base},code=sm_{base}")
        if arch.endswith("+PTX") or arch == archs[-1]:
            # PTX of the newest arch lets newer GPUs JIT the kernels.
            flags.append(f"-gencode=arch=compute_{base},code=compute_{base}")
    return flags


if __name__ == "__main__":
    import sys

    if "--print-sources" in sys.argv:
        print(";".join(CPU_KERNEL_SOURCES))
        print(";".join(CUDA_KERNEL_SOURCES))
