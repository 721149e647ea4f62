"""``fastllm pretrain --arch bert`` (masked-LM + next-sentence prediction) and ``--arch bart``
(denoising): tiny runs (bert-tiny / bart-tiny, a 300-id tokenizer, 32-token rows) on a small
corpus of numbered sentences written per test.

What is checked: the masking statistics (15 % of the text tokens, 80 / 10 / 10, never a
special token or padding); next-sentence pairs (half of them really adjacent, the other half
from another document); BART's noise (30 % of the tokens in Poisson spans, one <mask> each,
sentences permuted, <s> </s> kept); the loss going down; resume repeating an uninterrupted run
bit for bit; the checkpoint loading in fastllm and in transformers with the same logits, and
its tokenizer in AutoTokenizer with the right special tokens; ``fastllm eval`` on both; bad
input refused before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from fastllm.cli import main  # noqa: E402
from fastllm.train import checkpoint as ckpt  # noqa: E402
from fastllm.train import data, denoising, loop, mlm  # noqa: E402

COMMON = ("--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--warmup", "2",
          "--lr", "3e-3", "--eval-every", "0", "--sample-tokens", "0", "--eval-batches", "2")
TINY = {"bert": ("--arch", "bert", "--config", "bert-tiny", *COMMON),
        "bart": ("--arch", "bart", "--config", "bart-tiny", *COMMON)}
PHRASES = ("the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
           "all that glitters is not gold", "every cloud has a silver lining")
N_DOCS, N_SENTENCES = 6, 24
SENTENCE_ID = re.compile(r"d(\d+)s(\d+)x")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pretrain(*args) -> int:
    return main(["pretrain", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six documents of 24 sentences, each opening with its id ``d<doc>s<n>x``."""
    root = tmp_path_factory.mktemp("corpus")
    for d in range(N_DOCS):
        text = " ".join(f"d{d}s{i}x {PHRASES[(d + i) % len(PHRASES)]}." for i in range(N_SENTENCES))
        (root / f"doc{d}.txt").write_text(text + "\n")
    return root


@pytest.fixture(scope="module")
def sentences(corpus):
    """(bert tokenizer, bart tokenizer, sentence ids per document for each)."""
    docs = data.read_corpus([corpus])
    out = {}
    for kind in ("bert", "bart"):
        tok = data.train_tokenizer(docs, 300, kind)
        out[kind] = (tok, data.sentence_ids(docs, tok))
    return out


def losses(output_dir: Path) -> dict[int, float]:
    records = loop.read_metrics(output_dir / loop.METRICS_FILE)
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def bert_objective(sentences, seq_len=128):
    tok, docs = sentences["bert"]
    specials = {tok.token_to_id(t) for t in data.SPECIAL_TOKENS["bert"]}
    return tok, mlm.MaskedLMNextSentence(docs, [], mlm.BertTokens.of(tok), seq_len, 0, 0,
                                         specials)


# ----- BERT data -------------------------------------------------------------------------------

def test_masking_statistics(sentences):
    tok, objective = bert_objective(sentences)
    t = objective.tokens
    b = objective.step_batch(0, 600)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    special = torch.isin(ids, torch.tensor([t.cls, t.sep, t.pad]))
    chosen = labels != -100
    original = torch.where(chosen, labels, ids)
    text = (mask == 1) & ~torch.isin(original, torch.tensor([t.cls, t.sep, t.pad]))
    assert chosen.sum() > 10_000
    # 15 % of each row's text tokens (rounded), never [CLS], [SEP] or padding
    assert torch.equal((chosen.sum(1).float() - 0.15 * text.sum(1)).abs() <= 0.5,
                       torch.ones(600, dtype=torch.bool))
    assert not (chosen & ~text).any()
    assert not (special & chosen).any()  # a chosen token never becomes a special one
    assert torch.equal(mask == 0, ids == t.pad)
    as_mask = (ids[chosen] == t.mask).float().mean().item()
    kept = (ids[chosen] == labels[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02, (as_mask, kept)
    assert abs(1 - as_mask - kept - 0.1) < 0.02
    # the 10 % random tokens are drawn from the whole non-special vocabulary
    randoms = ids[chosen & (ids != t.mask) & (ids != labels)]
    assert randoms.unique().numel() > 100 and randoms.min() > 3
    # token types: 0 through the first [SEP], 1 after it up to the second, 0 on padding
    for row in range(20):
        seps = (b["input_ids"][row] == t.sep).nonzero().flatten().tolist()
        seps = [p for p in seps if labels[row, p] == -100]
        types = b["token_type_ids"][row]
        assert types[: seps[0] + 1].sum() == 0 and bool((types[seps[0] + 1: seps[-1] + 1] == 1).all())
        assert types[seps[-1] + 1:].sum() == 0


def test_next_sentence_pairs_half_real(sentences):
    tok, objective = bert_objective(sentences)
    t = objective.tokens
    b = objective.step_batch(3, 2000)
    original = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
    nsp = b["next_sentence_label"]
    assert abs(nsp.float().mean().item() - 0.5) < 0.05  # 4.5 standard deviations
    for row in range(2000):
        ids = original[row].tolist()
        assert ids[0] == t.cls
        sep = ids.index(t.sep)
        end = ids.index(t.sep, sep + 1)
        assert ids[end + 1:] == [t.pad] * (len(ids) - end - 1)
        a = SENTENCE_ID.findall(tok.decode(ids[1:sep]))
        b_ids = SENTENCE_ID.findall(tok.decode(ids[sep + 1: end]))
        assert a and b_ids
        (da, sa), (db, sb) = a[-1], b_ids[0]
        # B starts with a whole sentence; A ends with one
        assert tok.decode(ids[sep + 1: end]).lstrip().startswith(f"d{db}s{sb}x")
        if nsp[row] == 0:
            assert (db, int(sb)) == (da, int(sa) + 1), (a, b_ids)
        else:
            assert db != da
    # a fixed function of (seed, step)
    again = objective.step_batch(3, 2000)
    assert all(torch.equal(again[k], b[k]) for k in b)
    assert not torch.equal(objective.step_batch(4, 2000)["input_ids"], b["input_ids"])


def test_too_few_sentences_for_nsp_is_a_data_error():
    with pytest.raises(data.DataError, match="two training documents"):
        mlm.check_nsp_docs([[[5, 6]], [[7]]], [], 0.0)
    with pytest.raises(data.DataError, match="held-out"):
        mlm.check_nsp_docs([[[5], [6]], [[7]]], [[[8]]], 0.05)
    mlm.check_nsp_docs([[[5], [6]], [[7]]], [[[8], [9]]], 0.05)


# ----- BART data -------------------------------------------------------------------------------

def test_bart_noise(sentences, monkeypatch):
    tok, docs = sentences["bart"]
    t = denoising.BartTokens.of(tok)
    objective = denoising.Denoising(docs, [], t, 64, 0, 0)
    b = objective.step_batch(0, 400)
    n_masked = n_tokens = n_spans = 0
    for row in range(400):
        src = b["input_ids"][row][b["attention_mask"][row] == 1].tolist()
        tgt = [x for x in b["labels"][row].tolist() if x != -100]
        assert src[0] == tgt[0] == t.bos and src[-1] == tgt[-1] == t.eos
        assert b["input_ids"][row][len(src):].eq(t.pad).all()
        content, original = src[1:-1], tgt[1:-1]
        assert not {t.bos, t.eos, t.pad} & set(content) and t.mask not in original
        k = content.count(t.mask)
        m = len(original) - (len(content) - k)  # tokens the masks stand for
        assert m == round(0.3 * len(original)) and len(content) <= len(original)
        # what is not masked comes from the original (in another sentence order)
        kept = [x for x in content if x != t.mask]
        assert not (torch.bincount(torch.tensor(kept), minlength=300)
                    > torch.bincount(torch.tensor(original), minlength=300)).any()
        n_masked, n_tokens, n_spans = n_masked + m, n_tokens + len(original), n_spans + k
    assert abs(n_masked / n_tokens - 0.3) < 0.01
    assert 2.4 < n_masked / n_spans < 3.3  # Poisson(3) spans, the last of a row cut short
    # sentence permutation alone (no infilling): the same sentences, in another order
    monkeypatch.setattr(denoising, "MASK_RATIO", 0.0)
    import random

    chunk = [list(s) for s in docs[0][:4]]
    rng = random.Random(1)
    orders = set()
    for _ in range(20):
        src, tgt = objective.noise(rng, chunk)
        assert tgt == [t.bos, *[x for s in chunk for x in s], t.eos]
        assert sorted(src) == sorted(tgt)
        orders.add(tuple(src))
    assert len(orders) > 5


def test_text_infilling_spans():
    import random

    rng = random.Random(0)
    ids = list(range(10, 110))
    lengths = []
    for _ in range(200):
        out = denoising.text_infilling(rng, ids, 1)
        kept = [x for x in out if x != 1]
        assert kept == sorted(kept) and len(ids) - len(kept) == 30  # order kept, 30 % gone
        lengths += denoising.span_lengths(rng, 30)
    assert abs(sum(lengths) / len(lengths) - 3) < 0.4
    assert 0 in lengths  # zero-length spans: insertions


# ----- training runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """8 uninterrupted steps of each arch, a checkpoint every 4."""
    out = {}
    for arch in ("bert", "bart"):
        out[arch] = tmp_path_factory.mktemp(arch) / "run"
        assert pretrain("--data-dir", corpus, "--output-dir", out[arch], "--steps", 8,
                        "--save-every", 4, *TINY[arch]) == 0
    return out


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_loss_decreases(arch, corpus, tmp_path):
    out = tmp_path / "run"
    assert pretrain("--data-dir", corpus, "--output-dir", out, "--steps", 40, *TINY[arch],
                    "--batch-size", 8) == 0
    curve = list(losses(out).values())
    first, last = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert last < 0.75 * first, f"loss {first:.3f} -> {last:.3f}"  # ~0.65 here


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_resume_is_bit_identical(arch, corpus, runs, tmp_path):
    straight = runs[arch]
    resumed = tmp_path / "resumed"
    assert pretrain("--data-dir", corpus, "--output-dir", resumed, "--steps", 8, "--resume",
                    ckpt.checkpoint_dir(straight, 4), *TINY[arch]) == 0
    a, b = losses(straight), losses(resumed)
    assert list(b) == [5, 6, 7, 8] and [a[s] for s in b] == list(b.values())
    wa = load_file(ckpt.checkpoint_dir(straight, 8) / "model.safetensors")
    wb = load_file(ckpt.checkpoint_dir(resumed, 8) / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_checkpoint_loads_in_transformers(arch, runs, sentences):
    transformers = pytest.importorskip("transformers")
    from fastllm.models import BertForPreTraining, EncoderDecoder, from_pretrained

    folder = ckpt.checkpoint_dir(runs[arch], 8)
    ours = from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if arch == "bert":
        assert isinstance(ours, BertForPreTraining)
        assert (tok.cls_token, tok.sep_token, tok.mask_token, tok.pad_token) == (
            "[CLS]", "[SEP]", "[MASK]", "[PAD]")
        pair = tok("a b", "c")  # [CLS] A [SEP] B [SEP], token types 0 then 1
        assert pair["input_ids"][0] == tok.cls_token_id
        assert pair["input_ids"][-1] == tok.sep_token_id and pair["token_type_ids"][-1] == 1
        theirs = transformers.BertForPreTraining.from_pretrained(folder).eval()
        _, objective = bert_objective(sentences, 32)
        batch = objective.step_batch(0, 4)
        with torch.no_grad():
            a = ours(**batch, return_logits=True)
            b = theirs(**batch)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(a.prediction_logits[real], b.prediction_logits[real],
                                   atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(a.seq_relationship_logits, b.seq_relationship_logits,
                                   atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(a.loss, b.loss, atol=2e-4, rtol=1e-4)
    else:
        assert isinstance(ours, EncoderDecoder)
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token) == (
            "<s>", "</s>", "<pad>", "<mask>")
        assert tok("a b")["input_ids"][0] == tok.bos_token_id
        theirs = transformers.BartForConditionalGeneration.from_pretrained(folder).eval()
        t, docs = sentences["bart"]
        batch = denoising.Denoising(docs, [], denoising.BartTokens.of(t), 32, 0, 0).step_batch(0, 4)
        with torch.no_grad():
            a = ours(**batch, return_logits=True)
            b = theirs(**batch)
        real = batch["labels"] != -100
        torch.testing.assert_close(a.logits[real], b.logits[real], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(a.loss, b.loss, atol=2e-4, rtol=1e-4)


def test_samples_are_printed(corpus, tmp_path, capsys):
    for arch in ("bert", "bart"):
        assert pretrain("--data-dir", corpus, "--output-dir", tmp_path / arch, "--steps", 2,
                        *TINY[arch], "--sample-tokens", "20") == 0
    out = capsys.readouterr().out
    assert "--- top-5 predictions ---" in out and "[MASK] 1 (true: " in out
    assert "--- greedy reconstruction ---" in out and "<mask>" in out


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_eval_command(arch, corpus, runs, tmp_path, capsys):
    """fastllm eval: the loss of the fixed-seed rows, equal to the model's own on them."""
    from fastllm.models import from_pretrained

    out = tmp_path / "eval.json"
    args = ["eval", "--model-dir", str(runs[arch]), "--data-dir", str(corpus),
            "--batch-size", "3", "--json", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert first["seq_len"] == 32 and first["rows"] > 10  # the training --seq-len
    assert first["objective"] == ("masked-LM" if arch == "bert" else "denoising")
    assert abs(first["perplexity"] - math.exp(first["loss"])) < 1e-6 * first["perplexity"]
    assert main(args) == 0
    assert json.loads(out.read_text())["loss"] == first["loss"]  # same seed, same masks
    assert main([*args, "--seed", "1"]) == 0
    assert json.loads(out.read_text())["loss"] != first["loss"]
    folder = ckpt.checkpoint_dir(runs[arch], 8)
    model = from_pretrained(folder).eval()
    tok = data.load_tokenizer(folder)
    docs = data.sentence_ids(data.read_corpus([corpus]), tok)
    if arch == "bert":
        specials = {tok.token_to_id(t) for t in data.SPECIAL_TOKENS["bert"]}
        rows = mlm.mlm_eval_rows(docs, mlm.BertTokens.of(tok), specials, 32, 0)
    else:
        rows = denoising.denoising_eval_rows(docs, denoising.BartTokens.of(tok), 32, 0)
    assert rows["input_ids"].shape[0] == first["rows"]
    with torch.no_grad():
        expected = model(**rows).loss.item()  # the mean over all predicted tokens
    assert abs(first["loss"] - expected) < 1e-4 * expected
    assert "perplexity" in capsys.readouterr().out


# ----- bad input: refused before anything is written -----------------------------------------

@pytest.mark.parametrize("case, args, names", [
    ("bert-seq-len", ("--arch", "bert", "--seq-len", "129"), ["--seq-len 129", "128"]),
    ("bart-seq-len", ("--arch", "bart", "--seq-len", "65"), ["--seq-len 65", "64"]),
    ("bert-short-seq", ("--arch", "bert", "--seq-len", "4"), ["--seq-len", ">= 5"]),
    ("bert-vocab", ("--arch", "bert", "--vocab-size", "259"), ["--vocab-size", "260", "[MASK]"]),
    ("bert-config", ("--arch", "bert", "--config", "bart-tiny"), ["--config", "bert-mini"]),
    ("nsp-one-doc", ("--arch", "bert", "--data-dir", "{tmp}/one.txt"),
     ["--data-dir", "next-sentence prediction", "two training documents"]),
    ("nsp-one-sentence-each", ("--arch", "bert", "--data-dir", "{tmp}/short",
                               "--val-fraction", "0"),
     ["--data-dir", "two or more sentences"]),
    ("bart-one-doc", ("--arch", "bart", "--data-dir", "{tmp}/one.txt"),
     ["--data-dir", "--val-fraction", "holds out whole documents"]),
    ("bert-tokenizer", ("--arch", "bert", "--tokenizer", "{tmp}/gpt.json"),
     ["--tokenizer", "[CLS]"]),
])
def test_bad_input_is_refused_before_writing(case, args, names, corpus, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("One sentence. And another one. And a third.")
    (tmp_path / "short").mkdir()
    for i in range(3):
        (tmp_path / "short" / f"{i}.txt").write_text(f"Only one sentence here {i}.")
    gpt = data.train_tokenizer(data.read_corpus([corpus]), 300)
    (tmp_path / "gpt.json").write_text(gpt.to_str())
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    if "--data-dir" not in args:
        args = ["--data-dir", str(corpus), *args]
    arch = args[args.index("--arch") + 1]
    with pytest.raises(SystemExit) as exc:
        pretrain("--output-dir", out, "--steps", 2, *TINY[arch], *args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err
    assert not out.exists()


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_generate_refuses_non_causal_checkpoints(arch, runs, capsys):
    """fastllm generate continues text with a causal LM: a bert / bart checkpoint is refused
    by an error naming --model-dir and the model class, not a crash."""
    with pytest.raises(SystemExit):
        main(["generate", "--model-dir", str(runs[arch]), "--prompt", "the"])
    err = capsys.readouterr().err
    assert "--model-dir" in err and "causal LM" in err
    assert ("BertForPreTraining" if arch == "bert" else "EncoderDecoder") in err
