"""ShieldGemma 2 guard format: one forward pass per (image, policy), P(Yes) as the score.

ShieldGemma 2 answers "does the image violate this policy?" with ``Yes`` or ``No``. Its chat template
wraps a policy sentence into that question; this format sends the image and the sentence, one prompt
per policy: the model's three trained policies (``dangerous``, ``sexual``, ``violence``) that the
visguard policy's categories translate to; the default policy runs exactly those three, as the
stock model (MIS Hate and Privacy have no ShieldGemma policy and are not asked). A custom category
(outside the MIS taxonomy) adds a written policy sentence (ShieldGemma's own custom-policy
mechanism, which the model was not trained on: opt-in). The score is the softmax over the ``Yes`` /
``No`` logits at the last position; the verdict's score is the highest over the policies and its
category that policy's.

The policy-expert question is written by the checkpoint's chat template (transformers'
``ShieldGemma2Processor`` template, huggingface/transformers@f43c651
``src/transformers/models/shieldgemma2/convert_shieldgemma2_weights_orbax_to_hf.py`` ``_CHAT_TEMPLATE``).
A checkpoint re-saved with another template (e.g. plain Gemma 3's) would get the bare policy
sentence: :meth:`ShieldGemmaFormat.check_backend` renders a probe and refuses such a backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

from visguard.core.errors import BackendError
from visguard.core.policy import Policy
from visguard.core.taxonomy import SHIELDGEMMA, category_for, codes_for, is_mis
from visguard.core.types import GuardRequest
from visguard.engine.format import Capabilities, CheckPlan, GuardFormat, GuardPrompt, ParsedOutput, PromptMode
from visguard.hookspecs import hookimpl


def policies(policy: Policy) -> list[tuple[str, str, str]]:
    """``[(key, category reported, policy sentence)]``: one prompt per entry."""
    codes, unmapped = codes_for(policy, "shieldgemma")
    out = [(code, category_for(code, "shieldgemma", policy), SHIELDGEMMA[code]) for code in codes]
    for cat in (c for c in unmapped if not is_mis(c)):  # MIS Hate / Privacy: no trained policy, not asked
        what = cat.description.rstrip(".") if cat.description else f"{cat.name.lower()} content"
        out.append((cat.name, cat.name, f"No {cat.name} content: The image shall not contain content that shows or promotes {what}."))
    return out


#: Text the policy-expert template writes around the policy sentence (transformers' ShieldGemma 2
#: chat template, see the module docstring; compared with whitespace collapsed, as that template
#: leaves its source's line breaks and indentation in the text); a template without it is refused.
EXPERT_MARKERS = (
    "You are a policy expert trying to help determine whether a generated or real image is in violation",
    "Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'.",
)
_PROBE = "visguard probe policy sentence"


def check_template(rendered: str) -> None:
    """Raise unless ``rendered`` (the probe policy through the chat template) is the policy-expert prompt.

    Raises:
        BackendError: the template lost the policy-expert question (e.g. re-saved as plain Gemma 3).
    """
    flat = " ".join(rendered.split())
    wrapped = f"<BEGIN_SAFETY_POLICY> {_PROBE} </END_SAFETY_POLICY>" in flat
    if not wrapped or any(" ".join(m.split()) not in flat for m in EXPERT_MARKERS):
        raise BackendError(
            "this checkpoint's chat template is not ShieldGemma 2's policy-expert template (the policy "
            "sentence is not wrapped into 'Does the image violate the above policy?'); restore the "
            "chat template of google/shieldgemma-2-4b-it before using format shieldgemma2")


class ShieldGemmaFormat(GuardFormat):
    """ShieldGemma 2: one image, one Yes/No question per policy, a score and no generation."""

    name = "shieldgemma2"
    capabilities: ClassVar[Capabilities] = Capabilities(
        min_images=1, max_images=1, text=False, responses=False, modes=("fast",), cross_image=False, shares_prefix=False,
    )
    verdict_prefix = ""
    verdict_words = {"unsafe": ("Yes",), "safe": ("No",)}

    def check_backend(self, backend: object) -> None:
        """Refuse a backend whose chat template is not the policy-expert one (where it can render)."""
        from PIL import Image

        render = getattr(backend, "render", None)
        if not callable(render):  # the vLLM backend renders through its HF prompt codec
            render = getattr(getattr(backend, "codec", None), "render", None)
        if not callable(render):
            return  # a remote server renders its own template: nothing to probe here
        probe = GuardPrompt(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE}]}],
                            images=[Image.new("RGB", (28, 28))], verdict_prefix=self.verdict_prefix,
                            verdict_words=dict(self.verdict_words), mode="fast")
        check_template(render(probe))

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
