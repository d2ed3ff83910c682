"""Serve a local host model as an OpenAI-compatible chat endpoint (the "upstream" a guard protects).

:func:`create_upstream_app` turns any :class:`visguard.hosts.Host` (a transformers VLM, a callable
...) into a FastAPI app with

- ``POST /v1/chat/completions``: OpenAI chat messages with text and ``image_url`` data-URL parts;
  a JSON completion, or server-sent events with ``"stream": true`` (OpenAI chunk format, ending
  with ``data: [DONE]``);
- ``GET /v1/models``: the one served model;
- ``GET /healthz``: liveness.

Errors use the OpenAI error body (``{"error": {"message", "type", "param", "code"}}``): 400 for a
bad request or a refused image, 401 for a wrong API key, 404 for another model name, 500 when
the host fails. :class:`ServerThread` runs an app with uvicorn in a background thread (tests,
notebooks, demos). Needs the ``serve`` extra (``fastapi``, ``uvicorn``).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from visguard.errors import InputError
from visguard.hosts import Host, supports_cancel
from visguard.policy import ImageLimits
from visguard.serve.openai_types import (
    SSE_DONE,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    completion_id,
    generation_options,
    messages_to_prompt,
    sse_event,
)

#: maps a request to the host's keyword arguments
GenerationOptions = Callable[[ChatCompletionRequest, Host], dict[str, Any]]


#: the default: what the host declares (see :func:`~visguard.serve.openai_types.generation_options`)
default_generation_options: GenerationOptions = generation_options


class UpstreamError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, code=code, param=param)


def error_response(status: int, detail: ErrorDetail) -> JSONResponse:
    """An OpenAI-style JSON error response."""
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


def create_upstream_app(
    host: Host,
    *,
    model_name: str,
    api_key: str | None = None,
    limits: ImageLimits | None = None,
    generation_options: GenerationOptions = default_generation_options,
) -> FastAPI:
    """An OpenAI-compatible chat app serving ``host``.

    Args:
        host: the model that answers; it receives the request's images (checked at the image
            boundary, in message order) and text (see :func:`~visguard.serve.openai_types.messages_to_prompt`).
        model_name: the model id clients must send and ``/v1/models`` lists.
        api_key: when set, requests must carry ``Authorization: Bearer <api_key>``.
        limits: image-boundary limits (default :class:`ImageLimits()`: remote URLs refused).
        generation_options: request -> host keyword arguments (default:
            :func:`default_generation_options`).

    Returns:
        The FastAPI app (serve it with uvicorn, or :class:`ServerThread`).
    """
    app = FastAPI(title=f"visguard upstream: {model_name}", docs_url=None, redoc_url=None)
    app.state.host = host
    app.state.model_name = model_name

    @app.exception_handler(UpstreamError)
    async def _upstream_error(request: Request, exc: UpstreamError) -> JSONResponse:
        return error_response(exc.status, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, ErrorDetail(message=f"invalid request: {first.get('msg', exc)}", param=param))

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise UpstreamError(401, "invalid or missing API key", code="invalid_api_key")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model": model_name, "host": host.name or type(host).__name__}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name)])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        if body.model != model_name:
            raise UpstreamError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                                code="model_not_found", param="model")
        if body.n != 1:
            raise UpstreamError(400, "only n=1 is supported", param="n")
        try:
            images, text = await asyncio.to_thread(messages_to_prompt, body.messages, limits=limits)
        except InputError as exc:
            raise UpstreamError(400, str(exc), param="messages") from exc
        options = generation_options(body, host)
        if body.stream:
            return StreamingResponse(
                _sse(host, images, text, options, model_name),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            answer = await host.agenerate(images, text, **options)
        except Exception as exc:  # noqa: BLE001 - reported to the client as a server error
            raise UpstreamError(500, f"host failed: {type(exc).__name__}: {exc}", type="server_error") from exc
        return ChatCompletion(model=model_name, choices=[Choice(message=AssistantMessage(content=answer))])

    return app


async def _sse(host: Host, images: list[Any], text: str, options: dict[str, Any], model_name: str) -> AsyncIterator[str]:
    """The SSE body of a streamed completion: a role chunk, content chunks, a stop chunk, ``[DONE]``.

    A host error mid-stream is sent as an error event before ``[DONE]``. When the client goes
    away the generator is closed, which stops the host (through ``cancel`` where it takes one).
    """
    cid = completion_id()
    created = int(time.time())

    def chunk(delta: Delta, finish: Any = None) -> str:
        return sse_event(
            ChatCompletionChunk(id=cid, created=created, model=model_name,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish)])
        )

    cancel = threading.Event()
    kwargs = dict(options, cancel=cancel) if supports_cancel(host, asynchronous=True) else options
    yield chunk(Delta(role="assistant", content=""))
    try:
        pieces = host.astream(images, text, **kwargs)
        try:
            async for piece in pieces:
                if piece:
                    yield chunk(Delta(content=piece))
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()
        yield chunk(Delta(), "stop")
    except Exception as exc:  # noqa: BLE001 - the status line is already sent; report in-band
        yield sse_event(ErrorResponse(error=ErrorDetail(message=f"host failed: {type(exc).__name__}: {exc}",
                                                        type="server_error")))
    finally:
        cancel.set()
    yield SSE_DONE


class ServerThread:
    """Run an ASGI app with uvicorn in a daemon thread, on a free port of 127.0.0.1 by default.

    Example::

        with ServerThread(create_upstream_app(host, model_name="tiny")) as server:
            guarded = guard.wrap(server.url + "/v1", host_options={"model": "tiny"})

    Args:
        app: the ASGI app.
        host: interface to bind (default loopback only).
        port: port to bind (0: a free one, see :attr:`port` after :meth:`start`).
        log_level: uvicorn's log level.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="visguard-upstream", daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port`` (append ``/v1`` for OpenAI clients)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ServerThread:
        """Start serving and wait until the server accepts connections.

        Raises:
            RuntimeError: the server did not start in time.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"upstream server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
