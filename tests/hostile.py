"""What the hostile-input suites (tests/test_<family>_hostile.py) share.

A hostile-input case is a bad argument given to a public function or to a raw op; it must
come back as a clear error: an exception of an expected type whose message names the
argument (and, where there is one, the expected and the actual value). Never a crash, a
hang, a wrong answer or an error from deep inside torch ("cannot reshape ...").

Cases that could crash the process (an out-of-bounds access in a kernel) run in a child
process (``run_isolated``), so that a crash fails one test instead of the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Callable, Iterable, Optional

import pytest

# Every backend a public function can run under, and the ones with raw ops.
PUBLIC_BACKENDS = ("native", "triton", "cuda_emu", "reference")
RAW_BACKENDS = ("native", "triton", "cuda_emu")

# What a clear error may be: what torch itself raises for bad arguments.
CLEAR_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)

# Messages that mean an argument went unchecked until something inside broke.
_UNCLEAR = (
    "cannot reshape",
    "division by zero",
    "out of bounds for dimension",
    "index out of range in self",
    "Cannot copy out of meta tensor",
    "range() arg",
    "The size of tensor a",
    "must match the size of tensor b",
    "shape '[",
    "is not implemented for",
    "object has no attribute",
    "'NoneType' object",
)


def expect_clear_error(
    fn: Callable[[], object],
    *words: str,
    errors: tuple[type[BaseException], ...] = CLEAR_ERRORS,
) -> BaseException:
    """Calls ``fn``; it must raise one of ``errors`` whose message contains every one of
    ``words`` (the argument's name, say) and none of the unclear phrases above."""
    with pytest.raises(errors) as info:
        fn()
    message = str(info.value)
    for word in words:
        assert word in message, f"error {type(info.value).__name__}: {message!r} lacks {word!r}"
    for phrase in _UNCLEAR:
        assert phrase not in message, f"unclear error: {message!r}"
    return info.value


def raw_ops(family, backend: str):
    """The OpSet of ``backend`` in ``family`` (an OpFamily), or skips naming why not."""
    reason = family.unavailable(backend)
    if reason is not None:
        pytest.skip(reason)
    return {"native": family.native, "triton": family.triton, "cuda_emu": family.emulated}[
        backend
    ]


def run_isolated(code: str, timeout: float = 300.0, env: Optional[dict] = None) -> str:
    """Runs ``code`` (Python, dedented) in a fresh interpreter with the test environment
    (TRITON_INTERPRET=1, the checkout on sys.path); asserts it exits 0 within ``timeout``
    seconds and returns its stdout. A crash (signal) or hang fails only the calling test."""
    child_env = dict(os.environ)
    child_env.setdefault("TRITON_INTERPRET", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.path.join(root, "tests"), child_env.get("PYTHONPATH")) if p
    )
    child_env.update(env or {})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True, text=True, timeout=timeout, env=child_env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"child process hung for more than {timeout} s")
    if proc.returncode != 0:
        pytest.fail(
            f"child process failed with exit status {proc.returncode}"
            + (f" (signal {-proc.returncode})" if proc.returncode < 0 else "")
            + f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def case_ids(cases: Iterable) -> list[str]:
    """pytest ids from the first element (a name) of each case tuple."""
    return [c[0] for c in cases]
