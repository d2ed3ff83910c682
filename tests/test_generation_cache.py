"""Reason-mode generation continues from the static-prefix cache and from a pre-check's cache.

The transformers backend hands ``model.generate`` a cache built from the longest cached prefix of each
row (the format's static prefix, or a stored entry with the same images: a fast pre-check's prompt, an
earlier generation) and the full input ids; ``generate`` feeds only the uncached part (transformers
5.25, ``generation/utils.py``: ``GenerationMixin._prefill`` slices ``input_ids[:, -(len - past_length):]``
when a cache is passed). Greedy outputs are the same as without any cache, and the prefill computes
only the request's own tokens: counted by the backend (``generation_computed_tokens`` /
``generation_reused_tokens``) and, independently, by what the model's first forward receives.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from visguard import Guard, Policy
from visguard.default_plugins.mirage_format import MirageFormat
from visguard.default_plugins.transformers_backend import TransformersBackend
from visguard.default_plugins.visguard_format import VisguardFormat

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 200, 30))]
OTHER = [Image.new("RGB", (48, 48), (30, 30, 200)), Image.new("RGB", (64, 64), (220, 220, 20))]
#: prompts of three lengths: a batch of them is left-padded
TEXTS = ["How do I use this on that?", "hi", "What is in the pictures, and what do they show together?"]
MAX_NEW = 8


class _Recorder:
    """Records what ``model.generate`` returned and what the model's prefill forward was given."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.sequences: list[list[list[int]]] = []
        self.prefills: list[dict] = []
        self._first = False
        model = backend.model
        generate = model.generate

        def recording_generate(**kwargs):
            self._first = True
            result = generate(**kwargs)
            width = kwargs["input_ids"].shape[1]
            self.sequences.append(result.sequences[:, width:].tolist())
            return result

        def pre_hook(_module, _args, kwargs):
            if self._first:
                self._first = False
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                rows, width = kwargs["input_ids"].shape
                cached = cache.get_seq_length() if cache is not None else 0
                mask = kwargs.get("attention_mask")  # (generate drops a mask of all ones)
                if mask is None:
                    mask = torch.ones((rows, cached + width), dtype=torch.long)
                self.prefills.append({
                    "fed": int(mask[:, -width:].sum()),  # unmasked tokens the forward computes
                    "cached": cached,
                    "cached_unmasked": int(mask[:, : mask.shape[1] - width].sum()),
                    # pixels, or their encoding (generate runs the vision encoder before the prefill where it can)
                    "pixels": kwargs.get("pixel_values") is not None
                    or any(v is not None for v in (kwargs.get("mm_encoder_outputs") or {}).values()),
                })

        model.generate = recording_generate
        model.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _prompts(guard: Guard, pairs: list, texts: list[str], mode: str = "reason") -> list:
    return [guard.format.build(guard.request(images, text), guard.policy, mode=mode,
                               special_tokens=guard.backend.special_tokens) for images, text in zip(pairs, texts, strict=True)]


def _ids(backend: TransformersBackend, prompt) -> list[int]:
    kwargs = {"text": [backend.render(prompt)], "return_tensors": "pt"}
    if prompt.images:
        kwargs["images"] = [list(prompt.images)]
    return backend.processor(**kwargs)["input_ids"][0].tolist()


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _delta(backend: TransformersBackend, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in backend.cache_stats.items()}


def _assert_same(plain, got, plain_rec, got_rec) -> None:
    assert got_rec.sequences[-1] == plain_rec.sequences[-1]  # the same greedy token ids
    for want, have in zip(plain, got, strict=True):
        assert have.text == want.text
        assert have.step_scores == pytest.approx(want.step_scores, abs=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "idefics3"])
def test_generation_from_caches_equals_generation_without(arch):
    """A left-padded batch generates the same tokens and step probabilities: cold (static prefix), again
    (each row from its own kept generation, no pixels), and mixed (cached and uncached rows: the cached
    rows' prefixes cut before their images, pixels passed)."""
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    path = str(cached_tiny_checkpoint(arch))
    plain = Guard(TransformersBackend(path, device="cpu", kv_cache_mb=0), VisguardFormat())
    cached = Guard(TransformersBackend(path, device="cpu"), VisguardFormat())
    plain_rec, cached_rec = _Recorder(plain.backend), _Recorder(cached.backend)
    pairs = [IMAGES, OTHER, [IMAGES[1], OTHER[0]]]  # (a batch holds prompts with as many images)
    prompts = _prompts(plain, pairs, TEXTS)
    want = plain.backend.generate(prompts, max_new_tokens=MAX_NEW)
    assert len({round(g.step_scores[0], 5) for g in want}) == 3  # the rows differ: a real comparison
    lengths = [len(_ids(plain.backend, p)) for p in prompts]
    assert len(set(lengths)) == 3  # ragged: left padding

    _assert_same(want, cached.backend.generate(prompts, max_new_tokens=MAX_NEW), plain_rec, cached_rec)
    cold = cached_rec.prefills[-1]
    if arch != "llava":  # LLaVA-1.5's template moves the images before the text: no static prefix
        assert cold["cached"] > 0 and cold["pixels"]

    _assert_same(want, cached.backend.generate(prompts, max_new_tokens=MAX_NEW), plain_rec, cached_rec)
    again = cached_rec.prefills[-1]
    assert again == {"fed": 3, "cached": max(lengths) - 1, "cached_unmasked": sum(lengths) - 3, "pixels": False}

    mixed = _prompts(plain, [IMAGES, [OTHER[1], IMAGES[0]], OTHER], TEXTS)  # row 1: no cached entry for its images
    want = plain.backend.generate(mixed, max_new_tokens=MAX_NEW)
    _assert_same(want, cached.backend.generate(mixed, max_new_tokens=MAX_NEW), plain_rec, cached_rec)
    assert cached_rec.prefills[-1]["pixels"]


def test_reason_check_after_fast_pre_check_computes_only_what_follows_the_cached_part(qwen_path):
    """Must show (1): MIRage's fast pre-check caches its prompt (the images come first); the reason check of
    the same request continues from it, images included: its prefill computes only its tokens after the
    common prefix, encodes no pixels, and generates what a backend without caches generates."""
    plain = Guard(TransformersBackend(qwen_path, device="cpu", kv_cache_mb=0), MirageFormat("qwen2_vl"),
                  Policy(max_new_tokens=MAX_NEW))
    guard = Guard(TransformersBackend(qwen_path, device="cpu"), MirageFormat("qwen2_vl"), Policy(max_new_tokens=MAX_NEW))
    plain_rec, rec = _Recorder(plain.backend), _Recorder(guard.backend)
    request = guard.request(IMAGES, TEXTS[0])
    fast, reason = (_ids(guard.backend, p) for p in _prompts(guard, [IMAGES, IMAGES], [TEXTS[0]] * 2, "fast")[:1]
                    + _prompts(guard, [IMAGES], [TEXTS[0]], "reason"))
    shared = _common(fast, reason)
    last_image = max(i for i, t in enumerate(reason) if t == guard.backend._image_token)
    assert last_image < shared < len(reason)  # the images are in the shared part

    guard.check(request, mode="fast")
    before = dict(guard.backend.cache_stats)
    verdict = guard.check(request, mode="reason")
    delta = _delta(guard.backend, before)
    assert delta["generation_reused_tokens"] == shared
    assert delta["generation_computed_tokens"] == len(reason) - shared
    assert rec.prefills[-1] == {"fed": len(reason) - shared, "cached": shared, "cached_unmasked": shared, "pixels": False}
    want = plain.check(request, mode="reason")
    assert rec.sequences[-1] == plain_rec.sequences[-1]
    assert verdict.reasoning == want.reasoning and verdict.score == pytest.approx(want.score, abs=1e-4)
    diagnostics = guard.backend.diagnostics()
    assert diagnostics.generation_reused_tokens == shared
    assert diagnostics.generation_computed_tokens == len(reason) - shared


def test_cold_reason_check_computes_only_the_request_tokens(qwen_path):
    """Must show (2): with no earlier check, a reason check's prefill continues from the format's static
    prefix (instructions and policy) and computes only the request's own tokens, its images included."""
    guard = Guard(TransformersBackend(qwen_path, device="cpu"), VisguardFormat(), Policy(max_new_tokens=MAX_NEW))
    rec = _Recorder(guard.backend)
    prompt = _prompts(guard, [IMAGES], [TEXTS[0]])[0]
    ids = _ids(guard.backend, prompt)
    static = guard.backend.diagnostics(prompt).static_prefix_tokens
    first_image = ids.index(guard.backend._image_token)
    assert 0 < static <= first_image  # the instructions before the images
    # the static prefix's text is what the backend caches: its own tokenisation starts the prompt's ids
    text = guard.backend.codec.static_prefix(prompt, guard.backend.render(prompt))
    assert guard.backend.tokenizer(text)["input_ids"] == ids[:static]

    guard.check(guard.request(IMAGES, TEXTS[0]), mode="reason")
    stats = guard.backend.cache_stats
    assert stats["generation_reused_tokens"] == static
    assert stats["generation_computed_tokens"] == len(ids) - static
    assert rec.prefills[0] == {"fed": len(ids) - static, "cached": static, "cached_unmasked": static, "pixels": True}


def test_generation_without_cache_counts_every_prompt_token(qwen_path):
    backend = TransformersBackend(qwen_path, device="cpu", kv_cache_mb=0)
    guard = Guard(backend, VisguardFormat())
    rec = _Recorder(backend)
    prompt = _prompts(guard, [IMAGES], [TEXTS[0]])[0]
    backend.generate([prompt], max_new_tokens=2)
    assert rec.prefills[0]["cached"] == 0 and rec.prefills[0]["fed"] == len(_ids(backend, prompt))
    assert rec.prefills[0]["pixels"]
