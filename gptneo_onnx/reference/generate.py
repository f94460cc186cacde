"""Greedy decoding with the reference model's explicit KV cache (a parity tool, not a runtime)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append `max_new_tokens` argmax tokens to each (left-padded) row; returns (B, S + new)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokens, mask, past = input_ids, attention_mask, None
    step_input = input_ids
    for _ in range(max_new_tokens):
        logits, past = model(step_input, mask, past_key_values=past)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
        step_input = next_token
    return tokens
