"""``torchrun --nproc_per_node=2 -m fastllm pretrain --distributed ddp|fsdp`` on loopback (gloo,
CPU): tiny runs (gpt-nano / llama-tiny, a 300-id tokenizer, 16-token windows) on a small
corpus written here, launched as subprocesses by ``python -m torch.distributed.run``.

What is checked: two processes with ``--batch-size 2 --grad-accum 2`` follow one process with
``--batch-size 2 --grad-accum 4`` (the same global batch) step for step: train and held-out
losses and final weights, under DDP and under FSDP (which also shows that the fused linear +
cross-entropy sees the whole LM-head weight, tied in GPT and untied in Llama: a shard would
give other losses or a shape error); only rank 0 writes (one metrics file, each step once,
complete checkpoints that fastllm.models.from_pretrained loads, no temporaries, one sample);
a distributed resume repeats the uninterrupted run, and its checkpoint also resumes in one
process; Ctrl-C (SIGINT to torchrun) stops both ranks after the same step with a checkpoint,
and a non-finite loss on one rank stops both at that step; a launch that does not fit
--distributed is refused before anything is written; a rank leaves without the
interpreter's finalization, where torch's gloo workers could abort it after a finished run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
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
SENTENCES = ("the quick brown fox jumps over the lazy dog. ",
             "a stitch in time saves nine. ",
             "all that glitters is not gold. ")
TINY = ("--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--warmup", "2",
        "--lr", "3e-3", "--steps", "6", "--save-every", "3", "--keep-last", "2",
        "--eval-every", "3", "--eval-batches", "3")  # 3 held-out batches: uneven over 2
GPT = ("--config", "gpt-nano")
LLAMA = ("--arch", "llama", "--config", "llama-tiny")
REL_TOL = 1e-5  # per-step loss, two fp32 processes against one (the measured gap is ~1e-7)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("".join(SENTENCES) * 40 + SENTENCES[1] * 30)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_command(args, nproc: int = 2) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "fastllm", "pretrain", *map(str, args)]
    return cmd, env


def torchrun(*args, nproc: int = 2) -> str:
    """``fastllm pretrain ARGS`` in ``nproc`` processes; returns their stdout."""
    cmd, env = _torchrun_command(args, nproc)
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def pretrain(*args) -> int:
    return main(["pretrain", *map(str, args)])


def records(out: Path) -> list[dict]:
    return loop.read_metrics(out / loop.METRICS_FILE)


def curve(out: Path, key: str = "loss") -> dict[int, float]:
    found = [(r["step"], r[key]) for r in records(out) if key in r]
    steps = [s for s, _ in found]
    assert steps == sorted(set(steps)), f"each step once, in order: {steps}"
    return dict(found)


def assert_close_curves(a: Path, b: Path, key: str) -> float:
    ca, cb = curve(a, key), curve(b, key)
    assert ca.keys() == cb.keys()
    worst = max(abs(ca[s] - cb[s]) / abs(ca[s]) for s in ca)
    assert worst <= REL_TOL, f"{key}: {ca} vs {cb}"
    return worst


def assert_close_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=atol, msg=k)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> dict[str, Path]:
    """One process with the global batch of two: --grad-accum 4 (GPT and Llama)."""
    runs = {}
    for name, model in (("gpt", GPT), ("llama", LLAMA)):
        out = tmp_path_factory.mktemp(f"single-{name}") / "run"
        assert pretrain("--data-dir", corpus, "--output-dir", out, *model, *TINY,
                        "--grad-accum", 4, "--sample-tokens", 0) == 0
        runs[name] = out
    return runs


@pytest.fixture(scope="module")
def distributed_runs(corpus, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Two processes, --batch-size 2 --grad-accum 2: (output folder, stdout) per mode."""
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp(mode) / "run"
        stdout = torchrun("--data-dir", corpus, "--output-dir", out, *GPT, *TINY,
                          "--grad-accum", 2, "--distributed", mode, "--sample-tokens", 4)
        runs[mode] = out, stdout
    return runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_one(mode, single, distributed_runs):
    out, _ = distributed_runs[mode]
    assert list(curve(out)) == [1, 2, 3, 4, 5, 6]
    assert_close_curves(single["gpt"], out, "loss")
    assert_close_curves(single["gpt"], out, "eval_loss")  # shared over the ranks, summed
    assert_close_weights(ckpt.checkpoint_dir(single["gpt"], 6), ckpt.checkpoint_dir(out, 6))
    tokens = {r["step"]: r["tokens"] for r in records(out) if "tokens" in r}
    assert tokens == {s: s * 2 * 2 * 2 * 16 for s in range(1, 7)}  # all ranks' tokens
    state = json.loads((ckpt.checkpoint_dir(out, 6) / ckpt.TRAINER_STATE).read_text())
    assert state["train_config"]["world_size"] == 2 and state["tokens"] == 6 * 128


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_rank_zero_writes(mode, distributed_runs):
    from fastllm.models import GPT as GPTModel
    from fastllm.models import from_pretrained

    out, stdout = distributed_runs[mode]
    expected = {"tokenizer.json", "tokenizer_config.json", loop.METRICS_FILE, ckpt.CHECKPOINTS}
    names = {p.name for p in out.iterdir()} - {loop.PLOT_FILE}
    assert names == expected
    lines = (out / loop.METRICS_FILE).read_text().splitlines()
    assert len(lines) == len(set(lines)) == 6 + 2  # 6 train records, 2 held-out ones
    assert [p.name for p in (out / ckpt.CHECKPOINTS).iterdir()] != []
    assert sorted(p.name for p in (out / ckpt.CHECKPOINTS).iterdir()) == [
        "step-0000003", "step-0000006"]  # no temporaries
    for step in (3, 6):
        folder = ckpt.checkpoint_dir(out, step)
        assert sorted(p.name for p in folder.iterdir()) == sorted([
            "config.json", "model.safetensors", "optimizer.pt", "rng_state.pt",
            "tokenizer.json", "tokenizer_config.json", "trainer_state.json"])
        model = from_pretrained(folder)
        assert isinstance(model, GPTModel) and model.config.vocab_size == 300
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
        n_params = len(list(model.parameters()))
        assert sorted(optimizer_state["state"]) == list(range(n_params))  # one process's keys
    assert stdout.count("--- continuation") == 1  # the sample, printed by rank 0 only


def test_fsdp_resume_repeats_the_run_and_resumes_in_one_process(corpus, single,
                                                                  distributed_runs, tmp_path):
    straight, _ = distributed_runs["fsdp"]
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(ckpt.checkpoint_dir(out, 6))
    torchrun("--data-dir", corpus, "--output-dir", out, *GPT, *TINY, "--grad-accum", 2,
             "--distributed", "fsdp", "--sample-tokens", 0, "--resume")
    assert curve(out) == curve(straight)
    assert curve(out, "eval_loss") == curve(straight, "eval_loss")
    assert_close_weights(ckpt.checkpoint_dir(straight, 6), ckpt.checkpoint_dir(out, 6), 0)
    # the sharded run's checkpoint is one process's: resume it with --grad-accum 4
    alone = tmp_path / "alone"
    assert pretrain("--data-dir", corpus, "--output-dir", alone, *TINY, "--grad-accum", 4,
                    "--sample-tokens", 0, "--resume", ckpt.checkpoint_dir(straight, 3)) == 0
    assert list(curve(alone)) == [4, 5, 6]
    reference = curve(single["gpt"])
    for step, value in curve(alone).items():
        assert value == pytest.approx(reference[step], rel=REL_TOL)


def test_llama_untied_head_under_fsdp(corpus, single, tmp_path):
    out = tmp_path / "run"
    torchrun("--data-dir", corpus, "--output-dir", out, *LLAMA, *TINY, "--grad-accum", 2,
             "--distributed", "fsdp", "--sample-tokens", 0)
    assert_close_curves(single["llama"], out, "loss")
    assert_close_weights(ckpt.checkpoint_dir(single["llama"], 6), ckpt.checkpoint_dir(out, 6))


def test_ctrl_c_stops_every_rank_after_the_same_step(corpus, tmp_path):
    """Ctrl-C reaches torchrun, which forwards SIGINT to the workers: they agree (an
    all-reduced flag) on the step to stop after and save it together."""
    out = tmp_path / "run"
    args = ("--data-dir", corpus, "--output-dir", out, *GPT, *TINY, "--steps", 12,
            "--save-every", 0, "--eval-every", 0, "--distributed", "fsdp", "--sample-tokens", 0)
    cmd, env = _torchrun_command(args)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / loop.METRICS_FILE
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        log = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    stopped = re.findall(r"interrupted after step (\d+) of 12", log)
    assert len(stopped) == 2 and len(set(stopped)) == 1, log[-3000:]  # both ranks, one step
    step = int(stopped[0])
    assert 2 <= step < 12
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [step]
    assert list(curve(out)) == list(range(1, step + 1))
    assert not list((out / ckpt.CHECKPOINTS).glob(".tmp*"))
    state = json.loads((ckpt.checkpoint_dir(out, step) / ckpt.TRAINER_STATE).read_text())
    assert state["step"] == step  # (resuming a distributed checkpoint: the test above)


NAN_ON_RANK_1 = """
import sys
from pathlib import Path

import torch

from fastllm.models import GPT, GPTConfig
from fastllm.train import distributed, loop
from fastllm.train.objectives import CausalLM

torch.set_num_threads(1)
par = distributed.setup("ddp", "cpu")
torch.manual_seed(0)
model = GPT(GPTConfig.from_name("gpt-nano", vocab_size=64))
cfg = loop.TrainConfig(steps=6, batch_size=2, seq_len=8, world_size=par.world_size)
original = loop.accumulate_gradients


def poisoned(model, objective, cfg, step, device, distributed=None):
    loss = original(model, objective, cfg, step, device, distributed=distributed)
    return float("nan") if distributed.rank == 1 and step == 2 else loss


loop.accumulate_gradients = poisoned
trained = distributed.wrap(par, model)
objective = CausalLM(torch.arange(400) % 64, torch.zeros(0, 8, dtype=torch.long), 8, 0)
try:
    loop.train(model, loop.make_optimizer(model, cfg), None, objective, cfg, Path(sys.argv[1]),
               run_state={}, distributed=par)
except loop.NonFiniteLoss as exc:
    print(f"rank {par.rank} stopped at step {exc.step}", flush=True)
distributed.teardown(par)
distributed.exit_process(0)
"""


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    out = tmp_path / "run"
    out.mkdir()
    cmd, env = _torchrun_command([])
    cmd = [*cmd[:cmd.index("-m", 3)], str(script), str(out)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(re.findall(r"rank \d stopped at step \d", done.stdout)) == [
        "rank 0 stopped at step 3", "rank 1 stopped at step 3"]
    assert list(curve(out)) == [1, 2]  # rank 0's metrics; no checkpoint of the broken step
    assert not (out / ckpt.CHECKPOINTS).exists()


EXIT_AFTER_A_PROCESS_GROUP = """
import atexit
import sys

import fastllm.train.distributed as distributed
from fastllm.cli import console_main

distributed._ran_process_group = {ran}  # as teardown leaves it
atexit.register(lambda: print("finalized"))
sys.argv = ["fastllm"]  # no command: status 2
print("before", end="")  # buffered: a pipe
console_main()
"""


@pytest.mark.parametrize("ran", [True, False])
def test_a_rank_exits_without_finalization_after_flushing(ran):
    """After a process group, ``fastllm`` keeps its exit status and its buffered output but
    skips the interpreter's finalization (no atexit handler runs), where gloo's worker
    threads can abort a rank (fastllm.train.distributed.exit_process); otherwise it exits as
    usual."""
    done = subprocess.run([sys.executable, "-c", EXIT_AFTER_A_PROCESS_GROUP.format(ran=ran)],
                          env=_torchrun_command([])[1], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout == ("before" if ran else "beforefinalized\n")
    assert "no command given" in done.stderr


@pytest.mark.parametrize("mode, env, message", [
    ("ddp", {}, ["--distributed ddp", "torchrun", "WORLD_SIZE"]),
    ("none", {"WORLD_SIZE": "2", "RANK": "0"}, ["--distributed none", "WORLD_SIZE=2"]),
])
def test_launch_that_does_not_fit_is_refused(mode, env, message, corpus, tmp_path, monkeypatch,
                                             capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        pretrain("--data-dir", corpus, "--output-dir", out, *GPT, *TINY, "--distributed", mode)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(m in err for m in message), err
    assert not out.exists()
