"""The training loop of every objective (fastllm/train/objectives.py): AdamW, warmup + cosine learning rate, gradient accumulation,
clipping, held-out perplexity, checkpoints, metrics JSONL and the loss / learning-rate plot.

One optimizer step ("step") takes ``grad_accum`` micro-batches of ``batch_size`` rows (for
causal LM, windows of ``seq_len`` tokens). Each micro-batch's loss is its summed loss divided
by the count of the whole step (``num_items_in_batch``, from ``objective.normalisers``), so the
accumulated gradient is exactly the gradient of the step's mean loss. Everything a step depends on is a function of
(seed, step) and the saved state (weights, AdamW moments, RNG), so a resumed run repeats an
uninterrupted one bit for bit.

Stopping: at ``steps``; on Ctrl-C (SIGINT) after the current step, with a checkpoint (a
second Ctrl-C stops at once; the weights are saved when they are between two updates); on
a non-finite loss, with its step number and without a checkpoint of the broken weights.

Several processes (``distributed``, fastllm/train/distributed.py): ``batch_size`` is per
process, so a step's global batch is ``batch_size * grad_accum * world_size`` rows; every
process draws the step's global rows and trains on its contiguous share
(``rank * batch_size * grad_accum`` onwards). The normalisers count the global batch, so a
micro-batch's loss is its share of the global mean; DDP and FSDP *average* the gradients over
the processes, so each micro-batch's loss is multiplied by ``world_size`` before its backward
(Hugging Face's Trainer does the same with ``num_items_in_batch``), which makes the averaged
gradient the gradient of the global mean loss: N processes follow one process with
``grad_accum * N`` micro-batches. The step's loss, the held-out sums and the stop request are
summed over the processes (so a non-finite loss or a Ctrl-C on any process stops all of them
after the same step, and a second Ctrl-C does not abort a process alone: torchrun forwards
the terminal's Ctrl-C once more). Only rank 0 writes the metrics, the plot and checkpoints,
and shows the progress bar; under FSDP every process takes part in gathering the checkpoint.
Tokens and tokens/s count all processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fastllm.train import checkpoint as ckpt
from fastllm.train.distributed import Distributed
from fastllm.train import distributed as dist
from fastllm.train.objectives import Objective, n_rows, rows, to_device

logger = logging.getLogger("fastllm.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


@dataclass
class TrainConfig:
    steps: int  # optimizer steps of the whole run
    batch_size: int  # windows per micro-batch
    seq_len: int  # tokens per window
    grad_accum: int = 1  # micro-batches per step
    lr: float = 1e-3  # peak learning rate, after the warmup
    min_lr: float = 1e-4  # reached at the last step by the cosine decay
    warmup: int = 0  # steps of linear warmup from lr / warmup to lr
    weight_decay: float = 0.1  # AdamW's, on matrices and embeddings (parameters with dim >= 2)
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    seed: int = 0  # data order (with the step) and initialisation
    bf16: bool = False  # bfloat16 autocast of the forward and backward
    eval_every: int = 0  # held-out perplexity every N steps and at the end (0: at the end only)
    eval_batches: int = 8  # micro-batches of held-out windows per evaluation
    save_every: int = 0  # a checkpoint every N steps (0: only at the end and on Ctrl-C)
    keep_last: int = 2  # checkpoints kept
    world_size: int = 1  # processes (a step's global batch: batch_size * grad_accum * this)

    @property
    def tokens_per_step(self) -> int:
        """Of the global batch (all processes)."""
        return self.batch_size * self.seq_len * self.grad_accum * self.world_size


class NonFiniteLoss(RuntimeError):
    """A non-finite loss, or a finite loss whose gradient norm is not finite (which would
    write NaN into every weight through the clipping and the optimizer step)."""

    def __init__(self, step: int, loss: float, what: str = "the loss"):
        super().__init__(f"{what} is {loss} at step {step}: training stopped (no checkpoint of "
                         f"this step is written; lower --lr or check the data)")
        self.step = step


@dataclass
class TrainResult:
    step: int  # steps completed
    tokens: int  # training tokens seen
    loss: Optional[float]  # the last step's loss
    eval_loss: Optional[float]
    interrupted: bool
    checkpoint: Optional[Path]  # the newest checkpoint written (or resumed from)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of the 0-based step ``step``: linear warmup to ``lr`` over
    ``warmup`` steps, then a cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(cfg.steps - 1 - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on the parameters of dim >= 2 only (biases
    and norm weights are not decayed); tied weights appear once."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: torch's single-kernel AdamW (CPU and CUDA), several times faster than foreach
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def _autocast(bf16: bool, device: torch.device):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def accumulate_gradients(model: Callable, objective: Objective, cfg: TrainConfig, step: int,
                         device: torch.device, distributed: Optional[Distributed] = None) -> float:
    """Forward and backward of step ``step``'s ``grad_accum`` micro-batches into the
    parameters' ``.grad``; returns the step's mean loss (under ``distributed``: this
    process's part of the global mean, see the module docstring)."""
    if distributed is None or not distributed.enabled:
        batch = objective.step_batch(step, cfg.batch_size * cfg.grad_accum)  # the step's rows
        normalisers = objective.normalisers(batch)
        total = 0.0
        for start in range(0, n_rows(batch), cfg.batch_size):
            micro = to_device(rows(batch, start, start + cfg.batch_size), device)  # (B, ...)
            with _autocast(cfg.bf16, device):
                loss = model(**micro, **normalisers).loss
            loss.backward()
            total += loss.item()
        return total
    world, share = distributed.world_size, cfg.batch_size * cfg.grad_accum
    batch = objective.step_batch(step, share * world)  # the global rows, alike everywhere
    normalisers = objective.normalisers(batch)  # counted over the global batch
    batch = rows(batch, distributed.rank * share, (distributed.rank + 1) * share)
    total = 0.0
    for start in range(0, share, cfg.batch_size):
        micro = to_device(rows(batch, start, start + cfg.batch_size), device)  # (B, ...)
        with dist.no_sync(distributed, start + cfg.batch_size >= share):
            with _autocast(cfg.bf16, device):
                loss = model(**micro, **normalisers).loss
            (loss * world).backward()  # DDP / FSDP average the gradients over the processes
        total += loss.item()
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, cfg: TrainConfig,
             device: torch.device, objective: Objective,
             distributed: Optional[Distributed] = None) -> float:
    """Mean loss of the held-out ``batches`` (``objective.eval_batches``). Under
    ``distributed`` process r evaluates batches r, r + N, ... and the sums are added up over
    the processes; under FSDP a process short of a batch runs one more forward whose result
    it drops (every forward gathers weights from all processes)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    if distributed is None or not distributed.enabled:
        for batch in batches:
            with _autocast(cfg.bf16, device):
                s, c = objective.eval_sums(model, to_device(batch, device))
            total += s
            count += c
    else:
        world, rank = distributed.world_size, distributed.rank
        for first in range(0, len(batches), world):
            mine = first + rank < len(batches)
            if not mine and distributed.mode != "fsdp":
                break
            with _autocast(cfg.bf16, device):
                s, c = objective.eval_sums(
                    model, to_device(batches[first + rank if mine else 0], device))
            if mine:
                total += s
                count += c
        total, count = dist.all_reduce_sum(distributed, [total, count])
    model.train(was_training)
    return total / max(count, 1)


class _NoMetrics:
    """What a process other than rank 0 writes: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, train records (step, loss, lr, grad_norm,
    tokens, tokens_per_s, elapsed_s) and eval records (step, eval_loss, eval_ppl). On a resume
    from step s the records of later steps (written before the interruption) are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(output_dir: Path) -> Optional[Path]:
    """``loss_curve.png`` from ``metrics.jsonl``: train (and held-out) loss and the learning
    rate against the step. Skipped, with a logged note, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no %s (pip install 'fastllm[train]')",
                    PLOT_FILE)
        return None
    records = read_metrics(output_dir / METRICS_FILE)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_lr = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                     label="held-out")
    ax_loss.set(xlabel="step", ylabel="loss (nats / token)", title="loss")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    path = output_dir / PLOT_FILE
    tmp = output_dir / f".{PLOT_FILE}.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


class _StopOnSigint:
    """While active, the first SIGINT only asks the loop to stop after the current step; a
    second one raises KeyboardInterrupt as usual. (Only the main thread can take signals; in
    another thread SIGINT is left as it is.)"""

    def __init__(self, abort_on_second: bool = True):
        self.requested = False
        self.abort_on_second = abort_on_second
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested and self.abort_on_second:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        logger.warning("interrupted: stopping after this step and saving a checkpoint "
                       "(Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    objective: Objective,
    cfg: TrainConfig,
    output_dir: Path,
    *,
    start_step: int = 0,
    start_tokens: int = 0,
    run_state: dict[str, Any],
    compiled: Optional[Callable] = None,
    device: torch.device = torch.device("cpu"),
    desc: str = "train",
    after_optimizer_step: Optional[Callable[[int], None]] = None,
    distributed: Optional[Distributed] = None,
) -> TrainResult:
    """Trains ``model`` on ``objective`` from ``start_step`` to ``cfg.steps`` (see the module
    docstring).
    ``run_state``: what every checkpoint's trainer_state.json records besides the step (arch,
    model config, arguments); ``compiled``: the torch.compile'd model to train with (the
    plain ``model`` is evaluated and saved); ``after_optimizer_step(step)``: called with the
    0-based step after its optimizer step, while the gradients are still there (AdaLoRA's
    ``update_and_allocate`` needs them); ``distributed``: this process's place in a
    multi-process run (fastllm/train/distributed.py; default: one process); what it trains
    is the module ``distributed.wrap`` returned, while ``model`` (the unwrapped one; under
    FSDP the same, sharded) is evaluated and saved; ``cfg.world_size`` must be its."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    par = distributed or Distributed()
    if cfg.world_size != par.world_size:
        raise ValueError(f"cfg.world_size is {cfg.world_size}, but {par.world_size} processes "
                         f"train")
    if compiled is None and par.ddp is not None:
        compiled = par.ddp
    forward = compiled if compiled is not None else model
    metrics = MetricsLog(output_dir / METRICS_FILE, start_step) if par.is_main else _NoMetrics()
    step, tokens = start_step, start_tokens
    loss = eval_loss = None
    last_saved = ckpt.resolve_checkpoint(output_dir) if start_step else None
    eval_batches = objective.eval_batches(cfg.batch_size)
    updating = False

    def save() -> Path:
        nonlocal last_saved
        state = {**run_state, "step": step, "tokens": tokens, "loss": loss,
                 "train_config": asdict(cfg)}
        if not par.enabled:
            last_saved = ckpt.save_checkpoint(output_dir, step, model, optimizer, tokenizer,
                                              state, cfg.keep_last)
            plot_metrics(output_dir)
            return last_saved
        whole = dist.full_model(par, model)  # collective under FSDP
        optimizer_state = dist.full_optimizer_state(par, model, optimizer)
        if par.is_main:
            ckpt.save_checkpoint(output_dir, step, whole, optimizer_state, tokenizer, state,
                                 cfg.keep_last)
            plot_metrics(output_dir)
        dist.barrier(par)  # the checkpoint is complete when any process goes on
        last_saved = ckpt.checkpoint_dir(output_dir, step)
        return last_saved

    def run_eval() -> float:
        value = evaluate(model, eval_batches, cfg, device, objective,
                         **({"distributed": par} if par.enabled else {}))
        metrics.write({"step": step, "eval_loss": value, "eval_ppl": math.exp(min(value, 700))})
        return value

    model.train()
    started = time.perf_counter()
    interrupted = False
    with _StopOnSigint(abort_on_second=not par.enabled) as stop, logging_redirect_tqdm(), tqdm(
        total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True, desc=desc,
        disable=not par.is_main,
    ) as bar:
        try:
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                t0 = time.perf_counter()
                if not par.enabled:
                    step_loss = accumulate_gradients(forward, objective, cfg, step, device)
                    stopping = None  # read after the step
                else:  # the global loss, and whether any process was asked to stop
                    step_loss = accumulate_gradients(forward, objective, cfg, step, device,
                                                     distributed=par)
                    step_loss, votes = dist.all_reduce_sum(par, [step_loss, stop.requested])
                    stopping = votes > 0
                if not math.isfinite(step_loss):
                    raise NonFiniteLoss(step + 1, step_loss)
                # the norm also without clipping (max_norm inf scales by 1): a finite loss can
                # still have inf / NaN gradients, which the step would write into the weights
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()  # FSDP: a replicated DTensor
                grad_norm = float(grad_norm)  # the same on every process (synchronised grads)
                if not math.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(step + 1, grad_norm, "the gradient norm")
                for group in optimizer.param_groups:
                    group["lr"] = lr
                updating = True
                optimizer.step()
                if after_optimizer_step is not None:
                    after_optimizer_step(step)
                updating = False
                optimizer.zero_grad(set_to_none=True)
                step, tokens, loss = step + 1, tokens + cfg.tokens_per_step, step_loss
                dt = time.perf_counter() - t0
                metrics.write({
                    "step": step, "loss": loss, "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens, "tokens_per_s": cfg.tokens_per_step / dt,
                    "elapsed_s": time.perf_counter() - started,
                })
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{cfg.tokens_per_step / dt:,.0f}",
                                lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if eval_batches and (
                        step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    eval_loss = run_eval()
                    logger.info("step %d: held-out loss %.4f, perplexity %.2f", step,
                                eval_loss, math.exp(min(eval_loss, 700)))
                if stop.requested if stopping is None else stopping:
                    interrupted = True
                    break
                if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    save()
        except KeyboardInterrupt:  # a second Ctrl-C, or raised where no handler was installed
            interrupted = True
            if updating:  # the weights are half-updated: keep the last checkpoint
                logger.warning("interrupted while updating the weights of step %d: not saved "
                               "(the last checkpoint is %s)", step + 1, last_saved)
                metrics.close()
                return TrainResult(step, tokens, loss, eval_loss, True, last_saved)
            optimizer.zero_grad(set_to_none=True)
        finally:
            metrics.close()
    if interrupted:
        if step > start_step:
            save()
        logger.warning("interrupted after step %d of %d: checkpoint %s (continue with "
                       "--resume)", step, cfg.steps, last_saved)
    return TrainResult(step, tokens, loss, eval_loss, interrupted, last_saved)
