"""Who may call the server: an API key on every route but /health and /metrics, and the browser
origins CORS lets in.

As vLLM's `--api-key`: requests must carry `Authorization: Bearer KEY` (the official client sends
its `api_key` so); /health and /metrics stay open to probes and scrapers. Unlike vLLM, the
tokenizer routes (/tokenize, ...) need the key too: only what probes need is open. CORS is
Starlette's middleware; with no origins configured, browsers on other origins get no CORS headers.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from gptneo_onnx.serve.errors import APIError

API_KEY_ENV = "GPTNEO_ONNX_API_KEY"  # where `serve` takes the key from when --api-key is not given
OPEN_PATHS = frozenset({"/health", "/metrics"})  # for probes and scrapers: no key


@dataclass(frozen=True)
class Access:
    api_key: str | None = None  # None: no key needed
    allowed_origins: tuple[str, ...] = ()  # origins a browser may call from ("*": any)


def access_settings(api_key: str | None, allowed_origins: list[str] | tuple[str, ...] = ()) -> Access:
    """The Access for a key given (None: take $GPTNEO_ONNX_API_KEY, if set) and origins. An empty
    key is a ValueError: a secret that did not arrive must not leave the server open."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        source = "the API key" if api_key is not None else API_KEY_ENV
        raise ValueError(f"{source} is empty: give the key, or unset it to serve without one")
    return Access(key, tuple(origin.strip() for origin in allowed_origins if origin.strip()))


class APIKeyCheck:
    """Pure ASGI middleware: a request without the right bearer key gets OpenAI's 401 (but on
    OPEN_PATHS)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = scope["type"] == "http" and scope["path"] not in OPEN_PATHS
        if protected and scope["method"] != "OPTIONS":  # a CORS preflight carries no credentials
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                message = "a valid API key is needed: send `Authorization: Bearer <key>`"
                error = APIError(401, message, code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_access(app: FastAPI, access: Access) -> None:
    """Add the key check, then CORS around it (so a 401 carries CORS headers too)."""
    if access.api_key:
        app.add_middleware(APIKeyCheck, api_key=access.api_key)
    if access.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(access.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
            expose_headers=["retry-after", "x-gptneo-onnx-replica"],
        )
