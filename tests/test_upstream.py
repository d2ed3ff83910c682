"""The OpenAI-compatible upstream app and the ``openai`` host, against a real server on loopback.

A tiny transformers VLM is served by ``create_upstream_app`` through uvicorn on 127.0.0.1 (a free
port, in a background thread). It is called by the official ``openai`` client, by raw HTTP, by
:class:`OpenAIHost`, and by a guard wrapped around the endpoint's URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from visguard import BackendError, Guard, ImageInputError, InputError, load_image, load_images
from visguard.default_plugins.openai_host import OpenAIHost
from visguard.default_plugins.transformers_host import TransformersHost
from visguard.hosting.guarded import DEFAULT_REFUSAL, UNNAMED_CATEGORY
from visguard.hosting.hosts import CallableHost, resolve_host
from visguard.integrations.openai.server.upstream import ServerThread, create_upstream_app
from visguard.integrations.openai.wire import messages_to_prompt, split_messages

MODEL = "tiny-qwen2-vl"
KEY = "sk-test-not-a-secret"
KEY_ENV = "VISGUARD_TEST_UPSTREAM_KEY"
TEXT = "describe the images"
REFUSAL = DEFAULT_REFUSAL.format(category=UNNAMED_CATEGORY)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingHost(TransformersHost):
    """The real transformers host, recording what each request brought and how streams ended."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[dict] = []
        self.streams: list[dict] = []

    def _record(self, images, text, kwargs) -> None:
        pixels = [hashlib.sha256(g.image.tobytes()).hexdigest() for g in images]
        self.requests.append({"pixels": pixels, "text": text, "kwargs": dict(kwargs)})

    def generate(self, images, text, **kwargs):
        self._record(images, text, kwargs)
        return super().generate(images, text, **kwargs)

    def stream(self, images, text, *, cancel=None, **kwargs):
        self._record(images, text, kwargs)
        record = {"pieces": 0, "done": threading.Event(), "cancel": cancel}
        self.streams.append(record)
        try:
            for piece in super().stream(images, text, cancel=cancel, **kwargs):
                record["pieces"] += 1
                yield piece
        finally:
            record["done"].set()


@pytest.fixture(scope="module")
def host(qwen_path) -> RecordingHost:
    return RecordingHost(qwen_path, max_new_tokens=10)


@pytest.fixture(scope="module")
def server(host):
    with ServerThread(create_upstream_app(host, model_name=MODEL, api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def guard(qwen_path) -> Guard:
    return Guard.from_pretrained(qwen_path)


@pytest.fixture
def images() -> list[Image.Image]:
    return [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (40, 48), (30, 30, 200))]


def pixels(images) -> list[str]:
    return [hashlib.sha256(img.convert("RGB").tobytes()).hexdigest() for img in images]


def user_message(images, text=TEXT) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": load_image(img).to_data_url()}} for img in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


# ------------------------------------------------------------------ the app, from the outside
def test_health_models_and_auth(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "model": MODEL, "host": "transformers"}
    listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == [MODEL]
    denied = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_round_trip(server, host, images):
    expected = host.generate(load_images(images), TEXT, max_new_tokens=8)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    before = len(host.requests)
    completion = client.chat.completions.create(model=MODEL, messages=[user_message(images)], max_tokens=8)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop" and completion.model == MODEL
    seen = host.requests[before]
    assert seen["pixels"] == pixels(images) and seen["text"] == TEXT and seen["kwargs"] == {"max_new_tokens": 8}

    chunks = list(client.chat.completions.create(model=MODEL, messages=[user_message(images)], max_tokens=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format_ends_with_done(server, images):
    body = {"model": MODEL, "messages": [user_message(images)], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"model": "other"}, 404, "does not exist"),
        ({"n": 2}, 400, "n=1"),
        ({"messages": []}, 400, "invalid request"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         400, "image 0: not a recognised image"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
         400, "remote image URL refused"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, 400, "last message"),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, host, change, status, needle):
    before = len(host.requests)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]
    assert len(host.requests) == before


def test_host_failure_is_a_500_and_an_in_band_stream_error():
    def broken(images, text):
        raise RuntimeError("out of memory")

    with ServerThread(create_upstream_app(CallableHost(broken), model_name="broken")) as srv:
        body = {"model": "broken", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(srv.url + "/v1/chat/completions", json=body)
        assert response.status_code == 500 and "out of memory" in response.json()["error"]["message"]
        raw = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": True}).text
        assert "out of memory" in raw and raw.endswith("data: [DONE]\n\n")
        with pytest.raises(BackendError, match="out of memory"):
            list(OpenAIHost(srv.url, model="broken").stream([], "hi"))


# ------------------------------------------------------------------ messages -> (images, text)
def test_messages_to_prompt(images):
    got_images, text = messages_to_prompt([user_message(images, "what is this?")])
    assert text == "what is this?" and pixels(g.image for g in got_images) == pixels(images)

    chat = split_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [user_message(images[:1])["content"][0], {"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": "A red square."},
        user_message(images[1:], "compare them"),
    ])
    assert len(chat.images) == 2 and chat.text == "compare them"
    assert chat.conversation == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "[image 1]\nand this?"},
        {"role": "assistant", "content": "A red square."},
    ]
    assert chat.prompt_text() == "System: Be brief.\nUser: [image 1]\nand this?\nAssistant: A red square.\nUser: compare them"
    with pytest.raises(ImageInputError, match="at most 8"):
        messages_to_prompt([user_message(images * 5)])
    with pytest.raises(InputError, match="invalid chat messages"):
        messages_to_prompt([{"role": "wizard", "content": "hi"}])


# ------------------------------------------------------------------ the openai host
def test_openai_host_against_the_server(server, host, images, key_env):
    expected = host.generate(load_images(images), TEXT, max_new_tokens=6)
    remote = resolve_host(server.url, api_key_env=key_env)  # no /v1 and no model: both found
    assert isinstance(remote, OpenAIHost) and remote.url == server.url + "/v1/chat/completions"
    checked = load_images(images)
    assert remote.generate(checked, TEXT, max_new_tokens=6) == expected
    assert remote.model == remote.model_id == MODEL
    pieces = list(remote.stream(checked, TEXT, max_new_tokens=6))
    assert len(pieces) > 1 and "".join(pieces) == expected

    async def both():
        whole = await remote.agenerate(checked, TEXT, max_new_tokens=6)
        streamed = [p async for p in remote.astream(checked, TEXT, max_new_tokens=6)]
        return whole, streamed

    whole, streamed = asyncio.run(both())
    assert whole == expected and "".join(streamed) == expected
    assert host.requests[-1]["pixels"] == pixels(images)
    assert KEY not in repr(remote)
    remote.close()


def test_openai_host_errors(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    keyless = OpenAIHost(server.url + "/v1", model=MODEL, api_key_env=KEY_ENV)
    with pytest.raises(BackendError, match=rf"HTTP 401.*\${KEY_ENV} is not set"):
        keyless.generate([], "hi")
    keyless.close()
    nowhere = OpenAIHost("http://127.0.0.1:9/v1", model="x", timeout_s=2)
    with pytest.raises(BackendError, match="unreachable"):
        nowhere.generate([], "hi")
    nowhere.close()

    def slow(images, text):
        time.sleep(1.0)
        return "late"

    with ServerThread(create_upstream_app(CallableHost(slow), model_name="slow")) as srv:
        started = time.perf_counter()
        impatient = OpenAIHost(srv.url, model="slow", timeout_s=0.2)
        with pytest.raises(BackendError, match="timed out after 0.2 s"):
            impatient.generate([], "hi")
        assert time.perf_counter() - started < 0.9
        impatient.close()


# ------------------------------------------------------------------ a guard around the endpoint
def test_guard_wrapped_around_the_endpoint(server, host, guard, images, key_env):
    options = {"host_options": {"model": MODEL, "api_key_env": key_env, "max_tokens": 6}}
    expected = host.generate(load_images(images), TEXT, max_new_tokens=6)

    before = len(host.requests)
    blocked = guard.with_policy(threshold=0.0).wrap(server.url + "/v1", **options).generate(images, TEXT)
    assert blocked.blocked and blocked.text == REFUSAL and len(host.requests) == before  # never sent

    with guard.with_policy(threshold=1.0).wrap(server.url + "/v1", stream_check_every=2, **options) as safe:
        assert isinstance(safe.host, OpenAIHost)
        result = safe.generate(images, TEXT)
        assert result.text == result.response == expected and result.output_verdict.label == "safe"
        stream = safe.stream(images, TEXT)
        assert "".join(stream) == expected and stream.result.output_checks >= 2

        async def streamed():
            s = safe.astream(images, TEXT)
            return [p async for p in s], s.result

        pieces, aresult = asyncio.run(streamed())
        assert "".join(pieces) == expected and not aresult.blocked


class TokenCounter(LogitsProcessor):
    """Counts generation steps (one per new token) and leaves the scores as they are."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        return scores


def test_parallel_block_cancels_generation_on_the_server(host, guard, images):
    counter = TokenCounter()

    def options(request, served):  # 400 tokens exactly unless cancelled, counted
        limit = request.token_limit
        return {"max_new_tokens": limit, "min_new_tokens": limit, "logits_processor": LogitsProcessorList([counter])}

    with ServerThread(create_upstream_app(host, model_name=MODEL, generation_options=options)) as srv:
        guarded = guard.with_policy(threshold=0.0).wrap(srv.url, pre_check="parallel", host_options={"model": MODEL})
        streams = len(host.streams)
        result = guarded.generate(images, TEXT, max_new_tokens=400)
        assert result.blocked and result.text == REFUSAL and result.response is None
        assert result.host_called and result.host_cancelled
        deadline = time.monotonic() + 10
        while len(host.streams) == streams and time.monotonic() < deadline:
            time.sleep(0.02)
        (record,) = host.streams[streams:]  # the server did start generating
        # The client hung up, the server told the host to stop, and generation ended early.
        assert record["cancel"] is not None and record["cancel"].wait(10), "the server did not cancel the host"
        assert host._lock.acquire(timeout=30)
        host._lock.release()
        assert 0 < counter.steps < 400
