"""Full models built from fastllm's layers (see each family's file)."""

from fastllm.models.bert import (
    BertConfig,
    BertForPreTraining,
    BertForPreTrainingOutput,
    BertForSequenceClassification,
    BertModel,
    BertModelOutput,
    SequenceClassifierOutput,
)

__all__ = [
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertModelOutput",
    "BertForPreTrainingOutput",
    "SequenceClassifierOutput",
]
