"""The CPU kernels' non-temporal stores for large outputs already in memory
(csrc/common/cpu_memory.h): FASTLLM_CPU_STREAM_STORES=0 / 1 / auto as
``fastllm.backend.cpu_output_stores()`` reports it, a bad value refused by the kernels,
naming the variable and the value, and the streamed outputs bit for bit those of plain
stores on every instruction path: the norms' forward (plain and add_*: the scratch row of
s) and backward, every dtype, rows that allow streaming and rows that do not, one thread
and two. The auto decision (cache size from sysfs, residency samples) is tested in ctest's
cpu_common (tests/cpp/cpu_common_test.cpp). Each setting in a fresh child: the decision is
made once per process."""

from __future__ import annotations

import pytest
import torch

from fastllm import _native
from tests.helpers import native_cpu_report, outputs_per_cpu_isa
from tests.hostile import run_isolated

pytestmark = pytest.mark.skipif(not _native.AVAILABLE,
                                reason="fastllm's native extension is not built")


def output_stores_with(value: str) -> str:
    return native_cpu_report("cpu_output_stores", "FASTLLM_CPU_STREAM_STORES", value)


def test_switch_values():
    assert output_stores_with("1") == ("non-temporal stores for every output with 64-byte "
                                       "aligned rows (FASTLLM_CPU_STREAM_STORES=1)")
    assert output_stores_with("0") == "plain stores (FASTLLM_CPU_STREAM_STORES=0)"
    automatic = output_stores_with("auto")
    assert automatic.startswith("non-temporal stores for outputs from ")
    assert "in memory already" in automatic
    assert output_stores_with("") == automatic
    bad = output_stores_with("on")
    assert bad.startswith("ValueError: FASTLLM_CPU_STREAM_STORES must be") and "'on'" in bad


def test_bad_value_fails_the_kernels_with_its_name():
    out = run_isolated("""
        import torch
        from fastllm import functional as F
        x = torch.randn(4, 8, requires_grad=True)
        try:
            F.layer_norm(x, (8,))
        except RuntimeError as e:
            print("RuntimeError:", e)
    """, env={"FASTLLM_CPU_STREAM_STORES": "2"})
    assert "RuntimeError: layer_norm_fwd: FASTLLM_CPU_STREAM_STORES must be" in out and "'2'" in out


# Every norm op forward and backward over shapes whose rows start on 64-byte boundaries in
# every dtype (1024 columns), only in some (48: float32 / float64 yes, bfloat16 / float16
# no), in none (1000 columns: float64 only), a strided input, and a 512-row case that two
# threads split (the others are too small for a second thread).
NORMS = """
    import os, torch
    from fastllm import functional as F
    torch.set_num_threads(int(os.environ["THREADS"]))
    torch.manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for rows, cols, strided in ((37, 1024, False), (37, 48, False), (9, 1000, False),
                                    (21, 256, True), (512, 1024, False)):
            def leaf(*shape):
                return torch.randn(*shape, dtype=dtype).requires_grad_()
            x = leaf(rows, 2 * cols) if strided else leaf(rows, cols)
            xin = x[:, ::2] if strided else x
            r, w, b = leaf(rows, cols), leaf(cols), leaf(cols)
            cases = {
                "layer_norm": (lambda: F.layer_norm(xin, (cols,), w, b), (x, w, b)),
                "rms_norm": (lambda: F.rms_norm(xin, (cols,), w), (x, w)),
                "add_layer_norm": (lambda: F.add_layer_norm(xin, r, (cols,), w, b), (x, r, w, b)),
                "add_rms_norm": (lambda: F.add_rms_norm(xin, r, (cols,), w), (x, r, w)),
            }
            for name, (fn, leaves) in cases.items():
                out = fn()
                outs = out if isinstance(out, tuple) else (out,)
                grads = torch.autograd.grad(outs, leaves, [torch.randn_like(o) for o in outs])
                key = f"{name}-{dtype}-{rows}x{cols}{'-strided' if strided else ''}"
                results[key] = [o.detach() for o in outs] + list(grads)
    torch.save(results, os.environ["OUT"])
    print("ok")
"""


def test_streamed_outputs_equal_plain_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("THREADS", "2")  # the small cases run on one thread, 512 x 1024 on two
    runs = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("FASTLLM_CPU_STREAM_STORES", setting)
        (tmp_path / setting).mkdir()
        runs[setting] = outputs_per_cpu_isa(NORMS, tmp_path / setting)
    for isa, plain in runs["0"].items():
        streamed = runs["1"][isa]
        assert plain.keys() == streamed.keys()
        for key, tensors in plain.items():
            for i, (a, b) in enumerate(zip(tensors, streamed[key])):
                assert torch.equal(a, b), f"FASTLLM_CPU_ISA={isa!r} {key} output {i}"
