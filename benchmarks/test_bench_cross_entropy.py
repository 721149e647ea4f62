"""The cross-entropy cases of ``fastllm bench cross_entropy`` (fastllm.bench.cross_entropy),
one test per case and contender, grouped by case (parametrized and timed by conftest.py).
Linear + cross-entropy cases also time torch's chunked ``F.linear_cross_entropy``."""

FAMILY = "cross_entropy"  # conftest.py runs the test on fastllm.bench.cross_entropy's cases


def test_cross_entropy(case, contender, time_case):
    time_case(case, contender)
