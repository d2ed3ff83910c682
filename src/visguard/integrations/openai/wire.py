"""The OpenAI chat-completions wire format: one module for servers, hosts and backends.

These pydantic models cover the part of the OpenAI ``/v1/chat/completions`` API that a
vision-language chat server needs: text and ``image_url`` content parts, streaming chunks, model
listing and error bodies. Request models accept unknown fields (clients send many optional
parameters), response models write exactly the fields clients read. They depend on pydantic only,
so clients and servers can both import them without FastAPI.

Server side: :func:`split_messages` / :func:`messages_to_prompt` are the single place where chat
messages become visguard inputs (images go through :func:`visguard.core.images.load_images`, the image
boundary); :func:`sse_event` frames a stream. Client side (the ``openai`` host and backend):
:func:`image_part` writes an image, :func:`completion_choice`, :func:`message_text` and
:func:`stream_event` read what a server answered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visguard.core.errors import InputError
from visguard.core.images import GuardImage, ImageLimits, load_images

# ---------------------------------------------------------------------------------- requests


class ImageURL(BaseModel):
    """The ``image_url`` object of an image part: a ``data:image/...;base64,`` URL (or http(s), if allowed)."""

    model_config = ConfigDict(extra="allow")

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(BaseModel):
    """``{"type": "image_url", "image_url": {"url": ...}}``."""

    model_config = ConfigDict(extra="allow")

    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class TextPart(BaseModel):
    """``{"type": "text", "text": ...}``."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"] = "text"
    text: str


ContentPart = TextPart | ImageURLPart


class ChatMessage(BaseModel):
    """One chat message. ``content`` is a string or a list of text / image parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` asks for a last chunk with ``usage`` (and no choices)."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions`` (fields a server does not use are kept in ``model_extra``)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    user: str | None = None
    stream_options: StreamOptions | None = None

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens``, else the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


def generation_options(request: ChatCompletionRequest, host: Any) -> dict[str, Any]:
    """The request's generation settings that ``host`` declares in ``host.generation_options``.

    ``max_new_tokens`` is the request's token limit; ``temperature``, ``top_p``, ``stop`` and ``seed``
    are passed under their own names. Settings the request leaves out, or the host does not
    declare (a local model decoding greedily, a plain callable), are not passed.
    """
    offered = {"max_new_tokens": request.token_limit, "temperature": request.temperature, "top_p": request.top_p,
               "stop": request.stop, "seed": request.seed}
    declared = getattr(host, "generation_options", ())
    return {k: v for k, v in offered.items() if v is not None and k in declared}


# ---------------------------------------------------------------------------------- responses


def completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return "chatcmpl-" + uuid.uuid4().hex


def _now() -> int:
    return int(time.time())


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"] | None = "stop"


class Usage(BaseModel):
    """Token counts of a completion (OpenAI ``usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, tokens: Any) -> Usage | None:
        """From a :class:`visguard.hosting.hosts.TokenUsage` (``None`` when the host reports none)."""
        if tokens is None:
            return None
        return cls(prompt_tokens=tokens.prompt_tokens, completion_tokens=tokens.completion_tokens,
                   total_tokens=tokens.total_tokens)


class ChatCompletion(BaseModel):
    """A non-streaming chat completion."""

    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (``data: <chunk JSON>``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "visguard"


class ModelList(BaseModel):
    """Body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def sse_event(payload: BaseModel | str) -> str:
    """Format one server-sent event: ``data: <json>`` and a blank line (``"[DONE]"`` as is)."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


SSE_DONE = sse_event("[DONE]")

# ---------------------------------------------------------------------------------- client side


class WireError(ValueError):
    """A server's answer does not have the chat-completions shape (callers name the server)."""


#: :func:`stream_event`'s answer to ``data: [DONE]``
DONE = object()


def image_part(image: GuardImage, image_format: str = "PNG") -> dict[str, Any]:
    """An ``image_url`` content part carrying ``image`` as a data URL (PNG keeps pixels exact)."""
    return {"type": "image_url", "image_url": {"url": image.to_data_url(image_format)}}


def content_text(content: Any) -> str | None:
    """Message content as text: a string, or the text parts of a list of parts joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise WireError(f"message content of type {type(content).__name__}")


def completion_choice(data: Any) -> dict[str, Any]:
    """The first choice of a chat completion.

    Raises:
        WireError: ``data`` has no choices.
    """
    try:
        choice = data["choices"][0]
        choice["message"]  # noqa: B018 - the shape check
    except (KeyError, IndexError, TypeError) as exc:
        raise WireError(f"sent no chat completion message: {str(data)[:200]!r}") from exc
    return choice


def message_text(data: Any) -> str:
    """The text of a chat completion's first message (``""`` when it has none)."""
    return content_text(completion_choice(data)["message"].get("content")) or ""


def add_usage(data: Any, usage: Any) -> None:
    """Add the ``usage`` of a completion or chunk to ``usage`` (a :class:`visguard.hosting.hosts.TokenUsage`).

    Nothing happens when ``usage`` is ``None`` or ``data`` reports none.
    """
    reported = data.get("usage") if isinstance(data, dict) else None
    if usage is not None and isinstance(reported, dict):
        usage.add(reported.get("prompt_tokens") or 0, reported.get("completion_tokens") or 0)


def stream_event(line: str, usage: Any = None) -> Any:
    """One line of a streamed completion: its delta text, :data:`DONE`, or ``None``.

    ``None`` stands for lines without text: blank separators, ``: keep-alive`` comments,
    ``event:`` / ``id:`` fields and role-only chunks. A chunk's ``usage`` (the last one, when
    ``stream_options.include_usage`` asked for it) is added to ``usage``.

    Raises:
        WireError: the event is not JSON, is an error event, or is not a chunk.
    """
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise WireError(f"sent a stream event that is not JSON: {data[:100]!r}") from exc
    if isinstance(chunk, dict) and "error" in chunk:
        err = chunk["error"]
        raise WireError(f"failed mid-stream: {err.get('message', err) if isinstance(err, dict) else err}")
    try:
        add_usage(chunk, usage)
        choices = chunk.get("choices") or []
        return content_text(choices[0].get("delta", {}).get("content")) if choices else None
    except (AttributeError, TypeError) as exc:
        raise WireError(f"sent an unexpected chunk: {data[:200]!r}") from exc


def first_model(data: Any) -> str:
    """The first model id of a ``GET /models`` answer.

    Raises:
        WireError: the list is empty or malformed.
    """
    try:
        return str(data["data"][0]["id"])
    except (KeyError, IndexError, TypeError) as exc:
        raise WireError("lists no model") from exc

# ---------------------------------------------------------------------------------- messages -> inputs

_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class SplitChat(BaseModel):
    """Chat messages taken apart for a single-turn model and for a guard.

    Attributes:
        images: every image of every message, in order, through the image boundary.
        text: the last user message's text (its text parts joined by newlines).
        conversation: the messages before it, as ``{"role": ..., "content": str}`` with
            ``[image N]`` where image N was (the shape :class:`visguard.GuardRequest` takes).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    images: list[GuardImage]
    text: str
    conversation: list[dict[str, str]] = Field(default_factory=list)

    def prompt_text(self) -> str:
        """The text for a model that takes one (images, text) turn.

        The last user text alone when there is no earlier turn; otherwise a plain transcript
        (``System: ...``, ``User: ...``, ``Assistant: ...``) ending with the last user turn, so the
        context is not lost.
        """
        if not self.conversation:
            return self.text
        lines = [f"{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in self.conversation]
        return "\n".join([*lines, f"User: {self.text}"])


def split_messages(
    messages: Sequence[ChatMessage | Mapping[str, Any]], *, limits: ImageLimits | None = None
) -> SplitChat:
    """Take OpenAI chat messages apart into images, the last user text and the earlier turns.

    Args:
        messages: :class:`ChatMessage` objects or plain dicts in the OpenAI shape.
        limits: image-boundary limits (default :class:`ImageLimits()`: data URLs only, at most
            8 images ...).

    Raises:
        InputError: the messages are malformed, or do not end with a user message.
        ImageInputError: an image was refused at the boundary (it names the image's index).
    """
    try:
        parsed = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
    except ValueError as exc:  # pydantic.ValidationError
        raise InputError(f"invalid chat messages: {exc}") from exc
    if not parsed or parsed[-1].role != "user":
        raise InputError("the last message must be a user message")
    last_user = len(parsed) - 1
    image_parts: list[dict[str, Any]] = []
    rendered: list[tuple[str, str]] = []
    for message in parsed:
        content = message.content
        if content is None or isinstance(content, str):
            rendered.append((message.role, content or ""))
            continue
        texts: list[str] = []
        for part in content:
            if isinstance(part, ImageURLPart):
                image_parts.append(part.model_dump(exclude_none=True))
                if message is not parsed[-1]:
                    texts.append(f"[image {len(image_parts)}]")
            else:
                texts.append(part.text)
        rendered.append((message.role, "\n".join(texts)))
    images = load_images(image_parts, limits)
    conversation = [{"role": role, "content": text} for role, text in rendered[:last_user]]
    return SplitChat(images=images, text=rendered[last_user][1], conversation=conversation)


def messages_to_prompt(
    messages: Sequence[ChatMessage | Mapping[str, Any]], *, limits: ImageLimits | None = None
) -> tuple[list[GuardImage], str]:
    """``(images, text)`` for a single-turn host from OpenAI chat messages.

    See :func:`split_messages` and :meth:`SplitChat.prompt_text`.
    """
    chat = split_messages(messages, limits=limits)
    return chat.images, chat.prompt_text()
