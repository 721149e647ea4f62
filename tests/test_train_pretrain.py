"""``fastllm pretrain``: tiny runs (gpt-nano / llama-tiny, a 300-id tokenizer, 16-token windows)
on a small corpus written per test, and a few steps on the default corpus.

What is checked: the files a run writes; the loss going down; resume repeating an
uninterrupted run bit for bit (losses and weights), from a periodic checkpoint and after a
Ctrl-C; atomic checkpoints (a save killed half-way leaves the previous one loadable); each
bad input refused before anything is written, by an error that names the argument; a NaN
loss stopping the run with its step; the argument aliases; the ``python -m fastllm`` entry
point and ``fastllm generate``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
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
TINY = ("--config", "gpt-nano", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "16",
        "--warmup", "2", "--lr", "3e-3", "--eval-every", "0", "--sample-tokens", "0")
SENTENCES = ("the quick brown fox jumps over the lazy dog. ",
             "a stitch in time saves nine. ",
             "all that glitters is not gold. ")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and far faster when other processes share the
    cores (two threads then wait at every op's barrier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pretrain(*args) -> int:
    return main(["pretrain", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of repetitive text: a .txt file, a nested folder and a JSONL file."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("".join(SENTENCES) * 40)
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text(SENTENCES[1] * 30 + SENTENCES[0] * 30)
    (root / "c.jsonl").write_text("".join(json.dumps({"text": s * 20, "id": i}) + "\n"
                                          for i, s in enumerate(SENTENCES)))
    return root


def losses(output_dir: Path) -> dict[int, float]:
    records = loop.read_metrics(output_dir / loop.METRICS_FILE)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"each step once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """8 uninterrupted steps with a checkpoint every 4 (both kept)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 8, "--save-every", 4,
                    *TINY) == 0
    return out


# ----- what a run writes ---------------------------------------------------------------------

def test_outputs_written(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain("--data-dir", corpus, "--output-dir", out, *TINY, "--steps", 6,
                    "--save-every", 2, "--keep-last", 2, "--eval-every", 3,
                    "--sample-tokens", 8) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 6]  # keep-last 2
    final = ckpt.resolve_checkpoint(out)
    assert sorted(p.name for p in final.iterdir()) == sorted([
        "config.json", "model.safetensors", "optimizer.pt", "rng_state.pt", "tokenizer.json",
        "tokenizer_config.json", "trainer_state.json"])
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens"] == 6 * 4 * 16 and state["arch"] == "gpt2"
    assert (out / "tokenizer.json").is_file()
    records = loop.read_metrics(out / loop.METRICS_FILE)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert all({"lr", "tokens_per_s", "grad_norm", "tokens"} <= r.keys()
               for r in records if "loss" in r)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / loop.PLOT_FILE).exists()
    else:
        assert (out / loop.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoint is a Hugging Face directory fastllm loads
    from fastllm.models import GPT, from_pretrained

    model = from_pretrained(final)
    assert isinstance(model, GPT) and model.config.vocab_size == 300
    assert "--- continuation" in capsys.readouterr().out
    assert not list((out / ckpt.CHECKPOINTS).glob(".tmp*"))


def test_loss_decreases(corpus, tmp_path):
    out = tmp_path / "run"
    assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 40, *TINY) == 0
    curve = list(losses(out).values())
    first, last = curve[0], sum(curve[-5:]) / 5
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"


def test_default_corpus(tmp_path):
    out = tmp_path / "run"
    assert pretrain("--output-dir", out, *TINY, "--steps", 2, "--eval-every", 1,
                    "--eval-batches", 1) == 0
    state = json.loads((ckpt.resolve_checkpoint(out) / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert len([r for r in loop.read_metrics(out / loop.METRICS_FILE) if "eval_ppl" in r]) == 2


# ----- resume ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, extra", [("gpt2", ()),
                                         ("llama", ("--config", "llama-tiny", "--grad-accum", 2))])
def test_resume_is_bit_identical(arch, extra, corpus, reference, tmp_path):
    if arch == "gpt2":
        straight = reference
    else:
        straight = tmp_path / "straight"
        assert pretrain("--arch", arch, "--data-dir", corpus, "--output-dir", straight,
                        "--steps", 8, "--save-every", 4, *TINY, *extra) == 0
    resumed = tmp_path / "resumed"
    assert pretrain("--arch", arch, "--data-dir", corpus, "--output-dir", resumed, "--steps", 8,
                    "--resume", ckpt.checkpoint_dir(straight, 4), *TINY, *extra) == 0
    a, b = losses(straight), losses(resumed)
    assert list(b) == [5, 6, 7, 8]
    assert [a[s] for s in b] == list(b.values())
    assert_same_weights(ckpt.checkpoint_dir(straight, 8), ckpt.checkpoint_dir(resumed, 8))


@pytest.mark.parametrize("how", ["sigint", "keyboard_interrupt"])
def test_ctrl_c_saves_then_resume_matches(how, corpus, reference, tmp_path, monkeypatch):
    """SIGINT stops after the step it arrives in (3, 0-based: 4 steps done); a
    KeyboardInterrupt raised inside step 5's forward leaves the weights of step 5 done."""
    original = loop.accumulate_gradients

    def interrupted(model, objective, cfg, step, device):
        if how == "keyboard_interrupt" and step == 5:
            raise KeyboardInterrupt
        loss = original(model, objective, cfg, step, device)
        if how == "sigint" and step == 3:
            signal.raise_signal(signal.SIGINT)
        return loss

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(loop, "accumulate_gradients", interrupted)
        assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 8, *TINY) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved_at = 4 if how == "sigint" else 5
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [saved_at]
    assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 8, "--resume",
                    *TINY) == 0
    assert losses(out) == losses(reference)
    assert_same_weights(ckpt.checkpoint_dir(reference, 8), ckpt.checkpoint_dir(out, 8))


def test_killed_save_leaves_previous_checkpoint(corpus, reference, tmp_path, monkeypatch):
    """A save that dies half-way (here an exception after the weights were written; SIGKILL
    leaves the same temporary folder) never touches the previous checkpoint, and a resume
    continues from it."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(ckpt.checkpoint_dir(out, 8))
    stale = out / ckpt.CHECKPOINTS / ".tmp-step-0000008-12345"  # what SIGKILL leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert ckpt.resolve_checkpoint(out) == ckpt.checkpoint_dir(out, 4)

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "get_rng_state", killed)
        with pytest.raises(RuntimeError, match="killed while saving"):
            pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 8, "--resume", *TINY)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4]
    assert [p.name for p in (out / ckpt.CHECKPOINTS).iterdir()] == ["step-0000004"]
    assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 8, "--resume",
                    *TINY) == 0
    assert_same_weights(ckpt.checkpoint_dir(reference, 8), ckpt.checkpoint_dir(out, 8))


# ----- bad input: refused before anything is written -----------------------------------------

def _bad_dirs(tmp: Path) -> dict[str, Path]:
    (tmp / "empty").mkdir()
    (tmp / "blank").mkdir()
    (tmp / "blank" / "a.txt").write_text("  \n")
    (tmp / "latin1").mkdir()
    (tmp / "latin1" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    (tmp / "tiny.txt").write_text("hi")
    return {p.name: p for p in tmp.iterdir()}


@pytest.mark.parametrize("case, args, names", [
    ("missing", ("--data-dir", "{tmp}/nowhere"), ["--data-dir", "does not exist"]),
    ("empty", ("--data-dir", "{tmp}/empty"), ["--data-dir", "no files"]),
    ("blank", ("--data-dir", "{tmp}/blank"), ["--data-dir", "no text"]),
    ("non-utf8", ("--data-dir", "{tmp}/latin1"), ["--data-dir", "a.txt", "not UTF-8"]),
    ("bad-jsonl", ("--data-dir", "{tmp}/bad.jsonl"), ["--data-dir", "line 2", "'text'"]),
    ("too-short", ("--data-dir", "{tmp}/tiny.txt"), ["--data-dir", "--seq-len"]),
    ("unknown-config", ("--config", "gpt-huge"), ["--config", "gpt-huge", "gpt-nano"]),
    ("seq-len", ("--seq-len", "2048"), ["--seq-len 2048", "1024"]),
    ("llama-seq-len", ("--arch", "llama", "--config", "llama-tiny", "--seq-len", "129"),
     ["--seq-len 129", "128"]),
    ("bert-seq-len", ("--arch", "bert", "--config", "bert-mini", "--seq-len", "513"),
     ["--seq-len 513", "512"]),
    ("bart-one-document", ("--arch", "bart", "--config", "bart-tiny", "--data-dir",
                           "{tmp}/tiny.txt"), ["--data-dir", "holds out whole documents"]),
    ("unknown-arch", ("--arch", "gpt5"), ["--arch", "gpt5"]),
    ("tokenizer", ("--tokenizer", "{tmp}/nowhere.json"), ["--tokenizer", "nowhere.json"]),
    ("vocab", ("--vocab-size", "100"), ["--vocab-size", "257"]),
    ("steps", ("--steps", "0"), ["--steps", "0"]),
    ("resume-nothing", ("--resume",), ["--resume", "no checkpoint"]),
])
def test_bad_input_is_refused_before_writing(case, args, names, corpus, tmp_path, capsys):
    _bad_dirs(tmp_path)
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    if "--data-dir" not in args:
        args = ["--data-dir", str(corpus), *args]
    # later options win over TINY's (argparse keeps the last value)
    with pytest.raises(SystemExit) as exc:
        pretrain("--output-dir", out, "--steps", 2, *TINY, *args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err
    assert not out.exists()


def test_unreadable_file_is_refused(tmp_path, capsys, monkeypatch):
    """(chmod 0 does not stop root, so the read itself is made to fail as it would.)"""
    data = tmp_path / "data"
    data.mkdir()
    (data / "secret.txt").write_text("text")
    read_bytes = Path.read_bytes

    def denied(self):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(SystemExit):
        pretrain("--data-dir", data, "--output-dir", tmp_path / "out", *TINY)
    err = capsys.readouterr().err
    assert "--data-dir" in err and "cannot read" in err and "secret.txt" in err
    assert not (tmp_path / "out").exists()


def test_existing_checkpoints_need_resume_or_overwrite(corpus, reference, capsys):
    before = sorted(p.name for p in reference.rglob("*"))
    with pytest.raises(SystemExit):
        pretrain("--data-dir", corpus, "--output-dir", reference, "--steps", 2, *TINY)
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in reference.rglob("*")) == before


# ----- NaN, options, aliases, entry points ---------------------------------------------------

def test_nan_loss_stops_with_the_step(corpus, tmp_path, monkeypatch, caplog):
    from fastllm.models import GPT

    original, calls = GPT.forward, []

    def nan_on_third_step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", nan_on_third_step)
    out = tmp_path / "run"
    assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 6, "--save-every", 2,
                    *TINY) == 1
    assert "the loss is nan at step 3" in caplog.text
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert list(losses(out)) == [1, 2]


def test_grad_checkpointing_and_bf16(corpus, tmp_path):
    plain, recomputed, bf16 = (tmp_path / n for n in ("plain", "ckpt", "bf16"))
    for out, flags in ((plain, ()), (recomputed, ("--grad-checkpointing",)),
                       (bf16, ("--bf16",))):
        assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 3, *TINY,
                        *flags) == 0
    assert losses(plain) == losses(recomputed)
    assert all(0 < v < 10 for v in losses(bf16).values())


def test_aliases_and_python_m_entry_point(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "fastllm", "pretrain", "--data_dir", str(corpus),
                           "--output_dir", str(out), "--steps", "2", *TINY[:-2],
                           "--sample-tokens", "4"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--- continuation" in done.stdout
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    # --model_dir names the output folder as well
    assert pretrain("--data_dir", corpus, "--model_dir", out, "--steps", 3, "--resume",
                    *TINY) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 3]


def test_generate_command(reference, capsys):
    assert main(["generate", "--model-dir", str(reference), "--prompt", "the quick",
                 "--max-new-tokens", "6", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the quick") and len(first) > len("the quick")
    assert main(["generate", "--model_dir", str(ckpt.checkpoint_dir(reference, 8)), "--prompt",
                 "the quick", "--max-new-tokens", "6", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first  # same checkpoint, same seed: same text


def test_eval_command(corpus, reference, tmp_path, capsys):
    """fastllm eval: the mean next-token loss over consecutive windows, equal to the model's
    own loss on those windows, and its exponential."""
    from fastllm.models import from_pretrained
    from fastllm.train.data import load_tokenizer, read_corpus, token_stream

    out = tmp_path / "eval.json"
    assert main(["eval", "--model-dir", str(reference), "--data-dir", str(corpus),
                 "--seq-len", "16", "--max-windows", "5", "--batch-size", "2",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "perplexity" in printed and result["windows"] == 5 and result["tokens"] == 5 * 15
    assert abs(result["perplexity"] - math.exp(result["loss"])) < 1e-6 * result["perplexity"]
    folder = ckpt.checkpoint_dir(reference, 8)
    model = from_pretrained(folder).eval()
    stream = token_stream(read_corpus([corpus]), load_tokenizer(folder))
    rows = stream[: 5 * 16].view(5, 16)
    with torch.no_grad():
        expected = model(rows, labels=rows).loss.item()  # the mean over the same 75 targets
    assert abs(result["loss"] - expected) < 1e-5 * expected
    with pytest.raises(SystemExit):  # a usage error, before the model is loaded
        main(["eval", "--model-dir", str(reference), "--data-dir", str(tmp_path / "missing")])
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model-dir", str(tmp_path), "--data-dir", str(corpus)])
    assert "--model-dir: no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model-dir", str(reference), "--data-dir", str(corpus),
              "--seq-len", "100000"])
    assert "beyond the model's position table" in capsys.readouterr().err
