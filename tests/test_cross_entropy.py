"""Cross-entropy family, numerics: every backend against torch in float64, with the
2x-PyTorch's-own-error rule (tests/accuracy.py) for the loss and the logits' gradient, in
every reduction (reduction="none" with a random gradient per row, on purpose), with class
weights, label smoothing, z-loss, soft-capping, ignored rows, extreme logits, odd and large
vocabularies and non-contiguous logits; and the logged outputs (return_z_loss,
return_token_accuracy) against the reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as TF

import fastllm.functional as F
from fastllm.reference.cross_entropy import cross_entropy_ref
from tests.accuracy import ATOL, assert_within_torch_error
from tests.helpers import assert_triton_compiles_without_spills, ptxas_resources, triton_signature

FAMILY = "cross_entropy"
BACKENDS = ("native", "triton", "cuda_emu")

REDUCTIONS = ("none", "mean", "sum")

# Feature combinations: class weights, label smoothing, z-loss, soft-capping.
FEATURES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "weight": {"weighted": True},
    "weight_smoothing": {"weighted": True, "label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "all": {"weighted": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
}

# (rows, vocab) per backend: the interpreted Triton and emulated CUDA kernels are slow, so
# they get small shapes, odd sizes kept.
SHAPES = {
    "native": [(37, 1000), (5, 7), (3, 4099), (4, 50257)],
    "triton": [(9, 1000), (5, 7), (2, 4099)],
    "cuda_emu": [(9, 1000), (5, 7), (2, 4099)],
}
DTYPES = {
    "native": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda_emu": (torch.float32, torch.bfloat16, torch.float16),
}


def torch_cross_entropy(x, t, w, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """The loss in plain PyTorch, in x's dtype: torch's own cross_entropy where it has the
    feature, plus the soft-capping formula and the z-loss as PaLM / Liger-Kernel define it:
    z_loss * lse^2 per non-ignored row, averaged over those rows for "mean" whatever the
    class weights."""
    z = x if softcap == 0 else softcap * torch.tanh(x / softcap)
    ce = TF.cross_entropy(
        z, t, weight=w, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if z_loss == 0:
        return ce
    valid = t != ignore_index
    z_rows = torch.where(valid, z_loss * torch.logsumexp(z, dim=-1).square(), 0.0)
    if reduction == "none":
        return ce + z_rows
    if reduction == "sum":
        return ce + z_rows.sum()
    return ce + z_rows.sum() / valid.sum()


def make_target(rows, vocab, ignore="some", ignore_index=-100):
    t = torch.randint(0, vocab, (rows,))
    if ignore == "some":
        t[::4] = ignore_index
    elif ignore == "all":
        t[:] = ignore_index
    return t


def run(fn, x, grad_out):
    leaf = x.detach().clone().requires_grad_(True)
    loss = fn(leaf)
    loss.backward(grad_out)
    return loss.detach(), leaf.grad


def check_case(rows, vocab, dtype, reduction, weighted=False, label_smoothing=0.0, z_loss=0.0,
               softcap=0.0, ignore="some", scale=2.0, layout="contiguous", ignore_index=-100):
    if layout == "contiguous":
        x = (torch.randn(rows, vocab) * scale).to(dtype)
    elif layout == "strided_rows":  # row stride > vocab
        x = (torch.randn(rows, vocab + 5) * scale).to(dtype)[:, :vocab]
    else:  # "transposed": unit row stride, the vocab dimension strided
        x = (torch.randn(vocab, rows) * scale).to(dtype).t()
    t = make_target(rows, vocab, ignore, ignore_index)
    w = (torch.rand(vocab) + 0.5).to(dtype) if weighted else None
    g = torch.randn(rows if reduction == "none" else ()).to(dtype)
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)

    def ours(xl):
        return F.cross_entropy(xl, t, w, *opts[:2], label_smoothing, z_loss, softcap)

    ref_loss, ref_grad = run(
        lambda xl: torch_cross_entropy(xl, t, None if w is None else w.double(), *opts),
        x.double(), g.double(),
    )
    torch_loss, torch_grad = run(lambda xl: torch_cross_entropy(xl, t, w, *opts), x, g)
    our_loss, our_grad = run(ours, x, g)
    assert our_loss.dtype == dtype and our_grad.dtype == dtype
    assert our_loss.shape == torch_loss.shape
    name = f"{rows}x{vocab} {reduction}"
    assert_within_torch_error(f"loss {name}", our_loss, torch_loss, ref_loss, dtype)
    assert_within_torch_error(f"grad {name}", our_grad, torch_grad, ref_grad, dtype)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_matches_torch(backend, reduction, feature):
    for dtype in DTYPES[backend]:
        for rows, vocab in SHAPES[backend]:
            if dtype in (torch.float64, torch.float16) and vocab > 5000:
                continue  # the big vocabulary is covered in float32 / bfloat16
            check_case(rows, vocab, dtype, reduction, **FEATURES[feature])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_vocab_sizes(backend, reduction):
    """Vocabularies from 2 to 262147, not powers of two; the big ones with few rows."""
    vocabs = {
        "native": [(8, 2), (8, 3), (4, 131072), (2, 262147)],
        "triton": [(8, 2), (8, 3), (2, 8193)],
        "cuda_emu": [(8, 2), (8, 3), (2, 8193)],
    }[backend]
    for rows, vocab in vocabs:
        check_case(rows, vocab, torch.float32, reduction, label_smoothing=0.1)
        check_case(rows, vocab, torch.bfloat16, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("feature", ["plain", "weight_smoothing", "all"])
def test_cross_entropy_every_row_ignored(backend, reduction, feature):
    """As torch: mean is nan (0 / 0), sum and none are 0, and every gradient is 0."""
    opts = {k: v for k, v in FEATURES[feature].items() if k != "weighted"}
    weighted = FEATURES[feature].get("weighted", False)
    x = torch.randn(6, 33)
    t = make_target(6, 33, ignore="all")
    w = torch.rand(33) + 0.5 if weighted else None
    ours, our_grad = run(lambda xl: F.cross_entropy(xl, t, w, reduction=reduction, **opts), x, None
                         if reduction != "none" else torch.ones(6))
    theirs, _ = run(lambda xl: torch_cross_entropy(
        xl, t, w, -100, reduction, opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0),
        opts.get("softcap", 0.0)), x, None if reduction != "none" else torch.ones(6))
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert torch.equal(our_grad, torch.zeros_like(x))


def test_cross_entropy_custom_ignore_index(backend):
    check_case(9, 100, torch.float32, "mean", ignore_index=5, label_smoothing=0.1)
    check_case(9, 100, torch.float32, "none", ignore_index=0, weighted=True)


@pytest.mark.parametrize("layout", ["strided_rows", "transposed"])
def test_cross_entropy_non_contiguous_logits(backend, layout):
    check_case(11, 301, torch.float32, "none", layout=layout, label_smoothing=0.1)
    check_case(11, 301, torch.bfloat16, "mean", layout=layout, softcap=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_extreme_logits_stay_finite(backend, dtype):
    """+-1e4 logits, a large common offset, all-equal rows and -inf (masked) classes: no inf
    or NaN in the loss or the gradient, within the accuracy rule of torch computing in
    float32 (the kernels' arithmetic; float16's own overflows at 3e4)."""
    rows, vocab = 8, 300
    big = 3e4 if dtype == torch.float16 else 1e4  # float16's losses must stay below 65504
    cases = {
        "pm_big": (torch.randint(0, 2, (rows, vocab)) * 2 - 1).float() * big,
        "offset": torch.randn(rows, vocab) + big,
        "neg_offset": torch.randn(rows, vocab) - big,
        "all_equal": torch.full((rows, vocab), 3.0),
        "all_equal_big": torch.full((rows, vocab), big),
        "masked": torch.randn(rows, vocab).masked_fill(torch.rand(rows, vocab) < 0.5, -math.inf),
    }
    t = torch.randint(0, vocab, (rows,))
    for name, x in cases.items():
        x = x.to(dtype)
        if name == "masked":  # the target itself is never masked
            x[torch.arange(rows), t] = 0.0
        variants = (("none", {}), ("mean", {"z_loss": 1e-6}), ("sum", {"softcap": 30.0}))
        for reduction, opts in variants:
            g = torch.ones(rows if reduction == "none" else ())
            loss, grad = run(
                lambda xl: F.cross_entropy(xl, t, reduction=reduction, **opts), x, g.to(dtype)
            )
            ref_loss, ref_grad = run(lambda xl: torch_cross_entropy(
                xl, t, None, -100, reduction, 0.0, opts.get("z_loss", 0.0),
                opts.get("softcap", 0.0)), x.double(), g.double())
            _, torch_grad = run(lambda xl: torch_cross_entropy(
                xl.float(), t, None, -100, reduction, 0.0, opts.get("z_loss", 0.0),
                opts.get("softcap", 0.0)).to(dtype), x, g.to(dtype))
            case = f"{name} {reduction}"
            # The loss (up to 6e4) to a few roundings of the dtype; the gradient (|p| <= 1)
            # by the accuracy rule: backward recomputes a large row's log-sum-exp exactly.
            assert torch.isfinite(loss).all(), case
            torch.testing.assert_close(loss.double(), ref_loss, rtol=4 * torch.finfo(dtype).eps,
                                       atol=ATOL[dtype], msg=case)
            assert_within_torch_error(f"grad {case}", grad, torch_grad, ref_grad, dtype)
            if name == "masked":
                assert torch.equal(grad[x == -math.inf], torch.zeros_like(grad[x == -math.inf]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_large_lse_exact_gradient(backend, dtype):
    """Rows whose log-sum-exp is large: the saved float32 lse is rounded to half an ulp (0.03
    at 1e6, 4e22 at 1e30), which used to be a relative error of every p (a 3-way tie at 1e30
    got p = 1, not 1/3). Backward recomputes such rows' log-sum-exp from the logits, so the
    gradient keeps the accuracy rule of torch's (which subtracts the max first): near-ties
    at 1e6, ties at 1e30 and near the dtype's maximum, both signs, soft-capped at 1000."""
    big = torch.finfo(dtype).max
    vocab = 7
    rows = [
        [1e6 + 0.25 * k for k in range(vocab)],
        [min(1e30, 0.5 * big)] * 3 + [0.0] * 4,
        [0.9 * big] * 4 + [0.0] * 3,
        [-0.9 * big] * vocab,
        [5e5 + 300.0 * math.sin(k) for k in range(vocab)],
        [-1e6 - 0.5 * k for k in range(vocab)],
    ]
    x = torch.tensor(rows).clamp(-big, big).to(dtype)
    t = torch.tensor([3, 1, 0, 5, 2, 6])
    for reduction, opts in (("none", {}), ("mean", {"label_smoothing": 0.1}),
                            ("sum", {"softcap": 1000.0})):
        g = torch.rand(len(rows) if reduction == "none" else ()) + 0.5
        args = (None, -100, reduction, opts.get("label_smoothing", 0.0),
                opts.get("z_loss", 0.0), opts.get("softcap", 0.0))
        loss, grad = run(lambda xl: F.cross_entropy(xl, t, reduction=reduction, **opts), x,
                         g.to(dtype))
        ref_loss, ref_grad = run(lambda xl: torch_cross_entropy(xl, t, *args), x.double(),
                                 g.double())
        torch_loss, torch_grad = run(
            lambda xl: torch_cross_entropy(xl.float(), t, *args).to(dtype), x, g.to(dtype))
        case = f"{reduction} {opts}"
        assert_within_torch_error(f"grad {case}", grad, torch_grad, ref_grad, dtype)
        if not opts:  # (the smoothing terms of these rows overflow float32)
            assert_within_torch_error(f"loss {case}", loss, torch_loss, ref_loss, dtype)

    # Long rows (a block per row on CUDA, several chunks in Triton): ties at 1e30 far apart,
    # and near-ties at 1e6 spread over the row.
    vocab = 4099
    x = torch.randn(3, vocab) * 10
    x[0, [5, 2100, 4098]] = min(1e30, 0.5 * big)
    offset = min(1e6, 0.5 * big)  # float16: ties at 3e4
    x[1] = offset + 0.25 * (torch.arange(vocab) % 9)
    x[2] = -offset - 0.5 * (torch.arange(vocab) % 5)
    x = x.to(dtype)
    t = torch.tensor([2100, 7, 4000])
    g = torch.rand(3).to(dtype) + 0.5
    grad = run(lambda xl: F.cross_entropy(xl, t, reduction="none"), x, g)[1]
    ref_grad = run(lambda xl: TF.cross_entropy(xl, t, reduction="none"), x.double(),
                   g.double())[1]
    torch_grad = run(lambda xl: TF.cross_entropy(xl.float(), t, reduction="none").to(dtype),
                     x, g)[1]
    assert_within_torch_error("grad, long rows", grad, torch_grad, ref_grad, dtype)


def test_cross_entropy_layouts_as_torch(backend):
    """(C,) with a 0-d target, and (N, C, d1, d2) with the class dimension at 1."""
    x1 = torch.randn(10)
    t1 = torch.tensor(3)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(F.cross_entropy(x1, t1, reduction=reduction),
                                   TF.cross_entropy(x1, t1, reduction=reduction))
    x = torch.randn(3, 17, 4, 5, requires_grad=True)
    t = torch.randint(0, 17, (3, 4, 5))
    t[0, 1] = -100
    for reduction in REDUCTIONS:
        ours = F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        theirs = TF.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, theirs)
        g = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0],
                                   torch.autograd.grad(theirs, x, g)[0])


def test_cross_entropy_uint8_and_probability_targets(backend):
    x = torch.randn(4, 10)
    t = torch.tensor([1, 2, 3, 9], dtype=torch.uint8)
    torch.testing.assert_close(F.cross_entropy(x, t), TF.cross_entropy(x, t))
    probs = torch.rand(4, 10).softmax(-1)
    torch.testing.assert_close(F.cross_entropy(x, probs, label_smoothing=0.1),
                               TF.cross_entropy(x, probs, label_smoothing=0.1))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_and_inplace_backward(backend, reduction):
    """The backend's in-place backward op, through linear + cross-entropy (chunks of 5 rows
    over 13) and through cross_entropy(inplace_backward=True), against the unfused path."""
    x = torch.randn(13, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    b = torch.randn(300, requires_grad=True)
    t = make_target(13, 300)
    g = torch.randn(13 if reduction == "none" else ())
    ref = TF.cross_entropy(TF.linear(x, w, b), t, reduction=reduction, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    ours = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                  label_smoothing=0.1, chunk_size=5)
    torch.testing.assert_close(ours, ref)
    for got, want in zip(torch.autograd.grad(ours, (x, w, b), g), ref_grads):
        torch.testing.assert_close(got, want)

    logits = TF.linear(x, w, b)
    ours = F.cross_entropy(
        logits, t, reduction=reduction, label_smoothing=0.1, inplace_backward=True
    )
    torch.testing.assert_close(ours, ref)
    for got, want in zip(torch.autograd.grad(ours, (x, w, b), g), ref_grads):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------ z-loss definition


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_is_averaged_over_tokens_not_class_weights(backend, reduction):
    """mean = sum(w_t ce_t) / sum(w_t) + z sum(lse_t^2) / n_valid (PaLM, Liger-Kernel): the
    z term does not scale with the class weights, so weight and 2 * weight give the same
    mean, loss and gradient; against the formula in float64, in cross_entropy and in
    linear_cross_entropy (chunks of 4 rows: n_valid and sum(w_t) are global)."""
    rows, vocab, hidden, z_loss = 11, 37, 8, 0.05
    x = torch.randn(rows, vocab)
    t = make_target(rows, vocab)
    w = torch.rand(vocab) + 0.5
    g = torch.randn(rows if reduction == "none" else ())
    results = []
    for scale in (1.0, 2.0):
        ref_loss, ref_grad = run(lambda xl: torch_cross_entropy(
            xl, t, scale * w.double(), -100, reduction, 0.1, z_loss, 0.0), x.double(), g.double())
        loss, grad = run(lambda xl: F.cross_entropy(
            xl, t, scale * w, reduction=reduction, label_smoothing=0.1, z_loss=z_loss), x, g)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
        results.append((loss, grad))
    if reduction == "mean":
        torch.testing.assert_close(results[0], results[1])
    h = torch.randn(rows, hidden)
    lw = torch.randn(vocab, hidden) / hidden**0.5
    ref_loss, ref_grad = run(lambda hl: torch_cross_entropy(
        hl @ lw.double().T, t, w.double(), -100, reduction, 0.0, z_loss, 0.0), h.double(),
        g.double())
    loss, grad = run(lambda hl: F.linear_cross_entropy(
        hl, lw, t, weight=w, reduction=reduction, z_loss=z_loss, chunk_size=4), h, g)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_z_loss_mean_edge_cases(backend):
    """Every row ignored: NaN, zero gradient. Every non-ignored target of weight 0: the
    cross-entropy part is 0 / 0 = NaN (torch's weighted mean), NaN gradients on those rows
    and zero ones on ignored rows, as torch gives without z-loss."""
    x = torch.randn(5, 9)
    w = torch.rand(9) + 0.5
    w[2] = 0.0
    for t, want_nan_rows in ((torch.full((5,), -100), []),
                             (torch.tensor([2, -100, 2, 2, -100]), [0, 2, 3])):
        for lin in (False, True):
            if lin:
                fn = lambda xl: F.linear_cross_entropy(  # noqa: E731
                    xl, torch.eye(9), t, weight=w, z_loss=1e-2, chunk_size=2)
            else:
                fn = lambda xl: F.cross_entropy(xl, t, w, z_loss=1e-2)  # noqa: E731
            loss, grad = run(fn, x, None)
            theirs, their_grad = run(lambda xl: TF.cross_entropy(xl, t, w), x, None)
            assert torch.isnan(loss) and torch.isnan(theirs)
            nan_rows = torch.isnan(grad).any(-1)
            assert nan_rows.tolist() == [r in want_nan_rows for r in range(5)]
            assert torch.equal(nan_rows, torch.isnan(their_grad).any(-1))
            assert torch.equal(grad[~nan_rows], torch.zeros_like(grad[~nan_rows]))


# ----------------------------------------- logged outputs: z-loss term and token accuracy


def accuracy_case(rows, vocab, dtype, ignore="some", ties=True):
    """Logits and targets where the accuracy is neither 0 nor 1: every third row's target is
    its row's argmax, and (with ``ties``) some rows have their target tied at the maximum
    with an earlier class, where ``argmax(-1) == target`` says wrong and fastllm's rule
    (the target's logit equals the row max) says right."""
    x = (torch.randn(rows, vocab) * 2).to(dtype)
    t = make_target(rows, vocab, ignore)
    keep = t != -100
    top = x.float().argmax(-1)
    t = torch.where(keep & (torch.arange(rows) % 3 == 1), top, t)
    if ties and vocab > 1:
        for r in range(rows):
            if keep[r] and r % 3 == 2:
                target = int(t[r]) if t[r] > 0 else 1
                t[r] = target
                x[r, target] = x[r, 0] = x[r].float().max() + 1
    return x, t


def check_logged_outputs(rows, vocab, dtype, reduction, weighted=False, label_smoothing=0.0,
                         z_loss=0.0, softcap=0.0, ignore="some"):
    """return_z_loss / return_token_accuracy against the reference: the loss unchanged,
    the accuracy exactly (each row's correct bit), the z term within the dtype's rounding
    of the float64 reference; neither differentiable."""
    x, t = accuracy_case(rows, vocab, dtype, ignore)
    w = (torch.rand(vocab) + 0.5).to(dtype) if weighted else None
    opts = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap)
    leaf = x.clone().requires_grad_(True)
    out = F.cross_entropy(leaf, t, **opts, return_z_loss=True, return_token_accuracy=True)
    assert isinstance(out, F.CrossEntropyOutput)
    torch.testing.assert_close(out.loss, F.cross_entropy(x, t, **opts), rtol=0, atol=0,
                               equal_nan=True)
    _, want_z, want_acc = cross_entropy_ref(
        x, t, w, -100, reduction, label_smoothing, z_loss, softcap, return_z_loss=True,
        return_token_accuracy=True)
    _, ref_z, _ = cross_entropy_ref(
        x.double(), t, None if w is None else w.double(), -100, reduction, label_smoothing,
        z_loss, softcap, return_z_loss=True)
    name = f"{rows}x{vocab} {dtype} {reduction}"
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.token_accuracy.dtype == acc_dtype and out.z_loss.dtype == dtype, name
    assert out.token_accuracy.shape == out.loss.shape == out.z_loss.shape, name
    assert not out.token_accuracy.requires_grad and not out.z_loss.requires_grad, name
    torch.testing.assert_close(out.token_accuracy, want_acc, rtol=0, atol=0, equal_nan=True,
                               msg=name)
    torch.testing.assert_close(out.z_loss.double(), ref_z, rtol=4 * torch.finfo(dtype).eps,
                               atol=ATOL[dtype], equal_nan=True, msg=name)
    out.loss.backward(torch.ones_like(out.loss))  # the loss stays differentiable
    assert leaf.grad is not None and leaf.grad.shape == x.shape


LOGGED_SHAPES = {
    "native": [(37, 1000), (5, 7), (3, 4099)],
    "triton": [(9, 1000), (5, 7), (2, 4099)],
    "cuda_emu": [(9, 1000), (5, 7), (2, 4099)],
}


@pytest.mark.parametrize("feature", ["plain", "weight_smoothing", "z_loss", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logged_outputs_match_reference(backend, reduction, feature):
    for dtype in DTYPES[backend]:
        for rows, vocab in LOGGED_SHAPES[backend]:
            if dtype in (torch.float64, torch.float16) and vocab > 2000:
                continue
            check_logged_outputs(rows, vocab, dtype, reduction, **FEATURES[feature])


def test_token_accuracy_ties_and_special_rows(backend):
    """The tie rule (a target tied at the maximum is correct, also where argmax(-1) picks an
    earlier class), soft-capping (ties of the capped logits), and rows that are never correct:
    ignored ones, a NaN logit anywhere in the row, an infinite target logit."""
    x = torch.tensor([
        [1.0, 3.0, 3.0, 0.0],   # target 2 ties with class 1: correct (argmax says 1)
        [1.0, 3.0, 3.0, 0.0],   # target 0 below the max: wrong
        [5.0, 5.0, 5.0, 5.0],   # all equal: correct
        [1.0, float("nan"), 2.0, 0.0],  # a NaN logit: never correct
        [float("-inf")] * 4,    # every logit -inf: an infinite target logit, never correct
        [1.0, 3.0, 3.0, 0.0],   # ignored: not counted
        [0.5, 100.0, 200.0, 0.0],  # target 1 below the max: wrong
    ])
    t = torch.tensor([2, 0, 3, 2, 1, -100, 1])
    want = torch.tensor([1.0, 0, 1, 0, 0, 0, 0])
    out = F.cross_entropy(x, t, reduction="none", return_token_accuracy=True)
    assert out.z_loss is None
    torch.testing.assert_close(out.token_accuracy, want)
    assert (x.argmax(-1) == t)[0].item() is False  # argmax's first-maximum rule differs
    mean = F.cross_entropy(x, t, return_token_accuracy=True).token_accuracy
    torch.testing.assert_close(mean, torch.tensor(2 / 6))
    # Soft-capped at 1: 100 and 200 both cap to 1.0 in float32, a tie of the capped logits.
    capped = F.cross_entropy(x[6:], t[6:], softcap=1.0, return_token_accuracy=True)
    torch.testing.assert_close(capped.token_accuracy, torch.tensor(1.0))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logged_outputs_every_row_ignored(backend, reduction):
    """Like the loss: mean and sum of the accuracy are NaN (0 / 0 rows; a fraction either
    way), the z term's mean is NaN and its sum 0; reduction="none" gives zeros."""
    x, t = torch.randn(6, 33), make_target(6, 33, ignore="all")
    out = F.cross_entropy(x, t, reduction=reduction, z_loss=1e-3, return_z_loss=True,
                          return_token_accuracy=True)
    if reduction == "none":
        assert torch.equal(out.token_accuracy, torch.zeros(6))
        assert torch.equal(out.z_loss, torch.zeros(6))
        return
    assert out.token_accuracy.isnan()
    assert out.z_loss.isnan() if reduction == "mean" else out.z_loss == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_logged_outputs(backend, reduction):
    """linear_cross_entropy's outputs, from each chunk's forward (chunks of 4 rows over 13),
    equal cross_entropy's on the materialised logits: accuracy exactly, z term closely."""
    h = torch.randn(13, 16)
    lw = torch.randn(300, 16)
    b = torch.randn(300)
    logits = TF.linear(h, lw, b)
    t = make_target(13, 300)
    t[1::3] = logits.argmax(-1)[1::3]
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=20.0,
                return_z_loss=True, return_token_accuracy=True)
    ours = F.linear_cross_entropy(h.requires_grad_(True), lw, t, linear_bias=b, chunk_size=4,
                                  **opts)
    want = F.cross_entropy(logits, t, **opts)
    assert isinstance(ours, F.CrossEntropyOutput)
    torch.testing.assert_close(ours.loss, want.loss)
    torch.testing.assert_close(ours.z_loss, want.z_loss)
    torch.testing.assert_close(ours.token_accuracy, want.token_accuracy, rtol=0, atol=0)
    assert 0 < float(ours.token_accuracy.sum()) < 13
    ours.loss.sum().backward()
    assert h.grad is not None


# ---- compilation for a real GPU (no GPU needed) ----------------------------------------------

# Vocabularies of real models: Llama-2 / Mistral (32000) and Llama-3 (128256) get the same
# launch configuration (_block_config: BLOCK_V 4096, 8 warps) and, as multiples of 16, aligned
# rows; GPT-2's 50257 the same tiles with unaligned rows. linear_cross_entropy runs these
# same kernels on each chunk's logits (its backward through cross_entropy_bwd_inplace, i.e.
# cross_entropy_bwd_kernel with grad_logits_ptr = logits_ptr): no kernel of its own.
GPU_COMPILE_VOCABS = (32000, 128256)
GPU_COMPILE_UNALIGNED_VOCAB = 50257


def _triton_ptxas_reports(arch: int) -> list[str]:
    """Compiles the three Triton kernels at the GPU launch configuration (_block_config) of
    GPU_COMPILE_VOCABS for sm_<arch> (Triton's own compiler, no GPU) and returns ptxas -v's
    resource lines of each: every combination of their flags (class weights, label
    smoothing, soft-capping) in float32 / bfloat16 / float16 logits, aligned; and every
    feature on with the unaligned GPU_COMPILE_UNALIGNED_VOCAB. Absent operands are None
    (constexpr), as a launch passes them. Needs TRITON_INTERPRET unset at import (the
    interpreter replaces the kernels by Python functions)."""

    import fastllm.triton.cross_entropy as kernels

    configs = {kernels._block_config(vocab) for vocab in GPU_COMPILE_VOCABS}
    assert configs == {kernels._block_config(GPU_COMPILE_UNALIGNED_VOCAB)}, configs
    (block_v, num_warps), = configs
    # Everything but the logits and their gradient has a fixed dtype.
    pointer_types = {"target_ptr": "*i64", "correct_ptr": "*i1", "weight_ptr": "*fp32",
                     "weight_sum_ptr": "*fp32", "grad_loss_ptr": "*fp32", "loss_ptr": "*fp32",
                     "lse_ptr": "*fp32", "lse_hi_ptr": "*fp32", "lse_lo_ptr": "*fp32"}
    float_args = ("label_smoothing", "z_loss", "softcap")
    reports = []
    for kernel in (kernels.cross_entropy_fwd_kernel, kernels.cross_entropy_exact_lse_kernel,
                   kernels.cross_entropy_bwd_kernel):
        flag_names = [flag for flag in ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")
                      if flag in kernel.arg_names]
        cases = [(dict(zip(flag_names, values)), True)
                 for values in itertools.product((False, True), repeat=len(flag_names))]
        cases.append((dict.fromkeys(flag_names, True), False))
        for dtype in ("fp32", "bf16", "fp16"):
            for flags, aligned in cases:
                weight = flags.get("HAS_WEIGHT", False)
                constants = dict(flags, BLOCK_V=block_v)
                if "ROUND_BF16_IN_SOFTWARE" in kernel.arg_names:
                    constants["ROUND_BF16_IN_SOFTWARE"] = False
                if "weight_ptr" in kernel.arg_names and not weight:
                    constants["weight_ptr"] = None
                if "weight_sum_ptr" in kernel.arg_names and not (
                        weight and flags["HAS_SMOOTHING"]):
                    constants["weight_sum_ptr"] = None
                # Pointers are aligned; a vocab of a multiple of 16 aligns the rows too
                # (contiguous logits: row stride = vocab), as a launch specializes them.
                signature, attrs = triton_signature(
                    kernel, constants,
                    lambda arg: (pointer_types.get(arg, "*" + dtype) if arg.endswith("_ptr")
                                 else "fp32" if arg in float_args else "i32"),
                    lambda arg: arg.endswith("_ptr") or (aligned and arg in (
                        "vocab", "stride_logits_row", "stride_grad_row")))
                resources = ptxas_resources(kernel, signature, constants, attrs, arch,
                                            num_warps=num_warps)
                features = " ".join(f"{flag}={value}" for flag, value in flags.items())
                reports.append(f"{kernel.fn.__name__} {dtype} {features} aligned={aligned}: "
                               f"{' '.join(resources)}")
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_without_spills(arch):
    assert_triton_compiles_without_spills("tests.test_cross_entropy", arch, 63)
