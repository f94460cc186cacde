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
from gptneo_onnx.serve.requests import FinishEvent, RequestHandle, TokenEvent


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
            logprobs = log_softmax(logits.astype(np.float64))
            event.logprob = float(logprobs[token])
            k = min(self.logprobs, logprobs.size)
            top = np.argpartition(-logprobs, k - 1)[:k] if k else []
            event.top_logprobs = {int(t): float(logprobs[t]) for t in sorted(top, key=lambda t: -logprobs[t])}
        return event, reason

    def finish(self, reason: str, error: str | None = None) -> None:
        self.done = True
        self.handle.put(FinishEvent(reason, self.prompt_length, len(self.generated), self.text, error))
