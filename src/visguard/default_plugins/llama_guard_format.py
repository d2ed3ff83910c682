"""Llama Guard 4 (and Llama Guard 3 Vision) guard format: MLCommons S-codes, ``safe`` / ``unsafe`` + codes.

The model's own chat template writes the task, the category list and the conversation; this format
only sends the conversation as typed parts (a plain string renders an empty conversation) plus the
template variables ``excluded_category_keys`` (a policy narrower than the default list) or
``categories`` (custom categories, added as S15, S16 ...). The answer is ``safe``, or ``unsafe`` and a
line of comma-separated codes. The template ends at the assistant header and the model often writes
blank lines first, so fast mode generates a few tokens and reads the verdict wherever it appears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from visguard.core.policy import Policy
from visguard.core.taxonomy import MLCOMMONS, category_for, codes_for
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

_FIRST_CUSTOM = 15
_WORD_RE = re.compile(r"\A\s*(?P<word>[A-Za-z]+)[ \t]*(?P<rest>[^\n]*)")


def custom_codes(policy: Policy) -> dict[str, str]:
    """Codes S15, S16 ... given to the policy's categories that have no MLCommons counterpart."""
    _, unmapped = codes_for(policy, "mlcommons")
    return {f"S{_FIRST_CUSTOM + i}": cat.name for i, cat in enumerate(unmapped)}


def template_kwargs(policy: Policy, *, with_images: bool) -> dict[str, Any]:
    """The chat-template variables that make the model check exactly the policy's categories."""
    codes, unmapped = codes_for(policy, "mlcommons")
    codes = [c for c in codes if not (with_images and c == "S14")]  # S14 is text-only
    if not unmapped:
        return {"excluded_category_keys": [c for c in MLCOMMONS if c not in codes]}
    categories = {c: MLCOMMONS[c] for c in codes}
    for (code, _), cat in zip(custom_codes(policy).items(), unmapped, strict=True):
        desc = f" {cat.description.rstrip('.')}." if cat.description else ""
        categories[code] = f"{cat.name}.{desc}"
    return {"categories": categories, "excluded_category_keys": []}


class LlamaGuardFormat(GuardFormat):
    """Llama Guard 4: text plus any number of images; judges requests and responses."""

    name = "llama-guard-4"
    capabilities: ClassVar[Capabilities] = Capabilities(modes=("fast",), fast_tokens=16)
    verdict_prefix = ""
    verdict_words = {"safe": ("safe",), "unsafe": ("unsafe",)}

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        user: list[dict[str, Any]] = [{"type": "image"} for _ in request.images]
        user.append({"type": "text", "text": neutralize(request.text, special_tokens)})
        messages = [{"role": "user", "content": user}]
        if request.response is not None:
            messages.append({"role": "assistant", "content": [
                {"type": "text", "text": neutralize(request.response, special_tokens)}]})
        return GuardPrompt(
            messages=messages,
            images=[img.image for img in request.images],
            verdict_prefix=self.verdict_prefix,
            verdict_words=dict(self.verdict_words),
            mode=mode,
            template_kwargs=template_kwargs(policy, with_images=bool(request.images)),
        )

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        match = _WORD_RE.match(text)
        if match is None or match.group("word").lower() not in ("safe", "unsafe"):
            return ParsedOutput(label=None, error="unparseable guard output: the first line is not 'safe' or 'unsafe'")
        word = match.group("word").lower()
        offset = match.start("word")
        if word == "safe":
            return ParsedOutput(label="safe", verdict_offset=offset)
        # Codes follow on the next non-empty line (or, leniently, on the verdict line itself).
        rest = match.group("rest").strip()
        if not rest:
            tail = text[match.end():].lstrip("\n")
            rest = tail.split("\n", 1)[0].strip() if tail else ""
        extra = custom_codes(policy)
        names: list[str] = []
        for code in (c.strip() for c in rest.split(",")):
            if code:
                name = category_for(code, "mlcommons", policy, extra)
                if name not in names:
                    names.append(name)
        return ParsedOutput(label="unsafe", category=names[0] if names else None, categories=tuple(names), verdict_offset=offset)


class LlamaGuard3VisionFormat(LlamaGuardFormat):
    """Llama Guard 3 Vision (mllama): one image at most; the template writes only text parts."""

    name = "llama-guard-3-vision"
    capabilities: ClassVar[Capabilities] = Capabilities(max_images=1, modes=("fast",), fast_tokens=16, cross_image=False)


@hookimpl
def register_formats(register):
    register("llama-guard-4", LlamaGuardFormat)
    register("llama-guard-3-vision", LlamaGuard3VisionFormat)


@hookimpl
def register_model_formats(register):
    register("meta-llama/Llama-Guard-4-12B", LlamaGuardFormat)
    register("meta-llama/Llama-Guard-3-11B-Vision", LlamaGuard3VisionFormat)
