"""The one OpenAI-API client: retries (5xx, Retry-After), no retry on 4xx, credentials never in errors."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from visguard.core.errors import BackendError, InputError
from visguard.integrations.openai.client import ApiClient, api_root


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 (Retry-After: 0) to the first ``fail`` requests, then 200; 404 on /missing."""

    fail = 0
    seen: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).seen.append(self.headers.get("Authorization") or "")
        if self.path.endswith("/missing"):
            self._send(404, {"error": {"message": "no such thing"}})
        elif type(self).fail > 0:
            type(self).fail -= 1
            self._send(503, {"error": {"message": "busy"}}, {"Retry-After": "0"})
        else:
            self._send(200, {"ok": True})

    def _send(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Flaky.fail, _Flaky.seen = 0, []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_api_root():
    assert api_root("http://h:8000") == "http://h:8000/v1"
    assert api_root("http://h:8000/v1/chat/completions") == "http://h:8000/v1"
    assert api_root("https://h/api/v1/") == "https://h/api/v1"
    with pytest.raises(InputError, match="http"):
        api_root("ftp://h")


def test_server_errors_are_retried_then_answered(flaky, monkeypatch):
    monkeypatch.setenv("VG_TEST_KEY", "s3cret-key")
    _Flaky.fail = 2
    client = ApiClient(flaky, api_key_env="VG_TEST_KEY", max_retries=2, backoff_s=0.01)
    assert client.request_json("POST", "/chat/completions", {"x": 1}) == {"ok": True}
    assert _Flaky.seen == ["Bearer s3cret-key"] * 3 and "s3cret" not in repr(client)
    _Flaky.fail = 1
    assert asyncio.run(client.arequest_json("POST", "/chat/completions", {})) == {"ok": True}
    client.close()


def test_the_last_server_error_and_client_errors_are_raised(flaky):
    _Flaky.fail = 5
    client = ApiClient(flaky, what="guard server", max_retries=1, backoff_s=0.01)
    with pytest.raises(BackendError, match=r"guard server http://127.0.0.1:\d+/v1 answered HTTP 503: busy"):
        client.request_json("POST", "/chat/completions", {})
    assert len(_Flaky.seen) == 2
    with pytest.raises(BackendError, match="HTTP 404: no such thing"):
        client.request_json("POST", "/missing", {})
    assert len(_Flaky.seen) == 3  # a 4xx is not retried
    client.close()


def test_credentials_in_the_url_never_reach_an_error_text():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ApiClient(f"http://alice:pa55word@127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(BackendError, match="unreachable") as info:
        client.request_json("GET", "/models")
    assert "pa55word" not in str(info.value) and "alice" not in str(info.value) and "pa55word" not in repr(client)
    client.close()
