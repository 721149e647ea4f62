"""Gated-MLP family (SwiGLU / GeGLU): every backend against a float64 reference, with the
2x-PyTorch's-own-error rule (tests/accuracy.py), forward and both gradients; both calling
forms (gate and up, or one tensor holding both halves), odd widths, non-contiguous inputs,
empty problems."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as TF

import fastllm.functional as F
from tests.accuracy import assert_within_torch_error
from tests.helpers import assert_triton_compiles_without_spills, ptxas_resources, triton_signature

FAMILY = "gated_mlp"
BACKENDS = ("native", "triton", "cuda_emu")

KINDS = ("swiglu", "geglu", "geglu_tanh")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (..., N) shapes of gate (the one-tensor form doubles the last dim). Emulated CUDA and
# interpreted Triton are slow: small shapes there, the odd widths kept.
SHAPES = {
    "native": [(3, 5, 97), (1, 1), (4, 7), (2, 11008), (33, 4099), (3, 2, 64)],
    "triton": [(3, 5, 97), (1, 1), (4, 7), (1, 11008), (3, 2, 64)],
    "cuda_emu": [(3, 5, 97), (1, 1), (4, 7), (1, 11008), (3, 2, 64)],
}

_TORCH_ACT = {
    "swiglu": TF.silu,
    "geglu": TF.gelu,
    "geglu_tanh": functools.partial(TF.gelu, approximate="tanh"),
}


def torch_impl(kind, gate, up=None):
    """PyTorch's own ops in the inputs' dtype: used for its error and, on float64 copies, as
    the reference."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return _TORCH_ACT[kind](gate) * up


def fastllm_impl(kind, gate, up=None):
    if kind == "swiglu":
        return F.swiglu(gate, up)
    return F.geglu(gate, up, approximate="tanh" if kind == "geglu_tanh" else "none")


def run(fn, kind, inputs, grad_out):
    """Forward and backward: the output and the gradient of every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(kind, *leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def check_kind(kind, inputs, grad_out=None):
    """fastllm against the float64 reference under the accuracy rule; ``inputs`` is
    (gate, up) or (x,) and may be views of any layout."""
    dtype = inputs[0].dtype
    if grad_out is None:
        out_shape = list(inputs[0].shape)
        if len(inputs) == 1:
            out_shape[-1] //= 2
        grad_out = torch.randn(out_shape).to(dtype)
    ref_out, ref_grads = run(torch_impl, kind, [t.double() for t in inputs], grad_out.double())
    torch_out, torch_grads = run(torch_impl, kind, inputs, grad_out)
    our_out, our_grads = run(fastllm_impl, kind, inputs, grad_out)
    assert our_out.dtype == dtype and our_out.shape == ref_out.shape
    assert_within_torch_error(f"{kind} out", our_out, torch_out, ref_out, dtype)
    for name, ours, theirs, ref in zip(("gate", "up"), our_grads, torch_grads, ref_grads):
        assert ours.dtype == dtype
        assert_within_torch_error(f"{kind} grad {name}", ours, theirs, ref, dtype)


def rand(shape, dtype, scale=2.0):
    return (torch.randn(shape) * scale).to(dtype)


@pytest.mark.parametrize("form", ["two", "one"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gated_mlp_matches_reference(backend, kind, dtype, form):
    for shape in SHAPES[backend]:
        if form == "two":
            check_kind(kind, (rand(shape, dtype), rand(shape, dtype, 1.0)))
        else:
            check_kind(kind, (rand(list(shape[:-1]) + [2 * shape[-1]], dtype),))


@pytest.mark.parametrize("layout", ["halves", "strided_rows", "transposed", "broadcast_grad"])
@pytest.mark.parametrize("kind", KINDS)
def test_gated_mlp_non_contiguous(backend, kind, layout):
    for dtype in (torch.float32, torch.bfloat16):
        if layout == "halves":  # gate and up given as the two halves of one tensor
            gate, up = rand((3, 4, 2 * 37), dtype).chunk(2, dim=-1)
            check_kind(kind, (gate, up))
        elif layout == "strided_rows":  # rows with a gap; the one-tensor form too
            x = rand((5, 2 * 41 + 6), dtype)
            check_kind(kind, (x[:, :41], x[:, 45:86]))
            check_kind(kind, (x[:, 3: 3 + 82],))
        elif layout == "transposed":  # leading dims permuted, last dim contiguous
            gate = rand((6, 3, 40), dtype).transpose(0, 1)
            up = rand((3, 6, 40), dtype)
            check_kind(kind, (gate, up))
            check_kind(kind, (rand((4, 3, 80), dtype).transpose(0, 1),))
        else:  # out.sum().backward(): a zero-stride grad_out
            shape = (3, 2, 9)
            check_kind(kind, (rand(shape, dtype), rand(shape, dtype)),
                       grad_out=torch.ones((), dtype=dtype).expand(shape))


def test_gated_mlp_last_dim_not_contiguous(backend):
    """A gate whose last dim has stride != 1 (a transposed matrix) is copied once, not refused."""
    gate = rand((16, 5), torch.float32).t()
    up = rand((5, 16), torch.float32)
    check_kind("swiglu", (gate, up))
    check_kind("geglu", (rand((10, 5), torch.float32).t(),))


@pytest.mark.parametrize("form", ["two", "one"])
def test_gated_mlp_empty(backend, form):
    for shape in ((0, 16), (4, 0), (2, 0, 3)):
        if form == "two":
            gate = torch.randn(shape, requires_grad=True)
            up = torch.randn(shape, requires_grad=True)
            out = F.swiglu(gate, up)
            assert out.shape == shape
            out.sum().backward()
            assert gate.grad.shape == shape and up.grad.shape == shape
        else:
            x = torch.randn(list(shape[:-1]) + [2 * shape[-1]], requires_grad=True)
            out = F.geglu(x)
            assert list(out.shape) == list(shape)
            out.sum().backward()
            assert x.grad.shape == x.shape


def test_gated_mlp_one_tensor_form_is_chunk_order(backend):
    """swiglu(x) == silu(x[..., :N]) * x[..., N:] (Hugging Face's / Liger's chunk order),
    and its gradient is one tensor laid out like x."""
    x = torch.randn(3, 10, requires_grad=True)
    out = F.swiglu(x)
    torch.testing.assert_close(out, TF.silu(x[:, :5]) * x[:, 5:])
    out.backward(torch.ones_like(out))
    assert x.grad.shape == (3, 10) and x.grad.is_contiguous()


# ---- compilation for a real GPU (no GPU needed) ----------------------------------------------


def _triton_ptxas_reports(arch: int) -> list[str]:
    """Compiles both Triton kernels for every activation and dtype at the GPU launch
    configuration for sm_<arch> (Triton's own compiler, no GPU) and returns ptxas -v's
    resource line of each. Needs TRITON_INTERPRET unset at import (the interpreter replaces
    the kernels by Python functions)."""

    import fastllm.triton.gated_mlp as kernels

    reports = []
    block_m, block_n = kernels.TILE_ELEMENTS // kernels.MAX_BLOCK_N, kernels.MAX_BLOCK_N
    for kernel in (kernels.gated_mlp_fwd_kernel, kernels.gated_mlp_bwd_kernel):
        for dtype in ("fp32", "bf16", "fp16"):
            for activation in kernels.ACTIVATION_CODES.values():
                constants = dict(ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n,
                                 ROUND_BF16_IN_SOFTWARE=False)
                signature, attrs = triton_signature(
                    kernel, constants,
                    lambda name: f"*{dtype}" if name.endswith("_ptr") else "i32",
                    lambda name: True)
                spills = ptxas_resources(kernel, signature, constants, attrs, arch, num_warps=8)
                reports.append(f"{kernel.fn.__name__} {dtype} {activation}: {' '.join(spills)}")
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_without_spills(arch):
    assert_triton_compiles_without_spills("tests.test_gated_mlp", arch, 18)
