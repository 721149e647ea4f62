"""LayerNorm / RMSNorm family: every backend against a float64 reference, with the
2x-PyTorch's-own-error rule (tests/accuracy.py), forward and all gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as TF

import fastllm.functional as F
from tests.accuracy import assert_within_torch_error
from tests.helpers import assert_triton_compiles_without_spills, ptxas_resources, triton_signature

FAMILY = "norm"
BACKENDS = ("native", "triton", "cuda_emu")

KINDS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Emulated CUDA and interpreted Triton are slow: small shapes there, the odd ones kept.
SHAPES = {
    "native": [(3, 5, 1000), (1, 1), (7, 65536), (4, 97), (2, 3, 128), (33, 4099)],
    "triton": [(3, 5, 1000), (1, 1), (4, 97), (2, 3, 128), (3, 4099)],
    "cuda_emu": [(3, 5, 1000), (1, 1), (4, 97), (2, 3, 128), (3, 4099)],
}


def torch_impl(kind, x, r, shape, w, b, eps):
    """PyTorch's own ops, in the inputs' dtype (used both for its error and, on float64
    copies, as the reference)."""
    if kind == "layer_norm":
        return TF.layer_norm(x, shape, w, b, eps)
    if kind == "rms_norm":
        return TF.rms_norm(x, shape, w, eps)
    s = x + r
    if kind == "add_layer_norm":
        return TF.layer_norm(s, shape, w, b, eps), s
    return TF.rms_norm(s, shape, w, eps), s


def fastllm_impl(kind, x, r, shape, w, b, eps):
    if kind == "layer_norm":
        return F.layer_norm(x, shape, w, b, eps)
    if kind == "rms_norm":
        return F.rms_norm(x, shape, w, eps)
    if kind == "add_layer_norm":
        return F.add_layer_norm(x, r, shape, w, b, eps)
    return F.add_rms_norm(x, r, shape, w, eps)


def run(fn, kind, inputs, shape, eps, grads_out):
    """Forward + backward; returns the outputs and the gradients of every input."""
    x, r, w, b = inputs
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    lx, lr, lw, lb = leaves
    out = fn(kind, lx, lr, shape, lw, lb, eps)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads_out[: len(outs)])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def make_inputs(kind, full_shape, nd, dtype, affine, layout, gen_dtype=torch.float32):
    norm_shape = list(full_shape[len(full_shape) - nd:])

    def rand(shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, dtype=gen_dtype) * scale + shift).to(dtype)

    if layout == "contiguous":
        x = rand(full_shape, 2.0, 0.5)
    elif layout == "strided_rows":  # rows with a gap: a view with row stride > cols
        x = rand(list(full_shape[:-1]) + [full_shape[-1] + 3], 2.0, 0.5)[..., : full_shape[-1]]
    else:  # "transposed": leading dims permuted, last dim contiguous
        x = rand(list(reversed(full_shape[:-1])) + [full_shape[-1]], 2.0, 0.5)
        x = x.permute(*reversed(range(len(full_shape) - 1)), len(full_shape) - 1)
    r = rand(full_shape) if kind.startswith("add_") else None
    w = rand(norm_shape, 0.5, 1.0) if affine else None
    b = rand(norm_shape, 0.3) if affine and "layer" in kind else None
    return (x, r, w, b), norm_shape


def check_kind(kind, full_shape, dtype, affine, layout="contiguous", nd=1, eps=1e-5):
    (x, r, w, b), norm_shape = make_inputs(kind, full_shape, nd, dtype, affine, layout)
    assert tuple(x.shape) == tuple(full_shape)
    dy = torch.randn(full_shape).to(dtype)
    dsum = torch.randn(full_shape).to(dtype)
    grads_out = (dy, dsum)
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref_outs, ref_grads = run(
        torch_impl, kind, [to64(t) for t in (x, r, w, b)], norm_shape, eps,
        tuple(g.double() for g in grads_out),
    )
    torch_outs, torch_grads = run(torch_impl, kind, (x, r, w, b), norm_shape, eps, grads_out)
    our_outs, our_grads = run(fastllm_impl, kind, (x, r, w, b), norm_shape, eps, grads_out)
    for i, (o, t, ref) in enumerate(zip(our_outs, torch_outs, ref_outs)):
        assert o.dtype == t.dtype, f"output {i}: dtype {o.dtype}, torch gives {t.dtype}"
        assert_within_torch_error(f"{kind} output {i}", o, t, ref, dtype)
    for name, o, t, ref in zip(("input", "residual", "weight", "bias"), our_grads, torch_grads, ref_grads):
        if o is not None and t is not None:
            assert o.dtype == t.dtype, f"grad {name}: dtype {o.dtype}, torch gives {t.dtype}"
        assert_within_torch_error(f"{kind} grad {name}", o, t, ref, dtype)


@pytest.mark.parametrize("backend", ["native", "triton"], indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_norm_float64_rows_wider_than_half_the_register_block(backend, kind):
    """float64 rows of 4097..8192 columns, which the Triton kernels walk in column blocks
    (held in registers they spilled on sm_80 / sm_90: fastllm/triton/norm.py _tile_config):
    forward and backward against torch in float64."""
    check_kind(kind, (3, 5000), torch.float64, affine=True)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_norm_matches_reference(backend, kind, dtype, affine):
    for shape in SHAPES[backend]:
        check_kind(kind, shape, dtype, affine)


@pytest.mark.parametrize("layout", ["strided_rows", "transposed"])
@pytest.mark.parametrize("kind", KINDS)
def test_norm_non_contiguous(backend, kind, layout):
    check_kind(kind, (3, 6, 257), torch.bfloat16, True, layout=layout)
    check_kind(kind, (5, 2, 96), torch.float32, True, layout=layout)


@pytest.mark.parametrize("kind", KINDS)
def test_norm_multi_dim_normalized_shape(backend, kind):
    check_kind(kind, (3, 4, 5, 7), torch.float32, True, nd=2)
    check_kind(kind, (2, 3, 4, 5), torch.float16, True, nd=3)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norm_float32_weight_with_low_precision_input(backend, kind):
    """torch accepts a float32 weight with a bfloat16/float16 input; so do we."""
    x = torch.randn(6, 300).to(torch.bfloat16)
    w = torch.rand(300) + 0.5
    b = torch.randn(300) if kind == "layer_norm" else None
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    bs = [b.clone().requires_grad_(True) if b is not None else None for _ in range(2)]
    ours = fastllm_impl(kind, xs[0], None, [300], ws[0], bs[0], 1e-5)
    theirs = torch_impl(kind, xs[1], None, [300], ws[1], bs[1], 1e-5)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    dy = torch.randn(6, 300).to(torch.bfloat16)
    ours.backward(dy)
    theirs.backward(dy)
    assert ws[0].grad.dtype == torch.float32
    ref = torch_impl(kind, x.double(), None, [300], w.double(), None if b is None else b.double(), 1e-5)
    assert_within_torch_error("out", ours.detach(), theirs.detach(), ref, torch.bfloat16)
    torch.testing.assert_close(ws[0].grad, ws[1].grad, rtol=2e-2, atol=2e-2)


def test_rms_norm_default_eps(backend):
    """eps=None is torch.finfo(float32).eps for low-precision input, as in torch's kernel."""
    x = torch.randn(4, 64).to(torch.bfloat16) * 1e-4
    ref = TF.rms_norm(x.float(), [64], eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(F.rms_norm(x, [64]).float(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(F.rms_norm(x, [64]), TF.rms_norm(x, [64]), rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("shape, nd", [((0, 16), 1), ((4, 0), 1), ((0, 0), 1), ((2, 3, 0), 2)],
                         ids=["rows_0", "cols_0", "both_0", "cols_0_2d"])
@pytest.mark.parametrize("kind", KINDS)
def test_norm_empty(backend, kind, shape, nd):
    """No rows, or rows of no element: empty outputs and zero parameter gradients, as torch."""
    check_kind(kind, shape, torch.float32, True, nd=nd)


def test_norm_weight_grad_many_rows_reduced_correctly(backend):
    """Weight/bias gradients are reductions over rows: check row counts around any
    partial-sum chunking the kernels use."""
    rows = {"native": [1, 2, 3, 31, 257, 2049], "triton": [1, 3, 257], "cuda_emu": [1, 3, 70]}[backend]
    for n in rows:
        check_kind("layer_norm", (n, 40), torch.float32, True)
        check_kind("rms_norm", (n, 40), torch.float32, True)


# ---- compilation for a real GPU (no GPU needed) ----------------------------------------------

# Row lengths whose tiles _tile_config picks on a GPU: (BLOCK_M, BLOCK_N) = (2, 1024) at 768
# (GPT-2, BERT), (1, 4096) at 4096 (Llama-7B), (1, 8192), the largest row held in registers,
# and rows longer than MAX_BLOCK_N, which loop over (1, LOOP_BLOCK_N) blocks; 8 warps each.
GPU_COMPILE_COLS = (768, 4096, 8192, 16384)
# float64 rows of 4097..8192 columns loop over column blocks (_tile_config's acc_bytes): held
# in registers at BLOCK_N 8192, ptxas (triton 3.8) spilled, all flags on, stores / loads in
# bytes: norm_bwd_kernel layer norm 5036 / 5788 (sm_80), 1280 / 936 (sm_90), rms norm
# 352 / 288 (sm_80), 384 / 336 (sm_90); norm_fwd_kernel rms norm 8 / 8 (sm_80).


def _triton_ptxas_reports(arch: int) -> list[str]:
    """Compiles both Triton kernels at the GPU launch configuration (_tile_config) of every
    row length of GPU_COMPILE_COLS for sm_<arch> (Triton's own compiler, no GPU) and returns
    ptxas -v's resource lines of each: layer and rms norm with weights (and bias) and their
    gradients, in float32 / bfloat16 / float16 / float64. With the
    residual (add_*: the code without it plus a load and a store) at every row length;
    without it too at BLOCK_N 8192, whose rows use the most registers (not in float64).
    Absent operands are None (constexpr), as a launch passes them. Needs TRITON_INTERPRET
    unset at import (the interpreter replaces the kernels by Python functions)."""

    import fastllm.triton.norm as kernels

    def compile_kernel(kernel, dtype, tiles, constants):
        acc = "fp64" if dtype == "fp64" else "fp32"
        constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
        def arg_type(name):
            if name.endswith("_ptr"):
                # Parameters, statistics and partial sums in the accumulation dtype;
                # activations and their gradients in the input's.
                in_acc = name.startswith(("weight", "bias", "mean", "rstd", "dweight", "dbias"))
                return "*" + (acc if in_acc else dtype)
            return "fp32" if name == "eps" else "i32"

        # Contiguous rows of a multiple of 16 columns: aligned pointers, row strides and
        # cols, as a launch specializes them.
        signature, attrs = triton_signature(
            kernel, constants, arg_type,
            lambda name: name.endswith("_ptr") or name.startswith("stride") or name == "cols")
        return ptxas_resources(kernel, signature, constants, attrs, arch,
                               num_warps=tiles.num_warps)

    reports = []
    for cols in GPU_COMPILE_COLS:
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            # the rows do not change a GPU's tiles; float64 accumulates in 8 bytes
            tiles = kernels._tile_config(4096, cols, 8 if dtype == "fp64" else 4)
            residuals = (False, True) if tiles.block_n == 8192 and dtype != "fp64" else (True,)
            for is_rms_norm, residual in itertools.product((False, True), residuals):
                constants = dict(
                    IS_RMS_NORM=is_rms_norm, HAS_RESIDUAL=residual, HAS_DRESIDUAL=residual,
                    HAS_WEIGHT=True, HAS_BIAS=not is_rms_norm, COMPUTE_DWEIGHT=True,
                    COMPUTE_DBIAS=not is_rms_norm, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                    ROW_FITS_BLOCK=tiles.row_fits_block, ROUND_BF16_IN_SOFTWARE=False,
                )
                if not residual:
                    constants.update(residual_ptr=None, residual_out_ptr=None,
                                     dresidual_out_ptr=None)
                if is_rms_norm:
                    constants.update(bias_ptr=None, mean_ptr=None, dbias_partial_ptr=None)
                for kernel in (kernels.norm_fwd_kernel, kernels.norm_bwd_kernel):
                    name = kernel.fn.__name__
                    resources = compile_kernel(kernel, dtype, tiles, constants)
                    kind = "rms_norm" if is_rms_norm else "layer_norm"
                    reports.append(f"{name} {dtype} N={cols} {kind} residual={residual}: "
                                   f"{' '.join(resources)}")
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_without_spills(arch):
    assert_triton_compiles_without_spills("tests.test_norm", arch, 76)
