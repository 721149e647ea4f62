"""Multi-process training: DDP and FSDP2 over ``torch.distributed``, launched by torchrun.

    torchrun --nproc_per_node=N -m fastllm pretrain ... [--distributed ddp|fsdp]

torchrun starts N processes and gives each its place in the environment: ``RANK`` (0 ..
WORLD_SIZE-1 over all nodes), ``WORLD_SIZE``, ``LOCAL_RANK`` (its index on this node),
``MASTER_ADDR`` / ``MASTER_PORT`` (the rendezvous). :func:`setup` reads them, starts the
process group (gloo on CPU, nccl on CUDA, each process on ``cuda:LOCAL_RANK``) and returns
a :class:`Distributed` that the training code asks what to do; :func:`teardown` ends it,
and :func:`exit_process` ends the process (``fastllm`` does, after its command returned).

Semantics (fastllm/train/loop.py): ``--batch-size`` is per process and per micro-batch, so a
step's global batch is ``batch_size * grad_accum * world_size`` rows. Every process draws the
same global rows of a step (``objective.step_batch`` is a function of (seed, step)) and trains
on its own contiguous share, so N processes with ``--batch-size B`` follow the same loss
trajectory as one process with ``--batch-size B --grad-accum N`` (up to the order of float
additions). Only rank 0 writes files (metrics, plot, checkpoints, tokenizer, sample) and logs
at INFO; the others log warnings and errors only.

The two modes:

- ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel`. Every process holds the whole
  model and optimizer; the gradients are averaged by an all-reduce during the backward of the
  last micro-batch of each step (``no_sync`` on the others). Rank 0 saves its own copy.
- ``fsdp``: FSDP2, :func:`torch.distributed.fsdp.fully_shard`. Each transformer block (each
  module of the model's outermost ModuleLists) is one group, sharded over the processes
  and all-gathered around its forward and backward; the gradients are reduce-scattered. Then
  the root module is sharded, and its group holds every parameter not in a block: the token
  (and position) embeddings, the final norm and the LM head, tied to the embedding or not.
  The root group is all-gathered by the root's forward pre-hook, *before* the model's
  ``forward`` runs, and stays unsharded until that forward (and its backward) is done. So
  when ``forward`` ends with ``causal_lm_loss(x, self.lm_head.weight, ...)``, the fused
  linear + cross-entropy receives the full ``(V, C)`` LM-head weight as a plain tensor, never
  a ``(V / N, C)`` shard or a DTensor (fused losses that are handed a shard compute a wrong
  loss, or fail on the shape). Its gradient lands in the unsharded parameter, which FSDP
  reduce-scatters after the backward. tests/test_train_distributed.py checks this by
  training GPT (tied head) and Llama (untied head) under FSDP against one process.

Checkpoints keep one format for every mode: rank 0 writes the full (unsharded) model and
the optimizer state keyed like ``optimizer.state_dict()`` (parameter indices in the
param-group order), so a run saved by N processes resumes in one process and the other way
round. Under FSDP the full states are gathered by every process together
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``)
and rank 0 writes them; a resume loads the full model before sharding, and the full
optimizer state through ``set_optimizer_state_dict``. Every process reads the checkpoint
it resumes from, so on several nodes the output folder must be on a shared file system.

The process RNGs are seeded alike (the same initial weights on every process, and the same
dropout stream; rank 0's RNG state is saved and restored on every process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, Optional

import torch

logger = logging.getLogger("fastllm.train")

MODES = ("none", "ddp", "fsdp")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(ValueError):
    """The launch and the options do not fit (the CLI reports it as a usage error)."""


@dataclass
class Distributed:
    """Where this process stands in the run. The default is one process (``mode="none"``),
    for which every function here does what a single process does."""

    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0  # over all nodes
    world_size: int = 1
    local_rank: int = 0  # on this node
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ddp: Optional[torch.nn.Module] = None  # the DistributedDataParallel wrapper (by wrap)
    model_class: Optional[type] = None  # the class of the model before fully_shard

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_mode(environ=os.environ) -> str:
    """``ddp`` when launched by torchrun with WORLD_SIZE > 1, else ``none``."""
    return "ddp" if int(environ.get("WORLD_SIZE", "1") or 1) > 1 else "none"


def setup(mode: Optional[str], device: Optional[str], environ=os.environ) -> Distributed:
    """Starts the process group of ``mode`` (None: :func:`default_mode`) from torchrun's
    environment, on ``device`` (``cpu`` or ``cuda``; default cuda when available). Raises
    :class:`DistributedSetupError` naming the option when they do not fit; with ``none``
    only the device is chosen."""
    mode = default_mode(environ) if mode is None else mode
    if mode not in MODES:
        raise DistributedSetupError(f"--distributed must be one of {', '.join(MODES)}, got "
                                    f"{mode!r}")
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if mode == "none":
        if world > 1:
            raise DistributedSetupError(
                f"--distributed none, but this process is one of WORLD_SIZE={world} started "
                f"by torchrun: pass --distributed ddp or fsdp (or launch one process)")
        return Distributed(device=torch.device(
            device or ("cuda" if torch.cuda.is_available() else "cpu")))
    missing = [k for k in _ENV if k not in environ]
    if missing:
        raise DistributedSetupError(
            f"--distributed {mode} needs the environment torchrun sets ({', '.join(_ENV)}); "
            f"missing {', '.join(missing)}: launch with torchrun --nproc_per_node=N -m "
            f"fastllm ...")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise DistributedSetupError(
            f"--device must be cpu or cuda under --distributed {mode} (each process uses "
            f"cuda:LOCAL_RANK), got {kind!r}")
    rank, local_rank = int(environ["RANK"]), int(environ["LOCAL_RANK"])
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError("--device cuda, but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK {local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}; start at most that many processes per node")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        backend = "nccl"
    else:
        torch_device, backend = torch.device("cpu"), "gloo"
    import torch.distributed as dist

    dist.init_process_group(backend, timeout=timedelta(minutes=30),
                            device_id=torch_device if kind == "cuda" else None)
    if rank != 0:  # one log: rank 0's (the others still report warnings and errors)
        logging.getLogger("fastllm").setLevel(logging.WARNING)
    logger.info("%s over %d processes (%s, %s)", mode, world, backend, kind)
    return Distributed(mode=mode, rank=rank, world_size=world, local_rank=local_rank,
                       device=torch_device)


_ran_process_group = False  # set by teardown; read by exit_process


def teardown(d: Distributed) -> None:
    """Ends the process group (after every process got here)."""
    global _ran_process_group
    import torch.distributed as dist

    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _ran_process_group = True


def exit_process(code: int = 0) -> NoReturn:
    """Ends this process with exit status ``code``. After a process group ran
    (:func:`teardown`) it flushes the logs, stdout and stderr and leaves with ``os._exit``,
    as multiprocessing's children do, without the interpreter's finalization; otherwise it is
    ``sys.exit(code)``.

    Why: a race in torch's gloo backend (torch 2.14, Python 3.11). A gloo worker thread
    destroys a collective's ``Work`` (which holds the collective's tensors) only after it
    marked the collective complete, so the main thread can be through
    ``destroy_process_group`` (which does not join the workers while FSDP or DDP still hold
    the group) and into finalization while a worker still drops the last references to
    those tensors. That takes the GIL; a thread that asks for the GIL during finalization is
    ended by ``pthread_exit``, and the unwind through the ``Work``'s destructor aborts the
    process ("terminate called without an active exception", SIGABRT). The run has finished
    and saved by then, but torchrun reports the rank as failed. A barrier does not close the
    window: it waits for the collectives to complete, not for their destruction.
    pytorch/pytorch#179291 describes the same abort. Measured on 2-process FSDP runs of
    ``fastllm pretrain``: 4 aborts in 80 runs before, none in 120 with this exit."""
    if not _ran_process_group:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing more can reach it
            pass
    os._exit(code)


def _block_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The model's outermost ModuleLists (its stacks of transformer blocks)."""
    found: list[torch.nn.ModuleList] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(
                name.startswith(prefix + ".") for prefix, _ in found):
            found.append((name, module))
    return [m for _, m in found]


def wrap(d: Distributed, model: torch.nn.Module) -> torch.nn.Module:
    """Prepares ``model`` (on ``d.device``, weights loaded, before its optimizer is made) for
    ``d.mode`` and returns the module to train with: the DDP wrapper; under FSDP ``model``
    itself, sharded in place (see the module docstring); unchanged for one process."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        d.ddp = DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        return d.ddp
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        d.model_class = type(model)
        for blocks in _block_lists(model):
            for block in blocks:
                fully_shard(block)
        fully_shard(model)  # the root group: embeddings, final norm, LM head (tied or not)
    return model


def no_sync(d: Distributed, last_micro_batch: bool):
    """Around a micro-batch's forward and backward: DDP all-reduces the gradients only on the
    step's last micro-batch. (FSDP reduce-scatters after each micro-batch, which keeps only
    the gradient shards between them: its memory saving.)"""
    if d.ddp is not None and not last_micro_batch:
        return d.ddp.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(d: Distributed, values: list[float]) -> list[float]:
    """The sums of ``values`` over the processes (float64), the same list on every one."""
    if not d.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Distributed) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier(device_ids=[d.device.index] if d.device.type == "cuda" else None)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its param-group order (a tied parameter
    under its first name), i.e. what ``optimizer.state_dict()`` numbers 0, 1, ..."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_model(d: Distributed, model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The whole trained model on rank 0 (None on the others), to save or sample from.
    Under FSDP every process must call it (the weights are gathered collectively) and rank
    0 gets a new unsharded CPU copy; otherwise it is ``model`` itself."""
    if d.mode != "fsdp":
        return model if d.is_main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())  # {} on ranks > 0
    if not d.is_main:
        return None
    with torch.device("meta"):  # no memory, no initialisation: the weights are assigned
        copy = d.model_class(model.config)
    copy.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():  # the non-persistent ones (rotary tables)
        if name not in state:
            module, _, leaf = name.rpartition(".")
            copy.get_submodule(module)._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    return copy


def full_optimizer_state(d: Distributed, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> Optional[dict[str, Any]]:
    """``optimizer.state_dict()`` of the whole model on rank 0 (None on the others); under
    FSDP gathered by every process together, and numbered like one process's."""
    if d.mode != "fsdp":
        return optimizer.state_dict() if d.is_main else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not d.is_main:
        return None
    index = {name: i for i, name in enumerate(
        n for g in state["param_groups"] for n in g["params"])}
    return {
        "state": {index[name]: s for name, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                         for g in state["param_groups"]],
    }


def load_optimizer_state(d: Distributed, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads a full ``optimizer.state_dict()`` (as :func:`full_optimizer_state` returns and
    checkpoints hold) on every process; under FSDP each keeps its shards."""
    if d.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    names = _parameter_names(model, optimizer)
    n_saved = sum(len(g["params"]) for g in state["param_groups"])
    if n_saved != len(names):
        raise ValueError(f"the optimizer state holds {n_saved} parameters, the model "
                         f"{len(names)}")
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                         for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name,
                             options=StateDictOptions(full_state_dict=True))
