"""fastllm's command line: ``fastllm COMMAND ...`` (or ``python -m fastllm COMMAND ...``).

A dispatch table: each command lives in its own module, which provides
``register(subparsers)``: it adds the command's parser and sets its ``handler``, a function
taking the parsed arguments and returning the exit status. A command module imports only
the standard library at its top and its heavy dependencies (torch.compile, transformers,
...) inside its handler, so building this parser, e.g. for ``fastllm --help``, stays cheap.
Adding a command is one module and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn, Optional, Sequence

# command -> the module that registers it, imported when the parser is built
COMMANDS: dict[str, str] = {
    "bench": "fastllm.bench.run",
    "pretrain": "fastllm.train.pretrain",
    "finetune": "fastllm.train.finetune",
    "generate": "fastllm.train.generate_cmd",
    "eval": "fastllm.train.eval_cmd",
}


class UsageError(Exception):
    """A command's arguments do not fit together; reported like argparse's own errors."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastllm", description="fastllm: fused Transformer kernels for PyTorch."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print(f"\nfastllm: error: no command given; choose one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except UsageError as exc:
        parser.error(str(exc))


def console_main() -> NoReturn:
    """The ``fastllm`` program (the script and ``python -m fastllm``): :func:`main`, then the
    exit with its status; a process that ran a torch.distributed process group (a rank under
    torchrun) leaves through ``fastllm.train.distributed.exit_process`` (see there why)."""
    code = main()
    code = 0 if code is None else int(code)
    distributed = sys.modules.get("fastllm.train.distributed")  # loaded only if it ran
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)
