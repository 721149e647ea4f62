"""The GPU check's report (benchmarks/gpu/check.py): the GPU issue's targets judged on the
bench rows against the ceilings measured in the same run, and the markdown a person reads.
Pure functions of the stages' records: no torch, no GPU."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence


def short_kernel_name(name: str, width: int = 90) -> str:
    """A demangled name without its parameter list and namespaces, template arguments kept
    (they say which instantiation: head dim, dtype, flags)."""
    name = name.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list: the first '(' outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    head = name[:cut]
    head = re.sub(r"\b(?:fastllm|cuda)::", "", head)
    head = re.sub(r"^(?:void )", "", head)
    return head if len(head) <= width else head[: width - 3] + "..."


# ----------------------------------------------------------------------------- targets


def _rows(results: Sequence[dict], pattern: str, contender: Optional[str] = None,
          run_prefix: str = "native-") -> list[dict]:
    rx = re.compile(pattern)
    return [r for r in results if rx.search(r["case"]) and r.get("run", "").startswith(run_prefix)
            and (contender is None or r["contender"] == contender or r["label"] == contender)]


def _time_of(results, case, run, contender) -> Optional[float]:
    """``contender``'s time on ``case``: from run ``run`` if it timed it, else from any run
    that did (the peers do not depend on fastllm's backend: the Triton runs time fastllm
    alone and are compared with the native runs' peers)."""
    found = None
    for r in results:
        if r["case"] == case and contender in (r["contender"], r["label"]) and r.get("time_s"):
            if r.get("run") == run:
                return r["time_s"]
            found = found or r["time_s"]
    return found


def judge_targets(results: Sequence[dict], ceilings: dict) -> list[dict]:
    """The issue's targets, each judged on every row it applies to: (target, case, measured,
    met). A target with no row to judge says so."""
    out: list[dict] = []

    def add(target, case, measured, met):
        out.append({"target": target, "case": case, "measured": measured, "met": met})

    gemm = ceilings.get("gemm_bf16_tflops")
    copy = ceilings.get("copy_gbs")
    for r in _rows(results, r"^attention-.*fwd-.*4096.*128.*bfloat16$", "fastllm"):
        if r.get("gflops") and gemm and r["params"].get("mode") == "fwd":
            frac = r["gflops"] / 1e3 / gemm
            add("attention bf16 fwd >= 50% of the measured bf16 GEMM (T 4096, D 128)",
                r["case"], f"{100 * frac:.0f}% ({r['gflops'] / 1e3:.0f} of {gemm:.0f} TFLOP/s)",
                frac >= 0.5)
    for r in _rows(results, r"^attention-.*fwd\+bwd-.*bfloat16$", "fastllm"):
        flash = _time_of(results, r["case"], r["run"], "sdpa[flash]")
        if flash and r.get("time_s"):
            ratio = flash / r["time_s"]
            add("attention fwd+bwd >= 1.0x torch's flash SDPA", r["case"], f"{ratio:.2f}x",
                ratio >= 1.0)
    for family, pattern in (("norm", r"norm-"), ("cross-entropy", r"^cross_entropy-")):
        for r in _rows(results, pattern, "fastllm"):
            if r.get("gbs") and copy:
                frac = r["gbs"] / copy
                add(f"{family} >= 80% of the copy bandwidth", r["case"],
                    f"{100 * frac:.0f}% ({r['gbs']:.0f} of {copy:.0f} GB/s)", frac >= 0.8)
            liger = _time_of(results, r["case"], r["run"], "liger")
            if liger and r.get("time_s"):
                ratio = liger / r["time_s"]
                add(f"{family} >= 1.0x Liger-Kernel", r["case"], f"{ratio:.2f}x", ratio >= 1.0)
    for r in _rows(results, r"^linear_cross_entropy-.*128256", "fastllm"):
        for peer in results:
            if (peer["case"] == r["case"] and peer.get("run") == r["run"]
                    and peer["contender"] == "liger" and peer.get("peak_memory_bytes")
                    and r.get("peak_memory_bytes") is not None):
                add("linear + cross-entropy peak memory <= Liger's (LLaMA-3 vocab)", r["case"],
                    f"{r['peak_memory_bytes'] / 2**20:.0f} vs {peer['peak_memory_bytes'] / 2**20:.0f} MiB",
                    r["peak_memory_bytes"] <= peer["peak_memory_bytes"])
    if not out:
        add("(every target)", "-", "no row to judge (bench did not run or produced no rows)", None)
    return out


# ------------------------------------------------------------------------------ report


def _fmt_num(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


PEERS = (("vs eager", "torch eager"), ("vs compile", "torch.compile"),
         ("vs flash", "sdpa[flash]"), ("vs cuDNN", "sdpa[cudnn]"), ("vs liger", "liger"))


def bench_table(results: Sequence[dict]) -> list[str]:
    """One markdown table per bench run; each row's ratios are a peer's time over the row's
    (> 1: the row is faster), the peer timed in the same run or, for the Triton runs, in
    the native run of the same case."""
    lines: list[str] = []
    runs: dict[str, list[dict]] = {}
    for r in results:
        runs.setdefault(r.get("run", "?"), []).append(r)
    for run, rows in runs.items():
        compute = any(r.get("flops") for r in rows)
        peers = [(title, name) for title, name in PEERS
                 if any(x["contender"] == name for x in results)]
        lines += ["", f"#### {run}", "",
                  "| case | contender | path | ms | " + ("TFLOP/s" if compute else "GB/s") + " | "
                  + " | ".join(title for title, _ in peers) + " | peak MiB |",
                  "|---" * (6 + len(peers)) + "|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['case']} | {r['label']} | {r.get('path') or ''} | "
                             f"{'n/a' if r['error'].startswith('n/a') else 'FAILED'} | "
                             f"{r['error'][:80]} |" + " |" * (len(peers) + 1))
                continue
            rate = (r.get("gflops") or 0) / 1e3 if compute else r.get("gbs")
            peak = r.get("peak_memory_bytes")
            ratios = []
            for _, name in peers:
                other = _time_of(results, r["case"], run, name)
                ratios.append(_fmt_num(other / r["time_s"]) if other and r.get("time_s") else "-")
            lines.append(
                f"| {r['case']} | {r['label']} | {r.get('path') or ''} | "
                f"{_fmt_num((r.get('time_s') or 0) * 1e3)} | {_fmt_num(rate)} | "
                + " | ".join(ratios) + f" | {_fmt_num(None if peak is None else peak / 2**20)} |")
    return lines


def render_markdown(meta: dict, stages: Sequence[Any]) -> str:
    """stages: check.StageResult records (name, status, elapsed_s, summary, details)."""
    gpu = meta.get("gpu") or {}
    lines = [
        f"# fastllm GPU check, {meta['date']}: {gpu.get('name', 'no GPU')}",
        "",
        f"- commit: `{meta['commit']}`" + (" (with uncommitted changes)" if meta.get("dirty") else ""),
        f"- GPU: {gpu.get('name', '-')}, compute capability {gpu.get('capability', '-')}, "
        f"{gpu.get('sms', '-')} SMs, {gpu.get('memory_gib', '-')} GiB; driver, max SM and memory "
        f"clocks: {gpu.get('driver', '-')}",
        f"- torch {gpu.get('torch', '-')} (CUDA {gpu.get('torch_cuda', '-')}), triton "
        f"{gpu.get('triton', '-')}, Python {meta['python']}, {meta['cpus']} CPU cores",
        f"- command: `{meta['command']}`; budget {meta['budget_s']:.0f} s, "
        f"wall {meta['wall_s']:.0f} s",
        "",
        "## Stages",
        "",
        "| stage | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    for s in stages:
        first = s.summary.splitlines()[0] if s.summary else ""
        lines.append(f"| {s.name} | {s.status} | {s.elapsed_s:.0f} | {first} |")
    by_name = {s.name: s for s in stages}
    bench = by_name.get("bench")
    if bench and bench.details.get("targets"):
        ceil = bench.details.get("ceilings", {})
        lines += ["", "## Targets (issue 15)", "",
                  f"Ceilings measured in this run: bf16 GEMM {_fmt_num(ceil.get('gemm_bf16_tflops'))} "
                  f"TFLOP/s ({ceil.get('gemm_bf16_n', '?')}^3, random data), device copy "
                  f"{_fmt_num(ceil.get('copy_gbs'))} GB/s (read + write).", "",
                  "| target | case | measured | met |", "|---|---|---|---|"]
        for t in bench.details["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {t['target']} | {t['case']} | {t['measured']} | {met} |")
    build = by_name.get("build")
    if build and build.details.get("kernels"):
        lines += ["", "## ptxas (build)", "", "| kernel | arch | regs | barriers | smem B | "
                  "stack B | spill st/ld B |", "|---|---|---|---|---|---|---|"]
        for k in build.details["kernels"]:
            lines.append(f"| `{short_kernel_name(k['name'])}` | {k['arch']} | {k['registers']} | "
                         f"{k['barriers']} | {k['shared_bytes']} | {k['stack_bytes']} | "
                         f"{k['spill_store_bytes']}/{k['spill_load_bytes']} |")
    tests = by_name.get("tests")
    if tests and tests.details.get("triton_kernels"):
        lines += ["", "## Triton kernels compiled by the tests (cuobjdump, largest over "
                  "specializations)", "", "| kernel | specializations | regs | smem B | stack B | "
                  "local B (spills) |", "|---|---|---|---|---|---|"]
        for k in tests.details["triton_kernels"]:
            lines.append(f"| `{k['name']}` | {k['specializations']} | {k['registers']} | "
                         f"{k['shared_bytes']} | {k['stack_bytes']} | {k['local_bytes']} |")
    if tests and tests.details.get("per_file"):
        lines += ["", "## Tests on CUDA tensors", "", "| file | passed | failed | errors | skipped |",
                  "|---|---|---|---|---|"]
        for f, c in tests.details["per_file"].items():
            lines.append(f"| {f} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
        if tests.details.get("skip_reasons"):
            lines += ["", "Skip reasons (a skip that should not be there is a finding too):", ""]
            lines += [f"- {n} x {reason or '(no reason)'}"
                      for reason, n in list(tests.details["skip_reasons"].items())[:15]]
        if tests.details.get("failures"):
            lines += ["", "Failures (first 60):", ""]
            lines += [f"- `{f['test']}`: {f['message']}" for f in tests.details["failures"][:60]]
    if bench and bench.details.get("results"):
        lines += ["", "## Benchmarks (CUDA events, median; fastllm bench per family)"]
        lines += bench_table(bench.details["results"])
    for s in stages:
        if s.summary and "\n" in s.summary:
            lines += ["", f"## {s.name}: details", "", "```", s.summary, "```"]
    return "\n".join(lines) + "\n"
