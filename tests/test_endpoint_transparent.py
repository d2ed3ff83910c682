"""`visguard serve --upstream` as a transparent guarded endpoint (issue 25; issue 24 items 3, 5, 7, 10, 13).

The real `openai` client talks to the proxy, the proxy to a recording upstream
(tests/recording_upstream.py) that records what it receives and replays scripted answers. The guard
is a rule-based keyword guard (visguard_testing.backends.KeywordBackend): a request or answer holding
"bomb" is unsafe, everything else safe, so every verdict is known.

Wire shapes: the scripted completions and chunks follow the `openai` package's types in .venv
(openai 3.63.0, openai/types/chat/chat_completion.py and chat_completion_chunk.py), generated from
https://platform.openai.com/docs/api-reference/chat/object and .../chat/streaming.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import socket
import time

import httpx
import openai
import pytest
from PIL import Image
from recording_upstream import UPSTREAM_MODEL, sse_lines, start_recording_upstream
from visguard_testing.backends import KeywordBackend

from visguard.integrations.openai.server.app import ServeSettings, create_app, decision_headers
from visguard.integrations.openai.server.upstream import ServerThread

SECRET = "UPSTREAM-SECRET-TEXT-1234"


class PromptRecorder(KeywordBackend):
    """A keyword backend that also keeps the whole prompt text the guard format built."""

    def __init__(self, *keywords: str) -> None:
        super().__init__(*keywords)
        self.prompts: list[str] = []

    def score(self, prompts):
        self.prompts += [p.messages[-1]["content"][-1]["text"] for p in prompts]
        return super().score(prompts)


@pytest.fixture(scope="module")
def upstream():
    server, recorder = start_recording_upstream()
    yield server, recorder
    server.stop()


def start_proxy(upstream_url: str, backend: KeywordBackend | None = None, **settings):
    from visguard import Guard, Policy
    from visguard.default_plugins.visguard_format import VisguardFormat

    backend = backend or KeywordBackend("bomb")
    guard = Guard(backend, VisguardFormat(), Policy())
    settings.setdefault("max_wait_ms", 0)
    settings.setdefault("stream_check_every", 2)
    app = create_app(guard, upstream_url + "/v1", settings=ServeSettings(**settings),
                     host_options={"model": UPSTREAM_MODEL, "api_key_env": None})
    server = ServerThread(app).start()
    return server, backend


@pytest.fixture(scope="module")
def proxy(upstream):
    server, backend = start_proxy(upstream[0].url, PromptRecorder("bomb"))
    yield server, backend
    server.stop()


class Sent:
    """Records the bodies the openai client sends (an httpx request hook)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> None:
        self.bodies.append(json.loads(request.read()))


def client(server: ServerThread, sent: Sent | None = None) -> openai.OpenAI:
    hooks = {"request": [sent]} if sent is not None else {}
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(event_hooks=hooks, timeout=30))


def png_url(color=(200, 30, 30), size=(32, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

PNG = png_url()

#: the same tool in the Responses API's shape (openai/types/responses/function_tool_param.py)
TOOLS_RESPONSES = [{"type": "function", "name": "get_weather", "description": "weather of a city", "strict": False,
                    "parameters": TOOLS[0]["function"]["parameters"]}]

CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "developer", "content": "Answer in one line."},
    {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": png_url()}}]},
    {"role": "assistant", "content": "arr", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "rain"},
    {"role": "user", "content": "and in Paris?"},
]


def logprobs(token: str) -> dict:
    return {"content": [{"token": token, "logprob": -0.25, "bytes": list(token.encode()),
                         "top_logprobs": [{"token": token, "logprob": -0.25, "bytes": list(token.encode())}]}],
            "refusal": None}


def completion(*choices: dict) -> dict:
    return {"id": "chatcmpl-up1", "object": "chat.completion", "created": 1700000000, "model": UPSTREAM_MODEL,
            "system_fingerprint": "fp_up", "service_tier": "default",
            "choices": [{"index": i, **c} for i, c in enumerate(choices)],
            "usage": {"prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38,
                      "completion_tokens_details": {"reasoning_tokens": 0}}}


def text_choice(text: str, finish: str = "stop") -> dict:
    return {"message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": logprobs(text), "finish_reason": finish}


def tool_choice(arguments: str) -> dict:
    return {"message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        "logprobs": None, "finish_reason": "tool_calls"}


def chunk(delta: dict, finish=None, index: int = 0, **extra) -> dict:
    return {"id": "chatcmpl-up2", "object": "chat.completion.chunk", "created": 1700000001, "model": UPSTREAM_MODEL,
            "system_fingerprint": "fp_up", "choices": [{"index": index, "delta": delta, "logprobs": extra.get("lp"),
                                                       "finish_reason": finish}]}


def usage_chunk() -> dict:
    return {"id": "chatcmpl-up2", "object": "chat.completion.chunk", "created": 1700000001, "model": UPSTREAM_MODEL,
            "system_fingerprint": "fp_up", "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}


def tool_call_chunks(arguments: list[str]) -> list[dict]:
    first = chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
    pieces = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in arguments]
    return [first, *pieces, chunk({}, "tool_calls"), usage_chunk()]


def raw_stream(server: ServerThread, body: dict) -> list[dict]:
    """The proxy's SSE events, parsed (``[DONE]`` checked and dropped)."""
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---------------------------------------------------------------------------------- plain


def test_plain_chat_is_forwarded_and_answered_unchanged(proxy, upstream):
    server, backend = proxy
    recorder = upstream[1]
    answer = completion(text_choice("Sunny in Paris."), tool_choice("{\"city\": \"Paris\"}"))
    recorder.script(copy.deepcopy(answer))
    sent = Sent()
    raw = client(server, sent).chat.completions.with_raw_response.create(
        model=UPSTREAM_MODEL, messages=CONVERSATION, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        logprobs=True, top_logprobs=1, n=2, stop=["\n\n"], seed=7, max_completion_tokens=50,
        extra_body={"top_k": 5, "chat_template_kwargs": {"enable_thinking": False}},
    )
    # what the upstream received is what the client sent, field for field
    assert recorder.bodies() == sent.bodies
    # what the client got is what the upstream answered, plus the decision
    got = raw.http_response.json()
    decision = got.pop("visguard")
    assert got == answer
    parsed = raw.parse()
    assert parsed.choices[1].message.tool_calls[0].function.arguments == "{\"city\": \"Paris\"}"
    assert parsed.choices[0].logprobs.content[0].token == "Sunny in Paris."
    assert parsed.choices[1].finish_reason == "tool_calls" and parsed.system_fingerprint == "fp_up"
    assert decision["blocked"] is False and decision["output_checks"] == 2
    # the guard judged the whole conversation: system prompt and earlier turns quoted, tool calls shown
    pre = next(p for p in backend.prompts if "<assistant_response>" not in p)
    for needle in ("[system] You are a pirate.", "[developer] Answer in one line.", "[image 1]",
                   "[tool call get_weather({\"city\": \"Oslo\"})]", "[tool] rain", "and in Paris?"):
        assert needle in pre, needle
    assert any("[tool call get_weather({\"city\": \"Paris\"})]" in p for p in backend.prompts)


def test_unsafe_tool_call_argument_is_blocked_the_safe_choice_passes(proxy, upstream):
    server, _ = proxy
    answer = completion(text_choice("Here you go."), tool_choice("{\"recipe\": \"bomb\"}"))
    upstream[1].script(copy.deepcopy(answer))
    raw = client(server).chat.completions.with_raw_response.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "help"}], tools=TOOLS, n=2)
    got = raw.http_response.json()
    assert got["choices"][0] == answer["choices"][0]
    blocked = got["choices"][1]
    assert blocked["finish_reason"] == "content_filter" and "tool_calls" not in blocked["message"]
    assert "bomb" not in json.dumps(got)
    assert raw.headers["x-visguard-blocked"] == "true"
    assert got["visguard"]["choices"][1]["blocked"] is True and got["visguard"]["choices"][0]["blocked"] is False


def test_unsafe_request_never_reaches_the_upstream(proxy, upstream):
    server, _ = proxy
    upstream[1].script()
    result = client(server).chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "a bomb"}])
    assert upstream[1].received == []
    assert result.choices[0].finish_reason == "content_filter"
    assert "bomb" not in result.choices[0].message.content


def test_client_metadata_carries_labels_scores_and_categories_only(proxy, upstream):
    server, _ = proxy
    upstream[1].script(completion(text_choice("bomb recipe follows")))
    got = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]}).json()
    from visguard.integrations.openai.server.proxy import PUBLIC_VERDICT_FIELDS

    decision = got["visguard"]
    for verdict in (decision["input_verdict"], decision["choices"][0]["output_verdict"]):
        assert set(verdict) == set(PUBLIC_VERDICT_FIELDS)
    assert "timings" not in decision and "bomb" not in json.dumps(got)


# ---------------------------------------------------------------------------------- streams


def test_streamed_tool_call_and_usage_arrive_unchanged(proxy, upstream):
    server, _ = proxy
    upstream_chunks = tool_call_chunks(["{\"city\":", " \"Paris\"}"])
    upstream[1].script(sse_lines(copy.deepcopy(upstream_chunks)))
    body = {"model": UPSTREAM_MODEL, "messages": CONVERSATION, "tools": TOOLS, "stream": True,
            "stream_options": {"include_usage": True}, "parallel_tool_calls": True}
    got = raw_stream(server, body)
    assert upstream[1].bodies() == [body]
    decision = got[-1].pop("visguard")
    assert got == upstream_chunks and decision["blocked"] is False
    # the real client reads it as a tool call
    upstream[1].script(sse_lines(copy.deepcopy(upstream_chunks)))
    args, finish = "", None
    for c in client(server).chat.completions.create(**body):
        for choice in c.choices:
            for call in choice.delta.tool_calls or []:
                args += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert args == "{\"city\": \"Paris\"}" and finish == "tool_calls"


def test_unsafe_streamed_function_call_is_blocked_before_any_of_it_leaves(proxy, upstream):
    server, _ = proxy
    upstream[1].script(sse_lines(tool_call_chunks(["{\"how\": \"b", "omb\"}"])))
    got = raw_stream(server, {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "tools": TOOLS, "stream": True})
    text = json.dumps(got)
    assert "omb" not in text and "get_weather" not in text and "call_9" not in text
    finals = [c["finish_reason"] for e in got for c in e.get("choices", []) if c["finish_reason"]]
    assert finals == ["content_filter"]


def test_streamed_n2_logprobs_each_choice_checked(proxy, upstream):
    server, _ = proxy
    chunks = [
        chunk({"role": "assistant", "content": ""}, index=0), chunk({"role": "assistant", "content": ""}, index=1),
        chunk({"content": "Fine. "}, index=0, lp=logprobs("Fine. ")), chunk({"content": "A bomb"}, index=1),
        chunk({"content": "Really."}, "length", index=0, lp=logprobs("Really.")), chunk({"content": "!"}, "stop", index=1),
    ]
    upstream[1].script(sse_lines(copy.deepcopy(chunks)))
    got = raw_stream(server, {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "n": 2, "logprobs": True, "stream": True})
    got[-1].pop("visguard")
    zero = [e for e in got if e["choices"][0]["index"] == 0]
    assert zero == [chunks[0], chunks[2], chunks[4]]  # unchanged: logprobs and finish_reason "length" kept
    one = "".join((c["delta"].get("content") or "") for e in got for c in e["choices"] if c["index"] == 1)
    assert "bomb" not in one
    assert [c["finish_reason"] for e in got for c in e["choices"] if c["index"] == 1 and c["finish_reason"]] == \
        ["content_filter"]


@pytest.mark.parametrize("events", [
    [chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"})],  # no finish, no [DONE]
    [chunk({"role": "assistant", "content": "Hello"}), chunk({}, "stop")],  # finish but cut before [DONE]
], ids=["mid-answer", "before-done"])
def test_truncated_upstream_stream_ends_with_an_error_not_stop(proxy, upstream, events):
    server, _ = proxy
    upstream[1].script(sse_lines(events, done=False))
    got = raw_stream(server, {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert "error" in got[-1] and not got[-1].get("choices")
    if events[-1]["choices"][0]["finish_reason"] is None:  # the answer was cut: no finish_reason at all
        assert all(c.get("finish_reason") is None for e in got for c in e.get("choices", []))
    upstream[1].script(sse_lines(events, done=False))
    with pytest.raises(openai.APIError):
        list(client(server).chat.completions.create(model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "hi"}],
                                                    stream=True))


# ---------------------------------------------------------------------------------- no upstream text in errors


@pytest.mark.parametrize("answer", [
    (500, {"error": {"message": SECRET + " x-api-key: abc"}}),
    (400, {"error": {"message": SECRET}}),
    (500, SECRET),
    {"choices": [{"index": 0, "text": SECRET, "finish_reason": "stop"}], "object": "text_completion"},
    {"detail": SECRET},
], ids=["500", "400", "500-text", "completions-shaped", "not-a-completion"])
def test_upstream_errors_name_no_upstream_text(proxy, upstream, answer):
    server, _ = proxy
    upstream[1].script(answer)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code in (400, 502)
    assert SECRET not in r.text and set(r.json()) == {"error"}


@pytest.mark.parametrize("events", [
    ["data: {not json " + SECRET + "\n\n"],
    [{"error": {"message": SECRET}}],
    [{"object": "chat.completion.chunk", "choices": {"text": SECRET}}],
    [chunk({"role": "assistant", "content": ""}), {"choices": [{"index": 0, "delta": SECRET}]}],
    [{"type": "error", "message": SECRET}],
], ids=["malformed", "error-event", "unexpected-chunk", "bad-delta", "typed-error"])
def test_stream_errors_name_no_upstream_text(proxy, upstream, events):
    server, _ = proxy
    upstream[1].script(sse_lines(events))
    got = raw_stream(server, {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert "error" in got[-1] and SECRET not in json.dumps(got)


# ---------------------------------------------------------------------------------- request errors


@pytest.mark.parametrize("payload", [
    b"{\"model\": \"up-model\", \"messages\": [",
    b"{\"model\": \"up-model\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}",
    b"[" * 100_000 + b"]" * 100_000,
    b"{\"model\": \"up-model\", \"messages\": " + b"[" * 3000 + b"]" * 3000 + b"}",
    b"\"just a string\"",
], ids=["malformed", "invalid-utf8", "deep-array", "deep-messages", "not-an-object"])
def test_bad_bodies_get_openai_error_bodies(proxy, payload):
    server, _ = proxy
    r = httpx.post(server.url + "/v1/chat/completions", content=payload, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and r.json()["error"]["type"] == "invalid_request_error"


def test_guard_check_deep_nesting_and_unknown_paths_use_the_openai_error_shape(proxy):
    server, _ = proxy
    deep = httpx.post(server.url + "/v1/guard/check", content=b"{\"text\": " + b"[" * 5000 + b"]" * 5000 + b"}",
                      headers={"content-type": "application/json"}, timeout=30)
    assert deep.status_code == 400 and "error" in deep.json()
    missing = httpx.get(server.url + "/v1/nothing-here", timeout=30)
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


# ---------------------------------------------------------------------------------- issue 24 items


def test_category_with_control_characters_makes_a_valid_header():
    headers = decision_headers({"blocked": True, "reason": "unsafe\r\nx-evil: 1",
                                "input_verdict": {"label": "unsafe", "score": 1.0,
                                                  "category": "Viol\x00ent\r\nSet-Cookie: a=b\u00e9"}})
    for value in headers.values():
        assert all(" " <= ch <= "~" for ch in value), value


def test_readyz_shows_no_credentials_and_no_local_path(upstream, tmp_path):
    backend = KeywordBackend("bomb")
    backend.model_id = str(tmp_path / "models" / "private-guard")
    url = f"http://127.0.0.1:{free_port()}/v1?api_key=sk-live-{SECRET}"
    server, _ = start_proxy(url, backend)
    try:
        r = httpx.get(server.url + "/readyz", timeout=30)
        assert r.status_code == 503
        assert str(tmp_path) not in r.text and SECRET not in r.text and "127.0.0.1" not in r.text
        assert r.json()["guard"] == "private-guard"
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slow_senders_hold_no_concurrency_slot(upstream):
    server, _ = start_proxy(upstream[0].url, max_concurrency=1, read_timeout_s=1.0)
    try:
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{")
        time.sleep(0.2)  # the slow request is in the server (not a timing assert: only an ordering aid)
        upstream[1].script(completion(text_choice("ok")))
        fast = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert fast.status_code == 200, fast.text
        slow.settimeout(30)
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
        slow.close()
    finally:
        server.stop()


def test_decoded_pixels_per_request_are_bounded(upstream):
    server, _ = start_proxy(upstream[0].url, max_request_pixels=64 * 64)
    try:
        upstream[1].script()
        parts = [{"type": "image_url", "image_url": {"url": png_url(size=(64, 48))}} for _ in range(2)]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}]})
        assert r.status_code == 400 and "pixels" in r.json()["error"]["message"]
        assert upstream[1].received == []
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- LangChain through the proxy


def chat_openai(server: ServerThread, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=UPSTREAM_MODEL, max_retries=0, **kw)


def get_weather(city: str) -> str:
    """Weather of a city."""
    return "sunny"


def test_langchain_chat_openai_bind_tools_through_the_proxy(proxy, upstream):
    upstream[1].script(completion(tool_choice("{\"city\": \"Paris\"}")))
    message = chat_openai(proxy[0]).bind_tools([get_weather]).invoke("weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather" and message.tool_calls[0]["args"] == {"city": "Paris"}
    sent = upstream[1].bodies()[0]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert message.response_metadata["finish_reason"] == "tool_calls"
    upstream[1].script(completion(tool_choice("{\"city\": \"bomb\"}")))
    blocked = chat_openai(proxy[0]).bind_tools([get_weather]).invoke("weather?")
    assert blocked.tool_calls == [] and blocked.response_metadata["finish_reason"] == "content_filter"


def test_langchain_chat_openai_responses_api_through_the_proxy(proxy, upstream):
    from test_responses_api import function_call, message, response

    upstream[1].script(response(message("Checking."), function_call("{\"city\": \"Paris\"}")))
    model = chat_openai(proxy[0], use_responses_api=True).bind_tools([get_weather])
    answer = model.invoke("weather in Paris?")
    assert answer.tool_calls[0]["args"] == {"city": "Paris"}
    assert upstream[1].bodies("/responses")[0]["tools"][0]["name"] == "get_weather"
    upstream[1].script(response(function_call("{\"city\": \"bomb\"}")))
    blocked = model.invoke("weather?")
    assert blocked.tool_calls == [] and "bomb" not in str(blocked.content)


def test_served_model_name_is_mapped_to_the_upstreams(upstream):
    server, _ = start_proxy(upstream[0].url, model_name="public-name")
    try:
        upstream[1].script(completion(text_choice("ok")))
        sent = Sent()
        client(server, sent).chat.completions.create(model="public-name", messages=[{"role": "user", "content": "hi"}],
                                                     extra_body={"vendor_field": [1, 2]})
        received = upstream[1].bodies()[0]
        assert received["model"] == UPSTREAM_MODEL
        assert {**received, "model": "public-name"} == sent.bodies[0]
    finally:
        server.stop()
