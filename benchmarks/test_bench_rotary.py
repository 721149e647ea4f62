"""The rotary cases of ``fastllm bench rotary`` (fastllm.bench.rotary), one test per case and
contender, grouped by case (parametrized and timed by conftest.py)."""

FAMILY = "rotary"  # conftest.py runs the test on fastllm.bench.rotary's cases


def test_rotary(case, contender, time_case):
    time_case(case, contender)
