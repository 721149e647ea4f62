"""Training checkpoints: written atomically, the last K kept, read back for an exact resume.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/step-NNNNNNN/`` holding

- ``config.json`` + ``model.safetensors``: the model in Hugging Face's layout
  (``model.save_pretrained``), so ``fastllm.models.from_pretrained(folder)`` and
  ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` both load it;
- ``tokenizer.json`` + ``tokenizer_config.json`` (``AutoTokenizer`` loads them too);
- ``optimizer.pt``: the optimizer's ``state_dict`` (AdamW moments and step counts);
- ``rng_state.pt``: torch's (CPU and CUDA), Python's and NumPy's generator states;
- ``trainer_state.json``: step, tokens seen, the architecture, the model config and the
  training arguments.

It is written into a temporary folder beside the final one (``.tmp-step-NNNNNNN-PID``) and
renamed into place, so a run killed while saving (even by SIGKILL) leaves every earlier
checkpoint complete; leftover temporaries are removed when a run starts.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of ``output_dir``, as (step, folder), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def resolve_checkpoint(path: Path) -> Optional[Path]:
    """``path`` itself when it is a checkpoint folder, else the newest checkpoint of the output
    folder ``path``; None when there is none."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    found = list_checkpoints(path)
    return found[-1][1] if found else None


def remove_stale_temporaries(output_dir: Path) -> None:
    """Deletes the half-written checkpoint folders a killed run left behind."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(_TMP_PREFIX) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


def get_rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: Union[torch.optim.Optimizer, dict[str, Any]], tokenizer,
                    trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Writes the checkpoint of ``step`` (see the module docstring) by a rename of a complete
    temporary folder, then deletes all but the newest ``keep_last`` checkpoints. A checkpoint
    of this step that already exists is kept as it is (it holds this same state: the run
    resumed from it). ``optimizer``: the optimizer, or its ``state_dict()`` (a distributed
    run gathers the full state of a sharded one: fastllm/train/distributed.py)."""
    from fastllm.train.data import save_tokenizer

    final = checkpoint_dir(output_dir, step)
    if (final / TRAINER_STATE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP_PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
                   tmp / "optimizer.pt")
        torch.save(get_rng_state(), tmp / "rng_state.pt")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        _fsync_dir_files(tmp)
        if final.exists():  # an incomplete folder of this name (no trainer_state.json)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for step_old, old in list_checkpoints(output_dir)[:-keep_last]:
        # renamed first: a run killed while deleting leaves a temporary (removed at the next
        # start), never a step folder that still has trainer_state.json but lacks weights
        doomed = old.parent / f"{_TMP_PREFIX}{step_old:07d}-old-{os.getpid()}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def _fsync_dir_files(directory: Path) -> None:
    """Flushes the files to disk before the rename publishes them (a crash of the machine,
    not only of the process, then also leaves a complete checkpoint)."""
    for f in directory.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """What a resume needs from the checkpoint folder ``path``: ``trainer_state`` (dict),
    ``model_state`` (the fastllm state_dict), ``optimizer_state`` and ``rng_state``."""
    from fastllm.models import from_pretrained

    path = Path(path)
    return {
        "trainer_state": json.loads((path / TRAINER_STATE).read_text()),
        "model_state": from_pretrained(path).state_dict(),
        "optimizer_state": torch.load(path / "optimizer.pt", map_location="cpu",
                                      weights_only=True),
        "rng_state": torch.load(path / "rng_state.pt", weights_only=False),
    }
