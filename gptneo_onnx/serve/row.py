"""One row of the running batch: its own processors, seeded RNG, stop strings and history.

A row sees only its own prompt and tokens, never its neighbours' padding, so a request gives
the same tokens alone, in a crowd, and through `CausalLM.generate` with that one prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tokenizers import Tokenizer

from gptneo_onnx.runtime import (
    IncrementalDecoder,
    StopStringFilter,
    check_choices,
    check_finite,
    log_softmax,
    sample,
    seeded_rng,
)
from gptneo_onnx.serve.requests import FinishEvent, PromptEvent, RequestHandle, TokenEvent

LOGPROB_CHUNK = 256  # positions per float64 log-softmax when scoring a prompt (~100 MB at 50k tokens)


def chosen_logprobs(
    logits: np.ndarray, chosen: list[int], k: int
) -> tuple[list[float], list[dict[int, float]]]:
    """For each position of `logits` (P, V), the log-probability of its chosen token and the top
    k tokens' (best first), from the model's raw logits in float64 (vLLM's raw logprobs)."""
    values, tops = [], []
    for start in range(0, len(chosen), LOGPROB_CHUNK):
        logprobs = log_softmax(logits[start : start + LOGPROB_CHUNK].astype(np.float64))
        k = min(k, logprobs.shape[-1])
        for row, token in zip(logprobs, chosen[start : start + LOGPROB_CHUNK]):
            values.append(float(row[token]))
            top = np.argpartition(-row, k - 1)[:k] if k else []
            tops.append({int(t): float(row[t]) for t in sorted(top, key=lambda t: -row[t])})
    return values, tops


class Row:
    def __init__(
        self,
        handle: RequestHandle,
        eos_token_ids: list[int],
        tokenizer: Tokenizer | None,
        stop_check: Callable[[list[int]], bool] | None,
    ):
        request = handle.request
        self.handle = handle
        self.config = config = request.config
        self.logprobs = request.logprobs
        self.scores_prompt = request.prompt_logprobs and request.logprobs is not None
        self.score_only = request.score_only
        self.processor = config.processor(eos_token_ids)
        self.rng = seeded_rng(config.seed)
        self.eos = set(eos_token_ids)
        self.stop_check = stop_check
        prompt = request.prompt_ids
        self.prompt_length = len(prompt)
        self.max_new_tokens = config.max_new_tokens
        # prompt + new tokens, for the repetition penalty and min_new_tokens
        self.ids = np.zeros((1, len(prompt) + config.max_new_tokens), np.int64)
        self.ids[0, : len(prompt)] = prompt
        self.generated: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = StopStringFilter(config.stop_strings)
        self.text = ""
        self.done = False

    def advance(self, logits: np.ndarray) -> tuple[TokenEvent, str | None]:
        """Choose the next token from this row's last-position logits (V,); returns its event and
        the finish reason when the row is done ("stop" or "length")."""
        row = logits[None, :]
        check_finite(row)
        length = self.prompt_length + len(self.generated)
        scores = self.processor(self.ids[:, :length], row, self.prompt_length)
        check_choices(scores)
        token = int((sample(scores, self.rng) if self.config.do_sample else scores.argmax(axis=-1))[0])
        self.ids[0, length] = token
        self.generated.append(token)
        piece = "" if self.decoder is None else self.stops.push(self.decoder.push(token))
        stopped = self.stops.stopped or (self.stop_check is not None and self.stop_check(self.generated))
        reason = None
        if token in self.eos or stopped:
            reason = "stop"
        elif len(self.generated) == self.config.max_new_tokens:
            reason = "length"
        if reason is not None and self.decoder is not None:
            piece += self.stops.push(self.decoder.flush()) + self.stops.flush()
        self.text += piece
        event = TokenEvent(token, piece)
        if self.logprobs is not None:
            [event.logprob], [event.top_logprobs] = chosen_logprobs(logits[None], [token], self.logprobs)
        return event, reason

    def prompt_event(self, logits: np.ndarray) -> PromptEvent:
        """The prompt's log-probabilities from the prefill's logits (prompt length, V): position i
        predicts prompt token i + 1."""
        prompt = self.ids[0, 1 : self.prompt_length].tolist()
        values, tops = chosen_logprobs(logits[: self.prompt_length - 1], prompt, self.logprobs or 0)
        return PromptEvent([None, *values], [None, *tops])

    def finish(self, reason: str, error: str | None = None) -> None:
        self.done = True
        self.handle.put(FinishEvent(reason, self.prompt_length, len(self.generated), self.text, error))
