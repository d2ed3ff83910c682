"""Policy validation and helpers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from visguard import MIS_CATEGORIES, Category, Policy, Verdict


def test_default_is_the_mis_taxonomy():
    p = Policy()
    assert [c.name for c in p.categories] == ["Illegal Activity", "Violent", "Hate", "Self-Harm", "Privacy", "Erotic"]
    assert sum(len(c.sub_categories) for c in MIS_CATEGORIES) == 14
    assert (p.threshold, p.mode, p.on_error) == (0.5, None, "block")  # None: the format's own mode


def test_validation_errors():
    with pytest.raises(ValidationError):
        Policy(threshold=1.5)
    with pytest.raises(ValidationError):
        Policy(mode="slow")
    with pytest.raises(ValidationError):
        Policy(on_error="ignore")
    with pytest.raises(ValidationError, match="adaptive_band"):
        Policy(adaptive_band=(0.8, 0.2))
    with pytest.raises(ValidationError, match="duplicate"):
        Policy(categories=(Category(name="A"), Category(name="a")))


def test_add_remove_describe_categories():
    p = Policy().with_categories(Category(name="Elections", description="election misinformation"))
    assert p.categories[-1].description == "election misinformation"
    p = p.without_categories("erotic", "HATE")
    assert "Erotic" not in [c.name for c in p.categories] and "Hate" not in [c.name for c in p.categories]
    with pytest.raises(ValueError, match="unknown categories"):
        p.without_categories("Nope")
    with pytest.raises(ValidationError, match="duplicate"):
        Policy().with_categories("violent")


def test_threshold_and_band():
    p = Policy(threshold=0.3, adaptive_band=(0.25, 0.6))
    assert p.decides_unsafe(0.3) and not p.decides_unsafe(0.29)
    assert p.in_band(0.25) and p.in_band(0.6) and not p.in_band(0.61)


def test_action_is_the_one_decision():
    safe, unsafe, broken = Verdict(label="safe"), Verdict(label="unsafe"), Verdict.unavailable("backend down")
    assert [Policy().action(v) for v in (safe, unsafe, broken)] == ["pass", "block", "block"]
    assert [Policy(on_error="allow").action(v) for v in (safe, unsafe, broken)] == ["pass", "block", "degraded"]
    assert [Policy(on_error="raise").action(v) for v in (safe, unsafe, broken)] == ["pass", "block", "raise"]


def test_a_policy_without_a_mode_runs_the_formats_own():
    from visguard_testing.backends import KeywordBackend

    from visguard import Guard
    from visguard.default_plugins.mirage_format import MirageFormat
    from visguard.default_plugins.visguard_format import VisguardFormat

    # MIRage was trained to write its answer first: its default is reason, the visguard format's fast.
    assert Guard(KeywordBackend("x"), MirageFormat()).policy.mode == "reason"
    assert Guard(KeywordBackend("x"), VisguardFormat()).policy.mode == "fast"
    assert Guard(KeywordBackend("x"), MirageFormat(), Policy(mode="fast")).policy.mode == "fast"  # explicit wins
    assert Guard(KeywordBackend("x"), MirageFormat(), Policy(threshold=0.3)).policy.mode == "reason"
