"""The public functions' dispatch shortcut (fastllm/ops/_family.py: without_autograd): a call
that records no graph -- grad mode off, or no input requiring grad -- runs its op below the
autograd layer. It must give the same values as the autograd path, no graph, and leave every
call that does record one on that path, with working gradients. On the native kernels (the
shortcut is the same code for every backend)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastllm
import fastllm.functional as F
from fastllm.ops import _family, attention, gated_mlp, norm, rotary


def _norm_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g),
            torch.randn(40, generator=g), torch.randn(40, generator=g)]


def _rotary_inputs():
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(16, 4, generator=g) * 6
    return [torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 5, 1, 8, generator=g),
            angles.cos(), angles.sin()]


def _attention_inputs():
    # 9 query rows x 2 heads per kv head: more than the CPU decode kernel takes, which would
    # otherwise answer the call without a graph (tests/test_attention_decode.py).
    g = torch.Generator().manual_seed(2)
    return [torch.randn(2, 9, 4, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g),
            torch.randn(2, 9, 2, 16, generator=g)]


def _biased_attention_inputs():
    g = torch.Generator().manual_seed(3)
    return [*_attention_inputs(), torch.randn(1, 4, 9, 9, generator=g)]


# name: (module whose public function calls the op, function, inputs, differentiable inputs)
CASES = {
    "layer_norm": (norm, lambda x, r, w, b: F.layer_norm(x, [40], w, b), _norm_inputs, (0, 2, 3)),
    "rms_norm": (norm, lambda x, r, w, b: F.rms_norm(x, [40], w), _norm_inputs, (0, 2)),
    "add_layer_norm": (norm, lambda x, r, w, b: F.add_layer_norm(x, r, [40], w, b),
                       _norm_inputs, (0, 1, 2, 3)),
    "add_rms_norm": (norm, lambda x, r, w, b: F.add_rms_norm(x, r, [40], w), _norm_inputs,
                     (0, 1, 2)),
    "swiglu": (gated_mlp, lambda g, u, _w, _b: F.swiglu(g, u), _norm_inputs, (0, 1)),
    "apply_rotary_qk": (rotary, lambda q, k, c, s: F.apply_rotary_qk(q, k, c, s, position_ids=3),
                        _rotary_inputs, (0, 1)),
    "attention": (attention, lambda q, k, v: F.attention(q, k, v, causal=True),
                  _attention_inputs, (0, 1, 2)),
    # only the bias requires grad: its gradient needs the graph too
    "attention-bias": (attention, lambda q, k, v, b: F.attention(q, k, v, attn_bias=b),
                       _biased_attention_inputs, (3,)),
}


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


@pytest.fixture
def guard_uses(monkeypatch):
    """Counts the entries into below_autograd (through _family.autograd_scope)."""
    uses = []

    @contextlib.contextmanager
    def counting_guard():
        uses.append(1)
        with torch._C._AutoDispatchBelowAutograd():
            yield

    monkeypatch.setattr(_family, "below_autograd", counting_guard)
    return uses


@pytest.mark.parametrize("case", list(CASES))
def test_a_call_without_a_graph_skips_autograd_and_matches_the_graph_path(guard_uses, case):
    module, fn, make, differentiable = CASES[case]
    reason = module.IMPLS.unavailable("native")
    if reason is not None:
        pytest.skip(reason)
    with fastllm.use_backend("native"):
        _check_case(guard_uses, fn, make, differentiable)


def _check_case(guard_uses, fn, make, differentiable):
    plain = make()
    fast = _outputs(fn(*plain))
    assert len(guard_uses) == 1
    assert all(o.grad_fn is None and not o.requires_grad for o in fast)

    leaves = [t.clone().requires_grad_(i in differentiable) for i, t in enumerate(plain)]
    graph = _outputs(fn(*leaves))
    assert len(guard_uses) == 1, "a call recording a graph must not skip autograd"
    assert all(o.grad_fn is not None for o in graph)
    for a, b in zip(fast, graph):
        assert torch.equal(a, b.detach())
    sum(o.square().sum() for o in graph).backward()
    for i in differentiable:
        assert leaves[i].grad is not None and torch.isfinite(leaves[i].grad).all()

    with torch.no_grad():  # inputs requiring grad, grad mode off: no graph either
        off = _outputs(fn(*leaves))
    assert len(guard_uses) == 2
    for a, b in zip(fast, off):
        assert b.grad_fn is None and torch.equal(a, b)


def test_the_backend_follows_the_environment_as_it_changes(monkeypatch):
    """get_backend reads FASTLLM_BACKEND through os.environ's own dict (not os.environ.get,
    ten times dearer): a value set, changed or removed while running takes effect at the
    next call, and the native fast path of select gives what the general path gives."""
    from fastllm import backend
    from fastllm.ops._family import OpSet

    monkeypatch.delenv("FASTLLM_BACKEND", raising=False)
    assert backend.get_backend() == "native"
    native = attention.IMPLS.select(torch.zeros(1))
    assert isinstance(native, OpSet) and native.backend == "native"
    monkeypatch.setenv("FASTLLM_BACKEND", "reference")
    assert backend.get_backend() == "reference"
    assert attention.IMPLS.select(torch.zeros(1)) is None
    monkeypatch.setenv("FASTLLM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTLLM_BACKEND"):
        backend.get_backend()
    monkeypatch.delenv("FASTLLM_BACKEND")
    assert backend.get_backend() == "native"
    with fastllm.use_backend("reference"):
        assert backend.get_backend() == "reference"
