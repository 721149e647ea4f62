"""``python -m fastllm COMMAND ...``: the same command line as the ``fastllm`` script."""

from fastllm.cli import console_main

console_main()
