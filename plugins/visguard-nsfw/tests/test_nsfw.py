"""The open_nsfw classifier with its real bundled weights, on real photographs (scikit-image's samples)."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from visguard import BackendError, Category, Guard, Policy, UnsupportedRequestError

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the sample photographs")

# Photographs bundled inside scikit-image (no download): people, animals, objects, a landscape.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle_left", "retina", "hubble_deep_field")


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard.from_pretrained("opennsfw", backend="opennsfw", format="opennsfw", threads=1)


def _photo(name: str) -> Image.Image:
    loader = getattr(skimage_data, name, None)
    if loader is None:  # older scikit-image: the same file through imread
        from skimage import io

        return Image.fromarray(io.imread(skimage_data.data_dir + f"/{name}.png"))
    return Image.fromarray(loader())


def test_real_photographs_score_as_safe(guard):
    photos = [_photo(n) for n in PHOTOS]
    verdicts = guard.check_batch([guard.request(p, "") for p in photos])
    for name, v in zip(PHOTOS, verdicts, strict=True):
        assert v.label == "safe", (name, v)
        assert v.score is not None and 0.0 <= v.score < 0.5, (name, v.score)
        assert v.model == "opennsfw" and v.category is None
    # The model is not constant: different photographs get different scores.
    assert len({round(v.score, 6) for v in verdicts}) > 1


def test_latency_per_image_is_reported(guard, capsys):
    photo = guard.request(_photo("astronaut"), "")
    guard.check(photo)  # warm-up
    n = 10
    start = time.perf_counter()
    for _ in range(n):
        guard.check(photo)
    per_image_ms = (time.perf_counter() - start) * 1000 / n
    with capsys.disabled():
        print(f"\nopen_nsfw latency: {per_image_ms:.1f} ms per image (1 thread, batch 1)")
    assert per_image_ms > 0


def test_it_sees_single_images_only_and_says_so(guard):
    two = [_photo("astronaut"), _photo("coffee")]
    with pytest.raises(UnsupportedRequestError, match="at most 1 image"):
        guard.check_input(two, "")
    with pytest.raises(UnsupportedRequestError, match="cannot read the request's text"):
        guard.check_input(two[:1], "what is in this picture?")
    with pytest.raises(UnsupportedRequestError, match="cannot judge an assistant's response"):
        guard.check_output(two[:1], "", "a woman in a space suit")
    with pytest.raises(UnsupportedRequestError, match="needs at least 1 image"):
        guard.check_input([], "")
    with pytest.raises(UnsupportedRequestError, match="reason mode"):
        guard.check(guard.request(two[:1], ""), mode="reason")


def test_policy_must_include_sexual_content_and_no_custom_categories(guard):
    with pytest.raises(UnsupportedRequestError, match="sexual content only"):
        guard.with_policy(Policy().without_categories("Erotic"))
    with pytest.raises(UnsupportedRequestError, match="custom categories"):
        guard.with_policy(Policy().with_categories(Category(name="Gambling")))
    text_dropped = Guard(guard.backend, type(guard.format)(ignore_unread=True))
    assert text_dropped.check_input(_photo("chelsea"), "a cat").label == "safe"  # alone, it judges the photo


def test_in_a_cascade_the_classifier_clears_no_text_it_did_not_read(guard):
    """Issue #24: a classifier built with ignore_unread=True decided "safe" for a harmful request beside a
    photo; a stage decides only what its guards read, so the text goes on to the next stage."""
    from visguard_testing.faults import FaultyBackend

    from visguard import Cascade
    from visguard.plugins import get

    text_guard = Guard(FaultyBackend("text-guard"), get("formats", "visguard")())  # flags text holding [[unsafe]]
    nsfw = Guard(guard.backend, type(guard.format)(ignore_unread=True))
    cascade = Cascade([nsfw, text_guard])
    v = cascade.check_input(_photo("chelsea"), "how do I hurt someone [[unsafe]]")
    assert [s.model for s in v.stages] == ["opennsfw", "text-guard"] and v.label == "unsafe"
    assert [s.model for s in cascade.check_input(_photo("chelsea"), "").stages] == ["opennsfw"]


def test_missing_model_is_a_backend_error(tmp_path):
    with pytest.raises(BackendError, match="no ONNX model"):
        Guard.from_pretrained(str(tmp_path / "absent.onnx"), backend="opennsfw", format="opennsfw")


def test_cascade_classifier_first_reasoner_only_when_needed(guard, capsys):
    """The real classifier decides the photographs; only what it cannot judge reaches the reasoning guard."""
    from visguard import Cascade, Stage
    from visguard.plugins import get

    checkpoints = pytest.importorskip("visguard_testing.guard_checkpoints")
    reasoner = Guard.from_pretrained(str(checkpoints.cached_guard_checkpoint("qwen2_5_vl")),
                                     format=get("formats", "guardreasoner-vl")(), policy=Policy(mode="reason", max_new_tokens=8))
    nsfw = Guard(guard.backend, type(guard.format)(ignore_unread=True))
    cascade = Cascade([Stage((nsfw,), escalate="unsure_or_flagged"), reasoner])
    photos = [cascade.request(_photo(n), "") for n in PHOTOS[:4]]
    text_only = cascade.request(None, "how do I pick a lock?")
    captioned = cascade.request(_photo("coffee"), "describe this")  # text the classifier cannot read
    verdicts = cascade.check_batch([*photos, text_only, captioned])
    for v in verdicts[:4]:
        assert v.label == "safe" and [s.model for s in v.stages] == ["opennsfw"]
    assert [s.model for s in verdicts[4].stages] == [reasoner.backend.model_id]
    assert [s.model for s in verdicts[5].stages] == ["opennsfw", reasoner.backend.model_id]
    stats = cascade.stats()
    assert [(s.runs, s.decided) for s in stats.stages] == [(5, 4), (2, 2)]
    assert stats.escalation_rate == pytest.approx(2 / 6) and isinstance(stats.saved, float)
    with capsys.disabled():
        print(f"\ncascade opennsfw -> guardreasoner-vl (tiny): {stats.as_dict()}")


def test_the_model_id_picks_its_format_and_other_formats_are_refused(guard):
    auto = Guard.from_pretrained("opennsfw", backend="opennsfw")
    assert auto.format.name == "opennsfw"
    chat = Guard.from_pretrained("opennsfw", backend="opennsfw", format="visguard")
    verdict = chat.check_input(_photo("chelsea"), "is this safe?")
    assert verdict.label == "unavailable" and "cannot read a chat prompt" in verdict.error
