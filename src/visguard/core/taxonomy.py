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
        codes: tuple[str, ...] = getattr(self, scheme)
        return codes


#: visguard category -> model codes. The mapping is by meaning, so it is many-to-many.
TABLE: Mapping[str, Translation] = {
    "Illegal Activity": Translation(("S2", "S3"), ("O5", "O6"), ("dangerous",), ("Non-violent Illegal Acts",)),
    "Violent": Translation(("S1", "S3", "S9"), ("O2", "O8"), ("violence", "dangerous"), ("Violent",)),
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


#: Codes a prompt keeps whatever broad categories a policy removes (Llama Guard's S4 child sexual
#: exploitation and S9 indiscriminate weapons, chemical / biological / nuclear included): removing
#: "Erotic" or "Violent" never turns them off; a format leaves them out only where its user names them.
SEVERE: Mapping[str, tuple[str, ...]] = {"mlcommons": ("S4", "S9")}

#: Other names the model cards give MLCommons codes (the chat templates use :data:`MLCOMMONS`'s).
_MLCOMMONS_CARD_NAMES: Mapping[str, str] = {
    "S3": "Sex-Related Crimes", "S4": "Child Sexual Exploitation", "S11": "Suicide & Self-Harm",
    "S14": "Code Interpreter Abuse (text only)",
}

#: The model codes a verdict reports as a visguard (MIS) category: only codes that mean the same
#: thing. Every other code reports under the model's own name (S4 "Child Exploitation", never
#: "Erotic"; Qwen3Guard's "Unethical Acts", never "Hate"), so no answer is read as a narrower or
#: different harm than the model named. docs/formats.md ("Fidelity per family") shows the table.
REPORT_AS: Mapping[str, Mapping[str, str]] = {
    "mlcommons": {"S1": "Violent", "S2": "Illegal Activity", "S7": "Privacy", "S10": "Hate", "S11": "Self-Harm",
                  "S12": "Erotic"},
    "qwen3guard": {"violent": "Violent", "non-violent illegal acts": "Illegal Activity",
                   "sexual content or sexual acts": "Erotic", "pii": "Privacy", "suicide & self-harm": "Self-Harm"},
}


def _norm(text: str) -> str:
    return " ".join(text.replace("_", " ").split()).strip(" .").lower()


def native_code(category: Category, scheme: str) -> str | None:
    """The model's own code that ``category`` names: by code (``"S5"``) or by the model's name
    (``"Defamation"``, ``"Child Sexual Exploitation"``, ``"Unethical Acts"``), any case; else ``None``."""
    key = _norm(category.name)
    for code, name in _OWN_NAMES[scheme].items():
        if key in (code, _norm(name)):
            return code.upper() if scheme == "mlcommons" else name
    if scheme == "mlcommons":
        for code, name in _MLCOMMONS_CARD_NAMES.items():
            if key == _norm(name):
                return code
    return None


def is_stock(policy: Policy) -> bool:
    """Whether ``policy`` has visguard's default categories (by name): a format then runs the
    model's own stock policy, exactly as its authors prompt it."""
    return sorted(c.name.lower() for c in policy.categories) == sorted(c.name.lower() for c in MIS_CATEGORIES)


def asked_codes(policy: Policy, scheme: str, *, drop: Iterable[str] = ()) -> tuple[list[str], list[Category]]:
    """The model codes a prompt asks about for ``policy``, conservatively, and the categories without one.

    A category that names a model code (``"S5"``, ``"Defamation"``) asks for that code; a visguard
    (MIS) category asks for every code of its :data:`TABLE` row, so a code shared by several rows
    (S3) stays while any of them is in the policy; the :data:`SEVERE` codes are always asked unless
    ``drop`` names them (the one way to leave out child sexual exploitation or weapons of mass
    destruction). Returns ``(codes in the model's order, categories with no code)``.
    """
    wanted: set[str] = set()
    unmapped: list[Category] = []
    for cat in policy.categories:
        code = native_code(cat, scheme)
        name = _mis_name(cat)
        codes = (code,) if code else (TABLE[name].codes(scheme) if name else ())
        if codes:
            wanted.update(codes)
        else:
            unmapped.append(cat)
    dropped = {d.strip().upper() for d in drop}
    wanted.update(c for c in SEVERE.get(scheme, ()) if c.upper() not in dropped)
    wanted = {c for c in wanted if c.upper() not in dropped}
    order = {"mlcommons": list(MLCOMMONS), "qwen3guard": list(QWEN3GUARD)}[scheme]
    return [c for c in order if c in wanted], unmapped


def reported_category(code: str, scheme: str, policy: Policy | None = None,
                      extra: Mapping[str, str] | None = None) -> str:
    """The category name a verdict reports for a model's code (``mlcommons`` and ``qwen3guard``).

    In order: a code the format added for a custom category (``extra``: code -> name); the policy's
    own category that names the code natively; the visguard category of :data:`REPORT_AS` (spelled
    as the policy spells it); else the model's own name for the code (an unknown code as given).
    """
    key = _norm(code)
    for k, v in (extra or {}).items():
        if _norm(k) == key:
            return v
    if policy is not None:
        for cat in policy.categories:
            native = native_code(cat, scheme)
            if native is not None and _norm(native) == key:
                return cat.name
    mis = {_norm(k): v for k, v in REPORT_AS.get(scheme, {}).items()}.get(key)
    if mis is not None:
        for cat in policy.categories if policy is not None else ():
            if cat.name.lower() == mis.lower():
                return cat.name
        return mis
    return _OWN_NAMES[scheme].get(key, code.strip())


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
