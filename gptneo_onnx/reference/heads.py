"""The task heads on top of GPTNeoModel, matching transformers' GPTNeoFor* classes."""

from __future__ import annotations

import torch
from torch import nn

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.contract import TASK_NAMES
from gptneo_onnx.reference.model import GPTNeoModel, KVCache


class GPTNeoBase(nn.Module):
    """Base model wrapped as a task: outputs the last hidden state."""

    task = "base"

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTNeoModel(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids)
        return hidden


class GPTNeoForCausalLM(nn.Module):
    """Language model head tied to the token embedding; logits in float32."""

    task = "causal-lm"

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTNeoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        hidden, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values)
        return self.lm_head(hidden).float(), presents


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Index of the rightmost non-pad token per row (works for left and right padding). (B,)"""
    batch, length = input_ids.shape
    if pad_token_id is None:
        return torch.full((batch,), length - 1, dtype=torch.long)
    non_pad = (input_ids != pad_token_id).long()
    return (torch.arange(length) * non_pad).argmax(-1)


class GPTNeoForSequenceClassification(nn.Module):
    """Per-token scores pooled at the last non-pad token, as transformers does."""

    task = "sequence-classification"

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTNeoModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids)
        logits = self.score(hidden)  # (B, S, num_labels)
        last = last_non_pad_index(input_ids, self.config.pad_token_id)
        return logits[torch.arange(input_ids.shape[0]), last]  # (B, num_labels)


class GPTNeoForTokenClassification(nn.Module):
    task = "token-classification"

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTNeoModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids)
        return self.classifier(self.dropout(hidden))  # (B, S, num_labels)


class GPTNeoForQuestionAnswering(nn.Module):
    task = "question-answering"

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTNeoModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids)
        start, end = self.qa_outputs(hidden).split(1, dim=-1)
        return start.squeeze(-1), end.squeeze(-1)  # (B, S) each


TASK_CLASSES: dict[str, type[nn.Module]] = {
    cls.task: cls
    for cls in (
        GPTNeoBase,
        GPTNeoForCausalLM,
        GPTNeoForSequenceClassification,
        GPTNeoForTokenClassification,
        GPTNeoForQuestionAnswering,
    )
}
TASKS = TASK_NAMES  # the task table is gptneo_onnx.contract's
