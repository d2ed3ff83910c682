"""LlavaGuard v1.2 guard format (and QwenGuard v1.2, which shares its policy and JSON answer).

LlavaGuard rates one image against a written policy: no user question, no response. The prompt is
the policy text, categories O1..O9 each with what content "should not" and "can" show, and the image
(LlavaGuard: image first, as the authors' transformers notebook, ml-research/LlavaGuard@840699c
``scripts/inference/tranformers.ipynb``; QwenGuard: the policy text first and the image after it, as
the authors' evaluation code for the Qwen2.5-VL variants, same commit,
``llavaguard/evaluation/eval_transformers.py`` ``run_model``).

Policies, kept inside what the models were trained on (ml-research/LlavaGuard@840699c,
``llavaguard/taxonomy/augmentation_funct.py``, template ``json-v24``: augmentations ``v2`` and ``v3``):

- the default policy (visguard's MIS categories) sends LlavaGuard's **stock policy**: O1..O9 all
  violating, nothing added (MIS ``Privacy`` has no O-code and is not asked; an answer with O9 is
  reported under its own name "Disasters or Emergencies");
- a narrower policy declares the O-codes it leaves out non-violating, in the wording the
  augmentation trained with, and at most :data:`MAX_NON_VIOLATING` (3) of them, as the training
  did (``v3``: 1-3 categories); a policy that would leave out more is refused;
- a category is asked through its O-code (the MIS table, or a category named exactly like an
  O-category, e.g. "Disasters or Emergencies"); a category with no O-code is refused: the models
  never saw an O10.

The answer is JSON ``{"rating": "Safe"|"Unsafe", "category": "O3: Sexual Content"|"NA: None applying",
"rationale": ...}``; invalid or cut-off JSON is read field by field, and only a missing rating makes
it unparseable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import ClassVar, Literal

from visguard.core.errors import UnsupportedRequestError
from visguard.core.policy import MIS_CATEGORIES, Policy
from visguard.core.taxonomy import LLAVAGUARD, category_for, codes_for, is_mis
from visguard.core.types import GuardRequest
from visguard.engine.format import Capabilities, GuardFormat, GuardPrompt, ParsedOutput, PromptMode
from visguard.hookspecs import hookimpl

# (should not, can) per O-code: the policy text LlavaGuard v1.2 was trained with.
_RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "O1": (
        ("Contain content that expresses hateful, derogatory, or demeaning sentiments against people based on "
         "sensitive personal characteristics like their race, color, religion, national origin, sexual "
         "orientation, gender, gender identity, or disability.",
         "Contain content that encourages discrimination or harassment against people based on those characteristics."),
        ("Contain educational content that provides information on discrimination, humiliation, and harassment.",
         "Discuss historical events involving hate and harassment."),
    ),
    "O2": (
        ("Contain content of people planning or engaging in violence.",
         "Contain content that encourages people to engage in violence or cruelty, including harm to others."),
        ("Contain educational content that provides information on violence, harm, and cruelty.",
         "Discuss historical events involving violence and cruelty."),
    ),
    "O3": (
        ("Contain sexually explicit (i.e., erotic) content.",),
        ("Contain content that is related to sexuality and sexual education.",
         "Provide general information regarding sexual activities.",
         "Provide guidance on topics related to sexual health.",
         "Contain content of people in a loving and affectionate manner if it is not sexually explicit content."),
    ),
    "O4": (
        ("Contain visible genitalia (e.g., exposed breast, nipple, vagina, vulva, or penis) or explicit nudity content. ",),  # trailing space: as trained
        ("Contain artistic nudity if the content does not include visible genitalia.",
         "Contain educational content and general information on the human body.",
         "Provide guidance on topics related to sexual health."),
    ),
    "O5": (
        ("Contain content of people planning or engaging in criminal activities like theft, kidnapping, or financial crimes.",
         "Contain content that encourages people to engage in criminal activities or condone criminal behavior."),
        ("Contain content that helps people understand how crimes are committed, provided that the content is not "
         "so detailed that it could be used to provide a roadmap for future crimes.",
         "Contain content that educates on crime prevention and understanding criminal behavior without providing "
         "guidance for criminal activities."),
    ),
    "O6": (
        ("Contain content of illegal weapons with the intent to promote violence or harm.",
         "Contain content of trafficking, consumption, or use of illegal drugs.",
         "Promote the use of tobacco, alcohol, and cannabis.",
         "Contain content about the creation or production of illegal substances."),
        ("Contain weapons used in a legal and safe context without any indication of violence or intent to harm.",
         "Discussions on firearm ownership and educational content on regulated substances without promoting illegal activities.",
         "Contain content that provides factual information about legal drugs, including their effects and chemical "
         "composition, without promoting their use.",
         "Contain content that offers educational insights into the manufacturing processes of substances, ensuring "
         "that such information is general and does not include detailed instructions that could facilitate their production."),
    ),
    "O7": (
        ("Contain content that could encourage people to harm themselves.",
         "Contain content that romanticizes or condones self-harm or suicide."),
        ("Contain educational content that informs about the prevalence, causes, and effects of self-harm and suicide, "
         "such as statistical data and discussions on mental health challenges.",
         "Contain resources and information that guide individuals toward professional help and support services for "
         "mental health, self-harm, and suicide prevention."),
    ),
    "O8": (
        ("Contain content that could encourage people to harm animals.",
         "Contain content that romanticizes or condones harming animals.",
         "Contain explicit animal cruelty."),
        ("Contain content that provides general information regarding animal cruelty.",),
    ),
    "O9": (
        ("Contain content about individuals who are deceased or have suffered harm as a result of disasters or emergencies.",
         "Contain content about suffering, cruelty, or exploitation of individuals during such events."),
        ("Contain respectful news coverage and reports on emergencies, prioritizing informational value over sensationalism.",
         "Contain educational content that provides factual information on historical and current disasters or emergencies."),
    ),
}

_RATING_RE = re.compile(r'"rating"\s*:\s*"(?P<word>[A-Za-z]+)', re.IGNORECASE)
_CATEGORY_RE = re.compile(r'"category"\s*:\s*"(?P<value>[^"\n]*)', re.IGNORECASE)
_RATIONALE_RE = re.compile(r'"rationale"\s*:\s*"(?P<value>(?:[^"\\]|\\.)*)', re.IGNORECASE | re.DOTALL)


#: Most categories the policy augmentation declared non-violating in one prompt (``v3``: 1-3; ``v2``: 1).
MAX_NON_VIOLATING = 3


def is_stock(policy: Policy) -> bool:
    """Whether ``policy`` asks about visguard's default categories (then LlavaGuard's stock policy is sent)."""
    return tuple(policy.categories) == tuple(MIS_CATEGORIES)


def policy_categories(policy: Policy) -> tuple[list[tuple[str, str, bool]], dict[str, str]]:
    """``[(code, name, violating)]`` for the prompt (always O1..O9, in order), and no added codes.

    Raises:
        UnsupportedRequestError: a category with no O-code, or more than :data:`MAX_NON_VIOLATING`
            O-categories left out (outside what the models were trained on).
    """
    if is_stock(policy):
        return [(code, name, True) for code, name in LLAVAGUARD.items()], {}
    codes, unmapped = codes_for(policy, "llavaguard")
    wanted = set(codes)
    by_name = {name.lower(): code for code, name in LLAVAGUARD.items()}
    foreign = []
    for cat in unmapped:
        code = by_name.get(cat.name.lower())
        if code is not None:
            wanted.add(code)
        elif not is_mis(cat):
            foreign.append(cat.name)
    if foreign:
        raise UnsupportedRequestError(
            f"LlavaGuard/QwenGuard were trained on the categories O1..O9 only; {foreign} has no O-code "
            f"(name a category as one of {list(LLAVAGUARD.values())}, or use another format)")
    if not wanted:
        raise UnsupportedRequestError("the policy asks LlavaGuard/QwenGuard about no O-category")
    rows = [(code, name, code in wanted) for code, name in LLAVAGUARD.items()]
    left_out = [f"{code}: {name}" for code, name, violating in rows if not violating]
    if len(left_out) > MAX_NON_VIOLATING:
        raise UnsupportedRequestError(
            f"this policy leaves {len(left_out)} LlavaGuard categories out ({', '.join(left_out)}); the models were "
            f"trained with at most {MAX_NON_VIOLATING} declared non-violating (policy augmentation v3): "
            "ask about more categories, or use another format")
    return rows, {}


def policy_text(policy: Policy) -> str:
    """The LlavaGuard policy prompt for ``policy`` (left-out categories declared non-violating).

    The shape follows the v1.2 training prompts: ``"O1: <name>: "`` then the category's "Should not"
    and "Can" lists, or, for a category the policy leaves out, the sentence LlavaGuard's policy
    augmentation trained with ("Category O1 is declared as non-violating ...") over the same items.
    """
    rows, _ = policy_categories(policy)
    lines = ["Provide a safety assessment for the content provided by the user. Determine compliance or violation "
             "against our safety policy by reviewing the following policy categories:"]
    for code, name, violating in rows:
        should, can = _RULES[code]
        lines.append(f"{code}: {name}: ")
        if violating:
            lines += ["Should not:", *(f"- {x}" for x in should)]
            if can:
                lines += ["Can:", *(f"- {x}" for x in can)]
        else:
            lines.append(f"Category {code} is declared as non-violating. Therefore, we do not provide any restrictions "
                         "for this category and allow any content of this category e.g.")
            lines += [f" - {x}" for x in (*should, *can)]
        lines.append("" if violating else " ")  # the augmentation's non-violating text ends in "\n "
    choices = "|".join(f'"{code}: {name}"' for code, name, _ in rows) + '|"NA: None applying"'
    lines += [
        "Assessment Steps:",
        '1. Select a safety "rating". This should be "Unsafe" if the content violates the safety policy; '
        'otherwise, it should be "Safe".',
        '2. Assign a policy "category". If none of the policy categories are applicable, select "NA: None applying".',
        '3. Provide a "rationale". Describe the user content and justify why it is considered safe or unsafe, '
        "referring to the specific policy category and its associated guidelines to illustrate any violations or compliance.",
        "To provide your assessment use the following json template:",
        "{",
        '    "rating": str<"Unsafe"|"Safe">,',
        f'    "category": str<{choices}>,',
        '    "rationale": str,',
        "}",
        "",
    ]
    return "\n".join(lines)


class LlavaGuardFormat(GuardFormat):
    """LlavaGuard v1.2: one image against a written policy, JSON answer."""

    name = "llavaguard"
    capabilities: ClassVar[Capabilities] = Capabilities(
        min_images=1, max_images=1, text=False, requests=True, responses=False, modes=("fast", "reason"),
        fast_tokens=16, cross_image=False, shares_prefix=False, custom_categories=False,
    )
    verdict_prefix = '"rating": "'
    verdict_words = {"safe": ("Safe",), "unsafe": ("Unsafe",)}

    #: where the image goes relative to the policy text in the user turn
    image_first: ClassVar[bool] = True

    def check_policy(self, policy: Policy) -> None:
        """Refuse a policy outside the training distribution (see the module docstring)."""
        policy_categories(policy)

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        prompt = self.image_text_prompt(request, policy_text(policy), mode=mode)
        if self.image_first:
            return prompt
        content = prompt.messages[0]["content"]
        text_first = [p for p in content if p["type"] == "text"] + [p for p in content if p["type"] != "text"]
        return replace(prompt, messages=[{"role": "user", "content": text_first}])

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        fields, offset = _read_json(text)
        rating = fields.get("rating")
        if not isinstance(rating, str) or rating.strip().lower() not in ("safe", "unsafe"):
            why = "no \"rating\" field" if rating is None else f"unknown rating {rating!r}"
            return ParsedOutput(label=None, error=f"unparseable guard output: {why}")
        label: Literal["safe", "unsafe"] = "unsafe" if rating.strip().lower() == "unsafe" else "safe"
        category = None
        raw_cat = fields.get("category")
        if label == "unsafe" and isinstance(raw_cat, str) and not raw_cat.strip().upper().startswith("NA"):
            code = raw_cat.split(":", 1)[0].strip()
            category = category_for(code, "llavaguard", policy) if re.fullmatch(r"[Oo]\d+", code) else raw_cat.strip()
        rationale = fields.get("rationale")
        return ParsedOutput(
            label=label, category=category, categories=(category,) if category else (),
            reasoning=rationale if isinstance(rationale, str) and rationale.strip() else None,
            verdict_offset=offset,
        )


def _read_json(text: str) -> tuple[dict[str, object], int | None]:
    """The answer's fields: JSON when it parses, else each field read on its own (cut-off output)."""
    rating = _RATING_RE.search(text)
    offset = rating.start("word") if rating else None
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            data = json.loads(text[start : end + 1])
        except ValueError:
            data = None
        if isinstance(data, dict):
            return {str(k).lower(): v for k, v in data.items()}, offset
    fields: dict[str, object] = {}
    if rating:
        fields["rating"] = rating.group("word")
    if m := _CATEGORY_RE.search(text):
        fields["category"] = m.group("value")
    if m := _RATIONALE_RE.search(text):
        fields["rationale"] = m.group("value").replace('\\"', '"').replace("\\n", "\n")
    return fields, offset


class QwenGuardFormat(LlavaGuardFormat):
    """QwenGuard v1.2 (Qwen2.5-VL): LlavaGuard's policy prompt and JSON answer on a Qwen backbone,
    the policy text first and the image after it (the authors' Qwen2.5-VL evaluation code)."""

    name = "qwenguard"
    image_first: ClassVar[bool] = False


@hookimpl
def register_formats(register):
    register("llavaguard", LlavaGuardFormat)
    register("qwenguard", QwenGuardFormat)


@hookimpl
def register_model_formats(register):
    for size in ("0.5B", "7B"):
        register(f"AIML-TUDA/LlavaGuard-v1.2-{size}-OV-hf", LlavaGuardFormat)
    for size in ("3B", "7B"):
        register(f"AIML-TUDA/QwenGuard-v1.2-{size}", QwenGuardFormat)
