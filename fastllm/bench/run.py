"""``fastllm bench``: the benchmark runner.

    fastllm bench [FAMILY ...] [--quick] [--shapes {default,llama3-8b,all}] [--json FILE]
                  [--plot FILE] [--only PATTERN ...] [--device DEVICE] [--backend NAME]
                  [--processes N] [--process-per-case | --in-process] [--no-thp-rerun]
                  [--system-heap] [--statistic {median,fastest}]

``fastllm bench`` times fastllm, torch eager and torch.compile on every case of every
registered family (``fastllm.bench.FAMILIES``; ``fastllm bench norm`` for one) and prints
one table per family, headed by the machine's measured ceilings and its CPU's instruction
sets. fastllm's rows show the path they ran (on the CPU: the instruction-set path of the
family's kernels for the row's dtype, ``fastllm.backend.cpu_kernel_path``). ``--plot FILE``
also draws the speed ratios as a PNG (``fastllm.bench.plot``; needs matplotlib).
``--shapes llama3-8b`` times the families at LLaMA-3-8B's shapes instead of their default
ones, ``--shapes all`` at both (``fastllm.bench.common.SHAPE_SETS``).

Cross-entropy's forward+backward cases also time fastllm with ``inplace_backward=True``
(``fastllm inplace_backward``, shown as ``fastllm[<backend>] inplace_backward``: the
gradient written over the logits, as Liger-Kernel does), on every device.
On a CUDA device the cases have more contenders (``Case.contenders_on``): attention adds
torch's SDPA forced onto its flash and cuDNN backends (``sdpa[flash]``, ``sdpa[cudnn]``; a
backend that refuses a case shows n/a), and every family Liger-Kernel's kernels (``liger``)
where ``liger_kernel`` is importable; the header says whether it was found.

Each family's cases are timed in a fresh ``fastllm bench --in-process`` subprocess (see "A
process that dies" below); ``--in-process`` times them in this process instead, for a
profiler or debugger attached to it. ``--processes N`` times them in N fresh processes and
shows per row the median time and the median of the processes' speedups with their range:
on the CPU a cache-sized case can run at one speed in one process and at another in the
next, which a single process cannot show. Measured (layer_norm fwd 4096 x 1024 float32, one
Granite Rapids-class core, fastllm / eager / torch.compile alternating): in about 3 of 10
processes fastllm's and eager's outputs land in different heap blocks, and fastllm takes
2.2-2.9 ms against eager's 1.4-1.9 (both 1.25-1.45 ms in the other processes, 0.94-1.05x of
each other); where the allocator is started with THP_MEM_ALLOC_ENABLE=1 (every large buffer
2 MiB-aligned) both take 2.25-2.3 ms in all 10 processes, 1.00-1.02x: where the buffers lie
moves both kernels, and fastllm's more.

``--process-per-case`` times each case in a fresh process of its own (in each of the N
rounds): with the family's cases in one process, a case runs on the heap the earlier ones
left behind, and glibc serves a request above its mmap threshold from a free heap chunk
that fits it, which then stays resident for that contender's later calls while another's
output is mapped afresh on every call (two bfloat16 8192 x 4096 norm forwards read 0.35x and
0.74x the better torch in a whole-family run on a Zen 5 core, 1.29x and 1.19x alone). It
costs each case a process start and the ceilings' measurement, a few seconds.

A process that dies: some peers' code crashes the process it runs in (torch 2.14.1's
``torch.compile`` code for the rotary case in float32 corrupts the heap on a Zen 4 core, and
for a bfloat16 cross-entropy under ``ATEN_CPU_CAPABILITY=avx2`` it segfaulted -- perhaps,
as seen later, code cached by a run at another level: see
``fastllm.bench.common.inductor_cache_for_isa``), which in one
process ends the whole run. So a fresh process that dies without results costs only the rows
it takes down: its cases are timed again one per process, and a case whose process still dies
is timed once per contender alone, then with the contenders that survived alone together (so
their ratios are still of one process); the ones that died get a FAILED row with their
process's exit status. (Heap corruption need not crash every time: where every contender
survives alone, the case is timed together once more.) With ``--in-process`` the run ends
there, with the Python stack of the crash on stderr (faulthandler). A family costs its
subprocess a few seconds: its start, torch's import and its own measurement of the ceilings.

The C heap: on the CPU the subprocesses run with glibc's heap kept (``GLIBC_TUNABLES``: never
trimmed, the mmap threshold fixed at 32 MiB, no thread cache or fast bins;
``fastllm.bench.common.HEAP_TUNABLES``), so that where each contender's blocks land in the
heap no longer decides whose outputs are
page-faulted afresh on every call; ``--system-heap`` leaves glibc's defaults, a
``GLIBC_TUNABLES`` that already sets a ``glibc.malloc`` tunable is kept as it is, and the
header says which held. ``--in-process`` runs with whatever this process started with.

Transparent huge pages: torch's CPU allocator reads ``THP_MEM_ALLOC_ENABLE`` once, when the
process starts, so the two settings cannot be compared within one process. On the CPU the
cases whose outputs get fresh pages on every call (see
``fastllm.bench.common.fresh_pages_every_call``) are therefore timed a second time in a
subprocess started with the opposite setting, and every row says which setting it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import fnmatch
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from fastllm.bench import pretrain as pretrain_bench
from fastllm.cli import UsageError

logger = logging.getLogger("fastllm")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastllm bench`` to the command line."""
    from fastllm.bench import FAMILIES, STANDALONE
    from fastllm.bench.common import DEFAULT_SHAPES, SHAPE_SETS, STATISTICS

    bench = subparsers.add_parser(
        "bench",
        help="time fastllm against torch eager and torch.compile",
        description=(
            "Time fastllm, torch eager and torch.compile in the same run and print time, "
            "effective bandwidth, the ratios between them and the machine's copy bandwidth "
            "as the ceiling."
        ),
    )
    bench.add_argument(
        "families", nargs="*", metavar="FAMILY",
        help=f"op families to benchmark (default: all of "
        f"{', '.join(f for f in FAMILIES if f not in STANDALONE)}; "
        f"{', '.join(sorted(STANDALONE))}: whole models against Hugging Face, run alone; "
        "pretrain: fastllm pretrain against a Hugging Face training loop, run alone)",
    )
    bench.add_argument("--quick", action="store_true",
                       help="a smoke run: one small shape, a few timed calls per contender")
    bench.add_argument(
        "--shapes", choices=SHAPE_SETS, default=DEFAULT_SHAPES,
        help="the op families' shapes: default (each family's own; --quick: its small ones), "
        "llama3-8b (LLaMA-3-8B's: hidden 4096, vocab 128256, T 4096, H 32 / Hkv 8, D 128, "
        "intermediate 14336; --quick then only shortens the timing) or all (both)",
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    bench.add_argument(
        "--plot", type=Path, metavar="FILE",
        help="also draw fastllm's speed ratios (vs torch eager and vs torch.compile, per case, "
        "by family, labelled with the path each ran) as a PNG here; needs matplotlib "
        "(pip install 'fastllm[plot]')",
    )
    bench.add_argument(
        "--only", action="append", metavar="PATTERN",
        help="run only the cases whose id matches this glob, e.g. 'rms_norm-fwd-*-float32' "
        "(repeatable; norm ids are <op>-<mode>-<N>x<D>-<dtype>)",
    )
    bench.add_argument(
        "--contenders", action="append", metavar="PATTERN",
        help="time only the contenders whose name matches this glob, e.g. 'fastllm', "
        "'fastllm*' (with its variants, e.g. 'fastllm inplace_backward') or 'sdpa*' "
        "(repeatable; default: every contender; the ratio columns need torch eager "
        "and torch.compile among them)",
    )
    bench.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    bench.add_argument(
        "--backend", choices=("native", "triton", "reference"),
        help="fastllm backend to time (default: FASTLLM_BACKEND, else native; native falls "
        "back to reference, with a warning, when fastllm._C is not built)",
    )
    bench.add_argument(
        "--processes", type=int, default=1, metavar="N",
        help="time each family's cases in N fresh processes, one after the other, and show "
        "per row the median time and the median of the processes' own speedups with their "
        "range (min-max): some CPU cases move between processes by more than within one "
        "(default 1)",
    )
    bench.add_argument(
        "--process-per-case", action="store_true",
        help="time each case in a fresh process of its own (in each of the --processes N "
        "rounds), so that no case runs on a heap that earlier cases left behind (on the CPU a "
        "free heap chunk left by them can hold one contender's large output resident while "
        "another's is mapped afresh every call); a few seconds more per case",
    )
    bench.add_argument(
        "--in-process", action="store_true",
        help="time the op families in this process instead of a fresh one per family (for a "
        "profiler or debugger attached to it); a contender that crashes the process then "
        "ends the run",
    )
    bench.add_argument(
        "--system-heap", action="store_true",
        help="on the CPU, leave glibc's malloc defaults in the timing subprocesses (default: "
        "its heap kept -- never trimmed, fixed mmap threshold, no thread cache or fast bins "
        "-- for every contender alike, through GLIBC_TUNABLES, unless that already sets a "
        "glibc.malloc tunable)",
    )
    bench.add_argument(
        "--statistic", choices=STATISTICS, default="median",
        help="the time each op family's row reports of its contender's timed calls: their "
        "median (default) or the fastest call, the steadier figure for compute-bound cases on a "
        "VM whose neighbours steal cycles in bursts (not for page-fault-bound ones, whose "
        "fastest call is a lucky heap; the contenders are timed in alternation either way)",
    )
    bench.add_argument(
        "--no-thp-rerun", action="store_true",
        help="do not re-time the page-fault-bound CPU cases with the opposite "
        "THP_MEM_ALLOC_ENABLE setting",
    )
    pretrain_bench.add_arguments(bench)
    bench.set_defaults(handler=run)


# ----------------------------------------------------------------------------- run


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    """Whether a case id (--only) or contender name (--contenders) is selected by ``patterns``
    (none: everything)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _run_child(family: str, cases: Sequence, args, backend: str, device, thp: str,
               thp_rerun: bool, what: str, contenders: Optional[Sequence[str]] = None):
    """Times ``cases`` of ``family`` in a fresh ``fastllm bench`` subprocess on ``device``
    whose torch allocator has the THP setting ``thp`` (and which re-times its page-fault-bound
    cases with the other one if ``thp_rerun``), with the contenders that ``contenders`` (else
    ``--contenders``) selects; returns its results (FAILED rows if the subprocess gave none),
    its machine (None if it gave no results) and its other-THP machine (None where it has
    none)."""
    from fastllm.bench.common import THP_ENV, Machine, Result, kept_heap_env

    if contenders is None:
        contenders = args.contenders

    env = dict(os.environ)
    if device.type == "cpu" and not args.system_heap:
        env = kept_heap_env(env)
    if thp == "on":
        env[THP_ENV] = "1"
    else:
        env.pop(THP_ENV, None)
    # the child must import this very fastllm, wherever it was imported from
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="fastllm-bench-") as tmp:
        out = Path(tmp) / "results.json"
        command = [
            sys.executable, "-m", "fastllm", "bench", family, "--in-process",
            "--device", str(device), "--backend", backend, "--json", str(out),
            "--shapes", args.shapes, "--statistic", args.statistic,
            *(["--quick"] if args.quick else []), *([] if thp_rerun else ["--no-thp-rerun"]),
        ]
        for case in cases:
            command += ["--only", case.id]
        for pattern in contenders or []:
            command += ["--contenders", pattern]
        logger.info("%s: timing %d cases %s", family, len(cases), what)
        completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=False)
        if out.exists():
            report = json.loads(out.read_text())
            other = report.get("other_thp_machine")
            return ([Result(**r) for r in report["results"]], Machine(**report["machine"]),
                    Machine(**other) if other else None)
    error = f"the subprocess timing {what} exited with status {completed.returncode}, no results"
    logger.error("%s: %s", family, error)
    failed = [
        Result.of(family, case, contender, backend=backend, device=str(device), thp=thp,
                  error=error)
        for case in cases for contender in case.contenders_on(device)
        if _matches(contender, contenders)
    ]
    return failed, None, None


def _run_isolating(run, cases: Sequence, device, contenders: Optional[Sequence[str]],
                   what: str):
    """``run(cases, contenders, what)`` (a ``_run_child`` with the rest of its arguments
    bound), and where that process dies without results, again so that only the rows it
    takes down are lost (the module docstring): each case in a process of its own, then a
    case that still dies once per contender alone and its survivors together. Returns what
    ``_run_child`` returns; the machine is None only if no process gave results."""
    import glob

    results, machine, other = run(cases, contenders, what)
    if machine is not None:
        return results, machine, other
    if len(cases) > 1:
        logger.warning("the process timing %s died: timing each of its %d cases in a process "
                       "of its own", what, len(cases))
        results, machine, other = [], None, None
        for case in cases:
            part, part_machine, part_other = _run_isolating(
                run, [case], device, contenders, f"{what}, {case.id} alone")
            results += part
            machine, other = machine or part_machine, other or part_other
        return results, machine, other
    (case,) = cases
    names = [n for n in case.contenders_on(device) if _matches(n, contenders)]
    if len(names) < 2:
        return results, None, None
    logger.warning("the process timing %s died: timing each contender alone", what)
    alone = {n: run(cases, [glob.escape(n)], f"{what}, {n} alone") for n in names}
    survivors = [n for n in names if alone[n][1] is not None]
    if len(survivors) == len(names):  # none to blame (a crash that comes and goes): once more
        again = run(cases, contenders, f"{what}, again")
        return again if again[1] is not None else (results, None, None)
    if not survivors:
        return results, None, None
    died = [n for n in names if n not in survivors]
    together, machine, other = run(cases, [glob.escape(n) for n in survivors],
                                   f"{what}, without {', '.join(died)}")
    if machine is None:
        return results, None, None
    died_rows = [dataclasses.replace(alone[n][0][0], error=f"{alone[n][0][0].error} (the other "
                                     "rows were timed without it)") for n in died]
    order = {n: i for i, n in enumerate(names)}
    rows = sorted(together + died_rows,
                  key=lambda r: (r.thp != together[0].thp, order[r.contender]))
    return rows, machine, other


def _time_family(run, cases: Sequence, device, contenders: Optional[Sequence[str]],
                 processes: int, per_case: bool):
    """A family's ``cases`` timed ``processes`` times over, each time in fresh processes
    (``run``: ``_run_child`` with the rest of its arguments bound, through
    ``_run_isolating``): all of them in one process, or with ``per_case`` each case in a
    process of its own. Returns the runs' results (one list per round, for
    ``merge_processes``), the first machine that gave results and the first other-THP one."""
    runs, machine, other = [], None, None
    for i in range(processes):
        what = f"in fresh process {i + 1} of {processes}" if processes > 1 else "in a fresh process"
        groups = [[case] for case in cases] if per_case else [list(cases)]
        results = []
        for group in groups:
            part, part_machine, part_other = _run_isolating(
                run, group, device, contenders,
                what=f"({group[0].id}) {what}" if per_case else what)
            results += part
            machine, other = machine or part_machine, other or part_other
        runs.append(results)
    return runs, machine, other


def _run_with_other_thp(family: str, cases: Sequence, args, backend: str, thp_now: str):
    """Times ``cases`` in a subprocess whose torch allocator has the opposite THP setting;
    returns its results (FAILED rows if the subprocess gave none) and its machine."""
    import torch

    other = "off" if thp_now == "on" else "on"
    results, machine, _ = _run_child(
        family, cases, args, backend, torch.device("cpu"), other, thp_rerun=False,
        what=f"again, the page-fault-bound ones, with THP {other} in a subprocess")
    return results, machine


def _header(machine, other_machine, backend_note: str, budget, rerun_note: str) -> str:
    import torch

    from fastllm.bench.common import describe_cpu_isa, gemm_size, liger_note

    lines = [
        f"fastllm bench on {machine.device} ({machine.device_name}), torch {machine.torch_version}, "
        f"{machine.threads} threads (torch.get_num_threads())",
        f"fastllm timed on backend: {backend_note}",
    ]
    if not machine.device.startswith("cuda"):
        lines.append(describe_cpu_isa(machine.cpu_isa, machine.cpu_isa_cap,
                                      machine.torch_cpu_isa))
    for dtype, rate in (machine.gemm_gflops or {}).items():
        n = (machine.gemm_n or {}).get(dtype, gemm_size(torch.device(machine.device)))
        lines.append(f"{dtype} GEMM ceiling (torch.mm of {n} x {n} {dtype} matrices, best of "
                     f"several; the ceiling of {dtype} rows): {rate:.1f} GFLOP/s")
    if machine.device.startswith("cuda"):
        lines.append(liger_note())
        lines.append(f"copy bandwidth ceiling (copy_ of 256 MiB, read + write): {machine.copy_gbs:.1f} GB/s")
    else:
        ceilings = [f"{machine.copy_gbs:.1f} GB/s (THP {machine.thp})"]
        touches = [f"{machine.first_touch_gbs:.1f} GB/s (THP {machine.thp})"]
        if other_machine is not None:
            ceilings.append(f"{other_machine.copy_gbs:.1f} GB/s (THP {other_machine.thp}, subprocess)")
            touches.append(f"{other_machine.first_touch_gbs:.1f} GB/s (THP {other_machine.thp}, subprocess)")
        lines += [
            f"copy bandwidth ceiling (copy_ between 256 MiB buffers, read + write): {', '.join(ceilings)}",
            f"first touch of a fresh 128 MiB tensor (torch.empty(n).fill_(1)): {', '.join(touches)}",
            f"THP (torch's THP_MEM_ALLOC_ENABLE=1) in this run: {machine.thp}; "
            f"kernel transparent_hugepage mode: {machine.kernel_thp_mode}",
        ]
        if machine.cpu_fresh_pages:
            lines.append("fastllm's CPU kernels, large fresh outputs: " + machine.cpu_fresh_pages)
        if machine.cpu_output_stores:
            lines.append("fastllm's CPU kernels, large outputs: " + machine.cpu_output_stores)
        if machine.cpu_output_cache:
            lines.append("fastllm's CPU kernels, output memory: " + machine.cpu_output_cache)
        if machine.heap:
            lines.append("C heap (glibc malloc) in this run: " + machine.heap)
        if rerun_note:
            lines.append(rerun_note)
    lines += [
        f"time: {budget.statistic} of >= {budget.min_repeats} calls "
        f"(and >= {budget.min_time_s:g} s of calls) "
        "after warm-up; GB/s: unavoidable bytes read + written once / time; % copy: of the ceiling "
        "measured under the row's THP setting; GFLOP/s (compute-bound families, instead of GB/s): "
        "the family's FLOP count / time; % GEMM: of torch's GEMM rate in the row's dtype;",
        "vs eager / vs compile: torch eager time / this time, torch.compile time / this time "
        "(> 1 is faster); peak MiB: memory one call needs above its inputs;",
        "path (fastllm's rows): what ran: on the CPU the instruction-set path of the family's "
        "kernels for the row's dtype (amx-bf16, amx-fp16, amx-bf16x6, avx512-bf16, avx512, "
        "avx2, scalar), else cuda, triton or reference",
    ]
    return "\n".join(lines)


def _check_plot(path: Path, own_runners: Sequence[str]) -> None:
    """Refuses --plot before minutes of timing rather than after: for a family with its own
    runner, into a directory that does not exist, or without matplotlib."""
    from fastllm.bench.plot import require_matplotlib

    if own_runners:
        raise UsageError(f"--plot draws the op families' speed ratios; {own_runners[0]} runs "
                         "its own benchmark without them")
    if not path.parent.is_dir():
        raise UsageError(f"--plot: the directory of {path} does not exist")
    try:
        require_matplotlib()
    except RuntimeError as exc:
        raise UsageError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """``fastllm bench``'s handler; returns the exit status (1 if any run failed)."""
    import torch

    from fastllm.bench import FAMILIES, STANDALONE, load_family
    from fastllm.bench.common import INDUCTOR_CACHE_ENV, inductor_cache_for_isa

    # Before anything compiles; the subprocesses inherit it.
    isa_cache = inductor_cache_for_isa(dict(os.environ))
    if isa_cache is not None:
        os.environ[INDUCTOR_CACHE_ENV] = isa_cache

    if args.plot is not None:
        own_runners = STANDALONE | {pretrain_bench.FAMILY}
        _check_plot(args.plot, [name for name in args.families if name in own_runners])
    from fastllm.bench.common import DEFAULT_SHAPES

    own_cases = [name for name in args.families if name in STANDALONE | {pretrain_bench.FAMILY}]
    if own_cases and args.shapes != DEFAULT_SHAPES:
        raise UsageError(f"--shapes picks the op families' shapes; {own_cases[0]} has its own "
                         "cases")
    if own_cases and args.processes != 1:
        raise UsageError(f"--processes times the op families in fresh processes; {own_cases[0]} "
                         "has its own runner (pretrain: --repeats)")
    if own_cases and args.process_per_case:
        raise UsageError(f"--process-per-case times the op families' cases; {own_cases[0]} "
                         "has its own runner")
    if own_cases and args.in_process:
        raise UsageError(f"--in-process times the op families in this process; {own_cases[0]} "
                         "has its own runner")
    if own_cases and args.contenders:
        raise UsageError(f"--contenders picks among the op families' contenders; {own_cases[0]} "
                         "has its own")
    if pretrain_bench.FAMILY in args.families:  # its own runner and options, run alone
        if len(args.families) > 1:
            raise UsageError("pretrain runs alone: fastllm bench pretrain [options]")
        return pretrain_bench.run(args)
    pretrain_bench.check_unused(args)
    standalone = [name for name in args.families if name in STANDALONE]
    if standalone:
        if len(args.families) > 1:
            raise UsageError(f"{standalone[0]} runs alone: fastllm bench {standalone[0]} "
                             "[options]")
        return load_family(standalone[0]).run(args)

    from fastllm.bench.common import (
        GLIBC_MMAP_THRESHOLD_MAX, MiB, Result, TimingBudget, fill_ratios,
        fresh_pages_every_call, measure_machine, merge_processes, not_available,
        resolve_backend, results_table, dtype_name, gemm_ceiling_size, gemm_gflops, run_cases,
        thp_setting,
    )

    if args.processes < 1:
        raise UsageError(f"--processes must be at least 1, got {args.processes}")
    if args.in_process and args.processes != 1:
        raise UsageError(f"--in-process times the cases in this one process; --processes "
                         f"{args.processes} asks for {args.processes} fresh ones")
    if args.in_process and args.process_per_case:
        raise UsageError("--in-process times the cases in this one process; --process-per-case "
                         "asks for a fresh one per case")
    if args.in_process and args.system_heap:
        raise UsageError("--system-heap sets up the timing subprocesses; --in-process times in "
                         "this process, whose heap is what it started with")

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = []  # (family name, family module, its selected cases)
    for name in args.families or [f for f in FAMILIES if f not in STANDALONE]:
        try:
            family = load_family(name)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        selected = [case for case in family.cases(args.quick, args.shapes, device)
                    if _matches(case.id, args.only)]
        if selected:
            plan.append((name, family, selected))
        else:
            logger.info("%s: no case matches --only", name)
    if not plan:
        raise UsageError(f"no case matches --only {' '.join(args.only or [])}")
    if args.contenders:
        names = {c for _, _, selected in plan for case in selected for c in case.contenders_on(device)}
        if not any(fnmatch.fnmatchcase(n, p) for n in names for p in args.contenders):
            raise UsageError(f"--contenders {' '.join(args.contenders)} matches none of this "
                             f"run's contenders on {device}: {', '.join(sorted(names))}")

    try:
        backend, backend_note = resolve_backend(args.backend, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    budget = TimingBudget.quick() if args.quick else TimingBudget.full()
    budget = dataclasses.replace(budget, statistic=args.statistic)

    def measure():
        logger.info("measuring the copy bandwidth and first-touch ceilings on %s", device)
        measured = measure_machine(device, args.quick)
        flop_dtypes = {case.dtype for _, _, selected in plan for case in selected
                       if hasattr(case, "flops")}
        if flop_dtypes:  # float32 first, always: the reference ceiling
            measured.gemm_gflops, measured.gemm_n = {}, {}
            for dtype in [torch.float32, *sorted(flop_dtypes - {torch.float32}, key=str)]:
                logger.info("measuring the %s GEMM ceiling on %s", dtype_name(dtype), device)
                n = gemm_ceiling_size(device, dtype)
                measured.gemm_n[dtype_name(dtype)] = n
                measured.gemm_gflops[dtype_name(dtype)] = gemm_gflops(
                    device, dtype, n=n, repeats=2 if args.quick else 5)
        return measured

    other_machine = None
    sections: list[tuple[str, Sequence[str], list[Result]]] = []
    any_rerun = False
    if not args.in_process:
        # Every family's cases in N fresh processes, one after the other (each measures its
        # own ceilings; the header shows the first one's), merged row by row.
        machine, thp_now = None, thp_setting(device)
        for name, family, selected in plan:

            def run_child(cases, contenders, what, name=name):
                return _run_child(name, cases, args, backend, device, thp_now,
                                  thp_rerun=not args.no_thp_rerun, what=what,
                                  contenders=contenders)

            runs, child, child_other = _time_family(
                run_child, selected, device, args.contenders, args.processes,
                args.process_per_case)
            machine, other_machine = machine or child, other_machine or child_other
            results = merge_processes(runs)
            any_rerun = any_rerun or any(r.thp != thp_now for r in results)
            sections.append((name, family.PARAM_COLUMNS, results))
        machine = machine or measure()  # every process failed: the header still has one
    else:
        # A contender that crashes this process (see "A process that dies" above) ends the
        # run; the Python stack on stderr then says whose code it was.
        try:
            faulthandler.enable(file=sys.__stderr__)
        except (AttributeError, ValueError, OSError):  # no real stderr: go on without it
            pass
        machine = measure()
        for name, family, selected in plan:
            logger.info("%s: %d cases (THP %s)", name, len(selected), machine.thp)
            results = run_cases(name, selected, kernel_family=family.KERNEL_FAMILY,
                                device=device, backend=backend, budget=budget,
                                copy_gbs=machine.copy_gbs, gemm_gflops=machine.gemm_gflops,
                                contenders=args.contenders,
                                first_touch_gbs=machine.first_touch_gbs)
            fault_bound = [c for c in selected
                           if fresh_pages_every_call(device, c.largest_output_bytes())]
            if fault_bound and not args.no_thp_rerun:
                any_rerun = True
                other_results, child_machine = _run_with_other_thp(
                    name, fault_bound, args, backend, machine.thp)
                other_machine = child_machine or other_machine
                order = {case.id: i for i, case in enumerate(selected)}
                # each case's rows for this run's setting, then its rows for the other
                results = sorted(results + other_results, key=lambda r: order[r.case])
                fill_ratios(results)
            sections.append((name, family.PARAM_COLUMNS, results))

    if other_machine is not None:
        rates = sorted([machine.first_touch_gbs, other_machine.first_touch_gbs])
        if rates[1] < 1.3 * rates[0]:
            logger.warning(
                "THP_MEM_ALLOC_ENABLE changed the first-touch rate only from %.1f to %.1f GB/s "
                "(kernel transparent_hugepage mode: %s)", rates[0], rates[1], machine.kernel_thp_mode,
            )
    rerun_note = ""
    if any_rerun:
        rerun_note = (
            f"cases with outputs of {GLIBC_MMAP_THRESHOLD_MAX // MiB} MiB or more get fresh pages on "
            "every call (page-fault bound): they are shown with both THP settings"
        )
    if any(r.touch_floor_s is not None for _, _, results in sections for r in results):
        rerun_note = "\n".join(filter(None, [rerun_note, (
            f"% touch (cases whose results include tensors of {GLIBC_MMAP_THRESHOLD_MAX // MiB} "
            "MiB or more, which get fresh pages on every call): the first touch of those results alone, "
            "at the process's first-touch rate, against the row's time -- how close it is to "
            "the page-fault floor of what it must return (-: a contender that returns none, "
            "e.g. a gradient written over its input, or whose results reuse memory: fastllm's "
            "CPU kernels with their output cache)")]))
    if args.process_per_case:
        rerun_note = "\n".join(filter(None, [rerun_note, (
            "--process-per-case: each case timed in a fresh process of its own (no heap left "
            "behind by earlier cases)")]))
    if args.processes > 1:
        rerun_note = "\n".join(filter(None, [rerun_note, (
            f"--processes {args.processes}: each case timed in {args.processes} fresh processes; "
            "time ms: the median of theirs; vs eager / vs compile: the median of each "
            "process's own ratio, (min-max) over the processes; ceilings: the first process's")]))
    print(_header(machine, other_machine, backend_note, budget, rerun_note))
    for name, columns, results in sections:
        print(f"\n== {name} ==")
        print(results_table(results, columns))
    wall = time.perf_counter() - started
    print(f"\nwall time: {wall:.0f} s")

    all_results = [r for _, _, results in sections for r in results]
    if args.json:
        report = {
            "machine": dataclasses.asdict(machine),
            "other_thp_machine": dataclasses.asdict(other_machine) if other_machine else None,
            "backend": backend,
            "quick": args.quick,
            "shapes": args.shapes,
            "statistic": args.statistic,  # each result's time_s: the median or fastest call
            "wall_time_s": wall,
            "results": [dataclasses.asdict(r) for r in all_results],
        }
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot is not None:
        from fastllm.bench.plot import write_plot

        title = (f"fastllm bench on {machine.device} ({machine.device_name}), "
                 f"{machine.threads} threads, torch {machine.torch_version}")
        logger.info("wrote the ratio plot to %s", write_plot(all_results, args.plot, title))
    failed = [r for r in all_results if r.error is not None and not not_available(r)]
    if failed:
        logger.error("%d runs failed (see the FAILED rows)", len(failed))
        return 1
    return 0

