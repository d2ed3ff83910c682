"""A recording upstream for proxy tests: a loopback FastAPI app that records every request body it
receives and replays scripted answers (a JSON body, ``(status, body)``, or a list of SSE ``data:``
payloads for a stream).

The scripted answers follow the shapes of the `openai` Python package installed in .venv (openai
3.63.0: ``openai/types/chat/chat_completion.py``, ``chat_completion_chunk.py``,
``openai/types/responses/response.py``, ``response_stream_event.py``), which are generated from
OpenAI's API reference (https://platform.openai.com/docs/api-reference/chat/create,
https://platform.openai.com/docs/api-reference/responses-streaming).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from visguard.integrations.openai.server.upstream import ServerThread

UPSTREAM_MODEL = "up-model"


class Recorder:
    """What the upstream received (``received``: (path, body)) and what it answers next (``answers``)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []
        self.answers: list[Any] = []

    def script(self, *answers: Any) -> Recorder:
        self.received.clear()
        self.answers[:] = list(answers)
        return self

    def bodies(self, path: str | None = None) -> list[Any]:
        return [b for p, b in self.received if path is None or p == path]


def sse_lines(events: list[Any], *, done: bool = True) -> list[str]:
    """SSE framing of chat chunks (``data: <json>``) ending with ``data: [DONE]``; str events pass raw."""
    out = [e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n" for e in events]
    return [*out, "data: [DONE]\n\n"] if done else out


def responses_sse(events: list[dict[str, Any]]) -> list[str]:
    """SSE framing of Responses API events (``event: <type>`` + ``data: <json>``; no ``[DONE]``)."""
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events]


def recording_app(recorder: Recorder) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": UPSTREAM_MODEL, "object": "model", "created": 0, "owned_by": "test"}]}

    async def answer(path: str, request: Request) -> Response:
        recorder.received.append((path, json.loads(await request.body())))
        reply = recorder.answers.pop(0)
        if isinstance(reply, tuple):
            status, payload = reply
            if isinstance(payload, str):
                return Response(payload, status_code=status, media_type="text/plain")
            return JSONResponse(payload, status_code=status)
        if isinstance(reply, list):
            return StreamingResponse(iter(reply), media_type="text/event-stream")
        return JSONResponse(reply)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer("/chat/completions", request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await answer("/responses", request)

    return app


def start_recording_upstream() -> tuple[ServerThread, Recorder]:
    recorder = Recorder()
    return ServerThread(recording_app(recorder)).start(), recorder
