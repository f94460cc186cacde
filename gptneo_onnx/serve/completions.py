"""POST /v1/completions: a request becomes one engine request per (prompt, candidate), answered
whole or streamed as server-sent events ending in `data: [DONE]`. With `best_of` > `n`, each
prompt decodes best_of candidates and answers with the n of highest cumulative log-probability."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from gptneo_onnx.serve.choices import (
    Choice,
    ChoiceRunner,
    LogprobEntry,
    Plan,
    finish_error,
    finish_reason,
    usage,
)
from gptneo_onnx.serve.engine import PromptEvent, TokenEvent
from gptneo_onnx.serve.errors import APIError
from gptneo_onnx.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)


class Completions(ChoiceRunner):
    """Turns OpenAI completion requests into engine requests and engine events into answers."""

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

    def plan(self, body: CompletionRequest) -> Plan:
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens"
            )
        if body.suffix:
            raise APIError(
                400, "suffix is not offered: GPT-Neo completes a prompt, it does not insert", param="suffix"
            )
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise APIError(400, f"best_of ({best_of}) must be >= n ({body.n})", param="best_of")
        ranked = best_of > body.n
        if ranked and body.stream:
            raise APIError(
                400, "best_of > n cannot be streamed (the best are known at the end)", param="best_of"
            )
        if ranked and body.max_tokens == 0:
            raise APIError(
                400, "best_of > n needs max_tokens >= 1: there is nothing to rank", param="best_of"
            )
        # ranking needs every candidate's token logprobs, asked for or not
        logprobs = body.logprobs if body.logprobs is not None or not ranked else 0
        return Plan(best_of, body.max_tokens, logprobs, body.echo, body.max_tokens == 0)

    def submit(self, body: CompletionRequest) -> list[Choice]:
        return self.start(body, self.prompts(body), self.plan(body))

    # ---- answers ------------------------------------------------------------------------------
    def legacy_logprobs(self, entries: list[LogprobEntry]) -> CompletionLogprobs:
        """The legacy API's shape; top_logprobs is keyed by text, so tokens with the same text
        (bytes of one character) keep the best value."""
        logprobs = CompletionLogprobs()
        for entry in entries:
            logprobs.tokens.append(self.token_text(entry.token_id))
            logprobs.token_logprobs.append(entry.logprob)
            top = None
            if entry.top is not None:  # best first
                top = {}
                for token, value in entry.top.items():
                    top.setdefault(self.token_text(token), value)
            logprobs.top_logprobs.append(top)
            logprobs.text_offset.append(entry.offset)
        return logprobs

    def choice_logprobs(self, body: CompletionRequest, choice: Choice) -> CompletionLogprobs | None:
        if body.logprobs is None:
            return None
        return self.legacy_logprobs((choice.prompt_entries or []) + choice.entries)

    async def answer(self, body: CompletionRequest, request: Request) -> JSONResponse:
        """The whole answer at once (stream=false)."""
        choices = self.submit(body)
        await self.finish_all(choices, request)
        response = CompletionResponse(
            id=completion_id(),
            created=int(time.time()),
            model=self.model_name,
            choices=[
                CompletionChoice(
                    index=choice.prompt_index * body.n + rank,
                    text=(choice.prompt_text if body.echo else "") + choice.final_text(),
                    logprobs=self.choice_logprobs(body, choice),
                    finish_reason=finish_reason(choice.finish),
                )
                for rank, choice in returned(choices, body.n)
            ],
            usage=usage(choices),
        )
        return JSONResponse(response.model_dump())

    async def events(
        self, body: CompletionRequest, choices: list[Choice], request: Request
    ) -> AsyncIterator[str]:
        """One chunk per token, a finish chunk per choice, usage if asked, [DONE]."""
        ident, created = completion_id(), int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice: Choice, text: str, reason: str | None = None, logprobs=None) -> str:
            index = choice.prompt_index * body.n + choice.candidate
            item = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
            response = CompletionResponse(id=ident, created=created, model=self.model_name, choices=[item])
            return f"data: {response.model_dump_json(exclude={'usage'} if not include_usage else None)}\n\n"

        if body.echo and body.logprobs is None:
            for choice in choices:
                yield chunk(choice, choice.prompt_text)
        async for choice, event, added in self.follow(choices, request):
            if isinstance(event, PromptEvent):  # the echo, with the prompt's logprobs
                yield chunk(choice, choice.prompt_text, logprobs=self.legacy_logprobs(choice.prompt_entries))
            elif isinstance(event, TokenEvent):
                logprobs = self.legacy_logprobs(choice.entries[-1:]) if body.logprobs is not None else None
                yield chunk(choice, added, logprobs=logprobs)
            elif (failure := finish_error(event)) is not None:
                yield failure.sse()
                return
            else:
                yield chunk(choice, added, finish_reason(event))
        if include_usage:
            usage_chunk = CompletionResponse(
                id=ident, created=created, model=self.model_name, choices=[], usage=usage(choices)
            )
            yield f"data: {usage_chunk.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"


def returned(choices: list[Choice], n: int) -> list[tuple[int, Choice]]:
    """(rank, choice) of the choices to answer with: per prompt, the n candidates of highest
    cumulative log-probability, best first (all of them, in order, when there are n)."""
    by_prompt: dict[int, list[Choice]] = {}
    for choice in choices:
        by_prompt.setdefault(choice.prompt_index, []).append(choice)
    answer = []
    for candidates in by_prompt.values():
        if len(candidates) > n:
            candidates = sorted(candidates, key=Choice.cumulative_logprob, reverse=True)[:n]
        answer.extend(enumerate(candidates))
    return answer


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"
