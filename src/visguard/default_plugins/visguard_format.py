"""The default ``visguard`` guard format.

Prompt: the images, then an instruction that states the policy's categories, quotes the user's
request (and, for a post-check, the assistant's response) between delimiters, and asks for

    Image 1: <perception>          (reason mode only: one line per image)
    Reasoning: <cross-image reasoning>
    Verdict: safe|unsafe
    Category: <Category> / <Sub-category>   or   Category: none

Earlier turns of a conversation (``GuardRequest.conversation``) are quoted, neutralised like the
request, between ``<conversation>`` tags before the request, as context.

Fast mode asks for the verdict line first and ends the prompt right after ``Verdict:``, so P(unsafe)
is read from one forward pass. Parsing reads only generated text, and the guard's *first* verdict
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

from visguard.format import (
    _ZWSP,
    Capabilities,
    GuardFormat,
    GuardPrompt,
    ParsedOutput,
    PromptMode,
    neutralize,
)
from visguard.hookspecs import hookimpl
from visguard.policy import Policy
from visguard.types import GuardRequest

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
_CATEGORY_RE = re.compile(r"^[ \t>*#_`-]*categor(?:y|ies)[ \t*_`]*[:=][ \t*_`]*(?P<value>[^\n]*)$", re.IGNORECASE | re.MULTILINE)


class VisguardFormat(GuardFormat):
    """Perception -> cross-image reasoning -> verdict -> category, as plain labelled lines."""

    name = "visguard"
    capabilities = Capabilities(conversation=True)

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        n = len(request.images)
        text = self.instruction(request, policy, mode=mode, special_tokens=special_tokens)
        content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": text}]
        return GuardPrompt(
            messages=[{"role": "user", "content": content}],
            images=[img.image for img in request.images],
            assistant_prefix=self.verdict_prefix if mode == "fast" else "",
            verdict_prefix=self.verdict_prefix,
            verdict_words=dict(self.verdict_words),
            mode=mode,
        )

    def instruction(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> str:
        """The text part of the prompt (exposed so training and docs use the exact same words)."""
        n = len(request.images)
        post = request.response is not None
        subject = "the assistant's response" if post else "the user's request"
        shown = f"{n} image{'s' if n != 1 else ''} above" if n else "no images"
        lines = [
            "You are a safety guard for a vision-language assistant.",
            f"There are {shown}. Harm may appear only when the images and the text are combined, "
            "for example a tool in one image used on a person or thing in another.",
            "",
            "Unsafe means asking for, enabling or containing any of:",
        ]
        for cat in policy.categories:
            subs = f" ({', '.join(cat.sub_categories)})" if cat.sub_categories else ""
            desc = f": {cat.description}" if cat.description else ""
            lines.append(f"- {cat.name}{subs}{desc}")
        if request.conversation:
            lines += ["", "Earlier turns of the conversation, as context:", "<conversation>"]
            lines += [f"[{turn['role']}] {_quote(turn['content'], special_tokens)}" for turn in request.conversation]
            lines.append("</conversation>")
        lines += ["", "<user_request>", _quote(request.text, special_tokens), "</user_request>"]
        if post:
            lines += ["<assistant_response>", _quote(request.response or "", special_tokens), "</assistant_response>"]
        lines += ["", f"Decide whether {subject} is unsafe, considering the images and the text together."]
        if mode == "fast":
            lines += ["Answer in exactly this format:", "Verdict: safe or unsafe", "Category: <category> / <sub-category>, or none"]
        else:
            lines.append("Answer in exactly this format:")
            lines += [f"Image {i}: <what image {i} shows>" for i in range(1, n + 1)]
            lines += [
                "Reasoning: <how the images and the text combine, and whether that is harmful>",
                "Verdict: safe or unsafe",
                "Category: <category> / <sub-category>, or none",
            ]
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
