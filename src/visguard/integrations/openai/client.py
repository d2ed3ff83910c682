"""The one HTTP client for OpenAI-compatible APIs: URL, key, timeouts, retries, redacted errors.

Used by the ``openai`` backend (a guard behind a server) and the ``openai`` host (a model behind a
server). Built on ``httpx``; retries use ``tenacity``: connect errors, HTTP 429 and 5xx are retried
with exponential backoff (``Retry-After`` honoured, capped), nothing else is (a read timeout means
the server may still be working on the request). Every error is a :class:`BackendError` whose text
names the server and has credentials removed (:func:`visguard.core.redact.redact`).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from visguard.core.errors import BackendError, InputError
from visguard.core.redact import redact

#: HTTP statuses worth another try (rate limiting, server trouble)
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_ERROR_BODY_CHARS = 300


def api_root(base_url: str) -> str:
    """The API root for a base URL: no trailing ``/`` or ``/chat/completions``; a bare host gets ``/v1``.

    Raises:
        InputError: not an http(s) URL.
    """
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise InputError(f"an OpenAI-compatible API needs an http(s) URL, got {redact(str(base_url))!r}")
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url[: -len("/chat/completions")]
    return url if urlsplit(url).path else url + "/v1"


class _Retry(Exception):
    """An attempt worth repeating; ``error`` is what is raised if it was the last."""

    def __init__(self, error: BackendError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class ApiClient:
    """Requests to one OpenAI-compatible API root.

    Args:
        base_url: the API root (see :func:`api_root`), e.g. ``http://127.0.0.1:8000/v1``.
        what: how errors name the server (``"host"``, ``"guard server"``).
        api_key_env: environment variable holding the API key, sent as a bearer token (read once,
            here; unset or empty: no ``Authorization`` header, as local servers expect).
        timeout_s: limit for connecting and for each read or write (a stream may run longer as
            long as pieces keep coming).
        max_retries: further attempts after a connect error, HTTP 429 or 5xx.
        backoff_s: first retry delay; doubles each retry (plus up to 10 % jitter).
        max_backoff_s: largest delay (also caps ``Retry-After``).
        headers: more HTTP headers.
        max_connections: connection pool size of the shared sync client.
    """

    def __init__(
        self,
        base_url: str,
        *,
        what: str = "server",
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        headers: Mapping[str, str] | None = None,
        max_connections: int | None = None,
    ) -> None:
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise InputError(f"timeout_s must be > 0, max_retries and backoff_s >= 0 (got {timeout_s}, {max_retries}, {backoff_s})")
        self.root = api_root(base_url)
        self.what = what
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = {"Accept": "application/json", **dict(headers or {})}
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""
        if self._key:
            self.headers["Authorization"] = f"Bearer {self._key}"
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections) \
            if max_connections else httpx.Limits()
        self._client = httpx.Client(headers=self.headers, timeout=httpx.Timeout(timeout_s), limits=limits)

    def __repr__(self) -> str:  # never shows the key
        return f"ApiClient({redact(self.root)!r}, api_key_env={self.api_key_env!r})"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (``"/chat/completions"``) under the API root."""
        return self.root + path

    # ------------------------------------------------------------------ errors
    def error(self, message: str) -> BackendError:
        """A :class:`BackendError` naming this server, with credentials removed."""
        # the key and every caller-given header value (--backend-arg headers=...: x-api-key, Basic ...)
        secrets = [self._key, *(v for k, v in self.headers.items() if k.lower() not in ("accept", "user-agent", "content-type"))]
        secrets += [v.split(None, 1)[1] for v in secrets if v and len(v.split(None, 1)) == 2]  # "Basic <token>"
        return BackendError(redact(f"{self.what} {self.root} {message}", secrets))

    def _status_error(self, response: httpx.Response) -> BackendError:
        detail = response.text[:_ERROR_BODY_CHARS]
        try:
            detail = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        hint = ""
        if response.status_code == 401 and not self._key:
            hint = f" (no API key: ${self.api_key_env} is not set)" if self.api_key_env else " (no API key)"
        return self.error(f"answered HTTP {response.status_code}: {detail}{hint}")

    def _transport_error(self, exc: httpx.HTTPError) -> BackendError | _Retry:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return _Retry(self.error(f"unreachable: {type(exc).__name__}: {exc}"))
        if isinstance(exc, httpx.TimeoutException):
            return self.error(f"timed out after {self.timeout_s:g} s")
        return self.error(f"failed: {type(exc).__name__}: {exc}")

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        error = self._status_error(response)
        if response.status_code in RETRY_STATUSES:
            raise _Retry(error, _seconds(response.headers.get("retry-after")))
        raise error

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise self.error(f"sent invalid JSON: {response.text[:200]!r}") from exc

    # ------------------------------------------------------------------ retries
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = self.backoff_s * 2 ** (state.attempt_number - 1)
        if isinstance(exc, _Retry) and exc.retry_after is not None:
            delay = exc.retry_after
        return min(delay, self.max_backoff_s) * (1.0 + 0.1 * random.random())

    def _retrying(self, cls: type[Retrying] | type[AsyncRetrying]) -> Any:
        return cls(stop=stop_after_attempt(self.max_retries + 1), wait=self._wait,
                   retry=retry_if_exception_type(_Retry), reraise=True)

    # ------------------------------------------------------------------ sync
    def request_json(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """Send a request (JSON body) with retries; the decoded JSON answer.

        Raises:
            BackendError: after the last failed attempt, or at once for other errors.
        """

        def once() -> Any:
            try:
                response = self._client.request(method, self.url(path), json=body)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            return self._json(self._checked(response))

        try:
            return self._retrying(Retrying)(once)
        except _Retry as exc:
            raise exc.error from exc.__cause__

    @contextlib.contextmanager
    def stream_lines(self, path: str, body: Mapping[str, Any]) -> Iterator[Iterator[str]]:
        """POST ``body`` and yield an iterator over the answer's lines (server-sent events).

        Opening the stream is retried like :meth:`request_json`; a stream that breaks or stalls
        raises :class:`BackendError`. Leaving the ``with`` block hangs up.
        """
        request = self._client.build_request("POST", self.url(path), json=body, headers={"Accept": "text/event-stream"})
        response: httpx.Response | None = None
        try:
            for attempt in self._retrying(Retrying):
                with attempt:
                    try:
                        response = self._client.send(request, stream=True)
                    except httpx.HTTPError as exc:
                        raise self._transport_error(exc) from exc
                    if response.status_code >= 400:
                        response.read()
                        response.close()
                    self._checked(response)
        except _Retry as exc:
            raise exc.error from exc.__cause__
        assert response is not None
        try:
            yield self._lines(response.iter_lines())
        finally:
            response.close()

    def _lines(self, lines: Iterator[str]) -> Iterator[str]:
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except httpx.TimeoutException as exc:
                raise self.error(f"stream stalled for {self.timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise self.error(f"stream broke: {type(exc).__name__}: {exc}") from exc
            yield line

    # ------------------------------------------------------------------ async (a client per call: any event loop)
    async def arequest_json(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """Async :meth:`request_json`."""
        async with httpx.AsyncClient(headers=self.headers, timeout=httpx.Timeout(self.timeout_s)) as client:

            async def once() -> Any:
                try:
                    response = await client.request(method, self.url(path), json=body)
                except httpx.HTTPError as exc:
                    raise self._transport_error(exc) from exc
                return self._json(self._checked(response))

            try:
                return await self._retrying(AsyncRetrying)(once)
            except _Retry as exc:
                raise exc.error from exc.__cause__

    async def astream_lines(self, path: str, body: Mapping[str, Any]) -> AsyncGenerator[str, None]:
        """Async :meth:`stream_lines`, as one async iterator of lines (closing it hangs up)."""
        async with httpx.AsyncClient(headers=self.headers, timeout=httpx.Timeout(self.timeout_s)) as client:
            try:
                async with client.stream("POST", self.url(path), json=body,
                                         headers={"Accept": "text/event-stream"}) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise self._status_error(response)
                    async for line in response.aiter_lines():
                        yield line
            except httpx.TimeoutException as exc:
                raise self.error(f"timed out after {self.timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise self.error(f"stream broke: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
