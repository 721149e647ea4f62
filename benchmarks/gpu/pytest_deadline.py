"""A pytest plugin for a test run that must end by a wall-clock time (the GPU check's test
stage, benchmarks/gpu/check.py): once ``FASTLLM_TEST_DEADLINE`` (seconds since the epoch)
has passed, every test not yet started is skipped with the reason ``OUT_OF_TIME``, so the
run still ends normally and its report counts what ran. Works under pytest-xdist (each
worker reads the same deadline)."""

from __future__ import annotations

import os
import time

import pytest

ENV = "FASTLLM_TEST_DEADLINE"
OUT_OF_TIME = "out of time: the GPU check's test stage reached its deadline"


def pytest_runtest_setup(item):
    deadline = os.environ.get(ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(OUT_OF_TIME)
