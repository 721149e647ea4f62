"""Input builders shared by the attention tests (tests/test_attention.py and
tests/test_attention_api.py). Shapes: padded q (B, Tq, H, D), k / v (B, Tk, Hkv, D); packed
q (total_q, H, D), k / v (total_k, Hkv, D) with int32 cu_seqlens (B + 1,)."""

from __future__ import annotations

import torch


def attention_options(q: torch.Tensor, **overrides) -> dict:
    """The attention_fwd / attention_bwd options after (q, k, v), in schema order."""
    options = dict(
        cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=0, max_seqlen_k=0,
        softmax_scale=q.shape[-1] ** -0.5, causal=False, window_left=-1, window_right=-1,
        softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None, attn_bias=None,
        key_padding_mask=None,
    )
    options.update(overrides)
    return options


def generator(seed: int) -> torch.Generator:
    """A seeded generator on torch's default device (a CPU generator cannot draw CUDA
    tensors, which the tests make under FASTLLM_TEST_DEVICE=cuda)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, scale=1.0):
    """Padded q, k, v; ``scale`` multiplies q and k (larger scores)."""
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype) * scale
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype) * scale
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    return q, k, v


def packed_tokens(lengths, heads, head_dim, dtype):
    """Sequences of the given lengths packed along dim 0, and their int32 cu_seqlens."""
    cu_seqlens = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return torch.randn(int(cu_seqlens[-1]), heads, head_dim, dtype=dtype), cu_seqlens


def packed_qkv(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype):
    """Packed q, k, v and the varlen options (cu_seqlens_*, max_seqlen_*)."""
    q, cu_seqlens_q = packed_tokens(lengths_q, heads, head_dim, dtype)
    k, cu_seqlens_k = packed_tokens(lengths_k, kv_heads, head_dim, dtype)
    v = torch.randn_like(k)
    options = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k))
    return q, k, v, options


def dropout_seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)



def assert_triton_compiles_without_spills(module: str, arch: int, expected_kernels: int) -> None:
    """Compiles a family's Triton kernels for sm_<arch> (no GPU needed) in a child process
    without TRITON_INTERPRET, through ``<module>._triton_ptxas_reports(arch)``, and asserts
    ptxas reports ``expected_kernels`` kernels, none spilling."""
    import os
    import re
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = (f"from {module} import _triton_ptxas_reports; "
            f"print('\\n'.join(_triton_ptxas_reports({arch})))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stdout)
    assert len(spills) == expected_kernels and all(s == ("0", "0") for s in spills), result.stdout


def triton_signature(kernel, constants: dict, arg_type, aligned) -> tuple[dict, dict]:
    """Triton's signature and attributes (``ptxas_resources``' arguments) for a launch of
    ``kernel``: the arguments in ``constants`` are constexpr, every other is typed by
    ``arg_type(name)`` ("*fp32", "i32", ...), and those with ``aligned(name)`` true are
    marked divisible by 16, as a launch specializes aligned pointers, sizes and strides."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = arg_type(name)
        if aligned(name):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def ptxas_resources(kernel, signature: dict, constants: dict, attrs: dict, arch: int,
                    **options) -> list[str]:
    """Compiles the Triton ``kernel`` for sm_<arch> with Triton's own compiler (no GPU) and
    returns ptxas -v's resource lines (registers, spills). ``options``: num_warps,
    num_stages. Needs TRITON_INTERPRET unset at import (the interpreter replaces the
    kernels by Python functions)."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    target = "sm_90a" if ".target sm_90a" in ptx else f"sm_{arch}"  # Triton's Hopper target
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, f"-arch={target}", "-v", ptx_path, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )
    return [line.strip() for line in result.stderr.splitlines()
            if "spill" in line or "registers" in line]


def outputs_per_cpu_isa(script: str, tmp_path, levels=("", "avx2", "scalar")) -> dict:
    """Runs ``script`` on the native backend in a fresh child per ``FASTLLM_CPU_ISA`` level
    (the path is chosen once per process; "" = the best this CPU has). The script saves its
    outputs with ``torch.save`` to ``$OUT`` and prints "ok" last. Returns level -> outputs."""
    from tests.hostile import run_isolated

    results = {}
    for isa in levels:
        out = tmp_path / f"{isa or 'best'}.pt"
        stdout = run_isolated(
            script, env={"FASTLLM_CPU_ISA": isa, "FASTLLM_BACKEND": "native", "OUT": str(out)})
        assert stdout.strip().endswith("ok"), f"FASTLLM_CPU_ISA={isa!r}: {stdout[-3000:]}"
        results[isa] = torch.load(out)
    return results


def cpu_has_avx512_path() -> bool:
    """Whether this CPU has what csrc/common/cpu_features.h's cpu_avx512() asks for."""
    from fastllm.bench.common import cpu_isa_features

    return bool((cpu_isa_features() or {}).get("avx512"))


def native_cpu_report(name: str, variable: str, value: str) -> str:
    """``fastllm.backend.<name>()`` (cpu_fresh_pages, cpu_output_stores) in a fresh child with
    the environment variable set to value (the native kernels decide once per process); a
    ValueError comes back as the line "ValueError: <message>"."""
    from tests.hostile import run_isolated

    out = run_isolated(f"""
        from fastllm import backend
        try:
            print(backend.{name}())
        except ValueError as e:
            print("ValueError:", e)
    """, env={variable: value})
    return out.strip().splitlines()[-1]
