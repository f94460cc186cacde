"""POST /v1/completions: a request becomes one engine request per (prompt, choice), answered whole
or streamed as server-sent events ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

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
from gptneo_onnx.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)

# The engine's reasons that are not an answer: the HTTP status and code each one reports.
FAILED_FINISHES = {
    "cancelled": (503, "cancelled", "the request was cancelled (the server is shutting down)"),
    "timeout": (504, "request_timeout", "the request ran past the server's --request-timeout"),
    "error": (500, "generation_failed", "generation failed"),
}


@dataclass
class Choice:
    """One (prompt, choice) pair in flight: its handle and what it has produced so far."""

    index: int
    prompt_text: str
    handle: RequestHandle
    text: str = ""
    logprobs: CompletionLogprobs | None = None
    finish: FinishEvent | None = None
    arrival: float = field(default_factory=time.perf_counter)  # for time to first token
    last_token: float | None = None
    text_offset: int = 0  # where the completion starts in the returned text (after an echoed prompt)


class Completions:
    """Turns OpenAI completion requests into engine requests and engine events into answers."""

    def __init__(self, model: CausalLM, engine: Engine, metrics: ServerMetrics, model_name: str):
        self.model, self.engine, self.metrics, self.model_name = model, engine, metrics, model_name

    # ---- request -> engine requests -----------------------------------------------------------
    def prompts(self, body: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) per prompt. The engine checks the ids (vocabulary, not empty, limits)."""
        prompt = body.prompt
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        tokenizer = self.model.tokenizer
        if tokenizer is None and any(isinstance(item, str) for item in items):
            raise APIError(400, "this export has no tokenizer: send token ids", param="prompt")
        return [
            (item, tokenizer.encode(item).ids if item else [])
            if isinstance(item, str)
            else (tokenizer.decode(item, skip_special_tokens=True) if tokenizer else "", list(item))
            for item in items
        ]

    def config(self, body: CompletionRequest, prompt_length: int, seed: int | None) -> GenerationConfig:
        """The decoding parameters: OpenAI's defaults (temperature 1, top_p 1, no top_k);
        temperature 0 means greedy."""
        context = self.model.manifest.max_position_embeddings  # the engine checks the limits
        max_tokens = body.max_tokens if body.max_tokens is not None else max(1, context - prompt_length)
        max_tokens = max(max_tokens, 1)  # 0 (echo: score the prompt) decodes nothing: score_only
        temperature = 1.0 if body.temperature is None else body.temperature
        sampling = temperature > 0
        config = GenerationConfig(
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
        return config

    def submit(self, body: CompletionRequest) -> list[Choice]:
        """Submit every (prompt, choice); on a refusal, cancel what was already submitted."""
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens"
            )
        if body.suffix:
            raise APIError(
                400, "suffix is not offered: GPT-Neo completes a prompt, it does not insert", param="suffix"
            )
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not offered (it must equal n)", param="best_of")
        arrival = time.perf_counter()
        prompts = self.prompts(body)
        planned = []
        for prompt_index, (text, ids) in enumerate(prompts):
            for choice in range(body.n):
                seed = None if body.seed is None else body.seed + choice
                config = self.config(body, len(ids), seed)
                request = EngineRequest(
                    prompt_ids=ids, config=config, logprobs=body.logprobs,
                    prompt_logprobs=body.echo, score_only=body.max_tokens == 0,
                )  # fmt: skip
                planned.append((prompt_index * body.n + choice, text, request))
        choices: list[Choice] = []
        try:
            for index, text, request in planned:
                handle = self.engine.submit(request)
                choices.append(
                    Choice(index, text, handle, arrival=arrival, text_offset=len(text) if body.echo else 0)
                )
        except Exception as error:
            for choice in choices:
                choice.handle.cancel()
            if isinstance(error, (QueueFull, Draining, RequestTooLarge)):
                raise refusal(error) from error
            raise
        return choices

    # ---- engine events -> answers -------------------------------------------------------------
    def record(self, choice: Choice, event: EngineEvent) -> None:
        """Update the choice and the latency metrics with one event."""
        now = time.perf_counter()
        if isinstance(event, PromptEvent):
            choice.logprobs = self.prompt_logprobs(choice.handle.request.prompt_ids, event)
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
            if choice.logprobs is None:
                choice.logprobs = CompletionLogprobs()
            offset = choice.text_offset + len(choice.text)
            self.add_logprob(choice.logprobs, event.token_id, event.logprob, event.top_logprobs, offset)
        choice.text += event.text

    def observe_finish(self, choice: Choice, event: FinishEvent) -> None:
        metrics, handle = self.metrics, choice.handle
        metrics.prompt_tokens.inc(event.prompt_tokens)
        metrics.finished.labels(event.finish_reason).inc()
        metrics.request_duration.observe(time.perf_counter() - choice.arrival)
        if handle.admitted is not None:
            metrics.queue_time.observe(handle.admitted - handle.submitted)

    def prompt_logprobs(self, prompt_ids: list[int], event: PromptEvent) -> CompletionLogprobs:
        """The echoed prompt's entries: offsets where each token's text starts in the prompt."""
        logprobs, offset = CompletionLogprobs(), 0
        tokenizer = self.model.tokenizer
        decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        for token, value, top in zip(prompt_ids, event.token_logprobs, event.top_logprobs):
            self.add_logprob(logprobs, token, value, top, offset)
            offset += len(decoder.push(token)) if decoder is not None else 0
        return logprobs

    def add_logprob(
        self,
        logprobs: CompletionLogprobs,
        token_id: int,
        logprob: float | None,
        alternatives: dict[int, float] | None,
        offset: int,
    ) -> None:
        decode = self.token_text
        logprobs.tokens.append(decode(token_id))
        logprobs.token_logprobs.append(logprob)
        top = None
        if alternatives is not None:  # best first; tokens with the same text keep the best value
            top = {}
            for token, value in alternatives.items():
                top.setdefault(decode(token), value)
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(offset)

    def token_text(self, token_id: int) -> str:
        tokenizer = self.model.tokenizer
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)

    async def answer(self, body: CompletionRequest, request: Request) -> JSONResponse:
        """The whole answer at once (stream=false)."""
        choices = self.submit(body)
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
        response = CompletionResponse(
            id=completion_id(),
            created=int(time.time()),
            model=self.model_name,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text=(choice.prompt_text if body.echo else "") + self.final_text(choice),
                    logprobs=choice.logprobs,
                    finish_reason=finish_reason(choice.finish),
                )
                for choice in choices
            ],
            usage=usage(choices, body.n),
        )
        return JSONResponse(response.model_dump())

    async def collect(self, choice: Choice) -> None:
        async for event in choice.handle:
            self.record(choice, event)

    def final_text(self, choice: Choice) -> str:
        """The engine's final text (it may hold back text that could begin a stop string until the end)."""
        return choice.finish.text if choice.finish is not None else choice.text

    def stream(self, body: CompletionRequest, request: Request) -> StreamingResponse:
        """Server-sent events: one chunk per token, a finish chunk per choice, usage if asked, [DONE]."""
        choices = self.submit(body)
        return StreamingResponse(self.events(body, choices, request), media_type="text/event-stream")

    async def events(
        self, body: CompletionRequest, choices: list[Choice], request: Request
    ) -> AsyncIterator[str]:
        ident, created = completion_id(), int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, text: str, reason: str | None = None, logprobs=None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
            response = CompletionResponse(id=ident, created=created, model=self.model_name, choices=[choice])
            return f"data: {response.model_dump_json(exclude={'usage'} if not include_usage else None)}\n\n"

        watcher = asyncio.create_task(cancel_on_disconnect(request, choices))
        try:
            scores_prompt = body.echo and body.logprobs is not None
            if body.echo and not scores_prompt:
                for choice in choices:
                    yield chunk(choice.index, choice.prompt_text)
            async for choice, event in merged(choices):
                before = len(choice.text)
                self.record(choice, event)
                if isinstance(event, PromptEvent):  # the echo, with the prompt's logprobs
                    yield chunk(choice.index, choice.prompt_text, logprobs=choice.logprobs)
                    continue
                if isinstance(event, TokenEvent):
                    logprobs = None
                    if choice.logprobs is not None:
                        logprobs = CompletionLogprobs(
                            tokens=choice.logprobs.tokens[-1:],
                            token_logprobs=choice.logprobs.token_logprobs[-1:],
                            top_logprobs=choice.logprobs.top_logprobs[-1:],
                            text_offset=choice.logprobs.text_offset[-1:],
                        )
                    yield chunk(choice.index, choice.text[before:], logprobs=logprobs)
                    continue
                failure = finish_error(event)
                if failure is not None:
                    yield failure.sse()
                    return
                rest = event.text[len(choice.text) :] if event.text.startswith(choice.text) else ""
                yield chunk(choice.index, rest, finish_reason(event))
            if include_usage:
                usage_chunk = CompletionResponse(
                    id=ident, created=created, model=self.model_name, choices=[], usage=usage(choices, body.n)
                )
                yield f"data: {usage_chunk.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as error:  # a failure mid-stream: an error event, then the stream closes
            yield APIError(500, f"generation failed: {error}", code="generation_failed").sse()
        finally:
            watcher.cancel()
            for choice in choices:
                choice.handle.cancel()


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


def usage(choices: list[Choice], n: int) -> Usage:
    """Prompt tokens once per prompt, completion tokens summed over every choice."""
    prompt = sum(choice.finish.prompt_tokens for choice in choices if choice.index % n == 0)
    completion = sum(choice.finish.completion_tokens for choice in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def logit_bias(body: CompletionRequest) -> dict[int, float] | None:
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


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"
