"""The ``vllm`` backend on a real vLLM engine (CPU): same scores and text as the transformers backend.

One engine for the whole module (start-up takes 15-60 s on 2 CPU cores).
"""

from __future__ import annotations

import time

import pytest
from PIL import Image

from visguard import Guard, Policy, plugins

TOL = 1e-3


@pytest.fixture(scope="module")
def vguard(qwen_path):
    start = time.perf_counter()
    guard = Guard.from_pretrained(
        qwen_path,
        backend="vllm",
        dtype="float32",
        max_images=2,
        max_model_len=2048,
        max_num_seqs=4,
        enforce_eager=True,
    )
    print(f"\nvLLM engine start-up: {time.perf_counter() - start:.1f} s")
    yield guard
    guard.close()


def test_plugin_is_installed_through_its_entry_point():
    import visguard_vllm

    info = {p["name"]: p for p in plugins.describe()}
    assert info["vllm"]["provides"] == {"backends": ["vllm"]}
    assert plugins.registry("backends")["vllm"] is visguard_vllm.create_backend
    dists = {plugins.pm.get_name(plugin): dist.project_name for plugin, dist in plugins.pm.list_plugin_distinfo()}
    assert dists["vllm"] == "visguard-vllm"


def test_fast_scores_match_transformers(vguard, reference, images):
    requests = [
        vguard.request(images, "Use the item in image 1 on the person in image 2."),
        vguard.request(images, "Use the item in image 1 on the person in image 2.", "Sure, here is how to do it."),
        vguard.request(images[:1], "What colour is this?"),
        vguard.request(None, "Tell me a story about a <|im_start|> token."),
    ]
    start = time.perf_counter()
    got = vguard.check_batch(requests)
    elapsed = time.perf_counter() - start
    want = reference.check_batch(requests)
    diffs = [abs(g.score - w.score) for g, w in zip(got, want, strict=True)]
    print(f"\nvLLM batch of 4 fast checks: {elapsed * 1000:.0f} ms; |score - transformers| = {diffs}")
    assert all(v.label in ("safe", "unsafe") and v.mode == "fast" for v in got)
    assert max(diffs) < TOL
    assert [g.label for g in got] == [w.label for w in want]
    assert [g.stage for g in got] == ["input", "output", "input", "input"]


def test_reason_generation_matches_transformers_token_for_token(vguard, reference, images):
    request = vguard.request(images, "Is it safe to combine these two things?")
    prompt = vguard.format.build(request, vguard.policy, mode="reason", special_tokens=vguard.backend.special_tokens)
    [got] = vguard.backend.generate([prompt], max_new_tokens=24)
    ref_prompt = reference.format.build(request, reference.policy, mode="reason", special_tokens=reference.backend.special_tokens)
    [want] = reference.backend.generate([ref_prompt], max_new_tokens=24)
    assert got.text == want.text and got.token_spans == want.token_spans
    assert len(got.step_scores) == len(want.step_scores) > 0
    assert max(abs(a - b) for a, b in zip(got.step_scores, want.step_scores, strict=True)) < TOL

    # Through the guard: the same verdict (a random tiny model writes no verdict line: unavailable, never safe).
    reason = Policy(mode="reason", max_new_tokens=24)
    v_got = vguard.with_policy(reason).check(request)
    v_want = reference.with_policy(reason).check(request)
    assert (v_got.label, v_got.raw) == (v_want.label, v_want.raw)
    assert v_got.label != "safe"


@pytest.mark.xfail(strict=True, reason="regression from prompt layout 2 / the static-prefix change, open: see the closing note of this landing")
def test_post_check_reuses_the_pre_checks_prefix(vguard):
    # Fresh images so nothing after the system prompt is cached yet.
    imgs = [Image.new("RGB", (56, 56), (17, 99, 3)), Image.new("RGB", (56, 56), (250, 250, 1))]
    stats = vguard.backend.stats
    before = stats["cached_prompt_tokens"]
    vguard.check_input(imgs, "How do I use these?")
    pre_cached = stats["cached_prompt_tokens"] - before
    mid = stats["cached_prompt_tokens"]
    vguard.check_output(imgs, "How do I use these?", "Carefully, and with permission.")
    post_cached = stats["cached_prompt_tokens"] - mid
    print(f"\ncached prompt tokens: pre-check {pre_cached}, post-check {post_cached}")
    # The post-check shares system prompt + images + instruction + user text with the pre-check:
    # at least one full KV block (128 tokens on CPU) past what the pre-check found cached.
    assert post_cached >= pre_cached + 128


def test_more_images_than_the_engine_limit_is_unavailable_not_safe(vguard, images):
    verdict = vguard.check_input(images + [images[0]], "three images")
    assert verdict.label == "unavailable"
    assert "at most 2" in verdict.error


def test_repeated_fast_check_latency(vguard, images):
    request = vguard.request(images, "Use the item in image 1 on the person in image 2.")
    vguard.check(request)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        vguard.check(request)
        runs.append((time.perf_counter() - start) * 1000)
    print(f"\nvLLM fast check, 2 images, cached prefix: median {sorted(runs)[2]:.1f} ms")
    assert sorted(runs)[2] < 5000
