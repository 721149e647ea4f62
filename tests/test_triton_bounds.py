"""FASTLLM_CHECK_BOUNDS for Triton under the interpreter (fastllm/triton/_bounds.py): every
load, store and atomic of an interpreted kernel is checked against the storages of its
launch's tensor arguments before memory is touched.

Tiny kernels defined here prove the checker's behaviour (out of bounds after and before an
argument, stores, atomics, masked lanes, views, sharing a storage); the attention launcher
given cu_seqlens that point past its tensors (issue 10: it corrupted the heap) must now stop
with the bounds error; and one small forward + backward per family runs clean under it.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fastllm  # noqa: E402
import fastllm.functional as F  # noqa: E402
from fastllm.triton import _bounds  # noqa: E402
from fastllm.triton._common import interpreted  # noqa: E402
from tests.hostile import run_isolated  # noqa: E402

pytestmark = pytest.mark.skipif(
    not interpreted(), reason="the bounds checker hooks Triton's interpreter (TRITON_INTERPRET=1)"
)


@pytest.fixture
def bounds():
    with _bounds.checking_bounds():
        yield


@pytest.fixture
def restore_bounds_state():
    """For tests that switch the checker off or break its hooks: put back what was there."""
    was_enabled = _bounds.enabled()
    yield
    if was_enabled:
        _bounds.enable()
    else:
        _bounds.disable()


@triton.jit
def shifted_copy_kernel(x_ptr, y_ptr, n, shift, BLOCK: tl.constexpr):
    """y[i] = x[i + shift] for i < n (masked lanes i >= n touch nothing)."""
    i = tl.arange(0, BLOCK)
    mask = i < n
    tl.store(y_ptr + i, tl.load(x_ptr + i + shift, mask=mask), mask=mask)


@triton.jit
def shifted_store_kernel(x_ptr, y_ptr, n, shift, BLOCK: tl.constexpr):
    """y[i + shift] = x[i] for i < n."""
    i = tl.arange(0, BLOCK)
    mask = i < n
    tl.store(y_ptr + i + shift, tl.load(x_ptr + i, mask=mask), mask=mask)


@triton.jit
def scalar_load_kernel(x_ptr, index):
    """x[0] = x[index], unmasked."""
    tl.store(x_ptr, tl.load(x_ptr + index))


@triton.jit
def _load_at(ptr, index):
    return tl.load(ptr + index)


@triton.jit
def helper_load_kernel(x_ptr, index):
    """x[0] = x[index] through a @triton.jit helper."""
    tl.store(x_ptr, _load_at(x_ptr, index))


@triton.jit
def atomic_add_kernel(acc_ptr, n, shift, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.atomic_add(acc_ptr + i + shift, tl.full([BLOCK], 1.0, tl.float32), mask=i < n)


@triton.jit
def atomic_cas_kernel(flag_ptr, index):
    tl.atomic_cas(flag_ptr + index, 0, 1)


def test_in_bounds_kernel_runs(bounds):
    x = torch.arange(10, dtype=torch.float32)
    y = torch.zeros(10)
    # BLOCK 16 > n: lanes 10..15 would be out of bounds, but they are masked.
    shifted_copy_kernel[(1,)](x, y, 10, 0, BLOCK=16)
    assert torch.equal(y, x)


def test_load_past_the_end_raises_before_touching_memory(bounds):
    x = torch.arange(10, dtype=torch.float32)
    y = torch.full((10,), -1.0)
    with pytest.raises(_bounds.OutOfBoundsError) as info:
        shifted_copy_kernel[(1,)](x, y, 10, 3, BLOCK=16)
    message = str(info.value)
    for words in ("shifted_copy_kernel", "program (0, 0, 0)", "test_triton_bounds.py:", "load",
                  "3 of 10 active lanes", "bytes [40, 44) (element 10)", "argument `x_ptr`",
                  "storage spans bytes [0, 40)"):
        assert words in message, f"{words!r} missing from: {message}"
    assert torch.equal(y, torch.full((10,), -1.0)), "nothing may be stored after the error"


def test_store_before_the_start_raises(bounds):
    x = torch.arange(6, dtype=torch.float32)
    y = torch.zeros(8)
    with pytest.raises(_bounds.OutOfBoundsError) as info:
        shifted_store_kernel[(1,)](x, y, 6, -2, BLOCK=8)
    message = str(info.value)
    assert "store" in message and "argument `y_ptr`" in message
    assert "bytes [-8, -4) (element -2)" in message and "8 bytes outside" in message
    assert torch.equal(y, torch.zeros(8))


def test_far_away_unmasked_access(bounds):
    x = torch.zeros(4, dtype=torch.float16)
    with pytest.raises(_bounds.OutOfBoundsError, match="2-byte elements") as info:
        scalar_load_kernel[(1,)](x, 1 << 20)
    assert "(element 1048576) from argument `x_ptr`, the only argument" in str(info.value)


def test_access_in_a_jit_helper_raises_the_same_error(bounds):
    x = torch.zeros(4)
    with pytest.raises(_bounds.OutOfBoundsError) as info:
        helper_load_kernel[(1,)](x, 4)
    assert "helper_load_kernel" in str(info.value)
    assert "bytes [16, 20) (element 4) from argument `x_ptr`" in str(info.value)


def test_atomics_are_checked(bounds):
    acc = torch.zeros(8)
    atomic_add_kernel[(1,)](acc, 8, 0, BLOCK=8)
    assert torch.equal(acc, torch.ones(8))
    with pytest.raises(_bounds.OutOfBoundsError, match="atomic"):
        atomic_add_kernel[(1,)](acc, 8, 1, BLOCK=8)
    assert torch.equal(acc, torch.ones(8))
    flags = torch.zeros(2, dtype=torch.int32)
    atomic_cas_kernel[(1,)](flags, 1)
    assert flags.tolist() == [0, 1]
    with pytest.raises(_bounds.OutOfBoundsError, match="atomic_cas"):
        atomic_cas_kernel[(1,)](flags, 2)


def test_views_may_reach_their_whole_storage(bounds):
    """The storage is the unit: a view's kernel may read around the view inside its storage
    (as on a GPU, where the allocation is what faults), not outside it."""
    base = torch.arange(20, dtype=torch.float32)
    view = base[5:10]
    y = torch.zeros(5)
    shifted_copy_kernel[(1,)](view, y, 5, -5, BLOCK=8)
    assert torch.equal(y, base[:5])
    with pytest.raises(_bounds.OutOfBoundsError) as info:
        shifted_copy_kernel[(1,)](view, y, 5, 11, BLOCK=8)
    assert "storage spans bytes [-20, 60)" in str(info.value)


def test_arguments_sharing_a_storage_are_named_together(bounds):
    qkv = torch.zeros(3, 4)
    with pytest.raises(_bounds.OutOfBoundsError, match=r"same storage as y_ptr"):
        shifted_copy_kernel[(1,)](qkv[0], qkv[1], 4, 9, BLOCK=4)


def test_disable_restores_triton(restore_bounds_state):
    from triton.runtime import interpreter

    _bounds.enable()
    assert _bounds.enabled()
    _bounds.disable()
    assert not _bounds.enabled()
    assert not isinstance(interpreter._interpreter, _bounds._CheckedInterpreter)
    assert not hasattr(interpreter.GridExecutor.__call__, "__wrapped__")
    with _bounds.checking_bounds():
        assert isinstance(interpreter._interpreter, _bounds._CheckedInterpreter)
    assert not _bounds.enabled()


def test_missing_hook_points_fail_loudly(restore_bounds_state, monkeypatch):
    from triton.runtime import interpreter

    _bounds.disable()

    class NoLoad:
        def store(self, *args):
            """store(arg0: numpy.ndarray) -> None"""

    monkeypatch.setattr(interpreter, "_interpreter", NoLoad())
    with pytest.raises(RuntimeError, match=r"has no `load`.*signature \(arg0: numpy.ndarray\)"):
        _bounds.enable()
    assert not _bounds.enabled()
    monkeypatch.undo()
    monkeypatch.delattr(interpreter.GridExecutor, "_init_args_hst")
    with pytest.raises(RuntimeError, match="GridExecutor has no _init_args_hst"):
        _bounds.enable()


def test_environment_switch(restore_bounds_state, monkeypatch):
    """FASTLLM_CHECK_BOUNDS is read when fastllm.triton is imported (here: re-executed)."""
    import importlib

    import fastllm.triton

    _bounds.disable()
    monkeypatch.setenv("FASTLLM_CHECK_BOUNDS", "1")
    importlib.reload(fastllm.triton)
    assert _bounds.enabled()
    _bounds.disable()
    monkeypatch.setenv("FASTLLM_CHECK_BOUNDS", "0")
    importlib.reload(fastllm.triton)
    assert not _bounds.enabled()
    monkeypatch.setenv("FASTLLM_CHECK_BOUNDS", "yes")
    with pytest.raises(ValueError, match="FASTLLM_CHECK_BOUNDS must be 0 or 1, got 'yes'"):
        _bounds.enable_from_environment()


def test_attention_cu_seqlens_past_the_tokens_stays_in_bounds():
    """Issue 10: cu_seqlens = [0, 3, 4000] with 8 packed tokens made the Triton attention
    kernel read and write far outside its tensors under the interpreter ("double free or
    corruption"). The kernels now clamp those values to the tensors (a GPU does not read them
    on the host): the raw launcher (no op-level checks), forward and backward, makes no access
    outside its arguments. In a child process, in case an access slipped past the hooks.
    (test_load_past_the_end_* and the tests after it prove the checker catches such accesses.)"""
    out = run_isolated(
        """
        import torch
        from fastllm.triton import _bounds
        from fastllm.triton.attention import attention_bwd, attention_fwd

        q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
        cu_seqlens = torch.tensor([0, 3, 4000], dtype=torch.int32)
        options = (cu_seqlens, cu_seqlens, None, 3997, 3997, 0.25, False, -1, -1, 0.0, None,
                   0.0, None)
        with _bounds.checking_bounds():
            out, lse = attention_fwd(q, k, v, *options)
            grads = attention_bwd(torch.randn_like(out), q, k, v, out, lse, *options)
        assert all(torch.isfinite(g).all() for g in (out, *grads))
        print("in bounds")
        """
    )
    assert "in bounds" in out, out


# One small forward + backward per family through the Triton ops, checked. (The whole suite
# runs checked when FASTLLM_CHECK_BOUNDS=1 is set for it; this keeps the families covered when
# it is not.)


def test_norm_kernels_stay_in_bounds(bounds):
    x = torch.randn(3, 97, requires_grad=True)
    r = torch.randn(3, 97, requires_grad=True)
    w = torch.randn(97, requires_grad=True)
    b = torch.randn(97, requires_grad=True)
    with fastllm.use_backend("triton"):
        y, s = F.add_layer_norm(x[:, :90], r[:, :90], [90], w[:90], b[:90])
        (y.sum() + F.rms_norm(x.t(), [3], w[:3]).sum() + s.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_cross_entropy_kernels_stay_in_bounds(bounds):
    logits = torch.randn(23, 5, requires_grad=True)
    target = torch.tensor([0, 22, -100, 3, 17])  # rows of logits.t(): (5, 23), strided
    with fastllm.use_backend("triton"):
        loss = F.cross_entropy(logits.t(), target, label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
        loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_attention_kernels_stay_in_bounds(bounds):
    from tests.helpers import packed_qkv, qkv

    q, k, v, options = packed_qkv([5, 1, 19], [3, 20, 7], 4, 2, 24, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with fastllm.use_backend("triton"):
        out = F.attention(*leaves, causal=True, **options)
        out.sum().backward()
        q, k, v = (t.requires_grad_() for t in qkv(2, 9, 13, 2, 1, 16, torch.float16))
        F.attention(q, k, v, window_size=(3, -1), softcap=2.0).float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_rotary_kernels_stay_in_bounds(bounds):
    cos, sin = torch.randn(16, 12), torch.randn(16, 12)
    qkv = torch.randn(2, 5, 6, 30, requires_grad=True)  # q and k: strided views, D 30, R 24
    packed = torch.randn(9, 2, 24, requires_grad=True)
    with fastllm.use_backend("triton"):
        q, k = F.apply_rotary_qk(qkv[:, :, :4], qkv[:, :, 4:], cos, sin,
                                 position_ids=torch.tensor([[0, 15, 3, 2, 1], [4, 4, 4, 4, 4]]))
        x = F.apply_rotary(packed * 1.0, cos, sin, cu_seqlens=torch.tensor([0, 2, 9],
                                                                          dtype=torch.int32),
                           position_ids=torch.tensor([7, 1]), interleaved=True, inplace=True)
        (q.sum() + k.sum() + x.sum()).backward()
    assert torch.isfinite(qkv.grad).all() and torch.isfinite(packed.grad).all()
