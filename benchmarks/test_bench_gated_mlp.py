"""The gated-MLP cases of ``fastllm bench mlp`` (fastllm.bench.gated_mlp), one test per case
and contender, grouped by case (parametrized and timed by conftest.py)."""

FAMILY = "mlp"  # conftest.py runs the test on fastllm.bench.gated_mlp's cases


def test_gated_mlp(case, contender, time_case):
    time_case(case, contender)
