"""The served model's tokenizer over HTTP, in vLLM's shapes: POST /tokenize, POST /detokenize and
GET /tokenizer_info. Clients count tokens and build token-id prompts without a copy of the
tokenizer; lm-evaluation-harness's `local-completions` finds these routes and tokenizes through
them (its `remote` tokenizer), so it needs no local checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer

from gptneo_onnx.serve.errors import APIError

if TYPE_CHECKING:
    from gptneo_onnx.runtime import Model
    from gptneo_onnx.serve.api import ServerState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # GPT-Neo's tokenizer adds none either way


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def add_tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    def served() -> tuple[Model, Tokenizer]:
        model = state.require(None)  # any task's export: its tokenizer
        if model.tokenizer is None:
            raise APIError(400, "this export has no tokenizer (tokenizer.json)", code="no_tokenizer")
        return model, model.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.check_model(body.model)
        model, tokenizer = served()
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
        context = model.manifest.max_position_embeddings
        return {"count": len(ids), "max_model_len": context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.check_model(body.model)
        model, tokenizer = served()
        vocab = model.manifest.vocab_size
        if not all(0 <= token < vocab for token in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        model, tokenizer = served()
        manifest = model.manifest

        def text(token: int | None) -> str | None:
            return None if token is None else tokenizer.id_to_token(token)

        eos = manifest.eos_token_ids
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": manifest.max_position_embeddings,
            "vocab_size": manifest.vocab_size,
            "eos_token": text(eos[0]) if eos else None,
            "bos_token": text(manifest.bos_token_id),
            "pad_token": text(manifest.pad_token_id),
        }
