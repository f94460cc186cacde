"""The reference model against transformers' GPTNeo* classes on tiny random configs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_hf_model

from gptneo_onnx.reference import TASKS, from_transformers, greedy_generate

CONFIGS = {
    "alternating": {},
    "global-only": {"attention_types": [[["global"], 2]]},
    "local-only": {"attention_types": [[["local"], 2]]},
    "local-global-local": {"num_layers": 3, "attention_types": [[["local", "global", "local"], 1]]},
    "relu-explicit-mlp": {"activation_function": "relu", "intermediate_size": 40},
    "gelu-erf": {"activation_function": "gelu"},
    "quick-gelu": {"activation_function": "quick_gelu"},
    "mish": {"activation_function": "mish"},
    "head-dim-6": {"hidden_size": 24, "num_heads": 4, "window_size": 3},
}
SEQUENCE = 40  # ten times the window of 4


def random_ids(batch: int, length: int, seed: int = 1, low: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, 97, (batch, length), generator=generator)


def hf_outputs(hf_model, task, input_ids, attention_mask):
    # transformers counts positions with arange unless told; give it the padding-aware ones
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return {
        "base": lambda: (out.last_hidden_state,),
        "causal-lm": lambda: (out.logits,),
        "sequence-classification": lambda: (out.logits,),
        "token-classification": lambda: (out.logits,),
        "question-answering": lambda: (out.start_logits, out.end_logits),
    }[task]()


def ours_outputs(model, task, input_ids, attention_mask):
    out = model(input_ids, attention_mask)
    if task == "causal-lm":
        return (out[0],)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("task", TASKS)
@torch.no_grad()
def test_every_head_matches_transformers(task, config_name):
    hf_model = tiny_hf_model(task, **CONFIGS[config_name])
    model = from_transformers(hf_model)
    input_ids = random_ids(2, SEQUENCE)
    mask = torch.ones_like(input_ids)
    for expected, actual in zip(
        hf_outputs(hf_model, task, input_ids, mask), ours_outputs(model, task, input_ids, mask)
    ):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_name", ["alternating", "local-only", "head-dim-6"])
@torch.no_grad()
def test_incremental_decoding_equals_full_forward(config_name):
    model = from_transformers(tiny_hf_model("causal-lm", **CONFIGS[config_name]))
    input_ids = random_ids(2, 30)
    full_logits, _ = model(input_ids)
    # prefill 3 tokens (inside the window), then chunks of 1 and 5 that carry the past across it
    logits, past, start = [], None, 0
    for size in (3, 1, 1, 5, 1, 7, 12):
        chunk = input_ids[:, start : start + size]
        mask = torch.ones(2, start + size, dtype=torch.long)
        step_logits, past = model(chunk, mask, past_key_values=past)
        logits.append(step_logits)
        start += size
    assert start == 30
    torch.testing.assert_close(torch.cat(logits, dim=1), full_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", TASKS)
@torch.no_grad()
def test_left_padded_batch_matches_unpadded_rows(task):
    hf_model = tiny_hf_model(task)
    model = from_transformers(hf_model)
    lengths = [23, 9, 16]
    rows = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batched = ours_outputs(model, task, input_ids, mask)
    for i, row in enumerate(rows):
        alone = ours_outputs(model, task, row[None], torch.ones(1, len(row), dtype=torch.long))
        for batch_out, row_out in zip(batched, alone):
            if batch_out.dim() >= 2 and batch_out.shape[1] == width:  # per-token outputs
                batch_out = batch_out[i : i + 1, width - len(row) :]
            else:  # pooled outputs
                batch_out = batch_out[i : i + 1]
            torch.testing.assert_close(batch_out, row_out, atol=1e-5, rtol=1e-5)
    # and the padded batch equals transformers on the non-pad positions
    for expected, actual in zip(hf_outputs(hf_model, task, input_ids, mask), batched):
        if actual.dim() >= 2 and actual.shape[1] == width:
            keep = mask.bool()
            expected, actual = expected[keep], actual[keep]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_greedy_generation_is_token_identical_to_transformers():
    hf_model = tiny_hf_model("causal-lm", max_position_embeddings=128)
    model = from_transformers(hf_model)
    prompt = random_ids(1, 12)  # three windows long
    expected = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=48,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    actual = greedy_generate(model, prompt, max_new_tokens=48)
    assert actual.tolist() == expected.tolist()


@torch.no_grad()
def test_greedy_generation_left_padded_batch_matches_transformers():
    hf_model = tiny_hf_model("causal-lm", max_position_embeddings=128)
    model = from_transformers(hf_model)
    input_ids = random_ids(2, 10)
    mask = torch.ones_like(input_ids)
    input_ids[1, :4], mask[1, :4] = 0, 0
    expected = hf_model.generate(
        input_ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert greedy_generate(model, input_ids, 40, attention_mask=mask).tolist() == expected.tolist()


@torch.no_grad()
def test_sequence_classification_pools_the_last_non_pad_token_with_right_padding():
    hf_model = tiny_hf_model("sequence-classification")
    model = from_transformers(hf_model)
    input_ids = random_ids(3, 12)
    mask = torch.ones_like(input_ids)
    input_ids[0, 7:], mask[0, 7:] = 0, 0  # right padding: the last position is a pad
    input_ids[2, 10:], mask[2, 10:] = 0, 0
    expected = hf_model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(model(input_ids, mask), expected, atol=1e-5, rtol=1e-5)
    alone = model(input_ids[:1, :7], mask[:1, :7])  # and equals the unpadded row
    torch.testing.assert_close(model(input_ids, mask)[:1], alone, atol=1e-5, rtol=1e-5)
