"""Serve a local host model as an OpenAI-compatible chat endpoint (the "upstream" a guard protects).

:func:`create_upstream_app` turns any :class:`visguard.hosting.hosts.Host` (a transformers VLM, a callable
...) into a FastAPI app with

- ``POST /v1/chat/completions``: OpenAI chat messages with text and ``image_url`` data-URL parts;
  a JSON completion, or server-sent events with ``"stream": true`` (OpenAI chunk format, ending
  with ``data: [DONE]``); ``usage`` holds the host's token counts when the host reports them
  (:func:`visguard.hosting.hosts.reports_usage`; in a stream when ``stream_options.include_usage`` asks);
- ``GET /v1/models``: the one served model;
- ``GET /healthz``: liveness.

Errors use the OpenAI error body (``{"error": {"message", "type", "param", "code"}}``): 400 for a
bad request or a refused image, 401 for a wrong API key, 404 for another model name, 500 when
the host fails. :class:`ServerThread` runs an app with uvicorn in a background thread (tests,
notebooks, demos). Needs the ``serve`` extra (``fastapi``, ``uvicorn``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from visguard.core.images import ImageLimits
from visguard.core.redact import redact
from visguard.hosting.hosts import Host, TokenUsage, supports_cancel
from visguard.integrations.openai.server.common import (
    ApiError,
    bearer_ok,
    chunk_builder,
    host_usage,
    install_error_handlers,
    read_chat,
    sse_data,
    sse_response,
    streamed_usage,
)
from visguard.integrations.openai.wire import (
    SSE_DONE,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Delta,
    ErrorDetail,
    ModelCard,
    ModelList,
    Usage,
    generation_options,
)

#: maps a request to the host's keyword arguments
GenerationOptions = Callable[[ChatCompletionRequest, Host], dict[str, Any]]


#: the default: what the host declares (see :func:`~visguard.integrations.openai.wire.generation_options`)
default_generation_options: GenerationOptions = generation_options


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
            boundary, in message order) and text (see :meth:`~visguard.integrations.openai.wire.SplitChat.prompt_text`).
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

    install_error_handlers(app)

    async def authorized(request: Request) -> None:
        if api_key is not None and not bearer_ok(request.headers.get("authorization"), api_key):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model": model_name, "host": host.name or type(host).__name__}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name)])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        chat = await read_chat(body, model_name, limits)
        images, text = chat.images, chat.prompt_text()
        options = generation_options(body, host)
        usage = host_usage(host, options)
        if body.stream:
            return sse_response(_sse(host, images, text, options, model_name, streamed_usage(body, usage)))
        try:
            answer = await host.agenerate(images, text, **options)
        except Exception as exc:  # noqa: BLE001 - reported to the client as a server error
            raise ApiError(500, f"host failed: {type(exc).__name__}: {exc}", type="server_error") from exc
        return ChatCompletion(model=model_name, choices=[Choice(message=AssistantMessage(content=answer))],
                              usage=Usage.of(usage))

    return app


async def _sse(host: Host, images: list[Any], text: str, options: dict[str, Any], model_name: str,
               usage: TokenUsage | None = None) -> AsyncIterator[str]:
    """The SSE body of a streamed completion: a role chunk, content chunks, a stop chunk, ``[DONE]``.

    With ``usage`` (the client asked ``stream_options.include_usage``), a chunk with the token
    counts and no choices comes after the stop chunk, as OpenAI sends it.

    A host error mid-stream is sent as an error event before ``[DONE]``. When the client goes
    away the generator is closed, which stops the host (through ``cancel`` where it takes one).
    """
    chunk = chunk_builder(model_name)
    cancel = threading.Event()
    kwargs = dict(options, cancel=cancel) if supports_cancel(host, asynchronous=True) else options
    yield sse_data(chunk(Delta(role="assistant", content="")))
    try:
        pieces = host.astream(images, text, **kwargs)
        try:
            async for piece in pieces:
                if piece:
                    yield sse_data(chunk(Delta(content=piece)))
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()
        yield sse_data(chunk(Delta(), "stop"))
        if usage is not None:
            yield sse_data(chunk(None, usage=usage))
    except Exception as exc:  # noqa: BLE001 - the status line is already sent; report in-band
        yield sse_data({"error": ErrorDetail(message=redact(f"host failed: {type(exc).__name__}: {exc}"),
                                             type="server_error").model_dump()})
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
