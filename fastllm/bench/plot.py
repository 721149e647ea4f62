"""``fastllm bench --plot FILE``: where fastllm stands, as one PNG.

One panel per family, one row per case (its id, plus the THP setting where a case was timed
under both), and per row two horizontal bars: torch eager's time / fastllm's time and
torch.compile's time / fastllm's time (the table's "vs eager" and "vs compile"). The axis is
logarithmic and each bar starts at the 1.0 line, so a bar to the right of it is a case where
fastllm is faster and one to the left a case where it is slower, by the factor its length
shows. Each bar is labelled with the path fastllm's row ran (``fastllm.bench.common.
fastllm_path``: amx-bf16, amx-fp16, amx-bf16x6, avx512-bf16, avx512, avx2 or scalar on the
CPU; cuda, triton or reference otherwise) and the ratio. A case whose fastllm row has no ratio (failed or n/a) gets no bar
and says so.

matplotlib is an optional dependency (``pip install 'fastllm[plot]'``), imported only here,
only when a plot is asked for.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from fastllm.bench.common import FASTLLM, Result, not_available

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'fastllm[plot]' (or: pip install matplotlib)"

# (Result field, legend label, colour) of the two bars of a case
RATIOS = (
    ("speedup_vs_eager", "vs torch eager", "tab:blue"),
    ("speedup_vs_compile", "vs torch.compile", "tab:orange"),
)


def require_matplotlib() -> None:
    """Raises RuntimeError with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"fastllm bench --plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from exc


def _case_label(result: Result, several_thp: bool) -> str:
    return f"{result.case} (THP {result.thp})" if several_thp else result.case


def ratio_figure(results: Sequence[Result], title: Optional[str] = None) -> "Figure":
    """The figure of the module docstring from ``results`` (every family's rows, in table
    order; only fastllm's rows are drawn). One bar per ratio that exists, in the axes'
    ``containers`` (one per ratio kind and family panel)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    by_family: dict[str, list[Result]] = {}
    for result in results:
        if result.contender == FASTLLM:
            by_family.setdefault(result.family, []).append(result)
    if not by_family:
        raise ValueError("ratio_figure: results must hold at least one fastllm row, got none")

    ratios = [
        getattr(r, field) for rows in by_family.values() for r in rows for field, _, _ in RATIOS
        if getattr(r, field) is not None
    ]
    # room on both sides of the 1.0 line for the bars' labels
    low = min([1.0, *ratios]) / 4
    high = max([1.0, *ratios]) * 4
    # 1-2-5 ticks in plain numbers (0.5, 1, 2, ...), not powers of ten
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5) if low <= m * 10.0**e <= high]

    row_counts = [len(rows) for rows in by_family.values()]
    height = 1.2 + sum(0.45 * n + 0.7 for n in row_counts)
    fig = Figure(figsize=(11, height), layout="constrained")
    axes = fig.subplots(len(by_family), 1, squeeze=False, height_ratios=row_counts)[:, 0]
    bar_height = 0.38
    for ax, (family, rows) in zip(axes, by_family.items()):
        several_thp = len({r.thp for r in rows}) > 1
        positions = list(range(len(rows)))
        for k, (field, legend, colour) in enumerate(RATIOS):
            offset = (k - (len(RATIOS) - 1) / 2) * bar_height
            drawn = [(y + offset, r, getattr(r, field)) for y, r in zip(positions, rows)
                     if getattr(r, field) is not None]
            bars = ax.barh(
                [y for y, _, _ in drawn], [ratio - 1.0 for _, _, ratio in drawn], left=1.0,
                height=bar_height, color=colour, label=legend,
            )
            for bar, (y, r, ratio) in zip(bars, drawn):
                ax.text(ratio * (1.06 if ratio >= 1 else 1 / 1.06), y,
                        f"{r.path or '?'}  {ratio:.2f}x", va="center",
                        ha="left" if ratio >= 1 else "right", fontsize=7)
        for y, r in zip(positions, rows):
            if r.speedup_vs_eager is None and r.speedup_vs_compile is None:
                status = "n/a" if not_available(r) else "FAILED" if r.error else "no ratio"
                ax.text(1.06, y, f"{r.path or '?'}  {status}", va="center", ha="left",
                        fontsize=7, color="tab:red")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first case on top
        ax.set_yticks(positions, [_case_label(r, several_thp) for r in rows], fontsize=8)
        ax.set_title(f"{family}: {rows[0].label} on {rows[0].device}", fontsize=10, loc="left")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("torch time / fastllm time (log scale; > 1: fastllm is faster)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def write_plot(results: Sequence[Result], path: Path, title: Optional[str] = None) -> Path:
    """``ratio_figure(results, title)`` as a PNG at ``path``, written to a temporary name
    beside it and renamed, so an interrupted run never leaves a half-written file."""
    fig = ratio_figure(results, title)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
