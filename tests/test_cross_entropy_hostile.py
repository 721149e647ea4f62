"""Hostile inputs for the cross-entropy family, on every backend (tests/hostile.py).

Four parts:
  - tables of bad arguments for each public function (cross_entropy, linear_cross_entropy,
    the nn modules) and each raw op (cross_entropy_fwd / _bwd / _bwd_inplace of every op
    set, linear_cross_entropy_fwd / _bwd for every backend), each of which must raise a
    clear error naming the argument;
  - inputs torch accepts (layouts, strides, zero rows, zero classes, option edges), whose
    result, forward and backward, must be torch's;
  - extreme logits (1e4 .. the dtype's maximum, inf, -inf, NaN) compared with torch;
  - a seeded random fuzz of forward and backward against torch in float64.
The launcher that runs without the ops' checks (what a GPU runs) is called with wild
targets in a child process, so that an out-of-bounds access fails one test, not the run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastllm
import fastllm.functional as F
from fastllm.ops.cross_entropy import IMPLS
from tests.accuracy import ATOL, max_err
from tests.hostile import (
    PUBLIC_BACKENDS,
    RAW_BACKENDS,
    case_ids,
    expect_clear_error,
    raw_ops,
    run_isolated,
)

FAMILY = "cross_entropy"

nan, inf = math.nan, math.inf
# The dtypes each backend's kernels take (the CUDA and Triton kernels compute in float32 and
# refuse float64 by name).
DTYPES = {
    "native": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda_emu": (torch.float32, torch.bfloat16, torch.float16),
    "reference": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


def _x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (4, 8)), dtype=dtype)


def _t(n=4, classes=8, dtype=torch.int64):
    return torch.randint(0, classes, (n,)).to(dtype)


def _w(n=8, dtype=torch.float32):
    return (torch.rand(n) + 0.5).to(dtype)


# ----------------------------------------------------------- public: bad arguments
# (name, call, words the error must contain); every call builds its own tensors.

CROSS_ENTROPY_CASES = [
    ("input int64", lambda: F.cross_entropy(torch.ones(4, 8, dtype=torch.int64), _t()),
     ("input", "float32", "torch.int64")),
    ("input bool", lambda: F.cross_entropy(torch.ones(4, 8, dtype=torch.bool), _t()),
     ("input", "torch.bool")),
    ("input complex", lambda: F.cross_entropy(_x().to(torch.complex64), _t()), ("input",)),
    ("input list", lambda: F.cross_entropy([[0.0] * 8] * 4, _t()), ("input", "Tensor")),
    ("input 0-d", lambda: F.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
     ("input", "class dimension")),
    ("target int32", lambda: F.cross_entropy(_x(), _t(dtype=torch.int32)),
     ("target", "int64", "torch.int32")),
    ("target int16", lambda: F.cross_entropy(_x(), _t(dtype=torch.int16)), ("target", "int64")),
    ("target bool", lambda: F.cross_entropy(_x(), torch.ones(4, dtype=torch.bool)),
     ("target", "int64", "torch.bool")),
    ("target list", lambda: F.cross_entropy(_x(), [1, 2, 3, 4]), ("target", "Tensor")),
    ("target rows", lambda: F.cross_entropy(_x(), _t(3)), ("target", "[4]", "[3]")),
    ("target 2-D", lambda: F.cross_entropy(_x(), _t().view(4, 1)), ("target", "[4]", "[4, 1]")),
    ("target (N, d1)", lambda: F.cross_entropy(_x(2, 8, 3), _t(6).view(3, 2)),
     ("target", "[2, 3]", "[3, 2]")),
    ("target for (C,)", lambda: F.cross_entropy(_x(8), _t(1)), ("target", "[]", "[1]")),
    ("probabilities shape", lambda: F.cross_entropy(_x(), torch.rand(4, 7)),
     ("target", "class probabilities", "[4, 8]", "[4, 7]")),
    ("probabilities z_loss", lambda: F.cross_entropy(_x(), torch.rand(4, 8), z_loss=1e-3),
     ("z_loss", "class-index")),
    ("target on meta", lambda: F.cross_entropy(_x(), _t().to("meta")), ("target", "device")),
    ("weight int", lambda: F.cross_entropy(_x(), _t(), torch.ones(8, dtype=torch.int64)),
     ("weight", "float32", "torch.int64")),
    ("weight bool", lambda: F.cross_entropy(_x(), _t(), torch.ones(8, dtype=torch.bool)),
     ("weight",)),
    ("weight length", lambda: F.cross_entropy(_x(), _t(), _w(7)), ("weight", "[8]", "[7]")),
    ("weight 2-D", lambda: F.cross_entropy(_x(), _t(), _w().view(1, 8)),
     ("weight", "[8]", "[1, 8]")),
    ("weight list", lambda: F.cross_entropy(_x(), _t(), [1.0] * 8), ("weight", "Tensor")),
    ("weight on meta", lambda: F.cross_entropy(_x(), _t(), _w().to("meta")),
     ("weight", "device")),
    ("weight requires grad", lambda: F.cross_entropy(_x(), _t(), _w().requires_grad_()),
     ("weight", "requires grad")),
    ("ignore_index float", lambda: F.cross_entropy(_x(), _t(), ignore_index=1.5),
     ("ignore_index", "int", "float")),
    ("ignore_index 2**70", lambda: F.cross_entropy(_x(), _t(), ignore_index=2**70),
     ("ignore_index", "int64")),
    ("ignore_index -1, target -100", lambda: F.cross_entropy(
        _x(), torch.tensor([0, -100, 1, -1]), ignore_index=-1),
     ("target[1] = -100", "out of range", "ignore_index=-1")),
    ("reduction bogus", lambda: F.cross_entropy(_x(), _t(), reduction="bogus"),
     ("reduction", "'bogus'")),
    ("reduction None", lambda: F.cross_entropy(_x(), _t(), reduction=None),
     ("reduction", "None")),
    ("label_smoothing -0.1", lambda: F.cross_entropy(_x(), _t(), label_smoothing=-0.1),
     ("label_smoothing", "[0, 1]", "-0.1")),
    ("label_smoothing 1.5", lambda: F.cross_entropy(_x(), _t(), label_smoothing=1.5),
     ("label_smoothing", "1.5")),
    ("label_smoothing nan", lambda: F.cross_entropy(_x(), _t(), label_smoothing=nan),
     ("label_smoothing", "nan")),
    ("label_smoothing str", lambda: F.cross_entropy(_x(), _t(), label_smoothing="0.1"),
     ("label_smoothing", "float", "str")),
    ("z_loss -1", lambda: F.cross_entropy(_x(), _t(), z_loss=-1.0), ("z_loss", "-1.0")),
    ("z_loss nan", lambda: F.cross_entropy(_x(), _t(), z_loss=nan), ("z_loss", "nan")),
    ("z_loss inf", lambda: F.cross_entropy(_x(), _t(), z_loss=inf), ("z_loss", "inf")),
    ("softcap -1", lambda: F.cross_entropy(_x(), _t(), softcap=-1.0), ("softcap", "-1.0")),
    ("softcap nan", lambda: F.cross_entropy(_x(), _t(), softcap=nan), ("softcap", "nan")),
    ("softcap inf", lambda: F.cross_entropy(_x(), _t(), softcap=inf), ("softcap", "inf")),
    ("inplace_backward str", lambda: F.cross_entropy(_x(), _t(), inplace_backward="yes"),
     ("inplace_backward", "bool")),
    ("return_z_loss int", lambda: F.cross_entropy(_x(), _t(), return_z_loss=1),
     ("return_z_loss", "bool", "int")),
    ("return_token_accuracy str", lambda: F.cross_entropy(_x(), _t(), return_token_accuracy="y"),
     ("return_token_accuracy", "bool", "str")),
    ("return_token_accuracy, probabilities", lambda: F.cross_entropy(
        _x(), torch.rand(4, 8).softmax(-1), return_token_accuracy=True),
     ("return_token_accuracy", "class-index targets")),
    ("target = C", lambda: F.cross_entropy(_x(), torch.tensor([0, 1, 8, 2])),
     ("cross_entropy", "target[2] = 8", "out of range for 8 classes")),
    ("target -1", lambda: F.cross_entropy(_x(), torch.tensor([0, -1, -100, 2])),
     ("target[1] = -1",)),
    ("target huge", lambda: F.cross_entropy(_x(), torch.tensor([0, 2**62, 1, 2])),
     ("target[1] = 4611686018427387904",)),
    ("target (N, d1) range", lambda: F.cross_entropy(
        _x(2, 8, 3), torch.tensor([[0, 1, 2], [3, 4, 9]])), ("target[1, 2] = 9",)),
    ("target 0-d range", lambda: F.cross_entropy(_x(8), torch.tensor(8)),
     ("target = 8", "8 classes")),
    ("zero classes, target 0", lambda: F.cross_entropy(_x(4, 0), torch.tensor([-100, 0, 0, 0])),
     ("target[1] = 0", "0 classes")),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CROSS_ENTROPY_CASES, ids=case_ids(CROSS_ENTROPY_CASES))
def test_cross_entropy_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


def _lce(input=None, linear_weight=None, target=None, **kw):
    input = _x(4, 6) if input is None else input
    linear_weight = _x(8, 6) if linear_weight is None else linear_weight
    target = _t() if target is None else target
    return F.linear_cross_entropy(input, linear_weight, target, **kw)


LINEAR_CROSS_ENTROPY_CASES = [
    ("input int", lambda: _lce(input=torch.ones(4, 6, dtype=torch.int32)), ("input", "int32")),
    ("input 0-d", lambda: _lce(input=torch.tensor(1.0)), ("input", "0-d")),
    ("linear_weight int", lambda: _lce(linear_weight=torch.ones(8, 6, dtype=torch.int64)),
     ("linear_weight", "torch.int64")),
    ("linear_weight 1-D", lambda: _lce(linear_weight=_x(8)), ("linear_weight", "[8]")),
    ("linear_weight in_features", lambda: _lce(linear_weight=_x(8, 5)),
     ("linear_weight", "[num_classes, 6]", "[8, 5]")),
    ("linear_weight dtype", lambda: _lce(linear_weight=_x(8, 6).double()),
     ("linear_weight", "torch.float32", "torch.float64")),
    ("linear_weight on meta", lambda: _lce(linear_weight=_x(8, 6).to("meta")),
     ("linear_weight", "device")),
    ("linear_bias shape", lambda: _lce(linear_bias=_x(7)), ("linear_bias", "[8]", "[7]")),
    ("linear_bias dtype", lambda: _lce(linear_bias=_x(8).half()),
     ("linear_bias", "torch.float16")),
    ("linear_bias list", lambda: _lce(linear_bias=[0.0] * 8), ("linear_bias", "Tensor")),
    ("target rows", lambda: _lce(target=_t(5)), ("target", "[4]", "[5]")),
    ("target int32", lambda: _lce(target=_t(dtype=torch.int32)), ("target", "int64")),
    ("target float", lambda: _lce(target=torch.rand(4, 8)), ("target", "int64")),
    ("target on meta", lambda: _lce(target=_t().to("meta")), ("target", "device")),
    ("weight length", lambda: _lce(weight=_w(9)), ("weight", "[8]", "[9]")),
    ("weight int", lambda: _lce(weight=torch.ones(8, dtype=torch.int32)), ("weight",)),
    ("weight requires grad", lambda: _lce(weight=_w().requires_grad_()),
     ("weight", "requires grad")),
    ("chunk_size 0", lambda: _lce(chunk_size=0), ("chunk_size", "0")),
    ("chunk_size -3", lambda: _lce(chunk_size=-3), ("chunk_size", "-3")),
    ("chunk_size float", lambda: _lce(chunk_size=2.5), ("chunk_size", "float")),
    ("chunk_size bool", lambda: _lce(chunk_size=True), ("chunk_size", "bool")),
    ("return_z_loss None", lambda: _lce(return_z_loss=None), ("return_z_loss", "bool")),
    ("return_token_accuracy int", lambda: _lce(return_token_accuracy=1),
     ("return_token_accuracy", "bool", "int")),
    ("reduction bogus", lambda: _lce(reduction="bogus"), ("reduction", "'bogus'")),
    ("ignore_index str", lambda: _lce(ignore_index="-100"), ("ignore_index", "str")),
    ("label_smoothing 2", lambda: _lce(label_smoothing=2.0), ("label_smoothing", "2.0")),
    ("z_loss nan", lambda: _lce(z_loss=nan), ("z_loss", "nan")),
    ("softcap -2", lambda: _lce(softcap=-2.0), ("softcap", "-2.0")),
    ("target = C", lambda: _lce(target=torch.tensor([0, 1, 8, 2]), chunk_size=2),
     ("linear_cross_entropy", "target[2] = 8", "8 classes")),
    ("target (B, T) range", lambda: _lce(input=_x(2, 3, 6), target=torch.tensor(
        [[0, 1, 2], [-5, 4, 5]])), ("target[1, 0] = -5",)),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", LINEAR_CROSS_ENTROPY_CASES,
                         ids=case_ids(LINEAR_CROSS_ENTROPY_CASES))
def test_linear_cross_entropy_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


MODULE_CASES = [
    ("CE reduction", lambda: fastllm.nn.CrossEntropyLoss(reduction="avg")(_x(), _t()),
     ("reduction", "'avg'")),
    ("CE z_loss", lambda: fastllm.nn.CrossEntropyLoss(z_loss=-0.5)(_x(), _t()),
     ("z_loss", "-0.5")),
    ("CE softcap nan", lambda: fastllm.nn.CrossEntropyLoss(softcap=nan)(_x(), _t()),
     ("softcap", "nan")),
    ("CE label_smoothing", lambda: fastllm.nn.CrossEntropyLoss(label_smoothing=1.01)(_x(), _t()),
     ("label_smoothing", "1.01")),
    ("CE weight length", lambda: fastllm.nn.CrossEntropyLoss(weight=_w(3))(_x(), _t()),
     ("weight", "[8]", "[3]")),
    ("CE target", lambda: fastllm.nn.CrossEntropyLoss()(_x(), _t(dtype=torch.int32)),
     ("target", "int64")),
    ("LCE chunk_size", lambda: fastllm.nn.LinearCrossEntropyLoss(6, 8, chunk_size=0)(
        _x(4, 6), _t()), ("chunk_size", "0")),
    ("LCE in_features", lambda: fastllm.nn.LinearCrossEntropyLoss(6, 8)(_x(4, 5), _t()),
     ("linear_weight", "[num_classes, 5]", "[8, 6]")),
    ("LCE z_loss inf", lambda: fastllm.nn.LinearCrossEntropyLoss(6, 8, z_loss=inf)(
        _x(4, 6), _t()), ("z_loss", "inf")),
    ("LCE out_features z_loss", lambda: fastllm.nn.LinearCrossEntropyLoss(
        6, 8, out_features=(2,), z_loss=0.1)(_x(4, 2, 6), _t(8).view(4, 2)),
     ("z_loss", "out_features")),
    ("LCE target range", lambda: fastllm.nn.LinearCrossEntropyLoss(6, 8)(
        _x(4, 6), torch.tensor([0, 8, 1, 2])), ("target[1] = 8",)),
    ("CE return_token_accuracy", lambda: fastllm.nn.CrossEntropyLoss(
        return_token_accuracy="yes")(_x(), _t()), ("return_token_accuracy", "bool")),
    ("LCE out_features return_z_loss", lambda: fastllm.nn.LinearCrossEntropyLoss(
        6, 8, out_features=(2,), return_z_loss=True)(_x(4, 2, 6), _t(8).view(4, 2)),
     ("return_z_loss", "out_features")),
]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", MODULE_CASES, ids=case_ids(MODULE_CASES))
def test_modules_bad_arguments(backend, case):
    _, call, words = case
    expect_clear_error(call, *words)


# ---------------------------------------------------- public: what torch accepts, as torch


def _as_torch(ours, theirs, inputs):
    """Forward and backward of ``ours`` and ``theirs`` on fresh leaves from ``inputs`` (the
    float ones get gradients): equal, NaN where torch has NaN."""
    def run(fn):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        loss = fn(*leaves)
        differentiable = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(loss, differentiable, torch.ones_like(loss),
                                    allow_unused=True)
        return loss.detach(), grads

    (our_loss, our_grads), (their_loss, their_grads) = run(ours), run(theirs)
    assert our_loss.dtype == their_loss.dtype and our_loss.shape == their_loss.shape
    torch.testing.assert_close(our_loss, their_loss, equal_nan=True)
    for ours_grad, their_grad in zip(our_grads, their_grads):
        assert (ours_grad is None) == (their_grad is None)
        if ours_grad is not None:
            torch.testing.assert_close(ours_grad, their_grad, equal_nan=True)


TORCH_ACCEPTS = [
    # (name, inputs, our call, torch's call); layouts are views taken inside the calls
    ("transposed logits", lambda: (_x(9, 5), _t(5, 9)),
     lambda x, t: F.cross_entropy(x.t(), t), lambda x, t: TF.cross_entropy(x.t(), t)),
    ("strided rows", lambda: (_x(5, 12), _t(5, 9)),
     lambda x, t: F.cross_entropy(x[:, 2:11], t, reduction="none"),
     lambda x, t: TF.cross_entropy(x[:, 2:11], t, reduction="none")),
    ("every other row", lambda: (_x(10, 9), _t(5, 9)),
     lambda x, t: F.cross_entropy(x[::2], t, reduction="sum", label_smoothing=0.2),
     lambda x, t: TF.cross_entropy(x[::2], t, reduction="sum", label_smoothing=0.2)),
    ("(N, d1, C) as (N, C, d1)", lambda: (_x(2, 5, 9), torch.randint(0, 9, (2, 5))),
     lambda x, t: F.cross_entropy(x.transpose(1, 2), t, reduction="none"),
     lambda x, t: TF.cross_entropy(x.transpose(1, 2), t, reduction="none")),
    ("expanded logits", lambda: (_x(1, 9), _t(4, 9)),
     lambda x, t: F.cross_entropy(x.expand(4, 9), t, inplace_backward=True),
     lambda x, t: TF.cross_entropy(x.expand(4, 9), t)),
    ("uint8 target", lambda: (_x(), _t(dtype=torch.uint8)),
     lambda x, t: F.cross_entropy(x, t), lambda x, t: TF.cross_entropy(x, t)),
    ("ignore_index in range", lambda: (_x(6, 8), torch.tensor([3, 1, 3, 0, 7, 3])),
     lambda x, t: F.cross_entropy(x, t, ignore_index=3),
     lambda x, t: TF.cross_entropy(x, t, ignore_index=3)),
    ("ignore_index >= C", lambda: (_x(), torch.tensor([100, 1, 2, 100])),
     lambda x, t: F.cross_entropy(x, t, ignore_index=100, reduction="none"),
     lambda x, t: TF.cross_entropy(x, t, ignore_index=100, reduction="none")),
    ("every row ignored", lambda: (_x(), torch.full((4,), -100)),
     lambda x, t: F.cross_entropy(x, t, label_smoothing=0.3),
     lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.3)),
    ("one class", lambda: (_x(5, 1), torch.zeros(5, dtype=torch.int64)),
     lambda x, t: F.cross_entropy(x, t, label_smoothing=0.5),
     lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.5)),
    ("label_smoothing 1", lambda: (_x(), _t()),
     lambda x, t: F.cross_entropy(x, t, label_smoothing=1.0, reduction="none"),
     lambda x, t: TF.cross_entropy(x, t, label_smoothing=1.0, reduction="none")),
    ("label_smoothing 1 weighted", lambda: (_x(), _t(), _w()),
     lambda x, t, w: F.cross_entropy(x, t, w.detach(), label_smoothing=1.0),
     lambda x, t, w: TF.cross_entropy(x, t, w.detach(), label_smoothing=1.0)),
    ("(C,) and 0-d target", lambda: (_x(8), torch.tensor(5)),
     lambda x, t: F.cross_entropy(x, t), lambda x, t: TF.cross_entropy(x, t)),
    ("float64 weight", lambda: (_x(), _t(), _w(dtype=torch.float64)),
     lambda x, t, w: F.cross_entropy(x, t, w.detach()),
     lambda x, t, w: TF.cross_entropy(x, t, w.detach().float())),
    ("probabilities", lambda: (_x(), torch.rand(4, 8).softmax(-1)),
     lambda x, p: F.cross_entropy(x, p.detach(), label_smoothing=0.1),
     lambda x, p: TF.cross_entropy(x, p.detach(), label_smoothing=0.1)),
]
for _reduction in ("none", "mean", "sum"):
    TORCH_ACCEPTS += [
        (f"zero rows {_reduction}", lambda: (_x(0, 7), _t(0, 7), _w(7)),
         lambda x, t, w, r=_reduction: F.cross_entropy(x, t, w.detach(), reduction=r,
                                                       label_smoothing=0.1),
         lambda x, t, w, r=_reduction: TF.cross_entropy(x, t, w.detach(), reduction=r,
                                                        label_smoothing=0.1)),
        (f"(N, C, 0) {_reduction}", lambda: (_x(2, 7, 0), torch.zeros(2, 0, dtype=torch.int64)),
         lambda x, t, r=_reduction: F.cross_entropy(x, t, reduction=r),
         lambda x, t, r=_reduction: TF.cross_entropy(x, t, reduction=r)),
        (f"zero classes {_reduction}", lambda: (_x(3, 0), torch.full((3,), -100)),
         lambda x, t, r=_reduction: F.cross_entropy(x, t, reduction=r),
         lambda x, t, r=_reduction: TF.cross_entropy(x, t, reduction=r)),
        (f"zero classes smoothed {_reduction}", lambda: (_x(3, 0), torch.full((3,), -100)),
         lambda x, t, r=_reduction: F.cross_entropy(x, t, reduction=r, label_smoothing=0.1),
         lambda x, t, r=_reduction: TF.cross_entropy(x, t, reduction=r, label_smoothing=0.1)),
        (f"zero rows and classes {_reduction}",
         lambda: (_x(0, 0), torch.zeros(0, dtype=torch.int64)),
         lambda x, t, r=_reduction: F.cross_entropy(x, t, reduction=r),
         lambda x, t, r=_reduction: TF.cross_entropy(x, t, reduction=r)),
        (f"linear zero rows {_reduction}", lambda: (_x(0, 6), _x(8, 6), _t(0)),
         lambda x, w, t, r=_reduction: F.linear_cross_entropy(x, w, t, reduction=r),
         lambda x, w, t, r=_reduction: TF.linear_cross_entropy(x, w, t, reduction=r)),
        (f"linear zero classes {_reduction}", lambda: (_x(3, 6), _x(0, 6), torch.full((3,), -100)),
         lambda x, w, t, r=_reduction: F.linear_cross_entropy(x, w, t, reduction=r),
         lambda x, w, t, r=_reduction: TF.linear_cross_entropy(x, w, t, reduction=r)),
        (f"linear zero in_features {_reduction}", lambda: (_x(3, 0), _x(8, 0), _t(3)),
         lambda x, w, t, r=_reduction: F.linear_cross_entropy(x, w, t, reduction=r),
         lambda x, w, t, r=_reduction: TF.linear_cross_entropy(x, w, t, reduction=r)),
    ]


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", TORCH_ACCEPTS, ids=case_ids(TORCH_ACCEPTS))
def test_accepted_as_torch(backend, case):
    _, inputs, ours, theirs = case
    _as_torch(ours, theirs, inputs())


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_meta_tensors_as_torch(backend, reduction):
    """Meta tensors (shape inference): torch's result shape and dtype, or, on the backend
    that runs CUDA kernels on CPU tensors only, an error naming the device."""
    x = torch.empty(4, 8, 3, device="meta", dtype=torch.bfloat16)
    t = torch.empty(4, 3, device="meta", dtype=torch.int64)
    theirs = TF.cross_entropy(x, t, reduction=reduction)
    if backend == "cuda_emu":
        expect_clear_error(lambda: F.cross_entropy(x, t, reduction=reduction), "meta")
        return
    ours = F.cross_entropy(x, t, reduction=reduction, z_loss=1e-3)
    assert (ours.device, ours.shape, ours.dtype) == (theirs.device, theirs.shape, theirs.dtype)


# ---------------------------------------------------------------- raw ops: bad arguments
# The ops' own arguments: logits (rows, vocab), target (rows,) int64, weight (vocab,),
# ignore_index, label_smoothing, z_loss, softcap; backward adds grad_loss and lse (rows,).


def _fwd_args(rows=4, vocab=8, **overrides):
    args = dict(logits=_x(rows, vocab), target=_t(rows, vocab), weight=None, ignore_index=-100,
                label_smoothing=0.0, z_loss=0.0, softcap=0.0)
    args.update(overrides)
    return args


def _bwd_args(rows=4, vocab=8, **overrides):
    args = _fwd_args(rows, vocab)
    args = dict(grad_loss=torch.ones(rows), **args)
    args["lse"] = torch.logsumexp(args["logits"], -1)
    # keep schema order: grad_loss, logits, target, weight, lse, options
    ordered = {k: args[k] for k in ("grad_loss", "logits", "target", "weight", "lse",
                                    "ignore_index", "label_smoothing", "z_loss", "softcap")}
    ordered.update(overrides)
    return ordered


RAW_FWD_CASES = [
    ("logits int", lambda: _fwd_args(logits=torch.ones(4, 8, dtype=torch.int32)),
     ("logits", "float32")),
    ("logits 3-D", lambda: _fwd_args(logits=_x(2, 2, 8)), ("logits", "2-D", "[2, 2, 8]")),
    ("logits 1-D", lambda: _fwd_args(logits=_x(8)), ("logits", "2-D")),
    ("logits zero classes", lambda: _fwd_args(logits=_x(4, 0)),
     ("logits", "at least one class", "[4, 0]")),
    # issue 10: the raw Triton op once returned NaN rows for 3 targets and 512 rows
    ("3 targets, 512 rows", lambda: _fwd_args(512, 8, target=_t(3)),
     ("target", "[512]", "[3]")),
    ("target int32", lambda: _fwd_args(target=_t(dtype=torch.int32)), ("target", "int64")),
    ("target 2-D", lambda: _fwd_args(target=_t().view(2, 2)), ("target", "[4]")),
    ("target on meta", lambda: _fwd_args(target=_t().to("meta")), ("target", "device")),
    ("weight length", lambda: _fwd_args(weight=_w(9)), ("weight", "[8]", "[9]")),
    ("weight int", lambda: _fwd_args(weight=torch.ones(8, dtype=torch.int64)), ("weight",)),
    ("weight on meta", lambda: _fwd_args(weight=_w().to("meta")), ("weight", "device")),
    ("label_smoothing 1.5", lambda: _fwd_args(label_smoothing=1.5), ("label_smoothing",)),
    ("label_smoothing nan", lambda: _fwd_args(label_smoothing=nan), ("label_smoothing",)),
    ("z_loss -1", lambda: _fwd_args(z_loss=-1.0), ("z_loss",)),
    ("z_loss nan", lambda: _fwd_args(z_loss=nan), ("z_loss",)),
    ("z_loss inf", lambda: _fwd_args(z_loss=inf), ("z_loss",)),
    ("softcap -1", lambda: _fwd_args(softcap=-1.0), ("softcap",)),
    ("softcap nan", lambda: _fwd_args(softcap=nan), ("softcap",)),
    ("softcap inf", lambda: _fwd_args(softcap=inf), ("softcap",)),
    # the schema's types (the dispatcher's message names the argument and the value)
    ("ignore_index 2**70", lambda: _fwd_args(ignore_index=2**70),
     ("ignore_index", str(2**70))),
    ("label_smoothing str", lambda: _fwd_args(label_smoothing="0.1"),
     ("label_smoothing", "str")),
    ("target = vocab", lambda: _fwd_args(target=torch.tensor([0, 1, 8, 2])),
     ("target[2] = 8", "out of range for 8 classes")),
    ("target -1", lambda: _fwd_args(target=torch.tensor([0, -1, 1, 2])), ("target[1] = -1",)),
]

RAW_BWD_CASES = [
    ("grad_loss rows", lambda: _bwd_args(grad_loss=torch.ones(3)), ("grad_loss", "[4]", "[3]")),
    ("grad_loss int", lambda: _bwd_args(grad_loss=torch.ones(4, dtype=torch.int64)),
     ("grad_loss",)),
    ("grad_loss on meta", lambda: _bwd_args(grad_loss=torch.ones(4, device="meta")),
     ("grad_loss", "device")),
    ("lse rows", lambda: _bwd_args(lse=torch.zeros(5)), ("lse", "[4]", "[5]")),
    ("lse float64", lambda: _bwd_args(lse=torch.zeros(4, dtype=torch.float64)), ("lse",)),
    ("lse bfloat16", lambda: _bwd_args(lse=torch.zeros(4, dtype=torch.bfloat16)), ("lse",)),
    ("lse int", lambda: _bwd_args(lse=torch.zeros(4, dtype=torch.int32)), ("lse",)),
    ("logits 3-D", lambda: _bwd_args(logits=_x(4, 2, 4)), ("logits", "2-D")),
    ("target rows", lambda: _bwd_args(target=_t(2)), ("target", "[4]", "[2]")),
    ("weight length", lambda: _bwd_args(weight=_w(2)), ("weight", "[8]")),
    ("z_loss nan", lambda: _bwd_args(z_loss=nan), ("z_loss",)),
    ("target = vocab", lambda: _bwd_args(target=torch.tensor([0, 8, 1, 2])),
     ("target[1] = 8", "out of range")),
]

RAW_BWD_INPLACE_CASES = RAW_BWD_CASES + [
    ("logits transposed", lambda: _bwd_args(logits=_x(8, 4).t()), ("logits", "unit stride")),
    ("logits expanded rows", lambda: _bwd_args(logits=_x(1, 8).expand(4, 8)),
     ("logits", "overlap")),
]


def _call_raw(op, args):
    return op(*args.values())


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", RAW_FWD_CASES, ids=case_ids(RAW_FWD_CASES))
def test_raw_cross_entropy_fwd_bad_arguments(backend, case):
    ops = raw_ops(IMPLS, backend)
    _, build, words = case
    args = build()
    expect_clear_error(lambda: _call_raw(ops.cross_entropy_fwd, args), *words)


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", RAW_BWD_CASES, ids=case_ids(RAW_BWD_CASES))
def test_raw_cross_entropy_bwd_bad_arguments(backend, case):
    ops = raw_ops(IMPLS, backend)
    _, build, words = case
    args = build()
    expect_clear_error(lambda: _call_raw(ops.cross_entropy_bwd, args), *words)


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", RAW_BWD_INPLACE_CASES, ids=case_ids(RAW_BWD_INPLACE_CASES))
def test_raw_cross_entropy_bwd_inplace_bad_arguments(backend, case):
    ops = raw_ops(IMPLS, backend)
    _, build, words = case
    args = build()
    before = args["logits"].clone()
    expect_clear_error(lambda: _call_raw(ops.cross_entropy_bwd_inplace, args), *words)
    assert torch.equal(args["logits"], before), "a refused in-place call wrote the logits"


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
def test_raw_ops_float64(backend):
    """float64 logits: the C++ CPU kernels take them; the CUDA and Triton kernels (float32
    arithmetic) refuse them by name rather than return float32 statistics."""
    ops = raw_ops(IMPLS, backend)
    args = _fwd_args(logits=_x(4, 8, dtype=torch.float64))
    if backend == "native":
        loss, lse, correct = _call_raw(ops.cross_entropy_fwd, args)
        assert loss.dtype == lse.dtype == torch.float64 and correct.dtype == torch.bool
        torch.testing.assert_close(lse, torch.logsumexp(args["logits"], -1))
        return
    expect_clear_error(lambda: _call_raw(ops.cross_entropy_fwd, args), "logits", "float64")
    bwd = _bwd_args(logits=_x(4, 8, dtype=torch.float64))
    bwd["lse"] = bwd["lse"].double()
    expect_clear_error(lambda: _call_raw(ops.cross_entropy_bwd, bwd), "logits", "float64")


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
def test_raw_ops_zero_rows_and_strides(backend):
    """Zero rows give empty results; non-contiguous logits the contiguous ones' results."""
    ops = raw_ops(IMPLS, backend)
    loss, lse, correct = _call_raw(ops.cross_entropy_fwd, _fwd_args(0, 8))
    assert loss.shape == lse.shape == correct.shape == (0,)
    assert _call_raw(ops.cross_entropy_bwd, _bwd_args(0, 8)).shape == (0, 8)
    _call_raw(ops.cross_entropy_bwd_inplace, _bwd_args(0, 8))
    for logits in (_x(8, 5).t(), _x(5, 11)[:, 1:9], _x(10, 8)[::2]):
        target = _t(5)
        contiguous = _fwd_args(logits=logits.contiguous(), target=target)
        strided = _fwd_args(logits=logits, target=target)
        torch.testing.assert_close(_call_raw(ops.cross_entropy_fwd, strided),
                                   _call_raw(ops.cross_entropy_fwd, contiguous))
        grad = _bwd_args(logits=logits, target=target)
        grad["grad_loss"], grad["lse"] = torch.rand(5), torch.logsumexp(logits, -1)
        want = _call_raw(ops.cross_entropy_bwd, dict(grad, logits=logits.contiguous()))
        torch.testing.assert_close(_call_raw(ops.cross_entropy_bwd, grad), want)


@pytest.mark.parametrize("backend", ["cuda_emu"], indirect=True)
def test_raw_ops_cuda_vocab_bound(backend):
    """The CUDA kernels index classes with int (up to 2^30 classes): a larger vocabulary is
    refused by name, not reported as an invalid launch. (torch.empty: never touched.)"""
    ops = raw_ops(IMPLS, backend)
    logits = torch.empty(1, 2**30 + 1, dtype=torch.bfloat16)
    args = _fwd_args(logits=logits, target=torch.zeros(1, dtype=torch.int64))
    expect_clear_error(lambda: _call_raw(ops.cross_entropy_fwd, args),
                       "logits", str(2**30), str(2**30 + 1))
    bwd = _bwd_args(1, 4)
    bwd.update(logits=logits, target=args["target"])
    expect_clear_error(lambda: _call_raw(ops.cross_entropy_bwd_inplace, bwd),
                       "logits", str(2**30 + 1))


def _lce_fwd_args(**overrides):
    input, linear_weight = _x(5, 6), _x(8, 6)
    args = dict(input=input, linear_weight=linear_weight, linear_bias=None, target=_t(5),
                weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                z_loss=0.0, softcap=0.0, chunk_size=2, need_grad_input=True,
                need_grad_weight=True, need_grad_bias=False, scale_grads_in_place=False,
                backend="native")
    args.update(overrides)
    return args


def _lce_bwd_args(**overrides):
    fwd = _lce_fwd_args()
    args = dict(grad_loss=torch.ones(5), input=fwd["input"], linear_weight=fwd["linear_weight"],
                linear_bias=None, target=fwd["target"], weight=None,
                lse=torch.logsumexp(fwd["input"] @ fwd["linear_weight"].T, -1),
                ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0, chunk_size=2,
                need_grad_input=True, need_grad_weight=True, need_grad_bias=False,
                backend="native")
    args.update(overrides)
    return args


RAW_LINEAR_FWD_CASES = [
    # issue 10: "bogus" ran as "mean", an unknown backend was accepted, chunk_size=0 failed
    # inside range()
    ("reduction bogus", lambda: _lce_fwd_args(reduction="bogus"), ("reduction", "'bogus'")),
    ("backend bogus", lambda: _lce_fwd_args(backend="bogus"), ("backend", "'bogus'")),
    ("backend reference", lambda: _lce_fwd_args(backend="reference"),
     ("backend", "'reference'")),
    ("chunk_size 0", lambda: _lce_fwd_args(chunk_size=0), ("chunk_size", "0")),
    ("chunk_size -4", lambda: _lce_fwd_args(chunk_size=-4), ("chunk_size", "-4")),
    ("input 3-D", lambda: _lce_fwd_args(input=_x(5, 1, 6)), ("input", "2-D")),
    ("input int", lambda: _lce_fwd_args(input=torch.ones(5, 6, dtype=torch.int64)),
     ("input",)),
    ("linear_weight in_features", lambda: _lce_fwd_args(linear_weight=_x(8, 7)),
     ("linear_weight", "[8, 7]")),
    ("linear_weight zero classes", lambda: _lce_fwd_args(linear_weight=_x(0, 6)),
     ("linear_weight", "num_classes >= 1")),
    ("linear_weight dtype", lambda: _lce_fwd_args(linear_weight=_x(8, 6).half()),
     ("linear_weight", "dtype")),
    ("linear_bias shape", lambda: _lce_fwd_args(linear_bias=_x(3)), ("linear_bias", "[8]")),
    ("linear_bias on meta", lambda: _lce_fwd_args(linear_bias=_x(8).to("meta")),
     ("linear_bias", "device")),
    ("target rows", lambda: _lce_fwd_args(target=_t(4)), ("target", "[5]", "[4]")),
    ("target int32", lambda: _lce_fwd_args(target=_t(5, dtype=torch.int32)),
     ("target", "int64")),
    ("weight length", lambda: _lce_fwd_args(weight=_w(7)), ("weight", "[8]")),
    ("label_smoothing -1", lambda: _lce_fwd_args(label_smoothing=-1.0), ("label_smoothing",)),
    ("z_loss nan", lambda: _lce_fwd_args(z_loss=nan), ("z_loss",)),
    ("softcap inf", lambda: _lce_fwd_args(softcap=inf), ("softcap",)),
    ("target out of range", lambda: _lce_fwd_args(target=torch.tensor([0, 1, 2, 3, 99])),
     ("linear_cross_entropy_fwd", "target[4] = 99")),
]

RAW_LINEAR_BWD_CASES = [
    ("grad_loss rows", lambda: _lce_bwd_args(grad_loss=torch.ones(2)), ("grad_loss", "[5]")),
    ("lse dtype", lambda: _lce_bwd_args(lse=torch.zeros(5, dtype=torch.float64)), ("lse",)),
    ("lse rows", lambda: _lce_bwd_args(lse=torch.zeros(4)), ("lse", "[5]")),
    ("backend bogus", lambda: _lce_bwd_args(backend="cuda"), ("backend", "'cuda'")),
    ("chunk_size 0", lambda: _lce_bwd_args(chunk_size=0), ("chunk_size",)),
    ("softcap -1", lambda: _lce_bwd_args(softcap=-1.0), ("softcap",)),
    ("target out of range", lambda: _lce_bwd_args(target=torch.tensor([0, 1, -7, 3, 4])),
     ("target[2] = -7",)),
]


def _with_backend(args, backend):
    return {**args, "backend": backend} if args["backend"] == "native" else args


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", RAW_LINEAR_FWD_CASES, ids=case_ids(RAW_LINEAR_FWD_CASES))
def test_raw_linear_cross_entropy_fwd_bad_arguments(backend, case):
    _, build, words = case
    args = _with_backend(build(), backend)
    op = torch.ops.fastllm.linear_cross_entropy_fwd
    expect_clear_error(lambda: op(*args.values()), *words)


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", RAW_LINEAR_BWD_CASES, ids=case_ids(RAW_LINEAR_BWD_CASES))
def test_raw_linear_cross_entropy_bwd_bad_arguments(backend, case):
    _, build, words = case
    args = _with_backend(build(), backend)
    op = torch.ops.fastllm.linear_cross_entropy_bwd
    expect_clear_error(lambda: op(*args.values()), *words)


def test_raw_linear_ops_trace_with_checks():
    """The fakes check too: torch.compile reports a bad argument while tracing."""
    args = _lce_fwd_args(chunk_size=0)
    rest = [v for k, v in args.items() if k != "input"]

    def step(input):
        return torch.ops.fastllm.linear_cross_entropy_fwd(input, *rest)[0]

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    expect_clear_error(lambda: compiled(args["input"]), "chunk_size")


def test_triton_launcher_never_reads_outside_its_tensors():
    """The Triton launcher without the op's checks (as a GPU runs it: the targets are not
    read on the host) gives wild targets a NaN row and touches nothing else: in a child, so
    that an out-of-bounds access fails this test only."""
    pytest.importorskip("triton")
    out = run_isolated("""
        import torch
        from fastllm.triton import cross_entropy as kernels
        x = torch.randn(4, 300)
        t = torch.tensor([2**40, -2**40, 5, -100])
        w = torch.rand(300) + 0.5
        loss, lse, correct = kernels.cross_entropy_fwd(x, t, w, -100, 0.1, 1e-3, 0.0)
        grad = kernels.cross_entropy_bwd(torch.ones(4), x, t, w, lse, -100, 0.1, 1e-3, 0.0)
        assert loss[:2].isnan().all() and grad[:2].isnan().all(), (loss, grad)
        assert loss[2:].isfinite().all() and grad[2:].isfinite().all()
        assert loss[3] == 0 and (grad[3] == 0).all()
        assert not correct[[0, 1, 3]].any()
        print("ok")
    """)
    assert out.strip().endswith("ok")


# --------------------------------------------------------------------- extreme logits
# Compared with torch's own cross-entropy computed in float32 (the kernels' arithmetic) from
# the same dtype-rounded logits: the same NaN / inf pattern, and the same finite values.


def _extreme_rows(dtype):
    """(name, row of 6 logits, target) for a dtype: magnitudes from 1e4 to near the dtype's
    maximum (ties included: their p is 1/k only if backward does not take the rounded saved
    lse for the row's), +-inf, NaN."""
    big = torch.finfo(dtype).max
    rows = [
        ("1e4 offset", [1e4 + i for i in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)], 2),
        ("+-1e4", [1e4, -1e4, 0.0, 3.0, -3.0, 1.0], 1),
        ("target 1e4", [0.0, 1e4, 0.0, 3.0, -3.0, 1.0], 1),
        ("1e8 distinct", [1e8, 0.0, -1e8, 5.0, 1.0, 2.0], 0),
        ("1e15 target low", [1e15, -1e15, 0.0, 0.0, 0.0, 0.0], 1),
        ("1e30", [1e30, -1e30, 0.0, 0.0, 0.0, 0.0], 2),
        ("1e30 ties", [1e30, 1e30, 1e30, 0.0, -1e30, 0.0], 1),
        ("1e6 near-ties", [1e6, 1e6 + 0.25, 1e6 + 0.5, 1e6 - 0.25, 1e6 + 1.0, 0.0], 3),
        ("near max", [0.9 * big, 0.0, 1.0, 2.0, 3.0, 4.0], 0),
        ("near max, target low", [0.9 * big, -0.9 * big, 1.0, 2.0, 3.0, 4.0], 1),
        ("near max ties", [0.9 * big] * 3 + [0.0] * 3, 4),
        ("near -max", [-0.9 * big, 0.0, 1.0, 2.0, 3.0, 4.0], 0),
        ("+inf other", [inf, 0.0, 1.0, 2.0, 3.0, 4.0], 1),
        ("+inf target", [0.0, inf, 1.0, 2.0, 3.0, 4.0], 1),
        ("-inf other", [-inf, 0.0, 1.0, 2.0, 3.0, 4.0], 1),
        ("-inf target", [0.0, -inf, 1.0, 2.0, 3.0, 4.0], 1),
        ("-inf first", [-inf, -inf, 1.0, 2.0, 3.0, 4.0], 3),
        ("all -inf", [-inf] * 6, 0),
        ("nan other", [nan, 0.0, 1.0, 2.0, 3.0, 4.0], 1),
        ("nan target", [0.0, nan, 1.0, 2.0, 3.0, 4.0], 1),
    ]
    finite_max = float(big)
    return [(n, [min(max(v, -finite_max), finite_max) if math.isfinite(v) else v for v in r], t)
            for n, r, t in rows]


def _torch_f32(x, t, reduction, label_smoothing, softcap):
    z = x.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return TF.cross_entropy(z, t, reduction=reduction, label_smoothing=label_smoothing)


def _same_special_pattern(name, ours, theirs):
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(fn(ours), fn(theirs)), (
            f"{name}: {what} pattern differs from torch: {ours.tolist()} vs {theirs.tolist()}"
        )


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label_smoothing, softcap", [(0.0, 0.0), (0.3, 0.0), (1.0, 0.0),
                                                      (0.0, 30.0), (0.2, 5.0)])
def test_extreme_logits_match_torch(backend, dtype, label_smoothing, softcap):
    for name, row, target in _extreme_rows(dtype):
        x = torch.tensor([row], dtype=dtype)
        t = torch.tensor([target])
        ours = x.clone().requires_grad_()
        loss = F.cross_entropy(ours, t, reduction="sum", label_smoothing=label_smoothing,
                               softcap=softcap)
        (grad,) = torch.autograd.grad(loss, ours)
        theirs = x.float().requires_grad_()
        their_loss = _torch_f32(theirs, t, "sum", label_smoothing, softcap)
        (their_grad,) = torch.autograd.grad(their_loss, theirs)
        case = f"{name} (ls={label_smoothing}, softcap={softcap})"
        their_loss, their_grad = their_loss.to(dtype), their_grad.to(dtype)
        _same_special_pattern(f"{case} loss", loss.detach(), their_loss)
        _same_special_pattern(f"{case} grad", grad, their_grad)
        # Finite values: within a few roundings of the dtype (the loss may be ~1e30).
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(loss.detach(), their_loss, rtol=4 * eps, atol=ATOL[dtype],
                                   equal_nan=True, msg=f"{case} loss")
        torch.testing.assert_close(grad, their_grad, rtol=4 * eps, atol=ATOL[dtype],
                                   equal_nan=True, msg=f"{case} grad")


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [0.0, 30.0, 5.0])
def test_extreme_logits_token_accuracy_as_reference(backend, dtype, softcap):
    """Token accuracy on the extreme rows (ties at 1e30 and near the dtype's maximum,
    +-inf, NaN; soft-capping that saturates whole rows into ties): each row's correct bit as
    the reference's rule (the target's capped logit is the row max, finite below; a NaN
    logit never correct), whichever backend computes it."""
    from fastllm.reference.cross_entropy import cross_entropy_ref

    rows = _extreme_rows(dtype)
    x = torch.tensor([row for _, row, _ in rows], dtype=dtype)
    t = torch.tensor([target for _, _, target in rows])
    ours = F.cross_entropy(x, t, reduction="none", softcap=softcap,
                           return_token_accuracy=True).token_accuracy
    want = cross_entropy_ref(x, t, reduction="none", softcap=softcap,
                             return_token_accuracy=True)[2]
    for (name, _, _), got, expected in zip(rows, ours.tolist(), want.tolist()):
        assert got == expected, f"{name} (softcap={softcap}): correct={got}, want {expected}"


# -------------------------------------------------------------------------------- fuzz


@st.composite
def _problems(draw, backend):
    layout = draw(st.sampled_from(["(C,)", "(N, C)", "(N, C)", "(N, C, d1)"]))
    vocab = draw(st.one_of(st.integers(1, 40), st.integers(41, 3000)))
    if layout == "(C,)":
        shape = (vocab,)
    elif layout == "(N, C)":
        shape = (draw(st.integers(0, 40)), vocab)
    else:
        shape = (draw(st.integers(0, 4)), vocab, draw(st.integers(0, 6)))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES[backend])),
        ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        weighted=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        softcap=draw(st.sampled_from([0.0, 3.0, 30.0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        scale=draw(st.sampled_from([1.0, 8.0])),
        inplace_backward=draw(st.booleans()),
    )


def _torch_loss(x, t, w, p):
    """torch's cross-entropy on any layout, plus soft-capping and the z-loss (averaged over
    the non-ignored rows for "mean", whatever the class weights)."""
    class_dim = 0 if x.dim() == 1 else 1
    z = x if not p["softcap"] else p["softcap"] * torch.tanh(x / p["softcap"])
    ce = TF.cross_entropy(z, t, weight=w, ignore_index=p["ignore_index"],
                          reduction=p["reduction"], label_smoothing=p["label_smoothing"])
    if not p["z_loss"]:
        return ce
    valid = t != p["ignore_index"]
    z_rows = torch.where(valid, p["z_loss"] * torch.logsumexp(z, class_dim).square(), 0.0)
    if p["reduction"] == "none":
        return ce + z_rows
    if p["reduction"] == "sum":
        return ce + z_rows.sum()
    return ce + z_rows.sum() / valid.sum()


def _check_against_torch(name, ours, theirs, ref, dtype):
    """The accuracy rule (tests/accuracy.py) on the finite entries of the float64 result;
    the NaN / inf entries (every row ignored, label smoothing 1 over an ignored mean ...)
    must be the same."""
    _same_special_pattern(name, ours.double(), ref)
    finite = torch.isfinite(ref)
    err = max_err(ours.double()[finite], ref[finite])
    bound = 2 * max_err(theirs.double()[finite], ref[finite]) + ATOL[dtype]
    assert err <= bound, f"{name} ({dtype}): max error {err:.3g} > {bound:.3g}"


def _fuzz_one(p):
    shape, dtype = p["shape"], p["dtype"]
    x = (torch.randn(shape) * p["scale"]).to(dtype)
    vocab = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, vocab, t_shape)
    t = torch.where(torch.rand(t_shape) < p["ignored"], p["ignore_index"], t)
    w = (torch.rand(vocab) + 0.5).to(dtype) if p["weighted"] else None
    options = dict(ignore_index=p["ignore_index"], reduction=p["reduction"],
                   label_smoothing=p["label_smoothing"], z_loss=p["z_loss"],
                   softcap=p["softcap"])

    def run(fn, x):
        leaf = x.detach().clone().requires_grad_()
        loss = fn(leaf)
        g = torch.ones_like(loss)
        (grad,) = torch.autograd.grad(loss, leaf, g) if loss.requires_grad else (None,)
        return loss.detach(), grad

    ours = run(lambda xl: F.cross_entropy(xl, t, w, inplace_backward=p["inplace_backward"],
                                          **options), x)
    ref = run(lambda xl: _torch_loss(xl, t, None if w is None else w.double(), p), x.double())
    theirs = run(lambda xl: _torch_loss(xl, t, w, p), x)
    assert ours[0].dtype == dtype and ours[0].shape == ref[0].shape
    _check_against_torch("loss", ours[0], theirs[0], ref[0], dtype)
    if ref[1] is not None:
        _check_against_torch("grad", ours[1], theirs[1], ref[1], dtype)
    _check_logged_outputs(x, t, w, options, ours[0])


def _check_logged_outputs(x, t, w, options, loss):
    """return_z_loss / return_token_accuracy as the reference backend computes them: the
    loss unchanged, the z term to the dtype's rounding, the accuracy exactly (without
    soft-capping: with it, the kernels' tanh and torch's may differ by an ulp where it
    saturates, which can make or break a tie; test_extreme_logits_token_accuracy_as_reference
    covers saturated ties)."""
    flags = dict(return_z_loss=True, return_token_accuracy=True)
    out = F.cross_entropy(x, t, w, **options, **flags)
    with fastllm.use_backend("reference"):
        want = F.cross_entropy(x, t, w, **options, **flags)
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(out.loss, loss, rtol=eps, atol=0, equal_nan=True)
    torch.testing.assert_close(out.z_loss, want.z_loss, rtol=2 * eps, atol=ATOL[x.dtype],
                               equal_nan=True)
    assert out.token_accuracy.shape == want.token_accuracy.shape
    if not options["softcap"]:
        torch.testing.assert_close(out.token_accuracy, want.token_accuracy, rtol=0, atol=0,
                                   equal_nan=True)


# Examples per backend: a few seconds each (the interpreted Triton kernels and the emulated
# CUDA ones cost more per call).
FUZZ_EXAMPLES = {"native": 40, "reference": 40, "triton": 15, "cuda_emu": 25}


def _fuzz(backend, strategy, check_one, scale=1.0):
    @settings(max_examples=max(1, int(FUZZ_EXAMPLES[backend] * scale)), deadline=None,
              derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(problem=strategy)
    def fuzz(problem):
        torch.manual_seed(0)
        check_one(problem)

    fuzz()


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_cross_entropy_fuzz(backend):
    _fuzz(backend, _problems(backend), _fuzz_one)


@st.composite
def _linear_problems(draw, backend):
    return dict(
        rows=draw(st.integers(0, 30)),
        hidden=draw(st.integers(1, 24)),
        vocab=draw(st.integers(1, 700)),
        chunk_size=draw(st.sampled_from([None, 1, 3, 7, 64])),
        dtype=draw(st.sampled_from(DTYPES[backend])),
        bias=draw(st.booleans()),
        weighted=draw(st.booleans()),
        ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        softcap=draw(st.sampled_from([0.0, 4.0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
    )


def _linear_fuzz_one(p):
    dtype = p["dtype"]
    x = torch.randn(p["rows"], p["hidden"]).to(dtype)
    lw = (torch.randn(p["vocab"], p["hidden"]) / p["hidden"] ** 0.5).to(dtype)
    b = torch.randn(p["vocab"]).to(dtype) if p["bias"] else None
    t = torch.randint(0, p["vocab"], (p["rows"],))
    t = torch.where(torch.rand(p["rows"]) < p["ignored"], -100, t)
    w = (torch.rand(p["vocab"]) + 0.5).to(dtype) if p["weighted"] else None
    options = dict(reduction=p["reduction"], label_smoothing=p["label_smoothing"],
                   z_loss=p["z_loss"], softcap=p["softcap"])
    tp = dict(options, ignore_index=-100)

    def run(fn, *params):
        leaves = [None if q is None else q.detach().clone().requires_grad_() for q in params]
        loss = fn(*leaves)
        wanted = [q for q in leaves if q is not None]
        grads = torch.autograd.grad(loss, wanted, torch.ones_like(loss)) if wanted else ()
        return loss.detach(), grads

    def unfused(x, lw, b, w):
        return _torch_loss(TF.linear(x, lw, b), t, w, tp)

    def d(q):
        return None if q is None else q.double()

    ours = run(lambda x, lw, b: F.linear_cross_entropy(
        x, lw, t, linear_bias=b, weight=w, chunk_size=p["chunk_size"], **options), x, lw, b)
    ref = run(lambda x, lw, b: unfused(x, lw, b, d(w)), d(x), d(lw), d(b))
    theirs = run(lambda x, lw, b: unfused(x, lw, b, w), x, lw, b)
    assert ours[0].dtype == dtype
    _check_against_torch("loss", ours[0], theirs[0], ref[0], dtype)
    for name, a, t_, r in zip(("dX", "dW", "db"), ours[1], theirs[1], ref[1]):
        _check_against_torch(name, a, t_, r, dtype)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_linear_cross_entropy_fuzz(backend):
    _fuzz(backend, _linear_problems(backend), _linear_fuzz_one, scale=0.5)


# ------------------------------------------------ found by a probe with unseen cases


@pytest.mark.parametrize("backend", RAW_BACKENDS, indirect=True)
def test_double_backward_is_refused_not_wrong(backend):
    """create_graph=True used to give a gradient detached from the logits (a gradient
    penalty then silently wrong); the kernels have no derivative of their own: refuse."""
    x = torch.randn(4, 8, requires_grad=True)
    t = torch.tensor([1, 2, 3, 4])
    loss = F.cross_entropy(x, t)
    expect_clear_error(lambda: torch.autograd.grad(loss, x, create_graph=True),
                       "double backward")
    w = torch.randn(8, 6, requires_grad=True)
    loss = F.linear_cross_entropy(torch.randn(4, 6), w, t)
    expect_clear_error(lambda: torch.autograd.grad(loss, w, create_graph=True),
                       "double backward")


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS, indirect=True)
def test_softcap_beyond_float32_is_refused(backend):
    expect_clear_error(
        lambda: F.cross_entropy(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]), softcap=1e300),
        "softcap", "float32")
