"""POST /v1/chat/completions: the messages become one prompt through the chat template
(serve/chat_template.py), then decode as completions do; answered as `chat.completion` or
streamed as `chat.completion.chunk` events ending in `data: [DONE]`."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from tokenizers import decoders

from gptneo_onnx.runtime import CausalLM
from gptneo_onnx.serve.chat_template import ChatTemplate, ChatTemplateError
from gptneo_onnx.serve.choices import (
    Choice,
    ChoiceRunner,
    LogprobEntry,
    Plan,
    finish_error,
    finish_reason,
    usage,
)
from gptneo_onnx.serve.engine import Engine, FinishEvent, TokenEvent
from gptneo_onnx.serve.errors import APIError
from gptneo_onnx.serve.metrics import ServerMetrics
from gptneo_onnx.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    TokenLogprob,
    TopLogprob,
)


class ChatCompletions(ChoiceRunner):
    """Chat requests through `template` into engine requests, engine events into chat answers."""

    def __init__(
        self, model: CausalLM, engine: Engine, metrics: ServerMetrics, model_name: str, template: ChatTemplate
    ):
        super().__init__(model, engine, metrics, model_name)
        self.template = template
        byte_level = isinstance(model.tokenizer.decoder, decoders.ByteLevel)
        self.byte_alphabet = byte_level_alphabet() if byte_level else None  # None: bytes of the text

    def prompt(self, body: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The rendered prompt and its token ids (the template writes any special tokens itself)."""
        if body.tools and body.tool_choice != "none":
            raise APIError(400, "tool calling is not offered: GPT-Neo has no tool-call format", param="tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(
                400, f"response_format {body.response_format.type!r} is not offered (only text)",
                param="response_format",
            )  # fmt: skip
        messages = [
            {**message.model_dump(exclude_none=True), "content": message.text()} for message in body.messages
        ]
        try:
            text = self.template.render(
                messages, body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs
            )
        except ChatTemplateError as error:
            raise APIError(400, str(error), param="messages") from None
        return text, self.model.tokenizer.encode(text, add_special_tokens=False).ids

    def submit(self, body: ChatCompletionRequest) -> list[Choice]:
        if body.continue_final_message and body.messages[-1].role != "assistant":
            raise APIError(
                400, "continue_final_message needs the last message to be the assistant's",
                param="continue_final_message",
            )  # fmt: skip
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return self.start(body, [self.prompt(body)], Plan(body.n, max_tokens, logprobs))

    # ---- answers ------------------------------------------------------------------------------
    def chat_logprobs(self, entries: list[LogprobEntry]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            return TopLogprob(
                token=self.token_text(token_id), logprob=logprob, bytes=self.token_bytes(token_id)
            )

        content = []
        for entry in entries:
            alternatives = [top(token, value) for token, value in (entry.top or {}).items()]
            chosen = top(entry.token_id, entry.logprob)
            content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes: a byte-level BPE token may hold part of a character, which its
        decoded text ("\ufffd") loses."""
        token, alphabet = self.model.tokenizer.id_to_token(token_id), self.byte_alphabet
        if alphabet is not None and token and all(character in alphabet for character in token):
            return [alphabet[character] for character in token]
        return list(self.token_text(token_id).encode("utf-8"))

    async def answer(self, body: ChatCompletionRequest, request: Request) -> JSONResponse:
        choices = self.submit(body)
        await self.finish_all(choices, request)
        response = ChatCompletionResponse(
            id=chat_id(),
            created=int(time.time()),
            model=self.model_name,
            choices=[
                ChatChoice(
                    index=choice.candidate,
                    message=AssistantMessage(content=choice.final_text()),
                    logprobs=self.chat_logprobs(choice.entries) if body.logprobs else None,
                    finish_reason=finish_reason(choice.finish),
                )
                for choice in choices
            ],
            usage=usage(choices),
        )
        return JSONResponse(response.model_dump())

    async def events(
        self, body: ChatCompletionRequest, choices: list[Choice], request: Request
    ) -> AsyncIterator[str]:
        """A role chunk per choice, a chunk per token, a finish chunk per choice, usage if asked, [DONE]."""
        ident, created = chat_id(), int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
            event = ChatCompletionChunk(
                id=ident, created=created, model=self.model_name, choices=choices, usage=usage
            )
            return f"data: {event.model_dump_json(exclude_none=True)}\n\n"

        for choice in choices:
            yield chunk(
                [ChatChunkChoice(index=choice.candidate, delta=ChatDelta(role="assistant", content=""))]
            )
        async for choice, event, added in self.follow(choices, request):
            if isinstance(event, TokenEvent):
                logprobs = self.chat_logprobs(choice.entries[-1:]) if body.logprobs else None
                if added or logprobs is not None:  # text held back (a stop string may start) waits
                    delta = ChatDelta(content=added)
                    yield chunk([ChatChunkChoice(index=choice.candidate, delta=delta, logprobs=logprobs)])
            elif isinstance(event, FinishEvent):
                failure = finish_error(event)
                if failure is not None:
                    yield failure.sse()
                    return
                delta, reason = ChatDelta(content=added or None), finish_reason(event)
                yield chunk([ChatChunkChoice(index=choice.candidate, delta=delta, finish_reason=reason)])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=usage(choices))
        yield "data: [DONE]\n\n"


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: these printable bytes
    as themselves, the other bytes as the characters from U+0100 on, in order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = {byte: chr(byte) for byte in printable}
    for shift, byte in enumerate(byte for byte in range(256) if byte not in characters):
        characters[byte] = chr(256 + shift)
    return {character: byte for byte, character in characters.items()}


def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
