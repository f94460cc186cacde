"""What flows in and out of the engine: requests, limits, events, handles and admission errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from gptneo_onnx.runtime import GenerationConfig


@dataclass
class EngineRequest:
    """One completion: prompt token ids and decoding parameters (num_beams and
    num_return_sequences must stay 1; the HTTP layer submits `n` requests for `n` choices)."""

    prompt_ids: list[int]
    config: GenerationConfig
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    # with logprobs: the prompt's tokens get theirs too, in a PromptEvent (OpenAI's echo + logprobs)
    prompt_logprobs: bool = False
    # no new token: the request ends after its prompt, "length" (OpenAI's echo with max_tokens 0)
    score_only: bool = False


@dataclass
class PromptEvent:
    """The prompt's log-probabilities, before the first token (a request with prompt_logprobs):
    one entry per prompt token, None for the first (nothing predicts it)."""

    token_logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]


@dataclass
class TokenEvent:
    """One generated token and the text it completes (may be "": an unfinished character, EOS, or
    text held back while it may start a stop string)."""

    token_id: int
    text: str
    logprob: float | None = None  # log-softmax of the model's raw logits (vLLM's raw logprobs)
    top_logprobs: dict[int, float] | None = None


@dataclass
class FinishEvent:
    """The last event of a request."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "timeout" | "error"
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion text, cut before a stop string
    error: str | None = None


EngineEvent = PromptEvent | TokenEvent | FinishEvent


class QueueFull(Exception):
    """Every slot and the queue are taken (HTTP 429); `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Draining(Exception):
    """The engine is draining or stopped and admits nothing new (HTTP 503)."""


class RequestTooLarge(ValueError):
    """The prompt or prompt + max_new_tokens pass a token limit (HTTP 400 context_length_exceeded)."""


@dataclass
class EngineLimits:
    max_concurrent: int = 8  # slots: rows in the running batch
    max_queue: int = 64  # requests waiting for a slot
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None  # prompt + max_new_tokens
    request_timeout: float | None = None  # seconds from submit to the last token


class RequestHandle:
    """The caller's side of a request: iterate its events (blocking or async), or cancel it.

    Events are a PromptEvent (requests with prompt_logprobs), TokenEvents, then exactly one
    FinishEvent. One consumer per handle.
    """

    def __init__(self, request: EngineRequest, deadline: float | None):
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.submitted = time.monotonic()
        self.admitted: float | None = None  # time.monotonic() when it took a slot
        self.deadline = deadline  # time.monotonic() past which the request times out
        self.cancelled = threading.Event()
        self._ready = threading.Condition()
        self._events: deque[EngineEvent] = deque()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None

    def cancel(self) -> None:
        """Give up the request: the engine frees its slot before its next step."""
        self.cancelled.set()

    def put(self, event: EngineEvent) -> None:
        """Called by the engine thread."""
        with self._ready:
            if self._async is None:
                self._events.append(event)
                self._ready.notify_all()
                return
            loop, queue = self._async
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self.cancel()

    def __iter__(self) -> Iterator[EngineEvent]:
        while True:
            with self._ready:
                while not self._events:
                    self._ready.wait()
                event = self._events.popleft()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        with self._ready:
            for event in self._events:
                queue.put_nowait(event)
            self._events.clear()
            self._async = (asyncio.get_running_loop(), queue)
        while True:
            event = await queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return
