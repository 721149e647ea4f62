"""Whole models built from fastllm's layers (``fastllm.nn`` / ``fastllm.functional``).

- :class:`GPT` / :class:`GPTConfig`: GPT-2.
- :class:`Llama` / :class:`LlamaConfig`: LLaMA, Mistral (sliding window), Qwen2 (qkv bias).
- :class:`BertModel`, :class:`BertForPreTraining` (masked LM + next-sentence prediction),
  :class:`BertForSequenceClassification` / :class:`BertConfig`.
- :class:`EncoderDecoder` / :class:`EncoderDecoderConfig`: BART, mBART and Marian (translation,
  summarisation), ``Seq2SeqLMOutput(loss, logits, encoder_last_hidden_state)``.
- :func:`from_pretrained`: Hugging Face weights (a model directory or an in-memory
  ``transformers`` model) or a llama.cpp ``.gguf`` file (LLaMA architecture, dequantised);
  ``model.save_pretrained(dir)`` writes HF's layout back.
- ``model.generate`` / ``generate_stream`` (GPT, Llama, EncoderDecoder): KV-cache decoding.

Configs come from a ``from_name`` table (``GPTConfig.from_name("gpt2")``); forwards take and
return Hugging Face's names (``attention_mask``, ``labels``, ``num_items_in_batch``;
``CausalLMOutput(loss, logits)``).
"""

from fastllm.models.bert import (
    BertConfig,
    BertForPreTraining,
    BertForPreTrainingOutput,
    BertForSequenceClassification,
    BertModel,
    BertModelOutput,
    SequenceClassifierOutput,
)
from fastllm.models.config import CausalLMOutput, causal_lm_loss
from fastllm.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig, Seq2SeqLMOutput
from fastllm.models.gpt import GPT, GPTConfig
from fastllm.models.hf import from_pretrained
from fastllm.models.llama import Llama, LlamaConfig

__all__ = [
    "CausalLMOutput",
    "causal_lm_loss",
    "GPT",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertModelOutput",
    "BertForPreTrainingOutput",
    "SequenceClassifierOutput",
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "Seq2SeqLMOutput",
    "from_pretrained",
]
