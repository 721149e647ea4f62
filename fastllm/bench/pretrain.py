"""``fastllm bench pretrain``: ``fastllm pretrain`` against the same model in Hugging Face
transformers trained by a plain PyTorch loop on the same batches, in the same invocation.

    fastllm bench pretrain [--arch gpt2|llama ...] [--precision fp32|bf16 ...]
                           [--steps N] [--skip-steps W] [--repeats R] [--hf-attn sdpa|eager ...]
                           [--batch-size B] [--seq-len T] [--data-dir PATH ...]
                           [--vocab-size V] [--config NAME] [--seed S] [--json FILE]
                           [--only CASE-GLOB ...] [--backend NAME] [--quick]

(``--quick``: 4 steps, 1 left out, 1 run per contender, unless given.)

Contenders, on each case (an architecture, its ``fastllm pretrain`` default config, a
precision):

  fastllm pretrain  the real command: ``fastllm.cli.main(["pretrain", ...])`` with
                    ``--eval-every 0 --eval-batches 1 --sample-tokens 0 --save-every 0`` (one
                    held-out batch and one checkpoint, at the end), its tokens/s read from the
                    ``metrics.jsonl`` it writes (per step: the batch, forward, backward,
                    clipping, AdamW, zero_grad).
  HF <attn>         ``transformers.AutoModelForCausalLM`` (GPT2LMHeadModel, LlamaForCausalLM)
                    loaded from the ``save_pretrained`` folder of the very model
                    ``fastllm pretrain`` initialises (same seed, config, vocabulary, tied
                    embeddings, positions: the same starting weights), with
                    ``attn_implementation`` sdpa (and eager), trained by a plain loop timing
                    the same work per step: ``fastllm.train.data.get_batch`` windows of the
                    same stream (same tokenizer, same split, same seed: the same batches),
                    ``model(input_ids=x, labels=x).loss``, backward, ``clip_grad_norm_`` (1.0),
                    AdamW (fused, betas 0.9/0.95, weight decay 0.1 on matrices only) at the
                    same warmup + cosine learning rate (``fastllm.train.loop.lr_at``).

``--precision bf16`` is ``fastllm pretrain --bf16``: bfloat16 autocast of forward and
backward, float32 weights and AdamW; the HF loop autocasts the same way.

Each run is its own subprocess (``python -m fastllm.bench.pretrain --worker ...``), run one
after the other and alternated (repeat r runs the contenders in reverse order when r is
odd), so that noise from other processes falls on all of them alike. tokens/s of one run:
B * T / the median time of its steps after the first ``--skip-steps`` (warm-up); reported:
the median over ``--repeats`` runs, with the range of the runs, and the rate of the fastest
step of all runs (on a machine other processes share, the least disturbed figure); the load
average before and after each case is printed too.

Memory: the peak resident set size of the worker process, from
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read in the worker right after its last
training step (for fastllm pretrain: when the loop calls ``save_checkpoint`` for the first
time, after the final one-batch evaluation; the whole process's peak, with the checkpoint
and the loss plot, is in the JSON). It includes the interpreter and every imported library
(the HF worker imports transformers, fastllm's does not), so the RSS when training starts
is shown too, and what training added to it.

Losses: each contender's training loss at step 1 and at the last step (and the largest
difference over the curve) from the same starting weights and batches; not bit-identical
(different kernels), but close.

CPU only (the memory is the process's resident set). Threads: workers inherit the
environment; on a machine shared with other processes run it as
``OMP_NUM_THREADS=1 fastllm bench pretrain`` (see fastllm/bench/models.py for why).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger("fastllm")

FAMILY = "pretrain"
ARCHS = ("gpt2", "llama")
PRECISIONS = ("fp32", "bf16")
HF_ATTN = ("sdpa", "eager")
FASTLLM = "fastllm pretrain"
DEFAULTS = dict(arch=list(ARCHS), precision=list(PRECISIONS), hf_attn=list(HF_ATTN), steps=30,
                skip_steps=5, repeats=3, batch_size=16, seq_len=128, vocab_size=2048, seed=0)
QUICK = dict(steps=4, skip_steps=1, repeats=1)  # --quick: a smoke run (given options win)
# what fastllm pretrain uses by default, repeated by the HF loop
LR, MIN_LR, WARMUP, WEIGHT_DECAY, GRAD_CLIP, VAL_FRACTION = 2e-3, 2e-4, 50, 0.1, 1.0, 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastllm bench pretrain`` (on the ``fastllm bench`` parser; refused
    with any other family)."""
    g = parser.add_argument_group("pretrain (fastllm bench pretrain only)")
    g.add_argument("--arch", action="append", choices=ARCHS,
                   help="architecture, repeatable (default: gpt2 and llama)")
    g.add_argument("--config", metavar="NAME",
                   help="config name (default: fastllm pretrain's, gpt-mini / llama-tiny); "
                   "with one --arch only")
    g.add_argument("--precision", action="append", choices=PRECISIONS,
                   help="fp32, or bf16 (fastllm pretrain --bf16: bfloat16 autocast); "
                   "repeatable (default: both)")
    g.add_argument("--hf-attn", action="append", choices=HF_ATTN,
                   help="Hugging Face attn_implementation, repeatable (default: sdpa and eager)")
    g.add_argument("--steps", type=int, help=f"steps per run (default {DEFAULTS['steps']})")
    g.add_argument("--skip-steps", type=int,
                   help=f"first steps of each run left out of tokens/s (default "
                   f"{DEFAULTS['skip_steps']})")
    g.add_argument("--repeats", type=int,
                   help=f"runs per contender, alternated (default {DEFAULTS['repeats']})")
    g.add_argument("--batch-size", type=int, help="windows per step (default 16)")
    g.add_argument("--seq-len", type=int, help="tokens per window (default 128)")
    g.add_argument("--vocab-size", type=int, help="of the byte-level BPE (default 2048)")
    g.add_argument("--data-dir", action="append", type=Path, metavar="PATH",
                   help="corpus (default: fastllm pretrain's, the pydoc topics)")
    g.add_argument("--seed", type=int, help="initialisation and data order (default 0)")


PRETRAIN_OPTIONS = ("arch", "config", "precision", "hf_attn", "steps", "skip_steps", "repeats",
                    "batch_size", "seq_len", "vocab_size", "data_dir", "seed")


def check_unused(args: argparse.Namespace) -> None:
    """Refuses the pretrain options with another family."""
    from fastllm.cli import UsageError

    used = [name for name in PRETRAIN_OPTIONS if getattr(args, name, None) is not None]
    if used:
        raise UsageError(f"--{used[0].replace('_', '-')} is an option of fastllm bench "
                         f"pretrain only")


@dataclasses.dataclass(frozen=True)
class Plan:
    archs: tuple[str, ...]
    config: Optional[str]
    precisions: tuple[str, ...]
    hf_attn: tuple[str, ...]
    steps: int
    skip_steps: int
    repeats: int
    batch_size: int
    seq_len: int
    vocab_size: int
    data_dir: Optional[tuple[str, ...]]
    seed: int
    backend: Optional[str]

    @property
    def contenders(self) -> tuple[str, ...]:
        return (FASTLLM, *(f"HF {a}" for a in self.hf_attn))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def config_name(plan: Plan, arch: str) -> str:
    from fastllm.train.pretrain import DEFAULT_CONFIG

    return plan.config or DEFAULT_CONFIG[arch]


def case_id(plan: Plan, arch: str, precision: str) -> str:
    return f"{arch}-{config_name(plan, arch)}-{precision}"


def make_plan(args: argparse.Namespace, backend: Optional[str]) -> Plan:
    """The plan of ``args``, every option checked (UsageError naming it)."""
    from fastllm.cli import UsageError
    from fastllm.train.data import MIN_VOCAB_SIZE
    from fastllm.train.pretrain import _model_family, _positions

    defaults = {**DEFAULTS, **(QUICK if getattr(args, "quick", False) else {})}
    value = {name: getattr(args, name, None) for name in PRETRAIN_OPTIONS}
    value = {k: (defaults[k] if v is None and k in defaults else v) for k, v in value.items()}
    for name in ("steps", "repeats", "batch_size"):
        if value[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value[name]}")
    if not 0 <= value["skip_steps"] < value["steps"]:
        raise UsageError(f"--skip-steps must be in [0, --steps), got {value['skip_steps']} "
                         f"with --steps {value['steps']}")
    if value["seq_len"] < 2:
        raise UsageError(f"--seq-len must be >= 2, got {value['seq_len']}")
    if value["vocab_size"] < MIN_VOCAB_SIZE:
        raise UsageError(f"--vocab-size must be >= {MIN_VOCAB_SIZE}, got {value['vocab_size']}")
    archs = tuple(dict.fromkeys(value["arch"]))
    if value["config"] is not None and len(archs) != 1:
        raise UsageError(f"--config needs exactly one --arch, got {len(archs)} "
                         f"({', '.join(archs)})")
    plan = Plan(archs=archs, config=value["config"],
                precisions=tuple(dict.fromkeys(value["precision"])),
                hf_attn=tuple(dict.fromkeys(value["hf_attn"])), steps=value["steps"],
                skip_steps=value["skip_steps"], repeats=value["repeats"],
                batch_size=value["batch_size"], seq_len=value["seq_len"],
                vocab_size=value["vocab_size"],
                data_dir=None if value["data_dir"] is None else
                tuple(str(p) for p in value["data_dir"]),
                seed=value["seed"], backend=backend)
    for arch in archs:
        _, config_cls = _model_family(arch)
        name = config_name(plan, arch)
        if name not in config_cls.names:
            raise UsageError(f"--config {name!r} is not a {arch} config; known: "
                             f"{', '.join(sorted(config_cls.names))}")
        positions = _positions(config_cls.from_name(name))
        if plan.seq_len > positions:
            raise UsageError(f"--seq-len {plan.seq_len} is more than {name}'s position table "
                             f"holds ({positions})")
    if plan.data_dir is not None:
        missing = [p for p in plan.data_dir if not Path(p).exists()]
        if missing:
            raise UsageError(f"--data-dir {missing[0]} does not exist")
    return plan


# ----------------------------------------------------------------------------- machine


_PATHS_SCRIPT = (
    "import json, torch\n"
    "from fastllm.backend import cpu_kernel_path\n"
    "from fastllm.ops import FAMILIES\n"
    "print(json.dumps({f: {str(d).split('.')[-1]: cpu_kernel_path(f, d)"
    " for d in (torch.float32, torch.bfloat16)} for f in FAMILIES"
    " if f in ('attention', 'norm', 'cross_entropy', 'rotary', 'gated_mlp')}))\n"
)


def cpu_kernel_path() -> str:
    """Which paths fastllm's C++ CPU kernels take in a process started with this environment
    (the workers' environment: the CPU's flags and FASTLLM_CPU_ISA): per family, its path for
    float32 and bfloat16 from fastllm.backend.cpu_kernel_path (csrc/common/cpu_kernel_paths.cpp),
    asked in a child process because the path is chosen once per process."""
    requested = os.environ.get("FASTLLM_CPU_ISA", "")
    suffix = f" [FASTLLM_CPU_ISA={requested}]" if requested else ""
    try:
        out = subprocess.run([sys.executable, "-c", _PATHS_SCRIPT], capture_output=True,
                             text=True, check=True, timeout=120)
        paths = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as error:
        return f"unknown ({type(error).__name__}){suffix}"
    parts = [f"{family} {p['float32']}" + (f"/{p['bfloat16']} (bf16)" if p["bfloat16"] != p["float32"] else "")
             for family, p in paths.items()]
    return ", ".join(parts) + suffix


def _rss_now_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    import resource  # POSIX only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------- workers


def _fastllm_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``fastllm pretrain`` run, through the command line's own entry point."""
    import torch

    from fastllm.cli import main
    from fastllm.train import checkpoint, loop

    marks: dict[str, Optional[int]] = {}
    original_train, original_save = loop.train, checkpoint.save_checkpoint

    def observed_train(*a, **k):
        marks["rss_at_start"], marks["peak_at_start"] = _rss_now_bytes(), _peak_rss_bytes()
        return original_train(*a, **k)

    def observed_save(*a, **k):
        marks.setdefault("peak_after_training", _peak_rss_bytes())
        return original_save(*a, **k)

    # observers only: they note the resident set and call the real functions
    loop.train, checkpoint.save_checkpoint = observed_train, observed_save
    argv = ["pretrain", "--arch", spec["arch"], "--config", spec["config"],
            "--tokenizer", spec["tokenizer"], "--output-dir", spec["output_dir"],
            "--steps", str(spec["steps"]), "--batch-size", str(spec["batch_size"]),
            "--seq-len", str(spec["seq_len"]), "--seed", str(spec["seed"]),
            "--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0",
            "--save-every", "0", "--device", "cpu",
            *(["--bf16"] if spec["bf16"] else [])]
    for path in spec["data_dir"] or []:
        argv += ["--data-dir", path]
    status = main(argv)
    if status != 0:
        raise RuntimeError(f"fastllm pretrain exited with status {status}")
    records = [r for r in loop.read_metrics(Path(spec["output_dir"]) / loop.METRICS_FILE)
               if "loss" in r]
    tokens = spec["batch_size"] * spec["seq_len"]
    return {"step_times_s": [tokens / r["tokens_per_s"] for r in records],
            "losses": [r["loss"] for r in records],
            "rss_at_start_bytes": marks.get("rss_at_start"),
            "peak_rss_training_bytes": marks.get("peak_after_training"),
            "peak_rss_process_bytes": _peak_rss_bytes(),
            "threads": torch.get_num_threads()}


def _hf_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The same training, Hugging Face's model, a plain loop."""
    import contextlib

    import torch
    import transformers

    from fastllm.train import data
    from fastllm.train.loop import TrainConfig, lr_at

    docs = data.read_corpus(spec["data_dir"]) if spec["data_dir"] else data.default_corpus()
    tokenizer = data.load_tokenizer(spec["tokenizer"])
    stream = data.token_stream(docs, tokenizer)
    train_stream, _ = data.split_stream(stream, VAL_FRACTION, spec["seq_len"])
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"],
                      seq_len=spec["seq_len"], lr=LR, min_lr=MIN_LR, warmup=WARMUP,
                      weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, seed=spec["seed"],
                      bf16=spec["bf16"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["init_dir"], attn_implementation=spec["attn"], dtype=torch.float32)
    model.train()
    embeddings = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95), eps=1e-8, fused=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if spec["bf16"] \
        else contextlib.nullcontext
    rss_at_start, times, losses = _rss_now_bytes(), [], []
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        t0 = time.perf_counter()
        x = data.get_batch(train_stream, cfg.batch_size, cfg.seq_len, cfg.seed, step)  # (B, T)
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return {"step_times_s": times, "losses": losses, "rss_at_start_bytes": rss_at_start,
            "peak_rss_training_bytes": _peak_rss_bytes(),
            "peak_rss_process_bytes": _peak_rss_bytes(), "threads": torch.get_num_threads(),
            "hf_class": type(model).__name__, "tied_embeddings": tied,
            "attn_implementation": model.config._attn_implementation}


def _worker_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastllm.bench.pretrain",
                                     description="one run of fastllm bench pretrain")
    parser.add_argument("--worker", required=True, choices=("fastllm", "hf"))
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(args.spec.read_text())
    record = (_fastllm_worker if args.worker == "fastllm" else _hf_worker)(spec)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, args.out)
    return 0


# ----------------------------------------------------------------------------- runner


def _prepare(plan: Plan, work: Path) -> dict[str, Path]:
    """The tokenizer both sides use (trained once, as fastllm pretrain trains it) and, per
    architecture, the save_pretrained folder of the model fastllm pretrain initialises."""
    import torch

    from fastllm.train import data
    from fastllm.train.pretrain import _model_family

    docs = data.read_corpus(plan.data_dir) if plan.data_dir else data.default_corpus()
    tokenizer = data.train_tokenizer(docs, plan.vocab_size)
    data.save_tokenizer(tokenizer, work)
    stream = data.token_stream(docs, tokenizer)
    data.split_stream(stream, VAL_FRACTION, plan.seq_len)  # DataError if too short
    folders = {"tokenizer": work / data.TOKENIZER_FILE}
    for arch in plan.archs:
        model_cls, config_cls = _model_family(arch)
        config = config_cls.from_name(config_name(plan, arch),
                                      vocab_size=tokenizer.get_vocab_size())
        torch.manual_seed(plan.seed)  # what fastllm pretrain does before building the model
        folders[arch] = work / f"init-{arch}"
        model_cls(config).save_pretrained(folders[arch])
    return folders


def _run_worker(kind: str, spec: dict[str, Any], work: Path, env: dict[str, str]) -> dict:
    name = f"{kind}-{len(list(work.glob('spec-*.json')))}"
    spec_file, out, log = work / f"spec-{name}.json", work / f"out-{name}.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec))
    with open(log, "w") as stderr:
        completed = subprocess.run(
            [sys.executable, "-m", "fastllm.bench.pretrain", "--worker", kind, "--spec",
             str(spec_file), "--out", str(out)],
            env=env, stdout=stderr, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return {"error": f"worker exited with status {completed.returncode}: {tail[0][:200]}"}
    return json.loads(out.read_text())


def _summarise(plan: Plan, runs: list[dict]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {"runs": runs}
    if len(ok) < len(runs):
        summary["error"] = next(r["error"] for r in runs if "error" in r)
        return summary
    # a run's rate from its median timed step: a step stretched by another process taking
    # the core (a shared machine) moves a mean, not a median
    rates = [plan.tokens_per_step / statistics.median(r["step_times_s"][plan.skip_steps:])
             for r in ok]
    mib = 1024 ** 2
    median = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    fastest = min(t for r in ok for t in r["step_times_s"][plan.skip_steps:])
    summary.update(
        tokens_per_s=statistics.median(rates), tokens_per_s_runs=rates,
        tokens_per_s_best_step=plan.tokens_per_step / fastest,
        peak_rss_mib=median("peak_rss_training_bytes") / mib,
        peak_rss_process_mib=median("peak_rss_process_bytes") / mib,
        rss_at_start_mib=median("rss_at_start_bytes") / mib,
        losses=ok[0]["losses"], loss_first=ok[0]["losses"][0], loss_last=ok[0]["losses"][-1],
        threads=ok[0]["threads"],
    )
    summary["training_adds_mib"] = summary["peak_rss_mib"] - summary["rss_at_start_mib"]
    for key in ("hf_class", "tied_embeddings", "attn_implementation"):
        if key in ok[0]:
            summary[key] = ok[0][key]
    return summary


def _ratios(results: dict[str, dict]) -> None:
    """Against the first HF contender (sdpa, HF's default, when run)."""
    hf = next((name for name in results if name != FASTLLM), None)
    base = results.get(hf, {})
    ours = results.get(FASTLLM, {})
    for name, r in results.items():
        r["vs"] = hf
        if "tokens_per_s" in r and "tokens_per_s" in base:
            r["tokens_per_s_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["best_step_vs_hf"] = r["tokens_per_s_best_step"] / base["tokens_per_s_best_step"]
            r["peak_rss_vs_hf"] = r["peak_rss_mib"] / base["peak_rss_mib"]
        if "losses" in r and "losses" in ours:
            r["max_abs_loss_diff_vs_fastllm"] = max(
                abs(a - b) for a, b in zip(r["losses"], ours["losses"]))


def run(args: argparse.Namespace) -> int:
    """``fastllm bench pretrain``'s handler: prints the markdown table, writes --json."""
    import importlib.util

    import torch

    from fastllm.bench.common import resolve_backend
    from fastllm.cli import UsageError
    from fastllm.train.data import DataError

    started = time.perf_counter()
    if torch.device(args.device or "cpu").type != "cpu":
        raise UsageError("fastllm bench pretrain runs on the CPU only (its memory is the "
                         "worker process's resident set); pass --device cpu")
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("fastllm bench pretrain compares with Hugging Face transformers, "
                         "which is not installed: pip install 'fastllm[hf]'")
    if getattr(args, "no_thp_rerun", False):
        raise UsageError("--no-thp-rerun is not an option of fastllm bench pretrain")
    try:
        backend, backend_note = resolve_backend(args.backend, torch.device("cpu"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    plan = make_plan(args, args.backend)
    cases = [(arch, precision) for arch in plan.archs for precision in plan.precisions
             if not args.only or any(fnmatch.fnmatchcase(case_id(plan, arch, precision), p)
                                     for p in args.only)]
    if not cases:
        raise UsageError(f"no case matches --only {' '.join(args.only)}")

    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if plan.backend:
        env["FASTLLM_BACKEND"] = plan.backend
    entries = []
    with tempfile.TemporaryDirectory(prefix="fastllm-bench-pretrain-") as tmp:
        work = Path(tmp)
        try:
            folders = _prepare(plan, work)
        except DataError as exc:
            raise UsageError(f"--data-dir: {exc}") from exc
        for arch, precision in cases:
            cid = case_id(plan, arch, precision)
            runs: dict[str, list[dict]] = {name: [] for name in plan.contenders}
            load_before = os.getloadavg()[0]
            for repeat in range(plan.repeats):
                order = plan.contenders if repeat % 2 == 0 else plan.contenders[::-1]
                for name in order:
                    logger.info("pretrain [%s] repeat %d/%d: %s", cid, repeat + 1, plan.repeats,
                                name)
                    spec = {"arch": arch, "config": config_name(plan, arch),
                            "tokenizer": str(folders["tokenizer"]), "steps": plan.steps,
                            "batch_size": plan.batch_size, "seq_len": plan.seq_len,
                            "seed": plan.seed, "bf16": precision == "bf16",
                            "data_dir": list(plan.data_dir) if plan.data_dir else None,
                            "init_dir": str(folders[arch]),
                            "attn": name.removeprefix("HF "),
                            "output_dir": str(work / f"run-{cid}-{repeat}")}
                    runs[name].append(_run_worker("fastllm" if name == FASTLLM else "hf", spec,
                                                  work, env))
            results = {name: _summarise(plan, r) for name, r in runs.items()}
            _ratios(results)
            entries.append({"case": cid, "arch": arch, "config": config_name(plan, arch),
                            "precision": precision, "results": results,
                            "load_average": [load_before, os.getloadavg()[0]]})

    wall = time.perf_counter() - started
    isa = cpu_kernel_path()
    print(_header(plan, backend_note, isa))
    print()
    print(markdown_table(entries, plan))
    print()
    print(_footnote(plan))
    print(f"\n1-minute load average before / after each case (above {os.cpu_count()}: other "
          "processes shared the cores, with every contender alike):")
    for e in entries:
        print(f"  {e['case']}: {e['load_average'][0]:.2f} / {e['load_average'][1]:.2f}")
    print(f"\nwall time: {wall:.0f} s")
    if args.json:
        report = {"family": FAMILY, "plan": dataclasses.asdict(plan), "backend": backend,
                  "cpu_kernel_path": isa, "torch_threads_in_workers": _threads(entries),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "versions": _versions(), "memory_measure": MEMORY_NOTE,
                  "wall_time_s": wall, "cases": entries}
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.json)
    failed = [(e["case"], name) for e in entries for name, r in e["results"].items()
              if "error" in r]
    for case, name in failed:
        logger.error("%s: %s failed: %s", case, name,
                     next(e for e in entries if e["case"] == case)["results"][name]["error"])
    return 1 if failed else 0


MEMORY_NOTE = ("peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss of the contender's own "
               "worker process, read right after its last training step (interpreter and "
               "imported libraries included)")


def _threads(entries) -> Optional[int]:
    for e in entries:
        for r in e["results"].values():
            if "threads" in r:
                return r["threads"]
    return None


def _versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _header(plan: Plan, backend_note: str, isa: str) -> str:
    import platform

    v = _versions()
    threads = os.environ.get("OMP_NUM_THREADS")
    return "\n".join([
        f"fastllm bench pretrain on cpu ({platform.processor() or platform.machine()}), torch "
        f"{v['torch']}, transformers {v['transformers']}; OMP_NUM_THREADS="
        f"{threads if threads is not None else 'unset'}",
        f"fastllm timed on backend: {backend_note}; CPU kernel path: {isa}",
        f"{plan.steps} steps of {plan.batch_size} x {plan.seq_len} tokens per run, the first "
        f"{plan.skip_steps} left out of tokens/s; {plan.repeats} runs per contender, "
        "alternated, each in its own process; medians shown",
    ])


def _fmt(value: Optional[float], digits: int = 3, suffix: str = "") -> str:
    from fastllm.bench.common import _fmt as fmt

    return fmt(value, suffix, digits)


def markdown_table(entries, plan: Plan) -> str:
    headers = ["case", "contender", "tokens/s", "runs' range", "vs HF", "best step tok/s",
               "vs HF", "peak RSS MiB", "vs HF",
               "RSS at start MiB", "training adds MiB", "loss step 1",
               f"loss step {plan.steps}", "max |loss diff|"]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|"]
    for e in entries:
        for name, r in e["results"].items():
            label = name if name == FASTLLM else f"{name} ({r.get('hf_class', 'HF')})"
            if "error" in r:
                lines.append(f"| {e['case']} | {label} | FAILED: {r['error']} |"
                             + " |" * (len(headers) - 3))
                continue
            lines.append("| " + " | ".join([
                e["case"], label, _fmt(r["tokens_per_s"]),
                f"{_fmt(min(r['tokens_per_s_runs']))}-{_fmt(max(r['tokens_per_s_runs']))}",
                _fmt(r.get("tokens_per_s_vs_hf"), suffix="x"), _fmt(r["tokens_per_s_best_step"]),
                _fmt(r.get("best_step_vs_hf"), suffix="x"), _fmt(r["peak_rss_mib"], 4),
                _fmt(r.get("peak_rss_vs_hf"), suffix="x"), _fmt(r["rss_at_start_mib"], 4),
                _fmt(r["training_adds_mib"], 3), f"{r['loss_first']:.4f}",
                f"{r['loss_last']:.4f}",
                "-" if name == FASTLLM else f"{r['max_abs_loss_diff_vs_fastllm']:.4f}",
            ]) + " |")
    return "\n".join(lines)


def _footnote(plan: Plan) -> str:
    return "\n".join([
        f"tokens/s: median over runs of B * T / the run's median step time, steps "
        f"{plan.skip_steps + 1}-{plan.steps}; runs' range: the slowest and fastest run; best step: "
        "B * T / the fastest of those steps over all runs (the least disturbed by other "
        "processes on a shared machine). A step "
        "is the batch, forward, backward, gradient clipping, AdamW (fused) and zero_grad, on "
        "both sides. vs HF: against the first HF row of the case (sdpa).",
        f"{MEMORY_NOTE}. RSS at start: VmRSS when training begins (model, optimizer, data "
        "loaded); training adds: peak RSS - RSS at start.",
        "losses: the training loss of step 1 and of the last step, and the largest "
        "difference to fastllm's over all steps: same starting weights (fastllm's "
        "save_pretrained), same batches, same learning rates.",
    ])


if __name__ == "__main__":
    sys.exit(_worker_main())
