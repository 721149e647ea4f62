"""Triton FlashAttention-2 kernels (fastllm/triton/attention.py), called directly through their
launchers, against fastllm/reference/attention.py in float64 with the 2x-PyTorch's-own-error
rule (tests/accuracy.py) for out, lse, dq, dk and dv. "PyTorch's own error" is the same
reference computed in the input's dtype.

The kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), so shapes are
small; odd lengths, GQA / MQA, packed variable lengths, seqused_k, windows, soft-capping, ALiBi,
dropout, fully-masked rows and non-contiguous inputs are covered. Dtypes: float32 and float16
only. bfloat16 is exercised only by GPU compilation: the interpreter's tl.dot on bfloat16
operands is wrong in triton 3.8. The slow tests at the end compile the kernels for sm_80
(no GPU needed) and hold the tile tables to zero ptxas spills.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from tests.accuracy import assert_within_torch_error

pytest.importorskip("triton")

from fastllm.reference.attention import (  # noqa: E402
    attention_ref,
    dropout_keep_mask,
    dropout_threshold,
)
from fastllm.triton.attention import attention_bwd, attention_fwd  # noqa: E402

DTYPES = (torch.float32, torch.float16)


def _options(q, **overrides):
    """The fwd / bwd options after (q, k, v), in schema order, as a dict."""
    opts = dict(
        cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=0, max_seqlen_k=0,
        softmax_scale=q.shape[-1] ** -0.5, causal=False, window_left=-1, window_right=-1,
        softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
    )
    opts.update(overrides)
    return opts


def _check_lse(ours, theirs, ref, dtype):
    """lse with the -inf of fully-masked rows: same -inf positions, rule on the rest."""
    masked = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), masked), "lse: -inf rows differ from the reference"
    finite = ~masked
    assert_within_torch_error(
        "lse", ours[finite], theirs[finite].to(ref.dtype), ref[finite], dtype
    )


def check_against_reference(q, k, v, dout=None, **overrides):
    """Runs the Triton forward and backward and holds out, lse, dq, dk, dv to the rule."""
    dtype = q.dtype
    opts = _options(q, **overrides)
    out, lse = attention_fwd(q, k, v, *opts.values())
    if dout is None:
        dout = torch.randn_like(out)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *opts.values())

    def reference(compute_dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_ref(*leaves, *opts.values(), compute_dtype=compute_dtype)
        grads = torch.autograd.grad(ref_out, leaves, dout.to(compute_dtype))
        return ref_out, ref_lse, grads

    ref_out, ref_lse, ref_grads = reference(torch.float64)
    torch_out, torch_lse, torch_grads = reference(dtype)  # PyTorch's own math in the dtype

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert_within_torch_error("out", out, torch_out, ref_out, dtype)
    _check_lse(lse, torch_lse, ref_lse, dtype)
    for name, ours, theirs, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), torch_grads, ref_grads):
        assert ours.dtype == dtype
        assert_within_torch_error(name, ours, theirs, ref, dtype)
    return out, lse, (dq, dk, dv)


def _qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    return q, k, v


# (B, Tq, Tk, H, Hkv, D): odd lengths, Tq != Tk both ways, GQA and MQA, decoding (Tq = 1).
SHAPES = [
    (2, 17, 17, 2, 2, 32),
    (1, 1, 97, 4, 1, 64),
    (2, 33, 20, 4, 2, 96),  # causal: rows i < 13 see no key
    (1, 20, 45, 3, 1, 40),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_padded(shape, causal, dtype):
    q, k, v = _qkv(*shape, dtype)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "head_dim, dtype", [(8, torch.float32), (128, torch.float16), (200, torch.float32)], ids=str
)
def test_head_dims(head_dim, dtype):
    """Beyond SHAPES' 32, 40, 64, 96: below the 16-wide minimum dot, 128, and 200 (padded to
    256)."""
    q, k, v = _qkv(1, 24, 24, 2, 1, head_dim, dtype)
    check_against_reference(q, k, v, causal=True)


def test_softmax_scale():
    q, k, v = _qkv(1, 19, 23, 2, 2, 32, torch.float32)
    check_against_reference(q, k, v, softmax_scale=0.37)


FEATURES = {
    "window_left": dict(window_left=5),
    "window_right": dict(window_right=3),
    "window_both": dict(window_left=4, window_right=6),
    "causal_window": dict(causal=True, window_left=7, window_right=9),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi="per_head"),
    "alibi_per_batch": dict(alibi="per_batch"),
    "all": dict(causal=True, window_left=11, softcap=5.0, alibi="per_head"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
def test_features(feature, dtype):
    opts = dict(FEATURES[feature])
    q, k, v = _qkv(2, 41, 66, 2, 1, 32, dtype)  # several blocks: window skipping
    alibi = opts.pop("alibi", None)
    if alibi is not None:  # float32 slopes, (H,) or (B, H)
        slopes_shape = q.shape[2:3] if alibi == "per_head" else (q.shape[0], q.shape[2])
        opts["alibi_slopes"] = torch.rand(slopes_shape) * 0.5
    check_against_reference(q, k, v, **opts)


def _packed(lengths, heads, head_dim, dtype):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    x = torch.randn(int(cu[-1]), heads, head_dim, dtype=dtype)
    return x, cu


@pytest.mark.parametrize(
    "dtype, causal",
    [(torch.float32, False), (torch.float16, True)],
    ids=["fp32-full", "fp16-causal"],
)
def test_varlen(dtype, causal):
    lengths_q = [1, 37, 16, 58]
    lengths_k = [9, 37, 3, 60]  # sequence 2: causal with Tq > Tk, some rows see no key
    q, cu_q = _packed(lengths_q, 4, 32, dtype)
    k, cu_k = _packed(lengths_k, 2, 32, dtype)
    v = torch.randn_like(k)
    check_against_reference(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
        max_seqlen_k=max(lengths_k), causal=causal,
    )


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_seqused_k(packed):
    """A KV cache: only the first seqused_k[b] keys take part; unused key rows get zero
    dk, dv."""
    dtype = torch.float32
    seqused = torch.tensor([5, 23, 1], dtype=torch.int32)
    if packed:
        lengths_q, lengths_k = [7, 1, 4], [9, 30, 2]
        q, cu_q = _packed(lengths_q, 2, 32, dtype)
        k, cu_k = _packed(lengths_k, 1, 32, dtype)
        v = torch.randn_like(k)
        opts = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=30)
    else:
        q, k, v = _qkv(3, 6, 30, 2, 1, 32, dtype)
        opts = {}
    _, _, (_, dk, dv) = check_against_reference(q, k, v, seqused_k=seqused, causal=True, **opts)
    if not packed:
        assert (dk[0, 5:] == 0).all() and (dv[2, 1:] == 0).all()


def test_seqused_k_zero():
    """A sequence with no key at all (seqused_k = 0): out 0, lse -inf, zero gradients. (Not
    against the reference, which does not take an empty key set.)"""
    q, k, v = _qkv(2, 5, 20, 2, 1, 32, torch.float32)
    opts = _options(q, seqused_k=torch.tensor([0, 20], dtype=torch.int32)).values()
    out, lse = attention_fwd(q, k, v, *opts)
    dq, dk, dv = attention_bwd(torch.randn_like(out), q, k, v, out, lse, *opts)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert torch.isfinite(lse[1]).all() and (dk[1] != 0).any()


def test_packed_queries_padded_cache():
    """Packed queries attending to a padded (B, Tk, Hkv, D) cache, as in decoding."""
    q, cu_q = _packed([3, 1], 4, 64, torch.float16)
    k = torch.randn(2, 40, 2, 64, dtype=torch.float16)
    v = torch.randn_like(k)
    check_against_reference(
        q, k, v, cu_seqlens_q=cu_q, max_seqlen_q=3,
        seqused_k=torch.tensor([17, 40], dtype=torch.int32), causal=True,
    )


def test_fully_masked_rows():
    """A window that no key falls into for the first rows: out 0, lse -inf, zero grads."""
    q, k, v = _qkv(1, 24, 8, 2, 2, 32, torch.float32)
    out, lse, (dq, _, _) = check_against_reference(q, k, v, causal=True, window_left=2)
    assert (out[0, :16] == 0).all() and torch.isneginf(lse[0, :, :16]).all()
    assert (dq[0, :16] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(dtype):
    """q, k, v as views of one fused qkv projection with the heads and time swapped (no
    tensor has unit stride along D except through its view), dout transposed."""
    batch, seqlen, heads, head_dim = 2, 19, 2, 48
    qkv = torch.randn(batch, heads, 3, seqlen, head_dim, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, T, H, D) views
    dout = torch.randn(batch, heads, seqlen, head_dim, dtype=dtype).transpose(1, 2)
    strided_q = torch.randn(batch, seqlen, heads, 2 * head_dim, dtype=dtype)[..., ::2]
    assert not q.is_contiguous() and strided_q.stride(-1) == 2
    check_against_reference(q, k, v, dout=dout, causal=True)
    check_against_reference(strided_q, k, v)


def _seed(value):
    return torch.tensor([value], dtype=torch.int64)


@pytest.mark.parametrize("seed", [0, 1234567890123456789, -7], ids=["zero", "big", "negative"])
def test_dropout_mask_is_the_contracts(seed):
    """The kept positions, bit for bit: with q = 0 every allowed key has p = 1 / Tk, and with
    v = the identity out_ij = z_ij / Tk, so out * Tk * (1 - p) is the keep mask."""
    batch, seqlen_q, seqlen_k, heads, p = 2, 21, 32, 3, 0.3
    q = torch.zeros(batch, seqlen_q, heads, seqlen_k)
    v = torch.eye(seqlen_k).expand(batch, heads, seqlen_k, seqlen_k).transpose(1, 2)
    k = torch.randn(batch, seqlen_k, heads, seqlen_k)
    opts = _options(q, dropout_p=p, dropout_seed=_seed(seed))
    out, _ = attention_fwd(q, k, v.contiguous(), *opts.values())
    kept = (out * seqlen_k * (1 - p)).round()
    for b in range(batch):
        hashes = dropout_keep_mask(_seed(seed), b, heads, seqlen_q, seqlen_k)
        expected = (hashes >= dropout_threshold(p)).to(out.dtype)  # (H, Tq, Tk)
        assert torch.equal(kept[b].transpose(0, 1), expected), f"batch {b}: mask differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_grads(dtype):
    q, k, v = _qkv(2, 19, 26, 4, 2, 32, dtype)
    check_against_reference(q, k, v, causal=True, dropout_p=0.25, dropout_seed=_seed(42))


def test_dropout_varlen_gqa():
    q, cu_q = _packed([5, 18], 4, 32, torch.float32)
    k, cu_k = _packed([11, 18], 1, 32, torch.float32)
    v = torch.randn_like(k)
    check_against_reference(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=18, max_seqlen_k=18,
        dropout_p=0.5, dropout_seed=_seed(2**40 + 3), softcap=4.0,
    )


def test_rejects_bad_dtype_and_head_dim():
    q, k, v = _qkv(1, 4, 4, 1, 1, 16, torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention_fwd(q, k, v, *_options(q).values())
    q, k, v = _qkv(1, 4, 4, 1, 1, 264, torch.float32)
    with pytest.raises(ValueError, match="at most 256"):
        attention_fwd(q, k, v, *_options(q).values())


@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5), (2, 5, 0)], ids=["B0", "Tq0", "Tk0"])
def test_empty(shape):
    """Empty batches and sequences launch nothing or write only zeros / -inf (Tk = 0)."""
    batch, seqlen_q, seqlen_k = shape
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, 2, 1, 16, torch.float32)
    opts = _options(q, causal=True).values()
    out, lse = attention_fwd(q, k, v, *opts)
    dq, dk, dv = attention_bwd(torch.randn_like(out), q, k, v, out, lse, *opts)
    assert lse.shape == (batch, 2, seqlen_q) and torch.isneginf(lse).all()
    for x in (out, dq, dk, dv):
        assert (x == 0).all()


def test_registered_triton_op_with_autograd():
    """The launchers as fastllm/ops registers them (torch.library.triton_op, autograd through
    the backward op) give the launchers' own results."""
    from fastllm.ops import attention as attention_ops

    ops = attention_ops.IMPLS.triton
    if ops is None:
        pytest.skip("the Triton attention ops are not registered")
    q, k, v = _qkv(2, 19, 23, 4, 2, 32, torch.float32)
    opts = _options(q, causal=True, dropout_p=0.2, dropout_seed=_seed(7)).values()
    out, lse = attention_fwd(q, k, v, *opts)
    dout = torch.randn_like(out)
    grads = attention_bwd(dout, q, k, v, out, lse, *opts)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op_out, op_lse = ops.attention_fwd(*leaves, *opts)
    op_out.backward(dout)
    assert torch.equal(op_out, out) and torch.equal(op_lse, lse)
    for name, leaf, grad in zip(("dq", "dk", "dv"), leaves, grads):
        assert torch.equal(leaf.grad, grad), name


# ---- compilation for a real GPU (no GPU needed) ----------------------------------------------

# One kernel configuration per column of the tile tables (tensor-core fp16 / bf16, FMA fp32)
# and per kernel, with every feature flag on: (dtype, BLOCK_D).
GPU_COMPILE_CASES = [("fp16", 64), ("bf16", 128), ("fp32", 256)]


def _compile_for_sm80(dtype: str, block_d: int) -> list[str]:
    """Compiles the three main kernels with every flag on for sm_80 (Triton's own compiler,
    no GPU) and returns ptxas -v's resource lines. Needs TRITON_INTERPRET unset at import:
    the interpreter replaces the kernels by Python functions. Pointer and stride arguments
    carry the divisibility a real launch on contiguous tensors specializes, and D strides the
    constant 1."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    import fastllm.triton.attention as kernels

    flags = dict(
        IS_VARLEN_Q=True, IS_VARLEN_K=True, HAS_SEQUSED_K=True, HAS_WINDOW_LEFT=True,
        HAS_WINDOW_RIGHT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_DROPOUT=True,
        DOT_PRECISION="ieee", ROUND_BF16_IN_SOFTWARE=False, BLOCK_D=block_d,
    )
    pointer_types = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "alibi_ptr": "*fp32",
                     "cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32",
                     "seqused_k_ptr": "*i32", "dropout_seed_ptr": "*i64"}
    float_args = ("softmax_scale", "softcap", "dropout_scale")
    tile_class = "fma" if dtype == "fp32" else "tensor_core"
    reports = []
    for kernel, table in ((kernels.attention_fwd_kernel, kernels._FWD_TILES),
                          (kernels.attention_bwd_dkdv_kernel, kernels._BWD_TILES),
                          (kernels.attention_bwd_dq_kernel, kernels._BWD_TILES)):
        block_m, block_n, num_warps, num_stages = table[tile_class][block_d]
        constants = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n)
        unit_strides = [name for name in kernel.arg_names if re.fullmatch(r"stride_.*_d", name)]
        constants.update(dict.fromkeys(unit_strides, 1))
        signature, attrs = {}, {}
        for index, name in enumerate(kernel.arg_names):
            if name in constants:
                signature[name] = "constexpr"
                continue
            if name.endswith("_ptr"):
                signature[name] = pointer_types.get(name, "*" + dtype)
            elif name in float_args:
                signature[name] = "fp32"
            else:
                signature[name] = "i64" if name == "dropout_threshold" else "i32"
            aligned = name.endswith("_ptr") or re.fullmatch(r"head_dim|stride_(?!alibi).*", name)
            if aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(
            ASTSource(kernel, signature, constants, attrs),
            target=GPUTarget("cuda", 80, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = os.path.join(tmp, "kernel.ptx")
            with open(ptx_path, "w") as f:
                f.write(compiled.asm["ptx"])
            result = subprocess.run(
                [get_ptxas(80).path, "-arch=sm_80", "-v", ptx_path, "-o", os.devnull],
                capture_output=True, text=True, check=True,
            )
        resources = [line.strip() for line in result.stderr.splitlines()
                     if "spill" in line or "registers" in line]
        reports.append(f"{kernel.fn.__name__}: " + " ".join(resources))
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("dtype, block_d", GPU_COMPILE_CASES, ids=lambda x: str(x))
def test_kernels_compile_for_sm80_without_spills(dtype, block_d):
    """bfloat16 has no numerical test here (see the module docstring); this at least builds
    its kernels, and checks the tile tables against ptxas: no spills."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = (
        "import sys; from tests.test_attention_triton import _compile_for_sm80; "
        f"print('\\n'.join(_compile_for_sm80({dtype!r}, {block_d})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stdout)
    assert len(spills) == 3 and all(s == ("0", "0") for s in spills), result.stdout
