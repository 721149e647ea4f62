"""What every ``fastllm bench`` family shares: the timing rule, the machine's ceilings,
peak memory, the result record, the table and the cases' contender plumbing (``Case``).

Timing rule (every family, every contender, the same):
  * compile-style set-up (``torch.compile``) happens once per case, before timing;
  * warm-up: at least one call and at least ``warmup_s`` of calls, not timed;
  * then calls are timed one by one until at least ``min_repeats`` calls *and*
    ``min_time_s`` seconds have been measured (or ``max_repeats`` calls); the reported
    time is the median call (``fastllm bench --statistic fastest``: the fastest call, the
    steadier figure where a VM's neighbours steal cycles in bursts). A case whose calls take
    a second still gets ``min_repeats`` calls: nothing is cut short silently, the budget is
    set per case by these numbers.
  * the contenders of one case are timed in alternation (``time_interleaved``): one call
    of each in turn, round after round, each until its own rule above is met. On a
    machine whose speed drifts (a shared host, a neighbour's load, clock changes) every
    contender then samples the same slow and fast spells, so their ratio holds even
    where the absolute times move; timed one after the other, a spell that hit only one
    of them would show up as a speed-up or a slow-down that is not there.
  * CPU calls are timed with ``time.perf_counter``; CUDA calls with CUDA events, so a GPU
    number is only ever a GPU measurement. The garbage collector is off while timing.
  * Caches are not flushed between calls: a norm's input is usually what the previous op
    just wrote, and flushing a CPU's last-level cache costs more than the ops measured.

Ceilings: the copy bandwidth is ``dst.copy_(src)`` between two preallocated 256 MiB
buffers (best of several), counting the bytes read plus the bytes written — the same
accounting as the effective bandwidth of an op. The first-touch rate times
``torch.empty(n).fill_(1)`` on fresh memory: on the CPU that is bound by page faults,
which is what ops allocating large fresh outputs pay (see ``fresh_pages_every_call``).

Peak memory: of a contender's second call, so that one-time allocations (the GEMM
library's kernels and scratch space, torch.compile's compilation) count for no contender
(measured on the first call, they fell to whichever contender of a case ran first). On Linux
CPUs, the peak resident set size (``VmHWM``) is reset through
``/proc/self/clear_refs`` before that untimed call, after ``malloc_trim(0)`` has returned
freed heap memory to the system and ``fastllm.backend.empty_cpu_output_cache()`` the free
blocks fastllm's CPU kernels keep for their large outputs (so that fastllm's outputs count
as new memory, not as blocks kept from its first call); the increase of ``VmHWM`` over the
RSS before the call is what the call needed (it sees torch's CPU allocations, unlike
``ru_maxrss`` which never goes down). On CUDA: ``torch.cuda.max_memory_allocated`` over the
allocation before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fnmatch
import gc
import importlib.metadata
import importlib.util
import logging
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from tqdm import tqdm

from fastllm.backend import use_backend

logger = logging.getLogger(__name__)

MiB = 1 << 20

# Contender names, shared by every family (ratios are computed against the two torch ones).
FASTLLM = "fastllm"
EAGER = "torch eager"
COMPILE = "torch.compile"
CONTENDERS = (FASTLLM, EAGER, COMPILE)
# Liger-Kernel's Triton ops, a peer on CUDA devices where the package is importable
LIGER = "liger"

CPU = torch.device("cpu")

# ``fastllm bench --shapes``: which shape sets the op families' cases use. "default": the
# shapes each family was designed around (``--quick``: its small ones); "llama3-8b": the
# real-model shapes of LLaMA-3-8B (hidden 4096, vocab 128256, T 4096, H 32 / Hkv 8, D 128,
# intermediate 14336), whatever ``--quick`` says (it then only shortens the timing); "all":
# both.
DEFAULT_SHAPES = "default"
LLAMA3_8B = "llama3-8b"
SHAPE_SETS = (DEFAULT_SHAPES, LLAMA3_8B, "all")


def shape_sets(shapes: str) -> tuple[bool, bool]:
    """(the default set?, the LLaMA-3-8B set?) for the ``--shapes`` choice ``shapes``."""
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes must be one of {', '.join(SHAPE_SETS)}; got {shapes!r}")
    return shapes != LLAMA3_8B, shapes != DEFAULT_SHAPES


def pick_shapes(shapes: str, quick: bool, default: Sequence, quick_default: Sequence,
                llama3_8b: Sequence) -> list:
    """A family's shapes for the ``--shapes`` choice ``shapes`` (see SHAPE_SETS): the
    default ones (``quick``: the small ones), then LLaMA-3-8B's not already among them."""
    with_default, with_llama = shape_sets(shapes)
    picked = list(quick_default if quick else default) if with_default else []
    if with_llama:
        picked += [shape for shape in llama3_8b if shape not in picked]
    return picked


def liger_available() -> bool:
    """Whether Liger-Kernel (``liger_kernel``) can be imported here; it is not imported."""
    return importlib.util.find_spec("liger_kernel") is not None


def liger_note() -> str:
    """The header's line on Liger-Kernel (CUDA runs): its version, or that it was not found."""
    if not liger_available():
        return "Liger-Kernel: not found (no liger rows)"
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        version = "version unknown"
    return f"Liger-Kernel: {version} (the liger rows)"


def liger_peer(device: torch.device, fn: Callable) -> dict[str, Callable]:
    """``{LIGER: fn}`` on a CUDA device where Liger-Kernel is importable, else ``{}``
    (Liger-Kernel is Triton on CUDA only). ``fn`` imports liger_kernel itself, when called."""
    return {LIGER: fn} if device.type == "cuda" and liger_available() else {}


def liger_module(name: str = "liger_kernel.transformers.functional") -> Any:
    """A module of Liger-Kernel, by default its functional API (whose wrappers pass the right
    positional arguments to its autograd Functions in each version). An installation that
    cannot be imported raises NotImplementedError (the runner's n/a) with the reason."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise NotImplementedError(f"{name} cannot be imported: {exc}") from exc


def liger_functional() -> Any:
    """``liger_kernel.transformers.functional`` (``liger_module``)."""
    return liger_module()

# glibc serves an allocation above its mmap threshold with a fresh mmap and unmaps it on
# free; the threshold adapts upwards but never beyond 32 MiB on 64-bit Linux
# (DEFAULT_MMAP_THRESHOLD_MAX). So on the CPU an op whose output reaches this (a tensor of
# exactly 32 MiB, with its alignment and glibc's header, is above it) gets fresh pages, and
# pays their first-touch page faults, on every call. Smaller allocations may or may not be
# recycled from the heap, depending on the allocation history.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB

# The bench's CPU subprocesses keep glibc's heap (``fastllm bench --system-heap`` leaves its
# defaults): glibc gives memory at the top of its heap back to the kernel whenever more than
# its trim threshold lies free there (32 MiB once a 16 MiB block has been mmapped and freed),
# so a case whose outputs are 16-32 MiB had some contenders' outputs page-faulted afresh on
# every call and others' not, depending only on where each contender's blocks landed (float32
# layer_norm / add_layer_norm 4096 x 1024 forwards, one Zen 5 core: each fastllm and
# torch.compile call 4060-4096 page faults and 6.6-8.9 ms, eager's none and 1.0-2.0 ms; with
# these settings no call faults -- benchmarks/micro/bench_call_faults.py, record
# benchmarks/results/2026-12-06-cpu-norm-call-faults-zen5.txt). With them the heap is never
# trimmed and the mmap threshold is fixed at its usual ceiling, so every contender's repeated
# outputs of up to 32 MiB reuse resident memory, alike. Larger ones are fresh mappings on
# every call (fresh_pages_every_call) -- unless a free heap chunk fits one (glibc serves a
# request above the mmap threshold from the heap when it can: earlier cases' freed blocks,
# coalesced), which then stays resident for that contender's later calls while another's
# output is mapped afresh: two bfloat16 8192 x 4096 norm forwards read 0.35x / 0.74x in a
# whole-bench run and 1.29x / 1.19x alone (records 2026-12-06-cpu-1thread-norm-zen5-prefetch-
# and ...-norm-8192x4096-bf16-fwd-zen5-alone-3processes.txt). ``fastllm bench
# --process-per-case`` gives each case a fresh process, so no earlier case leaves such chunks.
# glibc's thread cache and fast bins are off as well: torch allocates with posix_memalign(64),
# and in a fresh process a freed 8-31 MiB block of it was never refitted by the next tensor of
# its size (page-faulted afresh in every round) while malloc's was -- presumably as the aligned
# request is larger than the block it frees, and a small remainder split off behind the block
# sits in those caches, allocated, so the block cannot join the heap's top; with both off
# every size refits from the second round (benchmarks/micro/heap_refit_probe.py, record
# 2026-12-06-cpu-heap-refit-probe-zen5.txt), and
# the float32 4096 x 1024 norm forwards' ratios moved less between processes (layer_norm
# 1.16-1.84x eager -> 1.85-1.93x); small allocations get slower for every contender alike
# (a 43-83 us decode attention call +4 % for fastllm and eager both: record
# 2026-12-06-cpu-1thread-norm-decode-zen5-heap-tcache-ab-3processes.txt).
HEAP_TUNABLES = (
    ("glibc.malloc.trim_threshold", str(1 << 40)),
    ("glibc.malloc.mmap_threshold", str(GLIBC_MMAP_THRESHOLD_MAX)),
    ("glibc.malloc.tcache_count", "0"),
    ("glibc.malloc.mxfast", "0"),
)
GLIBC_TUNABLES_ENV = "GLIBC_TUNABLES"
# HEAP_TUNABLES as GLIBC_TUNABLES spells them
HEAP_TUNABLES_VALUE = ":".join(f"{name}={value}" for name, value in HEAP_TUNABLES)


def _malloc_tunables(value: str) -> list[str]:
    return [t for t in value.split(":") if t.startswith("glibc.malloc.")]


def kept_heap_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with HEAP_TUNABLES added to its GLIBC_TUNABLES, unless that already sets a
    ``glibc.malloc.*`` tunable (the user's choice then stands, and the header shows it)."""
    current = env.get(GLIBC_TUNABLES_ENV, "")
    if _malloc_tunables(current):
        return dict(env)
    return {**env, GLIBC_TUNABLES_ENV: ":".join(filter(None, [current, HEAP_TUNABLES_VALUE]))}


def system_heap_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the ``glibc.malloc.*`` tunables taken out of its GLIBC_TUNABLES (the
    others stay): glibc's malloc defaults."""
    env = dict(env)
    current = env.pop(GLIBC_TUNABLES_ENV, "")
    malloc = set(_malloc_tunables(current))
    others = [t for t in current.split(":") if t and t not in malloc]
    if others:
        env[GLIBC_TUNABLES_ENV] = ":".join(others)
    return env


def heap_setting() -> str:
    """This process's C heap, as the header shows it (glibc reads GLIBC_TUNABLES once, at
    start-up, so the environment says what it runs with)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: its allocator's own policy"
    malloc = _malloc_tunables(os.environ.get(GLIBC_TUNABLES_ENV, ""))
    if sorted(malloc) == sorted(_malloc_tunables(HEAP_TUNABLES_VALUE)):
        return (f"kept for every contender ({GLIBC_TUNABLES_ENV}={':'.join(malloc)}: never "
                "trimmed, no thread cache or fast bins, so repeated outputs under 32 MiB reuse "
                "resident memory; larger ones are "
                "fresh mappings every call unless a free heap chunk left by earlier cases fits "
                "one -- --process-per-case leaves none --; --system-heap: glibc's defaults)")
    if malloc:
        return f"as {GLIBC_TUNABLES_ENV} sets it: {':'.join(malloc)}"
    return ("glibc's defaults (trimmed when 32 MiB lie free at its top: which contender's "
            "outputs of 16-32 MiB are then page-faulted afresh on every call depends on where "
            "they landed)")


THP_ENV = "THP_MEM_ALLOC_ENABLE"


# What a row's time is of its contender's timed calls: their median (the default), or the
# fastest: on a Firecracker guest whose neighbours stole cycles in bursts, the medians of one
# attention forward moved 46-75 GFLOP/s from one process to the next, the fastest calls
# 74-80 (benchmarks/results/2026-12-07-cpu-attention-fastllm-vs-sdpa-min-zen3.txt). Not for
# page-fault-bound cases: their calls' faults vary with the heap, and the fastest call is a
# lucky heap (torch eager's cross-entropy fwd+bwd there: median 2901 ms, fastest 1255).
STATISTICS = ("median", "fastest")


@dataclasses.dataclass(frozen=True)
class TimingBudget:
    warmup_s: float  # warm-up: at least one call and at least this long
    min_repeats: int  # timed calls: at least this many ...
    min_time_s: float  # ... and at least this long in total ...
    max_repeats: int  # ... but never more than this many
    # the time reported of a contender's calls: "median" or "fastest" (STATISTICS)
    statistic: str = "median"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}; "
                             f"got {self.statistic!r}")

    @classmethod
    def full(cls) -> "TimingBudget":
        return cls(warmup_s=0.05, min_repeats=5, min_time_s=0.3, max_repeats=100)

    @classmethod
    def quick(cls) -> "TimingBudget":
        return cls(warmup_s=0.01, min_repeats=3, min_time_s=0.02, max_repeats=10)


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    fastest_s: float
    repeats: int

    def seconds(self, statistic: str) -> float:
        """The time that ``statistic`` (one of STATISTICS) reports."""
        return self.fastest_s if statistic == "fastest" else self.median_s


def _call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def time_interleaved(
    calls: Sequence[Callable[[], object]], device: torch.device, budget: TimingBudget
) -> list[Union[Timing, Exception]]:
    """Times already warmed-up ``calls`` (one per contender of a case) in alternation: each
    round calls every contender that still needs samples once, until each has the samples
    the module's timing rule asks for (``budget``). Returns per call its Timing, or the
    exception its call raised (that contender then leaves the rounds; the others go on)."""
    samples: list[list[float]] = [[] for _ in calls]
    failed: dict[int, Exception] = {}

    def needs_more(i: int) -> bool:
        taken = samples[i]
        return i not in failed and len(taken) < budget.max_repeats and (
            len(taken) < budget.min_repeats or sum(taken) < budget.min_time_s)

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            pending = [i for i in range(len(calls)) if needs_more(i)]
            if not pending:
                break
            for i in pending:
                try:
                    samples[i].append(_call_seconds(calls[i], device))
                except Exception as exc:  # recorded for that contender; the others go on
                    failed[i] = exc
    finally:
        if gc_was_enabled:
            gc.enable()
    return [failed[i] if i in failed else
            Timing(median_s=statistics.median(samples[i]), fastest_s=min(samples[i]),
                   repeats=len(samples[i]))
            for i in range(len(calls))]


def compile_once(fn: Callable) -> Callable:
    """``torch.compile(fn)`` (inductor, static shapes) for one case. Dynamo's cache is reset
    first: it is keyed by the code object, so the cases of one function would otherwise
    pile up recompiles until dynamo's recompile limit silently falls back to eager.
    ``fullgraph=True`` turns a graph break into an error instead of a slower number."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, fullgraph=True)


# ------------------------------------------------------------------ machine ceilings


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * MiB, repeats: int = 5) -> float:
    """Best ``dst.copy_(src)`` rate between two preallocated buffers, in GB/s counting the
    bytes read and the bytes written (2 * nbytes per copy)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    best = math.inf
    dst.copy_(src)  # touch every page of both buffers before timing
    for _ in range(repeats):
        best = min(best, _call_seconds(lambda: dst.copy_(src), device))
    return 2 * nbytes / best / 1e9


def first_touch_gbs(device: torch.device, nbytes: int = 128 * MiB, repeats: int = 3) -> float:
    """Best rate of ``torch.empty(n).fill_(1)`` on a fresh allocation, in GB/s written."""
    numel = nbytes // 4
    best = math.inf
    for _ in range(repeats):
        best = min(
            best,
            _call_seconds(lambda: torch.empty(numel, device=device).fill_(1), device),
        )
    return nbytes / best / 1e9


def gemm_size(device: torch.device) -> int:
    """n of the ceiling's (n, n) GEMM: 2048 on the CPU; 8192 on a GPU, where a 2048 product
    (17 GFLOP, tens of microseconds) would leave the matrix units partly idle."""
    return 2048 if device.type == "cpu" else 8192


# The longest one product of a GEMM ceiling may take (gemm_ceiling_size). A dtype the CPU has
# no matrix hardware for runs torch's reference loop: float16 on a Zen 5 core (no AVX512-FP16,
# no AMX-FP16) took 65 s for one 2048 x 2048 product, 0.26 GFLOP/s, so its ceiling at the
# usual size cost the attention bench over 6 minutes in every process.
GEMM_CEILING_MAX_CALL_S = 0.5
# the smallest n the ceiling falls back to, and the size it probes a dtype's rate at
GEMM_PROBE_SIZE = 256


def gemm_ceiling_size(device: torch.device, dtype: torch.dtype = torch.float32,
                      max_call_s: float = GEMM_CEILING_MAX_CALL_S) -> int:
    """n of the (n, n) GEMM that ``gemm_gflops`` times in ``dtype``: ``gemm_size(device)``,
    halved while one product would take longer than ``max_call_s`` at the rate a
    ``GEMM_PROBE_SIZE`` product runs (at least that size). A slow dtype's rate from a smaller
    product is still its rate (the header names the size); a fast one keeps the full size."""
    n = gemm_size(device)
    if device.type != "cpu" or n <= GEMM_PROBE_SIZE:
        return n
    a = torch.randn(GEMM_PROBE_SIZE, GEMM_PROBE_SIZE, device=device).to(dtype)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)  # load the BLAS kernels
    probe = _call_seconds(lambda: torch.mm(a, a, out=out), device)
    # the cube law from the probe: a fast library's small products run below its large
    # ones' rate, so a fast dtype keeps its size; torch's reference loop runs its small ones
    # faster (float16 on the Zen 5 core: 1.6 GFLOP/s at 256, 0.26 at 2048), so a slow dtype's
    # product can take a few times max_call_s, not minutes
    while n > GEMM_PROBE_SIZE and probe * (n / GEMM_PROBE_SIZE) ** 3 > max_call_s:
        n //= 2
    return n


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: Optional[int] = None,
                repeats: int = 5) -> float:
    """Best ``torch.mm`` rate in ``dtype`` of two preallocated (n, n) matrices into a
    preallocated output, in GFLOP/s (2 * n**3 flops per product): the compute ceiling of a
    GEMM-bound op in that dtype (bfloat16: oneDNN on AMX tiles where the CPU has them). A
    square product this size runs near the BLAS library's peak; an op's skinnier products
    (attention's (T x D) by (D x T), D = 64) reach less, and its fraction of this includes that.
    ``n``: ``gemm_ceiling_size(device, dtype)`` unless given."""
    n = gemm_ceiling_size(device, dtype) if n is None else n
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # touch the pages and load the BLAS kernels before timing
    best = math.inf
    for _ in range(repeats):
        best = min(best, _call_seconds(lambda: torch.mm(a, b, out=out), device))
    return 2 * n**3 / best / 1e9


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def thp_setting(device: torch.device) -> str:
    """How torch's CPU allocator was set up in this process: ``"on"`` if it was started
    with ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for large allocations), else
    ``"off"``; ``"n/a"`` for a GPU."""
    if device.type != "cpu":
        return "n/a"
    return "on" if os.environ.get(THP_ENV) == "1" else "off"


def fresh_pages_every_call(device: torch.device, largest_output_bytes: int) -> bool:
    """Whether an op on ``device`` whose largest fresh output has this size pays first-touch
    page faults on every call (see GLIBC_MMAP_THRESHOLD_MAX), so that its time depends on
    the THP setting. A tensor of exactly the threshold counts: its request, with the
    allocator's alignment and glibc's chunk header, is above it (a 32 MiB torch.empty filled
    four times under the bench's kept heap: 8193 page faults each time; 31 MiB: 0 after the
    first; benchmarks/micro/heap_refit_probe.py)."""
    return device.type == "cpu" and largest_output_bytes >= GLIBC_MMAP_THRESHOLD_MAX


def touch_floor_seconds(device: torch.device, output_sizes: Sequence[int],
                        first_touch_gbs: Optional[float]) -> Optional[float]:
    """The first touch of the outputs among ``output_sizes`` (bytes) that get fresh pages on
    every call (GLIBC_MMAP_THRESHOLD_MAX or more, fresh_pages_every_call) at ``first_touch_gbs``:
    a floor under the time of any call that must return them (the table's ``% touch``: this
    floor against the row's time). None where none does, off the CPU, or with no rate."""
    fresh = sum(size for size in output_sizes if fresh_pages_every_call(device, size))
    if not fresh or not first_touch_gbs:
        return None
    return fresh / (first_touch_gbs * 1e9)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _kernel_thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            return mode.read().strip()
    except OSError:
        return "unknown"


# The CPU feature groups fastllm's kernel paths need (csrc/common/cpu_features.h), as
# /proc/cpuinfo names the flags: path -> flags that must all be present.
CPU_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"),
    "amx": ("amx_tile", "amx_bf16"),
    "amx_fp16": ("amx_tile", "amx_bf16", "amx_fp16"),
}


def _cpu_has_amx_fp16() -> bool:
    """AMX-FP16 by torch's own CPUID check (``torch.cpu._is_amx_fp16_supported``): Linux
    kernels before 6.4 leave ``amx_fp16`` out of /proc/cpuinfo on CPUs that have it."""
    check = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # a torch build without the check's CPU support
        return False


def cpu_isa_features() -> Optional[dict[str, bool]]:
    """Which of ``CPU_ISA_FLAGS``' groups this CPU has (from /proc/cpuinfo's flags, and
    torch's CPUID check for amx_fp16: ``_cpu_has_amx_fp16``); None where /proc/cpuinfo cannot
    be read. What the hardware offers: a path also needs the OS's support and
    ``FASTLLM_CPU_ISA``'s leave, which ``fastllm_path`` reports per row."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    if "amx_tile" in flags and _cpu_has_amx_fp16():
                        flags.add("amx_fp16")
                    return {isa: all(f in flags for f in need) for isa, need in CPU_ISA_FLAGS.items()}
    except OSError:
        pass
    return None


def describe_cpu_isa(features: Optional[dict[str, bool]], cap: Optional[str],
                     torch_isa: Optional[str] = None) -> str:
    """The header's line on the CPU's instruction sets, the ``FASTLLM_CPU_ISA`` cap and
    (``torch_isa``: ``torch_cpu_isa()``) the level torch's own kernels run at."""
    if features is None:
        present = "unknown (no /proc/cpuinfo)"
    else:
        present = ", ".join(
            f"{isa} ({'/'.join(CPU_ISA_FLAGS[isa])}) {'yes' if has else 'no'}"
            for isa, has in features.items()
        )
    limit = f"FASTLLM_CPU_ISA={cap} caps the paths" if cap else (
        "FASTLLM_CPU_ISA unset: each kernel takes the best path it has")
    line = f"CPU instruction sets: {present}; {limit}"
    return line + (f"; torch's CPU kernels: {torch_isa}" if torch_isa else "")


@dataclasses.dataclass
class Machine:
    """The process's device and its measured ceilings."""

    device: str
    device_name: str
    torch_version: str
    threads: int
    thp: str  # this process's THP_MEM_ALLOC_ENABLE setting: "on", "off" or "n/a"
    kernel_thp_mode: str
    copy_gbs: float
    first_touch_gbs: Optional[float]  # CPU only: a GPU's caching allocator hides it
    # measured only for families that count FLOPs: the GEMM ceiling (gemm_gflops) in float32
    # and in each dtype those cases run, by dtype name
    gemm_gflops: Optional[dict[str, float]] = None
    gemm_n: Optional[dict[str, int]] = None  # n of each dtype's (n, n) product (gemm_ceiling_size)
    cpu_isa: Optional[dict[str, bool]] = None  # CPU only: cpu_isa_features()
    cpu_isa_cap: Optional[str] = None  # CPU only: FASTLLM_CPU_ISA, when set
    torch_cpu_isa: Optional[str] = None  # CPU only: torch_cpu_isa()
    # CPU only: fastllm.backend.cpu_fresh_pages() / cpu_output_stores(), where fastllm._C is
    # built
    cpu_fresh_pages: Optional[str] = None
    cpu_output_stores: Optional[str] = None
    cpu_output_cache: Optional[str] = None  # CPU only: cpu_output_cache_setting()
    heap: Optional[str] = None  # CPU only: heap_setting()


# The environment variables that cap torch's own CPU code: its vectorised kernels (and
# torch.compile's generated C++), oneDNN's and MKL's. Set all three (=avx2 / =AVX2 / =AVX2)
# beside FASTLLM_CPU_ISA=avx2 to time both sides as an AVX2-only CPU would run them.
TORCH_CPU_ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


# torch.compile's caches (torch 2.14.1) do not key their entries on ATEN_CPU_CAPABILITY,
# though the C++ that inductor generates depends on it (its vector widths): on a Zen 5 core,
# code cached by a run under ATEN_CPU_CAPABILITY=avx2 (16 bfloat16 per vector) and reused by
# a run without it (32 per vector) crashed the bfloat16 cross-entropy backward's process with
# SIGABRT / SIGSEGV, and with a fresh cache it ran (record benchmarks/results/
# 2026-12-07-cpu-inductor-cache-isa-crash-zen5.txt). So a run that caps torch's level keeps
# torch.compile's cache in a directory of that level's own.
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_for_isa(env: dict[str, str]) -> Optional[str]:
    """The torch.compile cache directory a run with ``env`` should use: torch's default one
    with ``_aten_<level>`` appended where ``env`` sets ATEN_CPU_CAPABILITY; None (leave it to
    torch) where it does not, or where ``env`` names a cache directory other than the default
    (importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR to the default, so that one counts
    as unset)."""
    level = env.get("ATEN_CPU_CAPABILITY")
    if not level:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = default_cache_dir()
    current = env.get(INDUCTOR_CACHE_ENV)
    if current and os.path.abspath(current) != os.path.abspath(default):
        return None
    safe = "".join(ch if ch.isalnum() else "_" for ch in level.lower())
    return f"{default}_aten_{safe}"


def torch_cpu_isa() -> str:
    """The header's words on torch's own CPU instruction set: the level its vectorised
    kernels run at (``torch.backends.cpu.get_cpu_capability()``) and any of
    ``TORCH_CPU_ISA_CAPS`` that is set."""
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    level = get() if get is not None else "unknown"
    caps = [f"{name}={os.environ[name]}" for name in TORCH_CPU_ISA_CAPS if os.environ.get(name)]
    return f"{level}" + (f" ({', '.join(caps)})" if caps else "")


def measure_machine(device: torch.device, quick: bool) -> Machine:
    repeats = 2 if quick else 5
    cpu = device.type == "cpu"
    return Machine(
        device=str(device),
        device_name=_cpu_model() if cpu else torch.cuda.get_device_name(device),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        thp=thp_setting(device),
        kernel_thp_mode=_kernel_thp_mode() if cpu else "n/a",
        copy_gbs=copy_bandwidth_gbs(device, repeats=repeats),
        first_touch_gbs=first_touch_gbs(device, repeats=repeats) if cpu else None,
        cpu_isa=cpu_isa_features() if cpu else None,
        cpu_isa_cap=(os.environ.get("FASTLLM_CPU_ISA") or None) if cpu else None,
        torch_cpu_isa=torch_cpu_isa() if cpu else None,
        cpu_fresh_pages=_native_cpu_report("cpu_fresh_pages") if cpu else None,
        cpu_output_stores=_native_cpu_report("cpu_output_stores") if cpu else None,
        cpu_output_cache=cpu_output_cache_setting() if cpu else None,
        heap=heap_setting() if cpu else None,
    )


def cpu_output_cache_limit(backend: str, device: torch.device) -> int:
    """The bytes of free blocks fastllm's CPU kernels keep for their large outputs on
    ``backend`` and ``device`` (fastllm.backend.cpu_output_cache): 0 off the CPU, on other
    backends, without fastllm._C, or with the cache off."""
    from fastllm import _native

    if device.type != "cpu" or backend != "native" or not _native.AVAILABLE:
        return 0
    from fastllm.backend import cpu_output_cache

    return cpu_output_cache()["limit_bytes"]


def cpu_output_cache_setting() -> Optional[str]:
    """The header's words on fastllm's CPU output cache; None without fastllm._C."""
    from fastllm import _native

    if not _native.AVAILABLE:
        return None
    limit = cpu_output_cache_limit("native", torch.device("cpu"))
    if not limit:
        return "fresh memory (output cache off: FASTLLM_CPU_OUTPUT_CACHE_MB=0)"
    return (f"outputs of 4 MiB and more reuse freed ones' memory (output cache, up to "
            f"{limit // MiB} MiB kept: FASTLLM_CPU_OUTPUT_CACHE_MB)")


def _native_cpu_report(name: str) -> Optional[str]:
    """``fastllm.backend.<name>()`` (cpu_fresh_pages, cpu_output_stores); None without
    fastllm._C (the bench then times the reference backend)."""
    from fastllm import _native, backend

    return getattr(backend, name)() if _native.AVAILABLE else None


# ---------------------------------------------------------------------- peak memory


def _read_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {field}")


def _empty_cpu_output_cache() -> None:
    """Gives the free blocks of fastllm's CPU output cache back to the system, where
    fastllm._C is built."""
    from fastllm import _native

    if _native.AVAILABLE:
        from fastllm.backend import empty_cpu_output_cache

        empty_cpu_output_cache()


def _malloc_trim() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory one call of ``fn`` needs above what was allocated before it (see the
    module docstring for the method); None where it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        gc.collect()
        _empty_cpu_output_cache()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
        before = _read_status_bytes("VmRSS")
        fn()
        return max(0, _read_status_bytes("VmHWM") - before)
    except OSError:
        return None


# --------------------------------------------------------------------------- backend


def resolve_backend(requested: Optional[str], device: torch.device) -> tuple[str, str]:
    """The fastllm backend to time, and how to describe it. ``requested=None`` means the
    process's backend (``FASTLLM_BACKEND``, else native); the default native falls back to
    the reference, with a warning, while fastllm._C is not built. Raises ValueError for a
    backend that cannot run here."""
    from fastllm import _native
    from fastllm.backend import get_backend, triton_interpret

    backend = requested or get_backend()
    if backend == "native" and not _native.AVAILABLE:
        if requested:
            raise ValueError(f"backend native needs fastllm._C, which is not built: {_native._error}")
        logger.warning(
            "fastllm._C is not built (%s): timing fastllm's reference backend instead", _native._error
        )
        return "reference", "reference (plain PyTorch, because fastllm._C is not built)"
    if backend == "triton" and device.type == "cpu" and not triton_interpret():
        raise ValueError("backend triton on the CPU needs TRITON_INTERPRET=1 in the environment")
    if backend == "native":
        kernels = "C++ CPU" if device.type == "cpu" else "CUDA"
        return backend, f"native (fastllm's {kernels} kernels)"
    if backend == "triton" and device.type == "cpu":
        return backend, "triton (under TRITON_INTERPRET=1: the interpreter, not a GPU)"
    if backend == "reference":
        return backend, "reference (plain PyTorch)"
    return backend, backend


def fastllm_path(kernel_family: str, dtype: torch.dtype, device: torch.device, backend: str) -> str:
    """What fastllm's row of a case ran: on the native backend's CPU kernels the instruction
    set path of ``kernel_family`` for ``dtype`` (``fastllm.backend.cpu_kernel_path``:
    "amx-bf16", "amx-fp16", "amx-bf16x6", "avx512-bf16", "avx512", "avx2", "scalar");
    otherwise the implementation the family's backend choice (``OpFamily.select``) takes for
    such a tensor: "cuda", "triton" or "reference"."""
    from fastllm.backend import cpu_kernel_path
    from fastllm.ops import FAMILIES

    if kernel_family not in FAMILIES:
        raise ValueError(f"kernel_family must be one of {', '.join(FAMILIES)}; got {kernel_family!r}")
    op_set = FAMILIES[kernel_family].select(torch.empty(0, dtype=dtype, device=device), backend)
    if op_set is None:
        return "reference"
    if op_set.backend == "native":
        return cpu_kernel_path(kernel_family, dtype) if device.type == "cpu" else device.type
    return op_set.backend


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Result:
    """One contender on one case, as printed and as written to JSON."""

    family: str
    case: str  # the case id, also the pytest-benchmark id
    params: dict[str, str]  # the case's table columns (op, mode, shape, dtype, ...)
    contender: str
    label: str  # the contender as shown, e.g. "fastllm[native]"
    device: str
    thp: str
    # fastllm's rows: what ran (fastllm_path: "avx512", "avx2", ..., "cuda", "triton")
    path: Optional[str] = None
    time_s: Optional[float] = None
    repeats: int = 0
    bytes_moved: Optional[int] = None
    gbs: Optional[float] = None
    copy_gbs: Optional[float] = None  # the ceiling measured under the same THP setting
    flops: Optional[int] = None  # compute-bound families: the case's FLOPs per call
    gflops: Optional[float] = None
    sgemm_gflops: Optional[float] = None  # their ceiling: torch's GEMM rate in the case's dtype
    # CPU rows whose contender must return outputs of GLIBC_MMAP_THRESHOLD_MAX or more (fresh pages
    # every call): the first touch of those outputs alone, at the measured first-touch rate
    # (Case.required_output_sizes, touch_floor_seconds); the table's "% touch" is it / time
    touch_floor_s: Optional[float] = None
    speedup_vs_eager: Optional[float] = None  # eager time / this time
    speedup_vs_compile: Optional[float] = None  # torch.compile time / this time
    peak_memory_bytes: Optional[int] = None
    error: Optional[str] = None
    # fastllm bench --processes N: how many fresh processes timed this row (merge_processes),
    # and the smallest and largest of their own speedups (the speedups above are the median)
    processes: int = 1
    speedup_vs_eager_range: Optional[list[float]] = None
    speedup_vs_compile_range: Optional[list[float]] = None

    @classmethod
    def of(cls, family: str, case: "Case", contender: str, *, backend: str, **fields: Any) -> "Result":
        """The record of ``contender`` on ``case``, labelled as the table shows it: fastllm
        and its variants with the backend (``fastllm[native]``, ``fastllm[native]
        inplace_backward``), the others by name."""
        return cls(family=family, case=case.id, params=case.params(), contender=contender,
                   label=(fastllm_label(backend) + contender.removeprefix(FASTLLM)
                          if case.runs_fastllm(contender) else contender), **fields)


# Result.error's prefix for a contender that cannot run here (NotImplementedError: e.g. a
# backend whose kernels lack a feature): shown as n/a, not counted as a failed run.
NOT_AVAILABLE = "n/a:"


def not_available(result: Result) -> bool:
    return result.error is not None and result.error.startswith(NOT_AVAILABLE)


def fill_ratios(results: Sequence[Result]) -> None:
    """Bandwidth and speedups, within each group of one case and THP setting."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.family, result.case, result.thp), []).append(result)
    for group in groups.values():
        base = {r.contender: r.time_s for r in group if r.time_s is not None}
        for result in group:
            if result.time_s is None:
                continue
            if result.bytes_moved is not None:
                result.gbs = result.bytes_moved / result.time_s / 1e9
            if result.flops is not None:
                result.gflops = result.flops / result.time_s / 1e9
            if EAGER in base:
                result.speedup_vs_eager = base[EAGER] / result.time_s
            if COMPILE in base:
                result.speedup_vs_compile = base[COMPILE] / result.time_s


def merge_processes(runs: Sequence[Sequence[Result]]) -> list[Result]:
    """One row per (family, case, THP setting, contender) from the same cases timed in
    several fresh processes (``fastllm bench --processes``), in the first run's order: the
    median of the processes' times (and the bandwidth or FLOP rate of that time), all their
    repeats, the largest peak memory; the speedups are the median of each process's own
    speedups, which it measured with its contenders in alternation, and their range across
    the processes. A row that failed in some process is reported with that process's error."""
    groups: dict[tuple[str, str, str, str], list[Result]] = {}
    for run in runs:
        for result in run:
            groups.setdefault((result.family, result.case, result.thp, result.contender),
                              []).append(result)
    merged: list[Result] = []
    speedups: dict[int, tuple[list[float], list[float]]] = {}
    for group in groups.values():
        failed = next((r for r in group if r.error is not None), None)
        if failed is not None:
            merged.append(dataclasses.replace(failed, processes=len(group)))
            continue
        peaks = [r.peak_memory_bytes for r in group if r.peak_memory_bytes is not None]
        merged.append(dataclasses.replace(
            group[0], time_s=statistics.median(r.time_s for r in group),
            repeats=sum(r.repeats for r in group), peak_memory_bytes=max(peaks, default=None),
            processes=len(group), speedup_vs_eager=None, speedup_vs_compile=None))
        speedups[len(merged) - 1] = (
            [r.speedup_vs_eager for r in group if r.speedup_vs_eager is not None],
            [r.speedup_vs_compile for r in group if r.speedup_vs_compile is not None])
    fill_ratios(merged)  # the rates of the median times
    for index, (vs_eager, vs_compile) in speedups.items():
        result = merged[index]
        if vs_eager:
            result.speedup_vs_eager = statistics.median(vs_eager)
            result.speedup_vs_eager_range = [min(vs_eager), max(vs_eager)]
        if vs_compile:
            result.speedup_vs_compile = statistics.median(vs_compile)
            result.speedup_vs_compile_range = [min(vs_compile), max(vs_compile)]
    return merged


# ----------------------------------------------------------------------------- table


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Plain-text table; ``right[i]`` right-aligns column i (numbers). An empty row prints
    as a blank separator line; a cell beyond the last column is a note, printed unaligned
    after the row."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[: len(headers)]):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        aligned = [
            cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(cells, widths, right)
        ]
        return "  ".join(aligned + list(cells[len(headers):])).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) if row else "" for row in rows]
    return "\n".join(out)


def _fmt(value: Optional[float], suffix: str = "", digits: int = 3) -> str:
    """At least ``digits`` significant digits (all of the integer part), no exponent."""
    if value is None:
        return "-"
    if value == 0:
        return f"0{suffix}"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    text = f"{value:.{decimals}f}"
    if decimals and abs(float(text)) >= 10 ** (magnitude + 1):  # 0.9996 rounded up to 1.000
        text = f"{value:.{decimals - 1}f}"
    return text + suffix


def results_table(results: Sequence[Result], param_columns: Sequence[str]) -> str:
    """One row per contender, cases separated by a blank line; the case columns are shown
    on the first row of each case only, the path (``fastllm_path``) on fastllm's rows only.
    A family whose cases count FLOPs shows GFLOP/s and the fraction of the GEMM ceiling in
    the row's dtype instead of GB/s and the fraction of the copy one."""
    compute_bound = any(r.flops is not None for r in results)
    rate_headers = ["GFLOP/s", "% GEMM"] if compute_bound else ["GB/s", "% copy"]
    # "% touch" only where some row has a first-touch floor (touch_floor_seconds)
    touch = any(r.touch_floor_s is not None for r in results)
    headers = [*param_columns, "THP", "contender", "path", "time ms", *rate_headers,
               *(["% touch"] if touch else []), "vs eager", "vs compile", "peak MiB"]
    right = [False] * (len(param_columns) + 3) + [True] * (7 if touch else 6)
    rows: list[list[str]] = []
    previous: Optional[tuple[str, str]] = None
    for result in results:
        key = (result.case, result.thp)
        if previous is not None and key != previous:
            rows.append([])
        case_cells = (
            [result.params[c] for c in param_columns] if key != previous
            else [""] * len(param_columns)
        )
        previous = key
        if result.error is not None:
            status = "n/a" if not_available(result) else "FAILED"
            rows.append([*case_cells, result.thp, result.label, result.path or "", status,
                         *["-"] * (6 if touch else 5), result.error])
            continue
        rate, ceiling = (
            (result.gflops, result.sgemm_gflops) if compute_bound else (result.gbs, result.copy_gbs)
        )
        ceiling_fraction = None if rate is None or not ceiling else 100 * rate / ceiling
        peak = None if result.peak_memory_bytes is None else result.peak_memory_bytes / MiB
        rows.append([
            *case_cells,
            result.thp,
            result.label,
            result.path or "",
            _fmt(result.time_s * 1e3),
            _fmt(rate),
            _fmt(ceiling_fraction, "%", digits=2),
            *([_fmt(None if result.touch_floor_s is None
                    else 100 * result.touch_floor_s / result.time_s, "%", digits=2)]
              if touch else []),
            _fmt_speedup(result.speedup_vs_eager, result.speedup_vs_eager_range),
            _fmt_speedup(result.speedup_vs_compile, result.speedup_vs_compile_range),
            _fmt(peak, digits=1),
        ])
    return format_table(headers, rows, right)


def _fmt_speedup(value: Optional[float], spread: Optional[Sequence[float]]) -> str:
    """``1.05x``, or with the range over several processes ``1.05x (0.82-1.15)`` (not for a
    range of one value: a contender against itself)."""
    text = _fmt(value, "x")
    if value is None or not spread or spread[0] == spread[1]:
        return text
    return f"{text} ({_fmt(spread[0])}-{_fmt(spread[1])})"


# ---------------------------------------------------------------------------- runner


@dataclasses.dataclass
class CallInputs:
    """The arguments of one contender's call, and what its backward needs."""

    args: tuple[Any, ...]  # the op's positional arguments
    # forward+backward: the tensors the gradients are taken of, and the gradients of the
    # outputs (None for a scalar output, a loss, whose gradient is 1)
    differentiable: tuple[torch.Tensor, ...] = ()
    grad_outputs: Optional[tuple[torch.Tensor, ...]] = None


class Case:
    """A family's case: what the runner (and ``benchmarks/``) times. A family subclasses it
    as a frozen dataclass with at least ``mode`` ("fwd" or "fwd+bwd"), ``shape`` and
    ``dtype`` fields (and ``op``, unless it overrides ``op_id`` and ``params``), and provides
    its contenders' functions, its inputs and its byte (or FLOP) count; the contender
    plumbing, forward or forward+backward, is shared here.

    Forward+backward times one forward and one backward together, with
    ``torch.autograd.grad``: the gradients are returned, not accumulated into ``.grad``, so
    no zeroing is needed between calls. torch.compile is compiled and run once while the
    call is built, so compilation is never timed."""

    mode: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    # ----------------------------------------------------------- what a family provides

    def torch_function(self) -> Callable:
        """torch's eager implementation (torch.compile compiles it), taking the tensors
        positionally so that torch.compile sees plain tensor arguments."""
        raise NotImplementedError

    def fastllm_function(self) -> Callable:
        """fastllm's implementation, with the same arguments; run on the timed backend."""
        raise NotImplementedError

    def peers(self, device: torch.device) -> dict[str, Callable]:
        """Contenders beyond fastllm and torch's two on ``device`` (e.g. a peer library, or
        torch's SDPA on one backend, that only CUDA has), by name, in table order."""
        return {}

    def fastllm_variants(self) -> dict[str, Callable]:
        """fastllm's implementation with a non-default option (e.g. cross-entropy's
        ``inplace_backward=True``), by contender name (``fastllm_variant(option)``), in table
        order: each runs on the timed backend and shows its path like fastllm's own row, and
        is listed right after it on every device."""
        return {}

    def make_inputs(self, device: torch.device) -> Any:
        """The tensors every contender of this case shares (a ``CallInputs``, or whatever
        ``contender_inputs`` takes apart)."""
        raise NotImplementedError

    def contender_inputs(self, contender: str, inputs: Any) -> CallInputs:
        """``contender``'s part of ``inputs`` (e.g. its own layout of the same values)."""
        return inputs

    def kernel_path(self, family_path: str) -> str:
        """What fastllm's row ran, given its family's path for the case's dtype
        (``fastllm_path``): the same, unless the case takes a kernel of its own."""
        return family_path

    def bytes_moved(self) -> int:
        """Unavoidable bytes read and written once (the effective-bandwidth numerator)."""
        raise NotImplementedError

    # Optional, for compute-bound families: ``def flops(self) -> int``, the FLOPs of one
    # call (the GFLOP/s numerator; the table then shows GFLOP/s against the sgemm ceiling).

    def largest_output_bytes(self) -> int:
        """Size of the largest tensor a call allocates (decides page-fault sensitivity)."""
        raise NotImplementedError

    def required_output_sizes(self, contender: str) -> tuple[int, ...]:
        """Bytes of each tensor ``contender`` must produce in a call whatever its method: the
        op's results (forward+backward: the forward's and the gradients), not temporaries
        (``touch_floor_seconds``). () where a family does not say."""
        return ()

    # Whether fastllm's rows of this family get their results from the CPU kernels' output
    # cache (fastllm.backend.cpu_output_cache): those results are then not fresh pages, and
    # a row has no first-touch floor for them (fresh_output_sizes).
    kernel_outputs_cached: ClassVar[bool] = False

    def fresh_output_sizes(self, contender: str, backend: str,
                           device: torch.device) -> tuple[int, ...]:
        """``required_output_sizes(contender)`` less those a fastllm row takes from the CPU
        output cache (any up to its limit, when on; ``kernel_outputs_cached``)."""
        sizes = self.required_output_sizes(contender)
        if not (self.kernel_outputs_cached and self.runs_fastllm(contender)):
            return sizes
        limit = cpu_output_cache_limit(backend, device)
        return tuple(size for size in sizes if size > limit)

    # ------------------------------------------------------------------- what is shared

    @property
    def op_id(self) -> str:
        """The case id's leading part, naming the computation."""
        return self.op

    @property
    def id(self) -> str:
        """``<op>-<mode>-<shape, x-separated>-<dtype>``, also the pytest-benchmark id."""
        return f"{self.op_id}-{self.mode}-{'x'.join(map(str, self.shape))}-{self.dtype_name}"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"

    def contenders_on(self, device: torch.device) -> tuple[str, ...]:
        """Who runs this case on ``device`` (the runner times exactly these, in this order)."""
        return (FASTLLM, *self.fastllm_variants(), *CONTENDERS[1:], *self.peers(device))

    def runs_fastllm(self, contender: str) -> bool:
        """Whether ``contender`` is fastllm's own row or one of its variants (they run on the
        timed backend and show the path it ran)."""
        return contender == FASTLLM or contender in self.fastllm_variants()

    @property
    def contenders(self) -> tuple[str, ...]:
        """Who runs this case on the CPU (``contenders_on`` for a device)."""
        return self.contenders_on(CPU)

    def params(self) -> dict[str, str]:
        """The table's case columns."""
        return {"op": self.op, "mode": self.mode, "shape": "x".join(map(str, self.shape)),
                "dtype": self.dtype_name}

    def function(self, contender: str, backend: str, device: torch.device = CPU) -> Callable:
        """The op as ``contender`` computes it on ``device`` (compiled, but not yet run, for
        torch.compile)."""
        if self.runs_fastllm(contender):
            fastllm_fn = (self.fastllm_function() if contender == FASTLLM
                          else self.fastllm_variants()[contender])

            def on_backend(*args: Any):
                with use_backend(backend):
                    return fastllm_fn(*args)

            return on_backend
        if contender == EAGER:
            return self.torch_function()
        if contender == COMPILE:
            return compile_once(self.torch_function())
        peers = self.peers(device)
        if contender not in peers:
            raise ValueError(f"contender must be one of {self.contenders_on(device)} on "
                             f"{device}; got {contender!r}")
        return peers[contender]

    def build(self, contender: str, inputs: Any, backend: str,
              device: torch.device = CPU) -> Callable[[], None]:
        """A no-argument callable running one call of ``contender`` on its part of
        ``inputs`` (made on ``device``): the forward, or the forward and the backward;
        compiled and run once already where the contender compiles."""
        fn = self.function(contender, backend, device)
        call_inputs = self.contender_inputs(contender, inputs)
        args = call_inputs.args
        if self.backward:
            differentiable, grad_outputs = call_inputs.differentiable, call_inputs.grad_outputs

            def call() -> None:
                torch.autograd.grad(fn(*args), differentiable, grad_outputs)
        else:

            def call() -> None:
                fn(*args)

        if contender == COMPILE:
            call()
        return call


def fastllm_label(backend: str) -> str:
    return f"{FASTLLM}[{backend}]"


def fastllm_variant(option: str) -> str:
    """The contender name of fastllm run with ``option`` (``Case.fastllm_variants``)."""
    return f"{FASTLLM} {option}"


def run_cases(
    family: str,
    cases: Sequence[Case],
    *,
    kernel_family: str,
    device: torch.device,
    backend: str,
    budget: TimingBudget,
    copy_gbs: float,
    gemm_gflops: Optional[dict[str, float]] = None,
    contenders: Optional[Sequence[str]] = None,
    first_touch_gbs: Optional[float] = None,
) -> list[Result]:
    """Times every contender on every case, in this process. A contender that raises is
    recorded with its error (and logged), never dropped. ``kernel_family``: the fastllm op
    family the cases run (the family module's ``KERNEL_FAMILY``), whose path fastllm's rows
    record (``fastllm_path``). ``gemm_gflops``: the GEMM ceilings by dtype name
    (``Machine.gemm_gflops``), each compute-bound row's ceiling in its case's dtype.
    ``contenders``: glob patterns; only the contenders whose name matches one run (None:
    all of them). ``first_touch_gbs``: the process's first-touch rate (``Machine``), for
    each row's floor (``touch_floor_seconds``)."""
    thp = thp_setting(device)
    results: list[Result] = []

    def selected(case: Case) -> list[str]:
        return [c for c in case.contenders_on(device)
                if contenders is None or any(fnmatch.fnmatchcase(c, p) for p in contenders)]

    def record_error(result: Result, exc: Exception) -> None:
        if isinstance(exc, NotImplementedError):  # a backend without the feature: n/a
            logger.warning("%s %s: %s n/a: %s", family, result.case, result.contender, exc)
            result.error = f"{NOT_AVAILABLE} {exc}".splitlines()[0][:120]
        else:  # reported in the table and the exit status
            logger.error("%s %s: %s failed", family, result.case, result.contender,
                         exc_info=(type(exc), exc, exc.__traceback__))
            result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]

    progress = tqdm(
        total=sum(len(selected(c)) for c in cases),
        desc=f"bench {family} (THP {thp})",
        unit="run", file=sys.stderr, disable=None, leave=False,
    )
    with progress:
        for index, case in enumerate(cases):
            if progress.disable:  # no terminal: progress goes to the log
                logger.info("%s [%d/%d] %s (THP %s)", family, index + 1, len(cases), case.id, thp)
            inputs = case.make_inputs(device)
            # Each contender is built, called once, measured for peak memory (its second
            # call) and warmed up in turn; then all of them are timed in alternation
            # (time_interleaved).
            warmed: list[tuple[Result, Callable[[], None]]] = []
            # a case may name its own contenders (e.g. a peer library that only it has)
            names = selected(case)
            for contender in names:
                progress.set_postfix_str(f"{case.id} {contender}", refresh=True)
                result = Result.of(
                    family, case, contender, backend=backend, device=str(device), thp=thp,
                    bytes_moved=case.bytes_moved(), copy_gbs=copy_gbs,
                    sgemm_gflops=(gemm_gflops or {}).get(dtype_name(case.dtype)),
                    flops=case.flops() if hasattr(case, "flops") else None,
                    touch_floor_s=touch_floor_seconds(
                        device, case.fresh_output_sizes(contender, backend, device),
                        first_touch_gbs),
                )
                if case.runs_fastllm(contender):
                    result.path = case.kernel_path(
                        fastllm_path(kernel_family, case.dtype, device, backend))
                try:
                    call = case.build(contender, inputs, backend, device)
                    begin = time.perf_counter()
                    _call_seconds(call, device)  # one-time allocations: see the module doc
                    result.peak_memory_bytes = peak_memory_bytes(call, device)
                    warm = time.perf_counter() - begin
                    while warm < budget.warmup_s:
                        warm += _call_seconds(call, device)
                    warmed.append((result, call))
                except Exception as exc:
                    record_error(result, exc)
                finally:
                    call = None
                results.append(result)
            timings = time_interleaved([call for _, call in warmed], device, budget)
            for (result, _), timing in zip(warmed, timings):
                if isinstance(timing, Exception):
                    record_error(result, timing)
                else:
                    result.time_s = timing.seconds(budget.statistic)
                    result.repeats = timing.repeats
                progress.update()
            progress.update(len(names) - len(warmed))
            warmed = timings = None  # free the compiled graphs and their buffers
            del inputs
    fill_ratios(results)
    return results
