"""``fastllm eval``: the perplexity of a ``fastllm pretrain`` checkpoint on a corpus.

    fastllm eval --model-dir DIR --data-dir PATH [--seq-len T] [--batch-size B]
                 [--max-windows N] [--text-field NAME] [--device DEVICE]

The corpus (text files, folders of them, JSONL; as ``fastllm pretrain`` reads it) is
tokenized with the checkpoint's tokenizer into one stream and cut into consecutive windows
of ``--seq-len`` tokens (default: the model's position table); every token after a window's
first is predicted, and the mean next-token loss and its exponential, the perplexity, are
printed (and written as JSON with ``--json``). Classification accuracy / F1 come with
``fastllm finetune``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fastllm.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastllm eval`` to the command line."""
    p = subparsers.add_parser(
        "eval", help="perplexity of a fastllm pretrain checkpoint on a corpus",
        description="Mean next-token loss and perplexity of a checkpoint on text files, "
        "folders of them or JSONL.",
    )
    p.add_argument("--model-dir", "--model_dir", dest="model_dir", type=Path, required=True,
                   metavar="DIR", help="a checkpoint folder, or a pretrain output folder "
                   "(newest checkpoint)")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", type=Path, action="append",
                   required=True, metavar="PATH", help="text files, folders, JSONL (repeatable)")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    p.add_argument("--seq-len", type=int, help="window length (default: the position table)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the result here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``fastllm eval``'s handler: prints loss and perplexity; returns 0."""
    for name in ("seq_len", "batch_size", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from fastllm.train.data import DataError, read_corpus, token_stream

    try:  # the data first: a bad path is reported before the model is loaded
        docs = read_corpus(args.data_dir, args.text_field)
    except DataError as exc:
        raise UsageError(f"--data-dir: {exc}") from exc
    import torch

    from fastllm.train.generate_cmd import load_model_dir

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model_dir(args.model_dir, device)
    limit = model._max_positions()
    seq_len = args.seq_len or limit or 1024
    if limit is not None and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} is beyond the model's position table ({limit})")
    stream = token_stream(docs, tokenizer)
    windows = stream.numel() // seq_len
    if windows == 0:
        raise UsageError(f"--data-dir: {stream.numel()} tokens, fewer than one --seq-len "
                         f"window ({seq_len})")
    if args.max_windows is not None:
        windows = min(windows, args.max_windows)
    rows = stream[: windows * seq_len].view(windows, seq_len)  # (R, T)
    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids in rows.split(args.batch_size):
            input_ids = input_ids.to(device)  # (B, T)
            total += model(input_ids, labels=input_ids, num_items_in_batch=1).loss.item()
            count += input_ids.shape[0] * (seq_len - 1)
    loss = total / count
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
              "windows": windows, "seq_len": seq_len}
    print(f"loss {loss:.4f}  perplexity {math.exp(loss):.2f}  "
          f"({count} predicted tokens in {windows} windows of {seq_len})")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return 0
