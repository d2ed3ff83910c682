"""``visguard serve``: a guard as an HTTP service, and a guarded OpenAI-compatible chat proxy.

:func:`create_app` builds a FastAPI app around a :class:`~visguard.engine.checker.Checker` (a guard or a
cascade) and, optionally, a host (an upstream OpenAI-compatible server or a local model):

- ``POST /v1/guard/check``: ``{"images": [data URLs or image_url parts], "text": ..., "response":
  ..., "mode": ...}`` -> the :class:`~visguard.core.types.Verdict` as JSON (HTTP 200 whatever the label).
- ``POST /v1/chat/completions``: with an OpenAI-compatible upstream, a transparent passthrough
  (:mod:`visguard.integrations.openai.server.proxy`: the request and the answer unchanged except what
  the guard blocks). With a local host, guarded through
  :class:`~visguard.hosting.guarded.GuardedModel`: pre-check, the host's answer, post-check (re-checked
  as a stream grows). A blocked call gets a well-formed completion whose content is the refusal,
  ``finish_reason: "content_filter"`` (or, with ``on_unsafe="error"``, HTTP 400 with code
  ``content_filter``). Every completion (and a stream's last chunk) carries a ``visguard`` field:
  whether and why it was blocked, the verdicts' labels, scores and categories, and the request id
  (:func:`~visguard.hosting.public.public_decision`). The decision is also
  in ``x-visguard-*`` response headers (:func:`decision_headers`; a stream's headers carry the
  pre-check), and ``usage`` holds the host's token counts when the host reports them.
- ``POST /v1/responses``: the Responses API through the upstream, guarded the same way
  (:mod:`visguard.integrations.openai.server.responses`).
- ``POST /v1/moderations``: OpenAI's moderation endpoint answered by the guard
  (:mod:`visguard.integrations.openai.server.moderations`).
- ``GET /v1/models``, ``GET /healthz`` (liveness), ``GET /readyz`` (the upstream answers),
  ``GET /metrics`` (Prometheus, see :mod:`visguard.integrations.openai.server.metrics`).

Every ``/v1/...`` request passes one gate, in this order: bearer-token auth (401), body size (413),
concurrency limit (429, with ``Retry-After``), and sets the request's cache salt (the body's
``cache_salt``, under the bearer token's own salt; :func:`request_cache_salt`). Concurrent checks are
micro-batched by the guard's own batcher (:mod:`visguard.engine.batching`). The server keeps no state
between requests beyond metrics and the guard backend's prompt caches (salted per token and request;
docs/serving.md, "What the cache shares"): run as many replicas as needed behind a load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from visguard.core.errors import GuardrailViolation, GuardUnavailableError, InputError
from visguard.core.policy import Mode
from visguard.core.redact import redact
from visguard.core.types import Verdict
from visguard.engine.attribution import explaining
from visguard.engine.checker import Checker
from visguard.engine.guard import cache_salt
from visguard.hosting.audit import AuditLog
from visguard.hosting.guarded import GuardedModel, GuardedResult
from visguard.hosting.hosts import Host, TokenUsage, resolve_host
from visguard.integrations.openai.client import ApiClient
from visguard.integrations.openai.server.common import (
    SSE_HEADERS,
    ApiError,
    bearer_ok,
    chunk_builder,
    host_usage,
    install_error_handlers,
    over_http,
    read_chat,
    sse_data,
    sse_response,
    streamed_usage,
)
from visguard.integrations.openai.server.metrics import ServeMetrics
from visguard.integrations.openai.server.moderations import moderate
from visguard.integrations.openai.server.proxy import (
    ChatProxy,
    Judge,
    Upstream,
    guard_error,
    parse_json_body,
    public_decision,
    public_name,
    public_verdict,
    request_object,
)
from visguard.integrations.openai.server.responses import ResponsesProxy
from visguard.integrations.openai.wire import (
    SSE_DONE,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Delta,
    ModelCard,
    ModelList,
    TextPart,
    Usage,
    generation_options,
)

_log = logging.getLogger(__name__)

#: paths behind the gate (auth, size, concurrency)
GATED_PREFIX = "/v1/"


class ServeSettings(BaseModel):
    """How ``visguard serve`` behaves.

    Args:
        model_name: the model name chat clients send and ``/v1/models`` lists (default: the host's
            model id, else ``"visguard"``).
        max_concurrency: ``/v1/...`` requests served at once; more get HTTP 429.
        max_body_bytes: largest request body; larger gets HTTP 413.
        auth_token: when set, ``/v1/...`` requests need ``Authorization: Bearer <auth_token>`` (401).
        auth_tokens: more accepted bearer tokens, one per tenant (any of ``auth_token`` and these).
            With tokens set, each token's requests get their own cache salt (a hash of the token):
            clients of different tokens share no cached prompt prefix of the guard.
        max_batch_size / max_wait_ms: micro-batching of checks (applied to the guard's batcher,
            which every guard on the same backend shares).
        on_unsafe: ``refuse`` (a completion with the refusal), ``safe_answer`` (a completion with the
            guard's own safe reply, e.g. MIRage's answer in reason mode; the refusal when the guard
            gave none) or ``error`` (HTTP 400 ``content_filter``).
        pre_check: ``sequential`` (the host never sees a blocked request) or ``parallel``.
        post_check: check the host's answers.
        stream_check_every: re-check a streamed answer every N pieces (and at sentence ends).
        stream_check_min_pieces: a sentence end re-checks a streamed answer only after this many
            new pieces (the cadence of :class:`~visguard.hosting.guarded.StreamCadence`).
        refusal: the refusal template (default: the guarded model's).
        ready_timeout_s: how long ``/readyz`` waits for the upstream's ``/models``.
        audit: path of a JSONL audit log (:class:`~visguard.hosting.audit.AuditLog`): one line per decision,
            ``/v1/guard/check`` and every check of a chat call (a raise too), with image hashes
            and no texts; ``None``: no audit log.
        read_timeout_s: how long a client may take to send a whole request body (slower: HTTP 408).
            Bodies are read before a ``max_concurrency`` slot is taken, so slow senders hold none.
        max_request_pixels: width x height summed over one request's images, read from the image
            headers before anything is decoded (more: HTTP 400); ``None``: no per-request budget.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str | None = None
    max_concurrency: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    auth_token: str | None = Field(default=None, repr=False)
    auth_tokens: tuple[str, ...] = Field(default=(), repr=False)
    max_batch_size: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    on_unsafe: Literal["refuse", "safe_answer", "error"] = "refuse"
    pre_check: Literal["sequential", "parallel"] = "sequential"
    post_check: bool = True
    stream_check_every: int = Field(default=16, ge=1)
    stream_check_min_pieces: int = Field(default=8, ge=1)
    refusal: str | None = None
    ready_timeout_s: float = Field(default=2.0, gt=0)
    audit: str | None = None
    read_timeout_s: float = Field(default=30.0, gt=0)
    max_request_pixels: int | None = Field(default=2 * 4096 * 4096, ge=1)


class GuardCheckBody(BaseModel):
    """Body of ``POST /v1/guard/check``.

    Attributes:
        images: data URLs (``data:image/png;base64,...``) or OpenAI ``image_url`` parts, in order.
        text: the user's request.
        response: the host's answer, for a post-check.
        conversation: earlier turns, ``[{"role": ..., "content": str}]``.
        mode: ``fast`` / ``reason`` / ``adaptive`` (default: the server's policy).
        explain: also return ``attribution`` (which images / the text carry the harm; one guard only,
            see :mod:`visguard.engine.attribution`).
        cache_salt: this request's cache salt, as vLLM's (read by the gate, see :func:`request_cache_salt`).
    """

    model_config = ConfigDict(extra="forbid")

    images: list[str | dict[str, Any]] = Field(default_factory=list)
    text: str = ""
    response: str | None = None
    conversation: list[dict[str, str]] = Field(default_factory=list)
    mode: Mode | None = None
    explain: bool = False
    cache_salt: str | None = None


def create_app(
    guard: Checker,
    host: Host | str | None = None,
    *,
    settings: ServeSettings | None = None,
    host_options: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The ``visguard serve`` app.

    Args:
        guard: the guard, any :class:`~visguard.engine.checker.Checker` (a Guard or a Cascade; its policy
            decides; the app does not close it). Its image limits are used with
            ``allow_paths=False``: over HTTP only data URLs (and http(s) URLs where the policy's
            ``allow_remote`` is on) are accepted, never a path on this server.
        host: the model to guard for ``/v1/chat/completions``: a :class:`~visguard.hosting.hosts.Host`, an
            OpenAI-compatible base URL (``http://upstream:8000/v1``), a local model path, or
            ``None`` (then only ``/v1/guard/check`` is served).
        settings: see :class:`ServeSettings`.
        host_options: keyword arguments for :func:`~visguard.hosting.hosts.resolve_host` when ``host`` is
            a URL or a path (``model``, ``api_key_env``, ``timeout_s`` ...).

    Returns:
        The FastAPI app; run it with uvicorn (``visguard serve`` does).
    """
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    # images come from clients: never read a file on this server's disk (data URLs; remote URLs if allowed)
    guard = guard.with_policy(limits=over_http(guard.policy.limits))
    guard.configure_batching(max_batch=settings.max_batch_size, max_wait_ms=settings.max_wait_ms)
    guard.add_batch_observer(metrics.observe_batch)
    owns_host = host is not None and not isinstance(host, Host)
    resolved = resolve_host(host, **dict(host_options or {})) if host is not None else None
    audit = AuditLog(settings.audit) if settings.audit else None
    guarded: GuardedModel | None = None
    if resolved is not None:
        options: dict[str, Any] = {
            "on_unsafe": "raise" if settings.on_unsafe == "error" else settings.on_unsafe,
            "pre_check": settings.pre_check,
            "post_check": settings.post_check,
            "stream_check_every": settings.stream_check_every,
            "stream_check_min_pieces": settings.stream_check_min_pieces,
            "audit": audit,
        }
        if settings.refusal is not None:
            options["refusal"] = settings.refusal
        guarded = GuardedModel(guard, resolved, **options)
    model_name = settings.model_name or (resolved.model_id if resolved is not None else "") or "visguard"
    proxy = _chat_proxy(guard, resolved, settings, audit)
    responses_proxy = ResponsesProxy(proxy.judge, proxy.upstream, stream_check_every=settings.stream_check_every,
                                     stream_check_min_pieces=settings.stream_check_min_pieces) \
        if proxy is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_host and resolved is not None:
            resolved.close()
        if audit is not None:
            audit.close()

    app = FastAPI(title="visguard serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.guard = guard
    app.state.guarded = guarded
    app.state.proxy = proxy
    app.state.host = resolved
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.audit = audit
    app.state.model_name = model_name  # read per request: `visguard serve` may learn it from the upstream
    app.add_middleware(_Gate, settings=settings, metrics=metrics)
    probe = _ReadyProbe(resolved, settings.ready_timeout_s)

    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok, reason = await probe.check()
        # unauthenticated: names only, never a credential or a path on this server (item 5 of issue 24)
        body = {"status": "ready" if ok else "not ready", "guard": public_name(guard.model_id),
                "model": public_name(app.state.model_name)}
        if reason:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=app.state.model_name)])

    @app.post("/v1/guard/check")
    async def guard_check(body: GuardCheckBody) -> JSONResponse:
        try:
            if settings.max_request_pixels is not None:  # from the image headers, before anything is decoded
                await asyncio.to_thread(_budget_only, [_part_url(i) for i in body.images], settings.max_request_pixels)
            request = await asyncio.to_thread(guard.request, body.images, body.text, body.response,
                                              conversation=body.conversation)
            checker = explaining(guard) if body.explain else guard
            (verdict,) = await asyncio.to_thread(checker.report_batch, [request], mode=body.mode)
        except InputError as exc:  # refused at the input boundary, or a request the format cannot judge
            raise ApiError(400, str(exc), param="images" if "image" in str(exc) else None) from exc
        rid = uuid.uuid4().hex
        action = guard.policy.action(verdict)
        if audit is not None:  # every decision, a raise included, before the answer leaves
            audit.record_verdict(verdict, request_id=rid, images=request.images, action=action)
        headers = {"x-visguard-request-id": rid}
        if action == "raise":
            raise ApiError(503, str(GuardUnavailableError(verdict)), type="server_error", code="guard_unavailable",
                           extra={"visguard": verdict.model_dump(mode="json")}, headers=headers)
        return JSONResponse(verdict.model_dump(mode="json"), headers=headers)

    @app.post("/v1/responses", response_model=None)
    async def responses(http: Request) -> JSONResponse | StreamingResponse:
        data = request_object(parse_json_body(await http.body()), ("model", "input"))
        if responses_proxy is None:
            raise ApiError(404, "the Responses API needs an OpenAI-compatible upstream (start with --upstream)",
                           code="no_host")
        if data["model"] != app.state.model_name:
            raise ApiError(404, f"the model {str(data['model'])[:100]!r} does not exist; this server serves "
                                f"{app.state.model_name!r}", code="model_not_found", param="model")
        return await _proxy_responses(responses_proxy, data, metrics)

    @app.post("/v1/moderations")
    async def moderations(http: Request) -> JSONResponse:
        answer = await moderate(guard, parse_json_body(await http.body()), limits=guard.policy.limits,
                                max_request_pixels=settings.max_request_pixels, audit=audit,
                                model_name=public_name(guard.model_id))
        return JSONResponse(answer)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http: Request) -> JSONResponse | StreamingResponse:
        data = request_object(parse_json_body(await http.body()), ("model", "messages"))
        if guarded is None:
            raise ApiError(404, "this server guards no host model (start it with --upstream or --host-model); "
                             "use POST /v1/guard/check", code="no_host")
        if data["model"] != app.state.model_name:
            raise ApiError(404, f"the model {str(data['model'])[:100]!r} does not exist; this server serves "
                                f"{app.state.model_name!r}", code="model_not_found", param="model")
        if proxy is not None:
            return await _proxy_chat(proxy, data, metrics)
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValueError as exc:  # pydantic.ValidationError
            raise ApiError(400, f"invalid request: {str(exc).splitlines()[0]}", param="messages") from exc
        await _pixel_budget(body, settings.max_request_pixels)
        chat = await read_chat(body, app.state.model_name, guard.policy.limits)
        images, text = chat.images, chat.prompt_text()
        gen = generation_options(body, guarded.host)
        usage = host_usage(guarded.host, gen)  # the host's tokens; None: the host does not say
        if body.stream:
            return await _stream_response(guarded, images, text, gen, body.model, metrics, streamed_usage(body, usage))
        try:
            result = await guarded.agenerate(images, text, **gen)
        except Exception as exc:  # noqa: BLE001 - mapped to an HTTP status
            raise _chat_error(exc, metrics) from exc
        metrics.guarded.labels(_outcome(result)).inc()
        completion = ChatCompletion(
            model=body.model,
            choices=[Choice(message=AssistantMessage(content=result.text),
                            finish_reason="content_filter" if result.blocked else "stop")],
            usage=Usage.of(usage),
        )
        summary = public_decision(result.summary())  # labels, scores, categories: full verdicts go to the audit log
        return JSONResponse({**completion.model_dump(mode="json"), "visguard": summary},
                            headers=decision_headers(summary))

    return app


# ---------------------------------------------------------------------------------- chat helpers


def _chat_proxy(guard: Checker, host: Host | None, settings: ServeSettings, audit: AuditLog | None) -> ChatProxy | None:
    """The transparent passthrough when the host is an OpenAI-compatible server (it has an ApiClient)."""
    client = getattr(host, "client", None)
    served = getattr(host, "served_model", None)
    if host is None or not isinstance(client, ApiClient) or not callable(served):
        return None
    judge = Judge(guard, on_unsafe=settings.on_unsafe, post_check=settings.post_check, refusal=settings.refusal,
                  audit=audit, host_model=host.model_id, limits=guard.policy.limits,
                  max_request_pixels=settings.max_request_pixels)
    return ChatProxy(judge, Upstream(client, served), stream_check_every=settings.stream_check_every,
                     stream_check_min_pieces=settings.stream_check_min_pieces)


#: how a passthrough streams an upstream answer: ``(lines, aclose, guard request, decision) -> events``
StreamEvents = Callable[[Any, Any, Any, Any], AsyncIterator[str]]


async def _proxy_chat(proxy: ChatProxy, data: dict[str, Any], metrics: ServeMetrics) -> JSONResponse | StreamingResponse:
    """One chat completion through the transparent passthrough (see :mod:`.proxy`)."""
    n = data.get("n", 1)
    expected = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return await _passthrough(proxy, data, metrics,
                              lambda lines, aclose, request, decision: proxy.stream(lines, aclose, request, decision,
                                                                                    expected))


async def _proxy_responses(proxy: ResponsesProxy, data: dict[str, Any],
                           metrics: ServeMetrics) -> JSONResponse | StreamingResponse:
    """One Responses API call through the passthrough (see :mod:`.responses`)."""
    return await _passthrough(proxy, data, metrics,
                              lambda lines, aclose, request, decision: proxy.stream(lines, aclose, data, request,
                                                                                    decision))


async def _passthrough(proxy: ChatProxy | ResponsesProxy, data: dict[str, Any], metrics: ServeMetrics,
                       stream_events: StreamEvents) -> JSONResponse | StreamingResponse:
    """Pre-check, then the refusal, the guarded stream or the guarded answer: one shape for both APIs."""
    try:
        request, decision, replacement = await proxy.prepare(data)
        stream = data.get("stream") is True
        if replacement is not None:
            metrics.guarded.labels("blocked").inc()
            headers = decision_headers(decision.summary())
            if stream:
                return StreamingResponse(proxy.refused_stream(data, replacement, decision),
                                         media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
            return JSONResponse(proxy.refused(data, replacement, decision), headers=headers)
        if stream:
            lines, aclose = await proxy.open(data, decision)
            known = {"request_id": decision.request_id, "blocked": False,
                     "input_verdict": public_verdict(decision.input_verdict)}

            async def events() -> AsyncIterator[str]:
                async for event in stream_events(lines, aclose, request, decision):
                    yield event
                metrics.guarded.labels(_decision_outcome(decision)).inc()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **decision_headers(known)})
        answer = await proxy.complete(data, request, decision)
    except (GuardrailViolation, GuardUnavailableError) as exc:
        metrics.guarded.labels("blocked" if isinstance(exc, GuardrailViolation) else "error").inc()
        raise _decision_error(exc) from exc
    metrics.guarded.labels(_decision_outcome(decision)).inc()
    return JSONResponse(answer, headers=decision_headers(answer["visguard"]))


def _decision_outcome(decision: Any) -> str:
    if decision.blocked:
        return "blocked"
    if decision.flagged:
        return "flagged"
    return "degraded" if decision.degraded else "passed"


def _decision_error(exc: GuardrailViolation | GuardUnavailableError) -> ApiError:
    error = guard_error(exc)
    error.headers.update(_verdict_headers(exc.verdict))
    return error


async def _pixel_budget(body: ChatCompletionRequest, limit: int | None) -> None:
    """HTTP 400 when the request's images hold more pixels than ``limit`` (read from their headers)."""
    if limit is None:
        return
    urls = [part.image_url.url for m in body.messages if isinstance(m.content, list)
            for part in m.content if not isinstance(part, TextPart)]
    try:
        await asyncio.to_thread(_budget_only, urls, limit)
    except InputError as exc:
        raise ApiError(400, str(exc), param="messages") from exc


def _part_url(item: str | Mapping[str, Any]) -> str:
    """The URL of a data URL or an OpenAI ``image_url`` part (``""`` when it has none)."""
    if isinstance(item, str):
        return item
    inner = item.get("image_url")
    return str(inner.get("url", "") if isinstance(inner, Mapping) else inner or "")


def _budget_only(urls: list[str], limit: int) -> None:
    from visguard.integrations.openai.server.proxy import image_size

    total = sum(w * h for w, h in (image_size(u) or (0, 0) for u in urls))
    if total > limit:
        raise InputError(f"the request's images hold {total} pixels, more than the limit of {limit}")


def decision_headers(decision: Mapping[str, Any]) -> dict[str, str]:
    """The guard's decision as ``x-visguard-*`` response headers, where OpenAI clients surface it.

    Clients that drop unknown body fields still return headers (e.g. LangChain's
    ``ChatOpenAI(include_response_headers=True)`` puts them in ``response_metadata["headers"]``).

    Args:
        decision: a :meth:`GuardedResult.summary`, or for a stream what is known when its
            headers go out: ``request_id``, ``blocked`` and the ``input_verdict``.

    Returns:
        ``x-visguard-blocked`` (``true``/``false``), and when known ``-request-id``, ``-flagged``,
        ``-degraded``, ``-reason``, ``-stage``, ``-input-label``, ``-input-score``,
        ``-input-category`` and the same three for ``output``.
    """
    out = {"x-visguard-blocked": "true" if decision.get("blocked") else "false"}
    if decision.get("request_id"):
        out["x-visguard-request-id"] = str(decision["request_id"])
    for key in ("flagged", "degraded"):
        if key in decision:
            out[f"x-visguard-{key}"] = "true" if decision[key] else "false"
    for key in ("reason", "stage"):
        if decision.get(key):
            out[f"x-visguard-{key}"] = header_value(decision[key])
    for stage in ("input", "output"):
        verdict = decision.get(f"{stage}_verdict")
        if verdict:
            out[f"x-visguard-{stage}-label"] = header_value(verdict["label"])
            if verdict.get("score") is not None:
                out[f"x-visguard-{stage}-score"] = f"{verdict['score']:.6g}"
            if verdict.get("category"):
                out[f"x-visguard-{stage}-category"] = header_value(verdict["category"])
    return out


def header_value(value: Any, limit: int = 200) -> str:
    """``value`` fit for an HTTP header: printable ASCII only (NUL, CR, LF, controls and non-ASCII become ``?``)."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in str(value)[:limit]).strip()


def _verdict_headers(verdict: Verdict) -> dict[str, str]:
    """The headers of an error answer for a blocking verdict (``on_unsafe="error"``, guard unavailable)."""
    reason = "unsafe" if verdict.label == "unsafe" else "unavailable"
    return decision_headers({"blocked": True, "reason": reason, "stage": verdict.stage,
                             f"{verdict.stage}_verdict": verdict.model_dump(mode="json")})


def _outcome(result: GuardedResult) -> str:
    if result.blocked:
        return "blocked"
    if result.flagged:
        return "flagged"
    return "degraded" if result.degraded else "passed"


def _chat_error(exc: Exception, metrics: ServeMetrics) -> ApiError:
    if isinstance(exc, GuardrailViolation):
        metrics.guarded.labels("blocked").inc()
        return _decision_error(exc)
    metrics.guarded.labels("error").inc()
    if isinstance(exc, GuardUnavailableError):
        return _decision_error(exc)
    if isinstance(exc, InputError):
        return ApiError(400, str(exc), param="messages")
    # the host's error text may quote the upstream's answer (unchecked text, credentials): log it, send none
    _log.warning("host failed: %s", redact(f"{type(exc).__name__}: {exc}"))
    return ApiError(502, "the host model failed; see the server log", type="server_error", code="host_error")


async def _stream_response(
    guarded: GuardedModel, images: list[Any], text: str, gen: dict[str, Any], model: str, metrics: ServeMetrics,
    usage: TokenUsage | None = None,
) -> StreamingResponse:
    stream = guarded.astream(images, text, **gen)
    # The first released piece comes after the pre-check: a refusal by error, a refused input or a
    # failing host is still an HTTP status here, before the event stream starts.
    try:
        first: str | None = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except Exception as exc:  # noqa: BLE001 - mapped to an HTTP status
        await stream.aclose()
        raise _chat_error(exc, metrics) from exc
    verdict = stream.input_verdict  # the headers go out now: they carry what is known, the pre-check
    known = {"request_id": stream.request_id, "blocked": stream.blocked,
             "input_verdict": verdict.model_dump(mode="json") if verdict is not None else None}
    response = sse_response(_sse(stream, first, model, metrics, usage))
    response.headers.update(decision_headers(known))
    return response


async def _sse(stream: Any, first: str | None, model: str, metrics: ServeMetrics,
               usage: TokenUsage | None = None) -> AsyncIterator[str]:
    """Role chunk, content chunks as the guard releases them, a last chunk with ``visguard``, then a
    ``usage`` chunk (when asked and the host reports it) and ``[DONE]``."""
    chunk = chunk_builder(model)
    yield sse_data(chunk(Delta(role="assistant", content="")))
    try:
        if first:
            yield sse_data(chunk(Delta(content=first)))
        async for piece in stream:
            if piece:
                yield sse_data(chunk(Delta(content=piece)))
        result: GuardedResult = stream.result
        metrics.guarded.labels(_outcome(result)).inc()
        last = chunk(Delta(), "content_filter" if result.blocked else "stop")
        yield sse_data({**last, "visguard": public_decision(result.summary())})
        if usage is not None:
            yield sse_data(chunk(None, usage=usage))
    except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band, then end the stream
        yield sse_data(_chat_error(exc, metrics).body())
    finally:
        await stream.aclose()
    yield SSE_DONE


# ---------------------------------------------------------------------------------- readiness


class _ReadyProbe:
    """Ready when the host says so (:meth:`Host.aready`: a server host asks its server); cached for a second."""

    def __init__(self, host: Host | None, timeout_s: float) -> None:
        self.host = host
        self.timeout_s = timeout_s
        self._last: tuple[float, str | None] | None = None

    async def check(self) -> tuple[bool, str]:
        if self.host is None:
            return True, ""
        now = time.monotonic()
        if self._last is None or now - self._last[0] >= 1.0:
            try:
                detail = await asyncio.wait_for(self.host.aready(), self.timeout_s)
                # /readyz is unauthenticated: the host's error may quote the upstream (credentials,
                # paths); it goes to the log, the answer says only what failed
                if detail is not None:
                    _log.warning("not ready: %s", redact(detail))
                reason = None if detail is None else "the upstream model is not answering"
            except TimeoutError:
                reason = f"upstream did not answer within {self.timeout_s:g} s"
            self._last = (now, reason)
        reason = self._last[1]
        return reason is None, reason or ""


# ---------------------------------------------------------------------------------- the gate


class _Gate:
    """ASGI middleware: auth (401) -> body size (413) -> concurrency (429) for ``/v1/...``; HTTP metrics."""

    def __init__(self, app: Any, *, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.inflight = 0
        tokens = ([settings.auth_token] if settings.auth_token else []) + [t for t in settings.auth_tokens if t]
        self._tokens = [t.encode() for t in tokens]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            if path.startswith(GATED_PREFIX):
                await self._gated(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            label = path if path in _KNOWN_PATHS else "other"
            self.metrics.http_requests.labels(label, str(status[0])).inc()
            self.metrics.http_latency.labels(label).observe(time.perf_counter() - start)

    async def _gated(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        tenant = ""
        if self._tokens:
            matched = [t for t in self._tokens if bearer_ok(headers.get("authorization"), t)]  # every one compared
            if not matched:
                self.metrics.rejected.labels("unauthorized").inc()
                err = ApiError(401, "invalid or missing bearer token", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
            tenant = token_cache_salt(matched[0])
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send)
            return
        # Read the whole (bounded) body first, within read_timeout_s and before taking a concurrency
        # slot: a client trickling bytes (slowloris) holds no slot and is cut off (408).
        body = bytearray()
        deadline = time.monotonic() + self.settings.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                self.metrics.rejected.labels("slow_body").inc()
                err = ApiError(408, f"the request body did not arrive within {self.settings.read_timeout_s:g} s",
                               code="request_timeout", headers={"Connection": "close"})
                await err.response()(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if len(body) > limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        try:
            salt = request_cache_salt(bytes(body), tenant)
        except ApiError as refused:
            await refused.response()(scope, receive, send)
            return
        if self.inflight >= self.settings.max_concurrency:
            self.metrics.rejected.labels("overloaded").inc()
            err = ApiError(429, f"too many concurrent requests (limit {self.settings.max_concurrency}); retry shortly",
                             type="rate_limit_error", code="overloaded", headers={"Retry-After": "1"})
            await err.response()(scope, receive, send)
            return
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()  # disconnect notifications for streaming responses

            with cache_salt(salt):  # every check planned for this request (worker threads copy the context)
                await self.app(scope, replay, send)
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.metrics.rejected.labels("too_large").inc()
        err = ApiError(413, f"request body larger than {self.settings.max_body_bytes} bytes", code="request_too_large")
        await err.response()(scope, receive, send)


#: vLLM's limits on a ``cache_salt`` (vllm 0.32, vllm/entrypoints/generate/base/protocol.py
#: ``validate_cache_salt``: a non-empty string, at most 128 characters, none of ``@ / \\`` or NUL);
#: control characters are refused here too (a salt may reach logs and another server's request)
MAX_CACHE_SALT_CHARS = 128
_SALT_FORBIDDEN = frozenset("@/\\\x00")


def token_cache_salt(token: str | bytes) -> str:
    """The cache salt of a bearer token's requests: a hash of the token (the token never leaves)."""
    raw = token if isinstance(token, bytes) else token.encode()
    return "key-" + hashlib.sha256(b"visguard cache salt\x00" + raw).hexdigest()[:32]


def request_cache_salt(body: bytes, tenant: str = "") -> str:
    """The cache salt of one request: the JSON body's top-level ``cache_salt`` (as vLLM's OpenAI server
    accepts it on chat completions and responses; here on every ``/v1/...`` POST), under ``tenant``
    (the bearer token's salt): with a token, the salt is a hash of both, so no client of one token
    can name a salt that shares a cache with another token's requests. ``""``: no salt.

    Raises:
        ApiError: 400, ``cache_salt`` is not a non-empty string within vLLM's limits.
    """
    given: Any = None
    if b'"cache_salt"' in body:  # parsed only when named (bodies may be megabytes of images)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # the endpoint answers the malformed body
        if isinstance(data, dict):
            given = data.get("cache_salt")
    if given is not None:
        if (not isinstance(given, str) or not given or len(given) > MAX_CACHE_SALT_CHARS
                or any(c in _SALT_FORBIDDEN or not c.isprintable() for c in given)):
            raise ApiError(400, f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
                                "printable characters without @, / or \\", param="cache_salt")
    if not tenant:
        return given or ""
    if not given:
        return tenant
    return "key-" + hashlib.sha256(f"{tenant}\x00{given}".encode()).hexdigest()[:32]


_KNOWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/guard/check", "/v1/chat/completions",
                          "/v1/responses", "/v1/moderations"})
