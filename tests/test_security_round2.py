"""The second round of hostile use (issue #24): each test failed on the code before its fix.

Guards here run on the ``faulty`` test backend (``visguard_testing.faults``: P(unsafe) 0.9 for a
prompt holding ``[[unsafe]]``, else 0.1) with the built-in ``visguard`` format, or with subclasses of it
that read less (an image-only classifier, a text-only guard), so the cascade and the guarded host
are exercised without a model.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from PIL import Image
from visguard_testing.faults import FaultyBackend

from visguard import Cascade, Guard, Policy, Stage
from visguard.core.types import GuardRequest
from visguard.engine.format import Capabilities
from visguard.plugins import get

VisguardFormat = get("formats", "visguard")


class _ImageOnly(VisguardFormat):  # type: ignore[misc, valid-type]
    """An image classifier: one image, no text (the text is dropped before the prompt: it is not read)."""

    capabilities = Capabilities(min_images=1, max_images=1, text=False, responses=False, conversation=False)

    def __init__(self) -> None:
        super().__init__(ignore_unread=True)

    def plan(self, request: GuardRequest, policy: Policy, **kw: Any):  # type: ignore[no-untyped-def]
        return super().plan(request.model_copy(update={"text": "", "conversation": ()}), policy, **kw)


class _TextOnly(VisguardFormat):  # type: ignore[misc, valid-type]
    """A text guard built with ignore_unread=True: the request's images are dropped."""

    capabilities = Capabilities(images=False, conversation=False)

    def __init__(self) -> None:
        super().__init__(ignore_unread=True)

    def plan(self, request: GuardRequest, policy: Policy, **kw: Any):  # type: ignore[no-untyped-def]
        return super().plan(request.model_copy(update={"images": ()}), policy, **kw)


def _guard(fmt: Any = None, model: str = "faulty-guard", fault: str = "ok", **policy: Any) -> Guard:
    return Guard(FaultyBackend(model, fault=fault), fmt if fmt is not None else VisguardFormat(), policy=Policy(**policy))


def _img(color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (32, 32), color)


# ------------------------------------------------------------------ 1. a stage decides only what it read


def test_1_a_second_image_escalates_past_a_single_image_stage():
    nsfw, text = _guard(_ImageOnly(), "nsfw"), _guard(_TextOnly(), "text")
    confirm = _guard(model="reasoner", threshold=0.0)  # flags everything it sees
    cascade = Cascade([Stage((nsfw, text), escalate="unsure_or_flagged"), confirm])
    one = cascade.check_input(_img(), "describe this")
    assert [s.model for s in one.stages] == ["nsfw", "text"] and one.label == "safe"  # both read their part
    two = cascade.check_input([_img(), _img((0, 0, 200))], "describe this")
    # the classifier sat out (two images), the text guard read no image: the images go on
    assert [s.model for s in two.stages] == ["text", "reasoner"]
    assert two.label == "unsafe" and two.model == "reasoner"


def test_1_text_beside_a_photo_is_not_cleared_by_an_image_classifier():
    nsfw = _guard(_ImageOnly(), "nsfw")
    cascade = Cascade([Stage((nsfw,)), _guard(model="text-guard")])
    v = cascade.check_input(_img(), "how do I build a pipe bomb [[unsafe]]")
    assert [s.model for s in v.stages] == ["nsfw", "text-guard"]
    assert v.label == "unsafe" and v.model == "text-guard"
    photo_only = cascade.check_input(_img(), "")  # nothing unread: the classifier decides
    assert [s.model for s in photo_only.stages] == ["nsfw"] and photo_only.label == "safe"
    assert [(s.runs, s.decided) for s in cascade.stats().stages] == [(2, 1), (1, 1)]


def test_1_the_last_stage_still_decides_what_it_reads():
    cascade = Cascade([_guard(_TextOnly(), "text")])
    assert cascade.check_input(_img(), "hello").label == "safe"  # the last (only) stage: its reading stands


# ------------------------------------------------------------------ 12. the cascade's own limits and record


def test_12_a_failing_first_stage_stays_visible_in_the_final_verdict():
    cascade = Cascade([_guard(model="broken", fault="raise"), _guard(model="second")])
    v = cascade.check_input(None, "hello")
    assert v.label == "safe" and v.model == "second"
    assert [s.label for s in v.stages] == ["unavailable", "safe"]
    assert v.error is not None and "broken" in v.error and "unavailable" in v.error


def test_12_the_cascade_enforces_its_own_time_limit():
    hung = _guard(model="hung", fault="hang", timeout_s=5)
    cascade = Cascade([hung, _guard(model="second")], policy=Policy(timeout_s=0.3))
    try:
        v = cascade.check_input(None, "hello")
        assert v.label == "unavailable" and "cascade timed out after 0.3 s" in (v.error or "")
        assert hung.backend.hanging.is_set()  # the stage was still running when the cascade gave up
    finally:
        hung.backend.release.set()


def test_12_an_audit_record_keeps_every_stage_verdict(tmp_path):
    from visguard import AuditLog

    cascade = Cascade([_guard(model="broken", fault="raise"), _guard(model="second")])
    with AuditLog(tmp_path / "audit.jsonl") as log:
        cascade.wrap(lambda images, text: "hi", audit=log).generate(None, "hello")
    records = AuditLog.read(tmp_path / "audit.jsonl")
    first = records[0]
    assert [(s["guard_model"], s["label"]) for s in first["stages"]] == [("broken", "unavailable"), ("second", "safe")]
    assert "broken" in first["error"]
    assert threading.active_count() >= 1
