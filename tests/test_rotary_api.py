"""The rotary family's contract beyond numerics: gradcheck, opcheck, torch.compile, the
RotaryEmbedding module (caches, scaling, growth, and parity with Hugging Face's LLaMA
rotary), error messages, meta tensors, the CPU instruction-set paths, the CUDA build.

Tests that take `backend` run on the native kernels (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fastllm
import fastllm.functional as F
from fastllm import _build
from fastllm.ops import rotary as rotary_ops
from tests.hostile import run_isolated
from tests.test_rotary import caches, torch_rotary

FAMILY = "rotary"


# ------------------------------------------------------------------ gradcheck (float64)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_gradcheck_cpu_float64(backend, interleaved):
    cos, sin = (t.double() for t in caches(16, 6))
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: F.apply_rotary(x, cos, sin, position_ids=torch.tensor([1, 7]),
                                 interleaved=interleaved), (x,))
    assert torch.autograd.gradcheck(
        lambda q, k: F.apply_rotary_qk(q, k, cos, sin, position_ids=3, interleaved=interleaved),
        (x, k))
    packed = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda x: F.apply_rotary(x, cos, sin, cu_seqlens=cu, interleaved=interleaved), (packed,))
    # in place, on a non-leaf
    assert torch.autograd.gradcheck(
        lambda x: F.apply_rotary(x * 1.0, cos, sin, inplace=True, interleaved=interleaved), (x,))
    assert torch.autograd.gradcheck(
        lambda q, k: F.apply_rotary_qk(q * 1.0, k * 1.0, cos, sin, inplace=True), (x, k))


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples():
    cos, sin = caches(16, 32)
    q, k = torch.randn(2, 5, 3, 48), torch.randn(2, 5, 1, 48)
    qkv = torch.randn(2, 5, 6, 32)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    return [
        ("rotary_fwd", (q, cos, sin, None, None, 0, False, False)),
        ("rotary_fwd", (q.to(torch.bfloat16), cos, sin, torch.tensor([1, 2]), None, 3, True,
                        False)),
        ("rotary_fwd", (torch.randn(9, 2, 32), cos, sin, None, cu, 0, False, True)),
        ("rotary_fwd_inplace", (qkv[:, :, :4], cos, sin, torch.randint(0, 16, (2, 5)), None, 0,
                                False, False)),
        ("rotary_qk_fwd", (q, k, cos, sin, None, None, 2, True, False)),
        ("rotary_qk_fwd", (q.half(), k.half(), cos.half(), sin.half(), None, None, 0, False,
                           False)),
        ("rotary_qk_fwd_inplace", (qkv[:, :, :4], qkv[:, :, 4:5], cos, sin, None, None, 0, False,
                                   False)),
    ]


@pytest.mark.parametrize("idx", range(len(_opcheck_samples())))
def test_rotary_opcheck_native(backend, idx):
    name, args = _opcheck_samples()[idx]
    args = list(args)
    if not name.endswith("_inplace"):
        args[0] = args[0].detach().requires_grad_(True)
        if name == "rotary_qk_fwd":
            args[1] = args[1].detach().requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.fastllm, name), tuple(args))


# ------------------------------------------------------------------------ torch.compile


class Attention(torch.nn.Module):
    """A fused qkv projection, rotary on q and k views (out of place and in place)."""

    def __init__(self, d=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads * 2
        self.qkv = torch.nn.Linear(d, (heads + 2 * kv_heads) * self.head_dim)
        self.rotary = fastllm.nn.RotaryEmbedding(self.head_dim, 64)

    def forward(self, x, position_ids, inplace):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k = qkv[:, :, : self.heads], qkv[:, :, self.heads: self.heads + self.kv_heads]
        if inplace:
            F.apply_rotary_qk(q, k, self.rotary.cos_cached, self.rotary.sin_cached,
                              position_ids=position_ids, inplace=True)
            return qkv
        q, k = self.rotary(q, k, position_ids)
        return torch.cat((q, k), dim=2)


@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_torch_compile_fullgraph_matches_eager(backend, inplace):
    torch._dynamo.reset()
    model = Attention()
    x = torch.randn(2, 7, 32, requires_grad=True)
    pos = torch.randint(0, 64, (2, 7))
    eager = model(x, pos, inplace)
    eager.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x, pos, inplace)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for g, ref in zip([x.grad] + [p.grad for p in model.parameters()], grads):
        torch.testing.assert_close(g, ref)


def test_rotary_inplace_qk_non_views_one_function(backend):
    """q and k that are not views rotate in place through the one-pass qk Function."""
    cos, sin = caches(16, 32)
    q0 = torch.randn(2, 3, 4, 32, requires_grad=True)
    k0 = torch.randn(2, 3, 2, 32, requires_grad=True)
    q, k = q0 * 1.0, k0 * 1.0
    q2, k2 = F.apply_rotary_qk(q, k, cos, sin, inplace=True)
    assert q2 is q and k2 is k
    assert type(q.grad_fn).__name__.startswith("RotaryQKInplace")
    (q2.sum() + 2 * k2.sum()).backward()
    g = torch_rotary(torch.ones(2, 3, 4, 32, dtype=torch.float64), cos.double(), -sin.double())
    torch.testing.assert_close(q0.grad.double(), g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k0.grad.double(), 2 * g[:, :, :2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- RotaryEmbedding


def test_rotary_embedding_buffers_and_growth():
    rope = fastllm.nn.RotaryEmbedding(16, max_position_embeddings=8)
    assert rope.state_dict() == {}  # non-persistent, like HF's inv_freq
    assert rope.cos_cached.shape == (8, 8) and rope.cos_cached.dtype == torch.float32
    q, k = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 1, 16)
    rope(q, k, position_ids=10)  # needs positions 10..14: grown to a power of two
    assert rope.cos_cached.shape[0] == 16
    rope(q, k, position_ids=torch.tensor([[40, 1, 2, 3, 4]]))  # CPU positions are read
    assert rope.cos_cached.shape[0] == 64
    expected = torch.outer(torch.arange(64).float(), rope.inv_freq)
    torch.testing.assert_close(rope.cos_cached, expected.cos(), rtol=0, atol=0)
    assert "dim=16" in repr(rope)


def test_rotary_embedding_cos_sin_shapes():
    rope = fastllm.nn.RotaryEmbedding(8, 16)
    cos, sin = rope.cos_sin(torch.tensor([[0, 3, 5]]))
    assert cos.shape == (1, 3, 8) and sin.shape == (1, 3, 8)
    torch.testing.assert_close(cos[0, 1, :4], rope.cos_cached[3])
    torch.testing.assert_close(cos[0, 1, 4:], rope.cos_cached[3])
    cos, _ = rope.cos_sin(20)  # grows
    assert cos.shape == (20, 8)


@pytest.mark.parametrize("backend", ["native", "reference"], indirect=True)
@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
    {"type": "linear", "factor": 2.0},  # HF's legacy key
], ids=["default", "llama3", "linear", "linear-legacy-key"])
def test_rotary_equals_hf_llama(backend, scaling):
    """fastllm's RotaryEmbedding + apply_rotary_qk == transformers' LlamaRotaryEmbedding +
    apply_rotary_pos_emb, (B, T, H, D) against HF's (B, H, T, D)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf

    head_dim, base = 32, 500000.0 if scaling and scaling.get("rope_type") == "llama3" else 1e4
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": base}
    params["rope_type"] = params.pop("type", params["rope_type"])
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_parameters=params)
    theirs = hf.LlamaRotaryEmbedding(config)
    ours = fastllm.nn.RotaryEmbedding(head_dim, 128, base=base, scaling=scaling)
    torch.testing.assert_close(ours.inv_freq, theirs.inv_freq, rtol=0, atol=0)
    q, k = torch.randn(2, 9, 4, head_dim), torch.randn(2, 9, 2, head_dim)
    position_ids = torch.randint(0, 128, (2, 9))
    cos, sin = theirs(q, position_ids)
    hq, hk = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    oq, ok = ours(q, k, position_ids)
    torch.testing.assert_close(oq, hq.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ok, hk.transpose(1, 2), rtol=1e-6, atol=1e-6)
    our_cos, our_sin = ours.cos_sin(position_ids)
    torch.testing.assert_close(our_cos, cos, rtol=0, atol=0)
    torch.testing.assert_close(our_sin, sin, rtol=0, atol=0)


def test_rotary_embedding_dynamic_ntk_grows_base():
    rope = fastllm.nn.RotaryEmbedding(16, 32, scaling={"rope_type": "dynamic", "factor": 2.0})
    short = rope.inv_freq.clone()
    rope.extend(64)
    assert rope.cos_cached.shape[0] == 64
    base = 10000.0 * ((2.0 * 64 / 32) - 1.0) ** (16 / 14)
    expected = 1.0 / (base ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(rope.inv_freq, expected)
    assert (rope.inv_freq[1:] < short[1:]).all()


# ---------------------------------------------------------------------------- errors

_C, _S = caches(16, 32)


def _x(*shape, dtype=torch.float32, device=None):  # None: the default device
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("backend", ["native", "reference"], indirect=True)
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: F.apply_rotary(_x(2, 20, 2, 32), _C, _S), ValueError,
         r"cos and sin must have a row per position used: they have 16 rows"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, position_ids=13), ValueError,
         r"position 16 is used"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, position_ids=-1), ValueError,
         r"positions must be >= 0, got position -1"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, rotary_dim=31), ValueError,
         r"rotary_dim must be a positive even number, got 31"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, rotary_dim=64), ValueError,
         r"rotary_dim must be <= the head dim D = 32 of x, got 64"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 64), _C, _S, rotary_dim=48), ValueError,
         r"rotary_dim must be 2 \* cos.shape\[-1\] = 32 .* got rotary_dim = 48"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 16), _C, _S), ValueError,
         r"rotary_dim = 2 \* cos.shape\[-1\] = 32 must be <= the head dim D = 16 of x"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S[:, :8]), ValueError,
         r"sin must have the shape of cos \[16, 16\], got \[16, 8\]"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C.double(), _S.double()), TypeError,
         r"cos must be float32 or x's dtype torch.float32, got torch.float64"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S.half()), TypeError,
         r"sin must have the dtype of cos"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32).int(), _C, _S), TypeError,
         r"x must be float32, bfloat16, float16 or float64, got torch.int32"),
        (lambda: F.apply_rotary(_x(2, 4, 32), _C, _S), ValueError,
         r"x must be \(B, T, heads, D\), got shape \[2, 4, 32\]"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, position_ids=torch.zeros(3).long()),
         ValueError, r"position_ids must be \(B,\) per-sequence offsets with B = 2"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, position_ids=torch.zeros(2, 5).long()),
         ValueError, r"position_ids must be .*\(B, T\) = \[2, 4\] positions, got shape \[2, 5\]"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, position_ids=torch.zeros(2, 4)),
         TypeError, r"position_ids must be int64 or int32, got torch.float32"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C, _S, position_ids=1.5), TypeError,
         r"position_ids must be None, an int or an int tensor, got float"),
        (lambda: F.apply_rotary(_x(2, 4, 2, 32), _C.to("meta"), _S.to("meta")), ValueError,
         r"cos must be on x's device (cpu|cuda:0), got meta"),
        (lambda: F.apply_rotary(_x(5, 2, 32), _C, _S, cu_seqlens=torch.tensor([0, 5])),
         TypeError, r"cu_seqlens must be int32, got torch.int64"),
        (lambda: F.apply_rotary(_x(5, 2, 32), _C, _S,
                                cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)),
         ValueError, r"cu_seqlens must end at the number of packed tokens 5, got 6"),
        (lambda: F.apply_rotary_qk(_x(2, 4, 2, 32), _x(2, 5, 1, 32), _C, _S), ValueError,
         r"k must have q's shape \[2, 4, 2, 32\] but for its number of heads, got \[2, 5, 1, 32\]"),
        (lambda: F.apply_rotary_qk(_x(2, 4, 2, 32), _x(2, 4, 1, 32).half(), _C, _S), TypeError,
         r"k must have the dtype of q torch.float32, got torch.float16"),
        (lambda: fastllm.nn.RotaryEmbedding(15), ValueError, r"dim must be a positive even int"),
        (lambda: fastllm.nn.RotaryEmbedding(16, scaling={"rope_type": "yarn", "factor": 2.0}),
         ValueError, r"scaling\['rope_type'\] must be one of"),
        (lambda: fastllm.nn.RotaryEmbedding(16, scaling={"rope_type": "llama3", "factor": 2.0}),
         ValueError, r"scaling of rope_type 'llama3' needs \['low_freq_factor'"),
    ],
)
def test_rotary_bad_input_is_named(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: torch.ops.fastllm.rotary_fwd(_x(2, 20, 2, 32), _C, _S, None, None, 0, False,
                                              False),
         r"cos and sin must have a row per position used: they have 16 rows"),
        (lambda: torch.ops.fastllm.rotary_fwd(_x(2, 4, 2, 16), _C, _S, None, None, 0, False,
                                              False),
         r"rotary_dim = 2 \* cos.shape\[-1\] = 32 must be <= the head dim D = 16"),
        (lambda: torch.ops.fastllm.rotary_qk_fwd(_x(2, 4, 2, 32), _x(2, 4, 1, 16), _C, _S, None,
                                                 None, 0, False, False),
         r"k must have q's shape"),
        (lambda: torch.ops.fastllm.rotary_fwd_inplace(
            _x(5, 2, 32), _C, _S, None, torch.tensor([0, 3, 2], dtype=torch.int32), 0, False,
            False),
         r"cu_seqlens must be non-decreasing"),
        (lambda: torch.ops.fastllm.rotary_fwd(_x(2, 4, 2, 32), _C, _S,
                                              torch.tensor([[0, 1, 2, 99]] * 2), None, 0, False,
                                              False),
         r"position 99 is used"),
    ],
)
def test_rotary_bad_input_direct_op_call_is_named(backend, call, match):
    """Direct callers of torch.ops.fastllm.* get the same checks from the C++ glue."""
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        call()


def test_rotary_meta_tensors_give_shapes():
    q = torch.empty(2, 3, 4, 64, device="meta")
    k = torch.empty(2, 3, 1, 64, device="meta")
    cos, sin = torch.empty(8, 32, device="meta"), torch.empty(8, 32, device="meta")
    assert F.apply_rotary(q, cos, sin).shape == q.shape
    oq, ok = F.apply_rotary_qk(q, k, cos, sin, position_ids=5)
    assert oq.shape == q.shape and ok.shape == k.shape
    with pytest.raises(ValueError, match="rotary_dim"):
        F.apply_rotary(torch.empty(2, 3, 4, 32, device="meta"), torch.empty(8, 20, device="meta"),
                       torch.empty(8, 20, device="meta"))


def test_rotary_double_backward_is_refused(backend):
    cos, sin = caches(8, 16)
    x = torch.randn(1, 3, 2, 16, requires_grad=True)
    out = F.apply_rotary(x, cos, sin).square().sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


# ----------------------------------------------------------- CPU instruction-set paths

_ISA_SCRIPT = """
import torch
import fastllm.functional as F
from tests.test_rotary import caches, torch_rotary
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3),
                   (torch.float64, 1e-12)):
    for rotary_dim, head_dim in ((128, 128), (80, 80), (32, 80), (6, 10), (2, 2)):
        cos, sin = caches(64, rotary_dim)
        for interleaved in (False, True):
            q = torch.randn(2, 9, 3, head_dim).to(dtype).requires_grad_()
            k = torch.randn(2, 9, 1, head_dim).to(dtype).requires_grad_()
            out = F.apply_rotary_qk(q, k, cos, sin, position_ids=5, interleaved=interleaved)
            dq, dk = torch.randn_like(out[0]), torch.randn_like(out[1])
            grads = torch.autograd.grad(out, (q, k), (dq, dk))
            for t, o, g, d in zip((q, k), out, grads, (dq, dk)):
                t64 = t.detach().double().requires_grad_()
                ref = torch_rotary(t64, cos.double(), sin.double(), offset=5,
                                   interleaved=interleaved)
                (ref_g,) = torch.autograd.grad(ref, t64, d.double())
                torch.testing.assert_close(o.detach().double(), ref.detach(), rtol=tol, atol=tol)
                torch.testing.assert_close(g.double(), ref_g, rtol=tol, atol=tol)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_rotary_lower_cpu_paths_match_torch(backend, isa):
    """FASTLLM_CPU_ISA=avx2 caps the kernels at AVX2 (the default on this machine is AVX-512
    where the CPU has it) and =scalar runs the portable loops; chosen once per process, hence
    the child process. (tests/cpp runs the C++ kernel test on all three paths too.)"""
    out = run_isolated(_ISA_SCRIPT, env={"FASTLLM_CPU_ISA": isa, "FASTLLM_BACKEND": "native"})
    assert out.strip().endswith("ok")


def test_rotary_family_is_registered():
    assert fastllm.ops.FAMILIES["rotary"] is rotary_ops.IMPLS
    assert {"apply_rotary", "apply_rotary_qk"} <= set(F.__all__)
    assert "RotaryEmbedding" in fastllm.nn.__all__


# ------------------------------------------------------------------ CUDA build (no GPU needed)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_rotary_cuda_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    """rotary.cu builds with the package's flags (ptxas fails on any spill or local-memory
    use) for sm_80 and sm_90, and ptxas -v reports 0 bytes of spills for every kernel: 5
    (dtype, angle dtype) instantiations per architecture."""
    cmd = [
        "nvcc", "-c", str(_build.ROOT / "csrc" / "rotary" / "rotary.cu"),
        "-o", str(tmp_path / "rotary.o"), f"-I{_build.CSRC}",
        *_build.NVCC_FLAGS, *_build.gencode_flags(["80", "90"]),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(spills) == 10 and all(s == ("0", "0") for s in spills), result.stderr[-4000:]


# ------------------------------------------------------------------- fastllm bench rotary


def test_bench_rotary_quick_run(tmp_path):
    """`fastllm bench rotary --quick` through the real command line: every contender timed,
    every number finite and positive."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "fastllm", "bench", "rotary", "--quick", "--device", "cpu",
         "--no-thp-rerun", "--json", str(out), "--only", "rotary-qk-fwd+bwd-*-bfloat16"],
        cwd=_build.ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["contender"] for r in results] == ["fastllm", "torch eager", "torch.compile"]
    for r in results:
        assert r["error"] is None, r
        for key in ("time_s", "gbs", "copy_gbs", "speedup_vs_eager", "speedup_vs_compile"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["contender"], key, r[key])
    assert "== rotary ==" in run.stdout


def test_bench_rotary_contenders_agree(backend):
    from fastllm.bench import load_family
    from fastllm.bench.common import COMPILE

    for case in load_family("rotary").cases(quick=True):
        inputs = case.make_inputs(torch.device("cpu"))
        results = []
        for contender in case.contenders:
            if contender == COMPILE:
                continue
            outs = case.function(contender, backend)(*inputs.args)
            grads = (torch.autograd.grad(outs, inputs.differentiable, inputs.grad_outputs)
                     if case.backward else ())
            results.append((*[o.detach() for o in outs], *grads))
        tol = 1e-5 if case.dtype == torch.float32 else 3e-2
        for a, b in zip(*results):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
