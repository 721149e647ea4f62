"""Pre-training data: the corpus, its byte-level BPE tokenizer, the token stream and batches.

- Corpus: text files, folders of them (walked in sorted order, hidden entries skipped) or
  JSONL files (``*.jsonl``) with a text field; or, with no path, the embedded default corpus:
  the topic texts of CPython's ``pydoc_data`` (~0.5 MB, in every Python, nothing downloaded).
  Every problem (missing path, no text, a non-UTF-8 or unreadable file, a bad JSONL line) is a
  :class:`DataError` naming the file, raised before anything is written anywhere.
- Tokenizer: a byte-level BPE trained on the corpus with Hugging Face ``tokenizers`` (GPT-2's
  pre-tokenizer and decoder, one special token ``<|endoftext|>`` that ends each document), or
  an existing ``tokenizer.json``. For BERT its specials are ``[PAD] [CLS] [SEP] [MASK]`` and
  for BART ``<s> <pad> </s> <mask>`` (ids 0-3, in that order, with a post-processor adding
  ``[CLS] A [SEP] B [SEP]`` / ``<s> A </s></s> B </s>`` as Hugging Face's tokenizers do).
- Token stream: every document's ids followed by the end-of-text id, concatenated into one
  flat int64 tensor; the last ``val_fraction`` of it is the held-out split.
- Sentences (BERT's and BART's objectives, fastllm/train/mlm.py and denoising.py): each
  document cut into paragraphs at blank lines and paragraphs into sentences after ``.``, ``!``
  or ``?``, whitespace runs made single spaces, fragments without a letter or digit dropped;
  each sentence tokenized with a leading space, so sentences concatenate into text. Held-out
  documents are the last ``val_fraction`` of them.
- Batches: ``seq_len``-token windows at offsets drawn from a ``torch.Generator`` seeded by
  (seed, step) alone, so the batches of step ``s`` are the same in an uninterrupted run and in
  one resumed at any step before ``s``.

Shapes: N tokens in a stream, B batch, T = seq_len.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 257  # the 256 byte symbols + <|endoftext|>
# The special tokens of each family's tokenizer (ids 0, 1, ... in this order) and the
# tokenizer_config.json role of each (what transformers' AutoTokenizer reads).
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "causal": (EOS_TOKEN,),
    "bert": ("[PAD]", "[CLS]", "[SEP]", "[MASK]"),
    "bart": ("<s>", "<pad>", "</s>", "<mask>"),
}
_TOKEN_ROLES: dict[str, dict] = {
    "causal": {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN},
    "bert": {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
             "mask_token": "[MASK]",
             "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]},
    "bart": {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
             "pad_token": "<pad>", "mask_token": "<mask>"},
}


def tokenizer_kind(arch: str) -> str:
    """The tokenizer family of a ``fastllm pretrain --arch``: causal (gpt2, llama), bert, bart."""
    return arch if arch in ("bert", "bart") else "causal"


def min_vocab_size(kind: str) -> int:
    """256 byte symbols + the family's special tokens."""
    return 256 + len(SPECIAL_TOKENS[kind])


class DataError(ValueError):
    """The corpus or tokenizer cannot be used; the message names the file and the problem."""


@dataclass
class Document:
    source: str  # the file (and JSONL line) or default-corpus topic it came from
    text: str


# ----- corpus ------------------------------------------------------------------------------

def default_corpus() -> list[Document]:
    """The topic texts of CPython's ``pydoc_data`` (the help() pages on Python's syntax and
    semantics), sorted by topic: ~0.5 MB of English with code, shipped with every Python."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc_data.topics[{name!r}]", topics[name]) for name in sorted(topics)]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start})") from exc


def jsonl_lines(path: Path, text: str):
    """(line number, parsed value) of each non-blank line of the JSONL ``text`` read from
    ``path``; DataError naming the line for invalid JSON."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON: {exc.msg}") from exc


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    docs = []
    for number, record in jsonl_lines(path, _read_text(path)):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path} line {number} has no string field {text_field!r}")
        docs.append(Document(f"{path}:{number}", record[text_field]))
    return docs


def _files_under(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def read_corpus(paths: Sequence[os.PathLike], text_field: str = "text") -> list[Document]:
    """The documents of ``paths`` (files or folders, in the given order; a folder's files in
    sorted order): a ``*.jsonl`` file gives one document per line (its ``text_field``), any
    other file one document. Raises DataError for a missing path, an unreadable or non-UTF-8
    file, a bad JSONL line, or a corpus without any non-blank text."""
    docs: list[Document] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p} does not exist")
        files = _files_under(p) if p.is_dir() else [p]
        if not files:
            raise DataError(f"{p} holds no files")
        for f in files:
            if f.suffix == ".jsonl":
                docs += _read_jsonl(f, text_field)
            else:
                docs.append(Document(str(f), _read_text(f)))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"{', '.join(map(str, paths))}: no text (every file is empty)")
    return docs


# ----- tokenizer ---------------------------------------------------------------------------

def train_tokenizer(docs: Sequence[Document], vocab_size: int, kind: str = "causal"):
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` ids (fewer if the corpus
    has fewer merges) trained on ``docs``; ids 0, 1, ... are ``SPECIAL_TOKENS[kind]``
    (causal: ``<|endoftext|>`` alone; bert and bart also get the post-processor that wraps
    one or two texts in the family's specials). Deterministic: the same documents give the
    same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SPECIAL_TOKENS[kind]
    if vocab_size < min_vocab_size(kind):
        raise DataError(f"vocab_size must be at least {min_vocab_size(kind)} (256 bytes + "
                        f"{' '.join(specials)}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator((d.text for d in docs), trainer, length=len(docs))
    if kind != "causal":
        tokenizer.post_processor = _template(tokenizer, kind)
    return tokenizer


def _template(tokenizer, kind: str):
    """BERT's ``[CLS] A [SEP] (B [SEP])`` (B with token type 1) or BART's
    ``<s> A </s> (</s> B </s>)``, what ``tokenizer(text[, pair])`` adds in transformers."""
    from tokenizers.processors import TemplateProcessing

    if kind == "bert":
        single, pair, used = "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ("[CLS]", "[SEP]")
    else:
        single, pair, used = "<s> $A </s>", "<s> $A </s> </s> $B </s>", ("<s>", "</s>")
    return TemplateProcessing(single=single, pair=pair,
                              special_tokens=[(t, tokenizer.token_to_id(t)) for t in used])


def special_tokens_of(tokenizer) -> set[str]:
    """The contents of the tokenizer's special added tokens."""
    return {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}


def tokenizer_family(tokenizer) -> Optional[str]:
    """bert or bart when the tokenizer holds all of that family's special tokens, causal when
    it holds ``<|endoftext|>``, else None."""
    specials = special_tokens_of(tokenizer)
    for kind in ("bert", "bart", "causal"):
        if set(SPECIAL_TOKENS[kind]) <= specials:
            return kind
    return None


def load_tokenizer(path: os.PathLike, kind: Optional[str] = None):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a folder holding one. It
    must know the special tokens of ``kind`` (causal: ``<|endoftext|>``, the document
    separator; bert, bart: ``SPECIAL_TOKENS``), or with ``kind`` None those of one family."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{path}: no tokenizer file (expected a {TOKENIZER_FILE} or a folder "
                        f"holding one)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise DataError(f"{file} is not a Hugging Face tokenizers file: {exc}") from exc
    if kind in (None, "causal") and tokenizer.token_to_id(EOS_TOKEN) is not None:
        return tokenizer
    if kind is None and tokenizer_family(tokenizer) is not None:
        return tokenizer
    if kind in (None, "causal"):
        raise DataError(f"{file} has no {EOS_TOKEN} token (the document separator)")
    missing = [t for t in SPECIAL_TOKENS[kind] if t not in special_tokens_of(tokenizer)]
    if missing:
        raise DataError(f"{file} lacks the special tokens {kind} needs: {' '.join(missing)} "
                        f"(expected {' '.join(SPECIAL_TOKENS[kind])})")
    return tokenizer


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``tokenizer.json`` plus the ``tokenizer_config.json`` with which transformers'
    ``AutoTokenizer.from_pretrained(directory)`` loads it with the family's special tokens
    (causal: bos / eos / unk ``<|endoftext|>``; bert: cls / sep / mask / pad; bart: bos /
    eos / pad / mask), each written by a rename."""
    kind = tokenizer_family(tokenizer) or "causal"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **_TOKEN_ROLES[kind],
              "model_max_length": 1 << 30}
    _write_atomic(directory / TOKENIZER_FILE, tokenizer.to_str(pretty=False))
    _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----- sentences (BERT / BART) ----------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: paragraphs (split at blank lines) split after ``.``, ``!``
    or ``?`` followed by whitespace, whitespace runs made single spaces; fragments without a
    letter or digit (rules such as ``*****``) are dropped."""
    out = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = " ".join(paragraph.split())
        out += [s for s in _SENTENCE_END.split(paragraph) if any(c.isalnum() for c in s)]
    return out


def sentence_ids(docs: Sequence[Document], tokenizer) -> list[list[list[int]]]:
    """Each document's sentences as token ids (each encoded with a leading space, without
    special tokens); documents without a sentence are left out."""
    per_doc = [split_sentences(d.text) for d in docs]
    flat = [" " + s for sentences in per_doc for s in sentences]
    encoded = iter(tokenizer.encode_batch(flat, add_special_tokens=False))
    out = [[next(encoded).ids for _ in sentences] for sentences in per_doc]
    return [[s for s in doc if s] for doc in out if any(doc)]


def split_documents(items: list, val_fraction: float) -> tuple[list, list]:
    """(train, held out): the held-out part is the last ``val_fraction`` of the documents, at
    least one (none when ``val_fraction`` is 0)."""
    n_val = 0 if val_fraction == 0 else max(int(len(items) * val_fraction), 1)
    return items[: len(items) - n_val], items[len(items) - n_val:]


def step_rng(seed: int, step: int):
    """The ``random.Random`` of step ``step``'s rows (BERT, BART): a function of (seed, step)."""
    import random

    return random.Random((seed * 1_000_003 + step) % (1 << 63))


# ----- token stream and batches --------------------------------------------------------------

def token_stream(docs: Sequence[Document], tokenizer) -> Tensor:
    """(N,) int64: each document's ids followed by the ``<|endoftext|>`` id."""
    import numpy as np

    eos = np.array([tokenizer.token_to_id(EOS_TOKEN)], dtype=np.int64)
    parts = []
    for encoding in tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False):
        parts += [np.asarray(encoding.ids, dtype=np.int64), eos]
    return torch.from_numpy(np.concatenate(parts))


def split_stream(stream: Tensor, val_fraction: float, seq_len: int) -> tuple[Tensor, Tensor]:
    """(train, val): the held-out split is the last ``val_fraction`` of the stream, at least
    one window of ``seq_len`` tokens (none when ``val_fraction`` is 0). DataError when either
    part is shorter than ``seq_len``."""
    n = stream.numel()
    n_val = 0 if val_fraction == 0 else max(int(n * val_fraction), seq_len)
    train, val = stream[: n - n_val], stream[n - n_val:]
    if train.numel() < seq_len:
        need = seq_len + n_val if val_fraction else seq_len
        raise DataError(f"the corpus has {n} tokens: too few for --seq-len {seq_len} "
                        f"(at least {need} needed, the held-out split included)")
    return train, val


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s batch offsets: a function of (seed, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 63))


def get_batch(stream: Tensor, n_rows: int, seq_len: int, seed: int, step: int) -> Tensor:
    """(n_rows, seq_len) windows of ``stream`` at uniform random offsets for step ``step``."""
    high = stream.numel() - seq_len + 1
    offsets = torch.randint(high, (n_rows,), generator=batch_generator(seed, step))  # (n_rows,)
    return torch.stack([stream[o: o + seq_len] for o in offsets.tolist()])


def eval_windows(val: Tensor, seq_len: int, max_rows: Optional[int]) -> Tensor:
    """(R, seq_len): the held-out stream cut into consecutive windows, at most ``max_rows``."""
    n = val.numel() // seq_len
    if max_rows is not None:
        n = min(n, max_rows)
    return val[: n * seq_len].view(n, seq_len)
