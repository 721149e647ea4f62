"""The C++ unit tests of the torch-free kernel sources (tests/cpp, built by CMakeLists.txt
without Python or torch), run through CTest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_ctest_passes(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in (
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator],
        ["cmake", "--build", str(build)],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert "100% tests passed" in result.stdout
