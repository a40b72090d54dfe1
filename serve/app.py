"""The FastAPI app of ``blocks serve`` (OpenAI-compatible, vLLM's routes and fields).

``build_app(state)`` wires the routes (:mod:`serve.completions`, :mod:`serve.chat`,
:mod:`serve.misc_routes`), OpenAI-shaped errors (:mod:`serve.errors`) and the API key check:
with ``state.api_key`` set, every route except ``/health``, ``/metrics`` and ``/version``
needs ``Authorization: Bearer <key>`` (compared in constant time), else 401.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
from collections.abc import Callable

from fastapi import FastAPI, Request

import blocks
from serve import chat, completions, misc_routes
from serve.errors import APIError, error_response, install_error_handlers
from serve.state import ServerState

__all__ = ["build_app", "OPEN_PATHS", "BodySizeLimit", "DEFAULT_MAX_BODY_BYTES", "MAX_HEADER_BYTES"]

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})
DEFAULT_MAX_BODY_BYTES = 16 << 20
# A request head larger than this is refused with 431, whatever HTTP parser uvicorn uses (h11 caps heads
# itself; httptools, picked when installed, does not).
MAX_HEADER_BYTES = 32 << 10


class BodySizeLimit:
    """ASGI middleware: request headers over ``max_header_bytes`` in all get 431; a request body over
    ``max_bytes`` is refused with 413 (by its Content-Length, or while a chunked body is read)."""

    def __init__(self, app, max_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or ()
        if sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            response = error_response(
                431, f"request headers are larger than the limit of {self.max_header_bytes} bytes")
            return await response(scope, receive, send)
        length = dict(headers).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = error_response(413, f"request body is larger than the limit of {self.max_bytes} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, f"request body is larger than the limit of {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def build_app(state: ServerState, *, root_path: str = "", on_shutdown: Callable[[], None] | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app over ``state`` (its engine must already be running); ``on_shutdown`` runs when the server stops.

    Request bodies over ``max_body_bytes`` get 413.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # what exists now (app, routes, pydantic schemas, engine client) lives as long as the server: out of
        # the collector's sight, so the full collections that streaming's garbage triggers stay short
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="blocks OpenAI-compatible server", version=blocks.__version__, root_path=root_path,
                  lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    if state.api_key:
        expected = f"Bearer {state.api_key}".encode()

        @app.middleware("http")
        async def _check_api_key(request: Request, call_next):
            path = request.url.path
            if root_path and path.startswith(root_path):
                path = path[len(root_path):] or "/"
            if request.method != "OPTIONS" and path not in OPEN_PATHS:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return error_response(401, "invalid or missing API key (send Authorization: Bearer <key>)")
            return await call_next(request)

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(misc_routes.router)
    return app
