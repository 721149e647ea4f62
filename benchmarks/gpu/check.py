"""The GPU check: build, test, sanitize and time every CUDA and Triton kernel of fastllm on
one NVIDIA GPU, in minutes, and write what it found as a table a person reads plus JSON.

    bash benchmarks/gpu/run.sh [--dry-run] [--quick] [--out DIR] [--commit SHA]
                               [--budget SECONDS] [--stages build,tests,...]

(run.sh installs carried wheels, then runs this file.) Stages, in order, each timed and
independent of the others' failures (a stage that needs the extension says so when the
build failed, the others still run):

  build      ``setup.py build_ext --inplace`` for this GPU's compute capability only, all
             cores; build time, and ptxas's registers / barriers / stack / spills per kernel
             (parsed from the ``-Xptxas=-v`` lines the build prints).
  tests      the kernel families' own tests on CUDA tensors (``FASTLLM_TEST_DEVICE=cuda``,
             tests/conftest.py): the CUDA kernels under "native" (and the "cuda_emu" tests,
             which become the real thing), the compiled Triton kernels under "triton",
             against the references under the 2x rule; tests not started by the stage's
             deadline are skipped and counted as such (benchmarks/gpu/pytest_deadline.py).
  sanitizer  compute-sanitizer memcheck over one small forward + backward of every family
             on both backends (torch's caching allocator off, so that every tensor is an
             allocation of its own and an access past it is seen), and racecheck over the
             CUDA kernels (benchmarks/gpu/sanitize_calls.py).
  bench      the measured ceilings (a large bf16 GEMM, a device-to-device copy), then
             ``fastllm bench FAMILY --device cuda`` per family, one process each: fastllm's
             CUDA and Triton kernels against torch eager, torch.compile, SDPA's flash and
             cuDNN backends and Liger-Kernel where installed, at the CPU benchmarks' shapes
             and LLaMA-3-8B's; then the issue's targets, judged against the ceilings.
  models     ``fastllm bench models --device cuda``: training steps and decode rate.
  report     ``<out>/<date>-<gpu>.md`` and ``.json`` (and ``-logs.tar.gz``), table printed.

The whole run keeps to ``--budget`` seconds (default 480; 180 with ``--quick``, which also
takes small shapes and a subset of the tests): each stage gets a share, never more than what
is left. ``--dry-run`` (any machine, no GPU needed): checks that every stage's programs
exist and that its commands parse (the test selection is collected, the bench command lines
are parsed by fastllm's own parser, the scripts compile), prints what would run, and exits
0 ("no GPU: dry run only" when torch sees none).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import judge_targets, render_markdown  # noqa: E402  (benchmarks/gpu/report.py)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STAGES = ("build", "tests", "sanitizer", "bench", "models", "report")

# The kernel families' test files: every one runs on CUDA tensors under
# FASTLLM_TEST_DEVICE=cuda (the hostile-input tests stay CPU-only: on a GPU the kernels
# answer some bad values with NaN rows by design, where the CPU raises).
TEST_FILES = (
    "tests/test_attention.py",
    "tests/test_attention_masks.py",
    "tests/test_attention_cuda_masks.py",
    "tests/test_attention_kvcache.py",
    "tests/test_attention_api.py",
    "tests/test_cross_entropy.py",
    "tests/test_cross_entropy_api.py",
    "tests/test_norm.py",
    "tests/test_norm_api.py",
    "tests/test_rotary.py",
    "tests/test_rotary_api.py",
    "tests/test_gated_mlp.py",
    "tests/test_gated_mlp_api.py",
)
# --quick: the numerics tests of each family (the _api files' modules and compile checks
# are left out)
QUICK_TEST_FILES = tuple(f for f in TEST_FILES if not f.endswith("_api.py"))

# fastllm bench's op families, most important first (a family the budget cannot reach is
# reported as not run)
BENCH_FAMILIES = ("attention", "cross_entropy", "norm", "rotary", "mlp")

# Seconds of the budget each stage may take at most, as fractions of the whole (the report
# stage takes what it needs: seconds).
SHARES = {"build": 0.35, "tests": 0.30, "sanitizer": 0.20, "bench": 0.45, "models": 0.15}
QUICK_SHARES = {"build": 0.55, "tests": 0.20, "sanitizer": 0.15, "bench": 0.30, "models": 0.10}


# ------------------------------------------------------------------------------ records


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout | skipped | dry-run
    elapsed_s: float = 0.0
    summary: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    out: Path
    logs: Path
    quick: bool
    dry_run: bool
    deadline: float  # time.time() by which the whole run must end
    budget_s: float
    python: str = sys.executable
    gpu: Optional[dict[str, Any]] = None  # name, capability, ... (None: no GPU)
    built: Optional[bool] = None  # the build stage's verdict (None: not run)

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def stage_limit(self, stage: str, reserve_s: float = 0.0) -> float:
        """The seconds ``stage`` may take: its share of the budget, never more than what is
        left after ``reserve_s`` for the stages after it."""
        share = (QUICK_SHARES if self.quick else SHARES)[stage] * self.budget_s
        return max(0.0, min(share, self.seconds_left() - reserve_s))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled Triton on the GPU, never the interpreter
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_logged(cmd: Sequence[str], log: Path, timeout_s: float, env: Optional[dict] = None,
               cwd: Path = ROOT) -> tuple[Optional[int], float]:
    """Runs ``cmd`` with its output (stdout and stderr) to ``log``; returns (exit status,
    seconds), status None when it ran past ``timeout_s`` (its process group is killed)."""
    begin = time.time()
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        if timeout_s <= 0:
            out.write(b"not started: no time left\n")
            return None, 0.0
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env or _env(), start_new_session=True)
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)  # pytest's xdist workers and compilers too
            except ProcessLookupError:  # it ended just now
                pass
            proc.wait()
            out.write(f"\n[killed after {timeout_s:.0f} s: the stage's time limit]\n".encode())
            status = None
    return status, time.time() - begin


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------- GPU


GPU_PROBE = r"""
import json, torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    info["triton"] = f"not importable: {exc}"
if info["available"]:
    p = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    info.update(name=torch.cuda.get_device_name(0), capability=f"{major}{minor}",
                sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info))
"""


def probe_gpu(python: str) -> dict[str, Any]:
    """torch's view of the machine (in a child, so this process never initialises CUDA)."""
    done = subprocess.run([python, "-c", GPU_PROBE], capture_output=True, text=True,
                          env=_env(), timeout=120)
    if done.returncode != 0:
        return {"available": False, "error": done.stderr.strip().splitlines()[-1:] or "?"}
    info = json.loads(done.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    if smi and info.get("available"):
        q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True)
        if q.returncode == 0:
            info["driver"] = q.stdout.strip()
    return info


def gpu_slug(gpu: Optional[dict]) -> str:
    name = (gpu or {}).get("name") or "no-gpu"
    name = name.removeprefix("NVIDIA ").strip().lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


# ------------------------------------------------------------------------------- build


@dataclasses.dataclass
class KernelResources:
    """ptxas's figures for one entry function."""

    name: str  # demangled where c++filt could
    arch: str
    registers: Optional[int] = None
    barriers: Optional[int] = None
    shared_bytes: int = 0  # static shared memory (dynamic shared memory is not in ptxas)
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0


_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(?:, used (\d+) barriers)?(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> list[KernelResources]:
    """Every entry function's resources from ``nvcc -Xptxas=-v`` output. ptxas prints, per
    entry: "Compiling entry function 'X' for 'sm_NN'", then "Function properties for X" with
    the stack / spill line, then "Used N registers, used B barriers[, S bytes smem]". The
    properties of non-entry functions that ptxas also lists are ignored."""
    kernels: list[KernelResources] = []
    current: Optional[KernelResources] = None
    props_of: Optional[str] = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = KernelResources(name=m.group(1), arch=m.group(2))
            kernels.append(current)
            props_of = None
            continue
        if m := _PROPS.search(line):
            props_of = m.group(1)
            continue
        if m := _FRAME.search(line):
            if current is not None and props_of == current.name:
                current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = (
                    int(m.group(1)), int(m.group(2)), int(m.group(3)))
            continue
        if (m := _USED.search(line)) and current is not None and current.registers is None:
            current.registers = int(m.group(1))
            current.barriers = int(m.group(2)) if m.group(2) else 0
            if s := _SMEM.search(m.group(3) or ""):
                current.shared_bytes = int(s.group(1))
    return kernels


def demangle(names: Sequence[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return out if done.returncode == 0 and len(out) == len(names) else list(names)


_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text: str) -> list[dict[str, Any]]:
    """``cuobjdump --dump-resource-usage`` output: per function its registers, stack,
    static shared memory and local memory (spilled registers live in local memory)."""
    out: list[dict[str, Any]] = []
    name: Optional[str] = None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            name = m.group(1)
        elif (m := _USAGE.search(line)) and name is not None:
            out.append({"name": name, "registers": int(m.group(1)), "stack_bytes": int(m.group(2)),
                        "shared_bytes": int(m.group(3)), "local_bytes": int(m.group(4))})
            name = None
    return out


def find_cuobjdump() -> Optional[str]:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.is_file() else None
    except ImportError:
        return None


def triton_kernel_resources(cache_dir: Path) -> list[dict[str, Any]]:
    """Every Triton kernel the test stage compiled (the cubins in its TRITON_CACHE_DIR), one
    entry per kernel name: its specializations and their largest registers / stack / local
    memory."""
    tool = find_cuobjdump()
    if tool is None:
        return []
    per_kernel: dict[str, dict[str, Any]] = {}
    for cubin in sorted(cache_dir.rglob("*.cubin")):
        done = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True)
        for f in parse_resource_usage(done.stdout):
            k = per_kernel.setdefault(f["name"], {"name": f["name"], "specializations": 0,
                                                  "registers": 0, "stack_bytes": 0,
                                                  "shared_bytes": 0, "local_bytes": 0})
            k["specializations"] += 1
            for key in ("registers", "stack_bytes", "shared_bytes", "local_bytes"):
                k[key] = max(k[key], f[key])
    return sorted(per_kernel.values(), key=lambda k: k["name"])


# Whether the built extension loads and registered CUDA kernels for every family's ops.
CUDA_KERNELS_PROBE = r"""
import torch, fastllm, fastllm._native as n
if n.unavailable_reason():
    raise SystemExit(n.unavailable_reason())
ops = ["layer_norm_fwd", "rms_norm_fwd", "cross_entropy_fwd", "attention_fwd", "gated_mlp_fwd",
       "rotary_fwd"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(
    f"fastllm::{op}", "CUDA")]
print(f"no CUDA kernel registered for {missing}" if missing else
      "fastllm._C loads with its CUDA kernels")
"""


def build_command(ctx: Context) -> list[str]:
    return [ctx.python, "setup.py", "build_ext", "--inplace"]


def stage_build(ctx: Context) -> StageResult:
    cap = (ctx.gpu or {}).get("capability")
    cmd = build_command(ctx)
    env_note = f"FASTLLM_CUDA_ARCHS={cap or '<this GPU>'} MAX_JOBS={os.cpu_count()}"
    if ctx.dry_run:
        # the build's own configuration, as setup.py computes it for sm_90
        probe = subprocess.run(
            [ctx.python, "-c", "import torch.utils.cpp_extension, fastllm._build as b, os; "
             "os.environ['FASTLLM_CUDA_ARCHS'] = '90'; print(' '.join(b.gencode_flags()))"],
            capture_output=True, text=True, env=_env(), cwd=ROOT)
        problems = [] if shutil.which("nvcc") else ["nvcc not found on PATH"]
        if probe.returncode != 0:
            problems.append(probe.stderr.strip()[-500:])
        return StageResult("build", "failed" if problems else "dry-run", summary=(
            f"would run: {env_note} {shlex.join(cmd)}\nnvcc flags for sm_90: "
            f"{probe.stdout.strip()}" + "".join(f"\n{p}" for p in problems)))
    log = ctx.logs / "build.log"
    env = _env(FASTLLM_CUDA_ARCHS=str(cap), MAX_JOBS=str(os.cpu_count() or 8))
    env.pop("FASTLLM_SKIP_CUDA_BUILD", None)
    status, seconds = run_logged(cmd, log, ctx.stage_limit("build", reserve_s=60), env=env)
    text = log.read_text(errors="replace")
    kernels = parse_ptxas(text)
    for k, name in zip(kernels, demangle([k.name for k in kernels])):
        k.name = name
    spills = [k for k in kernels if k.spill_store_bytes or k.spill_load_bytes or k.stack_bytes]
    probe = subprocess.run([ctx.python, "-c", CUDA_KERNELS_PROBE], capture_output=True,
                           text=True, env=_env(), cwd=ROOT)
    loads = probe.returncode == 0 and "loads" in probe.stdout
    ctx.built = status == 0 and loads
    summary = (f"{seconds:.0f} s for sm_{cap} on {os.cpu_count()} cores; {len(kernels)} kernels "
               f"compiled, {len(spills)} with stack or spills; "
               + ("extension loads" if loads else f"extension does not load: {probe.stdout.strip()} "
                  f"{probe.stderr.strip()[-300:]}"))
    state = "ok" if ctx.built else ("timeout" if status is None else "failed")
    if status not in (0, None):
        summary += f"\n{tail(log, 25)}"
    return StageResult("build", state, seconds, summary, {
        "command": f"{env_note} {shlex.join(cmd)}",
        "kernels": [dataclasses.asdict(k) for k in kernels],
    })


# ------------------------------------------------------------------------------- tests


def test_command(ctx: Context, junit: Path, collect_only: bool = False) -> list[str]:
    files = QUICK_TEST_FILES if ctx.quick else TEST_FILES
    cmd = [ctx.python, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
           "-p", "pytest_deadline", "--junitxml", str(junit), "-o", "junit_family=xunit1"]
    if collect_only:
        return cmd + ["--collect-only"]
    if _has_module(ctx.python, "xdist"):
        cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 4) // 2)))]
    if _has_module(ctx.python, "pytest_timeout"):
        cmd += ["--timeout", "120"]
    return cmd


def _has_module(python: str, name: str) -> bool:
    done = subprocess.run([python, "-c", f"import importlib.util as u; "
                           f"raise SystemExit(u.find_spec({name!r}) is None)"], env=_env())
    return done.returncode == 0


def parse_junit(path: Path) -> dict[str, Any]:
    """Totals per test file, and the failures with their first message line."""
    per_file: dict[str, dict[str, int]] = {}
    failures: list[dict[str, str]] = []
    skip_reasons: dict[str, int] = {}  # a skip that should not be there shows up here
    out_of_time = 0
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        file = case.get("file") or (case.get("classname") or "?").replace(".", "/") + ".py"
        counts = per_file.setdefault(file, {"passed": 0, "failed": 0, "skipped": 0, "error": 0})
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": f"{file}::{case.get('name')}",
                                 "message": (message[0] if message else "")[:300]})
            elif child.tag == "skipped":
                outcome = "skipped"
                reason = (child.get("message") or "").strip()[:200]
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
                if "out of time" in reason:
                    out_of_time += 1
        counts[outcome] += 1
    return {"per_file": per_file, "failures": failures, "out_of_time": out_of_time,
            "skip_reasons": dict(sorted(skip_reasons.items(), key=lambda kv: -kv[1]))}


def stage_tests(ctx: Context) -> StageResult:
    junit = ctx.logs / "tests-junit.xml"
    env = _env(FASTLLM_TEST_DEVICE="cuda",
               PYTHONPATH=os.pathsep.join([str(HERE), _env()["PYTHONPATH"]]))
    if ctx.dry_run:
        cmd = test_command(ctx, junit, collect_only=True)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        last = (done.stdout.strip().splitlines() or ["?"])[-1]
        return StageResult("tests", "dry-run" if done.returncode == 0 else "failed", summary=(
            f"would run: FASTLLM_TEST_DEVICE=cuda {shlex.join(test_command(ctx, junit))}\n"
            f"collected under FASTLLM_TEST_DEVICE=cuda: {last}"
            + ("" if done.returncode == 0 else f"\n{done.stdout[-2000:]}{done.stderr[-2000:]}")))
    env["TRITON_CACHE_DIR"] = str(ctx.logs / "triton-cache")  # what the tests compiled
    limit = ctx.stage_limit("tests", reserve_s=0.35 * ctx.budget_s)
    # tests not started 20 s before the limit are skipped, so the run ends on its own
    env["FASTLLM_TEST_DEADLINE"] = str(time.time() + max(0.0, limit - 20))
    log = ctx.logs / "tests.log"
    status, seconds = run_logged(test_command(ctx, junit), log, limit, env=env)
    if not junit.exists():
        return StageResult("tests", "timeout" if status is None else "failed", seconds,
                           f"pytest wrote no report (exit {status})\n{tail(log, 30)}")
    report = parse_junit(junit)
    report["triton_kernels"] = triton_kernel_resources(ctx.logs / "triton-cache")
    totals = {k: sum(c[k] for c in report["per_file"].values())
              for k in ("passed", "failed", "error", "skipped")}
    summary = (f"{totals['passed']} passed, {totals['failed']} failed, {totals['error']} errors, "
               f"{totals['skipped']} skipped ({report['out_of_time']} of them out of time) "
               f"in {seconds:.0f} s; {len(report['triton_kernels'])} Triton kernels compiled, "
               f"{sum(k['local_bytes'] > 0 for k in report['triton_kernels'])} with local "
               f"memory (spills); last line: {tail(log, 1)}")
    state = "ok" if totals["failed"] == totals["error"] == 0 and status == 0 else "failed"
    return StageResult("tests", state, seconds, summary, {"totals": totals, **report})


# --------------------------------------------------------------------------- sanitizer


def sanitizer_commands(ctx: Context, tool: str) -> list[tuple[str, list[str]]]:
    """(label, command) per sanitizer run: memcheck over both backends' kernels (and the
    torch kernels between them), racecheck over fastllm's CUDA kernels (their names hold the
    ``fastllm`` namespace; the Triton kernels' shared memory is the compiler's)."""
    calls = [ctx.python, str(HERE / "sanitize_calls.py")]
    kernel_filter = _kernel_filter_flag(tool)
    return [
        ("memcheck", [tool, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "20",
                      *calls, "--backend", "native", "--backend", "triton"]),
        ("racecheck", [tool, "--tool", "racecheck", "--error-exitcode", "86", "--print-limit", "20",
                       *(kernel_filter + ["kns=fastllm"] if kernel_filter else []),
                       *calls, "--backend", "native"]),
    ]


def _kernel_filter_flag(tool: str) -> list[str]:
    """compute-sanitizer's kernel filter option: ``--kernel-name`` (current), else
    ``--kernel-regex`` (older releases), else none (every kernel is checked)."""
    if not shutil.which(tool):
        return ["--kernel-name"]
    help_text = subprocess.run([tool, "--help"], capture_output=True, text=True).stdout
    for flag in ("--kernel-name", "--kernel-regex"):
        if flag in help_text:
            return [flag]
    return []


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "compute-sanitizer").is_file():
            return str(Path(root) / "bin" / "compute-sanitizer")
    return None


def count_sanitizer_errors(text: str) -> Optional[int]:
    """compute-sanitizer's closing "ERROR SUMMARY: N errors" (racecheck: "RACECHECK SUMMARY:
    N hazards"), summed; None when it printed none (it did not get to the end)."""
    found = [int(n) for n in re.findall(r"(?:ERROR SUMMARY|RACECHECK SUMMARY): (\d+)", text)]
    return sum(found) if found else None


def stage_sanitizer(ctx: Context) -> StageResult:
    tool = find_sanitizer()
    script = HERE / "sanitize_calls.py"
    if ctx.dry_run:
        import py_compile

        py_compile.compile(str(script), doraise=True)
        lines = [f"would run: {shlex.join(cmd)}" for _, cmd in
                 sanitizer_commands(ctx, tool or "compute-sanitizer")]
        dry = subprocess.run([ctx.python, str(script), "--backend", "native", "--backend",
                              "triton", "--list"], capture_output=True, text=True, env=_env())
        lines.append(f"sanitize_calls.py --list: {dry.stdout.strip() or dry.stderr.strip()[-500:]}")
        if tool is None:
            lines.append("compute-sanitizer: not on this machine (the GPU image has it)")
        return StageResult("sanitizer", "dry-run" if dry.returncode == 0 else "failed",
                           summary="\n".join(lines))
    if tool is None:
        return StageResult("sanitizer", "skipped", summary="compute-sanitizer not found")
    if not ctx.built:
        return StageResult("sanitizer", "skipped", summary="no CUDA extension (build stage)")
    limit = ctx.stage_limit("sanitizer", reserve_s=0.25 * ctx.budget_s)
    begin = time.time()
    details: dict[str, Any] = {}
    parts, state = [], "ok"
    for label, cmd in sanitizer_commands(ctx, tool):
        log = ctx.logs / f"sanitizer-{label}.log"
        # every tensor its own cudaMalloc: an access past a tensor is past an allocation,
        # which memcheck sees (inside torch's cached blocks it would not)
        status, seconds = run_logged(cmd, log, min(limit - (time.time() - begin), 0.6 * limit),
                                     env=_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
        errors = count_sanitizer_errors(log.read_text(errors="replace"))
        details[label] = {"exit": status, "seconds": round(seconds, 1), "errors": errors}
        if status is None:
            parts.append(f"{label}: timed out after {seconds:.0f} s")
            state = "timeout" if state == "ok" else state
        elif errors is None or status != 0:
            parts.append(f"{label}: exit {status}, {errors} errors reported ({seconds:.0f} s)\n"
                         f"{tail(log, 12)}")
            state = "failed"
        else:
            parts.append(f"{label}: {errors} errors ({seconds:.0f} s)")
    return StageResult("sanitizer", state, time.time() - begin, "; ".join(parts), details)


# ------------------------------------------------------------------------------- bench


CEILINGS_SCRIPT = r"""
import json, sys, torch
dev = torch.device("cuda")
def median_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]
n = int(sys.argv[1])
g = torch.Generator(device=dev).manual_seed(0)
x = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)  # random data, not zeros
y = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)
out = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
ms = median_ms(lambda: torch.mm(x, y, out=out))
res = {"gemm_bf16_n": n, "gemm_bf16_tflops": 2 * n**3 / ms / 1e9}
x32 = x.float(); y32 = y.float(); out32 = out.float()
ms = median_ms(lambda: torch.mm(x32, y32, out=out32))
res["gemm_fp32_tflops_default_precision"] = 2 * n**3 / ms / 1e9
del x, y, out, x32, y32, out32
nbytes = int(sys.argv[2])
src = torch.randn(nbytes // 4, device=dev, generator=g)
dst = torch.empty_like(src)
ms = median_ms(lambda: dst.copy_(src))
res.update(copy_bytes=nbytes, copy_gbs=2 * nbytes / ms / 1e6)  # read + write
print(json.dumps(res))
"""


@dataclasses.dataclass(frozen=True)
class BenchRun:
    """One ``fastllm bench`` process of the bench stage."""

    label: str  # <backend>-<family>[-<shapes>]: the report's section, the targets' key
    family: str
    backend: str
    shapes: str = "default"
    contenders: tuple[str, ...] = ()  # --contenders patterns (empty: every contender)


# Without torch.compile: at the LLaMA-3 shapes torch.compile of SDPA is SDPA, and the default
# shapes are there for comparison with the CPU tables, not for a second compile of every case.
NO_COMPILE = ("fastllm", "torch eager", "sdpa*", "liger")
FASTLLM_ONLY = ("fastllm",)  # the Triton backend: its peers were timed in the native run


def bench_runs(quick: bool) -> list[BenchRun]:
    """The bench stage's runs, most important first (what the budget cannot reach is reported
    as not run): the families the targets judge at LLaMA-3-8B's shapes, natively with every
    peer and then on Triton; the other families likewise; then the CPU benchmarks' shapes."""
    if quick:  # the small shapes, every contender natively, fastllm alone on Triton
        return ([BenchRun(f"native-{f}", f, "native") for f in BENCH_FAMILIES]
                + [BenchRun(f"triton-{f}", f, "triton", contenders=FASTLLM_ONLY)
                   for f in BENCH_FAMILIES])
    targets, others = BENCH_FAMILIES[:3], BENCH_FAMILIES[3:]
    runs = []
    for group in (targets, others):
        runs += [BenchRun(f"native-{f}-llama3-8b", f, "native", "llama3-8b",
                          NO_COMPILE if f == "attention" else ()) for f in group]
        runs += [BenchRun(f"triton-{f}-llama3-8b", f, "triton", "llama3-8b", FASTLLM_ONLY)
                 for f in group]
    runs += [BenchRun(f"native-{f}", f, "native", "default", NO_COMPILE) for f in BENCH_FAMILIES]
    runs += [BenchRun(f"triton-{f}", f, "triton", "default", FASTLLM_ONLY) for f in BENCH_FAMILIES]
    return runs


def bench_commands(ctx: Context) -> list[tuple[str, list[str]]]:
    """(label, ``fastllm bench`` arguments) per run, in bench_runs' order."""
    commands = []
    for run in bench_runs(ctx.quick):
        args = ["bench", run.family, "--device", "cuda", "--backend", run.backend,
                "--shapes", run.shapes, "--json", str(ctx.logs / f"bench-{run.label}.json")]
        args += ["--quick"] if ctx.quick else []
        for pattern in run.contenders:
            args += ["--contenders", pattern]
        commands.append((run.label, args))
    return commands


def models_command(ctx: Context) -> list[str]:
    return ["bench", "models", "--device", "cuda",
            "--json", str(ctx.logs / "bench-models.json"), *(["--quick"] if ctx.quick else [])]


def parse_fastllm_args(argv: Sequence[str]) -> None:
    """Parses a ``fastllm`` command line with fastllm's own parser (raises on an error)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import contextlib
    import io

    from fastllm.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse's way of saying no
        raise ValueError(f"fastllm {shlex.join(argv)}: {errors.getvalue().strip()}") from exc


def stage_bench(ctx: Context) -> StageResult:
    runs = bench_commands(ctx)
    if ctx.dry_run:
        lines = []
        for label, args in runs:
            parse_fastllm_args(args)
            lines.append(f"would run: python -m fastllm {shlex.join(args)}")
        lines.append(f"and the ceilings: a {8192 if not ctx.quick else 4096}^3 bf16 GEMM and a "
                     "1 GiB device-to-device copy (median of 10 after 3 warm-ups, CUDA events)")
        return StageResult("bench", "dry-run", summary="\n".join(lines))
    limit = ctx.stage_limit("bench", reserve_s=0.10 * ctx.budget_s)
    begin = time.time()
    details: dict[str, Any] = {"runs": {}, "results": []}
    log = ctx.logs / "bench.log"
    done = subprocess.run([ctx.python, "-c", CEILINGS_SCRIPT, "4096" if ctx.quick else "8192",
                           str(2**30)], capture_output=True, text=True, env=_env(), timeout=120)
    if done.returncode == 0:
        details["ceilings"] = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        details["ceilings"] = {"error": done.stderr.strip()[-500:]}
    if not ctx.built:
        details["note"] = "no CUDA extension: fastllm[native] rows run the reference"
    not_run = []
    for label, args in runs:
        left = limit - (time.time() - begin)
        if left < 15:
            not_run.append(label)
            continue
        status, seconds = run_logged([ctx.python, "-m", "fastllm", *args], log, left)
        json_path = Path(args[args.index("--json") + 1])
        rows = json.loads(json_path.read_text())["results"] if json_path.exists() else []
        for row in rows:
            row["run"] = label
        details["results"] += rows
        details["runs"][label] = {"exit": status, "seconds": round(seconds, 1), "rows": len(rows)}
    details["not_run"] = not_run
    failed = [k for k, v in details["runs"].items() if v["exit"] != 0]
    details["targets"] = judge_targets(details["results"], details.get("ceilings", {}))
    summary = (f"{len(details['runs'])} runs, {len(details['results'])} rows"
               + (f"; failed or cut: {', '.join(failed)}" if failed else "")
               + (f"; not run (out of time): {', '.join(not_run)}" if not_run else ""))
    state = "ok" if not failed and not not_run else "failed"
    return StageResult("bench", state, time.time() - begin, summary, details)


def stage_models(ctx: Context) -> StageResult:
    args = models_command(ctx)
    if ctx.dry_run:
        parse_fastllm_args(args)
        return StageResult("models", "dry-run",
                           summary=f"would run: python -m fastllm {shlex.join(args)}")
    log = ctx.logs / "models.log"
    status, seconds = run_logged([ctx.python, "-m", "fastllm", *args], log,
                                 ctx.stage_limit("models", reserve_s=10))
    json_path = ctx.logs / "bench-models.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else None
    state = "ok" if status == 0 else ("timeout" if status is None else "failed")
    return StageResult("models", state, seconds,
                       f"exit {status} in {seconds:.0f} s\n{tail(log, 40)}",
                       {"report": report})


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def git_commit() -> tuple[str, bool]:
    sha = os.environ.get("FASTLLM_COMMIT", "")
    if sha:
        return sha, False
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, cwd=ROOT).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here: pass --commit)", False


# -------------------------------------------------------------------------------- main


STAGE_FUNCTIONS: dict[str, Callable[[Context], StageResult]] = {
    "build": stage_build, "tests": stage_tests, "sanitizer": stage_sanitizer,
    "bench": stage_bench, "models": stage_models,
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="check that every stage's commands exist and parse; run nothing")
    parser.add_argument("--quick", action="store_true", help="the 3-minute subset")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where the report goes (default: benchmarks/results)")
    parser.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--budget", type=float,
                        help="seconds the whole run may take (default 480; --quick 180)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        parser.error(f"--stages: unknown stage {bad[0]!r}; expected a subset of {','.join(STAGES)}")
    args.stages = stages
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.commit:
        os.environ["FASTLLM_COMMIT"] = args.commit
    started = time.time()
    budget = args.budget or (180.0 if args.quick else 480.0)
    gpu = probe_gpu(sys.executable)
    no_gpu = not gpu.get("available")
    dry = args.dry_run
    if no_gpu and not dry:
        print(f"no GPU: torch sees no CUDA device ({gpu}); run with --dry-run to check the "
              "commands", file=sys.stderr)
        return 2
    logs = Path(tempfile.mkdtemp(prefix="fastllm-gpu-check-"))
    ctx = Context(out=args.out, logs=logs, quick=args.quick, dry_run=dry,
                  deadline=started + budget, budget_s=budget, gpu=None if no_gpu else gpu)
    if not dry:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"fastllm GPU check: {gpu.get('name', 'no GPU')}, torch {gpu.get('torch')}, triton "
          f"{gpu.get('triton')}; stages {','.join(args.stages)}; budget {budget:.0f} s"
          + (" (dry run)" if dry else ""), flush=True)
    results: list[StageResult] = []
    for name in args.stages:
        if name == "report":
            continue
        print(f"\n== {name} ==", flush=True)
        begin = time.time()
        try:
            result = STAGE_FUNCTIONS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - a stage's failure must not stop the next
            result = StageResult(name, "failed", summary=f"{type(exc).__name__}: {exc}")
        result.elapsed_s = result.elapsed_s or (time.time() - begin)
        results.append(result)
        print(f"[{name}: {result.status}, {time.time() - begin:.0f} s, "
              f"{time.time() - started:.0f} s in all]\n{result.summary}", flush=True)
    if dry:
        shutil.rmtree(logs, ignore_errors=True)
        failed = [r.name for r in results if r.status == "failed"]
        if failed:
            print(f"\ndry run: FAILED stages: {', '.join(failed)}")
            return 1
        print("\nno GPU: dry run only" if no_gpu else "\ndry run only (a GPU is here: run without --dry-run)")
        return 0
    commit, dirty = git_commit()
    meta = {
        "date": _dt.date.today().isoformat(), "commit": commit, "dirty": dirty, "gpu": gpu,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "command": "bash benchmarks/gpu/run.sh " + shlex.join(sys.argv[1:]),
        "budget_s": budget, "wall_s": time.time() - started,
    }
    stem = f"{meta['date']}-{gpu_slug(gpu)}" + ("-quick" if args.quick else "")
    if "report" in args.stages:
        markdown = render_markdown(meta, results)
        atomic_write(args.out / f"{stem}.md", markdown)
        atomic_write(args.out / f"{stem}.json", json.dumps(
            {"meta": meta, "stages": [dataclasses.asdict(r) for r in results]}, indent=1))
        with tarfile.open(args.out / f"{stem}-logs.tar.gz.tmp", "w:gz") as tar:
            tar.add(logs, arcname=f"{stem}-logs")
        os.replace(args.out / f"{stem}-logs.tar.gz.tmp", args.out / f"{stem}-logs.tar.gz")
        print("\n" + markdown)
        print(f"wrote {args.out / (stem + '.md')}, .json and -logs.tar.gz")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
