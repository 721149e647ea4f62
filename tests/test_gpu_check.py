"""The GPU check (benchmarks/gpu/run.sh, benchmarks/gpu/check.py): its dry run passes on this
machine, and the parts that turn a GPU run's output into the report — ptxas's figures,
pytest's JUnit report, the sanitizer summary, the targets, the markdown and the files —
are right on recorded or made-up inputs. The GPU run itself needs a GPU; what can run here
(the sanitizer's calls on the CPU kernels, the deadline plugin, the test collection under
FASTLLM_TEST_DEVICE=cuda) runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "benchmarks" / "gpu"


def _load(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load("fastllm_gpu_check", GPU_DIR / "check.py")
sanitize_calls = _load("fastllm_gpu_sanitize_calls", GPU_DIR / "sanitize_calls.py")
report = _load("fastllm_gpu_report", GPU_DIR / "report.py")

NO_GPU = not torch.cuda.is_available()


def _env(**extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("FASTLLM_CHECK_BOUNDS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.mark.skipif(not NO_GPU, reason="the dry run's 'no GPU' ending needs a machine without one")
def test_dry_run_passes_and_says_no_gpu():
    done = subprocess.run(["bash", str(GPU_DIR / "run.sh"), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT, env=_env(PYTHON=sys.executable), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.rstrip().endswith("no GPU: dry run only")
    for stage in ("build", "tests", "sanitizer", "bench", "models"):
        assert f"[{stage}: dry-run" in out, f"stage {stage} not dry-run:\n{out[-3000:]}"
    # the plan names what a GPU run would do
    assert "setup.py build_ext --inplace" in out
    assert "FASTLLM_TEST_DEVICE=cuda" in out and "tests collected" in out
    assert "--tool memcheck" in out and "--tool racecheck" in out
    assert "fastllm bench attention --device cuda --backend native" in out
    assert "fastllm bench models --device cuda" in out


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_without_a_gpu_a_real_run_refuses():
    done = subprocess.run([sys.executable, str(GPU_DIR / "check.py"), "--stages", "tests"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert done.returncode == 2
    assert "no GPU" in done.stderr and "--dry-run" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--stages", "build,bogus"], "unknown stage 'bogus'"),
    (["--budget", "0"], "--budget must be a positive number of seconds, got 0"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        check.parse_args(argv)
    assert message in capsys.readouterr().err


# Lines as nvcc -Xptxas=-v printed them in a build of csrc/ for sm_90 (trimmed names), plus
# a non-entry function's properties (which must not be taken for the entry's) and a spill.
PTXAS_LOG = textwrap.dedent("""\
    [44/52] /usr/local/cuda/bin/nvcc -c csrc/norm/norm.cu -o norm.o
    ptxas info    : 0 bytes gmem
    ptxas info    : Compiling entry function '_ZN7fastllm4norm25norm_bwd_registers_kernelI6__halfLi8ELi2ELi512EEEvNS0_7BwdArgsIT_EE' for 'sm_90'
    ptxas info    : Function properties for _ZN7fastllm4norm25norm_bwd_registers_kernelI6__halfLi8ELi2ELi512EEEvNS0_7BwdArgsIT_EE
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 120 registers, used 1 barriers, 128 bytes smem
    ptxas info    : Compile time = 27.755 ms
    ptxas info    : Function properties for _Z6helperv
        64 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
    ptxas info    : Compiling entry function '_ZN7fastllm13cross_entropy24cross_entropy_fwd_kernelIfLb1EEEvv' for 'sm_90'
    ptxas info    : Function properties for _ZN7fastllm13cross_entropy24cross_entropy_fwd_kernelIfLb1EEEvv
        16 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
    ptxas info    : Used 48 registers, used 0 barriers
    ptxas info    : Compile time = 32.807 ms
""")


def test_ptxas_figures_per_entry_function():
    kernels = check.parse_ptxas(PTXAS_LOG)
    assert [(k.registers, k.barriers, k.shared_bytes, k.stack_bytes, k.spill_store_bytes,
             k.spill_load_bytes, k.arch) for k in kernels] == [
        (120, 1, 128, 0, 0, 0, "sm_90"),
        (48, 0, 0, 16, 4, 12, "sm_90"),
    ]
    names = check.demangle([k.name for k in kernels])
    if names[0] != kernels[0].name:  # a demangler was found
        assert report.short_kernel_name(names[0]) == "norm::norm_bwd_registers_kernel<__half, 8, 2, 512>"
    assert report.short_kernel_name(
        "fastllm::norm::(anonymous namespace)::k<float, 4>(fastllm::norm::Args<float>)"
    ) == "norm::k<float, 4>"


# cuobjdump --dump-resource-usage of csrc/norm/norm.cu's object for sm_90 (names trimmed)
RESOURCE_USAGE = textwrap.dedent("""\
    Fatbin elf code:
    ================
    arch = sm_90
    Resource usage:
     Common:
      GLOBAL:0
     Function _ZN7fastllm4norm25norm_bwd_registers_kernelI6__halfLi8ELi2ELi512EEEvv:
      REG:120 STACK:0 SHARED:1152 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
     Function _layer_norm_fwd:
      REG:40 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
""")


def test_cuobjdump_resource_usage_per_function():
    assert check.parse_resource_usage(RESOURCE_USAGE) == [
        {"name": "_ZN7fastllm4norm25norm_bwd_registers_kernelI6__halfLi8ELi2ELi512EEEvv",
         "registers": 120, "stack_bytes": 0, "shared_bytes": 1152, "local_bytes": 0},
        {"name": "_layer_norm_fwd", "registers": 40, "stack_bytes": 16, "shared_bytes": 0,
         "local_bytes": 8},
    ]


TRITON_CUBIN = """
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def _scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

for block in (128, 1024):
    src = ASTSource(_scale_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                    {"BLOCK": block}, {})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    with open(f"{sys.argv[1]}/k{block}.cubin", "wb") as f:
        f.write(kernel.asm["cubin"])
"""


def test_triton_kernel_resources_from_a_cache_of_cubins(tmp_path):
    """The test stage's report of the Triton kernels it compiled: two specializations of one
    kernel, compiled here for sm_90 by Triton (no GPU needed), read back with cuobjdump."""
    if check.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (neither a CUDA toolkit's nor Triton's)")
    (tmp_path / "cache" / "h1").mkdir(parents=True)
    script = tmp_path / "compile_kernel.py"  # @triton.jit needs its source in a file
    script.write_text(TRITON_CUBIN)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "cache" / "h1")],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = check.triton_kernel_resources(tmp_path / "cache")
    assert len(kernels) == 1 and kernels[0]["name"] == "_scale_kernel"
    assert kernels[0]["specializations"] == 2
    assert 8 <= kernels[0]["registers"] <= 255 and kernels[0]["local_bytes"] == 0


def test_junit_report_is_counted_per_file(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(textwrap.dedent("""\
        <testsuites><testsuite name="pytest">
          <testcase classname="tests.test_norm" name="test_a[native]" file="tests/test_norm.py"/>
          <testcase classname="tests.test_norm" name="test_b[triton]" file="tests/test_norm.py">
            <failure message="AssertionError: out (torch.bfloat16): max error 0.5 &gt; 2 x torch's">trace</failure>
          </testcase>
          <testcase classname="tests.test_rotary" name="test_c" file="tests/test_rotary.py">
            <skipped message="out of time: the GPU check's test stage reached its deadline"/>
          </testcase>
          <testcase classname="tests.test_rotary" name="test_d" file="tests/test_rotary.py">
            <skipped message="needs two GPUs"/>
          </testcase>
          <testcase classname="tests.test_rotary" name="test_e" file="tests/test_rotary.py">
            <error message="fixture failed">trace</error>
          </testcase>
        </testsuite></testsuites>"""))
    report = check.parse_junit(junit)
    assert report["per_file"] == {
        "tests/test_norm.py": {"passed": 1, "failed": 1, "skipped": 0, "error": 0},
        "tests/test_rotary.py": {"passed": 0, "failed": 0, "skipped": 2, "error": 1},
    }
    assert report["out_of_time"] == 1
    assert report["skip_reasons"] == {
        "out of time: the GPU check's test stage reached its deadline": 1, "needs two GPUs": 1}
    assert report["failures"][0]["test"] == "tests/test_norm.py::test_b[triton]"
    assert report["failures"][0]["message"].startswith("AssertionError: out (torch.bfloat16)")
    assert len(report["failures"]) == 2


def test_sanitizer_summaries_are_summed():
    assert check.count_sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    assert check.count_sanitizer_errors(
        "========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)\n"
        "========= ERROR SUMMARY: 2 errors\n") == 5
    assert check.count_sanitizer_errors("Traceback (most recent call last):\n") is None


def _row(case, contender, run="native-attention", **fields):
    label = f"fastllm[{run.split('-')[0]}]" if contender == "fastllm" else contender
    return {"case": case, "contender": contender, "label": label, "run": run,
            "params": {"mode": "fwd+bwd" if "fwd+bwd" in case else "fwd"}, **fields}


def test_targets_are_judged_against_the_measured_ceilings():
    ceilings = {"gemm_bf16_tflops": 800.0, "copy_gbs": 4000.0}
    fwd = "attention-full-fwd-1x32x4096x128-bfloat16"
    both = "attention-full-fwd+bwd-1x32x4096x128-bfloat16"
    ce = "cross_entropy-fwd+bwd-4096x128256-bfloat16"
    results = [
        _row(fwd, "fastllm", gflops=480e3, time_s=1e-3),  # 60 % of the GEMM: met
        _row(both, "fastllm", time_s=2.0e-3),
        _row(both, "sdpa[flash]", time_s=1.8e-3),  # flash faster: 0.9x, not met
        _row(ce, "fastllm", run="native-cross_entropy", gbs=3400.0, time_s=1e-3),
        _row(ce, "liger", run="native-cross_entropy", gbs=3000.0, time_s=1.2e-3),
        _row("linear_cross_entropy-fwd+bwd-4096x4096x128256-bfloat16", "fastllm",
             run="native-cross_entropy", time_s=1e-2, peak_memory_bytes=300 * 2**20),
        _row("linear_cross_entropy-fwd+bwd-4096x4096x128256-bfloat16", "liger",
             run="native-cross_entropy", time_s=1e-2, peak_memory_bytes=200 * 2**20),
        # the Triton backend's rows are not what the targets judge
        _row(fwd, "fastllm", run="triton-attention", gflops=10e3, time_s=1e-3),
    ]
    got = {(t["target"], t["met"]) for t in report.judge_targets(results, ceilings)}
    assert ("attention bf16 fwd >= 50% of the measured bf16 GEMM (T 4096, D 128)", True) in got
    assert ("attention fwd+bwd >= 1.0x torch's flash SDPA", False) in got
    assert ("cross-entropy >= 80% of the copy bandwidth", True) in got  # 85 %
    assert ("cross-entropy >= 1.0x Liger-Kernel", True) in got  # 1.2x
    assert ("linear + cross-entropy peak memory <= Liger's (LLaMA-3 vocab)", False) in got
    assert len(got) == 5  # and nothing from the Triton rows
    nothing = report.judge_targets([], ceilings)
    assert nothing[0]["met"] is None and "no row" in nothing[0]["measured"]


def test_bench_tables_compare_each_row_with_the_peers_of_its_case():
    """A Triton run times fastllm alone: its ratios come from the native run's peers of the
    same case; a peer column appears only when some run timed that peer."""
    case = "rms_norm-fwd-4096x4096-bfloat16"
    results = [
        _row(case, "fastllm", run="native-norm-llama3-8b", time_s=1e-3, gbs=3000.0),
        _row(case, "torch eager", run="native-norm-llama3-8b", time_s=2e-3, gbs=1500.0),
        _row(case, "liger", run="native-norm-llama3-8b", time_s=1.5e-3, gbs=2000.0),
        _row(case, "fastllm", run="triton-norm-llama3-8b", time_s=4e-3, gbs=750.0),
    ]
    lines = report.bench_table(results)
    header = next(line for line in lines if line.startswith("| case"))
    assert header == "| case | contender | path | ms | GB/s | vs eager | vs liger | peak MiB |"
    native = next(line for line in lines if "fastllm[native]" in line)
    triton = next(line for line in lines if "fastllm[triton]" in line)
    assert "| 2 | 1.5 |" in native  # eager 2 ms and liger 1.5 ms over 1 ms
    assert "| 0.5 | 0.375 |" in triton  # the native run's peers over 4 ms
    assert lines.index("#### triton-norm-llama3-8b") > lines.index("#### native-norm-llama3-8b")


def test_report_reads_what_fastllm_bench_writes(tmp_path):
    """The report consumes fastllm bench's own JSON rows (here a CPU --quick run): the keys
    it reads exist, the tables fill in and a bandwidth target is judged on real rows."""
    from fastllm.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "norm", "--quick", "--device", "cpu", "--no-thp-rerun",
                 "--only", "rms_norm-fwd+bwd-*-bfloat16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    for row in rows:
        row["run"] = "native-norm"  # what check.stage_bench adds
    lines = report.bench_table(rows)
    fastllm_row = next(line for line in lines if "fastllm[" in line)
    assert "| rms_norm-fwd+bwd-256x512-bfloat16 |" in fastllm_row
    cells = [c.strip() for c in fastllm_row.split("|")]
    assert all(c not in ("", "-") for c in cells[4:8]), fastllm_row  # ms, GB/s, vs eager, compile
    targets = report.judge_targets(rows, {"copy_gbs": 1e9})  # an unreachable ceiling
    assert [(t["target"], t["met"]) for t in targets] == [
        ("norm >= 80% of the copy bandwidth", False)]


def test_a_run_writes_its_report_atomically(tmp_path, monkeypatch, capsys):
    """main() with a (pretend) GPU and stages that return recorded results: the markdown,
    the JSON and the logs archive appear in --out with the stage statuses, the targets, the
    ptxas table, the test failures and the bench tables; exit 1 because a stage failed."""
    monkeypatch.setattr(check, "probe_gpu", lambda python: {
        "available": True, "name": "NVIDIA H200", "capability": "90", "sms": 132,
        "memory_gib": 139.8, "torch": "2.11.0", "torch_cuda": "13.0", "triton": "3.6.0"})
    kernels = [dataclasses_asdict(k) for k in check.parse_ptxas(PTXAS_LOG)]
    results = [_row("attention-full-fwd-1x32x4096x128-bfloat16", "fastllm", gflops=480e3,
                    time_s=1e-3, path="cuda", flops=480e6),
               _row("attention-full-fwd-1x32x4096x128-bfloat16", "sdpa[cudnn]",
                    error="n/a: cuDNN refused the case")]
    stages = {
        "build": check.StageResult("build", "ok", 40, "40 s for sm_90", {"kernels": kernels}),
        "tests": check.StageResult("tests", "failed", 100, "1 passed, 1 failed", {
            "per_file": {"tests/test_norm.py": {"passed": 1, "failed": 1, "skipped": 0, "error": 0}},
            "failures": [{"test": "tests/test_norm.py::test_b", "message": "max error 0.5"}]}),
        "bench": check.StageResult("bench", "ok", 200, "2 rows", {
            "ceilings": {"gemm_bf16_tflops": 800.0, "gemm_bf16_n": 8192, "copy_gbs": 4000.0},
            "results": results,
            "targets": report.judge_targets(results, {"gemm_bf16_tflops": 800.0})}),
    }
    monkeypatch.setattr(check, "STAGE_FUNCTIONS",
                        {name: (lambda ctx, r=r: r) for name, r in stages.items()})
    status = check.main(["--stages", "build,tests,bench,report", "--out", str(tmp_path),
                         "--commit", "abc1234"])
    assert status == 1  # the tests stage failed
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = files[0].removesuffix("-logs.tar.gz")
    assert stem.endswith("-h200")
    assert files == [f"{stem}-logs.tar.gz", f"{stem}.json", f"{stem}.md"]  # no .tmp left
    md = (tmp_path / f"{stem}.md").read_text()
    assert "commit: `abc1234`" in md and "NVIDIA H200" in md
    assert "| tests | failed | 100 | 1 passed, 1 failed |" in md
    assert "| attention bf16 fwd >= 50% of the measured bf16 GEMM (T 4096, D 128) |" in md
    assert "60% (480 of 800 TFLOP/s) | yes |" in md
    assert "`norm::norm_bwd_registers_kernel<__half, 8, 2, 512>`" in md or "_ZN7fastllm4norm" in md
    assert "- `tests/test_norm.py::test_b`: max error 0.5" in md
    assert "| attention-full-fwd-1x32x4096x128-bfloat16 | sdpa[cudnn] |  | n/a |" in md
    record = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["build", "tests", "bench"]
    assert record["meta"]["commit"] == "abc1234"
    with tarfile.open(tmp_path / f"{stem}-logs.tar.gz") as tar:
        assert tar.getnames()[0] == f"{stem}-logs"
    assert md in capsys.readouterr().out  # the table is printed too


def dataclasses_asdict(obj):
    import dataclasses

    return dataclasses.asdict(obj)


def test_a_failing_stage_does_not_stop_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "probe_gpu", lambda python: {"available": True, "name": "X"})
    ran = []

    def broken(ctx):
        ran.append("build")
        raise RuntimeError("nvcc exploded")

    def fine(ctx):
        ran.append("tests")
        return check.StageResult("tests", "ok", 1, "fine")

    monkeypatch.setattr(check, "STAGE_FUNCTIONS", {"build": broken, "tests": fine})
    assert check.main(["--stages", "build,tests,report", "--out", str(tmp_path)]) == 1
    assert ran == ["build", "tests"]
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| build | failed |" in md and "RuntimeError: nvcc exploded" in md
    assert "| tests | ok |" in md


def _context(tmp_path, budget=300.0):
    import time

    logs = tmp_path / "logs"
    logs.mkdir()
    return check.Context(out=tmp_path, logs=logs, quick=True, dry_run=False,
                         deadline=time.time() + budget, budget_s=budget)


def test_tests_stage_runs_pytest_and_reads_its_report(tmp_path, monkeypatch):
    """The test stage for real, on a stand-in test file (the GPU selection needs a GPU):
    pytest runs with the deadline plugin and JUnit, and the stage counts what it wrote."""
    tests = tmp_path / "standin"
    tests.mkdir()
    (tests / "test_standin.py").write_text(
        "import os, pytest\n"
        "def test_device():\n    assert os.environ['FASTLLM_TEST_DEVICE'] == 'cuda'\n"
        "def test_fails():\n    assert 1 == 2, 'a finding'\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    ctx = _context(tmp_path)

    def standin_command(ctx_, junit, collect_only=False):
        return [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
                "-p", "pytest_deadline", "--junitxml", str(junit), "-o", "junit_family=xunit1",
                "--rootdir", str(tests)]

    monkeypatch.setattr(check, "test_command", standin_command)
    result = check.stage_tests(ctx)
    assert result.status == "failed"
    assert result.details["totals"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert "a finding" in result.details["failures"][0]["message"]
    assert result.details["skip_reasons"] == {"not here": 1}
    assert result.summary.startswith("1 passed, 1 failed, 0 errors, 1 skipped")


def test_bench_stage_runs_fastllm_bench_and_collects_its_rows(tmp_path, monkeypatch):
    """The bench stage for real, with a CPU run of fastllm bench in place of the GPU runs:
    the rows come back labelled with their run; without a GPU the ceilings script fails and
    says so, and the targets say there was nothing to judge them against."""
    ctx = _context(tmp_path)
    ctx.built = True
    out = ctx.logs / "bench-native-norm.json"
    monkeypatch.setattr(check, "bench_commands", lambda ctx_: [("native-norm", [
        "bench", "norm", "--device", "cpu", "--quick", "--no-thp-rerun",
        "--only", "rms_norm-fwd-*-float32", "--json", str(out)])])
    result = check.stage_bench(ctx)
    assert result.details["runs"]["native-norm"]["exit"] == 0
    rows = result.details["results"]
    assert {r["run"] for r in rows} == {"native-norm"} and len(rows) == 3
    if NO_GPU:
        assert "error" in result.details["ceilings"]
        assert result.details["targets"][0]["met"] is None
    assert result.status == "ok"


def test_stage_limits_never_exceed_what_is_left():
    import time

    ctx = check.Context(out=Path("."), logs=Path("."), quick=False, dry_run=False,
                        deadline=time.time() + 100, budget_s=480)
    assert ctx.stage_limit("build") <= 100
    assert ctx.stage_limit("tests", reserve_s=90) <= 10
    assert ctx.stage_limit("bench", reserve_s=1000) == 0.0


def test_sanitizer_calls_run_and_agree_on_the_cpu_kernels():
    """Every call of benchmarks/gpu/sanitize_calls.py runs forward and backward on the CPU
    kernels here and agrees with the reference (on the GPU the same calls run under
    compute-sanitizer)."""
    for name in sanitize_calls.CALLS:
        assert sanitize_calls.run_one(name, "native", torch.device("cpu")) == "", name


def test_sanitizer_calls_notice_a_wrong_answer(monkeypatch):
    import fastllm.functional as F

    import fastllm

    real = F.swiglu
    monkeypatch.setattr(  # wrong on the backend under test only, right on the reference
        F, "swiglu", lambda gate, up: real(gate, up) * (2 if fastllm.get_backend() == "native" else 1))
    problem = sanitize_calls.run_one("swiglu", "native", torch.device("cpu"))
    assert "out: max error" in problem


def test_deadline_plugin_skips_what_has_not_started(tmp_path):
    (tmp_path / "test_two.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "pytest_deadline", "-p", "no:cacheprovider",
           "-rs", str(tmp_path / "test_two.py")]
    env = _env(PYTHONPATH=str(GPU_DIR))
    past = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "FASTLLM_TEST_DEADLINE": "1"}, timeout=120)
    assert "2 skipped" in past.stdout and "out of time" in past.stdout
    future = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                            env={**env, "FASTLLM_TEST_DEADLINE": "99999999999"}, timeout=120)
    assert "2 passed" in future.stdout


def test_cuda_test_mode_drops_the_emulation_and_checks_its_value():
    """FASTLLM_TEST_DEVICE=cuda: the modules' "cuda_emu" parametrisations are dropped (the
    CUDA kernels run for real under "native"); a wrong value is an error naming it."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           "tests/test_norm.py"]
    cpu = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    gpu = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=_env(FASTLLM_TEST_DEVICE="cuda"), timeout=300)
    assert cpu.returncode == gpu.returncode == 0, gpu.stdout[-2000:] + gpu.stderr[-2000:]
    assert any("cuda_emu" in line for line in cpu.stdout.splitlines())
    ids = [line for line in gpu.stdout.splitlines() if "::" in line]
    assert ids and not any("cuda_emu" in line for line in ids)
    assert any("[native" in line or "-native" in line for line in ids)
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=_env(FASTLLM_TEST_DEVICE="tpu"), timeout=300)
    assert bad.returncode != 0
    assert "FASTLLM_TEST_DEVICE must be 'cpu' or 'cuda', got 'tpu'" in bad.stdout + bad.stderr
    if NO_GPU:
        run = subprocess.run([c for c in cmd if c != "--collect-only"], capture_output=True, text=True, cwd=ROOT,
                             env=_env(FASTLLM_TEST_DEVICE="cuda"), timeout=300)
        assert run.returncode != 0
        assert "torch sees no CUDA device" in run.stdout + run.stderr
