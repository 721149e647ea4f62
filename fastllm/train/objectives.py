"""Training objectives: what a step trains on and how its loss is normalised.

The loop (fastllm/train/loop.py) knows nothing about causal LM, masked LM or classification:
it asks its :class:`Objective` for the rows of a step and for the held-out rows, and calls
the model on keyword batches. An objective provides

- ``step_batch(step, n_rows)``: the ``n_rows`` training rows of 0-based step ``step`` as a
  dict of CPU tensors whose first dimension is the row (the model's keyword arguments:
  ``input_ids``, ``labels``, ``attention_mask``, ...). A function of (seed, step) only, so a
  resumed run sees the same rows as an uninterrupted one, and every process of a distributed
  run can draw the same global batch and take its own share of the rows.
- ``normalisers(batch)``: the keyword arguments that turn each micro-batch's summed loss into
  its share of the mean over the whole step (``num_items_in_batch`` and, for BERT,
  ``num_sentences_in_batch``), counted over the rows given (the whole step's).
- ``eval_batches(batch_size)``: the held-out micro-batches (fixed; may be empty), and
  ``eval_sums(model, batch)``: (summed loss, count) of one of them, so the held-out loss is
  ``sum(sums) / sum(counts)``.

Shapes: B rows, T tokens per row.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fastllm.train.data import get_batch

Batch = dict[str, Tensor]


class Objective(Protocol):
    tokens_per_row: int  # the tokens one row holds (for tokens/s and --tokens)

    def step_batch(self, step: int, n_rows: int) -> Batch: ...

    def normalisers(self, batch: Batch) -> dict[str, int]: ...

    def eval_batches(self, batch_size: int) -> list[Batch]: ...

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> tuple[float, int]: ...


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every tensor of ``batch``."""
    return {k: v[start:stop] for k, v in batch.items()}


def split_rows(batch: Batch, batch_size: int) -> list[Batch]:
    """``batch`` cut into consecutive micro-batches of ``batch_size`` rows (none if empty)."""
    if not batch:
        return []
    return [rows(batch, i, i + batch_size) for i in range(0, n_rows(batch), batch_size)]


def n_rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class CausalLM:
    """Next-token prediction on ``seq_len``-token windows of a token stream, at offsets drawn
    from a generator seeded by (seed, step) (fastllm.train.data.get_batch); held out: the
    validation stream cut into consecutive windows."""

    def __init__(self, train_stream: Tensor, eval_windows: Tensor, seq_len: int, seed: int):
        self.train_stream = train_stream  # (N,) int64
        self.eval_windows = eval_windows  # (R, T)
        self.seq_len = self.tokens_per_row = seq_len
        self.seed = seed

    def step_batch(self, step: int, n_rows: int) -> Batch:
        windows = get_batch(self.train_stream, n_rows, self.seq_len, self.seed, step)  # (B, T)
        return {"input_ids": windows, "labels": windows}

    def normalisers(self, batch: Batch) -> dict[str, int]:
        ids = batch["input_ids"]
        return {"num_items_in_batch": ids.shape[0] * (ids.shape[1] - 1)}  # predicted tokens

    def eval_batches(self, batch_size: int) -> list[Batch]:
        return [{"input_ids": w, "labels": w} for w in self.eval_windows.split(batch_size)]

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> tuple[float, int]:
        loss = model(**batch, num_items_in_batch=1).loss  # the summed token loss
        return loss.item(), self.normalisers(batch)["num_items_in_batch"]
