"""``fastllm bench pretrain`` (fastllm/bench/pretrain.py): a smoke run through the real
command line (``python -m fastllm bench pretrain``) on tiny configs, 2 steps, 1 repeat, both
architectures: every contender ran in its own worker, the markdown table and the JSON carry
every field, the rates, memory and ratios are finite and positive, fastllm and Hugging Face
start from the same loss (same weights, same batch) and HF's model is the expected class;
and the options are checked before anything runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastllm.bench import pretrain as bench_pretrain
from fastllm.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ("the quick brown fox jumps over the lazy dog. ",
             "a stitch in time saves nine. ",
             "all that glitters is not gold. ")
TINY = ("--vocab-size", "300", "--batch-size", "4", "--seq-len", "16", "--steps", "2",
        "--skip-steps", "1", "--repeats", "1", "--precision", "fp32", "--hf-attn", "sdpa")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("".join(SENTENCES) * 40)
    return root


def test_bench_pretrain_smoke(corpus, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # gpt2 at gpt-nano (--config takes a single --arch), llama at its default, llama-tiny
    done = subprocess.run(
        [sys.executable, "-m", "fastllm", "bench", "pretrain", "--arch", "gpt2", "--config",
         "gpt-nano", "--data-dir", str(corpus), "--json", str(out), *TINY],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done_llama = subprocess.run(
        [sys.executable, "-m", "fastllm", "bench", "pretrain", "--arch", "llama", "--data-dir",
         str(corpus), "--json", str(tmp_path / "llama.json"), *TINY],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done_llama.returncode == 0, done_llama.stderr[-3000:]

    for stdout, report_file, case, hf_class in (
            (done.stdout, out, "gpt2-gpt-nano-fp32", "GPT2LMHeadModel"),
            (done_llama.stdout, tmp_path / "llama.json", "llama-llama-tiny-fp32",
             "LlamaForCausalLM")):
        # the table: header, alignment row, one row per contender
        lines = [line for line in stdout.splitlines() if line.startswith("|")]
        assert lines[0].startswith("| case | contender | tokens/s | runs' range | vs HF | "
                                   "best step tok/s | vs HF | peak RSS MiB |")
        rows = [line.split("|")[1:-1] for line in lines[2:]]
        assert [(r[0].strip(), r[1].strip()) for r in rows] == [
            (case, "fastllm pretrain"), (case, f"HF sdpa ({hf_class})")]
        for row in rows:
            assert float(row[2]) > 0 and float(row[7]) > 0  # tokens/s, peak RSS MiB
        assert "OMP_NUM_THREADS=1" in stdout and "CPU kernel path:" in stdout
        assert "ru_maxrss" in stdout

        report = json.loads(report_file.read_text())
        assert report["omp_num_threads"] == "1" and report["torch_threads_in_workers"] == 1
        assert "getrusage" in report["memory_measure"] and report["cpu_kernel_path"]
        assert report["plan"]["steps"] == 2 and report["plan"]["repeats"] == 1
        (entry,) = report["cases"]
        assert len(entry["load_average"]) == 2
        assert entry["case"] == case
        ours, hf = entry["results"]["fastllm pretrain"], entry["results"]["HF sdpa"]
        assert hf["hf_class"] == hf_class and hf["attn_implementation"] == "sdpa"
        assert hf["tied_embeddings"] == (hf_class == "GPT2LMHeadModel")
        for r in (ours, hf):
            assert "error" not in r, r.get("error")
            assert r["tokens_per_s_best_step"] >= r["tokens_per_s"]
            for key in ("tokens_per_s", "tokens_per_s_vs_hf", "tokens_per_s_best_step",
                        "best_step_vs_hf", "peak_rss_mib", "peak_rss_vs_hf",
                        "rss_at_start_mib", "peak_rss_process_mib"):
                assert math.isfinite(r[key]) and r[key] > 0, (case, key, r[key])
            assert r["peak_rss_mib"] >= r["rss_at_start_mib"]
            assert len(r["losses"]) == 2 and len(r["runs"]) == 1
            assert len(r["runs"][0]["step_times_s"]) == 2
        assert hf["tokens_per_s_vs_hf"] == 1.0
        # same starting weights and batch, float32: the same first loss up to rounding
        assert abs(ours["loss_first"] - hf["loss_first"]) < 1e-4 * ours["loss_first"]
        assert hf["max_abs_loss_diff_vs_fastllm"] < 1e-2


@pytest.mark.parametrize("args, message", [
    (("pretrain", "--steps", "2", "--skip-steps", "2"), "--skip-steps"),
    (("pretrain", "--repeats", "0"), "--repeats must be >= 1, got 0"),
    (("pretrain", "--config", "gpt-nano"), "--config needs exactly one --arch"),
    (("pretrain", "--arch", "gpt2", "--config", "llama-tiny"), "not a gpt2 config"),
    (("pretrain", "--arch", "llama", "--seq-len", "129"), "--seq-len 129"),
    (("pretrain", "--data-dir", "/nonexistent/corpus"), "--data-dir /nonexistent/corpus"),
    (("pretrain", "--device", "cuda"), "CPU only"),
    (("pretrain", "norm"), "pretrain runs alone"),
    (("norm", "--steps", "3"), "--steps is an option of fastllm bench pretrain only"),
])
def test_bench_pretrain_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_kernel_path_follows_fastllm_cpu_isa(monkeypatch):
    """The report names each family's path from fastllm.backend.cpu_kernel_path, in a process
    with the workers' environment: FASTLLM_CPU_ISA=scalar forces the portable path, =avx2
    caps every family at AVX2 (where the CPU has it)."""
    flags = next((line.split(":", 1)[1].split()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    monkeypatch.setenv("FASTLLM_CPU_ISA", "scalar")
    forced = bench_pretrain.cpu_kernel_path()
    assert "attention scalar" in forced and "avx" not in forced.split(" [")[0], forced
    monkeypatch.setenv("FASTLLM_CPU_ISA", "avx2")
    capped = bench_pretrain.cpu_kernel_path()
    best = "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "scalar"
    assert f"attention {best}" in capped and f"norm {best}" in capped, capped
    assert "avx512" not in capped and "amx" not in capped, capped
