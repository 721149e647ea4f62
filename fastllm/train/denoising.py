"""BART pre-training data: denoising (Lewis et al., 2019), text infilling + sentence
permutation, the combination the paper's final model was trained with.

Each row is a chunk of consecutive sentences of a document (from a random sentence, as many
as fit in ``seq_len - 2`` tokens; a longer first sentence is cut), and

- ``labels``  = ``<s> chunk </s>``, -100 after it (padding);
- ``input_ids`` = ``<s> noise(chunk) </s>``, ``<pad>`` after it, ``attention_mask`` 0 there;
  noise(chunk): the chunk's sentences in a random order (sentence permutation), then text
  infilling: spans with Poisson(3) lengths cover 30 % of the tokens (rounded), each span is
  replaced by one ``<mask>`` (a span of length 0 inserts a ``<mask>``), at random places.
  ``<s>`` and ``</s>`` are never masked.

The decoder reads ``shift_tokens_right(labels)`` (``</s> <s> chunk``), which the model makes
itself from ``labels`` (fastllm/models/encoder_decoder.py), so the loss is the
reconstruction of the whole original chunk. Every random choice of step ``s`` comes from
``data.step_rng(seed, s)``: the rows of a step are a function of (seed, step) alone.
Held-out rows are drawn once from the held-out documents.

Shapes: B rows, S = T = seq_len (source and target padded to the same width).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from fastllm.train.data import step_rng
from fastllm.train.objectives import Batch, split_rows

Docs = Sequence[Sequence[Sequence[int]]]  # documents -> sentences -> token ids

MASK_RATIO = 0.3  # of a chunk's tokens, covered by the masked spans
SPAN_POISSON_LAMBDA = 3.0  # mean span length
MIN_SEQ_LEN = 3  # <s> x </s>


@dataclass(frozen=True)
class BartTokens:
    bos: int
    eos: int
    pad: int
    mask: int

    @classmethod
    def of(cls, tokenizer) -> "BartTokens":
        ids = [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>", "<mask>")]
        return cls(*ids)


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson(``lam``) draw (Knuth's product of uniforms; fine for small ``lam``)."""
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def span_lengths(rng: random.Random, n_masked: int) -> list[int]:
    """Poisson(3) span lengths summing to ``n_masked`` (the last one cut short). Zero-length
    spans (insertions) are dropped beyond ``n_masked - non-zero spans``, so the noised text
    is never longer than the original."""
    lengths, total = [], 0
    while total < n_masked:
        length = min(poisson(rng, SPAN_POISSON_LAMBDA), n_masked - total)
        lengths.append(length)
        total += length
    n_zero = lengths.count(0)
    allowed = n_masked - (len(lengths) - n_zero)
    if n_zero > allowed:
        kept, out = 0, []
        for length in lengths:
            if length == 0:
                if kept >= allowed:
                    continue
                kept += 1
            out.append(length)
        lengths = out
    return lengths


def text_infilling(rng: random.Random, ids: list[int], mask_id: int) -> list[int]:
    """``ids`` with spans covering ``round(0.3 * len(ids))`` tokens each replaced by one
    ``mask_id``: the spans go into random gaps between (and around) the kept tokens, so
    masked spans never overlap (two spans in one gap give two adjacent masks)."""
    n = len(ids)
    n_masked = round(MASK_RATIO * n)
    if n_masked == 0:
        return list(ids)
    lengths = span_lengths(rng, n_masked)
    kept = n - n_masked
    gaps = sorted(rng.randrange(kept + 1) for _ in lengths)  # the gap each span goes into
    rng.shuffle(lengths)
    out, src, span = [], 0, 0
    for g in range(kept + 1):
        while span < len(lengths) and gaps[span] == g:
            out.append(mask_id)
            src += lengths[span]
            span += 1
        if g < kept:
            out.append(ids[src])
            src += 1
    return out


def _chunk(sentences: Sequence[Sequence[int]], start: int, budget: int) -> list[list[int]]:
    out, used = [], 0
    for s in sentences[start:]:
        if out and used + len(s) > budget:
            break
        out.append(list(s[:budget]))
        used += len(out[-1])
    return out


class Denoising:
    """The BART pre-training :class:`fastllm.train.objectives.Objective` (see the module
    docstring) for ``EncoderDecoder``; the loss is per target token."""

    def __init__(self, train_docs: Docs, held_docs: Docs, tokens: BartTokens, seq_len: int,
                 seed: int, n_eval_rows: int):
        if seq_len < MIN_SEQ_LEN:
            raise ValueError(f"seq_len must be >= {MIN_SEQ_LEN} (<s> x </s>), got {seq_len}")
        self.tokens = tokens
        self.seq_len = self.tokens_per_row = seq_len
        self.seed = seed
        self.train_docs = train_docs
        self.train_starts = [(d, i) for d, doc in enumerate(train_docs) for i in range(len(doc))]
        self.eval_rows: Batch = {}
        if held_docs and n_eval_rows:
            rng = random.Random(f"fastllm-bart-eval-{seed}")
            starts = [(d, i) for d, doc in enumerate(held_docs) for i in range(len(doc))]
            self.eval_rows = self._rows(rng, held_docs, starts, n_eval_rows)

    def noise(self, rng: random.Random, sentences: list[list[int]]) -> tuple[list, list]:
        """(source ids, target ids) of a chunk: ``<s> infill(permuted) </s>``,
        ``<s> chunk </s>``."""
        t = self.tokens
        permuted = list(sentences)
        rng.shuffle(permuted)
        source = text_infilling(rng, [x for s in permuted for x in s], t.mask)
        target = [x for s in sentences for x in s]
        return [t.bos, *source, t.eos], [t.bos, *target, t.eos]

    def pad(self, pairs: list[tuple[list, list]]) -> Batch:
        """The batch of (source, target) pairs: input_ids / attention_mask / labels (B, T),
        padded with ``<pad>`` / 0 / -100."""
        t, T = self.tokens, self.seq_len
        cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for source, target in pairs:
            cols["input_ids"].append(source + [t.pad] * (T - len(source)))
            cols["attention_mask"].append([1] * len(source) + [0] * (T - len(source)))
            cols["labels"].append(target + [-100] * (T - len(target)))
        return {k: torch.tensor(v, dtype=torch.long).view(-1, T) for k, v in cols.items()}

    def _rows(self, rng: random.Random, docs: Docs, starts: list, n: int) -> Batch:
        pairs = []
        for _ in range(n):
            d, i = starts[rng.randrange(len(starts))]
            pairs.append(self.noise(rng, _chunk(docs[d], i, self.seq_len - 2)))
        return self.pad(pairs)

    def step_batch(self, step: int, n_rows: int) -> Batch:
        return self._rows(step_rng(self.seed, step), self.train_docs, self.train_starts, n_rows)

    def normalisers(self, batch: Batch) -> dict[str, int]:
        return {"num_items_in_batch": int((batch["labels"] != -100).sum())}

    def eval_batches(self, batch_size: int) -> list[Batch]:
        return split_rows(self.eval_rows, batch_size)

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> tuple[float, int]:
        loss = model(**batch, num_items_in_batch=1).loss  # the summed token loss
        return loss.item(), int((batch["labels"] != -100).sum())


def denoising_eval_rows(docs: Docs, tokens: BartTokens, seq_len: int, seed: int) -> Batch:
    """Rows covering ``docs`` once (consecutive sentences packed to ``seq_len - 2`` tokens,
    fastllm.train.mlm.packed_rows), noised as in training with a generator seeded by
    ``seed``: what ``fastllm eval`` scores a BART checkpoint on."""
    from fastllm.train.mlm import packed_rows

    rng = random.Random(f"fastllm-denoising-eval-{seed}")
    rows = packed_rows(docs, seq_len - 2)
    objective = Denoising([], [], tokens, seq_len, seed, 0)
    return objective.pad([objective.noise(rng, row) for row in rows])
