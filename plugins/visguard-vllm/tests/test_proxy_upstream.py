"""`visguard serve --upstream` in front of a real vLLM OpenAI server (CPU, tiny Qwen2-VL): the chat
completions and Responses API passthrough against the upstream its wire shapes were written for
(issue 25). A relay between the proxy and vLLM records exactly what vLLM answered the proxy (bodies
and SSE events); the client must get exactly that, plus the `visguard` field. (Comparing with a
second, direct call is not reliable: the random-weight model's near-tied logits can come out
differently from one vLLM batch to the next.) The guard is visguard_testing's keyword guard.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from test_openai_server import MODEL_NAME, server  # noqa: F401 - the vLLM server fixture
from visguard_testing.backends import keyword_guard

from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread


def relay_app(target: str, seen: list) -> FastAPI:
    """Forwards /v1/* to vLLM and records each answer: a JSON body, or the list of SSE data payloads."""
    app = FastAPI()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def relay(path: str, request: Request) -> Response:
        body = json.loads(await request.body() or b"null")
        async with httpx.AsyncClient(timeout=120) as http:
            if request.method == "GET":
                return JSONResponse((await http.get(f"{target}/{path}")).json())
            if not (body or {}).get("stream"):
                answer = (await http.post(f"{target}/{path}", json=body)).json()
                seen.append(answer)
                return JSONResponse(answer)
            async with http.stream("POST", f"{target}/{path}", json=body) as r:
                lines = [line async for line in r.aiter_lines()]
        seen.append([json.loads(x[6:]) for x in lines if x.startswith("data: ") and x[6:] != "[DONE]"])
        return StreamingResponse(iter(line + "\n" for line in lines), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def proxied(server):  # noqa: F811 - the fixture imported above
    seen: list = []
    with ServerThread(relay_app(server, seen)) as relay:
        guard, _ = keyword_guard("bomb")
        app = create_app(guard, relay.url + "/v1", settings=ServeSettings(max_wait_ms=0),
                         host_options={"model": MODEL_NAME, "api_key_env": None})
        with ServerThread(app) as running:
            yield running.url + "/v1", seen


def _events(url: str, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line[6:] != "[DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_chat_completion_from_vllm_arrives_unchanged(proxied):
    proxy, seen = proxied
    body = {"model": MODEL_NAME, "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Say hello."}],
            "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2, "seed": 1}
    got = httpx.post(proxy + "/chat/completions", json=body, timeout=120).json()
    assert got.pop("visguard")["blocked"] is False
    assert got == seen[-1] and got["choices"][0]["logprobs"]["content"]


def test_responses_from_vllm_arrive_unchanged(proxied):
    proxy, seen = proxied
    client = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0)
    body = {"model": MODEL_NAME, "input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 8,
            "temperature": 0}
    raw = client.responses.with_raw_response.create(**body)
    got = raw.http_response.json()
    assert got.pop("visguard")["blocked"] is False and got == seen[-1]
    assert raw.parse().output_text == "".join(c["text"] for o in got["output"] if o["type"] == "message"
                                              for c in o["content"])
    typed = list(client.responses.create(**body, stream=True))
    assert [e.type for e in typed] == [e["type"] for e in seen[-1]] and typed[-1].type == "response.completed"


def test_streams_from_vllm_arrive_unchanged(proxied):
    proxy, seen = proxied
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    got = _events(proxy + "/chat/completions", chat)
    assert got[-1].pop("visguard")["blocked"] is False
    assert got == seen[-1] and "usage" in got[-1]
    responses = {"model": MODEL_NAME, "input": "Say hello.", "max_output_tokens": 8, "temperature": 0, "stream": True}
    got = _events(proxy + "/responses", responses)
    assert got[-1]["response"].pop("visguard")["blocked"] is False
    assert got == seen[-1] and got[-1]["type"] == "response.completed"
