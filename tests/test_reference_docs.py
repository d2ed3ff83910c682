"""docs/backends.md, docs/hosts.md and docs/policy.md name every backend, host, option and field.

Like the hook-docs test for docs/plugins.md: a backend or host that gains an option, or a policy
field that appears, fails here until its reference page says what it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from visguard import Policy, plugins
from visguard.core.images import ImageLimits

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("kind, page", [("backends", "backends.md"), ("hosts", "hosts.md")])
def test_every_registered_name_and_option_is_documented(kind, page):
    text = (DOCS / page).read_text(encoding="utf-8")
    missing = []
    for name, factory in plugins.registry(kind).items():
        if f"`{name}`" not in text:
            missing.append(name)
        missing += [f"{name}.{opt}" for opt in plugins.option_names(factory) if f"`{opt}`" not in text]
    assert not missing, f"docs/{page} does not document: {missing}"


def test_every_policy_field_is_documented():
    text = (DOCS / "policy.md").read_text(encoding="utf-8")
    fields = [*Policy.model_fields, *ImageLimits.model_fields]
    assert not [f for f in fields if f"`{f}`" not in text]
    for mode in ("fast", "reason", "adaptive"):
        assert f"**{mode}**" in text
