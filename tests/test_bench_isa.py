"""Which path fastllm ran, in ``fastllm bench`` and its plot.

``fastllm.backend.cpu_kernel_path(family, dtype)`` (the table csrc/common/cpu_kernel_paths.cpp)
against ``EXPECTED`` below at every ``FASTLLM_CPU_ISA`` level (chosen once per process,
hence one child process per level); its errors; the path column and the CPU line of the
``fastllm bench`` table, and ``--plot``'s PNG, through the real command line on the quick
cases of two families; the figure's bars and labels; the atomic write; ``--plot``'s usage
errors (refused before any timing).

A kernel that gains or changes a CPU path edits its line in csrc/common/cpu_kernel_paths.cpp
and its line in ``EXPECTED`` here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastllm.bench.common import (
    EAGER, FASTLLM, TORCH_CPU_ISA_CAPS, Result, cpu_isa_features, fastllm_path, torch_cpu_isa,
)
from fastllm.cli import main
from fastllm.ops import norm as norm_ops
from tests.hostile import run_isolated

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# FASTLLM_CPU_ISA's levels, lowest first
LEVELS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")
# the feature group (fastllm.bench.common.CPU_ISA_FLAGS) each level needs: avx512bf16 is
# AVX-512's group (which includes AVX512-BF16) with attention's vdpbf16ps products
LEVEL_FEATURES = {"avx2": "avx2", "avx512": "avx512", "avx512bf16": "avx512", "amx": "amx"}

native = pytest.mark.skipif(norm_ops.IMPLS.native is None, reason="fastllm._C not built")


def machine_level() -> str:
    """The best level this CPU has, by csrc/common/cpu_features.h's feature groups."""
    features = cpu_isa_features() or {}
    best = "scalar"
    for level in LEVELS[1:]:
        if not features.get(LEVEL_FEATURES[level]):
            break
        best = level
    return best


def allowed(cap: str, kernel_best: str) -> str:
    """The path a kernel whose best path is ``kernel_best`` takes under FASTLLM_CPU_ISA=cap
    ("" = unset) on this CPU: the lowest of the three levels."""
    levels = [LEVELS.index(kernel_best), LEVELS.index(machine_level())]
    if cap:
        levels.append(LEVELS.index(cap))
    return {"amx": "amx-bf16"}.get(LEVELS[min(levels)], LEVELS[min(levels)])


def attention_path(dtype: torch.dtype, cap: str) -> str:
    """attention_cpu.cpp: bfloat16 on AMX-BF16 tiles, float16 on AMX-FP16 tiles (where the CPU
    has them, else AVX-512), float32's forward as bfloat16 parts on AMX-BF16 tiles,
    bfloat16 on vdpbf16ps (AVX512-BF16) without AMX -- on a CPU with AMX-BF16 only under
    FASTLLM_CPU_ISA=avx512bf16 --, with_best_ops otherwise."""
    if dtype == torch.bfloat16:
        path = allowed(cap, "amx")
        return "avx512-bf16" if path == "avx512bf16" else path
    if dtype == torch.float32 and allowed(cap, "amx") == "amx-bf16":
        return "amx-bf16x6"
    if dtype == torch.float16 and allowed(cap, "amx") == "amx-bf16" and (
            cpu_isa_features() or {}).get("amx_fp16"):
        return "amx-fp16"
    return _f64_scalar("avx512")(dtype, cap)


def _f64_scalar(kernel_best: str):
    return lambda dtype, cap: "scalar" if dtype == torch.float64 else allowed(cap, kernel_best)


# family -> (dtype, FASTLLM_CPU_ISA) -> path: each family's CPU dispatch as of this commit.
EXPECTED = {
    # attention_cpu.cpp: bfloat16 / float16 on AMX (attention_{fwd,bwd}_amx), with_best_ops
    # otherwise
    "attention": attention_path,
    # norm_cpu.cpp: AVX-512 rows for the float-acc dtypes, AVX2 for float64
    "norm": lambda dtype, cap: allowed(cap, "avx2" if dtype == torch.float64 else "avx512"),
    "cross_entropy": _f64_scalar("avx512"),  # cross_entropy_cpu.cpp pick_path
    "rotary": _f64_scalar("avx512"),  # rotary_cpu.cpp pick_rotate_head
    "gated_mlp": _f64_scalar("avx512"),  # gated_mlp_cpu.cpp Spans
}

_PATHS_SCRIPT = """
import json
import torch
from fastllm.backend import cpu_kernel_path
families = {families!r}
dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
print(json.dumps({{f: [cpu_kernel_path(f, d) for d in dtypes] for f in families}}))
"""


@native
@pytest.mark.parametrize("cap", [*LEVELS, ""], ids=[*LEVELS, "unset"])
def test_cpu_kernel_path_at_every_isa_level(cap):
    out = run_isolated(_PATHS_SCRIPT.format(families=list(EXPECTED)),
                       env={"FASTLLM_CPU_ISA": cap})
    got = json.loads(out.strip().splitlines()[-1])
    expected = {family: [rule(d, cap) for d in DTYPES] for family, rule in EXPECTED.items()}
    assert got == expected


@native
def test_cpu_kernel_path_bad_arguments():
    from fastllm.backend import cpu_kernel_path

    valid = "'attention', 'norm', 'cross_entropy', 'rotary', 'gated_mlp'"
    with pytest.raises(ValueError, match=f"family must be one of {valid}, got 'layernorm'"):
        cpu_kernel_path("layernorm", torch.float32)
    with pytest.raises(ValueError, match="got ''"):
        torch.ops.fastllm.cpu_kernel_path("", torch.float32)
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16, float16 or float64, got Long"):
        cpu_kernel_path("norm", torch.int64)


def test_fastllm_path_other_backends():
    cpu = torch.device("cpu")
    assert fastllm_path("norm", torch.float32, cpu, "reference") == "reference"
    if norm_ops.IMPLS.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
        assert fastllm_path("norm", torch.float32, cpu, "triton") == "triton"
    with pytest.raises(ValueError, match="kernel_family must be one of norm, .*; got 'mlp'"):
        fastllm_path("mlp", torch.float32, cpu, "reference")


# --------------------------------------------------------------- the command line, the plot

# one quick case of each of two families (fastllm's paths differ between them on an
# AVX-512 machine: norm has no AVX-512 path)
QUICK_ONLY = ("rms_norm-fwd-*-float32", "swiglu-fwd-*-bfloat16")
QUICK_KERNELS = {"norm": ("norm", torch.float32), "mlp": ("gated_mlp", torch.bfloat16)}


@native
def test_bench_shows_paths_and_plots(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "ratios.png"
    only = [arg for pattern in QUICK_ONLY for arg in ("--only", pattern)]
    env = {k: v for k, v in os.environ.items() if k != "FASTLLM_CPU_ISA"}
    run = subprocess.run(
        [sys.executable, "-m", "fastllm", "bench", "norm", "mlp", "--quick", "--device", "cpu",
         "--backend", "native", "--no-thp-rerun", "--json", str(out_json), "--plot",
         str(out_png), *only],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    # the header names the CPU's feature groups
    features = cpu_isa_features()
    assert features is not None  # Linux: /proc/cpuinfo
    for isa, has in features.items():
        assert f"{isa} (" in run.stdout and f") {'yes' if has else 'no'}" in run.stdout
    assert "FASTLLM_CPU_ISA unset: each kernel takes the best path it has" in run.stdout
    # and the level torch's own kernels run at (the child saw no ATEN_CPU_CAPABILITY cap
    # unless this process did)
    torch_level = torch.backends.cpu.get_cpu_capability()
    assert f"torch's CPU kernels: {torch_level}" in run.stdout

    report = json.loads(out_json.read_text())
    assert report["machine"]["cpu_isa"] == features
    assert report["machine"]["torch_cpu_isa"].startswith(torch_level)
    results = [Result(**r) for r in report["results"]]
    fastllm_rows = [r for r in results if r.contender == FASTLLM]
    assert [r.family for r in fastllm_rows] == ["norm", "mlp"]
    for r in results:
        if r.contender == FASTLLM:
            kernel_family, dtype = QUICK_KERNELS[r.family]
            assert r.path == EXPECTED[kernel_family](dtype, "")
        else:
            assert r.path is None

    # each family's table: a path column; fastllm's row carries its path, torch's rows none
    sections = run.stdout.split("\n== ")[1:]
    assert [s.split(" ==")[0] for s in sections] == ["norm", "mlp"]
    for section, r in zip(sections, fastllm_rows):
        header, _, *rows = section.split(" ==\n", 1)[1].splitlines()
        column = header.index(" path ") + 1
        rows = [row for row in rows if row.strip() and not row.startswith("wall time")]
        assert len(rows) == 3
        for row in rows:
            cell = row[column:].split("  ")[0].strip()
            assert cell == (r.path if r.label in row else ""), row

    # the PNG: complete, readable, and written under its own name only
    data = out_png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data.endswith(b"IEND\xaeB`\x82")
    from matplotlib.image import imread

    image = imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "ratios.png"]

    # what was drawn: one panel per family, two bars per case, each labelled with its path
    from fastllm.bench.plot import ratio_figure

    fig = ratio_figure(results)
    assert [ax.get_title(loc="left").split(":")[0] for ax in fig.axes] == ["norm", "mlp"]
    for ax, r in zip(fig.axes, fastllm_rows):
        bars = [bar for container in ax.containers for bar in container]
        assert len(bars) == 2
        assert ax.get_xscale() == "log"
        widths = sorted(bar.get_width() + 1.0 for bar in bars)
        assert widths == pytest.approx(sorted([r.speedup_vs_eager, r.speedup_vs_compile]))
        labels = [t.get_text() for t in ax.texts]
        assert labels == [f"{r.path}  {r.speedup_vs_eager:.2f}x",
                          f"{r.path}  {r.speedup_vs_compile:.2f}x"]
        assert any(line.get_xdata()[0] == 1.0 for line in ax.lines)  # the 1.0 line


def _result(case: str, contender: str, thp: str = "off", **fields) -> Result:
    return Result(family="norm", case=case, params={}, contender=contender,
                  label="fastllm[native]" if contender == FASTLLM else contender,
                  device="cpu", thp=thp, **fields)


def test_plot_bars_skip_missing_ratios_and_write_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from fastllm.bench.plot import ratio_figure, write_plot

    results = [
        _result("a", FASTLLM, path="avx2", speedup_vs_eager=2.0, speedup_vs_compile=0.5),
        _result("a", EAGER, speedup_vs_eager=1.0, speedup_vs_compile=0.25),
        _result("a", FASTLLM, thp="on", path="avx2", speedup_vs_eager=1.5),  # compile failed
        _result("b", FASTLLM, path="scalar", error="RuntimeError: boom"),
    ]
    fig = ratio_figure(results)
    (ax,) = fig.axes
    assert sum(len(c) for c in ax.containers) == 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a (THP off)", "a (THP on)", "b (THP off)"]
    assert [t.get_text() for t in ax.texts] == [
        "avx2  2.00x", "avx2  1.50x", "avx2  0.50x", "scalar  FAILED"]

    target = tmp_path / "plot.png"
    target.write_bytes(b"previous")

    def failing_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_SIGNATURE)  # half a file, then the failure
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", failing_savefig)
        with pytest.raises(OSError, match="disk full"):
            write_plot(results, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary left

    write_plot(results, target)
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]

    with pytest.raises(ValueError, match="at least one fastllm row"):
        ratio_figure([results[1]])


@pytest.mark.parametrize("args, message", [
    (("models", "--quick"), "--plot draws the op families' speed ratios; models runs"),
    (("pretrain",), "--plot draws the op families' speed ratios; pretrain runs"),
])
def test_plot_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args, "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_into_missing_directory_is_refused(tmp_path, capsys):
    target = tmp_path / "no-such-dir" / "x.png"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "norm", "--quick", "--plot", str(target)])
    assert exc.value.code == 2
    assert f"--plot: the directory of {target} does not exist" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        main(["bench", "norm", "--quick", "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "fastllm bench --plot needs matplotlib, which is not installed" in err
    assert "pip install 'fastllm[plot]'" in err
    assert list(tmp_path.iterdir()) == []


def test_torch_cpu_isa_names_the_caps(monkeypatch):
    """The header's words on torch's own level: get_cpu_capability(), and each cap that is
    set, so a record timed with torch held to AVX2 says so."""
    for name in TORCH_CPU_ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    level = torch.backends.cpu.get_cpu_capability()
    assert torch_cpu_isa() == level
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert torch_cpu_isa() == f"{level} (ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)"


def test_inductor_cache_kept_apart_per_aten_cpu_capability():
    """torch.compile's cache does not key on ATEN_CPU_CAPABILITY, and code cached at another
    level crashed the process that reused it: a run that sets it gets a directory of that
    level's own -- also where TORCHINDUCTOR_CACHE_DIR is torch's default, which importing
    torch._dynamo sets -- while a directory the user chose, or no cap, is left alone."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fastllm.bench.common import INDUCTOR_CACHE_ENV, inductor_cache_for_isa

    default = default_cache_dir()
    assert inductor_cache_for_isa({}) is None
    assert inductor_cache_for_isa({INDUCTOR_CACHE_ENV: "/somewhere"}) is None
    assert inductor_cache_for_isa({"ATEN_CPU_CAPABILITY": "avx2"}) == default + "_aten_avx2"
    assert inductor_cache_for_isa({"ATEN_CPU_CAPABILITY": "AVX512",
                                   INDUCTOR_CACHE_ENV: default}) == default + "_aten_avx512"
    assert inductor_cache_for_isa({"ATEN_CPU_CAPABILITY": "avx2",
                                   INDUCTOR_CACHE_ENV: "/somewhere"}) is None
