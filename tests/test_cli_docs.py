"""docs/cli.md is the commands' own --help: this fails on any drift (regenerate with `make docs`)."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help():
    generator = load_generator()
    expected = generator.render()
    actual = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                        "docs/cli.md", "--help", n=1))
    assert actual == expected, f"docs/cli.md is out of date: run `make docs`\n{diff[:4000]}"


def test_cli_reference_covers_every_command():
    from click.testing import CliRunner

    from visguard.cli import cli

    generator = load_generator()
    text = generator.render()
    for name in ("check", "plugins", "eval", "serve"):
        assert f"## `visguard {name}`" in text
    # The root --help lists exactly the commands the page documents.
    listed = CliRunner().invoke(cli, ["--help"]).output
    for name in cli.commands:
        assert f"## `visguard {name}`" in text and name in listed
