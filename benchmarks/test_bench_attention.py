"""The attention cases of ``fastllm bench attention`` (fastllm.bench.attention), one test per
case and contender, grouped by case (parametrized and timed by conftest.py). Each contender
runs on contiguous tensors in its own layout: fastllm (B, T, H, D), torch's SDPA (B, H, T, D);
the masked cases give every contender the same (B, H, T, D) tensors and SDPA mask."""

import pytest

FAMILY = "attention"  # conftest.py runs the test on fastllm.bench.attention's cases


def test_attention(case, contender, time_case):
    try:
        time_case(case, contender)
    except NotImplementedError as exc:  # e.g. a backend whose kernels take no masks yet
        pytest.skip(f"n/a: {exc}")
