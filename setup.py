"""Builds fastllm._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit
and a CUDA build of torch are present (FASTLLM_SKIP_CUDA_BUILD=1 skips them,
FASTLLM_CUDA_ARCHS picks the architectures, default "80;90").

Sources and flags live in fastllm/_build.py, shared with the tests and CMakeLists.txt.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    spec = importlib.util.spec_from_file_location("fastllm_build", ROOT / "fastllm" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the parent of
    the `nvcc` on PATH — the first that has the runtime headers. (torch's own guess takes the
    parent of PATH's nvcc, which is wrong when that nvcc is a wrapper script in /usr/local/bin.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return root
    return None


def _cuda_wheel_include_dirs():
    """Headers of the CUDA libraries torch's headers include (cusparse.h, cublas_v2.h ...)
    ship in torch's nvidia-* wheels rather than in a minimal toolkit."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            candidate = Path(entry) / sub
            if candidate.is_dir():
                dirs.append(str(candidate))
    return dirs


def _extensions():
    if os.environ.get("FASTLLM_SKIP_CUDA_BUILD", "0") != "1" and not os.environ.get("CUDA_HOME"):
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    cfg = _load_build_config()
    sources = cfg.CPU_KERNEL_SOURCES + cfg.GLUE_SOURCES
    include_dirs = [str(ROOT / "csrc")]
    cxx_flags = list(cfg.CXX_FLAGS)
    define_macros = []

    skip_cuda = os.environ.get("FASTLLM_SKIP_CUDA_BUILD", "0") == "1"
    with_cuda = (
        not skip_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )
    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "fastllm._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        ]

    # We pass our own -gencode flags; keep torch from adding its default arch list.
    archs = cfg.cuda_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(
        f"{int(a.removesuffix('+PTX')) // 10}.{int(a.removesuffix('+PTX')) % 10}" for a in archs
    )
    define_macros.append(("FASTLLM_WITH_CUDA", None))
    cxx_flags.append("-DFASTLLM_WITH_CUDA")
    # Searched after the toolkit's own headers: they only fill in what it lacks.
    for d in _cuda_wheel_include_dirs():
        cxx_flags += ["-idirafter", d]
    return [
        cpp_extension.CUDAExtension(
            "fastllm._C",
            sources + cfg.CUDA_KERNEL_SOURCES,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": cfg.NVCC_FLAGS + cfg.gencode_flags(archs),
            },
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    # ninja builds the sources in parallel; both cores of these machines are used.
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
