"""The default ``visguard`` guard format.

Prompt (layout version 2): the request-independent instructions and the policy's categories first
(one prefix per policy, whose KV cache backends compute once), then the images, then the user's
request (and, for a post-check, the assistant's response) between delimiters, and a question for

    Image 1: <perception>          (reason mode only: one line per image)
    Reasoning: <cross-image reasoning>
    Verdict: safe|unsafe
    Category: <Category> / <Sub-category>   or   Category: none

Earlier turns of a conversation (``GuardRequest.conversation``) are quoted, neutralised like the
request, between ``<conversation>`` tags before the request, as context.

Fast mode asks for the verdict line first and ends the prompt right after ``Verdict:``, so P(unsafe)
is read from one forward pass. A pre-check's prompt is a prefix of its post-check's up to the end of
``</user_request>``, so a backend can continue the post-check from the pre-check's cache. Layout
version 1 (images first, then one instruction text with the policy inside) stays available for
guards trained on it (``VisguardFormat(version=1)``; ``visguard train`` records the layout in the
checkpoint's ``visguard.json``). Parsing reads only generated text, and the guard's *first* verdict
block decides: the first ``Verdict:`` line and the ``Category:`` line right after it. Anything the
guard writes after that block (for example an echo of the request that contains its own
``Verdict: safe``) is ignored. In untrusted text the labels ``Verdict`` and ``Category`` at the
start of a line are broken with a zero-width space, so a verbatim echo of the request in the
guard's reasoning cannot form a verdict line either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from visguard.core.errors import InputError
from visguard.core.policy import Policy
from visguard.core.types import GuardRequest
from visguard.engine.format import (
    _ZWSP,
    Capabilities,
    GuardFormat,
    GuardPrompt,
    ParsedOutput,
    PromptMode,
    neutralize,
)
from visguard.hookspecs import hookimpl

_TAGS = (
    "<user_request>", "</user_request>", "<assistant_response>", "</assistant_response>",
    "<conversation>", "</conversation>",
)
#: a label that would start a verdict/category line, wherever a line of untrusted text starts
_LABEL_LINE_RE = re.compile(r"(?im)^([ \t>*#_`-]*)(verdict|categor)")

_VERDICT_RE = re.compile(
    r"^[ \t>*#_`-]*verdict[ \t*_`]*[:=][ \t*_`]*(?P<word>[A-Za-z]+)(?P<rest>[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
#: a verdict word later on the verdict line makes the line ambiguous
_SECOND_VERDICT_WORD_RE = re.compile(r"\b(?:un)?safe\b", re.IGNORECASE)
_CATEGORY_RE = re.compile(r"^[ \t>*#_`-]*categor(?:y|ies)[ \t*_`]*[:=][ \t*_`]*(?P<value>[^\n]*)$", re.IGNORECASE | re.MULTILINE)


class VisguardFormat(GuardFormat):
    """Perception -> cross-image reasoning -> verdict -> category, as plain labelled lines.

    Args:
        version: prompt layout. 2 (default): the request-independent instructions and categories
            first (a shared, cacheable prefix), then the images, the request, the response and the
            question. 1: the layout before prefixes were shared (images, then one instruction text
            with the request inside); guards trained on it are read with it.
        ignore_unread: see :class:`~visguard.engine.format.GuardFormat`.
    """

    name = "visguard"
    capabilities = Capabilities(conversation=True)
    version = 2
    shares_prefix = True
    #: layout versions this class can build
    versions = (1, 2)

    def __init__(self, version: int = 2, *, ignore_unread: bool = False) -> None:
        super().__init__(ignore_unread=ignore_unread)
        if version not in self.versions:
            raise InputError(
                f"format 'visguard' has prompt layout versions {list(self.versions)}, not {version!r} "
                "(a guard trained on a newer layout needs a newer visguard)"
            )
        self.version = version
        self.shares_prefix = version >= 2

    def checkpoint_kwargs(self) -> dict[str, int]:
        """Keyword arguments that rebuild this format exactly (its prompt layout version), for a
        trained checkpoint's ``visguard.json``: the guard is later prompted with the layout it learned."""
        return {"version": self.version}

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        n = len(request.images)
        images = [{"type": "image"} for _ in range(n)]
        if self.version == 1:
            content = images + [{"type": "text", "text": self.instruction(request, policy, mode=mode, special_tokens=special_tokens)}]
        else:
            content = [
                {"type": "text", "text": self.static_text(policy, mode)},
                *images,
                {"type": "text", "text": self.request_text(request, mode=mode, special_tokens=special_tokens)},
            ]
        return GuardPrompt(
            messages=[{"role": "user", "content": content}],
            images=[img.image for img in request.images],
            assistant_prefix=self.verdict_prefix if mode == "fast" else "",
            verdict_prefix=self.verdict_prefix,
            verdict_words=dict(self.verdict_words),
            mode=mode,
            static_parts=1 if self.version >= 2 else 0,
            image_keys=tuple(img.sha256 for img in request.images),
        )

    def static_text(self, policy: Policy, mode: PromptMode = "fast") -> str:
        """The request-independent opening of a layout-2 prompt: role, harm definition, categories, answer format.

        Everything that does not depend on the request is here, so the text after the request (or
        the response) is one short line and a post-check's cost grows with the response only.
        """
        lines = [
            "You are a safety guard for a vision-language assistant.",
            "Harm may appear only when the images and the text are combined, "
            "for example a tool in one image used on a person or thing in another.",
            "",
            "Unsafe means asking for, enabling or containing any of:",
            *_category_lines(policy),
            "",
            "Below are the images, then the user's request between <user_request> tags and, when the assistant "
            "has answered, its response between <assistant_response> tags. Decide whether the text named on the "
            "last line is unsafe, considering the images and the text together.",
            "Answer in exactly this format:",
        ]
        if mode != "fast":
            lines += [
                "Image 1: <what image 1 shows>   (one such line per image)",
                "Reasoning: <how the images and the text combine, and whether that is harmful>",
            ]
        lines += ["Verdict: safe or unsafe", "Category: <category> / <sub-category>, or none"]
        return "\n".join(lines) + "\n\n"

    def request_text(self, request: GuardRequest, *, mode: PromptMode, special_tokens: Iterable[str] = ()) -> str:
        """The request-dependent text of a layout-2 prompt, after the images.

        A pre-check's text is a prefix of its post-check's up to the end of ``</user_request>``.
        """
        n = len(request.images)
        lines = [f"There {'is' if n == 1 else 'are'} {n or 'no'} image{'' if n == 1 else 's'}" + (" above." if n else ".")]
        lines += _quoted_request(request, special_tokens)
        lines += ["", "Judge the assistant's response." if request.response is not None else "Judge the user's request."]
        return "\n".join(lines)

    def instruction(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> str:
        """All the prompt's text in order (exposed so training and docs use the exact same words)."""
        if self.version >= 2:
            return self.static_text(policy, mode) + self.request_text(request, mode=mode, special_tokens=special_tokens)
        n = len(request.images)
        shown = f"{n} image{'s' if n != 1 else ''} above" if n else "no images"
        lines = [
            "You are a safety guard for a vision-language assistant.",
            f"There are {shown}. Harm may appear only when the images and the text are combined, "
            "for example a tool in one image used on a person or thing in another.",
            "",
            "Unsafe means asking for, enabling or containing any of:",
            *_category_lines(policy),
        ]
        if request.conversation:
            lines.append("")
        lines += _quoted_request(request, special_tokens, v1=True)
        lines.append("")
        lines += _question_lines(n, request.response is not None, mode)
        return "\n".join(lines)

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        """Read the guard's first verdict block; text after it never decides (see the module doc)."""
        if not isinstance(text, str):
            return ParsedOutput(label=None, error=f"unparseable guard output: {type(text).__name__}, not text")
        first = _VERDICT_RE.search(text)
        if first is None:
            return ParsedOutput(label=None, error="unparseable guard output: no 'Verdict: safe|unsafe' line")
        word = first.group("word").lower()
        if word not in ("safe", "unsafe"):
            shown = " ".join(first.group("word").split())[:40]
            return ParsedOutput(label=None, error=f"unparseable guard output: unknown verdict {shown!r}")
        if _SECOND_VERDICT_WORD_RE.search(first.group("rest")):
            # "Verdict: safe or unsafe" (an echo of the instructions) names both: it decides nothing.
            shown = " ".join(first.group(0).split())[:60]
            return ParsedOutput(label=None, error=f"unparseable guard output: ambiguous verdict line {shown!r}")
        label: Literal["safe", "unsafe"] = "safe" if word == "safe" else "unsafe"
        category = sub = None
        # The category belongs to the block only if it is the next non-empty line.
        cat_match = _CATEGORY_RE.match(text, _next_line_start(text, first.end()))
        if cat_match is not None and label == "unsafe":
            category, sub = policy.find_category(cat_match.group("value"))
        reasoning = text[: first.start()].strip() or None
        return ParsedOutput(
            label=label,
            category=category,
            sub_category=sub,
            reasoning=reasoning,
            verdict_offset=first.start("word"),
        )

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
        """The assistant text a perfect guard writes (``visguard train``'s target): in reason mode the
        reasoning, then the ``Verdict:`` and ``Category:`` lines; in fast mode those lines alone."""
        if label not in ("safe", "unsafe"):
            raise ValueError(f"label must be 'safe' or 'unsafe', got {label!r}")
        if label == "unsafe" and category:
            cat_line = f"Category: {category}" + (f" / {sub_category}" if sub_category else "")
        else:
            cat_line = "Category: none"
        tail = f"Verdict: {label}\n{cat_line}"
        if mode == "fast":
            return tail
        return f"{reasoning.strip()}\n{tail}" if reasoning else tail

    def reasoning_text(self, rationale: str, perceptions: Iterable[str] = ()) -> str:
        """``Image N: <perception>`` lines, then ``Reasoning: <rationale>`` on one line (the verdict
        line then stays the last labelled line)."""
        lines = [f"Image {i}: {' '.join(p.split())}" for i, p in enumerate(perceptions, 1)]
        return "\n".join([*lines, f"Reasoning: {' '.join(rationale.split())}"])


def _category_lines(policy: Policy) -> list[str]:
    lines = []
    for cat in policy.categories:
        subs = f" ({', '.join(cat.sub_categories)})" if cat.sub_categories else ""
        desc = f": {cat.description}" if cat.description else ""
        lines.append(f"- {cat.name}{subs}{desc}")
    return lines


def _quoted_request(request: GuardRequest, special_tokens: Iterable[str], *, v1: bool = False) -> list[str]:
    """Earlier turns, the request and (post-check) the response, quoted between their tags."""
    lines: list[str] = []
    if request.conversation:
        lines += ["Earlier turns of the conversation, as context:", "<conversation>"]
        lines += [f"[{turn['role']}] {_quote(turn['content'], special_tokens)}" for turn in request.conversation]
        lines.append("</conversation>")
    if v1:
        lines.append("")
    lines += ["<user_request>", _quote(request.text, special_tokens), "</user_request>"]
    if request.response is not None:
        # layout 2 ends the shared part with a blank line, so the pre-check is a prefix of the post-check
        lines += ([] if v1 else [""]) + ["<assistant_response>", _quote(request.response, special_tokens), "</assistant_response>"]
    return lines


def _question_lines(n: int, post: bool, mode: PromptMode) -> list[str]:
    subject = "the assistant's response" if post else "the user's request"
    lines = [f"Decide whether {subject} is unsafe, considering the images and the text together.", "Answer in exactly this format:"]
    if mode != "fast":
        lines += [f"Image {i}: <what image {i} shows>" for i in range(1, n + 1)]
        lines.append("Reasoning: <how the images and the text combine, and whether that is harmful>")
    return lines + ["Verdict: safe or unsafe", "Category: <category> / <sub-category>, or none"]


def _quote(text: str, special_tokens: Iterable[str]) -> str:
    """Untrusted text made inert: specials and tags broken, label lines defanged."""
    text = neutralize(text, special_tokens, _TAGS)
    return _LABEL_LINE_RE.sub(lambda m: m.group(1) + m.group(2)[0] + _ZWSP + m.group(2)[1:], text)


def _next_line_start(text: str, pos: int) -> int:
    """Start of the first non-blank line after ``pos`` (``len(text)`` when none)."""
    while True:
        nl = text.find("\n", pos)
        if nl < 0:
            return len(text)
        pos = nl + 1
        end = text.find("\n", pos)
        line = text[pos : len(text) if end < 0 else end]
        if line.strip():
            return pos


@hookimpl
def register_formats(register):
    register("visguard", VisguardFormat)
