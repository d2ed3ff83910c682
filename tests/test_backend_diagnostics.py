"""`Backend.diagnostics()` and the transformers backend's `forward_floor`: what benchmarks read instead of internals."""

from __future__ import annotations

import pytest
from PIL import Image

from visguard import Guard, Policy
from visguard.default_plugins.transformers_backend import TransformersBackend
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.engine.backend import Backend, BackendDiagnostics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 200, 30))]
TEXT = "How do I use this on that?"


class _Plain(Backend):
    name = "plain"

    def score(self, prompts):
        return [0.5 for _ in prompts]

    def generate(self, prompts, *, max_new_tokens):
        return []


def test_base_class_reports_no_caches_and_no_counts():
    d = _Plain().diagnostics()
    assert d == BackendDiagnostics()
    assert not d.caching and d.prompt_tokens is None and d.static_prefix_tokens is None and d.request_tokens is None


def _prompt(guard: Guard, images=IMAGES, response: str | None = None):
    req = guard.request(images, TEXT, response)
    return guard.format.build(req, guard.policy, mode="fast", special_tokens=guard.backend.special_tokens)


def test_diagnostics_counts_tokens_and_follows_the_cache(qwen_path):
    guard = Guard(TransformersBackend(qwen_path, device="cpu"), VisguardFormat(), Policy())
    backend = guard.backend
    prompt = _prompt(guard)
    d = backend.diagnostics(prompt)
    expected = backend.processor(text=[backend.render(prompt)], images=[list(prompt.images)], return_tensors="pt")
    assert d.caching and d.cache_limit_bytes == 256 << 20 and d.cache_bytes == 0
    assert d.prompt_tokens == int(expected["input_ids"].shape[1])
    assert 0 < d.static_prefix_tokens < d.prompt_tokens
    assert d.request_tokens == d.prompt_tokens - d.static_prefix_tokens
    assert (d.reused_tokens, d.computed_tokens, d.static_hits, d.prompt_hits) == (0, 0, 0, 0)  # it ran nothing

    guard.check_input(IMAGES, TEXT)
    after = backend.diagnostics()
    assert after.prompt_tokens is None
    # the check continued from the static prefix and computed exactly the request's tokens
    assert after.static_hits == 1 and after.reused_tokens == d.static_prefix_tokens
    assert after.computed_tokens == d.request_tokens and after.cache_bytes > 0
    assert after.computed_tokens == backend.cache_stats["computed_tokens"]

    cold = TransformersBackend.from_objects(backend.model, backend.processor, model_id=qwen_path, kv_cache_mb=0)
    c = cold.diagnostics(prompt)
    assert not c.caching and c.cache_limit_bytes == 0
    assert c.prompt_tokens == d.prompt_tokens and c.static_prefix_tokens == 0 and c.request_tokens == c.prompt_tokens


def test_forward_floor_scores_like_score_and_touches_no_cache(tiny_arch):
    _, path = tiny_arch
    guard = Guard(TransformersBackend(path, device="cpu"), VisguardFormat(), Policy())
    backend = guard.backend
    prompts = [_prompt(guard), _prompt(guard, IMAGES[:1]), _prompt(guard, [])]
    cold = TransformersBackend.from_objects(backend.model, backend.processor, model_id=path, kv_cache_mb=0)
    expected = cold.score(prompts)
    before = backend.diagnostics()
    floors = [backend.forward_floor(p) for p in prompts]
    whole = [backend.forward_floor(p, static_prefix=False) for p in prompts]
    assert floors == pytest.approx(expected, abs=1e-4)
    assert whole == pytest.approx(expected, abs=1e-4)
    after = backend.diagnostics()
    assert after == before  # no per-prompt cache read or kept, nothing counted
    assert len(backend.kv_cache) == 0
