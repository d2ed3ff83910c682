"""Request and verdict types: what flows into and out of a guard."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from visguard.core.errors import InputError
from visguard.core.images import GuardImage, ImageInput, ImageLimits, load_images
from visguard.core.policy import Mode
from visguard.core.redact import redact

Label = Literal["safe", "unsafe", "unavailable"]
Stage = Literal["input", "output"]

MAX_TEXT_CHARS = 32_000
#: most earlier turns a request may carry
MAX_CONVERSATION_TURNS = 32
#: roles an earlier turn may have
CONVERSATION_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@overload
def check_text(value: Any, field: str, *, optional: Literal[False] = False, limit: int = MAX_TEXT_CHARS) -> str: ...
@overload
def check_text(value: Any, field: str, *, optional: bool, limit: int = MAX_TEXT_CHARS) -> str | None: ...
def check_text(value: Any, field: str, *, optional: bool = False, limit: int = MAX_TEXT_CHARS) -> str | None:
    """The one text check of visguard's input boundary.

    Text must be a ``str`` (``None`` where ``optional``) of at most ``limit`` characters that
    encodes as UTF-8 (no lone surrogates, which no tokenizer can take).

    Raises:
        InputError: a one-line message naming ``field`` and the limit or the problem.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str):
        kind = "a string or None" if optional else "a string"
        raise InputError(f"{field} must be {kind}, got {type(value).__name__}")
    if len(value) > limit:
        raise InputError(f"{field} has {len(value)} characters, more than the limit of {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{field} holds a lone surrogate (U+{ord(value[exc.start]):04X}) at character {exc.start}: not valid Unicode text"
        ) from exc
    return value


def check_conversation(value: Any, field: str = "conversation") -> tuple[dict[str, str], ...]:
    """Validate earlier turns: at most :data:`MAX_CONVERSATION_TURNS` ``{"role", "content"}`` mappings.

    ``role`` is one of :data:`CONVERSATION_ROLES` (the OpenAI chat roles); ``content`` passes
    :func:`check_text`.

    Raises:
        InputError: a one-line message naming the turn and the problem.
    """
    if value is None:
        return ()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InputError(f"{field} must be a list of {{'role', 'content'}} turns, got {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        if i >= MAX_CONVERSATION_TURNS:
            raise InputError(f"{field} has more than {MAX_CONVERSATION_TURNS} turns, the limit")
        if not isinstance(turn, Mapping):
            raise InputError(f"{field}[{i}] must be a mapping with 'role' and 'content', got {type(turn).__name__}")
        unknown = sorted(str(k) for k in turn if k not in ("role", "content"))
        if unknown:
            raise InputError(f"{field}[{i}] has unknown keys {unknown}; expected 'role' and 'content'")
        role = turn.get("role")
        if role not in CONVERSATION_ROLES:
            raise InputError(f"{field}[{i}].role must be one of {sorted(CONVERSATION_ROLES)}, got {str(role)[:40]!r}")
        content = check_text(turn.get("content"), f"{field}[{i}].content")
        turns.append({"role": role, "content": content})
    total = sum(len(t["content"]) for t in turns)
    if total > MAX_TEXT_CHARS:
        raise InputError(f"{field} has {total} characters in all, more than the limit of {MAX_TEXT_CHARS}")
    return tuple(turns)


def _one_line_validation(exc: ValidationError) -> str:
    errors = exc.errors()
    first: Mapping[str, Any] = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return f"{where}: {' '.join(str(first.get('msg', exc)).split())}"


class GuardRequest(BaseModel):
    """What a guard is asked about: images, the user's text and, for a post-check, the response.

    Build one with :meth:`GuardRequest.build`, which sends every image through the image boundary.

    Attributes:
        images: checked images, in the order the user gave them.
        text: the user's instruction (may be empty).
        response: the host model's answer; present for output (post) checks.
        conversation: earlier turns, ``[{"role": "user"|"assistant"|"system"..., "content": str}]``;
            the format quotes them into the guard prompt as context (at most
            :data:`MAX_CONVERSATION_TURNS` turns, :data:`MAX_TEXT_CHARS` characters in all).
        cache_salt: isolates this request's cached prompt prefixes (KV caches) from requests with
            another salt, like vLLM's ``cache_salt``: a tenant (e.g. the hash of an API key) never
            hits, and so never times, another tenant's cached prefix. ``""``: the shared space.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    images: tuple[GuardImage, ...] = ()
    text: str = ""
    response: str | None = None
    conversation: tuple[dict[str, str], ...] = ()
    cache_salt: str = ""

    @field_validator("text", "response", mode="before")
    @classmethod
    def _valid_text(cls, value: Any, info: Any) -> str | None:
        try:
            field: str = info.field_name
            return check_text(value, field, optional=field == "response")
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("conversation", mode="before")
    @classmethod
    def _valid_conversation(cls, value: Any) -> tuple[dict[str, str], ...]:
        try:
            return check_conversation(value)
        except InputError as exc:
            raise ValueError(str(exc)) from None

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

        Text is checked before images (it is cheaper), each by the one check of its kind:
        :func:`check_text`, :func:`check_conversation`, :func:`~visguard.core.images.load_images`.

        Raises:
            ImageInputError: an image was refused at the boundary.
            InputError: text, response or conversation is not valid (one line naming the field).
        """
        text = check_text(text, "text")
        response = check_text(response, "response", optional=True)
        turns = check_conversation(conversation)
        checked = load_images(images, limits)
        try:
            return cls(images=tuple(checked), text=text, response=response, conversation=turns)
        except ValidationError as exc:
            raise InputError(_one_line_validation(exc)) from exc


#: what drives an unsafe verdict (:attr:`Attribution.summary`): one image with the request's text is
#: unsafe, the text alone is, only a combination of images is (no single part), or nothing (the
#: request is not unsafe)
AttributionSummary = Literal["single image", "text", "combination only", "none"]


class AttributionRow(BaseModel):
    """The fast P(unsafe) of one subset of a request (:func:`visguard.engine.attribution.subsets`).

    Attributes:
        subset: indices (0-based, in the request's order) of the images the subset keeps (none:
            the text alone).
        includes_text: whether the subset keeps the request's text (every row of a request with
            text does).
        score: the guard's fast P(unsafe) of that subset, asked as a request of its own.
    """

    model_config = ConfigDict(frozen=True)

    subset: tuple[int, ...]
    includes_text: bool
    score: float = Field(ge=0.0, le=1.0)

    @property
    def name(self) -> str:
        """``"image 0 + image 2 + text"``, ``"text"``, ``"image 1"``."""
        parts = [f"image {i}" for i in self.subset] + (["text"] if self.includes_text else [])
        return " + ".join(parts) or "(nothing)"


class Attribution(BaseModel):
    """Which parts of a request carry its harm (``Policy(explain=True)``; :mod:`visguard.engine.attribution`).

    Attributes:
        rows: the scored subsets, smallest first; the last is the whole request.
        summary: what drives the verdict (:data:`AttributionSummary`).
        images: the images the summary names: the image unsafe with the request's text alone
            (``single image``), the images of the unsafe subset of fewest images (``combination
            only``), else empty.
        threshold: the P(unsafe) threshold the summary was read with (the policy's).
        detail: the summary as one line of text.
    """

    model_config = ConfigDict(frozen=True)

    rows: tuple[AttributionRow, ...]
    summary: AttributionSummary
    images: tuple[int, ...] = ()
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    detail: str = ""


class Verdict(BaseModel):
    """A guard's structured decision.

    Attributes:
        label: ``safe``, ``unsafe`` or ``unavailable`` (error, timeout or unparseable output).
        score: P(unsafe) in [0, 1] from the verdict-token probabilities, or ``None`` when the
            backend offers no probabilities or no verdict was reached.
        category / sub_category: the harm category named by the guard (reason mode), if any.
        categories: every category the guard named, in its order (guards such as Llama Guard name
            several); ``category`` is the first.
        stages: for a :class:`~visguard.engine.cascade.Cascade`, every stage guard's verdict in the order
            they ran (empty for a single guard).
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
        category_scores: P(unsafe) per harm category, where the format provides them (empty
            otherwise); :meth:`Policy.action` then decides per category (its thresholds and actions).
        attribution: which images / the text carry the harm (``Policy(explain=True)``), else ``None``;
            it explains, and never changes, the verdict.
    """

    model_config = ConfigDict(frozen=True)

    label: Label
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    category: str | None = None
    sub_category: str | None = None
    categories: tuple[str, ...] = ()
    stages: tuple[Verdict, ...] = ()
    reasoning: str | None = None
    raw: str = ""
    stage: Stage = "input"
    mode: Mode = "fast"
    model: str = ""
    latency_ms: float = 0.0
    error: str | None = None
    safe_answer: str | None = None
    category_scores: dict[str, float] = Field(default_factory=dict)
    attribution: Attribution | None = None

    @field_validator("error", "model")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # error texts quote URLs and server answers: a verdict never carries a credential
        return None if value is None else redact(value)

    @model_serializer(mode="wrap")
    def _attribution_when_asked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a verdict nobody asked to explain serialises as before: no "attribution" key
        data: dict[str, Any] = handler(self)
        if self.attribution is None:
            data.pop("attribution", None)
        return data

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
