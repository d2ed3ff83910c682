"""Format capabilities: a request a format cannot judge is refused with a typed error, before any model runs."""

from __future__ import annotations

import json
import re
from typing import ClassVar

import pytest
from click.testing import CliRunner

from visguard import Backend, Capabilities, Guard, InputError, Policy, UnsupportedRequestError
from visguard.cli import cli
from visguard.default_plugins.visguard_format import VisguardFormat


class _MustNotRun(Backend):
    """A backend that fails the test if a refused request reaches it."""

    name = "must-not-run"
    model_id = "none"

    def score(self, prompts):
        raise AssertionError("a refused request reached the backend")

    def generate(self, prompts, *, max_new_tokens):
        raise AssertionError("a refused request reached the backend")


class _OneImageNoText(VisguardFormat):
    name = "one-image"
    capabilities: ClassVar[Capabilities] = Capabilities(
        min_images=1, max_images=1, text=False, responses=False, modes=("fast",), cross_image=False
    )


class _TextOnly(VisguardFormat):
    name = "text-only"
    capabilities: ClassVar[Capabilities] = Capabilities(images=False, modes=("reason",))


def test_unsupported_requests_raise_typed_errors(images):
    guard = Guard(_MustNotRun(), _OneImageNoText())
    with pytest.raises(UnsupportedRequestError, match=r"at most 1 image.*across images"):
        guard.check_input(images[:2], "")
    with pytest.raises(UnsupportedRequestError, match="at least 1 image"):
        guard.check_input([], "")
    with pytest.raises(UnsupportedRequestError, match="cannot read the request's text"):
        guard.check_input(images[:1], "how do I use this?")
    with pytest.raises(UnsupportedRequestError, match="cannot judge an assistant's response"):
        guard.check_output(images[:1], "", "sure, here is how")
    request = guard.request(images[:1], "")
    with pytest.raises(UnsupportedRequestError, match="cannot run in reason mode"):
        guard.check(request, mode="reason")
    # A typed input error: never an unavailable verdict that on_error="allow" could let through.
    assert issubclass(UnsupportedRequestError, InputError)
    with pytest.raises(UnsupportedRequestError):
        guard.with_policy(on_error="allow").check_input(images[:2], "")


def test_ignore_unread_drops_text_knowingly(images):
    fmt = _OneImageNoText(ignore_unread=True)
    fmt.check_request(Guard(_MustNotRun(), fmt).request(images[:1], "text the classifier cannot read"))
    with pytest.raises(UnsupportedRequestError, match="at most 1"):  # the image limit still holds
        fmt.check_request(Guard(_MustNotRun(), fmt).request(images[:2], ""))


def test_text_guard_refuses_images_and_defaults_to_its_mode(images):
    guard = Guard(_MustNotRun(), _TextOnly())
    assert guard.policy.mode == "reason"  # the default policy runs in a mode the format supports
    with pytest.raises(UnsupportedRequestError, match="text guard"):
        guard.check_input(images[:1], "hello")
    explicit = Guard(_MustNotRun(), _TextOnly(), Policy(mode="fast"))
    with pytest.raises(UnsupportedRequestError, match="cannot run in fast mode"):
        explicit.check_input(None, "hello")


def test_plugins_command_lists_format_capabilities():
    text = CliRunner().invoke(cli, ["plugins"])
    assert text.exit_code == 0, text.output
    assert "formats (what each can judge):" in text.output
    assert re.search(r"visguard +0\+ images, text, judges requests and responses", text.output)
    for name in ("llama-guard-4", "llavaguard", "qwenguard", "shieldgemma2", "guardreasoner-vl", "qwen3guard"):
        assert re.search(rf"^  {name} ", text.output, re.MULTILINE), name
    data = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)
    core = next(p for p in data if "visguard" in p["provides"].get("formats", []))
    assert core["capabilities"]["visguard"]["max_images"] is None


def test_wrap_refuses_checks_the_format_cannot_make(images):
    guard = Guard(_MustNotRun(), _OneImageNoText())
    with pytest.raises(UnsupportedRequestError, match="post_check=False"):
        guard.wrap(lambda imgs, text: "answer")
    guarded = guard.wrap(lambda imgs, text: "answer", post_check=False)
    assert guarded.options.post_check is False
