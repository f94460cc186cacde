"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the app's handlers."""

from __future__ import annotations

import json
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptneo_onnx.runtime import RuntimeModelError

# status -> OpenAI's error type
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answer: HTTP status, message, and OpenAI's `param` / `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after

    def body(self) -> dict:
        error_type = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}
        }

    def sse(self) -> str:
        """The error as one server-sent event (a failure after a stream has started)."""
        return f"data: {json.dumps(self.body())}\n\n"

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers, including FastAPI's own 404 / 405 / 422, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        param = location[0] if location else None
        message = first.get("msg", "invalid request")
        if len(location) > 1 and location[1].startswith(("str", "list[")):  # a union's member
            message = "must be a string, a list of strings, a list of token ids, or a list of those lists"
        elif len(location) > 1:
            message = f"{'.'.join(location[1:])}: {message}"
        return APIError(400, f"{param}: {message}" if param else message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(RuntimeModelError)
    async def _runtime_error(request: Request, error: RuntimeModelError) -> JSONResponse:
        # InputError and GenerationConfigError are ValueErrors: the request was wrong.
        status = 400 if isinstance(error, ValueError) else 500
        return APIError(status, str(error)).response()
