"""The Checker interface: what every consumer of a guard needs, and the checks built on it once.

A :class:`Checker` turns :class:`~visguard.core.types.GuardRequest` objects into verdicts under a
:class:`~visguard.core.policy.Policy`. Two implementations ship: a model guard (:class:`visguard.Guard`:
a format on a backend) and a cascade of checkers (:class:`visguard.Cascade`). Every consumer
(``wrap`` / :class:`~visguard.hosting.guarded.GuardedModel`, ``visguard serve``, ``visguard eval``,
``visguard check``, LangChain, the ``guard`` judge) takes any Checker and uses only the protocol's
members and the functions of this module; none reaches into a guard's backend or format.

:class:`CheckerBase` gives an implementation the whole public API from those members:
``check_input`` / ``check_output`` / ``check`` / ``check_batch`` / ``check_answer`` /
``report_answer``, their async forms, ``allows`` and ``wrap``.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from visguard.core.errors import GuardUnavailableError, InputError, InputTooLongError
from visguard.core.images import ImageInput
from visguard.core.policy import Mode, Policy
from visguard.core.types import MAX_TEXT_CHARS, GuardRequest, Verdict
from visguard.engine.format import Capabilities

if TYPE_CHECKING:  # pragma: no cover
    from visguard.hosting.guarded import GuardedModel

#: ``observer(mode, verdicts, waited_s)``, called after each batch a checker's model ran
BatchObserver = Callable[[Mode, list[Verdict], list[float]], None]


@runtime_checkable
class Checker(Protocol):
    """What every consumer of a guard needs.

    Attributes:
        policy: what the checker's verdicts mean (:meth:`Policy.action`), its input limits.
    """

    policy: Policy

    @property
    def model_id(self) -> str:
        """The model (or, for a cascade, ``cascade(a -> b)``) that verdicts and health name."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What it can judge (a cascade: the union of its stages')."""
        ...

    def describe(self) -> dict[str, Any]:
        """A small dict for evaluation rows, health and metadata: ``model``, ``backend``, ``format``."""
        ...

    def check_supported(self, request: GuardRequest, mode: Mode | None = None) -> None:
        """Raise :class:`~visguard.core.errors.UnsupportedRequestError` when it cannot judge ``request``."""
        ...

    def request(
        self,
        images: Iterable[ImageInput] | ImageInput | None,
        text: str,
        response: str | None = None,
        *,
        conversation: Iterable[dict[str, str]] = (),
    ) -> GuardRequest:
        """A request through the input boundary, with this policy's limits, that it can judge."""
        ...

    def report_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Verdicts for ``requests``, acting on none (``unavailable`` whatever ``on_error`` says)."""
        ...

    def add_batch_observer(self, observer: BatchObserver) -> None:
        """Call ``observer(mode, verdicts, waited_s)`` after each batch its model(s) run."""
        ...

    def configure_batching(self, *, max_batch: int | None = None, max_wait_ms: float | None = None) -> None:
        """Set the micro-batching limits of its model(s)."""
        ...

    def with_policy(self, policy: Policy | None = None, **changes: Any) -> Checker:
        """The same model(s) with another policy (or this policy with ``changes``)."""
        ...

    def close(self) -> None:
        """Release its model(s)."""
        ...


# ---------------------------------------------------------------------------------- built on a Checker

#: characters two consecutive windows of a long answer share (see :func:`report_answer`)
ANSWER_WINDOW_OVERLAP = 2_000
#: smallest window :func:`report_answer` shrinks to for a model with a short context
MIN_ANSWER_WINDOW = 256


def report_answer(checker: Checker, request: GuardRequest, answer: str, *, mode: Mode | None = None) -> Verdict:
    """Post-check a host's ``answer`` to ``request``, whatever its length, acting on nothing.

    The answer is host output, not caller input, so it is made acceptable instead of refused: lone
    surrogates become U+FFFD, and an answer longer than :data:`MAX_TEXT_CHARS` is checked in
    overlapping windows (:data:`ANSWER_WINDOW_OVERLAP` characters shared) in one batch; the worst
    window decides (:func:`worst_verdict`). A long answer is therefore never passed unchecked. When
    a window is too long for the guard model (in tokens), the windows are halved until they fit
    (down to :data:`MIN_ANSWER_WINDOW` characters).

    Raises:
        InputTooLongError: the request is too long even with the smallest window.
    """
    return report_answer_from(checker, request, answer, MAX_TEXT_CHARS, mode=mode)[0]


def report_answer_from(checker: Checker, request: GuardRequest, answer: str, size: int, *,
                       mode: Mode | None = None) -> tuple[Verdict, int]:
    """:func:`report_answer` starting with windows of ``size`` characters: ``(verdict, the size that fit)``.

    A stream's re-checks pass the size back: a size too long for the answer so far is too long for
    every longer answer too (its windows start at the same offsets), and trying it again is not free
    (a backend computes the windows of it that fit before the batch is refused), so each re-check
    would otherwise compute its last window from scratch (issue 26: quadratic past the guard's context).

    Raises:
        InputTooLongError: the request is too long even with the smallest window.
    """
    size = min(size, MAX_TEXT_CHARS)
    while True:
        overlap = min(ANSWER_WINDOW_OVERLAP, size // 4)
        requests = [request.model_copy(update={"response": w}) for w in answer_windows(answer, size, overlap)]
        try:
            return worst_verdict(checker.report_batch(requests, mode=mode)), size
        except InputTooLongError:
            if size <= MIN_ANSWER_WINDOW:
                raise
            size = max(size // 2, MIN_ANSWER_WINDOW)


def enforce(checker: Checker, verdicts: list[Verdict]) -> list[Verdict]:
    """``verdicts``, after raising :class:`GuardUnavailableError` for the first one whose
    :meth:`Policy.action` (the checker's policy) is ``raise``."""
    for verdict in verdicts:
        if checker.policy.action(verdict) == "raise":
            raise GuardUnavailableError(verdict)
    return verdicts


def allows(checker: Checker, verdict: Verdict) -> bool:
    """Whether a verdict lets the request through: the checker's :meth:`Policy.action` says pass, flag or degraded."""
    return checker.policy.action(verdict) in ("pass", "flag", "degraded")


def answer_windows(answer: str, size: int = MAX_TEXT_CHARS, overlap: int = ANSWER_WINDOW_OVERLAP) -> list[str]:
    """Split host text into overlapping windows of at most ``size`` valid-Unicode characters."""
    if not isinstance(answer, str):
        raise InputError(f"answer must be a string, got {type(answer).__name__}")
    clean = answer.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if len(clean) <= size:
        return [clean]
    step = size - overlap
    return [clean[i : i + size] for i in range(0, len(clean) - overlap, step)]


def worst_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict for several checks of parts of one thing: any ``unsafe`` (the most certain), else
    any ``unavailable``, else ``safe`` (with the highest score)."""
    if len(verdicts) == 1:
        return verdicts[0]
    unsafe = [v for v in verdicts if v.label == "unsafe"]
    if unsafe:
        return max(unsafe, key=lambda v: -1.0 if v.score is None else v.score)
    unavailable = [v for v in verdicts if v.label == "unavailable"]
    if unavailable:
        return unavailable[0]
    return max(verdicts, key=lambda v: -1.0 if v.score is None else v.score)


def checked_requests(requests: Sequence[GuardRequest]) -> list[GuardRequest]:
    """``requests`` as a list, refusing a lone request or anything that is not a :class:`GuardRequest`.

    Raises:
        InputError: see above.
    """
    if isinstance(requests, GuardRequest):
        raise InputError("check_batch takes a sequence of GuardRequest; use check() for one")
    out = list(requests)
    for i, r in enumerate(out):
        if not isinstance(r, GuardRequest):
            raise InputError(f"request {i} is a {type(r).__name__}, not a GuardRequest (use guard.request(...))")
    return out


# ---------------------------------------------------------------------------------- the base class


class CheckerBase(abc.ABC):
    """The public API of a checker, built once on the :class:`Checker` members a subclass implements.

    A subclass sets ``policy`` and implements ``model_id``, ``capabilities``, ``describe``,
    ``check_supported``, ``report_batch``, ``add_batch_observer``, ``configure_batching``,
    ``with_policy`` and ``close``. Thread-safe where those are: any number of threads (or asyncio
    tasks, through the ``a*`` methods) may call one checker.
    """

    policy: Policy

    # ------------------------------------------------------------------ what a subclass implements
    @property
    @abc.abstractmethod
    def model_id(self) -> str:
        """The model verdicts and health name."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this checker can judge."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """``model``, ``backend``, ``format``: what evaluation rows, health and metadata show."""

    @abc.abstractmethod
    def check_supported(self, request: GuardRequest, mode: Mode | None = None) -> None:
        """Raise :class:`~visguard.core.errors.UnsupportedRequestError` when this checker cannot judge ``request``."""

    @abc.abstractmethod
    def report_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Verdicts for several requests, acting on none: ``unavailable`` is returned whatever ``on_error`` says."""

    @abc.abstractmethod
    def add_batch_observer(self, observer: BatchObserver) -> None:
        """Call ``observer(mode, verdicts, waited_s)`` after each batch of this checker's model(s)."""

    @abc.abstractmethod
    def configure_batching(self, *, max_batch: int | None = None, max_wait_ms: float | None = None) -> None:
        """Set the micro-batching limits of this checker's model(s)."""

    @abc.abstractmethod
    def with_policy(self, policy: Policy | None = None, **changes: Any) -> CheckerBase:
        """The same model(s) with another policy (or this policy with ``changes``)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release this checker's model(s)."""

    # ------------------------------------------------------------------ requests
    def request(
        self,
        images: Iterable[ImageInput] | ImageInput | None,
        text: str,
        response: str | None = None,
        *,
        conversation: Iterable[dict[str, str]] = (),
    ) -> GuardRequest:
        """Build a :class:`GuardRequest` through the input boundary with this policy's limits.

        Raises:
            InputError: text, response, conversation or an image is refused (one line naming it).
            UnsupportedRequestError: this checker cannot judge such a request.
        """
        request = GuardRequest.build(images, text, response, conversation=conversation, limits=self.policy.limits)
        self.check_supported(request)
        return request

    # ------------------------------------------------------------------ sync API
    def check_input(
        self,
        images: Iterable[ImageInput] | ImageInput | None,
        text: str,
        *,
        mode: Mode | None = None,
        conversation: Iterable[dict[str, str]] = (),
    ) -> Verdict:
        """Pre-check: is this (images + text) request unsafe? ``conversation``: earlier turns, as context."""
        return self.check(self.request(images, text, conversation=conversation), mode=mode)

    def check_output(
        self,
        images: Iterable[ImageInput] | ImageInput | None,
        text: str,
        response: str,
        *,
        mode: Mode | None = None,
        conversation: Iterable[dict[str, str]] = (),
    ) -> Verdict:
        """Post-check: is the host model's ``response`` to (images + text) unsafe?"""
        if not isinstance(response, str):
            raise InputError(f"response must be a string, got {type(response).__name__}")
        return self.check(self.request(images, text, response, conversation=conversation), mode=mode)

    def check_answer(self, request: GuardRequest, answer: str, *, mode: Mode | None = None) -> Verdict:
        """Post-check a host model's ``answer`` to ``request``, whatever its length (see :func:`report_answer`).

        Raises:
            GuardUnavailableError: the verdict is ``unavailable`` and ``on_error="raise"``.
        """
        return enforce(self, [self.report_answer(request, answer, mode=mode)])[0]

    def report_answer(self, request: GuardRequest, answer: str, *, mode: Mode | None = None) -> Verdict:
        """:meth:`check_answer` acting on nothing (``unavailable`` is returned whatever ``on_error`` says).

        Raises:
            InputTooLongError: the request is too long even with the smallest window.
        """
        return report_answer(self, request, answer, mode=mode)  # the module function

    def check(self, request: GuardRequest, *, mode: Mode | None = None) -> Verdict:
        """Verdict for one request (``mode`` overrides the policy's mode)."""
        return self.check_batch([request], mode=mode)[0]

    def check_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Verdicts for several requests (:meth:`report_batch`), with ``on_error="raise"`` applied.

        Returns ``unavailable`` verdicts (never ``safe``) when the model fails, times out or its
        output cannot be parsed; raises :class:`GuardUnavailableError` instead where the policy's
        :meth:`~visguard.core.policy.Policy.action` says ``raise``. Callers that record verdicts rather
        than act on them (evaluation, judges, a guarded model that acts itself) use
        :meth:`report_batch`.

        Raises:
            InputError: an element is not a :class:`GuardRequest`.
            UnsupportedRequestError: the checker cannot judge a request, or run in ``mode``.
            GuardUnavailableError: see above.
        """
        return enforce(self, self.report_batch(requests, mode=mode))

    # ------------------------------------------------------------------ async API
    async def acheck_input(
        self,
        images: Iterable[ImageInput] | ImageInput | None,
        text: str,
        *,
        mode: Mode | None = None,
        conversation: Iterable[dict[str, str]] = (),
    ) -> Verdict:
        """Async :meth:`check_input`."""
        return await self.acheck(self.request(images, text, conversation=conversation), mode=mode)

    async def acheck_output(
        self,
        images: Iterable[ImageInput] | ImageInput | None,
        text: str,
        response: str,
        *,
        mode: Mode | None = None,
        conversation: Iterable[dict[str, str]] = (),
    ) -> Verdict:
        """Async :meth:`check_output`."""
        return await self.acheck(self.request(images, text, response, conversation=conversation), mode=mode)

    async def acheck(self, request: GuardRequest, *, mode: Mode | None = None) -> Verdict:
        """Async :meth:`check`."""
        return (await self.acheck_batch([request], mode=mode))[0]

    async def acheck_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Async :meth:`check_batch` (runs in a worker thread; the event loop stays free)."""
        return await asyncio.to_thread(self.check_batch, requests, mode=mode)

    async def areport_batch(self, requests: Sequence[GuardRequest], *, mode: Mode | None = None) -> list[Verdict]:
        """Async :meth:`report_batch` (runs in a worker thread)."""
        return await asyncio.to_thread(self.report_batch, requests, mode=mode)

    async def areport_answer(self, request: GuardRequest, answer: str, *, mode: Mode | None = None) -> Verdict:
        """Async :meth:`report_answer` (runs in a worker thread)."""
        return await asyncio.to_thread(self.report_answer, request, answer, mode=mode)

    # ------------------------------------------------------------------ decisions and hosting
    def allows(self, verdict: Verdict) -> bool:
        """Whether a verdict lets the request through: :meth:`Policy.action` says pass, flag or degraded."""
        return allows(self, verdict)  # the module function

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], name: str | None = None) -> Checker:
        """The guard or cascade a configuration file describes (:mod:`visguard.config`), built as a
        Python user would (``Guard.from_pretrained``, ``Cascade``); ``name`` picks one of several.

        ``Guard.from_config`` refuses a file whose target is a cascade (and ``Cascade.from_config``
        one that is a single guard); ``CheckerBase.from_config`` takes either.

        Raises:
            ConfigError: the file cannot be used (before any model is loaded).
            InputError: the target is not a ``cls``.
        """
        from visguard.config import load_config  # the configuration layer sits above the engine

        checker = load_config(path).build(name)
        if not isinstance(checker, cls):
            checker.close()
            raise InputError(f"{path} describes a {type(checker).__name__}, not a {cls.__name__}: "
                             "use CheckerBase.from_config, or name another with use = \"NAME\"")
        return checker

    def wrap(self, host: Any, **options: Any) -> GuardedModel:
        """Put this checker around a host model: pre-check, host answer, post-check, streaming.

        Args:
            host: a :class:`~visguard.hosting.hosts.Host`, a local model path or hub id, an
                OpenAI-compatible ``http(s)://`` base URL, or a callable ``(images, text) -> str``
                (see :func:`visguard.hosting.hosts.resolve_host`).
            **options: see :class:`~visguard.hosting.guarded.GuardedOptions` (``pre_check``,
                ``post_check``, ``on_unsafe``, ``refusal``, ``audit``, ``host_options`` ...).

        Returns:
            A :class:`~visguard.hosting.guarded.GuardedModel` with ``generate``, ``stream``,
            ``agenerate`` and ``astream``.

        Raises:
            InputError: an option is invalid or the host cannot be used.
            PluginError: the host's plugin is not installed.
        """
        from visguard.hosting.guarded import GuardedModel

        return GuardedModel(self, host, **options)
