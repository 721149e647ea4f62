"""``python -m fastllm COMMAND ...``: the same command line as the ``fastllm`` script."""

import sys

from fastllm.cli import main

sys.exit(main())
