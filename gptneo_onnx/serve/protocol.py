"""The OpenAI request and response shapes, as plain pydantic models (vLLM's protocol.py pattern).

Only the HTTP surface lives here: what a field accepts and its range. Turning a request into
the engine's GenerationConfig is in completions.py. Our extensions (`top_k`,
`repetition_penalty`, `min_tokens`) are ordinary optional fields, so the official client sends
them through `extra_body` as it does for vLLM.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 5  # the legacy completions API's limit
MAX_TOP_LOGPROBS = 20  # the chat API's limit
MAX_BEST_OF = 16  # candidates per prompt (rows in the batch each)
MAX_LOGIT_BIAS = 100  # OpenAI's range for a bias: -100 (ban) to 100 (force)

# A prompt: text, token ids, or a list of either.
PromptField = Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007 (pydantic on 3.10)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The decoding fields /v1/completions and /v1/chat/completions share. Unknown fields
    (OpenAI's `user`, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's penalties on the tokens generated so far (runtime GenerationConfig)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # token id (as a JSON key, so a string) -> bias added to its logit before sampling
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names), sent by the official client through `extra_body`.
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int | None = Field(default=None, ge=0)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        if any(not item for item in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
        return bias


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `suffix` is refused in completions.py, as GPT-Neo does not insert
    text; `best_of` ranks candidates there."""

    prompt: PromptField
    max_tokens: int | None = Field(default=16, ge=0)  # 0 only with echo: score the prompt
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEST_OF)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: PromptField) -> PromptField:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A message as chat templates see it: `content` is text, or text parts (joined by newlines,
    as vLLM's "string" content format does)."""

    model_config = ConfigDict(extra="allow")  # `name` and other keys reach the template as sent

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, content: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        for part in content if isinstance(content, list) else ():
            if part.type != "text" or part.text is None:
                raise ValueError(
                    f"only text content parts are offered (GPT-Neo reads text), got {part.type!r}"
                )
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text or "" for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = "text"


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: the messages go through the export's chat template (or
    --chat-template). `max_completion_tokens` is OpenAI's current name for `max_tokens`; vLLM's
    `add_generation_prompt`, `continue_final_message` and `chat_template_kwargs` are extensions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions API's logprobs object: one entry per token of the returned text
    (with echo, the prompt's tokens first; the first has no logprob)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionResponse(BaseModel):
    """The answer to a completion request, and (with `usage` None) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed event; the last (with stream_options.include_usage) has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (base exports). `pooling` and `normalize` are our extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: PromptField
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)  # only the model's own width is offered
    pooling: Literal["mean", "last"] = "mean"
    normalize: bool = False


class TextsRequest(BaseModel):
    """POST /v1/classify and /v1/tag: one text or a list of texts."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str]
    top_k: int | None = Field(default=None, ge=1)  # classify only: the best k labels


class QuestionAnswerRequest(BaseModel):
    """POST /v1/qa: one question and context, or lists of equal length."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    question: str | list[str]
    context: str | list[str]
    max_answer_length: int = Field(default=30, ge=1)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail
