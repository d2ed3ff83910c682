"""ShieldGemma 2 guard format: one forward pass per (image, policy), P(Yes) as the score.

ShieldGemma 2 answers "does the image violate this policy?" with ``Yes`` or ``No``. Its chat template
wraps a policy sentence into that question; this format sends the image and the sentence, one prompt
per policy: the model's policies (``dangerous``, ``sexual``, ``violence``) that the visguard policy's
categories translate to, plus a written policy for each category with no counterpart (ShieldGemma's
own custom-policy mechanism). The score is the softmax over the ``Yes`` / ``No`` logits at the last
position; the verdict's score is the highest over the policies and its category that policy's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

from visguard.core.policy import Policy
from visguard.core.taxonomy import SHIELDGEMMA, category_for, codes_for
from visguard.core.types import GuardRequest
from visguard.engine.format import Capabilities, CheckPlan, GuardFormat, GuardPrompt, ParsedOutput, PromptMode
from visguard.hookspecs import hookimpl


def policies(policy: Policy) -> list[tuple[str, str, str]]:
    """``[(key, category reported, policy sentence)]``: one prompt per entry."""
    codes, unmapped = codes_for(policy, "shieldgemma")
    out = [(code, category_for(code, "shieldgemma", policy), SHIELDGEMMA[code]) for code in codes]
    for cat in unmapped:
        what = cat.description.rstrip(".") if cat.description else f"{cat.name.lower()} content"
        out.append((cat.name, cat.name, f"No {cat.name} content: The image shall not contain content that shows or promotes {what}."))
    return out


class ShieldGemmaFormat(GuardFormat):
    """ShieldGemma 2: one image, one Yes/No question per policy, a score and no generation."""

    name = "shieldgemma2"
    capabilities: ClassVar[Capabilities] = Capabilities(
        min_images=1, max_images=1, text=False, responses=False, modes=("fast",), cross_image=False, shares_prefix=False,
    )
    verdict_prefix = ""
    verdict_words = {"unsafe": ("Yes",), "safe": ("No",)}

    def policy_prompts(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> list[GuardPrompt]:
        """One prompt per entry of :func:`policies`, in its order."""
        return [self.image_text_prompt(request, sentence, mode=mode) for _, _, sentence in policies(policy)]

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        """The first policy's prompt (a check runs every policy's: :meth:`plan`)."""
        return self.policy_prompts(request, policy, mode=mode, special_tokens=special_tokens)[0]

    def combine(self, scores: Sequence[float], policy: Policy) -> tuple[float, str | None]:
        """The highest score of :meth:`policy_prompts`' prompts and the category of its policy."""
        entries = policies(policy)
        best = max(range(len(scores)), key=scores.__getitem__)
        return scores[best], entries[best][1]

    def plan(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> CheckPlan:
        """Score one Yes/No question per policy; the verdict is the most certain one's."""
        prompts = self.policy_prompts(request, policy, mode=mode, special_tokens=special_tokens)
        return CheckPlan(request, tuple(prompts), combine=lambda scores: self.combine(scores, policy))

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        word = text.strip().split(None, 1)[0].strip(".,:;!").lower() if text.strip() else ""
        if word not in ("yes", "no"):
            return ParsedOutput(label=None, error="unparseable guard output: the answer does not start with Yes or No")
        return ParsedOutput(label="unsafe" if word == "yes" else "safe", verdict_offset=text.find(text.strip()[:1]))


@hookimpl
def register_formats(register):
    register("shieldgemma2", ShieldGemmaFormat)


@hookimpl
def register_model_formats(register):
    register("google/shieldgemma-2-4b-it", ShieldGemmaFormat)
