"""The attention cases of ``fastllm bench attention`` (fastllm.bench.attention), one test per
case and contender, grouped by case (parametrized and timed by conftest.py). Each contender
runs on contiguous tensors in its own layout: fastllm (B, T, H, D), torch's SDPA (B, H, T, D)."""

FAMILY = "attention"  # conftest.py runs the test on fastllm.bench.attention's cases


def test_attention(case, contender, time_case):
    time_case(case, contender)
