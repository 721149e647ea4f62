"""FASTLLM_INTERPRET_EXACT_DOT for Triton under the interpreter (fastllm/triton/_interpret_dot.py):
a tl.dot of float16 or float32 blocks rounds each element alike whatever the operands' shapes
and order -- q k^T over a whole block, over smaller tiles of it and as (k q^T)^T -- which the
attention backward kernels' recomputed scores rely on, and which numpy's own BLAS need not
give (OpenBLAS's Haswell sgemm, which machines of this kind select through OPENBLAS_CORETYPE,
does not).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastllm.triton import _interpret_dot  # noqa: E402
from fastllm.triton._common import interpreted  # noqa: E402

pytestmark = pytest.mark.skipif(
    not interpreted(), reason="the hook is in Triton's interpreter (TRITON_INTERPRET=1)"
)


@triton.jit
def _scores_kernel(a_ptr, b_ptr, out_ptr, D: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    """out (M x N) = a[pid_m block] @ b[pid_n block]^T, blocks of M and N rows of D."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * M + tl.arange(0, M)
    cols = pid_n * N + tl.arange(0, N)
    d = tl.arange(0, D)
    a = tl.load(a_ptr + rows[:, None] * D + d[None, :])
    b = tl.load(b_ptr + cols[:, None] * D + d[None, :])
    s = tl.dot(a, tl.trans(b), input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * (N * tl.num_programs(1)) + cols[None, :], s)


def _scores(a, b, m, n):
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32)
    _scores_kernel[(a.shape[0] // m, b.shape[0] // n)](a, b, out, a.shape[1], m, n)
    return out


@pytest.fixture
def exact_dot():
    was = _interpret_dot.enabled()
    _interpret_dot.enable()
    yield
    if not was:
        _interpret_dot.disable()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [16, 64])
def test_dot_rounds_alike_in_any_shape(exact_dot, dtype, d):
    g = torch.Generator().manual_seed(0)
    # scores of ~1e8 (one float32 ulp is 8), as in test_attention_random_large_scores
    q = (torch.randn(64, d, generator=g) * 1e4).to(dtype)
    k = (torch.randn(64, d, generator=g) * 1e4).to(dtype)
    whole = _scores(q, k, 64, 64)
    torch.testing.assert_close(whole, (q.double() @ k.double().T).float(), rtol=1e-6, atol=0)
    for m, n in ((16, 16), (16, 32), (32, 16)):
        assert torch.equal(_scores(q, k, m, n), whole), (m, n)
    assert torch.equal(_scores(k, q, 64, 64).T, whole)


def test_switch(monkeypatch):
    was = _interpret_dot.enabled()
    try:
        monkeypatch.setenv(_interpret_dot.ENV_VAR, "yes")
        with pytest.raises(ValueError, match="FASTLLM_INTERPRET_EXACT_DOT must be 0 or 1, got 'yes'"):
            _interpret_dot.enable_from_environment()
        _interpret_dot.disable()
        monkeypatch.setenv(_interpret_dot.ENV_VAR, "0")
        _interpret_dot.enable_from_environment()
        assert not _interpret_dot.enabled()
        monkeypatch.setenv(_interpret_dot.ENV_VAR, "1")
        _interpret_dot.enable_from_environment()
        assert _interpret_dot.enabled()
        _interpret_dot.enable()  # idempotent
        _interpret_dot.disable()
        assert not _interpret_dot.enabled()
    finally:
        if was:
            _interpret_dot.enable()
