"""The native CPU kernels' output cache (csrc/common/cpu_output_cache.h): a large output's
block is kept when the tensor is freed and handed to the next output of its size, so every
kernel that writes such an output must write all of it -- a kept block holds its last
user's data. Each case below poisons the block first (NaN, or all ones for integers),
checks that the second call got that very block, and that its result equals the first
call's bit for bit (the first ran on fresh, zeroed pages, so a skipped element shows).
The process-wide settings (the limit, the cache off, a bad value) run in child processes."""

from __future__ import annotations

import threading

import pytest
import torch

from fastllm import _native
from tests.helpers import attention_options
from tests.hostile import run_isolated

pytestmark = pytest.mark.skipif(not _native.AVAILABLE, reason="needs fastllm._C")

MiB = 1 << 20


def _cache():
    from fastllm.backend import cpu_output_cache

    return cpu_output_cache()


def _second_call_on_poisoned_block(fn):
    """fn() -> tuple of outputs (the first one at least 4 MiB). Runs it, keeps a copy,
    poisons the outputs' blocks and frees them, runs it again; returns (first, second)."""
    first = fn()
    ptrs = {t.data_ptr() for t in first if t.numel()}
    copies = tuple(t.clone() for t in first)
    for out in first:
        out.fill_(float("nan") if out.is_floating_point() else 1)
    del first, out
    hits = _cache()["hits"]
    second = fn()
    assert _cache()["hits"] > hits, "the second call took no kept block"
    assert second[0].data_ptr() in ptrs, "the big output did not reuse the poisoned block"
    return copies, second


def _assert_same_bits(first, second):
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a,
                           b.view(torch.uint8) if b.dtype != torch.bool else b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_backward_writes_every_element(dtype):
    # 2048 x 1031 float32 is 8 MiB (bfloat16 4 MiB): ignored rows, label smoothing, z-loss
    torch.manual_seed(0)
    logits = (torch.randn(2048, 1031) * 3).to(dtype)
    target = torch.randint(0, 1031, (2048,))
    target[::7] = -100
    grad_loss = torch.rand(2048)
    lse = torch.ops.fastllm.cross_entropy_fwd(logits, target, None, -100, 0.1, 1e-4, 0.0)[1]

    def bwd():
        return (torch.ops.fastllm.cross_entropy_bwd(grad_loss, logits, target, None, lse, -100,
                                                     0.1, 1e-4, 0.0),)

    first, second = _second_call_on_poisoned_block(bwd)
    _assert_same_bits(first, second)
    assert not second[0][::7].any()  # ignored rows: zeros, not the poison


@pytest.mark.parametrize("rms", [False, True])
def test_norms_write_every_element(rms):
    ops = torch.ops.fastllm
    torch.manual_seed(0)
    x = torch.randn(1024, 1536)  # 6 MiB
    res = torch.randn(1024, 1536)
    w = torch.randn(1536)
    b = None if rms else torch.randn(1536)
    if rms:
        first, second = _second_call_on_poisoned_block(
            lambda: ops.add_rms_norm_fwd(x, res, (1536,), w, 1e-5)[:2])
    else:
        first, second = _second_call_on_poisoned_block(
            lambda: ops.add_layer_norm_fwd(x, res, (1536,), w, b, 1e-5)[:2])
    _assert_same_bits(first, second)

    dy = torch.randn_like(x)
    if rms:
        rstd = ops.rms_norm_fwd(x, (1536,), w, 1e-5)[1]
        backward = lambda: ops.rms_norm_bwd(dy, None, x, (1536,), w, rstd, True)[:1]  # noqa: E731
    else:
        _, mean, rstd = ops.layer_norm_fwd(x, (1536,), w, b, 1e-5)
        backward = lambda: ops.layer_norm_bwd(  # noqa: E731
            dy, None, x, (1536,), w, mean, rstd, True, True)[:1]
    first, second = _second_call_on_poisoned_block(backward)
    _assert_same_bits(first, second)


def test_gated_mlp_and_rotary_write_every_element():
    ops = torch.ops.fastllm
    torch.manual_seed(0)
    gate = torch.randn(1024, 2048)  # out 8 MiB, gradients 8 MiB each
    up = torch.randn(1024, 2048)
    first, second = _second_call_on_poisoned_block(lambda: (ops.gated_mlp_fwd(gate, up, "silu"),))
    _assert_same_bits(first, second)
    dy = torch.randn(1024, 2048)
    first, second = _second_call_on_poisoned_block(lambda: ops.gated_mlp_bwd(dy, gate, up, "silu"))
    _assert_same_bits(first, second)

    q = torch.randn(2, 512, 16, 128)  # 8 MiB; rotary dim 64 of 128 leaves half to copy
    k = torch.randn(2, 512, 8, 128)  # 4 MiB
    angles = torch.randn(512, 32)
    cos, sin = angles.cos(), angles.sin()
    first, second = _second_call_on_poisoned_block(
        lambda: ops.rotary_qk_fwd(q, k, cos, sin, None, None, 0, False, False))
    _assert_same_bits(first, second)
    first, second = _second_call_on_poisoned_block(
        lambda: (ops.rotary_fwd(q, cos, sin, None, None, 0, True, False),))
    _assert_same_bits(first, second)


def _attention(q, k, v, **options):
    """attention_fwd / attention_bwd's calls with ``options`` (tests/helpers.py's
    attention_options): (forward(), backward(out, lse)); backward returns (dq, dk, dv), and
    the bias gradient last with an attn_bias."""
    ops = torch.ops.fastllm
    opts = tuple(attention_options(q, **options).values())
    dout = torch.randn_like(q)
    bias_grad = options.get("attn_bias") is not None
    n = 4 if bias_grad else 3
    return (lambda: ops.attention_fwd(q, k, v, *opts),
            lambda out, lse: ops.attention_bwd(dout, q, k, v, out, lse, *opts,
                                               bias_grad=bias_grad)[:n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_writes_every_element(dtype):
    # q, k, v (1, T, 8, 128): 4 MiB each (float32 T 1024, bfloat16 T 2048), so out, dq, dk
    # and dv all come from the cache. Causal with the first and last 64 keys masked out: the
    # first 64 query rows attend to nothing (out 0) and 128 key rows get no gradient (0).
    torch.manual_seed(0)
    t = 1024 if dtype == torch.float32 else 2048
    q, k, v = (torch.randn(1, t, 8, 128).to(dtype) for _ in range(3))
    keep = torch.ones(1, t, dtype=torch.bool)
    keep[:, :64] = False
    keep[:, -64:] = False
    forward, backward = _attention(q, k, v, causal=True, key_padding_mask=keep)
    first, second = _second_call_on_poisoned_block(forward)
    _assert_same_bits(first, second)
    assert not second[0][:, :64].any()
    out, lse = second
    first, second = _second_call_on_poisoned_block(lambda: backward(out, lse))
    _assert_same_bits(first, second)
    for grad in second[1:]:
        assert not grad[:, :64].any() and not grad[:, -64:].any()


def test_packed_attention_writes_every_element():
    # packed (total, H, D) float32, two sequences of 300 and 724 tokens: 4 MiB outputs
    torch.manual_seed(0)
    q, k, v = (torch.randn(1024, 8, 128) for _ in range(3))
    cu = torch.tensor([0, 300, 1024], dtype=torch.int32)
    forward, backward = _attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                   max_seqlen_q=724, max_seqlen_k=724)
    first, second = _second_call_on_poisoned_block(forward)
    _assert_same_bits(first, second)
    out, lse = second
    first, second = _second_call_on_poisoned_block(lambda: backward(out, lse))
    _assert_same_bits(first, second)


def test_attention_bias_gradient_is_zeroed_on_a_kept_block():
    # the bias gradient (1, 8, 512, 512) float32 is 8 MiB: causal, so the kernels skip the
    # tiles above the diagonal, whose gradient must be 0 and not the block's poison (q, k, v
    # and their gradients, 2 MiB each, come from torch's allocator)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 512, 8, 128) for _ in range(3))
    bias = torch.randn(1, 8, 512, 512)
    forward, backward = _attention(q, k, v, causal=True, attn_bias=bias)
    out, lse = forward()
    first, second = _second_call_on_poisoned_block(lambda: backward(out, lse)[::-1])
    _assert_same_bits(first, second)
    above = torch.ones(512, 512, dtype=torch.bool).triu(1)
    assert not second[0][..., above].any()


def test_small_outputs_and_other_devices_are_not_cached():
    before = _cache()
    x = torch.randn(64, 1024)  # 256 KiB
    torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)
    after = _cache()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_stats_empty_and_resize():
    from fastllm.backend import empty_cpu_output_cache

    x = torch.randn(2048, 1024)  # 8 MiB
    out = torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)[0]
    stats = _cache()
    assert stats["limit_bytes"] == 2048 * MiB
    assert stats["live_blocks"] >= 1 and stats["live_bytes"] >= 8 * MiB
    # a cached output is an ordinary tensor: it resizes (moving to a new block) and shares
    ref = out.clone()
    out.resize_(4096, 1024)
    assert torch.equal(out[:2048], ref)
    out.share_memory_()
    assert out.is_shared() and torch.equal(out[:2048], ref)
    del out
    assert _cache()["free_bytes"] >= 8 * MiB
    freed = empty_cpu_output_cache()
    assert freed >= 8 * MiB
    assert _cache()["free_bytes"] == 0 and _cache()["free_blocks"] == 0


def test_outputs_freed_on_other_threads():
    x = torch.randn(2048, 1024)
    expected = torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)[0].clone()
    live = _cache()["live_blocks"]
    errors = []

    def loop():
        try:
            for _ in range(20):
                out = torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)[0]
                if not torch.equal(out, expected):
                    errors.append("wrong values")
                del out
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _cache()["live_blocks"] == live


LIMIT = """
    import torch
    from fastllm.backend import cpu_output_cache
    x = torch.randn(1536, 1024)  # 6 MiB outputs: 6 MiB blocks
    y = torch.randn(4096, 1024)  # 16 MiB
    a = torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)[0]
    b = torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)[0]
    c = torch.ops.fastllm.rms_norm_fwd(y, (1024,), None, 1e-5)[0]
    del a, b, c  # 6 + 6 MiB kept up to the 8 MiB limit: the older one goes; 16 never kept
    s = cpu_output_cache()
    print(s["limit_bytes"], s["free_bytes"], s["free_blocks"], s["live_blocks"])
"""


def test_limit_unmaps_the_blocks_freed_longest_ago():
    out = run_isolated(LIMIT, env={"FASTLLM_CPU_OUTPUT_CACHE_MB": "8"})
    assert out.split() == [str(8 * MiB), str(6 * MiB), "1", "0"], out


OFF = """
    import torch
    from fastllm.backend import cpu_output_cache
    from fastllm import functional as F
    x = torch.randn(2048, 1024, requires_grad=True)
    t = torch.randint(0, 1024, (2048,))
    g, = torch.autograd.grad(F.cross_entropy(x, t), (x,))
    ref, = torch.autograd.grad(torch.nn.functional.cross_entropy(x, t), (x,))
    print(torch.allclose(g, ref, rtol=1e-5, atol=1e-8), cpu_output_cache())
"""


def test_zero_turns_it_off():
    out = run_isolated(OFF, env={"FASTLLM_CPU_OUTPUT_CACHE_MB": "0"})
    assert out.startswith("True ") and "'hits': 0, 'misses': 0" in out, out


BAD = """
    import torch
    from fastllm.backend import cpu_output_cache
    try:
        torch.ops.fastllm.rms_norm_fwd(torch.randn(2048, 1024), (1024,), None, 1e-5)
    except ValueError as e:
        print("ValueError:", e)
    try:
        cpu_output_cache()
    except ValueError as e:
        print("ValueError:", e)
    torch.ops.fastllm.rms_norm_fwd(torch.randn(4, 8), (8,), None, 1e-5)  # small: fine
    print("small ok")
"""


@pytest.mark.parametrize("value", ["-1", "2GB", "1.5"])
def test_bad_value_is_an_error_naming_it(value):
    out = run_isolated(BAD, env={"FASTLLM_CPU_OUTPUT_CACHE_MB": value})
    lines = out.splitlines()
    assert lines[0].startswith("ValueError: rms_norm_fwd: FASTLLM_CPU_OUTPUT_CACHE_MB must be"), out
    assert f"got '{value}'" in lines[0] and f"got '{value}'" in lines[1], out
    assert lines[2] == "small ok"


FORK = """
    import os, threading, torch
    import fastllm.functional  # noqa: F401 -- registers the ops
    x = torch.randn(2048, 1024)  # 8 MiB outputs
    stop = []
    def churn():  # takes and gives back blocks while the main thread forks
        while not stop:
            out = torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)[0]
            del out
    thread = threading.Thread(target=churn)
    thread.start()
    ok = 0
    for _ in range(30):
        pid = os.fork()
        if pid == 0:  # the child's first large output: the cache must not be locked
            out = torch.ops.fastllm.rms_norm_fwd(x, (1024,), None, 1e-5)[0]
            os._exit(0 if out.shape == (2048, 1024) else 1)
        _, status = os.waitpid(pid, 0)
        ok += status == 0
    stop.append(True)
    thread.join()
    print(ok)
"""


def test_fork_while_another_thread_uses_the_cache():
    """A child forked while another thread held the cache's lock would hang on its first
    large output (the timeout fails the test); the lock is held for microseconds, so any one
    fork seldom hits that without the pthread_atfork handler: this runs fork under churn
    rather than proving the handler."""
    out = run_isolated(FORK, timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert out.split()[-1] == "30", out
