"""attention_with_kvcache's FlashAttention features (issue 11): a paged cache (block_table)
and rotary applied inside the call (rotary_cos / rotary_sin / rotary_interleaved).

The paged call must give exactly what the same call on a contiguous cache gives (the same
kernels read the same rows), write k_new / v_new into the right blocks and nothing else; the
rotary call must equal rotating q and k_new first (fastllm's rotary reference) and then
calling without rotary. Errors name the argument.
"""

from __future__ import annotations

import pytest
import torch

import fastllm.functional as F
from tests.helpers import generator
from tests.hostile import expect_clear_error

FAMILY = "attention"
BACKENDS = ("native", "triton", "cuda_emu")
DTYPE = {"native": torch.float32, "triton": torch.float32, "cuda_emu": torch.float16}


def _paged_copy(k_cache, v_cache, block_size, num_blocks, gen):
    """A pool holding the contiguous caches' rows in shuffled blocks, and its block table."""
    B, T, Hkv, D = k_cache.shape
    max_blocks = T // block_size
    perm = torch.randperm(num_blocks, generator=gen)[: B * max_blocks].to(torch.int32)
    table = perm.reshape(B, max_blocks)
    pool_k = torch.randn(num_blocks, block_size, Hkv, D, generator=gen).to(k_cache.dtype)
    pool_v = torch.randn(num_blocks, block_size, Hkv, D, generator=gen).to(k_cache.dtype)
    pool_k[table.long()] = k_cache.reshape(B, max_blocks, block_size, Hkv, D)
    pool_v[table.long()] = v_cache.reshape(B, max_blocks, block_size, Hkv, D)
    return pool_k, pool_v, table


@pytest.mark.parametrize("t_new", [0, 1, 3])
def test_paged_cache_matches_contiguous(backend, t_new):
    gen = generator(0)
    dtype = DTYPE[backend]
    B, H, Hkv, D, block_size, T = 3, 4, 2, 32, 4, 16
    k_cache = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    pool_k, pool_v, table = _paged_copy(k_cache, v_cache, block_size, 20, gen)
    pool_k0, pool_v0 = pool_k.clone(), pool_v.clone()
    q = torch.randn(B, max(t_new, 1), H, D, generator=gen).to(dtype)
    new = {}
    if t_new:
        new = dict(k_new=torch.randn(B, t_new, Hkv, D, generator=gen).to(dtype),
                   v_new=torch.randn(B, t_new, Hkv, D, generator=gen).to(dtype))
    lens = torch.tensor([0, 5, T - t_new], dtype=torch.int32)
    want, want_lse = F.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                              return_lse=True, **new)
    got, got_lse = F.attention_with_kvcache(q, pool_k, pool_v, cache_seqlens=lens,
                                            block_table=table, return_lse=True, **new)
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
    # The pool now holds the updated contiguous caches in the table's blocks ...
    view = (B, T // block_size, block_size, Hkv, D)
    assert torch.equal(pool_k[table.long()], k_cache.reshape(view))
    assert torch.equal(pool_v[table.long()], v_cache.reshape(view))
    # ... and every block outside the table is untouched.
    others = torch.ones(pool_k.shape[0], dtype=torch.bool)
    others[table.long().flatten()] = False
    assert torch.equal(pool_k[others], pool_k0[others])
    assert torch.equal(pool_v[others], pool_v0[others])


def test_paged_cache_errors():
    gen = generator(1)
    pool = torch.randn(6, 4, 1, 8, generator=gen)
    q = torch.randn(2, 1, 2, 8, generator=gen)
    new = torch.randn(2, 1, 1, 8, generator=gen)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)

    def call(**kw):
        args = dict(k_new=new, v_new=new.clone(), cache_seqlens=3, block_table=table)
        args.update(kw)
        return F.attention_with_kvcache(q, pool, pool.clone(), **args)

    expect_clear_error(lambda: call(block_table=table.long()), "block_table", "int32")
    expect_clear_error(lambda: call(block_table=table[:1]), "block_table", "(B=2")
    expect_clear_error(lambda: call(block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)),
                       "block_table[1, 1]", "[0, 6)")
    expect_clear_error(lambda: call(cache_seqlens=8), "cache_seqlens", "[0, 7]",
                       "max_blocks * block_size")
    expect_clear_error(lambda: call(k_new=torch.randn(2, 1, 1, 4)), "k_new")


def _cos_sin(max_t: int, half: int):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.arange(max_t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [False, True])
def test_rotary_inside_the_call(backend, interleaved, causal, paged):
    """Equal to rotating k_new at cache_seqlens[b] + t and q at the same positions (causal)
    or all at cache_seqlens[b] (not causal), then the call without rotary; partial rotary
    (rotary_dim < D) included. The caller's q and k_new are not modified."""
    from fastllm.reference.rotary import rotary_ref

    gen = generator(2)
    dtype = DTYPE[backend]
    B, H, Hkv, D, T, t_new = 3, 4, 2, 32, 16, 2
    cos, sin = _cos_sin(64, 12)  # rotary_dim 24 < D
    k_cache = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(B, T, Hkv, D, generator=gen).to(dtype)
    q = torch.randn(B, t_new, H, D, generator=gen).to(dtype)
    k_new = torch.randn(B, t_new, Hkv, D, generator=gen).to(dtype)
    v_new = torch.randn(B, t_new, Hkv, D, generator=gen).to(dtype)
    lens = torch.tensor([0, 7, T - t_new], dtype=torch.int32)
    q0, k0 = q.clone(), k_new.clone()

    k_rot = rotary_ref(k_new, cos, sin, lens, None, 0, interleaved)
    q_pos = lens[:, None] + (torch.arange(t_new, dtype=torch.int32) if causal else 0)
    q_rot = rotary_ref(q, cos, sin, q_pos.expand(B, t_new).contiguous(), None, 0, interleaved)
    kc_want, vc_want = k_cache.clone(), v_cache.clone()
    want = F.attention_with_kvcache(q_rot, kc_want, vc_want, k_rot, v_new, lens, causal=causal)

    extra = {}
    if paged:
        k_cache, v_cache, table = _paged_copy(k_cache, v_cache, 4, 16, gen)
        extra = dict(block_table=table)
    got = F.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, lens, causal=causal,
                                   rotary_cos=cos, rotary_sin=sin,
                                   rotary_interleaved=interleaved, **extra)
    assert torch.equal(q, q0) and torch.equal(k_new, k0)
    # Rotation in float32 rounded once: the kernels' result may differ from the reference's
    # in the last bit of low-precision dtypes, so the attention inputs can too.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    if paged:
        k_cache = k_cache[table.long()].flatten(1, 2)
    torch.testing.assert_close(k_cache, kc_want, **tol)


def test_rotary_inside_the_call_errors():
    cos, sin = _cos_sin(8, 4)
    q = torch.randn(1, 1, 2, 8)
    cache = torch.zeros(1, 6, 1, 8)
    new = torch.randn(1, 1, 1, 8)
    expect_clear_error(lambda: F.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=2,
                                                        rotary_cos=cos, rotary_sin=sin),
                       "rotary_cos", "k_new")
    expect_clear_error(lambda: F.attention_with_kvcache(q, cache, cache.clone(), new, new.clone(),
                                                        2, rotary_cos=cos), "rotary_sin")
    short_cos, short_sin = _cos_sin(2, 4)  # positions 2.. are not in a 2-row cache
    expect_clear_error(lambda: F.attention_with_kvcache(q, cache, cache.clone(), new, new.clone(),
                                                        2, rotary_cos=short_cos,
                                                        rotary_sin=short_sin), "cos")


@pytest.mark.parametrize("lengths", [[5], [7, 7, 7, 7, 7, 7], [2, 9, 4], [3, 0, 11, 6, 1, 8]])
@pytest.mark.parametrize("t_new", [1, 3])
def test_cache_write_paths(lengths, t_new):
    """The new rows land at each sequence's end, converted to the cache's dtype, and nothing
    else changes, whichever way the call writes them (one slice for equal lengths, a slice per
    sequence for a few, index_put_ for many); the output is what the same call gives on a
    cache written beforehand."""
    gen = generator(3)
    B, T, Hkv, D, H = len(lengths), 16, 2, 8, 4
    k_cache = torch.randn(B, T, Hkv, D, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(B, T, Hkv, D, generator=gen).to(torch.bfloat16)
    k_new = torch.randn(B, t_new, Hkv, D, generator=gen)  # float32: converted on the write
    v_new = torch.randn(B, t_new, Hkv, D, generator=gen)
    q = torch.randn(B, t_new, H, D, generator=gen).to(torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lengths):
        expect_k[b, n:n + t_new] = k_new[b].to(torch.bfloat16)
        expect_v[b, n:n + t_new] = v_new[b].to(torch.bfloat16)
    out = F.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
    again = F.attention_with_kvcache(q, expect_k, expect_v, cache_seqlens=seqlens + t_new)
    assert torch.equal(out, again)
