"""Over HTTP the servers never read their own disk (issue 10 #3).

``POST /v1/guard/check`` images, chat ``image_url`` parts of ``visguard serve`` and of the upstream
app: only data URLs (and http(s) URLs where remote images are switched on) are accepted. Any path
(existing image, missing file, directory, /proc file, ``file:`` URL, relative name) is a 400 with
the same body, so a client learns nothing about the server's files, and the host never sees it.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from visguard import Guard, Policy
from visguard.core.images import ImageLimits
from visguard.hosting.hosts import resolve_host
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread, create_upstream_app


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("server-disk")
    real = root / "real.png"
    real.write_bytes(_png())
    return [str(real), str(root / "missing.png"), str(root), "/proc/self/environ", "/etc/passwd",
            f"file://{real}", "real.png", "../../etc/hostname"]


class _Host:
    """A callable host that records what reached it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, text) -> str:
        self.calls += 1
        return f"I see {len(images)} images."


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, _Host]]:
    host = _Host()
    guard = Guard.from_pretrained("faulty-guard", backend="faulty")
    with ServerThread(create_app(guard, resolve_host(host), settings=ServeSettings(model_name="host"))) as server:
        yield server.url, host


def _chat(url: str, image: str) -> httpx.Response:
    parts = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is this?"}]
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "host", "messages": [{"role": "user", "content": parts}]})


def test_guard_check_refuses_every_path_with_one_message(served, paths):
    url, _ = served
    replies = [httpx.post(url + "/v1/guard/check", json={"images": [p], "text": "hi"}, timeout=60) for p in paths]
    replies.append(httpx.post(url + "/v1/guard/check", timeout=60,
                              json={"images": [{"type": "image_url", "image_url": {"url": paths[0]}}], "text": "hi"}))
    assert {r.status_code for r in replies} == {400}
    assert len({r.text for r in replies}) == 1, {r.text for r in replies}  # identical: nothing about the files
    assert "data: URL" in replies[0].json()["error"]["message"]
    ok = httpx.post(url + "/v1/guard/check", timeout=60,
                    json={"images": ["data:image/png;base64," + base64.b64encode(_png()).decode()], "text": "hi"})
    assert ok.status_code == 200 and ok.json()["label"] == "safe"


def test_chat_proxy_refuses_paths_before_the_host(served, paths):
    url, host = served
    before = host.calls
    replies = [_chat(url, p) for p in paths]
    assert {r.status_code for r in replies} == {400}
    assert len({r.text for r in replies}) == 1
    assert host.calls == before  # the file never reached the host
    ok = _chat(url, "data:image/png;base64," + base64.b64encode(_png()).decode())
    assert ok.status_code == 200 and host.calls == before + 1


def test_upstream_app_refuses_paths(paths):
    host = _Host()
    with ServerThread(create_upstream_app(resolve_host(host), model_name="host")) as server:
        replies = [_chat(server.url, p) for p in paths]
    assert {r.status_code for r in replies} == {400} and len({r.text for r in replies}) == 1
    assert host.calls == 0


@pytest.fixture(scope="module")
def image_site() -> Iterator[str]:
    png = _png()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/a.png"
    server.shutdown()


def test_remote_urls_only_where_enabled(image_site, paths):
    guard = Guard.from_pretrained("faulty-guard", backend="faulty")
    with ServerThread(create_app(guard, settings=ServeSettings())) as server:
        off = httpx.post(server.url + "/v1/guard/check", json={"images": [image_site], "text": "hi"}, timeout=60)
    assert off.status_code == 400 and "remote image URL refused" in off.text
    remote = guard.with_policy(Policy(limits=ImageLimits(allow_remote=True)))
    with ServerThread(create_app(remote, settings=ServeSettings())) as server:
        on = httpx.post(server.url + "/v1/guard/check", json={"images": [image_site], "text": "hi"}, timeout=60)
        still_no_paths = httpx.post(server.url + "/v1/guard/check", json={"images": [paths[0]], "text": "hi"}, timeout=60)
    assert on.status_code == 200 and on.json()["label"] == "safe"
    assert still_no_paths.status_code == 400 and "http(s) URL" in still_no_paths.text


def test_the_python_api_still_reads_local_files(paths):
    guard = Guard.from_pretrained("faulty-guard", backend="faulty")
    assert guard.check_input([paths[0]], "hi").label == "safe"
    assert Path(paths[0]).is_file()
