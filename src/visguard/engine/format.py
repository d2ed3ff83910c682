"""Guard formats: how a request becomes a guard prompt, and how the guard's output becomes a verdict.

A format is model-agnostic: it produces a :class:`GuardPrompt` (chat messages in the Hugging Face
"list of typed parts" shape, the images, and text that must follow the assistant header), and it
parses the text the guard *generated*. :meth:`GuardFormat.plan` puts both together into a
:class:`CheckPlan`, the one description of a check the guard executes. Backends render and run
prompts; they never interpret them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from PIL import Image

from visguard.core.errors import UnsupportedRequestError
from visguard.core.policy import Mode, Policy
from visguard.core.types import GuardRequest

PromptMode = Literal["fast", "reason"]


@dataclass(frozen=True)
class Capabilities:
    """What a guard format can judge; a request outside these gets :class:`UnsupportedRequestError`.

    Attributes:
        min_images / max_images: how many images one request may carry (``None``: no upper limit).
        text: whether the user's text is read. A format that does not read it refuses a request
            with text unless built with ``ignore_unread=True`` (the text is then knowingly dropped).
        images: whether images are read at all (``False``: a text guard; same rule as ``text``).
        requests: whether it judges a user's request (an input, pre-check).
        responses: whether it judges an assistant's response (an output, post-check).
        score: whether verdicts carry P(unsafe).
        categories: whether an unsafe verdict names a category.
        custom_categories: whether categories outside the model's own taxonomy can be asked for
            (through the model's own mechanism); ``False``: a policy that needs them is refused.
        modes: the modes it runs in (``reason`` needs a format that generates before its verdict).
        fast_tokens: fast mode generates this many tokens and reads the verdict from them instead
            of scoring the next token (``0``: the next token after the prompt is the verdict).
        shares_prefix: whether requests may share a cached prompt prefix (``False`` when the
            per-request content comes first, as in image-first classifier prompts).
        cross_image: whether several images are judged together (harm that only appears when they
            are combined), not each on its own.
        conversation: whether earlier turns (``GuardRequest.conversation``) reach the prompt; a
            format that does not use them refuses a request that has them (never ignores them).
        default_mode: the mode a policy that names none runs in: the one the model was trained
            to be read in (``None``: ``fast`` where the format can, else its first mode).
    """

    min_images: int = 0
    max_images: int | None = None
    text: bool = True
    images: bool = True
    requests: bool = True
    responses: bool = True
    score: bool = True
    categories: bool = True
    custom_categories: bool = True
    modes: tuple[Mode, ...] = ("fast", "reason", "adaptive")
    fast_tokens: int = 0
    shares_prefix: bool = True
    cross_image: bool = True
    conversation: bool = False
    default_mode: Mode | None = None

    def summary(self) -> str:
        """One line for ``visguard plugins`` and docs."""
        if not self.images:
            imgs = "no images"
        elif self.max_images is None:
            imgs = f"{self.min_images}+ images"
        elif self.min_images == self.max_images:
            imgs = f"{self.max_images} image{'s' if self.max_images != 1 else ''}"
        else:
            imgs = f"{self.min_images}-{self.max_images} images"
        parts = [imgs, "text" if self.text else "no text"]
        judged = [w for w, ok in (("requests", self.requests), ("responses", self.responses)) if ok]
        parts.append("judges " + " and ".join(judged))
        parts.append("score" if self.score else "no score")
        parts.append("categories" if self.categories else "no categories")
        if self.categories and not self.custom_categories:
            parts.append("fixed taxonomy")
        parts.append("modes " + "/".join(self.modes))
        return ", ".join(parts)


@dataclass(frozen=True)
class GuardPrompt:
    """A rendered-independent guard prompt.

    Attributes:
        messages: chat messages; user content is a list of parts ``{"type": "image"}`` /
            ``{"type": "text", "text": ...}`` with one image part per entry of ``images``.
        images: the images, in the order of the image parts.
        assistant_prefix: text the assistant turn starts with (fast mode: up to the verdict word).
        verdict_prefix: the text the verdict word follows (``"Verdict:"``); backends tokenize the
            verdict spellings in this context.
        verdict_words: label -> spellings of that label after ``verdict_prefix``; backends score
            the first token of each.
        mode: the mode the prompt was built for.
        template_kwargs: extra variables for the model's chat template (Llama Guard's
            ``categories`` / ``excluded_category_keys``); sent as ``chat_template_kwargs`` to servers.
        request_options: extra fields of an OpenAI-compatible generation request (e.g. a JSON-schema
            ``response_format`` for structured output, ``top_p``); backends without such a request
            (in-process transformers) ignore them.
        static_parts: how many leading content parts of the first message are the same for every
            request under one policy (instructions, policy, categories). Backends may compute
            their KV cache once and reuse it (0: the prompt has no such prefix).
        image_keys: content hashes of ``images`` (same order), so caches can tell images apart
            without hashing pixels again; empty when unknown.
        cache_salt: the request's :attr:`~visguard.core.types.GuardRequest.cache_salt`, set by the
            guard on every prompt of a plan (follow-ups included); backends key every cached
            prefix holding request content on it.
        prefill_as_message: whether a backend whose server renders the chat template (``openai``)
            may send ``assistant_prefix`` as a prefilled assistant message. ``False`` for a model
            whose template picks its task from the last message's role (Qwen3Guard): such a
            backend sends the conversation alone, lets the model write the prefix itself and reads
            the verdict after it.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(repr=False)
    assistant_prefix: str = ""
    verdict_prefix: str = "Verdict:"
    verdict_words: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mode: PromptMode = "fast"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    request_options: Mapping[str, Any] = field(default_factory=dict)
    static_parts: int = 0
    image_keys: tuple[str, ...] = ()
    prefill_as_message: bool = True
    cache_salt: str = ""


@dataclass(frozen=True)
class ParsedOutput:
    """What a format read from generated text.

    Attributes:
        label: ``safe`` / ``unsafe``, or ``None`` when no verdict could be read.
        verdict_offset: character offset of the verdict word in the text (for its token probability).
        error: why parsing failed (``None`` on success).
        categories: every category the guard named, in its order (``category`` is the first).
        safe_answer: a complete, safe reply to the user that the guard wrote (formats of guards that
            answer, such as ``mirage``), which a blocked request can be answered with.
    """

    label: Literal["safe", "unsafe"] | None
    category: str | None = None
    sub_category: str | None = None
    categories: tuple[str, ...] = ()
    reasoning: str | None = None
    verdict_offset: int | None = None
    error: str | None = None
    safe_answer: str | None = None


def first_score(scores: Sequence[float]) -> tuple[float, str | None]:
    """A :attr:`CheckPlan.combine` for one prompt: its score, no category."""
    return scores[0], None


@dataclass(frozen=True)
class CheckPlan:
    """One request's check: its prompts and how to read the guard model on them (:meth:`GuardFormat.plan`).

    The guard builds a plan once per request, in the caller's thread, and its batcher executes it;
    it branches on nothing but what the plan says. Two ways to read a model:

    - ``read="score"``: P(unsafe) of the verdict token after each of :attr:`prompts` (one forward
      pass each, all in one batch), made one score and category by :attr:`combine`.
    - ``read="generate"``: greedy text of up to :attr:`max_new_tokens` tokens after the one prompt,
      read by :attr:`parse` (the score is the verdict word's probability where the parse points
      at it); then, if :attr:`followup` gives a prompt for that text, the follow-up verdict
      question decides instead: its verdict token is scored (on backends without scores, a few
      tokens are generated and their first word read against its ``verdict_words``).

    Attributes:
        request: the checked request.
        prompts: the prompts to run, in order (``generate``: exactly one).
        read: ``"score"`` or ``"generate"``.
        combine: ``scores -> (P(unsafe), category it points at)`` for the scores of :attr:`prompts`
            (``score``; default: the one score, no category).
        max_new_tokens: how many tokens to generate (``generate``).
        parse: generated text -> :class:`ParsedOutput`, with the request at hand (``generate``).
        followup: generated text -> a verdict prompt to score after it, or ``None`` (none asked).
    """

    request: GuardRequest
    prompts: tuple[GuardPrompt, ...]
    read: Literal["score", "generate"] = "score"
    combine: Callable[[Sequence[float]], tuple[float, str | None]] = first_score
    max_new_tokens: int = 0
    parse: Callable[[str], ParsedOutput] | None = None
    followup: Callable[[str], GuardPrompt | None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.read not in ("score", "generate"):
            raise ValueError(f"read must be 'score' or 'generate', got {self.read!r}")
        if not self.prompts:
            raise ValueError("a check plan needs at least one prompt")
        if self.read == "generate":
            if len(self.prompts) != 1:
                raise ValueError(f"a generate plan runs exactly one prompt, got {len(self.prompts)}")
            if self.parse is None or self.max_new_tokens < 1:
                raise ValueError("a generate plan needs parse and max_new_tokens >= 1")
        elif self.followup is not None:
            raise ValueError("only a generate plan can ask a follow-up")


def verdict_word(text: str, verdict_words: Mapping[str, Iterable[str]]) -> Literal["safe", "unsafe"] | None:
    """The label of a short *generated* answer to a verdict question (backends without scores):
    its first word when that is one of the ``verdict_words`` spellings, else ``None``."""
    m = re.match(r"[\s\"'*`_]*([A-Za-z]+)", text)
    if m is None:
        return None
    word = m.group(1).lower()
    for label in ("unsafe", "safe"):
        if any(word == w.strip().lower() for w in verdict_words.get(label, ())):
            return label
    return None


class GuardFormat(ABC):
    """Base class of guard formats (register subclasses through ``register_formats``).

    Args:
        ignore_unread: accept requests carrying parts this format does not read (text for an
            image-only classifier, images for a text guard) and drop those parts knowingly; off by
            default, such a request raises :class:`UnsupportedRequestError`.
    """

    #: registry name
    name: str = ""
    #: prompt layout version; bump it whenever the prompt text or order changes, so guards trained
    #: on one layout are never prompted with another (``visguard train`` records it in the checkpoint's
    #: ``visguard.json`` through the format's ``checkpoint_kwargs``, part of the training plugin's
    #: ``TrainableFormat`` protocol)
    version: int = 1
    #: whether prompts start with a request-independent prefix (``GuardPrompt.static_parts``);
    #: formats of third-party guard models keep the layout those models were trained on
    shares_prefix: bool = False
    #: what this format can judge
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, *, ignore_unread: bool = False) -> None:
        self.ignore_unread = ignore_unread

    def check_request(self, request: GuardRequest, mode: Mode | None = None) -> None:
        """Refuse a request (or mode, when given) this format cannot judge.

        Raises:
            UnsupportedRequestError: names the format and what it cannot judge.
        """
        caps, name = self.capabilities, self.name or type(self).__name__
        if mode is not None and mode not in caps.modes:
            raise UnsupportedRequestError(f"format {name!r} cannot run in {mode} mode; it runs in: {', '.join(caps.modes)}")
        if request.stage == "input" and not caps.requests:
            raise UnsupportedRequestError(f"format {name!r} judges responses only (post-checks), not a user's request")
        if request.stage == "output" and not caps.responses:
            raise UnsupportedRequestError(f"format {name!r} cannot judge an assistant's response (post-check)")
        n = len(request.images)
        if n and not caps.images and not getattr(self, "ignore_unread", False):
            raise UnsupportedRequestError(
                f"format {name!r} is a text guard and cannot see the request's {n} image(s) "
                "(build it with ignore_unread=True to judge the text alone)")
        if caps.images:
            if n < caps.min_images:
                raise UnsupportedRequestError(f"format {name!r} needs at least {caps.min_images} image(s), got {n}")
            if caps.max_images is not None and n > caps.max_images:
                raise UnsupportedRequestError(
                    f"format {name!r} judges at most {caps.max_images} image(s) per request, got {n}"
                    + ("" if caps.cross_image else " (it cannot judge harm that appears only across images)"))
        if request.conversation and not caps.conversation and not getattr(self, "ignore_unread", False):
            raise UnsupportedRequestError(
                f"format {name!r} does not read earlier conversation turns; send the request without "
                "'conversation' (or build the format with ignore_unread=True to drop them knowingly)")
        if request.text.strip() and not caps.text and not getattr(self, "ignore_unread", False):
            raise UnsupportedRequestError(
                f"format {name!r} judges images alone and cannot read the request's text "
                "(build it with ignore_unread=True to drop the text knowingly)")

    def image_text_prompt(self, request: GuardRequest, text: str, *, mode: PromptMode, **fields: Any) -> GuardPrompt:
        """The common guard prompt shape: one user turn, an image part per request image, then ``text``."""
        content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": text}]
        fields.setdefault("verdict_prefix", self.verdict_prefix)
        fields.setdefault("verdict_words", dict(self.verdict_words))
        return GuardPrompt(messages=[{"role": "user", "content": content}], images=[img.image for img in request.images],
                           mode=mode, **fields)

    def check_policy(self, policy: Policy) -> None:  # noqa: B027 - optional hook
        """Refuse a policy this format cannot express (e.g. custom categories for a fixed taxonomy).

        Raises:
            UnsupportedRequestError: names the categories the model cannot take.
        """

    def check_backend(self, backend: Any) -> None:  # noqa: B027 - optional hook
        """Refuse, once when a guard is built, a backend that cannot run this format as trained
        (e.g. a checkpoint whose chat template lost the prompt the model was trained with).

        Raises:
            BackendError: says what is wrong with the backend's model.
        """

    #: text that precedes the verdict word on the verdict line
    verdict_prefix: str = "Verdict:"
    #: label -> spellings that follow ``verdict_prefix``
    verdict_words: Mapping[str, tuple[str, ...]] = {
        "safe": (" safe", " Safe"),
        "unsafe": (" unsafe", " Unsafe"),
    }

    @abstractmethod
    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        """Build the guard prompt for ``request``.

        Args:
            request: the checked request.
            policy: categories and limits to write into the prompt.
            mode: ``fast`` ends the prompt right before the verdict word; ``reason`` asks for
                perception and reasoning first.
            special_tokens: the backend's special-token strings; untrusted text must not contain them.
        """

    @abstractmethod
    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        """Parse text the guard generated (never the prompt) into a :class:`ParsedOutput`."""

    def plan(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> CheckPlan:
        """How the guard checks ``request`` in ``mode``: the prompts and how to read them.

        The default covers a format with one prompt per request, from :meth:`build` and
        :meth:`parse`: fast mode scores the verdict token after the prompt (or, for a format whose
        ``capabilities.fast_tokens`` is set, generates that many tokens and parses them); reason
        mode generates ``policy.max_new_tokens`` tokens and parses them. Formats that ask several
        questions (one per policy), read their output with the request at hand, or ask a follow-up
        verdict question after the generated text override this and return such a plan.

        Called once per request and mode by the guard, in the caller's thread, after
        :meth:`check_request`; an :class:`~visguard.core.errors.InputError` raised here reaches that caller.
        """
        prompt = self.build(request, policy, mode=mode, special_tokens=special_tokens)
        tokens = policy.max_new_tokens if mode == "reason" else self.capabilities.fast_tokens
        if not tokens:
            return CheckPlan(request, (prompt,))
        return CheckPlan(request, (prompt,), read="generate", max_new_tokens=tokens,
                         parse=lambda text: self.parse(text, policy))


_ZWSP = "\u200b"


def neutralize(text: str, special_tokens: Iterable[str] = (), tags: Iterable[str] = ()) -> str:
    """Make untrusted text inert inside a guard prompt.

    Special-token strings (``<|im_start|>``, ``<image>`` ...) and the format's own delimiter tags
    are broken with a zero-width space so a tokenizer cannot read them as control tokens and a user
    cannot close the quoted block early.
    """
    for token in sorted({t for t in special_tokens if t and len(t) > 1}, key=len, reverse=True):
        text = text.replace(token, token[0] + _ZWSP + token[1:])
    for tag in tags:
        text = re.sub(re.escape(tag), lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text, flags=re.IGNORECASE)
    # Generic chat-template control shapes, whatever the backend reports.
    text = re.sub(r"<(\|)", "<" + _ZWSP + r"\1", text)
    text = re.sub(r"\[(/?INST)\]", "[" + _ZWSP + r"\1]", text)
    return text

