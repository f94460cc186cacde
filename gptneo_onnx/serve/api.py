"""The FastAPI app: OpenAI routes, health, metrics. It parses, validates and streams; the engine
owns batching (serve/engine.py), the runtime owns the model.

    app = create_app(ServerState(lambda: Model.load("export-dir"), "my-model"))
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gptneo_onnx.runtime import CausalLM, Model
from gptneo_onnx.serve.access import Access, install_access
from gptneo_onnx.serve.chat import ChatCompletions
from gptneo_onnx.serve.chat_template import export_chat_template
from gptneo_onnx.serve.completions import Completions
from gptneo_onnx.serve.engine import Engine, EngineLimits
from gptneo_onnx.serve.errors import APIError, install_error_handlers
from gptneo_onnx.serve.heads import add_head_routes
from gptneo_onnx.serve.metrics import ServerMetrics
from gptneo_onnx.serve.protocol import ChatCompletionRequest, CompletionRequest
from gptneo_onnx.serve.tokenizer_routes import add_tokenizer_routes

MAX_BODY_BYTES = 4 * 2**20  # a 2,048-token prompt as ids is ~12 kB; embedding batches are larger
ENDPOINTS = (
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/tag", "/v1/qa",
    "/v1/models", "/health", "/metrics",
)  # fmt: skip


class ServerState:
    """The model, its engine (causal-lm exports) and the server's phase: loading, ready, draining,
    failed. One per replica."""

    def __init__(
        self,
        load: Callable[[], Model],
        model_name: str,
        limits: EngineLimits | None = None,
        policy: str = "continuous",
        chat_template: str | None = None,
    ):
        self._load = load
        self.chat_template = chat_template  # a template's text, over the export's own
        self.model_name = model_name
        self.limits = limits or EngineLimits()
        self.policy = policy
        self.metrics = ServerMetrics()
        self.model: Model | None = None
        self.engine: Engine | None = None
        self.completions: Completions | None = None
        self.chat: ChatCompletions | None = None  # causal-lm exports with a tokenizer and a chat template
        self.phase = "loading"
        self.error: str | None = None
        self.in_flight = 0  # HTTP requests being answered (streams included)
        self.created = int(time.time())

    def load(self) -> None:
        """Load the model and start its engine (blocking); a failure is kept for /health."""
        try:
            model = self._load()
            if isinstance(model, CausalLM):
                engine = Engine(model, self.limits, self.policy, on_batch=self.metrics.observe_batch)
                engine.start()
                self.metrics.watch_engine(lambda: engine.stats.running, lambda: engine.stats.waiting)
                self.engine = engine
                self.completions = Completions(model, engine, self.metrics, self.model_name)
                template = export_chat_template(model.manifest.folder, self.chat_template)
                if template is not None and model.tokenizer is not None:
                    self.chat = ChatCompletions(model, engine, self.metrics, self.model_name, template)
            self.model = model
            if self.phase == "loading":
                self.phase = "ready"
        except Exception as error:  # reported by /health and every request, not a traceback
            self.phase, self.error = "failed", f"{type(error).__name__}: {error}"

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="gptneo-onnx-load", daemon=True)
        thread.start()
        return thread

    def drain(self, timeout: float) -> None:
        """Stop admitting (503), let running requests finish for up to `timeout` s, end the rest."""
        self.phase = "draining"
        deadline = time.monotonic() + timeout
        if self.engine is not None:
            self.engine.drain(timeout)
        while self.in_flight and time.monotonic() < deadline:  # streams still sending their tails
            time.sleep(0.02)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def require(self, task: str | None) -> Model:
        """The loaded model, when it is `task` (None: any) and the server admits requests; else
        the APIError."""
        if self.phase == "draining":
            raise APIError(503, "the server is shutting down and admits no new requests", code="draining")
        if self.phase == "failed":
            raise APIError(503, f"the model failed to load: {self.error}", code="model_load_failed")
        if self.model is None:
            raise APIError(503, "the model is still loading; retry shortly", code="loading", retry_after=1)
        if task is not None and self.model.manifest.task != task:
            raise APIError(
                404, f"this server runs a {self.model.manifest.task} export; this endpoint needs {task}",
                code="unsupported_endpoint",
            )  # fmt: skip
        return self.model

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                code="model_not_found", param="model",
            )  # fmt: skip


class RequestAccounting:
    """Pure ASGI middleware (streams stay cancellable): counts requests by endpoint and status,
    tracks the requests in flight for draining, and refuses bodies over the size limit with 413."""

    def __init__(self, app: ASGIApp, state: ServerState, max_body_bytes: int):
        self.app, self.state, self.max_body_bytes = app, state, max_body_bytes
        # Which replica answered (host:pid), for logs and load-balancer checks.
        self.replica_header = (b"x-gptneo-onnx-replica", f"{socket.gethostname()}:{os.getpid()}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500}

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)

        self.state.in_flight += 1
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                error = APIError(413, f"the request body is over the limit of {self.max_body_bytes} bytes")
                await error.response()(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.state.in_flight -= 1
            self.state.metrics.requests.labels(path, str(status["code"])).inc()


def create_app(
    state: ServerState, max_body_bytes: int = MAX_BODY_BYTES, access: Access | None = None
) -> FastAPI:
    """The server for one replica; loads the model in the background at startup unless it is
    loaded. `access`: an API key (every route but /health and /metrics) and the origins CORS
    lets in (default: neither)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.model is None and state.phase == "loading":
            state.load_in_background()
        yield
        state.close()

    app = FastAPI(title="gptneo-onnx", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    install_access(app, access or Access())
    # added last, so outermost: it counts the key check's 401s and the CORS preflights too
    app.add_middleware(RequestAccounting, state=state, max_body_bytes=max_body_bytes)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = state.phase == "ready"
        body = {"status": state.phase, **({"error": state.error} if state.error else {})}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_entry() -> dict:
        task = state.model.manifest.task if state.model is not None else None
        return {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "gptneo-onnx", "task": task}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> dict:
        state.check_model(name)
        return model_entry()

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        state.require("causal-lm")
        service = state.completions
        return service.stream(body, request) if body.stream else await service.answer(body, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        state.require("causal-lm")
        service = state.chat
        if service is None and state.model.tokenizer is None:
            raise APIError(404, "chat needs the export's tokenizer.json, and this export has none: "
                           "re-export with the tokenizer, or send token ids to /v1/completions",
                           code="unsupported_endpoint")  # fmt: skip
        if service is None:  # OpenAI answers its completion-only models the same way
            raise APIError(
                404, "this export has no chat template (base GPT-Neo is not a chat model): serve it with "
                "--chat-template FILE, or use /v1/completions with a prompt",
                code="unsupported_endpoint",
            )  # fmt: skip
        return service.stream(body, request) if body.stream else await service.answer(body, request)

    add_head_routes(app, state)
    add_tokenizer_routes(app, state)
    return app
