"""Generation with the thin runtime against transformers' `generate` on the same tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import export_tiny, train_tokenizer
from transformers import LogitsProcessor, LogitsProcessorList

from gptneo_onnx.runtime import (
    CausalLM,
    GenerationConfigError,
    InputError,
    Model,
    NumericalError,
    TokenStep,
)

# Window 4, so every prompt here is longer than the local window; larger weights than the
# default init so the tiny model's choices depend on the context (and sometimes hit EOS).
MODEL = {"vocab_size": 320, "initializer_range": 0.5}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [100, 17, 250, 3, 77, 9]]
PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation")
    tokenizer = train_tokenizer(folder / "tokenizer.json")
    hf_model, export_dir = export_tiny("causal-lm", folder / "export", tokenizer_file=tokenizer, **MODEL)
    return hf_model, CausalLM.load(export_dir)


def hf_generate(hf_model, prompts, **options) -> list[list[int]]:
    """transformers' new tokens per returned sequence, cut after the first EOS."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    eos = options.pop("eos_token_id", [EOS])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD, **options)
    rows = []
    for row in out[:, longest:].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:cut])
    return rows


def test_cached_steps_match_one_full_pass(exported):
    _, model = exported
    ids = np.array([[PAD, PAD, 5, 6, 7, 8, 9, 10, 11, 12]])
    mask = (ids != PAD).astype(np.int64)
    full, _ = model.forward(ids, mask)
    logits, cache = model.forward(ids[:, :6], mask[:, :6])
    steps = [logits]
    for i in range(6, 10):
        logits, cache = model.forward(ids[:, i : i + 1], mask[:, : i + 1], past=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[:, 2:], full[:, 2:], atol=1e-5)
    assert cache.length == 10


@pytest.mark.parametrize(
    "options",
    [{}, {"repetition_penalty": 1.3}, {"min_new_tokens": 8}],
    ids=["plain", "repetition-penalty", "min-new-tokens"],
)
def test_greedy_matches_transformers(exported, options):
    hf_model, model = exported
    first = model.generate(PROMPTS, max_new_tokens=16, **options)
    expected = hf_generate(hf_model, PROMPTS, max_new_tokens=16, do_sample=False, **options)
    assert first.sequences == expected
    # an EOS that one row hits early: rows finish independently and later steps get padding
    eos = [first.sequences[1][10]]
    result = model.generate(PROMPTS, max_new_tokens=16, eos_token_id=eos, **options)
    assert result.sequences == hf_generate(hf_model, PROMPTS, max_new_tokens=16, do_sample=False,
                                           eos_token_id=eos, **options)  # fmt: skip
    assert "eos" in result.finish_reasons and len({len(row) for row in result.sequences}) > 1


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}], ids=["greedy", "beams-3"])
def test_logit_bias_matches_transformers_sequence_bias(exported, options):
    """OpenAI's logit_bias is transformers' sequence_bias with one-token sequences: a ban on the
    token greedy decoding chose third for the first prompt, a push towards another one."""
    hf_model, model = exported
    plain = model.generate(PROMPTS, max_new_tokens=12, **options).sequences
    bias = {plain[0][2]: -100.0, 33: 4.5}
    result = model.generate(PROMPTS, max_new_tokens=12, logit_bias=bias, **options).sequences
    sequence_bias = {(token,): value for token, value in bias.items()}
    assert result != plain and plain[0][2] not in result[0]
    assert result == hf_generate(
        hf_model, PROMPTS, max_new_tokens=12, do_sample=False, sequence_bias=sequence_bias, **options
    )


class OpenAIPenalties(LogitsProcessor):
    """An independent torch reading of OpenAI's presence and frequency penalties, on the tokens
    generated after the (left-padded) prompt's `width` columns, for transformers' generate."""

    def __init__(self, width: int, presence: float, frequency: float):
        self.width, self.presence, self.frequency = width, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.width :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}], ids=["greedy", "beams-3"])
def test_presence_and_frequency_penalties_match_a_transformers_processor(exported, options):
    hf_model, model = exported
    penalties = {"presence_penalty": 0.8, "frequency_penalty": 1.1}
    plain = model.generate(PROMPTS, max_new_tokens=16, **options).sequences
    result = model.generate(PROMPTS, max_new_tokens=16, **penalties, **options).sequences
    assert result != plain
    width = max(len(prompt) for prompt in PROMPTS)
    reference = OpenAIPenalties(width, penalties["presence_penalty"], penalties["frequency_penalty"])
    expected = hf_generate(
        hf_model, PROMPTS, max_new_tokens=16, do_sample=False,
        logits_processor=LogitsProcessorList([reference]), **options,
    )  # fmt: skip
    assert result == expected


@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 3},
        {"num_beams": 3, "num_return_sequences": 3, "length_penalty": 0.5},
        {"num_beams": 2, "early_stopping": True, "length_penalty": 2.0},
        {"num_beams": 4, "early_stopping": "never", "num_return_sequences": 2, "min_new_tokens": 5},
    ],
    ids=["beams-3", "return-3", "early-stopping", "never-stop"],
)
def test_beam_search_matches_transformers(exported, options):
    hf_model, model = exported
    greedy = model.generate(PROMPTS, max_new_tokens=12)
    for eos in ([EOS], [greedy.sequences[0][2], greedy.sequences[2][5]]):
        result = model.generate(PROMPTS, max_new_tokens=12, eos_token_id=eos, **options)
        expected = hf_generate(
            hf_model, PROMPTS, max_new_tokens=12, do_sample=False, eos_token_id=eos, **options
        )
        assert result.sequences == expected
        assert eos == [EOS] or "eos" in result.finish_reasons
        count = options.get("num_return_sequences", 1)
        assert result.prompt_index == [i for i in range(len(PROMPTS)) for _ in range(count)]


def test_beam_scores_match_transformers(exported):
    hf_model, model = exported
    result = model.generate(PROMPTS[:2], max_new_tokens=8, num_beams=3, num_return_sequences=2)
    ids = torch.tensor([PROMPTS[0], [PAD] * 6 + PROMPTS[1]])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=(ids != PAD).long(), max_new_tokens=8, num_beams=3,
                                num_return_sequences=2, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=PAD)  # fmt: skip
    np.testing.assert_allclose(result.scores, out.sequences_scores.numpy(), rtol=1e-4)


def test_sampling_is_reproducible_with_a_seed(exported):
    _, model = exported
    options = {"do_sample": True, "max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 40}
    first = model.generate(PROMPTS, seed=7, **options)
    assert model.generate(PROMPTS, seed=7, **options).sequences == first.sequences
    assert model.generate(PROMPTS, seed=8, **options).sequences != first.sequences
    several = model.generate(PROMPTS[0], seed=3, num_return_sequences=3, **options)
    assert several.prompt_index == [0, 0, 0] and len(set(map(tuple, several.sequences))) > 1
    greedy = model.generate(PROMPTS, max_new_tokens=12)
    assert model.generate(PROMPTS, do_sample=True, top_k=1, max_new_tokens=12).sequences == greedy.sequences


def test_io_binding_path_matches_plain_runs(exported):
    _, model = exported
    bound = CausalLM.load(model.manifest.folder, io_binding=True)
    for options in ({}, {"num_beams": 3}):
        plain = model.generate(PROMPTS, max_new_tokens=10, **options)
        assert bound.generate(PROMPTS, max_new_tokens=10, **options).sequences == plain.sequences


def test_optimized_export_with_a_shared_buffer_cache(exported, tmp_path):
    hf_model, model = exported
    _, folder = export_tiny("causal-lm", tmp_path / "optimized", export_options={"optimize": True}, **MODEL)
    shared = CausalLM.load(folder)
    if shared.cache_mode != "shared-buffer":
        pytest.skip("this export offers no shared-buffer cache (fused attention unavailable)")
    concat = CausalLM.load(folder, cache_mode="concat")
    bound = CausalLM.load(folder, cache_mode="concat", io_binding=True)
    for options in ({}, {"num_beams": 3, "num_return_sequences": 2}):
        expected = hf_generate(hf_model, PROMPTS, max_new_tokens=10, do_sample=False, **options)
        assert shared.generate(PROMPTS, max_new_tokens=10, **options).sequences == expected
        assert concat.generate(PROMPTS, max_new_tokens=10, **options).sequences == expected
        assert bound.generate(PROMPTS, max_new_tokens=10, **options).sequences == expected
    with pytest.raises(InputError, match="cache_mode 'paged'"):
        CausalLM.load(folder, cache_mode="paged")


def test_text_generation_streaming_and_stop_strings(exported):
    _, model = exported
    result = model.generate(["Zoë went", "東京"], max_new_tokens=24)
    assert len(result.texts) == 2 and all(isinstance(text, str) for text in result.texts)
    pieces = list(model.stream("東京", max_new_tokens=24))
    assert "".join(pieces) == result.texts[1]
    # (a random model emits invalid UTF-8 too, so U+FFFD may appear: test_runtime_streaming covers that)
    steps = [
        event for event in model.generate_steps("Zoë went", max_new_tokens=5) if isinstance(event, TokenStep)
    ]
    assert [int(step.token_ids[0]) for step in steps] == result.sequences[0][:5]
    # stop at a piece of the text it would generate anyway
    stop = result.texts[0][3:5]
    stopped = model.generate("Zoë went", max_new_tokens=24, stop_strings=[stop])
    assert stopped.finish_reasons == ["stop_string"] and stop not in stopped.texts[0]
    assert result.texts[0].startswith(stopped.texts[0])
    assert "".join(model.stream("Zoë went", max_new_tokens=24, stop_strings=[stop])) == stopped.texts[0]


# ---- bad input: each gets a named error before onnxruntime runs ----------------------------
def test_token_ids_outside_the_vocabulary(exported):
    _, model = exported
    with pytest.raises(InputError, match=r"token id 320 outside the vocabulary \[0, 320\)"):
        model.generate([[5, 320]])
    with pytest.raises(InputError, match="token id -1"):
        model.forward(np.array([[-1]]), np.array([[1]]))


def test_prompt_plus_new_tokens_over_the_position_limit(exported):
    _, model = exported
    long_prompt = list(range(3, 63))  # 60 tokens; the tiny model has 64 positions
    with pytest.raises(InputError, match="exceeds the model's max_position_embeddings \\(64\\)"):
        model.generate(long_prompt, max_new_tokens=10)
    truncated = model.generate(long_prompt, max_new_tokens=10, truncate=True)
    assert truncated.sequences == model.generate(long_prompt[-54:], max_new_tokens=10).sequences
    with pytest.raises(InputError, match="leaves no room"):
        model.generate([5], max_new_tokens=64, truncate=True)


@pytest.mark.parametrize(
    "prompts", ["", [], [[]], ["ok", ""]], ids=["empty-text", "no-prompts", "empty-ids", "one-empty"]
)
def test_empty_prompts(exported, prompts):
    _, model = exported
    with pytest.raises(InputError, match="empty|no prompts"):
        model.generate(prompts)


def test_invalid_sampling_parameters(exported):
    _, model = exported
    with pytest.raises(GenerationConfigError, match="temperature"):
        model.generate("hi", do_sample=True, temperature=0.0)
    with pytest.raises(GenerationConfigError, match="top_p"):
        model.generate("hi", do_sample=True, top_p=0.0)
    with pytest.raises(GenerationConfigError, match="streaming needs num_beams=1"):
        list(model.stream("hi", num_beams=2))


def test_nan_logits_raise(exported, monkeypatch):
    _, model = exported
    fresh = Model.load(model.manifest.folder)
    real_forward = fresh.forward

    def broken(*args, **kwargs):
        logits, cache = real_forward(*args, **kwargs)
        logits[0, -1, 7] = np.nan
        return logits, cache

    monkeypatch.setattr(fresh, "forward", broken)
    with pytest.raises(NumericalError, match="NaN"):
        fresh.generate("hi", max_new_tokens=3)
    with pytest.raises(NumericalError, match="NaN"):
        fresh.generate("hi", max_new_tokens=3, num_beams=2)


@pytest.mark.parametrize(
    ("optimize", "cache_mode", "io_binding"),
    [(True, "shared-buffer", None), (True, "concat", None), (True, "concat", True), (False, "concat", None)],
    ids=["optimized-shared-buffer", "optimized-concat", "optimized-concat-io-binding", "portable-concat"],
)
def test_windowed_local_cache_stays_bounded_and_matches_transformers(
    tmp_path, optimize, cache_mode, io_binding
):
    """Local layers keep at most window - 1 + slack rows, and a left-padded batch decoded one token
    at a time far past the window still gives transformers' logits."""
    options = {"optimize": optimize, "windowed_local_cache": True, "validate": False}
    hf_model, folder = export_tiny("causal-lm", tmp_path, export_options=options, **MODEL)
    model = CausalLM.load(folder, cache_mode=cache_mode, io_binding=io_binding)
    binding = model.io_binding
    local = model.manifest.raw["cache"]["local_window"]
    assert local == {"input": "local_attention_mask", "window": 4, "min_rows": 3}
    local_names = {layer.past_key for layer in model.manifest.cache_layers if layer.window}
    ids = np.random.default_rng(0).integers(3, MODEL["vocab_size"], size=(2, 40))
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        positions = torch.from_numpy(np.maximum(mask.cumsum(1) - 1, 0))  # left padding
        expected = hf_model(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=positions
        ).logits.numpy()
    logits, cache = model.forward(ids[:, :7], mask[:, :7], capacity=40)
    steps, held = [logits], []
    for i in range(7, 40):
        logits, cache = model.forward(ids[:, i : i + 1], mask[:, : i + 1], past=cache)
        steps.append(logits)
        held.append(cache.local_rows)
        if cache_mode == "concat":
            rows = {
                name: value.shape()[2] if binding else value.shape[2] for name, value in cache.values.items()
            }
            assert {rows[name] for name in local_names} == {cache.local_rows}
    assert max(held) <= 3 + 1 and min(held) == 3  # trimmed back to min_rows every slack (1) steps
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[real], expected[real], atol=1e-4)


def test_a_generation_whose_cache_would_not_fit_is_refused_up_front(exported):
    _, model = exported
    # 2 layers x (key, value) x 4 heads x head_dim 8 x 4 bytes = 512 bytes per token per row, plus
    # the row's float32 logits (320 x 4 bytes) x (2 x 9 prompt tokens + 4 step copies);
    # 3 prompts (longest 9 tokens) + 10 new = 19 tokens: 3 x (9,728 + 28,160) = 113,664 bytes greedy,
    # 3x that with 3 beams, and 3 x (19,968 + 28,160) = 144,384 with 30 new tokens.
    small = CausalLM.load(model.manifest.folder, max_cache_bytes=120_000)
    assert (
        small.generate(PROMPTS, max_new_tokens=10).sequences
        == model.generate(PROMPTS, max_new_tokens=10).sequences
    )
    with pytest.raises(GenerationConfigError, match=r"3 prompt\(s\) x 3 sequence\(s\) each x 19 tokens"):
        small.generate_steps(PROMPTS, max_new_tokens=10, num_beams=3)
    with pytest.raises(GenerationConfigError, match="lower the batch, num_beams"):
        small.generate(PROMPTS, max_new_tokens=30)
    assert model.max_cache_bytes > 1 << 30  # the default: 3/4 of this machine's memory
