"""Policy: what the guard looks for, how it decides, and what happens when it cannot decide.

The default categories are the MIS taxonomy (6 categories, 14 sub-categories) from "Rethinking
Bottlenecks in Safety Fine-Tuning of Vision Language Models" (arXiv 2501.18533).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from visguard.core.images import ImageLimits

if TYPE_CHECKING:  # pragma: no cover
    from visguard.core.types import Verdict

Mode = Literal["fast", "reason", "adaptive"]
OnError = Literal["block", "allow", "raise"]
#: what a caller that acts on a verdict does (see :meth:`Policy.action`); ``flag``: let it through,
#: flagged and audited (an ``unsafe`` verdict whose categories are all ``log``-only)
Action = Literal["pass", "block", "flag", "degraded", "raise"]
#: what an ``unsafe`` verdict in a category does: ``block`` it, or ``log`` it only (pass, flagged, audited)
CategoryAction = Literal["block", "log"]
_ON_ERROR_ACTION: dict[str, Action] = {"block": "block", "allow": "degraded", "raise": "raise"}


class Category(BaseModel):
    """One harm category of a policy.

    Args:
        name: the category's name as the guard should print it, e.g. ``"Violent"``.
        description: optional sentence telling the guard what the category covers.
        sub_categories: finer names under the category.
        threshold: this category's own P(unsafe) threshold (``None``: the policy's). It applies where
            a verdict names the category with a score (reason mode: the verdict word's probability)
            or carries per-category scores (:attr:`Verdict.category_scores`); a fast-mode score names
            no category, so the policy's threshold decides it.
        action: what an ``unsafe`` verdict in this category does: ``block`` (default) or ``log``
            (let through, flagged and audited: :meth:`Policy.action` says ``flag``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    sub_categories: tuple[str, ...] = ()
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    action: CategoryAction = "block"


MIS_CATEGORIES: tuple[Category, ...] = (
    Category(
        name="Illegal Activity",
        description="helping to commit crimes",
        sub_categories=("Property Crimes", "Cybercrimes", "Drug-Related Offenses", "Human Trafficking"),
    ),
    Category(
        name="Violent",
        description="harming people or animals, weapons, riots",
        sub_categories=(
            "Weapon-Related Violence",
            "Public Violence and Rioting",
            "Abuse and Physical Altercations",
        ),
    ),
    Category(
        name="Hate",
        description="demeaning people for who they are",
        sub_categories=("Racial and Ethnic Discrimination", "Gender Discrimination"),
    ),
    Category(
        name="Self-Harm",
        description="hurting oneself, physically or psychologically",
        sub_categories=("Physical Self-Injury", "Psychological Harm"),
    ),
    Category(
        name="Privacy",
        description="collecting or abusing personal data without consent",
        sub_categories=("Unauthorized Data Collection", "Identity Theft"),
    ),
    Category(
        name="Erotic",
        description="sexual content",
        sub_categories=("Erotic Visual Content",),
    ),
)


#: default :attr:`Policy.timeout_s`: generous for a reason pass of a 7B guard on a GPU, short
#: enough that a hung backend surfaces as ``unavailable`` instead of blocking callers forever
DEFAULT_TIMEOUT_S = 60.0


class Policy(BaseModel):
    """How a guard decides and acts.

    Args:
        categories: the harm categories the guard checks (default: the MIS taxonomy).
        threshold: P(unsafe) at or above which a scored verdict is ``unsafe``.
        mode: ``fast`` (one forward pass, score from the verdict-token logits), ``reason``
            (generate perception and reasoning, then the verdict) or ``adaptive`` (fast, then
            reason only when the score lies inside ``adaptive_band``). ``None`` (default): the
            guard format's own mode (``Capabilities.default_mode``: ``fast`` for ``visguard``,
            ``reason`` for ``mirage``, which was trained to reason before it answers); a
            :class:`~visguard.Guard` fills it in when it is built.
        adaptive_band: closed interval ``(low, high)`` of fast scores that trigger reasoning.
        on_error: what an ``unavailable`` verdict does where a decision is acted upon: ``block``
            (default, fail closed), ``allow`` (pass, flagged as degraded) or ``raise``.
        max_new_tokens: generation budget of the reason pass.
        timeout_s: time limit of one check call, queueing included (default 60 s); past it the
            check is ``unavailable`` and a batch still running is abandoned (its worker replaced,
            see :mod:`visguard.engine.batching`). ``None``: no limit (a hung backend then blocks the caller).
        limits: image-boundary limits.
        explain: also attribute each verdict to its parts (``Verdict.attribution``: the fast
            P(unsafe) of the text alone, each image with the text and subsets of the images with it, all in the same
            batched scoring pass; see :mod:`visguard.engine.attribution`). Off by default; a
            format that cannot score subsets refuses such a policy's checks
            (:class:`~visguard.core.errors.UnsupportedRequestError`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    categories: tuple[Category, ...] = MIS_CATEGORIES
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    mode: Mode | None = None
    adaptive_band: tuple[float, float] = (0.2, 0.8)
    on_error: OnError = "block"
    max_new_tokens: int = Field(default=512, ge=1)
    timeout_s: float | None = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    limits: ImageLimits = ImageLimits()
    explain: bool = False

    @field_validator("categories")
    @classmethod
    def _unique_names(cls, value: tuple[Category, ...]) -> tuple[Category, ...]:
        names = [c.name.lower() for c in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate category names: {dupes}")
        return value

    @model_validator(mode="after")
    def _band_ordered(self) -> Policy:
        low, high = self.adaptive_band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"adaptive_band must satisfy 0 <= low <= high <= 1, got {self.adaptive_band}")
        return self

    def with_categories(self, *categories: Category | str) -> Policy:
        """Return a copy with extra categories added (a string adds a category with that name)."""
        extra = tuple(c if isinstance(c, Category) else Category(name=c) for c in categories)
        return self.updated(categories=self.categories + extra)

    def without_categories(self, *names: str) -> Policy:
        """Return a copy without the named categories (case-insensitive).

        Raises:
            ValueError: a name is not a category of this policy.
        """
        wanted = {n.lower() for n in names}
        known = {c.name.lower() for c in self.categories}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"unknown categories: {missing}; known: {[c.name for c in self.categories]}")
        kept = tuple(c for c in self.categories if c.name.lower() not in wanted)
        return self.updated(categories=kept)

    def updated(self, **changes: object) -> Policy:
        """A validated copy with ``changes`` applied (unlike ``model_copy``, which skips validation)."""
        data = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**data, **changes})

    def find_category(self, text: str) -> tuple[str | None, str | None]:
        """Map free text from a guard's category line to ``(category, sub_category)``.

        Matching is case- and space-insensitive on names; a sub-category name also yields its
        category. Unknown text is returned as the category unchanged (never dropped).
        """
        norm = " ".join(text.replace("_", " ").split()).strip(" .*`'\"").lower()
        if norm in {"", "none", "n/a", "na", "null", "safe"}:
            return None, None
        parts = [p.strip() for p in norm.replace("|", "/").replace(":", "/").split("/") if p.strip()]
        for cat in self.categories:
            subs = {s.lower(): s for s in cat.sub_categories}
            if parts and parts[0] == cat.name.lower():
                sub = subs.get(parts[1]) if len(parts) > 1 else None
                return cat.name, sub
            for part in parts:
                if part in subs:
                    return cat.name, subs[part]
        return " ".join(text.split()).strip(" .*`'\""), None

    def category(self, name: str) -> Category | None:
        """The policy's category called ``name`` (a sub-category name finds its category; case-insensitive)."""
        found, _ = self.find_category(name)
        return next((c for c in self.categories if found is not None and c.name == found), None)

    def threshold_for(self, name: str | None) -> float:
        """The P(unsafe) threshold of category ``name``: its own, else the policy's."""
        cat = self.category(name) if name else None
        return cat.threshold if cat is not None and cat.threshold is not None else self.threshold

    def action(self, verdict: Verdict) -> Action:
        """What a caller acting on ``verdict`` does: the one place a verdict becomes a decision.

        ``safe`` passes and ``unsafe`` blocks, refined per category: a verdict with per-category
        scores (:attr:`Verdict.category_scores`) is unsafe in each category whose score reaches
        :meth:`threshold_for` it; an ``unsafe`` verdict naming categories with a score is not
        unsafe in a category whose own threshold that score stays below. Unsafe in no category:
        ``pass``; in a ``block`` category (or one the policy does not know): ``block``; only in
        ``log`` categories: ``flag`` (let through, flagged and audited). ``unavailable`` (error,
        timeout, unparseable output) follows ``on_error``: ``block`` blocks, ``allow`` passes
        flagged ``degraded``, ``raise`` raises :class:`~visguard.core.errors.GuardUnavailableError`.
        *How* a block looks (a refusal, an exception, a flag) is the caller's choice (e.g.
        ``guard.wrap(on_unsafe=...)``).
        """
        if verdict.label == "unavailable":
            return _ON_ERROR_ACTION[self.on_error]
        hits: list[Category | None]
        if verdict.category_scores:
            hits = [self.category(name) for name, score in verdict.category_scores.items()
                    if score >= self.threshold_for(name)]
        elif verdict.label == "safe":
            return "pass"
        else:
            named = verdict.categories or ((verdict.category,) if verdict.category else ())
            if not named:
                return "block"
            cats = [self.category(name) for name in named]
            score = verdict.score
            hits = [c for c in cats
                    if c is None or c.threshold is None or score is None or score >= c.threshold]
        if not hits:
            return "pass"
        return "flag" if all(c is not None and c.action == "log" for c in hits) else "block"

    def decides_unsafe(self, score: float) -> bool:
        """Whether a P(unsafe) score crosses this policy's threshold."""
        return score >= self.threshold

    def in_band(self, score: float) -> bool:
        """Whether a fast score is uncertain enough for the adaptive reason pass."""
        low, high = self.adaptive_band
        return low <= score <= high
