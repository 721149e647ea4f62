"""Every loop of a block over its share of the work runs more than once, for every family's
emulated CUDA kernels, under random schedules, against the reference.

On a GPU a block takes several rows (or tiles) in turn only when the work outnumbers the
blocks; the kernel tests elsewhere use small inputs, on which most blocks see one row, so a
barrier that guards shared memory from one iteration to the next is never needed there
(deleting the second barrier of block_allreduce_mean_m2 in csrc/norm/norm.cu passed them all).
Here every such loop runs at least twice, and random thread schedules
(``fastllm._emu.schedule_seed``) let fast warps run into the next iteration while slow ones
still read the last one's shared memory.

How each family's loops are made to run twice:
  norm           the emulated launchers cap their grids (``fastllm._emu.grid_cap``,
                 CudaLaunch::max_blocks in csrc/common/torch_glue.h): with 2 blocks, the
                 forward's grid-stride loops and the backward's chunks of rows (register
                 kernel, row statistics, column tiles) each take >= 2 rows (warp-per-row
                 blocks: >= 2 groups of 4 rows) per block; without a cap and with > 8
                 partials the parameter-gradient reduction loops over its partials.
  cross_entropy  its launcher sizes a persistent grid from the emulated device's SM count (4,
                 csrc/common/simt_emu.cpp), which the cap does not reach: one wave is
                 4 SMs x 1280 resident threads / block size blocks, so the rows are chosen
                 to fill it twice (warp-per-row: 20 blocks x 8 rows; block-per-row: 40
                 blocks of 128 threads or 20 of 256).
  attention      one block per tile of queries (forward, dq) or keys (dk / dv) loops over
                 the other tiles: sequences of three tiles or more (64 rows; 32 for the dq
                 kernel's keys at D > 64 and the dk / dv kernel's queries at D = 128).
The grid cap is on for all three, so that a family whose launcher honours it later keeps
these tests meaningful with fewer rows.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import pytest
import torch

import fastllm
from fastllm.ops import FAMILIES
from tests.helpers import qkv
from tests.test_attention import check_against_reference
from tests.test_cross_entropy import check_case as check_cross_entropy
from tests.test_norm import KINDS, check_kind as check_norm

SEEDS = (1, 2)


@contextlib.contextmanager
def looping_emulation(family: str, seed: int, grid_cap: Optional[int] = 2) -> Iterator[None]:
    """The cuda_emu backend with the emulated grids capped at ``grid_cap`` blocks and the
    random schedule of ``seed``; skips, naming why, where ``family`` has no emulated ops."""
    from fastllm import _emu

    reason = FAMILIES[family].unavailable("cuda_emu")
    if reason is not None:
        pytest.skip(f"{family}: {reason}")
    with _emu.grid_cap(grid_cap), _emu.schedule_seed(seed), fastllm.use_backend("cuda_emu"):
        yield


# ------------------------------------------------------------------------------ norm
# (rows, cols, dtype): each kernel path of csrc/norm/norm.cu with a cap of 2 blocks.
NORM_CASES = {
    # one warp per row, 4 rows per block: 17 rows give each block >= 2 groups of rows
    "warp_rows_vector": (17, 40, torch.float32),
    "warp_rows_scalar": (17, 97, torch.bfloat16),  # 97 columns: element-wise accesses
    # one block of 128 threads per row (several warps: shared-memory reductions)
    "block_rows_128": (5, 1000, torch.bfloat16),
    "block_rows_256": (5, 4000, torch.float32),
    # rows too long for registers or not 16-byte accessible: the looped kernels
    # (Welford forward with block_allreduce_mean_m2; row statistics + column tiles backward)
    "looped_scalar": (5, 1031, torch.float16),
    "looped_vector": (3, 8200, torch.bfloat16),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_block_loops(emulated_cuda, case, seed):
    rows, cols, dtype = NORM_CASES[case]
    with looping_emulation("norm", seed):
        for kind in KINDS:
            check_norm(kind, (rows, cols), dtype, affine=True)


def test_norm_parameter_gradient_partials_loop(emulated_cuda):
    # No cap; 70 rows of 40: 18 partials of 4 rows (4 emulated SMs allow 32), so each of the
    # 8 slices of norm_bwd_param_grads_kernel adds 2 or 3 partials.
    with looping_emulation("norm", seed=1, grid_cap=None):
        check_norm("layer_norm", (70, 40), torch.float32, affine=True)
        check_norm("add_rms_norm", (70, 40), torch.bfloat16, affine=True)


# --------------------------------------------------------------------- cross_entropy
# (rows, vocab): two waves of the persistent grid on the 4-SM emulated device.
CROSS_ENTROPY_CASES = {
    "warp_rows": (321, 37),  # 20 blocks x 8 rows per wave
    "block_rows_128": (81, 1100),  # 40 blocks of 128 threads
    "block_rows_256": (41, 4099),  # 20 blocks of 256 threads
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", list(CROSS_ENTROPY_CASES))
def test_cross_entropy_block_loops(emulated_cuda, case, seed):
    rows, vocab = CROSS_ENTROPY_CASES[case]
    with looping_emulation("cross_entropy", seed):
        check_cross_entropy(rows, vocab, torch.bfloat16, "none", weighted=True,
                            label_smoothing=0.1)
        check_cross_entropy(rows, vocab, torch.float32, "mean", z_loss=1e-3, softcap=4.0)


# ------------------------------------------------------------------------- attention
# (B, Tq, Tk, H, Hkv, D), causal: >= 3 tiles along each loop; GQA (the dk / dv kernel sums
# the group's heads).
ATTENTION_CASES = {
    "d64": ((1, 130, 130, 2, 1, 64), False),
    "d128_causal": ((1, 70, 140, 2, 1, 128), True),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_block_loops(emulated_cuda, case):
    shape, causal = ATTENTION_CASES[case]
    with looping_emulation("attention", seed=1):
        check_against_reference(*qkv(*shape, torch.float16), causal=causal)
