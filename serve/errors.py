"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with ``code`` = HTTP status.

:class:`APIError` is raised by route code; :func:`install_error_handlers` maps it and every other
failure to that shape: pydantic validation and malformed JSON -> 400 (never FastAPI's 422), a
``ValueError`` from ``SamplingParams`` or the engine -> 400, ``QueueFullError`` -> 503 with
``Retry-After``, a dead engine -> 503, unknown routes -> 404, anything else -> 500 (logged).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blocks.engine.async_llm import EngineDeadError
from blocks.sched.errors import QueueFullError
from serve.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["APIError", "error_response", "install_error_handlers", "RETRY_AFTER_S"]

log = logging.getLogger("blocks.serve")

RETRY_AFTER_S = 1
_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
    413: "RequestTooLargeError", 503: "ServiceUnavailableError", 500: "InternalServerError",
}


class APIError(Exception):
    """An error answered to the client: HTTP ``status``, ``message``, and the request field ``param``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


_REQUEST_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


def error_response(status: int, message: str, *, param: str | None = None, headers: dict | None = None):
    """A ``JSONResponse`` with OpenAI's error body."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}", None
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{extra}", param


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error OpenAI's shape (see the module docstring)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, param=exc.param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError):
        # the engine's and SamplingParams' messages start with the field they reject
        message = str(exc)
        word = message.split(" ", 1)[0]
        return error_response(400, message, param=word if word in _REQUEST_FIELDS else None)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError):
        return error_response(503, str(exc), param=exc.field, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError):
        return error_response(503, f"the engine is not running: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(exc).__name__}")
