"""Rotary family (RoPE): every backend against a float64 reference, with the
2x-PyTorch's-own-error rule (tests/accuracy.py), forward and backward; both layouts (NeoX,
interleaved), partial rotary, head dims 32 / 64 / 80 / 128, T = 1 and 97, positions as an
int offset, (B,) offsets and (B, T) positions, packed sequences (cu_seqlens), GQA q / k,
non-contiguous inputs (q / k sliced out of a fused qkv), in place under autograd."""

from __future__ import annotations


import pytest
import torch

import fastllm.functional as F
from fastllm.nn.rotary import default_inv_freq
from fastllm.reference.rotary import token_positions
from tests.accuracy import assert_within_torch_error
from tests.helpers import assert_triton_compiles_without_spills, ptxas_resources, triton_signature

FAMILY = "rotary"
BACKENDS = ("native", "triton", "cuda_emu")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (32, 64, 80, 128)
# (B, T, H, Hkv) per backend: the interpreted Triton and the emulated CUDA are slow, so
# fewer heads there; T = 1 (decoding) and T = 97 (odd) everywhere.
SHAPES = {
    "native": [(2, 97, 4, 2), (3, 1, 8, 1)],
    "triton": [(1, 97, 2, 1), (2, 1, 4, 2)],
    "cuda_emu": [(1, 97, 2, 1), (2, 1, 4, 2)],
}


def caches(max_t: int, rotary_dim: int, dtype=torch.float32):
    """HF LLaMA's cos / sin for positions 0 .. max_t - 1: (max_t, rotary_dim / 2)."""
    freqs = torch.outer(torch.arange(max_t).float(), default_inv_freq(rotary_dim, 10000.0))
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def torch_rotary(x, cos, sin, position_ids=None, cu_seqlens=None, offset=0, interleaved=False):
    """Hugging Face's eager formulation in x's dtype (cos / sin cast to it, ``x * cos +
    rotate_half(x) * sin``): PyTorch's own error, and on float64 inputs the reference."""
    rotary_dim = 2 * cos.shape[-1]
    pos = token_positions(x, position_ids, cu_seqlens, offset)
    c, s = cos[pos].to(x.dtype).unsqueeze(-2), sin[pos].to(x.dtype).unsqueeze(-2)
    xr, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        c, s = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * c + rotated * s, rest), dim=-1)


def run(fn, inputs, grads_out):
    """Outputs and the gradient of every input of fn(*inputs) -> tuple."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    grads = torch.autograd.grad(outs, leaves, grads_out)
    return [o.detach() for o in outs], grads


def check_qk(q, k, cos, sin, *, position_ids=None, cu_seqlens=None, offset=0,
             interleaved=False, k_none=False):
    """apply_rotary_qk (apply_rotary when k_none) forward and backward against the float64
    reference under the accuracy rule. q / k may be views of any layout."""
    dtype = q.dtype
    pos_arg = offset if position_ids is None and offset else position_ids

    def ours(*ts):
        if k_none:
            return (F.apply_rotary(ts[0], cos, sin, position_ids=pos_arg, cu_seqlens=cu_seqlens,
                                   interleaved=interleaved),)
        return F.apply_rotary_qk(*ts, cos, sin, position_ids=pos_arg, cu_seqlens=cu_seqlens,
                                 interleaved=interleaved)

    def theirs(*ts, c=cos, s=sin):
        return tuple(torch_rotary(t, c, s, position_ids, cu_seqlens, offset, interleaved)
                     for t in ts)

    inputs = [q] if k_none else [q, k]
    grads_out = [torch.randn(t.shape).to(dtype) for t in inputs]
    ref_outs, ref_grads = run(lambda *ts: theirs(*ts, c=cos.double(), s=sin.double()),
                              [t.double() for t in inputs], [g.double() for g in grads_out])
    torch_outs, torch_grads = run(theirs, inputs, grads_out)
    our_outs, our_grads = run(ours, inputs, grads_out)
    for name, a, b, r in zip(("q", "k"), our_outs, torch_outs, ref_outs):
        assert a.dtype == dtype and a.shape == r.shape
        assert_within_torch_error(f"out {name}", a, b, r, dtype)
    for name, a, b, r in zip(("q", "k"), our_grads, torch_grads, ref_grads):
        assert_within_torch_error(f"grad {name}", a, b, r, dtype)


def rand(shape, dtype):
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_matches_reference(backend, dtype, head_dim, interleaved):
    cos, sin = caches(128, head_dim)
    for b, t, h, hkv in SHAPES[backend]:
        q, k = rand((b, t, h, head_dim), dtype), rand((b, t, hkv, head_dim), dtype)
        check_qk(q, k, cos, sin, interleaved=interleaved)
    check_qk(rand((2, 5, 3, head_dim), dtype), None, cos, sin, interleaved=interleaved,
             k_none=True)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("head_dim, rotary_dim", [(80, 32), (64, 48), (128, 64), (32, 2)])
def test_rotary_partial(backend, head_dim, rotary_dim, interleaved):
    """rotary_dim < D (GPT-NeoX, Phi): features rotary_dim.. pass through untouched."""
    cos, sin = caches(16, rotary_dim)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = rand((2, 7, 3, head_dim), dtype), rand((2, 7, 1, head_dim), dtype)
        check_qk(q, k, cos, sin, interleaved=interleaved)
        out = F.apply_rotary(q, cos, sin, rotary_dim=rotary_dim, interleaved=interleaved)
        assert torch.equal(out[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("kind", ["int", "per_seq", "per_token", "per_token_int32"])
def test_rotary_positions(backend, kind):
    cos, sin = caches(64, 64)
    q, k = rand((3, 9, 2, 64), torch.float32), rand((3, 9, 1, 64), torch.float32)
    if kind == "int":
        check_qk(q, k, cos, sin, offset=40)
    elif kind == "per_seq":  # KV-cache decoding: each sequence at its own offset
        check_qk(q, k, cos, sin, position_ids=torch.tensor([0, 17, 55]))
        check_qk(q[:, :1], k[:, :1], cos, sin, position_ids=torch.tensor([63, 0, 5]),
                 interleaved=True)
    else:
        dtype = torch.int32 if kind == "per_token_int32" else torch.int64
        pos = torch.randint(0, 64, (3, 9), dtype=dtype)
        check_qk(q, k, cos, sin, position_ids=pos)
        check_qk(q, k, cos, sin, position_ids=pos.t().contiguous().t())  # strided (B, T)


def test_rotary_positions_equal_their_definition(backend):
    """An int offset o == (B,) offsets [o] * B == (B, T) positions o + t; all equal the
    rotation at the gathered angles."""
    cos, sin = caches(40, 32)
    x = rand((2, 6, 3, 32), torch.float32)
    a = F.apply_rotary(x, cos, sin, position_ids=7)
    b = F.apply_rotary(x, cos, sin, position_ids=torch.tensor([7, 7]))
    c = F.apply_rotary(x, cos, sin, position_ids=torch.arange(7, 13).expand(2, 6))
    d = F.apply_rotary(x, cos[7:], sin[7:])
    for other in (b, c, d):
        torch.testing.assert_close(a, other, rtol=0, atol=0)


@pytest.mark.parametrize("offsets", [False, True])
def test_rotary_packed(backend, offsets):
    """Packed (total, H, D) with cu_seqlens: positions restart at every sequence (plus its
    offset), exactly the padded result of each sequence."""
    cos, sin = caches(64, 64)
    cu = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32)  # an empty sequence included
    pos = torch.tensor([3, 9, 0, 40]) if offsets else None
    q, k = rand((20, 4, 64), torch.bfloat16), rand((20, 2, 64), torch.bfloat16)
    check_qk(q, k, cos, sin, position_ids=pos, cu_seqlens=cu)
    check_qk(q, k, cos, sin, position_ids=pos, cu_seqlens=cu, interleaved=True)
    out_q, _ = F.apply_rotary_qk(q, k, cos, sin, position_ids=pos, cu_seqlens=cu)
    for b in range(4):
        lo, hi = int(cu[b]), int(cu[b + 1])
        seq_pos = None if pos is None else int(pos[b])
        padded = F.apply_rotary(q[None, lo:hi], cos, sin, position_ids=seq_pos)
        torch.testing.assert_close(out_q[lo:hi], padded[0], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["fused_qkv", "transposed", "last_dim_strided",
                                    "broadcast_grad"])
def test_rotary_non_contiguous(backend, layout):
    cos, sin = caches(32, 64)
    for dtype in (torch.float32, torch.float16):
        if layout == "fused_qkv":  # q and k sliced out of one (B, T, H + 2 Hkv, D) projection
            qkv = rand((2, 11, 4 + 2 * 2, 64), dtype)
            check_qk(qkv[:, :, :4], qkv[:, :, 4:6], cos, sin)
            check_qk(qkv[:, :, :4], None, cos, sin, k_none=True, interleaved=True)
            packed = rand((15, 8, 64), dtype)
            check_qk(packed[:, :4], packed[:, 4:6], cos, sin, position_ids=torch.tensor([1, 2]),
                     cu_seqlens=torch.tensor([0, 6, 15], dtype=torch.int32))
        elif layout == "transposed":  # (B, H, T, D) storage viewed as (B, T, H, D)
            q = rand((2, 4, 9, 64), dtype).transpose(1, 2)
            k = rand((2, 1, 9, 64), dtype).transpose(1, 2)
            check_qk(q, k, cos, sin, offset=3)
        elif layout == "last_dim_strided":  # copied once, not refused
            q = rand((2, 5, 3, 128), dtype)[..., ::2]
            check_qk(q, rand((2, 5, 1, 64), dtype), cos, sin)
        else:  # out.sum().backward(): zero-stride gradients
            q = rand((2, 3, 2, 64), dtype).requires_grad_()
            out = F.apply_rotary(q, cos, sin)
            (grad,) = torch.autograd.grad(out.sum(), q)
            ref = torch_rotary(torch.ones(2, 3, 2, 64, dtype=torch.float64), cos.double(),
                               -sin.double())  # the inverse rotation of ones
            torch.testing.assert_close(grad.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("qk", [False, True])
def test_rotary_inplace_under_autograd(backend, qk):
    """inplace=True rotates the given tensors (views of a fused qkv) in place, returns them,
    and backward gives the gradient of the out-of-place op."""
    cos, sin = caches(32, 64)
    base = torch.randn(2, 7, 8, 64, requires_grad=True)
    grad_out = torch.randn(2, 7, 8, 64)

    def loss(inplace):
        qkv = base * 1.0  # a non-leaf to rotate in place
        q, k = qkv[:, :, :4], qkv[:, :, 4:6]
        if qk:
            q2, k2 = F.apply_rotary_qk(q, k, cos, sin, position_ids=2, inplace=inplace)
            if inplace:
                assert q2 is q and k2 is k
        else:
            q2 = F.apply_rotary(q, cos, sin, position_ids=torch.tensor([1, 3]), inplace=inplace)
            if inplace:
                assert q2 is q
        out = qkv if inplace else torch.cat((q2, k2 if qk else qkv[:, :, 4:6], qkv[:, :, 6:]),
                                            dim=2)
        return out

    expected = loss(False)
    (expected_grad,) = torch.autograd.grad(expected, base, grad_out)
    got = loss(True)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got, base, grad_out)
    torch.testing.assert_close(grad, expected_grad)


def test_rotary_inplace_without_grad(backend):
    cos, sin = caches(16, 32)
    q, k = torch.randn(2, 3, 4, 32), torch.randn(2, 3, 2, 32)
    expected = F.apply_rotary_qk(q, k, cos, sin)
    with torch.no_grad():
        q2, k2 = F.apply_rotary_qk(q, k, cos, sin, inplace=True)
    assert q2 is q and k2 is k
    torch.testing.assert_close((q, k), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rotary_caches_in_x_dtype(backend, dtype):
    """cos / sin may be stored in x's dtype (the values then carry its rounding)."""
    cos, sin = caches(32, 64, dtype)
    check_qk(rand((2, 6, 3, 64), dtype), rand((2, 6, 1, 64), dtype), cos, sin, offset=5)


def test_rotary_empty(backend):
    cos, sin = caches(8, 32)
    for shape in ((0, 4, 2, 32), (2, 0, 2, 32), (2, 4, 0, 32)):
        x = torch.randn(shape, requires_grad=True)
        out = F.apply_rotary(x, cos, sin)
        assert out.shape == shape
        out.sum().backward()
        assert x.grad.shape == shape


def test_rotary_backward_is_inverse_rotation(backend):
    """conjugate: rotating forward then by the raw op with conjugate=True gives x back."""
    from fastllm.ops.rotary import IMPLS

    cos, sin = caches(16, 64)
    x = torch.randn(2, 5, 3, 64)
    ops = IMPLS.select(x)
    y = ops.rotary_fwd(x, cos, sin, None, None, 4, False, False)
    back = ops.rotary_fwd(y, cos, sin, None, None, 4, False, True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


# ---- compilation for a real GPU (no GPU needed) ----------------------------------------------


def _triton_ptxas_reports(arch: int, dtypes=("fp32", "bf16", "fp16"), tile=None,
                          num_warps=None) -> list[str]:
    """Compiles the Triton kernel for every dtype, layout and direction at the GPU launch
    configuration for sm_<arch> (Triton's own compiler, no GPU) and returns ptxas -v's
    resource line of each. Needs TRITON_INTERPRET unset at import."""

    import fastllm.triton.rotary as kernels

    reports = []
    kernel = kernels.rotary_kernel
    block_half = 64  # D = 128
    tile = kernels.TILE_ELEMENTS if tile is None else tile
    num_warps = kernels.NUM_WARPS if num_warps is None else num_warps
    for dtype in dtypes:
        for interleaved in (False, True):
            for conjugate in (False, True):
                constants = dict(CONJUGATE=conjugate, INTERLEAVED=interleaved, COPY_REST=True,
                                 BLOCK_M=tile // block_half,
                                 BLOCK_HALF=block_half, BLOCK_REST=16,
                                 ROUND_BF16_IN_SOFTWARE=False)
                signature, attrs = triton_signature(
                    kernel, constants,
                    lambda name: ("*i64" if name == "pos_ptr"
                                  else "*fp32" if name in ("cos_ptr", "sin_ptr")
                                  else f"*{dtype}" if name.endswith("_ptr") else "i32"),
                    lambda name: name.endswith("_ptr"))
                spills = ptxas_resources(kernel, signature, constants, attrs, arch,
                                         num_warps=num_warps)
                reports.append(f"rotary_kernel {dtype} {interleaved} {conjugate}: "
                               f"{' '.join(spills)}")
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernel_compiles_without_spills(arch):
    assert_triton_compiles_without_spills("tests.test_rotary", arch, 12)


def test_triton_launcher_clamps_bad_positions():
    """The Triton launcher called directly (no value checks): positions outside cos's rows
    are clamped into them (what a GPU run gives; FASTLLM_CHECK_BOUNDS=1 in the tests checks
    every interpreted access stays inside the tensors)."""
    kernels = pytest.importorskip("fastllm.triton.rotary")
    from fastllm.reference.rotary import rotary_ref

    cos, sin = caches(8, 32)
    x = torch.randn(1, 4, 2, 32)
    pos = torch.tensor([[0, 99, -5, 7]])
    out = kernels.rotary_fwd(x, cos, sin, pos, None, 0, False, False)
    torch.testing.assert_close(out, rotary_ref(x, cos, sin, pos.clamp(0, 7)))


@pytest.mark.emulation_only
@pytest.mark.parametrize("backend", ["cuda_emu"], indirect=True)
def test_rotary_cuda_row_loop(backend):
    """The CUDA kernel's loop over rows (a block takes rows r, r + gridDim.x, ...), which a
    GPU runs only beyond ~1M rows: forced by capping the emulated grid at 3 blocks."""
    from fastllm import _emu

    cos, sin = caches(64, 64)
    q, k = rand((2, 13, 3, 80), torch.bfloat16), rand((2, 13, 1, 80), torch.bfloat16)
    packed = rand((17, 2, 64), torch.float32)
    with _emu.grid_cap(3):
        check_qk(q, k, cos[:, :16], sin[:, :16], position_ids=torch.tensor([4, 40]))
        check_qk(packed, None, cos, sin, cu_seqlens=torch.tensor([0, 9, 17], dtype=torch.int32),
                 k_none=True, interleaved=True)
