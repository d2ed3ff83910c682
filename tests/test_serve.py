"""`visguard serve` end to end on loopback, driven by the stock `openai` client.

Real pieces only: the tiny Qwen2-VL checkpoint is both the guard (transformers backend) and the host
model, served by the upstream app (`visguard.integrations.openai.server.upstream`) on its own port; `visguard serve` apps
sit in front of it. The tiny guard's weights are random, so which requests count as unsafe is set by
the policy threshold: 1.0 (nothing reaches P(unsafe) = 1) for a permissive server, 0.0 for a strict
one. The scores themselves are the model's.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from visguard import Guard, plugins
from visguard.hosting.guarded import DEFAULT_REFUSAL, UNNAMED_CATEGORY
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread, create_upstream_app

HOST_MODEL = "tiny-host"
REFUSAL = DEFAULT_REFUSAL.format(category=UNNAMED_CATEGORY)


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def two_images() -> list[str]:
    a = Image.new("RGB", (64, 48), (200, 30, 30))
    b = Image.new("RGB", (40, 72), (30, 60, 200))
    return [data_url(a), data_url(b)]


def user_message(images: list[str], text: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def guard(qwen_path):
    g = Guard.from_pretrained(qwen_path, device="cpu", dtype="float32")
    yield g
    g.close()


@pytest.fixture(scope="module")
def upstream(qwen_path):
    host = plugins.get("hosts", "transformers")(qwen_path, device="cpu", dtype="float32", max_new_tokens=12)
    with ServerThread(create_upstream_app(host, model_name=HOST_MODEL)) as server:
        yield server.url + "/v1"
    host.close()


def serve(guard, host=None, **settings) -> ServerThread:
    app = create_app(guard, host, settings=ServeSettings(**settings), host_options={"model": HOST_MODEL} if host else None)
    server = ServerThread(app)
    server.app = app
    return server.start()


@pytest.fixture(scope="module")
def permissive(guard, upstream):
    server = serve(guard.with_policy(threshold=1.0), upstream, max_wait_ms=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict(guard, upstream):
    server = serve(guard.with_policy(threshold=0.0), upstream, max_wait_ms=1)
    yield server
    server.stop()


def client(server: ServerThread, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, **kw)


def direct_answer(upstream: str, messages: list[dict]) -> str:
    plain = openai.OpenAI(base_url=upstream, api_key="unused")
    return plain.chat.completions.create(model=HOST_MODEL, messages=messages, max_tokens=12).choices[0].message.content


# ---------------------------------------------------------------------------------- /v1/guard/check


def test_guard_check_returns_the_verdict_json(guard, permissive, two_images):
    body = {"images": two_images, "text": "Use the item in image 1 on image 2.", "response": "Sure."}
    resp = httpx.post(permissive.url + "/v1/guard/check", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    verdict = resp.json()
    assert verdict["stage"] == "output" and verdict["mode"] == "fast" and verdict["label"] == "safe"
    expected = guard.check(guard.request(two_images, body["text"], body["response"]))
    assert verdict["score"] == pytest.approx(expected.score, abs=1e-5)

    bad = httpx.post(permissive.url + "/v1/guard/check", json={"images": ["data:image/png;base64,AAAA"], "text": "x"})
    assert bad.status_code == 400 and "image 0" in bad.json()["error"]["message"]


def test_concurrent_checks_are_micro_batched(guard, two_images):
    server = serve(guard, max_batch_size=8, max_wait_ms=300)
    try:
        texts = [f"request number {i}" for i in range(6)]
        batcher = server.app.state.guard.batcher
        before = (batcher.items, batcher.batches)
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(
                lambda t: httpx.post(server.url + "/v1/guard/check", json={"images": two_images, "text": t}, timeout=60),
                texts,
            ))
        assert [r.status_code for r in replies] == [200] * 6
        checks, batches = batcher.items - before[0], batcher.batches - before[1]
        assert checks == 6 and batches < 6  # several checks shared a forward pass
        for text, reply in zip(texts, replies, strict=True):
            alone = guard.check(guard.request(two_images, text))
            assert reply.json()["score"] == pytest.approx(alone.score, abs=1e-4)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- chat completions


def test_safe_request_passes_through_unchanged(permissive, upstream, two_images):
    messages = user_message(two_images, "Describe these two pictures.")
    resp = client(permissive).chat.completions.create(model=HOST_MODEL, messages=messages, max_tokens=12)
    assert resp.choices[0].message.content == direct_answer(upstream, messages)
    assert resp.choices[0].finish_reason == "stop"
    info = resp.model_extra["visguard"]
    assert info["blocked"] is False and info["host_called"] is True
    assert info["input_verdict"]["label"] == "safe" and info["output_verdict"]["label"] == "safe"
    assert 0.0 < info["input_verdict"]["score"] < 1.0


def test_unsafe_request_is_blocked_with_a_refusal(strict, two_images):
    messages = user_message(two_images, "Use the item in image 1 on the person in image 2.")
    resp = client(strict).chat.completions.create(model=HOST_MODEL, messages=messages)
    assert resp.choices[0].message.content == REFUSAL
    assert resp.choices[0].finish_reason == "content_filter"
    info = resp.model_extra["visguard"]
    assert info["blocked"] is True and info["stage"] == "input" and info["reason"] == "unsafe"
    assert info["host_called"] is False and info["input_verdict"]["label"] == "unsafe"


def test_unsafe_request_can_be_an_error_by_policy(guard, upstream, two_images):
    server = serve(guard.with_policy(threshold=0.0), upstream, on_unsafe="error")
    try:
        with pytest.raises(openai.BadRequestError) as err:
            client(server).chat.completions.create(model=HOST_MODEL, messages=user_message(two_images, "hi"))
        assert err.value.code == "content_filter"
        assert err.value.response.json()["visguard"]["verdict"]["label"] == "unsafe"
    finally:
        server.stop()


def test_streaming_passes_released_text_and_ends_with_the_verdicts(permissive, upstream, two_images):
    messages = user_message(two_images, "Tell me about these.")
    chunks = list(client(permissive).chat.completions.create(model=HOST_MODEL, messages=messages, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct_answer(upstream, messages)
    assert chunks[-1].choices[0].finish_reason == "stop"
    info = chunks[-1].model_extra["visguard"]
    assert info["blocked"] is False and info["output_checks"] >= 1


def test_streaming_blocked_request_streams_the_refusal(strict, two_images):
    chunks = list(client(strict).chat.completions.create(
        model=HOST_MODEL, messages=user_message(two_images, "Use image 1 on image 2."), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REFUSAL
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].model_extra["visguard"]["blocked"] is True


def test_unknown_model_is_404(permissive):
    with pytest.raises(openai.NotFoundError):
        client(permissive).chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------- the gate


def test_bearer_token_auth(guard):
    server = serve(guard, auth_token="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, key="wrong").models.list()
        assert [m.id for m in client(server, key="s3cret").models.list()] == ["visguard"]
        resp = httpx.post(server.url + "/v1/guard/check", json={"text": "hi"})
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + "/healthz").status_code == 200  # probes need no token
    finally:
        server.stop()


def test_concurrency_limit_answers_429():
    # A slow check holds the only slot (a slow *body* holds none: it is read before a slot is taken,
    # see tests/test_endpoint_transparent.py::test_slow_senders_hold_no_concurrency_slot).
    from visguard_testing.backends import KeywordBackend, keyword_guard

    release = threading.Event()

    class SlowBackend(KeywordBackend):
        def score(self, prompts):
            release.wait(30)
            return super().score(prompts)

    guard, _ = keyword_guard("bomb")
    guard = Guard(SlowBackend("bomb"), guard.format, guard.policy)
    server = serve(guard, max_concurrency=1)

    first: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: first.append(httpx.post(
        server.url + "/v1/guard/check", json={"text": "hello", "images": []}, timeout=60)))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while "visguard_http_inflight_requests 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the slow request never reached the server"
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as err:
            client(server, max_retries=0).models.list()
        assert err.value.response.headers["retry-after"] == "1"
    finally:
        release.set()
        worker.join(30)
        server.stop()
    assert first[0].status_code == 200 and first[0].json()["label"] in ("safe", "unsafe")


def test_request_size_limit_answers_413(guard):
    server = serve(guard, max_body_bytes=64 * 1024)
    try:
        big = {"text": "x" * (100 * 1024)}
        assert httpx.post(server.url + "/v1/guard/check", json=big).status_code == 413
        chunked = (b"x" * 8192 for _ in range(16))  # no Content-Length: counted while reading
        resp = httpx.post(server.url + "/v1/guard/check", content=chunked, headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    finally:
        server.stop()


def test_health_readiness_and_metrics(permissive, guard):
    assert httpx.get(permissive.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(permissive.url + "/readyz").status_code == 200
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    orphan = serve(guard, dead)
    try:
        ready = httpx.get(orphan.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "the upstream model is not answering"
        assert "127.0.0.1" not in ready.text  # unauthenticated: the upstream's address is not shown
    finally:
        orphan.stop()

    client(permissive).chat.completions.create(model=HOST_MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    text = httpx.get(permissive.url + "/metrics").text
    assert re.search(r'visguard_checks_total\{mode="fast",stage="input"\} [1-9]', text)
    assert re.search(r'visguard_verdicts_total\{label="safe",stage="output"\} [1-9]', text)
    assert 'visguard_check_latency_seconds_bucket{le="+Inf",stage="input"}' in text
    assert re.search(r'visguard_guarded_requests_total\{outcome="passed"\} [1-9]', text)
    assert re.search(r'visguard_http_requests_total\{path="/v1/chat/completions",status="200"\} [1-9]', text)


# ---------------------------------------------------------------------------------- the CLI


def test_cli_serves_a_guarded_upstream(qwen_path, upstream, two_images):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VG_TEST_TOKEN": "t0ken"}
    cmd = [sys.executable, "-m", "visguard.cli", "serve", "--model", qwen_path, "--device", "cpu", "--port", str(port),
           "--upstream", upstream, "--auth-token-env", "VG_TEST_TOKEN", "--threshold", "1.0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "visguard serve did not start in 60 s"
            time.sleep(0.25)
        cli_client = openai.OpenAI(base_url=url + "/v1", api_key="t0ken")
        assert [m.id for m in cli_client.models.list()] == [HOST_MODEL]  # learned from the upstream
        resp = cli_client.chat.completions.create(model=HOST_MODEL, messages=user_message(two_images, "Hi"), max_tokens=12)
        assert resp.model_extra["visguard"]["blocked"] is False
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
