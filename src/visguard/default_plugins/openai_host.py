"""The ``openai`` host: a model behind an OpenAI-compatible chat-completions endpoint.

Works with any server that speaks ``POST /v1/chat/completions`` with image parts (vLLM, SGLang,
LM Studio, llama.cpp server, OpenAI, ``visguard.integrations.openai.server.upstream`` ...). Images travel as
``data:image/png;base64,...`` URLs, the API key comes from an environment variable, every request
has a timeout, and streaming reads server-sent events. Built on ``httpx`` (a core dependency).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from visguard.core.errors import BackendError
from visguard.core.images import GuardImage
from visguard.core.redact import redact
from visguard.hookspecs import hookimpl
from visguard.hosting.hosts import Host, TokenUsage
from visguard.integrations.openai.client import ApiClient
from visguard.integrations.openai.wire import (
    DONE,
    WireError,
    add_usage,
    first_model,
    image_part,
    message_text,
    stream_event,
)


class OpenAIHost(Host):
    """Answer (images, text) through an OpenAI-compatible chat endpoint.

    Args:
        base_url: the API's base URL, e.g. ``http://127.0.0.1:8000/v1`` (a URL without a path gets
            ``/v1``; one ending in ``/chat/completions`` is used as is).
        model: the served model's name; ``None`` asks ``GET {base_url}/models`` once and uses the
            first one.
        api_key_env: name of the environment variable holding the API key (read when the host is
            created; unset: no ``Authorization`` header, as local servers expect).
        timeout_s: limit for connecting, and for each read (so a stream may run longer, as long
            as pieces keep coming).
        max_retries: further attempts after a connect error, HTTP 429 or 5xx (before a stream starts).
        max_tokens: default answer length limit (``None``: the server's default).
        system_prompt: optional system message sent before the user turn.
        image_format: how images are encoded in the data URLs (``PNG`` keeps pixels exact).
        headers: extra HTTP headers.
        extra_body: extra JSON fields for every request (``temperature``, ``top_p`` ...).

    Per-call keyword arguments of :meth:`generate` / :meth:`stream` are added to the request body;
    ``max_new_tokens`` is accepted as a synonym of ``max_tokens``.
    """

    name = "openai"
    generation_options = ("max_new_tokens", "temperature", "top_p", "stop", "seed")

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 0,
        max_tokens: int | None = None,
        system_prompt: str | None = None,
        image_format: str = "PNG",
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = ApiClient(base_url, what="host", api_key_env=api_key_env, timeout_s=timeout_s,
                                max_retries=max_retries, headers=headers)
        self.url, self.models_url = self.client.url("/chat/completions"), self.client.url("/models")
        self.model = model
        self.model_id = model or redact(self.url)
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.image_format = image_format
        self.extra_body = dict(extra_body or {})
        self._model_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIHost({redact(self.url)!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    # ------------------------------------------------------------------ requests
    def body(self, images: Sequence[GuardImage], text: str, *, stream: bool, **gen_kwargs: Any) -> dict[str, Any]:
        """The JSON body sent for (images, text) (exposed for logging and tests)."""
        content: list[dict[str, Any]] = [image_part(img, self.image_format) for img in images]
        content.append({"type": "text", "text": text})
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        options = {**self.extra_body, **gen_kwargs}
        limit = options.pop("max_new_tokens", None) or options.pop("max_tokens", None) or self.max_tokens
        body: dict[str, Any] = {"model": self._model_name(), "messages": messages, "stream": stream, **options}
        if limit is not None:
            body["max_tokens"] = limit
        return body

    def served_model(self) -> str:
        """The served model's name (asks ``GET {base_url}/models`` once when none was given)."""
        return self._model_name()

    def _model_name(self) -> str:
        if self.model is None:
            with self._model_lock:
                if self.model is None:
                    self.model = self._read(first_model, self.client.request_json("GET", "/models"))
                    self.model_id = self.model
        return self.model

    def _read(self, parse: Any, data: Any) -> Any:
        try:
            return parse(data)
        except WireError as exc:
            raise self.client.error(str(exc)) from exc

    def _piece(self, line: str, cancel: threading.Event | None, usage: TokenUsage | None) -> Any:
        """The text of one stream line, ``None``, or ``DONE`` (also once ``cancel`` is set)."""
        if cancel is not None and cancel.is_set():
            return DONE
        return self._read(lambda data: stream_event(data, usage), line)

    def _answer(self, data: Any, usage: TokenUsage | None) -> str:
        add_usage(data, usage)
        return self._read(message_text, data)

    def _stream_body(self, images: Sequence[GuardImage], text: str, usage: TokenUsage | None,
                     gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        body = self.body(images, text, stream=True, **gen_kwargs)
        if usage is not None:  # ask for a last chunk with the token counts
            body["stream_options"] = {"include_usage": True}
        return body

    # ------------------------------------------------------------------ sync
    def generate(self, images: Sequence[GuardImage], text: str, *, usage: TokenUsage | None = None,
                 **gen_kwargs: Any) -> str:
        """The answer; ``usage`` (if given) gets the token counts the server reported."""
        body = self.body(images, text, stream=False, **gen_kwargs)
        return self._answer(self.client.request_json("POST", "/chat/completions", body), usage)

    def stream(self, images: Sequence[GuardImage], text: str, *, cancel: threading.Event | None = None,
               usage: TokenUsage | None = None, **gen_kwargs: Any) -> Iterator[str]:
        """Yield text pieces from the server's SSE stream; setting ``cancel`` (or closing) hangs up.

        With ``usage``, the server is asked for its token counts (``stream_options.include_usage``).
        """
        body = self._stream_body(images, text, usage, gen_kwargs)
        with self.client.stream_lines("/chat/completions", body) as lines:
            for line in lines:
                piece = self._piece(line, cancel, usage)
                if piece is DONE:
                    return
                if piece:
                    yield piece

    # ------------------------------------------------------------------ async
    async def agenerate(self, images: Sequence[GuardImage], text: str, *, usage: TokenUsage | None = None,
                        **gen_kwargs: Any) -> str:
        body = self.body(images, text, stream=False, **gen_kwargs)  # may ask /models: sync, once
        return self._answer(await self.client.arequest_json("POST", "/chat/completions", body), usage)

    async def astream(self, images: Sequence[GuardImage], text: str, *, cancel: threading.Event | None = None,
                      usage: TokenUsage | None = None, **gen_kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream` (an ``httpx.AsyncClient`` per call, so any event loop may use it)."""
        body = self._stream_body(images, text, usage, gen_kwargs)
        lines = self.client.astream_lines("/chat/completions", body)
        try:
            async for line in lines:
                piece = self._piece(line, cancel, usage)
                if piece is DONE:
                    return
                if piece:
                    yield piece
        finally:
            await lines.aclose()

    async def aready(self) -> str | None:
        """``None`` when the server lists its models, else the (redacted) error."""
        try:
            await self.client.arequest_json("GET", "/models")
        except BackendError as exc:
            return str(exc)
        return None

    def close(self) -> None:
        self.client.close()


@hookimpl
def register_hosts(register):
    register("openai", OpenAIHost)
