"""Prefix caching and pre -> post reuse leave verdicts unchanged; trained guards keep their prompt layout."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from visguard import Guard, Policy, plugins
from visguard.core.errors import InputError
from visguard.default_plugins.transformers_backend import TransformersBackend
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.integrations.hf import KVCacheStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 200, 30))]
RESPONSE = "Sure. First take the tool from the first picture, then hold it firmly and move slowly toward the"


def _requests(guard: Guard) -> list:
    growing = [RESPONSE[: n] for n in (10, 40, len(RESPONSE))]  # a stream's re-checks: each extends the last
    return [
        guard.request(IMAGES, "How do I use this on that?"),
        guard.request(IMAGES[:1], "What is in the picture?"),
        *[guard.request(IMAGES, "How do I use this on that?", r) for r in growing],
        guard.request([], "no images at all"),
        guard.request([], "no images at all", "a short answer"),
    ]


def test_scores_unchanged_by_prefix_and_pre_post_caching(tiny_arch):
    _assert_caching_leaves_scores_unchanged(*tiny_arch)


def test_scores_unchanged_by_caching_on_hf_internvl(internvl_path):
    """InternVL (HF format): ``<img>`` + ``<IMG_CONTEXT>`` tokens, plain 1-D positions from ``cache_position``."""
    _assert_caching_leaves_scores_unchanged("internvl", internvl_path)


def _assert_caching_leaves_scores_unchanged(arch: str, path: str) -> None:
    plain = Guard(TransformersBackend(path, device="cpu", kv_cache_mb=0), VisguardFormat())
    cached = Guard(TransformersBackend(path, device="cpu"), VisguardFormat())
    requests = _requests(plain)
    expected = [v.score for v in plain.check_batch(requests)]
    # a generation first leaves state on the module (Qwen2-VL's rope_deltas) that must not leak into scores
    cached.check(requests[0], mode="reason")
    assert len({round(s, 6) for s in expected}) > 2  # random weights still give distinct scores
    one_by_one = [cached.check(r).score for r in requests]  # pre-check, then post-checks continuing from it
    cached.backend.kv_cache.clear()  # (static prefixes are kept apart)
    batched = [v.score for v in cached.check_batch(requests)]  # shared static prefix across a batch
    # the stream's two earlier re-checks were replaced by the last one, which extends them (one entry a stream)
    assert len(cached.backend.kv_cache) == len(requests) - 2
    before = dict(cached.backend.cache_stats)
    again = [v.score for v in cached.check_batch(requests)]  # each row continues from its own cached prompt
    assert one_by_one == pytest.approx(expected, abs=1e-4)
    assert batched == pytest.approx(expected, abs=1e-4)
    assert again == pytest.approx(expected, abs=1e-4)
    assert cached.backend.cache_stats["prompt_hits"] - before["prompt_hits"] == len(requests)
    # the last token each, and the two replaced re-checks their question again (after the longest one's answer)
    again_computed = cached.backend.cache_stats["computed_tokens"] - before["computed_tokens"]
    assert len(requests) + 2 * 4 < again_computed < len(requests) + 2 * 48
    stats = cached.backend.cache_stats
    assert stats["prompt_hits"] >= 3  # every post-check continued from the pre-check or the last re-check
    assert stats["static_hits"] >= 2  # text-only prompts at least (LLaVA's template puts images first)
    if arch != "llava":
        assert stats["static_hits"] >= 5  # images come after the cached prefix (Qwen2-VL: mrope positions)
        assert stats["reused_tokens"] > stats["computed_tokens"]


def test_sliding_window_models_run_without_reuse():
    """Gemma 3's sliding-window layers keep only their window: a post-check continuing from its pre-check's
    cache failed (unavailable); such models score every prompt whole, with the uncached scores."""
    from visguard_testing.guard_checkpoints import cached_guard_checkpoint

    path = cached_guard_checkpoint("gemma3")
    guard = Guard(TransformersBackend(str(path), device="cpu"), VisguardFormat())
    plain = Guard(TransformersBackend(str(path), device="cpu", kv_cache_mb=0), VisguardFormat())
    assert guard.backend.kv_cache is None
    requests = [guard.request(IMAGES, "How do I use this on that?"), guard.request(IMAGES, "How do I use this on that?", RESPONSE)]
    got = [guard.check(r) for r in requests]
    assert [v.score for v in got] == pytest.approx([v.score for v in plain.check_batch(requests)], abs=1e-4)
    assert all(v.label in ("safe", "unsafe") for v in got)


def test_post_check_computes_only_the_response_after_its_pre_check(qwen_path):
    guard = Guard(TransformersBackend(qwen_path, device="cpu"), VisguardFormat())
    guard.check(guard.request(IMAGES, "How do I use this on that?"))
    before = dict(guard.backend.cache_stats)
    guard.check(guard.request(IMAGES, "How do I use this on that?", "ok"))
    computed = guard.backend.cache_stats["computed_tokens"] - before["computed_tokens"]
    reused = guard.backend.cache_stats["reused_tokens"] - before["reused_tokens"]
    assert guard.backend.cache_stats["prompt_hits"] == before["prompt_hits"] + 1
    assert 0 < computed < 100 < reused  # the response block and the question, not the images again
    # other images: no reuse of the request's cache, only the static prefix
    guard.check(guard.request([IMAGES[1], IMAGES[0]], "How do I use this on that?", "ok"))
    assert guard.backend.cache_stats["prompt_hits"] == before["prompt_hits"] + 1


def test_kv_store_is_bounded_and_matches_images():
    store = KVCacheStore(max_bytes=3 * 2 * 4 * 4 * 10, max_entries=8)  # room for three 10-token entries

    def layers(n):
        return [(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4))]

    ids = torch.arange(10)
    store.put(ids, ("a",), layers(10))
    assert store.lookup(torch.cat([ids, torch.tensor([99])]), ("a",), limit=100)[0] == 10
    assert store.lookup(ids, ("b",), limit=100) is None  # same tokens, other images
    n, cut = store.lookup(torch.tensor([0, 1, 2, 7]), ("a",), limit=3)
    assert n == 3 and cut[0][0].shape[2] == 3
    for k in range(3):
        store.put(ids + 100 * (k + 1), ("a",), layers(10))
    assert len(store) == 3 and store.nbytes <= store.max_bytes
    assert store.lookup(ids, ("a",), limit=100) is None  # the oldest went first


def _linked_checkpoint(src: str, dst) -> str:
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).symlink_to(os.path.join(src, name))
    return str(dst)


def test_trained_layout_is_used_or_refused(qwen_path, tmp_path):
    path = _linked_checkpoint(qwen_path, tmp_path / "guard")
    assert Guard.from_pretrained(path, device="cpu").format.version == 2

    record = tmp_path / "guard" / plugins.MODEL_FORMAT_FILE
    record.write_text(json.dumps({"format": "visguard", "format_kwargs": VisguardFormat(version=1).checkpoint_kwargs()}))
    for fmt in (None, "visguard"):  # naming the checkpoint's own format keeps its recorded layout
        old = Guard.from_pretrained(path, format=fmt, device="cpu", policy=Policy())
        assert old.format.version == 1 and not old.format.shares_prefix
    old.check(old.request(IMAGES, "hello"))  # prompts in layout 1 score through the same backend
    assert old.backend.cache_stats["static_hits"] == 0

    record.write_text(json.dumps({"format": "visguard", "format_kwargs": {"version": 9}}))
    with pytest.raises(InputError, match="prompt layout versions \\[1, 2\\], not 9"):
        Guard.from_pretrained(path, device="cpu")


def _kv(n: int) -> list:
    return [(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4))]


def test_kv_store_holds_one_growing_entry_for_a_stream():
    """A stream's re-checks (request + answer so far + the same question) replace each other: one
    entry, bytes linear in the answer. The old store kept every re-check (nested copies of the prefix)."""
    store = KVCacheStore(max_bytes=1 << 30, max_entries=64)
    request, question = torch.arange(50), torch.arange(900, 915)
    answer = torch.arange(1000, 1410)
    for n in range(10, 401, 10):  # 40 re-checks, 10 answer tokens more each time
        ids = torch.cat([request, answer[:n], question])
        assert store.put(ids, ("img",), _kv(len(ids)))
        assert store.lookup(torch.cat([request, answer[: n + 10], question]), ("img",), limit=10_000)[0] == 50 + n
    assert len(store) == 1
    assert store.nbytes == 2 * 4 * 4 * (50 + 400 + 15)  # the last re-check alone
    # a strict extension (a generation, then its follow-up question) replaces it too
    longer = torch.cat([request, answer[:400], question, torch.tensor([7, 8])])
    store.put(longer, ("img",), _kv(len(longer)))
    assert len(store) == 1 and store.lookup(longer, ("img",), limit=10_000)[0] == len(longer)


def test_kv_store_keeps_entries_it_does_not_extend():
    store = KVCacheStore(max_bytes=1 << 30, max_entries=64)
    a = torch.cat([torch.arange(50), torch.arange(1000, 1040), torch.arange(900, 915)])
    b = torch.cat([torch.arange(50), torch.arange(2000, 2060), torch.arange(900, 915)])  # another stream, same images
    store.put(a, ("img",), _kv(len(a)))
    store.put(b, ("img",), _kv(len(b)))
    other_images = torch.cat([a[:-15], torch.arange(3000, 3010), a[-15:]])
    store.put(other_images, ("other",), _kv(len(other_images)))  # extends a, but of other images
    shorter = a[:30]
    store.put(shorter, ("img",), _kv(30))  # a prefix of a: shorter entries never replace longer ones
    assert len(store) == 4
    assert store.lookup(a, ("img",), limit=10_000)[0] == len(a)
    assert store.lookup(b, ("img",), limit=10_000)[0] == len(b)
    # a seam of up to EXTEND_SLACK tokens (the answer's last token re-tokenized) still counts as extended
    seam = torch.cat([a[:-16], torch.tensor([5555, 1040, 1041]), a[-15:]])
    store.put(seam, ("img",), _kv(len(seam)))
    assert store.lookup(a, ("img",), limit=10_000)[0] == len(a) - 16
    assert len(store) == 3  # a and shorter (a prefix of seam) went, seam came; b and other stay


def test_kv_store_generations_replace_only_entries_they_extend_as_a_prefix():
    """Two requests with the same images, texts a few tokens apart and answers that end alike (a
    tiny model's batched generations): the insertion rule took the second for an extension of the
    first and dropped the first's generation cache, so its follow-up recomputed its prompt
    (tests/test_followup_cache.py[llava] failed). Generations are kept with ``insertions=False``."""
    head, answer = torch.arange(50), torch.arange(1000, 1012)
    a = torch.cat([head, torch.tensor([7, 8]), answer])
    b = torch.cat([head, torch.tensor([9, 10, 11]), answer])
    store = KVCacheStore(max_bytes=1 << 30, max_entries=64)
    store.put(a, ("img",), _kv(len(a)), insertions=False)
    store.put(b, ("img",), _kv(len(b)), insertions=False)
    assert len(store) == 2 and store.lookup(a, ("img",), limit=10_000)[0] == len(a)
    longer = torch.cat([a, torch.arange(2000, 2005)])
    store.put(longer, ("img",), _kv(len(longer)), insertions=False)  # a strict prefix still goes
    assert len(store) == 2 and store.lookup(a, ("img",), limit=10_000)[0] == len(a)


def test_kv_store_stream_leaves_other_requests_cached():
    """A long stream took the whole store: its nested re-check copies evicted every other request's
    entry (another user's pre-check then recomputed its images). Now it holds one entry."""
    request, question = torch.arange(50), torch.arange(900, 915)
    answer = torch.arange(1000, 3000)
    store = KVCacheStore(max_bytes=3 * 2 * 4 * 4 * (50 + 2000 + 15), max_entries=64)  # three whole answers
    other = torch.arange(5000, 5300)
    store.put(other, ("other user",), _kv(len(other)))
    reused = 0
    for n in range(20, 2001, 20):
        ids = torch.cat([request, answer[:n], question])
        hit = store.lookup(ids, ("img",), limit=len(ids) - 1)
        reused += hit[0] if hit else 0
        store.put(ids, ("img",), _kv(len(ids)))
    assert reused == sum(50 + n - 20 for n in range(40, 2001, 20))  # every re-check after the first continued
    assert len(store) == 2 and store.lookup(other, ("other user",), limit=10_000)[0] == len(other)
