"""Cross-entropy family beyond the kernels' numerics: linear + cross-entropy against the
unfused composition, gradcheck, opcheck, torch.compile, the in-place backward, drop-in
modules and error messages.

Tests that take `backend` run on the native kernels (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import fastllm
import fastllm.functional as F
from tests.accuracy import assert_within_torch_error
from tests.helpers import cpu_has_avx512_path, outputs_per_cpu_isa

FAMILY = "cross_entropy"


# ------------------------------------------------- linear + cross-entropy vs unfused


def unfused(x, w, t, b=None, **kw):
    """The composition linear_cross_entropy must equal, in plain PyTorch (z-loss and
    soft-capping written out)."""
    z_loss = kw.pop("z_loss", 0.0)
    softcap = kw.pop("softcap", 0.0)
    logits = TF.linear(x, w, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reduction = kw.pop("reduction", "mean")
    ignore_index = kw.get("ignore_index", -100)
    ce = TF.cross_entropy(logits, t, reduction=reduction, **kw)
    if not z_loss:
        return ce
    valid = t != ignore_index
    z_rows = torch.where(valid, z_loss * torch.logsumexp(logits, -1).square(), 0.0)
    if reduction == "none":
        return ce + z_rows
    if reduction == "sum":
        return ce + z_rows.sum()
    return ce + z_rows.sum() / valid.sum()  # z-loss: over the tokens, not the class weights


def run_linear(fn, x, w, b, t, g, **kw):
    leaves = [p.detach().clone().requires_grad_(True) if p is not None else None for p in (x, w, b)]
    loss = fn(leaves[0], leaves[1], t, leaves[2], **kw)
    loss.backward(g)
    return loss.detach(), [p.grad if p is not None else None for p in leaves]


def ours_linear(x, w, t, b=None, chunk_size=None, **kw):
    return F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk_size, **kw)


def check_linear(rows, hidden, vocab, dtype, chunk_size, bias=True, reduction="mean", **kw):
    x = torch.randn(rows, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    t = torch.randint(0, vocab, (rows,))
    t[::5] = kw.get("ignore_index", -100)
    if kw.pop("weighted", False):
        kw["weight"] = (torch.rand(vocab) + 0.5).to(dtype)
    g = torch.randn(rows if reduction == "none" else ()).to(dtype)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    d = lambda p: None if p is None else p.double()  # noqa: E731
    ref_loss, ref_grads = run_linear(
        unfused, d(x), d(w), d(b), t, g.double(), reduction=reduction, **kw64
    )
    torch_loss, torch_grads = run_linear(unfused, x, w, b, t, g, reduction=reduction, **kw)
    our_loss, our_grads = run_linear(
        ours_linear, x, w, b, t, g, reduction=reduction, chunk_size=chunk_size, **kw
    )
    assert our_loss.dtype == dtype
    name = f"chunk {chunk_size} {reduction}"
    assert_within_torch_error(f"loss {name}", our_loss, torch_loss, ref_loss, dtype)
    for what, ours, theirs, ref in zip(("input", "weight", "bias"), our_grads, torch_grads,
                                       ref_grads):
        assert_within_torch_error(f"grad {what} {name}", ours, theirs, ref, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 40, 1000, None])
def test_linear_cross_entropy_equals_unfused(backend, reduction, chunk_size):
    """Chunk sizes that divide N = 48 (1, 16), that do not (7, 40), above N, and the default."""
    check_linear(48, 24, 301, torch.float32, chunk_size, reduction=reduction)


# linear_cross_entropy's option sets, by id
LINEAR_FEATURES = {
    "smoothing": {"label_smoothing": 0.1},
    "weight_smoothing": {"weighted": True, "label_smoothing": 0.2},
    "z_loss_softcap": {"z_loss": 1e-2, "softcap": 4.0},
    "ignore_index_3": {"ignore_index": 3},
}


@pytest.mark.parametrize("features", list(LINEAR_FEATURES.values()), ids=list(LINEAR_FEATURES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_features(backend, reduction, features):
    check_linear(29, 16, 257, torch.float32, 8, bias=False, reduction=reduction, **dict(features))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_dtypes(backend, dtype, reduction):
    check_linear(33, 32, 500, dtype, 10, reduction=reduction)


def test_linear_cross_entropy_batched_input_and_no_grad(backend):
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    t = torch.randint(0, 40, (2, 5))
    ours = F.linear_cross_entropy(x, w, t, reduction="none", chunk_size=3)
    assert ours.shape == (2, 5)
    unfused_rows = TF.cross_entropy((x @ w.T).transpose(1, 2), t, reduction="none")
    torch.testing.assert_close(ours, unfused_rows)
    with torch.no_grad():
        torch.testing.assert_close(F.linear_cross_entropy(x, w, t), unfused_rows.mean())


def test_linear_cross_entropy_every_row_ignored(backend):
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.full((6,), -100)
    loss = F.linear_cross_entropy(x, w, t, chunk_size=4)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------- class-blocked dW (bfloat16 / float16 on the CPU kernels)


@pytest.fixture
def class_blocks(monkeypatch):
    """Blocks of 37 classes (dividing none of the vocabularies below) for the class sweep of
    linear_cross_entropy (fastllm/ops/linear_cross_entropy.py, _class_blocked), and a list
    that records each sweep run."""
    from fastllm.ops import linear_cross_entropy as lce

    sweeps = []
    original = lce._ChunkedLinear.class_sweep

    def recording(self, *args):
        sweeps.append(self.class_sweep_needs)
        return original(self, *args)

    monkeypatch.setattr(lce, "default_class_block", lambda rows, hidden, vocab: 37)
    monkeypatch.setattr(lce._ChunkedLinear, "class_sweep", recording)
    return sweeps


@pytest.mark.parametrize("features", [{}, *LINEAR_FEATURES.values()],
                         ids=["plain", *LINEAR_FEATURES])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cross_entropy_class_blocked(backend, class_blocks, dtype, reduction, features):
    """bfloat16 / float16 on the CPU kernels: dW and db by blocks of classes, each a GEMM
    over all rows from the rows' lse, within 2x torch's error like the row chunks."""
    check_linear(29, 16, 257, dtype, 8, reduction=reduction, **dict(features))
    assert class_blocks == [(True, True)], "the class sweep did not run (once, for dW and db)"


def test_linear_cross_entropy_class_blocked_large_lse(backend, class_blocks):
    """Rows with |lse| >= 256 take an exact (max, log-sum) split recomputed over the whole row
    (_lse_split): the float16 gradients equal the row-chunk scheme's, whose kernel recomputes
    it from the row itself, within an ulp."""
    from fastllm.ops import linear_cross_entropy as lce

    torch.manual_seed(0)
    x = torch.randn(21, 16).to(torch.float16)
    w = (torch.randn(150, 16) / 4).to(torch.float16)
    # lse near +-30000: its float32 rounding (2^-24 |lse|, 4 float16 ulps of p) would show
    b = torch.full((150,), 30000.0).to(torch.float16)
    b[::3] = -30000.0
    t = torch.randint(0, 150, (21,))
    grads = {}
    for blocked in (True, False):
        leaves = [p.clone().requires_grad_(True) for p in (x, w, b)]
        with pytest.MonkeyPatch.context() as mp:
            if not blocked:
                mp.setattr(lce, "_class_blocked", lambda *args: False)
            loss = F.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2],
                                          reduction="sum")
            grads[blocked] = torch.autograd.grad(loss, leaves)
    assert len(class_blocks) == 1
    for name, ours, theirs in zip(("input", "weight", "bias"), grads[True], grads[False]):
        torch.testing.assert_close(ours, theirs, rtol=2 ** -10, atol=0, msg=name)
    split = lce._lse_split(x, w, b, torch.logsumexp(TF.linear(x, w, b).float(), -1), 0.0)
    assert (split[:, 1] != 0).all(), "every row should take the recomputed split"


BLOCK_OP_SCRIPT = """
import itertools, os, torch
import fastllm._C
ops = torch.ops.fastllm
torch.manual_seed(0)
rows, vocab = 13, 301
outputs = []
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for ls, z_loss, softcap, weighted in itertools.product((0.0, 0.1), (0.0, 1e-3), (0.0, 30.0),
                                                          (False, True)):
        x = (torch.randn(rows, vocab) * 3).to(dtype)
        t = torch.randint(0, vocab, (rows,)); t[3] = -100
        w = torch.rand(vocab, dtype=acc) + 0.5 if weighted else None
        options = (-100, ls, z_loss, softcap)
        _, lse, _ = ops.cross_entropy_fwd(x, t, w, *options)
        g = torch.rand(rows, dtype=acc)
        whole = x.clone()
        ops.cross_entropy_bwd_inplace(g, whole, t, w, lse, *options)
        blocked = torch.empty_like(x)
        for v0 in range(0, vocab, 40):  # 40 does not divide 301
            block = x[:, v0:v0 + 40].contiguous()
            ops.cross_entropy_bwd_block_inplace(g, block, t, w, lse, None, v0, vocab, *options)
            blocked[:, v0:v0 + 40] = block
        assert torch.equal(blocked, whole), (dtype, ls, z_loss, softcap, weighted)
        outputs.append(blocked)
torch.save(outputs, os.environ["OUT"])
print("ok")
"""


def test_block_backward_op_equals_the_whole_row_on_every_cpu_isa_path(backend, tmp_path):
    """fastllm::cross_entropy_bwd_block_inplace over blocks of classes gives the whole row's
    in-place backward bit for bit (every dtype and option set, a target in some block, an
    ignored row), on every FASTLLM_CPU_ISA path, each in its own child."""
    outputs_per_cpu_isa(BLOCK_OP_SCRIPT, tmp_path)


def test_block_backward_op_errors(backend):
    ops = torch.ops.fastllm
    x = torch.randn(4, 10)
    t = torch.tensor([0, 5, 19, -100])
    lse = torch.zeros(4)
    args = (torch.ones(4), x, t, None, lse)
    with pytest.raises(RuntimeError, match=r"must lie in \[0, num_classes\)"):
        ops.cross_entropy_bwd_block_inplace(*args, None, 15, 20, -100, 0.0, 0.0, 0.0)
    with pytest.raises(IndexError, match=r"target\[2\] = 19 is out of range for 12 classes"):
        ops.cross_entropy_bwd_block_inplace(*args, None, 2, 12, -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[20\]"):
        ops.cross_entropy_bwd_block_inplace(torch.ones(4), x, t, torch.ones(10), lse, None, 0,
                                            20, -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"lse_split must have shape \[4, 2\]"):
        ops.cross_entropy_bwd_block_inplace(*args, torch.zeros(4), 0, 20, -100, 0.0, 0.0, 0.0)


def test_linear_cross_entropy_class_blocked_only_what_is_needed(backend, class_blocks):
    """Only dW (input without grad): no row chunk gradient, dW from the sweep, within 2x
    torch's error; only dX (weight without grad): no sweep."""
    torch.manual_seed(0)
    x = torch.randn(11, 8).to(torch.bfloat16)
    w = torch.randn(90, 8).to(torch.bfloat16)
    t = torch.randint(0, 90, (11,))
    for reduction in ("mean", "none"):
        grads = {}
        for name, fn, dtype in (("ours", ours_linear, torch.bfloat16),
                                ("torch", unfused, torch.bfloat16),
                                ("ref", unfused, torch.float64)):
            leaf = w.to(dtype).requires_grad_(True)
            loss = fn(x.to(dtype), leaf, t, reduction=reduction)
            grads[name], = torch.autograd.grad(loss.sum(), leaf)
        assert_within_torch_error(f"grad weight {reduction}", grads["ours"], grads["torch"],
                                  grads["ref"], torch.bfloat16)
    assert class_blocks == [(True, False), (True, False)]
    w.requires_grad_(False)
    x.requires_grad_(True)
    F.linear_cross_entropy(x, w, t).backward()
    assert x.grad is not None and len(class_blocks) == 2


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_backward_twice(backend, reduction):
    """retain_graph works: the first backward hands out the gradients the forward computed
    (scaled in place), a second one recomputes them."""
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    x_before, w_before = x.detach().clone(), w.detach().clone()
    loss = F.linear_cross_entropy(x, w, torch.randint(0, 20, (6,)), reduction=reduction).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first[0])
    torch.testing.assert_close(w.grad, 2 * first[1])
    assert torch.equal(x.detach(), x_before) and torch.equal(w.detach(), w_before)


# --------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "features",
    [{}, {"label_smoothing": 0.1, "weighted": True}, {"z_loss": 0.05, "softcap": 2.0}],
    ids=["plain", "weight_smoothing", "z_loss_softcap"],
)
def test_cross_entropy_gradcheck_cpu_float64(backend, reduction, features):
    features = dict(features)
    weight = torch.rand(13, dtype=torch.float64) + 0.5 if features.pop("weighted", False) else None
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (7,))
    t[2] = -100
    assert torch.autograd.gradcheck(
        lambda x: F.cross_entropy(x, t, weight, reduction=reduction, **features), (x,)
    )
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    # nondet_tol: gradcheck runs backward twice, and the second one recomputes the gradients
    # the first took from the forward (same math, another rounding).
    assert torch.autograd.gradcheck(
        lambda h, w, b: F.linear_cross_entropy(
            h, w, t, linear_bias=b, weight=weight, reduction=reduction, chunk_size=3, **features
        ),
        (h, w, b),
        nondet_tol=1e-12,
    )


# --------------------------------------------------------------------------- opcheck


def linear_head_inputs(rows, in_features, num_classes):
    """x, weight and bias of a linear head (float32, requiring grad), and int64 targets."""
    x = torch.randn(rows, in_features, requires_grad=True)
    weight = torch.randn(num_classes, in_features, requires_grad=True)
    bias = torch.randn(num_classes, requires_grad=True)
    target = torch.randint(0, num_classes, (rows,))
    return x, weight, bias, target


def _opcheck_samples():
    x = torch.randn(6, 33)
    t = torch.randint(0, 33, (6,))
    t[1] = -100
    w = torch.rand(33) + 0.5
    xb = x.to(torch.bfloat16)
    return [
        (x, t, None, -100, 0.0, 0.0, 0.0),
        (x, t, w, -100, 0.1, 1e-3, 0.0),
        (xb, t, w, -100, 0.2, 0.0, 5.0),
        (torch.randn(3, 40)[:, :33], torch.tensor([0, 7, 32]), None, 7, 0.0, 0.0, 0.0),
    ]


@pytest.mark.parametrize("idx", range(len(_opcheck_samples())))
def test_cross_entropy_opcheck_native(backend, idx):
    args = _opcheck_samples()[idx]
    logits = args[0].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fastllm.cross_entropy_fwd, (logits,) + args[1:])
    loss, lse, correct = torch.ops.fastllm.cross_entropy_fwd(*args)
    assert correct.dtype == torch.bool and correct.shape == loss.shape
    grad = torch.randn_like(loss)
    torch.library.opcheck(
        torch.ops.fastllm.cross_entropy_bwd, (grad, args[0], *args[1:3], lse, *args[3:])
    )
    torch.library.opcheck(
        torch.ops.fastllm.cross_entropy_bwd_inplace,
        (grad, args[0].contiguous(), *args[1:3], lse, *args[3:]),
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_linear_cross_entropy(backend, reduction):
    x, w, b, t = linear_head_inputs(9, 8, 30)
    torch.library.opcheck(
        torch.ops.fastllm.linear_cross_entropy_fwd,
        (x, w, b, t, None, -100, reduction, 0.1, 0.0, 0.0, 4, True, True, True, False, "native"),
    )


# ---------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_torch_compile_fullgraph_matches_eager(backend, reduction):
    h, w, b, t = linear_head_inputs(12, 16, 70)
    t[3] = -100

    def fused_head(h, w, b):
        return F.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, chunk_size=5,
                                      z_loss=1e-3).sum()

    def logits_then_loss(h, w, b):
        logits = torch.tanh(h) @ w.T + b
        loss = F.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1)
        return loss.sum() + F.cross_entropy(logits * 2, t, inplace_backward=True)

    for fn in (fused_head, logits_then_loss):
        eager = fn(h, w, b)
        eager_grads = torch.autograd.grad(eager, (h, w, b))
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="inductor")(h, w, b)
        grads = torch.autograd.grad(compiled, (h, w, b))
        torch.testing.assert_close(compiled, eager)
        for g, ref in zip(grads, eager_grads):
            torch.testing.assert_close(g, ref)


# ------------------------------------------------------------------ in-place backward


def test_logits_are_not_written_unless_asked(backend):
    x = torch.randn(5, 50, requires_grad=True)
    t = torch.randint(0, 50, (5,))
    logits = x * 1.0
    before = logits.detach().clone()
    F.cross_entropy(logits, t).backward()
    assert torch.equal(logits.detach(), before)
    grad_plain = x.grad.clone()
    x.grad = None
    # Asked: the logits' storage receives their gradient, and the gradient is right.
    logits = x * 1.0
    F.cross_entropy(logits, t, inplace_backward=True).backward()
    torch.testing.assert_close(x.grad, grad_plain)
    torch.testing.assert_close(logits.detach(), grad_plain)


def test_inplace_backward_second_backward_is_an_error(backend):
    x = torch.randn(5, 50, requires_grad=True)
    loss = F.cross_entropy(x * 1.0, torch.randint(0, 50, (5,)), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------------- modules


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"reduction": "sum", "label_smoothing": 0.1}, {"ignore_index": 2, "reduction": "none"}],
)
def test_cross_entropy_loss_is_drop_in(backend, kwargs):
    weight = torch.rand(20) + 0.5
    ours = fastllm.nn.CrossEntropyLoss(weight=weight, **kwargs)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, **kwargs)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(8, 20)
    t = torch.randint(0, 20, (8,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))


TORCH_LINEAR_CROSS_ENTROPY_LOSS = getattr(torch.nn, "LinearCrossEntropyLoss", None)


@pytest.mark.skipif(TORCH_LINEAR_CROSS_ENTROPY_LOSS is None,
                    reason=f"torch {torch.__version__} has no nn.LinearCrossEntropyLoss")
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_loss_is_drop_in(backend, bias):
    kwargs = dict(bias=bias, reduction="mean", label_smoothing=0.05)
    theirs = torch.nn.LinearCrossEntropyLoss(16, 90, **kwargs)
    ours = fastllm.nn.LinearCrossEntropyLoss(16, 90, chunk_size=4, **kwargs)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(11, 16, requires_grad=True)
    t = torch.randint(0, 90, (11,))
    ours_loss, theirs_loss = ours(x, t), theirs(x, t)
    torch.testing.assert_close(ours_loss, theirs_loss)
    ours_loss.backward()
    theirs_loss.backward()
    torch.testing.assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)
    if bias:
        torch.testing.assert_close(ours.linear.bias.grad, theirs.linear.bias.grad)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_loss_matches_the_unfused_loss(backend, bias):
    """On every torch, with or without torch.nn.LinearCrossEntropyLoss."""
    ours = fastllm.nn.LinearCrossEntropyLoss(16, 90, bias=bias, label_smoothing=0.05, chunk_size=4)
    x = torch.randn(11, 16, requires_grad=True)
    t = torch.randint(0, 90, (11,))
    loss = ours(x, t)
    ref = torch.nn.functional.cross_entropy(ours.linear(x), t, label_smoothing=0.05)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref, x)[0])


def test_linear_cross_entropy_loss_base_for_a_torch_without_the_module():
    """What LinearCrossEntropyLoss subclasses on a torch without torch's module (2.11, say):
    torch's constructor checks, attributes, state_dict and repr; its K-dimensional forward
    says what is missing."""
    from fastllm.nn.loss import _LinearCrossEntropyLossCompat as Compat

    kwargs = dict(bias=True, reduction="sum", ignore_index=3, label_smoothing=0.1)
    compat = Compat(16, 90, **kwargs)
    assert compat.linear.weight.shape == (90, 16) and compat.linear.bias.shape == (90,)
    assert (compat.num_classes, compat.out_features, compat.reduction, compat.ignore_index,
            compat.label_smoothing, compat.options) == (90, (), "sum", 3, 0.1, None)
    assert list(compat.state_dict()) == ["linear.weight", "linear.bias"]
    weighted = Compat(16, 90, weight=torch.rand(90))
    assert list(weighted.state_dict()) == ["weight", "linear.weight"]
    if TORCH_LINEAR_CROSS_ENTROPY_LOSS is not None:
        theirs = TORCH_LINEAR_CROSS_ENTROPY_LOSS(16, 90, **kwargs)
        assert list(compat.state_dict()) == list(theirs.state_dict())
        assert compat.extra_repr() == theirs.extra_repr()
    with pytest.raises(RuntimeError, match=r"expected weight shape to be \(90,\), got \(89,\)"):
        Compat(16, 90, weight=torch.rand(89))
    with pytest.raises(RuntimeError, match="label_smoothing to be in range"):
        Compat(16, 90, label_smoothing=1.5)
    k_dim = Compat(16, 90, out_features=(3,))
    assert k_dim.linear.weight.shape == (270, 16)
    with pytest.raises(NotImplementedError, match=r"out_features=\(3,\).*use out_features=\(\)"):
        k_dim(torch.randn(2, 16), torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------- errors


def test_out_of_range_target_names_row_and_value(backend):
    with torch.device("cpu"):  # the CPU tensors' contract (a CUDA kernel gives that row NaN)
        _out_of_range_targets_raise()


def _out_of_range_targets_raise():
    x = torch.randn(5, 32000)
    t = torch.tensor([1, 2, 3, 70000, 4])
    with pytest.raises(IndexError, match=r"cross_entropy: target\[3\] = 70000 is out of range for "
                                         r"32000 classes \(ignore_index=-100\)"):
        F.cross_entropy(x, t)
    with pytest.raises(IndexError, match=r"target\[1\] = -1 is out of range"):
        F.cross_entropy(x, torch.tensor([0, -1, -100, 5, 6]))
    with pytest.raises(IndexError, match=r"target\[2\] = 40 is out of range for 40 classes"):
        F.linear_cross_entropy(torch.randn(4, 8), torch.randn(40, 8), torch.tensor([0, 1, 40, 2]),
                               chunk_size=2)


def _randn(*shape):
    return torch.randn(*shape) if shape else torch.randn(4, 8)


def _classes(n=4, high=8):
    return torch.randint(0, high, (n,))


@pytest.mark.parametrize("backend", ["native", "reference"], indirect=True)
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: F.cross_entropy(_randn(), _classes(3)), ValueError,
         r"target must have shape \[4\] \(input's shape \[4, 8\] without the class dimension 1\), "
         r"got \[3\]"),
        (lambda: F.cross_entropy(_randn(), _classes(), torch.rand(7)), ValueError,
         r"weight must have shape \[8\] \(one weight per class\), got \[7\]"),
        (lambda: F.cross_entropy(_randn(), _classes().int()), TypeError,
         r"target must be int64 class indices \(or uint8\), got torch.int32"),
        (lambda: F.cross_entropy(_randn(), _classes(), reduction="avg"), ValueError,
         r"reduction must be 'none', 'mean' or 'sum', got 'avg'"),
        (lambda: F.cross_entropy(_randn(), _classes(), label_smoothing=1.5), ValueError,
         r"label_smoothing must be in \[0, 1\], got 1.5"),
        (lambda: F.cross_entropy(_randn(), _classes(), z_loss=-1.0), ValueError,
         r"z_loss must be finite and non-negative, got -1.0"),
        (lambda: F.cross_entropy(torch.arange(8).view(1, 8), _classes(1)), TypeError,
         r"input must be float32, bfloat16, float16 or float64, got torch.int64"),
        (lambda: F.linear_cross_entropy(_randn(), _randn(10, 9), _classes()), ValueError,
         r"linear_weight must have shape \[num_classes, 8\] \(in_features = input.shape\[-1\]\), "
         r"got \[10, 9\]"),
        (lambda: F.linear_cross_entropy(_randn(), _randn(10, 8), _classes(),
                                        linear_bias=torch.randn(9)), ValueError,
         r"linear_bias must have shape \[10\] \(num_classes\), got \[9\]"),
        (lambda: F.linear_cross_entropy(_randn(), _randn(10, 8).double(), _classes()), TypeError,
         r"linear_weight must have the input's dtype torch.float32, got torch.float64"),
        (lambda: F.linear_cross_entropy(_randn(), _randn(10, 8), _classes(5)), ValueError,
         r"target must have shape \[4\] \(input's shape without in_features\), got \[5\]"),
        (lambda: F.linear_cross_entropy(_randn(), _randn(10, 8), _classes(), chunk_size=0),
         ValueError, r"chunk_size must be a positive number of rows, got 0"),
    ],
)
def test_cross_entropy_bad_input_is_named(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


_ops = torch.ops.fastllm
_OPTIONS = (-100, 0.0, 0.0, 0.0)  # ignore_index, label_smoothing, z_loss, softcap


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: _ops.cross_entropy_fwd(_randn(2, 3, 4), _classes(2), None, *_OPTIONS),
         r"logits must be 2-D \(rows, vocab\), got shape \[2, 3, 4\]"),
        (lambda: _ops.cross_entropy_fwd(_randn(), _classes(3), None, *_OPTIONS),
         r"target must have shape \[4\] \(one class index per row of logits\), got \[3\]"),
        (lambda: _ops.cross_entropy_fwd(_randn(), _classes(), torch.ones(9), *_OPTIONS),
         r"weight must have shape \[8\] \(one weight per class\), got \[9\]"),
        (lambda: _ops.cross_entropy_fwd(_randn(), _classes(), None, -100, 0.0, 0.0, -1.0),
         r"softcap must be non-negative \(0 disables it\) and finite in float32, got -1"),
        (lambda: _ops.cross_entropy_bwd(torch.ones(4), _randn(), _classes(), None,
                                        torch.zeros(3), *_OPTIONS),
         r"lse must have shape \[4\] \(one value per row of logits\), got \[3\]"),
        (lambda: _ops.cross_entropy_bwd_inplace(torch.ones(4), _randn(8, 4).t(), _classes(),
                                                None, torch.zeros(4), *_OPTIONS),
         r"logits must have unit stride along the vocab dimension to receive the gradient "
         r"in place"),
    ],
)
def test_cross_entropy_bad_input_direct_op_call_is_named(backend, call, match):
    with pytest.raises((RuntimeError, TypeError, ValueError, IndexError), match=match):
        call()


# ------------------------------------------------------------- scalar CPU code path


SCALAR_PATH_SCRIPT = r"""
import torch, torch.nn.functional as TF
import fastllm.functional as F
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    x = (torch.randn(7, 1003) * 3).to(dtype).requires_grad_(True)
    t = torch.randint(0, 1003, (7,)); t[2] = -100
    w = torch.rand(1003).to(dtype) + 0.5
    for kw in ({}, {"label_smoothing": 0.1, "weight": w}, {"softcap": 4.0, "z_loss": 1e-3}):
        ours = F.cross_entropy(x, t, reduction="none", **kw)
        g, = torch.autograd.grad(ours.sum(), x)
        x64 = x.detach().double().requires_grad_(True)
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        z = x64 if not kw64.get("softcap") else kw64["softcap"] * torch.tanh(x64 / kw64["softcap"])
        ref = TF.cross_entropy(z, t, reduction="none", weight=kw64.get("weight"),
                               label_smoothing=kw64.get("label_smoothing", 0.0))
        ref = ref + kw64.get("z_loss", 0.0) * torch.logsumexp(z, -1).square() * (t != -100)
        g64, = torch.autograd.grad(ref.sum(), x64)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(g.double(), g64, rtol=tol, atol=tol)
# Extreme rows (tests/test_cross_entropy_hostile.py runs them on the AVX2 path): smoothing
# next to a logit near -FLT_MAX, and ties at 1e30, whose gradient needs backward's exact lse.
big = torch.finfo(torch.float32).max
x = torch.tensor([[-0.9 * big, 0.0, 1.0, 2.0, 3.0, 4.0], [1e30, 1e30, 1e30, 0.0, 0.0, 0.0]],
                 requires_grad=True)
t = torch.tensor([0, 1])
for ls in (0.0, 0.3):
    ours = F.cross_entropy(x, t, reduction="none", label_smoothing=ls)
    g, = torch.autograd.grad(ours.sum(), x)
    xt = x.detach().clone().requires_grad_(True)
    theirs = TF.cross_entropy(xt, t, reduction="none", label_smoothing=ls)
    gt, = torch.autograd.grad(theirs.sum(), xt)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, gt, rtol=1e-6, atol=1e-6)
print("ok")
"""


def test_scalar_cpu_path_matches_torch(backend):
    """FASTLLM_CPU_ISA=scalar runs the portable kernels (chosen once per process, hence the
    subprocess), which every non-AVX2 CPU uses."""
    env = dict(os.environ, FASTLLM_CPU_ISA="scalar", FASTLLM_BACKEND="native")
    result = subprocess.run([sys.executable, "-c", SCALAR_PATH_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ------------------------------------------ every CPU instruction-set path, forced

# Run in a child process per FASTLLM_CPU_ISA value (the path is chosen once per process):
# every dtype and option set within the 2x rule of tests/accuracy.py, vocab sizes that leave
# every tail length and span several of the forward's 2048-logit blocks, and the same bits on
# 1 and 2 threads. The outputs go to OUT so the parent can tell the paths apart.
ISA_PATH_SCRIPT = r"""
import os, torch, torch.nn.functional as TF
import fastllm.functional as F
from tests.accuracy import assert_within_torch_error

def composed(x, t, kw):
    z = x if not kw.get("softcap") else kw["softcap"] * torch.tanh(x / kw["softcap"])
    loss = TF.cross_entropy(z, t, reduction="none", weight=kw.get("weight"),
                            label_smoothing=kw.get("label_smoothing", 0.0))
    if kw.get("z_loss"):
        loss = loss + kw["z_loss"] * torch.logsumexp(z.float(), -1).to(z.dtype).square() * (t != -100)
    return loss

torch.set_num_threads(1)
torch.manual_seed(0)
outputs = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for vocab in (37, 1003, 4133):
        x = (torch.randn(6, vocab) * 3).to(dtype)
        t = torch.randint(0, vocab, (6,)); t[2] = -100
        w = torch.rand(vocab) + 0.5
        # {} and the 4th: the bfloat16 rows' own loop (no weight, no softcap), the 4th with
        # label smoothing's coef_w and z_loss in its coefficients. Softcap 4: vectors of
        # logits below and above the tanh's 0.625 x cap; softcap 30: all below, which the
        # vector paths' tanh_vec answers without its exp.
        for kw in ({}, {"label_smoothing": 0.1, "weight": w}, {"softcap": 4.0, "z_loss": 1e-3},
                   {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 30.0}):
            xs = {k: x.detach().to(k).requires_grad_(True) for k in (dtype, torch.float64)}
            kws = {k: {n: (v.to(k) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
                   for k in (dtype, torch.float64)}
            ours = F.cross_entropy(xs[dtype], t, reduction="none", **kw)
            g, = torch.autograd.grad(ours.sum(), xs[dtype])
            theirs = composed(xs[dtype], t, kws[dtype])
            tg, = torch.autograd.grad(theirs.sum(), xs[dtype])
            ref = composed(xs[torch.float64], t, kws[torch.float64])
            rg, = torch.autograd.grad(ref.sum(), xs[torch.float64])
            name = f"{dtype} vocab={vocab} {sorted(kw)}"
            assert_within_torch_error(name + " loss", ours.detach(), theirs.detach(), ref.detach(), dtype)
            assert_within_torch_error(name + " grad", g, tg, rg, dtype)
            outputs += [ours.detach(), g]
# Thread-count determinism: rows are split over threads, each row computed by one thread.
x = torch.randn(64, 5001).to(torch.bfloat16).requires_grad_(True)
t = torch.randint(0, 5001, (64,)); t[::7] = -100
runs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    loss = F.cross_entropy(x, t, label_smoothing=0.1)
    g, = torch.autograd.grad(loss, x)
    runs.append((loss, g))
assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "threads"
# An upstream gradient that is NaN, whatever its bits, makes its row's gradient NaN: the AVX2
# and AVX-512 paths' bfloat16 row loop rounds without a NaN select, which a NaN with its low
# 16 bits set would turn into -0.0 or 0 (0x7FFFFFFF, 0xFFFFFFFF), so such rows take the
# generic loop.
# (The op itself: autograd hands it a NaN with those bits cleared.)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(4, 1003).to(dtype)
    t = torch.tensor([1, 2, 3, 4])
    _, lse, _ = torch.ops.fastllm.cross_entropy_fwd(x, t, None, -100, 0.0, 0.0, 0.0)
    g = torch.ones(4)
    g.view(torch.int32)[1] = 0x7FFFFFFF
    g.view(torch.int32)[2] = -1  # 0xFFFFFFFF
    torch.ops.fastllm.cross_entropy_bwd_inplace(g, x, t, None, lse, -100, 0.0, 0.0, 0.0)
    assert x[1:3].isnan().all() and x[[0, 3]].isfinite().all(), f"{dtype} NaN upstream"
torch.save(outputs, os.environ["OUT"])
print("ok")
"""




def test_every_cpu_isa_path_within_the_2x_rule_and_thread_deterministic(backend, tmp_path):
    """FASTLLM_CPU_ISA unset (the best path: AVX-512 on a CPU with F/BW/DQ/VL/BF16), =avx2 and
    =scalar, each in its own child: every dtype and option set within 2x torch's error, the
    same bits on 1 and 2 threads. On an AVX-512 CPU the unset run must differ from the AVX2
    run in some bit (its exp differs), which shows that the AVX-512 path really ran."""
    results = outputs_per_cpu_isa(ISA_PATH_SCRIPT, tmp_path)
    differs = lambda a, b: any(not torch.equal(u, v) for u, v in zip(results[a], results[b]))
    assert differs("avx2", "scalar")
    if cpu_has_avx512_path():
        assert differs("", "avx2")


# ----------------------------------- logged outputs (return_z_loss, return_token_accuracy)


def _logged_inputs(rows=13, vocab=40):
    x = torch.randn(rows, vocab)
    t = torch.randint(0, vocab, (rows,))
    t[1::3] = x.argmax(-1)[1::3]
    t[::5] = -100
    return x, t


def test_logged_outputs_are_a_named_tuple(backend):
    """CrossEntropyOutput(loss, z_loss, token_accuracy): unrequested fields None, the loss the
    one returned without flags, tuple unpacking as Liger-Kernel's callers do."""
    x, t = _logged_inputs()
    plain = F.cross_entropy(x, t, z_loss=1e-2)
    both = F.cross_entropy(x, t, z_loss=1e-2, return_z_loss=True, return_token_accuracy=True)
    loss, z_term, accuracy = both
    assert isinstance(both, tuple) and isinstance(both, F.CrossEntropyOutput)
    assert torch.equal(loss, plain) and z_term is both.z_loss and accuracy is both.token_accuracy
    only_z = F.cross_entropy(x, t, z_loss=1e-2, return_z_loss=True)
    assert only_z.token_accuracy is None and torch.equal(only_z.z_loss, z_term)
    only_acc = F.cross_entropy(x, t, return_token_accuracy=True)
    assert only_acc.z_loss is None and torch.equal(only_acc.token_accuracy, accuracy)
    valid = t != -100
    torch.testing.assert_close(
        accuracy, (x.argmax(-1) == t)[valid].float().mean())  # no ties in random logits
    torch.testing.assert_close(z_term, 1e-2 * torch.logsumexp(x, -1)[valid].square().mean())
    assert F.cross_entropy(x, t, return_z_loss=True).z_loss == 0  # z_loss=0: a zero term
    assert "CrossEntropyOutput" in F.__all__


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logged_outputs_as_the_reference_backend(backend, reduction):
    """The kernels' outputs and the reference backend's, through cross_entropy ((N, C, d1)
    layout: the per-row outputs take the loss's shape), its in-place backward, and
    linear_cross_entropy."""
    x = torch.randn(3, 30, 5)
    t = torch.randint(0, 30, (3, 5))
    t[0, 1] = -100
    t[1] = x.argmax(1)[1]
    w = torch.rand(30) + 0.5
    opts = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=10.0,
                return_z_loss=True, return_token_accuracy=True)
    h, lw = torch.randn(15, 8), torch.randn(30, 8)
    lt = t.reshape(-1)

    def outputs():
        ce = F.cross_entropy(x, t, **opts)
        inplace = F.cross_entropy(x.clone().requires_grad_(True), t, inplace_backward=True, **opts)
        linear = F.linear_cross_entropy(h, lw, lt, chunk_size=4, **opts)
        return ce, inplace, linear

    ours = outputs()
    with fastllm.use_backend("reference"):
        want = outputs()
    for got, ref in zip(ours, want):
        assert got.token_accuracy.shape == got.loss.shape == got.z_loss.shape
        torch.testing.assert_close(got.loss.detach(), ref.loss)
        torch.testing.assert_close(got.z_loss, ref.z_loss)
        torch.testing.assert_close(got.token_accuracy, ref.token_accuracy, rtol=0, atol=0)


def test_logged_outputs_leave_the_gradient_alone(backend):
    """Only the loss is differentiable; its gradient is the same with and without the flags,
    also with inplace_backward (the z term's gradient is already inside the loss's)."""
    x, t = _logged_inputs()
    grads = []
    for flags in ({}, {"return_z_loss": True, "return_token_accuracy": True}):
        for inplace in (False, True):
            leaf = x.clone().requires_grad_(True)
            out = F.cross_entropy(leaf * 1.0, t, z_loss=1e-2, inplace_backward=inplace, **flags)
            loss = out.loss if flags else out
            if flags:
                assert not out.z_loss.requires_grad and not out.token_accuracy.requires_grad
            loss.backward()
            grads.append(leaf.grad)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_logged_outputs_torch_compile_fullgraph(backend):
    h, w, b, t = linear_head_inputs(12, 16, 70)
    t[3] = -100

    def step(h, w, b):
        logits = h @ w.T + b
        ce = F.cross_entropy(logits, t, z_loss=1e-3, softcap=20.0, return_z_loss=True,
                             return_token_accuracy=True)
        lce = F.linear_cross_entropy(h, w, t, linear_bias=b, z_loss=1e-3, chunk_size=5,
                                     reduction="none", return_z_loss=True,
                                     return_token_accuracy=True)
        return ce.loss + lce.loss.sum(), ce.z_loss, ce.token_accuracy, lce.z_loss, \
            lce.token_accuracy

    eager = step(h, w, b)
    eager_grads = torch.autograd.grad(eager[0], (h, w, b))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")(h, w, b)
    grads = torch.autograd.grad(compiled[0], (h, w, b))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_logged_outputs_of_the_modules(backend):
    x, t = _logged_inputs(vocab=20)
    ce = fastllm.nn.CrossEntropyLoss(z_loss=1e-2, return_z_loss=True, return_token_accuracy=True)
    assert "return_z_loss=True" in repr(ce) and "return_token_accuracy=True" in repr(ce)
    want = F.cross_entropy(x, t, z_loss=1e-2, return_z_loss=True, return_token_accuracy=True)
    for got, ref in zip(ce(x, t), want):
        torch.testing.assert_close(got, ref)
    lce = fastllm.nn.LinearCrossEntropyLoss(16, 20, z_loss=1e-2, chunk_size=4,
                                            return_token_accuracy=True)
    h = torch.randn(13, 16)
    out = lce(h, t)
    want = F.linear_cross_entropy(h, lce.linear.weight, t, z_loss=1e-2,
                                  return_token_accuracy=True)
    assert out.z_loss is None
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(out.token_accuracy, want.token_accuracy)


def test_logged_outputs_zero_classes(backend):
    """C = 0 (every target ignored, as torch requires): the mean accuracy and z term are
    NaN like the mean loss, "none" gives zeros."""
    t = torch.full((4,), -100)
    for fn in (lambda **kw: F.cross_entropy(torch.randn(4, 0), t, **kw),
               lambda **kw: F.linear_cross_entropy(torch.randn(4, 3), torch.randn(0, 3), t, **kw)):
        out = fn(z_loss=1e-2, return_z_loss=True, return_token_accuracy=True)
        assert out.loss.isnan() and out.z_loss.isnan() and out.token_accuracy.isnan()
        out = fn(reduction="none", return_z_loss=True, return_token_accuracy=True)
        assert torch.equal(out.z_loss, torch.zeros(4))
        assert torch.equal(out.token_accuracy, torch.zeros(4))
