"""``fastllm bench``: fastllm against torch eager and torch.compile, in the same run.

Each op family is a module listed in ``FAMILIES`` that provides
  ``FAMILY``         its name on the command line;
  ``PARAM_COLUMNS``  the case columns of its table (e.g. op, mode, shape, dtype);
  ``KERNEL_FAMILY``  the fastllm op family its cases run (``fastllm/ops/<KERNEL_FAMILY>.py``),
                     whose path (``fastllm.backend.cpu_kernel_path`` on the CPU) fastllm's
                     rows show;
  ``cases(quick, shapes, device)``
                     its cases (``shapes``: ``fastllm.bench.common.SHAPE_SETS``, the
                     default set or LLaMA-3-8B's or both; ``device``: where they will run),
                     instances of a ``fastllm.bench.common.Case`` subclass that names its
                     contenders' functions, its inputs and its byte (or FLOP) count, and
                     its peers on a device (``peers(device)``: e.g. Liger-Kernel on CUDA):
                     its module holds only its cases and its peers.
The timing rule, ceilings, contender plumbing, table and JSON are shared
(``fastllm.bench.common``), the command line is ``fastllm.bench.run`` (its ``--plot``
figure: ``fastllm.bench.plot``), and the pytest-benchmark suite in ``benchmarks/`` builds
its tests from the same ``cases()``.
Adding a family is one module, one line here and a three-line
``benchmarks/test_bench_<family>.py``.

A family listed in ``STANDALONE`` (``models``: whole training steps and generate calls of
fastllm's models against Hugging Face's; ``patch``: Hugging Face models with and without
``fastllm.patch``) does not fit that shape and brings its own
runner, ``run(args)``, which ``fastllm bench <family>`` dispatches to; it runs only when
named, alone, never as part of a bare ``fastllm bench``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module; imported only when benchmarked (torch.compile and friends are slow to load)
FAMILIES: dict[str, str] = {
    "norm": "fastllm.bench.norm",
    "cross_entropy": "fastllm.bench.cross_entropy",
    "attention": "fastllm.bench.attention",
    "mlp": "fastllm.bench.gated_mlp",
    "rotary": "fastllm.bench.rotary",
    "models": "fastllm.bench.models",
    "patch": "fastllm.bench.patch",
}

# families with their own runner (``run(args) -> exit status``), run only when named alone
STANDALONE: frozenset[str] = frozenset({"models", "patch"})


def load_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"benchmark family must be one of {', '.join(FAMILIES)}; got {name!r}")
    return importlib.import_module(FAMILIES[name])
