"""The attention family's benchmark cases: softmax attention, causal and not, forward and
forward+backward, fastllm against torch's scaled_dot_product_attention (SDPA) eager and
torch.compile.

Shape glossary: B batch, H heads (as many key/value heads as query heads), T sequence
length (queries and keys alike), D head dim. fastllm takes (B, T, H, D), torch's SDPA
(B, H, T, D): each contender gets contiguous tensors in its own natural layout (the same
values, transposed once while building the inputs), so neither pays for a layout copy
or a strided read that the other does not. softmax_scale is 1/sqrt(D) on both sides.

The contenders compute the same thing:
  fastllm        fastllm.functional.attention(q, k, v, causal=...) on the backend being
                 benchmarked (the per-row logsumexp it keeps for the backward is part of
                 its cost, as it is of torch's flash kernel);
  torch eager    F.scaled_dot_product_attention(q, k, v, is_causal=...), torch picking its
                 own kernel (on the CPU: its flash-attention kernel for float32, bfloat16, float16);
  torch.compile  the same SDPA call through inductor (static shapes, compiled once per case;
                 compilation and its first call are not timed).
  sdpa[flash],   CUDA only: the same SDPA call forced onto one backend
  sdpa[cudnn]    (``torch.nn.attention.sdpa_kernel``); a backend that refuses the case
                 (float32, a head dim, GQA) shows n/a with torch's reasons.
With T_q == T_k the causal mask is the same for both conventions (fastllm's bottom-right,
SDPA's top-left).

LLaMA-3-8B's cases (``--shapes llama3-8b``): B 1, H 32, T 4096, D 128 with Hkv = 8 key/value
heads (grouped-query; ids ``attention-<mask>-hkv8-...``): fastllm takes k, v with 8 heads,
SDPA gets them with ``enable_gqa=True``. FLOPs count the query heads as above; bytes count
k, v (and dk, dv) with Hkv heads.

Forward+backward times one forward and one backward (``torch.autograd.grad`` of out with
respect to q, k, v, from a precomputed output gradient), gradients returned, not
accumulated.

FLOPs (the issue's convention, the one FlashAttention's benchmarks use): the forward is two
(T x D) by (D x T) sized matrix products per (batch, head), 4 * B * H * T * T * D, half of
it when causal; the backward counts 2.5 times the forward (five such products, two of them
recomputing the scores), so forward+backward is 3.5 times the forward. The exp and the
row reductions are not counted. The ceiling is torch's measured GEMM rate in the row's dtype
(``fastllm.bench.common.gemm_gflops``; bfloat16: oneDNN on AMX tiles where the CPU has them):
attention is at best two GEMMs per tile, so the fraction of it is how much of the matrix
units' rate the kernel keeps.

Bytes (what the GB/s column counts, small on purpose: attention is compute bound; n =
B * T * H * D, e = bytes per element): forward reads q, k, v and writes out, 4 * n * e;
forward+backward adds reading dout, q, k, v, out and writing dq, dk, dv, 12 * n * e in all.
The per-row statistics (lse, B * H * T floats) are not counted.

Peak memory is the increase of the process's peak resident set size over one untimed call
(fastllm.bench.common.peak_memory_bytes): the inputs exist before and are not counted; out,
the saved statistics, the gradients and every temporary are. A kernel that never forms the
(T x T) score matrix needs O(B * T * H * D) extra memory: from the (B=2, T=1024) cases to
the (B=1, T=4096) ones, B * T doubles, so a linear-in-T kernel's peak about doubles while a
kernel forming the scores for a whole (batch, head) would grow eightfold (B * T * T). Small
peaks are noisy: an allocation that reuses freed heap memory adds nothing to the resident
set, so a few MiB either way mean little. Measured on 2026-11-24 (2 shared cores, torch
2.14.1), from the T=1024 to the T=4096 cases fastllm's peak went 4 -> 8 MiB (forward) and
18 -> 33 MiB (forward+backward) in float32, 2 -> 4 and 9 -> 17 MiB in bfloat16: linear in
T; torch's SDPA (its CPU flash kernel) grew the same way.

Masked cases (issue 11; ``MaskedAttentionCase``), every contender on the same contiguous
(B, H, T, D) tensors and the same mask, in torch's SDPA form:
  padded   BERT-style padded self-attention, (B, H, T, D) = (8, 12, 512, 64): sequence b
           keeps its first ``lengths[b]`` keys (``padding_lengths``: varied, drawn with a
           fixed seed, 30 % of the keys padding overall); the mask is SDPA's boolean
           (B, 1, 1, T), True = take part (B * T bytes: 4 KiB). fastllm's SDPA passes it to
           the kernels as a (B, T) key padding mask.
  t5-bias  a T5-style relative-position bias (1, H, T, T) added to the scores, trained: it
           requires grad, and forward+backward also returns its gradient (what T5 trains
           through); SDPA gets it as a float ``attn_mask`` requiring grad. Its storage is
           H * T * T * e bytes (12 MiB in float32, 6 MiB in bfloat16); fastllm's backward
           forms a (B, H, T, T) buffer for its gradient before summing it over B.
Contenders: fastllm (``fastllm.functional.scaled_dot_product_attention(q, k, v, mask)`` on
the backend being timed), torch eager and torch.compile (the same SDPA call), and
``sdpa_ref``, fastllm's previous masked path (``fastllm.reference.attention.sdpa_ref``, the
plain-PyTorch composition SDPA ran for any attn_mask before the kernels took masks; it forms
the (B, H, T, T) scores). FLOPs count the dense problem, as if nothing were masked
(4 * B * H * T * T * D forward), so GFLOP/s is an effective rate; bytes add the mask's (and
for t5-bias the bias read, plus its gradient written and the bias read again in
forward+backward). Peak memory is measured as above; the mask costs are the bytes just
given. A backend whose kernels do not take masks yet shows ``n/a`` (with the reason) on
the fastllm row: the other rows are still timed.

Decode cases (``DecodeAttentionCase``, ids ``attention-decode-hkv<Hkv>-fwd-...``): one new
token per sequence against T cached keys, forward only, no mask (the token sees them all),
grouped-query: SmolLM2-135M's attention over 1024 keys and LLaMA-3-8B's over 4096, float32,
bfloat16 and float16. These calls are memory and call-overhead bound: GFLOP/s and % GEMM
are shown for uniformity only.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import fastllm.functional as fastllm_functional
from fastllm.bench.common import (
    CPU, DEFAULT_SHAPES, FASTLLM, CallInputs, Case, shape_sets,
)
from fastllm.reference.attention import sdpa_ref

FAMILY = "attention"
PARAM_COLUMNS = ("mask", "mode", "shape", "dtype")
KERNEL_FAMILY = "attention"

MODES = ("fwd", "fwd+bwd")
MASKS = ("full", "causal")
# (B, H, T, D), the shapes
SHAPES = ((2, 8, 1024, 64), (1, 8, 4096, 64), (1, 8, 4096, 128))
QUICK_SHAPES = ((1, 2, 256, 64),)
# (B, H, T, D) and Hkv: LLaMA-3-8B's attention at T = 4096, grouped-query (8 key/value heads)
LLAMA3_8B_SHAPES = ((1, 32, 4096, 128),)
LLAMA3_8B_KV_HEADS = 8
DTYPES = (torch.float32, torch.bfloat16)
# the default shapes add float16 (on the CPU: fastllm's AMX-FP16 path where the CPU has it)
DEFAULT_DTYPES = (*DTYPES, torch.float16)

BACKWARD_FLOPS_FACTOR = 2.5  # backward FLOPs / forward FLOPs (see the module docstring)

MASKED_KINDS = ("padded", "t5-bias")
MASKED_SHAPES = ((8, 12, 512, 64),)  # (B, H, T, D): BERT-base / T5-base attention
QUICK_MASKED_SHAPES = ((2, 2, 256, 64),)
PADDING_FRACTION = 0.3  # of all keys, over the batch
PADDING_SEED = 0
OLD_MASKED_PATH = "sdpa_ref (old masked path)"

# Decode cases (DecodeAttentionCase): ((B, H, T cached keys, D), Hkv): SmolLM2-135M's
# attention (9 heads, 3 kv heads, D 64) over 1024 cached keys, and LLaMA-3-8B's over 4096
DECODE_SHAPES = (((1, 9, 1024, 64), 3), ((1, 32, 4096, 128), 8))
QUICK_DECODE_SHAPES = (((1, 4, 256, 64), 2),)

# CUDA only: torch's SDPA forced onto one backend (torch.nn.attention.sdpa_kernel), by name
SDPA_BACKENDS = {"sdpa[flash]": "FLASH_ATTENTION", "sdpa[cudnn]": "CUDNN_ATTENTION"}
# how torch's SDPA says that no allowed backend takes a case (CUDA's message, the CPU's)
SDPA_REFUSALS = ("No available kernel", "No viable backend")


# ------------------------------------------------------------------ the contenders
# Taking the tensors positionally, so that torch.compile sees plain tensor arguments.


def torch_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """q, k, v: (B, H, T, D), k and v with Hkv <= H heads (GQA: ``enable_gqa``)."""
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_on_backend(name: str) -> Callable:
    """``torch_sdpa`` forced onto SDPA's backend ``SDPA_BACKENDS[name]``. A backend that
    refuses the case (dtype, head dim, GQA, hardware) raises NotImplementedError with torch's
    reasons, which the runner shows as n/a. The backward runs the backward of the kernel the
    forward chose, so forcing the forward forces both."""

    def forced(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[name])
        try:
            with sdpa_kernel(backend):
                return torch_sdpa(q, k, v, causal)
        except RuntimeError as exc:
            if not any(refusal in str(exc) for refusal in SDPA_REFUSALS):
                raise
            refusal = exc
        # torch gives its reasons as warnings: call again (off the timed path) to collect them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    torch_sdpa(q, k, v, causal)
            except RuntimeError:
                pass
        reasons = "; ".join(str(w.message).strip() for w in caught) or str(refusal)
        raise NotImplementedError(f"{name} refuses this case: {reasons}") from refusal

    forced.__name__ = forced.__qualname__ = f"sdpa_{SDPA_BACKENDS[name].lower()}"
    return forced


def fastllm_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """q, k, v: (B, T, H, D)."""
    return fastllm_functional.attention(q, k, v, causal=causal)


def torch_sdpa_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q, k, v: (B, H, T, D); mask: SDPA's attn_mask (bool, True = take part, or float)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fastllm_sdpa_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """The same call through fastllm's SDPA (the fused kernels with the mask)."""
    return fastllm_functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def old_masked_path(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """What fastllm's SDPA ran for any attn_mask before the kernels took masks."""
    return sdpa_ref(q, k, v, mask)


def padding_lengths(batch: int, seqlen: int, seed: int = PADDING_SEED) -> list[int]:
    """Per-sequence key counts, varied (each sequence's padding fraction drawn uniformly in
    [0.1, 0.5] with a fixed seed, then shifted so that PADDING_FRACTION of all keys are
    padding), each in [1, T]."""
    generator = torch.Generator().manual_seed(seed)
    fractions = 0.1 + 0.4 * torch.rand(batch, generator=generator, dtype=torch.float64)
    fractions += PADDING_FRACTION - fractions.mean()
    return [max(1, min(seqlen, round(seqlen * (1 - f)))) for f in fractions.tolist()]


@dataclasses.dataclass
class AttentionInputs:
    """The same values in each contender's layout: args (q, k, v, causal) with q, k, v
    contiguous; forward+backward: the gradients are taken of q, k, v, from grad_out. The
    torch layout is also that of the SDPA backend peers."""

    fastllm: CallInputs  # q, k, v, grad_out: (B, T, H, D)
    torch: CallInputs  # q, k, v, grad_out: (B, H, T, D)


@dataclasses.dataclass(frozen=True)
class AttentionCase(Case):
    mask: str  # one of MASKS
    mode: str  # one of MODES
    shape: tuple[int, int, int, int]  # (B, H, T, D)
    dtype: torch.dtype
    kv_heads: Optional[int] = None  # Hkv, grouped-query attention; None: as many as H
    # out, dq, dk, dv and a bias gradient (csrc: empty_output)
    kernel_outputs_cached = True

    @property
    def op_id(self) -> str:
        """``attention-<mask>``, and ``-hkv<Hkv>`` for grouped-query attention."""
        gqa = "" if self.kv_heads is None else f"-hkv{self.kv_heads}"
        return f"attention-{self.mask}{gqa}"

    @property
    def heads_kv(self) -> int:
        return self.shape[1] if self.kv_heads is None else self.kv_heads

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    def params(self) -> dict[str, str]:
        batch, heads, seqlen, head_dim = self.shape
        kv = "" if self.kv_heads is None else f" Hkv{self.kv_heads}"
        return {"mask": self.mask, "mode": self.mode,
                "shape": f"B{batch} H{heads}{kv} T{seqlen} D{head_dim}", "dtype": self.dtype_name}

    def peers(self, device: torch.device) -> dict[str, Callable]:
        """On CUDA: torch's SDPA forced onto its flash and cuDNN backends."""
        if device.type != "cuda":
            return {}
        return {name: sdpa_on_backend(name) for name in SDPA_BACKENDS}

    def torch_function(self) -> Callable:
        return torch_sdpa

    def fastllm_function(self) -> Callable:
        return fastllm_attention

    def flops(self) -> int:
        """The module docstring's count: 4 * B * H * T * T * D forward (half when causal),
        times 3.5 for forward+backward."""
        batch, heads, seqlen, head_dim = self.shape
        forward = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if self.causal else 1)
        return round(forward * (1 + BACKWARD_FLOPS_FACTOR)) if self.backward else forward

    def _elements(self, heads: Optional[int] = None) -> int:
        """Elements of q (or, with ``heads``, of a tensor with that many heads)."""
        batch, q_heads, seqlen, head_dim = self.shape
        return batch * (q_heads if heads is None else heads) * seqlen * head_dim

    def bytes_moved(self) -> int:
        """The totals of the module docstring; with Hkv < H, k, v (and dk, dv) count Hkv
        heads: 2 nq + 2 nkv elements forward, 6 nq + 6 nkv forward+backward."""
        per_tensor = self._elements() + self._elements(self.heads_kv)
        return (6 if self.backward else 2) * per_tensor * self.dtype.itemsize

    def largest_output_bytes(self) -> int:
        """out, or one of dq, dk, dv."""
        return self._elements() * self.dtype.itemsize

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """out; forward+backward also dq, dk and dv."""
        e = self.dtype.itemsize
        q, kv = self._elements() * e, self._elements(self.heads_kv) * e
        return (q, q, kv, kv) if self.backward else (q,)

    def make_inputs(self, device: torch.device) -> AttentionInputs:
        generator = torch.Generator(device=device).manual_seed(0)
        batch, heads, seqlen, head_dim = self.shape

        def randn_pair(requires_grad: bool, n_heads: int = heads) -> tuple[Tensor, Tensor]:
            # (B, T, H, D) and the same values as (B, H, T, D), both contiguous
            bthd = torch.randn(batch, seqlen, n_heads, head_dim, generator=generator,
                               device=device, dtype=self.dtype)
            bhtd = bthd.transpose(1, 2).contiguous()
            return bthd.requires_grad_(requires_grad), bhtd.requires_grad_(requires_grad)

        q = randn_pair(self.backward)
        k, v = (randn_pair(self.backward, self.heads_kv) for _ in range(2))
        grad_out = randn_pair(False) if self.backward else None

        def layout(i: int) -> CallInputs:  # 0: fastllm's, 1: torch's
            qkv = (q[i], k[i], v[i])
            if grad_out is None:
                return CallInputs((*qkv, self.causal))
            return CallInputs((*qkv, self.causal), differentiable=qkv, grad_outputs=(grad_out[i],))

        return AttentionInputs(fastllm=layout(0), torch=layout(1))

    def contender_inputs(self, contender: str, inputs: AttentionInputs) -> CallInputs:
        return inputs.fastllm if contender == FASTLLM else inputs.torch


def cases(quick: bool = False, shapes: str = DEFAULT_SHAPES,
          device: torch.device = CPU) -> list[Case]:
    """Every case, in table order: the unmasked ones (shape, dtype, mask, mode), then the
    masked ones (masked_cases), then the decode ones (decode_cases). ``quick``: one small
    shape of each. ``shapes`` (``fastllm.bench.common.SHAPE_SETS``): "llama3-8b" the
    LLaMA-3-8B ones instead (grouped-query, no masked or decode cases), "all" both. The cases
    do not depend on ``device``."""
    with_default, with_llama = shape_sets(shapes)
    picked = [(shape, None, DEFAULT_DTYPES) for shape in (QUICK_SHAPES if quick else SHAPES)
              if with_default]
    picked += [(shape, LLAMA3_8B_KV_HEADS, DTYPES) for shape in LLAMA3_8B_SHAPES if with_llama]
    return [
        AttentionCase(mask, mode, shape, dtype, kv_heads=kv_heads)
        for shape, kv_heads, dtypes in picked
        for dtype, mask, mode in itertools.product(dtypes, MASKS, MODES)
    ] + (masked_cases(quick) + decode_cases(quick) if with_default else [])


@dataclasses.dataclass(frozen=True)
class MaskedAttentionCase(AttentionCase):
    """Attention with SDPA's attn_mask: ``padded`` (boolean (B, 1, 1, T)) or ``t5-bias``
    (float (1, H, T, T) requiring grad); the module docstring has the details. AttentionCase's
    names and counts: its non-causal (dense) FLOP count, masked keys counted too."""

    mask: str  # one of MASKED_KINDS

    def torch_function(self) -> Callable:
        return torch_sdpa_masked

    def fastllm_function(self) -> Callable:
        return fastllm_sdpa_masked

    def peers(self, device: torch.device) -> dict[str, Callable]:
        """The old masked path, on every device. No forced SDPA backend rows: flash takes no
        attn_mask at all, and torch eager already picks among the backends that take one."""
        return {OLD_MASKED_PATH: old_masked_path}

    def mask_bytes(self) -> int:
        batch, heads, seqlen, _ = self.shape
        if self.mask == "padded":
            return batch * seqlen  # bool (B, 1, 1, T)
        return heads * seqlen * seqlen * self.dtype.itemsize  # (1, H, T, T)

    def bytes_moved(self) -> int:
        """AttentionCase's totals plus the mask: read once (forward) or, for the bias,
        read twice and its gradient written (forward+backward)."""
        mask_reads = 3 if self.backward and self.mask == "t5-bias" else 1
        return super().bytes_moved() + mask_reads * self.mask_bytes()

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """AttentionCase's, and forward+backward with a T5 bias its gradient."""
        bias = (self.mask_bytes(),) if self.backward and self.mask == "t5-bias" else ()
        return super().required_output_sizes(contender) + bias

    def largest_output_bytes(self) -> int:
        """out, one of dq, dk, dv, or the bias gradient."""
        largest = super().largest_output_bytes()
        return max(largest, self.mask_bytes()) if self.mask == "t5-bias" else largest

    def contender_inputs(self, contender: str, inputs: CallInputs) -> CallInputs:
        return inputs  # one (B, H, T, D) layout for every contender

    def make_inputs(self, device: torch.device) -> CallInputs:
        generator = torch.Generator(device=device).manual_seed(0)
        batch, heads, seqlen, head_dim = self.shape

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator, device=device, dtype=self.dtype)

        q, k, v = (randn(batch, heads, seqlen, head_dim).requires_grad_(self.backward)
                   for _ in range(3))
        differentiable: tuple[Tensor, ...] = (q, k, v)
        if self.mask == "padded":
            lengths = torch.tensor(padding_lengths(batch, seqlen), device=device)
            keys = torch.arange(seqlen, device=device)
            mask = (keys[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
        else:
            mask = randn(1, heads, seqlen, seqlen).requires_grad_(self.backward)
            differentiable += (mask,)
        if not self.backward:
            return CallInputs((q, k, v, mask))
        return CallInputs((q, k, v, mask), differentiable=differentiable,
                          grad_outputs=(randn(batch, heads, seqlen, head_dim),))


def masked_cases(quick: bool = False) -> list[MaskedAttentionCase]:
    """The masked cases, in table order: shape, dtype, mask, mode."""
    return [
        MaskedAttentionCase(mask, mode, shape, dtype)
        for shape, dtype, mask, mode in itertools.product(
            QUICK_MASKED_SHAPES if quick else MASKED_SHAPES, DTYPES, MASKED_KINDS, MODES
        )
    ]


@dataclasses.dataclass(frozen=True)
class DecodeAttentionCase(AttentionCase):
    """One decoded token per sequence against T cached keys (``mask`` "decode", forward
    only): q (B, 1, H, D), k and v (B, T, Hkv, D) for fastllm, (B, H, 1, D) and (B, Hkv, T, D)
    for SDPA (``enable_gqa=True``); the token sees every key (no mask). fastllm's inputs do
    not require grad, so on the CPU its decode kernel runs. FLOPs 4 * B * H * T * D; bytes:
    reading k and v dominates (2 B Hkv T D e, plus q and out)."""

    @property
    def causal(self) -> bool:
        return False

    def params(self) -> dict[str, str]:
        batch, heads, seqlen, head_dim = self.shape
        return {"mask": self.mask, "mode": self.mode,
                "shape": f"B{batch} H{heads} Hkv{self.heads_kv} Tk{seqlen} D{head_dim}",
                "dtype": self.dtype_name}

    def kernel_path(self, family_path: str) -> str:
        """The CPU decode kernel runs on the family's AVX-512 or AVX2 path, and on AVX-512
        where the family's path for the dtype is a tile or vdpbf16ps one (amx-*,
        avx512-bf16: such a CPU has AVX-512); on the scalar path the family's tile kernels
        run the case."""
        if family_path.startswith("amx-") or family_path == "avx512-bf16":
            return "avx512"
        return family_path

    def flops(self) -> int:
        batch, heads, seqlen, head_dim = self.shape
        return 4 * batch * heads * seqlen * head_dim

    def bytes_moved(self) -> int:
        batch, heads, seqlen, head_dim = self.shape
        return (2 * batch * heads * head_dim + 2 * self._elements(self.heads_kv)) \
            * self.dtype.itemsize

    def largest_output_bytes(self) -> int:
        batch, heads, _, head_dim = self.shape
        return batch * heads * head_dim * self.dtype.itemsize

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """out, one token's."""
        return (self.largest_output_bytes(),)

    def make_inputs(self, device: torch.device) -> AttentionInputs:
        generator = torch.Generator(device=device).manual_seed(0)
        batch, heads, seqlen, head_dim = self.shape

        def pair(tokens: int, n_heads: int) -> tuple[Tensor, Tensor]:
            bthd = torch.randn(batch, tokens, n_heads, head_dim, generator=generator,
                               device=device, dtype=self.dtype)
            return bthd, bthd.transpose(1, 2).contiguous()

        q = pair(1, heads)
        k, v = (pair(seqlen, self.heads_kv) for _ in range(2))
        return AttentionInputs(fastllm=CallInputs((q[0], k[0], v[0], False)),
                               torch=CallInputs((q[1], k[1], v[1], False)))


def decode_cases(quick: bool = False) -> list[DecodeAttentionCase]:
    """The decode cases, in table order: shape, dtype."""
    return [
        DecodeAttentionCase("decode", "fwd", shape, dtype, kv_heads=kv_heads)
        for (shape, kv_heads), dtype in itertools.product(
            QUICK_DECODE_SHAPES if quick else DECODE_SHAPES, DEFAULT_DTYPES)
    ]
