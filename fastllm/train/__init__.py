"""Training: plain functions the ``fastllm`` commands call.

- :mod:`fastllm.train.data`: corpus reading, byte-level BPE tokenizer, token stream, batches.
- :mod:`fastllm.train.checkpoint`: atomic checkpoints, keep-last-K, exact resume.
- :mod:`fastllm.train.loop`: the pre-training loop, metrics JSONL, loss / learning-rate plot.
- :mod:`fastllm.train.pretrain`: ``fastllm pretrain``; :mod:`fastllm.train.generate_cmd`:
  ``fastllm generate``.

Nothing heavy is imported here: the command line builds its parser from these modules.
"""
