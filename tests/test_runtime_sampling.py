"""The numpy logits processors against transformers' processors, and decoding-parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from gptneo_onnx.runtime import GenerationConfig, GenerationConfigError
from gptneo_onnx.runtime.sampling import (
    LogitsProcessor,
    SplitMix64,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sample,
    sample_without_replacement,
)

VOCAB = 97


def random_scores(seed: int, batch: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (batch, VOCAB)).astype(np.float32)


def hf_apply(processor, scores: np.ndarray, input_ids: np.ndarray | None = None) -> np.ndarray:
    ids = (
        torch.zeros((scores.shape[0], 1), dtype=torch.long) if input_ids is None else torch.tensor(input_ids)
    )
    return processor(ids, torch.tensor(scores)).numpy()


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(temperature):
    scores = random_scores(0)
    expected = hf_apply(hf.TemperatureLogitsWarper(temperature), scores)
    np.testing.assert_array_equal(apply_temperature(scores, temperature), expected)


@pytest.mark.parametrize("top_k, keep", [(1, 1), (5, 1), (40, 1), (200, 1), (2, 3)])
def test_top_k_matches_transformers(top_k, keep):
    scores = random_scores(1)
    scores[0, :10] = 1.0  # ties around the k-th value
    expected = hf_apply(hf.TopKLogitsWarper(top_k, min_tokens_to_keep=keep), scores)
    np.testing.assert_array_equal(apply_top_k(scores, top_k, keep), expected)


@pytest.mark.parametrize("top_p, keep", [(0.1, 1), (0.5, 1), (0.9, 1), (0.95, 5), (1.0, 1), (0.01, 3)])
def test_top_p_matches_transformers(top_p, keep):
    for seed in range(5):
        scores = random_scores(seed)
        expected = hf_apply(hf.TopPLogitsWarper(top_p, min_tokens_to_keep=keep), scores)
        np.testing.assert_array_equal(apply_top_p(scores, top_p, keep), expected)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    scores = random_scores(2)
    input_ids = np.random.default_rng(3).integers(0, VOCAB, (4, 12))
    input_ids[0, :4] = 7  # repeated tokens are penalized once
    expected = hf_apply(hf.RepetitionPenaltyLogitsProcessor(penalty), scores, input_ids)
    np.testing.assert_array_equal(apply_repetition_penalty(input_ids, scores, penalty), expected)


def test_min_new_tokens_and_min_length_match_transformers():
    scores = random_scores(4)
    input_ids = np.ones((4, 6), dtype=np.int64)
    eos = [2, 5]
    for prompt_length, min_new in [(4, 3), (4, 2), (2, 3)]:
        expected = hf_apply(
            hf.MinNewTokensLengthLogitsProcessor(prompt_length, min_new, eos), scores, input_ids
        )
        ours = LogitsProcessor(do_sample=False, min_new_tokens=min_new, eos_token_ids=eos)
        np.testing.assert_array_equal(ours(input_ids, scores, prompt_length), expected)
    for min_length in (5, 6, 7):  # a minimum total length is min_new_tokens counted from 0
        expected = hf_apply(hf.MinLengthLogitsProcessor(min_length, eos), scores, input_ids)
        ours = LogitsProcessor(do_sample=False, min_new_tokens=min_length, eos_token_ids=eos)
        np.testing.assert_array_equal(ours(input_ids, scores, 0), expected)


def test_logit_bias_matches_transformers_sequence_bias():
    scores = random_scores(7)
    input_ids = np.random.default_rng(8).integers(0, VOCAB, (4, 8))
    bias = {3: 2.5, 40: -100.0, 96: 0.25}
    expected = hf_apply(hf.SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}), scores, input_ids)
    ours = LogitsProcessor(do_sample=False, logit_bias=bias)
    np.testing.assert_allclose(ours(input_ids, scores, 8), expected, rtol=1e-6)
    # first in the chain, as transformers orders sequence_bias before the repetition penalty
    chain = hf.LogitsProcessorList(
        [
            hf.SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}),
            hf.RepetitionPenaltyLogitsProcessor(1.4),
        ]
    )
    ours = LogitsProcessor(do_sample=False, logit_bias=bias, repetition_penalty=1.4)
    np.testing.assert_allclose(ours(input_ids, scores, 8), hf_apply(chain, scores, input_ids), rtol=1e-6)


def openai_penalized(scores: np.ndarray, generated: np.ndarray, presence: float, frequency: float):
    """OpenAI's formula, token by token: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    expected = scores.astype(np.float64)
    for row in range(scores.shape[0]):
        for token in range(scores.shape[1]):
            count = list(generated[row]).count(token)
            expected[row, token] -= count * frequency + (count > 0) * presence
    return expected


@pytest.mark.parametrize("presence, frequency", [(0.6, 0.0), (0.0, 0.9), (-0.5, 1.5), (2.0, -2.0)])
def test_presence_and_frequency_penalties_follow_openais_formula(presence, frequency):
    scores = random_scores(9)
    prompt = np.random.default_rng(10).integers(0, VOCAB, (4, 6))
    generated = np.array([[3, 3, 3, 7, 50], [7, 8, 9, 10, 11], [1, 1, 2, 2, 2], [60, 3, 60, 3, 60]])
    input_ids = np.concatenate([prompt, generated], axis=1)
    ours = LogitsProcessor(do_sample=False, presence_penalty=presence, frequency_penalty=frequency)
    result = ours(input_ids, scores, prompt.shape[1])  # the prompt's tokens are not counted
    np.testing.assert_allclose(result, openai_penalized(scores, generated, presence, frequency), atol=1e-5)
    untouched = ~np.isin(np.arange(VOCAB), generated[0])
    np.testing.assert_array_equal(result[0, untouched], scores[0, untouched])
    # after the repetition penalty, as vLLM applies its penalties together before temperature
    chain = LogitsProcessor(
        do_sample=False, repetition_penalty=1.3, presence_penalty=presence, frequency_penalty=frequency
    )
    repeated = hf_apply(hf.RepetitionPenaltyLogitsProcessor(1.3), scores, input_ids)
    np.testing.assert_allclose(
        chain(input_ids, scores, 6), openai_penalized(repeated, generated, presence, frequency), atol=1e-5
    )


def test_processor_chain_matches_transformers_order():
    scores = random_scores(5)
    input_ids = np.random.default_rng(6).integers(0, VOCAB, (4, 8))
    chain = hf.LogitsProcessorList(
        [
            hf.RepetitionPenaltyLogitsProcessor(1.2),
            hf.TemperatureLogitsWarper(0.8),
            hf.TopKLogitsWarper(20),
            hf.TopPLogitsWarper(0.9),
        ]
    )
    ours = LogitsProcessor(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    np.testing.assert_array_equal(ours(input_ids, scores, 8), hf_apply(chain, scores, input_ids))


def test_splitmix64_gives_the_reference_outputs():
    """The published splitmix64 values (Vigna's splitmix64.c) and the uniform's definition."""
    generator = SplitMix64(0)
    assert [generator.next_uint64(), generator.next_uint64()] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert SplitMix64(1234567).next_uint64() == 6457827717110365317
    assert SplitMix64(2**64 + 5).random(3).tolist() == SplitMix64(5).random(3).tolist()  # seed mod 2^64
    assert SplitMix64(9).random() == (SplitMix64(9).next_uint64() >> 11) / 2**53
    assert SplitMix64().random(4).tolist() != SplitMix64().random(4).tolist()  # no seed: the OS's entropy


def test_splitmix64_uniforms_are_uniform():
    draws = SplitMix64(3).random(20_000)
    assert ((draws >= 0) & (draws < 1)).all()
    counts = np.bincount((draws * 10).astype(int), minlength=10)
    chi_square = ((counts - 2000) ** 2 / 2000).sum()
    assert chi_square < 27.9  # the 0.999 quantile for 9 degrees of freedom


def test_sampler_is_seeded_and_respects_filters():
    scores = apply_top_k(random_scores(7, batch=64), 3)
    first = sample(scores, SplitMix64(11))
    np.testing.assert_array_equal(first, sample(scores, SplitMix64(11)))
    assert (first != sample(scores, SplitMix64(12))).any()
    allowed = np.isfinite(scores)
    assert allowed[np.arange(64), first].all()


def test_sampler_follows_the_distribution():
    scores = np.log(np.array([[0.7, 0.2, 0.1, 0.0]], dtype=np.float32) + 1e-30)
    scores[0, 3] = -np.inf
    rng = SplitMix64(0)
    draws = [int(sample(scores, rng)[0]) for _ in range(4000)]
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(frequencies, [0.7, 0.2, 0.1, 0.0], atol=0.03)


def test_sampler_draws_by_inverse_cdf_in_token_order():
    """Hand-computed: weights 1, 2, 1 give cumulative 1, 3, 4; a uniform u picks the first above 4u."""

    class Fixed:
        def __init__(self, values):
            self.values = values

        def random(self, size):
            return np.asarray(self.values[:size], dtype=np.float64)

    scores = np.log(np.array([[1.0, 2.0, 1.0]] * 4, dtype=np.float32))
    np.testing.assert_array_equal(sample(scores, Fixed([0.0, 0.2499, 0.25, 0.9999])), [0, 0, 1, 2])


def test_sampling_without_replacement_gives_distinct_draws_in_distribution():
    scores = np.log(np.array([[0.5, 0.3, 0.2, 0.0]], dtype=np.float32) + 1e-30)
    scores[0, 3] = -np.inf
    rng = SplitMix64(1)
    pairs = [tuple(sample_without_replacement(scores, 2, rng)[0]) for _ in range(3000)]
    assert all(a != b and 3 not in (a, b) for a, b in pairs)
    first = np.bincount([a for a, _ in pairs], minlength=4) / len(pairs)
    np.testing.assert_allclose(first, [0.5, 0.3, 0.2, 0.0], atol=0.03)
    # the second draw, given the first was token 0: 0.3 / 0.5 and 0.2 / 0.5
    after_zero = [b for a, b in pairs if a == 0]
    np.testing.assert_allclose(np.bincount(after_zero, minlength=4)[1] / len(after_zero), 0.6, atol=0.04)
    with pytest.raises(GenerationConfigError, match="needs 4 candidates but only 3"):
        sample_without_replacement(scores, 4, rng)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"num_return_sequences": 2}, "greedy decoding returns one sequence"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"stop_strings": [""]}, "stop_strings"),
        ({"beam_width": 3}, "unknown generation option"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": "0.5"}, "frequency_penalty"),
        ({"logit_bias": {5: float("inf")}}, "logit_bias"),
        ({"logit_bias": [(5, 1.0)]}, "logit_bias"),
    ],
)
def test_invalid_generation_parameters_are_named(options, message):
    with pytest.raises(GenerationConfigError, match=message):
        GenerationConfig.from_defaults({}, **options)


def test_logit_bias_tokens_must_be_in_the_vocabulary():
    config = GenerationConfig.from_defaults({}, logit_bias={5: 1.0, VOCAB: -1.0})
    with pytest.raises(GenerationConfigError, match=f"logit_bias {VOCAB} is outside the vocabulary"):
        config.check_token_ids(VOCAB)
    GenerationConfig.from_defaults({}, logit_bias={5: 1.0}).check_token_ids(VOCAB)


def test_manifest_defaults_then_overrides():
    config = GenerationConfig.from_defaults({"max_new_tokens": 7, "top_k": 10, "unknown": 1}, top_k=3)
    assert (config.max_new_tokens, config.top_k, config.temperature) == (7, 3, 1.0)
    assert GenerationConfig.from_defaults({}, stop_strings="\n").stop_strings == ["\n"]
