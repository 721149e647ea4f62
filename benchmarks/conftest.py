"""pytest-benchmark suite: ``pytest benchmarks/`` (not part of ``pytest tests``).

The cases are ``fastllm.bench``'s, the ones ``fastllm bench`` prints; these fixtures pick
the device (CUDA if present, else the CPU) and the fastllm backend the same way:
``FASTLLM_BACKEND`` or native, falling back to the reference while fastllm._C is not
built. Each test records the case's bytes, GB/s, THP setting and peak memory in
``extra_info``. Select with -k on the ids (<op>-<mode>-<N>x<D>-<dtype>-<contender>), e.g.
``pytest benchmarks/ -k "4096x1024 and float32 and fwd+bwd"``. On the CPU, run a second
time with ``THP_MEM_ALLOC_ENABLE=1`` for the page-fault-bound cases with huge pages
(``fastllm bench`` does both by itself).
"""

import pytest
import torch

from fastllm.bench.common import resolve_backend


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_backend(bench_device: torch.device) -> str:
    backend, _note = resolve_backend(None, bench_device)
    return backend
