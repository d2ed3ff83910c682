"""Llama Guard 4 (and Llama Guard 3 Vision) guard format: MLCommons S-codes, ``safe`` / ``unsafe`` + codes.

The model's own chat template writes the task, the category list and the conversation; this format
only sends the conversation as typed parts (a plain string renders an empty conversation) plus, for a
policy other than the default, the template variables ``excluded_category_keys`` or ``categories``:

- The default policy runs the model's **stock policy**: no template variables, so the template's own
  list (S1-S14 for Llama Guard 4, S1-S13 for 3 Vision) is asked, exactly as Meta prompts it.
- Any other policy is translated conservatively (:func:`visguard.core.taxonomy.asked_codes`): a
  category named after an S-code (``"S5"``, ``"Defamation"``) asks for that native code; a visguard
  (MIS) category asks for every code of its row; S4 (child sexual exploitation) and S9 (indiscriminate
  weapons) stay unless the format's ``drop`` names them. Categories with no S-code are added as S15,
  S16 ... through ``categories``.

The answer is ``safe``, or ``unsafe`` and a line of comma-separated codes, reported by
:func:`~visguard.core.taxonomy.reported_category` (S4 as "Child Exploitation", never "Erotic"). The
template ends at the assistant header and the model often writes blank lines first, so fast mode
generates a few tokens, reads the verdict wherever it appears, and takes P(unsafe) from the verdict
word's first token (Meta's model card: threshold that probability); the policy's threshold decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from visguard.core.policy import Policy
from visguard.core.taxonomy import MLCOMMONS, asked_codes, is_stock, reported_category
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


def custom_codes(policy: Policy, drop: Iterable[str] = ()) -> dict[str, str]:
    """Codes S15, S16 ... given to the policy's categories that have no MLCommons code."""
    if is_stock(policy):
        return {}
    _, unmapped = asked_codes(policy, "mlcommons", drop=drop)
    return {f"S{_FIRST_CUSTOM + i}": cat.name for i, cat in enumerate(unmapped)}


def template_kwargs(policy: Policy, *, drop: Iterable[str] = ()) -> dict[str, Any]:
    """The chat-template variables that make the model check the policy's categories.

    Empty for the default policy (the template's own stock list); else ``excluded_category_keys``
    (every S-code not asked), or ``categories`` when the policy has categories without an S-code.
    """
    drop = tuple(drop)
    if is_stock(policy):  # the template's own list, less what ``drop`` names
        return {"excluded_category_keys": [c for c in MLCOMMONS if c in drop]} if drop else {}
    codes, unmapped = asked_codes(policy, "mlcommons", drop=drop)
    if not unmapped:
        return {"excluded_category_keys": [c for c in MLCOMMONS if c not in codes]}
    categories = {c: MLCOMMONS[c] for c in codes}
    for code, cat in zip(custom_codes(policy, drop), unmapped, strict=True):
        desc = f" {cat.description.rstrip('.')}." if cat.description else ""
        categories[code] = f"{cat.name}.{desc}"
    return {"categories": categories, "excluded_category_keys": []}


class LlamaGuardFormat(GuardFormat):
    """Llama Guard 4: text plus any number of images; judges requests and responses.

    Args:
        drop: S-codes never asked about, whatever the policy (the one way to leave out the severe
            codes S4 and S9, which removing a broad category keeps).
    """

    name = "llama-guard-4"
    capabilities: ClassVar[Capabilities] = Capabilities(modes=("fast",), fast_tokens=16)
    verdict_prefix = ""
    verdict_words = {"safe": ("safe",), "unsafe": ("unsafe",)}

    def __init__(self, *, drop: Iterable[str] = (), ignore_unread: bool = False) -> None:
        super().__init__(ignore_unread=ignore_unread)
        self.drop = tuple(str(c).strip().upper() for c in drop)

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
            template_kwargs=template_kwargs(policy, drop=self.drop),
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
        extra = custom_codes(policy, self.drop)
        names: list[str] = []
        for code in (c.strip() for c in rest.split(",")):
            if code:
                name = reported_category(code, "mlcommons", policy, extra)
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
