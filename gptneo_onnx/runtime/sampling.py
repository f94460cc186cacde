"""Logits processors and the sampler, in numpy, matching transformers' processors exactly.

Every processor takes `scores` of shape (batch, vocab) float32 and returns a new array; none
modifies its input. Filtered entries become -inf.

Sampling draws from `SplitMix64`, a small generator written out in docs/sidecar.md ("Seeded
sampling"), by one exact rule, so the Node runner (clients/node/lib/sampling.js) draws the same
tokens for the same seed.
"""

from __future__ import annotations

import secrets

import numpy as np

from gptneo_onnx.runtime.errors import GenerationConfigError

NEG_INF = np.float32(-np.inf)


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """transformers' TemperatureLogitsWarper: scores / temperature.

    A temperature so small that the division overflows float32 would turn scores into inf and
    the softmax into NaN. Those rows are shifted by their maximum first (softmax, top-k and top-p
    do not change under a per-row shift), so the best tokens stay at 0 and the rest go towards
    -inf: the limit of temperature -> 0, greedy among the best tokens.
    """
    if not temperature > 0:
        raise GenerationConfigError(
            f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy"
        )
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = scores / np.float32(temperature)  # np.float32 of 1e300 is inf, of 1e-50 is 0
    scaled[np.isneginf(scores)] = NEG_INF  # filtered tokens stay filtered (-inf / inf would be NaN)
    rows = (np.isfinite(scores) & ~np.isfinite(scaled)).any(axis=-1)
    if rows.any():
        wide = scores[rows].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            shifted = (wide - wide.max(axis=-1, keepdims=True)) / float(temperature)
            scaled[rows] = np.where(np.isnan(shifted), -np.inf, shifted).astype(np.float32)
    return scaled


def apply_top_k(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' TopKLogitsWarper: keep the k highest scores (ties with the k-th stay)."""
    if top_k <= 0:
        raise GenerationConfigError(f"top_k must be a positive integer here (0 disables it), got {top_k}")
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth_largest = np.partition(scores, -k, axis=-1)[..., -k, None]
    return np.where(scores < kth_largest, NEG_INF, scores)


def apply_top_p(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' TopPLogitsWarper: keep the smallest set of tokens whose probability sums to top_p."""
    if not 0 < top_p <= 1:
        raise GenerationConfigError(f"top_p must be in (0, 1], got {top_p}")
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= np.float32(1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, scores)


def apply_repetition_penalty(input_ids: np.ndarray, scores: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: every token seen in the row is penalized once.

    Like transformers, `input_ids` is the whole row, prompt and padding included.
    """
    if not penalty > 0:
        raise GenerationConfigError(f"repetition_penalty must be > 0 (1.0 = none), got {penalty}")
    seen = np.take_along_axis(scores, input_ids, axis=-1)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        factor = np.float32(penalty)  # 0 or inf for penalties beyond float32's range (no warning)
        penalized = np.where(seen < 0, seen * factor, seen / factor).astype(scores.dtype)
    # An extreme penalty can overflow: keep such scores at float32's largest finite values
    # (0 / an underflowed penalty is 0), so no inf or NaN reaches the softmax.
    largest = np.finfo(scores.dtype).max
    bounded = np.clip(np.where(np.isnan(penalized), 0, penalized), -largest, largest)
    penalized = np.where(np.isfinite(seen), bounded, seen)
    result = scores.copy()
    np.put_along_axis(result, input_ids, penalized, axis=-1)
    return result


def apply_logit_bias(scores: np.ndarray, token_ids: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Add `biases` to the scores of `token_ids` in every row: OpenAI's logit_bias, and
    transformers' SequenceBiasLogitsProcessor where every biased sequence is one token."""
    result = scores.copy()
    result[..., token_ids] += biases
    return result


def apply_presence_frequency_penalty(
    generated: np.ndarray, scores: np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """OpenAI's presence and frequency penalties, counted over each row's generated tokens (as
    vLLM does; the prompt is not counted): score[j] -= frequency * count[j] + presence * (count[j] > 0).
    `generated` is (batch, new tokens so far)."""
    result = scores.copy()
    largest = np.finfo(scores.dtype).max
    for row, tokens in enumerate(generated):
        seen, counts = np.unique(tokens, return_counts=True)
        penalized = result[row, seen].astype(np.float64) - (frequency * counts + presence)
        # extreme penalties stay within float32's finite range (as the repetition penalty does),
        # so no +inf reaches the softmax; a banned (-inf) token stays banned
        bounded = np.clip(penalized, -largest, largest)
        result[row, seen] = np.where(np.isneginf(result[row, seen]), -np.inf, bounded)
    return result


def suppress_tokens(scores: np.ndarray, token_ids: list[int]) -> np.ndarray:
    """Set the scores of `token_ids` to -inf (MinLength / MinNewTokens processors use this for EOS)."""
    result = scores.copy()
    if token_ids:
        result[..., token_ids] = NEG_INF
    return result


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in the input's dtype (all -inf rows are not expected)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


_UINT64 = (1 << 64) - 1


class SplitMix64:
    """Steele, Lea and Flood's splitmix64: uniform floats in [0, 1) from a 64-bit seed.

    `random(n)` has numpy Generator's call shape. The seed is taken modulo 2^64; None draws one
    from the OS. Each float is the top 53 bits of one output over 2^53.
    """

    def __init__(self, seed: int | None = None):
        self.state = (secrets.randbits(64) if seed is None else int(seed)) & _UINT64

    def next_uint64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _UINT64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64
        return z ^ (z >> 31)

    def random(self, size: int | None = None) -> float | np.ndarray:
        if size is None:
            return (self.next_uint64() >> 11) / 2.0**53
        return np.array([(self.next_uint64() >> 11) / 2.0**53 for _ in range(size)], dtype=np.float64)


def _draw(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The draw rule (docs/sidecar.md): per row, the first token whose float64 cumulative weight,
    summed in token order, exceeds uniform * total. (B, N) weights, (B,) uniforms -> (B,) int64."""
    cdf = np.cumsum(weights, axis=-1)
    draws = uniforms * cdf[:, -1]  # below the total: a token with weight > 0 always qualifies
    return (cdf <= draws[:, None]).sum(axis=-1).astype(np.int64)


def _weights(scores: np.ndarray) -> np.ndarray:
    """exp(score - row max) in float64: the unnormalized softmax; -inf scores weigh 0."""
    wide = scores.astype(np.float64)
    with np.errstate(invalid="ignore"):  # a row of only -inf (a finished row) gives NaN, never read
        return np.exp(wide - wide.max(axis=-1, keepdims=True))


def sample(scores: np.ndarray, rng: SplitMix64) -> np.ndarray:
    """Draw one token per row from softmax(scores); (batch, vocab) -> (batch,) int64.

    One uniform per row, in row order, finished rows included, so every runtime stays in step.
    """
    return _draw(_weights(scores), rng.random(scores.shape[0]))


def sample_without_replacement(scores: np.ndarray, count: int, rng: SplitMix64) -> np.ndarray:
    """Draw `count` distinct indices per row from softmax(scores) (beam sampling); (B, N) -> (B, count).

    Successive draws, each from the weights left after zeroing the ones already drawn.
    """
    weights = _weights(scores)
    rows = []
    for row in weights:
        available = int(np.count_nonzero(row))
        if available < count:
            raise GenerationConfigError(
                f"beam sampling needs {count} candidates but only {available} tokens survive the filters; "
                "raise top_k / top_p or lower num_beams"
            )
        row, picked = row.copy(), []
        for _ in range(count):
            picked.append(int(_draw(row[None, :], rng.random(1))[0]))
            row[picked[-1]] = 0.0
        rows.append(picked)
    return np.asarray(rows, dtype=np.int64)


class LogitsProcessor:
    """The processors `generate` applies, in transformers' order.

    Logit bias, then the repetition penalty, then OpenAI's presence and frequency penalties
    (which transformers does not have), then EOS suppression for min_new_tokens, then (when sampling)
    temperature, top-k and top-p.
    """

    def __init__(
        self,
        *,
        do_sample: bool,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        eos_token_ids: list[int] | None = None,
        min_tokens_to_keep: int = 1,
        logit_bias: dict[int, float] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ):
        bias = logit_bias or {}
        self.bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))
        self.bias_values = np.fromiter(bias.values(), np.float32, len(bias))
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.min_new_tokens = min_new_tokens
        self.eos_token_ids = list(eos_token_ids or [])
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray, prompt_length: int) -> np.ndarray:
        """Process (batch, vocab) scores; `input_ids` (batch, length) is everything so far."""
        if self.bias_ids.size:
            scores = apply_logit_bias(scores, self.bias_ids, self.bias_values)
        if self.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(input_ids, scores, self.repetition_penalty)
        if self.presence_penalty or self.frequency_penalty:
            scores = apply_presence_frequency_penalty(
                input_ids[:, prompt_length:], scores, self.presence_penalty, self.frequency_penalty
            )
        length = input_ids.shape[-1]
        if length - prompt_length < self.min_new_tokens:
            scores = suppress_tokens(scores, self.eos_token_ids)
        if self.do_sample:
            if self.temperature != 1.0:
                scores = apply_temperature(scores, self.temperature)
            if self.top_k:
                scores = apply_top_k(scores, self.top_k, self.min_tokens_to_keep)
            if self.top_p < 1.0:
                scores = apply_top_p(scores, self.top_p, self.min_tokens_to_keep)
        return scores
