"""Smoke test of ``fastllm bench``: a --quick run of two small norm cases through the real
command line, checking that every contender is timed, every number is finite and positive,
and the rows carry the THP setting the process was started with (what the re-run of the
page-fault-bound cases relies on)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastllm.bench.common import CONTENDERS, EAGER, THP_ENV, resolve_backend

REPO = Path(__file__).resolve().parents[1]
CASES = ("layer_norm-fwd-*-float32", "add_rms_norm-fwd+bwd-*-bfloat16")


def _fastllm_bench(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastllm.cli", "bench", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )


def test_bench_norm_quick(tmp_path):
    out = tmp_path / "bench.json"
    only = [arg for pattern in CASES for arg in ("--only", pattern)]
    run = _fastllm_bench(
        "norm", "--quick", "--device", "cpu", "--json", str(out), *only,
        env={**os.environ, THP_ENV: "1"},
    )
    assert run.returncode == 0, run.stderr

    report = json.loads(out.read_text())
    results = report["results"]
    assert len(results) == len(CASES) * len(CONTENDERS)
    assert {r["contender"] for r in results} == set(CONTENDERS)
    for r in results:
        assert r["error"] is None
        for key in ("time_s", "gbs", "copy_gbs", "speedup_vs_eager", "speedup_vs_compile"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], r["contender"], key, r[key])
        if r["contender"] == EAGER:
            assert r["speedup_vs_eager"] == 1.0
    assert report["machine"]["copy_gbs"] > 0 and report["machine"]["first_touch_gbs"] > 0
    assert report["machine"]["thp"] == "on" and {r["thp"] for r in results} == {"on"}

    backend, _ = resolve_backend(None, torch.device("cpu"))
    for label in (f"fastllm[{backend}]", "torch eager", "torch.compile", "copy bandwidth ceiling"):
        assert label in run.stdout


ATTENTION_CASES = ("attention-full-fwd-*-float32", "attention-causal-fwd+bwd-*-bfloat16")


def test_bench_attention_quick(tmp_path):
    out = tmp_path / "bench.json"
    only = [arg for pattern in ATTENTION_CASES for arg in ("--only", pattern)]
    run = _fastllm_bench("attention", "--quick", "--device", "cpu", "--json", str(out), *only,
                         env=dict(os.environ))
    assert run.returncode == 0, run.stderr

    results = json.loads(out.read_text())["results"]
    assert len(results) == len(ATTENTION_CASES) * len(CONTENDERS)
    assert {r["contender"] for r in results} == set(CONTENDERS)
    for r in results:
        assert r["error"] is None
        for key in ("time_s", "gflops", "sgemm_gflops", "speedup_vs_eager", "speedup_vs_compile"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], r["contender"], key, r[key])
        assert r["peak_memory_bytes"] is not None
    assert "GFLOP/s" in run.stdout and "float32 GEMM ceiling" in run.stdout
