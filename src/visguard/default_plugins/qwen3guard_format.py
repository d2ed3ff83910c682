"""Qwen3Guard-Gen guard format: a text guard (``Safety:`` / ``Categories:`` / ``Refusal:`` lines).

Qwen3Guard-Gen reads text only; its chat template writes the moderation instruction around the
plain conversation (the user's request and, for a post-check, the assistant's answer). It is the
cheap check of a host's answer in a post-check or a cascade: build it with ``ignore_unread=True`` to
judge the text of a request that also carries images. The answer is ``Safety: Safe|Unsafe|
Controversial``, ``Categories: ...`` and, for responses, ``Refusal: Yes|No``. ``strict=True``
(default) counts Controversial as unsafe, ``strict=False`` as safe. Its categories are fixed: a
policy with custom categories is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from visguard.core.policy import Policy
from visguard.core.taxonomy import category_for, refuse_custom
from visguard.core.types import GuardRequest
from visguard.engine.format import (
    Capabilities,
    GuardFormat,
    GuardPrompt,
    ParsedOutput,
    PromptMode,
    neutralize,
)
from visguard.hookspecs import hookimpl

_SAFETY_RE = re.compile(r"^[ \t]*Safety[ \t]*:[ \t]*(?P<word>[A-Za-z]+)", re.IGNORECASE | re.MULTILINE)
_CATEGORIES_RE = re.compile(r"^[ \t]*Categories[ \t]*:[ \t]*(?P<value>[^\n]*)", re.IGNORECASE | re.MULTILINE)
_REFUSAL_RE = re.compile(r"^[ \t]*Refusal[ \t]*:[ \t]*(?P<word>[A-Za-z]+)", re.IGNORECASE | re.MULTILINE)


class Qwen3GuardFormat(GuardFormat):
    """Qwen3Guard-Gen: text-only request and response moderation.

    Args:
        strict: count ``Controversial`` as unsafe (default) or as safe.
        ignore_unread: judge the text of requests that carry images (the images are dropped).
    """

    name = "qwen3guard"
    capabilities: ClassVar[Capabilities] = Capabilities(images=False, custom_categories=False)
    verdict_prefix = "Safety:"

    def __init__(self, *, strict: bool = True, ignore_unread: bool = False) -> None:
        super().__init__(ignore_unread=ignore_unread)
        self.strict = strict
        controversial = (" Controversial",)
        self.verdict_words = {
            "safe": (" Safe",) + (() if strict else controversial),
            "unsafe": (" Unsafe",) + (controversial if strict else ()),
        }

    def check_policy(self, policy: Policy) -> None:
        refuse_custom(policy, self.name)

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        messages = [{"role": "user", "content": neutralize(request.text, special_tokens)}]
        if request.response is not None:
            messages.append({"role": "assistant", "content": neutralize(request.response, special_tokens)})
        return GuardPrompt(
            messages=messages,
            images=[],
            assistant_prefix=self.verdict_prefix if mode == "fast" else "",
            verdict_prefix=self.verdict_prefix,
            verdict_words=dict(self.verdict_words),
            mode=mode,
        )

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        match = _SAFETY_RE.search(text)
        if match is None:
            return ParsedOutput(label=None, error="unparseable guard output: no 'Safety:' line")
        word = match.group("word").lower()
        if word not in ("safe", "unsafe", "controversial"):
            return ParsedOutput(label=None, error=f"unparseable guard output: unknown safety label {match.group('word')!r}")
        unsafe = word == "unsafe" or (word == "controversial" and self.strict)
        names: list[str] = []
        cats = _CATEGORIES_RE.search(text, match.end())
        if cats is not None and unsafe:
            for raw in cats.group("value").split(","):
                raw = raw.strip().rstrip(".")
                if raw and raw.lower() != "none":
                    name = category_for(raw, "qwen3guard", policy)
                    if name not in names:
                        names.append(name)
        notes = [f"Safety: {match.group('word')}"]
        if refusal := _REFUSAL_RE.search(text, match.end()):
            notes.append(f"Refusal: {refusal.group('word')}")
        return ParsedOutput(
            label="unsafe" if unsafe else "safe", category=names[0] if names else None, categories=tuple(names),
            reasoning="; ".join(notes), verdict_offset=match.start("word"),
        )


@hookimpl
def register_formats(register):
    register("qwen3guard", Qwen3GuardFormat)


@hookimpl
def register_model_formats(register):
    for size in ("0.6B", "4B", "8B"):
        register(f"Qwen/Qwen3Guard-Gen-{size}", Qwen3GuardFormat)
