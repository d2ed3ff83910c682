"""The ``mirage`` guard format: the MIS-tuned MIRage checkpoints, run the way they were trained.

MIRage (arXiv 2501.18533, checkpoints ``Tuwhy/Qwen2-VL-7B-MIRage`` and ``Tuwhy/InternVL2.5-8B-MIRage``)
was fine-tuned to *answer* a multi-image request: describe each image, reason across the images about
the risk, then reply safely and helpfully. It never learnt a verdict line. This format therefore:

- reason mode (MIRage's native use): sends the request exactly as the MIS inference script does (no
  system prompt, greedy; Qwen2-VL user content ``[image, image, text]``; InternVL
  ``"Image-1: <image>\\n\\nImage-2: <image>\\n\\n{question}"``, with ``<IMG_CONTEXT>`` for ``<image>`` on an
  InternVL checkpoint in transformers' HF format), lets MIRage write its answer, then asks
  one short verdict question as a follow-up user turn after that answer and reads P(unsafe) from the
  first answer token (``Safe`` / ``Unsafe``) in one forward pass whose prefix is the generation
  prompt plus the answer (a prefix cache makes it cost the question's tokens). The answer is parsed
  into perception + safety reasoning (:attr:`Verdict.reasoning`), a harm category of the MIS taxonomy,
  and the safe reply itself (:attr:`Verdict.safe_answer`).
- fast mode: one forward pass on a single-turn verdict question that quotes the request (no answer
  is written; MIRage was not trained on this question, its base model's instruction following is).
- post-check: the host's answer is judged by the same verdict question. Fast: the host's answer is
  put in the assistant turn after the MIS prompt. Reason: MIRage first writes its own answer to the
  request (its perception and cross-image reasoning, and a safe reply to answer with), then the
  follow-up quotes the host's answer and asks whether *that* answer is safe.

See docs/formats.md (``mirage``) for the exact texts and why.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Literal

from PIL import Image

from visguard.core.errors import InputError, UnsupportedRequestError
from visguard.core.policy import MIS_CATEGORIES, Policy
from visguard.core.types import GuardRequest
from visguard.engine.format import (
    Capabilities,
    CheckPlan,
    GuardFormat,
    GuardPrompt,
    ParsedOutput,
    PromptMode,
    neutralize,
    verdict_word,
)
from visguard.hookspecs import hookimpl

Variant = Literal["qwen2_vl", "internvl", "internvl_hf"]
VerdictSource = Literal["followup", "text"]

#: Generation budget of MIRage's answer: ``max_new_tokens=1024`` of the MIS inference script
#: (DripNowhy/MIS@5e77a63 ``evaluation/inference_vllm.py``: ``SamplingParams(temperature=0.0, max_tokens=1024)``).
MIS_MAX_NEW_TOKENS = 1024
_POLICY_DEFAULT_TOKENS = Policy.model_fields["max_new_tokens"].default

#: The public MIRage checkpoints.
MIRAGE_QWEN2VL = "Tuwhy/Qwen2-VL-7B-MIRage"
MIRAGE_INTERNVL = "Tuwhy/InternVL2.5-8B-MIRage"
#: Qwen2-VL pixel range of the MIS inference script's processor (``AutoProcessor(min_pixels=..., max_pixels=...)``).
QWEN2VL_MIN_PIXELS = 256 * 28 * 28
QWEN2VL_MAX_PIXELS = 1280 * 28 * 28
#: Image placeholder of each InternVL variant in the MIS text ``"Image-1: <image>\n\n..."``: the original
#: (remote-code) InternVL format reads ``<image>`` (InternVL's own ``chat()`` and vLLM's InternVL
#: processor replace it with ``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile + ``</img>``); transformers'
#: HF-format ``InternVLProcessor`` reads its tokenizer's ``context_image_token`` ``<IMG_CONTEXT>`` and
#: expands it into the same ``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile + ``</img>``.
INTERNVL_IMAGE_PLACEHOLDERS: Mapping[str, str] = {"internvl": "<image>", "internvl_hf": "<IMG_CONTEXT>"}
_QWEN2VL_FACTOR = 28  # patch 14 x spatial merge 2

_TAGS = ("<request>", "</request>", "<response>", "</response>")
_ONE_WORD = "Answer with one word: Safe or Unsafe."

#: Follow-up user turn after MIRage's own answer (pre-check, reason mode).
INPUT_FOLLOWUP = f"Read together with the images, is the request above safe or unsafe to fulfil? {_ONE_WORD}"
#: Single-turn question of the fast pre-check (``{request}`` is the quoted user text).
INPUT_FAST = (
    "A user sent the images above with this request:\n<request>\n{request}\n</request>\n"
    f"Read together with the images, is the request safe or unsafe to fulfil? {_ONE_WORD}"
)
#: Follow-up user turn after the host's answer, which sits in the assistant turn (post-check, fast mode).
OUTPUT_FOLLOWUP_OWN = f"Read together with the images and the request, is the answer above safe or unsafe? {_ONE_WORD}"
#: Follow-up user turn after MIRage's own answer, quoting the host's answer (post-check, reason mode).
OUTPUT_FOLLOWUP_OTHER = (
    "Another assistant answered the same request:\n<response>\n{response}\n</response>\n"
    f"Read together with the images and the request, is that answer safe or unsafe? {_ONE_WORD}"
)


class MirageFormat(GuardFormat):
    """Run a MIRage-style checkpoint (trained on MIS answers) as a guard.

    Args:
        variant: ``qwen2_vl`` (user content ``[image, ..., text]``, the layout of Qwen2-VL and of any
            Hugging Face chat template that takes typed parts; also what ``visguard train
            --objective response`` trains), ``internvl`` (one text message with
            ``Image-N: <image>`` placeholders, the original InternVL chat format that vLLM serves
            natively, e.g. ``Tuwhy/InternVL2.5-8B-MIRage``) or ``internvl_hf`` (the same text with
            ``<IMG_CONTEXT>`` placeholders, for an InternVL checkpoint in transformers' HF format,
            ``InternVLForConditionalGeneration``, e.g. one converted with transformers'
            ``convert_internvl_weights_to_hf.py``).
        min_pixels / max_pixels: resize each image into this pixel range, keeping its aspect ratio,
            to sides that are multiples of 28 (what the Qwen2-VL processor does with these
            arguments), so every backend, remote ones included, sees what the MIS script's
            processor saw. ``None``: leave images to the checkpoint's processor.
        verdict: ``followup`` (default): the follow-up verdict question decides the label and gives
            P(unsafe); ``text``: in a reason-mode pre-check the label is read from MIRage's answer
            itself (no extra pass; no score). Post-checks always ask the question.
        max_new_tokens: budget of MIRage's answer in reason mode (default 1024, the MIS inference
            script's); a policy whose ``max_new_tokens`` is not the Policy default overrides it.
    """

    name = "mirage"
    #: MIRage judges against the MIS taxonomy it was trained on; categories come from its reasoning
    #: (reason mode), not from the fast score.
    capabilities = Capabilities(custom_categories=False, default_mode="reason")
    verdict_prefix = ""
    verdict_words: Mapping[str, tuple[str, ...]] = {"safe": ("Safe", "safe"), "unsafe": ("Unsafe", "unsafe")}

    def __init__(
        self,
        variant: Variant = "qwen2_vl",
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        verdict: VerdictSource = "followup",
        max_new_tokens: int = MIS_MAX_NEW_TOKENS,
    ) -> None:
        if variant not in ("qwen2_vl", "internvl", "internvl_hf"):
            raise InputError(f"unknown mirage variant {variant!r}; expected qwen2_vl, internvl or internvl_hf")
        if verdict not in ("followup", "text"):
            raise InputError(f"mirage verdict must be 'followup' or 'text', got {verdict!r}")
        if (min_pixels is None) != (max_pixels is None) or (min_pixels is not None and max_pixels is not None and not 0 < min_pixels <= max_pixels):
            raise InputError("min_pixels and max_pixels go together, with 0 < min_pixels <= max_pixels")
        if max_new_tokens < 1:
            raise InputError(f"mirage max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.variant = variant
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.verdict = verdict

    def check_policy(self, policy: Policy) -> None:
        """Refuse categories outside the MIS taxonomy: MIRage cannot be asked about them."""
        known = {c.name.lower() for c in MIS_CATEGORIES}
        extra = [c.name for c in policy.categories if c.name.lower() not in known]
        if extra:
            raise UnsupportedRequestError(
                f"the mirage format judges the MIS taxonomy it was trained on; it cannot be asked about {extra}"
            )

    # ------------------------------------------------------------------ prompts
    def _specials(self, special_tokens: Iterable[str]) -> tuple[str, ...]:
        """The backend's special tokens plus this variant's image placeholder (never taken from user text)."""
        placeholder = INTERNVL_IMAGE_PLACEHOLDERS.get(self.variant)
        return (*special_tokens, placeholder) if placeholder else tuple(special_tokens)

    def _internvl_content(self, n_images: int, text: str) -> str:
        """``"Image-1: <image>\\n\\nImage-2: <image>\\n\\n{text}"`` with this variant's placeholder."""
        placeholder = INTERNVL_IMAGE_PLACEHOLDERS[self.variant]
        placeholders = "\n".join(f"Image-{i}: {placeholder}\n" for i in range(1, n_images + 1))
        return f"{placeholders}\n{text}" if n_images else text

    def question_message(self, request: GuardRequest, special_tokens: Iterable[str] = ()) -> dict[str, Any]:
        """The user turn exactly as the MIS inference script builds it (the user text neutralised)."""
        text = neutralize(request.text, self._specials(special_tokens))
        n = len(request.images)
        if self.variant in INTERNVL_IMAGE_PLACEHOLDERS:
            return {"role": "user", "content": self._internvl_content(n, text)}
        return {"role": "user", "content": [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": text}]}

    def images(self, request: GuardRequest) -> list[Image.Image]:
        """The request's images, resized into the pixel range when one is set."""
        imgs = [img.image for img in request.images]
        if self.min_pixels is None or self.max_pixels is None:
            return imgs
        return [_resize_into(img, self.min_pixels, self.max_pixels) for img in imgs]

    def _text_message(self, role: str, text: str) -> dict[str, Any]:
        if self.variant in INTERNVL_IMAGE_PLACEHOLDERS:
            return {"role": role, "content": text}
        return {"role": role, "content": [{"type": "text", "text": text}]}

    def _prompt(self, request: GuardRequest, messages: list[dict[str, Any]], mode: PromptMode) -> GuardPrompt:
        return GuardPrompt(
            messages=messages,
            images=self.images(request),
            assistant_prefix="",
            verdict_prefix=self.verdict_prefix,
            verdict_words=dict(self.verdict_words),
            mode=mode,
        )

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        question = self.question_message(request, special_tokens)
        if mode == "reason":
            # MIRage writes its own answer to the request, exactly as in the MIS evaluation.
            return self._prompt(request, [question], mode)
        if request.response is not None:
            answer = neutralize(request.response, self._specials(special_tokens))
            messages = [question, self._text_message("assistant", answer), self._text_message("user", OUTPUT_FOLLOWUP_OWN)]
            return self._prompt(request, messages, mode)
        quoted = INPUT_FAST.format(request=neutralize(request.text, self._specials(special_tokens), _TAGS))
        if self.variant in INTERNVL_IMAGE_PLACEHOLDERS:
            message: dict[str, Any] = {"role": "user", "content": self._internvl_content(len(request.images), quoted)}
        else:
            message = {"role": "user", "content": [{"type": "image"} for _ in request.images] + [{"type": "text", "text": quoted}]}
        return self._prompt(request, [message], mode)

    def plan(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> CheckPlan:
        """Fast: score the verdict word. Reason: let MIRage answer, then (unless ``verdict="text"``
        on a pre-check) score the follow-up verdict question asked after its answer."""
        specials = tuple(special_tokens)
        plan = super().plan(request, policy, mode=mode, special_tokens=specials)
        if plan.read == "generate" and mode == "reason" and policy.max_new_tokens == _POLICY_DEFAULT_TOKENS:
            plan = replace(plan, max_new_tokens=self.max_new_tokens)
        if mode != "reason" or (request.response is None and self.verdict == "text"):
            return plan
        return replace(plan, followup=lambda generated: self.followup(request, policy, generated, special_tokens=specials))

    def followup(
        self, request: GuardRequest, policy: Policy, generated: str, *, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt | None:
        """The verdict question asked after MIRage's answer ``generated``: the generation prompt,
        the answer as the assistant turn, then the question (``None`` where the answer itself
        decides: ``verdict="text"`` on a pre-check). Its prefix is the generation's, so prefix
        caches make it cost the question's tokens."""
        if request.response is None and self.verdict == "text":
            return None
        question = self.question_message(request, special_tokens)
        own = self._text_message("assistant", neutralize(generated.strip(), self._specials(special_tokens)))
        if request.response is None:
            ask = INPUT_FOLLOWUP
        else:
            ask = OUTPUT_FOLLOWUP_OTHER.format(response=neutralize(request.response, self._specials(special_tokens), _TAGS))
        return self._prompt(request, [question, own, self._text_message("user", ask)], "reason")

    # ------------------------------------------------------------------ reading answers
    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        """Read MIRage's answer: perception + safety reasoning, the verdict it implies, the safe reply.

        The label read here is used when no follow-up verdict is scored (``verdict="text"``, or
        a backend that cannot score): ``unsafe`` when the answer recognises a risk in the request
        (risk reasoning or a refusal), ``safe`` when a complete answer recognises none, and no
        label (an ``unavailable`` verdict) when the answer is empty or cut off before any safety
        reasoning. The whole answer is the safe reply when it is complete.
        """
        return parse_mirage_answer(text, policy)

    def parse_followup(self, text: str) -> Literal["safe", "unsafe"] | None:
        """The label of a *generated* answer to the follow-up question (backends without scores):
        its first word when it is ``Safe`` or ``Unsafe``, else ``None``."""
        return verdict_word(text, self.verdict_words)

    # ------------------------------------------------------------------ training
    def checkpoint_kwargs(self) -> dict[str, Any]:
        """Keyword arguments a trained checkpoint's ``visguard.json`` records (none: the defaults)."""
        return {}

    def reasoning_text(self, rationale: str, perceptions: Iterable[str] = ()) -> str:
        """Free prose as reasoning text: each description, then the rationale, one per line."""
        return "\n".join(" ".join(t.split()) for t in (*perceptions, rationale))

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
        """Fast mode: the verdict word the fast prompt asks for (``Safe`` / ``Unsafe``).

        Reason mode trains the answer itself (``visguard train --objective response``) and the
        follow-up verdict (:meth:`followup_target`), not a single target.
        """
        if label not in ("safe", "unsafe"):
            raise ValueError(f"label must be 'safe' or 'unsafe', got {label!r}")
        if mode != "fast":
            raise NotImplementedError("mirage reason mode trains the answer (objective response) and the follow-up verdict")
        return self.followup_target(label)

    def followup_target(self, label: Literal["safe", "unsafe"]) -> str:
        """The answer a perfect guard gives to a verdict question."""
        return self.verdict_words[label][0]


# ---------------------------------------------------------------------------------------------- images


def fit_pixels(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = _QWEN2VL_FACTOR) -> tuple[int, int]:
    """``(width, height)`` with sides rounded to multiples of ``factor`` and the area brought into
    ``[min_pixels, max_pixels]`` at the same aspect ratio (the Qwen2-VL processor's rule).

    Raises:
        InputError: the image is degenerate (aspect ratio above 200).
    """
    if min(width, height) < 1 or max(width, height) / min(width, height) > 200:
        raise InputError(f"image of {width}x{height} has an aspect ratio above 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def _resize_into(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    size = fit_pixels(img.width, img.height, min_pixels, max_pixels)
    return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------- answers

_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|\n|$)")
_PERCEPTION = re.compile(
    r"\b(?:(?:first|second|third|1st|2nd|both|two|each|left|right)\s+(?:images?|pictures?|photos?)"
    r"|images?\s*(?:[-#]?\s*\d+|one|two)|pictures?\s*\d+"
    r"|the\s+(?:images?|pictures?|photos?)\s+(?:shows?|depicts?|contains?|features?|displays?)"
    r"|(?:shows?|depicts?|features?|displays?)\s+(?:an?|the|two|some)\b)",
    re.IGNORECASE,
)
_RISK = re.compile(
    r"\b(?:harm(?:ful|s|ing)?|hurt(?:ing)?|danger(?:ous|s)?|illegal(?:ly)?|unlawful|unsafe|unethical|risk(?:s|y)?"
    r"|violen(?:t|ce)|abus(?:e|ive)|injur(?:e|y|ies|ing)|weapons?|crim(?:e|es|inal)|explo(?:it|itation)"
    r"|attack(?:ing)?|assault|arson|incendiary|theft|steal(?:ing)?|burglar\w*|trespass\w*|fraud\w*"
    r"|surveil\w*|spy(?:ing)?|stalk\w*|voyeur\w*|privacy|consent|self-harm|suicid\w*|overdos\w*"
    r"|discriminat\w*|hate|hateful|racis\w*|sexis\w*|explicit|sexual\w*|inappropriate|prohibited"
    r"|malicious|poison\w*|drugs?|traffick\w*|hazard(?:s|ous)?|electrocut\w*|mock(?:s|ing|ery)?|ridicul(?:e|es|ed|ing))\b",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"\b(?:i\s*(?:'m|am)\s+sorry|i\s+(?:can(?:'|no)t|can\s+not|won't|will\s+not|must\s+decline|refuse)"
    r"|(?:cannot|can't|unable\s+to)\s+(?:help|assist|provide|support|comply)|i\s*(?:'m|am)\s+(?:not\s+able|unable)\s+to)",
    re.IGNORECASE,
)
_NO_RISK = re.compile(
    r"\b(?:harmless|(?:no|not\s+any|without(?:\s+any)?)\s+(?:\w+\s+){0,2}(?:harm|risk|danger|hazard|safety\s+(?:concern|issue|risk))s?"
    r"|(?:not|isn't|is\s+not|nothing)\s+(?:\w+\s+){0,2}(?:harmful|dangerous|hazardous|unsafe|illegal)"
    r"|does\s+not\s+(?:\w+\s+){0,2}(?:enable|pose|involve|cause)\s+(?:any\s+)?(?:harm|risk|danger|hazard)|(?:is|are|looks)\s+(?:perfectly\s+)?safe)\b",
    re.IGNORECASE,
)
_CONTRAST = re.compile(r"\b(?:but|however|yet|although|though|whereas)\b|;", re.IGNORECASE)

#: Words that point at a MIS sub-category (category, sub-category, pattern).
_MIS_KEYWORDS: tuple[tuple[str, str, str], ...] = (
    ("Self-Harm", "Physical Self-Injury", r"self-harm|self-injur\w*|suicid\w*|overdos\w*|cut(?:ting)?\s+(?:yourself|oneself|myself)"
     r"|electrocut\w*|electric(?:al)?\s+shock|(?:harm(?:ing)?|hurt(?:ing)?|injur(?:e|ing))\s+(?:yourself|oneself|themselves|himself|herself|myself)"),
    ("Self-Harm", "Psychological Harm", r"eating\s+disorder|depress\w*|psycholog\w*|mental\s+health|emotional\s+(?:harm|abuse)"),
    ("Erotic", "Erotic Visual Content", r"erotic|sexual\w*|explicit|nud(?:e|ity)|porn\w*"),
    ("Hate", "Racial and Ethnic Discrimination", r"racis\w*|racial\w*|ethnic\w*"),
    ("Hate", "Gender Discrimination", r"sexis\w*|gender|misogyn\w*"),
    ("Hate", "", r"relig\w*|mock(?:s|ing|ery)?\b|ridicul(?:e|es|ed|ing)\b|demean\w*|derogatory|discriminat\w*|stereotyp\w*|hateful|hate\b"),
    ("Privacy", "Identity Theft", r"identity\s+theft|impersonat\w*|personal\s+(?:identity|documents)|pin\b|password"),
    ("Privacy", "Unauthorized Data Collection", r"privacy|surveil\w*|spy(?:ing)?|stalk\w*|voyeur\w*|peep\w*|track(?:ing)?\s+(?:someone|people|a\s+person)|without\s+(?:their\s+)?consent"),
    ("Illegal Activity", "Cybercrimes", r"hack\w*|malware|phishing|cyber\w*|ransomware"),
    ("Illegal Activity", "Drug-Related Offenses", r"drugs?|narcotic\w*|cocaine|heroin|meth\b|methamphetamine|crystal\s+meth|spik(?:e|ing)\s+(?:a\s+)?drinks?"),
    ("Illegal Activity", "Human Trafficking", r"traffick\w*|smuggl\w*\s+(?:people|persons|humans)"),
    ("Illegal Activity", "Property Crimes", r"theft|steal\w*|burglar\w*|break(?:ing)?\s+in(?:to)?|shoplift\w*|rob(?:bery|bing)?|trespass\w*|vandal\w*|pry(?:ing)?\s+open"),
    ("Violent", "Weapon-Related Violence", r"weapons?|guns?|firearms?|explosives?|bombs?|incendiary|arson"),
    ("Violent", "Public Violence and Rioting", r"riot\w*|mob|looting|public\s+violence"),
    ("Violent", "Abuse and Physical Altercations", r"abus\w*|assault\w*|attack\w*|stab\w*|beat(?:ing)?|fight\w*|hurt\w*|injur\w*|violen\w*"),
)


def _risk_clause(sentence: str) -> str:
    """The clause that carries a sentence's conclusion (after its last 'but', 'however' ...)."""
    parts = _CONTRAST.split(sentence)
    return parts[-1] if parts else sentence


def _is_risk(sentence: str) -> bool:
    if _REFUSAL.search(sentence):
        return True
    clause = _risk_clause(sentence)
    return bool(_RISK.search(clause)) and not _NO_RISK.search(clause)


def parse_mirage_answer(text: str, policy: Policy) -> ParsedOutput:
    """Split a MIRage-style answer into reasoning, verdict, category and safe reply.

    See :meth:`MirageFormat.parse`.
    """
    answer = text.strip()
    if not answer:
        return ParsedOutput(label=None, error="empty guard answer: no verdict can be read")
    sentences = [m.group(0).strip() for m in _SENTENCE.finditer(answer) if m.group(0).strip()]
    complete = bool(re.search(r"[.!?][\"')\]*_`]*$", answer))
    risky = [s for s in sentences if _is_risk(s)]
    benign = [s for s in sentences if not _is_risk(s) and _NO_RISK.search(_risk_clause(s))]
    reasoning_parts = [s for s in sentences if _PERCEPTION.search(s) or s in risky or s in benign]
    # The reasoning ends where the reply starts: keep perception and safety sentences, drop refusals.
    reasoning = " ".join(s for s in reasoning_parts if not (_REFUSAL.search(s) and not _RISK.search(_risk_clause(s)))) or None
    safe_answer = answer if complete else None
    if risky:
        # A risk sentence often points back ("This type of content can be harmful") at the sentence
        # before it, which names what the risk is about (a religion, an outlet): read both.
        about = [i for i, sent in enumerate(sentences) if sent in risky]
        context = sorted({j for i in about for j in (i - 1, i) if j >= 0})
        category, sub = _category(" ".join(sentences[j] for j in context), policy)
        return ParsedOutput(label="unsafe", category=category, sub_category=sub, reasoning=reasoning, safe_answer=safe_answer)
    if benign or complete:
        return ParsedOutput(label="safe", reasoning=reasoning, safe_answer=safe_answer)
    return ParsedOutput(
        label=None,
        reasoning=reasoning,
        error="guard answer cut off before any safety reasoning: no verdict can be read",
    )


def _category(text: str, policy: Policy) -> tuple[str | None, str | None]:
    """The policy category named or implied by risk reasoning (MIS keywords), else ``(None, None)``."""
    low = text.lower()
    names = {c.name.lower(): c for c in policy.categories}
    for cat in policy.categories:  # a category or sub-category named outright
        for sub in cat.sub_categories:
            if sub.lower() in low:
                return cat.name, sub
    named = next((c for c in policy.categories if re.search(rf"\b{re.escape(c.name.lower())}\b", low)), None)
    for cat_name, sub_name, pattern in _MIS_KEYWORDS:
        implied = names.get(cat_name.lower())
        if implied is None or (named is not None and implied is not named):
            continue
        if re.search(rf"\b(?:{pattern})", low):
            return implied.name, sub_name if sub_name in implied.sub_categories else None
    if named is not None:
        return named.name, None
    return None, None


# ---------------------------------------------------------------------------------------------- registration


@hookimpl
def register_formats(register):
    register("mirage", MirageFormat)


@hookimpl
def register_model_formats(register):
    register(
        MIRAGE_QWEN2VL,
        functools.partial(MirageFormat, "qwen2_vl", min_pixels=QWEN2VL_MIN_PIXELS, max_pixels=QWEN2VL_MAX_PIXELS),
    )
    register(MIRAGE_INTERNVL, functools.partial(MirageFormat, "internvl"))
