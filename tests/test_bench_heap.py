"""fastllm bench's C heap setting for its CPU subprocesses (fastllm.bench.common.HEAP_TUNABLES):
the environment it builds, what the header says, and that glibc obeys it -- a repeated pair of
16 MiB blocks is page-faulted afresh on every round under glibc's defaults (the heap trimmed
under it) and reuses resident memory under the bench's setting (a misspelt tunable, which
glibc ignores, fails this)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

from pathlib import Path

import pytest

from fastllm.bench import common
from fastllm.cli import main

REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
OURS = ":".join(f"{name}={value}" for name, value in common.HEAP_TUNABLES)

# Two 16 MiB blocks touched and freed three times, after one mmapped 16 MiB block was freed
# (which raises glibc's mmap threshold to 16 MiB and its trim threshold to 32 MiB); prints
# the page faults of each round's touching.
PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, resource
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    n = 16 << 20
    def touch():
        p = libc.malloc(n)
        libc.memset(p, 1, n)
        return p
    libc.free(touch())
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a, b = touch(), touch()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(b)
        libc.free(a)
    print(*faults)
""")


def _probe_faults(env: dict[str, str]) -> list[int]:
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return [int(x) for x in run.stdout.split()]


def test_kept_heap_env():
    base = {k: v for k, v in os.environ.items() if k != common.GLIBC_TUNABLES_ENV}
    assert common.kept_heap_env(base)[common.GLIBC_TUNABLES_ENV] == OURS
    assert common.GLIBC_TUNABLES_ENV not in base  # a copy, the argument unchanged
    other = {**base, common.GLIBC_TUNABLES_ENV: "glibc.cpu.x86_rep_stosb_threshold=4096"}
    assert (common.kept_heap_env(other)[common.GLIBC_TUNABLES_ENV]
            == "glibc.cpu.x86_rep_stosb_threshold=4096:" + OURS)
    users = {**base, common.GLIBC_TUNABLES_ENV: "glibc.malloc.arena_max=2"}
    assert common.kept_heap_env(users) == users  # the user's malloc setting stands


def test_system_heap_env():
    """system_heap_env: the malloc tunables out, the others kept; none left: no variable."""
    base = {k: v for k, v in os.environ.items() if k != common.GLIBC_TUNABLES_ENV}
    mixed = {**base, common.GLIBC_TUNABLES_ENV: "glibc.cpu.x86_rep_stosb_threshold=4096:" + OURS}
    assert common.system_heap_env(mixed) == {
        **base, common.GLIBC_TUNABLES_ENV: "glibc.cpu.x86_rep_stosb_threshold=4096"}
    assert mixed[common.GLIBC_TUNABLES_ENV].endswith(OURS)  # a copy, the argument unchanged
    assert common.system_heap_env(common.kept_heap_env(base)) == base
    assert common.system_heap_env(base) == base


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc tunables")
def test_heap_setting_says_what_holds(monkeypatch):
    monkeypatch.delenv(common.GLIBC_TUNABLES_ENV, raising=False)
    assert common.heap_setting().startswith("glibc's defaults (trimmed when 32 MiB")
    monkeypatch.setenv(common.GLIBC_TUNABLES_ENV, OURS)
    assert common.heap_setting().startswith(f"kept for every contender (GLIBC_TUNABLES={OURS}")
    monkeypatch.setenv(common.GLIBC_TUNABLES_ENV, "glibc.malloc.arena_max=2:glibc.cpu.x=1")
    assert common.heap_setting() == "as GLIBC_TUNABLES sets it: glibc.malloc.arena_max=2"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc tunables")
def test_glibc_keeps_the_heap_under_the_bench_setting():
    base = {k: v for k, v in os.environ.items() if k != common.GLIBC_TUNABLES_ENV}
    pages = (2 * (16 << 20)) // os.sysconf("SC_PAGE_SIZE")
    defaults = _probe_faults(base)
    kept = _probe_faults(common.kept_heap_env(base))
    # glibc's defaults: both blocks faulted afresh in every round (the heap trimmed)
    assert all(f >= pages * 0.9 for f in defaults), defaults
    # the bench's setting: faulted in the first round only
    assert kept[0] >= pages * 0.4 and kept[1] < pages * 0.05 and kept[2] < pages * 0.05, kept


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc tunables")
@pytest.mark.parametrize("call", ["posix_memalign", "torch.empty"])
def test_the_bench_setting_refits_torchs_aligned_blocks(call):
    """torch allocates with posix_memalign(64): in a fresh process under the bench's setting
    a freed 16 MiB block is refitted by the next one (faulted in the first round only), which
    glibc's thread cache and fast bins prevented (benchmarks/micro/heap_refit_probe.py)."""
    base = {k: v for k, v in os.environ.items() if k != common.GLIBC_TUNABLES_ENV}
    probe = REPO / "benchmarks" / "micro" / "heap_refit_probe.py"
    run = subprocess.run([sys.executable, str(probe), "--child", call, "16"],
                         env={**common.kept_heap_env(base), "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300, check=True)
    faults = [int(x) for x in run.stdout.split()]
    pages = (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults[0] >= pages * 0.9 and all(f < pages * 0.05 for f in faults[2:]), faults


def test_system_heap_and_in_process_conflict(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "norm", "--in-process", "--system-heap", "--quick"])
    assert exit_info.value.code == 2
    assert "--system-heap sets up the timing subprocesses" in capsys.readouterr().err
