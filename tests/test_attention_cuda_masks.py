"""The CUDA attention kernels' key-block skipping under a key padding mask, and dbias over
several blocks, under the SIMT emulation (backend "cuda_emu").

tests/test_attention_masks.py's shapes fit one key block (Tk < 64); these span 3-4 key blocks
of 64 (32 for the dq kernel at D > 64) with padding that leaves whole blocks without a key,
the first block included (the forward's prefetch jumps over them), odd and even Tk (dbias's
paired stores), and query blocks past 64 rows. Same accuracy rule (check_masked).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import generator, qkv
from tests.test_attention_masks import check_masked

FAMILY = "attention"


def holes_mask(batch: int, tk: int) -> torch.Tensor:
    """(B, Tk): sequence 0 keeps keys 0..30 and 150..170 only (a fully padded block between
    them), sequence 1 only its last key (every block before it padded), sequence 2 random."""
    gen = generator(11)
    mask = torch.zeros(batch, tk, dtype=torch.bool)
    mask[0, :31] = True
    mask[0, 150:171] = True
    mask[1, tk - 1] = True
    if batch > 2:
        mask[2] = torch.rand(tk, generator=gen) < 0.5
    return mask


CASES = {
    # (B, Tq, Tk, H, Hkv, D), dtype, bias shape, options
    "d32_full_bias": ((3, 70, 200, 2, 1, 32), torch.bfloat16, (3, 2, 70, 200), {}),
    "d64_odd_tk_causal": ((2, 70, 201, 2, 2, 64), torch.float16, (70, 201), dict(causal=True)),
    "d128_window_softcap": ((3, 24, 150, 2, 1, 128), torch.float16, (2, 1, 150),
                            dict(window_left=90, window_right=10, softcap=5.0)),
}


@pytest.mark.parametrize("backend", ["cuda_emu"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_key_blocks_are_skipped_exactly(backend, case):
    shape, dtype, bias_shape, kw = CASES[case]
    torch.manual_seed(12)
    q, k, v = qkv(*shape, dtype)
    bias = 2 * torch.randn(bias_shape, dtype=dtype)
    if bias.shape[-2] > 3:
        bias[..., 3, :] = float("-inf")  # a row with no finite score
    else:
        bias[..., 3] = float("-inf")  # a key excluded by the bias
    kpm = holes_mask(shape[0], shape[2])
    got = check_masked(q, k, v, bias=bias, kpm=kpm, **kw)
    for t in got:
        assert torch.isfinite(t).all()
