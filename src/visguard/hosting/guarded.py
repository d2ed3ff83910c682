"""GuardedModel: a guard wrapped around a host VLM (pre-check, host call, post-check, streaming).

``guard.wrap(host, **options)`` returns a :class:`GuardedModel`. One guarded call goes

    images + text -> image boundary -> pre-check (sequential, or parallel with the host)
      -> host answer (whole, or streamed in pieces held back until a check passed)
      -> post-check of the full answer -> act on the verdicts (pass / refuse / raise / return)

and returns a :class:`GuardedResult` (or, for streams, yields released text and keeps the result).

Decisions: a ``safe`` verdict passes. An ``unsafe`` verdict follows ``on_unsafe``. An
``unavailable`` verdict (guard error, timeout, unparseable output) follows the guard policy's
``on_error``: ``block`` (default) treats it like ``unsafe`` with the reason ``unavailable``,
``allow`` passes the call on flagged ``degraded``, ``raise`` raises
:class:`~visguard.core.errors.GuardUnavailableError`.

One call runs the host in a worker (a thread, or an asyncio task for the ``a*`` methods) that
feeds host text into a queue; the caller's side runs the checks and releases text. Nothing is
shared between calls except the guard, the host and the audit log, which are all thread-safe, so
a :class:`GuardedModel` may be used from any number of threads and event loops at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from os import PathLike
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from visguard.core.errors import (
    GuardrailViolation,
    GuardUnavailableError,
    InputError,
    UnsupportedRequestError,
)
from visguard.core.images import ImageInput
from visguard.core.types import MAX_TEXT_CHARS, GuardRequest, Stage, Verdict
from visguard.engine.checker import Checker, report_answer, report_answer_from
from visguard.hosting.audit import AuditLog
from visguard.hosting.hosts import Host, resolve_host, supports_cancel

PreCheck = Literal["sequential", "parallel", "off"]
OnUnsafe = Literal["refuse", "safe_answer", "raise", "return"]
BlockReason = Literal["unsafe", "unavailable"]

DEFAULT_REFUSAL = "I can't help with that: it may involve {category}."
DEFAULT_UNAVAILABLE_MESSAGE = "I can't answer right now: the safety check is unavailable."
#: what ``{category}`` becomes when the guard named none (fast mode names none)
UNNAMED_CATEGORY = "unsafe content"
#: put between already released stream text and the refusal that ends a blocked stream
STREAM_REFUSAL_SEPARATOR = "\n\n"

_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"')\]\u201d\u2019]*(?:\s|$)|\n")
_TEMPLATE_FIELDS = {"category": "Violent", "sub_category": "", "label": "unsafe", "stage": "input", "score": 0.9}
#: default of ``stream_check_every``: a stream is re-checked at least this often (in pieces)
STREAM_CHECK_EVERY = 16
#: default of ``stream_check_min_pieces``: a sentence end re-checks only after this many new pieces
STREAM_CHECK_MIN_PIECES = 8


class StreamCadence:
    """When a growing stream is re-checked: the one rule of guarded streams, the chat proxy and the
    Responses proxy.

    A re-check is due once ``every`` pieces arrived since the last one, or when a piece ends a
    sentence or a line and at least ``min_pieces`` pieces arrived since the last one (``sentences``
    off: by count only). So re-checks are at least ``min(every, min_pieces)`` pieces apart whatever
    the text looks like: an answer of ``n`` pieces costs at most ``n / min(every, min_pieces) + 1``
    checks (the final check comes on top). Pieces are counted one at a time, so the checkpoints
    never depend on timing.
    """

    def __init__(self, every: int = STREAM_CHECK_EVERY, min_pieces: int = STREAM_CHECK_MIN_PIECES,
                 *, sentences: bool = True) -> None:
        if every < 1 or min_pieces < 1:
            raise ValueError("stream check cadence: every and min_pieces must be >= 1")
        self.every, self.min_pieces, self.sentences = every, min_pieces, sentences
        self.pieces = 0  # since the last check
        self.sentence = False  # the latest piece ended a sentence or a line

    def add(self, *texts: str) -> None:
        """Count one piece (``texts``: what it said, if anything; one chunk may carry several fields)."""
        self.pieces += 1
        self.sentence = self.sentences and any(_SENTENCE_END.search(text) for text in texts if text)

    def due(self) -> bool:
        """Whether the answer so far should be re-checked now."""
        return self.pieces >= self.every or (self.sentence and self.pieces >= self.min_pieces)

    def reset(self) -> None:
        """A check covered everything so far."""
        self.pieces, self.sentence = 0, False


class GuardedOptions(BaseModel):
    """What ``guard.wrap(host, **options)`` accepts.

    Args:
        pre_check: ``sequential`` (default: the host never sees a blocked request), ``parallel``
            (the pre-check runs while the host generates; a blocked request's host output is
            discarded and the host cancelled) or ``off``.
        post_check: check the host's answer (default on); streams are re-checked as they grow.
        on_unsafe: ``refuse`` (default: replace the answer with ``refusal``), ``safe_answer``
            (replace it with the guard's own safe, helpful reply, :attr:`Verdict.safe_answer`, e.g.
            MIRage's answer in reason mode; the safe answer is an answer: it is post-checked
            and audited like the host's, and ``refusal`` replaces it when that check does not pass
            or the verdict carries none), ``raise``
            (:class:`GuardrailViolation`) or ``return`` (act on nothing: the host's answer and the
            verdicts are returned, ``flagged``, for the caller to decide).
        refusal: the replacement for a blocked answer: a ``str.format`` template with the fields
            ``{category}``, ``{sub_category}``, ``{label}``, ``{stage}`` and ``{score}``, or a
            function ``verdict -> str``.
        unavailable_message: the replacement when the block is because the guard was
            unavailable (same fields).
        stream_check_every: re-check a stream each time this many new host pieces (tokens) are
            held. Pieces are taken one at a time, so the checkpoints never depend on timing.
        stream_check_sentences: also re-check a stream when a piece ends a sentence or a line,
            once at least ``stream_check_min_pieces`` new pieces are held (:class:`StreamCadence`).
        stream_check_min_pieces: the fewest new pieces a sentence end re-checks: a stream costs at
            most one re-check per ``min(stream_check_every, stream_check_min_pieces)`` pieces, plus
            the final check, however short its sentences.
        audit: an :class:`~visguard.hosting.audit.AuditLog`, or a path to append one to.
        host_options: keyword arguments for :func:`visguard.hosting.hosts.resolve_host` (e.g. ``model``
            and ``timeout_s`` of the ``openai`` host).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    pre_check: PreCheck = "sequential"
    post_check: bool = True
    on_unsafe: OnUnsafe = "refuse"
    refusal: str | Callable[[Verdict], str] = DEFAULT_REFUSAL
    unavailable_message: str | Callable[[Verdict], str] = DEFAULT_UNAVAILABLE_MESSAGE
    stream_check_every: int = Field(default=STREAM_CHECK_EVERY, ge=1)
    stream_check_sentences: bool = True
    stream_check_min_pieces: int = Field(default=STREAM_CHECK_MIN_PIECES, ge=1)
    audit: AuditLog | str | PathLike[str] | None = None
    host_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("refusal", "unavailable_message")
    @classmethod
    def _template_fields_known(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value.format_map(_TEMPLATE_FIELDS)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"bad message template {value!r}: {exc!r}; fields: {sorted(_TEMPLATE_FIELDS)}") from exc
        return value


class GuardTimings(BaseModel):
    """Wall times of one guarded call, in milliseconds (``None``: that step did not run).

    Attributes:
        pre_check_ms: the pre-check.
        host_ms: from the host's start until it finished or was cancelled.
        post_check_ms: all checks of the answer together (a stream is checked several times).
        total_ms: the whole call, until the result was ready.
    """

    model_config = ConfigDict(frozen=True)

    pre_check_ms: float | None = None
    host_ms: float | None = None
    post_check_ms: float | None = None
    total_ms: float = 0.0


class GuardedResult(BaseModel):
    """The outcome of one guarded call.

    Attributes:
        text: what the caller should show: the host's answer, or the refusal that replaced it.
            For a stream, exactly the concatenation of the pieces it yielded.
        response: the host's complete answer; ``None`` when the host was not called, its output
            was discarded, or the call was blocked.
        blocked: the host's answer was withheld and replaced by ``refusal``.
        answered_by_guard: ``refusal`` is the guard's own safe answer (``on_unsafe="safe_answer"``),
            which passed its own post-check (``safe_answer_verdict``).
        flagged: a check objected (``unsafe``, or ``unavailable`` under ``on_error="block"``);
            with ``on_unsafe="return"`` a call is flagged but not blocked.
        reason: why it was flagged: ``unsafe`` or ``unavailable`` (``None`` when not flagged).
        stage: the check that objected first: ``input`` or ``output``.
        refusal: the replacement text (also set when flagged but returned).
        degraded: a check was ``unavailable`` and ``on_error="allow"`` let the call through.
        input_verdict: the pre-check verdict (``None`` when the pre-check is off).
        output_verdict: the last post-check verdict (``None`` when no post-check ran).
        output_checks: how many post-checks ran (streams: one per checkpoint; the check of a
            guard's safe answer included).
        safe_answer_verdict: the post-check of the guard's safe answer (``on_unsafe="safe_answer"``,
            ``None`` when there was none to check).
        host_called: the host was asked to answer (parallel mode: also when it was cancelled
            before it produced anything).
        host_cancelled: the host was told to stop before it finished.
        request_id: shared with this call's audit records.
        timings: see :class:`GuardTimings`.
    """

    model_config = ConfigDict(frozen=True)

    text: str
    response: str | None = None
    blocked: bool = False
    answered_by_guard: bool = False
    flagged: bool = False
    reason: BlockReason | None = None
    stage: Stage | None = None
    refusal: str | None = None
    degraded: bool = False
    input_verdict: Verdict | None = None
    output_verdict: Verdict | None = None
    output_checks: int = 0
    safe_answer_verdict: Verdict | None = None
    host_called: bool = False
    host_cancelled: bool = False
    request_id: str = ""
    timings: GuardTimings = GuardTimings()

    @property
    def allowed(self) -> bool:
        """The caller may show the host's answer (not blocked)."""
        return not self.blocked

    def summary(self) -> dict[str, Any]:
        """The decision as JSON-ready data: every field except the texts ``text`` and ``response``.

        The operator's full view (raw output, reasoning, safe answer, timings). Clients get
        :func:`visguard.hosting.public.public_decision` of it: ``visguard serve``'s ``visguard``
        field and the LangChain guarded chat model's ``response_metadata["visguard"]``.
        """
        return self.model_dump(mode="json", exclude={"text", "response"})


class GuardedModel:
    """A host model behind a guard. Build one with ``guard.wrap(host, **options)``.

    Args:
        guard: the guard, any :class:`~visguard.engine.checker.Checker` (a Guard, a Cascade); its policy's
            ``on_error`` (and, for a Guard, ``threshold`` and ``timeout_s``) apply.
        host: anything :func:`visguard.hosting.hosts.resolve_host` accepts: a :class:`~visguard.hosting.hosts.Host`,
            a local model path or hub id (``transformers``), an ``http(s)://`` OpenAI-compatible
            base URL (``openai``), ``(host_name, target)``, or a callable
            ``(images, text) -> str`` (or an iterator of str, to stream).
        **options: see :class:`GuardedOptions`.

    Raises:
        InputError: an option is invalid.
    """

    def __init__(self, guard: Checker, host: Any, **options: Any) -> None:
        try:
            self.options = GuardedOptions(**options)
        except ValueError as exc:  # pydantic.ValidationError
            raise InputError(f"invalid guard.wrap options: {exc}") from exc
        caps, name = guard.capabilities, guard.describe().get("format")
        if self.options.post_check and not caps.responses:
            raise UnsupportedRequestError(
                f"format {name!r} cannot judge a host's answer: wrap with post_check=False (or use a cascade "
                "with a guard that judges responses)")
        if self.options.pre_check != "off" and not caps.requests:
            raise UnsupportedRequestError(f"format {name!r} judges responses only: wrap with pre_check='off'")
        self.guard = guard
        self._owns_host = not isinstance(host, Host)
        self.host = resolve_host(host, **self.options.host_options)
        audit = self.options.audit
        self._owns_audit = audit is not None and not isinstance(audit, AuditLog)
        self.audit: AuditLog | None = audit if audit is None or isinstance(audit, AuditLog) else AuditLog(audit)
        self._stream_cancel = supports_cancel(self.host)
        self._astream_cancel = supports_cancel(self.host, asynchronous=True)

    # ------------------------------------------------------------------ sync API
    def generate(self, images: Iterable[ImageInput] | ImageInput | None, text: str, **gen_kwargs: Any) -> GuardedResult:
        """Guard one call: pre-check, host answer, post-check.

        Args:
            images: the user's images (any form the image boundary accepts), or ``None``.
            text: the user's text.
            **gen_kwargs: passed to the host (e.g. ``max_new_tokens`` for a transformers host).

        Returns:
            The result; check ``result.blocked`` / ``result.text``.

        Raises:
            InputError: the images or text were refused at the boundary (the host is not called).
            GuardrailViolation: blocked and ``on_unsafe="raise"``.
            GuardUnavailableError: the guard was unavailable and the policy says ``on_error="raise"``.
            Exception: whatever the host raised, when the call was not blocked first.
        """
        call = self._call(images, text, gen_kwargs, streaming=False)
        for _ in self._drive(call):
            pass
        assert call.result is not None
        return call.result

    def stream(self, images: Iterable[ImageInput] | ImageInput | None, text: str, **gen_kwargs: Any) -> GuardedStream:
        """Guard a streamed answer: iterate the returned stream for released text.

        Host text is held back and released only after a check of the whole answer so far
        passed (every ``stream_check_every`` pieces, and at sentence ends once
        ``stream_check_min_pieces`` new pieces are held: :class:`StreamCadence`). When a check blocks,
        the host is cancelled and the stream ends with the refusal (after
        ``STREAM_REFUSAL_SEPARATOR`` if text was already released); ``stream.result`` then tells
        why. Errors are raised from the iteration, as for :meth:`generate`.
        """
        call = self._call(images, text, gen_kwargs, streaming=True)
        return GuardedStream(call, self._drive(call))

    # ------------------------------------------------------------------ async API
    async def agenerate(
        self, images: Iterable[ImageInput] | ImageInput | None, text: str, **gen_kwargs: Any
    ) -> GuardedResult:
        """Async :meth:`generate` (checks in worker threads, the host through its async methods)."""
        call = self._call(images, text, gen_kwargs, streaming=False)
        async for _ in self._adrive(call):
            pass
        assert call.result is not None
        return call.result

    def astream(
        self, images: Iterable[ImageInput] | ImageInput | None, text: str, **gen_kwargs: Any
    ) -> AsyncGuardedStream:
        """Async :meth:`stream`: ``async for piece in guarded.astream(images, text): ...``."""
        call = self._call(images, text, gen_kwargs, streaming=True)
        return AsyncGuardedStream(call, self._adrive(call))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the host and the audit log if this object created them (the guard is left open)."""
        if self._owns_host:
            self.host.close()
        if self._owns_audit and self.audit is not None:
            self.audit.close()

    def __enter__(self) -> GuardedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        o = self.options
        return (
            f"GuardedModel(host={self.host.name or type(self.host).__name__}:{self.host.model_id!r}, "
            f"guard={self.guard.model_id!r}, pre_check={o.pre_check!r}, on_unsafe={o.on_unsafe!r})"
        )

    # ------------------------------------------------------------------ internals
    def _call(self, images: Any, text: str, gen_kwargs: dict[str, Any], *, streaming: bool) -> _Call:
        if "cancel" in gen_kwargs:
            raise InputError("'cancel' is managed by the guarded model; do not pass it")
        request = self.guard.request(images, text)  # the image boundary, once per call
        return _Call(self, request, gen_kwargs, streaming=streaming)

    def _report(self, request: GuardRequest) -> Verdict:
        # The guard reports; _Call._judge acts on the policy's answer (and audits a raise too).
        return self.guard.report_batch([request])[0]

    async def _areport(self, request: GuardRequest) -> Verdict:
        return (await asyncio.to_thread(self.guard.report_batch, [request]))[0]

    def _check_output(self, call: _Call) -> tuple[Verdict, float]:
        # report_answer takes an answer of any length (windows) and any characters: never refused.
        # the window size that fit carries over to the next re-check (see report_answer_from)
        start = time.perf_counter()
        verdict, call.window = report_answer_from(self.guard, call.request, call.answer_so_far, call.window)
        return verdict, _ms_since(start)

    async def _acheck_output(self, call: _Call) -> tuple[Verdict, float]:
        start = time.perf_counter()
        verdict, call.window = await asyncio.to_thread(
            report_answer_from, self.guard, call.request, call.answer_so_far, call.window)
        return verdict, _ms_since(start)

    def _uses_stream(self, call: _Call) -> bool:
        # Parallel mode streams even for generate(): the host can then be stopped between pieces.
        return call.streaming or self.options.pre_check == "parallel"

    # ---- sync driver: the host in a thread, checks in the caller's thread
    def _drive(self, call: _Call) -> Iterator[str]:
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        try:
            if self.options.pre_check == "sequential":
                start = time.perf_counter()
                verdict = self._report(call.request)
                call.on_pre(verdict, _ms_since(start))
            elif self.options.pre_check == "parallel":
                _start_thread(self._pre_worker, call, events)
            else:
                call.pre_done = True
            if not call.blocked:
                call.host_started()
                _start_thread(self._host_worker, call, events)
            while not call.blocked and not call.finished:
                # One event at a time: the re-check cadence depends on piece counts, never on how
                # fast the host's pieces arrive (see _Call.check_due).
                call.absorb(*events.get())
                if call.blocked or not call.ready():
                    continue
                due = call.check_due()
                if due is not None:
                    call.on_output(*self._check_output(call), partial=due == "partial")
                if call.may_release(checked=due is not None):
                    yield from call.release()
            if call.blocked:
                if call.safe_answer is not None:  # the guard's own answer is an answer: check it first
                    call.on_safe_answer(*self._check_safe_answer(call))
                yield from call.refuse()
            call.finish()
        finally:
            call.stop_host()

    def _check_safe_answer(self, call: _Call) -> tuple[Verdict, float]:
        start = time.perf_counter()
        verdict = report_answer(self.guard, call.request, call.safe_answer or "")
        return verdict, _ms_since(start)

    async def _acheck_safe_answer(self, call: _Call) -> tuple[Verdict, float]:
        start = time.perf_counter()
        verdict = await asyncio.to_thread(report_answer, self.guard, call.request, call.safe_answer or "")
        return verdict, _ms_since(start)

    def _pre_worker(self, call: _Call, events: queue.SimpleQueue[tuple[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            verdict = self._report(call.request)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            events.put(("pre_error", exc))
            return
        events.put(("pre", (verdict, _ms_since(start))))

    def _host_worker(self, call: _Call, events: queue.SimpleQueue[tuple[str, Any]]) -> None:
        images, text = call.request.images, call.request.text
        try:
            if call.cancel.is_set():  # blocked before this thread got going: never ask the host
                pass
            elif not self._uses_stream(call):
                events.put(("piece", _checked_piece(self.host.generate(images, text, **call.gen_kwargs))))
            else:
                kwargs = dict(call.gen_kwargs, cancel=call.cancel) if self._stream_cancel else call.gen_kwargs
                pieces = self.host.stream(images, text, **kwargs)
                try:
                    for piece in pieces:
                        if call.cancel.is_set():
                            break
                        events.put(("piece", _checked_piece(piece)))
                finally:
                    close = getattr(pieces, "close", None)
                    if close is not None:
                        close()
            call.host_stopped()
            events.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            call.host_stopped()
            events.put(("host_error", exc))

    # ---- async driver: the host in a task, checks in worker threads
    async def _adrive(self, call: _Call) -> AsyncIterator[str]:
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.options.pre_check == "sequential":
                start = time.perf_counter()
                verdict = await self._areport(call.request)
                call.on_pre(verdict, _ms_since(start))
            elif self.options.pre_check == "parallel":
                tasks.append(asyncio.ensure_future(self._apre_worker(call, events)))
            else:
                call.pre_done = True
            if not call.blocked:
                call.host_started()
                tasks.append(asyncio.ensure_future(self._ahost_worker(call, events)))
            while not call.blocked and not call.finished:
                call.absorb(*await events.get())  # one event at a time, as in _drive
                if call.blocked or not call.ready():
                    continue
                due = call.check_due()
                if due is not None:
                    call.on_output(*await self._acheck_output(call), partial=due == "partial")
                if call.may_release(checked=due is not None):
                    for piece in call.release():
                        yield piece
            if call.blocked:
                if call.safe_answer is not None:  # as in _drive
                    call.on_safe_answer(*await self._acheck_safe_answer(call))
                for piece in call.refuse():
                    yield piece
            call.finish()
        finally:
            call.stop_host()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _apre_worker(self, call: _Call, events: asyncio.Queue[tuple[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            verdict = await self._areport(call.request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the driver
            events.put_nowait(("pre_error", exc))
            return
        events.put_nowait(("pre", (verdict, _ms_since(start))))

    async def _ahost_worker(self, call: _Call, events: asyncio.Queue[tuple[str, Any]]) -> None:
        images, text = call.request.images, call.request.text
        try:
            if call.cancel.is_set():  # blocked before this task got going: never ask the host
                pass
            elif not self._uses_stream(call):
                answer = await self.host.agenerate(images, text, **call.gen_kwargs)
                events.put_nowait(("piece", _checked_piece(answer)))
            else:
                kwargs = dict(call.gen_kwargs, cancel=call.cancel) if self._astream_cancel else call.gen_kwargs
                pieces = self.host.astream(images, text, **kwargs)
                try:
                    async for piece in pieces:
                        if call.cancel.is_set():
                            break
                        events.put_nowait(("piece", _checked_piece(piece)))
                finally:
                    aclose = getattr(pieces, "aclose", None)
                    if aclose is not None:
                        await aclose()
            call.host_stopped()
            events.put_nowait(("end", None))
        except asyncio.CancelledError:
            call.host_stopped()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the driver
            call.host_stopped()
            events.put_nowait(("host_error", exc))


class _StreamState:
    """What a guarded stream tells about its call while and after it runs."""

    _call: _Call

    @property
    def result(self) -> GuardedResult | None:
        """The call's :class:`GuardedResult` once the stream has ended (``None`` before)."""
        return self._call.result

    @property
    def request_id(self) -> str:
        """The call's id (also in its audit records)."""
        return self._call.request_id

    @property
    def blocked(self) -> bool:
        """The call is blocked: whatever the stream yields from now on is the refusal."""
        return self._call.blocked

    @property
    def input_verdict(self) -> Verdict | None:
        """The pre-check verdict once it is in (``None`` before it, or with the pre-check off)."""
        return self._call.input_verdict


class GuardedStream(_StreamState, Iterator[str]):
    """The text a guarded stream releases, piece by piece; :attr:`result` once it has ended.

    Closing the stream early (``close()``, ``break`` in a ``with`` block, or garbage collection)
    cancels the host.
    """

    def __init__(self, call: _Call, pieces: Iterator[str]) -> None:
        self._call = call
        self._pieces = pieces

    def __iter__(self) -> GuardedStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early: cancel the host and release nothing more."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGuardedStream(_StreamState, AsyncIterator[str]):
    """Async twin of :class:`GuardedStream` (``async for``; ``await stream.aclose()``)."""

    def __init__(self, call: _Call, pieces: AsyncIterator[str]) -> None:
        self._call = call
        self._pieces = pieces

    def __aiter__(self) -> AsyncGuardedStream:
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        """Stop early: cancel the host and release nothing more."""
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncGuardedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Call:
    """State of one guarded call; the sync and async drivers share every decision made here.

    The drivers only do I/O (checks, queue reads, yielding); this class decides when to check,
    what to release and what a verdict means. It is used by one driver at a time; the host
    worker only touches the host timing fields.
    """

    def __init__(self, model: GuardedModel, request: GuardRequest, gen_kwargs: dict[str, Any], *, streaming: bool) -> None:
        self.model = model
        self.options = model.options
        self.request = request
        self.gen_kwargs = gen_kwargs
        self.streaming = streaming
        self.request_id = uuid.uuid4().hex
        self.cancel = threading.Event()
        self.started = time.perf_counter()
        # progress
        self.pre_done = False
        self.host_done = False
        self.host_error: BaseException | None = None
        self.finished = False
        self.held = ""  # host text received but not yet released
        self.released = ""  # host text that passed every check it was part of
        o = self.options
        self.cadence = StreamCadence(o.stream_check_every, o.stream_check_min_pieces, sentences=o.stream_check_sentences)
        self.window = MAX_TEXT_CHARS  # the answer window size that fit the guard (report_answer_from)
        self.shown: list[str] = []
        # decisions
        self.input_verdict: Verdict | None = None
        self.output_verdict: Verdict | None = None
        self.output_checks = 0
        self.blocked = False
        self.flagged = False
        self.degraded = False
        self.reason: BlockReason | None = None
        self.stage: Stage | None = None
        self.refusal: str | None = None
        self.answered_by_guard = False
        self.safe_answer: str | None = None  # the guard's own answer, shown only once it passed a check
        self.safe_answer_verdict: Verdict | None = None
        # timings
        self.pre_ms: float | None = None
        self.post_ms: float | None = None
        self.host_start: float | None = None
        self.host_end: float | None = None
        self.host_cancelled = False
        self.result: GuardedResult | None = None

    # ---- events from the workers
    def absorb(self, kind: str, value: Any) -> None:
        if kind == "pre":
            self.on_pre(*value)
        elif kind == "pre_error":
            raise value
        elif kind == "piece":
            self.held += value
            self.cadence.add(value)
        elif kind == "end":
            self.host_done = True
        elif kind == "host_error":
            self.host_error = value
        else:  # pragma: no cover - programming error
            raise AssertionError(f"unknown event {kind!r}")

    def ready(self) -> bool:
        """Whether host text may be checked and released: the pre-check passed.

        Raises:
            Exception: the host's error, once the pre-check passed (a blocked call hides it).
        """
        if not self.pre_done:
            return False
        if self.host_error is not None:
            raise self.host_error
        return True

    def check_due(self) -> Literal["final", "partial"] | None:
        """Which post-check the answer so far needs now (marks the call finished when the host is)."""
        post = self.options.post_check
        if self.host_done:
            self.finished = True
            # The last partial check may already cover the whole answer.
            return "final" if post and (self.held or self.output_checks == 0) else None
        if self.streaming and post and self.held:
            if self.cadence.due():
                return "partial"
        return None

    def may_release(self, *, checked: bool) -> bool:
        """Whether the held text may go out now.

        With post-checks on, only right after a check of exactly ``released + held`` let the call
        go on; without them, as it arrives (streams) or at the end (``generate``).
        """
        if self.blocked:
            return False
        if self.options.post_check:
            return checked
        return self.streaming or self.finished

    @property
    def answer_so_far(self) -> str:
        return self.released + self.held

    # ---- verdicts
    def on_pre(self, verdict: Verdict, elapsed_ms: float) -> None:
        self.input_verdict = verdict
        self.pre_ms = elapsed_ms
        if self._judge(verdict, partial=False):
            self.pre_done = True

    def on_output(self, verdict: Verdict, elapsed_ms: float, *, partial: bool) -> None:
        self.output_verdict = verdict
        self.output_checks += 1
        self.post_ms = (self.post_ms or 0.0) + elapsed_ms
        self._judge(verdict, partial=partial)

    def _judge(self, verdict: Verdict, *, partial: bool) -> bool:
        """Act on the policy's answer for a verdict; True lets the call go on."""
        action = self.model.guard.policy.action(verdict)
        if action == "pass":
            self._audit(verdict, "pass", partial)
            return True
        if action == "degraded":
            self.degraded = True
            self._audit(verdict, "degraded", partial)
            return True
        if action == "raise":
            self._audit(verdict, "raise", partial)
            self.stop_host()
            raise GuardUnavailableError(verdict)
        reason: BlockReason = "unavailable" if verdict.label == "unavailable" else "unsafe"
        if not self.flagged:
            self.flagged, self.reason, self.stage = True, reason, verdict.stage
            self.refusal = self._refusal_text(verdict, reason)
            if self.options.on_unsafe == "safe_answer" and reason == "unsafe" and verdict.safe_answer:
                self.safe_answer = verdict.safe_answer  # replaces the refusal once its own check passes
        on_unsafe = self.options.on_unsafe
        if on_unsafe == "return" or action == "flag":  # flag: a log-only category, let through flagged
            self._audit(verdict, "flag", partial)
            return True
        self.stop_host()
        if on_unsafe == "raise":
            self._audit(verdict, "raise", partial)
            raise GuardrailViolation(verdict)
        self._audit(verdict, "block", partial)
        self.blocked = True
        return False

    def on_safe_answer(self, verdict: Verdict, elapsed_ms: float) -> None:
        """The post-check of the guard's safe answer: it replaces the refusal only when it passes
        (``unavailable`` is no pass here, whatever ``on_error`` says: the refusal is always safe)."""
        self.safe_answer_verdict = verdict
        self.output_checks += 1
        self.post_ms = (self.post_ms or 0.0) + elapsed_ms
        passed = self.model.guard.policy.action(verdict) == "pass"
        self._audit(verdict, "pass" if passed else "block", False)
        if passed:
            self.refusal, self.answered_by_guard = self.safe_answer, True

    def _refusal_text(self, verdict: Verdict, reason: BlockReason) -> str:
        template = self.options.unavailable_message if reason == "unavailable" else self.options.refusal
        if callable(template):
            return str(template(verdict))
        return template.format_map(
            {
                "category": verdict.category or UNNAMED_CATEGORY,
                "sub_category": verdict.sub_category or "",
                "label": verdict.label,
                "stage": verdict.stage,
                "score": verdict.score if verdict.score is not None else float("nan"),
            }
        )

    def _audit(self, verdict: Verdict, action: str, partial: bool) -> None:
        log = self.model.audit
        if log is not None:
            log.record_verdict(
                verdict,
                request_id=self.request_id,
                images=self.request.images,
                action=action,
                partial=partial,
                host_model=self.model.host.model_id,
            )

    # ---- text out
    def release(self) -> Iterator[str]:
        """Hand the held text to the caller (it has passed every check it was part of)."""
        chunk, self.held = self.held, ""
        self.cadence.reset()
        self.released += chunk
        if chunk:
            self.shown.append(chunk)
            yield chunk

    def refuse(self) -> Iterator[str]:
        assert self.refusal is not None
        # generate() shows only the refusal; a stream may already have shown checked text.
        shown = "".join(self.shown)
        text = (STREAM_REFUSAL_SEPARATOR if shown else "") + self.refusal
        self.shown.append(text)
        yield text

    # ---- host lifecycle
    def host_started(self) -> None:
        self.host_start = time.perf_counter()

    def host_stopped(self) -> None:
        if self.host_end is None:
            self.host_end = time.perf_counter()

    def stop_host(self) -> None:
        """Tell the host to stop (a no-op once it has finished)."""
        if self.host_start is not None and self.host_end is None and not self.cancel.is_set():
            self.host_cancelled = True
            self.host_end = time.perf_counter()
        self.cancel.set()

    def finish(self) -> None:
        end = time.perf_counter()
        host_ms = None
        if self.host_start is not None:
            host_ms = ((self.host_end or end) - self.host_start) * 1000.0
        complete = self.host_done and not self.blocked
        self.result = GuardedResult(
            text="".join(self.shown),
            response=self.released if complete else None,
            blocked=self.blocked,
            answered_by_guard=self.answered_by_guard,
            flagged=self.flagged,
            reason=self.reason,
            stage=self.stage,
            refusal=self.refusal,
            degraded=self.degraded,
            input_verdict=self.input_verdict,
            output_verdict=self.output_verdict,
            output_checks=self.output_checks,
            safe_answer_verdict=self.safe_answer_verdict,
            host_called=self.host_start is not None,
            host_cancelled=self.host_cancelled,
            request_id=self.request_id,
            timings=GuardTimings(
                pre_check_ms=self.pre_ms, host_ms=host_ms, post_check_ms=self.post_ms, total_ms=(end - self.started) * 1000.0
            ),
        )


def _checked_piece(piece: Any) -> str:
    if not isinstance(piece, str):
        raise InputError(f"host produced {type(piece).__name__}, expected str")
    return piece


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _start_thread(target: Callable[..., None], *args: Any) -> None:
    ctx = contextvars.copy_context()  # keep the caller's context variables in the worker
    threading.Thread(target=ctx.run, args=(target, *args), name="visguard-guarded", daemon=True).start()
