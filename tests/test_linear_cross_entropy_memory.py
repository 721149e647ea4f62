"""linear_cross_entropy's peak memory on the CPU: forward+backward holds the gradients, one
chunk of logits and (bfloat16) the class blocks' buffers, never an (N, V) or a second (V, H)
tensor (fastllm/ops/linear_cross_entropy.py, _ChunkedLinear). Measured as the benchmarks measure it
(fastllm.bench.common.peak_memory_bytes: the peak resident set size over one call), in a
fresh interpreter whose first call is not measured, so that one-time allocations (GEMM
kernels, the allocator's first arenas) do not count."""

from __future__ import annotations

import json

import pytest

from tests.hostile import run_isolated

MiB = 1 << 20
ROWS, HIDDEN, VOCAB, CHUNK = 512, 1024, 8192, 128
# dW is 8 (float32) or 4 (bfloat16) times the logits buffer here, so a second (V, H) tensor
# (a float32 dW sum, 32 MiB, or a bfloat16 dW product, 16 MiB) cannot hide in the slack;
# the slack covers the GEMM libraries' packing buffers (under 1 MiB measured here).
SLACK = 4 * MiB
# fastllm.ops.linear_cross_entropy.default_class_block(ROWS, HIDDEN, VOCAB), checked below
CLASS_BLOCK = 4096

_CHILD = f"""
import json, torch
import fastllm.functional as F
from fastllm.bench.common import peak_memory_bytes
from fastllm.ops import linear_cross_entropy as lce
torch.manual_seed(0)
peaks = {{"class_block": lce.default_class_block({ROWS}, {HIDDEN}, {VOCAB})}}
for name in ("float32", "bfloat16"):
    dtype = getattr(torch, name)
    x = torch.randn({ROWS}, {HIDDEN}).to(dtype).requires_grad_()
    w = (torch.randn({VOCAB}, {HIDDEN}) / {HIDDEN} ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, {VOCAB}, ({ROWS},))
    def call():
        loss = F.linear_cross_entropy(x, w, t, chunk_size={CHUNK})
        return torch.autograd.grad(loss, (x, w))
    call()  # one-time allocations
    peaks[name] = peak_memory_bytes(call, torch.device("cpu"))
print(json.dumps(peaks))
"""


@pytest.fixture(scope="module")
def peaks() -> dict:
    out = run_isolated(_CHILD, env={"OMP_NUM_THREADS": "1"})
    result = json.loads(out.strip().splitlines()[-1])
    if result["float32"] is None:
        pytest.skip("peak resident set size not measurable here (/proc/self/clear_refs)")
    return result


def test_float32_peak_is_gradients_and_one_chunk(peaks):
    gradients = (VOCAB + ROWS) * HIDDEN * 4  # dW, dX
    logits_buffer = CHUNK * VOCAB * 4
    bound = gradients + logits_buffer + SLACK
    assert peaks["float32"] <= bound, (
        f"float32 fwd+bwd peak {peaks['float32'] / MiB:.1f} MiB > dW + dX "
        f"{gradients / MiB:.1f} + one chunk of logits {logits_buffer / MiB:.1f} + slack "
        f"{SLACK / MiB:.0f} MiB"
    )


def test_bfloat16_peak_has_no_float32_dw_sum(peaks):
    """bfloat16 on the CPU kernels takes the class-blocked dW (_class_blocked): dW, dX and
    the class blocks' two buffers; the row chunks' logits live in dW's memory (CHUNK <=
    HIDDEN); never a float32 (V, H) sum (16 MiB more here) or a (V, H) product."""
    assert peaks["class_block"] == CLASS_BLOCK
    gradients = (VOCAB + ROWS) * HIDDEN * 2  # dW, dX
    block_buffers = 2 * ROWS * CLASS_BLOCK * 2  # the block's logits and their transpose
    bound = gradients + block_buffers + SLACK
    assert peaks["bfloat16"] <= bound, (
        f"bfloat16 fwd+bwd peak {peaks['bfloat16'] / MiB:.1f} MiB > dW + dX "
        f"{gradients / MiB:.1f} + class block buffers {block_buffers / MiB:.1f} + slack "
        f"{SLACK / MiB:.0f} MiB"
    )
