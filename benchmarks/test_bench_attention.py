"""The attention cases of ``fastllm bench attention`` (fastllm.bench.attention), one test per
case and contender, grouped by case. Each contender runs on contiguous tensors in its own
layout: fastllm (B, T, H, D), torch's SDPA (B, H, T, D)."""

import pytest
import torch

from fastllm.bench import attention
from fastllm.bench.common import (
    COMPILE, CONTENDERS, EAGER, FASTLLM, fastllm_label, peak_memory_bytes, thp_setting,
)

CONTENDER_IDS = {FASTLLM: "fastllm", EAGER: "eager", COMPILE: "compile"}
CASES = attention.cases()


@pytest.mark.parametrize("contender", CONTENDERS, ids=CONTENDER_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_attention(benchmark, case, contender, bench_device, bench_backend):
    call = case.build(contender, case.make_inputs(bench_device), bench_backend)
    if bench_device.type == "cuda":
        run_once = call

        def call():
            run_once()
            torch.cuda.synchronize(bench_device)

    benchmark.group = f"attention {case.id}"
    benchmark.extra_info.update(
        contender=fastllm_label(bench_backend) if contender == FASTLLM else contender,
        flops=case.flops(),
        bytes_moved=case.bytes_moved(),
        thp=thp_setting(bench_device),
        peak_memory_bytes=peak_memory_bytes(call, bench_device),
    )
    benchmark(call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["gflops"] = case.flops() / median / 1e9
        benchmark.extra_info["gbs"] = case.bytes_moved() / median / 1e9
