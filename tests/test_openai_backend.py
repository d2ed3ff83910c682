"""The ``openai`` guard backend against real servers on loopback.

Here: the upstream app (`visguard.integrations.openai.server.upstream`) serving the tiny Qwen2-VL checkpoint, and
`visguard serve` in front of it for rate limiting. Fast-mode scores against a server that returns
logprobs (vLLM's OpenAI server) are compared with the transformers backend in
plugins/visguard-vllm/tests/test_openai_server.py, which `make test` runs in .venv-vllm.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from visguard import Guard, Policy, plugins
from visguard.default_plugins.openai_backend import OpenAIBackend
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread, create_upstream_app

MODEL = "tiny-host"


@pytest.fixture(scope="module")
def host(qwen_path):
    h = plugins.get("hosts", "transformers")(qwen_path, device="cpu", dtype="float32")
    yield h
    h.close()


@pytest.fixture(scope="module")
def upstream(host):
    with ServerThread(create_upstream_app(host, model_name=MODEL)) as server:
        yield server.url + "/v1"


@pytest.fixture(scope="module")
def reference(qwen_path):
    g = Guard.from_pretrained(qwen_path, device="cpu", dtype="float32")
    yield g
    g.close()


@pytest.fixture
def two_images(images):
    return images[:2]


def remote(base_url: str, **kw) -> Guard:
    return Guard.from_pretrained(MODEL, backend="openai", base_url=base_url, **kw)


def test_reason_mode_over_http_generates_what_the_local_guard_generates(upstream, qwen_path, two_images):
    # visguard's own upstream app serves a host, which takes (images, text): it puts the images
    # first, so it can only reproduce a prompt laid out that way. Layout 1 of the visguard format is
    # (layout 2 puts the static instructions before the images; a vLLM server keeps that order).
    layout1 = VisguardFormat(version=1)
    policy = Policy(mode="reason", max_new_tokens=16)
    guard = Guard.from_pretrained(MODEL, backend="openai", base_url=upstream, scores=False, format=layout1, policy=policy)
    local = Guard.from_pretrained(qwen_path, device="cpu", dtype="float32", format=layout1, policy=policy)
    try:
        request = guard.request(two_images, "Is it safe to use image 1 on image 2?")
        got = guard.check(request)
        want = local.check(request)
    finally:
        guard.close()
        local.close()
    # The upstream renders (images, text) with the same chat template, so greedy text is identical.
    assert got.raw == want.raw and got.raw
    assert got.label == want.label and got.label != "safe"  # random weights write no verdict line
    assert got.score is None  # this server offers no logprobs


def test_fast_mode_without_scores_is_unavailable_never_safe(upstream, two_images):
    guard = remote(upstream, scores=False)
    try:
        assert guard.backend.supports_scores is False
        verdict = guard.check_input(two_images, "hello")
    finally:
        guard.close()
    assert verdict.label == "unavailable" and "cannot score" in verdict.error


def test_fast_mode_on_a_server_that_cannot_prefill_is_unavailable(upstream, two_images):
    guard = remote(upstream)
    try:
        body = guard.backend.score_request(guard.format.build(guard.request(two_images, "hi"), guard.policy, mode="fast"))
        verdict = guard.check_input(two_images, "hi")
    finally:
        guard.close()
    assert body["messages"][-1] == {"role": "assistant", "content": "Verdict:"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    urls = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]
    assert [d.convert("RGB").tobytes() for d in decoded] == [i.tobytes() for i in two_images]  # lossless PNG
    # The upstream app takes no prefilled assistant turn (and returns no logprobs): it says 400.
    assert verdict.label == "unavailable" and "HTTP 400" in verdict.error


def test_connect_errors_are_retried_with_backoff_then_unavailable(two_images):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    guard = remote(dead, max_retries=2, backoff_s=0.2)
    try:
        start = time.perf_counter()
        verdict = guard.check_input(two_images, "hi")
        elapsed = time.perf_counter() - start
    finally:
        guard.close()
    assert verdict.label == "unavailable" and "unreachable" in verdict.error
    assert elapsed >= 0.2 + 0.4  # two retries, the second after a doubled delay


def test_client_errors_are_not_retried(upstream, two_images):
    guard = Guard.from_pretrained("no-such-model", backend="openai", base_url=upstream, scores=False, backoff_s=5.0,
                                  policy=Policy(mode="reason", max_new_tokens=4))
    try:
        start = time.perf_counter()
        verdict = guard.check_input(two_images, "hi")
        elapsed = time.perf_counter() - start
    finally:
        guard.close()
    assert verdict.label == "unavailable" and "HTTP 404" in verdict.error
    assert elapsed < 5.0


def test_api_key_comes_from_the_named_environment_variable(host, two_images, monkeypatch):
    with ServerThread(create_upstream_app(host, model_name=MODEL, api_key="k3y")) as server:
        policy = Policy(mode="reason", max_new_tokens=4)
        monkeypatch.delenv("VG_GUARD_KEY", raising=False)
        keyless = remote(server.url + "/v1", scores=False, api_key_env="VG_GUARD_KEY", policy=policy)
        monkeypatch.setenv("VG_GUARD_KEY", "k3y")
        keyed = remote(server.url + "/v1", scores=False, api_key_env="VG_GUARD_KEY", policy=policy)
        try:
            denied = keyless.check_input(two_images, "hi")
            allowed = keyed.check_input(two_images, "hi")
        finally:
            keyless.close()
            keyed.close()
    assert denied.label == "unavailable" and "HTTP 401" in denied.error
    assert allowed.raw and allowed.error != denied.error


def test_rate_limited_requests_are_retried_until_served(reference, upstream, two_images):
    """`visguard serve` with one slot in front of the upstream: its real 429 makes the backend back off."""
    gate_app = create_app(reference, upstream, settings=ServeSettings(max_concurrency=1), host_options={"model": MODEL})
    release = threading.Event()
    gate_guard = gate_app.state.guard
    report_batch = gate_guard.report_batch

    def held_first(requests, **kw):  # the first check holds the only slot (a slow body holds none)
        if requests[0].text == "hold":
            release.wait(30)
        return report_batch(requests, **kw)

    gate_guard.report_batch = held_first

    with ServerThread(gate_app) as server:
        holder = threading.Thread(target=lambda: httpx.post(server.url + "/v1/guard/check", timeout=60,
                                                            json={"text": "hold", "images": []}))
        holder.start()
        deadline = time.monotonic() + 10
        while "visguard_http_inflight_requests 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        guard = remote(server.url + "/v1", scores=False, max_retries=4, backoff_s=0.3,
                       policy=Policy(mode="reason", max_new_tokens=8))
        result: list = []
        checker = threading.Thread(target=lambda: result.append(guard.check_input(two_images, "hi")))
        checker.start()
        while 'visguard_http_rejected_total{reason="overloaded"} 1.0' not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        release.set()  # the slot frees up while the backend waits to retry
        checker.join(60)
        holder.join(60)
        guard.close()
    assert result and result[0].raw  # served after the retry (a completion came back)


def test_backend_arguments_are_checked():
    from visguard.core.errors import BackendError, InputError

    with pytest.raises(BackendError, match="base_url"):
        OpenAIBackend("m")
    with pytest.raises(InputError, match="http"):
        OpenAIBackend("m", base_url="ftp://x")
