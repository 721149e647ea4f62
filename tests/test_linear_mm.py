"""fastllm::linear_mm_out and fastllm::linear_weight_grad_out, fastllm's own float32 GEMMs for
linear cross-entropy's chunks (csrc/common/gemm_cpu.h: gemm_f32 and gemm_f32_at): against a
float64 reference within twice torch's own float32 error, on shapes that hit every tail of
their blocking (rows of A past the 6-row micro-kernel, columns of C past 64 and past 16, k
past the 256-row panels, both loop orders; for the weight gradient rows of C past its 96-row
blocks), strided rows, empty operands, thread counts, bad arguments; on the best path this
CPU has in-process, on the AVX2 path in a child process (FASTLLM_CPU_ISA=avx2; the same bits
as the AVX-512 path, whose sums run in the same order), and the scalar cap, under which the
ops refuse and linear_cross_entropy keeps torch's GEMMs."""

from __future__ import annotations

import pytest
import torch

from fastllm import _native
from fastllm import functional as F
from fastllm.ops import linear_cross_entropy as lce
from tests.accuracy import assert_within_torch_error
from tests.helpers import cpu_has_avx512_path, outputs_per_cpu_isa
from tests.hostile import run_isolated


def cpu_has_avx2_path() -> bool:
    """Whether this CPU has what csrc/common/cpu_features.h's AVX2 path asks for."""
    from fastllm.bench.common import cpu_isa_features

    return bool((cpu_isa_features() or {}).get("avx2"))


pytestmark = [
    pytest.mark.skipif(not _native.AVAILABLE, reason="fastllm's native extension is not built"),
    pytest.mark.skipif(not cpu_has_avx2_path(),
                       reason="linear_mm_out needs the AVX-512 or AVX2 path, which this CPU "
                              "lacks"),
]


def mm_out(*args):
    return torch.ops.fastllm.linear_mm_out(*args)


def grad_out(*args):
    return torch.ops.fastllm.linear_weight_grad_out(*args)


def operands(M, N, K, b_transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g)
    # rows of B of very different sizes, so a wrongly placed column shows
    b = torch.randn(N, K, generator=g) * torch.logspace(-2, 2, N)[:, None]
    if not b_transposed:
        b = b.t().contiguous()
    bias = torch.randn(N, generator=g)
    return a, b, bias


# (M, N, K): M past the 6-row micro-kernel (tails of 1..5 rows), N past 64 and 16 columns,
# K past the 256-row panels; with K >= 64 x (column blocks) the k-outer order runs.
SHAPES = [(1, 1, 1), (5, 17, 3), (6, 64, 256), (7, 130, 257), (13, 100, 300), (25, 70, 1500),
          (3, 200, 40), (128, 1000, 1024), (11, 48, 4096)]


def checked_product(shape, b_transposed, with_bias, what="linear_mm_out"):
    """linear_mm_out of operands(shape) into a NaN-filled out, asserted within twice torch's
    float32 error against a float64 reference; returns out."""
    M, N, K = shape
    a, b, bias = operands(M, N, K, b_transposed)
    bias = bias if with_bias else None
    b_op = b.t() if b_transposed else b
    ref = a.double() @ b_op.double() + (0 if bias is None else bias.double())
    theirs = torch.mm(a, b_op) if bias is None else torch.addmm(bias, a, b_op)
    out = torch.full((M, N), float("nan"))
    mm_out(a, b, b_transposed, bias, out)
    assert_within_torch_error(f"{what} {shape}", out, theirs, ref, torch.float32)
    return out


@pytest.mark.parametrize("b_transposed", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_mm_within_torch_error(shape, b_transposed, with_bias):
    checked_product(shape, b_transposed, with_bias)


@pytest.mark.parametrize("b_transposed", [True, False])
def test_linear_mm_strided_rows_and_untouched_neighbours(b_transposed):
    """Operands whose rows lie further apart than their lengths (slices of wider matrices),
    and an output slice: the columns beside it keep their values."""
    M, N, K = 9, 75, 300
    a_wide = torch.randn(M, K + 13)
    b_wide = torch.randn(N, K + 5) if b_transposed else torch.randn(K, N + 7)
    a = a_wide[:, 3:3 + K]
    b = b_wide[:, 2:2 + K] if b_transposed else b_wide[:, 1:1 + N]
    out_wide = torch.full((M, N + 20), 7.0)
    out = out_wide[:, 10:10 + N]
    bias = torch.randn(N)
    mm_out(a, b, b_transposed, bias, out)
    b_op = b.t() if b_transposed else b
    ref = a.double() @ b_op.double() + bias.double()
    assert_within_torch_error("strided", out, torch.addmm(bias, a, b_op), ref, torch.float32)
    assert (out_wide[:, :10] == 7).all() and (out_wide[:, 10 + N:] == 7).all()


def test_linear_mm_empty_operands():
    """K = 0 writes the bias (or zeros) over whatever out held; M = 0 or N = 0 is a no-op."""
    bias = torch.randn(70)
    out = torch.full((3, 70), float("nan"))
    mm_out(torch.empty(3, 0), torch.empty(70, 0), True, bias, out)
    assert torch.equal(out, bias.expand(3, 70))
    out = torch.full((3, 70), float("nan"))
    mm_out(torch.empty(3, 0), torch.empty(0, 70), False, None, out)
    assert torch.equal(out, torch.zeros(3, 70))
    mm_out(torch.empty(0, 8), torch.randn(5, 8), True, None, torch.empty(0, 5))
    mm_out(torch.randn(4, 8), torch.empty(0, 8), True, None, torch.empty(4, 0))


def assert_same_bits_for_thread_counts(compute):
    """compute() (a fresh output) under 1, 2 and 3 threads: the same bits each time."""
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(compute())
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("b_transposed", [True, False])
def test_linear_mm_same_bits_for_any_thread_count(b_transposed):
    """Each element's sum runs in the same order (panel by panel of k) whichever thread, and
    whichever loop order, computes its block: 1, 2 and 3 threads give the same bits."""
    a, b, bias = operands(37, 700, 600, b_transposed, seed=3)

    def compute():
        out = torch.empty(37, 700)
        mm_out(a, b, b_transposed, bias, out)
        return out

    assert_same_bits_for_thread_counts(compute)


def test_linear_mm_rejects_bad_arguments():
    a, b, out = torch.randn(4, 8), torch.randn(5, 8), torch.empty(4, 5)
    with pytest.raises(TypeError, match="a must be float32, got Double"):
        mm_out(a.double(), b, True, None, out)
    with pytest.raises(TypeError, match="bias must be float32"):
        mm_out(a, b, True, torch.zeros(5, dtype=torch.bfloat16), out)
    with pytest.raises(RuntimeError, match=r"b must be \(N, K\) with K = a.size\(1\) = 8"):
        mm_out(a, torch.randn(5, 7), True, None, out)
    with pytest.raises(RuntimeError, match=r"b must be \(K, N\)"):
        mm_out(a, b, False, None, out)
    with pytest.raises(RuntimeError, match=r"out must have shape \[4, 5\], got \[5, 4\]"):
        mm_out(a, b, True, None, torch.empty(5, 4))
    with pytest.raises(RuntimeError, match=r"bias must have shape \[5\], got \[4\]"):
        mm_out(a, b, True, torch.zeros(4), out)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        mm_out(a[None], b, True, None, out)
    with pytest.raises(RuntimeError, match=r"a must have contiguous rows \(stride\(1\) == 1\)"):
        mm_out(torch.randn(8, 4).t(), b, True, None, out)
    with pytest.raises(RuntimeError, match=r"b must have rows that do not overlap"):
        mm_out(a, torch.randn(8).expand(5, 8), True, None, out)
    shared = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        mm_out(shared, torch.randn(8, 8), True, None, shared)


# linear_weight_grad_out: out (M, N) (+)= grad (K, M).T @ input (K, N). (K, M, N): K past the
# 256-row k panels, M past the 96-row blocks and the 6-row strips, N past 64 (a short last
# column block, computed in scratch) and not a multiple of 16.
GRAD_SHAPES = [(1, 1, 1), (3, 5, 17), (132, 300, 64), (257, 97, 130), (7, 1000, 64),
               (600, 200, 70), (40, 6, 1024), (1500, 13, 48)]


def checked_grad(shape, accumulate, what="linear_weight_grad_out"):
    """linear_weight_grad_out of random operands into a NaN-filled out (accumulate=False) or
    one holding random values (True), asserted within twice torch's float32 error against a
    float64 reference; returns out."""
    K, M, N = shape
    g = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(K, M, generator=g)
    # columns of the input of very different sizes, so a wrongly placed column shows
    inp = torch.randn(K, N, generator=g) * torch.logspace(-2, 2, N)
    start = torch.randn(M, N, generator=g) if accumulate else torch.zeros(M, N)
    ref = start.double() + grad.double().t() @ inp.double()
    theirs = start.clone().addmm_(grad.t(), inp)
    out = start.clone() if accumulate else torch.full((M, N), float("nan"))
    grad_out(grad, inp, accumulate, out)
    assert_within_torch_error(f"{what} {shape} accumulate={accumulate}", out, theirs, ref,
                              torch.float32)
    return out


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_weight_grad_within_torch_error(shape, accumulate):
    checked_grad(shape, accumulate)


def test_linear_weight_grad_sums_chunks_like_one_product():
    """Chunks of rows summed into one out (accumulate after the first), as linear
    cross-entropy's chunks sum dW: within torch's error of the whole product, and the same
    as the chunks' products added by torch (each chunk rounded once into out)."""
    g = torch.Generator().manual_seed(7)
    grad, inp = torch.randn(390, 500, generator=g), torch.randn(390, 200, generator=g)
    out, theirs = torch.empty(500, 200), torch.zeros(500, 200)
    for i, start in enumerate(range(0, 390, 132)):
        grad_out(grad[start:start + 132], inp[start:start + 132], i > 0, out)
        theirs.addmm_(grad[start:start + 132].t(), inp[start:start + 132])
    ref = grad.double().t() @ inp.double()
    assert_within_torch_error("chunked", out, theirs, ref, torch.float32)


def test_linear_weight_grad_strided_rows_and_untouched_neighbours():
    """grad, input and out as slices of wider matrices (rows further apart than their
    lengths, grad's far apart as a chunk's logit gradient is): the columns beside out keep
    their values, with and without accumulate."""
    K, M, N = 150, 130, 70
    grad_wide, inp_wide = torch.randn(K, M + 333), torch.randn(K, N + 9)
    grad, inp = grad_wide[:, 5:5 + M], inp_wide[:, 4:4 + N]
    ref = grad.double().t() @ inp.double()
    for accumulate in (False, True):
        out_wide = torch.full((M, N + 20), 7.0)
        out = out_wide[:, 10:10 + N]
        grad_out(grad, inp, accumulate, out)
        want = ref + (7.0 if accumulate else 0.0)
        theirs = torch.full((M, N), 7.0 if accumulate else 0.0).addmm_(grad.t(), inp)
        assert_within_torch_error("strided", out, theirs, want, torch.float32)
        assert (out_wide[:, :10] == 7).all() and (out_wide[:, 10 + N:] == 7).all()


def test_linear_weight_grad_empty_operands():
    """K = 0 zeroes out (accumulate=False) or leaves it (True); M = 0 or N = 0 is a no-op."""
    out = torch.full((3, 70), float("nan"))
    grad_out(torch.empty(0, 3), torch.empty(0, 70), False, out)
    assert torch.equal(out, torch.zeros(3, 70))
    out = torch.full((3, 70), 2.5)
    grad_out(torch.empty(0, 3), torch.empty(0, 70), True, out)
    assert torch.equal(out, torch.full((3, 70), 2.5))
    grad_out(torch.randn(5, 0), torch.randn(5, 8), False, torch.empty(0, 8))
    grad_out(torch.randn(5, 4), torch.randn(5, 0), False, torch.empty(4, 0))


def test_linear_weight_grad_same_bits_for_any_thread_count():
    """Each row block of out is one thread's, its sums in the same order whichever thread:
    1, 2 and 3 threads give the same bits."""
    g = torch.Generator().manual_seed(3)
    grad, inp = torch.randn(300, 1000, generator=g), torch.randn(300, 130, generator=g)

    def compute():
        out = torch.ones(1000, 130)
        grad_out(grad, inp, True, out)
        return out

    assert_same_bits_for_thread_counts(compute)


def test_linear_weight_grad_rejects_bad_arguments():
    grad, inp, out = torch.randn(4, 5), torch.randn(4, 8), torch.empty(5, 8)
    with pytest.raises(TypeError, match="grad must be float32, got Double"):
        grad_out(grad.double(), inp, False, out)
    with pytest.raises(TypeError, match="out must be float32, got BFloat16"):
        grad_out(grad, inp, False, out.bfloat16())
    with pytest.raises(RuntimeError, match=r"input must have grad.size\(0\) = 4 rows, got input "
                                           r"\[3, 8\]"):
        grad_out(grad, torch.randn(3, 8), False, out)
    with pytest.raises(RuntimeError, match=r"out must have shape \[5, 8\] \(grad.size\(1\), "
                                           r"input.size\(1\)\), got \[8, 5\]"):
        grad_out(grad, inp, False, torch.empty(8, 5))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        grad_out(grad[None], inp, False, out)
    with pytest.raises(RuntimeError, match=r"grad must have contiguous rows \(stride\(1\) == 1\)"):
        grad_out(torch.randn(5, 4).t(), inp, False, out)
    with pytest.raises(RuntimeError, match="input must have rows that do not overlap"):
        grad_out(grad, torch.randn(8).expand(4, 8), False, out)
    shared = torch.zeros(5, 5)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        grad_out(shared, torch.randn(5, 5), True, shared)


def test_linear_weight_grad_opcheck():
    """Schema (out mutated, nothing returned), fake tensor and AOT dispatch agree with the
    kernel (torch.library.opcheck), with and without accumulate."""
    g = torch.Generator().manual_seed(5)
    grad, inp = torch.randn(300, 13, generator=g), torch.randn(300, 70, generator=g)
    for accumulate in (False, True):
        torch.library.opcheck(torch.ops.fastllm.linear_weight_grad_out,
                              (grad, inp, accumulate, torch.ones(13, 70)))


# Every shape, both layouts of B, with and without bias, on the path of FASTLLM_CPU_ISA in a
# child: within torch's error, and the outputs saved for test_avx2_and_avx512_paths_agree.
PATH_SCRIPT = """
import itertools, os, torch
from fastllm.backend import cpu_kernel_path
from tests.test_linear_mm import SHAPES, checked_product
path = cpu_kernel_path("cross_entropy", torch.float32)
assert path == (os.environ["FASTLLM_CPU_ISA"] or path), path
outs = {"path": path}
for shape, bt, wb in itertools.product(SHAPES, (True, False), (False, True)):
    outs[(shape, bt, wb)] = checked_product(shape, bt, wb, f"{path} {bt} {wb}")
from tests.test_linear_mm import GRAD_SHAPES, checked_grad
for shape, acc in itertools.product(GRAD_SHAPES, (False, True)):
    outs[("grad", shape, acc)] = checked_grad(shape, acc, f"{path} grad")
bias = torch.randn(70)
out = torch.full((3, 70), float("nan"))
torch.ops.fastllm.linear_mm_out(torch.empty(3, 0), torch.empty(70, 0), True, bias, out)
assert torch.equal(out, bias.expand(3, 70))
torch.save(outs, os.environ["OUT"])
print("ok")
"""


def test_avx2_and_avx512_paths_agree(tmp_path):
    """The AVX2 path (FASTLLM_CPU_ISA=avx2) is within torch's error on every shape of both ops,
    and where the CPU has AVX-512 too, both paths give the same bits: each element is the same
    sums of the same products in the same order (k panels of 256, sums of at most 32 FMAs from
    zero, added to C one by one), only the registers that hold them differ."""
    levels = ("avx2", "") if cpu_has_avx512_path() else ("avx2",)
    results = outputs_per_cpu_isa(PATH_SCRIPT, tmp_path, levels=levels)
    assert results["avx2"]["path"] == "avx2"
    if "" in results:
        assert results[""]["path"] == "avx512"
        for key, out in results["avx2"].items():
            if key != "path":
                assert torch.equal(out, results[""][key]), key


def test_scalar_cap_refuses_the_op_and_linear_cross_entropy_keeps_torch_gemm():
    """Under FASTLLM_CPU_ISA=scalar the ops name the paths they need, _own_gemm says no, and
    the chunked linear cross-entropy (torch's GEMMs) still matches the unfused reference."""
    out = run_isolated(
        """
        import torch, pytest
        import torch.nn.functional as TF
        from fastllm import functional as F
        from fastllm.ops import linear_cross_entropy as lce
        with pytest.raises(RuntimeError, match="needs the AVX-512 or AVX2 path"):
            torch.ops.fastllm.linear_mm_out(torch.randn(2, 3), torch.randn(4, 3), True, None,
                                            torch.empty(2, 4))
        with pytest.raises(RuntimeError, match="needs the AVX-512 or AVX2 path"):
            torch.ops.fastllm.linear_weight_grad_out(torch.randn(2, 3), torch.randn(2, 4),
                                                     False, torch.empty(3, 4))
        x = torch.randn(13, 16, requires_grad=True)
        w = torch.randn(300, 16, requires_grad=True)
        t = torch.randint(0, 300, (13,))
        assert not lce._own_gemm(x, w, None, "native")
        ours = F.linear_cross_entropy(x, w, t, chunk_size=5)
        ref = TF.cross_entropy(TF.linear(x, w), t)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
        print("ok")
        """,
        env={"FASTLLM_CPU_ISA": "scalar", "FASTLLM_BACKEND": "native"},
    )
    assert out.strip().endswith("ok"), out


def test_own_gemm_choice_and_chunk_floor():
    """float32 on the native CPU kernels takes fastllm's GEMM (this CPU has the AVX-512 or AVX2
    path), other dtypes and backends torch's; with it the chunk floor is 128 rows, so 4096 x
    1024 x 32000 runs in chunks of 132 (the aspect-ratio rule) instead of 256."""
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    assert lce._own_gemm(x, w, None, "native")
    assert lce._own_gemm(x, w, torch.zeros(10), "native")
    assert not lce._own_gemm(x, w, torch.zeros(10, dtype=torch.float64), "native")
    assert not lce._own_gemm(x.bfloat16(), w.bfloat16(), None, "native")
    assert not lce._own_gemm(x, w, None, "triton")
    assert not lce._own_gemm(x, torch.randn(8, 10).t(), None, "native")
    assert not lce._own_gemm(x, torch.randn(1, 8).expand(10, 8), None, "native")
    assert lce.default_chunk_size(4096, 1024, 32000, torch.float32, own_gemm=True) == 132
    assert lce.default_chunk_size(4096, 1024, 32000, torch.float32) == 256


def test_linear_mm_opcheck():
    """Schema (out mutated, nothing returned), fake tensor (torch's default for an op that
    returns nothing) and AOT dispatch agree with the kernel (torch.library.opcheck)."""
    a, b, bias = operands(13, 70, 300, True, seed=5)
    torch.library.opcheck(torch.ops.fastllm.linear_mm_out, (a, b, True, bias, torch.empty(13, 70)))
    a, b, _ = operands(13, 70, 300, False, seed=5)
    torch.library.opcheck(torch.ops.fastllm.linear_mm_out, (a, b, False, None, torch.empty(13, 70)))


def test_linear_cross_entropy_with_overlapping_rows():
    """An expanded input (rows at stride 0) and an expanded weight, which fastllm's GEMMs
    refuse, take torch's GEMM for those products: the results match the unfused path."""
    x = torch.randn(1, 16).expand(13, 16).requires_grad_()
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(0))
    for weight in (w, torch.randn(1, 16).expand(300, 16).requires_grad_()):
        ours = F.linear_cross_entropy(x, weight, t, chunk_size=5)
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight), t)
        torch.testing.assert_close(ours, ref)
        for got, want in zip(torch.autograd.grad(ours, (x, weight)),
                             torch.autograd.grad(ref, (x, weight))):
            torch.testing.assert_close(got, want)
