"""Fine-tuning tasks: their data, the default labelled set, their objectives and metrics.

Three tasks (``fastllm finetune --task``):

- ``classification``: CSV (``.csv``; ``.tsv`` tab-separated) or JSONL rows with a text column
  (``--text-column``, default ``text``), optionally a second text (``--text-pair-column``,
  used when the column exists; default ``text_pair``) and a label column (``--label-column``,
  default ``label``). The classes are the training labels in sorted order (or ``--labels``).
  Decoder-only models get a classification head here (:class:`DecoderForSequenceClassification`:
  the last real token's hidden state, as Hugging Face's ``GPT2ForSequenceClassification``);
  BERT has its own (``fastllm.models.BertForSequenceClassification``).
- ``causal-lm``: JSONL with ``{"instruction", "input"?, "output"}`` (also ``prompt`` /
  ``response``, or ``messages`` in the chat format) or ``{"text"}``. Instructions go through
  the tokenizer's chat template when it has one (else an Alpaca-style ``### Instruction`` /
  ``### Response`` layout), and only the response tokens are trained on; ``text`` rows are
  trained on every token.
- ``seq2seq``: TSV lines ``source<TAB>target``.

``--data-dir`` is one file (its last ``--val-fraction`` of rows, in a seeded order, is held out)
or a folder with ``train.*`` and optionally ``validation.*`` / ``valid.*`` / ``dev.*`` /
``test.*`` (the held-out rows). Every problem is a :class:`fastllm.train.data.DataError` naming
the file (and line).

The default labelled set (:func:`default_classification_set`) is described there.

Objectives follow fastllm/train/objectives.py: every step's rows are a function of
(seed, step) only (an epoch-wise permutation seeded by (seed, epoch)), padded on the right to
the longest row of the step.

Shapes: B rows, T tokens, C hidden size, K classes.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from fastllm.train.data import DataError, _read_text, jsonl_lines
from fastllm.train.objectives import Batch

TASKS = ("classification", "causal-lm", "seq2seq")
IGNORE_INDEX = -100
HELD_OUT_NAMES = ("validation", "valid", "dev", "test")


# ----- reading -------------------------------------------------------------------------------

@dataclass
class Example:
    """One row of any task: classification (text, text_pair, label), causal LM (prompt,
    response) or text (text only), seq2seq (text = source, response = target)."""

    source: str  # file:line, for error messages
    text: str = ""
    text_pair: Optional[str] = None
    label: Optional[str] = None
    prompt: Optional[str] = None
    response: Optional[str] = None
    messages: Optional[list] = None


def _split_files(path: Path, suffixes: Sequence[str]) -> tuple[Path, Optional[Path]]:
    """(training file, held-out file or None) of a data folder."""
    def find(stem: str) -> Optional[Path]:
        for suffix in suffixes:
            if (path / f"{stem}{suffix}").is_file():
                return path / f"{stem}{suffix}"
        return None

    train = find("train")
    if train is None:
        found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        raise DataError(f"{path} has no train file (expected train{' or train'.join(suffixes)}; "
                        f"found {found or 'nothing'})")
    held_out = next((f for f in map(find, HELD_OUT_NAMES) if f is not None), None)
    return train, held_out


def read_split(path: Path, reader, suffixes: Sequence[str], val_fraction: float,
               seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of a file or folder (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir():
        train_file, held_file = _split_files(path, suffixes)
        train = reader(train_file)
        held = reader(held_file) if held_file is not None else []
        if held_file is None and val_fraction > 0:
            train, held = _hold_out(train, val_fraction, seed)
    else:
        train, held = _hold_out(reader(path), val_fraction, seed)
    if not train:
        raise DataError(f"{path}: no training rows (the held-out split took them all)")
    return train, held


def read_all(path: Path, reader, suffixes: Sequence[str]) -> list[Example]:
    """Every example of a file, or of a folder's held-out file (its train file without one)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir():
        train_file, held_file = _split_files(path, suffixes)
        return reader(held_file or train_file)
    return reader(path)


def _hold_out(rows: list[Example], val_fraction: float, seed: int):
    if val_fraction == 0 or len(rows) < 2:
        return rows, []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = max(1, int(len(rows) * val_fraction))
    held = sorted(order[:n_held])
    keep = sorted(order[n_held:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) of each CSV / TSV row or JSONL line; DataError for an empty file."""
    text = _read_text(path).removeprefix("\ufeff")  # a spreadsheet's byte-order mark
    out = []
    if path.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv"
                                else ",")
        for number, row in enumerate(reader, start=2):
            out.append((f"{path}:{number}", row))
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty (no header row)")
    else:
        for number, record in jsonl_lines(path, text):
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is not a JSON object")
            out.append((f"{path}:{number}", record))
    if not out:
        raise DataError(f"{path} holds no rows")
    return out


def classification_reader(text_column: str = "text", text_pair_column: str = "text_pair",
                          label_column: str = "label"):
    """A reader of classification rows (CSV / TSV / JSONL) with these column names."""
    def read(path: Path) -> list[Example]:
        records = _records(path)
        columns = list(records[0][1])
        for needed, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if needed not in columns:
                raise DataError(f"{path} has no column {needed!r} ({flag}); its columns are "
                                f"{columns}")
        pair = text_pair_column in columns
        examples = []
        for where, r in records:
            text, label = r.get(text_column), r.get(label_column)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: empty or missing {text_column!r}")
            if label is None or (isinstance(label, str) and not label.strip()):
                raise DataError(f"{where}: empty or missing {label_column!r}")
            if isinstance(label, (dict, list)) or isinstance(label, float):
                raise DataError(f"{where}: label {label!r} is not a class name or integer")
            examples.append(Example(where, text=text, label=str(label),
                                    text_pair=r.get(text_pair_column) if pair else None))
        return examples
    return read


def causal_lm_reader(path: Path) -> list[Example]:
    """JSONL: ``instruction`` (+ ``input``) and ``output``; ``prompt`` and ``response``;
    ``messages`` (a chat, the last message the assistant's); or ``text``."""
    examples = []
    for where, r in _records(path):
        if isinstance(r.get("messages"), list) and r["messages"]:
            msgs = r["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                       and m.get("role") in ("system", "user", "assistant") for m in msgs):
                raise DataError(f"{where}: messages must be {{role, content}} objects")
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's")
            examples.append(Example(where, messages=msgs))
        elif isinstance(r.get("instruction"), str) or isinstance(r.get("prompt"), str):
            prompt = r.get("instruction", r.get("prompt"))
            response = r.get("output", r.get("response"))
            if not isinstance(response, str):
                raise DataError(f"{where}: an instruction row needs a string 'output' (or "
                                f"'response')")
            extra = r.get("input")
            if isinstance(extra, str) and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            examples.append(Example(where, prompt=prompt, response=response))
        elif isinstance(r.get("text"), str) and r["text"].strip():
            examples.append(Example(where, text=r["text"]))
        else:
            raise DataError(f"{where}: expected 'instruction' + 'output', 'prompt' + "
                            f"'response', 'messages' or 'text'; got keys {sorted(r)}")
    return examples


def seq2seq_reader(path: Path) -> list[Example]:
    """TSV: ``source<TAB>target`` per line (blank lines skipped)."""
    examples = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(f"{path} line {number}: expected 'source<TAB>target', got "
                            f"{len(fields)} tab-separated field(s)")
        examples.append(Example(f"{path}:{number}", text=fields[0], response=fields[1]))
    if not examples:
        raise DataError(f"{path} holds no rows")
    return examples


READERS = {"classification": (None, (".csv", ".tsv", ".jsonl")),
           "causal-lm": (causal_lm_reader, (".jsonl",)),
           "seq2seq": (seq2seq_reader, (".tsv",))}


def class_names(train: list[Example], held: list[Example],
                labels: Optional[Sequence[str]]) -> list[str]:
    """The classes: ``labels`` when given, else the sorted training labels (numerically when
    they are all integers); DataError naming a row whose label is not one of them."""
    if labels is None:
        found = {e.label for e in train}
        numeric = all(x.lstrip("-").isdigit() for x in found)
        labels = sorted(found, key=int if numeric else str)
    known = set(labels)
    for e in (*train, *held):
        if e.label not in known:
            raise DataError(f"{e.source}: label {e.label!r} is not one of the classes "
                            f"{list(labels)}")
    if len(labels) < 2:
        raise DataError(f"classification needs at least 2 classes, got {list(labels)}")
    return list(labels)


# ----- the default labelled set ------------------------------------------------------------

# module family -> the standard-library modules whose docstrings it holds
DEFAULT_FAMILIES: dict[str, tuple[str, ...]] = {
    "concurrency": ("threading", "queue", "sched", "subprocess", "signal", "selectors",
                    "multiprocessing.pool", "multiprocessing.managers",
                    "multiprocessing.process", "multiprocessing.queues",
                    "multiprocessing.synchronize", "multiprocessing.connection",
                    "asyncio.tasks", "asyncio.events", "asyncio.queues", "asyncio.locks",
                    "asyncio.streams", "asyncio.base_events", "asyncio.futures",
                    "asyncio.subprocess", "asyncio.transports", "asyncio.protocols",
                    "concurrent.futures._base", "concurrent.futures.thread",
                    "concurrent.futures.process"),
    "files": ("os", "posixpath", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "io",
              "zipfile", "tarfile", "filecmp", "stat", "fileinput", "gzip", "bz2", "lzma"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookiejar",
                "http.cookies", "urllib.request", "urllib.parse", "email.message",
                "email.utils", "smtplib", "ftplib", "imaplib", "poplib", "ipaddress",
                "socketserver", "xmlrpc.client", "xmlrpc.server", "mimetypes"),
    "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers",
                "operator"),
    "text": ("string", "re", "textwrap", "difflib", "codecs", "unicodedata", "html",
             "html.parser", "gettext", "locale", "shlex", "stringprep"),
}
DEFAULT_PER_CLASS = 200  # at most this many docstrings per family (balance)
DEFAULT_HELD_OUT = 5  # one in 5 docstrings (by a hash of its qualified name) is held out
MIN_DOC_CHARS = 40
MAX_DOC_CHARS = 1000


def _docstrings(module_name: str) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the public classes and functions a standard
    module defines, and of their public methods (and ``__init__``)."""
    import importlib
    import inspect

    module = importlib.import_module(module_name)
    leaf = module_name.rsplit(".", 1)[-1]
    out = []

    def add(qual: str, obj) -> None:
        if isinstance(getattr(obj, "__doc__", None), str):
            doc = inspect.cleandoc(obj.__doc__)
            if doc:
                out.append((qual, doc))

    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        owner = getattr(obj, "__module__", None) or ""
        if not (owner.startswith(module_name) or owner in (f"_{leaf}", module_name.split(".")[0])):
            continue  # imported from elsewhere
        add(f"{module_name}.{name}", obj)
        if inspect.isclass(obj):
            for attr, value in sorted(vars(obj).items()):
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if callable(value) or isinstance(value, property):
                    add(f"{module_name}.{name}.{attr}", value)
    return out


@functools.lru_cache(maxsize=1)
def default_classification_set() -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[str, ...]]:
    """(train, held-out, classes): docstrings of the Python standard library labelled by the
    family of modules they come from: ``concurrency`` (threading, asyncio, multiprocessing,
    subprocess, ...), ``files`` (os, pathlib, shutil, io, zipfile, ...), ``network`` (socket,
    ssl, http, urllib, email, ...), ``numbers`` (math, decimal, fractions, statistics,
    random, ...) and ``text`` (re, string, textwrap, difflib, codecs, ...); the module lists
    are :data:`DEFAULT_FAMILIES`.

    Why it is a fair task: the text ships with every Python (nothing is downloaded) and is
    ordinary technical English; the label is a property of where the text lives, not of a
    marker inside it (qualified names are not part of the text). It is learnable (vocabulary
    like "socket", "thread", "path", "radians" points to a family) but not trivial: many
    docstrings are generic ("Return the value of the attribute...", "Close the file..."
    exists for sockets, files and archives alike), and the held-out docstrings are
    different objects, so it cannot be solved by memorising.

    Construction (deterministic for a given Python build): public classes / functions /
    methods the module defines; docstrings of at least 40 characters (cut at 1000);
    docstrings that occur in two families are dropped, duplicates within a family kept once;
    at most 200 per family, the first by SHA-1 of the qualified name; held out: those whose
    SHA-1 is 0 modulo 5 (about 20 %). On CPython 3.11 / Linux: 965 examples, 165 text and
    200 in each other family (majority-class rate 20.7 %).
    """
    families: dict[str, set[str]] = {}
    found: dict[str, list[tuple[str, str]]] = {}
    for family, modules in DEFAULT_FAMILIES.items():
        for module_name in modules:
            for qual, doc in _docstrings(module_name):
                if len(doc) < MIN_DOC_CHARS:
                    continue
                families.setdefault(doc, set()).add(family)
                found.setdefault(family, []).append((qual, doc))
    train, held = [], []
    for family in sorted(found):
        seen: set[str] = set()
        rows = []
        for qual, doc in found[family]:
            if len(families[doc]) > 1 or doc in seen:
                continue
            seen.add(doc)
            rows.append((hashlib.sha1(qual.encode()).hexdigest(), qual, doc))
        for digest, qual, doc in sorted(rows)[:DEFAULT_PER_CLASS]:
            example = Example(f"default set: {qual}", text=doc[:MAX_DOC_CHARS], label=family)
            (held if int(digest, 16) % DEFAULT_HELD_OUT == 0 else train).append(example)
    return tuple(train), tuple(held), tuple(sorted(found))


# ----- encoding ----------------------------------------------------------------------------

def encode_classification(examples: Sequence[Example], tokenizer, classes: Sequence[str],
                          seq_len: int, token_types: bool) -> list[dict[str, Any]]:
    """Rows ``{input_ids, attention_mask, [token_type_ids], labels}`` (lists; labels an int)."""
    index = {c: i for i, c in enumerate(classes)}
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    rows = []
    for e, text, pair in zip(examples, texts, pairs):
        enc = tokenizer(text, pair, truncation=True, max_length=seq_len)
        row = {"input_ids": list(enc["input_ids"]),
               "attention_mask": [1] * len(enc["input_ids"]), "labels": index[e.label]}
        if token_types:
            row["token_type_ids"] = list(enc.get("token_type_ids") or [0] * len(row["input_ids"]))
        rows.append(row)
    return rows


def _plain_prompt(prompt: str) -> str:
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def encode_causal_lm(examples: Sequence[Example], tokenizer, seq_len: int) -> list[dict]:
    """Rows ``{input_ids, attention_mask, labels}``: prompt tokens labelled -100 (not
    trained on), response (or text) tokens labelled with themselves; the model shifts."""
    eos = tokenizer.eos_token or ""
    template = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for e in examples:
        if e.messages is not None or e.prompt is not None:
            messages = e.messages or [{"role": "user", "content": e.prompt},
                                      {"role": "assistant", "content": e.response}]
            if template:
                prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                                            add_generation_prompt=True)
                full_text = tokenizer.apply_chat_template(messages, tokenize=False)
            else:
                prompt_text = _plain_prompt("\n\n".join(m["content"] for m in messages[:-1]))
                full_text = prompt_text + messages[-1]["content"] + eos
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
            n_prompt = len(prompt_ids) if ids[:len(prompt_ids)] == prompt_ids else 0
        else:
            ids = tokenizer(e.text + eos, add_special_tokens=False)["input_ids"]
            n_prompt = 0
        ids = ids[:seq_len]
        labels = [IGNORE_INDEX] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if sum(x != IGNORE_INDEX for x in labels[1:]) == 0:
            raise DataError(f"{e.source}: no response token fits in --seq-len {seq_len} (the "
                            f"prompt has {n_prompt} tokens)")
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def encode_seq2seq(examples: Sequence[Example], tokenizer, seq_len: int,
                   eos_token_id: int) -> list[dict]:
    """Rows ``{input_ids, attention_mask, labels}``: the source with the tokenizer's special
    tokens, the target ids followed by ``eos_token_id``."""
    rows = []
    for e in examples:
        src = tokenizer(e.text, truncation=True, max_length=seq_len)["input_ids"]
        tgt = tokenizer(e.response, add_special_tokens=False)["input_ids"][: seq_len - 1]
        rows.append({"input_ids": list(src), "attention_mask": [1] * len(src),
                     "labels": list(tgt) + [eos_token_id]})
    return rows


# ----- objectives --------------------------------------------------------------------------

def pad_rows(rows: Sequence[dict], pad_id: int) -> Batch:
    """Right-pads the rows' lists to the longest: input_ids with ``pad_id``, masks and token
    types with 0, token labels with -100; integer labels become a (B,) tensor."""
    T = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list] = {}
    for key in rows[0]:
        if key == "labels" and isinstance(rows[0]["labels"], int):
            out[key] = [r[key] for r in rows]
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        width = max(len(r[key]) for r in rows) if key == "labels" else T
        out[key] = [r[key] + [fill] * (width - len(r[key])) for r in rows]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


class RowsObjective:
    """An Objective (fastllm/train/objectives.py) over pre-encoded rows: step ``s`` takes
    rows ``s * n .. (s + 1) * n - 1`` of the sequence of epoch-wise permutations (epoch ``e``
    shuffled by a generator seeded with (seed, e)), so every row is seen once per epoch and a
    step's rows depend on (seed, step) only."""

    def __init__(self, train_rows: list[dict], eval_rows: list[dict], seq_len: int, seed: int,
                 pad_id: int):
        if not train_rows:
            raise DataError("no training rows")
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.tokens_per_row = seq_len
        self.seed, self.pad_id = seed, pad_id

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
        return torch.randperm(len(self.train_rows), generator=g).tolist()

    def step_batch(self, step: int, n_rows: int) -> Batch:
        N = len(self.train_rows)
        picks = []
        for position in range(step * n_rows, (step + 1) * n_rows):
            picks.append(self.train_rows[self._permutation(position // N)[position % N]])
        return pad_rows(picks, self.pad_id)

    def eval_batches(self, batch_size: int) -> list[Batch]:
        return [pad_rows(self.eval_rows[i: i + batch_size], self.pad_id)
                for i in range(0, len(self.eval_rows), batch_size)]


class ClassificationObjective(RowsObjective):
    """Cross-entropy of the class logits; normalised by the step's rows."""

    def normalisers(self, batch: Batch) -> dict[str, int]:
        return {"num_items_in_batch": int(batch["input_ids"].shape[0])}

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> tuple[float, int]:
        loss = model(**batch, num_items_in_batch=1).loss
        return loss.item(), int(batch["input_ids"].shape[0])


class CausalLMObjective(RowsObjective):
    """Next-token cross-entropy on the labelled (response) tokens."""

    def normalisers(self, batch: Batch) -> dict[str, int]:
        return {"num_items_in_batch": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> tuple[float, int]:
        loss = model(**batch, num_items_in_batch=1).loss
        return loss.item(), self.normalisers(batch)["num_items_in_batch"]


class Seq2SeqObjective(RowsObjective):
    """Cross-entropy of the target tokens (the model shifts them into decoder inputs)."""

    def normalisers(self, batch: Batch) -> dict[str, int]:
        return {"num_items_in_batch": int((batch["labels"] != IGNORE_INDEX).sum())}

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> tuple[float, int]:
        loss = model(**batch, num_items_in_batch=1).loss
        return loss.item(), self.normalisers(batch)["num_items_in_batch"]


OBJECTIVES = {"classification": ClassificationObjective, "causal-lm": CausalLMObjective,
              "seq2seq": Seq2SeqObjective}


# ----- a classification head for decoder-only models -----------------------------------------

@dataclass
class ClassifierOutput:
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None  # (B, K)


def decoder_hidden_states(model: torch.nn.Module, input_ids: Tensor,
                          attention_mask: Optional[Tensor]) -> Tensor:
    """The final hidden states (B, T, C) of a fastllm GPT or Llama, without its LM head."""
    from fastllm.models import GPT
    from fastllm.models.config import check_input_ids

    key_padding_mask = None if attention_mask is None else attention_mask.bool()  # (B, T)
    if isinstance(model, GPT):
        t = model.transformer
        check_input_ids("GPT", input_ids, model.config.block_size, positions_name="block_size",
                        vocab_size=model.config.vocab_size)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = t.drop(t.wte(input_ids) + t.wpe(positions))  # (B, T, C)
        for block in t.h:
            x = block(x, key_padding_mask)
        return t.ln_f(x)
    m = model.model
    check_input_ids("Llama", input_ids, vocab_size=model.config.vocab_size)
    x = m.embed_tokens(input_ids)  # (B, T, C)
    for layer in m.layers:
        x = layer(x, m.rotary_emb, None, key_padding_mask)
    return m.norm(x)


class DecoderForSequenceClassification(torch.nn.Module):
    """A fastllm GPT / Llama with a linear head ``score`` (no bias) on the hidden state of each
    row's last real token (the last 1 of ``attention_mask``; right padding), as Hugging Face's
    ``GPT2ForSequenceClassification`` / ``LlamaForSequenceClassification`` pool it (they find
    the last token that is not ``pad_token_id``: the same with right padding). ``labels`` (B,)
    class indices give the cross-entropy, ``sum / num_items_in_batch`` when that is given."""

    def __init__(self, base: torch.nn.Module, num_labels: int):
        super().__init__()
        self.base = base
        self.config = base.config
        self.num_labels = num_labels
        hidden = getattr(base.config, "n_embd", None) or base.config.hidden_size
        self.score = torch.nn.Linear(hidden, num_labels, bias=False)
        torch.nn.init.normal_(self.score.weight, 0.0, base.config.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None,
                num_items_in_batch: Optional[int] = None) -> ClassifierOutput:
        from fastllm.functional import cross_entropy

        x = decoder_hidden_states(self.base, input_ids, attention_mask)  # (B, T, C)
        B, T = input_ids.shape
        last = (attention_mask.long().sum(1) - 1 if attention_mask is not None
                else torch.full((B,), T - 1, device=x.device))  # (B,)
        logits = self.score(x[torch.arange(B, device=x.device), last.clamp(min=0)])  # (B, K)
        loss = None
        if labels is not None:
            total = cross_entropy(logits.float(), labels, reduction="sum")
            loss = total / (num_items_in_batch if num_items_in_batch is not None else B)
        return ClassifierOutput(loss=loss, logits=logits)


# ----- metrics -----------------------------------------------------------------------------

def classification_metrics(predictions: Sequence[int], golds: Sequence[int],
                           classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision / recall / F1 / support.

    Macro-F1 is the mean F1 over the classes that occur among the gold labels or the
    predictions (scikit-learn's default set of labels); a class's F1 is
    ``2 * tp / (2 * tp + fp + fn)`` (0 when it is never predicted correctly)."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"classification_metrics: {len(predictions)} predictions for "
                         f"{len(golds)} labels")
    per_class = {}
    f1s = []
    for k, name in enumerate(classes):
        tp = sum(p == k and g == k for p, g in zip(predictions, golds))
        fp = sum(p == k and g != k for p, g in zip(predictions, golds))
        fn = sum(p != k and g == k for p, g in zip(predictions, golds))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        per_class[name] = {"precision": tp / (tp + fp) if tp + fp else 0.0,
                           "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": f1,
                           "support": tp + fn}
        if tp + fp + fn:
            f1s.append(f1)
    correct = sum(p == g for p, g in zip(predictions, golds))
    return {"accuracy": correct / len(golds), "macro_f1": sum(f1s) / len(f1s),
            "examples": len(golds), "per_class": per_class}


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Sequence[Batch], device) -> tuple[list, list]:
    """(predicted class, gold class) of every row of ``batches``."""
    was_training = model.training
    model.eval()
    preds, golds = [], []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        preds += model(**inputs).logits.argmax(-1).tolist()
        golds += batch["labels"].tolist()
    model.train(was_training)
    return preds, golds
