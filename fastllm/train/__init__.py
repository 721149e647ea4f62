"""Training: plain functions the ``fastllm`` commands call.

- :mod:`fastllm.train.data`: corpus reading, byte-level BPE tokenizer, token stream, batches.
- :mod:`fastllm.train.objectives`: the loop's ``Objective`` protocol and causal LM;
  :mod:`fastllm.train.mlm` (BERT masked LM + next sentence), :mod:`fastllm.train.denoising`
  (BART text infilling + sentence permutation), :mod:`fastllm.train.tasks` (fine-tuning data,
  objectives, the default labelled set, metrics).
- :mod:`fastllm.train.checkpoint`: atomic checkpoints, keep-last-K, exact resume.
- :mod:`fastllm.train.loop`: the training loop, metrics JSONL, loss / learning-rate plot.
- :mod:`fastllm.train.distributed`: torchrun process groups, DDP / FSDP2, full-state saves.
- :mod:`fastllm.train.peft_setup`: LoRA / AdaLoRA (peft) and bottleneck adapters.
- Commands: :mod:`fastllm.train.pretrain` (``fastllm pretrain``), :mod:`fastllm.train.finetune`,
  :mod:`fastllm.train.generate_cmd`, :mod:`fastllm.train.eval_cmd`.

Nothing heavy is imported here: the command line builds its parser from these modules.
"""
