"""The single-pass heads over HTTP: /v1/embeddings (base exports, OpenAI's shape) and plain JSON
/v1/classify, /v1/tag, /v1/qa with the runtime's post-processed results.

These run in worker threads (onnxruntime's `run` is thread-safe), at most `max_concurrent` at once.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI

from gptneo_onnx.serve.errors import APIError
from gptneo_onnx.serve.protocol import EmbeddingRequest, QuestionAnswerRequest, TextsRequest

if TYPE_CHECKING:
    from gptneo_onnx.serve.api import ServerState

Result = TypeVar("Result")


def add_head_routes(app: FastAPI, state: ServerState) -> None:
    limiter = anyio.CapacityLimiter(state.limits.max_concurrent)

    async def run(function: Callable[..., Result], *args: Any) -> Result:
        return await anyio.to_thread.run_sync(lambda: function(*args), limiter=limiter)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        state.check_model(body.model)
        model = state.require("base")
        width = int(model.manifest.model["hidden_size"])
        if body.dimensions not in (None, width):  # no Matryoshka training: a cut would be a wrong answer
            raise APIError(
                400, f"dimensions is not offered: this model's embeddings have {width}", param="dimensions"
            )
        prompt = body.input
        inputs = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        vectors = await run(model.embed, inputs, body.pooling, body.normalize)
        tokens = sum(
            len(model.tokenizer.encode(item).ids) if isinstance(item, str) else len(item) for item in inputs
        )
        data = [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, body.encoding_format)}
            for index, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": state.model_name, "usage": usage}

    @app.post("/v1/classify")
    async def classify(body: TextsRequest) -> dict:
        state.check_model(body.model)
        model = state.require("sequence-classification")
        results = await run(model.classify, as_list(body.input), body.top_k)
        return answer(state, [{"labels": labels} for labels in results])

    @app.post("/v1/tag")
    async def tag(body: TextsRequest) -> dict:
        state.check_model(body.model)
        model = state.require("token-classification")
        return answer(state, await run(model.tag, as_list(body.input)))

    @app.post("/v1/qa")
    async def qa(body: QuestionAnswerRequest) -> dict:
        state.check_model(body.model)
        model = state.require("question-answering")
        questions, contexts = as_list(body.question), as_list(body.context)
        return answer(state, await run(model.answer, questions, contexts, body.max_answer_length))


def as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else texts


def answer(state: ServerState, results: list[dict]) -> dict:
    data = [{"index": index, **result} for index, result in enumerate(results)]
    return {"object": "list", "model": state.model_name, "data": data}


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A list of floats, or base64 of little-endian float32 (what the official client asks for)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()
