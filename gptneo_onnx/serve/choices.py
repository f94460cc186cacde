"""What /v1/completions and /v1/chat/completions share: a request's choices in flight on the
engine (one engine request per prompt and candidate), their decoding parameters, the latency
metrics, cancellation on disconnect, usage and the engine's refusals as HTTP errors. Each
endpoint only turns the choices into its own answer shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from gptneo_onnx.runtime import CausalLM, GenerationConfig, IncrementalDecoder
from gptneo_onnx.serve.engine import (
    Draining,
    Engine,
    EngineEvent,
    EngineRequest,
    FinishEvent,
    PromptEvent,
    QueueFull,
    RequestHandle,
    RequestTooLarge,
    TokenEvent,
)
from gptneo_onnx.serve.errors import APIError
from gptneo_onnx.serve.metrics import ServerMetrics
from gptneo_onnx.serve.protocol import SamplingRequest, Usage

# The engine's reasons that are not an answer: the HTTP status and code each one reports.
FAILED_FINISHES = {
    "cancelled": (503, "cancelled", "the request was cancelled (the server is shutting down)"),
    "timeout": (504, "request_timeout", "the request ran past the server's --request-timeout"),
    "error": (500, "generation_failed", "generation failed"),
}


@dataclass
class LogprobEntry:
    """One token's log-probability, its best alternatives (id -> logprob, best first) and where
    its text starts in the returned text."""

    token_id: int
    logprob: float | None
    top: dict[int, float] | None
    offset: int


@dataclass
class Choice:
    """One (prompt, candidate) pair in flight: its handle and what it has produced so far."""

    prompt_index: int
    candidate: int  # 0 .. n-1 (or best_of-1) for its prompt
    prompt_text: str
    handle: RequestHandle
    text: str = ""
    entries: list[LogprobEntry] = field(default_factory=list)  # generated tokens, with logprobs
    prompt_entries: list[LogprobEntry] | None = None  # the prompt's (echo with logprobs)
    finish: FinishEvent | None = None
    arrival: float = field(default_factory=time.perf_counter)  # for time to first token
    last_token: float | None = None
    text_offset: int = 0  # where the completion starts in the returned text (after an echoed prompt)

    def final_text(self) -> str:
        """The engine's final text (it may hold back text that could begin a stop string until the end)."""
        return self.finish.text if self.finish is not None else self.text

    def cumulative_logprob(self) -> float:
        return sum(entry.logprob for entry in self.entries if entry.logprob is not None)


@dataclass
class Plan:
    """How a request's prompts become engine requests."""

    candidates: int  # engine requests per prompt (n, or best_of)
    max_tokens: int | None  # None: up to the context
    logprobs: int | None = None  # the engine's: None, or the chosen token's and the top k
    echo: bool = False
    score_only: bool = False


class ChoiceRunner:
    """Submits a request's choices to the engine and follows their events. An endpoint gives
    `submit(body)` (its prompts and plan, through `start`), `answer` and `events`."""

    def __init__(self, model: CausalLM, engine: Engine, metrics: ServerMetrics, model_name: str):
        self.model, self.engine, self.metrics, self.model_name = model, engine, metrics, model_name

    # ---- request -> engine requests -----------------------------------------------------------
    def config(
        self, body: SamplingRequest, max_tokens: int | None, prompt_length: int, seed: int | None
    ) -> GenerationConfig:
        """The decoding parameters: OpenAI's defaults (temperature 1, top_p 1, no top_k);
        temperature 0 means greedy."""
        context = self.model.manifest.max_position_embeddings  # the engine checks the limits
        max_tokens = max_tokens if max_tokens is not None else max(1, context - prompt_length)
        max_tokens = max(max_tokens, 1)  # 0 (echo: score the prompt) decodes nothing: score_only
        temperature = 1.0 if body.temperature is None else body.temperature
        sampling = temperature > 0
        return GenerationConfig(
            max_new_tokens=max_tokens,
            min_new_tokens=body.min_tokens or 0,
            do_sample=sampling,
            temperature=temperature if sampling else 1.0,
            top_k=body.top_k or 0,
            top_p=1.0 if body.top_p is None else body.top_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=seed,
            stop_strings=list(body.stop or []),
            eos_token_id=list(self.model.manifest.eos_token_ids) or None,
            logit_bias=logit_bias(body),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
        )  # the engine validates it (token ids within the vocabulary included)

    def start(self, body: SamplingRequest, prompts: list[tuple[str, list[int]]], plan: Plan) -> list[Choice]:
        """Submit every (prompt, candidate); candidate c of a seeded request samples with seed + c.
        On a refusal, cancel what was already submitted."""
        arrival = time.perf_counter()
        planned = []
        for prompt_index, (text, ids) in enumerate(prompts):
            for candidate in range(plan.candidates):
                seed = None if body.seed is None else body.seed + candidate
                request = EngineRequest(
                    prompt_ids=ids, config=self.config(body, plan.max_tokens, len(ids), seed),
                    logprobs=plan.logprobs, prompt_logprobs=plan.echo, score_only=plan.score_only,
                )  # fmt: skip
                planned.append((prompt_index, candidate, text, request))
        choices: list[Choice] = []
        try:
            for prompt_index, candidate, text, request in planned:
                handle = self.engine.submit(request)
                offset = len(text) if plan.echo else 0
                choices.append(
                    Choice(prompt_index, candidate, text, handle, arrival=arrival, text_offset=offset)
                )
        except Exception as error:
            for choice in choices:
                choice.handle.cancel()
            if isinstance(error, (QueueFull, Draining, RequestTooLarge)):
                raise refusal(error) from error
            raise
        return choices

    # ---- engine events ------------------------------------------------------------------------
    def record(self, choice: Choice, event: EngineEvent) -> None:
        """Update the choice and the latency metrics with one event."""
        now = time.perf_counter()
        if isinstance(event, PromptEvent):
            choice.prompt_entries = self.prompt_entries(choice.handle.request.prompt_ids, event)
            return
        if isinstance(event, FinishEvent):
            choice.finish = event
            self.observe_finish(choice, event)
            return
        if choice.last_token is None:
            self.metrics.time_to_first_token.observe(now - choice.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - choice.last_token)
        choice.last_token = now
        self.metrics.generated_tokens.inc()
        if event.logprob is not None:
            offset = choice.text_offset + len(choice.text)
            choice.entries.append(LogprobEntry(event.token_id, event.logprob, event.top_logprobs, offset))
        choice.text += event.text

    def observe_finish(self, choice: Choice, event: FinishEvent) -> None:
        metrics, handle = self.metrics, choice.handle
        metrics.prompt_tokens.inc(event.prompt_tokens)
        metrics.finished.labels(event.finish_reason).inc()
        metrics.request_duration.observe(time.perf_counter() - choice.arrival)
        if handle.admitted is not None:
            metrics.queue_time.observe(handle.admitted - handle.submitted)

    def prompt_entries(self, prompt_ids: list[int], event: PromptEvent) -> list[LogprobEntry]:
        """The echoed prompt's entries: offsets where each token's text starts in the prompt."""
        entries, offset = [], 0
        tokenizer = self.model.tokenizer
        decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        for token, value, top in zip(prompt_ids, event.token_logprobs, event.top_logprobs):
            entries.append(LogprobEntry(token, value, top, offset))
            offset += len(decoder.push(token)) if decoder is not None else 0
        return entries

    def token_text(self, token_id: int) -> str:
        tokenizer = self.model.tokenizer
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)

    def stream(self, body: SamplingRequest, request: Request) -> StreamingResponse:
        """Server-sent events from the endpoint's `events`. Submitting happens here, before the
        response starts, so a refusal is still an HTTP error and not an event."""
        choices = self.submit(body)
        return StreamingResponse(guarded(self.events(body, choices, request)), media_type="text/event-stream")

    async def finish_all(self, choices: list[Choice], request: Request) -> None:
        """Wait for every choice (cancelling them all if the client goes away); raise the first
        failure as its HTTP error."""
        watcher = asyncio.create_task(cancel_on_disconnect(request, choices))
        try:
            await asyncio.gather(*(self.collect(choice) for choice in choices))
        finally:
            watcher.cancel()
            for choice in choices:
                choice.handle.cancel()
        for choice in choices:
            failure = finish_error(choice.finish)
            if failure is not None:
                raise failure

    async def collect(self, choice: Choice) -> None:
        async for event in choice.handle:
            self.record(choice, event)

    async def follow(
        self, choices: list[Choice], request: Request
    ) -> AsyncIterator[tuple[Choice, EngineEvent, str]]:
        """Every choice's events as they come, recorded, each with the text it adds: a token's new
        text, or at the finish the text held back until then. Cancels every choice at the end,
        or when the client goes away."""
        watcher = asyncio.create_task(cancel_on_disconnect(request, choices))
        try:
            async for choice, event in merged(choices):
                before = choice.text
                self.record(choice, event)
                if isinstance(event, TokenEvent):
                    added = choice.text[len(before) :]
                elif isinstance(event, FinishEvent):
                    added = event.text[len(before) :] if event.text.startswith(before) else ""
                else:
                    added = ""
                yield choice, event, added
        finally:
            watcher.cancel()
            for choice in choices:
                choice.handle.cancel()


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A failure mid-stream: an error event, then the stream closes. Closing this closes `events`
    at once (its choices are cancelled then, not when it is collected)."""
    try:
        async for event in events:
            yield event
    except Exception as error:
        yield APIError(500, f"generation failed: {error}", code="generation_failed").sse()
    finally:
        await events.aclose()


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, EngineEvent]]:
    """The events of every choice, as they come."""
    if len(choices) == 1:
        async for event in choices[0].handle:
            yield choices[0], event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for event in choice.handle:
                await queue.put((choice, event))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        open_choices = len(choices)
        while open_choices:
            choice, event = await queue.get()
            if event is None:
                open_choices -= 1
            else:
                yield choice, event
    finally:
        for task in tasks:
            task.cancel()


async def cancel_on_disconnect(request: Request, choices: list[Choice]) -> None:
    """Cancel every choice when the client goes away (the body has been read: the next ASGI
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for choice in choices:
                choice.handle.cancel()
            return


def usage(choices: list[Choice]) -> Usage:
    """Prompt tokens once per prompt, completion tokens summed over every candidate (best_of's
    discarded ones too: they were decoded)."""
    prompt = sum(choice.finish.prompt_tokens for choice in choices if choice.candidate == 0)
    completion = sum(choice.finish.completion_tokens for choice in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def logit_bias(body: SamplingRequest) -> dict[int, float] | None:
    """OpenAI's logit_bias has token ids as JSON keys (strings); the runtime takes integers."""
    return {int(token): bias for token, bias in body.logit_bias.items()} if body.logit_bias else None


def finish_reason(finish: FinishEvent) -> str:
    return "stop" if finish.finish_reason == "stop" else "length"


def finish_error(finish: FinishEvent | None) -> APIError | None:
    """The error a finish reports, or None when it is an answer (stop or length)."""
    if finish is None:
        return APIError(500, "the engine ended a request without finishing it", code="generation_failed")
    if finish.finish_reason not in FAILED_FINISHES:
        return None
    status, code, message = FAILED_FINISHES[finish.finish_reason]
    return APIError(status, f"{message}: {finish.error}" if finish.error else message, code=code)


def refusal(error: Exception) -> APIError:
    """The engine's admission errors as answers: 429 (with Retry-After), 503, 400."""
    if isinstance(error, QueueFull):
        retry_after = getattr(error, "retry_after", None) or 1.0
        return APIError(429, f"the server is busy: {error}", code="queue_full", retry_after=retry_after)
    if isinstance(error, Draining):
        return APIError(503, "the server is shutting down and admits no new requests", code="draining")
    return APIError(400, str(error), code="context_length_exceeded", param="prompt")
