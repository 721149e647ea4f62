"""``fastllm pretrain``: train a language model from scratch, in one process or, under
``torchrun``, in several (``--distributed ddp|fsdp``, fastllm/train/distributed.py).

    fastllm pretrain [--arch gpt2|llama|bert|bart] [--config NAME] [--data-dir PATH ...]
                     [--output-dir DIR] [--steps N | --tokens N] [--batch-size B] [--seq-len T]
                     [--lr LR] [--warmup N] [--grad-accum N] [--seed S] [--bf16] [--compile]
                     [--grad-checkpointing] [--eval-every N] [--save-every N] [--resume [CKPT]]

With no arguments it trains a small GPT (``gpt-mini``, 3.3M parameters; 600 steps of 16 x 128
tokens, about two minutes on 2 idle CPU cores) on the default corpus (the text of CPython's
``pydoc_data`` topics, shipped with every Python) with a byte-level BPE of 2048 ids trained on
that corpus, and ends by printing a sampled continuation of held-out text. Everything it
writes is under ``--output-dir``: ``tokenizer.json``, ``metrics.jsonl``, ``loss_curve.png``
(with matplotlib) and ``checkpoints/step-NNNNNNN/`` (fastllm/train/checkpoint.py). Every bad
argument or input is reported before anything is written. ``--resume`` continues the newest
checkpoint (or the one named) bit-identically to an uninterrupted run with the same
arguments. Ctrl-C stops after the current step with a checkpoint.

``--arch bert`` pre-trains ``BertForPreTraining`` (default ``bert-mini``) with masked-LM +
next-sentence prediction on sentence pairs of the corpus (fastllm/train/mlm.py), and ends by
filling the masked tokens of a held-out sentence; ``--arch bart`` pre-trains an
``EncoderDecoder`` (default ``bart-mini``) to reconstruct text corrupted by sentence
permutation and text infilling (fastllm/train/denoising.py), and ends with the greedy
reconstruction of a corrupted held-out text. Both hold out whole documents (the last
``--val-fraction`` of them); their tokenizers carry the family's special tokens
(fastllm/train/data.py) and their checkpoints load in transformers as
``BertForPreTraining`` / ``BartForConditionalGeneration``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from fastllm.cli import UsageError

logger = logging.getLogger("fastllm.train")

ARCHS = ("gpt2", "llama", "bert", "bart")
DEFAULT_CONFIG = {"gpt2": "gpt-mini", "llama": "llama-tiny", "bert": "bert-mini",
                  "bart": "bart-mini"}
# --steps and --lr when not given (each default run takes a few minutes on 2 CPU cores)
DEFAULT_STEPS = {"gpt2": 600, "llama": 600, "bert": 600, "bart": 600}
DEFAULT_LR = {"gpt2": 2e-3, "llama": 2e-3, "bert": 1e-3, "bart": 1e-3}
DEFAULT_OUTPUT_DIR = "out/pretrain"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastllm pretrain`` to the command line."""
    p = subparsers.add_parser(
        "pretrain", help="train a language model from scratch",
        description="Train a language model from scratch (a causal LM; BERT with masked-LM "
        "+ next-sentence prediction; BART with denoising) on text files (or, by default, on "
        "the pydoc topics every Python ships), with a byte-level BPE tokenizer trained on the "
        "same text.",
    )
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHS, help="model family (default gpt2, or the "
                       "resumed checkpoint's): gpt2 and llama are causal LMs, bert trains "
                       "masked-LM + next-sentence prediction, bart denoising")
    model.add_argument("--config", metavar="NAME",
                       help="a name of the family's config table, e.g. gpt-nano, gpt-micro, "
                       "gpt-mini, gpt2 (GPTConfig.from_name), llama-tiny, smollm2-135m "
                       "(LlamaConfig.from_name), bert-tiny, bert-mini (BertConfig.from_name), "
                       "bart-tiny, bart-mini (EncoderDecoderConfig.from_name); default: "
                       + ", ".join(f"{v} for {k}" for k, v in DEFAULT_CONFIG.items()))
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", "--data_dir", dest="data_dir", action="append",
                      type=Path, metavar="PATH",
                      help="a text file, a folder of them or a JSONL file (repeatable; "
                      "default: the pydoc_data topics of this Python)")
    data.add_argument("--text-field", default="text",
                      help="the field of each JSONL line holding its text (default: text)")
    data.add_argument("--tokenizer", type=Path, metavar="PATH",
                      help="an existing tokenizer.json (or a folder with one) instead of "
                      "training a byte-level BPE on the data")
    data.add_argument("--vocab-size", type=int, default=2048,
                      help="vocabulary of the trained tokenizer (default 2048)")
    data.add_argument("--val-fraction", type=float, default=0.05,
                      help="the end of the token stream (bert, bart: the last documents) "
                      "held out for --eval-every (default 0.05)")
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", "--output_dir", "--model-dir", "--model_dir",
                     dest="output_dir", type=Path, default=Path(DEFAULT_OUTPUT_DIR),
                     metavar="DIR", help=f"where everything goes (default {DEFAULT_OUTPUT_DIR})")
    out.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                     help="continue the newest checkpoint of --output-dir, or checkpoint "
                     "folder CKPT")
    out.add_argument("--overwrite", action="store_true",
                     help="delete the checkpoints and metrics already in --output-dir")
    out.add_argument("--save-every", type=int, default=0, metavar="N",
                     help="a checkpoint every N steps (default 0: at the end and on Ctrl-C)")
    out.add_argument("--keep-last", type=int, default=2, metavar="K",
                     help="checkpoints kept (default 2)")
    out.add_argument("--eval-every", type=int, default=100, metavar="N",
                     help="held-out perplexity every N steps and at the end (0: at the end)")
    out.add_argument("--eval-batches", type=int, default=8, metavar="N",
                     help="micro-batches per evaluation (default 8)")
    out.add_argument("--sample-tokens", type=int, default=100, metavar="N",
                     help="length of the sample printed at the end (0: none; bert: any "
                     "N > 0 prints its masked-token predictions)")
    out.add_argument("--prompt", help="the sample's prompt (default: the start of the "
                     "held-out text; bert, bart: a text whose [MASK] / <mask> tokens are "
                     "filled, or which is masked / corrupted first when it has none)")
    train = p.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: "
                        + ", ".join(f"{v} for {k}" for k, v in DEFAULT_STEPS.items()) + ")")
    length.add_argument("--tokens", type=int,
                        help="training tokens, rounded up to whole steps")
    train.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch")
    train.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    train.add_argument("--lr", type=float, help="peak learning rate (default: "
                       + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    train.add_argument("--min-lr", type=float,
                       help="learning rate at the end of the cosine decay (default lr / 10)")
    train.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--grad-clip", type=float, default=1.0,
                       help="max gradient norm (0: off)")
    train.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    train.add_argument("--compile", action="store_true", help="train a torch.compile'd model")
    train.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute each layer's activations in backward")
    train.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    train.add_argument("--distributed", choices=("none", "ddp", "fsdp"),
                       help="under torchrun: DDP (the default when WORLD_SIZE > 1) or FSDP2; "
                       "--batch-size is then per process, the global batch batch-size x "
                       "grad-accum x processes (fastllm/train/distributed.py)")
    p.set_defaults(handler=run)


# ----- checks (all of them before anything is written) -------------------------------------

def _check_numbers(args) -> None:
    positive = ("steps", "tokens", "batch_size", "seq_len", "grad_accum", "keep_last",
                "eval_batches")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("save_every", "eval_every", "warmup", "sample_tokens", "weight_decay",
                 "grad_clip"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got "
                             f"{getattr(args, name)}")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2 (one token predicts the next), got "
                         f"{args.seq_len}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.min_lr is not None and not 0 <= args.min_lr <= (args.lr or math.inf):
        raise UsageError(f"--min-lr must be in [0, --lr], got {args.min_lr}")
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    from fastllm.train.data import SPECIAL_TOKENS, min_vocab_size, tokenizer_kind

    kind = tokenizer_kind(args.arch or "gpt2")
    if args.vocab_size < min_vocab_size(kind):
        raise UsageError(f"--vocab-size must be >= {min_vocab_size(kind)} (256 bytes + "
                         f"{' '.join(SPECIAL_TOKENS[kind])}), got {args.vocab_size}")


def _check_arch_seq_len(arch: str, seq_len: int) -> None:
    from fastllm.train import denoising, mlm

    least = {"bert": (mlm.MIN_SEQ_LEN, "[CLS] A [SEP] B [SEP]"),
             "bart": (denoising.MIN_SEQ_LEN, "<s> x </s>")}.get(arch)
    if least is not None and seq_len < least[0]:
        raise UsageError(f"--seq-len must be >= {least[0]} for --arch {arch} ({least[1]}), "
                         f"got {seq_len}")


def _model_family(arch: str):
    """(model class, config class) of ``arch``."""
    from fastllm.models import (GPT, BertConfig, BertForPreTraining, EncoderDecoder,
                                EncoderDecoderConfig, GPTConfig, Llama, LlamaConfig)

    return {"gpt2": (GPT, GPTConfig), "llama": (Llama, LlamaConfig),
            "bert": (BertForPreTraining, BertConfig),
            "bart": (EncoderDecoder, EncoderDecoderConfig)}[arch]


def _config_names(config_cls) -> dict:
    """The ``from_name`` table of ``config_cls`` (BertConfig keeps its own dict)."""
    from fastllm.models import BertConfig
    from fastllm.models.bert import BERT_CONFIGS

    return BERT_CONFIGS if config_cls is BertConfig else config_cls.names


def _special_ids(arch: str, tokenizer) -> dict:
    """The config fields that name the tokenizer's special tokens."""
    if arch == "bert":
        return {"pad_token_id": tokenizer.token_to_id("[PAD]")}
    if arch == "bart":
        eos = tokenizer.token_to_id("</s>")
        return {"pad_token_id": tokenizer.token_to_id("<pad>"),
                "bos_token_id": tokenizer.token_to_id("<s>"), "eos_token_id": eos,
                "decoder_start_token_id": eos}
    return {}


def _positions(config) -> int:
    """The longest sequence the model's position table holds."""
    from fastllm.models import GPTConfig

    if isinstance(config, GPTConfig):
        return config.block_size
    return config.max_position_embeddings


def _config_from_dict(config_cls, values: dict):
    import dataclasses

    return config_cls(**{f.name: values[f.name] for f in dataclasses.fields(config_cls)
                         if f.init and f.name in values})


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _data_fingerprint(stream) -> str:
    import hashlib

    if isinstance(stream, list):  # documents -> sentences -> ids (bert, bart)
        return hashlib.sha256(json.dumps(stream).encode()).hexdigest()[:16]
    return hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:16]


def _check_sentence_docs(arch: str, train_docs: list, held_docs: list,
                         val_fraction: float) -> None:
    """UsageError (naming --data-dir) when the documents cannot feed ``arch``'s objective."""
    from fastllm.train.data import DataError
    from fastllm.train.mlm import check_nsp_docs

    if arch == "bert":
        try:
            check_nsp_docs(train_docs, held_docs, val_fraction)
        except DataError as exc:
            raise UsageError(f"--data-dir: {exc}") from exc
    if not train_docs:
        n = len(held_docs)
        raise UsageError(f"--data-dir: the corpus has {n} document(s) with sentences: too few "
                         f"for --val-fraction {val_fraction}, which holds out whole documents "
                         f"for --arch {arch} (give more documents or --val-fraction 0)")


# ----- the command ---------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """``fastllm pretrain``'s handler; returns the exit status (0 done, 1 a non-finite loss,
    130 interrupted). Under torchrun it starts and ends the process group around the run."""
    from fastllm.train import distributed

    try:
        par = distributed.setup(args.distributed, args.device)
    except distributed.DistributedSetupError as exc:
        raise UsageError(str(exc)) from exc
    try:
        return _run(args, par)
    finally:
        distributed.teardown(par)


def _run(args: argparse.Namespace, par) -> int:
    """The run of one process (``par``: its place, fastllm/train/distributed.py)."""
    started = time.perf_counter()
    _check_numbers(args)
    try:
        import tokenizers  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"fastllm pretrain needs {exc.name}: pip install 'fastllm[train]'")
    import torch

    from fastllm.train import checkpoint as ckpt
    from fastllm.train import data, distributed
    from fastllm.train.loop import (METRICS_FILE, PLOT_FILE, NonFiniteLoss, TrainConfig,
                                    make_optimizer, train)
    from fastllm.train import denoising, mlm
    from fastllm.train.objectives import CausalLM

    output_dir: Path = args.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} exists and is not a folder")

    # what to resume, and the model config
    resume_from = resumed = None
    if args.resume is not None:
        where = output_dir if args.resume == "latest" else Path(args.resume)
        resume_from = ckpt.resolve_checkpoint(where)
        if resume_from is None:
            raise UsageError(f"--resume: no checkpoint in {where}")
        resumed = ckpt.load_checkpoint(resume_from)
        saved = resumed["trainer_state"]
        if args.arch not in (None, saved["arch"]) or args.config not in (None, saved["config_name"]):
            raise UsageError(f"--resume: {resume_from} holds a {saved['arch']} "
                             f"{saved['config_name']}, not --arch {args.arch} "
                             f"--config {args.config}")
        arch, config_name = saved["arch"], saved["config_name"]
        model_cls, config_cls = _model_family(arch)
        config = _config_from_dict(config_cls, saved["model_config"])
    else:
        if ckpt.list_checkpoints(output_dir) and not args.overwrite:
            raise UsageError(f"--output-dir {output_dir} already holds checkpoints: pass "
                             f"--resume to continue them, --overwrite to replace them, or "
                             f"another --output-dir")
        arch = args.arch or "gpt2"
        model_cls, config_cls = _model_family(arch)
        config_name = args.config or DEFAULT_CONFIG[arch]
        if config_name not in _config_names(config_cls):
            raise UsageError(f"--config {config_name!r} is not a {arch} config; known: "
                             f"{', '.join(sorted(_config_names(config_cls)))}")
        config = config_cls.from_name(config_name)
    _check_arch_seq_len(arch, args.seq_len)
    if args.seq_len > _positions(config):
        raise UsageError(f"--seq-len {args.seq_len} is more than {config_name}'s position "
                         f"table holds ({_positions(config)})")

    # the corpus and the tokenizer
    kind = data.tokenizer_kind(arch)
    try:
        docs = data.read_corpus(args.data_dir, args.text_field) if args.data_dir \
            else data.default_corpus()
    except data.DataError as exc:
        raise UsageError(f"--data-dir: {exc}") from exc
    n_chars = sum(len(d.text) for d in docs)
    if resume_from is not None:
        try:
            tokenizer = data.load_tokenizer(resume_from, kind)
        except data.DataError as exc:
            raise UsageError(f"--resume: {exc}") from exc
    elif args.tokenizer is not None:
        try:
            tokenizer = data.load_tokenizer(args.tokenizer, kind)
        except data.DataError as exc:
            raise UsageError(f"--tokenizer: {exc}") from exc
    else:
        t0 = time.perf_counter()
        tokenizer = data.train_tokenizer(docs, args.vocab_size, kind)
        logger.info("trained a byte-level BPE of %d ids on %d documents (%s characters) in "
                    "%.1f s", tokenizer.get_vocab_size(), len(docs), f"{n_chars:,}",
                    time.perf_counter() - t0)
    if kind == "causal":
        stream = data.token_stream(docs, tokenizer)
        try:
            train_stream, val_stream = data.split_stream(stream, args.val_fraction, args.seq_len)
        except data.DataError as exc:
            raise UsageError(f"--data-dir: {exc}") from exc
        fingerprint = _data_fingerprint(stream)
        n_train, n_held = train_stream.numel(), val_stream.numel()
    else:  # documents -> sentences -> ids, the last documents held out
        sentences = data.sentence_ids(docs, tokenizer)
        train_docs, held_docs = data.split_documents(sentences, args.val_fraction)
        _check_sentence_docs(arch, train_docs, held_docs, args.val_fraction)
        fingerprint = _data_fingerprint(sentences)
        n_train, n_held = (sum(len(s) for d in part for s in d) for part in (train_docs, held_docs))
    if resume_from is None:
        config = config_cls.from_name(config_name, vocab_size=tokenizer.get_vocab_size(),
                                      **_special_ids(arch, tokenizer))
    elif resumed["trainer_state"]["data_fingerprint"] != fingerprint:
        logger.warning("--resume: the data differs from the checkpoint's run: the continuation "
                       "will not repeat an uninterrupted run")

    steps = args.steps
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * par.world_size
    if steps is None:
        steps = math.ceil(args.tokens / tokens_per_step) if args.tokens else DEFAULT_STEPS[arch]
    lr = DEFAULT_LR[arch] if args.lr is None else args.lr
    if args.min_lr is not None and args.min_lr > lr:
        raise UsageError(f"--min-lr must be in [0, --lr {lr}], got {args.min_lr}")
    cfg = TrainConfig(
        steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, lr=lr,
        min_lr=lr / 10 if args.min_lr is None else args.min_lr, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        bf16=args.bf16, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, keep_last=args.keep_last, world_size=par.world_size,
    )
    start_step = start_tokens = 0
    if resumed is not None:
        saved = resumed["trainer_state"]
        start_step, start_tokens = saved["step"], saved["tokens"]
        changed = [k for k, v in saved["train_config"].items()
                   if k in ("steps", "batch_size", "seq_len", "grad_accum", "lr", "min_lr",
                            "warmup", "weight_decay", "grad_clip", "seed", "bf16")
                   and getattr(cfg, k) != v]
        if changed:
            logger.warning("--resume: %s differ from the checkpoint's run: the continuation "
                           "will not repeat an uninterrupted run", ", ".join(changed))
        if start_step >= cfg.steps:
            raise UsageError(f"--resume: {resume_from} is at step {start_step}, not before "
                             f"--steps {cfg.steps}")

    n_eval_rows = cfg.eval_batches * cfg.batch_size
    if kind == "causal":
        objective = CausalLM(train_stream, data.eval_windows(val_stream, cfg.seq_len, n_eval_rows),
                             cfg.seq_len, cfg.seed)
    elif arch == "bert":
        specials = {tokenizer.token_to_id(t) for t in data.special_tokens_of(tokenizer)}
        objective = mlm.MaskedLMNextSentence(train_docs, held_docs, mlm.BertTokens.of(tokenizer),
                                             cfg.seq_len, cfg.seed, n_eval_rows, specials)
    else:
        objective = denoising.Denoising(train_docs, held_docs, denoising.BartTokens.of(tokenizer),
                                        cfg.seq_len, cfg.seed, n_eval_rows)

    device = par.device
    torch.manual_seed(args.seed)
    model = model_cls(config)
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
    model.to(device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    trained = distributed.wrap(par, model)  # DDP's wrapper; FSDP shards model in place
    optimizer = make_optimizer(model, cfg)
    if resumed is not None:
        distributed.load_optimizer_state(par, model, optimizer, resumed["optimizer_state"])
        ckpt.set_rng_state(resumed["rng_state"])
    compiled = torch.compile(trained) if args.compile else None

    # from here on the output folder is written (by rank 0 only)
    if par.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite and resume_from is None:
            shutil.rmtree(output_dir / ckpt.CHECKPOINTS, ignore_errors=True)
            for name in (METRICS_FILE, PLOT_FILE):
                (output_dir / name).unlink(missing_ok=True)
        ckpt.remove_stale_temporaries(output_dir)
        data.save_tokenizer(tokenizer, output_dir)

    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s %s: %.2fM parameters, vocabulary %d; %s training / %s held-out tokens; "
                "%d steps of %d tokens%s", arch, config_name, n_params / 1e6,
                tokenizer.get_vocab_size(), f"{n_train:,}", f"{n_held:,}", cfg.steps, cfg.tokens_per_step,
                f", resuming at step {start_step}" if start_step else "")
    run_state = {"arch": arch, "config_name": config_name,
                 "model_config": dataclasses.asdict(config),
                 "data_fingerprint": fingerprint,
                 "args": {k: _jsonable(v) for k, v in vars(args).items() if k != "handler"}}
    try:
        result = train(model, optimizer, tokenizer, objective, cfg, output_dir,
                       start_step=start_step, start_tokens=start_tokens, run_state=run_state,
                       compiled=compiled, device=device, desc="pretrain",
                       distributed=par)
    except NonFiniteLoss as exc:
        logger.error("%s", exc)
        return 1
    if result.interrupted:
        return 130
    wall = time.perf_counter() - started
    held_out = ("" if result.eval_loss is None else
                f", held-out loss {result.eval_loss:.4f} (perplexity "
                f"{math.exp(min(result.eval_loss, 700)):.1f})")
    logger.info("done: %d steps, %s tokens in %.0f s; loss %.4f%s; checkpoint %s", result.step,
                f"{result.tokens:,}", wall, result.loss, held_out, result.checkpoint)
    sample_model = distributed.full_model(par, model) if args.sample_tokens else None
    if sample_model is not None:  # rank 0's (under FSDP gathered by all)
        sample_model = sample_model.to(device)
        if kind == "causal":
            _print_sample(sample_model, tokenizer, args,
                          val_stream if val_stream.numel() else train_stream, device)
        elif arch == "bert":
            _print_bert_sample(sample_model, tokenizer, args, held_docs or train_docs, device)
        else:
            _print_bart_sample(sample_model, tokenizer, args, held_docs or train_docs, device)
    return 0


def _print_sample(model, tokenizer, args, stream, device) -> None:
    """A top-k (40, temperature 0.8) continuation of ``--prompt`` or of the first 16 tokens
    of the first held-out document, drawn with a generator seeded by ``--seed``."""
    import torch

    from fastllm.train.data import EOS_TOKEN

    eos = tokenizer.token_to_id(EOS_TOKEN)
    if args.prompt is not None:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids or [eos]
    else:  # the start of the first held-out document (or of the held-out text)
        ends = (stream == eos).nonzero().flatten().tolist()
        start = ends[0] + 1 if ends and ends[0] + 1 < stream.numel() else 0
        prompt_ids = stream[start: start + 16].tolist()
    n_new = min(args.sample_tokens, _positions(model.config) - len(prompt_ids))
    if n_new <= 0:
        logger.warning("no sample: the prompt fills the position table")
        return
    model.eval()
    input_ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(input_ids, n_new, do_sample=True, top_k=40, temperature=0.8,
                         eos_token_id=eos, generator=torch.Generator(device).manual_seed(args.seed))
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    continuation = tokenizer.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=False)
    print(f"--- sample: prompt ---\n{prompt}\n--- continuation (top-k 40, temperature 0.8) "
          f"---\n{continuation}\n---", file=sys.stdout, flush=True)


def _first_sentences(sentences: list, budget: int) -> list:
    """The first ``sentences`` that fit in ``budget`` tokens (at least one, cut to it)."""
    out, used = [], 0
    for s in sentences:
        if out and used + len(s) > budget:
            break
        out.append(list(s[:budget]))
        used += len(out[-1])
    return out


def _sample_sentences(docs: list, budget: int) -> list:
    """Sentences of the first document from its first of 10 to ``budget`` tokens (headings
    are shorter; its first sentence when none is) that fit in ``budget`` tokens."""
    first = next((i for i, s in enumerate(docs[0]) if 10 <= len(s) <= budget), 0)
    return _first_sentences(docs[0][first:], budget)


def _print_bert_sample(model, tokenizer, args, docs: list, device) -> None:
    """The top-5 predictions of BERT at the [MASK]s of ``--prompt`` (or, when it has none,
    at 15 % of its tokens, at least two) or of the first held-out sentence, chosen with
    ``--seed``."""
    import random

    import torch

    from fastllm.train.mlm import BertTokens

    t = BertTokens.of(tokenizer)
    budget = min(args.seq_len, _positions(model.config)) - 2
    if args.prompt is not None:
        # a leading space, as every training sentence has (fastllm/train/data.py)
        ids = tokenizer.encode(" " + args.prompt.strip(), add_special_tokens=False).ids[:budget]
    else:
        ids = _sample_sentences(docs, min(budget, 48))[0]
    if not ids:
        logger.warning("no sample: the prompt has no tokens")
        return
    masked = [i for i, x in enumerate(ids) if x == t.mask]
    if not masked:
        n = min(len(ids), max(2, round(0.15 * len(ids))))
        masked = sorted(random.Random(args.seed).sample(range(len(ids)), n))
    original = list(ids)
    ids = [t.mask if i in masked else x for i, x in enumerate(ids)]
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([[t.cls, *ids, t.sep]], device=device))
    probs = out.prediction_logits[0, 1:-1].float().softmax(-1)  # (n, V)
    lines, filled = [], list(ids)
    for k, pos in enumerate(masked):
        top = probs[pos].topk(5)
        filled[pos] = int(top.indices[0])
        guesses = ", ".join(f"{tokenizer.decode([int(i)])!r} {float(p):.2f}"
                            for p, i in zip(top.values, top.indices))
        truth = "" if original[pos] == t.mask else \
            f" (true: {tokenizer.decode([original[pos]])!r})"
        lines.append(f"[MASK] {k + 1}{truth}: {guesses}")
    show = lambda x: tokenizer.decode(x, skip_special_tokens=False).strip()  # noqa: E731
    print(f"--- sample: masked text ---\n{show(ids)}\n--- top-5 predictions ---\n"
          + "\n".join(lines) + f"\n--- filled with the top predictions ---\n{show(filled)}\n---",
          file=sys.stdout, flush=True)


def _print_bart_sample(model, tokenizer, args, docs: list, device) -> None:
    """The greedy reconstruction (``EncoderDecoder.generate``) of ``--prompt`` (as given when
    it holds <mask> tokens, else corrupted first) or of the first held-out sentences, corrupted
    by sentence permutation and text infilling with ``--seed``."""
    import random

    import torch

    from fastllm.train.data import split_sentences
    from fastllm.train.denoising import BartTokens, Denoising

    t = BartTokens.of(tokenizer)
    limit = min(args.seq_len, _positions(model.config))
    noiser = Denoising([], [], t, limit, args.seed, 0)
    rng = random.Random(args.seed)
    if args.prompt is not None and "<mask>" in args.prompt:
        ids = tokenizer.encode(" " + args.prompt.strip(),
                               add_special_tokens=False).ids[: limit - 2]
        source, target = [t.bos, *ids, t.eos], None
    else:
        if args.prompt is not None:
            sentences = [tokenizer.encode(" " + s, add_special_tokens=False).ids
                         for s in split_sentences(args.prompt)]
            sentences = _first_sentences([s for s in sentences if s], limit - 2)
        else:
            sentences = _sample_sentences(docs, min(limit - 2, 64))
        if not sentences:
            logger.warning("no sample: the prompt has no sentence")
            return
        source, target = noiser.noise(rng, sentences)
    model.eval()
    n_new = min(args.sample_tokens, model.config.max_position_embeddings)
    out = model.generate(torch.tensor([source], device=device), n_new, eos_token_id=t.eos)
    show = lambda x: tokenizer.decode(x, skip_special_tokens=False).strip()  # noqa: E731
    text = (f"--- sample: corrupted text (sentence permutation + text infilling) ---\n"
            f"{show(source)}\n--- greedy reconstruction ---\n"
            f"{tokenizer.decode(out[0].tolist(), skip_special_tokens=True).strip()}\n")
    if target is not None:
        text += f"--- original ---\n{tokenizer.decode(target, skip_special_tokens=True).strip()}\n"
    print(text + "---", file=sys.stdout, flush=True)
