"""The norm cases of ``fastllm bench norm`` (fastllm.bench.norm), one test per case and
contender, grouped by case (parametrized and timed by conftest.py)."""

FAMILY = "norm"  # conftest.py runs the test on fastllm.bench.norm's cases


def test_norm(case, contender, time_case):
    time_case(case, contender)
