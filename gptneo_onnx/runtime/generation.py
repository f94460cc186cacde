"""Decoding parameters and greedy / sampling decoding as a generator of typed steps.

The loop mirrors transformers' `generate` (`_sample`): the same processors in the same order,
finished rows get `pad_token_id`, and a row stops at EOS, at a stop string, or at
`max_new_tokens`. `generate` style one-shot calls just consume the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from gptneo_onnx.runtime.errors import GenerationConfigError, NumericalError
from gptneo_onnx.runtime.sampling import LogitsProcessor, SplitMix64, sample

# forward(input_ids, attention_mask, cache) -> (last-position logits (B, V) float32, cache)
ForwardFn = Callable[[np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]
StopCheck = Callable[[list[int]], bool]  # new tokens of one row -> hit a stop string?


@dataclass
class GenerationConfig:
    """Decoding parameters; `GenerationConfig.from_manifest` takes the export's defaults."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None
    truncate: bool = False
    prompt_lookup_num_tokens: int | None = None  # draft tokens per step (runtime/prompt_lookup.py)
    # token id -> a number added to its logit before every other processor (OpenAI's logit_bias;
    # transformers' sequence_bias with one-token sequences)
    logit_bias: dict[int, float] | None = None
    # OpenAI's penalties on the tokens generated so far (not the prompt): each logit loses
    # frequency_penalty per occurrence, and presence_penalty once if the token occurred
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if _is_int(self.eos_token_id):
            self.eos_token_id = [self.eos_token_id]
        if isinstance(self.early_stopping, np.bool_):  # beam search compares with `is True`
            self.early_stopping = bool(self.early_stopping)

    @classmethod
    def from_defaults(cls, defaults: dict[str, Any], **overrides: Any) -> GenerationConfig:
        """Build from a manifest's `generation` object plus overrides; None overrides are ignored."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise GenerationConfigError(
                f"unknown generation option(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(known))}"
            )
        settings = {key: value for key, value in defaults.items() if key in known and value is not None}
        settings.update({key: value for key, value in overrides.items() if value is not None})
        config = cls(**settings)
        config.validate()
        return config

    def updated(self, **overrides: Any) -> GenerationConfig:
        config = replace(self, **{key: value for key, value in overrides.items() if value is not None})
        config.validate()
        return config

    def validate(self) -> None:
        """Raise GenerationConfigError naming the first invalid parameter and its valid range.

        Every check guards its own type first, so a wrong type (a str, None, NaN) is reported
        as that parameter's error, never as a TypeError from a comparison.
        """
        checks = [
            (
                _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                "max_new_tokens must be an integer >= 1",
            ),
            (
                _is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
                "min_new_tokens must be an integer >= 0",
            ),
            (_is_bool(self.do_sample), "do_sample must be True or False"),
            (
                _is_real(self.temperature) and self.temperature >= 0,
                "temperature must be a finite number >= 0 (it only applies when sampling)",
            ),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables top-k)"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p must be a number in (0, 1]"),
            (
                _is_real(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty must be a finite number > 0 (1.0 = no penalty)",
            ),
            (_is_real(self.presence_penalty), "presence_penalty must be a finite number (0 = none)"),
            (_is_real(self.frequency_penalty), "frequency_penalty must be a finite number (0 = none)"),
            (_is_int(self.num_beams) and self.num_beams >= 1, "num_beams must be an integer >= 1"),
            (_is_real(self.length_penalty), "length_penalty must be a finite number"),
            (
                _is_int(self.num_return_sequences) and self.num_return_sequences >= 1,
                "num_return_sequences must be an integer >= 1",
            ),
            (
                any(self.early_stopping is value for value in (True, False))
                or self.early_stopping == "never",
                "early_stopping must be true, false or 'never'",
            ),
            (self.seed is None or (_is_int(self.seed) and self.seed >= 0), "seed must be an integer >= 0"),
            (
                not self.do_sample or (_is_real(self.temperature) and self.temperature > 0),
                "temperature must be > 0 when sampling (use do_sample=False for greedy)",
            ),
            (
                isinstance(self.stop_strings, (list, tuple))
                and all(isinstance(s, str) and s for s in self.stop_strings),
                "stop_strings must be non-empty strings",
            ),
            (
                self.eos_token_id is None
                or (isinstance(self.eos_token_id, (list, tuple)) and all(map(_is_int, self.eos_token_id))),
                "eos_token_id must be a token id or a list of token ids",
            ),
            (self.pad_token_id is None or _is_int(self.pad_token_id), "pad_token_id must be a token id"),
            (_is_bool(self.truncate), "truncate must be True or False"),
            (
                self.prompt_lookup_num_tokens is None
                or (_is_int(self.prompt_lookup_num_tokens) and self.prompt_lookup_num_tokens >= 1),
                "prompt_lookup_num_tokens must be an integer >= 1 (or None: off)",
            ),
            (
                self.logit_bias is None
                or (
                    isinstance(self.logit_bias, dict)
                    and all(_is_int(token) and token >= 0 for token in self.logit_bias)
                    and all(_is_real(bias) for bias in self.logit_bias.values())
                ),
                "logit_bias must map token ids (integers >= 0) to finite numbers",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationConfigError(f"{message}; got {self._describe(message)}")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise GenerationConfigError(
                "greedy decoding returns one sequence per prompt; set do_sample=True or num_beams > 1 "
                f"to get num_return_sequences={self.num_return_sequences}"
            )
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise GenerationConfigError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})"
            )

    def check_token_ids(self, vocab_size: int) -> None:
        """eos_token_id, pad_token_id and logit_bias's tokens, when set, must be in the
        vocabulary [0, vocab_size)."""
        for name in ("eos_token_id", "pad_token_id", "logit_bias"):
            value = getattr(self, name)
            value = list(value) if isinstance(value, dict) else value
            for token in value if isinstance(value, list) else [] if value is None else [value]:
                if not 0 <= token < vocab_size:
                    raise GenerationConfigError(
                        f"{name} {token} is outside the vocabulary [0, {vocab_size}) of this export"
                    )

    def _describe(self, message: str) -> str:
        name = message.split()[0]
        return f"{name}={getattr(self, name)!r}"

    def processor(self, eos_token_ids: list[int]) -> LogitsProcessor:
        """The logits processors for this config (beam sampling keeps len(eos) + 1 tokens)."""
        keep = max(2, len(eos_token_ids) + 1) if self.num_beams > 1 else 1
        return LogitsProcessor(
            do_sample=self.do_sample,
            temperature=float(self.temperature),
            top_k=int(self.top_k),
            top_p=float(self.top_p),
            repetition_penalty=float(self.repetition_penalty),
            min_new_tokens=int(self.min_new_tokens),
            eos_token_ids=eos_token_ids,
            min_tokens_to_keep=keep if self.do_sample else 1,
            logit_bias=self.logit_bias,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool, str, None, NaN or infinity)."""
    if _is_int(value):
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isfinite(value))


@dataclass
class TokenStep:
    """One decoding step: the token appended to each row (pad once a row has finished)."""

    step: int
    token_ids: np.ndarray  # (B,) int64
    active: np.ndarray  # (B,) bool: rows that produced a real token this step
    finished: np.ndarray  # (B,) bool: rows that have stopped, this step included


@dataclass
class GenerationResult:
    """The final event: new tokens per returned sequence (nothing after the stop), and why each stopped."""

    sequences: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop_string" or "length"
    prompt_index: list[int]  # which prompt (row of the batch) each sequence continues
    scores: list[float] | None = None  # beam scores (length-penalized sum of log-probabilities)
    texts: list[str] | None = None  # decoded new text (cut before a stop string), when there is a tokenizer


def check_finite(logits: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Raise NumericalError when the logits of the given rows hold NaN or Inf."""
    values = logits if rows is None else logits[rows]
    if not np.isfinite(values).all():
        bad = "NaN" if np.isnan(values).any() else "Inf"
        raise NumericalError(
            f"the model produced {bad} logits; the export may overflow in its precision "
            "(try a float32 export) or the weights are corrupted"
        )


def check_choices(scores: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Raise GenerationConfigError when the processors left a row with no token to choose."""
    values = scores if rows is None else scores[rows]
    if not (values > -np.inf).any(axis=-1).all():
        raise GenerationConfigError(
            "every token was filtered out, so there is none to choose: eos_token_id may cover the "
            "whole vocabulary while min_new_tokens still suppresses it"
        )


def seeded_rng(seed: int | None) -> SplitMix64:
    """The generator one generation (or one served request) samples from: the portable
    SplitMix64 of docs/sidecar.md, so the Node runner draws the same tokens for the same seed."""
    return SplitMix64(seed)


def decode(
    forward: ForwardFn,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    eos_token_ids: list[int],
    pad_token_id: int,
    stop_check: StopCheck | None = None,
) -> Iterator[TokenStep | GenerationResult]:
    """Greedy or sampling decoding; yields a TokenStep per step, then one GenerationResult.

    `input_ids` / `attention_mask` are (B, S), left-padded. Rows are repeated
    `num_return_sequences` times when sampling, as transformers does.
    """
    repeat = config.num_return_sequences if config.do_sample else 1
    tokens = np.repeat(input_ids, repeat, axis=0)
    mask = np.repeat(attention_mask, repeat, axis=0)
    batch, prompt_length = tokens.shape
    processor = config.processor(eos_token_ids)
    rng = seeded_rng(config.seed)
    eos = np.asarray(eos_token_ids, dtype=np.int64)
    active = np.ones(batch, dtype=bool)
    reasons: list[str | None] = [None] * batch
    lengths = np.zeros(batch, dtype=np.int64)

    logits, cache = forward(tokens, mask, None)
    for step in range(config.max_new_tokens):
        check_finite(logits, active)
        scores = processor(tokens, logits, prompt_length)
        check_choices(scores, active)
        next_tokens = sample(scores, rng) if config.do_sample else scores.argmax(axis=-1).astype(np.int64)
        next_tokens = np.where(active, next_tokens, pad_token_id)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        produced = active.copy()
        lengths += produced
        for row in np.flatnonzero(produced):
            if eos.size and next_tokens[row] in eos:
                reasons[row] = "eos"
            elif stop_check is not None and stop_check(tokens[row, prompt_length:].tolist()):
                reasons[row] = "stop_string"
            elif step + 1 == config.max_new_tokens:
                reasons[row] = "length"
            if reasons[row] is not None:
                active[row] = False
        yield TokenStep(step=step, token_ids=next_tokens, active=produced, finished=~active)
        if not active.any():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        logits, cache = forward(next_tokens[:, None], mask, cache)
    yield GenerationResult(
        sequences=[
            tokens[row, prompt_length : prompt_length + lengths[row]].tolist() for row in range(batch)
        ],
        finish_reasons=[reason or "length" for reason in reasons],
        prompt_index=[row // repeat for row in range(batch)],
    )
