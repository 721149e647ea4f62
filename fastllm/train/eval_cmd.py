"""``fastllm eval``: the perplexity of a ``fastllm pretrain`` checkpoint on a corpus.

    fastllm eval --model-dir DIR --data-dir PATH [--seq-len T] [--batch-size B]
                 [--max-windows N] [--seed S] [--text-field NAME] [--device DEVICE]

The corpus (text files, folders of them, JSONL; as ``fastllm pretrain`` reads it) is
tokenized with the checkpoint's tokenizer into one stream and cut into consecutive windows
of ``--seq-len`` tokens (default: the model's position table); every token after a window's
first is predicted, and the mean next-token loss and its exponential, the perplexity, are
printed (and written as JSON with ``--json``).

A BERT checkpoint (``fastllm pretrain --arch bert``) is scored on its masked-LM loss: the
corpus's sentences packed in order into ``[CLS] text [SEP]`` rows of ``--seq-len`` tokens
(default: the length it was trained on, else its position table), 15 % of each row's tokens
masked as in training (80 / 10 / 10) by a generator seeded by ``--seed``; the loss per masked
token and its exponential are printed. A BART checkpoint is scored the same way on the
denoising loss: each row corrupted as in training (sentence permutation, text infilling),
the loss per target token of its reconstruction (fastllm/train/mlm.py, denoising.py).

A ``fastllm finetune`` output folder, checkpoint or merged export is evaluated on its own
task's data (:func:`run_finetuned`): accuracy and macro-F1 (and per-class precision / recall /
F1) for a classifier, on CSV / TSV / JSONL rows with the run's text and label columns; loss
and perplexity of the response (causal-lm) or target (seq2seq) tokens otherwise.
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
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows "
                   "(bert, bart: rows)")
    p.add_argument("--seed", type=int, default=0, help="bert, bart: the seed of the masking "
                   "/ corruption (default 0)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the result here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``fastllm eval``'s handler: prints loss and perplexity; returns 0."""
    for name in ("seq_len", "batch_size", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from fastllm.train.finetune import is_finetuned

    if is_finetuned(args.model_dir):
        return run_finetuned(args)
    from fastllm.train.data import DataError, read_corpus, token_stream

    try:  # the data first: a bad path is reported before the model is loaded
        docs = read_corpus(args.data_dir, args.text_field)
    except DataError as exc:
        raise UsageError(f"--data-dir: {exc}") from exc
    import torch

    from fastllm.train.generate_cmd import load_model_dir

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model_dir(args.model_dir, device)
    from fastllm.models import BertForPreTraining, EncoderDecoder

    if isinstance(model, (BertForPreTraining, EncoderDecoder)):
        return _run_sentences(args, docs, model, tokenizer, device)
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
    _write_json(args.json, result)
    return 0


def _write_json(path, result: dict) -> None:
    if path:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)


def _trained_seq_len(model_dir: Path):
    """The --seq-len the checkpoint was trained with (its trainer_state.json), else None."""
    from fastllm.train.checkpoint import TRAINER_STATE, resolve_checkpoint

    folder = resolve_checkpoint(model_dir)
    if folder is None or not (folder / TRAINER_STATE).is_file():
        return None
    return json.loads((folder / TRAINER_STATE).read_text()).get("train_config", {}).get("seq_len")


def _run_sentences(args, docs, model, tokenizer, device) -> int:
    """The masked-LM (BERT) or denoising (BART) loss of the checkpoint on ``docs``."""
    import torch

    from fastllm.models import BertForPreTraining
    from fastllm.train import data, denoising, mlm

    bert = isinstance(model, BertForPreTraining)
    kind = "bert" if bert else "bart"
    missing = [t for t in data.SPECIAL_TOKENS[kind] if tokenizer.token_to_id(t) is None]
    if missing:
        raise UsageError(f"--model-dir: the tokenizer lacks the {kind} special tokens "
                         f"{' '.join(missing)}")
    limit = model.config.max_position_embeddings
    seq_len = args.seq_len or min(_trained_seq_len(args.model_dir) or limit, limit)
    if seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} is beyond the model's position table ({limit})")
    least = mlm.MIN_SEQ_LEN if bert else denoising.MIN_SEQ_LEN
    if seq_len < least:
        raise UsageError(f"--seq-len must be >= {least} for a {kind} checkpoint, got {seq_len}")
    sentences = data.sentence_ids(docs, tokenizer)
    if not sentences:
        raise UsageError("--data-dir: no sentence in the text")
    if bert:
        specials = {tokenizer.token_to_id(t) for t in data.special_tokens_of(tokenizer)}
        rows = mlm.mlm_eval_rows(sentences, mlm.BertTokens.of(tokenizer), specials, seq_len,
                                 args.seed)
    else:
        rows = denoising.denoising_eval_rows(sentences, denoising.BartTokens.of(tokenizer),
                                             seq_len, args.seed)
    n_rows = rows["input_ids"].shape[0]
    if args.max_windows is not None:
        n_rows = min(n_rows, args.max_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n_rows, args.batch_size):
            batch = {k: v[start: min(start + args.batch_size, n_rows)].to(device)
                     for k, v in rows.items()}
            out = model(**batch, num_items_in_batch=1)  # summed over the predicted tokens
            total += (out.mlm_loss if bert else out.loss).item()
            count += int((batch["labels"] != -100).sum())
    loss = total / count
    what = "masked-LM" if bert else "denoising"
    result = {"objective": what, "loss": loss, "perplexity": math.exp(loss), "tokens": count,
              "rows": n_rows, "seq_len": seq_len, "seed": args.seed}
    print(f"{what} loss {loss:.4f}  perplexity {math.exp(loss):.2f}  ({count} predicted tokens "
          f"in {n_rows} rows of {seq_len}, seed {args.seed})")
    _write_json(args.json, result)
    return 0


def run_finetuned(args: argparse.Namespace) -> int:
    """``fastllm eval`` of a ``fastllm finetune`` checkpoint (module docstring)."""
    import torch

    from fastllm.train import tasks
    from fastllm.train.data import DataError
    from fastllm.train.finetune import load_finetuned

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, meta = load_finetuned(args.model_dir, device)
    task, classes = meta["task"], meta.get("classes")
    seq_len = args.seq_len or meta["seq_len"]
    columns = meta.get("columns", {})
    try:
        if task == "classification":
            reader = tasks.classification_reader(
                columns.get("text", args.text_field), columns.get("text_pair", "text_pair"),
                columns.get("label", "label"))
        else:
            reader = tasks.READERS[task][0]
        examples = [e for path in args.data_dir
                    for e in tasks.read_all(path, reader, tasks.READERS[task][1])]
        if args.max_windows is not None:
            examples = examples[: args.max_windows]
        if task == "classification":
            tasks.class_names([], examples, classes)  # every label must be a known class
            rows = tasks.encode_classification(examples, tokenizer, classes, seq_len,
                                               token_types=meta["family"] == "bert")
        elif task == "causal-lm":
            rows = tasks.encode_causal_lm(examples, tokenizer, seq_len)
        else:
            base = model.net.get_base_model() if hasattr(model.net, "get_base_model") \
                else model.net
            eos = base.config.eos_token_id if base.config.eos_token_id is not None \
                else tokenizer.eos_token_id
            rows = tasks.encode_seq2seq(examples, tokenizer, seq_len, eos)
    except DataError as exc:
        raise UsageError(f"--data-dir: {exc}") from exc
    objective = tasks.OBJECTIVES[task](rows, rows, seq_len, 0, tokenizer.pad_token_id)
    batches = objective.eval_batches(args.batch_size)
    if task == "classification":
        preds, golds = tasks.predict(model, batches, device)
        result = tasks.classification_metrics(preds, golds, classes)
        print(f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
              f"({len(golds)} examples, {len(classes)} classes)")
        for name, c in result["per_class"].items():
            print(f"  {name:>20s}  precision {c['precision']:.3f}  recall {c['recall']:.3f}  "
                  f"F1 {c['f1']:.3f}  support {c['support']}")
    else:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                s, c = objective.eval_sums(model, {k: v.to(device) for k, v in batch.items()})
                total, count = total + s, count + c
        loss = total / max(count, 1)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count,
                  "examples": len(rows)}
        print(f"loss {loss:.4f}  perplexity {result['perplexity']:.2f}  ({count} predicted "
              f"tokens in {len(rows)} examples)")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return 0
