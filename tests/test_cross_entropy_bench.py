"""``fastllm bench cross_entropy``: the contenders of every case compute the same loss and
gradients, and a --quick run through the real command line times every contender."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastllm.bench import cross_entropy as bench
from fastllm.bench.common import COMPILE
from fastllm.ops import cross_entropy as ce_ops

REPO = Path(__file__).resolve().parents[1]

native = pytest.mark.skipif(ce_ops.IMPLS.native is None, reason="fastllm._C not built")


@native
@pytest.mark.parametrize(
    "case", [c for c in bench.cases(quick=True) if c.dtype == torch.float32], ids=lambda c: c.id
)
def test_contenders_agree(case):
    """float32 only: in bfloat16 torch's own CPU cross-entropy is off by several percent
    (tests/test_cross_entropy.py measures every backend against that error instead)."""
    inputs = case.make_inputs(torch.device("cpu"))
    results = {}
    for contender in case.contenders:
        if contender == COMPILE:
            continue  # compiles for seconds; the CLI smoke run below covers it
        fn = case.function(contender, "native")
        loss = fn(*inputs.args)
        grads = torch.autograd.grad(loss, inputs.differentiable) if case.backward else ()
        results[contender] = (loss.detach(), grads)
    (ref_loss, ref_grads), *others = results.values()
    for loss, grads in others:
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-3)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=2e-2, atol=2e-4)


@native
def test_bench_cross_entropy_quick(tmp_path):
    out = tmp_path / "bench.json"
    patterns = ("cross_entropy-fwd+bwd-*-bfloat16", "linear_cross_entropy-fwd+bwd-*")
    only = [arg for pattern in patterns for arg in ("--only", pattern)]
    run = subprocess.run(
        [sys.executable, "-m", "fastllm.cli", "bench", "cross_entropy", "--quick", "--device",
         "cpu", "--backend", "native", "--no-thp-rerun", "--json", str(out), *only],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    expected = [c for c in bench.cases(quick=True)
                if c.backward and (c.linear or c.dtype == torch.bfloat16)]
    assert {r["case"] for r in results} == {c.id for c in expected}
    for r in results:
        assert r["error"] is None, (r["case"], r["contender"], r["error"])
        assert math.isfinite(r["time_s"]) and r["time_s"] > 0
        assert r["peak_memory_bytes"] is not None
