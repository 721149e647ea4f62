"""BERT pre-training data: masked-LM + next-sentence prediction (Devlin et al., 2018).

Each row is a sentence pair packed to ``seq_len`` tokens:

    [CLS] A [SEP] B [SEP] [PAD] ...      token_type_ids 0 over [CLS] A [SEP], 1 over B [SEP]

- A is one or more consecutive sentences of a document, starting at a random sentence that
  has a successor in its document; the sentences from there that fit in ``seq_len - 3``
  tokens are cut at a random sentence boundary into A and the rest.
- Half of the rows (``next_sentence_label`` 0) continue with B = the sentences that really
  follow A; the other half (label 1) with B = consecutive sentences from a random sentence of
  another document (Hugging Face's label convention: 0 = B follows A).
- When A + B do not fit, the longer is trimmed: A at its start, B at its end, so A's last
  and B's first sentence stay whole and a real pair stays adjacent at the cut.
- Masking: 15 % of the row's A and B tokens (rounded, at least one), chosen uniformly; 80 % of
  them become ``[MASK]``, 10 % a random non-special token, 10 % stay as they are. ``labels``
  hold the original id there and -100 elsewhere ([CLS], [SEP], padding are never chosen).

Every random choice of step ``s`` comes from ``data.step_rng(seed, s)``, so the rows of a
step are a function of (seed, step) alone and a resumed run sees the rows an uninterrupted
one would. Held-out rows are drawn once, from the held-out documents, with a generator of
their own.

Shapes: B rows, T = seq_len.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from fastllm.train.data import DataError, step_rng
from fastllm.train.objectives import Batch, split_rows

Docs = Sequence[Sequence[Sequence[int]]]  # documents -> sentences -> token ids

MASK_FRACTION = 0.15  # of a row's A and B tokens
MASK_TOKEN_FRACTION = 0.8  # of the chosen tokens: [MASK]
RANDOM_TOKEN_FRACTION = 0.1  # of the chosen tokens: a random token (the rest stay)
MIN_SEQ_LEN = 5  # [CLS] a [SEP] b [SEP]


@dataclass(frozen=True)
class BertTokens:
    """The ids of BERT's special tokens and the ids a random replacement draws from."""

    pad: int
    cls: int
    sep: int
    mask: int
    vocab_size: int

    @classmethod
    def of(cls, tokenizer) -> "BertTokens":
        ids = {t: tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}
        return cls(ids["[PAD]"], ids["[CLS]"], ids["[SEP]"], ids["[MASK]"],
                   tokenizer.get_vocab_size())

    def replacement_ids(self, special: set[int]) -> list[int]:
        return [i for i in range(self.vocab_size) if i not in special]


def mask_tokens(rng: random.Random, ids: list[int], maskable: list[int], tokens: BertTokens,
                replacement_ids: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of ``ids`` with 15 % of the positions ``maskable`` (at least one)
    chosen for prediction: 80 % [MASK], 10 % a random id of ``replacement_ids``, 10 % kept;
    labels -100 at every other position."""
    n = max(1, round(MASK_FRACTION * len(maskable)))
    inputs, labels = list(ids), [-100] * len(ids)
    for pos in rng.sample(maskable, n):
        labels[pos] = ids[pos]
        u = rng.random()
        if u < MASK_TOKEN_FRACTION:
            inputs[pos] = tokens.mask
        elif u < MASK_TOKEN_FRACTION + RANDOM_TOKEN_FRACTION:
            inputs[pos] = rng.choice(replacement_ids)
    return inputs, labels


def _take(sentences: Sequence[Sequence[int]], start: int, budget: int) -> list[list[int]]:
    """Consecutive sentences from ``start`` while they fit in ``budget`` tokens (the first
    one always, whatever its length)."""
    out, used = [], 0
    for s in sentences[start:]:
        if out and used + len(s) > budget:
            break
        out.append(list(s))
        used += len(s)
    return out


def _flat(sentences: list[list[int]]) -> list[int]:
    return [t for s in sentences for t in s]


class SentencePairs:
    """Draws NSP pairs: A from ``docs``, a random B from ``random_docs`` (any document but A's
    own when they are the same list)."""

    def __init__(self, docs: Docs, random_docs: Docs, budget: int):
        self.docs, self.random_docs, self.budget = docs, random_docs, budget
        self.same = docs is random_docs
        # every sentence with a successor in its document can start A
        self.starts = [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - 1)]
        # every sentence of random_docs can start a random B
        self.random_starts = [(d, i) for d, doc in enumerate(random_docs) for i in range(len(doc))]

    def pair(self, rng: random.Random) -> tuple[list[int], list[int], int]:
        """(A ids, B ids, next_sentence_label)."""
        d, i = self.starts[rng.randrange(len(self.starts))]
        doc = self.docs[d]
        chunk = _take(doc, i, self.budget)
        if len(chunk) == 1:  # sentence i alone fills the budget: its successor is B
            chunk.append(list(doc[i + 1]))
        cut = rng.randint(1, len(chunk) - 1)
        a = _flat(chunk[:cut])
        if rng.random() < 0.5:
            label, b = 0, _flat(chunk[cut:])
        else:
            label = 1
            while True:
                e, j = self.random_starts[rng.randrange(len(self.random_starts))]
                if not (self.same and e == d):
                    break
            b = _flat(_take(self.random_docs[e], j, max(self.budget - len(a), 1)))
        while len(a) + len(b) > self.budget:  # the longer one loses a token
            if len(a) > len(b):
                a = a[1:]
            else:
                b = b[:-1]
        return a, b, label


def check_nsp_docs(train_docs: Docs, held_docs: Docs, val_fraction: float) -> None:
    """DataError unless NSP pairs can be drawn: two training documents, one of them with two
    sentences or more, and (when documents are held out) a held-out document of two
    sentences."""
    n_docs = len(train_docs) + len(held_docs)
    n_sentences = sum(len(d) for d in (*train_docs, *held_docs))
    if len(train_docs) < 2 or not any(len(d) >= 2 for d in train_docs):
        raise DataError(
            f"next-sentence prediction needs at least two training documents, one of them with "
            f"two or more sentences; the corpus has {n_docs} document(s) with {n_sentences} "
            f"sentence(s) in all, {len(held_docs)} of the documents held out (--val-fraction "
            f"{val_fraction})")
    if held_docs and not any(len(d) >= 2 for d in held_docs):
        raise DataError(
            f"the {len(held_docs)} held-out document(s) (the last --val-fraction {val_fraction} "
            f"of the documents) have no two consecutive sentences for next-sentence "
            f"prediction: raise --val-fraction, or pass --val-fraction 0")


class MaskedLMNextSentence:
    """The BERT pre-training :class:`fastllm.train.objectives.Objective`: MLM + NSP rows (see
    the module docstring) for ``BertForPreTraining``; the held-out loss is the masked-LM loss
    alone (per predicted token, so its exponential is the MLM perplexity)."""

    def __init__(self, train_docs: Docs, held_docs: Docs, tokens: BertTokens, seq_len: int,
                 seed: int, n_eval_rows: int, special_ids: set[int]):
        if seq_len < MIN_SEQ_LEN:
            raise ValueError(f"seq_len must be >= {MIN_SEQ_LEN} ([CLS] A [SEP] B [SEP]), "
                             f"got {seq_len}")
        self.tokens = tokens
        self.seq_len = self.tokens_per_row = seq_len
        self.seed = seed
        self.replacement_ids = tokens.replacement_ids(special_ids)
        self.train_pairs = SentencePairs(train_docs, train_docs, seq_len - 3)
        self.eval_rows: Batch = {}
        if held_docs and n_eval_rows:
            # random B from other held-out documents, or from the training ones when only
            # one document is held out
            pool = held_docs if len(held_docs) >= 2 else train_docs
            held = SentencePairs(held_docs, pool, seq_len - 3)
            rng = random.Random(f"fastllm-bert-eval-{seed}")
            self.eval_rows = self._rows(rng, held, n_eval_rows)

    def _row(self, rng: random.Random, pairs: SentencePairs) -> tuple[list[int], ...]:
        t = self.tokens
        a, b, label = pairs.pair(rng)
        ids = [t.cls, *a, t.sep, *b, t.sep]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        maskable = [*range(1, 1 + len(a)), *range(len(a) + 2, len(a) + 2 + len(b))]
        inputs, labels = mask_tokens(rng, ids, maskable, t, self.replacement_ids)
        pad = self.seq_len - len(ids)
        return (inputs + [t.pad] * pad, types + [0] * pad, [1] * len(ids) + [0] * pad,
                labels + [-100] * pad, label)

    def _rows(self, rng: random.Random, pairs: SentencePairs, n: int) -> Batch:
        rows = [self._row(rng, pairs) for _ in range(n)]
        names = ("input_ids", "token_type_ids", "attention_mask", "labels",
                 "next_sentence_label")
        return {name: torch.tensor([r[k] for r in rows], dtype=torch.long)
                for k, name in enumerate(names)}  # (B, T) each, next_sentence_label (B,)

    def step_batch(self, step: int, n_rows: int) -> Batch:
        return self._rows(step_rng(self.seed, step), self.train_pairs, n_rows)

    def normalisers(self, batch: Batch) -> dict[str, int]:
        return {"num_items_in_batch": int((batch["labels"] != -100).sum()),
                "num_sentences_in_batch": batch["labels"].shape[0]}

    def eval_batches(self, batch_size: int) -> list[Batch]:
        return split_rows(self.eval_rows, batch_size)

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> tuple[float, int]:
        out = model(**batch, num_items_in_batch=1, num_sentences_in_batch=1)
        return out.mlm_loss.item(), int((batch["labels"] != -100).sum())


def packed_rows(docs: Docs, budget: int) -> list[list[list[int]]]:
    """Each document's sentences packed in order into rows of at most ``budget`` tokens (a
    longer sentence is cut into pieces), each row a list of its sentences (pieces): the whole
    text once, for ``fastllm eval``."""
    rows = []
    for doc in docs:
        row: list[list[int]] = []
        used = 0
        for s in doc:
            for k in range(0, len(s), budget):
                piece = list(s[k: k + budget])
                if used + len(piece) > budget:
                    rows.append(row)
                    row, used = [], 0
                row.append(piece)
                used += len(piece)
        if row:
            rows.append(row)
    return rows


def mlm_eval_rows(docs: Docs, tokens: BertTokens, special_ids: set[int], seq_len: int,
                  seed: int) -> Batch:
    """``[CLS] text [SEP]`` rows covering ``docs`` once (:func:`packed_rows`), masked as in
    training with a generator seeded by ``seed``: what ``fastllm eval`` scores a BERT
    checkpoint on."""
    rng = random.Random(f"fastllm-mlm-eval-{seed}")
    replacement = tokens.replacement_ids(special_ids)
    cols: dict[str, list] = {"input_ids": [], "token_type_ids": [], "attention_mask": [],
                             "labels": []}
    for row in packed_rows(docs, seq_len - 2):
        ids = [tokens.cls, *_flat(row), tokens.sep]
        inputs, labels = mask_tokens(rng, ids, list(range(1, len(ids) - 1)), tokens,
                                     replacement)
        pad = seq_len - len(ids)
        cols["input_ids"].append(inputs + [tokens.pad] * pad)
        cols["token_type_ids"].append([0] * seq_len)
        cols["attention_mask"].append([1] * len(ids) + [0] * pad)
        cols["labels"].append(labels + [-100] * pad)
    return {k: torch.tensor(v, dtype=torch.long).view(-1, seq_len) for k, v in cols.items()}
