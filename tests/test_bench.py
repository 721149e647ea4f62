"""``fastllm bench``, the runner and its command line, across families: a --quick run of two
small cases of every family through the real command line (``python -m fastllm``) times
every contender, every number is finite and positive, and the rows carry the THP setting the
process was started with (what the re-run of the page-fault-bound cases relies on); the
command line's own errors; and the contenders of the cross-entropy cases compute the same
loss and gradients. The models family (its own runner, fastllm.bench.models): a quick
training case with its eager contenders, in process (the command line's worker subprocesses
and torch.compile take minutes), and fastllm's and Hugging Face's models start from the same
loss."""

import fnmatch
import json
import logging
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from fastllm.bench import cross_entropy, load_family, models
from fastllm.bench.common import (
    COMPILE, EAGER, FASTLLM, THP_ENV, TimingBudget, _fmt, fill_ratios, resolve_backend, run_cases,
)
from fastllm.cli import COMMANDS, main
from fastllm.ops import cross_entropy as ce_ops

REPO = Path(__file__).resolve().parents[1]

native = pytest.mark.skipif(ce_ops.IMPLS.native is None, reason="fastllm._C not built")


def _fastllm(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastllm", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600,
    )


# family, --only patterns (each matches one --quick case), extra options, the rate columns
# of its rows, what its table's header shows
QUICK_RUNS = [
    pytest.param(
        "norm", ("layer_norm-fwd-*-float32", "add_rms_norm-fwd+bwd-*-bfloat16"),
        ("--statistic", "fastest"),
        ("gbs", "copy_gbs"), ("copy bandwidth ceiling",), id="norm",
    ),
    pytest.param(
        "cross_entropy", ("cross_entropy-fwd+bwd-*-bfloat16", "linear_cross_entropy-fwd+bwd-*-float32"),
        ("--backend", "native", "--no-thp-rerun"),
        ("gbs", "copy_gbs"), ("copy bandwidth ceiling",), id="cross_entropy", marks=native,
    ),
    pytest.param(
        "attention", ("attention-full-fwd-*-float32", "attention-causal-fwd+bwd-*-bfloat16"), (),
        ("gflops", "sgemm_gflops"), ("GFLOP/s", "float32 GEMM ceiling"), id="attention",
    ),
]


@pytest.mark.parametrize("family, patterns, options, rate_keys, header", QUICK_RUNS)
def test_bench_quick(tmp_path, family, patterns, options, rate_keys, header):
    out = tmp_path / "bench.json"
    only = [arg for pattern in patterns for arg in ("--only", pattern)]
    run = _fastllm(
        "bench", family, "--quick", "--device", "cpu", "--json", str(out), *options, *only,
        env={**os.environ, THP_ENV: "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]

    report = json.loads(out.read_text())
    results = report["results"]
    expected = [
        case for case in load_family(family).cases(quick=True)
        if any(fnmatch.fnmatchcase(case.id, pattern) for pattern in patterns)
    ]
    assert len(expected) == len(patterns)
    runs = [(case.id, contender) for case in expected for contender in case.contenders]
    assert [(r["case"], r["contender"]) for r in results] == runs
    for r in results:
        assert r["error"] is None, (r["case"], r["contender"], r["error"])
        for key in ("time_s", *rate_keys, "speedup_vs_eager", "speedup_vs_compile"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], r["contender"], key, r[key])
        if r["contender"] == EAGER:
            assert r["speedup_vs_eager"] == 1.0
        assert r["peak_memory_bytes"] is not None
    assert report["machine"]["copy_gbs"] > 0 and report["machine"]["first_touch_gbs"] > 0
    assert report["machine"]["thp"] == "on" and {r["thp"] for r in results} == {"on"}

    requested = options[options.index("--backend") + 1] if "--backend" in options else None
    backend, _ = resolve_backend(requested, torch.device("cpu"))
    assert report["backend"] == backend
    statistic = options[options.index("--statistic") + 1] if "--statistic" in options else "median"
    assert report["statistic"] == statistic and f"time: {statistic} of >= " in run.stdout
    for label in (f"fastllm[{backend}]", "torch eager", "torch.compile", *header):
        assert label in run.stdout
    # the subprocess ran with the bench's heap setting (tests/test_bench_heap.py)
    if platform.libc_ver()[0] == "glibc" and "glibc.malloc." not in os.environ.get(
            "GLIBC_TUNABLES", ""):
        assert report["machine"]["heap"].startswith("kept for every contender")
        assert "C heap (glibc malloc) in this run: kept for every contender" in run.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastllm")
    for command in COMMANDS:
        assert command in err
    assert "error: no command given; choose one of: " + ", ".join(COMMANDS) in err


def assert_usage_error(capsys, argv: list[str], message: str) -> None:
    """``fastllm ARGV`` exits with status 2 (argparse's usage error) and says ``message``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_usage_errors(capsys):
    assert_usage_error(capsys, ["bench", "no_such_family"],
                       "benchmark family must be one of norm, cross_entropy, attention")
    assert_usage_error(capsys, ["bench", "norm", "--only", "no-such-case"],
                       "no case matches --only no-such-case")
    assert_usage_error(capsys, ["bench", "models", "norm"], "models runs alone")
    assert_usage_error(capsys, ["bench", "models", "--quick", "--only", "no-such-case"],
                       "no case matches --only no-such-case")


def test_bench_contenders_filter(tmp_path, capsys):
    """--contenders keeps the contenders whose name matches a pattern (the GPU check times
    the Triton backend alone this way), and refuses a pattern that matches none."""
    out = tmp_path / "bench.json"
    assert main(["bench", "norm", "--quick", "--device", "cpu", "--no-thp-rerun", "--in-process",
                 "--only", "rms_norm-fwd-*-float32", "--contenders", "fastllm",
                 "--contenders", "torch e*", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["contender"] for r in rows] == ["fastllm", EAGER]
    assert rows[0]["speedup_vs_eager"] > 0 and rows[0]["speedup_vs_compile"] is None
    assert_usage_error(capsys, ["bench", "norm", "--quick", "--device", "cpu", "--contenders",
                                "liger"],
                       "--contenders liger matches none of this run's contenders on cpu: "
                       "fastllm, torch eager, torch.compile")


def test_bench_processes(tmp_path, capsys):
    """--processes 2 times the cases in two fresh processes and shows, per row, the median
    time and the median of the processes' own speedups with their range; 0 is refused."""
    out = tmp_path / "bench.json"
    assert main(["bench", "norm", "--quick", "--device", "cpu", "--no-thp-rerun",
                 "--only", "rms_norm-fwd-*-float32", "--processes", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [r["contender"] for r in rows] == ["fastllm", EAGER, COMPILE]
    for r in rows:
        assert r["error"] is None and r["processes"] == 2, r
        assert r["time_s"] > 0 and r["repeats"] >= 2 * 3  # both processes' timed calls
        for key in ("speedup_vs_eager", "speedup_vs_compile"):
            low, high = r[key + "_range"]
            assert 0 < low <= r[key] <= high, (r["contender"], key, low, r[key], high)
    assert rows[1]["speedup_vs_eager"] == 1.0 and rows[1]["speedup_vs_eager_range"] == [1.0, 1.0]
    fastllm_row = next(line for line in table.splitlines() if "fastllm[" in line)
    low, high = rows[0]["speedup_vs_eager_range"]
    assert f"({_fmt(low)}-{_fmt(high)})" in fastllm_row or low == high, fastllm_row
    assert "--processes 2: each case timed in 2 fresh processes" in table
    assert_usage_error(capsys, ["bench", "norm", "--quick", "--processes", "0"],
                       "--processes must be at least 1, got 0")
    assert_usage_error(capsys, ["bench", "models", "--quick", "--processes", "2"],
                       "models has its own runner")


def test_bench_runs_each_family_in_a_fresh_process(tmp_path, capsys, caplog):
    """By default each family's cases run in a fresh process of their own (which a contender
    that crashes it cannot take the run down with), shown as a plain single-process run; with
    --in-process in this one; the two do not combine with --processes N or the models."""
    out = tmp_path / "bench.json"
    with caplog.at_level(logging.INFO, logger="fastllm"):
        assert main(["bench", "norm", "mlp", "--quick", "--device", "cpu", "--no-thp-rerun",
                     "--only", "rms_norm-fwd-*-float32", "--only", "swiglu-fwd-*-float32",
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert [m for m in caplog.messages if "fresh process" in m] == [
        "norm: timing 1 cases in a fresh process", "mlp: timing 1 cases in a fresh process"]
    rows = json.loads(out.read_text())["results"]
    assert [(r["family"], r["contender"]) for r in rows] == [
        (family, n) for family in ("norm", "mlp") for n in ("fastllm", EAGER, COMPILE)]
    for r in rows:
        assert r["error"] is None and r["processes"] == 1 and r["speedup_vs_eager"] > 0, r
        assert r["speedup_vs_eager_range"][0] == r["speedup_vs_eager_range"][1], r
    assert "fresh processes" not in table and " (" not in table.split("== norm ==")[1]
    assert_usage_error(capsys, ["bench", "norm", "--quick", "--in-process", "--processes", "2"],
                       "--in-process times the cases in this one process; --processes 2 asks "
                       "for 2 fresh ones")
    assert_usage_error(capsys, ["bench", "models", "--quick", "--in-process"],
                       "--in-process times the op families in this process; models has its "
                       "own runner")


def test_processes_isolate_a_contender_that_kills_its_process():
    """--processes: a process that dies without results costs only the rows it takes down
    (run._run_isolating, here over a stand-in for the subprocess that "dies" whenever
    torch.compile runs the second case): its cases again one per process, then that case
    once per contender alone and its survivors together; the killer's row is FAILED with its
    process's error, every other row is timed, and ratios come from the survivors' process."""
    from fastllm.bench.common import CPU, FASTLLM, Result
    from fastllm.bench.norm import cases
    from fastllm.bench.run import _run_isolating

    first, second = cases(quick=True)[:2]
    calls = []

    def run(run_cases, contenders, what):
        calls.append(([c.id for c in run_cases], contenders))
        names = [n for c in run_cases for n in c.contenders_on(CPU)
                 if not contenders or any(fnmatch.fnmatchcase(n, p) for p in contenders)]
        if second in run_cases and COMPILE in names:
            return [Result.of("norm", c, n, backend="native", device="cpu", thp="off",
                              error=f"{what} exited with status -6") for c in run_cases
                    for n in c.contenders_on(CPU)
                    if not contenders or any(fnmatch.fnmatchcase(n, p) for p in contenders)
                    ], None, None
        rows = [Result.of("norm", c, n, backend="native", device="cpu", thp="off",
                          time_s=1.0, speedup_vs_eager=1.0)
                for c in run_cases for n in c.contenders_on(CPU) if n in names]
        return rows, "machine", None

    rows, machine, _ = _run_isolating(run, [first, second], CPU, None, "process 1")
    assert machine == "machine"
    assert [(r.case, r.contender) for r in rows] == [
        (c.id, n) for c in (first, second) for n in (FASTLLM, EAGER, COMPILE)]
    failed = [r for r in rows if r.error is not None]
    assert [(r.case, r.contender) for r in failed] == [(second.id, COMPILE)]
    assert failed[0].error == ("process 1, " + second.id + " alone, torch.compile alone exited "
                               "with status -6 (the other rows were timed without it)")
    assert calls == [
        ([first.id, second.id], None),  # the first process dies
        ([first.id], None), ([second.id], None),  # one case per process: the second dies
        ([second.id], ["fastllm"]), ([second.id], ["torch eager"]),
        ([second.id], ["torch.compile"]),  # each contender alone: torch.compile dies
        ([second.id], ["fastllm", "torch eager"]),  # the survivors together
    ]
    # --contenders left one contender: no one else to time, the failure stands and no
    # process gave results
    calls.clear()
    rows, machine, _ = _run_isolating(run, [second], CPU, [COMPILE], "process 2")
    assert machine is None and [r.contender for r in rows] == [COMPILE]
    assert calls == [([second.id], [COMPILE])]

    # a crash that comes and goes (heap corruption): every contender survives alone, so the
    # case is timed together once more, and that run's rows stand
    deaths = iter([True])

    def flaky(run_cases, contenders, what):
        calls.append(([c.id for c in run_cases], contenders))
        if next(deaths, False):
            return [Result.of("norm", c, n, backend="native", device="cpu", thp="off",
                              error=f"{what} died") for c in run_cases
                    for n in c.contenders_on(CPU)], None, None
        names = [n for n in run_cases[0].contenders_on(CPU)
                 if not contenders or any(fnmatch.fnmatchcase(n, p) for p in contenders)]
        return [Result.of("norm", run_cases[0], n, backend="native", device="cpu", thp="off",
                          time_s=1.0) for n in names], "machine", None

    calls.clear()
    rows, machine, _ = _run_isolating(flaky, [second], CPU, None, "process 3")
    assert machine == "machine" and [r.error for r in rows] == [None, None, None]
    assert calls[-1] == ([second.id], None) and len(calls) == 5  # died, 3 alone, again


def test_process_per_case_times_each_case_in_a_process_of_its_own(capsys):
    """--process-per-case: every round times each case in a process of its own (a stand-in
    for the subprocess records what each process got), the results in the cases' order;
    without it each round is one process for all; it does not combine with --in-process or
    the models."""
    from fastllm.bench.common import CPU, Result
    from fastllm.bench.norm import cases
    from fastllm.bench.run import _time_family

    first, second = cases(quick=True)[:2]
    calls = []

    def run(run_cases, contenders, what):
        calls.append(([c.id for c in run_cases], what))
        rows = [Result.of("norm", c, n, backend="native", device="cpu", thp="off", time_s=1.0)
                for c in run_cases for n in c.contenders_on(CPU)]
        return rows, f"machine {len(calls)}", None

    runs, machine, other = _time_family(run, [first, second], CPU, None, 2, per_case=True)
    assert machine == "machine 1" and other is None
    assert calls == [([first.id], f"({first.id}) in fresh process 1 of 2"),
                     ([second.id], f"({second.id}) in fresh process 1 of 2"),
                     ([first.id], f"({first.id}) in fresh process 2 of 2"),
                     ([second.id], f"({second.id}) in fresh process 2 of 2")]
    assert len(runs) == 2
    for rows in runs:
        assert [r.case for r in rows] == [first.id] * 3 + [second.id] * 3
    calls.clear()
    runs, _, _ = _time_family(run, [first, second], CPU, None, 1, per_case=False)
    assert calls == [([first.id, second.id], "in a fresh process")] and len(runs[0]) == 6
    assert_usage_error(capsys, ["bench", "norm", "--quick", "--in-process",
                                "--process-per-case"],
                       "--in-process times the cases in this one process; --process-per-case "
                       "asks for a fresh one per case")
    assert_usage_error(capsys, ["bench", "models", "--quick", "--process-per-case"],
                       "--process-per-case times the op families' cases; models has its own "
                       "runner")


def test_touch_floor_column():
    """% touch: the first touch of a row's required results of 32 MiB or more (fresh pages
    every call) at the measured rate, against the row's time; smaller results, a GPU, or
    no rate give none; cross-entropy's in-place variant returns no gradient, so none; the
    column shows only where some row has a floor, '-' on the others."""
    from fastllm.bench.common import MiB, Result, results_table, touch_floor_seconds
    from fastllm.bench.cross_entropy import FASTLLM_INPLACE_BACKWARD, CrossEntropyCase

    assert touch_floor_seconds(torch.device("cpu"), (64 * MiB, 16 * MiB), 2.0) == 64 * MiB / 2e9
    assert touch_floor_seconds(torch.device("cpu"), (32 * MiB, 16 * MiB), 2.0) == 32 * MiB / 2e9
    assert touch_floor_seconds(torch.device("cpu"), (31 * MiB, 16 * MiB), 2.0) is None
    assert touch_floor_seconds(torch.device("cpu"), (64 * MiB,), None) is None
    assert touch_floor_seconds(torch.device("cuda"), (64 * MiB,), 2.0) is None
    case = CrossEntropyCase("cross_entropy", "fwd+bwd", (4096, 32000), torch.float32)
    assert case.required_output_sizes(FASTLLM) == (4096 * 32000 * 4,)
    assert case.required_output_sizes(FASTLLM_INPLACE_BACKWARD) == ()
    assert CrossEntropyCase("cross_entropy", "fwd", (4096, 32000),
                            torch.float32).required_output_sizes(FASTLLM) == ()

    def row(name: str, floor: Optional[float]) -> Result:
        return Result(family="cross_entropy", case="c", params={"op": "ce"}, contender=name,
                      label=name, device="cpu", thp="off", time_s=0.2, bytes_moved=10**9,
                      touch_floor_s=floor)

    rows = [row(FASTLLM, 0.15), row(FASTLLM_INPLACE_BACKWARD, None)]
    fill_ratios(rows)
    lines = results_table(rows, ["op"]).splitlines()
    assert "% touch" in lines[0]
    column = lines[0].index("% touch") + len("% touch")
    assert lines[2][:column].endswith("75%") and lines[3][:column].endswith("-"), lines
    assert "% touch" not in results_table([row(FASTLLM, None)], ["op"])


def test_merge_processes():
    """merge_processes: per row the median time, all the repeats, the largest peak, the
    median and range of the processes' own speedups; a failure in one process is kept."""
    from fastllm.bench.common import Result, merge_processes

    def run(times: dict[str, float], peak: int, error: Optional[str] = None) -> list[Result]:
        failed = {COMPILE} if error else set()
        rows = [Result(family="norm", case="c", params={}, contender=name, label=name,
                       device="cpu", thp="off", time_s=None if name in failed else t,
                       repeats=0 if name in failed else 5, bytes_moved=10**9,
                       peak_memory_bytes=peak, error=error if name in failed else None)
                for name, t in times.items()]
        fill_ratios(rows)
        return rows

    runs = [run({"fastllm": 1.0, EAGER: 2.0, COMPILE: 3.0}, 10),
            run({"fastllm": 3.0, EAGER: 3.0, COMPILE: 3.0}, 30),
            run({"fastllm": 2.0, EAGER: 5.0, COMPILE: 3.0}, 20, error="broke")]
    fastllm_row, eager_row, compile_row = merge_processes(runs)
    assert fastllm_row.time_s == 2.0 and fastllm_row.repeats == 15 and fastllm_row.processes == 3
    assert fastllm_row.peak_memory_bytes == 30 and fastllm_row.gbs == 0.5  # of the median time
    assert fastllm_row.speedup_vs_eager == 2.0 and fastllm_row.speedup_vs_eager_range == [1.0, 2.5]
    assert eager_row.time_s == 3.0 and eager_row.speedup_vs_eager == 1.0
    assert compile_row.error == "broke" and compile_row.processes == 3
    # against torch.compile: 3/1 and 3/3 (the third process has no torch.compile time)
    assert fastllm_row.speedup_vs_compile == 2.0
    assert fastllm_row.speedup_vs_compile_range == [1.0, 3.0]


def test_pytest_benchmark_suite_runs_its_quick_cases(tmp_path):
    """benchmarks/ (pytest-benchmark) builds its tests from the same cases: one quick case
    of two families runs there, fastllm's row records its path, and --bench-shapes
    collects the LLaMA-3-8B cases."""
    out = tmp_path / "bench-suite.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/",
         "--bench-quick", "-k", "rms_norm-fwd-256x512-float32 or swiglu-fwd-256x1024-float32",
         "--benchmark-json", str(out), "--benchmark-min-rounds=1", "--benchmark-max-time=0.01"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["benchmarks"]
    assert sorted({r["extra_info"]["contender"].split("[")[0] for r in rows}) == [
        "fastllm", "torch eager", "torch.compile"]
    assert all(r["extra_info"]["path"] for r in rows if r["extra_info"]["contender"].startswith("fastllm"))
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/",
         "--bench-shapes", "llama3-8b", "--collect-only"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert collected.returncode == 0 and "1x32x4096x128" in collected.stdout


def test_python_m_fastllm_help():
    run = _fastllm("bench", "--help", env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    for option in ("--quick", "--json", "--only", "--device", "--backend", "--processes",
                   "--no-thp-rerun"):
        assert option in run.stdout


@native
@pytest.mark.parametrize(
    "case", [c for c in cross_entropy.cases(quick=True) if c.dtype == torch.float32],
    ids=lambda c: c.id,
)
def test_cross_entropy_contenders_agree(case):
    """float32 only: in bfloat16 torch's own CPU cross-entropy is off by several percent
    (tests/test_cross_entropy.py measures every backend against that error instead)."""
    inputs = case.make_inputs(torch.device("cpu"))
    results = {}
    for contender in case.contenders:
        if contender == COMPILE:
            continue  # compiles for seconds; the command-line run above covers it
        fn = case.function(contender, "native")
        own = case.contender_inputs(contender, inputs)
        loss = fn(*own.args)
        grads = torch.autograd.grad(loss, own.differentiable) if case.backward else ()
        results[contender] = (loss.detach(), grads)
    (ref_loss, ref_grads), *others = results.values()
    for loss, grads in others:
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-3)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=2e-2, atol=2e-4)


@native
def test_cross_entropy_inplace_backward_row():
    """fastllm's inplace_backward row runs on the timed backend with its path, gets its own
    copy of the logits (the other contenders' stay as they were, bit for bit) and needs no
    fresh (N, V) gradient: its peak memory is below fastllm's default row's."""
    case = next(c for c in cross_entropy.cases(quick=True)
                if c.op == "cross_entropy" and c.backward and c.dtype == torch.float32)
    inputs = case.make_inputs(torch.device("cpu"))
    original = inputs.args[0].detach().clone()
    call = case.build(cross_entropy.FASTLLM_INPLACE_BACKWARD, inputs, "native")
    call()
    call()
    assert torch.equal(inputs.args[0], original)
    budget = TimingBudget(warmup_s=0.0, min_repeats=1, min_time_s=0.0, max_repeats=1)
    results = {r.contender: r for r in run_cases(
        "cross_entropy", [case], kernel_family="cross_entropy", device=torch.device("cpu"),
        backend="native", budget=budget, copy_gbs=1.0, contenders=["fastllm*"])}
    assert list(results) == [FASTLLM, cross_entropy.FASTLLM_INPLACE_BACKWARD]
    inplace = results[cross_entropy.FASTLLM_INPLACE_BACKWARD]
    assert inplace.error is None and inplace.time_s > 0
    assert inplace.label == "fastllm[native] inplace_backward"
    assert inplace.path == results[FASTLLM].path and inplace.path in ("avx512", "avx2", "scalar")
    gradient_bytes = math.prod(case.shape) * 4
    assert inplace.peak_memory_bytes < gradient_bytes / 2 <= results[FASTLLM].peak_memory_bytes


# ----- the models family ----------------------------------------------------------------

transformers_needed = pytest.mark.skipif(
    models.missing_dependencies(models.cases(quick=True)[0]) is not None,
    reason="transformers is not installed (the Hugging Face contenders)",
)


@transformers_needed
def test_models_quick_train_case_eager():
    """The quick GPT float32 training case, fastllm eager against HF eager, through the
    worker's code path: every number is finite and positive, the ratios, the floors and the
    table come out."""
    case = next(c for c in models.cases(quick=True)
                if isinstance(c, models.TrainCase) and c.model == "gpt" and c.dtype == "float32")
    backend, _ = resolve_backend(None, torch.device("cpu"))
    records = models.run_worker(case, backend, only=(models.FASTLLM_EAGER, models.HF_EAGER))
    assert [r["contender"] for r in records] == [models.FASTLLM_EAGER, models.HF_EAGER]
    models.fill_ratios(case, records, copy_gbs=10.0)
    for r in records:
        assert r["error"] is None, r
        for key in ("time_s", "tokens_per_s", "resting_state_bytes", "total_peak_bytes",
                    "vs_hf_eager"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["contender"], key, r[key])
        assert r["step_peak_bytes"] is not None and r["step_peak_bytes"] >= 0
        assert r["tokens_per_s"] == pytest.approx(case.tokens / r["time_s"])
    assert records[1]["vs_hf_eager"] == 1.0
    checks = models.floor_checks(case, records)
    speed = [c for c in checks if c["what"].startswith(models.FASTLLM_EAGER + " tokens/s")]
    assert len(speed) == 1 and speed[0]["floor"] == 1.3 and speed[0]["passed"] is not None
    compiled = [c for c in checks if c["what"].startswith(models.FASTLLM_COMPILE)]
    assert compiled[0]["value"] is None and compiled[0]["passed"] is None  # not run here
    table = models._train_table([(case, records)])
    assert "fastllm eager" in table and "HF eager" in table and "tokens/s" in table


@transformers_needed
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_models_same_weights_same_loss(arch):
    """The training contenders start from the same weights: fastllm's fused loss equals
    Hugging Face's full-logits loss (float32)."""
    case = next(c for c in models.cases(quick=True)
                if isinstance(c, models.TrainCase) and c.model == arch and c.dtype == "float32")
    ours, theirs = models.build_train_models(case)
    ids = torch.randint(0, ours.config.vocab_size, (case.batch, case.seq),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(input_ids=ids, labels=ids).loss
        b = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bench_patch_quick_train_case():
    """fastllm bench patch: one quick training case runs both contenders and the floors
    read their records."""
    pytest.importorskip("transformers")
    from fastllm.bench import patch as bench_patch

    case = bench_patch._train_case("llama", "float32", quick=True)
    names = [r["contender"] for r in case["records"]]
    assert names == [bench_patch.UNPATCHED, bench_patch.PATCHED]
    assert all(r["tokens_per_s"] > 0 and r["time_s"] > 0 for r in case["records"])
    assert case["patched"]["rotary"] == 2 and case["patched"]["fused_lm_loss"] == 1
    lines = bench_patch.floor_checks([case])
    assert len(lines) == 2 and all(("PASS" in l) or ("MISS" in l) for l in lines)


def test_gemm_ceiling_size_bounds_a_slow_dtype():
    """The GEMM ceiling's product is halved while its time, estimated from a 256 probe, is
    over the limit (a dtype without matrix hardware: torch's reference loop took a minute per
    2048 float16 product), never below the probe's size; a GPU keeps its size; the header
    names each dtype's size."""
    from fastllm.bench.common import (
        CPU, GEMM_PROBE_SIZE, Machine, TimingBudget, gemm_ceiling_size, gemm_size,
    )
    from fastllm.bench.run import _header

    assert gemm_ceiling_size(CPU, torch.float32, max_call_s=1e-9) == GEMM_PROBE_SIZE
    assert gemm_ceiling_size(CPU, torch.float32, max_call_s=1e9) == gemm_size(CPU) == 2048
    # off the CPU no probe runs (no GPU is touched): the device's size
    cuda = torch.device("cuda")
    assert gemm_ceiling_size(cuda, torch.float16, max_call_s=1e-9) == gemm_size(cuda) == 8192
    machine = Machine(device="cpu", device_name="x", torch_version="t", threads=1, thp="off",
                      kernel_thp_mode="never", copy_gbs=10.0, first_touch_gbs=2.0,
                      gemm_gflops={"float32": 100.0, "float16": 2.5},
                      gemm_n={"float32": 2048, "float16": 512})
    header = _header(machine, None, "native", TimingBudget.quick(), "")
    assert "float32 GEMM ceiling (torch.mm of 2048 x 2048 float32 matrices" in header
    assert "float16 GEMM ceiling (torch.mm of 512 x 512 float16 matrices" in header


def test_contenders_are_timed_in_alternation():
    """time_interleaved calls the contenders of a case in turn, one call each per round, each
    until its own share of the timing rule is met; a contender that raises leaves the rounds
    with its exception and the others still get their samples."""
    from fastllm.bench.common import Timing, TimingBudget, time_interleaved

    order: list[str] = []

    def contender(name: str, fail_on: int = 0):
        def call() -> None:
            order.append(name)
            if fail_on and order.count(name) == fail_on:
                raise RuntimeError(f"{name} broke")
        return call

    budget = TimingBudget(warmup_s=0.0, min_repeats=4, min_time_s=0.0, max_repeats=10)
    timings = time_interleaved(
        [contender("a"), contender("b", fail_on=2), contender("c")], torch.device("cpu"), budget)
    assert order == ["a", "b", "c", "a", "b", "c", "a", "c", "a", "c"]
    assert isinstance(timings[1], RuntimeError) and "b broke" in str(timings[1])
    for timing in (timings[0], timings[2]):
        assert isinstance(timing, Timing) and timing.repeats == 4 and timing.median_s >= 0


def test_statistic_reports_the_median_or_the_fastest_call(monkeypatch):
    """Timing keeps the median and the fastest of a contender's timed calls; the budget's
    statistic (``fastllm bench --statistic``) decides which one its row reports; an unknown
    statistic is refused by name."""
    from fastllm.bench import common, load_family

    seconds = iter([0.005, 0.001, 0.009, 0.002, 0.003])
    monkeypatch.setattr(common, "_call_seconds", lambda call, device: next(seconds))
    budget = TimingBudget(warmup_s=0.0, min_repeats=5, min_time_s=0.0, max_repeats=5)
    (timing,) = common.time_interleaved([lambda: None], torch.device("cpu"), budget)
    assert (timing.median_s, timing.fastest_s, timing.repeats) == (0.003, 0.001, 5)
    assert timing.seconds("median") == 0.003 and timing.seconds("fastest") == 0.001
    monkeypatch.undo()

    case = next(c for c in load_family("norm").cases(quick=True)
                if fnmatch.fnmatchcase(c.id, "rms_norm-fwd-*-float32"))
    fixed = common.Timing(median_s=0.002, fastest_s=0.001, repeats=7)
    monkeypatch.setattr(common, "time_interleaved",
                        lambda calls, device, budget: [fixed for _ in calls])
    for statistic, expected in (("median", 0.002), ("fastest", 0.001)):
        results = run_cases("norm", [case], kernel_family="norm", device=torch.device("cpu"),
                            backend="reference", copy_gbs=1.0, contenders=[EAGER],
                            budget=TimingBudget(0.0, 1, 0.0, 1, statistic=statistic))
        assert [(r.contender, r.time_s, r.repeats) for r in results] == [(EAGER, expected, 7)]
    with pytest.raises(ValueError, match=r"statistic must be one of median, fastest; "
                                         r"got 'mean'"):
        TimingBudget(0.0, 1, 0.0, 1, statistic="mean")


def test_attention_decode_rows_name_the_decode_kernels_path():
    """The decode cases run the CPU decode kernel (csrc/attention/attention_cpu.cpp,
    decode_with_best: AVX-512 or AVX2), not the tile or vdpbf16ps paths that the family takes
    for their dtype elsewhere: their rows name the decode kernel's path."""
    from fastllm.bench.attention import decode_cases

    case = decode_cases(quick=True)[0]
    expected = {"amx-bf16": "avx512", "amx-fp16": "avx512", "amx-bf16x6": "avx512",
                "avx512-bf16": "avx512", "avx512": "avx512", "avx2": "avx2",
                "scalar": "scalar"}
    assert {path: case.kernel_path(path) for path in expected} == expected


@pytest.mark.parametrize("family", ["norm", "cross_entropy", "attention", "mlp", "rotary"])
def test_fastllm_rows_take_no_first_touch_floor_for_cached_outputs(family, monkeypatch):
    """The native CPU kernels take their large outputs from the output cache, so a fastllm
    row's results are no fresh pages (no `% touch` floor); torch's rows keep theirs, and so
    do linear cross-entropy's dX / dW (allocated outside the cache) and results above the
    cache's limit."""
    from fastllm import _native

    if not _native.AVAILABLE:
        pytest.skip("needs fastllm._C")
    cpu = torch.device("cpu")
    for case in load_family(family).cases(quick=True):
        required = case.required_output_sizes(FASTLLM)
        assert case.fresh_output_sizes(EAGER, "native", cpu) == case.required_output_sizes(EAGER)
        assert case.fresh_output_sizes(FASTLLM, "reference", cpu) == required
        cached = required if getattr(case, "linear", False) else ()
        assert case.fresh_output_sizes(FASTLLM, "native", cpu) == cached, case.id
    # a limit below every result (a block larger than the limit is never kept)
    from fastllm.bench import common

    monkeypatch.setattr(common, "cpu_output_cache_limit", lambda backend, device: 1)
    for case in load_family(family).cases(quick=True):
        required = case.required_output_sizes(FASTLLM)
        assert case.fresh_output_sizes(FASTLLM, "native", cpu) == required, case.id
