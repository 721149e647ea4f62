"""``fastllm generate``: stream a continuation of a prompt from a causal LM (GPT-2, LLaMA).

    fastllm generate --model-dir SRC --prompt TEXT [--max-new-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S] [--chat] [--device DEVICE]

``--model-dir`` is a checkpoint folder, a pretrain output folder (its newest checkpoint is
used), a Hugging Face model folder or a ``.gguf`` file (with transformers' tokenizer; ``--chat``
wraps the prompt as a user message in its chat template). The prompt is printed, then each new token as soon as it is decoded
(``model.generate_stream``); generation stops at the end-of-text token or after
``--max-new-tokens``. ``--temperature 0`` decodes greedily; otherwise tokens are sampled
(temperature, then top-k, then top-p) from a generator seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastllm.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastllm generate`` to the command line."""
    p = subparsers.add_parser(
        "generate", help="stream text from a fastllm pretrain checkpoint",
        description="Continue a prompt with a model trained by fastllm pretrain, printing "
        "the tokens as they come.",
    )
    p.add_argument("--model-dir", "--model_dir", "--output-dir", "--output_dir",
                   dest="model_dir", type=Path, required=True, metavar="SRC",
                   help="a checkpoint folder, a pretrain output folder (newest checkpoint), a "
                   "Hugging Face model folder or a .gguf file")
    p.add_argument("--prompt", default="", help="the text to continue (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (0: greedy; default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the K most likely "
                   "tokens (0: all; default 40)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in "
                   "the tokenizer's chat template (Hugging Face / GGUF models that have one)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.set_defaults(handler=run)


def load_model_dir(model_dir: Path, device):
    """(model in eval mode, tokenizer) from a checkpoint folder, a pretrain output folder (its
    newest checkpoint) or a model folder (``save_pretrained`` + ``tokenizer.json``); a
    UsageError naming ``--model-dir`` otherwise."""
    from fastllm.models import from_pretrained
    from fastllm.train.checkpoint import resolve_checkpoint
    from fastllm.train.data import DataError, load_tokenizer

    folder = resolve_checkpoint(model_dir)
    if folder is None:
        if not (model_dir / "model.safetensors").is_file():
            raise UsageError(f"--model-dir: no checkpoint in {model_dir}")
        folder = model_dir
    try:
        tokenizer = load_tokenizer(folder)
    except DataError as exc:
        raise UsageError(f"--model-dir: {exc}") from exc
    return from_pretrained(folder, device=device).eval(), tokenizer


def _load_source(src: Path, device):
    """(model, encode(text, chat) -> ids, decode(ids) -> text, end-of-text id) of a fastllm
    checkpoint (its tokenizers file), or of a Hugging Face folder / .gguf file (transformers'
    tokenizer, whose chat template ``--chat`` uses)."""
    from fastllm.train.data import EOS_TOKEN

    if not str(src).endswith(".gguf") and (
            resolve_checkpoint_or_none(src) is not None or (src / "tokenizer.json").is_file()):
        try:
            model, tokenizer = load_model_dir(src, device)
        except UsageError:
            model = None
        if model is not None and tokenizer.token_to_id(EOS_TOKEN) is not None:
            def encode(text: str, chat: bool) -> list[int]:
                if chat:
                    raise UsageError(f"--chat: the tokenizer of {src} has no chat template")
                return tokenizer.encode(text, add_special_tokens=False).ids

            return model, encode, tokenizer.decode, tokenizer.token_to_id(EOS_TOKEN)
    from fastllm.models import from_pretrained
    from fastllm.train.finetune import load_tokenizer, resolve_source

    source = resolve_source(src)
    tokenizer = load_tokenizer(source)
    try:
        model = from_pretrained(str(source), device=device).eval()
    except (ValueError, OSError, KeyError) as exc:
        raise UsageError(f"--model-dir: {exc}") from exc

    def encode(text: str, chat: bool) -> list[int]:
        if not chat:
            return tokenizer.encode(text, add_special_tokens=False)
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"--chat: the tokenizer of {src} has no chat template")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return model, encode, decode, tokenizer.eos_token_id


def resolve_checkpoint_or_none(src: Path):
    from fastllm.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(src) if Path(src).is_dir() else None


def run(args: argparse.Namespace) -> int:
    """``fastllm generate``'s handler."""
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, encode, decode, eos = _load_source(args.model_dir, device)
    from fastllm.models import GPT, Llama

    if not isinstance(model, (GPT, Llama)):
        raise UsageError(f"--model-dir: {args.model_dir} holds a {type(model).__name__}; "
                         f"fastllm generate continues text with a causal LM (gpt2, llama)")
    prompt_ids = encode(args.prompt, args.chat) or [eos]
    limit = model._max_positions()
    n_new = args.max_new_tokens if limit is None else min(args.max_new_tokens,
                                                           limit - len(prompt_ids))
    if n_new < 0:
        raise UsageError(f"--prompt: {len(prompt_ids)} tokens, more than the model's position "
                         f"table holds ({limit})")
    sys.stdout.write(args.prompt + ("\n" if args.chat else ""))
    sys.stdout.flush()
    stream = model.generate_stream(
        torch.tensor([prompt_ids], device=device), n_new, do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
        eos_token_id=eos, generator=torch.Generator(device).manual_seed(args.seed),
    )
    new_ids: list[int] = []
    shown = 0
    for token in stream:
        if int(token[0]) == eos:
            break
        new_ids.append(int(token[0]))
        text = decode(new_ids)
        if not text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write(decode(new_ids)[shown:] + "\n")
    sys.stdout.flush()
    return 0
