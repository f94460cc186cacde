"""A readable GPT-Neo in PyTorch, written for export: explicit per-layer KV tensors in and out.

Shapes: B batch, S new tokens, P past tokens, T = P + S total tokens, H heads, D head_dim.
The KV cache layout is Optimum's: (B, H, T, D) per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from gptneo_onnx.config import GPTNeoConfig
from gptneo_onnx.reference.activations import ACTIVATION_FUNCTIONS

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def position_ids_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Positions that skip left padding: cumsum of the mask minus one, clipped at 0. (B, S)"""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -query_length:]


def attention_bias(attention_mask: torch.Tensor, query_length: int, window: int | None) -> torch.Tensor:
    """Additive mask (B, 1, S, T): 0 where query i may see key j, float32 min elsewhere.

    i and j index the whole sequence (past included). Key j is visible when it is not padding,
    j <= i, and for a local layer i - j < window.
    """
    total_length = attention_mask.shape[1]
    query_index = torch.arange(total_length - query_length, total_length).unsqueeze(1)  # (S, 1)
    key_index = torch.arange(total_length).unsqueeze(0)  # (1, T)
    distance = query_index - key_index  # (S, T)
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    visible = visible[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, S, T)
    masked = torch.tensor(torch.finfo(torch.float32).min)
    return torch.where(visible, torch.tensor(0.0), masked)


class SelfAttention(nn.Module):
    """Unscaled multi-head attention; QK^T and softmax in float32 as in GPT-Neo."""

    def __init__(self, config: GPTNeoConfig, window: int | None):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.window = window  # None for a global layer, fixed when the layer is built
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden, bias=True)
        self.attn_dropout = nn.Dropout(config.attention_dropout)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)

    def forward(
        self,
        hidden: torch.Tensor,
        bias: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query = self.split_heads(self.q_proj(hidden))
        key = torch.cat([past_key, self.split_heads(self.k_proj(hidden))], dim=2)  # (B, H, T, D)
        value = torch.cat([past_value, self.split_heads(self.v_proj(hidden))], dim=2)

        compute = torch.promote_types(query.dtype, torch.float32)  # fp32 at least, fp64 stays
        scores = query.to(compute) @ key.to(compute).transpose(-1, -2)  # (B, H, S, T), no 1/sqrt(D)
        weights = torch.softmax(scores + bias, dim=-1).to(value.dtype)
        out = self.attn_dropout(weights) @ value  # (B, H, S, D)
        out = out.transpose(1, 2).reshape(hidden.shape)
        return self.resid_dropout(self.out_proj(out)), key, value


class MLP(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.hidden_size)
        self.act = ACTIVATION_FUNCTIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = SelfAttention(config, window=config.layer_window(layer))
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden, bias, past_key, past_value):
        attn_out, present_key, present_value = self.attn(self.ln_1(hidden), bias, past_key, past_value)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.ln_2(hidden))
        return hidden, present_key, present_value


class GPTNeoModel(nn.Module):
    """The base model: token ids in, last hidden state and the updated KV cache out."""

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embed_dropout)
        self.h = nn.ModuleList([Block(config, layer) for layer in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.windows = sorted({block.attn.window for block in self.h}, key=lambda w: w or 0)

    def empty_cache(self, batch_size: int) -> KVCache:
        shape = (batch_size, self.config.num_heads, 0, self.config.head_dim)
        dtype = self.wte.weight.dtype
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.h]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """attention_mask covers past + new tokens, (B, T); position_ids default to the mask's."""
        batch, length = input_ids.shape
        if past_key_values is None:
            past_key_values = self.empty_cache(batch)
        if attention_mask is None:
            total = past_key_values[0][0].shape[2] + length
            attention_mask = torch.ones(batch, total, dtype=torch.long)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, length)

        # One mask per window size, shared by the layers that use it.
        biases = {w: attention_bias(attention_mask, length, w) for w in self.windows}
        hidden = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        presents: KVCache = []
        for block, (past_key, past_value) in zip(self.h, past_key_values):
            hidden, key, value = block(hidden, biases[block.attn.window], past_key, past_value)
            presents.append((key, value))
        return self.ln_f(hidden), presents
