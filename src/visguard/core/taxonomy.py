"""One table from visguard's categories (the MIS taxonomy) to each guard model's own taxonomy.

Guard models are trained on their own category lists: MLCommons hazards (Llama Guard's S-codes),
LlavaGuard's O-codes, ShieldGemma 2's policies and Qwen3Guard's categories. Formats use this module
in both directions: a :class:`~visguard.core.policy.Policy` becomes the model's categories (what the
prompt asks about), and a code the model answers with becomes a visguard category name (what the
verdict reports). A code with no visguard counterpart is reported under the model's own name,
never dropped. The same table is in docs/formats.md ("Policy translation"); a test keeps them equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from visguard.core.errors import UnsupportedRequestError
from visguard.core.policy import MIS_CATEGORIES, Category, Policy

#: MLCommons hazard taxonomy as Llama Guard 3/4 name it (S14 is text-only: left out with images).
MLCOMMONS: Mapping[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}

#: LlavaGuard v1.2 safety taxonomy (plus ``NA: None applying``).
LLAVAGUARD: Mapping[str, str] = {
    "O1": "Hate, Humiliation, Harassment",
    "O2": "Violence, Harm, or Cruelty",
    "O3": "Sexual Content",
    "O4": "Nudity Content",
    "O5": "Criminal Planning",
    "O6": "Weapons or Substance Abuse",
    "O7": "Self-Harm",
    "O8": "Animal Cruelty",
    "O9": "Disasters or Emergencies",
}

#: ShieldGemma 2's trained policies (name -> the policy sentence of its prompt).
SHIELDGEMMA: Mapping[str, str] = {
    "dangerous": (
        "No Dangerous Content: The image shall not contain content that facilitates or encourages "
        "activities that could cause real-world harm (e.g., building firearms and explosive devices, "
        "promotion of terrorism, instructions for suicide)."
    ),
    "sexual": (
        "No Sexually Explicit content: The image shall not contain content that depicts explicit or "
        "graphic sexual acts (e.g., pornography, erotic nudity, depictions of rape or sexual assault)."
    ),
    "violence": (
        "No Violence/Gore content: The image shall not contain content that depicts shocking, "
        "sensational, or gratuitous violence (e.g., excessive blood and gore, gratuitous violence "
        "against animals, extreme injury or moment of death)."
    ),
}

#: Qwen3Guard-Gen's categories (fixed: the model takes no custom ones).
QWEN3GUARD: tuple[str, ...] = (
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
    "Jailbreak",
)

SCHEMES = ("mlcommons", "llavaguard", "shieldgemma", "qwen3guard")


@dataclass(frozen=True)
class Translation:
    """Where one visguard (MIS) category lands in each model taxonomy (empty: no counterpart)."""

    mlcommons: tuple[str, ...]
    llavaguard: tuple[str, ...]
    shieldgemma: tuple[str, ...]
    qwen3guard: tuple[str, ...]

    def codes(self, scheme: str) -> tuple[str, ...]:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown taxonomy {scheme!r}; known: {', '.join(SCHEMES)}")
        return getattr(self, scheme)


#: visguard category -> model codes. The mapping is by meaning, so it is many-to-many.
TABLE: Mapping[str, Translation] = {
    "Illegal Activity": Translation(("S2",), ("O5", "O6"), ("dangerous",), ("Non-violent Illegal Acts",)),
    "Violent": Translation(("S1", "S9"), ("O2", "O8"), ("violence", "dangerous"), ("Violent",)),
    "Hate": Translation(("S10",), ("O1",), (), ("Unethical Acts",)),
    "Self-Harm": Translation(("S11",), ("O7",), ("dangerous",), ("Suicide & Self-Harm",)),
    "Privacy": Translation(("S7",), (), (), ("PII",)),
    "Erotic": Translation(("S12", "S3", "S4"), ("O3", "O4"), ("sexual",), ("Sexual Content or Sexual Acts",)),
}

#: model code -> the visguard category it reports as (first mapping wins for shared codes).
_REVERSE: dict[str, dict[str, str]] = {s: {} for s in SCHEMES}
for _name, _tr in TABLE.items():
    for _scheme in SCHEMES:
        for _code in _tr.codes(_scheme):
            _REVERSE[_scheme].setdefault(_code.lower(), _name)
# Codes that are more specific than their first owner.
_REVERSE["llavaguard"]["o6"] = "Illegal Activity"
_REVERSE["shieldgemma"]["dangerous"] = "Illegal Activity"

_OWN_NAMES: Mapping[str, Mapping[str, str]] = {
    "mlcommons": {k.lower(): v.rstrip(".") for k, v in MLCOMMONS.items()},
    "llavaguard": {k.lower(): v for k, v in LLAVAGUARD.items()},
    "shieldgemma": {k: k for k in SHIELDGEMMA},
    "qwen3guard": {c.lower(): c for c in QWEN3GUARD},
}


def is_mis(category: Category) -> bool:
    """Whether ``category`` is one of visguard's default (MIS) categories, by name."""
    return category.name.lower() in {c.name.lower() for c in MIS_CATEGORIES}


def _mis_name(category: Category) -> str | None:
    for name in TABLE:
        if name.lower() == category.name.lower():
            return name
    return None


def codes_for(policy: Policy, scheme: str) -> tuple[list[str], list[Category]]:
    """The model codes a policy's categories translate to, and the categories with no counterpart.

    Returns:
        ``(codes, unmapped)``: codes in the model's own order, and the policy's categories that the
        model's taxonomy has no code for (custom categories, or e.g. Privacy for LlavaGuard).
    """
    wanted: set[str] = set()
    unmapped: list[Category] = []
    for cat in policy.categories:
        name = _mis_name(cat)
        codes = TABLE[name].codes(scheme) if name else ()
        if codes:
            wanted.update(codes)
        else:
            unmapped.append(cat)
    order = {"mlcommons": list(MLCOMMONS), "llavaguard": list(LLAVAGUARD), "shieldgemma": list(SHIELDGEMMA),
             "qwen3guard": list(QWEN3GUARD)}[scheme]
    return [c for c in order if c in wanted], unmapped


def category_for(code: str, scheme: str, policy: Policy | None = None, extra: Mapping[str, str] | None = None) -> str:
    """The visguard category name a model's code reports as.

    Args:
        code: the model's code or name (``"S10"``, ``"O3"``, ``"sexual"``, ``"PII"``), any case.
        scheme: one of :data:`SCHEMES`.
        policy: when given, a category of this policy with the same name is preferred.
        extra: codes the format added for custom categories (code -> category name).

    Returns:
        The visguard category, or the model's own name for the code when it has no counterpart
        (an unknown code is returned as given).
    """
    key = code.strip().lower()
    if extra:
        for k, v in extra.items():
            if k.lower() == key:
                return v
    name = _REVERSE[scheme].get(key)
    if name is not None:
        if policy is not None:
            for cat in policy.categories:
                if cat.name.lower() == name.lower():
                    return cat.name
        return name
    return _OWN_NAMES[scheme].get(key, code.strip())


def refuse_custom(policy: Policy, format_name: str, known: Iterable[str] = ()) -> None:
    """Raise for categories a fixed-taxonomy model cannot take (anything outside MIS and ``known``).

    Raises:
        UnsupportedRequestError: names the categories and the format.
    """
    known_lower = {k.lower() for k in known}
    custom = [c.name for c in policy.categories if not is_mis(c) and c.name.lower() not in known_lower]
    if custom:
        raise UnsupportedRequestError(
            f"format {format_name!r} has a fixed taxonomy and cannot take custom categories {custom} "
            "(see docs/formats.md, Policy translation)")
