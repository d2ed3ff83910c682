"""One render and one tokenization per prompt per check; a request's images preprocessed once.

With the static prefix cached, only the text after it is tokenized (its ids are kept with its cache).

Counted by wrapping the processor's pieces: its chat template (a render), its tokenizer (a
tokenization) and its image processor (a preprocessing of pixels). A fast check renders, tokenizes
and preprocesses once; its post-check (the same images) renders and tokenizes its own prompt but
takes the images' preprocessed outputs from the pre-check (``_PixelCache``, keyed by the images'
content keys); a reason check's follow-up likewise. Scores are the same as without the kept pixels.
"""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from visguard import Guard, Policy
from visguard.default_plugins.mirage_format import MirageFormat
from visguard.default_plugins.transformers_backend import TransformersBackend
from visguard.default_plugins.visguard_format import VisguardFormat

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "How do I use this on that?"
RESPONSE = "Sure. First take the tool from the first picture, then hold it firmly."


def _images(seed: int) -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), (seed, 30, 30)), Image.new("RGB", (64, 48), (30, seed, 30))]


class _Counting:
    def __init__(self, inner, counts: Counter, name: str) -> None:
        self.__dict__.update(inner=inner, counts=counts, name=name)

    def __getattr__(self, attr):
        return getattr(self.__dict__["inner"], attr)

    def __call__(self, *args, **kwargs):
        self.counts[self.name] += 1
        return self.inner(*args, **kwargs)


def _counted(backend: TransformersBackend, monkeypatch) -> Counter:
    """Counts of chat-template renders, tokenizer calls and image-processor runs on ``backend``."""
    counts: Counter = Counter()
    counts.texts = []  # what the tokenizer was given
    processor = backend.processor
    processor.image_processor = _Counting(processor.image_processor, counts, "images")
    render = processor.apply_chat_template
    tokenize = type(backend.tokenizer).__call__

    def counting_render(*args, **kwargs):
        counts["render"] += 1
        return render(*args, **kwargs)

    def counting_tokenize(self, *args, **kwargs):
        counts["tokenize"] += 1
        text = args[0] if args else kwargs.get("text")
        counts.texts += [text] if isinstance(text, str) else list(text or ())
        return tokenize(self, *args, **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", counting_render)
    monkeypatch.setattr(type(backend.tokenizer), "__call__", counting_tokenize)
    return counts


def _delta(counts: Counter, run) -> dict[str, int]:
    before = Counter(counts)
    run()
    return {k: counts[k] - before[k] for k in ("render", "tokenize", "images")}


def test_fast_check_and_its_post_check_encode_once(qwen_path, monkeypatch):
    plain = Guard(TransformersBackend(qwen_path, device="cpu", kv_cache_mb=0), VisguardFormat())
    guard = Guard(TransformersBackend(qwen_path, device="cpu"), VisguardFormat())
    guard.check(guard.request(_images(1), TEXT))  # the static prefix: rendered, tokenized and computed once, here
    guard.check(guard.request(_images(5), TEXT))  # encoded whole and after the prefix, once, to compare
    assert list(guard.backend._static_split_ok.values()) == [True]
    counts = _counted(guard.backend, monkeypatch)
    pre_request, post_request = guard.request(_images(2), TEXT), guard.request(_images(2), TEXT, RESPONSE)
    scores = {}
    assert _delta(counts, lambda: scores.update(pre=guard.check(pre_request).score)) == {
        "render": 1, "tokenize": 1, "images": 1}
    # the post-check: its own prompt rendered and tokenized, the images' pixels not preprocessed again
    assert _delta(counts, lambda: scores.update(post=guard.check(post_request).score)) == {
        "render": 1, "tokenize": 1, "images": 0}
    # the static prefix (kept with its cache) is not tokenized again: only what follows it
    prompt = guard.format.build(pre_request, guard.policy, mode="fast", special_tokens=guard.backend.special_tokens)
    static = guard.backend.codec.static_prefix(prompt, guard.backend.render(prompt))
    assert static and counts.texts and not any(static in text for text in counts.texts)
    assert scores["pre"] == pytest.approx(plain.check(pre_request).score, abs=1e-4)
    assert scores["post"] == pytest.approx(plain.check(post_request).score, abs=1e-4)
    # fresh images: preprocessed
    assert _delta(counts, lambda: guard.check(guard.request(_images(3), TEXT)))["images"] == 1


def test_reason_check_preprocesses_its_images_once(qwen_path, monkeypatch):
    """MIRage's reason check: a generation, then a follow-up verdict prompt with the same images."""
    policy = Policy(max_new_tokens=4)
    guard = Guard(TransformersBackend(qwen_path, device="cpu"), MirageFormat("qwen2_vl"), policy)
    plain = Guard(TransformersBackend(qwen_path, device="cpu", kv_cache_mb=0), MirageFormat("qwen2_vl"), policy)
    counts = _counted(guard.backend, monkeypatch)
    request = guard.request(_images(4), TEXT)
    verdict = {}
    # two prompts (generation, follow-up): each rendered and tokenized once; the pixels once
    assert _delta(counts, lambda: verdict.update(v=guard.check(request, mode="reason"))) == {
        "render": 2, "tokenize": 2, "images": 1}
    assert verdict["v"].score == pytest.approx(plain.check(request, mode="reason").score, abs=1e-4)


def test_kept_pixels_are_bounded_and_keyed_by_content(qwen_path):
    backend = TransformersBackend(qwen_path, device="cpu")
    guard = Guard(backend, VisguardFormat())
    for seed in range(12):
        guard.check(guard.request(_images(10 + seed), TEXT))
    pixels = backend.processor.image_processor
    # (one hit: the second check encoded its prompt whole too, once, to compare with the encoding after the prefix)
    assert len(pixels._entries) == pixels.max_entries and pixels.misses == 12 and pixels.hits == 1
    # the same pixels under another name: a hit; one pixel changed: a miss
    guard.check(guard.request(_images(21), TEXT, RESPONSE))
    changed = _images(21)
    changed[1].putpixel((0, 0), (0, 0, 0))
    guard.check(guard.request(changed, TEXT, RESPONSE))
    assert (pixels.hits, pixels.misses) == (2, 13)


def test_a_changed_image_processor_setting_drops_the_kept_pixels(qwen_path):
    guard = Guard(TransformersBackend(qwen_path, device="cpu"), VisguardFormat())
    request = guard.request(_images(40), TEXT)
    guard.check(request)
    pixels = guard.backend.processor.image_processor
    pixels.do_resize = pixels.inner.do_resize  # set through the wrapper, on the image processor itself
    assert "do_resize" not in pixels.__dict__ and not pixels._entries
    guard.check(request)
    assert pixels.misses == 2  # preprocessed again (a hit after it: the one-time whole-encoding comparison)


def test_clear_cache_forgets_every_kept_thing(qwen_path, monkeypatch):
    """``clear_cache``: the next check preprocesses, tokenizes and computes as the first one did."""
    backend = TransformersBackend(qwen_path, device="cpu")
    guard = Guard(backend, VisguardFormat())
    request = guard.request(_images(60), TEXT)
    first = guard.check(request).score
    guard.check(guard.request(_images(61), TEXT))  # a second prompt after the prefix: the split check ran
    pixels = backend.processor.image_processor
    assert pixels._entries and backend._static and backend._static_split_ok and len(backend.kv_cache) > 0
    backend.clear_cache()
    assert not pixels._entries and not backend._static and not backend._static_split_ok
    assert len(backend.kv_cache) == 0
    misses = pixels.misses
    assert guard.check(request).score == pytest.approx(first, abs=1e-5)
    assert pixels.misses == misses + 1 and backend._static  # preprocessed again; the prefix cached again


def test_no_kept_pixels_with_reuse_off(qwen_path, monkeypatch):
    """``kv_cache_mb=0`` turns pre -> post reuse off, the images' preprocessing included."""
    guard = Guard(TransformersBackend(qwen_path, device="cpu", kv_cache_mb=0), VisguardFormat())
    counts = _counted(guard.backend, monkeypatch)
    guard.check(guard.request(_images(50), TEXT))
    assert _delta(counts, lambda: guard.check(guard.request(_images(50), TEXT, RESPONSE)))["images"] == 1
