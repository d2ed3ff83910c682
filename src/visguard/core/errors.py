"""The one place for visguard's exception types.

Every error a user can see is a subclass of :class:`VisguardError`, so callers can catch the whole
family; each subclass also derives from the closest builtin (``ValueError``, ``LookupError`` ...)
so generic handlers keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from visguard.core.types import Verdict


class VisguardError(Exception):
    """Base class of every error raised by visguard.

    Its text never shows a credential: ``str(error)`` is passed through :func:`visguard.core.redact.redact`
    (URL userinfo, bearer tokens, API keys), so CLI messages and HTTP error bodies built from it are safe.
    """

    def __str__(self) -> str:
        from visguard.core.redact import redact

        return redact(super().__str__())


class InputError(VisguardError, ValueError):
    """A request is malformed (bad text, too many images, wrong types)."""


class UnsupportedRequestError(InputError):
    """A guard format cannot judge this request (too many images, text it cannot read, a
    response, a mode or custom categories it does not support): raised, never answered wrongly."""


class InputTooLongError(InputError):
    """A request is longer, in the guard model's tokens, than the model can take (refused before it runs)."""


class PromptTooLongError(InputTooLongError):
    """A backend was given prompts longer than its model can take; raised before the model runs.

    Backends raise it from ``score`` / ``generate`` after encoding the batch (the one place a prompt
    is rendered and tokenized); the guard refuses the requests those prompts belong to with
    :class:`InputTooLongError` and runs the rest of the batch.

    Attributes:
        too_long: ``{index of the prompt in the batch: why it does not fit}``.
    """

    def __init__(self, too_long: dict[int, str]) -> None:
        self.too_long = dict(too_long)
        super().__init__("; ".join(f"prompt {i}: {why}" for i, why in sorted(self.too_long.items())))


class ImageInputError(InputError):
    """An image could not be accepted at the image boundary.

    Attributes:
        index: position of the offending image in the request (``None`` when unknown).
        reason: short machine-readable reason, e.g. ``"too_large"``, ``"not_found"``.
    """

    def __init__(self, message: str, *, index: int | None = None, reason: str = "invalid") -> None:
        prefix = f"image {index}: " if index is not None else ""
        super().__init__(prefix + message)
        self.index = index
        self.reason = reason


class PluginError(VisguardError, LookupError):
    """A backend, format, benchmark, judge or trainer name is unknown, or registered twice."""


class BackendError(VisguardError, RuntimeError):
    """A backend failed to load a model or to run it."""


class BackendStalledError(BackendError):
    """Checks fail fast: earlier batches are stuck in the backend past their callers' time limits.

    Raised for new checks while a guard's batcher holds its maximum of abandoned, still-running
    batches (see :mod:`visguard.engine.batching`); the guard turns it into an ``unavailable`` verdict.
    """


class GuardUnavailableError(VisguardError, RuntimeError):
    """The guard could not reach a verdict and the policy says ``on_error="raise"``.

    Attributes:
        verdict: the ``unavailable`` verdict, with its ``error`` text.
    """

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(f"guard unavailable ({verdict.stage} check): {verdict.error}")
        self.verdict = verdict


class GuardrailViolation(VisguardError):
    """Raised when a guarded call is blocked and the policy asks to raise.

    Attributes:
        verdict: the verdict that caused the block (``unsafe``, or ``unavailable`` under
            ``on_error="block"``).
    """

    def __init__(self, verdict: Verdict, message: str | None = None) -> None:
        why = verdict.error if verdict.label == "unavailable" else (verdict.category or "unsafe content")
        super().__init__(message or f"blocked by visguard at the {verdict.stage} check: {verdict.label} ({why})")
        self.verdict = verdict
