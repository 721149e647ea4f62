"""``fastllm generate``: stream a continuation of a prompt from a ``fastllm pretrain``
checkpoint.

    fastllm generate --model-dir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S] [--device DEVICE]

``--model-dir`` is a checkpoint folder, or a pretrain output folder (its newest checkpoint is
used). The prompt is printed, then each new token as soon as it is decoded
(``model.generate_stream``); generation stops at ``<|endoftext|>`` or after
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
                   dest="model_dir", type=Path, required=True, metavar="DIR",
                   help="a checkpoint folder, or a pretrain output folder (newest checkpoint)")
    p.add_argument("--prompt", default="", help="the text to continue (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (0: greedy; default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the K most likely "
                   "tokens (0: all; default 40)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
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

    from fastllm.train.data import EOS_TOKEN

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model_dir(args.model_dir, device)

    eos = tokenizer.token_to_id(EOS_TOKEN)
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids or [eos]
    limit = model._max_positions()
    n_new = args.max_new_tokens if limit is None else min(args.max_new_tokens,
                                                           limit - len(prompt_ids))
    if n_new < 0:
        raise UsageError(f"--prompt: {len(prompt_ids)} tokens, more than the model's position "
                         f"table holds ({limit})")
    sys.stdout.write(args.prompt)
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
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write(tokenizer.decode(new_ids)[shown:] + "\n")
    sys.stdout.flush()
    return 0
