"""pytest-benchmark suite: ``pytest benchmarks/`` (not part of ``pytest tests``).

Every family has one file, ``test_bench_<family>.py``, declaring ``FAMILY = "<family>"``
and holding one test: this file parametrizes it with the cases of ``fastllm.bench.<family>``,
the ones ``fastllm bench`` prints, and each case's contenders (fastllm, torch eager,
torch.compile and any peer the case names), and times one of them per test
(``time_case``), grouped by case. The device is CUDA if present, else the CPU; the fastllm
backend is chosen as ``fastllm bench`` chooses it: ``FASTLLM_BACKEND`` or native, falling
back to the reference while fastllm._C is not built. Each test records the case's bytes
(and FLOPs for compute-bound families), GB/s (GFLOP/s), THP setting and peak memory in
``extra_info``.

Select with -k on the ids, ``<case id>-<contender>`` (case ids as ``fastllm bench --only``
takes them, e.g. norm's ``<op>-<mode>-<N>x<D>-<dtype>``), e.g.
``pytest benchmarks/ -k "4096x1024 and float32 and fwd+bwd"``; ``--bench-quick`` runs the
small cases of ``fastllm bench --quick``, ``--bench-shapes llama3-8b`` (or ``all``) the
LLaMA-3-8B cases of ``fastllm bench --shapes``. On a GPU the contenders are those
``fastllm bench`` times there (SDPA forced onto flash / cuDNN, Liger-Kernel when installed);
fastllm's rows record the path that ran. On the CPU, run a second time with
``THP_MEM_ALLOC_ENABLE=1`` for the page-fault-bound cases with huge pages (``fastllm bench``
does both by itself).
"""

from typing import Callable

import pytest
import torch

from fastllm.bench import load_family
from fastllm.bench.common import (
    COMPILE, DEFAULT_SHAPES, EAGER, FASTLLM, SHAPE_SETS, Case, fastllm_label, fastllm_path,
    peak_memory_bytes, resolve_backend, thp_setting,
)

CONTENDER_IDS = {FASTLLM: "fastllm", EAGER: "eager", COMPILE: "compile"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-quick", action="store_true",
        help="time the cases of `fastllm bench --quick` (one small shape per family)",
    )
    parser.addoption(
        "--bench-shapes", choices=SHAPE_SETS, default=DEFAULT_SHAPES,
        help="the op families' shapes, as `fastllm bench --shapes` (default: each family's "
        "own; llama3-8b: LLaMA-3-8B's; all: both)",
    )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``case`` and ``contender`` runs once per case of its module's
    ``FAMILY`` and contender of that case."""
    if not {"case", "contender"} <= set(metafunc.fixturenames):
        return
    quick = metafunc.config.getoption("bench_quick")
    shapes = metafunc.config.getoption("bench_shapes")
    device = _device()
    pairs = [
        (case, contender)
        for case in load_family(metafunc.module.FAMILY).cases(quick, shapes, device)
        for contender in case.contenders_on(device)
    ]
    ids = [f"{case.id}-{CONTENDER_IDS.get(c, c.replace(' ', '_'))}" for case, c in pairs]
    metafunc.parametrize(("case", "contender"), pairs, ids=ids)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return _device()


@pytest.fixture(scope="session")
def bench_backend(bench_device: torch.device) -> str:
    backend, _note = resolve_backend(None, bench_device)
    return backend


@pytest.fixture
def time_case(request, benchmark, bench_device, bench_backend) -> Callable[[Case, str], None]:
    """``time_case(case, contender)`` times one contender on one case with pytest-benchmark."""
    family = request.module.FAMILY
    kernel_family = load_family(family).KERNEL_FAMILY

    def time_one(case: Case, contender: str) -> None:
        call = case.build(contender, case.make_inputs(bench_device), bench_backend, bench_device)
        if bench_device.type == "cuda":
            run_once = call

            def call():
                run_once()
                torch.cuda.synchronize(bench_device)

        flops = case.flops() if hasattr(case, "flops") else None
        benchmark.group = f"{family} {case.id}"
        if contender == FASTLLM:  # what ran, as fastllm bench's path column
            benchmark.extra_info["path"] = fastllm_path(kernel_family, case.dtype, bench_device,
                                                        bench_backend)
        benchmark.extra_info.update(
            contender=fastllm_label(bench_backend) if contender == FASTLLM else contender,
            **({} if flops is None else {"flops": flops}),
            bytes_moved=case.bytes_moved(),
            thp=thp_setting(bench_device),
            peak_memory_bytes=peak_memory_bytes(call, bench_device),
        )
        benchmark(call)
        if benchmark.stats is not None:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            if flops is not None:
                benchmark.extra_info["gflops"] = flops / median / 1e9
            benchmark.extra_info["gbs"] = case.bytes_moved() / median / 1e9

    return time_one
