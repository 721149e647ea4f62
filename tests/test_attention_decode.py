"""The CPU decode kernel (csrc/attention/attention_cpu_decode.inc, built for AVX-512 and
AVX2): a forward with at most 16 query rows per (batch, kv head) and no input requiring grad
-- a decoded token or a few against a KV cache -- computes its scores straight from the
stored key rows. On the scalar path the same calls take the tile kernels, and these tests
hold those to the same rules; every path runs in a child of its own below.

Each case runs twice: inputs without grad (the decode kernel) and inputs requiring grad (the
tile kernels, whose own accuracy tests/test_attention.py holds); against the float64 result
the decode kernel's error is at most twice the tile kernels' plus the dtype's slack, and its
lse matches to float32 rounding."""

from __future__ import annotations

import pytest
import torch

import fastllm
import fastllm.functional as F
from tests.accuracy import ATOL, max_err
from tests.helpers import cpu_has_avx512_path, outputs_per_cpu_isa

# batch, new tokens, cache length, heads, kv heads, head dim, causal, window, used keys
CASES = {
    "gqa-seqused": (2, 1, 37, 4, 2, 64, True, (-1, -1), [37, 20]),
    "16-rows": (1, 4, 50, 4, 1, 40, True, (-1, -1), None),
    "d136-full": (1, 3, 70, 2, 2, 136, False, (-1, -1), None),
    "window": (2, 2, 33, 6, 3, 8, True, (5, 0), None),
    "no-key": (2, 1, 20, 2, 2, 24, True, (-1, -1), [0, 20]),
    # Past one online-softmax chunk (64 keys) and split into key ranges joined at the end
    # (one per 256 keys, up to 16 tasks over the batch).
    "long-split": (1, 1, 700, 8, 2, 64, True, (-1, -1), None),
    "long-seqused": (2, 2, 1100, 6, 2, 40, True, (-1, -1), [1100, 300]),
    "long-window": (1, 4, 900, 4, 1, 128, True, (200, 0), None),
}


def _run(q, k, v, causal, window, used, grad, head_major=False):
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    if head_major:  # the keys and values as views of (B, Hkv, Tk, D) caches
        leaves[1:] = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves[1:]]
    B, Tk = k.shape[0], k.shape[1]
    seqlens = torch.tensor([Tk] * B if used is None else used, dtype=torch.int32)
    with fastllm.use_backend("native"):
        out, lse = F.attention_with_kvcache(*leaves, cache_seqlens=seqlens, causal=causal,
                                            window_size=window, return_lse=True)
    return out.detach(), lse.detach()


def _inputs(case, dtype, seed=11):
    B, Tq, Tk, H, Hkv, D, causal, window, used = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, generator=g).to(dtype)
    return q, k, v, causal, window, used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_kernel_within_the_tile_kernels_error(case, dtype):
    q, k, v, causal, window, used = _inputs(case, dtype, seed=7)
    decoded, lse = _run(q, k, v, causal, window, used, grad=False)
    tiled, tiled_lse = _run(q, k, v, causal, window, used, grad=True)
    exact, exact_lse = _run(q.double(), k.double(), v.double(), causal, window, used, False)
    bound = 2 * max_err(tiled, exact) + ATOL[dtype]
    assert max_err(decoded, exact) <= bound
    live = torch.isfinite(exact_lse)
    assert torch.equal(live, torch.isfinite(lse))
    torch.testing.assert_close(lse[live].double(), exact_lse[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[live], tiled_lse[live], rtol=1e-5, atol=1e-5)
    if used is not None and 0 in used:  # a sequence without keys: zeros, lse -inf
        b = used.index(0)
        assert torch.equal(decoded[b], torch.zeros_like(decoded[b]))
        assert torch.all(lse[b] == float("-inf"))
    if dtype == torch.float32:
        torch.testing.assert_close(decoded, tiled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["long-split", "long-seqused", "gqa-seqused"])
def test_decode_kernel_does_not_depend_on_the_thread_count_or_the_layout(case, dtype):
    """The key ranges a sequence is split into depend on the problem only; a cache stored
    head-major (the kernel reads it through strides) gives the same bits."""
    q, k, v, causal, window, used = _inputs(case, dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(q, k, v, causal, window, used, grad=False)
        torch.set_num_threads(2)
        two = _run(q, k, v, causal, window, used, grad=False)
        strided = _run(q, k, v, causal, window, used, grad=False, head_major=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in ((one, two), (one, strided)):
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("where", [3, 500])
def test_decode_kernel_propagates_a_nan_key_through_its_key_ranges(where):
    """A NaN key score makes its rows NaN (torch's softmax math), whichever of the joined key
    ranges holds it; the other kv head's rows stay finite and accurate."""
    q, k, v, causal, window, used = _inputs("long-split", torch.float32)
    k[0, where, 1, 5] = float("nan")
    out, lse = _run(q, k, v, causal, window, used, grad=False)
    exact, _ = _run(q.double(), k.double(), v.double(), causal, window, used, grad=False)
    assert torch.equal(torch.isnan(out), torch.isnan(exact))
    assert torch.isnan(out[0, 0, 4:]).all() and not torch.isnan(out[0, 0, :4]).any()
    # (lse of a NaN row: NaN from the decode kernel, -inf from the tile kernels that run
    # these calls on CPUs without AVX-512; neither is finite.)
    assert not torch.isfinite(lse[0, 4:]).any() and torch.isfinite(lse[0, :4]).all()
    torch.testing.assert_close(out[0, 0, :4].double(), exact[0, 0, :4], rtol=1e-5, atol=1e-5)


# Every case of the accuracy test above in one child per FASTLLM_CPU_ISA level (the path is
# chosen once per process), plus the decoded outputs of each case, saved for the parent.
ISA_PATH_SCRIPT = r"""
import os, torch
from tests.test_attention_decode import CASES, _inputs, _run, test_decode_kernel_within_the_tile_kernels_error
outputs = []
for case in CASES:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        test_decode_kernel_within_the_tile_kernels_error(case, dtype)
        q, k, v, causal, window, used = _inputs(case, dtype)
        outputs += list(_run(q, k, v, causal, window, used, grad=False))
torch.save(outputs, os.environ["OUT"])
print("ok")
"""


def test_every_cpu_isa_path_of_the_decode_kernel(tmp_path):
    """FASTLLM_CPU_ISA unset (AVX-512's decode kernel on a CPU with it), =avx2 (the same kernel
    8 keys at a time) and =scalar (the tile kernels), each within the accuracy rule; the
    paths' outputs differ in some bit, which shows that each ran its own code."""
    results = outputs_per_cpu_isa(ISA_PATH_SCRIPT, tmp_path)
    differs = lambda a, b: any(not torch.equal(u, v) for u, v in zip(results[a], results[b]))
    assert differs("avx2", "scalar")
    if cpu_has_avx512_path():
        assert differs("", "avx2")
