"""Guard formats: how a request becomes a guard prompt, and how the guard's output becomes a verdict.

A format is model-agnostic: it produces a :class:`GuardPrompt` (chat messages in the Hugging Face
"list of typed parts" shape, the images, and text that must follow the assistant header), and it
parses the text the guard *generated*. Backends render and run prompts; they never interpret them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from visguard.policy import Policy
from visguard.types import GuardRequest

PromptMode = Literal["fast", "reason"]


@dataclass(frozen=True)
class GuardPrompt:
    """A rendered-independent guard prompt.

    Attributes:
        messages: chat messages; user content is a list of parts ``{"type": "image"}`` /
            ``{"type": "text", "text": ...}`` with one image part per entry of ``images``.
        images: the images, in the order of the image parts.
        assistant_prefix: text the assistant turn starts with (fast mode: up to the verdict word).
        verdict_prefix: the text the verdict word follows (``"Verdict:"``); backends tokenize the
            verdict spellings in this context.
        verdict_words: label -> spellings of that label after ``verdict_prefix``; backends score
            the first token of each.
        mode: the mode the prompt was built for.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(repr=False)
    assistant_prefix: str = ""
    verdict_prefix: str = "Verdict:"
    verdict_words: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mode: PromptMode = "fast"


@dataclass(frozen=True)
class ParsedOutput:
    """What a format read from generated text.

    Attributes:
        label: ``safe`` / ``unsafe``, or ``None`` when no verdict could be read.
        verdict_offset: character offset of the verdict word in the text (for its token probability).
        error: why parsing failed (``None`` on success).
    """

    label: Literal["safe", "unsafe"] | None
    category: str | None = None
    sub_category: str | None = None
    reasoning: str | None = None
    verdict_offset: int | None = None
    error: str | None = None


class GuardFormat(ABC):
    """Base class of guard formats (register subclasses through ``register_formats``)."""

    #: registry name
    name: str = ""
    #: text that precedes the verdict word on the verdict line
    verdict_prefix: str = "Verdict:"
    #: label -> spellings that follow ``verdict_prefix``
    verdict_words: Mapping[str, tuple[str, ...]] = {
        "safe": (" safe", " Safe"),
        "unsafe": (" unsafe", " Unsafe"),
    }

    @abstractmethod
    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        """Build the guard prompt for ``request``.

        Args:
            request: the checked request.
            policy: categories and limits to write into the prompt.
            mode: ``fast`` ends the prompt right before the verdict word; ``reason`` asks for
                perception and reasoning first.
            special_tokens: the backend's special-token strings; untrusted text must not contain them.
        """

    @abstractmethod
    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        """Parse text the guard generated (never the prompt) into a :class:`ParsedOutput`."""

    def target(
        self,
        request: GuardRequest,
        policy: Policy,
        *,
        label: Literal["safe", "unsafe"],
        mode: PromptMode,
        category: str | None = None,
        sub_category: str | None = None,
        reasoning: str | None = None,
    ) -> str:
        """The assistant text a perfect guard would produce (used to train guards).

        The default raises ``NotImplementedError``: formats that can be trained override it.
        """
        raise NotImplementedError(f"format {self.name!r} does not define training targets")


_ZWSP = "\u200b"


def neutralize(text: str, special_tokens: Iterable[str] = (), tags: Iterable[str] = ()) -> str:
    """Make untrusted text inert inside a guard prompt.

    Special-token strings (``<|im_start|>``, ``<image>`` ...) and the format's own delimiter tags
    are broken with a zero-width space so a tokenizer cannot read them as control tokens and a user
    cannot close the quoted block early.
    """
    for token in sorted({t for t in special_tokens if t and len(t) > 1}, key=len, reverse=True):
        text = text.replace(token, token[0] + _ZWSP + token[1:])
    for tag in tags:
        text = re.sub(re.escape(tag), lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text, flags=re.IGNORECASE)
    # Generic chat-template control shapes, whatever the backend reports.
    text = re.sub(r"<(\|)", "<" + _ZWSP + r"\1", text)
    text = re.sub(r"\[(/?INST)\]", "[" + _ZWSP + r"\1]", text)
    return text
