"""``fastllm pretrain`` under real faults, each in a child process: a SIGKILL in the middle of
a checkpoint save, a real SIGINT (Ctrl-C) sent from outside, and a loss that really diverges
(no patched forward).

What is checked: the process dies as it should (-SIGKILL, exit 130, exit 1); the checkpoints
left are complete and load (fastllm.models.from_pretrained, optimizer.pt); the half-written
temporary folder a SIGKILL leaves is removed by ``--resume``; a resumed run ends with the
weights and losses of an uninterrupted run of the same arguments; no checkpoint holds the
weights of a diverged step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from fastllm.cli import main  # noqa: E402
from fastllm.train import checkpoint as ckpt  # noqa: E402
from fastllm.train import loop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# tests/test_train_pretrain.py's tiny run
TINY = ("--config", "gpt-nano", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "16",
        "--warmup", "2", "--lr", "3e-3", "--eval-every", "0", "--sample-tokens", "0")
STEPS = 8
SENTENCES = ("the quick brown fox jumps over the lazy dog. ",
             "a stitch in time saves nine. ",
             "all that glitters is not gold. ")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("".join(SENTENCES) * 40)
    (root / "b.txt").write_text(SENTENCES[1] * 30 + SENTENCES[0] * 30)
    return root


def pretrain(*args) -> int:
    return main(["pretrain", *map(str, args)])


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_child(script: str, argv: list, **kwargs) -> subprocess.Popen:
    """``python -c script ARGV...`` (the script reads sys.argv[1:])."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def losses(output_dir: Path) -> dict[int, float]:
    records = loop.read_metrics(output_dir / loop.METRICS_FILE)
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def assert_loadable(checkpoint: Path) -> None:
    from fastllm.models import GPT, from_pretrained

    model = from_pretrained(checkpoint)
    assert isinstance(model, GPT) and model.config.vocab_size == 300
    optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu",
                                 weights_only=True)
    assert optimizer_state["state"], "optimizer.pt holds AdamW's moments"
    loaded = ckpt.load_checkpoint(checkpoint)  # everything a resume reads
    assert loaded["trainer_state"]["step"] == int(checkpoint.name.removeprefix("step-"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run: STEPS steps, a checkpoint every 2, all kept."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", STEPS,
                    "--save-every", 2, "--keep-last", 10, *TINY) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4, 6, 8]
    return out


# ----- SIGKILL while saving -------------------------------------------------------------------

# The save of step 4 kills its own process right after the tokenizer was written into the
# temporary folder, i.e. after model.safetensors and config.json, before optimizer.pt.
KILL_IN_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from fastllm.train import data
from fastllm.cli import main

save_tokenizer = data.save_tokenizer

def save_then_die(tokenizer, directory):
    save_tokenizer(tokenizer, directory)
    if Path(directory).name.startswith(".tmp-step-0000004-"):
        os.kill(os.getpid(), signal.SIGKILL)

data.save_tokenizer = save_then_die
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_sigkill_while_saving_leaves_previous_checkpoint(corpus, reference, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", corpus, "--output-dir", out, "--steps", STEPS, "--save-every", 2,
            "--keep-last", 10, *TINY]
    child = run_child(KILL_IN_SAVE, args)
    _, stderr = child.communicate(timeout=240)
    assert child.returncode == -signal.SIGKILL, stderr[-2000:]

    # the previous checkpoint is complete and loads; nothing of step 4 was published
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    step2 = ckpt.checkpoint_dir(out, 2)
    assert ckpt.resolve_checkpoint(out) == step2
    assert_loadable(step2)
    assert_same_weights(ckpt.checkpoint_dir(reference, 2), step2)
    # what the kill left: the half-written temporary folder of step 4, weights but no optimizer
    leftovers = [p for p in (out / ckpt.CHECKPOINTS).iterdir() if p != step2]
    assert [p.name for p in leftovers] == [f".tmp-step-0000004-{child.pid}"]
    assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in leftovers[0].iterdir()}
    assert not (leftovers[0] / "optimizer.pt").exists()
    assert not ckpt.checkpoint_dir(out, 4).exists()
    assert list(losses(out)) == [1, 2, 3, 4]

    # --resume removes the temporary folder and finishes like the uninterrupted run
    assert pretrain(*args, "--resume") == 0
    assert sorted(p.name for p in (out / ckpt.CHECKPOINTS).iterdir()) == [
        "step-0000002", "step-0000004", "step-0000006", "step-0000008"]
    assert losses(out) == losses(reference)
    for step in (4, 6, 8):
        assert_same_weights(ckpt.checkpoint_dir(reference, step), ckpt.checkpoint_dir(out, step))


# ----- a real Ctrl-C --------------------------------------------------------------------------

# Each step takes at least 0.25 s, so that the SIGINT sent after the second metrics line
# arrives well before the last step.
SLOW_STEPS = """
import sys, time
import torch
torch.set_num_threads(1)
from fastllm.train import loop
from fastllm.cli import main

accumulate = loop.accumulate_gradients

def slow(*args, **kwargs):
    time.sleep(0.25)
    return accumulate(*args, **kwargs)

loop.accumulate_gradients = slow
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_sigint_from_outside_saves_then_resume_matches(corpus, reference, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", corpus, "--output-dir", out, "--steps", STEPS, *TINY]
    child = run_child(SLOW_STEPS, args)
    metrics = out / loop.METRICS_FILE
    deadline = time.monotonic() + 180
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert child.poll() is None, child.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no 2 metrics lines in 180 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr

    done = list(losses(out))
    stopped = done[-1]
    assert done == list(range(1, stopped + 1)) and 2 <= stopped < STEPS
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [stopped]
    assert_loadable(ckpt.checkpoint_dir(out, stopped))
    state = json.loads((ckpt.checkpoint_dir(out, stopped) / ckpt.TRAINER_STATE).read_text())
    assert state["step"] == stopped and state["tokens"] == stopped * 4 * 16
    assert not [p for p in (out / ckpt.CHECKPOINTS).iterdir() if p.name.startswith(".tmp")]

    assert pretrain(*args, "--resume") == 0
    assert losses(out) == losses(reference)
    assert_same_weights(ckpt.checkpoint_dir(reference, STEPS), ckpt.checkpoint_dir(out, STEPS))


# ----- a loss that really diverges -----------------------------------------------------------

def _diverge(corpus: Path, out: Path, lr: str) -> subprocess.CompletedProcess:
    """A run at learning rate ``lr`` (no clipping beyond the default), a checkpoint every
    step, as ``python -m fastllm pretrain`` (nothing patched)."""
    return subprocess.run(
        [sys.executable, "-m", "fastllm", "pretrain", "--data-dir", str(corpus), "--output-dir",
         str(out), "--steps", "6", "--save-every", "1", "--keep-last", "10", *TINY,
         "--lr", lr],
        env=child_env(), capture_output=True, text=True, timeout=240)


def test_diverging_loss_stops_without_a_broken_checkpoint(corpus, tmp_path):
    """--lr 1e30: step 1's AdamW update makes every weight ~1e30, so step 2's loss is NaN."""
    out = tmp_path / "run"
    done = _diverge(corpus, out, "1e30")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the loss is nan at step 2" in done.stderr
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert list(losses(out)) == [1]
    assert_loadable(ckpt.checkpoint_dir(out, 1))


def test_no_checkpoint_holds_non_finite_weights(corpus, tmp_path):
    out = tmp_path / "run"
    done = _diverge(corpus, out, "1e6")
    assert done.returncode == 1, done.stderr[-2000:]
    saved = ckpt.list_checkpoints(out)
    assert saved
    for step, folder in saved:
        weights = load_file(folder / "model.safetensors")
        assert all(bool(t.isfinite().all()) for t in weights.values()), f"step {step}"
