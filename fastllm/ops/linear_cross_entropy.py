"""Linear + cross-entropy in chunks: ``cross_entropy(input @ W.T + b, target)`` without ever
holding the (N, V) logits, built on the cross-entropy op family (fastllm/ops/cross_entropy.py)
and torch's GEMMs.

The two ops ``fastllm::linear_cross_entropy_fwd`` / ``_bwd`` are Python custom ops (so that
torch.compile(fullgraph=True) sees one opaque op) that run the rows in chunks: per chunk, logits = x_c @ W.T + b (one GEMM), the fused cross-entropy forward, and —
when the loss is reduced to a scalar (mean / sum), so the upstream gradient of every row is
the same number g known up to that factor — the gradient of the chunk's logits written over
them in place and the two gradient GEMMs (dX_c = dlogits @ W, dW += dlogits.T @ x_c). Backward
then only scales dX, dW, db by g: 3 GEMMs in all, as in the unfused path, and the peak extra
memory is one chunk of logits instead of (N, V) logits and their gradient. With
reduction="none" the rows' gradients are only known in backward, which recomputes each
chunk's logits (a 4th GEMM).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastllm.backend import get_backend
from fastllm.ops._family import (
    OpSet,
    acc_dtype,
    check_float_tensor,
    check_same_device,
    register_autograd,
    values_readable,
)
from fastllm.ops.cross_entropy import (
    IMPLS,
    CrossEntropyOutput,
    check_return_flags,
    check_class_weight,
    check_ignore_index,
    check_options,
    check_row_target,
    check_target_values,
    check_weight_not_differentiable,
    class_index_target,
    mean_weighting,
    reduce_rows,
    logged_outputs,
    zero_classes_loss,
)
from fastllm.reference import cross_entropy as ref

# The backends a raw op can run: those with cross-entropy kernels (fastllm/ops/_family.py).
_KERNEL_BACKENDS = ("native", "triton", "cuda_emu")

# A chunk's logits hold at least this many elements (16 MiB in float32): below it, the
# per-chunk overheads (kernel launches, GEMM set-up, the dW read-modify-write) dominate.
_MIN_CHUNK_ELEMENTS = 1 << 22
# ... and a chunk has at least this many rows: with a vocabulary far larger than the hidden
# size the element rule alone gives skinny chunks (84 rows at 1020 x 384 x 50257), each of
# which re-reads and rewrites the whole (V, H) dW and runs GEMMs too thin to be efficient:
# 13 such chunks cost a GPT-2-vocabulary training step 15-20 % (fastllm bench models).
_MIN_CHUNK_ROWS = 256
# ... and in bfloat16/float16 at least this many: their chunks' dW products are added into a
# float32 sum (see _ChunkedLinear), a read-modify-write of the (V, H) float32 sum per chunk
# that the low-precision GEMMs, several times faster, no longer hide (bf16 4096 x 1024 x
# 32000 fwd+bwd, one Sapphire Rapids core: 256-row chunks ran at 0.9-1.0x torch.compile's
# unfused time, 512-row chunks at 1.05-1.2x; 512 bf16 rows take the bytes of 256 float32).
_MIN_CHUNK_ROWS_LOW_PRECISION = 512
# ... and with fastllm's own GEMM (float32 on AVX-512 and AVX2 CPUs, see _own_gemm) at least
# this many: it keeps 95-100 GFLOP/s on 128-160-row chunks where torch's (MKL) drops to 78-81
# for the logits and 88-91 for dX (one Zen 4 core, H 1024, V 32000: benchmarks/micro/
# linear_mm_rates.py, record benchmarks/results/2026-12-06-cpu-linear-mm-rates-zen4.txt), so
# the chunks can shrink to the aspect-ratio rule's size: 132 rows at 4096 x 1024 x 32000,
# forward+backward 1.04x torch.compile's unfused time at 0.245x its peak memory. (The AVX2
# path, on the same core held to AVX2: logits ~91 against MKL's ~77, dX ~94 against ~88;
# forward+backward 0.984x at 0.245x, against 0.99-1.0x at 0.27x with torch's GEMMs and
# 256-row chunks: ...-linear-cross-entropy-fp32-avx2-held-own-gemm-3processes.txt.)
_MIN_CHUNK_ROWS_OWN_GEMM = 128


def default_chunk_size(rows: int, hidden: int, vocab: int,
                       dtype: torch.dtype = torch.float32, class_blocked: bool = False,
                       own_gemm: bool = False) -> int:
    """Rows per chunk such that a chunk's logits hold about as many elements as the input
    (rows x hidden), and at least _MIN_CHUNK_ELEMENTS and _MIN_CHUNK_ROWS (in ``dtype``
    bfloat16/float16: _MIN_CHUNK_ROWS_LOW_PRECISION) rows: torch's
    LinearCrossEntropyOptions "aspect_ratio" rule (so the peak memory is about that of
    torch's chunked path) with a floor against skinny chunks. Each chunk streams the whole
    weight through its GEMMs and reads and rewrites dW, so larger chunks run faster at the
    cost of memory. At 4096 x 1024 x 32000 float32 fwd+bwd on one Sapphire Rapids core the
    floor's 256 rows ran at 1.0-1.1x torch.compile's unfused time with 174 MiB at peak
    (0.27x compile's 641, of which 141 are dX and dW); 128 rows, 157 MiB (0.245x), ran at
    0.84x: the GEMMs drop from about 185 to 120-160 GFLOP/s with 128-row operands.
    class_blocked (see _class_blocked): the chunks' logits live in dW's memory, which the
    class sweep fills only afterwards, so a chunk of at most ``hidden`` rows costs no memory
    of its own: the bfloat16/float16 floor is kept (512 rows ran at 1.03x torch.compile's
    unfused time at 4096 x 1024 x 32000 bfloat16 on one Granite Rapids-class core, 128 rows
    at 0.85x), capped at ``hidden`` rows unless that is under _MIN_CHUNK_ROWS.
    own_gemm (see _own_gemm): fastllm's GEMM keeps its rate on 128-row chunks, so the floor
    is _MIN_CHUNK_ROWS_OWN_GEMM."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    floor = _MIN_CHUNK_ROWS_LOW_PRECISION if low_precision else _MIN_CHUNK_ROWS
    if own_gemm:
        floor = _MIN_CHUNK_ROWS_OWN_GEMM
    elements = max(rows * hidden, _MIN_CHUNK_ELEMENTS)
    chunk = max(floor, -(-elements // vocab))
    if class_blocked:
        chunk = min(chunk, max(hidden, _MIN_CHUNK_ROWS))
    return max(1, min(rows, chunk))


# On the CPU the low-precision dW product runs on blocks of this many classes (rows of dW)
# through two small buffers: the block's product (block, H), added into the float32 sum
# while it is in cache, instead of a (V, H) product per chunk (62.5 MiB more at peak at bf16
# 32000 x 1024; the mixed-dtype add widens the product to a float32 temporary too, 4 MiB
# here with 1024 classes, 16 MiB with 4096 for a few % of speed); and a contiguous
# (block, C) copy of the chunk's transposed logit gradient, the GEMM's first operand:
# torch's bfloat16 GEMM (oneDNN) reads the transposed (C, V) view at a third of the speed
# (bf16 dW step at 256 x 1024 x 32000, one Sapphire Rapids core: 158 GFLOP/s before, 390
# now, the float32 sum's read-modify-write included).
_LOW_PRECISION_DW_BLOCK = 1024


# Class-blocked dW (bfloat16 / float16 on the CPU's native kernels): after the row chunks,
# which give the loss, lse and dX, the classes are swept in blocks, each block's logits
# recomputed for all rows (a 4th GEMM) and its gradient formed from the rows' lse, so that
# each block of dW is one GEMM over all rows, rounded once into the storage dtype. The
# row-chunk scheme instead sums the chunks' dW products in a float32 (V, H) buffer (rounding
# them in the storage dtype chunk by chunk was over the tests' 2x rule, see _ChunkedLinear),
# twice the size of dW itself, and converts it at the end: at 4096 x 1024 x 32000 bfloat16
# fwd+bwd that held 239 MiB at peak (0.72x torch.compile's unfused 331). The extra GEMM costs
# about what the float32 sum's per-chunk read-modify-write and final conversion did (one
# Granite Rapids-class core, same process: 1537 ms prototype against 1567 for the row chunks
# and 1817 for torch.compile).
# float32 keeps the row chunks: its dW sum is dW itself, and its GEMMs are 6x slower, so a 4th
# one would cost a third more time.
_MIN_CLASS_BLOCK = 128


def default_class_block(rows: int, hidden: int, vocab: int) -> int:
    """Classes per block of the class sweep: the block's logits and their transposed copy,
    (rows, block) each, hold about as much as the input together (at least
    _MIN_CHUNK_ELEMENTS), and at least _MIN_CLASS_BLOCK classes."""
    elements = max(rows * hidden, _MIN_CHUNK_ELEMENTS)
    return max(1, min(vocab, max(_MIN_CLASS_BLOCK, elements // (2 * max(rows, 1)))))


def _separate_rows(t: Tensor) -> bool:
    """Whether the 2-D ``t``'s rows are contiguous and apart (no row overlaps the next), as
    fastllm::linear_mm_out reads its operands (an expanded input's rows are not)."""
    return t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[-1])


def _own_gemm(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
              backend: str) -> bool:
    """Whether the chunks' logits, dX and dW products run fastllm's own GEMMs
    (fastllm::linear_mm_out and linear_weight_grad_out, csrc/common/gemm_cpu.h) instead of
    torch's: float32 operands on the CPU's native kernels where the cross-entropy family takes
    its AVX-512 or AVX2 path (which FASTLLM_CPU_ISA caps; not the scalar one), the weight's
    rows contiguous and apart (_separate_rows; an input chunk whose rows are not takes torch's
    GEMM for its logits and dW). dW's product, added chunk by chunk into the (V, H) float32
    dW: 225-228 GFLOP/s against torch's (MKL) 113-115 at 128-132-row chunks of 1024 x 32000
    on one Zen 5 core, 127-132 against 118 on the same core held to AVX2
    (benchmarks/micro/linear_mm_rates.py, record ...-linear-mm-rates-zen5.txt); forward +
    backward at 4096 x 1024 x 32000 1.47x -> 1.91x torch.compile's unfused time there, 1.12x
    held to AVX2 (records ...-linear-cross-entropy-fp32-own-dw-zen5[-avx2-held]-3processes)."""
    if not (backend == "native" and input.device.type == "cpu"
            and input.dtype == linear_weight.dtype == torch.float32
            and (linear_bias is None or linear_bias.dtype == torch.float32)
            and _separate_rows(linear_weight)):
        return False
    return _float32_path_has_own_gemm()


@torch.compiler.assume_constant_result
def _float32_path_has_own_gemm() -> bool:
    """Whether the cross-entropy family's float32 CPU path in this process (fixed once the
    kernels have read the CPU and FASTLLM_CPU_ISA) is one linear_mm_out runs on: avx512 or
    avx2. A constant to torch.compile, which cannot trace cpu_kernel_path (an op returning a
    string) into a graph: linear_cross_entropy's default chunk size asks it while being
    traced."""
    from fastllm.backend import cpu_kernel_path
    return cpu_kernel_path("cross_entropy", torch.float32) in ("avx512", "avx2")


def _class_blocked(input: Tensor, backend: str, need_weight: bool, need_bias: bool) -> bool:
    """Whether dW / db come from the class sweep: low precision on the CPU's native kernels
    (the block kernel is a CPU one), when they are wanted."""
    return (backend == "native" and input.device.type == "cpu"
            and input.dtype in (torch.bfloat16, torch.float16) and (need_weight or need_bias))


# Rows whose |lse| reaches this get an exact split from _lse_split (cross_entropy.h).
_EXACT_LSE_MIN = 256.0


def _lse_split(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], lse: Tensor,
               softcap: float) -> Tensor:
    """(rows, 2) float32 (hi, lo) with p_c = exp((z_c - hi) - lo), for the block kernel,
    which cannot recompute a row's lse: (lse, 0), except for the finite rows with
    |lse| >= 256, whose rounded lse would be a visible error of p (the CPU kernel's own rule,
    csrc/cross_entropy/cross_entropy_cpu.cpp, lse_split): their max capped logit and
    log(sum exp(z - max)), recomputed here from their logits (a few rows, if any)."""
    split = torch.stack((lse, torch.zeros_like(lse)), 1)
    big = (torch.isfinite(lse) & (lse.abs() >= _EXACT_LSE_MIN)).nonzero().flatten()
    if big.numel() == 0:
        return split
    z = torch.nn.functional.linear(input[big], linear_weight, linear_bias).to(lse.dtype)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    hi = z.amax(1)
    lo = (z.double() - hi.double()[:, None]).exp().sum(1).log()
    split[big] = torch.stack((hi, lo.to(lse.dtype)), 1)
    return split


class _ChunkedLinear:
    """The chunk loop's state: one logits buffer reused by every chunk (a fresh (C, V)
    allocation per chunk would pay its page faults every time), and dX, dW, db summed chunk
    by chunk from each chunk's d(loss)/d(logits). dW and db accumulate in float32 for
    bfloat16/float16: each chunk's dW product is a GEMM in the storage dtype (float32
    accumulation inside, torch's fast low-precision path; rounded once, as torch's unfused
    backward rounds its one dW GEMM), by blocks of classes (_LOW_PRECISION_DW_BLOCK), added
    into the float32 sum, so the chunks never round each other's partial sums. (Widening the
    logit gradient to float32 first, as before, ran the GEMM on the slow float32 path: 44 % of
    a bf16 Llama step. Summing in the storage dtype instead would save the float32 sum's
    memory, but at 2048 x 1024 x 8000 in chunks of 128 rows its dW error was 2.5x torch's in
    bfloat16 and 3.6x in float16: over the tests' 2x rule.)"""

    def __init__(self, input, linear_weight, linear_bias, chunk_size,
                 need_input, need_weight, need_bias, class_blocked=False, own_gemm=False):
        rows, hidden = input.shape
        self.own_gemm = own_gemm
        # class_blocked: dW and db come from class_sweep after the row chunks, which then
        # only give dX (see _class_blocked); dW is allocated now, as the row chunks' logits
        # use its memory first (the sweep writes every row of it, zeros without rows)
        self.class_grad_weight = None
        if class_blocked:
            self.class_sweep_needs = (need_weight, need_bias)
            if need_weight:
                self.class_grad_weight = input.new_empty((linear_weight.shape[0], hidden),
                                                         dtype=linear_weight.dtype)
            need_weight = need_bias = False
        vocab = linear_weight.shape[0]
        self.chunk_size = chunk_size
        self.linear_weight = linear_weight
        self.linear_bias = linear_bias
        low_precision = input.dtype in (torch.bfloat16, torch.float16)
        acc = torch.float32 if low_precision else input.dtype
        self.weight_dtype = linear_weight.dtype
        self.bias_dtype = linear_bias.dtype if linear_bias is not None else input.dtype
        chunk_rows = min(chunk_size, rows)
        # dW's memory, before the class sweep writes dW (see default_chunk_size)
        self.logits_in_grad_weight = self.class_grad_weight is not None and chunk_rows <= hidden
        if self.logits_in_grad_weight:
            self.logits_buffer = self.class_grad_weight.view(-1)[: chunk_rows * vocab].view(
                chunk_rows, vocab)
        else:
            self.logits_buffer = input.new_empty((chunk_rows, vocab))
        # low precision: the dW product's block buffers (see _LOW_PRECISION_DW_BLOCK)
        self.product_buffer = self.grad_t_buffer = None
        if need_weight and low_precision:
            if input.device.type == "cpu":
                block = min(vocab, _LOW_PRECISION_DW_BLOCK)
                self.grad_t_buffer = input.new_empty((block, chunk_rows))
            else:  # one product per chunk, as cuBLAS takes the transposed view as it is
                block = vocab
            self.product_buffer = input.new_empty((block, hidden))
        self.grad_input = input.new_empty((rows, hidden)) if need_input else None
        # dW is written by the first chunk, not zero-filled first (a (V, H) float32 fill is
        # a full pass over fresh memory); zeros only when there is no chunk at all
        self.grad_weight = (
            (input.new_empty if rows > 0 else input.new_zeros)((vocab, hidden), dtype=acc)
            if need_weight else None
        )
        self.grad_weight_written = False
        self.grad_bias = input.new_zeros((vocab,), dtype=acc) if need_bias else None

    def chunks(self, input: Tensor) -> list[tuple[int, int]]:
        rows = input.shape[0]
        return [(s, min(s + self.chunk_size, rows)) for s in range(0, rows, self.chunk_size)]

    def logits(self, x_chunk: Tensor) -> Tensor:
        """(C, H) @ (V, H).T + b -> (C, V) in the input's dtype, torch's GEMM (as F.linear)
        or fastllm's own (see _own_gemm), written into the shared buffer."""
        out = self.logits_buffer[: x_chunk.shape[0]]
        if self.own_gemm and _separate_rows(x_chunk):
            torch.ops.fastllm.linear_mm_out(x_chunk, self.linear_weight, True, self.linear_bias,
                                            out)
            return out
        if self.linear_bias is None:
            return torch.mm(x_chunk, self.linear_weight.t(), out=out)
        return torch.addmm(self.linear_bias, x_chunk, self.linear_weight.t(), out=out)

    def add_chunk(self, start: int, grad_logits: Tensor, x_chunk: Tensor) -> None:
        end = start + grad_logits.shape[0]
        if self.grad_input is not None:
            if self.own_gemm:
                torch.ops.fastllm.linear_mm_out(grad_logits, self.linear_weight, False, None,
                                                self.grad_input[start:end])
            else:
                torch.mm(grad_logits, self.linear_weight, out=self.grad_input[start:end])
        if self.grad_weight is not None:
            if self.product_buffer is None and self.own_gemm and _separate_rows(x_chunk):
                torch.ops.fastllm.linear_weight_grad_out(grad_logits, x_chunk,
                                                         self.grad_weight_written,
                                                         self.grad_weight)
            elif self.product_buffer is None:
                if self.grad_weight_written:
                    self.grad_weight.addmm_(grad_logits.t(), x_chunk)
                else:
                    torch.mm(grad_logits.t(), x_chunk, out=self.grad_weight)
            else:
                self._add_low_precision_grad_weight(grad_logits, x_chunk)
            self.grad_weight_written = True
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(0, dtype=self.grad_bias.dtype)

    def _add_low_precision_grad_weight(self, grad_logits: Tensor, x_chunk: Tensor) -> None:
        """The float32 dW (+)= grad_logits.T @ x_chunk, by blocks of classes: each block's
        product a GEMM in the storage dtype into product_buffer."""
        vocab, rows = self.grad_weight.shape[0], grad_logits.shape[0]
        block = self.product_buffer.shape[0]
        for v0 in range(0, vocab, block):
            v1 = min(v0 + block, vocab)
            grad_t = grad_logits[:, v0:v1].t()  # (block, C)
            if self.grad_t_buffer is not None:
                grad_t = self.grad_t_buffer[: v1 - v0, :rows].copy_(grad_t)
            product = torch.mm(grad_t, x_chunk, out=self.product_buffer[: v1 - v0])
            if self.grad_weight_written:
                self.grad_weight[v0:v1].add_(product)
            else:
                self.grad_weight[v0:v1].copy_(product)

    def class_sweep(self, input: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                    row_grads: Tensor, options: tuple) -> None:
        """dW and db by blocks of classes, after the row chunks (see _class_blocked): per
        block, its logits for every row (one GEMM), their gradient written over them from
        the rows' lse (fastllm::cross_entropy_bwd_block_inplace), dW's rows of the block as
        one GEMM over all rows, rounded once into the storage dtype (a contiguous transposed
        copy of the block's gradient is its first operand, see _LOW_PRECISION_DW_BLOCK), and
        db's as a float32 column sum. No float32 (V, H) sum exists."""
        need_weight, need_bias = self.class_sweep_needs
        # The row chunks' buffer: when it is not dW's memory, its own is reused for the
        # blocks' two buffers where large enough (a freed buffer under glibc's mmap threshold,
        # up to 32 MiB, stays in the process's heap, and a fresh one beside it would count
        # twice at peak).
        workspace = None if self.logits_in_grad_weight else self.logits_buffer.view(-1)
        self.logits_buffer = None
        if not (need_weight or need_bias):
            return
        rows, hidden = input.shape
        vocab = self.linear_weight.shape[0]
        block = min(vocab, default_class_block(rows, hidden, vocab))
        split = _lse_split(input, self.linear_weight, self.linear_bias, lse, softcap=options[3])
        # the block's logits, and (dW) their transposed copy
        buffers = 2 if need_weight else 1
        if workspace is None or workspace.numel() < buffers * rows * block:
            workspace = None  # freed before its replacement is allocated
            workspace = input.new_empty((buffers * rows * block,))
        logits_buffer, grad_t_buffer = workspace[: rows * block], workspace[rows * block:]
        self.grad_weight, self.class_grad_weight = self.class_grad_weight, None
        if need_bias:
            self.grad_bias = input.new_empty((vocab,), dtype=torch.float32)
        for v0 in range(0, vocab, block):
            v1 = min(v0 + block, vocab)
            classes = v1 - v0
            logits = logits_buffer[: rows * classes].view(rows, classes)
            w_block = self.linear_weight[v0:v1]
            if self.linear_bias is None:
                torch.mm(input, w_block.t(), out=logits)
            else:
                torch.addmm(self.linear_bias[v0:v1], input, w_block.t(), out=logits)
            torch.ops.fastllm.cross_entropy_bwd_block_inplace(
                row_grads, logits, target, weight, lse, split, v0, vocab, *options
            )
            if need_weight:
                grad_t = grad_t_buffer[: classes * rows].view(classes, rows).copy_(logits.t())
                torch.mm(grad_t, input, out=self.grad_weight[v0:v1])
            if need_bias:
                torch.sum(logits, 0, dtype=torch.float32, out=self.grad_bias[v0:v1])

    def results(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dX, dW, db) in their parameters' dtypes; an empty tensor for each one not wanted
        (custom ops cannot return None)."""
        # the chunk buffers are released first, so that the low-precision dW conversion
        # below (the float32 sum and its conversion at once) can reuse their memory
        self.logits_buffer = self.product_buffer = self.grad_t_buffer = None
        grad_input, grad_weight, grad_bias = (like.new_empty(0) for _ in range(3))
        if self.grad_input is not None:
            grad_input = self.grad_input
        if self.grad_weight is not None:
            grad_weight = self.grad_weight.to(self.weight_dtype)
        if self.grad_bias is not None:
            grad_bias = self.grad_bias.to(self.bias_dtype)
        return grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------- checks
# The raw ops' arguments, checked in the ops and in their fakes (so torch.compile reports
# them while tracing) with messages naming the argument, the expected and the actual value.
# The public function checks its own (torch-shaped) arguments first.


def _check_chunk_size(op: str, chunk_size: Optional[int]) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, torch.SymInt)):
        raise TypeError(
            f"{op}: chunk_size must be a positive int (rows per chunk), got "
            f"{type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive number of rows, got {chunk_size}")


def _check_linear_params(op: str, input: Tensor, linear_weight: Tensor,
                         linear_bias: Optional[Tensor], min_classes: int) -> int:
    """linear_weight (V, H) with V >= min_classes and H = input.shape[-1], linear_bias (V,)
    or None, both in the input's dtype on its device; returns V. (The raw ops need a class;
    the public function takes zero classes, as torch.)"""
    hidden = input.shape[-1]
    if (linear_weight.dim() != 2 or linear_weight.shape[1] != hidden
            or linear_weight.shape[0] < min_classes):
        classes = f"num_classes >= {min_classes}" if min_classes else "num_classes"
        raise ValueError(
            f"{op}: linear_weight must have shape [{classes}, {hidden}] (in_features = "
            f"input.shape[-1]), got {list(linear_weight.shape)}"
        )
    vocab = linear_weight.shape[0]
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dtype != input.dtype:
            raise TypeError(
                f"{op}: {name} must have the input's dtype {input.dtype}, got {t.dtype}"
            )
        check_same_device(op, name, t, input)
    if linear_bias is not None and list(linear_bias.shape) != [vocab]:
        raise ValueError(
            f"{op}: linear_bias must have shape [{vocab}] (num_classes), "
            f"got {list(linear_bias.shape)}"
        )
    return vocab


def _check_problem(op: str, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                   target: Tensor, weight: Optional[Tensor], ignore_index: int, chunk_size: int,
                   backend: str) -> None:
    """What both ops share: input (N, H), linear_weight (V, H) and linear_bias (V,) in one
    float dtype on one device, target (N,) int64, weight (V,) float, ignore_index,
    chunk_size >= 1 and a backend with cross-entropy kernels."""
    check_float_tensor(op, "input", input)
    if input.dim() != 2:
        raise ValueError(f"{op}: input must be 2-D (rows, in_features), got shape "
                         f"{list(input.shape)}")
    check_float_tensor(op, "linear_weight", linear_weight)
    vocab = _check_linear_params(op, input, linear_weight, linear_bias, min_classes=1)
    check_row_target(op, target, input, "input")
    check_class_weight(op, weight, vocab, input)
    check_ignore_index(op, ignore_index)
    _check_chunk_size(op, chunk_size)
    if backend not in _KERNEL_BACKENDS:
        raise ValueError(
            f"{op}: backend must be one of {', '.join(map(repr, _KERNEL_BACKENDS))} (the "
            f"backends with cross-entropy kernels), got {backend!r}"
        )


def _check_flags(op: str, **flags: bool) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def _check_fwd(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
               label_smoothing, z_loss, softcap, chunk_size, need_grad_input, need_grad_weight,
               need_grad_bias, scale_grads_in_place, backend):
    op = "linear_cross_entropy_fwd"
    _check_problem(op, input, linear_weight, linear_bias, target, weight, ignore_index,
                   chunk_size, backend)
    check_options(op, reduction, label_smoothing, z_loss, softcap)
    _check_flags(op, need_grad_input=need_grad_input, need_grad_weight=need_grad_weight,
                 need_grad_bias=need_grad_bias, scale_grads_in_place=scale_grads_in_place)


def _check_bwd(grad_loss, input, linear_weight, linear_bias, target, weight, lse, ignore_index,
               label_smoothing, z_loss, softcap, chunk_size, need_grad_input, need_grad_weight,
               need_grad_bias, backend):
    op = "linear_cross_entropy_bwd"
    _check_problem(op, input, linear_weight, linear_bias, target, weight, ignore_index,
                   chunk_size, backend)
    check_options(op, "none", label_smoothing, z_loss, softcap)
    rows = input.shape[0]
    for name, t in (("grad_loss", grad_loss), ("lse", lse)):
        check_float_tensor(op, name, t)
        if list(t.shape) != [rows]:
            raise ValueError(
                f"{op}: {name} must have shape [{rows}] (one value per row of input), "
                f"got {list(t.shape)}"
            )
        check_same_device(op, name, t, input)
    if lse.dtype != acc_dtype(input):
        raise TypeError(f"{op}: lse must be {acc_dtype(input)} (forward's lse), got {lse.dtype}")
    _check_flags(op, need_grad_input=need_grad_input, need_grad_weight=need_grad_weight,
                 need_grad_bias=need_grad_bias)


def _kernels(op: str, input: Tensor, target: Tensor, vocab: int, ignore_index: int,
             backend: str) -> OpSet:
    """The cross-entropy op set the chunks run on; on CPU tensors the targets' range checked
    first, over all rows (so the error names the row, not its index within a chunk)."""
    ops = IMPLS.select(input, backend)
    if ops is None:
        raise ValueError(
            f"{op}: backend {backend!r} has no cross-entropy kernels for {input.dtype} tensors "
            f"on {input.device} (fastllm.functional.linear_cross_entropy runs the reference "
            "there)"
        )
    if values_readable(input, target):
        check_target_values(op, target, vocab, ignore_index)
    return ops


def _reduction_plan(reduction: str, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                    z_loss: float, vocab: int, dtype: torch.dtype
                    ) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """(the class weights the kernels run with, the mean's denominator or None,
    d(reduced loss)/d(loss of a row) as a 0-d tensor: 1 / denominator for mean, 1 otherwise).
    Over all rows, before any chunk: the z-loss's n_valid and the weights' sum are global
    (fastllm/ops/cross_entropy.py, "reductions")."""
    kernel_weight, denominator = mean_weighting(
        target, weight, ignore_index, reduction, z_loss, vocab, dtype
    )
    if denominator is not None:
        return kernel_weight, denominator, 1.0 / denominator
    return kernel_weight, None, torch.ones((), dtype=dtype, device=target.device)


def _fake_grads(input, linear_weight, linear_bias, need_input, need_weight, need_bias):
    """(dX, dW, db) as the ops return them: in their parameters' dtypes, empty when not
    wanted (custom ops cannot return None)."""
    rows, hidden = input.shape
    vocab = linear_weight.shape[0]
    bias_dtype = linear_bias.dtype if linear_bias is not None else input.dtype
    return (
        input.new_empty((rows, hidden) if need_input else (0,)),
        input.new_empty((vocab, hidden) if need_weight else (0,), dtype=linear_weight.dtype),
        input.new_empty((vocab,) if need_bias else (0,), dtype=bias_dtype),
    )


@torch.library.custom_op("fastllm::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    scale_grads_in_place: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """input (N, H), linear_weight (V, H), linear_bias (V,), target (N,) ->
    (loss: () or (N,) float32, lse (N,) float32, correct (N,) bool (the target is a top-1
    class of its row, from each chunk's forward: token accuracy), dX, dW, db). The gradients
    are those of the loss as returned (for reduction mean / sum) and empty when not wanted or
    when reduction="none" (computed in backward then). scale_grads_in_place: see backward."""
    _check_fwd(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
               label_smoothing, z_loss, softcap, chunk_size, need_grad_input, need_grad_weight,
               need_grad_bias, scale_grads_in_place, backend)
    rows = input.shape[0]
    vocab = linear_weight.shape[0]
    ops = _kernels("linear_cross_entropy_fwd", input, target, vocab, ignore_index, backend)
    acc = acc_dtype(input)
    kernel_weight, denominator, row_grad = _reduction_plan(
        reduction, target, weight, ignore_index, z_loss, vocab, acc
    )
    options = (ignore_index, label_smoothing, z_loss, softcap)
    loss_rows = input.new_empty((rows,), dtype=acc)
    lse = input.new_empty((rows,), dtype=acc)
    correct = input.new_empty((rows,), dtype=torch.bool)
    with_grad = reduction != "none" and (need_grad_input or need_grad_weight or need_grad_bias)
    need_input, need_weight, need_bias = (with_grad and need_grad_input,
                                          with_grad and need_grad_weight,
                                          with_grad and need_grad_bias)
    class_blocked = _class_blocked(input, backend, need_weight, need_bias)
    loop = _ChunkedLinear(input, linear_weight, linear_bias, chunk_size,
                          need_input, need_weight, need_bias, class_blocked,
                          _own_gemm(input, linear_weight, linear_bias, backend))
    # the row chunks' logit gradient: for dX, dW, db, or (class-blocked) dX only
    chunk_grads = need_input or (with_grad and not class_blocked)
    for start, end in loop.chunks(input):
        x_chunk = input[start:end]
        logits = loop.logits(x_chunk)  # (C, V)
        chunk_target = target[start:end]
        chunk_loss, chunk_lse, chunk_correct = ops.cross_entropy_fwd(
            logits, chunk_target, kernel_weight, *options
        )
        loss_rows[start:end] = chunk_loss
        lse[start:end] = chunk_lse
        correct[start:end] = chunk_correct
        if chunk_grads:
            ops.cross_entropy_bwd_inplace(
                row_grad.expand(end - start), logits, chunk_target, kernel_weight, chunk_lse,
                *options,
            )
            loop.add_chunk(start, logits, x_chunk)  # logits now hold their gradient
    logits = None  # the last view of the buffer, which results() frees
    if class_blocked:
        loop.class_sweep(input, target, kernel_weight, lse, row_grad.expand(rows), options)
    loss = reduce_rows(loss_rows, reduction, denominator)
    return (loss, lse, correct, *loop.results(input))


@_linear_cross_entropy_fwd.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
      z_loss, softcap, chunk_size, need_grad_input, need_grad_weight, need_grad_bias,
      scale_grads_in_place, backend):
    _check_fwd(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
               label_smoothing, z_loss, softcap, chunk_size, need_grad_input, need_grad_weight,
               need_grad_bias, scale_grads_in_place, backend)
    rows = input.shape[0]
    acc = acc_dtype(input)
    with_grad = reduction != "none"
    loss = input.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    lse = input.new_empty((rows,), dtype=acc)
    correct = input.new_empty((rows,), dtype=torch.bool)
    return (loss, lse, correct) + _fake_grads(
        input, linear_weight, linear_bias,
        with_grad and need_grad_input, with_grad and need_grad_weight, with_grad and need_grad_bias,
    )


@torch.library.custom_op("fastllm::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd(
    grad_loss: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_loss (N,), the upstream gradient of every row's loss -> (dX, dW, db).
    Recomputes each chunk's logits, overwrites them with their gradient and adds the chunk
    to dX, dW, db. ``weight`` is what the kernels run with (see _reduction_plan)."""
    _check_bwd(grad_loss, input, linear_weight, linear_bias, target, weight, lse, ignore_index,
               label_smoothing, z_loss, softcap, chunk_size, need_grad_input, need_grad_weight,
               need_grad_bias, backend)
    ops = _kernels("linear_cross_entropy_bwd", input, target, linear_weight.shape[0],
                   ignore_index, backend)
    options = (ignore_index, label_smoothing, z_loss, softcap)
    class_blocked = _class_blocked(input, backend, need_grad_weight, need_grad_bias)
    loop = _ChunkedLinear(
        input, linear_weight, linear_bias, chunk_size,
        need_grad_input, need_grad_weight, need_grad_bias, class_blocked,
        _own_gemm(input, linear_weight, linear_bias, backend),
    )
    grad_loss = grad_loss.to(acc_dtype(input))
    if need_grad_input or not class_blocked:
        for start, end in loop.chunks(input):
            x_chunk = input[start:end]
            logits = loop.logits(x_chunk)
            ops.cross_entropy_bwd_inplace(
                grad_loss[start:end], logits, target[start:end], weight, lse[start:end],
                *options,
            )
            loop.add_chunk(start, logits, x_chunk)
        logits = None  # the last view of the buffer, which results() frees
    if class_blocked:
        loop.class_sweep(input, target, weight, lse, grad_loss, options)
    return loop.results(input)


@_linear_cross_entropy_bwd.register_fake
def _(grad_loss, input, linear_weight, linear_bias, target, weight, lse, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, need_grad_input, need_grad_weight,
      need_grad_bias, backend):
    _check_bwd(grad_loss, input, linear_weight, linear_bias, target, weight, lse, ignore_index,
               label_smoothing, z_loss, softcap, chunk_size, need_grad_input, need_grad_weight,
               need_grad_bias, backend)
    return _fake_grads(
        input, linear_weight, linear_bias, need_grad_input, need_grad_weight, need_grad_bias
    )


def _setup_linear_cross_entropy(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
     z_loss, softcap, chunk_size, need_grad_input, need_grad_weight, need_grad_bias,
     scale_grads_in_place, backend) = inputs
    _loss, lse, correct, grad_input, grad_weight, grad_bias = output
    # Only the loss is differentiable; without this, autograd would hand backward zero-filled
    # (N, H) and (V, H) gradients for the gradient outputs, an extra dW-sized allocation.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, correct, grad_input, grad_weight, grad_bias)
    ctx.reduction = reduction
    ctx.needs = (need_grad_input, need_grad_weight, need_grad_bias)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
    ctx.backend = backend
    # The inputs and lse (N floats) let any backward recompute the gradients.
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse)
    ctx.scale_grads_in_place = scale_grads_in_place
    # The gradients the forward computed (mean / sum), kept as attributes rather than saved
    # tensors so that backward can hand them out and drop its reference (see backward).
    ctx.precomputed = (grad_input, grad_weight, grad_bias) if reduction != "none" else None


def _backward_linear_cross_entropy(ctx, grad_loss, _lse, _correct, _grad_input, _grad_weight,
                                   _grad_bias):
    need_input, need_weight, need_bias = ctx.needs
    if grad_loss is None:
        return (None,) * 16
    if ctx.precomputed is not None:
        # mean / sum: the forward computed the gradients of the reduced loss; scale them by its
        # upstream gradient, a scalar. In eager mode in place, and the node gives them away:
        # no second (V, H) buffer, and autograd can move them into .grad without a copy; a
        # later backward through the same graph (retain_graph) recomputes below instead.
        # Under torch.compile (decided at the call) out of place, which AOTAutograd traces.
        if ctx.scale_grads_in_place:
            grads = tuple(g.mul_(grad_loss) for g in ctx.precomputed)
            ctx.precomputed = None
        else:
            grads = tuple(g * grad_loss for g in ctx.precomputed)
    else:
        input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, softcap, chunk_size = ctx.options
        kernel_weight, _denominator, row_grad = _reduction_plan(
            ctx.reduction, target, weight, ignore_index, z_loss, linear_weight.shape[0],
            lse.dtype,
        )
        if ctx.reduction == "none":
            grad_rows = grad_loss
        else:
            grad_rows = (grad_loss * row_grad).expand(input.shape[0])
        grads = _linear_cross_entropy_bwd(
            grad_rows, input, linear_weight, linear_bias, target, kernel_weight, lse,
            *ctx.options, need_input, need_weight, need_bias, ctx.backend,
        )
    grad_input, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, ctx.needs))
    return (grad_input, grad_weight, grad_bias) + (None,) * 13


register_autograd(
    "fastllm::linear_cross_entropy_fwd",
    _backward_linear_cross_entropy,
    setup_context=_setup_linear_cross_entropy,
)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    ignore_index: Optional[int] = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    chunk_size: Optional[int] = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> Tensor | CrossEntropyOutput:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without ever
    holding the ``(N, num_classes)`` logits: the rows are processed ``chunk_size`` at a time
    (default: chunks whose logits take about as much memory as ``input``), with torch's GEMMs
    and the fused cross-entropy kernels. Gradients flow to ``input``, ``linear_weight`` and
    ``linear_bias``.

    ``input`` is ``(..., in_features)`` with ``target`` of shape ``input.shape[:-1]``;
    ``linear_weight`` ``(num_classes, in_features)`` and ``linear_bias`` ``(num_classes,)``
    in the input's dtype. Keyword arguments as ``torch.nn.functional.linear_cross_entropy``
    (``weight`` = class weights, ``ignore_index=None`` means -100) plus ``z_loss``,
    ``softcap`` and ``chunk_size`` (rows per chunk, a positive int), with the semantics of
    ``fastllm.functional.cross_entropy`` (zero rows and zero classes included):
    in particular the z-loss is averaged over the non-ignored rows, never weighted by the
    class weights (``mean`` = ``sum(w_t * ce) / sum(w_t) + z_loss * sum(lse**2) / n``), and
    the weights' sum and ``n`` are those of all rows, not of a chunk. A target out of range
    raises an IndexError naming it on CPU tensors (a NaN row loss on CUDA tensors).

    ``return_z_loss`` / ``return_token_accuracy``: a ``CrossEntropyOutput(loss, z_loss,
    token_accuracy)`` as in ``cross_entropy`` (the z term alone, detached; the fraction of
    non-ignored rows whose target is a top-1 class, ties counting as correct, or per row
    with "none"), from each chunk's forward outputs: the logits are never re-read.

    With ``reduction`` "mean" or "sum" the forward also computes the gradients (the upstream
    gradient of a scalar loss only scales them), so training costs the same three GEMMs as the
    unfused path. With "none", backward recomputes each chunk's logits (one more GEMM).
    """
    op = "linear_cross_entropy"
    ignore_index = -100 if ignore_index is None else ignore_index  # torch's None default
    check_float_tensor(op, "input", input)
    check_float_tensor(op, "linear_weight", linear_weight)
    check_options(op, reduction, label_smoothing, z_loss, softcap)
    check_ignore_index(op, ignore_index)
    if input.dim() == 0:
        raise ValueError(f"{op}: input must be (..., in_features), got a 0-d tensor")
    vocab = _check_linear_params(op, input, linear_weight, linear_bias, min_classes=0)
    hidden = input.shape[-1]
    target = class_index_target(op, target, input)
    if list(target.shape) != list(input.shape[:-1]):
        raise ValueError(
            f"{op}: target must have shape {list(input.shape[:-1])} (input's shape without "
            f"in_features), got {list(target.shape)}"
        )
    check_class_weight(op, weight, vocab, input)
    check_weight_not_differentiable(op, weight)
    if chunk_size is not None:
        _check_chunk_size(op, chunk_size)
    check_return_flags(op, return_z_loss, return_token_accuracy)
    logged = return_z_loss or return_token_accuracy
    if values_readable(input, target):
        check_target_values(op, target, vocab, ignore_index)

    rows = math.prod(target.shape)
    x = input.reshape(rows, hidden)
    rows_target = target.reshape(rows)
    if vocab == 0:  # as torch: every target ignored (see cross_entropy)
        logits = torch.nn.functional.linear(x, linear_weight, linear_bias)  # (N, 0)
        loss = zero_classes_loss(logits, rows_target, ignore_index, reduction, label_smoothing)
        loss = (loss.reshape(target.shape) if reduction == "none" else loss).to(input.dtype)
        if not logged:
            return loss
        lse = x.new_full((rows,), -math.inf, dtype=acc_dtype(input))  # no class
        correct = x.new_zeros((rows,), dtype=torch.bool)
        return logged_outputs(loss, lse, correct, rows_target, ignore_index, reduction, z_loss,
                              return_z_loss, return_token_accuracy, list(target.shape),
                              input.dtype)
    backend = get_backend()
    if IMPLS.select(input, backend) is None:
        out = ref.linear_cross_entropy_ref(
            x, linear_weight, rows_target, linear_bias, weight, ignore_index, reduction,
            label_smoothing, z_loss, softcap, return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy,
        )
        if not logged:
            return out.reshape(target.shape) if reduction == "none" else out
        if reduction == "none":
            out = tuple(None if t is None else t.reshape(target.shape) for t in out)
        return CrossEntropyOutput(*out)

    grad_on = torch.is_grad_enabled()
    need_input = grad_on and input.requires_grad
    need_weight = grad_on and linear_weight.requires_grad
    need_bias = grad_on and linear_bias is not None and linear_bias.requires_grad
    if chunk_size is None:
        chunk_size = default_chunk_size(
            rows, hidden, vocab, input.dtype,
            class_blocked=_class_blocked(x, backend, need_weight, need_bias),
            own_gemm=_own_gemm(x, linear_weight, linear_bias, backend),
        )
    loss, lse, correct, *_ = _linear_cross_entropy_fwd(
        x, linear_weight, linear_bias, rows_target, weight, ignore_index, reduction,
        float(label_smoothing), float(z_loss), float(softcap), chunk_size,
        need_input, need_weight, need_bias, not torch.compiler.is_compiling(), backend,
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    loss = loss.to(input.dtype)
    if not logged:
        return loss
    return logged_outputs(loss, lse, correct, rows_target, ignore_index, reduction, z_loss,
                          return_z_loss, return_token_accuracy, list(target.shape), input.dtype)
