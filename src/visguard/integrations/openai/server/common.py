"""What every visguard OpenAI-compatible app shares: errors, auth, request checks, streamed chunks.

Used by :mod:`visguard.integrations.openai.server.app` (``visguard serve``) and :mod:`visguard.integrations.openai.server.upstream` (a host
served as an upstream). Needs the ``serve`` extra (FastAPI).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visguard.core.errors import InputError
from visguard.core.images import ImageLimits
from visguard.core.redact import redact, redact_fields
from visguard.hosting.hosts import Host, TokenUsage, reports_usage
from visguard.integrations.openai.wire import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    SplitChat,
    Usage,
    completion_id,
    split_messages,
    sse_event,
)

_log = logging.getLogger(__name__)

#: headers of every server-sent-event response (no caching, no proxy buffering)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """An error answered with an OpenAI error body (plus optional extra top-level fields and headers)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, extra: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        message = redact(message)  # error texts may quote URLs or server answers with credentials
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, code=code, param=param)
        self.extra = redact_fields(dict(extra or {}))
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """``{"error": {...}, **extra}``."""
        return {**ErrorResponse(error=self.detail).model_dump(), **self.extra}

    def response(self) -> JSONResponse:
        """The JSON response (also an ASGI app, for middleware)."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with an OpenAI error body: :class:`ApiError`, request-validation failures
    (400), FastAPI's own HTTP errors (unknown path 404, wrong method 405 ...), a body nested too
    deep for the JSON parser (400) and anything unexpected (500, naming no internal text)."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return ApiError(400, "the request body nests too deep").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unexpected error serving %s", request.url.path)
        return ApiError(500, "internal server error", type="server_error").response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return ApiError(400, f"invalid request: {first.get('msg', exc)}", param=param).response()


def bearer_ok(authorization: str | None, token: str | bytes) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time comparison)."""
    scheme, _, given = (authorization or "").partition(" ")
    expected = token if isinstance(token, bytes) else token.encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


def over_http(limits: ImageLimits | None) -> ImageLimits:
    """The image limits for images a client sent over HTTP: never a file on this server's disk.

    Only data URLs (and http(s) URLs where ``allow_remote`` is on) are accepted; a path is refused
    with one message, whether or not it exists.
    """
    return (limits or ImageLimits()).model_copy(update={"allow_paths": False})


async def read_chat(body: ChatCompletionRequest, served: str, limits: ImageLimits | None) -> SplitChat:
    """Check a chat request against the served model and take its messages apart (off the event loop).

    Raises:
        ApiError: 404 for another model name, 400 for ``n`` other than 1 or refused messages / images.
    """
    if body.model != served:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {served!r}",
                       code="model_not_found", param="model")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    try:
        return await asyncio.to_thread(split_messages, body.messages, limits=over_http(limits))
    except InputError as exc:
        raise ApiError(400, str(exc), param="messages") from exc


def chunk_builder(model: str) -> Callable[..., dict[str, Any]]:
    """``chunk(delta, finish=None, *, usage=None) -> dict``: the chunks of one streamed completion.

    All share one id and time. ``chunk(None, usage=...)`` is the last chunk OpenAI sends when
    ``stream_options.include_usage`` asks: no choices, the token counts.
    """
    cid, created = completion_id(), int(time.time())

    def chunk(delta: Delta | None, finish: Any = None, *, usage: Any = None) -> dict[str, Any]:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)]
        data = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices,
                                   usage=Usage.of(usage)).model_dump(mode="json")
        if data["usage"] is None:
            del data["usage"]
        return data

    return chunk


def host_usage(host: Host, options: dict[str, Any]) -> TokenUsage | None:
    """A :class:`~visguard.hosting.hosts.TokenUsage` for one call, put in ``options`` as ``usage=``.

    ``None`` (and ``options`` unchanged) when the host does not report usage.
    """
    if not reports_usage(host):
        return None
    usage = options["usage"] = TokenUsage()
    return usage


def streamed_usage(body: ChatCompletionRequest, usage: TokenUsage | None) -> TokenUsage | None:
    """``usage`` when the client asked a stream for it (``stream_options.include_usage``), else ``None``."""
    return usage if body.stream_options is not None and body.stream_options.include_usage else None


def sse_data(payload: Mapping[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return sse_event(json.dumps(payload))


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A ``text/event-stream`` response of already framed events."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
