"""Request and verdict types: what flows into and out of a guard."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from visguard.errors import InputError
from visguard.images import GuardImage, ImageInput, load_images
from visguard.policy import ImageLimits, Mode

Label = Literal["safe", "unsafe", "unavailable"]
Stage = Literal["input", "output"]

MAX_TEXT_CHARS = 32_000


class GuardRequest(BaseModel):
    """What a guard is asked about: images, the user's text and, for a post-check, the response.

    Build one with :meth:`GuardRequest.build`, which sends every image through the image boundary.

    Attributes:
        images: checked images, in the order the user gave them.
        text: the user's instruction (may be empty).
        response: the host model's answer; present for output (post) checks.
        conversation: optional earlier turns, ``[{"role": ..., "content": str}]``, for context.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    images: tuple[GuardImage, ...] = ()
    text: str = ""
    response: str | None = None
    conversation: tuple[dict[str, str], ...] = ()

    @field_validator("text", "response")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"text of {len(value)} characters exceeds the limit of {MAX_TEXT_CHARS}")
        return value

    @property
    def stage(self) -> Stage:
        """``"output"`` when the request carries a response, else ``"input"``."""
        return "output" if self.response is not None else "input"

    @classmethod
    def build(
        cls,
        images: Iterable[ImageInput] | ImageInput | None = None,
        text: str = "",
        response: str | None = None,
        *,
        conversation: Iterable[dict[str, str]] = (),
        limits: ImageLimits | None = None,
    ) -> GuardRequest:
        """Validate raw inputs into a request.

        Raises:
            ImageInputError: an image was refused at the boundary.
            InputError: text or response is not a string, or too long.
        """
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        if response is not None and not isinstance(response, str):
            raise InputError(f"response must be a string or None, got {type(response).__name__}")
        checked = load_images(images, limits)
        try:
            return cls(images=tuple(checked), text=text, response=response, conversation=tuple(conversation))
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise InputError(str(exc)) from exc

    def image_hashes(self) -> list[str]:
        return [img.sha256 for img in self.images]


class Verdict(BaseModel):
    """A guard's structured decision.

    Attributes:
        label: ``safe``, ``unsafe`` or ``unavailable`` (error, timeout or unparseable output).
        score: P(unsafe) in [0, 1] from the verdict-token probabilities, or ``None`` when the
            backend offers no probabilities or no verdict was reached.
        category / sub_category: the harm category named by the guard (reason mode), if any.
        categories: every category the guard named, in its order (guards such as Llama Guard name
            several); ``category`` is the first.
        reasoning: the guard's perception and cross-image reasoning text (``None`` in fast mode).
        raw: the text the guard generated (empty in fast mode).
        stage: ``input`` (pre-check) or ``output`` (post-check).
        mode: the mode that produced the verdict (``adaptive`` when the reason pass ran after fast).
        model: the guard model's id or path.
        latency_ms: wall time of the check.
        error: why the verdict is ``unavailable`` (``None`` otherwise).
        safe_answer: a complete, safe and helpful reply to the user written by the guard itself
            (the ``mirage`` format in reason mode: MIRage's own answer); ``guard.wrap(...,
            on_unsafe="safe_answer")`` answers a blocked request with it. ``None`` when the guard
            wrote none (fast mode, formats that only judge, a cut-off answer).
    """

    model_config = ConfigDict(frozen=True)

    label: Label
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    category: str | None = None
    sub_category: str | None = None
    categories: tuple[str, ...] = ()
    reasoning: str | None = None
    raw: str = ""
    stage: Stage = "input"
    mode: Mode = "fast"
    model: str = ""
    latency_ms: float = 0.0
    error: str | None = None
    safe_answer: str | None = None

    @property
    def is_safe(self) -> bool:
        return self.label == "safe"

    @property
    def is_unsafe(self) -> bool:
        return self.label == "unsafe"

    @property
    def is_unavailable(self) -> bool:
        return self.label == "unavailable"

    @classmethod
    def unavailable(cls, error: str, **fields: Any) -> Verdict:
        """An ``unavailable`` verdict that says why."""
        return cls(label="unavailable", error=error, **fields)
