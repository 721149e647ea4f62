"""The CPU decode kernel (csrc/attention/attention_cpu_avx512.h's decode_rows): a forward
with at most 16 query rows per (batch, kv head) and no input requiring grad -- a decoded
token or a few against a KV cache -- computes its scores straight from the stored key rows.
On a CPU without the AVX-512 path the same calls take the tile kernels, and these tests hold
those to the same rules.

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

# batch, new tokens, cache length, heads, kv heads, head dim, causal, window, used keys
CASES = {
    "gqa-seqused": (2, 1, 37, 4, 2, 64, True, (-1, -1), [37, 20]),
    "16-rows": (1, 4, 50, 4, 1, 40, True, (-1, -1), None),
    "d136-full": (1, 3, 70, 2, 2, 136, False, (-1, -1), None),
    "window": (2, 2, 33, 6, 3, 8, True, (5, 0), None),
    "no-key": (2, 1, 20, 2, 2, 24, True, (-1, -1), [0, 20]),
}


def _run(q, k, v, causal, window, used, grad):
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    B, Tk = k.shape[0], k.shape[1]
    seqlens = torch.tensor([Tk] * B if used is None else used, dtype=torch.int32)
    with fastllm.use_backend("native"):
        out, lse = F.attention_with_kvcache(*leaves, cache_seqlens=seqlens, causal=causal,
                                            window_size=window, return_lse=True)
    return out.detach(), lse.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_kernel_within_the_tile_kernels_error(case, dtype):
    B, Tq, Tk, H, Hkv, D, causal, window, used = CASES[case]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Tq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, generator=g).to(dtype)
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
