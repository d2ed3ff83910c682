"""The ``openai`` host: a model behind an OpenAI-compatible chat-completions endpoint.

Works with any server that speaks ``POST /v1/chat/completions`` with image parts (vLLM, SGLang,
LM Studio, llama.cpp server, OpenAI, ``visguard.serve.upstream`` ...). Images travel as
``data:image/png;base64,...`` URLs, the API key comes from an environment variable, every request
has a timeout, and streaming reads server-sent events. Built on ``httpx`` (a core dependency).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from visguard.errors import BackendError, InputError
from visguard.hookspecs import hookimpl
from visguard.hosts import Host
from visguard.images import GuardImage

_ERROR_BODY_CHARS = 500


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
        max_tokens: int | None = None,
        system_prompt: str | None = None,
        image_format: str = "PNG",
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise InputError(f"timeout_s must be > 0, got {timeout_s}")
        self.url, self.models_url = _endpoints(base_url)
        self.model = model
        self.model_id = model or self.url
        self.api_key_env = api_key_env
        self.timeout = httpx.Timeout(timeout_s)
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.image_format = image_format
        self.extra_body = dict(extra_body or {})
        self.headers = {"Accept": "application/json", **dict(headers or {})}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=self.timeout, headers=self.headers)
        self._model_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIHost({self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    # ------------------------------------------------------------------ requests
    def body(self, images: Sequence[GuardImage], text: str, *, stream: bool, **gen_kwargs: Any) -> dict[str, Any]:
        """The JSON body sent for (images, text) (exposed for logging and tests)."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": img.to_data_url(self.image_format)}} for img in images
        ]
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
                    data = self._checked(self._send(lambda: self._client.get(self.models_url))).json()
                    try:
                        self.model = str(data["data"][0]["id"])
                    except (KeyError, IndexError, TypeError) as exc:
                        raise BackendError(f"{self.models_url} lists no model; pass model=") from exc
                    self.model_id = self.model
        return self.model

    def _send(self, request: Any) -> httpx.Response:
        try:
            return request()
        except httpx.TimeoutException as exc:
            raise BackendError(f"host {self.url} timed out after {self.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"host {self.url} unreachable: {type(exc).__name__}: {exc}") from exc

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            response.read()
            raise BackendError(self._status_message(response))
        return response

    def _status_message(self, response: httpx.Response) -> str:
        detail = response.text[:_ERROR_BODY_CHARS]
        try:
            detail = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        hint = ""
        if response.status_code == 401 and "Authorization" not in self.headers:
            hint = f" (no API key: ${self.api_key_env} is not set)" if self.api_key_env else " (no API key)"
        return f"host {self.url} answered HTTP {response.status_code}: {detail}{hint}"

    # ------------------------------------------------------------------ sync
    def generate(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> str:
        body = self.body(images, text, stream=False, **gen_kwargs)
        response = self._checked(self._send(lambda: self._client.post(self.url, json=body)))
        return _message_text(response)

    def stream(self, images: Sequence[GuardImage], text: str, *, cancel: threading.Event | None = None,
               **gen_kwargs: Any) -> Iterator[str]:
        """Yield text pieces from the server's SSE stream; setting ``cancel`` (or closing) hangs up."""
        body = self.body(images, text, stream=True, **gen_kwargs)
        request = self._client.build_request("POST", self.url, json=body, headers={"Accept": "text/event-stream"})
        response = self._checked(self._send(lambda: self._client.send(request, stream=True)))
        try:
            lines = response.iter_lines()
            while True:
                if cancel is not None and cancel.is_set():
                    return
                try:
                    line = next(lines)
                except StopIteration:
                    break
                except httpx.TimeoutException as exc:
                    raise BackendError(f"host {self.url} stream stalled for {self.timeout_s:g} s") from exc
                except httpx.HTTPError as exc:
                    raise BackendError(f"host {self.url} stream broke: {type(exc).__name__}: {exc}") from exc
                piece = _sse_content(self.url, line)
                if piece is _DONE:
                    return
                if piece:
                    yield piece
        finally:
            response.close()

    # ------------------------------------------------------------------ async
    async def agenerate(self, images: Sequence[GuardImage], text: str, **gen_kwargs: Any) -> str:
        body = self.body(images, text, stream=False, **gen_kwargs)  # may ask /models: sync, once
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
            try:
                response = await client.post(self.url, json=body)
            except httpx.TimeoutException as exc:
                raise BackendError(f"host {self.url} timed out after {self.timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise BackendError(f"host {self.url} unreachable: {type(exc).__name__}: {exc}") from exc
            return _message_text(self._checked(response))

    async def astream(self, images: Sequence[GuardImage], text: str, *, cancel: threading.Event | None = None,
                      **gen_kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream` (an ``httpx.AsyncClient`` per call, so any event loop may use it)."""
        body = self.body(images, text, stream=True, **gen_kwargs)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
            try:
                async with client.stream("POST", self.url, json=body, headers={"Accept": "text/event-stream"}) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise BackendError(self._status_message(response))
                    async for line in response.aiter_lines():
                        if cancel is not None and cancel.is_set():
                            return
                        piece = _sse_content(self.url, line)
                        if piece is _DONE:
                            return
                        if piece:
                            yield piece
            except httpx.TimeoutException as exc:
                raise BackendError(f"host {self.url} timed out after {self.timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise BackendError(f"host {self.url} stream broke: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._client.close()


_DONE = object()


def _sse_content(url: str, line: str) -> str | object | None:
    """The content of one SSE line: text, ``_DONE``, or ``None`` (comments, blank lines, role chunks).

    Chat-completion servers send one ``data:`` line per event, as OpenAI does.

    Raises:
        BackendError: the server sent an error event or a chunk that is not JSON.
    """
    if not line.startswith("data:"):
        return None  # blank separators, ": keep-alive" comments, "event:" / "id:" fields
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise BackendError(f"host {url} sent a stream event that is not JSON: {data[:100]!r}") from exc
    if isinstance(chunk, dict) and "error" in chunk:
        err = chunk["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        raise BackendError(f"host {url} failed mid-stream: {message}")
    try:
        choices = chunk.get("choices") or []
        return _text(choices[0].get("delta", {}).get("content")) if choices else None
    except (AttributeError, TypeError) as exc:
        raise BackendError(f"host {url} sent an unexpected chunk: {data[:200]!r}") from exc


def _message_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BackendError(f"unexpected chat completion from {response.request.url}: {response.text[:200]!r}") from exc
    return _text(message.get("content")) or ""


def _text(content: Any) -> str | None:
    """Message content as text: a string, or the text parts of a list of parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise TypeError(f"content of type {type(content).__name__}")


def _endpoints(base_url: str) -> tuple[str, str]:
    """(chat completions URL, models URL) for a base URL."""
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise InputError(f"the openai host needs an http(s) URL, got {base_url!r}")
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        base = url[: -len("/chat/completions")]
    else:
        base = url if urlsplit(url).path else url + "/v1"
    return base + "/chat/completions", base + "/models"


@hookimpl
def register_hosts(register):
    register("openai", OpenAIHost)
