"""The transparent guarded proxy of ``visguard serve --upstream``: requests and answers pass unchanged.

When the guarded host is an OpenAI-compatible server (the ``openai`` host), ``visguard serve``
forwards the client's request JSON as it came (every field: system/developer messages, earlier
turns, ``tools``, ``response_format``, ``logprobs``, ``n``, unknown fields ...) and returns the
upstream's answer as it came (every choice, ``tool_calls``, ``finish_reason``, ``logprobs``,
``usage`` ...), except where the guard decides:

- the **pre-check** judges the whole conversation: the images of every message, the last message's
  text, and the earlier turns quoted (:class:`~visguard.core.types.GuardRequest` ``conversation``,
  tool calls rendered as ``[tool call name(arguments)]``). A blocked request never reaches the
  upstream;
- the **post-check** judges each choice's answer: its text, refusal, reasoning and tool calls
  (names and arguments). A blocked choice is replaced by the refusal (``finish_reason:
  "content_filter"``, no tool calls); the others pass unchanged. Streams are held back per choice
  and released after a check of everything so far passed; a tool call is released only after its
  complete arguments passed (the check at the choice's ``finish_reason``).

The upstream's own text never reaches the client unchecked: an upstream error status, a body that
is not a chat completion, a malformed or error stream event and a stream that ends early become
generic errors (OpenAI's error shape) naming no upstream text. The client-facing ``visguard`` field
carries labels, scores and categories only (:func:`public_decision`); full verdicts go to the audit log.

:mod:`visguard.integrations.openai.server.responses` guards the Responses API with the same pieces.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from visguard.core.errors import GuardrailViolation, GuardUnavailableError, InputError
from visguard.core.images import GuardImage, ImageLimits, load_images
from visguard.core.redact import redact
from visguard.core.types import MAX_TEXT_CHARS, GuardRequest, Verdict
from visguard.engine.checker import Checker, report_answer, report_answer_from
from visguard.hosting.audit import AuditLog
from visguard.hosting.guarded import (
    DEFAULT_REFUSAL,
    DEFAULT_UNAVAILABLE_MESSAGE,
    STREAM_CHECK_EVERY,
    STREAM_CHECK_MIN_PIECES,
    STREAM_REFUSAL_SEPARATOR,
    UNNAMED_CATEGORY,
    StreamCadence,
)
from visguard.hosting.public import PUBLIC_DECISION_FIELDS as PUBLIC_DECISION_FIELDS  # re-exported
from visguard.hosting.public import PUBLIC_VERDICT_FIELDS as PUBLIC_VERDICT_FIELDS
from visguard.hosting.public import public_decision as public_decision
from visguard.hosting.public import public_name as public_name
from visguard.hosting.public import public_verdict
from visguard.integrations.openai.client import ApiClient
from visguard.integrations.openai.server.common import ApiError

log = logging.getLogger(__name__)

#: deepest JSON nesting a request body may have (deeper: HTTP 400 before parsing the rest)
MAX_JSON_DEPTH = 64
_ROLES = {"system": "system", "developer": "developer", "user": "user", "assistant": "assistant",
          "tool": "tool", "function": "tool"}


# ---------------------------------------------------------------------------------- request bodies


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON, or :class:`ApiError` 400 (invalid UTF-8, malformed JSON, too deep)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from exc
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON{where}") from exc


def _max_depth(text: str) -> int:
    """Bracket depth outside strings (a bound checked before ``json.loads`` recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def request_object(body: Any, required: Sequence[str]) -> dict[str, Any]:
    """``body`` as a JSON object holding ``required`` fields, or :class:`ApiError` 400."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in required:
        if name not in body:
            raise ApiError(400, f"missing required parameter: {name!r}", param=name)
    return body


# ---------------------------------------------------------------------------------- images


def image_size(url: str) -> tuple[int, int] | None:
    """Width and height of a base64 data-URL image from its header (nothing decoded); ``None``: not one."""
    from PIL import Image

    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        return None
    try:
        data = base64.b64decode(payload, validate=False)
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError):
        return None  # the image boundary names what is wrong with it


def load_request_images(urls: Sequence[str | Mapping[str, Any]], limits: ImageLimits | None,
                        max_request_pixels: int | None) -> list[GuardImage]:
    """The images of one request through the image boundary, after a pixel budget for the request.

    ``max_request_pixels`` bounds width x height summed over the request's images, read from the
    image headers before anything is decoded (``None``: no budget).

    Raises:
        InputError: over the budget, or an image refused at the boundary.
    """
    if max_request_pixels is not None:
        total = 0
        for item in urls:
            url = item if isinstance(item, str) else str((item.get("image_url") or {}).get("url", "")
                                                         if isinstance(item.get("image_url"), dict)
                                                         else item.get("image_url", ""))
            size = image_size(url)
            if size is not None:
                total += size[0] * size[1]
        if total > max_request_pixels:
            raise InputError(f"the request's images hold {total} pixels, more than the limit of {max_request_pixels}")
    return load_images(list(urls), limits)


# ---------------------------------------------------------------------------------- rendering


def tool_call_text(name: Any, arguments: Any) -> str:
    """How a tool call is shown to the guard: ``[tool call name(arguments)]``."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"[tool call {name}({args})]"


def _parts_text(content: Any, image_parts: list[Any] | None, *, mark_images: bool) -> str:
    """Text of a message content (a string or a list of parts); image parts go to ``image_parts``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            raise InputError(f"a content part must be an object, got {type(part).__name__}")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text", "refusal", "summary_text", "reasoning_text"):
            value = part.get("text", part.get("refusal", ""))
            if not isinstance(value, str):
                raise InputError(f"a {kind} part needs a string")
            texts.append(value)
        elif kind in ("image_url", "input_image"):
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InputError(f"an {kind} part needs an image URL (file ids are not supported)")
            if image_parts is not None:
                image_parts.append(url)
                if mark_images:
                    texts.append(f"[image {len(image_parts)}]")
        elif kind in ("input_audio", "file", "input_file"):
            raise InputError(f"{kind} parts cannot be checked by this guard")
        else:
            raise InputError(f"unknown content part type {str(kind)[:40]!r}")
    return "\n".join(t for t in texts if t)


def message_text(message: Mapping[str, Any], image_parts: list[Any] | None = None, *, mark_images: bool = True) -> str:
    """Everything a chat message says: content, refusal, reasoning, tool calls (legacy ``function_call`` too)."""
    pieces = [_parts_text(message.get("content"), image_parts, mark_images=mark_images)]
    for key in ("refusal", "reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            pieces.append(value)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InputError("tool_calls must be a list")
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            pieces.append(tool_call_text(fn.get("name"), fn.get("arguments", "")))
        elif isinstance(call, dict):
            pieces.append(tool_call_text(call.get("type", "tool"), call.get("custom", call)))
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        pieces.append(tool_call_text(legacy.get("name"), legacy.get("arguments", "")))
    return "\n".join(p for p in pieces if p)


@dataclass
class Judged:
    """A conversation as the guard judges it: every image, the last turn's text, the earlier turns."""

    image_urls: list[Any]
    text: str
    conversation: list[dict[str, str]]


def judged_chat(messages: Any) -> Judged:
    """Chat messages (OpenAI shape, any roles and parts) -> what the pre-check judges.

    The last message is the request (prefixed ``Tool: `` when it is a tool result, as an agent
    sends one back); every earlier message is a quoted turn, its images marked ``[image N]``.

    Raises:
        InputError: the messages are malformed.
    """
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    image_urls: list[Any] = []
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"messages[{i}] must be an object")
        role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InputError(f"messages[{i}].role must be one of {sorted(_ROLES)}")
        last = i == len(messages) - 1
        text = message_text(message, image_urls, mark_images=not last)
        turns.append({"role": role, "content": text})
    final = turns.pop()
    text = final["content"] if final["role"] == "user" else f"{final['role'].title()}: {final['content']}"
    return Judged(image_urls=image_urls, text=text, conversation=turns)


# ---------------------------------------------------------------------------------- decisions


def refusal_text(verdict: Verdict, template: str | Callable[[Verdict], str] | None) -> str:
    """The replacement for a blocked answer (the ``refusal`` template, or the unavailable message)."""
    if verdict.label == "unavailable":
        chosen: str | Callable[[Verdict], str] = DEFAULT_UNAVAILABLE_MESSAGE
    else:
        chosen = template if template is not None else DEFAULT_REFUSAL
    if callable(chosen):
        return str(chosen(verdict))
    return chosen.format_map({
        "category": verdict.category or UNNAMED_CATEGORY,
        "sub_category": verdict.sub_category or "",
        "label": verdict.label,
        "stage": verdict.stage,
        "score": verdict.score if verdict.score is not None else float("nan"),
    })


@dataclass
class Decision:
    """What the guard decided for one proxied call (pre-check, and per choice the post-check)."""

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    blocked: bool = False
    flagged: bool = False
    degraded: bool = False
    reason: str | None = None
    stage: str | None = None
    input_verdict: Verdict | None = None
    output_checks: int = 0
    host_called: bool = False
    answered_by_guard: bool = False
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: per choice, the answer window size that fit the guard (``report_answer_from``; not shown to clients)
    windows: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The client-facing ``visguard`` field (see :func:`public_decision`)."""
        out: dict[str, Any] = {
            "blocked": self.blocked, "flagged": self.flagged, "reason": self.reason, "stage": self.stage,
            "degraded": self.degraded, "request_id": self.request_id, "output_checks": self.output_checks,
            "host_called": self.host_called, "answered_by_guard": self.answered_by_guard, "input_verdict": public_verdict(self.input_verdict),
        }
        if self.choices:  # the first blocked choice's verdict, else the first choice's
            ordered = [{"index": i, **c} for i, c in sorted(self.choices.items())]
            out["output_verdict"] = next((c for c in ordered if c["blocked"]), ordered[0])["output_verdict"]
            out["choices"] = ordered
        return out


class Judge:
    """Checks for the proxy: the pre-check, post-checks, the policy's action, the audit log."""

    def __init__(self, guard: Checker, *, on_unsafe: str, post_check: bool, refusal: str | None,
                 audit: AuditLog | None, host_model: str, limits: ImageLimits | None,
                 max_request_pixels: int | None) -> None:
        self.guard = guard
        self.on_unsafe = on_unsafe
        self.checks_answers = post_check
        self.refusal = refusal
        self.audit = audit
        self.host_model = host_model
        self.limits = limits
        self.max_request_pixels = max_request_pixels

    async def request(self, judged: Judged) -> GuardRequest:
        """The guard request (images through the boundary, off the event loop); 400 when refused."""
        def build() -> GuardRequest:
            images = load_request_images(judged.image_urls, self.limits, self.max_request_pixels)
            return self.guard.request(images, judged.text, conversation=judged.conversation)
        try:
            return await asyncio.to_thread(build)
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages" if "image" not in str(exc) else "images") from exc

    def _act(self, decision: Decision, verdict: Verdict, request: GuardRequest, *, partial: bool = False) -> bool:
        """The policy's action on ``verdict`` (audited); True lets the answer through."""
        action = self.guard.policy.action(verdict)
        shown = {"pass": "pass", "degraded": "degraded", "raise": "raise", "flag": "flag"}.get(action)
        if shown is None:
            shown = "raise" if self.on_unsafe == "error" else "block"
        if self.audit is not None:
            self.audit.record_verdict(verdict, request_id=decision.request_id, images=request.images,
                                      action=shown, partial=partial, host_model=self.host_model)
        if action == "pass":
            return True
        if action == "degraded":
            decision.degraded = True
            return True
        if action == "raise":
            raise GuardUnavailableError(verdict)
        if not decision.flagged:
            decision.flagged = True
            decision.reason = "unavailable" if verdict.label == "unavailable" else "unsafe"
            decision.stage = verdict.stage
        if action == "flag":  # a log-only category: let through, flagged (and audited above)
            return True
        if self.on_unsafe == "error":
            raise GuardrailViolation(verdict)
        return False

    async def pre_check(self, decision: Decision, request: GuardRequest) -> str | None:
        """Run the pre-check: ``None`` lets the request go on, else the text that answers instead."""
        (verdict,) = await asyncio.to_thread(self.guard.report_batch, [request])
        decision.input_verdict = verdict
        if self._act(decision, verdict, request):
            return None
        decision.blocked = True
        return await self.replacement(decision, verdict, request)

    async def post_check(self, decision: Decision, request: GuardRequest, index: int, answer: str,
                         *, partial: bool = False) -> str | None:
        """Check choice ``index``'s answer so far: ``None`` passes it, else the text that replaces it."""
        # a stream's re-checks start at the window size that fit the last one (see report_answer_from)
        verdict, decision.windows[index] = await asyncio.to_thread(
            report_answer_from, self.guard, request, answer, decision.windows.get(index, MAX_TEXT_CHARS))
        decision.output_checks += 1
        decision.choices[index] = {"output_verdict": public_verdict(verdict), "blocked": False}
        if self._act(decision, verdict, request, partial=partial):
            return None
        decision.choices[index]["blocked"] = True
        return await self.replacement(decision, verdict, request)

    async def replacement(self, decision: Decision, verdict: Verdict, request: GuardRequest) -> str:
        """The refusal, or with ``on_unsafe="safe_answer"`` the guard's own answer once it passed a check."""
        if self.on_unsafe == "safe_answer" and verdict.label == "unsafe" and verdict.safe_answer:
            check = await asyncio.to_thread(report_answer, self.guard, request, verdict.safe_answer)
            decision.output_checks += 1
            if self.audit is not None:
                self.audit.record_verdict(check, request_id=decision.request_id, images=request.images,
                                          action="pass" if check.label == "safe" else "block",
                                          host_model=self.host_model)
            if check.label == "safe":
                decision.answered_by_guard = True
                return verdict.safe_answer
        return refusal_text(verdict, self.refusal)


# ---------------------------------------------------------------------------------- the upstream


class Upstream:
    """The upstream OpenAI-compatible server: raw JSON in, raw JSON (or SSE lines) out.

    Errors name no upstream text: a status becomes ``ApiError(502, "the upstream answered HTTP N")``.
    """

    def __init__(self, client: ApiClient, served_model: Callable[[], str]) -> None:
        self.client = client
        self.served_model = served_model

    async def _body(self, body: Mapping[str, Any]) -> dict[str, Any]:
        try:  # the first call may ask the upstream's /models (blocking I/O: off the event loop)
            model = await asyncio.to_thread(self.served_model)
        except Exception as exc:  # noqa: BLE001 - reported without the upstream's text
            raise self._failed(exc) from exc
        return {**body, "model": model}

    def _status(self, status: int) -> ApiError:
        log.warning("upstream %s answered HTTP %d", redact(self.client.root), status)
        if status in (400, 404, 413, 422):  # the upstream refused this request
            return ApiError(400, f"the upstream model refused the request (HTTP {status})", code="upstream_refused")
        return ApiError(502, f"the upstream model failed (HTTP {status})", type="server_error", code="upstream_error")

    def _failed(self, exc: Exception) -> ApiError:
        log.warning("upstream %s failed: %s", redact(self.client.root), redact(f"{type(exc).__name__}: {exc}"))
        if isinstance(exc, httpx.TimeoutException):
            return ApiError(504, "the upstream model did not answer in time", type="server_error", code="upstream_timeout")
        return ApiError(502, "the upstream model could not be reached", type="server_error", code="upstream_error")

    async def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST ``body`` and return the answer's JSON (any JSON: the caller checks its shape)."""
        payload = await self._body(body)
        try:
            async with httpx.AsyncClient(headers=self.client.headers,
                                         timeout=httpx.Timeout(self.client.timeout_s)) as http:
                response = await http.post(self.client.url(path), json=payload)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc
        if response.status_code >= 400:
            raise self._status(response.status_code)
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(502, "the upstream model sent an answer that is not JSON", type="server_error",
                           code="upstream_error") from exc

    async def open_stream(self, path: str, body: Mapping[str, Any]) -> tuple[AsyncIterator[str], Callable[[], Any]]:
        """Open a stream: ``(lines, aclose)``; a refused or failed start is an :class:`ApiError`."""
        payload = await self._body(body)
        http = httpx.AsyncClient(headers={**self.client.headers, "Accept": "text/event-stream"},
                                 timeout=httpx.Timeout(self.client.timeout_s))
        try:
            response = await http.send(http.build_request("POST", self.client.url(path), json=payload), stream=True)
        except httpx.HTTPError as exc:
            await http.aclose()
            raise self._failed(exc) from exc
        if response.status_code >= 400:
            await response.aclose()
            await http.aclose()
            raise self._status(response.status_code)

        async def lines() -> AsyncIterator[str]:
            try:
                async for line in response.aiter_lines():
                    yield line
            except httpx.HTTPError as exc:
                raise StreamBroke from exc

        async def aclose() -> None:
            await response.aclose()
            await http.aclose()

        return lines(), aclose


class StreamBroke(Exception):
    """The upstream stream broke off (a transport error); its text is logged, never sent."""


class UpstreamShapeError(Exception):
    """The upstream sent something that is not the expected shape (the message names no upstream text)."""


def sse_json(line: str) -> Any:
    """One SSE ``data:`` line's JSON; ``None`` for other lines, :data:`DONE_MARK` for ``[DONE]``.

    Raises:
        UpstreamShapeError: not JSON, or an error event.
    """
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE_MARK
    try:
        event = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UpstreamShapeError("the upstream model sent a malformed stream event") from exc
    if not isinstance(event, dict):
        raise UpstreamShapeError("the upstream model sent an unexpected stream event")
    if "error" in event or event.get("type") == "error":
        raise UpstreamShapeError("the upstream model reported an error mid-stream")
    return event


DONE_MARK = object()


def error_event(message: str, *, type: str = "server_error", code: str = "upstream_error") -> dict[str, Any]:
    """An in-band error event (OpenAI's error shape) for a stream whose status line is already sent."""
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def guard_error(exc: Exception) -> ApiError:
    """The HTTP error for a guard decision raised as an exception (labels, scores and categories only)."""
    if isinstance(exc, GuardrailViolation):
        return ApiError(400, "the request or answer was blocked by the content filter", type="content_filter",
                        code="content_filter", extra={"visguard": {"blocked": True, "verdict": public_verdict(exc.verdict)}})
    if isinstance(exc, GuardUnavailableError):
        return ApiError(503, "the safety check is unavailable", type="server_error", code="guard_unavailable",
                        extra={"visguard": {"blocked": True, "verdict": public_verdict(exc.verdict)}})
    raise exc


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------------------------- chat completions


def _shape_error(what: str) -> ApiError:
    return ApiError(502, f"the upstream model sent {what}", type="server_error", code="upstream_error")


class _ChoiceState:
    """One streamed choice: what it said so far, and its chunks held back until a check passes."""

    def __init__(self, index: int, cadence: StreamCadence | None = None) -> None:
        self.index = index
        self.held: list[dict[str, Any]] = []
        self.text = {"content": "", "refusal": "", "reasoning_content": ""}
        self.calls: dict[int, dict[str, str]] = {}
        self.cadence = cadence or StreamCadence()
        self.finish: Any = None
        self.closed = False
        self.blocked = False
        self.shown = False

    def absorb(self, event: dict[str, Any], choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise UpstreamShapeError("the upstream model sent an unexpected chunk")
        said: list[str] = []
        for key, slot in (("content", "content"), ("refusal", "refusal"), ("reasoning_content", "reasoning_content"),
                          ("reasoning", "reasoning_content")):
            value = delta.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise UpstreamShapeError("the upstream model sent an unexpected chunk")
            self.text[slot] += value
            said.append(value)
        calls = delta.get("tool_calls") or []
        legacy = delta.get("function_call")
        if not isinstance(calls, list) or (legacy is not None and not isinstance(legacy, dict)):
            raise UpstreamShapeError("the upstream model sent an unexpected chunk")
        for call in calls:
            if not isinstance(call, dict) or not isinstance(call.get("function") or {}, dict):
                raise UpstreamShapeError("the upstream model sent an unexpected chunk")
            self._add_call(call.get("index", 0), call.get("function") or {})
        if legacy is not None:
            self._add_call(-1, legacy)
        self.held.append(event)
        self.cadence.add(*said)
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]

    def _add_call(self, index: Any, fn: dict[str, Any]) -> None:
        slot = self.calls.setdefault(index if isinstance(index, int) else 0, {"name": "", "arguments": ""})
        for key in ("name", "arguments"):
            value = fn.get(key)
            if value is not None:
                if not isinstance(value, str):
                    raise UpstreamShapeError("the upstream model sent an unexpected chunk")
                slot[key] += value

    def answer(self) -> str:
        return message_text({**self.text, "tool_calls": [{"function": c} for _, c in sorted(self.calls.items())]})

    def due(self) -> str | None:
        """``final`` at the choice's end; ``partial`` at the cadence (:class:`StreamCadence`), never
        while a tool call is open."""
        if self.finish is not None:
            return "final"
        if self.calls:
            return None
        return "partial" if self.cadence.due() else None

    def release(self) -> list[dict[str, Any]]:
        events, self.held = self.held, []
        self.cadence.reset()
        self.shown = self.shown or any(
            (c.get("delta") or {}).get("content") for e in events for c in e["choices"])
        return events

    def refusal_chunk(self, text: str, template: Mapping[str, Any]) -> dict[str, Any]:
        self.closed, self.blocked, self.held = True, True, []
        delta: dict[str, Any] = {"content": (STREAM_REFUSAL_SEPARATOR if self.shown else "") + text}
        if not self.shown:
            delta = {"role": "assistant", **delta}
        return {**_chunk_head(template), "choices": [{"index": self.index, "delta": delta, "logprobs": None,
                                                      "finish_reason": "content_filter"}]}


def _chunk_head(template: Mapping[str, Any]) -> dict[str, Any]:
    head = {k: template[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in template}
    return {"object": "chat.completion.chunk", **head}


class ChatProxy:
    """``POST /v1/chat/completions`` passed through to the upstream, guarded (see the module doc)."""

    def __init__(self, judge: Judge, upstream: Upstream, *, stream_check_every: int = STREAM_CHECK_EVERY,
                 stream_check_min_pieces: int = STREAM_CHECK_MIN_PIECES) -> None:
        self.judge = judge
        self.upstream = upstream
        self.stream_check_every = stream_check_every
        self.stream_check_min_pieces = stream_check_min_pieces

    def cadence(self) -> StreamCadence:
        """A new stream's (a choice's) re-check cadence."""
        return StreamCadence(self.stream_check_every, self.stream_check_min_pieces)

    async def prepare(self, body: dict[str, Any]) -> tuple[GuardRequest, Decision, str | None]:
        """Pre-check a request: ``(guard request, decision, replacement or None)``."""
        try:
            judged = judged_chat(body.get("messages"))
        except InputError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        request = await self.judge.request(judged)
        decision = Decision()
        replacement = await self.judge.pre_check(decision, request)
        return request, decision, replacement

    # ---- whole answers
    async def complete(self, body: dict[str, Any], request: GuardRequest, decision: Decision) -> dict[str, Any]:
        """The upstream's completion with each blocked choice replaced, plus ``visguard``."""
        decision.host_called = True
        answer = await self.upstream.post("/chat/completions", body)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
            raise _shape_error("an answer that is not a chat completion")
        try:
            texts = [message_text(c["message"]) for c in choices]
        except (InputError, AttributeError, TypeError) as exc:
            raise _shape_error("a chat completion message of an unexpected shape") from exc
        if self.judge.checks_answers:
            results = await asyncio.gather(*(self.judge.post_check(decision, request, _index(c, i), t)
                                             for i, (c, t) in enumerate(zip(choices, texts, strict=True))))
            for choice, replacement in zip(choices, results, strict=True):
                if replacement is not None:
                    choice["message"] = {"role": "assistant", "content": replacement}
                    choice["finish_reason"] = "content_filter"
                    choice["logprobs"] = None
                    decision.blocked = True
        return {**answer, "visguard": decision.summary()}

    def refused(self, body: dict[str, Any], text: str, decision: Decision) -> dict[str, Any]:
        """A completion whose every choice is ``text`` (a request blocked before the upstream)."""
        asked = body.get("n")
        n = asked if isinstance(asked, int) and asked > 0 else 1
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": now(),
            "model": body.get("model"),
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "content_filter"} for i in range(n)],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "visguard": decision.summary(),
        }

    # ---- streams
    async def refused_stream(self, body: dict[str, Any], text: str, decision: Decision) -> AsyncIterator[str]:
        completion = self.refused(body, text, decision)
        head = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
                "model": completion["model"]}
        for choice in completion["choices"]:
            yield _sse({**head, "choices": [{"index": choice["index"], "logprobs": None, "finish_reason": None,
                                            "delta": {"role": "assistant", "content": text}}]})
        finals = [{"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": "content_filter"}
                  for c in completion["choices"]]
        yield _sse({**head, "choices": finals, "visguard": decision.summary()})
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            yield _sse({**head, "choices": [], "usage": completion["usage"]})
        yield "data: [DONE]\n\n"

    async def open(self, body: dict[str, Any], decision: Decision) -> tuple[AsyncIterator[str], Callable[[], Any]]:
        decision.host_called = True
        return await self.upstream.open_stream("/chat/completions", body)

    async def stream(self, lines: AsyncIterator[str], aclose: Callable[[], Any], request: GuardRequest,
                     decision: Decision, expected: int) -> AsyncIterator[str]:
        """The upstream's chunks, each choice held back until a check passed; ``visguard`` on the last."""
        states: dict[int, _ChoiceState] = {}
        tail: list[dict[str, Any]] = []
        template: dict[str, Any] = {}
        pending: list[dict[str, Any]] = []  # the last event out waits: it gets ``visguard``
        failure: dict[str, Any] | None = None
        done = False
        try:
            async for line in lines:
                event = sse_json(line)
                if event is None:
                    continue
                if event is DONE_MARK:
                    done = True
                    break
                choices = event.get("choices")
                if not isinstance(choices, list):
                    raise UpstreamShapeError("the upstream model sent an unexpected chunk")
                template = template or event
                if not choices:
                    tail.append(event)
                    continue
                for choice in choices:
                    index = choice.get("index", 0) if isinstance(choice, dict) else None
                    if not isinstance(index, int) or not 0 <= index < max(expected, 1):
                        raise UpstreamShapeError("the upstream model sent an unexpected chunk")
                    state = states.setdefault(index, _ChoiceState(index, self.cadence()))
                    if state.closed:
                        continue
                    state.absorb({**event, "choices": [choice]}, choice)
                    for out in await self._advance(state, request, decision, template):
                        if pending:
                            yield _sse(pending.pop())
                        pending.append(out)
                if len(states) == expected and all(s.blocked for s in states.values()):
                    done = True  # every choice is blocked: nothing more will be released
                    break
            if not done or len(states) < expected or any(s.finish is None and not s.closed for s in states.values()):
                failure = error_event("the upstream model's stream ended early; the answer is incomplete")
        except UpstreamShapeError as exc:
            failure = error_event(str(exc))
        except StreamBroke:
            failure = error_event("the upstream model's stream broke off; the answer is incomplete")
        except (GuardrailViolation, GuardUnavailableError) as exc:
            failure = guard_error(exc).body()
        finally:
            await aclose()
        if failure is None:
            pending.extend(tail)
        if pending:
            last = pending.pop()
            for event in pending:
                yield _sse(event)
            yield _sse({**last, "visguard": decision.summary()} if failure is None else last)
        if failure is not None:
            yield _sse({**failure, "visguard": decision.summary()})
        yield "data: [DONE]\n\n"

    async def _advance(self, state: _ChoiceState, request: GuardRequest, decision: Decision,
                       template: Mapping[str, Any]) -> list[dict[str, Any]]:
        """What choice ``state`` releases now (its held chunks, or its refusal)."""
        due = state.due()
        answer = state.answer()
        if due == "final":
            state.closed = True
        if not self.judge.checks_answers or (due is not None and not answer):
            return state.release() if (due is not None or not self.judge.checks_answers) else []
        if due is None:
            return []
        replacement = await self.judge.post_check(decision, request, state.index, answer, partial=due == "partial")
        if replacement is None:
            return state.release()
        decision.blocked = True
        return [state.refusal_chunk(replacement, template)]


def _index(choice: Mapping[str, Any], default: int) -> int:
    index = choice.get("index", default)
    return index if isinstance(index, int) else default


def _sse(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
