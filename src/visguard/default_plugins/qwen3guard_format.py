"""Qwen3Guard-Gen guard format: a text guard (``Safety:`` / ``Categories:`` / ``Refusal:`` lines).

Qwen3Guard-Gen reads text only; its chat template writes the moderation instruction around the
plain conversation (the user's request and, for a post-check, the assistant's answer). It is the
cheap check of a host's answer in a post-check or a cascade: build it with ``ignore_unread=True`` to
judge the text of a request that also carries images. The answer is ``Safety: Safe|Unsafe|
Controversial``, ``Categories: ...`` and, for responses, ``Refusal: Yes|No``, read as the authors'
README and evaluation code read it (QwenLM/Qwen3Guard@6a52eca, README.md and eval/eval_gen.py): the
first ``Safety: (Safe|Unsafe|Controversial)`` anywhere in the answer, and every category name after
it. ``strict=True`` (default, as their evaluation counts it) reads Controversial as unsafe,
``strict=False`` as safe. Categories are reported by
:func:`~visguard.core.taxonomy.reported_category` ("Unethical Acts" stays "Unethical Acts"). Its
categories are fixed: a policy with categories outside MIS and its own is refused.

The template picks prompt or response moderation from the last message's role and always ends with
its own assistant turn (``<|im_start|>assistant\n<think>\n\n</think>\n\n``), so fast mode puts
``Safety:`` after the rendered prompt (transformers) and never sends it as a prefilled assistant
message (``GuardPrompt.prefill_as_message`` is false: the ``openai`` backend lets the model write it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from visguard.core.policy import Policy
from visguard.core.taxonomy import QWEN3GUARD, refuse_custom, reported_category
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

# The authors' patterns (README.md, extract_label_categories_refusal): case-sensitive, anywhere.
_SAFETY_RE = re.compile(r"Safety: (?P<word>Safe|Unsafe|Controversial)")
_CATEGORY_RE = re.compile("|".join(re.escape(c) for c in (*QWEN3GUARD, "None")))
_REFUSAL_RE = re.compile(r"Refusal: (?P<word>Yes|No)")
_CATEGORIES_RE = re.compile(r"Categories:[ \t]*(?P<value>[^\n]*)")


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
        refuse_custom(policy, self.name, known=QWEN3GUARD)

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
            prefill_as_message=False,
        )

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        match = _SAFETY_RE.search(text)
        if match is None:
            return ParsedOutput(label=None, error="unparseable guard output: no 'Safety: Safe|Unsafe|Controversial'")
        word = match.group("word").lower()
        unsafe = word == "unsafe" or (word == "controversial" and self.strict)
        names: list[str] = []
        if unsafe:
            refusal_at = _REFUSAL_RE.search(text, match.end())
            tail = text[match.end(): refusal_at.start() if refusal_at else len(text)]
            line = _CATEGORIES_RE.search(tail)
            # the Categories line item by item (a name outside the list is kept, never dropped), else
            # every category name in the answer, as the authors' findall reads it
            found = [c.strip().rstrip(".") for c in line.group("value").split(",")] if line else _CATEGORY_RE.findall(tail)
            for raw in found:
                if raw and raw.lower() != "none":
                    name = reported_category(raw, "qwen3guard", policy)
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
