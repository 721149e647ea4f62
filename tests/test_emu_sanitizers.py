"""fastllm's CUDA kernels under the SIMT emulation, built with AddressSanitizer and
UndefinedBehaviorSanitizer (fastllm/_emu.py: load(sanitize=True), docs/debugging.md).

The emulation sees a wild access only when it faults; an index one past a tensor lands in
memory the process owns and goes unnoticed, as does a misaligned vector load (x86 does not
mind; a GPU does). Under ASan every torch CPU tensor gets redzones, and UBSan checks the
alignment of every typed access. Each case runs in a child process with ASan's runtime
preloaded (fastllm._emu.sanitizer_environment()):

- a representative set of the families' own emulated-CUDA tests (norm forward / backward,
  cross-entropy forward / backward, attention forward / backward with GQA, packed sequences,
  seqused_k, every feature, odd shapes) must pass with no sanitizer report;
- a deliberately out-of-bounds and a deliberately misaligned test kernel
  (tests/emu_kernels/sanitizer_faults.cu) must be reported, naming the kernel.

The sanitized build takes about 3x the plain build's CPU time and the sanitized kernels about
4x the plain run's time: the tests that need them are marked slow (docs/debugging.md has the
measured times).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from fastllm import _emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a sanitizer report looks like on stderr.
REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "SUMMARY: AddressSanitizer",
                  "SUMMARY: UndefinedBehaviorSanitizer")

# The families' emulated-CUDA tests run under the sanitizers: forward and backward of every
# family, the variants' code paths (odd and strided shapes, every norm kind, every
# cross-entropy feature, attention's head-dim instantiations, GQA / MQA, packed sequences,
# seqused_k, windows, softcap, ALiBi, dropout; rotary's layouts, positions, packed rows and
# in-place views), without repeating every dtype.
FAMILY_TESTS = [
    "tests/test_norm.py::test_norm_matches_reference",
    "tests/test_norm.py::test_norm_non_contiguous",
    "tests/test_norm.py::test_norm_multi_dim_normalized_shape",
    "tests/test_norm.py::test_norm_weight_grad_many_rows_reduced_correctly",
    "tests/test_cross_entropy.py::test_cross_entropy_matches_torch",
    "tests/test_cross_entropy.py::test_cross_entropy_vocab_sizes",
    "tests/test_cross_entropy.py::test_cross_entropy_non_contiguous_logits",
    "tests/test_cross_entropy.py::test_linear_cross_entropy_and_inplace_backward",
    "tests/test_attention.py::test_attention_matches_reference",
    "tests/test_attention.py::test_attention_varlen",
    "tests/test_attention.py::test_attention_varlen_features",
    "tests/test_attention.py::test_attention_seqused_k",
    "tests/test_attention.py::test_cuda_emu_matches_reference",
    "tests/test_attention.py::test_cuda_emu_head_dim_256",
    "tests/test_attention.py::test_cuda_emu_features",
    "tests/test_attention.py::test_cuda_emu_varlen",
    "tests/test_attention.py::test_cuda_emu_seqused_k",
    "tests/test_attention.py::test_cuda_emu_non_contiguous_inputs",
    "tests/test_attention_masks.py::test_key_padding_mask",
    "tests/test_attention_masks.py::test_attn_bias_broadcast_and_grad",
    "tests/test_attention_masks.py::test_minus_inf_bias_rows_give_zeros",
    "tests/test_attention_cuda_masks.py",
    "tests/test_gated_mlp.py::test_gated_mlp_matches_reference",
    "tests/test_rotary.py::test_rotary_matches_reference",
    "tests/test_rotary.py::test_rotary_partial",
    "tests/test_rotary.py::test_rotary_positions",
    "tests/test_rotary.py::test_rotary_packed",
    "tests/test_rotary.py::test_rotary_non_contiguous",
    "tests/test_rotary.py::test_rotary_inplace_under_autograd",
]
# Within those: the emulated backend only, one low-precision dtype where a test loops or
# parametrises over several.
FAMILY_SELECTION = "cuda_emu and not torch.float16"


def _sanitizer_environment() -> dict:
    try:
        _emu.cuda_include_dir()
        env = _emu.sanitizer_environment()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no sanitized emulation build here: {e}")
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_sanitized(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs ``python <args>`` under the sanitizers; fails the test on a hang."""
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=timeout, env=_sanitizer_environment(), cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sanitized child process ran for more than {timeout} s")


def run_code(code: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
    return run_sanitized(["-c", textwrap.dedent(code)], timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"exit status {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def sanitized_build():
    """Builds the sanitized extension once (cached, like the plain one) in a child process:
    the later children only load it."""
    start = time.monotonic()
    proc = run_code(
        """
        from fastllm import _emu
        _emu.load(sanitize=True)
        print("built")
        """,
        timeout=3600.0,
    )
    assert proc.returncode == 0 and "built" in proc.stdout, describe(proc)
    return time.monotonic() - start


@pytest.mark.slow
def test_family_kernels_run_clean_under_asan_and_ubsan(sanitized_build):
    proc = run_sanitized(
        # --capture=sys: a sanitizer writes its report to file descriptor 2 and ends the
        # process, so pytest's default capture of that descriptor would swallow the report.
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", "-x",
         "-k", FAMILY_SELECTION, *FAMILY_TESTS],
        timeout=3600.0,
    )
    assert proc.returncode == 0, describe(proc)
    assert " passed" in proc.stdout and " failed" not in proc.stdout, describe(proc)
    for marker in REPORT_MARKERS:
        assert marker not in proc.stderr, describe(proc)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, report",
    [
        (1, "ERROR: AddressSanitizer: heap-buffer-overflow"),
        (2, "misaligned address"),  # "runtime error: ... misaligned address ... float4"
    ],
    ids=["read_past_end", "misaligned_float4"],
)
def test_sanitizers_catch_a_faulty_kernel(sanitized_build, fault, report):
    proc = run_code(
        f"""
        import torch
        from fastllm import _emu
        _emu.load(sanitize=True)
        x = torch.arange(8, dtype=torch.float32)
        assert torch.equal(torch.ops.fastllm_emu_test.sanitizer_fault(x, 0), x)
        print("in-bounds kernel ran clean", flush=True)
        torch.ops.fastllm_emu_test.sanitizer_fault(x, {fault})
        print("faulty kernel was not reported", flush=True)
        """
    )
    assert "in-bounds kernel ran clean" in proc.stdout, describe(proc)
    assert "faulty kernel was not reported" not in proc.stdout, describe(proc)
    assert proc.returncode != 0, describe(proc)
    assert report in proc.stderr, describe(proc)
    assert "sanitizer_fault_kernel" in proc.stderr, describe(proc)  # the report's stack


def test_sanitized_build_needs_the_asan_runtime():
    """Loading the sanitized build without ASan's runtime preloaded would abort the process
    (ASan must come first); load() says what to do instead."""
    if _emu._asan_runtime_loaded():
        pytest.skip("this process runs under ASan")
    _sanitizer_environment()  # skips where there is no ASan runtime to name
    with pytest.raises(RuntimeError, match=r"sanitizer_environment\(\).*LD_PRELOAD=.*libasan"):
        _emu.load(sanitize=True)
