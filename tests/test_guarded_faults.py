"""Fail-closed: a guard that raises, hangs past its timeout or returns garbage blocks by default.

Each faulty guard is a real :class:`visguard.Backend` subclass (or the real tiny guard model in
reason mode, whose random weights generate text with no verdict line). The host is the real tiny
transformers model behind a counting callable.
"""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from visguard import (
    AuditLog,
    Backend,
    Guard,
    GuardrailViolation,
    GuardUnavailableError,
    Policy,
    load_images,
)
from visguard.default_plugins.transformers_host import TransformersHost
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.hosting.guarded import DEFAULT_UNAVAILABLE_MESSAGE

TEXT = "describe the image"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RaisingBackend(Backend):
    """A guard backend whose model call fails."""

    name = "raising"
    model_id = "raising-guard"

    def __init__(self, only_output: bool = False) -> None:
        self.only_output = only_output

    def score(self, prompts):
        if self.only_output and "<assistant_response>" not in prompts[0].messages[-1]["content"][-1]["text"]:
            return [0.0 for _ in prompts]
        raise RuntimeError("CUDA error: device-side assert triggered")

    def generate(self, prompts, *, max_new_tokens):
        raise RuntimeError("CUDA error: device-side assert triggered")


class HangingBackend(Backend):
    """A guard backend that hangs until released (the policy's timeout must fire first)."""

    name = "hanging"
    model_id = "hanging-guard"

    def __init__(self) -> None:
        self.release = threading.Event()

    def score(self, prompts):
        self.release.wait(30)
        return [0.0 for _ in prompts]

    def generate(self, prompts, *, max_new_tokens):
        raise NotImplementedError


class GarbageBackend(Backend):
    """A guard backend that returns a score that is not a probability."""

    name = "garbage"
    model_id = "garbage-guard"

    def score(self, prompts):
        return [float("nan") for _ in prompts]

    def generate(self, prompts, *, max_new_tokens):
        raise NotImplementedError


@pytest.fixture(scope="module")
def host(qwen_path) -> TransformersHost:
    return TransformersHost(qwen_path, max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_guard(qwen_path) -> Guard:
    return Guard.from_pretrained(qwen_path)


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (48, 40), (30, 30, 200))


@pytest.fixture(params=["raises", "hangs", "garbage", "unparseable"])
def faulty(request, tiny_guard):
    """(guard factory ``on_error -> Guard``, expected error text) for each kind of fault."""
    if request.param == "raises":
        backend, error = RaisingBackend(), "guard backend error: RuntimeError: CUDA error"
    elif request.param == "hangs":
        backend, error = HangingBackend(), "guard timed out after 0.2 s"
    elif request.param == "garbage":
        backend, error = GarbageBackend(), "backend returned an invalid score nan"
    else:  # the real tiny guard asked to reason: its random weights never write a verdict line
        backend, error = tiny_guard.backend, "unparseable guard output"

    def make(on_error: str) -> Guard:
        mode = "reason" if request.param == "unparseable" else "fast"
        timeout = 0.2 if request.param == "hangs" else None
        return Guard(backend, VisguardFormat(), Policy(on_error=on_error, mode=mode, max_new_tokens=8, timeout_s=timeout))

    yield make, error
    if isinstance(backend, HangingBackend):
        backend.release.set()


class Counting:
    def __init__(self, model: TransformersHost) -> None:
        self.model, self.calls = model, 0

    def __call__(self, images, text, **kwargs):
        self.calls += 1
        return self.model.generate(load_images(images), text, **kwargs)


def test_unavailable_guard_blocks_by_default_and_says_why(faulty, host, image, tmp_path):
    make, error = faulty
    counting = Counting(host)
    audit = tmp_path / "audit.jsonl"
    with make("block").wrap(counting, audit=audit) as guarded:
        result = guarded.generate([image], TEXT)
    assert counting.calls == 0
    assert result.blocked and (result.reason, result.stage) == ("unavailable", "input")
    assert result.text == DEFAULT_UNAVAILABLE_MESSAGE and result.response is None and not result.degraded
    assert result.input_verdict.label == "unavailable" and error in result.input_verdict.error
    (record,) = AuditLog.read(audit)
    assert (record["label"], record["action"]) == ("unavailable", "block") and error in record["error"]


def test_unavailable_guard_passes_only_with_on_error_allow(faulty, host, image):
    make, error = faulty
    counting = Counting(host)
    expected = host.generate(load_images([image]), TEXT)
    result = make("allow").wrap(counting).generate([image], TEXT)
    assert counting.calls == 1
    assert not result.blocked and not result.flagged and result.degraded
    assert result.text == result.response == expected
    assert result.input_verdict.label == result.output_verdict.label == "unavailable"


def test_unavailable_guard_raises_with_on_error_raise(faulty, host, image, tmp_path):
    make, error = faulty
    counting = Counting(host)
    audit = tmp_path / "audit.jsonl"
    with pytest.raises(GuardUnavailableError, match="guard unavailable"), make("raise").wrap(counting, audit=audit) as guarded:
        guarded.generate([image], TEXT)
    assert counting.calls == 0
    (record,) = AuditLog.read(audit)  # the raise is a decision too: it is audited
    assert (record["label"], record["action"]) == ("unavailable", "raise") and error in record["error"]


def test_unavailable_block_raises_violation_when_on_unsafe_is_raise(host, image):
    guard = Guard(RaisingBackend(), VisguardFormat(), Policy())
    with pytest.raises(GuardrailViolation) as info:
        guard.wrap(Counting(host), on_unsafe="raise").generate([image], TEXT)
    assert info.value.verdict.label == "unavailable"


def test_post_check_failure_withholds_the_answer(host, image):
    guard = Guard(RaisingBackend(only_output=True), VisguardFormat(), Policy())
    counting = Counting(host)
    result = guard.wrap(counting).generate([image], TEXT)
    assert counting.calls == 1
    assert result.input_verdict.label == "safe" and result.output_verdict.label == "unavailable"
    assert result.blocked and (result.reason, result.stage) == ("unavailable", "output")
    assert result.text == DEFAULT_UNAVAILABLE_MESSAGE and result.response is None


def test_stream_with_a_failing_guard_releases_nothing_but_the_message(host, image):
    guard = Guard(RaisingBackend(only_output=True), VisguardFormat(), Policy())
    for pre_check in ("sequential", "parallel"):
        stream = guard.wrap(host, pre_check=pre_check, stream_check_every=1).stream([image], TEXT)
        assert list(stream) == [DEFAULT_UNAVAILABLE_MESSAGE]
        assert stream.result.reason == "unavailable"


def test_answer_too_long_for_the_guard_is_checked_not_passed(image):
    # A long answer is checked in windows (tests/test_input_boundary.py); a garbage guard blocks it.
    guard = Guard(GarbageBackend(), VisguardFormat(), Policy())
    result = guard.wrap(lambda images, text: "x" * 40_000, pre_check="off").generate([image], TEXT)
    assert result.blocked and result.reason == "unavailable" and "invalid score" in result.output_verdict.error


def test_host_errors_reach_the_caller_unless_the_request_was_blocked(tiny_guard, image):
    def broken(images, text):
        raise RuntimeError("host out of memory")

    safe = tiny_guard.with_policy(threshold=1.0)
    for pre_check in ("sequential", "parallel"):
        with pytest.raises(RuntimeError, match="host out of memory"):
            safe.wrap(broken, pre_check=pre_check).generate([image], TEXT)
        with pytest.raises(RuntimeError, match="host out of memory"):
            list(safe.wrap(broken, pre_check=pre_check).stream([image], TEXT))
    # A blocked request's host output (here: its error) is discarded.
    result = tiny_guard.with_policy(threshold=0.0).wrap(broken, pre_check="parallel").generate([image], TEXT)
    assert result.blocked and result.reason == "unsafe"
